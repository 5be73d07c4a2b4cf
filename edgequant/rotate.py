"""Rotations folded into the weights (`--rotate`): computational invariance as in QuaRot (Ashkboos et al., "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", arXiv 2404.00456) and SpinQuant (Liu et al., "SpinQuant: LLM
Quantization with Learned Rotations", arXiv 2405.16406), used for weight-only quantization (incoherence processing,
as QuIP, arXiv 2307.13304): an orthogonal rotation spreads each weight row's outliers over all its inputs, so the
groups' ranges shrink and rounding costs less, while the model computes exactly the same function.

With the residual stream h replaced by h' = Q^T h (Q orthogonal, D x D):
  - every norm feeding linears has its weight folded into them (W <- W diag(g), g <- 1); RMSNorm then commutes with Q
    because Q keeps the root mean square of h,
  - the embedding rows become E Q, every linear reading the stream W Q, every linear writing it Q^T W (and its bias
    Q^T b), and the output layer W_out diag(g_final) Q (untied from the embedding when the two were shared),
  - each head's v rows become H^T W_v (bias H^T b_v) and o's columns of that head W_o H, for one head_dim x head_dim
    orthogonal H shared by all heads (so grouped-query attention needs nothing special).
Massive activations (Sun et al., "Massive Activations in Large Language Models", arXiv 2402.17762): a few residual
channels of models such as SmolLM2 and qwen2 reach hundreds of times the other channels' peaks at the attention-sink
token, and the norms' small weights on those channels keep the linears that read them from amplifying their
rounding error. Folding such a weight into the linears and rotating spreads that channel over every input, so each
rounded weight meets the sink's full magnitude (SmolLM2 W3 RTN: 160 -> 5043 perplexity on three 512-token windows;
the rotated v projection alone 32 -> 130). `keep` leaves such channels out: Q is the identity on them and a random
rotation of the other channels, and their norm weights stay in the norms (the rotation still commutes with RMSNorm,
Q never mixing a kept channel with another). `massive_channels` finds them with one forward pass. Measured
(benchmarks/results/quality-issue11-lead13-cuda.md): it helps where rounding is to nearest (OmniQuant's LWC W3:
SmolLM2 79.22 -> 62.85, qwen 50.91 -> 47.34) and loses on every qwen GPTQ/OWQ row (W3 36.62 -> 37.43), whose error
compensation already follows the sink's direction: off by default.
Q and H are randomised Hadamard matrices (a Hadamard matrix times random signs, scaled to be orthogonal); a size that
no construction here reaches (a power of two times 1, or a Paley order q+1 or 2(q+1), q prime) gets a random
orthogonal matrix instead (SpinQuant's random initialisation). The rotated model keeps its architecture (norm weights
of one, an untied output layer), so the checkpoint, export and runtime need nothing new and every method runs on top.
Which linears read or write the stream comes from the family object.
"""
from __future__ import annotations

import torch

from .errors import EdgequantError
from .models import family_for


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley's constructions (q prime): I (q = m - 1 = 3 mod 4) or II (q = m/2 - 1 =
    1 mod 4); None when neither applies."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I) as a Sylvester power of two times a Paley matrix, or
    None when n has no such form."""
    k = 0
    while n % (1 << k) == 0:
        m = n >> k
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            for _ in range(k):
                base = torch.kron(base, h2)
            if not torch.equal(base @ base.T, n * torch.eye(n, dtype=torch.float64)):   # a construction bug, not input
                raise EdgequantError(f"internal error: the Hadamard matrix of order {n} is not orthogonal")
            return base
        k += 1
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A randomised Hadamard matrix diag(s) H / sqrt(n) (s random signs), float64; a Haar-random orthogonal matrix
    where no Hadamard matrix of order n is constructed here."""
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
        return q * torch.sign(torch.diagonal(r))[None]
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * h / n ** 0.5


@torch.no_grad()
def massive_channels(model, ids: torch.Tensor, ratio: float) -> list[int]:
    """The residual channels whose peak |h| over `ids` (token ids [B, T]) and every block's output reaches `ratio`
    times the median channel's peak (module docstring); [] for a ratio of 0."""
    if not ratio:
        return []
    out = model(ids.to(next(model.parameters()).device), output_hidden_states=True)
    peak = torch.stack([h.detach().float().abs().amax(dim=(0, 1)) for h in out.hidden_states[1:]]).amax(dim=0)
    return sorted(int(c) for c in torch.nonzero(peak >= ratio * peak.median()).flatten())


