#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and nothing to fetch: it runs a `glimpse`
# built elsewhere with `cargo build --release --features cuda` (carry target/release/glimpse).
#
#   scripts/gpu-check.sh [GLIMPSE=target/release/glimpse]
#
# Environment: DEVICE (cuda), TOKENS (2048), EXPERTS (32), VOCAB (the preset's), PEAK_TFLOPS
# (989). DEVICE=cuda-emu runs the same steps on the host emulation, but at GLM-5's widths its
# benchmark takes far too long to be a dry run (tens of minutes for 4 tokens on 2 cores).
#
# 1. `glimpse selftest --device cuda`: opens the GPU, compiles every kernel with NVRTC for its
#    architecture, checks each against its CPU reference, then verifies every golden case on the
#    CPU and through the prefill on the GPU.
# 2. A benchmark at GLM-5 layer shapes: `synth --preset glm5 --layers 2 --experts 32` (made here by
#    the binary: one dense and one MoE layer), then `bench --device cuda` of a 2048-token prefill
#    with f32 and with bf16 products: time, matrix-product TFLOP/s and the routed experts' GEMMs
#    (one profiled prefill) against the card's dense bf16 peak (PEAK_TFLOPS, default 989:
#    H100/H200 SXM), and device memory.
# 3. When this machine's python has torch (with CUDA) and transformers: transformers' eager
#    prefill of the same checkpoint and tokens in bf16 (scripts/transformers-prefill.py), and the
#    speed ratio. Otherwise the table says it was not measured.
# 4. Prints summary tables for docs/gpu-results.md.
set -uo pipefail
glimpse=${1:-target/release/glimpse}
if [ ! -x "$glimpse" ]; then
  echo "no glimpse binary at $glimpse (build it with: cargo build --release --features cuda)" >&2
  exit 2
fi
# NVRTC and cuBLAS are loaded at run time: put the first folder holding each on the loader's path
# (CUDA's own folders first, then the wheels of the python here, e.g. torch's nvidia-* packages).
lib_dirs="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
  $(python3 -c 'import site; print(" ".join(p + "/nvidia/cu13/lib " + p + "/nvidia/cublas/lib " + p + "/nvidia/cuda_nvrtc/lib" for p in site.getsitepackages()))' 2>/dev/null)"
for lib in libnvrtc.so libcublas.so; do
  for d in $lib_dirs; do
    if ls "$d/$lib".13* >/dev/null 2>&1; then
      case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
      echo "$lib: $(cd "$d" && ls "$lib".13* | tr '\n' ' ')in $d"
      break
    fi
  done
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
start=$(date +%s)
device=${DEVICE:-cuda}
tokens=${TOKENS:-2048}
out=$("$glimpse" selftest --device "$device" 2>&1)
rc=$?
echo "$out"
echo
echo "| check | max abs diff | verdict |"
echo "|---|---|---|"
echo "$out" | sed -n 's/^kernel \(.*[^ ]\) *max_abs *\([^ ]*\) *\([A-Za-z]*\)$/| \1 | \2 | \3 |/p'
echo "$out" | sed -n 's/^verify \([^ ]*\) (\(.*\)): \(.*\)$/| verify \1 (\2) | | \3 |/p'
echo "$out" | sed -n 's/^measure \([^ ]*\) (\(.*\)): \(.*\)$/| measured: \1 (\2) | | \3 |/p'
echo "selftest exit code $rc, $(( $(date +%s) - start )) s"

experts=${EXPERTS:-32}
ckpt=${TMPDIR:-/tmp}/glimpse-gpu-glm5-$experts${VOCAB:+-v$VOCAB}
t0=$(date +%s)
if [ ! -e "$ckpt/config.json" ]; then
  "$glimpse" synth --preset glm5 --layers 2 --experts "$experts" ${VOCAB:+--vocab "$VOCAB"} --dtype bf16 --out "$ckpt" || exit 2
fi
echo "synth: $(( $(date +%s) - t0 )) s"
peak=${PEAK_TFLOPS:-989}
declare -A median tflops expert_tflops mem
for precision in f32 bf16; do
  bench=$("$glimpse" --precision "$precision" bench --device "$device" --model "$ckpt" --tokens "$tokens" --repeat 3 2>&1)
  brc=$?
  echo "$bench"
  [ $brc -eq 0 ] || { echo "bench ($precision) exit code $brc"; exit 1; }
  median[$precision]=$(echo "$bench" | sed -n 's/.*median \([0-9.]*\) s (.*/\1/p')
  tflops[$precision]=$(echo "$bench" | sed -n 's/^matrix products.*= \([0-9.]*\) TFLOP\/s.*/\1/p')
  expert_tflops[$precision]=$(echo "$bench" | sed -n 's/^expert GEMMs.*= \([0-9.]*\) TFLOP\/s.*/\1/p')
  mem[$precision]=$(echo "$bench" | sed -n 's/^device memory in use: \(.*\)$/\1/p')
done
pct() { python3 -c "import sys; print(f'{100 * float(sys.argv[1]) / float(sys.argv[2]):.1f}%')" "$1" "$peak" 2>/dev/null || echo "?"; }

t_median=""
if python3 -c 'import torch, transformers; assert torch.cuda.is_available()' 2>/dev/null; then
  t_json=$(python3 "$(dirname "$0")/transformers-prefill.py" "$ckpt" "$tokens" 3 cuda bfloat16 2>&1 | tail -n 1)
  echo "transformers $(python3 -c 'import transformers; print(transformers.__version__)' 2>/dev/null) (eager, bf16): $t_json"
  t_median=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["median"])' "$t_json" 2>/dev/null)
else
  echo "transformers: not measured (this python lacks torch with CUDA, or transformers)"
fi
ratio() { [ -n "$t_median" ] && python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$t_median" "$1" 2>/dev/null || echo "not measured"; }

echo
echo "$(date -u '+%F %H:%M UTC'), $("$glimpse" --version 2>/dev/null), scripts/gpu-check.sh with TOKENS=$tokens EXPERTS=$experts VOCAB=${VOCAB:-preset} DEVICE=$device PEAK_TFLOPS=$peak"
echo "| prefill $tokens tokens, glm5 2 layers / $experts experts, $device | f32 products | bf16 products |"
echo "|---|---|---|"
echo "| median time | ${median[f32]:-?} s | ${median[bf16]:-?} s |"
echo "| matrix products | ${tflops[f32]:-?} TFLOP/s ($(pct "${tflops[f32]:-0}") of bf16 peak $peak) | ${tflops[bf16]:-?} TFLOP/s ($(pct "${tflops[bf16]:-0}")) |"
echo "| routed experts' GEMMs | ${expert_tflops[f32]:-?} TFLOP/s ($(pct "${expert_tflops[f32]:-0}")) | ${expert_tflops[bf16]:-?} TFLOP/s ($(pct "${expert_tflops[bf16]:-0}")) |"
echo "| device memory | ${mem[f32]:-?} | ${mem[bf16]:-?} |"
echo "| transformers eager bf16, same card: ${t_median:-not measured} s | $(ratio "${median[f32]:-1}") | $(ratio "${median[bf16]:-1}") |"
echo "total $(( $(date +%s) - start )) s"
[ $rc -eq 0 ]
