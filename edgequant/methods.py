"""The registry of quantization methods: name -> function(model, tokenizer, scheme, options) -> MethodResult."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .budget import GPTQConfig
from .calibrate.configs import MAX_LR, OmniConfig, OWQConfig
from .errors import EdgequantError
from .options import (MAX_EPOCHS, MAX_SEED, MAX_WINDOW_TOKENS, Options, check_window_tokens, flag, opt,
                      training_windows)
from .schemes import QuantScheme


@dataclass
class NoOptions(Options):
    """A method without options of its own."""


@dataclass
class CalibOptions(Options):
    """Settings shared by the calibrated methods, with their defaults (the CLI's and the API's); `config` holds the
    method's own options (its registered dataclass)."""
    calib: str | None = opt(None, "Calibration text: a file, a folder of .txt files, or a dataset name (c4, "
                                  "wikitext2) where a network exists.", "str")
    nsamples: int = opt(128, "Calibration windows.", "int", lo=1)
    seqlen: int = opt(2048, "Tokens per calibration window.", "int", lo=16)
    seed: int = opt(0, "Seed for sampling windows.", "int", lo=0, hi=MAX_SEED)
    act_order: bool = opt(True, "GPTQ/OWQ: quantize columns in order of decreasing Hessian diagonal (groups stay "
                                "static).", "bool")
    percdamp: float = opt(0.01, "GPTQ: Hessian damping (the paper uses 0.01).", "float", lo=0, hi=1, lo_open=True)
    skip_tokens: int = opt(0, "GPTQ/OWQ: leave the first tokens of each window (attention sinks) out of the Hessian.",
                           "int", lo=0)
    device: str = opt("cpu", "cpu, cuda or cuda:N.", "device")
    batch_size: int = opt(4, "Calibration windows per block pass.", "int", lo=1, hi=MAX_WINDOW_TOKENS)
    rotate: bool = opt(False, "Rotate the model first (QuaRot/SpinQuant-style randomised Hadamard folded into the "
                              "weights, norms folded; same function, easier to quantize; unties a shared output "
                              "layer).", "bool")
    rotate_keep: float = opt(0.0, "With --rotate: leave out of the rotation each residual channel whose peak reaches "
                                  "this many times the median channel's (the massive activations of attention "
                                  "sinks, whose rounding error a rotation would spread over every input; 0: rotate "
                                  "every channel).", "float", lo=0)
    e2e_epochs: int = opt(0, "After the method, tune the whole model's group scales, fp16 columns, norm weights and "
                             "biases (codes fixed) toward the fp model's next-token distribution on the calibration "
                             "windows for this many epochs (EfficientQAT's E2E-QP with the fp model as teacher; 0: "
                             "off).", "int", lo=0, hi=MAX_EPOCHS)
    e2e_lr: float = opt(1e-3, "Learning rate of that tuning (Adam, on relative offsets).", "float", lo=0, lo_open=True,
                        hi=MAX_LR)
    e2e_heldout: int = opt(8, "The last this many calibration windows are never tuned on end to end; the start and "
                              "every epoch are scored on them and the best kept.", "int", lo=1)
    config: Options | None = None     # the method's options
    state_dir: str | None = None      # where a resumable method keeps per-block state (a sibling of the output folder)

    def __post_init__(self):
        super().__post_init__()
        self.refuse_unless(self.rotate, ("rotate_keep",), "--rotate")
        self.refuse_unless(self.e2e_epochs > 0, ("e2e_lr", "e2e_heldout"), "--e2e-epochs N (N > 0)")
        # before the model loads (the tuning loops ask again, for callers of their own APIs)
        for name, count in {**self.held_out(), **(self.config.held_out() if self.config is not None else {})}.items():
            training_windows(name, count, self.nsamples)
        if self.skip_tokens >= self.seqlen:
            raise EdgequantError("--skip-tokens must be >= 0 and smaller than --seqlen")
        check_window_tokens(self.nsamples, self.seqlen)

    def held_out(self) -> dict[str, int]:
        return {"--e2e-heldout": self.e2e_heldout} if self.e2e_epochs else {}

    def to_dict(self) -> dict:
        return {**super().to_dict(), **(self.config.to_dict() if self.config is not None else {})}


