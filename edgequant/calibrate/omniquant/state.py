"""Resumable OmniQuant state: each finished block's fused tensors and the two hidden-state streams, on disk.

Only data formats that cannot run code are read back: safetensors for tensors and JSON (in the safetensors
metadata) for the rest. A folder is trusted only when its `meta.json` carries the fingerprint of this very run (model
weights, calibration samples, scheme and settings); a folder of another run, or one whose files are damaged or do not
fit the model, is discarded with a note and the run starts over, so a planted or broken file costs recomputation at
worst.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ...atomic import as_os_error
from ...checkpoint import _is_number
from ...errors import EdgequantError
from ...quantizer import QuantizedWeight
from ...schemes import QuantScheme

STATE_VERSION = 3   # 1 was pickled .pt files, never read again; 2 had no checksum of the tensors
META = "meta.json"
STREAMS = "streams.safetensors"


class StateMismatch(Exception):
    """A state file is unreadable or does not fit this run (never shown to users: the run starts over)."""


def fingerprint(model, samples: torch.Tensor, scheme: QuantScheme, cfg) -> str:
    """Hash of everything the result depends on: settings, model config, every weight and the calibration tokens."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": STATE_VERSION, "scheme": scheme.to_dict(), "cfg": asdict(cfg),
                         "config": model.config.to_dict()}, sort_keys=True, default=str).encode())
    h.update(samples.contiguous().numpy().tobytes())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _checksum(tensors: dict) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes. Range checks cannot tell a finite but altered value
    from a real one (a stream value of 1e38 made every rerun fail with an infinite loss: eighteenth re-run, L10);
    a file whose tensors do not match the checksum it was saved with is damage."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _save(tensors: dict, record: dict, path: Path):
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={"record": json.dumps({**record, "sha256": _checksum(tensors)},
                                                                    sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    if not path.is_file():   # a FIFO blocked the open for good (sixteenth re-run, C1); a device never ends
        raise StateMismatch(f"{path.name} is not a regular file")
    if path.is_symlink():   # the folder is the tool's own: a link out of it was read (nineteenth re-run, U16)
        raise StateMismatch(f"{path.name} is a link, not a file this tool saved")
    try:
        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {})["record"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors and json raise many types for damaged files
        raise StateMismatch(f"{path.name}: {e}") from None
    if not isinstance(record, dict):
        raise StateMismatch(f"{path.name}: record is not an object")
    if record.pop("sha256", None) != _checksum(tensors):
        raise StateMismatch(f"{path.name}: its tensors do not match their checksum")
    return tensors, record


def _block_tensors(plain: dict, quantized: dict) -> dict:
    out = {f"plain/{k}": v for k, v in plain.items()}
    for rel, qw in quantized.items():
        for field in ("q", "scale", "zero", "outlier_idx", "outlier_weight"):
            t = getattr(qw, field)
            if t is not None:
                out[f"q/{rel}/{field}"] = t
    return out


def _within(t: torch.Tensor, hi: int) -> bool:
    """Every value of `t` an integer in [0, hi] (a NaN or 2.5 zero point passed the range comparisons and went into
    the checkpoint: seventeenth re-run, S42)."""
    t = t.double()
    return t.numel() == 0 or (bool(torch.isfinite(t).all()) and bool((t == t.round()).all())
                              and float(t.min()) >= 0 and float(t.max()) <= hi)


def _stored(t: torch.Tensor) -> torch.Tensor:
    """`t` as the checkpoint will hold it (fp16): a finite float32 past 65504 becomes Inf, a positive one below fp16's
    smallest subnormal 0 (eighteenth re-run, S43)."""
    return t.to(torch.float16)


def _finite_numbers(v) -> bool:
    """Every number in a JSON value finite (a NaN loss went into edgequant.json: eighteenth re-run)."""
    if isinstance(v, dict):
        return all(_finite_numbers(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite_numbers(x) for x in v)
    return not isinstance(v, float) or math.isfinite(v)


def _record_fits(rec: dict, i: int) -> bool:
    """A finished block's record: its stats and the summary the trainer rebuilds, numbers finite, of block i."""
    summary, stats = rec.get("summary"), rec.get("stats")
    if not isinstance(summary, dict) or not isinstance(stats, dict) or not _finite_numbers(rec):
        return False
    return (all(_is_number(summary.get(k)) for k in ("loss_before", "loss_after", "time_s"))
            and isinstance(summary.get("steps"), int)
            and summary.get("block", i) == i)


def _check_block(tensors: dict, block, scheme: QuantScheme, linears, plain_names) -> tuple[dict, dict]:
    """Rebuild (plain, quantized) from a block file, refusing anything that does not fit the live block."""
    plain, quantized = {}, {}
    params = dict(block.named_parameters())
    for name in plain_names:
        t = tensors.get(f"plain/{name}")
        if name in params and (t is None or tuple(t.shape) != tuple(params[name].shape)
                               or not torch.isfinite(_stored(t)).all()):
            raise StateMismatch(f"plain tensor {name}")
        if t is not None:
            plain[name] = t
    for rel in linears:
        w = params[f"{rel}.weight"]
        n, k = w.shape
        ng = scheme.groups(k)
        q, s, z = (tensors.get(f"q/{rel}/{f}") for f in ("q", "scale", "zero"))
        if (q is None or s is None or z is None or tuple(q.shape) != (n, k) or tuple(s.shape) != (n, ng)
                or tuple(z.shape) != (n, ng) or not _within(q, scheme.maxq) or not _within(z, scheme.maxq)
                or not (torch.isfinite(_stored(s)) & (_stored(s) > 0)).all()):   # 0 or -1 went in too (S42)
            raise StateMismatch(f"quantized linear {rel}")
        idx, ow = tensors.get(f"q/{rel}/outlier_idx"), tensors.get(f"q/{rel}/outlier_weight")
        if (idx is None) != (ow is None) or (idx is not None and (
                idx.dim() != 1 or idx.is_floating_point() or tuple(ow.shape) != (n, len(idx))
                or not torch.isfinite(_stored(ow)).all() or not _within(idx, k - 1))):
            raise StateMismatch(f"outlier columns of {rel}")
        quantized[rel] = QuantizedWeight(q, s, z, scheme, idx, ow)
    return plain, quantized


class ResumeState:
    """Per-block results and the latest streams under `state_dir` (None: not resumable)."""

    def __init__(self, state_dir, fp: str, notify=print):
        self.dir = Path(state_dir) if state_dir else None
        self.fp = fp
        self.notify = notify
        if self.dir is None:
            return
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            raise EdgequantError(f"{self.dir} is not a folder of saved OmniQuant progress; remove it")
        if (self.dir / META).is_symlink():
            self.discard(f"{META} is a link, not a file this tool saved")
        elif self.dir.exists() and self._stored_fingerprint() != fp:
            self.discard("it belongs to another run (model, data, scheme or settings differ)")
        # the folder is made with the first finished block: a run refused or stopped before it leaves none behind

    def _stored_fingerprint(self):
        try:
            if not (self.dir / META).is_file():   # a FIFO would block the read (see `_load`)
                return None
            meta = json.loads((self.dir / META).read_text())
            return meta.get("fingerprint") if isinstance(meta, dict) and meta.get("version") == STATE_VERSION else None
        except (OSError, ValueError):
            return None

    def discard(self, why: str):
        if self.dir is not None and self.dir.exists():
            self.notify(f"note: starting over: the saved progress in {self.dir} was not used ({why})")
            shutil.rmtree(self.dir, ignore_errors=True)

    def load(self, layers, scheme: QuantScheme, linears, plain_names):
        """(next block, q stream, fp stream, [(plain, quantized, record)] of the finished blocks), or None."""
        if self.dir is None or not (self.dir / STREAMS).exists():
            return None
        try:
            streams, rec = _load(self.dir / STREAMS)
            nxt = rec.get("next")
            if rec.get("fingerprint") != self.fp or not isinstance(nxt, int) or not 0 < nxt <= len(layers):
                raise StateMismatch("streams record")
            if (set(streams) != {"q", "fp"} or streams["q"].shape != streams["fp"].shape
                    or not all(t.is_floating_point() and torch.isfinite(t).all() for t in streams.values())):
                # a NaN there made every rerun fail with a loss of nan (sixteenth re-run, L7)
                raise StateMismatch("streams tensors")
            blocks = []
            for i in range(nxt):
                tensors, brec = _load(self.dir / f"block_{i:04d}.safetensors")
                if brec.get("fingerprint") != self.fp or not _record_fits(brec, i):
                    raise StateMismatch(f"block {i} record")
                plain, quantized = _check_block(tensors, layers[i], scheme, linears, plain_names)
                blocks.append((plain, quantized, brec))
        except (StateMismatch, OSError) as e:
            self.discard(f"damaged or not of this run: {e}")
            return None
        return nxt, streams["q"], streams["fp"], blocks

    def save(self, i, plain, quantized, record: dict, q_hidden, fp_hidden):
        if self.dir is None:
            return
        try:
            if not (self.dir / META).exists():
                self.dir.mkdir(parents=True, exist_ok=True)
                (self.dir / META).write_text(json.dumps({"fingerprint": self.fp, "version": STATE_VERSION}))
            # block first, then the streams that point past it: an interruption between the two only repeats block i
            _save(_block_tensors(plain, quantized), {**record, "fingerprint": self.fp},
                  self.dir / f"block_{i:04d}.safetensors")
            _save({"q": q_hidden, "fp": fp_hidden}, {"fingerprint": self.fp, "next": i + 1}, self.dir / STREAMS)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            oe = as_os_error(e)
            if oe is None:
                raise
            if i:
                kept = f"the {i} finished block(s) saved there are kept: rerunning the same command continues from them"
            else:
                kept = "nothing was kept"
                shutil.rmtree(self.dir, ignore_errors=True)
            raise EdgequantError(f"cannot save OmniQuant's progress in {self.dir} ({oe.strerror or oe}); free some "
                                 f"space or choose another output folder ({kept}; no output was written)") from None
