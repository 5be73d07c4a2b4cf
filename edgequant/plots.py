"""`edgequant report`: the bits-versus-quality trade-off as a picture (matplotlib, the optional `[plot]` extra).

Points come from checkpoints (bits per weight as stored: packed words, scales, zero points, fp16 columns; perplexity
recorded in their edgequant.json by `edgequant eval --record`, else computed now with `--data`) or from the saved
benchmark tables in `benchmarks/results/` (`*.rows.json`, `*.json` with a "rows" list, or `*.md` tables). One marker
per method; the unquantized baseline (a row at 16 bits or more, or `--baseline`) is drawn as a horizontal line. The
legend says where each perplexity came from.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from .errors import EdgequantError, first_line

FIGSIZE, DPI = (8.0, 5.0), 100          # 800 x 500 pixels: small enough to check into the repository
MARKERS = {"rtn": "o", "gptq": "s", "owq": "D", "omniquant": "^", "fp16": "*"}
# markdown headers written by the benchmark scripts -> the row keys of their *.rows.json twins
MD_HEADERS = {"bits/weight (stored)": "bits_per_weight", "bits/weight": "bits_per_weight",
              "wikitext-2 ppl": "perplexity", "perplexity": "perplexity", "ppl": "perplexity"}
BASELINE_MIN_BITS = 16


@dataclass
class Point:
    method: str          # the method's name (marker and legend group)
    label: str           # what the point is: scheme and options
    x: float
    y: float
    source: str          # where y came from
    tag: str = ""        # the short text drawn beside the point (the scheme)


def method_of(text: str) -> str:
    """'gptq act-order=True' -> 'gptq'; unknown names are kept whole."""
    return str(text).split()[0].lower() if str(text).split() else "?"


# --------------------------------------------------------------------------------------------------- sources
def _number(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    if isinstance(v, str):
        try:
            f = float(v.replace(",", ""))
            return f if math.isfinite(f) else None
        except ValueError:
            return None
    return None


def read_table(path) -> list[dict]:
    """Rows of a saved benchmark table: a *.rows.json map, a JSON {"rows": [...]} or list, or a markdown table."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EdgequantError(f"results table not found: {p}; pass a file from benchmarks/results/ (*.json or *.md)")
    text = p.read_text(errors="replace")
    if p.suffix == ".json":
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:   # RecursionError: 100,000 nested lists
            raise EdgequantError(f"{p} is not valid JSON ({first_line(e)}); pass a table saved by a benchmark "
                                 "script") from None
        rows = d.get("rows") if isinstance(d, dict) and isinstance(d.get("rows"), list) else (
            list(d.values()) if isinstance(d, dict) else d)
        rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    elif p.suffix == ".md":
        rows = _markdown_rows(text)
    else:
        raise EdgequantError(f"{p}: a results table is a .json or .md file")
    if not rows:
        raise EdgequantError(f"{p} holds no table rows")
    return rows


