"""OWQ: planted weak columns are found, fp16 columns are stored and used exactly, k follows the budget rule."""
import json

import pytest
import torch

from edgequant import api
from edgequant.artifact import load_quantized_model, load_quantized_weight, open_checkpoint
from edgequant.calibrate.gptq import gptq_quantize
from edgequant.calibrate.owq import column_sensitivity, select_weak_columns, weak_column_counts
from edgequant.errors import EdgequantError
from edgequant.models import family_for
from edgequant.schemes import QuantScheme


def _planted(k=256, n=128, tokens=4096, planted=(3, 77, 140, 201), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, list(planted)] *= 20            # outlier input channels: large activations
    w = torch.randn(n, k, generator=g) * 0.05
    H = 2 * x.T @ x / tokens
    return w, x, H


def test_selection_finds_planted_outlier_channels():
    w, x, H = _planted()
    idx = select_weak_columns(w, torch.diag(H), QuantScheme(3, 64), 4)
    assert idx.tolist() == [3, 77, 140, 201]
    sens = column_sensitivity(w, torch.diag(H), QuantScheme(3, 64))
    assert sens.shape == (256,) and torch.all(sens >= 0)


def test_weak_columns_reduce_output_error():
    w, x, H = _planted()
    s = QuantScheme(3, 64)
    idx = select_weak_columns(w, torch.diag(H), s, 4)
    with_owq, _ = gptq_quantize(w, H, s, keep=idx)
    plain, _ = gptq_quantize(w, H, s)
    err = lambda qw: float(((x @ (w - qw.dequantize()).T) ** 2).mean())
    assert err(with_owq) < 0.5 * err(plain)


def test_budget_rule_llama():
    fam = family_for("llama")
    inf = {"self_attn.q_proj": 4096, "self_attn.k_proj": 4096, "self_attn.v_proj": 4096, "self_attn.o_proj": 4096,
           "mlp.gate_proj": 4096, "mlp.up_proj": 4096, "mlp.down_proj": 11008}
    k = weak_column_counts(fam, inf, 3, 3.01)
    r = 12 / 13 * 0.01 / 7
    assert k["self_attn.q_proj"] == 6                     # round(4096 * r) = 5 -> even 6
    assert k["mlp.down_proj"] == round(11008 * r * 0.375) + round(11008 * r * 0.375) % 2
    assert all(v % 2 == 0 for v in k.values())
    k31 = weak_column_counts(fam, inf, 3, 3.1)
    assert all(k31[n] > k[n] for n in k)
    # for LLaMA-7B shapes the rule spends about (target - bits) extra bits per weight on fp16 columns
    N = {"self_attn.q_proj": 4096, "self_attn.k_proj": 4096, "self_attn.v_proj": 4096, "self_attn.o_proj": 4096,
         "mlp.gate_proj": 11008, "mlp.up_proj": 11008, "mlp.down_proj": 4096}
    extra = sum(N[n] * k31[n] * 13 for n in k31) / sum(N[n] * inf[n] for n in inf)
    assert extra == pytest.approx(0.1, rel=0.05)


