"""Targets: the preset table, error messages, the DIST folder's contents, and mobile libraries (iphone: Mach-O arm64,
android: ELF aarch64) carrying their device code and system-lib prefix symbols. Nothing here needs a device."""
from __future__ import annotations

import json
import platform
import struct
import tarfile

import pytest

from edgequant.errors import EdgequantError

pytestmark = pytest.mark.tvm

PREFIX = "tinyq_"


@pytest.fixture(scope="module")
def checkpoint(model_dirs, tmp_path_factory):
    from edgequant import api
    out = tmp_path_factory.mktemp("q") / "q"
    return api.quantize(str(model_dirs["llama"]), str(out), method="rtn", bits=4, group_size=32, progress=False)


@pytest.fixture(scope="module")
def cpu_dist(checkpoint, tmp_path_factory):
    """Exported through the CLI, as a user would."""
    from click.testing import CliRunner
    from edgequant.cli import main
    dist = tmp_path_factory.mktemp("dist") / "dist"
    r = CliRunner().invoke(main, ["export", str(checkpoint), "--target", "cpu", "-o", str(dist), "-q"])
    assert r.exit_code == 0, r.output
    return dist


def test_unknown_target_lists_valid_ones(checkpoint, tmp_path):
    from edgequant.export.api import export
    from edgequant.export.targets import target_names
    with pytest.raises(EdgequantError) as e:
        export(checkpoint, "tpu", tmp_path / "d", progress=False)
    for name in target_names():
        assert name in str(e.value)
    assert {"cpu", "cpu-arm64", "cuda", "metal", "iphone", "android", "webgpu"} <= set(target_names())