@dataclass
class MethodResult:
    quantized: dict
    stats: dict
    calibration: dict | None = None
    windows: object = None   # the calibration windows [n, seqlen] the method drew (end-to-end tuning reuses them)


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable
    needs_calibration: bool
    summary: str
    config: type = NoOptions   # its Options dataclass: the method's CLI options and API defaults
    title: str = ""            # the name its options' help starts with
    # which of the shared calibration and GPTQ options (CALIBRATION_OPTIONS, GPTQ_OPTIONS) the method reads, given
    # its options: one it does not read is refused when set, instead of ignored
    reads: Callable[[Options], frozenset] = lambda config: frozenset()

    def check_shared(self, opts: "CalibOptions") -> None:
        reads = (self.reads(opts.config) | ({"seed"} if opts.rotate else set())   # the rotation's random signs
                 | (CALIBRATION_OPTIONS if opts.e2e_epochs else set()))
        unused = [n for n in opts.changed(*sorted(CALIBRATION_OPTIONS | GPTQ_OPTIONS)) if n not in reads]
        if unused:
            cfg = opts.config
            with_gptq = getattr(cfg, "gptq", True) is False and set(unused) <= self.reads(replace(cfg, gptq=True))
            where = getattr(cfg, "unread_note", lambda: "")() or (" without --gptq" if with_gptq else "")
            raise EdgequantError(f"option(s) {', '.join(flag(u) for u in unused)} do not apply to --method "
                                 f"{self.name}{where}")


GPTQ_OPTIONS = frozenset({"act_order", "percdamp", "skip_tokens"})
CALIBRATION_OPTIONS = frozenset({"calib", "nsamples", "seqlen", "batch_size", "seed"})


METHODS: dict[str, Method] = {}


def register_method(name: str, needs_calibration: bool, summary: str, config: type = NoOptions, title: str = "",
                    reads: Callable[[Options], frozenset] = lambda config: frozenset()):
    def deco(fn):
        METHODS[name] = Method(name, fn, needs_calibration, summary, config, title or name, reads)
        return fn
    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise EdgequantError(f"unknown method '{name}'; available: {', '.join(METHODS)}")
    return METHODS[name]


@register_method("rtn", needs_calibration=False, summary="round to nearest, min-max groups (no data)")
def _rtn(model, tokenizer, scheme: QuantScheme, opts: CalibOptions, progress=True) -> MethodResult:
    from .calibrate.rtn import quantize_rtn
    q, stats = quantize_rtn(model, scheme, progress)
    return MethodResult(q, stats)


def _calibration_samples(tokenizer, opts: CalibOptions):
    from .data import calibration_samples
    return calibration_samples(tokenizer, opts.calib, opts.nsamples, opts.seqlen, opts.seed)


def _gptq_layerwise(model, tokenizer, scheme: QuantScheme, opts: CalibOptions, progress, desc, counts=None,
                    budget: float | None = None):
    """GPTQ on every linear, block by block; with `counts` (OWQ: weak columns per linear kind) each linear first
    keeps its most sensitive columns in fp16 and tunes its groups by clip search; with `budget` (bits per weight)
    each linear takes the width `budget.py` chooses; with `--tune-epochs` each quantized block is then tuned toward
    the fp block's output (`calibrate/blocktune.py`). Returns (quantized, stats, the windows, extra provenance: the
    budget summary, the per-block tuning losses)."""
    import torch

    from .calibrate.gptq import gptq_quantize
    from .calibrate.layerwise import calibrate_layerwise
    from .calibrate.metrics import output_error, weight_error
    from .calibrate.owq import clip_search, select_weak_columns, sink_columns, sink_guarded
    from .models import family_for

    samples = _calibration_samples(tokenizer, opts)
    schemes, summary = {}, None
    if budget is not None:
        from .budget import schemes_for_budget
        schemes, summary = schemes_for_budget(model, samples, scheme, opts, budget, progress)
    family = family_for(model.config.model_type)

    searching = counts is not None and opts.config.clip_search
    guard = searching and opts.config.sink_guard
    protecting = searching and opts.config.sink_protect
    product = searching and opts.config.clip_metric == "product"

    def quantize_fn(name, lin, H, H_first=None, first_sq=None, product_w=None):
        w = lin.weight.detach().float()
        s = schemes.get(name, scheme)
        kw, weak = {}, {}
        if counts is not None:
            cfg = opts.config
            rel = family.relative_name(name)
            # each group's range tuned by the grid search, unless turned off (--no-clip-search: min-max groups),
            # the linear feeds the attention logits (unless --clip-qk), is a gated MLP's up (unless --clip-up) or
            # attention's v (unless --clip-v)
            search = (cfg.clip_search and (cfg.clip_qk or rel not in family.attention_logit_linears)
                      and (cfg.clip_up or rel not in family.gated_mlp[1:2])
                      and (cfg.clip_v or rel not in family.attention_value_linears))
            protect = sink_columns(*first_sq) if protecting and search else None
            # "product" scores a gated MLP's gate/up on the MLP's output (`product_w`), the other linears as "weight"
            metric = "weight" if product and product_w is None else cfg.clip_metric
            idx = select_weak_columns(w, torch.diag(H), s, counts[rel], tuned=search, metric=metric,
                                      protect=protect, search_weight=product_w)
            clip = clip_search(metric) if search else None
            kw, weak = {"keep": idx.to(w.device), "clip_search": clip}, {"weak_columns": int(len(idx))}
            if product_w is not None and search:
                kw["search_weight"] = product_w
            if protect is not None:
                kw["protect"] = protect.to(w.device)
                weak["sink_columns"] = int(protect.sum())
        qw, loss = gptq_quantize(w, H, s, percdamp=opts.percdamp, act_order=opts.act_order, **kw)
        if guard and kw.get("clip_search") is not None:
            qw, loss, weak["sink_guard"] = sink_guarded(w, H, H_first, s, (qw, loss), percdamp=opts.percdamp,
                                                        act_order=opts.act_order, keep=kw["keep"],
                                                        protect=kw.get("protect"))
        w_hat = qw.dequantize()
        return qw, {"gptq_loss": loss, **weak, "weight_rel_err": weight_error(w, w_hat),
                    "output_rel_err": output_error(w, w_hat, H)}

    tune, tuned = None, []
    if opts.config is not None and opts.config.tune_epochs:
        from .calibrate.blocktune import tune_block

        def tune(i, block, linears, inputs, targets):
            tuned.append({"block": i, **tune_block(block, linears, inputs, targets, opts.config.tune_epochs,
                                                   opts.config.tune_lr, opts.device, opts.batch_size, opts.seed,
                                                   opts.config.tune_loss, opts.config.tune_heldout)})
    q, stats = calibrate_layerwise(model, samples, quantize_fn, opts.device, opts.batch_size, progress, desc=desc,
                                   skip_tokens=opts.skip_tokens, tune=tune, first_token_hessian=guard or protecting,
                                   product_weights=product)
    extra = {**({"bit_budget": summary} if summary else {}), **({"block_tuning": tuned} if tuned else {})}
    return q, stats, samples, extra


