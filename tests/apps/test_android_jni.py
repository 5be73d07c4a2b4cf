"""apps/android's JNI glue (edgequant/src/main/cpp/edgequant_jni.cc), compiled here against the JDK's jni.h and the
x86-64 build of apps/runtime, and called from a small Java harness whose `ai.edgequant.Native` declares the same
native methods as the Kotlin `object Native` (@JvmStatic externals have the same JNI names and signatures): greedy
tokens equal the C API's, memory numbers arrive, and runtime failures become EdgequantException with the status.
Kotlin, Gradle and the NDK are not here: the module itself is not built (apps/android/README.md)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from .runtime_capi import ROOT

GLUE = ROOT / "apps" / "android" / "edgequant" / "src" / "main" / "cpp" / "edgequant_jni.cc"

NATIVE_JAVA = """package ai.edgequant;
final class Native {
    static { System.load(System.getProperty("edgequant.jni")); }
    static native long open(String dist, String systemLibPrefix, int maxTotalSeqLen);
    static native void prefill(long handle, int[] ids);
    static native int decode(long handle, float temperature, float topP);
    static native void reset(long handle, long seed);
    static native long[] info(long handle);
    static native String device(long handle);
    static native void close(long handle);
}
"""
EXCEPTION_JAVA = """package ai.edgequant;
public class EdgequantException extends RuntimeException {
    public final int status;
    public EdgequantException(int status, String message) { super(message); this.status = status; }
}
"""
HARNESS_JAVA = """package ai.edgequant;
public final class Harness {
    public static void main(String[] a) {
        long h = Native.open(a[0], null, 0);
        int n = Integer.parseInt(a[1]);
        int[] ids = new int[a.length - 2];
        for (int i = 0; i < ids.length; i++) ids[i] = Integer.parseInt(a[i + 2]);
        Native.prefill(h, ids);
        StringBuilder sb = new StringBuilder("tokens");
        for (int i = 0; i < n; i++) sb.append(' ').append(Native.decode(h, 0f, 1f));
        System.out.println(sb);
        long[] info = Native.info(h);
        System.out.println("info " + info[3] + " " + info[4] + " " + info[5] + " " + Native.device(h));
        try { Native.prefill(h, new int[] {-1}); } catch (EdgequantException e) { System.out.println("bad-id " + e.status); }
        Native.close(h);
        try { Native.open(a[0] + "/missing", null, 0); } catch (EdgequantException e) { System.out.println("missing " + e.status); }
        try { Native.decode(0L, 0f, 1f); } catch (EdgequantException e) { System.out.println("closed " + e.status); }
    }
}
"""


@pytest.fixture(scope="module")
def jdk():
    javac = shutil.which("javac")
    if javac is None:
        pytest.skip("no JDK (javac) installed: run .ci/install-gpu-sw.sh (default-jdk-headless)")
    home = Path(javac).resolve().parents[1]
    if not (home / "include" / "jni.h").is_file():
        pytest.skip(f"{home} has no include/jni.h (a JRE, not a JDK)")
    return home


def test_jni_glue_runs_the_c_api(jdk, runtime_build, cpu_dist, capi, tmp_path):
    lib = tmp_path / "libedgequant_jni.so"
    cmd = ["g++", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(lib), str(GLUE),
           f"-I{jdk / 'include'}", f"-I{jdk / 'include' / 'linux'}", f"-I{ROOT / 'apps' / 'runtime' / 'include'}",
           f"-L{runtime_build}", "-ledgequant_runtime", f"-Wl,-rpath,{runtime_build}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    src = tmp_path / "src" / "ai" / "edgequant"
    src.mkdir(parents=True)
    for name, text in (("Native", NATIVE_JAVA), ("EdgequantException", EXCEPTION_JAVA), ("Harness", HARNESS_JAVA)):
        (src / f"{name}.java").write_text(text)
    classes = tmp_path / "classes"
    r = subprocess.run([str(jdk / "bin" / "javac"), "-d", str(classes), *map(str, src.glob("*.java"))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ids, n = [1, 9, 40, 7, 3], 12
    r = subprocess.run([str(jdk / "bin" / "java"), f"-Dedgequant.jni={lib}", "-cp", str(classes),
                        "ai.edgequant.Harness", str(cpu_dist), str(n), *map(str, ids)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())

    s, h = capi.open(cpu_dist)
    assert s == 0, capi.error()
    try:
        want = capi.generate(h, ids, n)
        info = capi.info(h)
    finally:
        capi.lib.edgequant_close(h)
    assert [int(t) for t in lines["tokens"].split()] == want
    seq_len, weight_bytes, kv_bytes, device = lines["info"].split()
    # n decodes after the prompt feed n - 1 of their tokens (apps/runtime/include/edgequant_runtime.h)
    assert (int(seq_len), int(weight_bytes), int(kv_bytes), device) == (len(ids) + n - 1, info.weight_bytes,
                                                                         info.kv_cache_bytes, "cpu")
    assert lines["bad-id"] == "1" and lines["missing"] == "2" and lines["closed"] == "6"
