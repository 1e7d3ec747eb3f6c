//! What a prefill on the GPU holds in device memory beside its weights (`memory::check_device`
//! refuses a run whose weights and working set do not fit, before anything is uploaded): the
//! activations alive at once, as `device::forward` keeps them (a local lives to the end of its
//! function, a temporary to the end of its statement), the ops' scratch at its largest (it is
//! grown on demand and kept), the DSA selection and the logits. The emulation counts its
//! buffers' bytes the same way a GPU holds them (`Gpu::emulated_bytes`), so the count is checked
//! against the code on every golden case (tests/cuda_emu.rs). Not counted: the CUDA context (the
//! free memory is read once it exists), cuBLAS's workspace and the loaded kernels (tens of MB).

use super::attention::{AttentionPath, CHUNK_VALUES};
use super::gemm::SCRATCH_VALUES;
use crate::checkpoint::Checkpoint;
use crate::config::{Config, IndexerKind, MlpKind};
use crate::device::{Precision, Target};
use safetensors::Dtype;

/// A prefill's working set, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkingSet {
    /// Everything, the logits included.
    pub total: u64,
    /// The logits alone ([B * S, vocab] f32).
    pub logits: u64,
    /// Everything but the head's phase (the final norm and the logits): what a sweep (`audit
    /// --stream`), which stops after the layers, holds.
    pub layers: u64,
}

/// The working set of a prefill of `batch x seq` tokens of `ckpt` on `target` (every position's
/// logits: what `run`, `verify` and `bench` ask for); `scores`: the run records the indexer's
/// scores, so holds a layer's whole [B, S, S] of them.
pub fn estimate(ckpt: &Checkpoint, (batch, seq): (usize, usize), target: Target, scores: bool) -> WorkingSet {
    estimate_chunked(ckpt, (batch, seq), target, scores, CHUNK_VALUES)
}

/// [`estimate`] with the attention's chunks bounded by `chunk_values` (`AttentionPlan`).
pub fn estimate_chunked(
    ckpt: &Checkpoint,
    (batch, seq): (usize, usize),
    target: Target,
    scores: bool,
    chunk_values: usize,
) -> WorkingSet {
    let c = &ckpt.config;
    let f = |values: usize| (values as u64).saturating_mul(4); // f32 and i32 buffers
    let t = batch.saturating_mul(seq);
    let (h, v) = (c.hidden_size, c.vocab_size);
    let logits = f(t).saturating_mul(v as u64);
    // Past any GPU at any width that runs; and below it every count here fits, in bytes, a u64:
    // `Config::validate` caps experts (so top-k) at 2^16 and widths at 2^20, so the largest,
    // t x top-k x 2 x inter, is below 2^22 x 2^37, and 4 x a few of them below 2^64.
    if t > 1 << 22 || seq > 1 << 22 {
        return WorkingSet { total: u64::MAX, logits, layers: u64::MAX };
    }
    let k = c.index_topk.min(seq);
    let moe = (0..c.num_hidden_layers).any(|i| c.mlp_kind(i) == MlpKind::Moe);
    // The routed (token, choice) rows.
    let a = if moe { t * c.num_experts_per_tok } else { 0 };
    // Kept from the first layer to the last: the residual stream, the RoPE tables, the selection.
    let kept = f(t * h) + f(2 * seq * c.qk_rope_head_dim.max(c.index_head_dim) / 2) + f(t * k + t);
    let indexer = (0..c.num_hidden_layers).any(|i| c.indexer_kind(i) == IndexerKind::Full);
    // Recorded scores are computed whole (a prompt within index_topk too) and their top-k runs
    // over every row at once; unrecorded, a prompt longer than index_topk is scored and cut a
    // chunk of queries at a time. (A run that records some layers' scores only holds the chunks'
    // top-k scratch too in the others: a chunk's rows of scores, a few MB, left to the allowance.)
    let whole = if scores && indexer { f(t).saturating_mul(seq as u64) + topk_lists(t, seq, k) } else { 0 };
    let scoring = match (indexer, scores) {
        (false, _) => Scoring::None,
        (true, true) => Scoring::Whole,
        (true, false) if seq > c.index_topk => Scoring::Chunks,
        (true, false) => Scoring::None,
    };
    let attention = attention_scratch(c, (batch, seq), (k, scoring), target, chunk_values);
    let layer_phases = [
        // The whole scores live in the attention phase, beside its projections.
        attention_phase(c, t, k, scoring).saturating_add(whole),
        moe_phase(c, t, a, target.precision),
        dense_phase(c, t),
    ];
    // h and the final norm, then the logits.
    let head_phase = f(t * h) + logits;
    let layer_phase = layer_phases.into_iter().max().unwrap_or(0);
    let scratch = products_scratch(ckpt, t, a, target.precision) + attention;
    let with = |phase: u64| kept.saturating_add(phase).saturating_add(scratch);
    WorkingSet { total: with(layer_phase.max(head_phase)), logits, layers: with(layer_phase) }
}

