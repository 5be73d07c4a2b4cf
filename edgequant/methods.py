"""The registry of quantization methods: name -> function(model, tokenizer, scheme, options) -> MethodResult."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import EdgequantError
from .schemes import QuantScheme


@dataclass
class CalibOptions:
    """Settings shared by calibrated methods; validated here so the CLI and the Python API agree."""
    calib: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 4
    act_order: bool = True         # GPTQ/OWQ: largest Hessian diagonal first (static groups keep K order)
    percdamp: float = 0.01
    skip_tokens: int = 0           # GPTQ/OWQ: first tokens of each window left out of the Hessian
    extra: dict = field(default_factory=dict)   # method-specific options
    state_dir: str | None = None   # where a resumable method keeps per-block state (a sibling of the output folder)

    def __post_init__(self):
        if self.nsamples < 1 or self.seqlen < 16:
            raise EdgequantError("--nsamples must be >= 1 and --seqlen >= 16")
        if not 0 <= self.skip_tokens < self.seqlen:
            raise EdgequantError("--skip-tokens must be >= 0 and smaller than --seqlen")
        if not 0 < self.percdamp < 1:
            raise EdgequantError("--percdamp must be between 0 and 1 (the paper uses 0.01)")
        import torch
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgequantError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("state_dir")
        d.update(d.pop("extra"))
        return d


@dataclass
class MethodResult:
    quantized: dict
    stats: dict
    calibration: dict | None = None


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable
    needs_calibration: bool
    summary: str
    options: tuple = ()     # names of method-specific options it accepts (CalibOptions.extra)


METHODS: dict[str, Method] = {}


def register_method(name: str, needs_calibration: bool, summary: str, options: tuple = ()):
    def deco(fn):
        METHODS[name] = Method(name, fn, needs_calibration, summary, tuple(options))
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
    if opts.calib is None:
        raise EdgequantError("this method needs calibration text: pass --calib PATH (a text file or folder)")
    return calibration_samples(tokenizer, opts.calib, opts.nsamples, opts.seqlen, opts.seed)


@register_method("gptq", needs_calibration=True, summary="GPTQ/OPTQ: Hessian-based error compensation")
def _gptq(model, tokenizer, scheme: QuantScheme, opts: CalibOptions, progress=True) -> MethodResult:
    from .calibrate.gptq import gptq_quantize
    from .calibrate.layerwise import calibrate_layerwise
    from .calibrate.metrics import output_error, weight_error

    samples = _calibration_samples(tokenizer, opts)

    def quantize_fn(name, lin, H):
        w = lin.weight.detach().float()
        qw, loss = gptq_quantize(w, H, scheme, percdamp=opts.percdamp, act_order=opts.act_order)
        w_hat = qw.dequantize()
        return qw, {"gptq_loss": loss, "weight_rel_err": weight_error(w, w_hat),
                    "output_rel_err": output_error(w, w_hat, H)}

    q, stats = calibrate_layerwise(model, samples, quantize_fn, opts.device, opts.batch_size, progress, desc="gptq",
                                   skip_tokens=opts.skip_tokens)
    return MethodResult(q, stats, {"tokens": int(samples.numel())})


@register_method("owq", needs_calibration=True, summary="OWQ: sensitive weak columns kept in fp16, GPTQ on the rest",
                 options=("target_bits", "weak_columns", "clip_search"))
def _owq(model, tokenizer, scheme: QuantScheme, opts: CalibOptions, progress=True) -> MethodResult:
    from .calibrate.blocks import get_module
    from .calibrate.gptq import gptq_quantize
    from .calibrate.layerwise import calibrate_layerwise
    from .calibrate.metrics import output_error, weight_error
    from .calibrate.owq import mse_clip_search, select_weak_columns, weak_column_counts
    from .models import family_for

    family = family_for(model.config.model_type)
    block0 = get_module(model, family.layer_prefix(0))
    in_features = {kind: get_module(block0, kind).in_features for kind in family.linear_names}
    target, fixed = opts.extra.get("target_bits"), opts.extra.get("weak_columns")
    if target is not None and fixed is not None:
        raise EdgequantError("pass either --target-bits or --weak-columns, not both")
    if fixed is not None:
        if fixed < 0:
            raise EdgequantError("--weak-columns must be >= 0")
        counts = {kind: min(fixed, k) for kind, k in in_features.items()}
    else:
        counts = weak_column_counts(family, in_features, scheme.bits, target if target is not None else scheme.bits + 0.01)
    clip = opts.extra.get("clip_search", True) is not False   # the paper's MSE range tuning (False: min-max)
    samples = _calibration_samples(tokenizer, opts)

    def quantize_fn(name, lin, H):
        w = lin.weight.detach().float()
        kind = name.split(".", 3)[-1]
        idx = select_weak_columns(w, torch_diag(H), scheme, counts[kind])
        qw, loss = gptq_quantize(w, H, scheme, percdamp=opts.percdamp, act_order=opts.act_order,
                                 keep=idx.to(w.device), clip_search=mse_clip_search if clip else None)
        w_hat = qw.dequantize()
        return qw, {"gptq_loss": loss, "weak_columns": int(len(idx)), "weight_rel_err": weight_error(w, w_hat),
                    "output_rel_err": output_error(w, w_hat, H)}

    q, stats = calibrate_layerwise(model, samples, quantize_fn, opts.device, opts.batch_size, progress, desc="owq",
                                   skip_tokens=opts.skip_tokens)
    return MethodResult(q, stats, {"tokens": int(samples.numel()), "weak_columns_per_linear": counts,
                                   "target_bits": target})


def torch_diag(H):
    import torch
    return torch.diag(H)


@register_method("omniquant", needs_calibration=True,
                 summary="OmniQuant: learnable weight clipping + equivalent transformation, block-wise, fused away",
                 options=("lwc", "let", "epochs", "lwc_lr", "let_lr", "let_alpha", "aug_loss", "owq_target_bits",
                          "lwc_init", "loss", "keep_best"))
def _omniquant(model, tokenizer, scheme: QuantScheme, opts: CalibOptions, progress=True) -> MethodResult:
    from dataclasses import asdict
    from .calibrate.omniquant import calibrate_omniquant, config_from_options

    cfg = config_from_options(opts)   # validate options before touching data
    samples = _calibration_samples(tokenizer, opts)
    q, stats, blocks, _ = calibrate_omniquant(model, samples, scheme, cfg, opts.device, progress, opts.state_dir)
    settings = {k: v for k, v in asdict(cfg).items() if k != "seed"}
    settings["let_pairs"] = list(cfg.let_pairs)
    return MethodResult(q, stats, {"tokens": int(samples.numel()), "omniquant": settings,
                                   "blocks": [asdict(b) for b in blocks]})
