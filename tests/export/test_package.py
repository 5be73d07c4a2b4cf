"""`edgequant package CONFIG`: two models (the tiny OWQ checkpoint under two ids and prefixes) for the android target
go into one bundle: one static library holding both models' objects and prefixed symbols, one weights folder per
model that passes the DIST checks (packed zero points included), and an app config with prefixes and memory
estimates. Config errors are one line each and write nothing."""
from __future__ import annotations

import json

import pytest

from edgequant.errors import EdgequantError

pytestmark = pytest.mark.tvm


def _gnu_armap(data: bytes) -> bytes:
    """The symbol table member of a GNU/SysV ar archive (its first member, named '/')."""
    assert data[:8] == b"!<arch>\n"
    name, size = data[8:24].strip(), int(data[8 + 48:8 + 58].strip())
    assert name == b"/", name
    return data[68:68 + size]


def test_package_two_models_for_android(owq_checkpoint, tmp_path):
    from click.testing import CliRunner

    from edgequant.cli import main
    from edgequant.export.dist import check_tensor_cache, read_export_info
    cfg = tmp_path / "app.json"
    cfg.write_text(json.dumps({"output": "bundle", "targets": ["android"], "models": [
        {"checkpoint": str(owq_checkpoint), "id": "tiny-a", "max_total_seq_len": 100},
        {"checkpoint": str(owq_checkpoint), "id": "tiny-b", "system_lib_prefix": "tb_"}]}))
    r = CliRunner().invoke(main, ["package", str(cfg), "-q"])
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "bundle"
    app = json.loads((bundle / "edgequant-app-config.json").read_text())
    assert [(m["id"], m["system_lib_prefix"]) for m in app["models"]] == [("tiny-a", "tiny_a_"), ("tiny-b", "tb_")]

    lib = bundle / "lib" / "android" / "libedgequant_models.a"
    data = lib.read_bytes()
    armap = _gnu_armap(data)
    for prefix in (b"tiny_a_", b"tb_"):
        assert b"__tvm_ffi_" + prefix + b"batch_decode_paged_kv" in armap
        assert prefix + b"__tvm_ffi__library_bin" in armap
    objects = app["targets"]["android"]["objects"]
    assert {o.split("_", 1)[0] for o in objects} == {"tiny-a", "tiny-b"} and len(set(objects)) == len(objects)
    for o in objects:
        assert o.encode() in data

    for m in app["models"]:
        t = m["targets"]["android"]
        w = bundle / t["weights"]
        info = read_export_info(w)
        check_tensor_cache(w, info)   # the runtime's checks, with zero points four per uint32 word
        assert not (w / "lib.tar").exists() and info["zeros_packed"] and info["system_lib_prefix"] == \
            m["system_lib_prefix"]
        layer = info["model"]
        kv_tokens = min(layer["context_window"], 100 if m["id"] == "tiny-a" else 4096)
        kv = 2 * layer["num_layers"] * layer["num_kv_heads"] * layer["head_dim"] * kv_tokens * 2
        assert (t["kv_cache_tokens"], t["kv_cache_bytes"]) == (kv_tokens, kv)
        assert t["estimated_memory_bytes"] == info["weight_bytes"] + kv and t["device"] == "opencl"


