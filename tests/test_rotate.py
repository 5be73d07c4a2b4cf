"""Rotations folded into the weights (`--rotate`): the rotated full-precision model computes the original function,
the matrices are orthogonal, and a rotated checkpoint loads and scores like any other."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from edgequant.errors import EdgequantError
from edgequant.rotate import hadamard, massive_channels, random_orthogonal, rotate_model


@pytest.mark.parametrize("n", [1, 2, 28, 36, 64, 72, 576, 896])
def test_hadamard_orders_of_the_real_models(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_sizes_without_a_hadamard_get_a_random_orthogonal_matrix():
    assert hadamard(6) is None    # no Hadamard matrix of order 6 exists
    q = random_orthogonal(6, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(6, dtype=torch.float64), atol=1e-12)


def _randomise_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", True), ("mistral", False)])
def test_rotated_model_has_the_same_logits(arch, tie):
    model = make_tiny_model(arch, tie=tie)
    _randomise_norms(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    emb_before = model.get_input_embeddings().weight.clone()
    info = rotate_model(model, seed=3)
    got = model(ids).logits
    assert info["untied_output"] == tie and not model.config.tie_word_embeddings
    assert torch.allclose(got, ref, atol=2e-5, rtol=0), (got - ref).abs().max()
    # the weights really changed: norms folded to one, embedding rotated
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n)
    assert (model.get_input_embeddings().weight - emb_before).abs().max() > 1e-2
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_rotation_spreads_a_weight_outlier():
    """Incoherence: a planted large input column of q_proj no longer dominates its rows after rotation."""
    model = make_tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[:, 5] *= 40
    peak = lambda w: float((w.abs().amax(1) / w.abs().mean(1)).mean())   # noqa: E731
    before = peak(q.weight)
    rotate_model(model, seed=0)
    assert peak(q.weight) < before / 3


def test_rotation_lowers_rtn_error_when_weights_have_outliers():
    """The ordering incoherence processing promises: with a few large weights per row (and no massive activations,
    see benchmarks/results/quality-issue11-rotate.md for where that breaks), RTN W3 of the rotated model stays
    closer to the full-precision logits than RTN W3 of the original."""
    import copy
    from edgequant.calibrate.rtn import quantize_rtn
    from edgequant.schemes import QuantScheme

    model = make_tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                cols = torch.randperm(p.shape[1], generator=g)[:3]
                p[:, cols] *= 12
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=g)
    ref = torch.log_softmax(model(ids).logits, -1)

    def kl_after_rtn(m):
        m = copy.deepcopy(m)
        q, _ = quantize_rtn(m, QuantScheme(3, 32), progress=False)
        with torch.no_grad():
            for n, qw in q.items():
                m.get_submodule(n).weight.copy_(qw.dequantize())
            got = torch.log_softmax(m(ids).logits, -1)
        return float((ref.exp() * (ref - got)).sum(-1).mean())

    plain = kl_after_rtn(model)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0)
    assert kl_after_rtn(rotated) < 0.7 * plain


def _plant_massive_channel(model, channel: int, size: float = 300.0):
    """A sink-like massive activation: token 0's embedding is almost all `channel`, and every norm damps it."""
    with torch.no_grad():
        model.get_input_embeddings().weight[0, channel] = size
        for name, p in model.named_parameters():
            if "norm" in name:
                p[channel] = 0.02


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", True), ("mistral", False)])
def test_kept_channels_stay_out_of_the_rotation(arch, tie):
    model = make_tiny_model(arch, tie=tie)
    _randomise_norms(model)
    ids = torch.randint(1, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    emb_before = model.get_input_embeddings().weight.clone()
    info = rotate_model(model, seed=3, keep=[5, 2])
    assert info["kept_channels"] == [2, 5] and not info["hadamard"]
    assert torch.allclose(model(ids).logits, ref, atol=2e-5, rtol=0)
    for n, p in model.named_parameters():
        if "norm" in n:   # the kept channels' weights stay in the norms, the others are folded away
            assert torch.equal(p[[2, 5]], norms[n][[2, 5]])
            others = torch.ones_like(p, dtype=torch.bool)
            others[[2, 5]] = False
            assert torch.all(p[others] == 1)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[:, [2, 5]], emb_before[:, [2, 5]])   # Q is the identity on them
    assert (emb - emb_before).abs().max() > 1e-2


def test_keep_refuses_a_channel_outside_the_stream():
    model = make_tiny_model("llama")
    with pytest.raises(EdgequantError, match="must lie in"):
        rotate_model(model, keep=[model.config.hidden_size])


def test_massive_channels_finds_a_planted_sink_channel():
    model = make_tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert massive_channels(model, ids, 100.0) == []
    _plant_massive_channel(model, 7)
    ids[:, 0] = 0
    assert massive_channels(model, ids, 100.0) == [7]
    assert massive_channels(model, ids, 0.0) == []


def test_keeping_the_massive_channel_keeps_the_sink_tokens_rounding_error_small():
    """The failure `keep` avoids (rotate.py's docstring): with a massive, norm-damped channel, RTN W3 of the fully
    rotated model puts a large error on the sink token's block output (its whole normalised input meets every
    rounded weight); with that channel left out it stays as small as without a rotation. (The block outputs are
    compared in each model's own basis: Q keeps norms.)"""
    import copy
    from edgequant.calibrate.rtn import quantize_rtn
    from edgequant.schemes import QuantScheme

    model = make_tiny_model("llama")
    _plant_massive_channel(model, 7)
    ids = torch.randint(1, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0

    def sink_error_after_rtn(keep):
        m = copy.deepcopy(model)
        if keep is not None:
            rotate_model(m, seed=0, keep=keep)
        with torch.no_grad():
            ref = m(ids, output_hidden_states=True).hidden_states[1]
            q, _ = quantize_rtn(m, QuantScheme(3, 32), progress=False)
            for n, qw in q.items():
                m.get_submodule(n).weight.copy_(qw.dequantize())
            got = m(ids, output_hidden_states=True).hidden_states[1]
        return float((got - ref)[:, 0].norm(dim=-1).mean())

    kept = sink_error_after_rtn(massive_channels(model, ids, 100.0))
    assert kept < 0.2 * sink_error_after_rtn(())
    assert kept < 1.5 * sink_error_after_rtn(None)
