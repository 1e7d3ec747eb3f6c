#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and nothing to fetch: it runs a `glimpse`
# built elsewhere: scripts/gpu-prepare.sh builds it with `--features cuda` and strips a copy into
# gpu-bin/ (carry gpu-bin: the unstripped binary is over the device tool's 64 MiB).
#
#   scripts/gpu-check.sh [GLIMPSE=gpu-bin/glimpse, else target/release/glimpse]
#
# Environment: DEVICE (cuda), MAX_MEMORY (9/10 of MemTotal: the VM's memory may grow after start), TOKENS (2048), EXPERTS (32), VOCAB (the preset's),
# SANITIZE (1; 0 skips step 4, the sanitizer runs, for runs that only time a change), PEAK_TFLOPS
# (989), BUDGET_S (350: the issue asks for under 6 minutes; each step's limit is cut to what is left of it),
# SYNTH (the benchmark checkpoint's synth arguments, `--preset glm5 --layers 2 --experts
# $EXPERTS`), PYTHON (python3) and TORCH_DEVICE (cuda) for the transformers side. Logs go to $OUT
# (the device tool's folder) or $TMPDIR/glimpse-gpu-check. A dry run of the whole script on the
# host emulation, with a small checkpoint and transformers on the CPU (about a minute):
#
#   SYNTH="--config golden/flat/config.json" TOKENS=32 DEVICE=cuda-emu TORCH_DEVICE=cpu \
#     PYTHON=/path/to/venv/bin/python scripts/gpu-check.sh
#
# 1. `glimpse selftest --device cuda` (with CUDA_LAUNCH_BLOCKING=1, so a faulting kernel is named
#    by its own launch): opens the GPU, compiles every kernel with NVRTC to machine code for its
#    architecture, checks each against its CPU reference, then verifies every golden case on the
#    CPU and through the prefill on the GPU in both precisions.
# 2. A benchmark at GLM-5 layer shapes: `synth --preset glm5 --layers 2 --experts 32` (made here by
#    the binary: one dense and one MoE layer), then `bench --device cuda` of a 2048-token prefill
#    with bf16 and with f32 products (and, after step 3, bf16 with `--attention fused`), with
#    every position's logits and with the last one's:
#    time, matrix-product TFLOP/s and the routed experts' GEMMs (one profiled prefill) against
#    the card's dense bf16 peak (PEAK_TFLOPS, default 989: H100/H200 SXM), and device memory
#    (in use after the runs, as the GPU counts it, and as estimated before them).
# 3. When this machine's python has torch (with CUDA) and transformers: transformers' eager
#    prefill of the same checkpoint and tokens in bf16, in both forms
#    (scripts/transformers-prefill.py), and the speed ratios. Otherwise the table says so.
# 4. With the time left: `selftest --kernels-only` under compute-sanitizer's memcheck and racecheck,
#    then one-off `run`s of the benchmark's checkpoint in bf16, whole and with `--stream`, timed,
#    and `audit`s of 8 prompts of it, whole and `--stream`, timed, which must count alike; then
#    the same checkpoint in block FP8 (`synth --dtype fp8`) benched in bf16 mode.
# 5. Prints summary tables for docs/gpu-results.md, and the bf16 prefills' profiles. The logs are 8 files, the most the device tool
#    brings back: a ninth would not come back.
set -uo pipefail
glimpse=${1:-$( [ -x gpu-bin/glimpse ] && echo gpu-bin/glimpse || echo target/release/glimpse )}
if [ ! -x "$glimpse" ]; then
  echo "no glimpse binary at $glimpse (build it with scripts/gpu-prepare.sh)" >&2
  exit 2
