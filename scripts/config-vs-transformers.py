#!/usr/bin/env python3
"""Differential test of config.json interpretation: glimpse `inspect` against transformers'
GlmMoeDsaConfig + the modules GlmMoeDsaForCausalLM builds from it.

    venv/bin/python scripts/config-vs-transformers.py [-v] [-k SUBSTRING]     (inspect, ~476 configs)
    venv/bin/python scripts/config-vs-transformers.py --forward [-k SUBSTRING]  (YaRN variants run)

Environment: GLIMPSE (the binary; default target/release/glimpse), WORK (the folder for the
variants and results.json; default a new temporary folder). Needs golden/requirements.txt's
venv (transformers 5.24). First run 2026-12-02: where both accept a config, no value differed
(299 variants); the acceptance differences it found then are fixed or commented in src/config.rs.

For every variant: transformers side = GlmMoeDsaConfig.from_dict(cfg), the model built on the
meta device (per-layer MLP class, attention `skip_topk`, `self.scaling`, router attributes,
lm_head tying) and a CPU GlmMoeDsaRotaryEmbedding (rope_parameters after its init). glimpse side
= `glimpse --threads 1 inspect --model DIR` on DIR holding the config.json and an empty
model.safetensors (inspect reads the config fully and only reports the checkpoint incomplete).
Results go to stdout and $WORK/results.json.
"""
import copy, json, logging, math, os, re, struct, subprocess, sys, tempfile, warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM  # noqa: E402
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as M  # noqa: E402

transformers.logging.set_verbosity_error()
logging.disable(logging.WARNING)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.environ.get("WORK") or tempfile.mkdtemp(prefix="glimpse-config-check-")
GLIMPSE = os.environ.get("GLIMPSE", f"{ROOT}/target/release/glimpse")
WORK = f"{HERE}/variants"
DEL = object()

GOLDEN = f"{ROOT}/golden"
BASES = {n: json.load(open(f"{GOLDEN}/{n}/config.json")) for n in
         ["flat", "grouped-shared-yarn", "mtp", "fp8-sharded", "bf16-fused"]}
# src/synth.rs preset_glm5
BASES["glm5"] = {
    "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
    "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288,
    "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "q_lora_rank": 2048, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64, "v_head_dim": 256, "first_k_dense_replace": 3,
    "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-5, "max_position_embeddings": 202752, "hidden_act": "silu",
    "attention_bias": False, "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
    "eos_token_id": [154820, 154827, 154829]}


