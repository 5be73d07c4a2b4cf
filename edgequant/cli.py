"""The `edgequant` command line: thin click commands over `edgequant.api` and `edgequant.export.api`, the only module
that knows both halves (the core never imports the TVM side). Quantize's options are generated from the option
dataclasses (`methods.CalibOptions` and each method's registered config). Imports are lazy so --help is instant."""
from __future__ import annotations

import errno
import json
import os
import sys

import click

from .clitypes import DEVICE, EVAL_WINDOW, POSITIVE, POSITIVE_FLOAT, Finite


class _Group(click.Group):
    """Turns expected failures into one line on stderr instead of a traceback or a usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:   # bad options and arguments: one line naming the option and the fix
            click.echo(f"error: {e.format_message()} (see `{e.ctx.command_path if getattr(e, 'ctx', None) else 'edgequant'} "
                       "--help`)", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            _interrupted("interrupted")
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            _interrupted(interrupted_note("interrupted; no output was written"))
        except OSError as e:
            # output folders report their own full disk ("nothing was changed"); what is left is the printed result
            # (`> /dev/full`)
            if e.errno in _FULL:
                from .atomic import written_outputs
                _silence(sys.stdout)
                done = written_outputs()
                # the output folder is complete: only the lines after it were lost (eighteenth re-run, U8)
                what = f"{done[-1]} was written, but its summary could not be printed" if done else \
                    "cannot write the result"
                click.echo(f"error: {what} ({e.strerror}); free space where stdout goes or redirect it elsewhere",
                           err=True)
                sys.exit(1)
            raise
        except MemoryError:
            click.echo("error: out of memory; use a smaller --nsamples/--seqlen/--batch-size or a machine with more "
                       "memory", err=True)
            sys.exit(1)
        except Exception as e:  # noqa: BLE001
            from .entry import interrupted
            from .errors import EdgequantError
            # Ctrl-C that a library re-raised as its own error, or that one of our checks then reported as a
            # damaged input (a tune-weak-columns model build: fourteenth re-run)
            if interrupted():
                _interrupted(interrupted_note("interrupted; no output was written"))
            if isinstance(e, EdgequantError):
                click.echo(f"error: {e}", err=True)
                sys.exit(1)
            if type(e).__name__ == "OutOfMemoryError":
                click.echo("error: the GPU ran out of memory; use --device cpu or a smaller --nsamples/--seqlen/"
                           "--batch-size", err=True)
                sys.exit(1)
            raise


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def _interrupted(note: str):
    """The one line for a Ctrl-C (status 130; SIGTERM, SIGHUP: see `entry`); nothing printed after it
    (`entry.after_interrupt_line`)."""
    from .entry import after_interrupt_line, interrupt_line, interrupt_status
    click.echo(f"error: {interrupt_line(note)}", err=True)
    after_interrupt_line()
    sys.exit(interrupt_status())


def _silence(stream) -> None:
    """Point `stream`'s file descriptor at /dev/null, so the text still pending in it does not fail again in the
    interpreter's last flush (an "Exception ignored" traceback after the error line)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):   # not a real file (a test's StringIO)
        pass


def interrupted_note(otherwise: str) -> str:
    """The line for Ctrl-C: `otherwise` (nothing was written), unless an output was already put in place (the
    interrupt came just as it replaced the old one): then the user has the new, complete output, not the old one."""
    from .atomic import replaced_an_older, written_outputs
    done = written_outputs()
    if done:
        gone = " (the old one is gone)" if replaced_an_older(done[-1]) else ""
        return f"interrupted after {done[-1]} was written; it holds the new, complete output{gone}"
    return otherwise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgequant")
def main():
    """edgequant: quantize LLaMA-family models to 2-4 bits (RTN, GPTQ, OmniQuant, OWQ), evaluate them, and compile
    them with TVM for phones, GPUs and CPUs.

    \b
    edgequant demo                                         # the whole journey on SmolLM2-135M
    edgequant quantize MODEL -o q/ --method gptq --bits 3 --group-size 128 --calib calib.txt
    edgequant eval q/ --data wiki.test.raw --max-windows 40
    edgequant inspect q/
    edgequant export q/ --target cpu -o q-cpu/ && edgequant run q-cpu/ -p "Hello"
    """


def _bits_option(default: int):
    from .schemes import SUPPORTED_BITS
    return click.option("--bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=str(default),
                        show_default=True)