def test_owq_checkpoint_stores_and_uses_fp16_columns(tmp_path, model_dirs, text_file):
    out = api.quantize(str(model_dirs["qwen2"]), tmp_path / "owq", method="owq", bits=3, group_size=32,
                       calib=text_file, nsamples=8, seqlen=64, weak_columns=4, progress=False)
    ck = open_checkpoint(out)
    name = "model.layers.1.mlp.down_proj"
    t = ck.read([f"{name}.outlier_idx", f"{name}.outlier_weight"])
    assert t[f"{name}.outlier_idx"].dtype.name == "int32" and t[f"{name}.outlier_idx"].shape == (4,)
    assert t[f"{name}.outlier_weight"].shape == (64, 4)
    qw = load_quantized_weight(ck, name)
    idx = qw.outlier_idx
    assert torch.all(qw.q[:, idx] == qw.zero[:, idx // 32])          # q equals z at fp16 columns
    model, _ = load_quantized_model(out)
    w = model.get_submodule(name).weight
    assert torch.equal(w[:, idx], torch.from_numpy(t[f"{name}.outlier_weight"]).float())   # used exactly
    info = api.inspect(out)
    assert info["outlier_columns"][name] == 4
    assert info["outlier_indices"][name] == idx.tolist()
    plain = api.inspect(api.quantize(str(model_dirs["qwen2"]), tmp_path / "gptq", method="gptq", bits=3,
                                     group_size=32, calib=text_file, nsamples=8, seqlen=64, progress=False))
    # 4 fp16 columns of 64 or 160 inputs cost 16 bits each (+ the 32-bit index)
    assert info["bits_per_weight"] > plain["bits_per_weight"] + 0.3


def test_target_bits_sets_counts_in_provenance(tmp_path, model_dirs, text_file):
    out = api.quantize(str(model_dirs["llama"]), tmp_path / "owq", method="owq", bits=3, group_size=32,
                       calib=text_file, nsamples=4, seqlen=64, target_bits=3.5, progress=False)
    prov = json.loads((out / "edgequant.json").read_text())
    counts = prov["calibration"]["weak_columns_per_linear"]
    assert counts == weak_column_counts(family_for("llama"), {k: (160 if k == "mlp.down_proj" else 64)
                                                              for k in counts}, 3, 3.5)
    assert prov["layers"]["model.layers.0.self_attn.q_proj"]["weak_columns"] == counts["self_attn.q_proj"]


def test_weak_column_tuning_trains_only_fp16_columns(tmp_path, model_dirs, text_file):
    from safetensors.numpy import load_file
    ck = api.quantize(str(model_dirs["llama"]), tmp_path / "owq", method="owq", bits=2, group_size=32,
                      calib=text_file, nsamples=8, seqlen=64, weak_columns=8, progress=False)
    r = api.tune_weak_columns(ck, text_file, tmp_path / "wct", epochs=2, lr=3e-3, seqlen=64, nsamples=32,
                              heldout=4, progress=False)
    assert r["heldout_loss_after"] < r["heldout_loss_before"]
    outputs = 64 + 32 + 32 + 64 + 160 + 160 + 64          # N of q, k, v, o, gate, up, down
    assert r["trainable_params"] == 2 * 8 * outputs        # 2 blocks, J=8 columns of N outputs each
    a = load_file(str(ck / "model.safetensors"))
    b = load_file(str(tmp_path / "wct" / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = {k for k in a if not (a[k] == b[k]).all()}
    assert changed and all(k.endswith(".outlier_weight") for k in changed)
    open_checkpoint(tmp_path / "wct")   # still a valid checkpoint


def test_weak_column_tuning_needs_weak_columns(tmp_path, model_dirs, text_file):
    from edgequant.errors import EdgequantError
    ck = api.quantize(str(model_dirs["llama"]), tmp_path / "rtn", method="rtn", bits=4, progress=False)
    with pytest.raises(EdgequantError, match="owq"):
        api.tune_weak_columns(ck, text_file, tmp_path / "x", progress=False)


def test_output_metric_keeps_the_range_of_a_loud_input():
    """The range search weighted by diag(H) keeps a group's extreme weight when it sits on a loud input (clipping it
    would cost much output error) where the paper's raw-weight search clips it."""
    from edgequant.quantizer import mse_clip_params
    scheme = QuantScheme(3, 32, False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * 0.02
    w[:, 7] = 0.2                                  # the group's extreme, on input 7
    hd = torch.ones(32)
    hd[7] = 1e4                                    # input 7 is loud
    s_w, z_w = mse_clip_params(w, scheme)
    s_o, z_o = mse_clip_params(w, scheme, norm=2.0, col_weight=hd)
    from edgequant.quantizer import quantize_weight
    err = lambda s, z: (quantize_weight(w, scheme, s, z).dequantize() - w) ** 2 * hd   # noqa: E731 - output-weighted
    e_w, e_o = err(s_w, z_w), err(s_o, z_o)
    assert e_o.sum() < e_w.sum() / 4
    assert e_o[:, 7].sum() < e_w[:, 7].sum() / 4           # mostly on the loud input


def test_owq_keeps_min_max_groups_for_q_and_k_and_up(tmp_path, text_file, tokenizer):
    """q/k feed softmax: with --no-clip-qk OWQ leaves their groups min-max (their largest weights stay on the grid)
    while other linears are still range-searched; by default (the paper's search) they are clipped too. The same
    for a gated MLP's up with --no-clip-up (issue 11: qwen2's early up_proj lost perplexity to the search), while
    its gate is still searched, and for v with --no-clip-v."""
    from conftest import make_tiny_model
    m = make_tiny_model("qwen2")
    with torch.no_grad():
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            m.model.layers[0].get_submodule(lin).weight[::2, 5] = 0.6   # a large weight in many groups
    src = tmp_path / "src"
    m.save_pretrained(src)
    tokenizer.save_pretrained(src)

    def top_of(out, lin):
        qw = load_quantized_weight(open_checkpoint(out), f"model.layers.0.{lin}")
        top = (qw.scheme.maxq - qw.zero[::2, 0]) * qw.scale[::2, 0]   # the largest value column 5's groups hold
        return float(top.min())

    kw = dict(method="owq", bits=3, group_size=32, calib=text_file, nsamples=4, seqlen=64, weak_columns=0,
              progress=False)
    out = api.quantize(str(src), tmp_path / "owq", clip_qk=False, clip_up=False, **kw)
    searched = api.quantize(str(src), tmp_path / "owq-qk", clip_v=False, **kw)
    for lin in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
        assert top_of(out, lin) > 0.6 * 0.9, lin                  # min-max: the extreme stays (within half a step)
        assert top_of(searched, lin) < top_of(out, lin), lin
    for lin in ("self_attn.v_proj", "mlp.gate_proj"):             # others are still searched
        assert top_of(out, lin) < top_of(out, "self_attn.q_proj"), lin
    assert top_of(searched, "self_attn.v_proj") > 0.6 * 0.9       # --no-clip-v: v alone min-max
    assert top_of(searched, "mlp.gate_proj") < top_of(searched, "self_attn.v_proj")


def _sink_case(sink_loud: bool, windows=8, seqlen=256, seed=0, with_inputs=False):
    """A linear whose input 7 is quiet on every token but each window's first (the attention sink: loud there when
    `sink_loud`), and whose weights on input 7 are every row's extreme: the raw-weight search clips them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g) * 0.02
    w[:, 7] = 0.2
    x = torch.randn(windows, seqlen, 128, generator=g)
    x[:, :, 7] *= 0.01
    if sink_loud:
        x[:, 0] *= 0.01
        x[:, 0, 7] = 5.0
    flat = x.reshape(-1, 128)
    H = 2 * flat.T @ flat / len(flat)
    H_first = 2 * x[:, 0].T @ x[:, 0] / windows
    return (w, H, H_first, x) if with_inputs else (w, H, H_first)


@pytest.mark.parametrize("sink_loud", [True, False])
def test_sink_guard_keeps_min_max_only_where_the_search_hurts_the_first_token(sink_loud):
    """issue 11: OWQ's range search lowers the error over all tokens, in which the sink is 1 of `seqlen`, while it
    clips the weights that carry the sink. The guard falls back to min-max groups exactly there."""
    from edgequant.calibrate.metrics import output_error
    from edgequant.calibrate.owq import clip_search, sink_guarded
    s = QuantScheme(3, 32)
    w, H, H_first = _sink_case(sink_loud)
    kw = dict(act_order=True, keep=torch.zeros(0, dtype=torch.long))
    searched = gptq_quantize(w, H, s, clip_search=clip_search("weight"), **kw)
    minmax, _ = gptq_quantize(w, H, s, **kw)
    sink_err = lambda qw: output_error(w, qw.dequantize(), H_first)   # noqa: E731
    all_err = lambda qw: output_error(w, qw.dequantize(), H)          # noqa: E731
    assert all_err(searched[0]) < all_err(minmax)                   # the search's own objective is met either way
    chosen, _, choice = sink_guarded(w, H, H_first, s, searched, **kw)
    if sink_loud:
        assert sink_err(searched[0]) > 2 * sink_err(minmax)         # unguarded: the sink's output is damaged
        assert choice == "min-max" and sink_err(chosen) == sink_err(minmax)
    else:
        assert choice == "search" and chosen is searched[0]


@pytest.mark.slow
def test_owq_sink_guard_records_its_choice(tmp_path, model_dirs, text_file):
    """--sink-guard: every range-searched linear records which ranges it kept; the checkpoint loads."""
    out = api.quantize(str(model_dirs["qwen2"]), tmp_path / "owq", method="owq", bits=3, group_size=32,
                       calib=text_file, nsamples=4, seqlen=64, target_bits=3.1, sink_guard=True, progress=False)
    layers = json.loads((out / "edgequant.json").read_text())["layers"]
    assert {v["sink_guard"] for v in layers.values()} <= {"search", "min-max"}
    assert all("sink_guard" in v for v in layers.values())
    load_quantized_model(out)


@pytest.mark.parametrize("sink_loud", [True, False])
def test_sink_protect_keeps_the_sink_inputs_weights_and_the_search_elsewhere(sink_loud):
    """issue 11, `--sink-protect`: the calibration stream's first-token statistics (HessianCollector) find the input
    that carries the planted sink; the range search then clips no weight there. Unprotected, the search damages the
    sink's output (the defect); protected, the sink's output error is min-max's while the other groups keep the
    search's gain on all tokens. With a quiet sink nothing is protected and the search is unchanged."""
    from edgequant.calibrate.blocks import HessianCollector
    from edgequant.calibrate.metrics import output_error
    from edgequant.calibrate.owq import clip_search, sink_columns
    s = QuantScheme(3, 32)
    w, H, H_first, x = _sink_case(sink_loud, with_inputs=True)
    lin = torch.nn.Linear(128, 64, bias=False)
    coll = HessianCollector(lin, first_token=True)
    with torch.no_grad():
        for i in range(0, len(x), 4):
            lin(x[i:i + 4])
    assert torch.allclose(coll.remove(), H, rtol=1e-4, atol=1e-6)
    protect = sink_columns(*coll.first_token_sq())
    assert protect.nonzero().flatten().tolist() == ([7] if sink_loud else [])
    kw = dict(act_order=True, keep=torch.zeros(0, dtype=torch.long), clip_search=clip_search("weight"))
    searched, _ = gptq_quantize(w, H, s, **kw)
    protected, _ = gptq_quantize(w, H, s, protect=protect, **kw)
    minmax, _ = gptq_quantize(w, H, s, act_order=True)
    sink_err = lambda qw: output_error(w, qw.dequantize(), H_first)   # noqa: E731
    all_err = lambda qw: output_error(w, qw.dequantize(), H)          # noqa: E731
    if sink_loud:
        assert sink_err(searched) > 2 * sink_err(minmax)               # unprotected: the sink is damaged
        assert sink_err(protected) < 1.2 * sink_err(minmax)
        assert all_err(protected) < all_err(minmax)                   # the other groups keep the search's gain
        assert protected.dequantize()[:, 7].min() >= 0.2 - protected.scale[:, 0].max() / 2   # no clipped weight
    else:
        assert torch.equal(protected.q, searched.q) and torch.equal(protected.scale, searched.scale)


@pytest.mark.slow
def test_owq_sink_protect_records_the_protected_columns(tmp_path, model_dirs, text_file):
    """--sink-protect: every range-searched linear records how many of its inputs the sink owns; the checkpoint
    loads; without the search the option is refused."""
    out = api.quantize(str(model_dirs["qwen2"]), tmp_path / "owq", method="owq", bits=3, group_size=32,
                       calib=text_file, nsamples=4, seqlen=64, target_bits=3.1, sink_protect=True, progress=False)
    layers = json.loads((out / "edgequant.json").read_text())["layers"]
    assert all(isinstance(v["sink_columns"], int) and v["sink_columns"] >= 0 for v in layers.values())
    load_quantized_model(out)
    with pytest.raises(EdgequantError, match="--clip-search"):
        api.quantize(str(model_dirs["qwen2"]), tmp_path / "owq2", method="owq", bits=3, group_size=32,
                     calib=text_file, nsamples=4, seqlen=64, target_bits=3.1, sink_protect=True, clip_search=False,
                     progress=False)


def _gated_case(tokens=4096, k=128, n=64, seed=0):
    """A gated MLP silu(x Wg^T) * (x Wu^T) whose input 7 is quiet but on 5% of the tokens, where it is loud and opens
    every gate; up's weights on input 7 are each row's extreme, so the raw-weight search clips them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, 7] *= 0.05
    x[: tokens // 20, 7] = 8.0
    wg = torch.randn(n, k, generator=g) * 0.02
    wg[:, 7] = 1.0
    wu = torch.randn(n, k, generator=g) * 0.02
    wu[:, 7] = 0.2
    return x, wg, wu


def test_product_scored_search_keeps_the_weights_the_gate_passes():
    """issue 11: qwen2's early up_proj lost perplexity to the paper's range search although its own output error
    fell: up's output is multiplied by silu(gate) channel by channel. Scored per linear, the search clips the
    weights whose error the gate passes (worse than min-max groups on the MLP's output: the defect); scored on the
    product (`gated_product_weights`), it keeps them and beats both on the MLP's output."""
    from edgequant.calibrate.owq import gated_product_weights
    from edgequant.quantizer import group_minmax, mse_clip_params, params_from_range, quantize_weight
    s = QuantScheme(3, 32)
    x, wg, wu = _gated_case()
    act = torch.nn.functional.silu
    a = act(x @ wg.T)
    def mlp_err(s_z):   # the MLP output's error from up's quantization
        return float(((a * (x @ (wu - quantize_weight(wu, s, *s_z).dequantize()).T)) ** 2).mean())
    pw_gate, pw_up = gated_product_weights(x, wg, wu, act)
    assert pw_up.shape == pw_gate.shape == wu.shape
    assert torch.allclose(pw_up, (a ** 2).T @ x ** 2, rtol=1e-4)
    minmax = mlp_err(params_from_range(*group_minmax(wu, s), s))
    weight = mlp_err(mse_clip_params(wu, s))
    output = mlp_err(mse_clip_params(wu, s, norm=2.0, col_weight=(x ** 2).mean(0)))
    product = mlp_err(mse_clip_params(wu, s, norm=2.0, col_weight=pw_up))
    assert weight > 1.5 * minmax                    # the defect: the per-linear search loses to min-max groups
    assert product < minmax and product < output   # scored on the product: best of all


@pytest.mark.slow
@pytest.mark.parametrize("method", ["owq", "omniquant"])
def test_product_metric_reaches_gate_and_up_only(tmp_path, model_dirs, text_file, method):
    """--clip-metric product (OWQ's range search) and --lwc-init-metric product (OmniQuant's search init): block 0's
    gate/up get other ranges than the default metric gives them (their search is scored on the MLP's product), its
    attention linears the same; the statistics the search uses are the collector's over the block's inputs."""
    from edgequant.calibrate.blocks import GatedProductCollector
    from edgequant.calibrate.owq import gated_product_weights
    kw = dict(method=method, bits=3, group_size=32, calib=text_file, nsamples=4, seqlen=64, progress=False,
              **({"weak_columns": 2} if method == "owq" else {"epochs": 0, "lwc_init": "search"}))
    metric = {"clip_metric" if method == "owq" else "lwc_init_metric": "product"}
    prod = open_checkpoint(api.quantize(str(model_dirs["llama"]), tmp_path / "p", **metric, **kw))
    paper = open_checkpoint(api.quantize(str(model_dirs["llama"]), tmp_path / "w", **kw))
    scale = lambda ck, n: load_quantized_weight(ck, f"model.layers.0.{n}").scale   # noqa: E731
    for n in ("self_attn.q_proj", "self_attn.o_proj"):
        assert torch.equal(scale(prod, n), scale(paper, n)), n
    for n in ("mlp.gate_proj", "mlp.up_proj"):
        assert not torch.equal(scale(prod, n), scale(paper, n)), n
    mlp = torch.nn.Module()
    mlp.gate, mlp.up = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)
    coll = GatedProductCollector(mlp.gate, mlp.up, torch.nn.functional.silu)
    x = torch.randn(3, 5, 16)
    for chunk in (x[:2], x[2:]):
        mlp.gate(chunk)
    got = coll.remove()
    want = gated_product_weights(x.reshape(-1, 16), mlp.gate.weight, mlp.up.weight, torch.nn.functional.silu)
    assert all(torch.allclose(g, w / 15, rtol=1e-5) for g, w in zip(got, want))