fi
# The binary was linked here: a system library it needs that this machine lacks is named now.
missing=$(ldd "$glimpse" 2>/dev/null | grep 'not found')
[ -n "$missing" ] && echo "$glimpse needs libraries this machine lacks: $missing"
# NVRTC and cuBLAS are loaded at run time: put the first folder holding each on the loader's path
# (CUDA's own folders first, then the wheels of the python here, e.g. torch's nvidia-* packages,
# user site included), CUDA 13's libraries first, else 12's (every symbol used is in both; the
# selftest's first line names the versions loaded).
lib_dirs="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
  $("${PYTHON:-python3}" -c 'import site; print(" ".join(p + "/nvidia/cu13/lib " + p + "/nvidia/cublas/lib " + p + "/nvidia/cuda_nvrtc/lib" for p in site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)"
for lib in libnvrtc.so libcublas.so; do
  found=""
  for major in 13 12; do
    for d in $lib_dirs; do
      if ls "$d/$lib.$major"* >/dev/null 2>&1; then
        case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
        echo "$lib: $(cd "$d" && ls "$lib.$major"* | tr '\n' ' ')in $d"
        found=1
        break 2
      fi
    done
  done
  [ -n "$found" ] || echo "$lib: no CUDA 13 or 12 copy in $lib_dirs (the loader's own search decides)"
done
# The memory check before a run counts what the host holds; this VM's memory may grow after it
# starts (available memory reads low at first), so the steps give it the machine's total memory
# instead (MemTotal, in KB), less a tenth.
max_memory=${MAX_MEMORY:-$(awk '/^MemTotal:/ { printf "%dK", $2 * 0.9 }' /proc/meminfo 2>/dev/null)}
max_memory=${max_memory:-100G}
# The source the binary was built from (gpu-prepare.sh writes it beside the binary).
built_from=$(cat "$(dirname "$glimpse")/COMMIT" 2>/dev/null || echo "unknown source (no COMMIT beside the binary)")
echo "$glimpse: $built_from"
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
  echo "nvidia-smi: not found or no answer in 20 s"
start=$(date +%s)
device=${DEVICE:-cuda}
tokens=${TOKENS:-2048}
# Every step streams its output as it runs and keeps a log (in $OUT when the device tool runs
# this, so the logs come back), and has a time limit inside the whole check's (BUDGET_S, 350 s
# by default): a hung step costs its own limit, not the table. Steps run in order of what the
# check must show: the parity checks, bf16 then f32, transformers, and last, with what time is
# left, the kernels under compute-sanitizer.
logs=${OUT:-${TMPDIR:-/tmp}/glimpse-gpu-check}
mkdir -p "$logs"
deadline=$(( start + ${BUDGET_S:-350} ))
# since T0: the seconds from T0 (`date +%s.%N`) to now, to a tenth.
since() {
  python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)" 2>/dev/null
}
# step NAME CAP_SECONDS COMMAND...: runs COMMAND, its output teed to $logs/NAME.log (or, with
# LOG=OTHER set, appended to $logs/OTHER.log: the device tool brings back 8 files, all taken).
# What became of it goes into step_note[NAME] (its seconds and exit code, "stopped at its limit",
# or "skipped: the budget is spent"), and NAME into step_order, for the table's timing row: the
# next GPU session can see which step took the time.
declare -A step_note
step_order=()
step() {
  local name=$1 cap=$2
  shift 2
  local log="$logs/${LOG:-$name}.log"
  [ -n "${LOG:-}" ] || : > "$log"
  local left=$(( deadline - $(date +%s) - 5 ))
  [ "$left" -lt "$cap" ] && cap=$left
  step_order+=("$name")
  if [ "$cap" -le 0 ]; then
    echo "$name: skipped, the check's time budget is spent" | tee -a "$log"
    step_note[$name]="skipped: the budget is spent"
    return 124
  fi
  local t0
  t0=$(date +%s.%N)
  timeout --kill-after=5 "$cap" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  step_note[$name]="$(since "$t0") s, exit code $rc"
  case $rc in 124 | 137)
    echo "$name: stopped after its limit of $cap s" | tee -a "$log"
    step_note[$name]="stopped at its limit of $cap s"
    ;;
  esac
  return "$rc"
}
# failed NAME RC LOG: a table cell for a step that did not give its result.
failed() {
  case "${step_note[$1]:-}" in
    skipped*) echo "not run (the budget was spent)" ;;
    *) echo "FAILED (exit code $2, see $3)" ;;
  esac
}