def _methods():
    from .methods import METHODS
    return list(METHODS.values())


_TYPES = {"int": lambda m: click.IntRange(min=m["lo"], max=m["hi"]),
          "float": lambda m: Finite(min=m["lo"], max=m["hi"], min_open=m["lo_open"]),
          "choice": lambda m: click.Choice(m["choices"]), "device": lambda m: DEVICE, "str": lambda m: str,
          "float|search": lambda m: str}   # the dataclass reads the number


def _click_option(f, default, help: str):
    """One click option from an Options dataclass field (its rule gives the type, its metadata the help)."""
    m, name = f.metadata, f.name.replace("_", "-")
    if m["kind"] == "bool":
        return click.option(f"--{name}/--no-{name}", default=default, help=help)
    return click.option(f"--{name}", type=_TYPES[m["kind"]](m), default=default, help=help)


def _options_of(where: str):
    """The options of an Options dataclass ("module:Class"), with its defaults."""
    import importlib
    module, _, name = where.partition(":")
    cls = getattr(importlib.import_module(module), name)

    def deco(fn):
        for f in reversed(cls.cli_fields()):
            shown = f"  [default: {f.default}]" if f.default is not None else ""
            fn = _click_option(f, f.default, f.metadata["help"] + shown)(fn)
        return fn
    return deco


def _method_options(fn):
    """Every registered method's own options. Each defaults to None ("the method's default") and reaches the API only
    when given, so the method's dataclass owns its defaults."""
    seen = {}
    for m in _methods():
        for f in m.config.cli_fields():
            seen.setdefault(f.name, (f, []))[1].append(m.title)
    for f, titles in reversed(list(seen.values())):
        default = "" if f.default is None else f"  [default: {f.default}]"
        fn = _click_option(f, None, f"{'/'.join(titles)}: {f.metadata['help']}{default}")(fn)
    return fn


def _quantize_help() -> str:
    from .models import supported_model_types   # the registry, so every family added there is named
    return ("Quantize MODEL (HF folder, .gguf file, hub id; default: SmolLM2-135M-Instruct) into a checkpoint folder. "
            f"Supported model types: {', '.join(supported_model_types())}.")


@main.command(help=_quantize_help())
@click.argument("model", required=False)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--method", default="gptq", show_default=True, type=click.Choice([m.name for m in _methods()]),
              help="; ".join(f"{m.name}: {m.summary}" for m in _methods()) + ".")
@_bits_option(4)
@click.option("--group-size", type=int, default=128, show_default=True, help="Inputs per group; -1 per channel.")
@click.option("--sym/--asym", default=False, show_default=True, help="Symmetric (no zero points) or asymmetric.")
@click.option("--embed-bits", type=click.Choice(["16", "8", "4"]), default="16", show_default=True,
              help="Quantize the embedding and output layer (tied: one table) to 8 or 4 bits, round to nearest; 16 "
                   "keeps them fp16.")
@click.option("--embed-group-size", type=int, default=None,
              help="Hidden inputs per group of the quantized tables (with --embed-bits 8 or 4); -1 per row.  "
                   "[default: 32]")
@_options_of("edgequant.methods:CalibOptions")
@_method_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def quantize(model, output, method, bits, group_size, sym, embed_bits, embed_group_size, quiet, **options):
    from pathlib import Path

    from . import api
    from .checkpoint import PROVENANCE_NAME
    options = {k: v for k, v in options.items() if v is not None}
    if embed_group_size is not None:   # like a method's options: refused where it would be silently ignored
        if embed_bits == "16":
            raise click.BadParameter("applies to quantized tables: add --embed-bits 8 or 4, or leave it out.",
                                     param_hint="'--embed-group-size'")
        options["embed_group_size"] = embed_group_size
    try:
        replaced = (Path(output).expanduser() / PROVENANCE_NAME).is_file()
    except OSError:   # a name the file system refuses (too long): api.quantize says so in one line
        replaced = False
    try:
        out = api.quantize(model, output, method=method, bits=int(bits), group_size=group_size, sym=sym,
                           progress=not quiet, embed_bits=int(embed_bits), **options)
    except KeyboardInterrupt:
        _interrupted(interrupted_note(api.interrupted_note(method, output)))
    info = api.inspect(out)
    click.echo(f"wrote {out}  ({info['scheme']}, {info['bits_target']:g} bits/weight target, "
               f"{info['bits_per_weight']:.3f} stored, {info['size_on_disk_bytes'] / 2**20:.1f} MiB)"
               + ("; it replaced the checkpoint that was there" if replaced else ""))


