#!/usr/bin/env bash
# Proves that `glimpse synth` checkpoints load in transformers and that glimpse matches the
# transformers reference on shapes the committed golden cases do not cover.
#
#   scripts/synth-vs-transformers.sh [CASE ...]        (default: every case)
#
# For each case: `glimpse synth` writes a random checkpoint from the config below,
# golden/reference.py runs it through transformers (from_pretrained, eager, f32; FP8 is
# dequantised by the script itself, see its docstring) and writes a glm5-dump/1 reference, then
# `glimpse verify` and `glimpse verify --isolate` compare glimpse against it.
#
# Environment:
#   GLIMPSE   glimpse binary (default: target/release/glimpse in this repository)
#   PYTHON    python with torch + transformers (default: python3); see golden/requirements.txt
#   KEEP=1    keep the work folder even when every case passes (it is always kept on failure)
#
# Exit status: 0 all cases pass, 1 some case failed, 2 missing prerequisites.
#
# Seeds: a case's synth seed and token seed are fixed, so every run is deterministic. They were
# picked so that the reference's smallest selection margins are well above float32 noise (~1e-6).
# Long sequences cannot keep every margin above 1e-3 (case `long` has ~1000 DSA decisions), so
# golden/reference.py warns there; a flip on such a near-tie would be legitimate, and the failure
# report below lists every flip with the margin that decided it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Relative paths given by the caller are relative to the caller's folder; the defaults to the repo.
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; */*) printf '%s\n' "$PWD/$1" ;; *) printf '%s\n' "$1" ;; esac; }
if [[ -z "${GLIMPSE:-}" ]]; then
    GLIMPSE="$root/target/release/glimpse"
elif [[ "$GLIMPSE" == */* ]]; then
    GLIMPSE="$(abspath "$GLIMPSE")"
else
    GLIMPSE="$(command -v "$GLIMPSE" || printf '%s\n' "$GLIMPSE")"  # a command name on PATH
fi
PYTHON="$(abspath "${PYTHON:-python3}")"
cd "$root"

if [[ ! -x "$GLIMPSE" ]]; then
    echo "synth-vs-transformers: no glimpse binary at $GLIMPSE (cargo build --release, or set GLIMPSE)" >&2
    exit 2
fi
if ! versions="$("$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null)"; then
    echo "synth-vs-transformers: '$PYTHON' cannot import torch and transformers." >&2
    echo "  install them:  $PYTHON -m pip install -r golden/requirements.txt   (about 6 GB)" >&2
    echo "  or point PYTHON at a python that has them, e.g.  PYTHON=venv/bin/python $0" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/synth-vs-transformers.XXXXXX")"