/// Inside a layer's `attention`: its input norm and the MLA projections alive to the end (the
/// stacked q_a / kv_a product and its cut, freed early, are fewer values), then the larger of the
/// indexer's step (its projections where it scores, the new selection beside the old) and the
/// attention's (its output and `o_proj`'s).
fn attention_phase(c: &Config, t: usize, k: usize, scoring: Scoring) -> u64 {
    let (nh, qk, vd, r, rd) =
        (c.num_attention_heads, c.qk_head_dim(), c.v_head_dim, c.kv_lora_rank, c.qk_rope_head_dim);
    let (n, d) = (c.index_n_heads, c.index_head_dim);
    let mla = c.hidden_size + c.q_lora_rank + nh * qk + 2 * r + rd + nh * (c.qk_nope_head_dim + vd);
    let projections = if scoring == Scoring::None { 0 } else { n * d + 2 * d + n };
    let indexer = projections + k + 1;
    let attention = nh * vd + c.hidden_size;
    4 * (t * (mla + indexer.max(attention))) as u64
}

/// A MoE layer's peak beside the residual stream: the post-attention norm and the route, then
/// the largest of the routed experts' steps (gate_up, with in f32 mode the gathered rows the
/// product packs; gate_up and SwiGLU's output; that output and the down products'; their
/// output and the shared expert's buffers, or the combined output).
fn moe_phase(c: &Config, t: usize, a: usize, precision: Precision) -> u64 {
    if a == 0 {
        return 0;
    }
    let (h, e, kx, inter, shared) = (
        c.hidden_size,
        c.n_routed_experts,
        c.num_experts_per_tok,
        c.moe_intermediate_size,
        c.shared_intermediate_size(),
    );
    let route = t * e + 3 * t * kx + t + a; // logits, ids, weights, slots, margin, rows
    let packed = if precision == Precision::F32 { a * h } else { 0 };
    let steps =
        [a * 2 * inter + packed, a * 3 * inter, a * h + a * inter, a * h + mlp_peak(t, h, shared).max(2 * t * h)];
    4 * (t * h + route + steps.into_iter().max().unwrap_or(0)) as u64
}

/// What an MLP of `inter` holds at once over `t` rows: gate_up and SwiGLU's output, then that
/// and the down product's.
fn mlp_peak(t: usize, h: usize, inter: usize) -> usize {
    t * (3 * inter).max(inter + h)
}

/// A dense layer's peak beside the residual stream: the post-attention norm and the MLP's
/// buffers; or the MLP's output and the residual added to it.
fn dense_phase(c: &Config, t: usize) -> u64 {
    let h = c.hidden_size;
    4 * (t * h + mlp_peak(t, h, c.intermediate_size)).max(2 * t * h) as u64
}

/// The products' scratch (`gemm::Products`): in bf16 mode the activation rows rounded for the
/// largest product (the routed experts' rows, or the widest input); where weights are decoded by
/// blocks, the largest block: bf16 and FP8 ones to f32 in f32 mode, FP8 ones to bf16 in bf16
/// mode.
fn products_scratch(ckpt: &Checkpoint, t: usize, a: usize, precision: Precision) -> u64 {
    let c = &ckpt.config;
    let (nh, vd) = (c.num_attention_heads, c.v_head_dim);
    let widest =
        [c.hidden_size, c.q_lora_rank, c.kv_lora_rank, nh * vd, c.intermediate_size, c.shared_intermediate_size()];
    let rows = (t * widest.into_iter().max().unwrap_or(0)).max(a * c.hidden_size.max(c.moe_intermediate_size));
    let narrow = if precision == Precision::Bf16 { 2 * rows as u64 } else { 0 };
    // f32 mode decodes bf16 and FP8 weights to f32 (`wide`); bf16 mode FP8 ones to bf16.
    let widened = |n: &&str| match ckpt.dtype(n) {
        Some(Dtype::BF16) => precision == Precision::F32 && !n.ends_with(".gate.weight"),
        Some(Dtype::F8_E4M3) => precision == Precision::F32,
        _ => false,
    };
    let narrowed = |n: &&str| precision == Precision::Bf16 && ckpt.dtype(n) == Some(Dtype::F8_E4M3);
    let matrix = |n: &&str| ckpt.shape(n).is_some_and(|s| s.len() == 2) && !n.ends_with("_scale_inv");
    // bf16 weights stacked at upload are joined (FP8 ones stay apart): an MLP's gate and up,
    // twice the rows; an attention's q_a_proj and kv_a_proj_with_mqa, both of them.
    let bf16 = |n: &str| ckpt.dtype(n) == Some(Dtype::BF16);
    let numel = |n: &str| crate::memory::numel(ckpt, n) as usize;
    let values = |n: &str| match n.strip_suffix("q_a_proj.weight").map(|p| format!("{p}kv_a_proj_with_mqa.weight")) {
        _ if bf16(n) && (n.ends_with("gate_proj.weight") || n.ends_with("up_proj.weight")) => 2 * numel(n),
        Some(kv_a) if bf16(n) && bf16(&kv_a) => numel(n) + numel(&kv_a),
        _ => numel(n),
    };
    let block = |decoded: &dyn Fn(&&str) -> bool| {
        let largest = ckpt.names().filter(matrix).filter(decoded).map(values).max().unwrap_or(0);
        largest.min(SCRATCH_VALUES) as u64
    };
    narrow + 4 * block(&widened) + 2 * block(&narrowed)
}

