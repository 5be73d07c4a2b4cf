#!/usr/bin/env bash
# Installs what the aarch64 runtime test (tests/apps/test_runtime_aarch64.py) needs: Debian's aarch64 cross compiler
# and objdump, and qemu user-mode emulator (apt), and the TVM runtime libraries for aarch64 taken from the apache-tvm /
# apache-tvm-ffi wheels on PyPI (downloaded and unpacked, never installed: they are another architecture).
#
# Idempotent and quick once done (the test calls it too); each step that fails prints one line on stderr and the
# script goes on, so the test can skip with that line as its reason.
# The libraries land in ${EDGEQUANT_CACHE:-~/.cache/edgequant}/aarch64-tvm/{tvm,tvm_ffi}/lib.
set -uo pipefail
PY=${PYTHON:-python3}
CACHE=${EDGEQUANT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgequant}
DEST=$CACHE/aarch64-tvm

missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v aarch64-linux-gnu-objdump >/dev/null || missing+=(binutils-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || command -v qemu-aarch64 >/dev/null || missing+=(qemu-user-static)
command -v cmake >/dev/null || missing+=(cmake)
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"   # never prompt: a test may call this
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/edgequant-apt.log 2>&1; then
    echo "install-cross: apt-get install ${missing[*]} failed (see /tmp/edgequant-apt.log)" >&2
  fi
fi

# the aarch64 wheels of exactly the TVM this environment exports with
TVM_V=$($PY -c "import importlib.metadata as m; print(m.version('apache-tvm'))" 2>/dev/null)
FFI_V=$($PY -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))" 2>/dev/null)
if [ -z "$TVM_V" ] || [ -z "$FFI_V" ]; then
  echo "install-cross: apache-tvm / apache-tvm-ffi are not installed for $PY" >&2; exit 0
fi
if [ -f "$DEST/tvm/lib/libtvm_runtime.so" ] && [ -f "$DEST/tvm_ffi/lib/libtvm_ffi.so" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$TVM_V $FFI_V" ]; then
  exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# apache-tvm is tagged manylinux_2_28_aarch64 (py3-none); apache-tvm-ffi is per CPython version, so ask for the
# running interpreter's
if ! $PY -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 -d "$tmp" \
     "apache-tvm==$TVM_V" "apache-tvm-ffi==$FFI_V" >"$tmp/pip.log" 2>&1; then
  echo "install-cross: pip download of the aarch64 apache-tvm==$TVM_V / apache-tvm-ffi==$FFI_V wheels failed: $(tail -1 "$tmp/pip.log")" >&2
  exit 0
fi
rm -rf "$DEST" && mkdir -p "$DEST"
for w in "$tmp"/*.whl; do
  # only the runtime libraries; the headers are architecture-independent and come from the host's wheels
  $PY - "$w" "$DEST" <<'PY'
import sys, zipfile
w, dest = sys.argv[1:]
with zipfile.ZipFile(w) as z:
    for n in z.namelist():
        if n in ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"):
            z.extract(n, dest)
PY
done
echo "$TVM_V $FFI_V" > "$DEST/VERSION"
ls "$DEST"/tvm/lib/libtvm_runtime.so "$DEST"/tvm_ffi/lib/libtvm_ffi.so >/dev/null || echo "install-cross: the aarch64 wheels lack libtvm_runtime.so / libtvm_ffi.so" >&2
exit 0
