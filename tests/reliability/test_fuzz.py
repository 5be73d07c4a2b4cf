"""Random byte flips (fixed seed, bounded count) in a checkpoint's safetensors header and in a DIST's
tensor-cache.json: every run either works or stops with one `error:` line; never a traceback or a crash."""
from __future__ import annotations

import random

from .conftest import copy_case
from .harness import run_commands

FLIPS = 24


def _flip(path, lo, hi, rng, n=2):
    b = bytearray(path.read_bytes())
    for _ in range(n):
        i = rng.randrange(lo, hi)
        b[i] = rng.choice([rng.randrange(256), ord("9"), ord("-"), ord("."), ord('"'), ord("/")])
    path.write_bytes(bytes(b))


def _check(results):
    bad = []
    for r in results:
        lines = [x for x in r["stderr"].splitlines() if x.strip()]
        ok = r["traceback"] is None and (
            r["rc"] == 0 or (r["rc"] in (1, 2) and len(lines) == 1 and lines[0].startswith("error: ")))
        if not ok:
            bad.append((r["argv"][1], r["rc"], r["stderr"][-500:], (r["traceback"] or "")[-800:]))
    assert not bad, bad


def test_checkpoint_header_fuzz(good_ckpt, tmp_path):
    rng = random.Random(1234)
    argvs = []
    for i in range(FLIPS):
        d = copy_case(good_ckpt, tmp_path, f"f{i}")
        f = d / "model.safetensors"
        n = int.from_bytes(f.read_bytes()[:8], "little")
        _flip(f, 8, 8 + n, rng)
        argvs.append(["inspect", str(d), "--json"])
    _check(run_commands(argvs, tmp_path))


def test_tensor_cache_fuzz(good_dist, tmp_path):
    rng = random.Random(4321)
    argvs = []
    for i in range(FLIPS):
        d = copy_case(good_dist, tmp_path, f"f{i}")
        f = d / "tensor-cache.json"
        _flip(f, 0, f.stat().st_size, rng)
        argvs.append(["run", str(d), "--prompt", "hi", "--max-new-tokens", "2"])
    _check(run_commands(argvs, tmp_path))
