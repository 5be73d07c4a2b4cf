"""The Python API: the same verbs and arguments as the `edgequant` command line.

    import edgequant
    edgequant.quantize("smollm2-135m", "q/", method="gptq", bits=3, group_size=128, calib="calib.txt")
    edgequant.evaluate("q/", data="wiki.test.raw", max_windows=40)
    edgequant.inspect("q/")
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from pathlib import Path

from .checkpoint import inspect  # noqa: F401 - the API's `inspect` verb
from .errors import EdgequantError, first_line


def _versions() -> dict:
    import torch
    import transformers
    from . import __version__
    return {"edgequant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def quantize(model, output, method: str = "gptq", bits: int = 4, group_size: int = 128, sym: bool = False,
             progress: bool = True, embed_bits: int = 16, embed_group_size: int = 32, **options) -> Path:
    """Quantize `model` (HF folder, .gguf file, hub id, or None for the demo model) and write the checkpoint to
    `output`. Returns the checkpoint folder. `options`: the calibration settings of `methods.CalibOptions` (calib,
    nsamples, seqlen, seed, device, act_order, percdamp, skip_tokens, batch_size) and the method's own options (its
    registered dataclass, e.g. `calibrate.configs.OmniConfig`); each defaults to its dataclass's value.
    `embed_bits` 8 or 4 also quantizes the embedding and output layer (`edgequant.tables`), 16 keeps them fp16."""
    import torch
    from .artifact import save_checkpoint
    from .loading import load_model
    from .methods import CalibOptions, get_method
    from .schemes import QuantScheme

    from .tables import quantize_tables, table_scheme
    scheme = QuantScheme(bits, group_size, sym)
    tables = table_scheme(embed_bits, embed_group_size)
    m = get_method(method)
    shared = {f.name for f in CalibOptions.cli_fields()}
    config = m.config.from_dict({k: v for k, v in options.items() if k not in shared}, f" to --method {method}")
    opts = CalibOptions(**{k: v for k, v in options.items() if k in shared}, config=config)
    m.check_shared(opts)
    check_device(opts.device)
    calib, seed = opts.calib, opts.seed
    from .checkpoint import PROVENANCE_NAME
    from .atomic import output_lock
    out_path = Path(output).expanduser().resolve()
    with output_lock(out_path, PROVENANCE_NAME):   # before hours of calibration, not after
        state_dir = resume_state_dir(out_path)
        opts.state_dir = str(state_dir)
        if m.needs_calibration and calib is None:
            raise EdgequantError(f"--method {method} needs calibration text: pass --calib PATH")
        if opts.e2e_epochs and calib is None:
            raise EdgequantError("--e2e-epochs tunes on calibration text: pass --calib PATH")
        if calib is not None:
            from .data import read_text
            read_text(calib)  # fail on a bad path before loading the model
        torch.manual_seed(seed)
        _quiet_transformers(progress)
        t0 = time.time()
        model_obj, tok = load_model(model)
        _check_group_size(model_obj, scheme)
        _check_fits_fp16(model_obj, model)
        t_load = time.time() - t0
        t1 = time.time()
        rotation = None
        if opts.rotate:
            from .rotate import massive_channels, rotate_model
            keep = (massive_channels(model_obj, _probe_ids(tok, calib, opts), opts.rotate_keep)
                    if opts.rotate_keep else ())   # the default: no calibration text tokenized for nothing
            rotation = rotate_model(model_obj, seed, keep)
        teacher = copy.deepcopy(model_obj) if opts.e2e_epochs else None   # the fp model, rotated as the student
        result = m.run(model_obj, tok, scheme, opts, progress=progress)
        quantized = dict(result.quantized)
        e2e = (_tune_end_to_end(model_obj, teacher, tok, quantized, opts, result.windows, progress)
               if teacher is not None else None)
        del teacher
        if tables is not None:
            quantized.update(quantize_tables(model_obj, tables))
        t_quant = time.time() - t1
        prov = {"model": str(model) if model is not None else "smollm2-135m",
                "calibration": ({"data": str(calib), "nsamples": opts.nsamples, "seqlen": opts.seqlen, "seed": seed,
                                 **(result.calibration or {}), **({"e2e_tuning": e2e} if e2e is not None else {})}
                                if m.needs_calibration or e2e is not None else None),
                "options": opts.to_dict(), "rotation": rotation, "seed": seed, "versions": _versions(),
                "time_s": {"load": round(t_load, 2), "quantize": round(t_quant, 2)},
                "layers": result.stats}
        if tables is not None:
            prov["tables"] = {"scheme": tables.to_dict(), "method": "rtn"}
        try:
            ck = save_checkpoint(output, model_obj, tok, quantized, scheme, method, prov)
        except EdgequantError as e:   # a full disk: the calibration's finished blocks are kept, and said so
            kept = _kept_blocks(state_dir)
            if kept:
                raise EdgequantError(f"{e}; {kept}") from None
            raise
        if state_dir.exists():  # the checkpoint is complete: resumable state is no longer needed
            import shutil
            shutil.rmtree(state_dir, ignore_errors=True)
        return ck


def _tune_end_to_end(model, teacher, tok, quantized, opts, windows, progress) -> dict:
    """`--e2e-epochs`: the whole model's stored floating-point values tuned toward the fp model
    (`calibrate/e2e.py`) on the method's calibration windows (`windows`, or drawn here for a method that drew none:
    RTN), the last `--e2e-heldout` of them only scored."""
    from .calibrate.e2e import tune_end_to_end
    if windows is None:
        from .data import calibration_samples
        windows = calibration_samples(tok, opts.calib, opts.nsamples, opts.seqlen, opts.seed)
    return tune_end_to_end(model, teacher, quantized, windows, opts.e2e_epochs, opts.e2e_lr, opts.e2e_heldout,
                           opts.device, opts.batch_size, opts.seed, progress)


PROBE_TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building. It was the tallest "
              "man-made structure in the world until 1930. Many people visit it every year; some climb the stairs.")


def _probe_ids(tok, calib, opts):
    """Tokens to find massive activations with (`rotate.massive_channels`): a few calibration windows, or a fixed
    English text for the methods without calibration (the sink's channels show at any text's first token)."""
    if calib is None:
        return tok(PROBE_TEXT, return_tensors="pt").input_ids
    from .data import calibration_samples
    return calibration_samples(tok, calib, min(opts.nsamples, 4), min(opts.seqlen, 512), opts.seed)


def resume_state_dir(output) -> Path:
    """Where a resumable method (OmniQuant) keeps its finished blocks while it writes `output`."""
    out = Path(output).expanduser().resolve()
    return out.parent / f".{out.name}.state"


def interrupted_note(method: str, output) -> str:
    """What an interrupted `quantize` left: no checkpoint, and the finished blocks only if the method keeps them."""
    kept = _kept_blocks(resume_state_dir(output))
    return f"interrupted {method} quantization; no checkpoint was written" + (f"; {kept}" if kept else "")


def _kept_blocks(state: Path) -> str | None:
    """What the resume state folder keeps, for an error line (None: nothing)."""
    if state.is_dir() and any(state.iterdir()):
        return (f"its finished blocks are kept in {state} and the same command continues from there (delete it to "
                "start over)")
    return None


FP16_MAX = 65504.0


def _check_fits_fp16(model, src) -> None:
    """Checkpoints store scales, outlier columns and plain tensors in fp16 and the exports compute in it: a weight
    past its range became an Inf scale or column that quantize wrote and exited 0, and its own reader then called the
    checkpoint damaged (eighteenth re-run, S44). Refused before any calibration."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() and float(t.detach().abs().max()) > FP16_MAX:
            raise EdgequantError(f"{src or 'the model'}: '{name}' holds values past fp16's range (|x| > 65504), which "
                                 "edgequant checkpoints and exports compute in; the model's weights are damaged: "
                                 "restore them from a trusted copy")


