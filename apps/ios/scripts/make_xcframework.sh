#!/usr/bin/env bash
# Builds EdgequantRuntime.xcframework (the binary target of ../Package.swift) on a Mac with Xcode:
#   one static library per slice = the model libraries (`lib.tar` objects of each DIST) + apps/runtime's C API
#   + the TVM runtime with Metal, and the C header with a module map so that Swift can `import EdgequantRuntime`.
#
#   scripts/make_xcframework.sh TVM_SOURCE DEVICE_DIST[,DEVICE_DIST...] SIM_DIST[,SIM_DIST...] [OUT_DIR]
#
# DEVICE_DIST: `edgequant export q/ --target iphone --system-lib-prefix P_ -o DIST` (iphoneos slice);
# SIM_DIST: the same checkpoint exported with `--target iphone-sim` and the same prefix (simulator slice, arm64).
# Several models: comma-separated DIST folders, each with its own prefix (`edgequant package` writes these lists).
# TVM_SOURCE: a checkout of apache/tvm at the version the DISTs were exported with (edgequant-export.json's
# tvm_version), with its submodules (tvm-ffi, dlpack).
#
# Written for Xcode 15+ and not run where it was written (no Mac there): see ../README.md.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 TVM_SOURCE DEVICE_DIST[,...] SIM_DIST[,...] [OUT_DIR]" >&2; exit 2; }
TVM=$(cd "$1" && pwd); DEVICE=$2; SIM=$3; OUT=${4:-$(pwd)}
HERE=$(cd "$(dirname "$0")/.." && pwd); RUNTIME=$HERE/../runtime
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
MIN_IOS=16.0

slice() {  # slice SDK DISTS -> $WORK/SDK/libedgequant.a
  local sdk=$1 dists=$2 dir=$WORK/$1 target
  mkdir -p "$dir/objs"
  [ "$sdk" = iphoneos ] && target=arm64-apple-ios$MIN_IOS || target=arm64-apple-ios$MIN_IOS-simulator
  # the TVM runtime (static, Metal, no backtrace library on iOS)
  cmake -S "$TVM" -B "$dir/tvm" -DCMAKE_SYSTEM_NAME=iOS -DCMAKE_OSX_SYSROOT="$sdk" -DCMAKE_OSX_ARCHITECTURES=arm64 \
    -DCMAKE_OSX_DEPLOYMENT_TARGET=$MIN_IOS -DCMAKE_BUILD_TYPE=Release -DUSE_METAL=ON -DUSE_LLVM=OFF \
    -DBUILD_STATIC_RUNTIME=ON -DUSE_LIBBACKTRACE=OFF -DTVM_FFI_USE_LIBBACKTRACE=OFF >"$dir/cmake.log"
  cmake --build "$dir/tvm" --target tvm_runtime --config Release -j "$(sysctl -n hw.ncpu)" >>"$dir/cmake.log"
  # apps/runtime's C API
  xcrun -sdk "$sdk" clang++ -std=c++17 -O2 -target "$target" -c "$RUNTIME/src/runtime.cc" -o "$dir/objs/runtime.o" \
    -I"$RUNTIME/include" -I"$TVM/include" -I"$TVM/3rdparty/tvm-ffi/include" \
    -I"$TVM/3rdparty/tvm-ffi/3rdparty/dlpack/include" -I"$TVM/3rdparty/dlpack/include"
  # the model libraries; each model's objects keep their own names (lib0.o exists in every tar)
  local i=0
  for d in ${dists//,/ }; do
    mkdir -p "$dir/m$i" && tar -xf "$d/lib.tar" -C "$dir/m$i"
    for o in "$dir/m$i"/*.o; do cp "$o" "$dir/objs/m${i}_$(basename "$o")"; done
    i=$((i + 1))
  done
  local libs; libs=$(find "$dir/tvm" -name 'libtvm_runtime.a' -o -name 'libtvm_ffi_static.a')
  xcrun -sdk "$sdk" libtool -static -o "$dir/libedgequant.a" "$dir"/objs/*.o $libs
}

slice iphoneos "$DEVICE"
slice iphonesimulator "$SIM"

mkdir -p "$WORK/headers"
cp "$RUNTIME/include/edgequant_runtime.h" "$WORK/headers/"
cat >"$WORK/headers/module.modulemap" <<'MAP'
module EdgequantRuntime {
  header "edgequant_runtime.h"
  export *
}
MAP
rm -rf "$OUT/EdgequantRuntime.xcframework"
xcodebuild -create-xcframework \
  -library "$WORK/iphoneos/libedgequant.a" -headers "$WORK/headers" \
  -library "$WORK/iphonesimulator/libedgequant.a" -headers "$WORK/headers" \
  -output "$OUT/EdgequantRuntime.xcframework"
echo "wrote $OUT/EdgequantRuntime.xcframework"
