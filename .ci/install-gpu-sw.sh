#!/usr/bin/env bash
# Installs the software GPU stacks that tests/export/test_mobile_gpu_kernels.py runs exported kernels on:
# PoCL's CPU OpenCL driver (pocl-opencl-icd) and Mesa's lavapipe Vulkan driver (mesa-vulkan-drivers) from apt, and
# their Python bindings pyopencl and wgpu from PyPI (wgpu's wheel carries wgpu-native, which drives lavapipe);
# a JDK (jni.h, javac) for tests/apps/test_android_jni.py and llvm-ar for `edgequant package`, when missing.
#
# Idempotent and quick once done; a step that fails prints one line on stderr and the script goes on, so the test
# skips with its reason instead of CI stopping here.
set -uo pipefail
PY=${PYTHON:-python3}

missing=()
[ -e /etc/OpenCL/vendors/pocl.icd ] || missing+=(pocl-opencl-icd ocl-icd-libopencl1)
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || missing+=(mesa-vulkan-drivers libvulkan1)
command -v javac >/dev/null || missing+=(default-jdk-headless)
command -v llvm-ar >/dev/null || missing+=(llvm)   # `edgequant package` merges static libraries with llvm-ar
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"   # never prompt
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/edgequant-apt-gpu.log 2>&1; then
    echo "install-gpu-sw: apt-get install ${missing[*]} failed (see /tmp/edgequant-apt-gpu.log)" >&2
  fi
fi

if ! $PY -c "import pyopencl, wgpu" 2>/dev/null; then
  $PY -m pip install -q pyopencl wgpu >/tmp/edgequant-pip-gpu.log 2>&1 || \
    echo "install-gpu-sw: pip install pyopencl wgpu failed: $(tail -1 /tmp/edgequant-pip-gpu.log)" >&2
fi
exit 0
