"""The CPU attention kernels (tvm_schedules/cpu_attention.py): compiled for this CPU and run against their NumPy
model and against the TVM kernels they replace (same arguments, output and lse), causal and not, several sequences in
one call, empty and one-token sequences, pages out of order; the export pass swaps exactly the three stock kernels."""
import numpy as np
import pytest

pytestmark = pytest.mark.tvm

HKV, HQ, D, PAGE = 3, 9, 64, 16


@pytest.fixture(scope="module")
def kernels():
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu

    from edgequant.tvm_schedules import cpu_attention as ca
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    build = lambda f: tvm.compile(tvm.IRModule({"main": f}), target=host)  # noqa: E731
    return {"ragged": (build(ca.ragged_prefill_func(HKV, HQ, D)),
                       build(_attention_prefill_ragged_cpu(HKV, HQ, D, D, "float16", {}))),
            "decode": (build(ca.decode_func(HKV, HQ, D)),
                       build(_attention_decode_cpu(HKV, HQ, D, "float16", False, {}))),
            "paged": (build(ca.paged_prefill_func(HKV, HQ, D)),
                      build(_attention_prefill_cpu(HKV, HQ, D, "float16", False, {})))}


def _t(a):
    import tvm
    return tvm.runtime.tensor(a, tvm.cpu())


@pytest.mark.parametrize("seqs,causal", [([(37, 37)], 1), ([(5, 21), (1, 1), (16, 40)], 1), ([(6, 6)], 0),
                                         ([(0, 0), (3, 3)], 1)])
def test_ragged_prefill(kernels, seqs, causal):
    from edgequant.tvm_schedules.cpu_attention import attention_np
    rng = np.random.default_rng(len(seqs) + causal)
    qs = [rng.standard_normal((n, HQ, D)).astype(np.float16) for n, _ in seqs]
    ks = [rng.standard_normal((m, HKV, D)).astype(np.float16) for _, m in seqs]
    vs = [rng.standard_normal((m, HKV, D)).astype(np.float16) for _, m in seqs]
    n = sum(s[0] for s in seqs)
    qi, ki = np.cumsum([0] + [s[0] for s in seqs]).astype(np.int32), np.cumsum([0] + [s[1] for s in seqs])
    got = []
    for fn in kernels["ragged"]:
        out, lse = _t(np.zeros((n, HQ, D), np.float16)), _t(np.zeros((n, HQ), np.float32))
        fn(_t(np.concatenate(qs)), _t(qi), _t(np.concatenate(ks)), _t(np.concatenate(vs)), _t(ki.astype(np.int32)),
           _t(np.zeros(n, np.int32)), _t(np.zeros(len(seqs), np.int32)), out, lse, causal, 0, 1.0, 1e4, 0.125)
        got.append((out.numpy().astype(np.float32), lse.numpy()))
    ref = [attention_np(q, k, v, bool(causal), 0.125) for q, k, v in zip(qs, ks, vs)]
    ref_o, ref_l = np.concatenate([r[0] for r in ref]), np.concatenate([r[1] for r in ref])
    (mine_o, mine_l), (stock_o, stock_l) = got
    assert np.abs(mine_o - ref_o).max() < 2e-3 and np.abs(mine_l - ref_l).max() < 1e-4
    assert np.abs(mine_o - stock_o).max() < 2e-3 and np.abs(mine_l - stock_l).max() < 1e-4


