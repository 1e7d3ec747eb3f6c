#!/usr/bin/env bash
# Prefill speed of glimpse against transformers' eager forward on the same checkpoint, the same
# tokens and the same number of threads, alternating the two in one run (machine noise hits both
# alike). Prints each run's median and the ratio of the medians, and the time from nothing to the
# first logits (opening the checkpoint plus the first prefill, which pays paging the weights in).
#
#   scripts/bench-vs-transformers.sh MODEL_DIR [TOKENS=128] [THREADS=2] [ROUNDS=2] [REPEAT=3]
#
# MODEL_DIR: e.g. the output of
#   glimpse synth --preset glm5 --layers 2 --experts 16 --vocab 4096 --dtype bf16 --out /tmp/glm5-2l
# Environment: GLIMPSE (default target/release/glimpse), PYTHON (default python3). Installs nothing.
set -euo pipefail
model=${1:?usage: scripts/bench-vs-transformers.sh MODEL_DIR [TOKENS] [THREADS] [ROUNDS] [REPEAT]}
tokens=${2:-128}
threads=${3:-2}
rounds=${4:-2}
repeat=${5:-3}
. "$(dirname "$0")/side-by-side.sh"

# The same token ids glimpse bench uses: ((i * 2654435761 mod 2^32) >> 7) mod vocab.
read -r -d '' reference <<'PY' || true
import json, statistics, sys, time
import torch
from transformers import GlmMoeDsaForCausalLM
model_dir, tokens, threads, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
t0 = time.perf_counter()
m = GlmMoeDsaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
m.set_attn_implementation("eager")
if hasattr(m, "set_experts_implementation"):  # (transformers releases before it have eager experts only)
    m.set_experts_implementation("eager")
m.eval()
load = time.perf_counter() - t0
vocab = m.config.vocab_size
ids = torch.tensor([[(((i * 2654435761) & 0xFFFFFFFF) >> 7) % vocab for i in range(tokens)]])
times = []
with torch.no_grad():
    t = time.perf_counter()
    m(ids, use_cache=False)  # warm-up, as glimpse bench does
    first = time.perf_counter() - t
    for _ in range(repeat):
        t = time.perf_counter()
        m(ids, use_cache=False)
        times.append(time.perf_counter() - t)
print(json.dumps({"load": load, "first": first, "median": statistics.median(times), "runs": times}))
PY

g_medians=()
t_medians=()
g_firsts=()
t_firsts=()
for r in $(seq 1 "$rounds"); do
  out=$("$glimpse" --threads "$threads" bench --model "$model" --tokens "$tokens" --repeat "$repeat")
  g=$(echo "$out" | sed -n 's/.*recording nothing: *median \([0-9.]*\) s.*/\1/p')
  g_load=$(echo "$out" | sed -n 's/^load[^:]*: \([0-9.]*\) s.*/\1/p')
  g_first=$(echo "$out" | sed -n 's/.*first prefill[^:]*: \([0-9.]*\) s.*/\1/p')
  # What glimpse's products computed in (bf16 weights on AMX tiles round the activations to bf16
  # too, where transformers computes in f32): said in the table.
  g_products=$(echo "$out" | sed -n 's/^weights: .*; products \(.*\)$/\1/p')
  g_medians+=("$g")
  t_json=$(transformers_json "$reference" "$model" "$tokens" "$threads" "$repeat")
  read -r t t_load t_fwd < <("$python" -c 'import json,sys; d = json.loads(sys.argv[1])
print(round(d["median"], 3), round(d["load"], 2), round(d["first"], 3))' "$t_json")
  t_medians+=("$t")
  g_firsts+=("$(awk -v a="$g_load" -v b="$g_first" 'BEGIN { print a + b }')")
  t_firsts+=("$(awk -v a="$t_load" -v b="$t_fwd" 'BEGIN { print a + b }')")
  echo "round $r: glimpse ${g}s (load ${g_load}s, first prefill ${g_first}s)   transformers ${t}s (load ${t_load}s, first forward ${t_fwd}s)"
done

"$python" - "$tokens" "$threads" "${g_medians[*]}" "${t_medians[*]}" "${g_firsts[*]}" "${t_firsts[*]}" "${g_products:-}" <<'PY'
import statistics, sys
tokens, threads = int(sys.argv[1]), int(sys.argv[2])
g, t, g_first, t_first = (statistics.median(float(x) for x in a.split()) for a in sys.argv[3:7])
products = f" (products {sys.argv[7]})" if sys.argv[7] else ""
print(f"| tool | threads | prefill {tokens} tokens (median) | tok/s |")
print("|---|---|---|---|")
print(f"| glimpse{products} | {threads} | {g:.3f} s | {tokens / g:.1f} |")
print(f"| transformers (eager, f32) | {threads} | {t:.3f} s | {tokens / t:.1f} |")
print(f"ratio: glimpse is {t / g:.2f}x transformers' tokens/s")
ratio = f": {t_first / g_first:.1f}x" if g_first > 0 else " (glimpse's below the 0.01 s it prints)"
print(f"first logits (open + first prefill, medians): glimpse {g_first:.2f} s, transformers {t_first:.2f} s{ratio}")
PY