def apply(base, **kw):
    d = copy.deepcopy(BASES[base])
    for k, v in kw.items():
        if v is DEL:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def rp(base, **kw):
    """base with its rope_parameters updated (DEL removes)."""
    d = copy.deepcopy(BASES[base])
    p = dict(d.get("rope_parameters") or {})
    for k, v in kw.items():
        if v is DEL:
            p.pop(k, None)
        else:
            p[k] = v
    d["rope_parameters"] = p
    return d


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def variants():
    V = []
    add = lambda name, cfg: V.append((name, cfg))  # noqa: E731
    for b in BASES:
        add(f"{b}/as-is", apply(b))
    # every key missing, every key null (flat, gsy, glm5)
    for b in ["flat", "grouped-shared-yarn", "glm5"]:
        for k in BASES[b]:
            add(f"{b}/del:{k}", apply(b, **{k: DEL}))
            add(f"{b}/null:{k}", apply(b, **{k: None}))
    add("empty-config", {})
    add("only-model_type", {"model_type": "glm_moe_dsa"})
    # expert-count aliases
    for b in ["flat", "grouped-shared-yarn"]:
        add(f"{b}/num_local_experts=8", apply(b, num_local_experts=8))
        add(f"{b}/num_experts=8", apply(b, num_experts=8))
        add(f"{b}/num_experts=8,num_local_experts=32", apply(b, num_experts=8, num_local_experts=32))
        add(f"{b}/num_experts=null", apply(b, num_experts=None))
        add(f"{b}/num_local_experts-only", apply(b, n_routed_experts=DEL, num_local_experts=8))
        add(f"{b}/num_experts-only", apply(b, n_routed_experts=DEL, num_experts=8))
    # MLP layer kinds
    f = "flat"
    for k in [0, 1, 3, 5, 7]:
        add(f"flat/first_k_dense_replace={k}", apply(f, first_k_dense_replace=k))
    add("flat/mlp_layer_types=alt", apply(f, mlp_layer_types=["dense", "sparse", "dense", "sparse", "sparse"]))
    add("flat/mlp_layer_types+fkdr-conflict", apply(f, mlp_layer_types=["sparse"] * 5, first_k_dense_replace=4))
    add("flat/mlp_layer_types=long", apply(f, mlp_layer_types=["dense"] + ["sparse"] * 5))
    add("flat/mlp_layer_types=short", apply(f, mlp_layer_types=["dense"] + ["sparse"] * 3))
    add("flat/mlp_layer_types=moe-word", apply(f, mlp_layer_types=["dense", "moe", "sparse", "sparse", "sparse"]))
    add("flat/mlp_layer_types=all-dense", apply(f, mlp_layer_types=["dense"] * 5))
    add("flat/mlp_layer_types=null+fkdr1", apply(f, mlp_layer_types=None, first_k_dense_replace=1))
    add("flat/first_k_dense_replace=-1", apply(f, first_k_dense_replace=-1))
    add("flat/first_k_dense_replace=1.0", apply(f, first_k_dense_replace=1.0))
    # indexer kinds
    for freq, off in [(1, 2), (2, 1), (2, 2), (3, 0), (3, 2), (4, -1), (0, 2), (2, 0), (5, 7), (-2, 1), (2, None)]:
        cfg = apply(f, index_topk_freq=freq, index_skip_topk_offset=off)
        if off is None:
            cfg.pop("index_skip_topk_offset")
        add(f"flat/freq={freq},offset={off}", cfg)
    add("flat/offset=null", apply(f, index_topk_freq=2, index_skip_topk_offset=None))
    add("flat/freq=null", apply(f, index_topk_freq=None))
    add("flat/freq=2.0", apply(f, index_topk_freq=2.0, index_skip_topk_offset=1))
    add("flat/offset=1.0", apply(f, index_topk_freq=2, index_skip_topk_offset=1.0))
    add("flat/pattern=FSSFS", apply(f, index_topk_pattern="FSSFS"))
    add("flat/pattern=FSSFSF(long)", apply(f, index_topk_pattern="FSSFSF"))
    add("flat/pattern=FSS(short)", apply(f, index_topk_pattern="FSS"))
    add("flat/pattern=SFFFF", apply(f, index_topk_pattern="SFFFF"))
    add("flat/pattern=fssfs(lower)", apply(f, index_topk_pattern="fssfs"))
    add("flat/pattern=list-words", apply(f, index_topk_pattern=["full", "shared", "full", "shared", "shared"]))
    add("flat/pattern=list-letters", apply(f, index_topk_pattern=["F", "S", "F", "S", "S"]))
    add("flat/pattern+freq", apply(f, index_topk_pattern="FSFSF", index_topk_freq=3, index_skip_topk_offset=0))
    add("flat/indexer_types", apply(f, indexer_types=["full", "shared", "shared", "full", "shared"]))
    add("flat/indexer_types+pattern", apply(f, indexer_types=["full"] * 5, index_topk_pattern="FSSSS"))
    add("flat/indexer_types=null+pattern", apply(f, indexer_types=None, index_topk_pattern="FSFSS"))
    add("flat/indexer_types=Full", apply(f, indexer_types=["Full", "shared", "full", "shared", "full"]))
    add("flat/indexer_types=dense-word", apply(f, indexer_types=["full", "dense", "full", "full", "full"]))
    add("flat/indexer_types=short", apply(f, indexer_types=["full", "shared"]))
    add("flat/indexer_types=shared-first", apply(f, indexer_types=["shared", "full", "full", "full", "full"]))
    add("flat/pattern=empty-string", apply(f, index_topk_pattern=""))
    # MoE routing fields
    g = "grouped-shared-yarn"
    for ng, tg in [(1, 1), (2, 1), (2, 2), (8, 2), (8, 4), (4, 4), (16, 1), (3, 1), (4, 5)]:
        add(f"gsy/n_group={ng},topk_group={tg}", apply(g, n_group=ng, topk_group=tg))
    for k in [1, 4, 8, 16]:
        add(f"gsy/num_experts_per_tok={k}", apply(g, num_experts_per_tok=k))
    add("gsy/norm_topk_prob=false", apply(g, norm_topk_prob=False))
    add("gsy/norm_topk_prob=0", apply(g, norm_topk_prob=0))
    add("gsy/norm_topk_prob='true'", apply(g, norm_topk_prob="true"))
    for s in [1.0, 1, 0.0, -1.0, 2.5e0, "2.5"]:
        add(f"gsy/routed_scaling_factor={s!r}", apply(g, routed_scaling_factor=s))
    add("gsy/n_shared_experts=2", apply(g, n_shared_experts=2))
    add("gsy/n_shared_experts=0", apply(g, n_shared_experts=0))
    add("gsy/topk_group=0", apply(g, topk_group=0))
    # norms, tying, MTP, misc numbers
    for e in [1e-6, 1e-5, 0.1, 1, 0.0, -1e-6]:
        add(f"flat/rms_norm_eps={e!r}", apply(f, rms_norm_eps=e))
    for t in [True, False, 1, "true"]:
        add(f"flat/tie_word_embeddings={t!r}", apply(f, tie_word_embeddings=t))
    for n in [0, 1, 2, 3]:
        add(f"flat/num_nextn_predict_layers={n}", apply(f, num_nextn_predict_layers=n))
    for k in [1, 8, 4096, 0]:
        add(f"flat/index_topk={k}", apply(f, index_topk=k))
    add("flat/num_hidden_layers=4.0", apply(f, num_hidden_layers=4.0))
    add("flat/hidden_size='64'", apply(f, hidden_size="64"))
    add("flat/max_position_embeddings=64", apply(f, max_position_embeddings=64))
    add("flat/num_key_value_heads=1", apply(f, num_key_value_heads=1))
    add("flat/hidden_act=gelu", apply(f, hidden_act="gelu"))
    add("flat/model_type=deepseek_v3", apply(f, model_type="deepseek_v3"))
    add("flat/head_dim=999", apply(f, head_dim=999))
    add("flat/attention_bias=true", apply(f, attention_bias=True))
    add("flat/qk_rope_head_dim=7", apply(f, qk_rope_head_dim=7))
    add("flat/qk_rope_head_dim=4", apply(f, qk_rope_head_dim=4, index_head_dim=16))
    add("flat/qk_nope_head_dim=0", apply(f, qk_nope_head_dim=0))
    add("flat/v_head_dim=32", apply(f, v_head_dim=32))
    # RoPE: forms
    for b in ["flat", "glm5"]:
        add(f"{b}/rope:no-rope-keys", apply(b, rope_parameters=DEL))
        add(f"{b}/rope:top-level-theta", apply(b, rope_parameters=DEL, rope_theta=50000.0))
        add(f"{b}/rope:top-level-theta+params-theta", apply(b, rope_theta=50000.0))
        add(f"{b}/rope:params-without-theta+top", rp(b, rope_theta=DEL) | {"rope_theta": 777.0})
        add(f"{b}/rope:params-without-theta", rp(b, rope_theta=DEL))
        add(f"{b}/rope:rope_scaling-default", apply(b, rope_parameters=DEL,
                                                    rope_scaling={"rope_type": "default", "rope_theta": 20000.0}))
        add(f"{b}/rope:rope_scaling-yarn", apply(b, rope_parameters=DEL, rope_scaling=dict(YARN)))
        add(f"{b}/rope:rope_scaling-yarn+params-default", apply(b, rope_scaling=dict(YARN)))
        add(f"{b}/rope:rope_scaling-empty+params-yarn", apply(b, rope_scaling={}, rope_parameters=dict(YARN)))
        add(f"{b}/rope:rope_scaling-null+params-yarn", apply(b, rope_scaling=None, rope_parameters=dict(YARN)))
        add(f"{b}/rope:rope_parameters-null", apply(b, rope_parameters=None))
        add(f"{b}/rope:rope_parameters-empty", apply(b, rope_parameters={}))
        add(f"{b}/rope:rope_parameters-empty+top-theta", apply(b, rope_parameters={}, rope_theta=3.0e5))
        add(f"{b}/rope:type-yarn(legacy key)", apply(b, rope_parameters=DEL,
                                                   rope_scaling={"type": "yarn", "factor": 8.0}, rope_theta=5e5))
        add(f"{b}/rope:type+rope_type", apply(b, rope_parameters={"type": "default", "rope_type": "yarn",
                                                                 "factor": 2.0, "rope_theta": 1e4}))
        add(f"{b}/rope:rope_type-null", rp(b, rope_type=None))
        add(f"{b}/rope:rope_theta-null", rp(b, rope_theta=None))
        add(f"{b}/rope:rope_theta-int", rp(b, rope_theta=10000))
        for t in ["linear", "dynamic", "llama3", "longrope", "proportional"]:
            add(f"{b}/rope:rope_type={t}", apply(b, rope_parameters={"rope_type": t, "factor": 2.0, "rope_theta": 1e4}))
        add(f"{b}/rope:partial_rotary_factor=0.5", rp(b, partial_rotary_factor=0.5))
        add(f"{b}/rope:top-partial_rotary_factor=1.0", apply(b, partial_rotary_factor=1.0))
        add(f"{b}/rope:nested-full_attention", apply(b, rope_parameters={"full_attention": dict(YARN)}))
    # RoPE: YaRN parameters (on flat dims, max_position_embeddings 4096; and on gsy)
    for b in ["flat", "grouped-shared-yarn"]:
        def Y(bb=b, **kw):
            return apply(bb, rope_parameters={k: v for k, v in {**YARN, **kw}.items() if v is not DEL})
        add(f"{b}/yarn:base", Y())
        for fac in [1.0, 0.5, 2.0, 40.0, 4, None, 0.0, -1.0]:
            add(f"{b}/yarn:factor={fac!r}", Y(factor=fac))
        add(f"{b}/yarn:factor-missing", Y(factor=DEL))
        for ms, mad in [(DEL, DEL), (1.0, DEL), (DEL, 1.0), (0.0, 1.0), (1.0, 0.0), (0.707, 0.707), (1.0, 0.707),
                        (2.0, 1.0), (None, None), (1, 1)]:
            add(f"{b}/yarn:mscale={ms if ms is not DEL else '-'},mscale_all_dim={mad if mad is not DEL else '-'}",
                Y(mscale=ms, mscale_all_dim=mad))
        add(f"{b}/yarn:omp-missing", Y(original_max_position_embeddings=DEL))
        add(f"{b}/yarn:omp-null", Y(original_max_position_embeddings=None))
        add(f"{b}/yarn:omp=1024", Y(original_max_position_embeddings=1024))
        add(f"{b}/yarn:omp-float", Y(original_max_position_embeddings=64.0))
        add(f"{b}/yarn:omp=0", Y(original_max_position_embeddings=0))
        d = Y(); d["original_max_position_embeddings"] = 128
        add(f"{b}/yarn:top-level-omp=128", d)
        d = Y(original_max_position_embeddings=DEL); d["original_max_position_embeddings"] = 128
        add(f"{b}/yarn:top-level-omp-only=128", d)
        add(f"{b}/yarn:beta_fast=0", Y(beta_fast=0))
        add(f"{b}/yarn:beta_fast=16,beta_slow=2", Y(beta_fast=16, beta_slow=2))
        add(f"{b}/yarn:beta_slow=null", Y(beta_slow=None))
        add(f"{b}/yarn:beta_fast=-1", Y(beta_fast=-1))
        add(f"{b}/yarn:attention_factor=1.5", Y(attention_factor=1.5))
        add(f"{b}/yarn:attention_factor=null", Y(attention_factor=None))
        add(f"{b}/yarn:truncate=false", Y(truncate=False))
        add(f"{b}/yarn:truncate=null", Y(truncate=None))
        add(f"{b}/yarn:extra-key", Y(low_freq_factor=1.0))
        add(f"{b}/yarn:rope_theta-inside+top", Y(rope_theta=DEL) | {"rope_theta": 5e5})
        d = apply(b, rope_parameters=DEL, rope_scaling={k: v for k, v in YARN.items() if k != "rope_theta"},
                  rope_theta=2e5)
        add(f"{b}/yarn:rope_scaling-form+top-theta", d)
        d = apply(b, rope_parameters=DEL, rope_scaling={"type": "yarn", "factor": 40, "mscale": 0.707,
                                                         "mscale_all_dim": 0.707,
                                                         "original_max_position_embeddings": 128},
                  rope_theta=1e4)
        add(f"{b}/yarn:deepseek-v3-style", d)
    # more corners
    add("flat/num_local_experts=null", apply(f, num_local_experts=None))
    add("flat/num_hidden_layers=0", apply(f, num_hidden_layers=0))
    add("flat/num_hidden_layers=1", apply(f, num_hidden_layers=1))
    add("flat/layer_types=short", apply(f, layer_types=["indexed_attention"] * 2))
    add("flat/layer_types=full_attention", apply(f, layer_types=["full_attention"] * 5))
    add("flat/indexer_types=long", apply(f, indexer_types=["full", "shared", "full", "shared", "full", "full"]))
    add("flat/rope:default+factor+mscale_all_dim", apply(f, rope_parameters={
        "rope_type": "default", "rope_theta": 1e4, "factor": 4.0, "mscale_all_dim": 1.0}))
    add("flat/rope:rope_scaling-string", apply(f, rope_scaling="yarn"))
    add("flat/rope:rope_parameters-list", apply(f, rope_parameters=[]))
    add("flat/first_k_dense_replace=5+mtp", apply(f, first_k_dense_replace=5, num_nextn_predict_layers=1))
    add("bf16-fused/null:rope_theta", apply("bf16-fused", rope_theta=None))
    add("bf16-fused/rope_theta-string", apply("bf16-fused", rope_theta="5e4"))
    add("bf16-fused/rope_theta-int", apply("bf16-fused", rope_theta=50000))
    add("bf16-fused/del:rope_theta", apply("bf16-fused", rope_theta=DEL))
    # the GLM-5 preset with YaRN (the published softmax scale path)
    add("glm5/yarn", apply("glm5", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                     "original_max_position_embeddings": 50688,
                                                     "mscale": 1.0, "mscale_all_dim": 1.0}))
    add("glm5/yarn-no-omp", apply("glm5", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                            "mscale_all_dim": 1.0}))
    return V


