#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and nothing to fetch: it runs a `glimpse`
# built elsewhere with `cargo build --release --features cuda` (carry target/release/glimpse).
#
#   scripts/gpu-check.sh [GLIMPSE=target/release/glimpse]
#
# 1. `glimpse selftest --device cuda`: opens the GPU, compiles every kernel with NVRTC for its
#    architecture, checks each against its CPU reference, then verifies every golden case on the
#    CPU and through the prefill on the GPU.
# 2. Prints a summary table for docs/gpu-results.md.
#
# Not yet here (see the CUDA issue): the benchmark at GLM-5 layer shapes.
set -uo pipefail
glimpse=${1:-target/release/glimpse}
if [ ! -x "$glimpse" ]; then
  echo "no glimpse binary at $glimpse (build it with: cargo build --release --features cuda)" >&2
  exit 2
fi
# NVRTC and the driver are loaded at run time: look where CUDA installs usually put NVRTC.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
  $(python3 -c 'import site; print(" ".join(p + "/nvidia/cu13/lib" for p in site.getsitepackages()))' 2>/dev/null); do
  if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then
    export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    break
  fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
start=$(date +%s)
out=$("$glimpse" selftest --device cuda 2>&1)
rc=$?
echo "$out"
echo
echo "| check | max abs diff | verdict |"
echo "|---|---|---|"
echo "$out" | sed -n 's/^kernel \(.*[^ ]\) *max_abs *\([^ ]*\) *\([A-Za-z]*\)$/| \1 | \2 | \3 |/p'
echo "$out" | sed -n 's/^verify \(.*\) (\(.*\)): \(.*\)$/| verify \1 (\2) | | \3 |/p'
echo "selftest exit code $rc, $(( $(date +%s) - start )) s"
exit $rc