def _paged(rng, lens):
    """Pages holding sequences of `lens` keys, each sequence's pages in any order: (pages, indptr, values, last)."""
    n_pages = sum(-(-n // PAGE) for n in lens) + 3
    pages = rng.standard_normal((n_pages, 2, HKV, PAGE, D)).astype(np.float16)
    order = rng.permutation(n_pages).astype(np.int32)
    indptr, values, last = [0], [], []
    for n in lens:
        k = -(-n // PAGE)
        values += list(order[len(values):len(values) + k])
        indptr.append(len(values))
        last.append(n - (k - 1) * PAGE if k else 0)
    return pages, indptr, values, last


def _cached(pages, indptr, values, b, n):
    """Sequence b's first n cached keys and values, [n, HKV, D] each, in order."""
    rows = [(values[indptr[b] + j // PAGE], j % PAGE) for j in range(n)]
    if not rows:
        return np.zeros((0, HKV, D), np.float16), np.zeros((0, HKV, D), np.float16)
    return np.stack([pages[p, 0, :, o] for p, o in rows]), np.stack([pages[p, 1, :, o] for p, o in rows])


@pytest.mark.parametrize("lens", [[129], [1], [16, 40, 3]])
def test_decode(kernels, lens):
    from edgequant.tvm_schedules.cpu_attention import attention_np
    rng = np.random.default_rng(sum(lens))
    pages, indptr, values, last = _paged(rng, lens)
    q = rng.standard_normal((len(lens), HQ, D)).astype(np.float16)
    got = []
    for fn in kernels["decode"]:
        out, lse = _t(np.zeros((len(lens), HQ, D), np.float16)), _t(np.zeros((len(lens), HQ), np.float32))
        fn(_t(q), _t(pages), _t(np.array(indptr, np.int32)), _t(np.array(values, np.int32)),
           _t(np.array(last, np.int32)), _t(np.zeros(len(lens), np.int32)), _t(np.array(lens, np.int32)), out, lse,
           0, 1.0, 1e4, 0.125)
        got.append((out.numpy().astype(np.float32), lse.numpy()))
    for b, n in enumerate(lens):
        k, v = _cached(pages, indptr, values, b, n)
        ref_o, ref_l = attention_np(q[b:b + 1], k, v, False, 0.125)
        for o, lse in got:
            assert np.abs(o[b] - ref_o[0]).max() < 2e-3 and np.abs(lse[b] - ref_l[0]).max() < 1e-4


@pytest.mark.parametrize("seqs,causal", [([(5, 37)], 1), ([(3, 3), (1, 20), (4, 16)], 1),
                                         ([(3, 3), (1, 20), (4, 16)], 0), ([(2, 0), (6, 17)], 0)])
def test_paged_prefill(kernels, seqs, causal):
    """A later prefill chunk: each sequence's qo query rows over its kv cached keys (causal: row i sees the first
    kv - qo + i + 1, as the stock kernel's mask), against NumPy and the stock kernel."""
    from edgequant.tvm_schedules.cpu_attention import attention_np
    rng = np.random.default_rng(sum(q + k for q, k in seqs) + causal)
    pages, indptr, values, last = _paged(rng, [kv for _, kv in seqs])
    n = sum(qo for qo, _ in seqs)
    q = rng.standard_normal((n, HQ, D)).astype(np.float16)
    qi = np.cumsum([0] + [qo for qo, _ in seqs]).astype(np.int32)
    got = []
    for fn in kernels["paged"]:
        out, lse = _t(np.zeros((n, HQ, D), np.float16)), _t(np.zeros((n, HQ), np.float32))
        fn(_t(q), _t(qi), _t(pages), _t(np.array(indptr, np.int32)), _t(np.array(values, np.int32)),
           _t(np.array(last, np.int32)), _t(np.zeros(len(seqs), np.int32)), _t(np.zeros(n, np.int32)), out, lse,
           causal, 0, 1.0, 1e4, 0.125)
        got.append((out.numpy().astype(np.float32), lse.numpy()))
    for b, (qo, kv) in enumerate(seqs):
        k, v = _cached(pages, indptr, values, b, kv)
        for i in range(qo):
            vis = kv - qo + i + 1 if causal else kv
            t = qi[b] + i
            if vis > 0:
                ref_o, ref_l = attention_np(q[t:t + 1], k[:vis], v[:vis], False, 0.125)
            else:   # no visible key: output 0 and the phantom score's lse, as the stock kernel
                ref_o, ref_l = np.zeros((1, HQ, D), np.float32), np.full((1, HQ), -5e4, np.float32)
            for o, lse in got:
                assert np.abs(o[t] - ref_o[0]).max() < 2e-3 and np.abs(lse[t] - ref_l[0]).max() < 1e-4


def test_rope_inline_is_refused(kernels):
    q = np.zeros((2, HQ, D), np.float16)
    k = np.zeros((2, HKV, D), np.float16)
    with pytest.raises(Exception, match="RoPE must be applied"):
        kernels["ragged"][0](_t(q), _t(np.array([0, 2], np.int32)), _t(k), _t(k), _t(np.array([0, 2], np.int32)),
                             _t(np.zeros(2, np.int32)), _t(np.zeros(1, np.int32)), _t(q),
                             _t(np.zeros((2, HQ), np.float32)), 1, 1, 1.0, 1e4, 0.125)


def test_pass_swaps_the_stock_kernels():
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu

    from edgequant.tvm_schedules import cpu_attention as ca
    mod = tvm.IRModule({ca.RAGGED: _attention_prefill_ragged_cpu(HKV, HQ, D, D, "float16", {}),
                        ca.DECODE: _attention_decode_cpu(HKV, HQ, D, "float16", False, {}),
                        ca.PAGED: _attention_prefill_cpu(HKV, HQ, D, "float16", False, {}),
                        "batch_decode_paged_kv_cpu_sliding_window":
                            _attention_decode_cpu(HKV, HQ, D, "float16", True, {})})
    out = ca.replace_in(mod)
    for name in (ca.RAGGED, ca.DECODE, ca.PAGED):
        assert "RoPE must be applied" in out[name].script() and "RoPE must be applied" not in mod[name].script()
        assert out[name].attrs["global_symbol"] == name
    assert out["batch_decode_paged_kv_cpu_sliding_window"].same_as(mod["batch_decode_paged_kv_cpu_sliding_window"])
    odd = tvm.IRModule({ca.DECODE: _attention_decode_cpu(HKV, HQ, 40, "float16", False, {})})  # D % 16 != 0
    assert ca.replace_in(odd)[ca.DECODE].same_as(odd[ca.DECODE])


@pytest.mark.parametrize("theta,scale,rope_scaling,hoisted", [(1e4, 1.0, {}, True), (1e5, 2.0, {}, True),
                                                               (1e4, 1.0, {"rope_type": "gptj"}, False)])
def test_rope_runs_in_parallel_with_the_same_results(theta, scale, rope_scaling, hoisted):
    """The split + RoPE kernel's replacement (default RoPE: cos and sin once per token, `hoisted_rope`; another
    RoPE type: the stock kernel run in parallel) gives the stock kernel's fp16 results bit for bit, with RoPE applied
    and not."""
    import tvm
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    from edgequant.tvm_schedules import cpu_attention as ca
    stock = llama_rope_with_position_map(theta, scale, D, HQ, HKV, "float16", rope_scaling)
    assert (ca.hoisted_rope(stock) is not None) == hoisted
    mod = ca.replace_in(tvm.IRModule({ca.ROPE: stock}))
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    assert "TVMBackendParallelLaunch" in tvm.tirx.build(mod, target=host).inspect_source("asm")
    rng = np.random.default_rng(5)
    qkv = (rng.standard_normal((11, HQ + 2 * HKV, D)) * 4).astype(np.float16)
    pos = rng.integers(0, 5000, 11).astype(np.int32)
    for apply_rope in (1, 0):
        outs = []
        for f in (stock, mod[ca.ROPE]):
            o = [_t(np.zeros((11, h, D), np.float16)) for h in (HQ, HKV, HKV)]
            tvm.compile(tvm.IRModule({"main": f}), target=host)(_t(qkv), _t(pos), *o, apply_rope)
            outs.append([t.numpy() for t in o])
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
