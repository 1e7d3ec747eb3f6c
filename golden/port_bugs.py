#!/usr/bin/env python3
"""Ports with a bug, as transformers would run them: the transformers reference (eager, f32) of a
golden case's own tokens with one bug that real GLM-5 / DeepSeek-V3 ports have shipped planted in
transformers' own modules, dumped in format glm5-dump/1 as golden/<case>/port-*.safetensors
(`PORTS` below: attention, indexer, routing, shared-expert, latent-norm and MTP bugs). `glimpse
diff --model` must read each from its dump and the case's reference.safetensors
(tests/readings.rs). `CONTROLS` are dumps of no port's bug that it must not read as one
(golden/flat/control-scale-x1.2.safetensors: the softmax scale times 1.2, 2% off the scale of
qk_nope_head_dim). They are produced by transformers, not by glimpse; the table of them is in
golden/README.md.

    venv/bin/python golden/port_bugs.py
"""

import contextlib
import hashlib
import os
import sys

import torch
import transformers
from safetensors import safe_open
from transformers import AttentionInterface, GlmMoeDsaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as glm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate  # noqa: E402  (the golden generator: its hooks and writer)

HERE = os.path.dirname(os.path.abspath(__file__))


INTERLEAVED = glm.apply_rotary_pos_emb_interleave


def rope_in_halves(unsqueeze: int):
    """A plant: transformers' `apply_rotary_pos_emb` (Llama's rotate_half) where the interleaved
    one is called with `unsqueeze_dim=unsqueeze`: 1 is MLA's call, 2 the indexer's (DeepSeek-V3.2's
    indexer RoPE is half-split; GLM-5's is not)."""

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        if unsqueeze_dim != unsqueeze:
            return INTERLEAVED(q, k, cos, sin, position_ids, unsqueeze_dim)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rotate_half(x):
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
            return torch.cat((-x2, x1), dim=-1)

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    @contextlib.contextmanager
    def plant(model, mtp):
        glm.apply_rotary_pos_emb_interleave = rope
        try:
            yield
        finally:
            glm.apply_rotary_pos_emb_interleave = INTERLEAVED

    return plant


@contextlib.contextmanager
def indexer_masks_own_key(model, mtp):
    """The indexer's causal mask `j < s` for `j <= s`: each query's own key masked too."""
    forward = glm.GlmMoeDsaIndexer.forward

    def masked(self, hidden_states, q_resid, position_embeddings, attention_mask, *args, **kwargs):
        s = attention_mask.shape[-1]
        diagonal = torch.eye(s, dtype=torch.bool)
        attention_mask = attention_mask.masked_fill(diagonal, torch.finfo(attention_mask.dtype).min)
        return forward(self, hidden_states, q_resid, position_embeddings, attention_mask, *args, **kwargs)

    glm.GlmMoeDsaIndexer.forward = masked
    try:
        yield
    finally:
        glm.GlmMoeDsaIndexer.forward = forward


def routers(model):
    return [layer.mlp.gate for layer in model.model.layers if isinstance(layer.mlp, glm.GlmMoeDsaMoE)]


@contextlib.contextmanager
def no_bias_in_selection(model, mtp):
    """Experts chosen by the sigmoid scores alone: `e_score_correction_bias` left out."""
    for gate in routers(model):
        gate.e_score_correction_bias.zero_()
    yield


@contextlib.contextmanager
def weights_from_biased_scores(model, mtp):
    """The chosen experts' weights gathered from the biased scores (`scores + bias`)."""
    for gate in routers(model):
        forward = gate.forward

        def biased(hidden_states, gate=gate, forward=forward):
            logits, _, ids = forward(hidden_states)
            w = (logits.sigmoid() + gate.e_score_correction_bias).gather(1, ids)
            if gate.norm_topk_prob:
                w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, w * gate.routed_scaling_factor, ids

        gate.forward = biased
    yield


@contextlib.contextmanager
def no_routed_scaling(model, mtp):
    for gate in routers(model):
        gate.routed_scaling_factor = 1.0
    yield


@contextlib.contextmanager
def no_shared_expert(model, mtp):
    """A MoE layer's output without its shared expert: the routed experts' sum alone."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, glm.GlmMoeDsaMoE):
            layer.mlp.shared_experts.forward = torch.zeros_like
    yield


@contextlib.contextmanager
def experts_gate_up_swapped(model, mtp):
    """The routed experts' fused `gate_up_proj` split the wrong way round: the up rows taken
    for the gate, the gate rows for up (`silu(x W_up) * x W_gate`)."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, glm.GlmMoeDsaMoE):
            w = layer.mlp.experts.gate_up_proj
            half = w.shape[1] // 2
            w.data = torch.cat([w.data[:, half:], w.data[:, :half]], dim=1)
    yield