# ---------------------------------------------------------------- transformers side
def hf_side(cfg):
    """What transformers' modelling code would use, or ('refuse', reason)."""
    stage = "config"
    try:
        c = GlmMoeDsaConfig.from_dict(copy.deepcopy(cfg))
        stage = "model"
        with torch.device("meta"):
            m = GlmMoeDsaForCausalLM(c)
        stage = "rotary"
        rot = M.GlmMoeDsaRotaryEmbedding(c)  # CPU: real inv_freq / attention_scaling
    except Exception as e:  # noqa: BLE001
        return {"refuse": f"{stage}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    L = m.model.layers
    out = {}
    n = c.num_hidden_layers
    out["layers"] = n
    out["hidden"] = c.hidden_size
    out["vocab"] = c.vocab_size
    out["heads"] = c.num_attention_heads
    a0 = L[0].self_attn if n else None
    out["dims"] = [c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim]
    out["mlp"] = ["moe" if isinstance(l.mlp, M.GlmMoeDsaMoE) else "dense" for l in L]
    out["indexer"] = ["shared" if l.self_attn.skip_topk else "full" for l in L]
    if out["indexer"] and out["indexer"][0] == "shared":
        out["forward_refuse"] = "layer 0 shared: forward raises 'Shared DSA layers require top-k indices ...'"
    moe = [l.mlp for l in L if isinstance(l.mlp, M.GlmMoeDsaMoE)]
    if moe:
        gate = moe[0].gate
        out["moe"] = {"routed": gate.num_experts, "shared_intermediate": moe[0].shared_experts.gate_proj.out_features,
                      "intermediate": moe[0].experts.intermediate_dim, "top_k": gate.top_k,
                      "n_group": gate.num_group, "topk_group": gate.topk_group,
                      "norm": bool(gate.norm_topk_prob), "scale": gate.routed_scaling_factor}
    ix = next((l.self_attn.indexer for l in L if l.self_attn.indexer is not None), None)
    out["index"] = {"heads": c.index_n_heads, "head_dim": c.index_head_dim, "topk": c.index_topk}
    if ix is not None:
        out["index"] = {"heads": ix.n_heads if hasattr(ix, "n_heads") else c.index_n_heads,
                        "head_dim": ix.head_dim if hasattr(ix, "head_dim") else c.index_head_dim,
                        "topk": ix.index_topk if hasattr(ix, "index_topk") else c.index_topk}
    scal = {l.self_attn.scaling for l in L}
    out["softmax_scale"] = a0.scaling if a0 is not None else None
    assert len(scal) <= 1
    p = dict(c.rope_parameters)
    out["rope"] = {"type": rot.rope_type, "theta": p.get("rope_theta"), "factor": p.get("factor"),
                   "omp": p.get("original_max_position_embeddings"), "mscale": p.get("mscale"),
                   "mscale_all_dim": p.get("mscale_all_dim"), "attention_scaling": float(rot.attention_scaling),
                   "inv_freq": [float(x) for x in rot.inv_freq]}
    out["eps"] = L[0].input_layernorm.variance_epsilon if n else c.rms_norm_eps
    out["tie"] = m.lm_head.weight is m.model.embed_tokens.weight
    out["max_pos"] = c.max_position_embeddings
    out["mtp"] = getattr(c, "num_nextn_predict_layers", None)
    return out


# ---------------------------------------------------------------- glimpse side
def write_dir(name, cfg):
    d = os.path.join(WORK, re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name))
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/config.json", "w") as fh:
        json.dump(cfg, fh, indent=1)
    h = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(f"{d}/model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h)
    return d


def expand_runs(s):
    out = []
    for part in s.split(", "):
        span, kind = part.rsplit(" ", 1)
        a, _, b = span.partition("-")
        out += [kind] * (int(b or a) - int(a) + 1)
    return out


def gl_side(d):
    r = subprocess.run([GLIMPSE, "--threads", "1", "inspect", "--model", d], capture_output=True, text=True)
    if r.returncode != 0:
        return {"refuse": (r.stderr.strip() or r.stdout.strip()).splitlines()[-1][:300]}
    t = r.stdout
    out = {"raw": t}
    m = re.search(r"\n  (\d+) layers, hidden (\d+), vocab (\d+), (\d+) heads \(q_lora (\d+), kv_lora (\d+), "
                  r"nope (\d+), rope (\d+), v (\d+)\)", t)
    out["layers"], out["hidden"], out["vocab"], out["heads"] = map(int, m.groups()[:4])
    out["dims"] = list(map(int, m.groups()[4:]))
    out["mlp"] = expand_runs(re.search(r"\n  layers: (.*)", t).group(1)) if out["layers"] else []
    m = re.search(r"\n  moe: (\d+) routed \+ (\d+) shared experts \(intermediate (\d+)\), top-(\d+) sigmoid, "
                  r"(flat|grouped: (\d+) groups of (\d+), keep (\d+)), (not )?normalised, scaled by (\S+)\n", t)
    if m:
        routed, shared, inter, k = map(int, m.groups()[:4])
        out["moe"] = {"routed": routed, "shared_intermediate": shared * inter, "intermediate": inter, "top_k": k,
                      "n_group": int(m.group(6)) if m.group(6) else 1,
                      "topk_group": int(m.group(8)) if m.group(8) else None,
                      "norm": m.group(9) is None, "scale": float(m.group(10))}
    m = re.search(r"\n  dsa indexer: (\d+) heads x (\d+), top-(\d+); (.*)\n", t)
    out["index"] = {"heads": int(m.group(1)), "head_dim": int(m.group(2)), "topk": int(m.group(3))}
    out["indexer"] = expand_runs(m.group(4)) if out["layers"] else []
    m = re.search(r"\n  rope: interleaved, (.*); softmax scale (\S+)\n", t)
    out["softmax_scale"] = float(m.group(2))
    rs = m.group(1)
    if rs.startswith("default"):
        out["rope"] = {"type": "default", "theta": float(re.search(r"theta (\S+)", rs).group(1))}
    else:
        mm = re.match(r"yarn, theta (\S+), factor (\S+), original max positions (\S+), mscale (\S+), "
                      r"mscale_all_dim (\S+)$", rs)
        f = lambda x: None if x == "unset" else float(x)  # noqa: E731
        out["rope"] = {"type": "yarn", "theta": float(mm.group(1)), "factor": float(mm.group(2)),
                       "omp": float(mm.group(3)), "mscale": f(mm.group(4)), "mscale_all_dim": f(mm.group(5))}
    m = re.search(r"\n  rms_norm_eps (\S+), tie_word_embeddings (true|false).*, max positions (\d+)", t)
    out["eps"], out["tie"], out["max_pos"] = float(m.group(1)), m.group(2) == "true", int(m.group(3))
    out["mtp"] = int(re.search(r"num_nextn_predict_layers (\d+)", t).group(1))
    m = re.search(r"config keys glimpse does not read: (.*)\n", t)
    out["unread"] = m.group(1) if m else ""
    return out


def close(a, b, rel=1e-9):
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-12)