@register_method("gptq", needs_calibration=True, summary="GPTQ/OPTQ: Hessian-based error compensation",
                 config=GPTQConfig, title="GPTQ", reads=lambda config: CALIBRATION_OPTIONS | GPTQ_OPTIONS)
def _gptq(model, tokenizer, scheme: QuantScheme, opts: CalibOptions, progress=True) -> MethodResult:
    budget = opts.config.target_bits if opts.config is not None else None
    q, stats, samples, extra = _gptq_layerwise(model, tokenizer, scheme, opts, progress, "gptq", budget=budget)
    return MethodResult(q, stats, {"tokens": int(samples.numel()), **extra}, samples)


@register_method("owq", needs_calibration=True, summary="OWQ: sensitive weak columns kept in fp16, GPTQ on the rest",
                 config=OWQConfig, title="OWQ", reads=lambda config: CALIBRATION_OPTIONS | GPTQ_OPTIONS)
def _owq(model, tokenizer, scheme: QuantScheme, opts: CalibOptions, progress=True) -> MethodResult:
    from .calibrate.owq import weak_column_counts
    from .models import family_for

    family = family_for(model.config.model_type)
    in_features = {kind: k for kind, (_, k) in family.linear_shapes(model.config).items()}
    target, fixed = opts.config.target_bits, opts.config.weak_columns
    if fixed is not None and fixed > max(in_features.values()):   # min() below would silently keep every column
        widest = max(in_features.values())
        raise EdgequantError(f"--weak-columns {fixed} is more than any linear of this model has (at most {widest} "
                             f"input columns); use fewer than {widest}, or --target-bits")
    if fixed is not None:
        counts = {kind: min(fixed, k) for kind, k in in_features.items()}
    else:
        counts = weak_column_counts(family, in_features, scheme.bits, target if target is not None else scheme.bits + 0.01)
    q, stats, samples, extra = _gptq_layerwise(model, tokenizer, scheme, opts, progress, "owq", counts,
                                               budget=opts.config.width_budget)
    return MethodResult(q, stats, {"tokens": int(samples.numel()), "weak_columns_per_linear": counts,
                                   "target_bits": target, **extra}, samples)


@register_method("omniquant", needs_calibration=True,
                 summary="OmniQuant: learnable weight clipping + equivalent transformation, block-wise, fused away",
                 config=OmniConfig, title="OmniQuant",
                 reads=lambda config: (CALIBRATION_OPTIONS if config.reads_data else {"calib"})
                 | ({"act_order", "percdamp"} if config.gptq else set()))
def _omniquant(model, tokenizer, scheme: QuantScheme, opts: CalibOptions, progress=True) -> MethodResult:
    from dataclasses import asdict
    from .calibrate.omniquant import calibrate_omniquant

    cfg = replace(opts.config, batch_size=opts.batch_size, seed=opts.seed, percdamp=opts.percdamp,
                  act_order=opts.act_order)
    samples = _calibration_samples(tokenizer, opts)
    q, stats, blocks, _ = calibrate_omniquant(model, samples, scheme, cfg, opts.device, progress, opts.state_dir)
    settings = {k: v for k, v in asdict(cfg).items() if k != "seed"}
    settings["let_pairs"] = list(cfg.let_pairs)
    return MethodResult(q, stats, {"tokens": int(samples.numel()), "omniquant": settings,
                                   "blocks": [asdict(b) for b in blocks]}, samples)