@contextlib.contextmanager
def no_mscale(model, mtp):
    """Every layer's `scaling` as `GlmMoeDsaAttention.__init__` sets it without `yarn_apply_mscale`."""
    for layer in model.model.layers:
        layer.self_attn.scaling = layer.self_attn.qk_head_dim**-0.5
    yield


@contextlib.contextmanager
def absorbed_scale(model, mtp):
    c = model.config
    for layer in model.model.layers:
        layer.self_attn.scaling = (c.kv_lora_rank + c.qk_rope_head_dim) ** -0.5
    yield


def eager_without_indices(module, query, key, value, attention_mask, indices=None, **kwargs):
    """transformers' eager attention, for a backend of another name: `GlmMoeDsaAttention` applies
    its DSA index mask only for "eager" and "sdpa" and hands any other backend the indices."""
    return glm.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("eager_without_indices", eager_without_indices)
AttentionMaskInterface.register("eager_without_indices", eager_mask)  # eager's causal mask


@contextlib.contextmanager
def dense(model, mtp):
    model.set_attn_implementation("eager_without_indices")
    yield


@contextlib.contextmanager
def kv_norm_over_rope(model, mtp):
    """`kv_a_layernorm`'s mean square taken over the whole `kv_a_proj_with_mqa` output, the rope
    part included, as a port that norms before it splits does."""
    for layer in model.model.layers:
        attn, stash = layer.self_attn, {}
        attn.kv_a_proj_with_mqa.register_forward_hook(lambda module, args, out, stash=stash: stash.update(full=out))

        def forward(x, norm=attn.kv_a_layernorm, stash=stash):
            variance = stash["full"].to(torch.float32).pow(2).mean(-1, keepdim=True)
            return norm.weight * (x.to(torch.float32) * torch.rsqrt(variance + norm.variance_epsilon)).to(x.dtype)

        attn.kv_a_layernorm.forward = forward
    yield


@contextlib.contextmanager
def kv_norm_weight_not_loaded(model, mtp):
    """`kv_a_layernorm.weight` left at its initial ones: a checkpoint key the port's loader does
    not map (transformers itself only warns of one)."""
    for layer in model.model.layers:
        layer.self_attn.kv_a_layernorm.weight.data.fill_(1.0)
    yield


@contextlib.contextmanager
def mtp_fed_before_final_norm(model, mtp):
    """The MTP head fed the last layer's output (the input of the final norm), not the final norm's
    output: the hidden state a port's decoder loop has at hand."""
    stash = {}
    hook = model.model.norm.register_forward_pre_hook(lambda module, args: stash.update(h=args[0]))
    forward = mtp.forward
    mtp.forward = lambda input_ids, h, rotary_emb: forward(input_ids, stash["h"], rotary_emb)
    try:
        yield
    finally:
        hook.remove()


def mtp_block(model, case_dir: str):
    """The case's MTP block (generate.build_mtp) from the MTP layer's tensors in its files."""
    p = f"model.layers.{model.config.num_hidden_layers}."
    weights = {}
    for name in sorted(os.listdir(case_dir)):
        if name.startswith("model") and name.endswith(".safetensors"):
            with safe_open(os.path.join(case_dir, name), "pt") as f:
                weights.update({k: f.get_tensor(k).to(torch.float32) for k in f.keys() if k.startswith(p)})
    return generate.build_mtp(model, weights)


def in_bf16(plant):
    """`plant` in a port that runs in bfloat16, weights and activations (as bf16_port.py runs)."""

    @contextlib.contextmanager
    def bf16(model, mtp):
        model.to(torch.bfloat16)
        with plant(model, mtp):
            yield

    return bf16


@contextlib.contextmanager
def scale_times_1_2(model, mtp):
    """No port's bug: every layer's `scaling` times 1.2, near (2% off) the scale of
    `qk_nope_head_dim`. A control: `diff` must name no variant for it."""
    for layer in model.model.layers:
        layer.self_attn.scaling *= 1.2
    yield


