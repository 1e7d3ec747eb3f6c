#!/usr/bin/env python3
"""Transformers reference dump (format `glm5-dump/1`) for an EXISTING GLM-5 checkpoint folder,
for example one written by `glimpse synth`.

    venv/bin/python golden/reference.py --model DIR --tokens "1,2,3;4,5,6" --out FILE.safetensors
    venv/bin/python golden/reference.py --model DIR --random-tokens B,S [--seed N] --out FILE.safetensors
    venv/bin/python golden/reference.py --model DIR --tokens-from DUMP --products bf16 --out FILE.safetensors
    venv/bin/python golden/reference.py --model DIR --tokens-from DUMP --mtp --out FILE.safetensors

Loading:
  * no FP8 weights: `GlmMoeDsaForCausalLM.from_pretrained(DIR, dtype=float32, eager attention,
    eager experts)`. The load must report no missing keys (unexpected keys only for an MTP
    layer), and every loaded parameter must equal the stored value upcast to f32.
  * FP8 (any `*.weight_scale_inv`): transformers 5.24's dequantiser gets partial edge blocks wrong
    (see golden/README.md), so the weights are dequantised here with fixed 128x128 blocks on a ceil
    grid (`q.float() * scale_inv`, last block partial) and loaded as a state dict, like
    golden/generate.py does for its FP8 case.

`--mtp` also writes the MTP layer's forward (`mtp.*` and `layers.{N}.*`, N = num_hidden_layers),
which transformers never runs, with golden/generate.py's `MtpBlock` (transformers' own decoder
layer, and the glue the design notes define) on this run's `final_norm`, as generate.py writes
golden/mtp's; with `--products bf16` its products are rounded too.

`--products bf16` writes the reference for glimpse's bf16 mode (`--precision bf16`): the same f32
run, except that every `torch.nn.functional.linear` (every projection, the router, each expert and
the lm_head) gets its input and its weight rounded to bf16 (round to nearest even) and
accumulates and returns f32, and so do the attention's two products: the scores take q and k
rounded to bf16, and `P v` the softmax's probabilities and v (the scores and the softmax stay
f32, as in a bf16 flash attention; transformers' own bf16 run also rounds the scores). The
indexer's scores (which transformers computes in f32 in a bf16 run too), norms, RoPE and routing
stay f32. That is the arithmetic bf16 tensor cores do with f32 accumulation, computed by
transformers' own modules, so glimpse's bf16 path is checked against the reference rather than
against itself.
The float64 rerun stays unrounded: where the bf16 run selects differently, that is reported.

The hook code, the margin checks (plus a float64 rerun whose selections are compared) and the
dump writer are golden/generate.py's own, imported. The dump holds every name of the spec plus
`layers.{i}.dsa.scores` on full indexer layers. A selection margin below 1e-3 only warns: a
correct implementation may then legitimately pick differently.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys

import torch
import transformers
from safetensors import safe_open
from transformers import GlmMoeDsaForCausalLM
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as M

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as G  # noqa: E402  (golden/generate.py)

GENERATOR = "golden/reference.py"
SCALE_SUFFIX = "_scale_inv"


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------

def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        return ["model.safetensors"]
    raise SystemExit(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")


def read_checkpoint(model_dir: str) -> dict[str, torch.Tensor]:
    """Every stored tensor, as stored (dtype included)."""
    out: dict[str, torch.Tensor] = {}
    for fname in checkpoint_files(model_dir):
        with safe_open(os.path.join(model_dir, fname), "pt") as f:
            for k in f.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = f.get_tensor(k)
    return out


def effective_weights(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact f32 values the reference runs on: FP8 weights dequantised per 128x128 block
    (partial edge blocks), everything else upcast (bf16 -> f32 is exact)."""
    eff = {}
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX):
            assert name[: -len(SCALE_SUFFIX)] in stored, f"{name} without its weight"
            continue
        scale = stored.get(name + SCALE_SUFFIX)
        if scale is not None:
            assert t.dtype == torch.float8_e4m3fn and t.dim() == 2, (name, t.dtype, tuple(t.shape))
            want = (-(-t.shape[0] // G.FP8_BLOCK), -(-t.shape[1] // G.FP8_BLOCK))
            assert tuple(scale.shape) == want, f"{name}{SCALE_SUFFIX}: shape {tuple(scale.shape)}, want {want}"
            eff[name] = G.fp8_dequantise(t, scale.to(torch.float32))
        else:
            assert t.dtype != torch.float8_e4m3fn, f"{name}: FP8 without {SCALE_SUFFIX}"
            eff[name] = t.to(torch.float32)
    return eff


def to_transformers_names(cfg: dict, eff: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> transformers' parameter names. Per-expert tensors are fused as
    generate.py does; a checkpoint already in the fused layout (`mlp.experts.gate_up_proj`,
    `mlp.experts.down_proj`) passes through."""
    fused = {k: v for k, v in eff.items() if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))}
    rest = {k: v for k, v in eff.items() if k not in fused}
    sd = G.transformers_state_dict(cfg, rest)
    n = G.hf_config(cfg).num_hidden_layers
    sd.update({k: v for k, v in fused.items() if int(k.split(".")[2]) < n})
    return sd


def mtp_block(cfg: dict, model: GlmMoeDsaForCausalLM, effective: dict[str, torch.Tensor]):
    """The MTP layer (model.layers.{N}), which transformers never runs, as golden/generate.py runs
    golden/mtp's (`MtpBlock`, around transformers' own decoder layer), from the per-expert layout
    that block loads."""
    p = f"model.layers.{cfg['num_hidden_layers']}."
    own = {k: v for k, v in effective.items() if k.startswith(p)}
    if not own:
        raise SystemExit(f"--mtp: the checkpoint holds no MTP layer ({p}*)")
    if any(".mlp.experts.gate_up_proj" in k or ".mlp.experts.down_proj" in k for k in own):
        raise SystemExit(f"--mtp: the MTP layer ({p}*) holds its experts fused; MtpBlock loads them per expert")
    return G.build_mtp(model, own)


def load_from_pretrained(model_dir: str, cfg: dict, sd: dict[str, torch.Tensor]) -> tuple[GlmMoeDsaForCausalLM, str]:
    """Plain from_pretrained, then proof that it loaded what the files hold."""
    model, info = G.from_pretrained_checked(model_dir, cfg["num_hidden_layers"], sd)
    model = model.to(torch.float32).eval()
    G.check_rope(cfg, model)
    n_mtp = len(info["unexpected_keys"])
    return model, f"from_pretrained (no missing keys, weights identical to the files; {n_mtp} MTP keys ignored)"


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

def parse_tokens(text: str, vocab: int) -> torch.Tensor:
    rows = [[int(x) for x in row.split(",") if x.strip()] for row in text.split(";") if row.strip()]
    if not rows or not rows[0]:
        raise SystemExit("--tokens: no tokens")
    if len({len(r) for r in rows}) != 1:
        raise SystemExit(f"--tokens: rows differ in length ({[len(r) for r in rows]})")
    ids = torch.tensor(rows, dtype=torch.int64)
    if ids.min() < 0 or ids.max() >= vocab:
        raise SystemExit(f"--tokens: ids must be in [0, {vocab})")
    return ids


def random_tokens(spec: str, seed: int, vocab: int) -> torch.Tensor:
    try:
        b, s = (int(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(f"--random-tokens: want B,S, got {spec!r}")
    if b < 1 or s < 1:
        raise SystemExit("--random-tokens: B and S must be positive")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=gen, dtype=torch.int64)


# --------------------------------------------------------------------------------------------

def source_text(kind: str, loader: str) -> str:
    weights = {
        "f32": "f32 weights",
        "bf16": "weights = the stored bf16 values, upcast",
        "fp8": "weights = DEQUANTISED block-FP8 (q.float() * scale_inv per 128x128 block)",
    }[kind]
    return (
        f"transformers {transformers.__version__} / torch {torch.__version__.split('+')[0]}, "
        f"eager attention + eager experts, float32, cpu; {weights}; {loader}"
    )


class Bf16Products:
    """Within it, `F.linear(x, w, b)` computes `bf16(x) @ bf16(w).T + b` in f32, and the attention's
    two products take bf16 operands with f32 accumulation (see the doc)."""

    attention_calls = 0  # the patched attention's calls in this run (`bf16_attention`)
    rounded_weights: set[int] = set()  # the storages of the weights the patched F.linear took

    def __enter__(self):
        # `bf16_attention` is a copy of 5.24's eager attention: a transformers whose copy differs
        # would be silently replaced by it.
        source = hashlib.sha256(inspect.getsource(M.eager_attention_forward).encode()).hexdigest()
        if source != EAGER_ATTENTION_5_24:
            raise SystemExit(
                f"transformers {transformers.__version__}'s eager_attention_forward is not 5.24's: "
                "update bf16_attention in golden/reference.py from it"
            )
        Bf16Products.attention_calls = 0
        Bf16Products.rounded_weights = set()
        self.linear = torch.nn.functional.linear
        self.attention = M.eager_attention_forward
        plain = self.linear

        def rounded(x, w, b=None):
            Bf16Products.rounded_weights.add(w.untyped_storage().data_ptr())
            return plain(x.to(torch.bfloat16).to(x.dtype), w.to(torch.bfloat16).to(w.dtype), b)

        torch.nn.functional.linear = rounded
        M.eager_attention_forward = bf16_attention
        return self

    def __exit__(self, *exc):
        torch.nn.functional.linear = self.linear
        M.eager_attention_forward = self.attention

    @staticmethod
    def unrounded(modules: list[torch.nn.Module]) -> list[str]:
        """The product weights of `modules` (every parameter of two or more dimensions but the
        embeddings: projections, routers, fused experts, lm_head) that no call of the patched
        F.linear took: a product transformers computes some other way (`@`, or `F.linear` bound
        before the patch) would be left in f32, and the bf16 reference with it, silently."""
        return [
            name
            for module in modules
            for name, p in module.named_parameters()
            if p.dim() >= 2
            and not name.endswith("embed_tokens.weight")
            and p.untyped_storage().data_ptr() not in Bf16Products.rounded_weights
        ]


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to bf16 (nearest even), kept in its own dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


def bf16_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers 5.24's `eager_attention_forward` with the operands of its two products rounded
    to bf16: the scores `bf16(q) bf16(k)^T` and `bf16(P) bf16(v)` accumulate and stay f32, and the
    softmax is f32 between them (what a bf16 flash attention computes)."""
    Bf16Products.attention_calls += 1
    key_states = M.repeat_kv(key, module.num_key_value_groups)
    value_states = M.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(to_bf16(query), to_bf16(key_states).transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(to_bf16(attn_weights), to_bf16(value_states))
    return attn_output.transpose(1, 2).contiguous(), attn_weights


# sha256 of `inspect.getsource` of transformers 5.24.0's glm_moe_dsa `eager_attention_forward`.
EAGER_ATTENTION_5_24 = "cb34ccea28710ae8d5d94a241b704ea3d974048f85372f0b1b3c2a8a2ef1ee20"


def storage_kind(stored: dict[str, torch.Tensor]) -> str:
    dtypes = {t.dtype for t in stored.values()}
    if torch.float8_e4m3fn in dtypes:
        return "fp8"
    return "bf16" if dtypes & {torch.bfloat16, torch.float16} else "f32"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    tok = ap.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokens", help='token ids, rows separated by ";" (e.g. "1,2,3;4,5,6")')
    tok.add_argument("--random-tokens", metavar="B,S", help="B rows of S uniform random token ids")
    tok.add_argument("--tokens-from", metavar="DUMP", help="the input_ids of an existing dump")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-tokens (default 0)")
    ap.add_argument("--out", required=True, help="dump to write (.safetensors)")
    ap.add_argument(
        "--products",
        choices=["f32", "bf16"],
        default="f32",
        help="f32 (default), or bf16: every linear's and the attention's operands rounded to bf16, f32 accumulation",
    )
    ap.add_argument(
        "--mtp",
        action="store_true",
        help="also the MTP layer's forward (mtp.*, layers.{N}.*), as golden/generate.py writes golden/mtp's",
    )
    args = ap.parse_args(argv)

    torch.manual_seed(0)  # model construction draws from the global RNG; its values are overwritten anyway
    torch.use_deterministic_algorithms(True)

    with open(os.path.join(args.model, "config.json"), "rb") as f:
        config_bytes = f.read()
    cfg = json.loads(config_bytes)
    if cfg.get("model_type") != "glm_moe_dsa":
        raise SystemExit(f"{args.model}: model_type {cfg.get('model_type')!r}, want 'glm_moe_dsa'")
    c = G.hf_config(cfg)
    vocab = c.vocab_size
    if args.tokens is not None:
        input_ids = parse_tokens(args.tokens, vocab)
    elif args.tokens_from is not None:
        with safe_open(args.tokens_from, "pt") as f:
            input_ids = f.get_tensor("input_ids").to(torch.int64)
    else:
        input_ids = random_tokens(args.random_tokens, args.seed, vocab)
    B, S = input_ids.shape

    stored = read_checkpoint(args.model)
    kind = storage_kind(stored)
    effective = effective_weights(stored)
    sd = to_transformers_names(cfg, effective)
    if kind == "fp8":
        model = G.build_model(cfg, sd)
        loader = "FP8 dequantised here, state dict loaded into GlmMoeDsaForCausalLM(config)"
    else:
        model, loader = load_from_pretrained(args.model, cfg, sd)
    del stored
    mtp = mtp_block(cfg, model, effective) if args.mtp else None
    own_head = f"model.layers.{cfg['num_hidden_layers']}.shared_head.head.weight" in effective
    del effective

    if args.products == "bf16":
        with Bf16Products():
            tensors, scores = G.run_reference(model, input_ids, mtp)
        # The patch must have reached every layer's attention, once each (transformers looks the
        # eager function up by name at each call; a version that bound it earlier would bypass it).
        layers = cfg["num_hidden_layers"] + (mtp is not None)
        if Bf16Products.attention_calls != layers:
            raise SystemExit(f"bf16 attention ran {Bf16Products.attention_calls} times for {layers} layers")
        # And every product's weight went through the patched F.linear.
        left = Bf16Products.unrounded([model] + ([mtp] if mtp is not None else []))
        if left:
            raise SystemExit(f"bf16 products: {len(left)} weight(s) never went through the patched F.linear: {left[:5]}")
    else:
        tensors, scores = G.run_reference(model, input_ids, mtp)
    checks = G.check_selections(cfg, sd, tensors, scores, model, mtp)
    dump = G.dump_tensors(cfg, tensors, scores)
    G.check_dump_shapes(cfg, dump, B, S, mtp is not None)

    metadata = {
        "format": G.DUMP_FORMAT,
        "source": source_text(kind, loader)
        + (
            "; bf16 products: every F.linear's input and weight, and the attention's q, k, probabilities and v, "
            "rounded to bf16 (nearest even), f32 accumulation"
            if args.products == "bf16"
            else ""
        ),
        "products": args.products,
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "model": args.model,
        "generator": GENERATOR,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokens": "--tokens"
        if args.tokens is not None
        else f"--tokens-from {args.tokens_from}"
        if args.tokens_from is not None
        else f"--random-tokens {B},{S} --seed {args.seed}",
        "indexer_types": ",".join(c.indexer_types),
        "mlp_layer_types": ",".join(c.mlp_layer_types),
        "min_routing_margin": repr(checks["routing_margin"]),
        "min_group_margin": repr(checks["group_margin"]),
        "min_dsa_margin": repr(checks["dsa_margin"]),
        "margin_threshold": repr(G.MARGIN_MIN),
        "f64_selection_agreement": f"{checks['f64_agree']}/{checks['f64_total']}",
        "extra_tensors": "layers.{i}.dsa.scores (full indexer layers): indexer scores [B,S,S], -inf where j > s",
    }
    if mtp is not None:
        metadata["mtp_reference"] = G.mtp_reference_text(cfg, own_head)
    if args.random_tokens is not None:
        metadata["seed"] = str(args.seed)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    G.save_safetensors(dump, args.out, metadata)
    with safe_open(args.out, "pt") as f:  # what a consumer sees must be what we meant to write
        assert f.metadata() == metadata
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), dump[k]), k

    print(f"{args.out}: {len(dump)} tensors, B={B} S={S}, {kind} weights, {loader}")
    rot = model.model.rotary_emb
    print(
        f"  indexer_types {metadata['indexer_types']}; mlp_layer_types {metadata['mlp_layer_types']}; "
        f"rope {rot.rope_type} (cos/sin factor {rot.attention_scaling:.6g}, "
        f"softmax scale {model.model.layers[0].self_attn.scaling:.6g})"
    )
    print(f"  {G.fmt_checks(checks)}; max |logits f32 - f64| {checks['max_abs_logit_diff_f64']:.2e}")
    sys.stdout.flush()  # keep the warnings below after the summary when both streams share a file
    low = [
        f"{what} {checks[key]:.3g}"
        for what, key in (("routing", "routing_margin"), ("group", "group_margin"), ("DSA", "dsa_margin"))
        if not checks[key] > G.MARGIN_MIN
    ]
    if low:
        log(
            f"reference.py: warning: near-tie: min {', '.join(low)} margin below {G.MARGIN_MIN:g}; a correct "
            "implementation may legitimately flip that selection (try other tokens or weights)"
        )
    if checks["f64_agree"] != checks["f64_total"]:
        log(
            f"reference.py: warning: float64 run selects differently in "
            f"{checks['f64_total'] - checks['f64_agree']} of {checks['f64_total']} rows"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