@main.command("eval")
@click.argument("checkpoint")
@click.option("--data", required=True, help="Evaluation text (WikiText-2 test file) or 'wikitext2' with a network.")
@click.option("--seqlen", type=EVAL_WINDOW, default=2048, show_default=True)
@click.option("--max-windows", type=POSITIVE, default=None, help="Evaluate only the first N windows (CPU time).")
@click.option("--reference", default=None, help="Original model: also report KL divergence and top-1 agreement.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--record", is_flag=True, help="Also append the result to the checkpoint's edgequant.json (for report).")
@click.option("-q", "--quiet", is_flag=True)
def eval_(checkpoint, data, seqlen, max_windows, reference, device, as_json, record, quiet):
    """Perplexity of CHECKPOINT, rebuilt from its saved packed tensors (or of an unquantized model).

    A DIST folder from `edgequant export` is evaluated through its compiled library instead. On a CPU that is about
    9x slower than evaluating the checkpoint (TVM's paged-attention prefill kernels dominate): evaluate the checkpoint
    for quality numbers, and a DIST with a few --max-windows to check the library agrees."""
    from . import api
    from .checkpoint import kind
    if kind(checkpoint) == "dist":   # through its compiled library (same windows and protocol)
        from .errors import EdgequantError
        from .export.api import evaluate as evaluate_dist
        unused = [o for o, v in (("--reference", reference), ("--record", record), ("--device", device != "cpu"))
                  if v]
        if unused:   # --reference was ignored without a word (sixteenth re-run, U4)
            verb = "applies" if len(unused) == 1 else "apply"
            raise EdgequantError(f"{' and '.join(unused)} {verb} to checkpoints and models, not to a DIST (evaluated "
                                 f"through its compiled library on its own device): evaluate {checkpoint}'s "
                                 "checkpoint with them, or leave them out")
        # the note comes once the DIST has loaded: a damaged DIST gets only its one error line
        res = evaluate_dist(checkpoint, data, seqlen=seqlen, max_windows=max_windows, progress=not quiet,
                            on_start=None if quiet else lambda: click.echo(
                                "note: a DIST is evaluated through the TVM runtime, about 9x slower on a CPU than "
                                "its checkpoint", err=True))
    else:
        res = api.evaluate(checkpoint, data, seqlen=seqlen, max_windows=max_windows, reference=reference,
                           device=device, progress=not quiet, record=record)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"perplexity {res['perplexity']:.3f} over {res['windows']} windows of {res['seqlen']} tokens "
               f"({res['time_s']:.0f} s)")
    if res.get("kl_divergence") is not None:
        click.echo(f"KL(reference || model) {res['kl_divergence']:.4f} nats/token, "
                   f"top-1 agreement {100 * res['top1_agreement']:.2f}%")


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--layers/--no-layers", default=True, show_default=True, help="Per-layer reconstruction errors.")
@click.option("--context", type=POSITIVE, default=None,
              help="Tokens of context for the memory plan (default: the model's window, at most 4096).")
