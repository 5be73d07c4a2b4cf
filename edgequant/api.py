"""The Python API: the same verbs and arguments as the `edgequant` command line.

    import edgequant
    edgequant.quantize("smollm2-135m", "q/", method="gptq", bits=3, group_size=128, calib="calib.txt")
    edgequant.evaluate("q/", data="wiki.test.raw", max_windows=40)
    edgequant.inspect("q/")
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from .errors import EdgequantError


def _versions() -> dict:
    import torch
    import transformers
    from . import __version__
    return {"edgequant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def quantize(model, output, method: str = "gptq", bits: int = 4, group_size: int = 128, sym: bool = False,
             calib: str | None = None, nsamples: int = 128, seqlen: int = 2048, seed: int = 0, device: str = "cpu",
             act_order: bool = False, percdamp: float = 0.01, batch_size: int = 4, progress: bool = True,
             **method_options) -> Path:
    """Quantize `model` (HF folder, .gguf file, hub id, or None for the demo model) and write the checkpoint to
    `output`. Returns the checkpoint folder."""
    import torch
    from .artifact import save_checkpoint
    from .loading import load_model
    from .methods import CalibOptions, get_method
    from .schemes import QuantScheme

    scheme = QuantScheme(bits, group_size, sym)
    m = get_method(method)
    unknown = sorted(set(method_options) - set(m.options))
    if unknown:
        raise EdgequantError(f"option(s) {', '.join('--' + u.replace('_', '-') for u in unknown)} do not apply to "
                             f"--method {method}")
    out_path = Path(output).expanduser().resolve()
    state_dir = out_path.parent / f".{out_path.name}.state"
    opts = CalibOptions(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                        act_order=act_order, percdamp=percdamp, batch_size=batch_size, extra=method_options,
                        state_dir=str(state_dir))
    if m.needs_calibration and calib is None:
        raise EdgequantError(f"--method {method} needs calibration text: pass --calib PATH")
    if calib is not None:
        from .data import read_text
        read_text(calib)  # fail on a bad path before loading the model
    torch.manual_seed(seed)
    t0 = time.time()
    model_obj, tok = load_model(model)
    t_load = time.time() - t0
    t1 = time.time()
    result = m.run(model_obj, tok, scheme, opts, progress=progress)
    t_quant = time.time() - t1
    prov = {"model": str(model) if model is not None else "smollm2-135m",
            "calibration": ({"data": str(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                             **(result.calibration or {})} if m.needs_calibration else None),
            "options": opts.to_dict(), "seed": seed, "versions": _versions(),
            "time_s": {"load": round(t_load, 2), "quantize": round(t_quant, 2)},
            "layers": result.stats}
    ck = save_checkpoint(output, model_obj, tok, result.quantized, scheme, method, prov)
    if state_dir.exists():  # the checkpoint is complete: resumable state is no longer needed
        import shutil
        shutil.rmtree(state_dir, ignore_errors=True)
    return ck


def _load_for_eval(ckpt_or_model):
    """A PyTorch model from a checkpoint folder, or from an unquantized model (for baselines)."""
    p = Path(str(ckpt_or_model)).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        cfg = json.loads((p / "config.json").read_text())
        if (cfg.get("quantization_config") or {}).get("quant_method") == "edgequant":
            from .artifact import load_model as load_ckpt
            model, _ = load_ckpt(p)
            from transformers import AutoTokenizer
            return model, AutoTokenizer.from_pretrained(p)
    from .loading import load_model
    return load_model(ckpt_or_model)


def evaluate(checkpoint, data, seqlen: int = 2048, max_windows: int | None = None, reference=None,
             device: str = "cpu", progress: bool = True) -> dict:
    """Perplexity of a saved checkpoint (rebuilt from its packed tensors) or of an unquantized model on `data`;
    with `reference` (the original model), also KL divergence and top-1 agreement."""
    if (Path(str(checkpoint)).expanduser() / "edgequant-export.json").is_file():
        # an exported DIST folder: perplexity through the TVM runtime (same windows and protocol)
        from .export.api import evaluate as evaluate_dist
        return evaluate_dist(checkpoint, data, seqlen=seqlen, max_windows=max_windows, progress=progress)
    from .data import DATASET_NAMES, eval_windows, read_text
    from .evaluate import evaluate as run_eval
    if str(data) not in DATASET_NAMES:
        read_text(data)  # fail on a bad path before loading the model
    model, tok = _load_for_eval(checkpoint)
    ref = None
    if reference is not None:
        ref, _ = _load_for_eval(reference)
        ref.to(device)
    model.to(device)
    windows = eval_windows(tok, data, seqlen, max_windows)
    t0 = time.time()
    res = run_eval(model, windows, ref, device, progress).to_dict()
    res["time_s"] = round(time.time() - t0, 2)
    return res


def inspect(checkpoint) -> dict:
    """Scheme, method, effective bits per weight (counting scales, zero points and fp16 columns), size on disk,
    per-layer reconstruction errors and calibration settings of a checkpoint."""
    from .artifact import open_checkpoint, expected_layout
    ck = open_checkpoint(checkpoint)
    _, quant = expected_layout(ck)
    from safetensors import safe_open
    q_weights = sum(n * k for n, k, _ in quant.values())
    q_bits, outlier_cols = 0, {}
    by_file = {}
    for name, f in ck.files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="np") as sf:
            for name in names:
                base, _, suffix = name.rpartition(".")
                if base in quant and suffix in ("qweight", "scales", "zeros", "outlier_idx", "outlier_weight"):
                    sl = sf.get_slice(name)
                    shape = sl.get_shape()
                    nbytes = {"U32": 4, "F16": 2, "U8": 1, "I32": 4}[sl.get_dtype()]
                    size = nbytes
                    for d in shape:
                        size *= d
                    q_bits += size * 8
                    if suffix == "outlier_idx":
                        outlier_cols[base] = sf.get_tensor(name).tolist()
    files = [p for p in ck.path.iterdir() if p.is_file()]
    s = ck.scheme
    ideal = s.bits + (16 + (0 if s.sym else 8)) / (s.group_len(max(k for _, k, _ in quant.values())))
    prov = ck.provenance
    return {
        "path": str(ck.path), "model_type": ck.config.get("model_type"), "method": ck.method,
        "scheme": s.name, "bits": s.bits, "group_size": s.group_size, "sym": s.sym,
        "quantized_linears": len(quant), "quantized_weights": q_weights,
        "bits_per_weight": q_bits / q_weights,
        "bits_per_weight_ideal": ideal,
        "outlier_columns": {k: len(v) for k, v in outlier_cols.items()} or None,
        "outlier_indices": outlier_cols or None,
        "size_on_disk_bytes": sum(p.stat().st_size for p in files),
        "calibration": prov.get("calibration"), "time_s": prov.get("time_s"),
        "layers": prov.get("layers", {}),
    }


def default_calibration_path() -> str | None:
    """The shared calibration folder when this checkout sits beside it (tests, benchmarks, demo)."""
    here = Path(__file__).resolve().parent.parent
    for cand in (os.environ.get("EDGEQUANT_CALIB"), here.parent / "shared" / "data" / "calibration"):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def default_eval_path() -> str | None:
    here = Path(__file__).resolve().parent.parent
    for cand in (os.environ.get("EDGEQUANT_EVAL"), here.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def demo(output_dir=None, bits: int = 3, group_size: int = 128, methods=("rtn", "gptq"), calib: str | None = None,
         data: str | None = None, nsamples: int = 32, seqlen: int = 512, eval_seqlen: int = 2048,
         max_windows: int = 8, progress: bool = True) -> list[dict]:
    """The main job end to end on the default model: fetch, quantize with each method, evaluate, return table rows."""
    from .loading import fetch_default_model
    calib = calib or default_calibration_path()
    data = data or default_eval_path()
    if calib is None or data is None:
        raise EdgequantError("the demo needs calibration and evaluation text: pass --calib PATH and --data PATH "
                             "(e.g. ../shared/data/calibration and ../shared/data/wikitext-2-raw/wiki.test.raw)")
    model_dir = fetch_default_model(progress)
    out_root = Path(output_dir or (Path.home() / ".cache" / "edgequant" / "demo")).expanduser()
    rows = []
    base = evaluate(model_dir, data, eval_seqlen, max_windows, progress=progress)
    rows.append({"method": "fp32 (dequantized GGUF)", "scheme": "-", "bits_per_weight": 32.0,
                 "perplexity": base["perplexity"], "quantize_s": 0.0, "eval_s": base["time_s"]})
    for method in methods:
        t0 = time.time()
        ck = quantize(model_dir, out_root / f"{method}-w{bits}g{group_size}", method=method, bits=bits,
                      group_size=group_size, calib=calib, nsamples=nsamples, seqlen=seqlen, progress=progress)
        tq = time.time() - t0
        info = inspect(ck)
        res = evaluate(ck, data, eval_seqlen, max_windows, progress=progress)
        rows.append({"method": method, "scheme": info["scheme"], "bits_per_weight": info["bits_per_weight"],
                     "perplexity": res["perplexity"], "quantize_s": tq, "eval_s": res["time_s"],
                     "checkpoint": str(ck)})
    return rows
