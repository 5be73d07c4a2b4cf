"""A family is data in one file: a made-up architecture, defined in this file alone (its PyTorch model and its
`Family`), goes through RTN quantization, the checkpoint, the PyTorch rebuild, export's weight plan and OmniQuant
with LET. It differs from LLaMA where families differ: another layers path and names, q/k/v fused in the checkpoint
(with a bias), per-head q/k norms, (1 + weight) norms, an explicit head_dim, a scaled embedding and a GELU MLP.
The LLaMA family's shapes are checked against transformers' own models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from edgequant.errors import EdgequantError
from edgequant.models import FAMILIES, Family, LetPair, Linear, LinearGroup, Norm, family_for, register_family

from conftest import VOCAB, make_tiny_model, round_like_rtn_checkpoint

TOY = "edgequant-toy"


# ------------------------------------------------------------------------------------------ the made-up model
class ToyConfig(PretrainedConfig):
    model_type = TOY

    def __init__(self, vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, **kw):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim, self.rms_norm_eps = num_key_value_heads, head_dim, rms_norm_eps
        kw.setdefault("tie_word_embeddings", False)
        super().__init__(**kw)


class OffsetRMSNorm(nn.Module):
    """Scales by (1 + weight), as Gemma's RMSNorm does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class ToyAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d = c.head_dim
        self.qkv = nn.Linear(c.hidden_size, (c.num_attention_heads + 2 * c.num_key_value_heads) * d, bias=True)
        self.out = nn.Linear(c.num_attention_heads * d, c.hidden_size, bias=False)
        self.q_norm, self.k_norm = OffsetRMSNorm(d, c.rms_norm_eps), OffsetRMSNorm(d, c.rms_norm_eps)

    def forward(self, x):
        c, (b, s, _) = self.c, x.shape
        h, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, k, v = self.qkv(x).split([h * d, kv * d, kv * d], dim=-1)
        q = self.q_norm(q.view(b, s, h, d)).transpose(1, 2)
        k = self.k_norm(k.view(b, s, kv, d)).transpose(1, 2).repeat_interleave(h // kv, dim=1)
        v = v.view(b, s, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, s, h * d))


class ToyMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size,
                                                                                          c.hidden_size)

    def forward(self, x):
        return self.fc_out(nn.functional.gelu(self.fc_in(x), approximate="tanh"))


class ToyBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_attn, self.ln_mlp = OffsetRMSNorm(c.hidden_size, c.rms_norm_eps), OffsetRMSNorm(c.hidden_size,
                                                                                                 c.rms_norm_eps)
        self.attn, self.mlp = ToyAttention(c), ToyMLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class ToyBody(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList([ToyBlock(c) for _ in range(c.num_hidden_layers)])
        self.ln_f = OffsetRMSNorm(c.hidden_size, c.rms_norm_eps)


class ToyForCausalLM(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        self.transformer = ToyBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, **_):
        x = self.transformer.wte(input_ids) * math.sqrt(self.config.hidden_size)   # scaled embedding
        for block in self.transformer.blocks:
            x = block(x)
        return CausalLMOutput(logits=self.lm_head(self.transformer.ln_f(x)))


# ------------------------------------------------------------------------------------------ its family: one object
TOY_FAMILY = Family(
    name="toy",
    model_types=(TOY,),
    layers_path="transformer.blocks",
    pre_block=("transformer.wte",),
    linears=(Linear("attn.qkv", ("q", "kv", "kv"), "hidden"), Linear("attn.out", ("hidden",), "q"),
             Linear("mlp.fc_in", ("intermediate",), "hidden", 0.5), Linear("mlp.fc_out", ("hidden",), "intermediate")),
    groups=(LinearGroup(("attn.qkv",)), LinearGroup(("attn.out",)), LinearGroup(("mlp.fc_in",)),
            LinearGroup(("mlp.fc_out",))),
    norms=(Norm("ln_attn"), Norm("ln_mlp"), Norm("attn.q_norm", "head_dim"), Norm("attn.k_norm", "head_dim")),
    # no v->o, q/k or up->down pairs: v, q and k share one stored linear, q/k pass a per-head norm, the MLP is GELU
    let_pairs=(LetPair("qkv", "norm", "ln_attn", ("attn.qkv",)), LetPair("fc1", "norm", "ln_mlp", ("mlp.fc_in",))),
    export_fusions={n: (n,) for n in ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out")},
    norm_weight_offset=1.0,
    fixed_biases={TOY: ("attn.qkv", "mlp.fc_in", "mlp.fc_out")},   # the model folder's check expects these, no others
)

AutoConfig.register(TOY, ToyConfig)
AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM)


@pytest.fixture
def toy_family():
    register_family(TOY_FAMILY)
    yield TOY_FAMILY
    FAMILIES.pop(TOY)


def make_toy(seed=0):
    torch.manual_seed(seed)
    model = ToyForCausalLM(ToyConfig()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "ln" in name or "norm" in name else 0.08)
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_family_shapes_are_transformers_shapes(arch):
    model, fam = make_tiny_model(arch), family_for(arch)
    block = dict(model.named_parameters())
    pre = fam.layer_prefix(1)
    for rel, nk in fam.linear_shapes(model.config.to_dict()).items():
        assert tuple(block[f"{pre}.{rel}.weight"].shape) == nk
    for rel, n in fam.norm_shapes(model.config).items():
        assert tuple(block[f"{pre}.{rel}.weight"].shape) == (n,)
    assert fam.relative_name(f"{pre}.mlp.up_proj") == "mlp.up_proj" and fam.relative_name("lm_head") is None
    assert all(isinstance(model.get_submodule(n), nn.Module) for n in fam.pre_block)


def test_toy_family_shapes_match_its_model(toy_family):
    model = make_toy()
    params = dict(model.named_parameters())
    for rel, nk in toy_family.linear_shapes(model.config).items():
        assert tuple(params[f"transformer.blocks.0.{rel}.weight"].shape) == nk
    for rel, n in toy_family.norm_shapes(model.config).items():
        assert tuple(params[f"transformer.blocks.0.{rel}.weight"].shape) == (n,)


def test_bad_family_is_refused_when_defined():
    with pytest.raises(EdgequantError, match="consumers of LET pair qkv must be one calibration group"):
        Family("bad", ("bad",), "layers", (), TOY_FAMILY.linears, TOY_FAMILY.groups, TOY_FAMILY.norms,
               let_pairs=(LetPair("qkv", "norm", "ln_attn", ("attn.qkv", "mlp.fc_in")),))


def test_toy_rtn_checkpoint_and_rebuild(toy_family, tmp_path, tokenizer):
    from edgequant import api
    from edgequant.artifact import load_quantized_model as load_model, open_checkpoint
    from edgequant.schemes import QuantScheme
    from edgequant.export.params import CheckpointSource

    orig = make_toy()
    orig.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    ck = api.quantize(str(tmp_path / "hf"), str(tmp_path / "q"), method="rtn", bits=4, group_size=16, progress=False)
    c = open_checkpoint(ck)
    assert c.qconfig["modules"] == list(toy_family.linear_names)
    assert c.quantized_linears() == sorted(f"transformer.blocks.{i}.{n}" for i in range(2)
                                           for n in toy_family.linear_names)
    assert c.read(["transformer.blocks.1.attn.qkv.qweight"])["transformer.blocks.1.attn.qkv.qweight"].shape == \
        (4 * 16 + 2 * 2 * 16, 48 // 8)                      # fused q/k/v rows, K = hidden packed 8 per word

    rebuilt, _ = load_model(ck)
    scheme = QuantScheme(4, 16)
    expect = round_like_rtn_checkpoint(make_toy(), toy_family, scheme)   # what the checkpoint must hold
    got = dict(rebuilt.named_parameters())
    for name, p in expect.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(rebuilt(ids).logits, expect(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rebuilt(ids).logits, orig(ids).logits, atol=1e-3)   # really quantized

    plans = CheckpointSource(ck).plans()          # export's weight plan reads the family's fusions and shapes
    assert {(p.n, p.k) for p in plans.values()} == {(128, 48), (48, 64), (96, 48), (48, 96)}
    assert plans["transformer.blocks.0.attn.qkv"].bias and not plans["transformer.blocks.0.attn.out"].bias


def test_toy_let_is_an_equivalence(toy_family):
    from edgequant.calibrate.blocks import capture_first_block_inputs
    from edgequant.calibrate.omniquant import OmniBlock, OmniConfig
    from edgequant.schemes import QuantScheme

    model = make_toy()
    block = model.transformer.blocks[0]
    x = capture_first_block_inputs(model, model.transformer.blocks, torch.randint(0, VOCAB, (2, 16)))
    ob = OmniBlock(block, model.config, QuantScheme(3, 16), OmniConfig(let=True))
    assert set(ob.let.log_scales) == {"qkv", "fc1"}              # the pairs this family declares
    assert set(ob.let.shifts) == {"qkv", "fc1"}                  # both consumers have biases
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(ob.let.log_scales.values()) + list(ob.let.shifts.values()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    eff = ob.effective(quant=False, fp16_plain=False)
    assert not torch.allclose(eff["ln_attn.weight"], block.ln_attn.weight)
    out = torch.func.functional_call(block, eff, (x.hidden,), strict=False)
    torch.testing.assert_close(out, block(x.hidden), rtol=1e-4, atol=1e-5)


def test_toy_omniquant_with_let_fuses_into_the_checkpoint(toy_family, tmp_path, tokenizer):
    from edgequant.artifact import load_quantized_model as load_model, save_checkpoint
    from edgequant.calibrate.omniquant import LiveBlock, OmniConfig, calibrate_omniquant
    from edgequant.schemes import QuantScheme

    model, scheme = make_toy(), QuantScheme(3, 16)
    samples = torch.randint(0, VOCAB, (4, 16))
    quantized, _, _, live = calibrate_omniquant(model, samples, scheme, OmniConfig(let=True, epochs=1),
                                                progress=False, keep_live=True)
    fused, _ = load_model(save_checkpoint(tmp_path / "ck", model, tokenizer, quantized, scheme, "omniquant"))
    ref = make_toy()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    for i, ob in enumerate(live):
        ref.transformer.blocks[i] = LiveBlock(ref.transformer.blocks[i], ob)
    torch.testing.assert_close(fused(samples).logits, ref(samples).logits, rtol=1e-5, atol=1e-5)
