"""Calibration and evaluation text.

Calibration: `--calib` names a text file (or a folder of .txt files, or a dataset name where a network exists); its
tokens are cut into `nsamples` random windows of `seqlen` tokens drawn reproducibly from `seed`, as the GPTQ and
OmniQuant scripts do. Evaluation: WikiText-2 test text with the dataset's rows joined by "\\n\\n" (the GPTQ/OmniQuant
protocol), cut into non-overlapping windows.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import EdgequantError

DATASET_NAMES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1"), "c4": ("allenai/c4", "en")}


def _dataset_text(name: str, split: str) -> str:
    try:
        import datasets  # optional: only where a network exists
    except ImportError:
        raise EdgequantError(f"'{name}' is a dataset name, which needs the `datasets` package "
                             "(pip install 'edgequant[data]') and a network; pass a path to a text file instead") from None
    path, cfg = DATASET_NAMES[name]
    try:
        ds = datasets.load_dataset(path, cfg, split=split)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing data problem
        raise EdgequantError(f"could not load dataset '{name}' ({type(e).__name__}); pass a path to a text file") from None
    return "\n\n".join(ds["text"])


def read_text(source: str | os.PathLike, split: str = "train") -> str:
    """Text of a file, of every .txt file in a folder, or of a named dataset."""
    if str(source) in DATASET_NAMES and not Path(source).exists():
        return _dataset_text(str(source), split)
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.txt")) + sorted(p.glob("*.raw"))
        if not files:
            raise EdgequantError(f"no .txt or .raw files in {p}; pass a text file")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not p.is_file():
        raise EdgequantError(f"data file not found: {source}; pass a text file or one of {', '.join(DATASET_NAMES)}")
    return p.read_text(encoding="utf-8", errors="replace")


def eval_text(source: str | os.PathLike) -> str:
    """WikiText-style evaluation text: the file's lines as the dataset's rows (a line keeps its newline, a blank line
    is an empty row) joined by "\n\n", which is what the GPTQ/OmniQuant scripts feed the tokenizer."""
    if str(source) in DATASET_NAMES and not Path(source).exists():
        return _dataset_text(str(source), "test")
    rows = [line if line.strip() else "" for line in read_text(source).splitlines(keepends=True)]
    return "\n\n".join(rows)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def calibration_samples(tokenizer, source, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token windows from random offsets of the calibration text."""
    if nsamples < 1 or seqlen < 1:
        raise EdgequantError("--nsamples and --seqlen must be positive")
    ids = tokenize(tokenizer, read_text(source))
    if len(ids) <= seqlen:
        raise EdgequantError(f"calibration text has {len(ids)} tokens, fewer than --seqlen {seqlen}; "
                             "use more text or a smaller --seqlen")
    return random_windows(ids, nsamples, seqlen, seed)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] windows of `ids` at offsets drawn reproducibly from `seed`."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def check_eval_seqlen(seqlen) -> None:
    """An evaluation window's length: each token is predicted from those before it in the window, so one token
    predicts nothing (`--seqlen 1` divided by zero: sixteenth re-run, T34)."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise EdgequantError(f"--seqlen must be at least 2 tokens (a window's first token has nothing before it to "
                             f"predict it from), not {seqlen!r}")


def eval_windows(tokenizer, source, seqlen: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of the evaluation text (the tail shorter than seqlen is dropped)."""
    check_eval_seqlen(seqlen)
    ids = tokenize(tokenizer, eval_text(source))
    n = len(ids) // seqlen
    if n == 0:
        raise EdgequantError(f"evaluation text has {len(ids)} tokens, fewer than --seqlen {seqlen}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
