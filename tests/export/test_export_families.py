"""Export parity of the families beyond LLaMA/Qwen2 (tests/tiny_families.py): Qwen3 (per-head q/k norms, head_dim 32
!= hidden / heads), Llama 3.x (llama3 RoPE scaling, tied embeddings) and Phi-3 (fused qkv/gate_up as stored,
longrope short factors and attention factor; the long factors past original_max_position_embeddings in a test of
their own). Each case is the check of test_export_parity.py (prefill, six decode steps, every position's logits
against the PyTorch model rebuilt from the same checkpoint, identical greedy tokens, and with outlier columns a
control that they matter). Together the cases cover 2, 3 and 4 bits with and without
outlier columns, at least two bit widths per family; one build per case, as every case compiles other kernels."""
from __future__ import annotations

import os

import pytest

# the shared check and its module-scoped builder of checkpoints and libraries
from test_export_parity import exported  # noqa: F401 - a pytest fixture
from test_export_parity import test_int8_decode_stays_close_to_pytorch as check_int8
from test_export_parity import test_logits_and_greedy_tokens_match_pytorch as check_parity

pytestmark = pytest.mark.tvm

# arch, bits, group, sym, outlier columns per linear, tied embeddings (llama3 is tied by its config)
CASES = [
    ("qwen3", 4, 32, False, 0, False),
    ("qwen3", 2, 32, False, 3, False),
    ("llama3", 3, 32, False, 2, True),
    ("llama3", 4, -1, True, 0, True),
    ("phi3", 2, 32, True, 0, False),
    ("phi3", 3, 64, False, 3, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-w{c[1]}g{c[2]}{'s' if c[3] else 'a'}-o{c[4]}")
def test_family_logits_and_greedy_tokens_match_pytorch(exported, case):  # noqa: F811
    check_parity(exported, case)


def test_family_int8_decode_stays_close_to_pytorch(exported):  # noqa: F811
    """The default cpu export (int8 activations in the decode GEMV and prefill GEMM) on the family furthest from
    LLaMA's layout: Phi-3's fused linears as stored, longrope, outlier columns."""
    check_int8(exported, ("phi3", 4, 32, False, 2, False))


@pytest.mark.parametrize("arch", ["llama3", "phi3"])
def test_rope_scaling_is_visible_at_these_lengths(arch):
    """Control for the parity above: on these configs and 40 positions, the same weights with plain RoPE give logits
    far outside its 1e-2 bound, so a graph ignoring llama3 or longrope scaling would fail it."""
    import copy

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model
    model = make_tiny_model(arch, seed=3)
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": model.config.rope_parameters["rope_theta"]}
    plain = AutoModelForCausalLM.from_config(cfg).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.tensor([np.random.default_rng(0).integers(0, 320, 40).tolist()])
    with torch.no_grad():
        a, b = model(ids).logits[0], plain(ids).logits[0]
    assert float((a - b).abs().max() / a.abs().max()) > 0.1


def test_phi3_long_factors_past_original_context(tmp_path, tokenizer):
    """longrope past original_max_position_embeddings (16 here; 40 tokens reach far past it) as transformers' Phi-3
    runs it: short factors while the sequence is within 16 tokens; once longer, every key and query rotated with the
    long factors (an uncached forward picks them for all positions, and `generate` drops its cache and re-encodes
    the sequence when it first grows past 16). So every position's logits equal those of transformers' uncached
    forward of the sequence up to there, whatever the path: every position at once (40 tokens, one or four chunks),
    a 12-token prefill then decode steps across the switch, a 20-token prefill (crossing inside it) then decode; and
    greedy tokens equal `generate`'s. Controls: keeping the short-rotated keys in the cache (transformers' model
    forward with its cache, no re-encoding), or short factors everywhere, moves the logits past the bound.
    The model also has a sliding window (12, all layers, as Phi-3-mini-4k's 2047), exact past it on the cpu target:
    the context is the model's, prefill chunks are 12 tokens, and without the window the logits move too."""
    import copy

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model
    from edgequant import api
    from edgequant.artifact import load_quantized_model
    from edgequant.export.api import export
    from edgequant.export.runtime import Runner
    from test_export_parity import _rel
    hf = tmp_path / "hf"
    model = make_tiny_model("phi3", seed=5)
    model.config.original_max_position_embeddings = 16
    model.config.rope_parameters["original_max_position_embeddings"] = 16
    model.config.sliding_window = 12
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    ck = api.quantize(str(hf), str(tmp_path / "q"), method="rtn", bits=4, group_size=32, progress=False)
    old = os.environ.get("EDGEQUANT_ACT_DTYPE")
    os.environ["EDGEQUANT_ACT_DTYPE"] = "fp16"   # the exact decode path, as in test_export_parity.py
    try:
        runner = Runner(export(ck, "cpu", tmp_path / "dist", progress=False))
    finally:
        os.environ.pop("EDGEQUANT_ACT_DTYPE") if old is None else os.environ.__setitem__("EDGEQUANT_ACT_DTYPE", old)
    assert runner.context == 1024 and runner.long_after == 16 and runner.chunk == 12
    ref, _ = load_quantized_model(ck)
    ids = np.random.default_rng(2).integers(0, 320, 40).tolist()
    with torch.no_grad():
        def forward(n):   # transformers' uncached forward of the first n tokens
            return ref(torch.tensor([ids[:n]])).logits[0].numpy()
        want = np.concatenate([forward(16), forward(40)[16:]])   # short within 16 tokens, long past them
        out = ref(torch.tensor([ids[:12]]), use_cache=True)
        kept = []   # the model's own cached forward: keys of positions < 16 keep their short rotation
        for j in range(12, 40):
            out = ref(torch.tensor([[ids[j]]]), cache=out.cache, use_cache=True)
            kept.append(out.logits[0, -1].numpy())
        short_cfg = copy.deepcopy(ref.config)
        short_cfg.rope_parameters = {**short_cfg.rope_parameters,
                                     "long_factor": list(short_cfg.rope_parameters["short_factor"])}
        short = AutoModelForCausalLM.from_config(short_cfg).eval()
        short.load_state_dict(ref.state_dict())
        short = short(torch.tensor([ids])).logits[0].numpy()
        ref.config.sliding_window = None
        unwindowed = forward(40)
        ref.config.sliding_window = 12
    errs = {"all": _rel(runner.logits(ids), forward(40))}
    chunk, runner.chunk = runner.chunk, 11
    errs["all in chunks of 11"] = _rel(runner.logits(ids), forward(40))
    runner.chunk = chunk
    for prefill in (12, 20):
        runner.new_sequence()
        errs[f"prefill {prefill}"] = _rel(runner.prefill(ids[:prefill]), forward(prefill)[-1])
        errs[f"decode after {prefill}"] = max(_rel(runner.decode(ids[j]), want[j]) for j in range(prefill, 40))
    print("\n" + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < 1e-2
    assert _rel(np.stack(kept[4:]), want[16:]) > 5e-2
    assert _rel(short[16:], want[16:]) > 5e-2 and _rel(forward(40)[:16], want[:16]) > 5e-2
    assert _rel(unwindowed, forward(40)) > 5e-2
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([ids[:8]]), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False)[0, 8:].tolist()
    assert runner.generate(ids[:8], 24).tokens == greedy


def test_arch_config_reads_rope_scaling_like_transformers():
    """What export reads from real-size configs: Llama 3.2's llama3 scaling goes to the cache; Phi-3.5-mini's longrope
    gives its short and long factors (transformers' inverse frequencies below and past
    original_max_position_embeddings), transformers' attention factor and the whole context;
    Phi-3-mini-4k's sliding window leaves the context the model's (exact past it on every target); Qwen3's explicit
    head_dim and q/k norms; unsupported scalings are one-line errors that say what is supported."""
    from transformers import LlamaConfig, Phi3Config, Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgequant.errors import EdgequantError
    from edgequant.export.models.llama import ArchConfig, longrope_inv_freq
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    a = ArchConfig.from_hf(LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                                       vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                                       rope_scaling=dict(llama3), tie_word_embeddings=True).to_dict())
    assert a.rope_scaling == llama3 and a.rope_theta == 500000.0 and a.tie_word_embeddings
    assert a.context_window == 131072 and not a.rope_short_factors and a.vocab_size == 128256

    short = [1.0 + 0.01 * i for i in range(48)]
    cfg = Phi3Config(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                     original_max_position_embeddings=4096, sliding_window=262144, pad_token_id=0,
                     rope_scaling={"type": "longrope", "short_factor": short, "long_factor": [2.0] * 48})
    a = ArchConfig.from_hf(cfg.to_dict())
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")
    long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=4097)
    assert a.rope_short_factors == tuple(short) and a.rope_long_factors == (2.0,) * 48
    assert a.context_window == 131072 and a.rope_original_context == 4096
    assert abs(a.attention_factor - attention_factor) < 1e-12 and a.attention_factor > 1.1
    assert longrope_inv_freq(a, a.rope_short_factors).tolist() == pytest.approx(inv_freq.tolist(), rel=1e-6)
    assert longrope_inv_freq(a, a.rope_long_factors).tolist() == pytest.approx(long_inv_freq.tolist(), rel=1e-6)
    a = ArchConfig.from_hf(Phi3Config(max_position_embeddings=4096, sliding_window=2047, pad_token_id=0).to_dict())
    # edgequant's attention kernels on every target: the window is exact past it, the context the model's
    assert a.context_window == 4096 and not a.rope_short_factors
    assert a.sliding_layers == tuple(range(32)) and a.own_attention

    a = ArchConfig.from_hf(Qwen3Config(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=128).to_dict())
    assert a.head_dim == 128 and a.qk_norm and a.num_heads * a.head_dim == 2048

    a = ArchConfig.from_hf(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 4.0}).to_dict())
    assert a.rope_scale == 0.25 and a.rope_scaling == {}      # positions / 4 in the cache's RoPE
    for rope in ({"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}):
        with pytest.raises(EdgequantError, match="not supported by export yet .*llama3, longrope"):
            ArchConfig.from_hf(LlamaConfig(rope_scaling=rope).to_dict())


@pytest.mark.parametrize("model_type,options", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    ("qwen2", dict(use_sliding_window=False, sliding_window=4, max_window_layers=0)),
    ("mistral", dict(sliding_window=4)),
    ("mistral", dict(sliding_window=None)),
    ("llama", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "full_attention"])),
])
def test_sliding_layers_are_those_transformers_attends_through_its_window(model_type, options):
    """The layers export gives a window are the ones transformers' forward gives one: qwen2/qwen3 by `layer_types`
    or `max_window_layers` under `use_sliding_window` (export made every layer sliding: twelfth re-run, S35),
    mistral every layer, llama none (its model has no window)."""
    from transformers import AutoConfig

    from edgequant.export.models.llama import ArchConfig
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, vocab_size=100, **options)
    if model_type in ("qwen2", "qwen3"):
        want = tuple(i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention")
    else:   # these models' attention reads config.sliding_window on every layer (llama's reads none)
        want = tuple(range(3)) if model_type == "mistral" and cfg.sliding_window else ()
    a = ArchConfig.from_hf(cfg.to_dict())
    assert a.sliding_layers == want and a.sliding_window == (4 if want else None)


def test_layer_types_transformers_cannot_run_are_refused():
    """The config check refuses them for every command before export's graph sees them (eval's transformers forward
    raised: thirteenth re-run); export alone would read such a config without a window."""
    from pathlib import Path

    from edgequant.checkpoint import check_model_config
    from edgequant.errors import EdgequantError
    from edgequant.export.models.llama import ArchConfig
    c = dict(model_type="qwen2", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=100, use_sliding_window=False, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(EdgequantError, match="use_sliding_window is not true"):
        check_model_config(Path("config.json"), c)
    assert ArchConfig.from_hf(c).sliding_layers == ()
    # transformers builds a Ministral model for these, which quantize and eval refuse (thirteenth re-run, S35b)
    for types in (["full_attention", "sliding_attention"], ["full_attention", "full_attention"]):
        with pytest.raises(EdgequantError, match="Ministral"):
            check_model_config(Path("config.json"), {**c, "model_type": "mistral", "layer_types": types})