def test_missing_and_damaged_checkpoints_are_refused(checkpoint, tmp_path):
    from edgequant.export.api import export
    with pytest.raises(EdgequantError, match="not found"):
        export(tmp_path / "nope", "cpu", tmp_path / "d", progress=False)
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(EdgequantError, match="truncated"):
        export(bad, "cpu", tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def _macho_arm64(data: bytes) -> bool:
    magic, cputype = struct.unpack_from("<II", data)
    return magic == 0xFEEDFACF and cputype == 0x0100000C      # MH_MAGIC_64, CPU_TYPE_ARM64


def _elf_aarch64(data: bytes) -> bool:
    return data[:4] == b"\x7fELF" and data[4] == 2 and struct.unpack_from("<H", data, 18)[0] == 183  # EM_AARCH64


def _macho_platform(data: bytes) -> int | None:
    """LC_BUILD_VERSION's platform (2 iOS, 7 iOS simulator), None without one; what Xcode sorts XCFramework slices by."""
    ncmds = struct.unpack_from("<I", data, 16)[0]
    off = 32
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", data, off)
        if cmd == 0x32:
            return struct.unpack_from("<I", data, off + 8)[0]
        off += size
    return None


def _macho_arm64_simulator(data: bytes) -> bool:
    return _macho_arm64(data) and _macho_platform(data) == 7


def _macho_arm64_ios(data: bytes) -> bool:
    return _macho_arm64(data) and _macho_platform(data) == 2


@pytest.mark.parametrize("target,is_arch,kernel_marker,app", [("iphone", _macho_arm64_ios, b"kernel void", "apps/ios"),
                                                              ("iphone-sim", _macho_arm64_simulator, b"kernel void",
                                                               "apps/ios"),
                                                              ("android", _elf_aarch64, b"__kernel", "apps/android")])
def test_mobile_library_objects(checkpoint, tmp_path, target, is_arch, kernel_marker, app):
    """Exported through the CLI, which points to the app recipe; `run` on the result says where it runs instead."""
    from click.testing import CliRunner
    from edgequant.cli import main
    dist = tmp_path / target
    r = CliRunner().invoke(main, ["export", str(checkpoint), "--target", target, "-o", str(dist),
                                  "--system-lib-prefix", PREFIX, "-q"])
    assert r.exit_code == 0, r.output
    assert f"{app}/README.md" in r.output
    r = CliRunner().invoke(main, ["run", str(dist), "--prompt", "Hi"])
    assert r.exit_code == 1 and f"was exported for {target}" in r.output and f"{app}/README.md" in r.output
    assert "'metal'" not in r.output and "'opencl'" not in r.output and "Traceback" not in r.output
    info = json.loads((dist / "edgequant-export.json").read_text())
    assert info["system_lib_prefix"] == PREFIX and info["library"] == "lib.tar"
    with tarfile.open(dist / "lib.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    assert members and all(is_arch(d) for d in members.values()), list(members)
    host = [d for d in members.values() if b"__tvm_ffi_" + PREFIX.encode() + b"batch_decode_paged_kv" in d]
    device = [d for d in members.values() if kernel_marker in d]
    assert host, "host object lacks the prefixed function symbols"
    assert device and any(PREFIX.encode() + b"__tvm_ffi__library_bin" in d for d in device), \
        "device code or the prefixed library blob symbol is missing"
    for name in ("tensor-cache.json", "mlc-chat-config.json", "tokenizer.json"):
        assert (dist / name).is_file()


def test_dist_folder_contents_and_cli(cpu_dist, tmp_path):
    """The CLI journey on the cpu target: export (fixture), run, bench, and a clear error for a missing folder."""
    from click.testing import CliRunner
    from edgequant.cli import main
    dist = cpu_dist
    info = json.loads((dist / "edgequant-export.json").read_text())
    for key in ("target", "tvm_version", "functions", "params", "weight_bytes", "build_time_s"):
        assert key in info
    assert {"embed", "prefill", "decode", "create_paged_kv_cache", "_metadata"} <= set(info["functions"])
    cache = json.loads((dist / "tensor-cache.json").read_text())
    stored = {rec["name"] for shard in cache["records"] for rec in shard["records"]}
    assert stored == {p["name"] for p in info["params"]}
    assert any((dist / f).name.startswith("params_shard_") for f in dist.iterdir())
    r = CliRunner().invoke(main, ["run", str(dist), "--prompt", "The quick brown", "--max-new-tokens", "5",
                                  "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert len(res["tokens"]) >= 1 and res["decode_tokens_per_s"] >= 0
    r = CliRunner().invoke(main, ["bench", str(dist), "--prompt-lengths", "8,16", "--decode-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    b = json.loads(r.output[r.output.index("{"):])
    assert [row["prompt_tokens"] for row in b["rows"]] == [8, 16] and b["weight_bytes"] > 0
    mem = b["memory"]   # the plan at the runner's KV length: the same KV bytes the runner reports
    assert mem["weights_bytes"] == b["weight_bytes"] and mem["kv_bytes"] == b["kv_cache_bytes"]
    r = CliRunner().invoke(main, ["bench", str(dist), "--prompt-lengths", "8", "--decode-tokens", "2", "--context", "64"])
    assert r.exit_code == 0 and "memory plan" in r.output and "at 64 tokens of context" in r.output, r.output
    r = CliRunner().invoke(main, ["run", str(tmp_path / "missing"), "--prompt", "x"])
    assert r.exit_code == 1 and "not an exported model folder" in r.output


def test_eval_of_a_dist_matches_pytorch(checkpoint, cpu_dist, text_file):
    """A DIST evaluated through the TVM runtime agrees with the PyTorch perplexity of its checkpoint."""
    from edgequant import api
    from edgequant.export.api import evaluate as evaluate_dist
    got = evaluate_dist(cpu_dist, text_file, seqlen=128, max_windows=2, progress=False)
    want = api.evaluate(checkpoint, text_file, seqlen=128, max_windows=2, progress=False)
    assert got["tokens"] == want["tokens"]
    assert abs(got["perplexity"] / want["perplexity"] - 1) < 5e-3


def test_cpu_arm64_objects(checkpoint, tmp_path):
    """cpu-arm64: ELF aarch64 code, as a shared library where an aarch64 linker exists, else as objects."""
    from edgequant.export.api import export
    dist = export(checkpoint, "cpu-arm64", tmp_path / "a64", progress=False)
    info = json.loads((dist / "edgequant-export.json").read_text())
    lib = dist / info["library"]
    if lib.suffix == ".tar":
        with tarfile.open(lib) as tf:
            blobs = [tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()]
        assert info["link_note"]
    else:
        blobs = [lib.read_bytes()]
    assert blobs and all(_elf_aarch64(b) for b in blobs)
    # `run` here (x86-64) names the target and where it runs, not a damaged library (the shared library exists;
    # dlopen calls an aarch64 object "cannot open")
    if platform.machine() in ("aarch64", "arm64"):
        return
    from click.testing import CliRunner
    from edgequant.cli import main
    r = CliRunner().invoke(main, ["run", str(dist), "--prompt", "Hi", "--max-new-tokens", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "was exported for cpu-arm64" in r.output and "aarch64" in r.output and "damaged" not in r.output


def test_chat_ends_cleanly_at_end_of_input_and_reads_pipes(cpu_dist):
    """Piped lines are messages; end of input ends the chat with exit 0 and no 'Aborted!'."""
    from click.testing import CliRunner
    from edgequant.cli import main
    args = ["chat", str(cpu_dist), "--max-new-tokens", "4", "--temperature", "0"]
    r = CliRunner().invoke(main, args, input="The quick brown\nfox jumps\n")
    assert r.exit_code == 0, r.output
    assert "Aborted" not in r.output and "error" not in r.output
    assert r.output.count("tok/s]") == 2           # both piped lines were answered
    r = CliRunner().invoke(main, args, input="")
    assert r.exit_code == 0 and "Aborted" not in r.output


def test_chat_ctrl_c_stops_a_reply_then_ends(cpu_dist, monkeypatch):
    from edgequant.export import api
    from edgequant.export.runtime import Runner
    lines, out = iter(["hello"]), []

    def read(prompt):
        line = next(lines, None)
        if line is None:
            raise KeyboardInterrupt  # Ctrl-C at the prompt
        return line

    real = Runner.generate

    def interrupted(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt      # Ctrl-C while the reply streams

    monkeypatch.setattr(Runner, "generate", interrupted)
    api.chat(cpu_dist, max_new_tokens=4, read=read, write=lambda s="", **k: out.append(s))   # returns, no raise
    assert "[reply stopped]" in out
