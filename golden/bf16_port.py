#!/usr/bin/env python3
"""A realistic "other implementation" for the default case: the transformers reference of
golden/flat run in bfloat16 (weights and activations), as a lower-precision port would run it.

It writes golden/flat/bf16-port.safetensors (format glm5-dump/1) with the spec's names plus the
margins that decided each selection (`layers.{i}.dsa.margin`, `layers.{i}.moe.margin`), so
`glimpse diff` and `glimpse tui` can show real flips against golden/flat/reference.safetensors and
tell near-ties from bugs. It is produced by transformers, not by glimpse.

    venv/bin/python golden/bf16_port.py [--out PATH]

The margins are the port's own, computed here from its scores; those scores are checked to make
the selection the port recorded (generate.py's `dsa_margins` and `routing_margins` assert that
every row a positive margin decides is the recorded set), so the margins describe its choices.
"""

import argparse
import hashlib
import math
import os
import sys

import torch
import transformers
from safetensors import safe_open
from transformers import GlmMoeDsaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate  # noqa: E402  (the golden generator: its hooks and writer)

HERE = os.path.dirname(os.path.abspath(__file__))
CASE = os.path.join(HERE, "flat")


def dsa_margin(scores: torch.Tensor, k: int) -> torch.Tensor:
    """K-th minus (K+1)-th causal score per query [B, S]; inf where every causal key is kept."""
    b, s, _ = scores.shape
    out = torch.full((b, s), math.inf)
    for q in range(s):
        if q + 1 > k:
            top = scores[:, q, : q + 1].float().sort(dim=-1, descending=True).values
            out[:, q] = top[:, k - 1] - top[:, k]
    return out


def moe_margin(logits: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """k-th minus (k+1)-th biased score per token (flat routing: checked in main)."""
    biased = logits.float().sigmoid() + bias.float()
    top = biased.sort(dim=-1, descending=True).values
    return top[:, k - 1] - top[:, k]


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(CASE, "bf16-port.safetensors"), help="default: golden/flat/")
    args = ap.parse_args(argv)
    with safe_open(os.path.join(CASE, "reference.safetensors"), "pt") as f:
        input_ids = f.get_tensor("input_ids")
    model = GlmMoeDsaForCausalLM.from_pretrained(CASE, dtype=torch.float32)
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    model = model.to(torch.bfloat16).eval()
    tensors, scores = generate.run_reference(model, input_ids)
    cfg = model.config
    if cfg.n_group != 1:
        raise SystemExit(f"moe_margin is flat routing's; this config has {cfg.n_group} groups")
    out = {}
    for name, t in tensors.items():
        out[name] = t.to(torch.int64) if not t.is_floating_point() else t.float()
    for i, s in scores.items():
        k = min(cfg.index_topk, s.shape[-1])
        causal = torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).tril()
        out[f"layers.{i}.dsa.scores"] = s.float().masked_fill(~causal, -math.inf).contiguous()
        out[f"layers.{i}.dsa.margin"] = dsa_margin(s, k).contiguous()
        generate.dsa_margins(s.float(), out[f"layers.{i}.dsa.topk"], k)  # asserts the scores make the selection
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            logits = out[f"layers.{i}.moe.router_logits"]
            bias = layer.mlp.gate.e_score_correction_bias
            out[f"layers.{i}.moe.margin"] = moe_margin(logits, bias, cfg.num_experts_per_tok).contiguous()
            generate.routing_margins(logits, bias, out[f"layers.{i}.moe.topk_ids"], cfg)  # asserts the routing
    with open(os.path.join(CASE, "config.json"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    meta = {
        "format": "glm5-dump/1",
        "source": f"transformers {transformers.__version__} / torch {torch.__version__}, eager, bfloat16 weights "
        "and activations (a stand-in for a lower-precision port; compare with reference.safetensors)",
        "config_sha256": sha,
        "model": "flat",
        "generator": "golden/bf16_port.py",
    }
    path = args.out
    generate.save_safetensors(out, path, meta)
    print(f"wrote {path}: {len(out)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