def _markdown_rows(text: str) -> list[dict]:
    """The first markdown table of `text` (later tables are ignored)."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and re.fullmatch(r"\|[\s:|-]+\|", lines[i + 1] or ""):
            head = [MD_HEADERS.get(h.strip().lower(), h.strip()) for h in lines[i].strip("|").split("|")]
            rows = []
            for ln in lines[i + 2:]:
                if not ln.startswith("|"):
                    break
                cells = [c.strip() for c in ln.strip("|").split("|")]
                rows.append(dict(zip(head, cells)))
            return rows
    return []


def table_points(path, x: str = "bits_per_weight", y: str = "perplexity", group: str = "method"):
    """(points, baselines) of one table; baselines are (label, y) for rows at BASELINE_MIN_BITS bits or more."""
    rows = read_table(path)
    missing = [c for c in (x, y) if not any(c in r for r in rows)]
    if missing:
        cols = sorted({k for r in rows for k in r})
        raise EdgequantError(f"{path} has no column {', '.join(missing)}; its columns: {', '.join(cols)} "
                             "(choose with --x and --y)")
    points, baselines = [], []
    src = Path(path).name
    for r in rows:
        xv, yv = _number(r.get(x)), _number(r.get(y))
        if xv is None or yv is None:
            continue
        name = str(r.get(group, r.get("config", "?")))
        if x == "bits_per_weight" and xv >= BASELINE_MIN_BITS:
            baselines.append((f"{name} ({src})", yv))
            continue
        tag = " / ".join(str(r[k]) for k in ("scheme", "config") if r.get(k) not in (None, "-", ""))
        points.append(Point(method_of(name), f"{tag} {name}".strip(), xv, yv, src, tag))
    return points, baselines


def _recorded(prov: dict) -> dict | None:
    """The newest perplexity recorded in edgequant.json."""
    recs = [r for r in prov.get("evaluations") or [] if isinstance(r, dict) and _number(r.get("perplexity"))]
    return recs[-1] if recs else None


def checkpoint_points(checkpoints, data=None, seqlen: int = 2048, max_windows: int | None = None,
                      progress: bool = False) -> list[Point]:
    from . import api
    from .artifact import open_checkpoint
    points = []
    for ck in checkpoints:
        info = api.inspect(ck)
        rec = _recorded(open_checkpoint(ck).provenance)
        if rec is not None and data is None:
            ppl, src = float(rec["perplexity"]), (f"recorded: {Path(str(rec.get('data'))).name}, "
                                                  f"{rec.get('windows')}x{rec.get('seqlen')}")
        elif data is not None:
            res = api.evaluate(ck, data, seqlen=seqlen, max_windows=max_windows, progress=progress)
            ppl, src = res["perplexity"], f"computed: {Path(str(data)).name}, {res['windows']}x{res['seqlen']}"
        else:
            raise EdgequantError(f"{ck} has no perplexity recorded in its edgequant.json; pass --data PATH to "
                                 "compute it (or record one first with `edgequant eval CKPT --data PATH --record`)")
        points.append(Point(info["method"], f"{info['scheme']} {Path(str(ck)).name}", info["bits_per_weight"], ppl,
                            src, info["scheme"]))
    return points


# --------------------------------------------------------------------------------------------------- drawing
def _png_path(out) -> Path:
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise EdgequantError(f"-o {out}: the report is a PNG image; name it *.png")
    return out


def draw(points: list[Point], baselines: list[tuple[str, float]], out, title: str, xlabel: str, ylabel: str,
         max_y: float | None = None) -> Path:
    """Write the PNG (FIGSIZE at DPI). Each method's best point per x is joined by a line and labelled with its
    scheme; a y axis spanning more than 20x is drawn in log scale; points above `max_y` are left out and listed
    under the plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgequantError("edgequant report needs matplotlib: pip install 'edgequant[plot]'") from None
    if not points and not baselines:
        raise EdgequantError("nothing to plot: no row has both values")
    out = _png_path(out)
    hidden = [p for p in points if max_y is not None and p.y > max_y]
    points = [p for p in points if p not in hidden]
    firsts = {}
    for label, v in baselines:   # the same baseline saved beside several tables is drawn once
        firsts.setdefault((label.split(" (")[0], round(v, 3)), (label, v))
    baselines = list(firsts.values())
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ys = [p.y for p in points] + [b for _, b in baselines]
    if max(ys) / max(min(ys), 1e-12) > 20:
        ax.set_yscale("log")
    methods = list(dict.fromkeys(p.method for p in points))
    for i, m in enumerate(methods):
        mine = sorted((p for p in points if p.method == m), key=lambda p: p.x)
        srcs = sorted({p.source for p in mine})
        ax.scatter([p.x for p in mine], [p.y for p in mine], marker=MARKERS.get(m, "v"), s=46, color=f"C{i}",
                   label=f"{m} ({'; '.join(srcs)})", zorder=3, alpha=0.85)
        front = [min(same_x, key=lambda p: p.y) for _, same_x in groupby(mine, key=lambda p: p.x)]   # best per x
        ax.plot([p.x for p in front], [p.y for p in front], color=f"C{i}", linewidth=0.8, alpha=0.6, zorder=2)
        for p in front:
            ax.annotate(p.tag, (p.x, p.y), textcoords="offset points", xytext=(5, -9 + 6 * (i % 3)),
                        fontsize=7, color=f"C{i}")
    for j, (label, y) in enumerate(baselines):
        ax.axhline(y, color="0.3", linestyle=("--", ":", "-.")[j % 3], linewidth=1, label=f"{label}: {y:.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if hidden:
        fig.text(0.01, 0.01, "not shown (above %g): " % max_y + ", ".join(
            f"{p.method} {p.tag} {p.y:,.0f}" for p in hidden), fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03 if hidden else 0, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)   # tight_layout keeps the canvas at FIGSIZE x DPI pixels
    plt.close(fig)
    tmp.replace(out)
    return out


def report(checkpoints=(), output="report.png", data=None, seqlen: int = 2048, max_windows: int | None = None,
           baseline=None, results=(), x: str = "bits_per_weight", y: str = "perplexity", title: str | None = None,
           max_y: float | None = None, progress: bool = False) -> dict:
    """Plot checkpoints and/or saved results tables into `output`. `baseline` is a perplexity (a number) or a model
    to evaluate on `data`. Returns what was drawn."""
    if not checkpoints and not results:
        raise EdgequantError("give checkpoints to plot, or --results FILE (a table from benchmarks/results/)")
    _png_path(output)   # before any evaluation
    if checkpoints and (x, y) != ("bits_per_weight", "perplexity"):
        raise EdgequantError("--x/--y choose columns of --results tables; checkpoints plot perplexity vs bits")
    points, baselines = checkpoint_points(checkpoints, data, seqlen, max_windows, progress), []
    for f in results:
        p, b = table_points(f, x, y)
        points += p
        baselines += b
    if baseline is not None:
        v = _number(baseline)
        if v is None:
            if data is None:
                raise EdgequantError("--baseline MODEL is evaluated on --data: pass --data PATH (or a perplexity)")
            from . import api
            res = api.evaluate(baseline, data, seqlen=seqlen, max_windows=max_windows, progress=progress)
            baselines.append((f"fp16 {Path(str(baseline)).name} (computed)", res["perplexity"]))
        else:
            baselines.append(("fp16 baseline (given)", v))
    names = {"bits_per_weight": "bits per weight (stored: packed words + scales + zero points + fp16 columns)",
             "perplexity": "perplexity (lower is better)"}
    out = draw(points, baselines, output, title or f"{y.replace('_', ' ')} vs {x.replace('_', ' ')}", names.get(x, x),
               names.get(y, y), max_y)
    return {"output": str(out), "points": [p.__dict__ for p in points],
            "baselines": [{"label": lbl, "y": v} for lbl, v in baselines]}
