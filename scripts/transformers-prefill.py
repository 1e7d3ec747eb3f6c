"""Times transformers' eager prefill of a glimpse checkpoint: the competitor in scripts/gpu-check.sh.

    python3 scripts/transformers-prefill.py MODEL_DIR TOKENS REPEAT [DEVICE=cuda] [DTYPE=bfloat16]

Loads the checkpoint with GlmMoeDsaForCausalLM (eager attention and experts), runs one warm-up
prefill of TOKENS tokens (the ids `glimpse bench` uses) in each form, then REPEAT timed ones of
each, alternating, synchronising the device around each: the forward as called plainly (every
position's logits) and with `logits_to_keep=1` (the last position's only, as `generate` prefills).
Prints one JSON line: {"load": s, "median": s, "median_last": s, "runs": [...], "runs_last": [...]}.
"""
import json
import statistics
import sys
import time

import torch
from transformers import GlmMoeDsaForCausalLM

model_dir, tokens, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "cuda"
dtype = getattr(torch, sys.argv[5] if len(sys.argv) > 5 else "bfloat16")

t0 = time.perf_counter()
m = GlmMoeDsaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
m.set_attn_implementation("eager")
# (A transformers from before the experts' implementations were selectable loops over them, as
# "eager" does; the GPU machine's image may hold an older one than 5.24.)
if hasattr(m, "set_experts_implementation"):
    m.set_experts_implementation("eager")
m.eval()
load = time.perf_counter() - t0
vocab = m.config.vocab_size
ids = torch.tensor([[(((i * 2654435761) & 0xFFFFFFFF) >> 7) % vocab for i in range(tokens)]], device=device)


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(**kwargs):
    t = time.perf_counter()
    m(ids, use_cache=False, **kwargs)
    sync()
    return time.perf_counter() - t


times, times_last = [], []
with torch.no_grad():
    timed()  # warm-ups, as glimpse bench does
    timed(logits_to_keep=1)
    for _ in range(repeat):
        times.append(timed())
        times_last.append(timed(logits_to_keep=1))
print(
    json.dumps(
        {
            "load": load,
            "median": statistics.median(times),
            "median_last": statistics.median(times_last),
            "runs": times,
            "runs_last": times_last,
        }
    )
)