def compare(h, g):
    diffs = []
    for k in ["layers", "hidden", "vocab", "heads", "dims", "mlp", "indexer", "index", "tie", "max_pos", "mtp"]:
        if k == "mtp" and h[k] is None:
            continue  # transformers has no such field (absent: no attribute); it never builds the MTP layer
        if h[k] != g[k]:
            diffs.append(f"{k}: transformers {h[k]} / glimpse {g[k]}")
    if not close(h["eps"], g["eps"]):
        diffs.append(f"eps: transformers {h['eps']} / glimpse {g['eps']}")
    if h["softmax_scale"] is not None and not math.isclose(h["softmax_scale"], g["softmax_scale"], rel_tol=0,
                                                            abs_tol=6e-7):
        diffs.append(f"softmax_scale: transformers {h['softmax_scale']:.6f} / glimpse {g['softmax_scale']:.6f}")
    if "moe" in h or "moe" in g:
        hm, gm = h.get("moe"), g.get("moe")
        if (hm is None) != (gm is None):
            diffs.append(f"moe: transformers {hm} / glimpse {gm}")
        else:
            for k in hm:
                if k == "topk_group" and (gm[k] is None or hm["n_group"] == 1):
                    continue  # glimpse prints no keep-count for flat routing (no effect there)
                if k == "scale":
                    if not close(hm[k], gm[k]):
                        diffs.append(f"moe.scale: transformers {hm[k]} / glimpse {gm[k]}")
                elif hm[k] != gm[k]:
                    diffs.append(f"moe.{k}: transformers {hm[k]} / glimpse {gm[k]}")
    hr, gr = h["rope"], g["rope"]
    if hr["type"] != gr["type"]:
        diffs.append(f"rope.type: transformers {hr['type']} / glimpse {gr['type']}")
    else:
        keys = ["theta"] if gr["type"] == "default" else ["theta", "factor", "omp", "mscale", "mscale_all_dim"]
        for k in keys:
            hv, gv = hr[k], gr[k]
            if k in ("mscale", "mscale_all_dim") and hv is None and gv is None:
                continue
            if not close(hv, gv):
                diffs.append(f"rope.{k}: transformers {hv} / glimpse {gv}")
    return diffs