# (case, output file, what it plants, the context that plants it in a loaded model and MTP block)
PORTS = [
    (
        "grouped-shared-yarn",
        "port-no-mscale.safetensors",
        "the softmax scale qk_head_dim^-0.5 without YaRN's mscale^2",
        no_mscale,
    ),
    (
        "grouped-shared-yarn",
        "port-rotate-half.safetensors",
        "MLA's RoPE by rotate_half (pairs x[j], x[j + d/2]); the indexer's interleaved, as it should be",
        rope_in_halves(1),
    ),
    ("flat", "port-absorbed-scale.safetensors", "the softmax scale (kv_lora_rank + qk_rope_head_dim)^-0.5", absorbed_scale),
    ("flat", "port-dense.safetensors", "attention over every causal key (a backend ignoring the DSA indices)", dense),
    ("flat", "port-indexer-rotate-half.safetensors", "the indexer's RoPE by rotate_half", rope_in_halves(2)),
    ("flat", "port-indexer-own-key.safetensors", "the indexer's causal mask j < s (own key masked)", indexer_masks_own_key),
    ("flat", "port-no-bias.safetensors", "experts chosen without e_score_correction_bias", no_bias_in_selection),
    ("flat", "port-biased-weights.safetensors", "routing weights from the biased scores", weights_from_biased_scores),
    ("flat", "port-no-scaling.safetensors", "routing weights without routed_scaling_factor", no_routed_scaling),
    ("flat", "port-no-shared-expert.safetensors", "MoE output without the shared expert", no_shared_expert),
    (
        "flat",
        "port-experts-gate-up-swapped.safetensors",
        "the routed experts' gate_up_proj split the wrong way round",
        experts_gate_up_swapped,
    ),
    ("flat", "port-kv-norm-over-rope.safetensors", "kv_a_layernorm's statistic over the rope part too", kv_norm_over_rope),
    ("flat", "port-kv-norm-unloaded.safetensors", "kv_a_layernorm's weight not loaded (ones)", kv_norm_weight_not_loaded),
    ("mtp", "port-mtp-prenorm.safetensors", "the MTP head fed the state before the final norm", mtp_fed_before_final_norm),
    (
        "grouped-shared-yarn",
        "port-no-mscale-bf16.safetensors",
        "the softmax scale qk_head_dim^-0.5 without YaRN's mscale^2, in a port that runs in bfloat16",
        in_bf16(no_mscale),
    ),
    (
        "grouped-shared-yarn",
        "port-no-scaling-bf16.safetensors",
        "routing weights without routed_scaling_factor, in a port that runs in bfloat16",
        in_bf16(no_routed_scaling),
    ),
    (
        "flat",
        "port-no-shared-expert-bf16.safetensors",
        "MoE output without the shared expert, in a port that runs in bfloat16",
        in_bf16(no_shared_expert),
    ),
    (
        "flat",
        "port-no-bias-bf16.safetensors",
        "experts chosen without e_score_correction_bias, in a port that runs in bfloat16",
        in_bf16(no_bias_in_selection),
    ),
    (
        "grouped-shared-yarn",
        "port-no-bias-bf16.safetensors",
        "experts chosen without e_score_correction_bias, in a port that runs in bfloat16",
        in_bf16(no_bias_in_selection),
    ),
    (
        "flat",
        "port-kv-norm-over-rope-bf16.safetensors",
        "kv_a_layernorm's statistic over the rope part too, in a port that runs in bfloat16",
        in_bf16(kv_norm_over_rope),
    ),
]

@contextlib.contextmanager
def shared_expert_times_1_95(model, mtp):
    """No port's bug: every MoE layer's shared expert output times 1.95, near (not) twice. A
    control: `diff` must not name the shared expert added twice."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, glm.GlmMoeDsaMoE):
            shared = layer.mlp.shared_experts
            shared.forward = lambda x, forward=shared.forward: 1.95 * forward(x)
    yield


# Dumps of no port's bug: `diff` must name nothing for them.
CONTROLS = [
    ("flat", "control-scale-x1.2.safetensors", "the softmax scale times 1.2 (a control, no port's bug)", scale_times_1_2),
    (
        "flat",
        "control-shared-x1.95.safetensors",
        "the shared expert's output times 1.95 (a control, no port's bug)",
        shared_expert_times_1_95,
    ),
]



@torch.no_grad()
def main() -> int:
    for case, file, what, plant in PORTS + CONTROLS:
        case_dir = os.path.join(HERE, case)
        with safe_open(os.path.join(case_dir, "reference.safetensors"), "pt") as f:
            input_ids = f.get_tensor("input_ids")
        model = GlmMoeDsaForCausalLM.from_pretrained(case_dir, dtype=torch.float32)
        model.set_attn_implementation("eager")
        model.set_experts_implementation("eager")
        model.eval()
        mtp = mtp_block(model, case_dir) if model.config.num_nextn_predict_layers and case == "mtp" else None
        with plant(model, mtp):
            tensors, scores = generate.run_reference(model, input_ids, mtp)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        # (A bf16 port's values, stored as F32 as the spec's names are.)
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        out = generate.dump_tensors({}, tensors, {i: v.float() for i, v in scores.items()})
        with open(os.path.join(case_dir, "config.json"), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        meta = {
            "format": generate.DUMP_FORMAT,
            "source": f"transformers {transformers.__version__} / torch {torch.__version__}, eager, {dtype}, with a "
            f"port bug planted: {what}",
            "config_sha256": sha,
            "model": case,
            "generator": "golden/port_bugs.py",
        }
        path = os.path.join(case_dir, file)
        generate.save_safetensors(out, path, meta)
        print(f"wrote {path}: {len(out)} tensors ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
