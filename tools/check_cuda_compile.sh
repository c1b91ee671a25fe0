#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with the installed nvcc for sm_80 (A100) and sm_90 (H100),
# `-c` only, with the flags of dist_cautious/kernels/build.py (CUDA_FLAGS) plus the defines that
# torch's extension builder passes to nvcc. Nothing runs on a GPU: this only proves that a kernel
# change still compiles for both architectures, so a broken kernel cannot land. The .cu files
# include no torch header, so no CUDA build of torch is needed. Exits non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 1
fi

shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi

# The nvcc flags of the real build, read from build.py so the two cannot drift apart.
read -r -a build_flags <<<"$(python3 -c 'import ast,pathlib
tree = ast.parse(pathlib.Path("dist_cautious/kernels/build.py").read_text())
for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CUDA_FLAGS" for t in node.targets):
        print(" ".join(ast.literal_eval(node.value)))')"
torch_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
archs=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$NVCC" --version | tail -n 2
echo "flags: ${build_flags[*]} ${torch_defines[*]} sm_80 sm_90"

pids=()
for file in "${files[@]}"; do
  name="$(basename "$file" .cu)"
  ( start=$SECONDS
    if "$NVCC" "${build_flags[@]}" "${torch_defines[@]}" "${archs[@]}" -Werror all-warnings -c "$file" -o "$out/$name.o" >"$out/$name.log" 2>&1; then
      echo "ok   $file ($((SECONDS - start))s)"
    else
      echo "FAIL $file"; cat "$out/$name.log"; exit 1
    fi ) &
  pids+=($!)
done
# Opt-in (--with-binding): syntax-check the torch binding against the installed torch's headers
# in torch's own C++ standard, in parallel with the nvcc jobs. A CPU-only torch wheel ships
# c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h, so an empty
# stand-in is supplied for it.
if [ "${1:-}" = "--with-binding" ]; then
  mkdir -p "$out/stub/c10/cuda/impl"
  echo "#pragma once" >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  read -r torch_inc py_inc <<<"$(python3 -c 'import os, sysconfig, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"), sysconfig.get_paths()["include"])')"
  cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
  for file in csrc/cuda/*.cpp; do
    ( start=$SECONDS
      if "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall -Werror -DTORCH_EXTENSION_NAME=dist_cautious_cuda_kernels \
          -I"$out/stub" -isystem "$torch_inc" -isystem "$torch_inc/torch/csrc/api/include" -isystem "$py_inc" -isystem "$cuda_inc" \
          "$file" >"$out/$(basename "$file").log" 2>&1; then
        echo "ok   $file (syntax vs torch headers, $((SECONDS - start))s)"
      else
        echo "FAIL $file"; cat "$out/$(basename "$file").log"; exit 1
      fi ) &
    pids+=($!)
  done
fi

status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [ $status -ne 0 ]; then
  echo "check_cuda_compile: FAILED" >&2
  exit 1
fi
echo "check_cuda_compile: ${#files[@]} .cu file(s) compile for sm_80 and sm_90${1:+ (and the binding, $1)}"