def main():
    verbose = "-v" in sys.argv
    only = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else None
    os.makedirs(WORK, exist_ok=True)
    results = []
    counts = {"agree": 0, "differ": 0, "both_refuse": 0, "hf_refuses_glimpse_accepts": 0,
              "glimpse_refuses_hf_accepts": 0}
    for name, cfg in variants():
        if only and only not in name:
            continue
        h = hf_side(cfg)
        g = gl_side(write_dir(name, cfg))
        rec = {"name": name, "config": cfg}
        if "refuse" not in h and h.get("forward_refuse") and "refuse" in g:
            kind = "both_refuse"  # transformers builds the model but its forward raises
            h = {"refuse": "forward: " + h["forward_refuse"]}
        elif "refuse" in h and "refuse" in g:
            kind = "both_refuse"
        elif "refuse" in h:
            kind = "hf_refuses_glimpse_accepts"
        elif "refuse" in g:
            kind = "glimpse_refuses_hf_accepts"
        else:
            d = compare(h, g)
            rec["diffs"] = d
            kind = "differ" if d else "agree"
            if h.get("forward_refuse"):
                rec["note"] = h["forward_refuse"]
        counts[kind] += 1
        rec["kind"] = kind
        rec["hf"] = h.get("refuse") or {k: v for k, v in h.items()}
        rec["glimpse"] = g.get("refuse") or {k: v for k, v in g.items() if k != "raw"}
        results.append(rec)
        if kind != "agree" or verbose:
            print(f"[{kind}] {name}")
            if kind == "differ":
                for x in rec["diffs"]:
                    print("    " + x)
            if "refuse" in h:
                print("    transformers: " + h["refuse"])
            if "refuse" in g:
                print("    glimpse: " + g["refuse"])
            if rec.get("note"):
                print("    note: " + rec["note"])
    json.dump(results, open(f"{HERE}/results.json", "w"), indent=1, default=str)
    print(json.dumps(counts), "total", len(results))