def inspect(checkpoint, as_json, layers, context):
    """Scheme, bits per weight, size on disk, per-layer errors, calibration settings and memory plan of CHECKPOINT."""
    from . import api
    from .memory import MemoryPlan
    from .report import table
    info = api.inspect(checkpoint, context=context)
    if info["provenance"] != "ok":
        click.echo(f"warning: {info['path']}/edgequant.json is {info['provenance']}: calibration, options and "
                   "per-layer errors are unknown (the weights were checked and are usable)", err=True)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"checkpoint      {info['path']}")
    click.echo(f"model type      {info['model_type']}")
    click.echo(f"method          {info['method']}")
    click.echo(f"scheme          {info['scheme']} (bits {info['bits']}, group {info['group_size']}, "
               f"{'sym' if info['sym'] else 'asym'})")
    click.echo(f"bits/weight     {info['bits_target']:g} target; {info['bits_per_weight']:.4f} stored (packed words + "
               f"scales + zero points{' + fp16 columns' if info['outlier_columns'] else ''}); "
               f"{info['bits_per_weight_ideal']:.4f} ideal")
    click.echo(f"quantized       {info['quantized_linears']} linears, {info['quantized_weights']:,} weights")
    widths = {}
    for name, scheme in (info["overrides"] or {}).items():
        if name not in (info["tables"] or {}):
            widths.setdefault(scheme, []).append(name)
    if widths:
        click.echo("own schemes     " + "; ".join(f"{s}: {len(ns)} module{'s' if len(ns) > 1 else ''}"
                                              for s, ns in sorted(widths.items())))
    if info["tables"]:
        click.echo("tables          " + ", ".join(f"{n} {s}" for n, s in info["tables"].items()))
    click.echo(f"size on disk    {info['size_on_disk_bytes'] / 2**20:.2f} MiB")
    if info["outlier_columns"]:
        n = sum(info["outlier_columns"].values())
        click.echo(f"fp16 columns    {n} in {len(info['outlier_columns'])} linears")
    calib = json.dumps(info["calibration"]) if info["calibration"] else "none"
    click.echo(f"calibration     {calib if info['provenance'] == 'ok' else 'unknown (edgequant.json ' + info['provenance'] + ')'}")
    if info["time_s"]:
        click.echo(f"time            {json.dumps(info['time_s'])}")
    click.echo("\n".join(MemoryPlan(**info["memory"]).lines()))
    if layers and info["layers"]:
        rows = [{"layer": k, **v} for k, v in info["layers"].items()]
        cols = [("layer", "layer")] + [(k, k) for k in ("weight_rel_err", "output_rel_err") if k in rows[0]]
        click.echo(table(rows, cols))


@main.command()
@click.argument("checkpoints", nargs=-1)
@click.option("-o", "--output", default="report.png", show_default=True, help="PNG file to write.")
@click.option("--data", default=None, help="Evaluation text for checkpoints without a recorded perplexity.")
@click.option("--seqlen", type=EVAL_WINDOW, default=2048, show_default=True)
@click.option("--max-windows", type=POSITIVE, default=None, help="Evaluate only the first N windows (CPU time).")
@click.option("--baseline", default=None, help="The unquantized model (evaluated on --data) or its perplexity.")
@click.option("--results", multiple=True, help="A saved table from benchmarks/results/ (*.rows.json, *.json, *.md); "
                                               "repeatable.")
@click.option("--x", "x", default="bits_per_weight", show_default=True, help="Column of --results for the x axis.")
@click.option("--y", "y", default="perplexity", show_default=True, help="Column of --results for the y axis.")
@click.option("--title", default=None)
@click.option("--max-y", type=POSITIVE_FLOAT, default=None, help="Leave out points above this (listed under the plot).")
@click.option("-q", "--quiet", is_flag=True)
def report(checkpoints, output, data, seqlen, max_windows, baseline, results, x, y, title, max_y, quiet):
    """Plot perplexity vs bits per weight of CHECKPOINTS and/or saved --results tables into a PNG (one marker per
    method, the unquantized baseline as a line). Needs matplotlib: pip install 'edgequant[plot]'."""
    from .plots import report as make_report
    res = make_report(checkpoints, output, data=data, seqlen=seqlen, max_windows=max_windows, baseline=baseline,
                      results=results, x=x, y=y, title=title, max_y=max_y, progress=not quiet)
    for p in res["points"]:
        click.echo(f"{p['method']:<10} {p['label']:<40} x {p['x']:.3f}  y {p['y']:.3f}  ({p['source']})")
    for b in res["baselines"]:
        click.echo(f"baseline   {b['label']:<40} y {b['y']:.3f}")
    click.echo(f"wrote {res['output']}")


@main.command("tune-weak-columns")
@click.argument("checkpoint")
@click.option("--data", required=True, help="Task text to tune on (a file); its last windows are held out.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Tuned checkpoint folder.")
@_options_of("edgequant.calibrate.configs:WCTConfig")
@click.option("-q", "--quiet", is_flag=True)
def tune_weak_columns(checkpoint, data, output, quiet, **options):
    """OWQ weak-column tuning: train only the fp16 weak columns of an OWQ CHECKPOINT on task text."""
    from . import api
    r = api.tune_weak_columns(checkpoint, data, output, progress=not quiet, **options)
    click.echo(f"wrote {r['checkpoint']}")
    gpu = f", {r['peak_gpu_bytes'] / 2**20:.0f} MiB GPU" if r.get("peak_gpu_bytes") else ""
    click.echo(f"held-out loss {r['heldout_loss_before']:.4f} -> {r['heldout_loss_after']:.4f}")
    click.echo(f"trainable parameters {r['trainable_params']:,} of {r['model_params']:,}; peak memory "
               f"{r['peak_rss_bytes'] / 2**20:.0f} MiB host{gpu} (weights, gradients and Adam state of full "
               f"fine-tuning alone would take about {r['full_finetune_state_bytes_estimate'] / 2**20:.0f} MiB)")


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("-q", "--quiet", is_flag=True)
def convert(model, output, quiet):
    """Write MODEL (HF folder, .gguf file, hub id) unquantized as a folder with safetensors weights, which
    `edgequant export` compiles with fp16 weights."""
    from . import api
    click.echo(f"wrote {api.convert(model, output, progress=not quiet)}")


