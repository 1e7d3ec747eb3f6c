#!/usr/bin/env bash
# Greedy decode speed of glimpse against transformers' generate on the same checkpoint, the same
# prompt and the same number of threads, alternating the two in one run (machine noise hits both
# alike). Reports the median time of one decode step (a new token through the KV cache, prompt
# excluded) and the whole generation (prompt included), the ratios, and whether both generated
# the same tokens.
#
#   scripts/decode-vs-transformers.sh MODEL_DIR [PROMPT=128] [NEW=16] [THREADS=2] [ROUNDS=3]
#
# MODEL_DIR: e.g. the output of
#   glimpse synth --preset glm5 --layers 2 --experts 16 --vocab 4096 --dtype bf16 --out /tmp/glm5-2l
# Environment: GLIMPSE (default target/release/glimpse), PYTHON (default python3). Installs nothing.
set -euo pipefail
model=${1:?usage: scripts/decode-vs-transformers.sh MODEL_DIR [PROMPT] [NEW] [THREADS] [ROUNDS]}
prompt=${2:-128}
new=${3:-16}
threads=${4:-2}
rounds=${5:-3}
if ! [ "$new" -ge 2 ] 2>/dev/null; then
  echo "NEW must be at least 2 (a decode step is a token after the first), got $new" >&2
  exit 2
fi
. "$(dirname "$0")/side-by-side.sh"

# The same token ids glimpse bench uses: ((i * 2654435761 mod 2^32) >> 7) mod vocab.
vocab=$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1] + "/config.json"))["vocab_size"])' "$model")
ids=$("$python" -c 'import sys; n, v = int(sys.argv[1]), int(sys.argv[2]); print(",".join(str((((i * 2654435761) & 0xFFFFFFFF) >> 7) % v) for i in range(n)))' "$prompt" "$vocab")

# transformers: generate(1) is the prompt plus the first token; generate(NEW) adds NEW-1 steps.
read -r -d '' reference <<'PY' || true
import json, sys, time
import torch
from transformers import GlmMoeDsaForCausalLM
model_dir, ids, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
m = GlmMoeDsaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
m.set_attn_implementation("eager")
m.set_experts_implementation("eager")
m.eval()
x = torch.tensor([[int(t) for t in ids.split(",")]])
def gen(n):
    t = time.perf_counter()
    # No eos: glimpse runs with --ignore-eos, so both make n tokens whichever they are (an eos
    # included: min_new_tokens would forbid it, and so change the tokens). The mask is explicit,
    # or a prompt token equal to pad_token_id would be read as padding.
    out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, eos_token_id=None,
                     do_sample=False, use_cache=True)
    return time.perf_counter() - t, out[0, x.shape[1]:].tolist()
with torch.no_grad():
    gen(2)  # warm-up
    first, _ = gen(1)
    total, tokens = gen(new)
print(json.dumps({"first": first, "total": total, "step": (total - first) / (new - 1), "tokens": tokens}))
PY

g_steps=(); g_totals=(); t_steps=(); t_totals=()
for r in $(seq 1 "$rounds"); do
  out=$("$glimpse" --threads "$threads" generate --model "$model" --tokens "$ids" --max-new-tokens "$new" --ignore-eos 2>&1)
  g_step=$(echo "$out" | sed -n 's/.*decode median \([0-9.]*\) s per step.*/\1/p')
  g_total=$(echo "$out" | sed -n 's/.* new tokens in \([0-9.]*\) s including.*/\1/p')
  g_tokens=$(echo "$out" | sed -n 's/^row 0: generated \[\(.*\)\]/\1/p' | tr -d ' ')
  t_json=$(transformers_json "$reference" "$model" "$ids" "$new" "$threads")
  read -r t_step t_total t_tokens < <("$python" -c 'import json,sys; d = json.loads(sys.argv[1]); print(d["step"], d["total"], ",".join(map(str, d["tokens"])))' "$t_json")
  g_steps+=("$g_step"); g_totals+=("$g_total"); t_steps+=("$t_step"); t_totals+=("$t_total")
  same=$([ "$g_tokens" = "$t_tokens" ] && echo "same tokens" || echo "TOKENS DIFFER: glimpse $g_tokens, transformers $t_tokens")
  echo "round $r: glimpse step ${g_step}s total ${g_total}s   transformers step ${t_step}s total ${t_total}s   ($same)"
done

"$python" - "$prompt" "$new" "$threads" "${g_steps[*]}" "${g_totals[*]}" "${t_steps[*]}" "${t_totals[*]}" <<'PY'
import statistics, sys
prompt, new, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
med = lambda s: statistics.median(float(x) for x in s.split())
gs, gt, ts, tt = (med(a) for a in sys.argv[4:8])
print(f"| tool | threads | decode step (median) | decode tok/s | {prompt}-token prompt + {new} tokens | overall tok/s |")
print("|---|---|---|---|---|---|")
print(f"| glimpse | {threads} | {gs:.4f} s | {1 / gs:.2f} | {gt:.3f} s | {new / gt:.2f} |")
print(f"| transformers generate (eager, f32) | {threads} | {ts:.4f} s | {1 / ts:.2f} | {tt:.3f} s | {new / tt:.2f} |")
print(f"ratio: glimpse decodes {ts / gs:.2f}x transformers' tokens/s ({tt / gt:.2f}x with the prompt)")
PY