if __name__ == "__main__" and "--forward" not in sys.argv:
    main()


# ---------------------------------------------------------------- forward check (--forward)
# RoPE details `inspect` does not print (attention_factor, beta_fast/slow, truncate, the cos/sin
# factor from mscale/mscale_all_dim, a top-level original_max_position_embeddings, the legacy
# rope_scaling form): golden/grouped-shared-yarn's weights under a variant config.json, run by
# transformers (golden/reference.py, from_pretrained on that folder) and compared by
# `glimpse verify --isolate`.
def forward_variants():
    G = "grouped-shared-yarn"
    base = BASES[G]["rope_parameters"]

    def Y(**kw):
        return apply(G, rope_parameters={k: v for k, v in {**base, **kw}.items() if v is not DEL})
    V = [("as-is", apply(G)),
         ("attention_factor=1.5", Y(attention_factor=1.5)),
         ("beta_fast=0", Y(beta_fast=0)),
         ("beta_fast=8,beta_slow=2", Y(beta_fast=8, beta_slow=2)),
         ("beta_slow=null", Y(beta_slow=None)),
         ("truncate=false", Y(truncate=False)),
         ("mscale=2,mscale_all_dim=1", Y(mscale=2.0, mscale_all_dim=1.0)),
         ("no-mscales", Y(mscale=DEL, mscale_all_dim=DEL)),
         ("mscale_all_dim=0.707-only", Y(mscale=DEL, mscale_all_dim=0.707)),
         ("factor=1", Y(factor=1.0)),
         ("factor=40", Y(factor=40.0)),
         ("theta=500", Y(rope_theta=500.0))]
    d = Y(); d["original_max_position_embeddings"] = 16
    V.append(("top-level-omp=16", d))
    d = Y(original_max_position_embeddings=DEL)
    V.append(("omp-missing(->max_pos)", d))
    V.append(("omp-missing,beta_fast=8,truncate=false", Y(original_max_position_embeddings=DEL, beta_fast=8,
                                                           truncate=False)))
    # (A decoy `rope_parameters` beside it: `rope_scaling` must win, its legacy `type` key count,
    # theta come from the top level.)
    d = apply(G, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}, rope_theta=2000.0,
              rope_scaling={"type": "yarn", "factor": 8, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 32})
    V.append(("legacy-rope_scaling+top-theta", d))
    V.append(("default-rope", apply(G, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})))
    return V