def _check_group_size(model, scheme) -> None:
    """A group wider than every input of the model is refused: groups are padded to their size, so 10**9 would
    allocate that much per row; -1 already means one group per row."""
    import torch
    widest = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    _check_group_width(scheme.group_size, widest)


def _check_group_width(group_size: int, widest: int) -> None:
    if group_size > widest:
        raise EdgequantError(f"--group-size {group_size} is wider than every input of this model (at most "
                             f"{widest} columns); use at most {widest}, or -1 for one group per row")


def convert(model, output, progress: bool = True) -> Path:
    """Write `model` (HF folder, .gguf file, hub id) unquantized as a Hugging Face folder with safetensors weights and
    its tokenizer: what `edgequant export` reads for an fp16 export (export itself never loads models with torch)."""
    from .atomic import atomic_output_dir, check_not_the_input, umask_mode
    from .checkpoint import CONVERTED_NAME
    from .loading import load_model, save_tokenizer
    out = Path(output).expanduser().resolve()
    check_not_the_input(out, Path(str(model)), "converted", "output")
    _quiet_transformers(progress)
    m, tok = load_model(model)
    # its own marker: any model folder has a config.json, and `-o` of one replaced it with all it held (sixteenth
    # re-run, L8)
    with atomic_output_dir(out, marker=CONVERTED_NAME) as tmp:
        m.save_pretrained(tmp, safe_serialization=True)
        for f in tmp.glob("*.safetensors"):   # transformers writes them 0600 whatever the umask (eighteenth re-run, U10)
            os.chmod(f, 0o666 & umask_mode())
        save_tokenizer(tok, tmp)
        (tmp / CONVERTED_NAME).write_text(json.dumps({"source": str(model), "versions": _versions()}, indent=2))
    return out