@torch.no_grad()
def rotate_model(model, seed: int = 0, keep=()) -> dict:
    """Fold the norms and rotate `model` (a transformers causal LM of a supported family) in place; it computes the
    same function afterwards, up to floating-point rounding. The residual channels in `keep` are left out of the
    rotation (module docstring). Returns a summary for the provenance record."""
    family = family_for(model.config.model_type)
    dims = family.dims(model.config)
    readers = [lin.name for lin in family.linears if lin.inp == "hidden"]
    writers = [lin.name for lin in family.linears if lin.out == ("hidden",)]
    norm_feeds = {p.producer: p.consumers for p in family.let_pairs if p.kind == "norm"}
    hidden_norms = [n.name for n in family.norms if n.dim == "hidden"]
    vo = [p for p in family.let_pairs if p.kind == "attn_v"]
    fed = sorted(c for cs in norm_feeds.values() for c in cs)
    if sorted(hidden_norms) != sorted(norm_feeds) or fed != sorted(readers):
        raise EdgequantError(f"--rotate does not support the {family.name} family: every norm of its blocks must feed "
                             "the linears that read the residual stream; quantize without --rotate")
    keep = sorted(set(int(c) for c in keep))
    if any(not 0 <= c < dims.hidden for c in keep):
        raise EdgequantError(f"channels to keep out of the rotation must lie in [0, {dims.hidden})")
    gen = torch.Generator().manual_seed(seed)
    kept = torch.tensor(keep, dtype=torch.long)
    if keep:
        others = torch.ones(dims.hidden, dtype=torch.bool)
        others[kept] = False
        rest = torch.nonzero(others).flatten()
        Q = torch.zeros(dims.hidden, dims.hidden, dtype=torch.float64)
        Q[rest[:, None], rest[None]] = random_orthogonal(len(rest), gen)
        Q[kept, kept] = 1.0
    else:
        Q = random_orthogonal(dims.hidden, gen)
    Hh = random_orthogonal(dims.head_dim, gen) if vo else None
    off = family.norm_weight_offset

    def fold_and_rotate_in(lin: torch.nn.Linear, gamma: torch.Tensor | None):
        w = lin.weight.double()
        if gamma is not None:
            w = w * gamma[None]
        lin.weight.copy_((w @ Q).to(lin.weight.dtype))

    def rotate_out(lin: torch.nn.Linear):
        lin.weight.copy_((Q.T @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((Q.T @ lin.bias.double()).to(lin.bias.dtype))

    def norm_gamma(norm) -> torch.Tensor:
        g = norm.weight.double() + off
        stays = norm.weight[kept].clone()
        norm.weight.fill_(1.0 - off)
        norm.weight[kept] = stays
        g[kept] = 1.0
        if getattr(norm, "bias", None) is not None:   # LayerNorm's bias does not commute with a rotation
            raise EdgequantError(f"--rotate does not support the {family.name} family (its norms have a bias)")
        return g

    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if out is None:
        raise EdgequantError("--rotate needs a model with an output layer")
    tied = out.weight.data_ptr() == emb.weight.data_ptr()
    if tied:   # the output layer takes the final norm's weight and E would no longer serve both: untie
        out.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    emb.weight.copy_((emb.weight.double() @ Q).to(emb.weight.dtype))

    layers = model.get_submodule(family.layers_path)
    for block in layers:
        gammas = {}
        for norm_name, consumers in norm_feeds.items():
            g = norm_gamma(block.get_submodule(norm_name))
            gammas.update({c: g for c in consumers})
        for name in readers:
            fold_and_rotate_in(block.get_submodule(name), gammas[name])
        for name in writers:
            rotate_out(block.get_submodule(name))
        for p in vo:   # per head: v rows H^T W_v, o columns W_o H (attention mixes tokens, not head channels)
            v, o = block.get_submodule(p.producer), block.get_submodule(p.consumers[0])
            hd = dims.head_dim
            wv = v.weight.double().reshape(-1, hd, v.in_features)
            v.weight.copy_(torch.einsum("dk,hdi->hki", Hh, wv).reshape(v.weight.shape).to(v.weight.dtype))
            if v.bias is not None:
                v.bias.copy_((v.bias.double().reshape(-1, hd) @ Hh).reshape(-1).to(v.bias.dtype))
            wo = o.weight.double().reshape(o.out_features, -1, hd)
            o.weight.copy_((wo @ Hh).reshape(o.weight.shape).to(o.weight.dtype))

    final = model.get_decoder().norm if hasattr(model, "get_decoder") else model.model.norm
    fold_and_rotate_in(out, norm_gamma(final))
    return {"seed": seed, "kept_channels": keep, "hidden": dims.hidden, "head_dim": dims.head_dim,
            "hadamard": hadamard(dims.hidden) is not None and not keep, "untied_output": tied}