def forward_sensitivity():
    """transformers' inv_freq / cos-sin factor / softmax scale per forward variant, against as-is."""
    V = forward_variants()
    ref = hf_side(V[0][1])
    for name, cfg in V:
        h = hf_side(cfg)
        if "refuse" in h:
            print(f"{name:32s} transformers refuses: {h['refuse']}")
            continue
        r = h["rope"]
        same = r["inv_freq"] == ref["rope"]["inv_freq"]
        print(f"{name:32s} inv_freq {'same as as-is' if same else 'differs'}  cos/sin x{r['attention_scaling']:.6f}"
              f"  softmax {h['softmax_scale']:.6f}  inv_freq {[round(x, 6) for x in r['inv_freq']]}")


def forward_main():
    if "--sensitivity" in sys.argv:
        return forward_sensitivity()
    G = f"{GOLDEN}/grouped-shared-yarn"
    only = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else None
    for name, cfg in forward_variants():
        if only and only not in name:
            continue
        d = os.path.join(HERE, "fwd", re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name))
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/config.json", "w") as fh:
            json.dump(cfg, fh, indent=1)
        if not os.path.exists(f"{d}/model.safetensors"):
            os.symlink(f"{G}/model.safetensors", f"{d}/model.safetensors")
        r = subprocess.run([sys.executable, f"{GOLDEN}/reference.py", "--model", d, "--tokens-from",
                            f"{G}/reference.safetensors", "--out", f"{d}/ref.safetensors"],
                           capture_output=True, text=True)
        hf = (r.stdout + r.stderr)
        rope_line = next((l.strip() for l in hf.splitlines() if "rope " in l and "softmax" in l), hf[-200:])
        if r.returncode != 0:
            print(f"[fwd] {name}: transformers refused: {hf.strip().splitlines()[-1][:200]}")
            continue
        v = subprocess.run([GLIMPSE, "--threads", "2", "verify", "--isolate", "--model", d, "--golden",
                            f"{d}/ref.safetensors"], capture_output=True, text=True)
        out = v.stdout + v.stderr
        summary = next((l for l in out.splitlines() if "tensors match" in l), out.strip().splitlines()[-1])
        worst = [l for l in out.splitlines() if " off " in f" {l} " or "FAIL" in l or "mismatch" in l][:3]
        print(f"[fwd] {name}: {summary.strip()}  | hf: {rope_line}")
        for w in worst:
            print("      " + w.strip())
        with open(f"{d}/verify.txt", "w") as fh:
            fh.write(out)


if __name__ == "__main__" and "--forward" in sys.argv:
    forward_main()