# CUDA_LAUNCH_BLOCKING: a kernel that faults is reported by its own launch, not by whatever
# synchronises next (the selftest times nothing, so serialising costs it little).
CUDA_LAUNCH_BLOCKING=1 step selftest 150 "$glimpse" --max-memory "$max_memory" selftest --device "$device"
rc=$?
out=$(cat "$logs/selftest.log")
echo
echo "| check | max abs diff | verdict |"
echo "|---|---|---|"
echo "$out" | sed -n 's/^kernel \(.*[^ ]\) *max_abs *\([^ ]*\) *\([A-Za-z]*\)$/| \1 | \2 | \3 |/p'
echo "$out" | sed -n 's/^verify \([^ ]*\) (\(.*\)): \(.*\)$/| verify \1 (\2) | | \3 |/p'
echo "$out" | sed -n 's/^measure \([^ ]*\) (\(.*\)): \(.*\)$/| measured: \1 (\2) | | \3 |/p'
echo "$out" | sed -n 's/^kernels: \(.*\)$/| kernel resources (driver) | | \1 |/p'
echo "selftest exit code $rc, $(( $(date +%s) - start )) s"
selftest_verdict="exit code $rc; $(echo "$out" | grep -cE '^(kernel|verify) .* ok$|^verify .*tensors match$') checks ok, $(echo "$out" | grep -c 'FAILED') FAILED"

experts=${EXPERTS:-32}
synth_args=${SYNTH:-"--preset glm5 --layers 2 --experts $experts"}
ckpt=${TMPDIR:-/tmp}/glimpse-gpu-$(echo "$synth_args${VOCAB:+ v$VOCAB}" | tr -cs 'A-Za-z0-9' '-')
t0=$(date +%s)
if [ ! -e "$ckpt/config.json" ]; then
  # shellcheck disable=SC2086 # the synth arguments are words
  LOG=selftest step synth 120 "$glimpse" synth $synth_args ${VOCAB:+--vocab "$VOCAB"} --dtype bf16 --out "$ckpt" ||
    { rc=1; rm -rf "$ckpt"; }
