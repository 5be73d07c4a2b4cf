"""`edgequant report`: PNGs of perplexity vs bits per weight from tiny checkpoints (computed with --data, or
recorded by `eval --record`) and from the saved benchmark tables."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgequant.cli import main

pytest.importorskip("matplotlib")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def png_size(path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def checkpoints(model_dirs, owq_checkpoint, tmp_path_factory):
    from edgequant import api
    rtn = api.quantize(str(model_dirs["llama"]), tmp_path_factory.mktemp("rtn") / "rtn", method="rtn", bits=3,
                       group_size=32, progress=False)
    return [rtn, owq_checkpoint]


def test_report_from_checkpoints_with_data(checkpoints, model_dirs, text_file, tmp_path):
    out = tmp_path / "r" / "report.png"
    r = CliRunner().invoke(main, ["report", *map(str, checkpoints), "--data", text_file, "--seqlen", "64",
                                  "--max-windows", "2", "--baseline", str(model_dirs["llama"]), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert png_size(out) == (800, 500) and out.stat().st_size > 10_000
    lines = r.output.splitlines()
    assert lines[0].startswith("rtn ") and f"(computed: {Path(text_file).name}, 2x64)" in lines[0]
    assert lines[1].startswith("owq ") and "w4g32" in lines[1]
    assert any(ln.startswith("baseline") and "(computed)" in ln for ln in lines)


def test_report_uses_recorded_perplexity(checkpoints, text_file, tmp_path):
    import shutil
    ck = tmp_path / "rtn"
    shutil.copytree(checkpoints[0], ck)
    r = CliRunner().invoke(main, ["report", str(ck), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and "no perplexity recorded" in r.output and "--data" in r.output
    r = CliRunner().invoke(main, ["eval", str(ck), "--data", text_file, "--seqlen", "64", "--max-windows", "2",
                                  "--record", "--json", "-q"])
    assert r.exit_code == 0, r.output
    ppl = json.loads(r.output)["perplexity"]
    rec = json.loads((ck / "edgequant.json").read_text())["evaluations"][-1]
    assert rec["perplexity"] == ppl and rec["windows"] == 2 and rec["seqlen"] == 64
    r = CliRunner().invoke(main, ["report", str(ck), "-o", str(tmp_path / "x.png"), "--baseline", "12.5"])
    assert r.exit_code == 0, r.output
    assert f"y {ppl:.3f}" in r.output and "(recorded: " in r.output and png_size(tmp_path / "x.png") == (800, 500)


def test_report_renders_saved_tables(tmp_path):
    out = tmp_path / "t.png"
    r = CliRunner().invoke(main, ["report", "--results", str(RESULTS / "quality-cpu.md"), "--results",
                                  str(RESULTS / "quality-omniquant-cuda.rows.json"), "-o", str(out), "--max-y", "200"])
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.output.splitlines() if ln.startswith(("gptq", "owq", "omniquant"))]
    assert len(rows) == 2 + 4 and any("y 30.840" in ln for ln in rows)   # quality-cpu.md: owq 30.84 (2 decimals)
    assert png_size(out) == (800, 500)
    # any two numeric columns of a table, e.g. decode speed against weight size
    r = CliRunner().invoke(main, ["report", "--results", str(RESULTS / "decode_cpu.json"), "--x", "weight_bytes",
                                  "--y", "decode_128", "-o", str(tmp_path / "d.png")])
    assert r.exit_code == 0 and png_size(tmp_path / "d.png") == (800, 500), r.output
    r = CliRunner().invoke(main, ["report", "--results", str(RESULTS / "decode_cpu.json"), "-o", str(out)])
    assert r.exit_code == 1 and "has no column bits_per_weight, perplexity" in r.output and "--x and --y" in r.output
    r = CliRunner().invoke(main, ["report", "-o", str(out)])
    assert r.exit_code == 1 and "give checkpoints" in r.output