/// The attention module's scratch (`attention::Workspace`), grown to its largest use: the
/// indexer's chunk products, scores and top-k (where it scores the prompt), the
/// masked form's chunk scores and probabilities, the selection's bits, and in bf16 mode the
/// products' bf16 operands (the indexer's split queries and keys, the attention's rounded keys
/// and values held whole).
fn attention_scratch(
    c: &Config,
    (batch, seq): (usize, usize),
    (k, scoring): (usize, Scoring),
    target: Target,
    chunk_values: usize,
) -> u64 {
    let t = seq; // a prefill's queries see its own keys
    let (nh, qk, vd) = (c.num_attention_heads, c.qk_head_dim(), c.v_head_dim);
    let (n, d) = (c.index_n_heads, c.index_head_dim);
    let bf16 = target.precision == Precision::Bf16;
    let chunk = |per_query: usize| (chunk_values / per_query.max(1)).clamp(1, seq.max(1));
    // The workspace's slots: `products` serves the indexer's and the masked attention's chunks.
    let (mut products, mut topk, mut lists, mut bits) = (0usize, 0usize, 0u64, 0usize);
    let (mut q_halves, mut k_halves, mut halves) = (0usize, 0usize, 0usize); // bf16 slots
    if scoring != Scoring::None {
        let qc = chunk(n * t);
        products = qc * n * t;
        if scoring == Scoring::Chunks {
            topk = qc * t + qc * k + qc; // a chunk's scores, its top-k and margins
            lists = topk_lists(qc, t, k);
        }
        if bf16 {
            (q_halves, k_halves) = (batch * seq * n * 3 * d, batch * t * 3 * d);
        }
    }
    let path = AttentionPath::asked(target.attention).unwrap_or_else(|| AttentionPath::choose(t, k));
    match path {
        AttentionPath::Gathered => {}
        AttentionPath::Masked => {
            let qc = chunk(nh * t);
            products = products.max(nh * qc * t);
            bits = qc * t.div_ceil(32);
            if bf16 {
                q_halves = q_halves.max(nh * qc * qk);
                k_halves = k_halves.max(nh * batch * t * qk);
                halves = nh * batch * t * vd + nh * qc * t.next_multiple_of(8);
            }
        }
        AttentionPath::Fused => {
            bits = chunk(t) * t.div_ceil(32);
            k_halves = k_halves.max(nh * batch * t * qk);
            halves = nh * batch * t * vd;
        }
    }
    4 * (products + topk + bits) as u64 + lists + 2 * (halves + q_halves + k_halves) as u64
}

/// How the indexer scores a prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scoring {
    /// Not at all: no full indexer layer, or every query keeps every key.
    None,
    /// Whole, its scores recorded (`attention::index_scores`, then the top-k of all rows).
    Whole,
    /// A chunk of queries at a time, each chunk's top-k taken at once (`attention::index_topk`).
    Chunks,
}

/// The chunked top-k's lists (`Gpu::topk_chunked`) for `rows` rows of `t` keys keeping `k`:
/// rows longer than a block's shared memory holds are cut by chunks, and each round's lists (8
/// bytes a kept key) are alive beside the next round's. Counted with the chunks of a card with
/// 99 KB of shared memory (8192 keys); Hopper's 227 KB hold 16k, so this counts more than Hopper
/// holds.
fn topk_lists(rows: usize, t: usize, k: usize) -> u64 {
    const CHUNK: usize = 8192;
    if t <= CHUNK {
        return 0;
    }
    let keep = k + 1;
    let first = t.div_ceil(CHUNK);
    let second = (first * keep).div_ceil(CHUNK);
    8 * (rows * keep * (first + second)) as u64
}