@main.command()
@_bits_option(3)
@click.option("--group-size", type=int, default=128, show_default=True)
@click.option("--calib", default=None, help="Calibration text (default: ../shared/data/calibration if present).")
@click.option("--data", default=None, help="Evaluation text (default: ../shared/data/wikitext-2-raw/wiki.test.raw).")
@click.option("--max-windows", type=POSITIVE, default=8, show_default=True, help="Evaluation windows of 2048 tokens.")
@click.option("--nsamples", type=POSITIVE, default=32, show_default=True)
@click.option("--seqlen", type=POSITIVE, default=512, show_default=True)
@click.option("--methods", default="rtn,gptq,omniquant,owq", show_default=True,
              help="Comma-separated methods to compare.")
@click.option("-o", "--output", default=None,
              help="Where to keep the demo checkpoints (default: demo/ in the cache folder, EDGEQUANT_CACHE).")
@click.option("-q", "--quiet", is_flag=True)
def demo(bits, group_size, calib, data, max_windows, nsamples, seqlen, methods, output, quiet):
    """The main job end to end on SmolLM2-135M-Instruct: fetch, quantize (RTN, GPTQ, OmniQuant with CPU-reduced
    settings, OWQ), evaluate, compare. --nsamples/--seqlen calibrate GPTQ and OWQ. About 13 minutes on an idle
    two-core CPU with the defaults; each row is printed as it finishes, with an estimate of the time left."""
    from pathlib import Path

    from . import api
    from .report import table
    methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    out_root = Path(output).expanduser().resolve() if output else api.demo_dir()
    click.echo(f"checkpoints: {out_root}" + ("" if output else "  (EDGEQUANT_CACHE or -o moves them)"))
    click.echo("rows print as they finish; the defaults take about 13 min on an idle two-core CPU, longer on a busy one")
    done = []

    def on_row(row, left):
        done.append(row)
        head = f"[{len(done)}/{len(methods) + 1}] {row['method']}"
        if row["quantize_s"] is not None:
            head += (f" ({row['scheme']}, {row['bits_target']:g} bits/weight target, {row['bits_per_weight']:.2f} "
                     f"stored): quantized in {row['quantize_s']:.0f} s,")
        else:
            head += ":"
        tail = f"; about {_duration(left)} left" if left is not None else ""
        click.echo(f"{head} perplexity {row['perplexity']:.2f} (eval {row['eval_s']:.0f} s){tail}")

    rows = api.demo(output, bits=int(bits), group_size=group_size, calib=calib, data=data, nsamples=nsamples,
                    seqlen=seqlen, max_windows=max_windows, progress=not quiet, methods=methods, on_row=on_row)
    for r in rows:
        # target and stored side by side: '3 / 3.42' (the stored figure adds packing, scales, zeros)
        r["bits"] = f"{r['bits_target']:g} / {r['bits_per_weight']:.2f}"
    click.echo(f"\nSmolLM2-135M-Instruct, WikiText-2 perplexity over the first {max_windows} windows of 2048 tokens")
    click.echo(table(rows, [("method", "method"), ("scheme", "scheme"), ("bits", "bits/weight target / stored"),
                            ("perplexity", "perplexity"), ("quantize_s", "quantize s"), ("eval_s", "eval s"),
                            ("calibration", "calibration tokens")]))
    last = rows[-1].get("checkpoint")
    if last:
        click.echo(f"\ncheckpoints in {out_root}; next: edgequant inspect {last}  |  "
                   f"edgequant export {last} --target cpu")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


# export/run/chat/bench live in the edgequant.export package (TVM side); importing its cli module does not import tvm
from .export.cli import register_commands  # noqa: E402

register_commands(main)

if __name__ == "__main__":
    main()