failed=()
cleanup() {
    if [[ ${#failed[@]} -eq 0 && "${KEEP:-0}" != 1 ]]; then rm -rf "$work"; else echo "work folder kept: $work"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------
# Configs (config.json as `glimpse synth --config` reads it; synth sets num_key_value_heads,
# num_nextn_predict_layers and torch_dtype itself).
# ------------------------------------------------------------------------------------------

# (a) long sequence: B=1, S=300, index_topk 64 (DSA drops 236 of 300 keys at the end), 4 layers,
# layer 0 dense, 16 experts top-4 flat, every layer a full indexer. index_n_heads 32 as in GLM-5:
# with few heads a key can score exactly 0 (every head's relu at 0), and the reference breaks
# exact ties arbitrarily. F32, 2 shards.
config_long() {
    cat <<'EOF'
{
  "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
  "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
  "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 4,
  "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
  "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1,
  "norm_topk_prob": true, "routed_scaling_factor": 2.5,
  "index_n_heads": 32, "index_head_dim": 16, "index_topk": 64,
  "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 1024,
  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
  "attention_bias": false, "tie_word_embeddings": false
}
EOF
}

# (b) B=2, 5 attention heads, grouped routing (16 experts in 4 groups, topk_group 2, top-4,
# norm_topk_prob false, scaling 1.5), an explicit indexer_types list with shared layers that no
# freq/offset schedule produces, YaRN with mscale != mscale_all_dim (cos/sin factor != 1) and
# rope dim 16, hidden 80, rms_norm_eps 1e-6. F32, 1 file.
config_grouped_yarn() {
    cat <<'EOF'
{
  "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
  "vocab_size": 300, "hidden_size": 80, "intermediate_size": 112, "moe_intermediate_size": 24,
  "num_hidden_layers": 5, "first_k_dense_replace": 1, "num_attention_heads": 5,
  "q_lora_rank": 40, "kv_lora_rank": 36, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 24,
  "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
  "norm_topk_prob": false, "routed_scaling_factor": 1.5,
  "index_n_heads": 16, "index_head_dim": 32, "index_topk": 16,
  "indexer_types": ["full", "shared", "shared", "full", "shared"],
  "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
  "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                      "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 1.0, "mscale_all_dim": 0.8},
  "attention_bias": false, "tie_word_embeddings": false
}
EOF
}

# (c) BF16, tie_word_embeddings (no lm_head.weight), old-style top-level rope_theta 50000 and no
# rope_parameters, 3 heads, 2 shared experts, 8 experts top-2. Written with the MTP layer (--mtp),
# which transformers must drop. 3 shards.
config_bf16_tied() {
    cat <<'EOF'
{
  "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
  "vocab_size": 200, "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 16,
  "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 3,
  "q_lora_rank": 32, "kv_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
  "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
  "norm_topk_prob": true, "routed_scaling_factor": 2.5,
  "index_n_heads": 16, "index_head_dim": 16, "index_topk": 12,
  "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
  "rope_theta": 50000.0,
  "attention_bias": false, "tie_word_embeddings": true
}
EOF
}

# (d) block-FP8 with dims that are not multiples of 128 (partial edge blocks), attention_bias,
# MTP layer, 3 shards. transformers 5.24 cannot dequantise partial blocks correctly, so this one
# does not go through from_pretrained: golden/reference.py dequantises (128x128 blocks) itself.
config_fp8() {
    cat <<'EOF'
{
  "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
  "vocab_size": 200, "hidden_size": 160, "intermediate_size": 200, "moe_intermediate_size": 72,
  "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 2,
  "q_lora_rank": 136, "kv_lora_rank": 72, "qk_nope_head_dim": 24, "qk_rope_head_dim": 8, "v_head_dim": 24,
  "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
  "norm_topk_prob": true, "routed_scaling_factor": 2.5,
  "index_n_heads": 16, "index_head_dim": 16, "index_topk": 10,
  "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
  "attention_bias": true, "tie_word_embeddings": false
}
EOF
}

# name | config function | synth flags | B,S | token seed
CASES=(
    "long|config_long|--dtype f32 --shards 2 --seed 1|1,300|90"
    "grouped-yarn|config_grouped_yarn|--dtype f32 --seed 1|2,48|6"
    "bf16-tied|config_bf16_tied|--dtype bf16 --shards 3 --mtp --seed 1|1,48|9"
    "fp8|config_fp8|--dtype fp8 --shards 3 --mtp --seed 1|1,24|2"
)

# ------------------------------------------------------------------------------------------

# `max_abs X` of the `logits` line of a verify log.
logits_err() { awk '$1 == "logits" { for (i = 1; i < NF; i++) if ($i == "max_abs") { print $(i + 1); exit } }' "$1"; }

# What to show when a verify run fails: the first mismatching lines of each failing verify.
mismatches() {
    echo "    first mismatching lines of glimpse $2:"
    grep -Ev '^[^ ]+ +ok ' "$1" | grep -v '^verify ' | head -n 8 | sed 's/^/      /'
}

# ... and every selection flip with the margin that decided it (glimpse run + glimpse diff).
flips() {
    local dir="$1"
    "$GLIMPSE" run --model "$dir/model" --tokens-from "$dir/reference.safetensors" \
        --dump "$dir/ours.safetensors" >"$dir/run.log" 2>&1 || return 0
    "$GLIMPSE" diff "$dir/ours.safetensors" "$dir/reference.safetensors" >"$dir/diff.log" 2>&1 || true
    if grep -q ' flips: ' "$dir/diff.log"; then
        echo "    selection flips of the free run (glimpse diff; flips after the first divergence may be its consequence):"
        sed -n '/ flips: /,/^only in /p' "$dir/diff.log" | grep -v '^only in ' | head -n 12 | sed 's/^/      /'
    fi
}

run_case() {
    local name="$1" cfg_fn="$2" flags="$3" shape="$4" tseed="$5"
    local dir="$work/$name" ok=1 isolate_ok=1
    mkdir -p "$dir"
    "$cfg_fn" >"$dir/config.json"
    echo "== $name: glimpse synth $flags; tokens B,S=$shape seed $tseed"
    # shellcheck disable=SC2086  # flags are words
    if ! "$GLIMPSE" synth --config "$dir/config.json" $flags --out "$dir/model" >"$dir/synth.log" 2>&1; then
        echo "   FAIL: glimpse synth"; sed 's/^/      /' "$dir/synth.log" | tail -n 20
        failed+=("$name"); return
    fi
    if ! "$PYTHON" golden/reference.py --model "$dir/model" --random-tokens "$shape" --seed "$tseed" \
        --out "$dir/reference.safetensors" >"$dir/reference.log" 2>&1; then
        echo "   FAIL: golden/reference.py (transformers could not load or run the checkpoint)"
        sed 's/^/      /' "$dir/reference.log" | tail -n 20
        failed+=("$name"); return
    fi
    # the summary line minus the output path, the derived layer types + RoPE, and the margins
    grep -E ' tensors, B=[0-9]+ S=[0-9]+, ' "$dir/reference.log" | sed 's/^.*: \([0-9]* tensors\)/   reference: \1/'
    grep -E '^  (indexer_types|min routing margin) ' "$dir/reference.log" | sed 's/^  /   reference: /'
    if grep -q 'warning: near-tie' "$dir/reference.log"; then
        echo "   reference: near-tie warning (a margin below 1e-3; a flip there would be legitimate)"
    fi
    "$GLIMPSE" verify --model "$dir/model" --golden "$dir/reference.safetensors" >"$dir/verify.log" 2>&1 || ok=0
    "$GLIMPSE" verify --model "$dir/model" --golden "$dir/reference.safetensors" --isolate \
        >"$dir/verify-isolate.log" 2>&1 || isolate_ok=0
    local summary
    summary="verify: $(tail -n 1 "$dir/verify.log"), logits max_abs $(logits_err "$dir/verify.log")"
    summary+="; --isolate: logits max_abs $(logits_err "$dir/verify-isolate.log")"
    if ((ok && isolate_ok)); then
        echo "   PASS  $summary"
    else
        echo "   FAIL  $summary"
        ((ok)) || mismatches "$dir/verify.log" "verify"
        ((isolate_ok)) || mismatches "$dir/verify-isolate.log" "verify --isolate"
        flips "$dir"
        failed+=("$name")
    fi
}

echo "glimpse: $GLIMPSE"
echo "python:  $PYTHON ($versions)"
echo "work:    $work"
selected=("$@")
ran=0
for spec in "${CASES[@]}"; do
    IFS='|' read -r name cfg_fn flags shape tseed <<<"$spec"
    if ((${#selected[@]})) && [[ ! " ${selected[*]} " == *" $name "* ]]; then continue; fi
    run_case "$name" "$cfg_fn" "$flags" "$shape" "$tseed"
    ran=$((ran + 1))
done
if ((ran == 0)); then
    echo "synth-vs-transformers: no case named ${selected[*]}; cases: $(printf '%s ' "${CASES[@]%%|*}")" >&2
    exit 2
fi
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} ($((ran - ${#failed[@]})) of $ran cases pass)"
    exit 1
fi
echo "all $ran cases pass"