@pytest.mark.parametrize("config,message", [
    ({"targets": ["cpu"], "models": [{"checkpoint": "q", "id": "a"}]}, "builds a shared library"),
    ({"targets": ["tpu"], "models": [{"checkpoint": "q", "id": "a"}]}, "unknown target 'tpu'"),
    ({"targets": ["android"], "models": []}, "non-empty list"),
    ({"targets": ["android"], "models": [{"checkpoint": "q", "id": "a/b"}]}, "letters, digits"),
    ({"targets": ["android"], "models": [{"checkpoint": "q", "id": "a"}, {"checkpoint": "q", "id": "a"}]},
     "repeats the id"),
    ({"targets": ["android"], "models": [{"checkpoint": "q", "id": "a", "system_lib_prefix": "1x"}]},
     "C identifier"),
    ({"targets": ["android"], "models": [{"checkpoint": "missing", "id": "a"}]}, "checkpoint not found"),
    ({"targets": ["android"], "modles": []}, "unknown keys"),
    # the fourth hostile re-run: 2**62 was capped silently and 0 taken as the default
    ({"targets": ["android"], "models": [{"checkpoint": "q", "id": "a", "max_total_seq_len": 2 ** 62}]},
     "max_total_seq_len is 4611686018427387904; it must be a positive integer"),
    ({"targets": ["android"], "models": [{"checkpoint": "q", "id": "a", "max_total_seq_len": 0}]},
     "max_total_seq_len is 0"),
])
def test_bad_configs_are_one_line_errors(tmp_path, config, message):
    from edgequant.export.package import package
    cfg = tmp_path / "app.json"
    cfg.write_text(json.dumps(config))
    with pytest.raises(EdgequantError, match=message) as e:
        package(cfg, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "dist-bundle").exists()


def test_config_that_is_not_json(tmp_path):
    from edgequant.export.package import package
    cfg = tmp_path / "app.json"
    cfg.write_text("{targets: [")
    with pytest.raises(EdgequantError, match="not valid JSON"):
        package(cfg, progress=False)


def test_config_nested_too_deeply(tmp_path):
    """100,000 nested lists were a RecursionError traceback (the fourth re-run's T7)."""
    from edgequant.export.package import package
    cfg = tmp_path / "app.json"
    cfg.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(EdgequantError, match="not valid JSON") as e:
        package(cfg, progress=False)
    assert "\n" not in str(e.value)


def test_an_interrupted_package_leaves_nothing_and_claims_no_output(owq_checkpoint, tmp_path, monkeypatch):
    """Killed mid-run, `package` left every model exported so far in the system's temp folder, which no later run
    removed (eighteenth re-run, L9); Ctrl-C after the first model named that model's folder as "the new, complete
    output" (U7). The exports now live in the output's own temporary folder and are nobody's output."""
    import tempfile

    from edgequant import atomic
    from edgequant.cli import interrupted_note
    from edgequant.export import build
    from edgequant.export.package import package
    cfg = tmp_path / "app.json"
    cfg.write_text(json.dumps({"output": "bundle", "targets": ["android"], "models": [
        {"checkpoint": str(owq_checkpoint), "id": f"m{i}"} for i in range(2)]}))
    real, exported = build.export_model, []

    def export_model(checkpoint, target, out, **kw):
        if exported:
            raise KeyboardInterrupt
        exported.append(real(checkpoint, target, out, **kw))
        return exported[-1]
    monkeypatch.setattr(build, "export_model", export_model)
    monkeypatch.setattr(atomic, "_written", [])   # the outputs the fixtures put in place in this process
    systemp = tmp_path.parent / f"{tmp_path.name}-systemp"   # the system's temp folder, for this test alone
    systemp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systemp))
    with pytest.raises(KeyboardInterrupt):
        package(cfg, progress=False)
    inside = exported[0].relative_to(tmp_path).parts[0]
    assert inside.startswith(".bundle.tmp-"), exported[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.json"]
    assert list(systemp.iterdir()) == []
    assert interrupted_note("nothing was written") == "nothing was written"


def test_a_package_that_cannot_fit_names_its_output(owq_checkpoint, tmp_path, monkeypatch):
    """The space check's line named the hidden per-model export folder inside `.bundle.tmp-*/.exports`, gone by
    the time the user reads it, and not the output it asks to move (nineteenth re-run, U13)."""
    import shutil as sh

    from edgequant.export import build
    from edgequant.export.package import package
    cfg = tmp_path / "app.json"
    cfg.write_text(json.dumps({"output": "bundle", "targets": ["android"], "models": [
        {"checkpoint": str(owq_checkpoint), "id": "tiny"}]}))
    monkeypatch.setattr(build.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(1 << 30, 1 << 30, 5 << 20))
    with pytest.raises(EdgequantError) as e:
        package(cfg, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"not enough space to write {tmp_path / 'bundle'} (model tiny, target android):"), msg
    assert ".exports" not in msg and ".tmp-" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.json"]