fi
echo "synth: $(( $(date +%s) - t0 )) s"
peak=${PEAK_TFLOPS:-989}
declare -A median median_last tflops expert_tflops mem mem_est from to logfile
unscored=""
# bench_run RUN PRECISION ATTENTION [CHECKPOINT]: a 2048-token bench of CHECKPOINT (the
# benchmark's), its log bench-RUN.log (with LOG=OTHER, appended to OTHER.log from its line
# from[RUN]), its numbers under RUN.
bench_run() {
  local run=$1 precision=$2 attention=$3 model=${4:-$ckpt}
  [ -e "$model/config.json" ] || return 0
  local log="$logs/${LOG:-bench-$run}.log" before=0
  [ -n "${LOG:-}" ] && [ -e "$log" ] && before=$(wc -l < "$log")
  from[$run]=$(( before + 1 ))
  step "bench-$run" 90 "$glimpse" --max-memory "$max_memory" bench --device "$device" --precision "$precision" \
    --attention "$attention" --model "$model" --tokens "$tokens" --repeat 3
  local brc=$?
  [ $brc -eq 0 ] || { echo "bench ($run) exit code $brc"; rc=1; }
  logfile[$run]=$log
  to[$run]=$(wc -l < "$log")
  local bench
  bench=$(sed -n "${from[$run]},${to[$run]}p" "$log")
  median[$run]=$(echo "$bench" | sed -n 's/.*logits left on the device: median \([0-9.]*\) s (.*/\1/p')
  median_last[$run]=$(echo "$bench" | sed -n "s/.*last position's logits only: median \([0-9.]*\) s (.*/\1/p")
  tflops[$run]=$(echo "$bench" | sed -n 's/^matrix products.*= \([0-9.]*\) TFLOP\/s.*/\1/p')
  expert_tflops[$run]=$(echo "$bench" | sed -n 's/^expert GEMMs.*= \([0-9.]*\) TFLOP\/s.*/\1/p')
  mem[$run]=$(echo "$bench" | sed -n 's/^device memory in use: \(.*\)$/\1/p')
  mem_est[$run]=$(echo "$bench" | sed -n 's/^device memory estimated before the runs: \(.*\)$/\1/p')
  echo "$bench" | grep -q '^indexer: not scored' && unscored=" (ours does not score the indexer at this length: bench says why)"
  # A fault in an asynchronous launch surfaces at whatever call synchronises next, under its
  # name: once more with every launch waited for, so the error names the op that faulted (into
  # the same log, after its numbers are read: the device tool brings back 8 files, all taken).
  local left=$(( deadline - $(date +%s) - 5 ))
  if [ $brc -ne 0 ] && [ $brc -ne 124 ] && [ $brc -ne 137 ] && [ $left -gt 10 ]; then
    echo "bench ($run) again with CUDA_LAUNCH_BLOCKING=1, to name the failing op:" | tee -a "$log"
    CUDA_LAUNCH_BLOCKING=1 timeout --kill-after=5 $(( left < 60 ? left : 60 )) "$glimpse" --max-memory "$max_memory" bench --device "$device" \
      --precision "$precision" --attention "$attention" --model "$model" --tokens "$tokens" --repeat 1 2>&1 | tail -n 5 | tee -a "$log"
  fi
}
bench_run bf16 bf16 auto
bench_run f32 f32 auto
pct() { python3 -c "import sys; print(f'{100 * float(sys.argv[1]) / float(sys.argv[2]):.1f}%')" "$1" "$peak" 2>/dev/null || echo "?"; }