def _quiet_transformers(progress: bool):
    """transformers draws its own loading bars; keep them only when ours are on."""
    if not progress:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def _load_for_eval(ckpt_or_model):
    """A PyTorch model from a checkpoint folder, or from an unquantized model (for baselines)."""
    from .atomic import check_not_stranded
    from .checkpoint import kind
    check_not_stranded(ckpt_or_model)
    if kind(ckpt_or_model) == "checkpoint":
        from .artifact import load_quantized_model
        model, ck = load_quantized_model(ckpt_or_model)
        return model, load_tokenizer(ck.path)
    from .loading import load_model
    return load_model(ckpt_or_model)


def load_tokenizer(folder, fix: str = "copy the tokenizer files of the original model into it"):
    """The tokenizer saved in a checkpoint or DIST folder, or a one-line error ending in `fix`."""
    from transformers import AutoTokenizer

    from .loading import checked_tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing or damaged tokenizer
        raise EdgequantError(f"cannot load the tokenizer saved in {folder} ({first_line(e, 200)}); {fix}") from None
    return checked_tokenizer(tok, folder, fix)


def check_device(device: str):
    """`cpu`, or a CUDA device that torch can see."""
    from .options import check_value
    check_value("device", device, {"kind": "device"})
    if device.startswith("cuda"):
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= n:
            raise EdgequantError(f"--device {device}: torch sees {n} CUDA GPU(s) here; use --device cpu")


