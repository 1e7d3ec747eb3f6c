#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and nothing to fetch: it runs a `glimpse`
# built elsewhere with `cargo build --release --features cuda` (carry target/release/glimpse).
#
#   scripts/gpu-check.sh [GLIMPSE=target/release/glimpse]
#
# 1. `glimpse selftest --device cuda`: opens the GPU, compiles every kernel with NVRTC for its
#    architecture, checks each against its CPU reference, then verifies every golden case on the
#    CPU and through the prefill on the GPU.
# 2. A benchmark at GLM-5 layer shapes: `synth --preset glm5 --layers 2 --experts 32` (made here by
#    the binary), then `bench --device cuda` of a 2048-token prefill: time, matrix-product
#    TFLOP/s against the card's dense bf16 peak (PEAK_TFLOPS, default 989: H100/H200 SXM), and
#    device memory. The GPU path computes in f32 today (cuBLAS SGEMM), so expect a small fraction
#    of the bf16 peak.
# 3. Prints summary tables for docs/gpu-results.md.
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

ckpt=${TMPDIR:-/tmp}/glimpse-gpu-glm5
t0=$(date +%s)
if [ ! -e "$ckpt/config.json" ]; then
  "$glimpse" synth --preset glm5 --layers 2 --experts 32 --dtype bf16 --out "$ckpt" || exit 2
fi
echo "synth: $(( $(date +%s) - t0 )) s"
bench=$("$glimpse" bench --device cuda --model "$ckpt" --tokens 2048 --repeat 3 2>&1)
brc=$?
echo "$bench"
peak=${PEAK_TFLOPS:-989}
median=$(echo "$bench" | sed -n 's/.*median \([0-9.]*\) s (\([0-9.]*\) tok\/s).*/\1/p')
toks=$(echo "$bench" | sed -n 's/.*median [0-9.]* s (\([0-9.]*\) tok\/s).*/\1/p')
tflops=$(echo "$bench" | sed -n 's/.*= \([0-9.]*\) TFLOP\/s.*/\1/p')
mem=$(echo "$bench" | sed -n 's/^device memory in use: \(.*\)$/\1/p')
echo
echo "| prefill 2048 tokens, glm5 2 layers / 32 experts | value |"
echo "|---|---|"
echo "| median time | ${median:-?} s |"
echo "| tokens/s | ${toks:-?} |"
echo "| matrix products | ${tflops:-?} TFLOP/s (bf16 peak $peak) |"
echo "| device memory | ${mem:-?} |"
echo "bench exit code $brc; total $(( $(date +%s) - start )) s"
[ $rc -eq 0 ] && [ $brc -eq 0 ]