t_median="" t_median_last=""
python=${PYTHON:-python3}
torch_device=${TORCH_DEVICE:-cuda}
# (A transformers without GLM-5's classes, older than 5.x, is not measured either: it would fail
# after loading the checkpoint, its time spent.)
if [ -e "$ckpt/config.json" ] && timeout 60 "$python" -c 'import sys, torch, transformers
from transformers import GlmMoeDsaForCausalLM
assert sys.argv[1] != "cuda" or torch.cuda.is_available()' "$torch_device" 2>/dev/null; then
  step transformers 120 "$python" "$(dirname "$0")/transformers-prefill.py" "$ckpt" "$tokens" 3 "$torch_device" bfloat16
  t_json=$(tail -n 1 "$logs/transformers.log")
  t_version=$(timeout 60 "$python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null)
  field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$t_json" "$1" 2>/dev/null; }
  t_median=$(field median)
  t_median_last=$(field median_last)
else
  echo "transformers: not measured ($python lacks torch with $torch_device, or a transformers with GlmMoeDsaForCausalLM)"
fi
# ratio THEIRS OURS: how many times faster ours is.
ratio() { [ -n "$1" ] && [ -n "$2" ] && python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2" 2>/dev/null || echo "not measured"; }

# bf16 with the fused attention (`--attention fused`), after the established columns, so a spent
# budget cuts it first.
bench_run fused bf16 fused

# Out-of-bounds accesses the parity checks cannot see (a kernel may read past a buffer and still
# compute the right values), then shared-memory races, which the emulation's fibers (switching
# only at barriers) cannot show: the kernels and products once more under compute-sanitizer.
# Verdicts: exit 0 with its summary is clean; exit 3 (--error-exitcode) is a finding, a failure
# of the check when the tool's reports name one of our kernels, else
# noted as in kernels not ours (cuBLAS's, which racecheck watches too); a log saying
# the device is not supported (gVisor machines), or with no summary, is no verdict; any other exit
# is the selftest failing under the tool, a failure.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
declare -A sanitized=([memcheck]="not run" [racecheck]="not run")
# Our kernels' names (src/cuda/mod.rs's KERNELS lists them; this runs in the repository).
# A family's list may span lines, as rustfmt breaks it.
ours=$(sed -n '/pub const KERNELS/,/^];/p' "$(dirname "$0")/../src/cuda/mod.rs" 2>/dev/null | tail -n +2 | tr -d ' \n' |
  grep -o '&\[[^]]*\]' | grep -o '"[a-z_0-9]*"' | tr -d '"' | paste -sd'|' -)
if [ "${SANITIZE:-1}" = 0 ]; then
  sanitized=([memcheck]="skipped (SANITIZE=0)" [racecheck]="skipped (SANITIZE=0)")
elif [ "$device" = cuda ] && [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck; do
    step "$tool" 90 "$sanitizer" --tool "$tool" --print-limit 20 --error-exitcode 3 "$glimpse" selftest \
      --device cuda --kernels-only
    src=$?
    summary=$(grep -oE '(ERROR|RACECHECK) SUMMARY: .*' "$logs/$tool.log" | tail -n 1)
    if grep -qi 'not supported' "$logs/$tool.log" || [ -z "$summary" ]; then
      sanitized[$tool]="no verdict (exit code $src: the tool could not run here, or ran out of time; see $tool.log)"
    elif [ $src -eq 0 ]; then
      sanitized[$tool]="$summary"
    elif [ $src -eq 3 ] && [ -n "$ours" ] && ! grep '^=========' "$logs/$tool.log" | grep -qwE "$ours"; then
      sanitized[$tool]="reports only in kernels not ours (cuBLAS's): $summary (see $tool.log)"
    elif [ $src -eq 3 ]; then
      sanitized[$tool]="FOUND: $summary (see $tool.log)"; rc=1
    else
      sanitized[$tool]="FAILED: the selftest exited $src under the tool (see $tool.log)"; rc=1
    fi
  done
fi
# Last, with what time is left: one-off runs of the benchmark's checkpoint in bf16 (open, uploads,
# prefill), whole and with --stream (one layer's weights on the GPU at a time, each uploaded as
# the run reaches it): the pace of a checkpoint larger than the card, and the same next token.
declare -A one_off next_token
if [ -e "$ckpt/config.json" ]; then
  ids=$(seq -s, 1 "$tokens")
  for how in whole stream; do
    flag=""; [ "$how" = stream ] && flag="--stream"
    t0=$(date +%s.%N)
    lines=$(wc -l < "$logs/bench-bf16.log")
    # shellcheck disable=SC2086 # the flag is a word or none
    LOG=bench-bf16 step "run-$how" 60 "$glimpse" --max-memory "$max_memory" run --device "$device" --precision bf16 \
      --model "$ckpt" --tokens "$ids" $flag
    src=$?
    secs=$(since "$t0")
    # (This run's lines only: a run that printed no token must not read the one before it.)
    token=$(tail -n +"$(( lines + 1 ))" "$logs/bench-bf16.log" | sed -n 's/.*next token (greedy) \([0-9]*\).*/\1/p' | tail -n 1)
    if [ $src -eq 0 ] && [ -n "$token" ]; then
      one_off[$how]="$secs s, next token $token"
      next_token[$how]=$token
    else
      one_off[$how]=$(failed "run-$how" $src bench-bf16.log); rc=1
    fi
  done
  # The same arithmetic either way: a streamed run that picks another token is a failure.
  if [ -n "${next_token[whole]:-}" ] && [ -n "${next_token[stream]:-}" ] && [ "${next_token[whole]}" != "${next_token[stream]}" ]; then
    one_off[stream]+=" (NOT the whole run's)"; rc=1
  fi
fi
# Then: `audit` of 8 prompts of 256 tokens (at most TOKENS) of the same checkpoint in bf16, whole and with
# --stream (every prompt through a layer before the next, each layer uploaded once for all of
# them): the same counts (their CSVs byte for byte), and the time of each.
declare -A audited csv=([whole]=${TMPDIR:-/tmp}/glimpse-gpu-audit-whole.csv [stream]=${TMPDIR:-/tmp}/glimpse-gpu-audit-stream.csv)
if [ -e "$ckpt/config.json" ]; then
  prompts=${TMPDIR:-/tmp}/glimpse-gpu-prompts.txt
  length=$(( tokens < 256 ? tokens : 256 ))
  # (Ids under 100: within any vocabulary synth makes.)
  for p in $(seq 1 8); do
    awk -v p="$p" -v n="$length" 'BEGIN { for (i = 0; i < n; i++) printf "%s%d", (i ? "," : ""), (p * 7 + i * 13) % 100 + 1; print "" }'
  done > "$prompts"
  for how in whole stream; do
    flag=""; [ "$how" = stream ] && flag="--stream"
    rm -f "${csv[$how]}"
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086 # the flag is a word or none
    LOG=bench-bf16 step "audit-$how" 60 "$glimpse" --max-memory "$max_memory" audit --device "$device" \
      --precision bf16 --model "$ckpt" --prompts "$prompts" --csv "${csv[$how]}" $flag
    src=$?
    if [ $src -eq 0 ] && [ -s "${csv[$how]}" ]; then
      audited[$how]="$(since "$t0") s"
    else
      audited[$how]=$(failed "audit-$how" $src bench-bf16.log); rc=1
    fi
  done
  if [ -s "${csv[whole]}" ] && [ -s "${csv[stream]}" ]; then
    if cmp -s "${csv[whole]}" "${csv[stream]}"; then
      audited[stream]+=", the same counts"
    else
      audited[stream]+=", counts NOT the whole audit's"; rc=1
    fi
  fi
fi
# Last, with what time is left: the same checkpoint in block FP8 (`synth --dtype fp8`, GLM-5-FP8's
# format: 128 x 128 blocks of e4m3 codes and a scale each), benched in bf16 mode, where every
# product decodes its weight's codes straight to bf16 (`fp8_dequant_bf16`) before the tensor
# cores take it. Its log is appended to bench-f32.log (the device tool brings back 8 files, all
# taken), its profile printed after the bf16 ones.
ckpt_fp8=$ckpt-fp8
if [ -e "$ckpt/config.json" ] && [ $(( deadline - $(date +%s) )) -gt 60 ]; then
  if [ ! -e "$ckpt_fp8/config.json" ]; then
    # shellcheck disable=SC2086 # the synth arguments are words
    LOG=bench-f32 step synth-fp8 90 "$glimpse" synth $synth_args ${VOCAB:+--vocab "$VOCAB"} --dtype fp8 --out "$ckpt_fp8"
    src=$?
    [ $src -eq 0 ] || { [ $src -eq 124 ] || [ $src -eq 137 ] || rc=1; rm -rf "$ckpt_fp8"; }
  fi
  LOG=bench-f32 bench_run fp8 bf16 auto "$ckpt_fp8"
fi
{
echo
echo "$(date -u '+%F %H:%M UTC'), $("$glimpse" --version 2>/dev/null) ($built_from), scripts/gpu-check.sh with TOKENS=$tokens EXPERTS=$experts VOCAB=${VOCAB:-preset} DEVICE=$device PEAK_TFLOPS=$peak"
echo "| prefill $tokens tokens, synth $synth_args, $device | f32 products | bf16 products | bf16, --attention fused |"
echo "|---|---|---|---|"
echo "| median time, every position's logits | ${median[f32]:-?} s | ${median[bf16]:-?} s | ${median[fused]:-?} s |"
echo "| median time, last position's logits only | ${median_last[f32]:-?} s | ${median_last[bf16]:-?} s | ${median_last[fused]:-?} s |"
echo "| matrix products | ${tflops[f32]:-?} TFLOP/s ($(pct "${tflops[f32]:-0}") of bf16 peak $peak) | ${tflops[bf16]:-?} TFLOP/s ($(pct "${tflops[bf16]:-0}")) | ${tflops[fused]:-?} TFLOP/s ($(pct "${tflops[fused]:-0}")) |"
echo "| routed experts' GEMMs | ${expert_tflops[f32]:-?} TFLOP/s ($(pct "${expert_tflops[f32]:-0}")) | ${expert_tflops[bf16]:-?} TFLOP/s ($(pct "${expert_tflops[bf16]:-0}")) | ${expert_tflops[fused]:-?} TFLOP/s ($(pct "${expert_tflops[fused]:-0}")) |"
echo "| device memory | ${mem[f32]:-?} | ${mem[bf16]:-?} | ${mem[fused]:-?} |"
echo "| device memory estimated before the runs | ${mem_est[f32]:-?} | ${mem_est[bf16]:-?} | ${mem_est[fused]:-?} |"
echo "| transformers ${t_version:-} eager bf16 on $torch_device, every position's logits: ${t_median:-not measured} s$unscored | $(ratio "${t_median:-}" "${median[f32]:-}") | $(ratio "${t_median:-}" "${median[bf16]:-}") | $(ratio "${t_median:-}" "${median[fused]:-}") |"
echo "| the same, logits_to_keep=1: ${t_median_last:-not measured} s | $(ratio "${t_median_last:-}" "${median_last[f32]:-}") | $(ratio "${t_median_last:-}" "${median_last[bf16]:-}") | $(ratio "${t_median_last:-}" "${median_last[fused]:-}") |"
echo "| one-off run in bf16 (open, uploads, prefill): whole; --stream | | ${one_off[whole]:-not run}; ${one_off[stream]:-not run} | |"
echo "| audit of 8 prompts of ${length:-256} tokens in bf16: whole; --stream | | ${audited[whole]:-not run}; ${audited[stream]:-not run} | |"
echo "| the same checkpoint in block FP8 (synth --dtype fp8), bf16 products: every position's logits; last only; routed experts' GEMMs | | ${median[fp8]:-not run} s; ${median_last[fp8]:-not run} s; ${expert_tflops[fp8]:-?} TFLOP/s | |"
echo "| compute-sanitizer memcheck, kernels and products | ${sanitized[memcheck]} | | |"
echo "| compute-sanitizer racecheck, kernels and products | ${sanitized[racecheck]} | | |"
echo "| selftest --device $device | $selftest_verdict | | |"
timings=""
for name in "${step_order[@]}"; do timings+="${timings:+; }$name ${step_note[$name]}"; done
echo "| steps (seconds, exit code) | $timings | | |"
echo "total $(( $(date +%s) - start )) s"
# The bf16 prefills' profiles (bench's sections, and the attention's steps), as bench printed
# them: the default attention's, the fused one's, the FP8 checkpoint's; each from its own lines
# of its log (the one-off runs and audits append to bench-bf16.log after it).
declare -A titled=([bf16]="the default attention" [fused]="--attention fused" [fp8]="the block-FP8 checkpoint, bf16 products")
for run in bf16 fused fp8; do
  [ -n "${to[$run]:-}" ] || continue
  profile=$(sed -n "${from[$run]},${to[$run]}p" "${logfile[$run]}" | sed -n '/^[0-9]* more prefills, each section/,$p' | grep -v '^device memory')
  if [ -n "$profile" ]; then
    echo
    echo "bench $run (${titled[$run]}):"
    echo '```'
    echo "$profile"
    echo '```'
  fi
done
} | tee "$logs/table.md"
[ $rc -eq 0 ]