def evaluate(checkpoint, data, seqlen: int = 2048, max_windows: int | None = None, reference=None,
             device: str = "cpu", progress: bool = True, record: bool = False) -> dict:
    """Perplexity of a saved checkpoint (rebuilt from its packed tensors) or of an unquantized model on `data`;
    with `reference` (the original model), also KL divergence and top-1 agreement. `record` appends the result to
    the checkpoint's edgequant.json (`edgequant report` plots it)."""
    from .data import check_eval_seqlen
    check_eval_seqlen(seqlen)   # before a model is loaded
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise EdgequantError(f"--max-windows must be at least 1 (or left out for every window), not {max_windows!r}")
    check_device(device)
    from .checkpoint import kind
    if kind(checkpoint) == "dist":   # the TVM side evaluates DISTs; the core never imports it
        raise EdgequantError(f"{checkpoint} is an exported DIST: evaluate it with `edgequant eval` or "
                             "edgequant.export.api.evaluate")
    if record and kind(checkpoint) != "checkpoint":
        raise EdgequantError(f"--record keeps the result in a checkpoint's edgequant.json; {checkpoint} is not an "
                             "edgequant checkpoint (leave out --record)")
    from .data import DATASET_NAMES, eval_windows, read_text
    from .perplexity import evaluate as run_eval
    if str(data) not in DATASET_NAMES:
        read_text(data)  # fail on a bad path before loading the model
    _quiet_transformers(progress)
    model, tok = _load_for_eval(checkpoint)
    ref = None
    if reference is not None:
        ref, _ = _load_for_eval(reference)
        ref.to(device)
    model.to(device)
    windows = eval_windows(tok, data, seqlen, max_windows)
    for m in (model, ref):
        n = m.get_input_embeddings().num_embeddings if m is not None else None
        if n is not None and windows.numel() and int(windows.max()) >= n:   # F.embedding would raise IndexError
            raise EdgequantError(f"token id {int(windows.max())} from the tokenizer of {checkpoint} is outside the "
                                 f"vocabulary (0..{n - 1}) of the model; its tokenizer files do not belong to it")
    t0 = time.time()
    res = run_eval(model, windows, ref, device, progress).to_dict()
    res["time_s"] = round(time.time() - t0, 2)
    if record:
        from .checkpoint import record_evaluation
        record_evaluation(checkpoint, {"data": str(data), "seqlen": res["seqlen"], "windows": res["windows"],
                                       "perplexity": res["perplexity"], "device": device,
                                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return res


def shared_data(env: str, *parts: str) -> str | None:
    """`$env`, else the shared data beside this checkout (../shared/data/...), when it exists (tests, benchmarks,
    demo)."""
    for cand in (os.environ.get(env), Path(__file__).resolve().parents[2].joinpath("shared", "data", *parts)):
        if cand and Path(cand).exists():
            return str(cand)
    return None


# The demo's per-method settings: quick enough for a 2-core CPU, each beating the method above it at W3 g128.
# OmniQuant's CPU-reduced setting (32 x 256 tokens, 2 epochs, lr 5e-2 from a clip search) took 131 s on 2 idle cores
# for SmolLM2-135M with WikiText-2 41.55 (40 windows) against act-order GPTQ's 51.03; the paper's 128 x 2048 x 20
# epochs wants a GPU.
DEMO_SETTINGS = {
    "rtn": {},
    "gptq": {},
    "omniquant": {"epochs": 2, "lwc_lr": 5e-2, "lwc_init": "search", "nsamples": 32, "seqlen": 256},
    # OWQ spends a tenth of a bit per weight on fp16 weak columns (its paper's 3.1-bit setting); see demo()
    "owq": {},
}


# Rough seconds of each demo step in the README's 13-minute run (idle two-core CPU, 8 windows, 32 x 512 calibration):
# an evaluation ~45-60 s, OmniQuant's quantization 131 s, GPTQ's and OWQ's the rest. Only their proportions matter:
# the time-left estimate rescales them by how long the finished steps really took on this machine.
DEMO_STEP_SECONDS = {"eval": 45, "fp32 eval": 60, "rtn": 10, "gptq": 200, "omniquant": 131, "owq": 200}


def demo_dir() -> Path:
    """Where the demo keeps its checkpoints by default: `demo/` in the cache folder (`EDGEQUANT_CACHE` moves it)."""
    from .loading import cache_dir
    return cache_dir() / "demo"


def demo(output_dir=None, bits: int = 3, group_size: int = 128, methods=tuple(DEMO_SETTINGS), calib: str | None = None,
         data: str | None = None, nsamples: int = 32, seqlen: int = 512, eval_seqlen: int = 2048,
         max_windows: int = 8, progress: bool = True, on_row=None) -> list[dict]:
    """The main job end to end on the default model: fetch, quantize with each method, evaluate, return table rows.

    `nsamples` x `seqlen` calibrates GPTQ and OWQ; OmniQuant uses its CPU-reduced setting from DEMO_SETTINGS.
    Checkpoints go to `output_dir` (default `demo_dir()`). `on_row(row, seconds_left)` is called as each row is
    finished, with an estimate of the time the remaining rows will take (None when nothing is left)."""
    import json

    from .loading import fetch_default_model
    from .methods import CalibOptions, get_method
    from .models.family import Dims
    from .schemes import QuantScheme
    unknown = [m for m in methods if m not in DEMO_SETTINGS]
    if unknown:
        raise EdgequantError(f"the demo does not run {', '.join(unknown)}; choose from {', '.join(DEMO_SETTINGS)}")
    # the options' own checks, before the fetch and the baseline evaluation rather than minutes later in quantize
    QuantScheme(bits, group_size)
    CalibOptions(nsamples=nsamples, seqlen=seqlen)
    calib = calib or shared_data("EDGEQUANT_CALIB", "calibration")
    data = data or shared_data("EDGEQUANT_EVAL", "wikitext-2-raw", "wiki.test.raw")
    if calib is None or data is None:
        raise EdgequantError("the demo needs calibration and evaluation text: pass --calib PATH and --data PATH "
                             "(e.g. ../shared/data/calibration and ../shared/data/wikitext-2-raw/wiki.test.raw)")
    model_dir = fetch_default_model(progress)
    d = Dims.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    _check_group_width(group_size, max(d.hidden, d.intermediate))   # its linears' inputs
    out_root = Path(output_dir).expanduser() if output_dir is not None else demo_dir()
    eta = _DemoClock(methods, max_windows / 8, nsamples * seqlen / (32 * 512))
    rows = []

    def finish(row, step):
        rows.append(row)
        left = eta.done(step)
        if on_row is not None:
            on_row(row, left)

    base = evaluate(model_dir, data, eval_seqlen, max_windows, progress=progress)
    finish({"method": "fp32 (dequantized GGUF)", "scheme": "-", "bits_target": 32.0, "bits_per_weight": 32.0,
            "perplexity": base["perplexity"], "quantize_s": None, "eval_s": base["time_s"], "calibration": "-"},
           "fp32")
    for method in methods:
        opts = dict(DEMO_SETTINGS[method])
        if method == "owq":
            opts["target_bits"] = bits + 0.1
        n, L = opts.pop("nsamples", nsamples), opts.pop("seqlen", seqlen)
        t0 = time.time()
        calibration = dict(calib=calib, nsamples=n, seqlen=L) if get_method(method).needs_calibration else {}
        ck = quantize(model_dir, out_root / f"{method}-w{bits}g{group_size}", method=method, bits=bits,
                      group_size=group_size, progress=progress, **calibration, **opts)
        tq = time.time() - t0
        info = inspect(ck)
        res = evaluate(ck, data, eval_seqlen, max_windows, progress=progress)
        label = method + "".join(f" {k.replace('_', '-')}={v:g}" if isinstance(v, float) else
                                 f" {k.replace('_', '-')}={v}" for k, v in opts.items())
        finish({"method": label, "scheme": info["scheme"], "bits_target": info["bits_target"],
                "bits_per_weight": info["bits_per_weight"], "perplexity": res["perplexity"], "quantize_s": tq,
                "eval_s": res["time_s"], "calibration": "-" if method == "rtn" else f"{n}x{L}",
                "checkpoint": str(ck)}, method)
    return rows


class _DemoClock:
    """Time left in the demo: the idle-run shares of the steps still to come, scaled by elapsed / done shares."""

    def __init__(self, methods, eval_scale: float, calib_scale: float):
        s = DEMO_STEP_SECONDS
        cost = {"fp32": s["fp32 eval"] * eval_scale}
        for m in methods:
            # GPTQ and OWQ pass over the calibration tokens; OmniQuant's setting is fixed, RTN reads none
            q = s[m] * (calib_scale if m in ("gptq", "owq") else 1.0)
            cost[m] = q + s["eval"] * eval_scale
        self.left, self.done_cost, self.t0 = cost, 0.0, time.time()

    def done(self, step: str) -> float | None:
        self.done_cost += self.left.pop(step)
        if not self.left:
            return None
        return (time.time() - self.t0) / self.done_cost * sum(self.left.values())


def tune_weak_columns(checkpoint, data, output, progress: bool = True, **options) -> dict:
    """OWQ weak-column tuning: train only the fp16 weak columns of CHECKPOINT on task text `data` (causal-LM loss),
    write the tuned checkpoint to `output`, and return losses, trainable parameter count and peak memory.
    `options`: the fields of `calibrate.configs.WCTConfig` (epochs, lr, seqlen, nsamples, heldout, batch_size, seed,
    device), each defaulting to its value there."""
    import resource

    import torch

    from .artifact import load_quantized_model, load_quantized_weight
    from .atomic import output_lock
    from .checkpoint import PROVENANCE_NAME, write_copy
    from .calibrate.configs import WCTConfig
    from .calibrate.wct import attach_weak_columns, lm_loss, train_weak_columns
    from .data import random_windows, read_text, tokenize

    cfg = WCTConfig.from_dict(options, " to tune-weak-columns")
    epochs, lr, seqlen, nsamples, heldout, batch_size, seed, device = (
        cfg.epochs, cfg.lr, cfg.seqlen, cfg.nsamples, cfg.heldout, cfg.batch_size, cfg.seed, cfg.device)
    check_device(device)
    src = Path(checkpoint).expanduser()
    out = Path(output).expanduser().resolve()
    if out == src.resolve():
        raise EdgequantError("-o must name a new folder, not the checkpoint being tuned")
    with output_lock(out, PROVENANCE_NAME):
        read_text(data)
        model, ck = load_quantized_model(src)
        quantized = {n: load_quantized_weight(ck, n) for n in ck.quantized_linears()}
        if not any(q.outlier_idx is not None and len(q.outlier_idx) for q in quantized.values()):
            raise EdgequantError(f"{src} has no weak (fp16) columns to tune: quantize with --method owq first")
        ids = tokenize(load_tokenizer(src), read_text(data))
        if len(ids) < (heldout + 2) * seqlen:
            raise EdgequantError(f"task text has {len(ids)} tokens; WCT needs at least {(heldout + 2) * seqlen} "
                                 f"for --seqlen {seqlen} and a held-out part: use more text or a smaller --seqlen")
        # the last `heldout` windows are never trained on
        cut = len(ids) - heldout * seqlen
        held = ids[cut:].view(heldout, seqlen)
        train = random_windows(ids[:cut], nsamples, seqlen, seed)

        modules = attach_weak_columns(model, quantized)
        model.to(device)
        held, train = held.to(device), train.to(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        trainable = sum(m.weak.numel() for m in modules.values())
        total_params = sum(p.numel() for p in model.parameters()) + sum(
            m.q.numel() for m in modules.values())
        before = lm_loss(model, held, batch_size)
        t0 = time.time()
        history = train_weak_columns(model, modules, train, epochs, lr, batch_size, seed, progress)
        train_s = time.time() - t0
        after = lm_loss(model, held, batch_size)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None

        tuned = {name: m.weak.detach().to("cpu", torch.float16) for name, m in modules.items()}
        if not math.isfinite(after) or not all(torch.isfinite(w).all() for w in tuned.values()):
            # a diverged run would write a checkpoint of NaN columns (as --lr 1e308 did) that loads and runs
            raise EdgequantError(f"weak-column tuning diverged (held-out loss {after}, or columns past fp16's range); "
                                 f"nothing was written: lower --lr (it was {lr:g})")
        tensors = ck.read()
        for name, w in tuned.items():
            tensors[f"{name}.outlier_weight"] = w.numpy()
        prov = dict(ck.provenance)
        report = {"data": str(data), "epochs": epochs, "lr": lr, "seqlen": seqlen, "nsamples": nsamples,
                  "heldout_windows": heldout, "seed": seed, "heldout_loss_before": before,
                  "heldout_loss_after": after, "train_loss": history, "trainable_params": trainable,
                  "model_params": total_params, "peak_rss_bytes": peak, "peak_gpu_bytes": peak_gpu, "device": device,
                  "full_finetune_state_bytes_estimate": total_params * 16, "time_s": round(train_s, 2)}
        prov["wct"] = report
        write_copy(src, out, tensors, prov)
        return {**report, "checkpoint": str(out)}
