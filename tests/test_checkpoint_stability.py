"""Checkpoint bytes and export weights stay the same across refactors: each tiny checkpoint below is rebuilt and the
sha256 of its tensors and config is compared with `checkpoint_hashes.json`, recorded from the code before the
restructuring of issue 12; the weights a cpu DIST would hold are compared the same way, without compiling.

`python tests/test_checkpoint_stability.py OUT` rebuilds the checkpoints into OUT and rewrites the JSON (only when a
format change is intended, said so in the commit).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

HASHES = Path(__file__).with_name("checkpoint_hashes.json")
HASHED = ("config.json", "model.safetensors")   # tokenizer files and edgequant.json (timings) are not the format
CASES = {   # name -> (arch, quantize options); together: every method, 2/3/4 bits, sym/asym, per channel, LET, biases
    "rtn-w2-sym": ("llama", dict(method="rtn", bits=2, group_size=-1, sym=True)),
    "gptq-w4g32": ("llama", dict(method="gptq", bits=4, group_size=32)),
    "owq-w3g32": ("qwen2", dict(method="owq", bits=3, group_size=32, weak_columns=2)),
    # keep_best (on by default since issue 11) may keep a block's start over its trained parameters: off here, so the
    # bytes are those of the same training as before the restructuring
    "omniquant-w3g32-let": ("llama", dict(method="omniquant", bits=3, group_size=32, epochs=1, let=True,
                                          keep_best=False)),
    "omniquant-w4g32-qwen2": ("qwen2", dict(method="omniquant", bits=4, group_size=32, epochs=1, let=True,
                                            keep_best=False)),
}
# outliers, 3-bit bit planes (CUDA's int8 layout; the cpu target's bytes3 has round-trip tests), q/k/v biases
DIST_CASE, DIST_PACKING3 = "owq-w3g32", "planes3"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(case: str, model_dir: Path, calib: str, out: Path) -> Path:
    from edgequant import api
    _, opts = CASES[case]
    data = {} if opts["method"] == "rtn" else dict(calib=calib, nsamples=4, seqlen=64)
    return api.quantize(str(model_dir), out, **data, **opts, progress=False)


def file_hashes(ck: Path) -> dict[str, str]:
    return {n: _sha((ck / n).read_bytes()) for n in HASHED}


def dist_weight_hashes(ck: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each array the DIST's tensor cache holds for `names` (the export's weight source, no compiler)."""
    import numpy as np
    from edgequant.export.params import open_source
    return {n: _sha(np.ascontiguousarray(a).tobytes()) for n, a in open_source(ck, DIST_PACKING3).arrays(names)}


@pytest.fixture(scope="module")
def recorded():
    return json.loads(HASHES.read_text())


@pytest.fixture(scope="module")
def built(model_dirs, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("stability")
    return {case: build(case, model_dirs[arch], text_file, root / case) for case, (arch, _) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_bytes_unchanged(built, recorded, case):
    assert file_hashes(built[case]) == recorded["checkpoints"][case]


def test_dist_weights_unchanged(built, recorded):
    ref = recorded["dist"][DIST_CASE]
    assert dist_weight_hashes(built[DIST_CASE], list(ref)) == ref


if __name__ == "__main__":   # record: python tests/test_checkpoint_stability.py OUT
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import CALIB, make_tiny_model, make_tokenizer
    root = Path(sys.argv[1])
    tok = make_tokenizer()
    dirs = {}
    for arch in ("llama", "qwen2"):
        dirs[arch] = root / f"tiny-{arch}"
        make_tiny_model(arch).save_pretrained(dirs[arch])
        tok.save_pretrained(dirs[arch])
    rec = {"checkpoints": {}, "dist": {}}
    for case, (arch, _) in CASES.items():
        ck = build(case, dirs[arch], str(CALIB), root / case)
        rec["checkpoints"][case] = file_hashes(ck)
    from edgequant.export.api import export   # the DIST's own shard bytes are the reference, not the source's
    dist = export(root / DIST_CASE, "cpu", root / f"{DIST_CASE}-cpu", progress=False)
    cache = json.loads((dist / "tensor-cache.json").read_text())
    for shard in cache["records"]:
        data = (dist / shard["dataPath"]).read_bytes()
        for r in shard["records"]:
            rec["dist"].setdefault(DIST_CASE, {})[r["name"]] = _sha(data[r["byteOffset"]:r["byteOffset"] + r["nbytes"]])
    HASHES.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    print(json.dumps(rec["checkpoints"], indent=1))
