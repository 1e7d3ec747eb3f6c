//! The attention's two quadratic steps as cuBLAS products plus small kernels, a chunk of
//! queries at a time:
//! - the indexer's scores: `g = q k^T * scale` for every index head in one product
//!   (`[qc * n, d] x [d, t]`), then `index_combine` (relu, weighted sum over heads, causal -inf);
//!   [`index_topk`] takes each chunk's top-k right after, so no more than a chunk's scores exist;
//! - attention over DSA's selection in the masked form: per-head scores
//!   `q_nope k_nope^T + q_rope k_rope^T` (strided-batched products over the heads, the RoPE key
//!   shared by them), `selection_bits` + a masked softmax, then `P v`, written straight into
//!   `[S, nh, vd]`.
//!
//! The masked form computes every causal key's score and throws away the unselected ones, so it
//! does `t / K` times the gathered kernel's arithmetic; but on cuBLAS instead of one thread
//! block per (query, head). While every causal key is selected (prefills up to `index_topk`
//! tokens, 2048 on GLM-5) the two do the same work; [`AttentionPath::choose`] keeps the masked
//! form up to [`MASKED_MAX_RATIO`] times that. In bf16 mode the fused form ([`fused`], asked for
//! by `--attention fused`) does the masked form's work in one flash-attention kernel a chunk
//! (`flash_attention_bf16`), the scores never in memory.
//!
//! The two precisions compute the products differently:
//! - f32 mode runs them as SGEMM (`Products::batched`), as the f32 reference does.
//! - bf16 mode runs the attention's products as a bf16 flash attention does: q, k, the
//!   softmax's probabilities and v rounded to bf16 (`split_bf16` with one rounded copy,
//!   `masked_softmax_bf16`), f32 accumulation and f32 scores and softmax
//!   (`Products::batched_bf16`). `golden/reference.py --products bf16` rounds the same operands.
//! - The indexer's products keep about f32's accuracy in both precisions, because transformers
//!   computes the indexer's scores in f32 even in a bf16 run and its top-k is a decision. bf16
//!   mode splits each operand into bf16 halves, `x = hi + lo` (`split_bf16`), and multiplies
//!   `hi hi + hi lo + lo hi` on tensor cores as one product along k (rows `[hi | lo | hi]` against
//!   `[hi | hi | lo]`): about 16 mantissa bits, for three times the products.
//! - The gathered kernel computes in f32 in either precision.
//!
//! On an H200 the attention's section took 5.7 ms of a 2048-token prefill's two layers with split
//! bf16 products (before bf16 mode rounded the operands instead), against 10.2 with SGEMM
//! (docs/gpu-results.md).
//!
//! Chunks bound the scratch: a chunk's products hold at most [`CHUNK_VALUES`] floats, and a
//! chunk only reaches the keys its last query can see. bf16 mode also holds the rounded keys and
//! values whole (`Bf16Qkv`: 1 KB a key and head at GLM-5's widths), and the indexer's split
//! queries and keys (24 KB a query at GLM-5's 32 index heads of 128, 768 bytes a key).

use std::cell::RefCell;

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{GemmConfig, StridedBatchedConfig};

use super::gemm::{scratch, Products};
use super::gpu::{Buf, FlashChunk, Gpu, Split};
use crate::device::profile::Profile;
use crate::device::Precision;
use crate::error::{Error, Result};

/// The most f32 values one chunk's products hold (256 MB).
pub const CHUNK_VALUES: usize = 64 << 20;

/// The masked form is chosen while the causal keys are at most this many times the selected
/// ones. A guess, still to be tuned on a GPU (the H200 runs timed only prefills where every
/// causal key is selected): the masked form's products run at hundreds of TFLOP/s in bf16 mode,
/// tens in f32, where the gathered kernel (no tiling, no tensor cores) is unlikely to reach a
/// tenth of that.
pub const MASKED_MAX_RATIO: usize = 8;

/// How attention over the selected keys is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// `sparse_attention`: one thread block per (query, head) over its K selected keys.
    Gathered,
    /// Scores for every causal key by cuBLAS, masked to the selection (this module).
    Masked,
    /// The masked form in one kernel a chunk, bf16 mode only (`flash_attention_bf16`, [`fused`]):
    /// the scores stay in registers, and each block of queries stops at its last query's keys.
    Fused,
}

impl AttentionPath {
    /// The path `--attention` asks for; None for `auto` ([`AttentionPath::choose`] decides).
    pub fn asked(attention: crate::device::Attention) -> Option<AttentionPath> {
        use crate::device::Attention;
        match attention {
            Attention::Auto => None,
            Attention::Masked => Some(AttentionPath::Masked),
            Attention::Fused => Some(AttentionPath::Fused),
            Attention::Gathered => Some(AttentionPath::Gathered),
        }
    }

    /// The path for a prefill over `t` keys of which `k` are selected per query.
    pub fn choose(t: usize, k: usize) -> AttentionPath {
        if t <= MASKED_MAX_RATIO.saturating_mul(k) {
            AttentionPath::Masked
        } else {
            AttentionPath::Gathered
        }
    }
}

/// How the attention's quadratic steps run: the path (None: [`AttentionPath::choose`]) and the
/// chunk budget (selftest shrinks it so the small checks span several chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    pub path: Option<AttentionPath>,
    /// The most f32 values one chunk's products hold.
    pub chunk_values: usize,
}

impl Default for AttentionPlan {
    fn default() -> Self {
        AttentionPlan { path: None, chunk_values: CHUNK_VALUES }
    }
}

/// Scratch the chunks reuse, grown on demand.
#[derive(Default)]
pub struct Workspace {
    products: RefCell<Option<Buf<f32>>>,
    /// A chunk's selection, a bit a key (`selection_bits`).
    bits: RefCell<Option<Buf<u32>>>,
    scores: RefCell<Option<Buf<f32>>>,
    chunk_idx: RefCell<Option<Buf<i32>>>,
    chunk_margin: RefCell<Option<Buf<f32>>>,
    /// bf16 mode: the products' bf16 operands (a chunk's queries, or the indexer's whole; the
    /// keys; the values; a chunk's probabilities).
    bf16_q: RefCell<Option<Buf<u16>>>,
    bf16_k: RefCell<Option<Buf<u16>>>,
    bf16_v: RefCell<Option<Buf<u16>>>,
    bf16_p: RefCell<Option<Buf<u16>>>,
    /// When profiling: each step's time between synchronisations.
    steps: RefCell<Option<Profile>>,
}

impl Workspace {
    /// Starts (or stops) timing the steps; the totals restart from zero.
    pub fn set_profiling(&self, on: bool) {
        *self.steps.borrow_mut() = on.then(Profile::default);
    }

    /// The steps timed since profiling started.
    pub fn profile(&self) -> Option<Profile> {
        self.steps.borrow().clone()
    }

    /// Runs step `name` (worth `flops` in products), timed between synchronisations when
    /// profiling.
    fn step<R>(&self, gpu: &Gpu, (name, flops): (&'static str, usize), f: impl FnOnce() -> Result<R>) -> Result<R> {
        if self.steps.borrow().is_none() {
            return f();
        }
        gpu.synchronize()?;
        let t = std::time::Instant::now();
        let r = f()?;
        gpu.synchronize()?;
        if let Some(p) = self.steps.borrow_mut().as_mut() {
            p.add(name, t.elapsed().as_secs_f64(), flops as u64);
        }
        Ok(r)
    }
}

/// A chunk of queries: batch row `b`, queries `q0 .. q0 + qc` at positions `first ..`, which
/// see keys `0 .. t_eff` (the chunk's last query's causal keys).
struct Chunk {
    b: usize,
    q0: usize,
    qc: usize,
    first: usize,
    t_eff: usize,
}

/// The chunks of `batch` rows of `s` queries after `offset` cached keys (`t` keys in all), each
/// small enough that its products (`per_query` values a query) stay within `chunk_values`.
fn chunks(
    batch: usize,
    [s, t, offset]: [usize; 3],
    chunk_values: usize,
    per_query: usize,
) -> impl Iterator<Item = Chunk> {
    let qc_max = (chunk_values / per_query.max(1)).max(1);
    (0..batch).flat_map(move |b| {
        (0..s).step_by(qc_max).map(move |q0| {
            let qc = qc_max.min(s - q0);
            let first = offset + q0;
            Chunk { b, q0, qc, first, t_eff: (first + qc).min(t) }
        })
    })
}

/// Grows `slot` at once to what the largest of `chunks` needs (`size` values for a chunk): grown
/// chunk by chunk, as each reaches more keys, a GPU's kept memory pool could end up holding every
/// size the scratch passed through.
fn reserve<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone>(
    gpu: &Gpu,
    slot: &RefCell<Option<Buf<T>>>,
    chunks: impl Iterator<Item = Chunk>,
    size: impl Fn(&Chunk) -> usize,
) -> Result<()> {
    scratch(gpu, &mut slot.borrow_mut(), chunks.map(|c| size(&c)).max().unwrap_or(0)).map(|_| ())
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Device(format!("attention: size {v} exceeds cuBLAS's int")))
}

/// A strided batch of `batch` products `C = alpha op(A) op(B) + beta C`, column-major.
#[allow(clippy::too_many_arguments)]
fn batch(
    (transa, transb): (bool, bool),
    [m, n, k]: [usize; 3],
    [lda, ldb, ldc]: [usize; 3],
    [stride_a, stride_b, stride_c]: [usize; 3],
    batch_size: usize,
    alpha: f32,
    beta: f32,
) -> Result<StridedBatchedConfig<f32>> {
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let gemm = GemmConfig {
        transa: op(transa),
        transb: op(transb),
        m: int(m)?,
        n: int(n)?,
        k: int(k)?,
        alpha,
        lda: int(lda)?,
        ldb: int(ldb)?,
        beta,
        ldc: int(ldc)?,
    };
    Ok(StridedBatchedConfig {
        gemm,
        batch_size: int(batch_size)?,
        stride_a: stride_a as i64,
        stride_b: stride_b as i64,
        stride_c: stride_c as i64,
    })
}

/// The indexer's q and k as its products take them: f32 (f32 mode) or split bf16, each row
/// `[hi | lo | hi]` for the keys and `[hi | hi | lo]` for the queries (bf16 mode).
enum IndexOperands<'a> {
    F32(&'a Buf<f32>, &'a Buf<f32>),
    Split(&'a Buf<u16>, &'a Buf<u16>),
}

/// Split bf16 copies of the indexer's rows for a product of three terms along k
/// (`Gpu::split_bf16`): the keys' rows `[hi | lo | hi]`, the queries' `[hi | hi | lo]`.
const SPLIT_KEYS: (usize, u32) = (3, 0b010);
const SPLIT_QUERIES: (usize, u32) = (3, 0b100);
/// One copy rounded to bf16: the attention's operands in bf16 mode.
const ROUNDED: (usize, u32) = (1, 0);

/// One chunk's indexer scores: `g = q k^T * scale` for its queries over the keys they see, then
/// `index_combine` into rows `out_row0 ..` of `out` (rows of `cols` keys, -inf past a query's).
fn chunk_scores(
    (gpu, products, ws, g): (&Gpu, &Products, &Workspace, &mut Option<Buf<f32>>),
    (qk, w): (&IndexOperands, &Buf<f32>),
    c: &Chunk,
    [s, t, n, d]: [usize; 4],
    scale: f32,
    (out, out_row0, cols): (&mut Buf<f32>, usize, usize),
) -> Result<()> {
    let g = scratch(gpu, g, c.qc * n * c.t_eff)?;
    let row0 = c.b * s + c.q0;
    // g^T [t_eff, qc * n] = k[b, :t_eff] (d x t_eff, transposed) x q rows (d x qc * n); split, the
    // same over 3d.
    // FLOPs as issued: the split products do three terms.
    let terms = if matches!(qk, IndexOperands::Split(..)) { 3 } else { 1 };
    ws.step(gpu, ("indexer: q k products", 2 * c.t_eff * c.qc * n * d * terms), || match qk {
        IndexOperands::F32(q, k) => {
            let cfg = batch((true, false), [c.t_eff, c.qc * n, d], [d, d, c.t_eff], [0, 0, 0], 1, scale, 0.0)?;
            products.batched(cfg, (k, c.b * t * d), (q, row0 * n * d), (&mut *g, 0))
        }
        IndexOperands::Split(q, k) => {
            let d3 = 3 * d;
            let cfg = batch((true, false), [c.t_eff, c.qc * n, d3], [d3, d3, c.t_eff], [0, 0, 0], 1, scale, 0.0)?;
            products.batched_bf16(cfg, (k, c.b * t * d3), (q, row0 * n * d3), (&mut *g, 0))
        }
    })?;
    ws.step(gpu, ("indexer: index_combine", 0), || {
        gpu.index_combine(g, w, out, [c.qc, n, c.t_eff, cols], (row0, out_row0), c.first)
    })
}

/// Calls `f` with the indexer's q [B, S, n, d] and k [B, T, d] as this precision's products
/// take them (bf16 mode splits them into the workspace first).
fn index_operands<R>(
    (gpu, products, ws): (&Gpu, &Products, &Workspace),
    (q, k): (&Buf<f32>, &Buf<f32>),
    [batch_n, s, t, n, d]: [usize; 5],
    f: impl FnOnce(&IndexOperands) -> Result<R>,
) -> Result<R> {
    if products.precision == Precision::F32 {
        return f(&IndexOperands::F32(q, k));
    }
    let (mut qs, mut ks) = (ws.bf16_q.borrow_mut(), ws.bf16_k.borrow_mut());
    let one = |rows| Split { rows, heads: 1, a: [0, d, 0, d], b: [0; 4] };
    let qs = scratch(gpu, &mut qs, batch_n * s * n * 3 * d)?;
    let ks = scratch(gpu, &mut ks, batch_n * t * 3 * d)?;
    ws.step(gpu, ("indexer: split bf16", 0), || {
        gpu.split_bf16((q, q), &one(batch_n * s * n), &mut *qs, SPLIT_QUERIES)?;
        gpu.split_bf16((k, k), &one(batch_n * t), &mut *ks, SPLIT_KEYS)
    })?;
    f(&IndexOperands::Split(qs, ks))
}

/// The indexer's scores: q [B, S, n, d], k [B, T, d], w [B, S, n] -> [B, S, T] (the
/// `Ops::index_scores` contract; dims = [B, S, T, n, d, offset]).
pub fn index_scores(
    (gpu, products, ws): (&Gpu, &Products, &Workspace),
    chunk_values: usize,
    (q, k, w): (&Buf<f32>, &Buf<f32>, &Buf<f32>),
    [batch_n, s, t, n, d, offset]: [usize; 6],
    scale: f32,
) -> Result<Buf<f32>> {
    let mut scores = gpu.output(batch_n * s * t)?;
    reserve(gpu, &ws.products, chunks(batch_n, [s, t, offset], chunk_values, n * t), |c| c.qc * n * c.t_eff)?;
    index_operands((gpu, products, ws), (q, k), [batch_n, s, t, n, d], |qk| {
        let mut g = ws.products.borrow_mut();
        for c in chunks(batch_n, [s, t, offset], chunk_values, n * t) {
            let row0 = c.b * s + c.q0;
            chunk_scores((gpu, products, ws, &mut g), (qk, w), &c, [s, t, n, d], scale, (&mut scores, row0, t))?;
        }
        Ok(())
    })?;
    Ok(scores)
}

/// The indexer's selection without the whole [B, S, T] scores: each chunk's scores, then their
/// causal top-`kk` (`Ops::index_topk`; dims as [`index_scores`]) -> (idx [B, S, kk], margin
/// [B, S]). Memory: a chunk's products and scores, not S x T floats (64 GB at 128k tokens). A
/// chunk whose queries see no more than `kk` keys keeps them all, unscored (`every_key`).
pub fn index_topk(
    (gpu, products, ws): (&Gpu, &Products, &Workspace),
    chunk_values: usize,
    (q, k, w): (&Buf<f32>, &Buf<f32>, &Buf<f32>),
    [batch_n, s, t, n, d, offset]: [usize; 6],
    scale: f32,
    kk: usize,
) -> Result<(Buf<i32>, Buf<f32>)> {
    let (mut idx, mut margin) = (gpu.zeros(batch_n * s * kk)?, gpu.output(batch_n * s)?);
    // A chunk whose queries see no more than kk keys needs no scratch (below).
    let all = || chunks(batch_n, [s, t, offset], chunk_values, n * t).filter(|c| c.t_eff > kk);
    let cols = |c: &Chunk| c.t_eff.max(kk).min(t);
    reserve(gpu, &ws.products, all(), |c| c.qc * n * c.t_eff)?;
    reserve(gpu, &ws.scores, all(), |c| c.qc * cols(c))?;
    index_operands((gpu, products, ws), (q, k), [batch_n, s, t, n, d], |qk| {
        let (mut g, mut scores) = (ws.products.borrow_mut(), ws.scores.borrow_mut());
        let (mut chunk_idx, mut chunk_margin) = (ws.chunk_idx.borrow_mut(), ws.chunk_margin.borrow_mut());
        for c in chunks(batch_n, [s, t, offset], chunk_values, n * t) {
            let row0 = c.b * s + c.q0;
            if c.t_eff <= kk {
                // No query of the chunk sees more than K keys: each keeps every one, unscored.
                ws.step(gpu, ("indexer: top-k", 0), || gpu.every_key(&mut idx, &mut margin, row0, c.qc, kk))?;
                continue;
            }
            // Rows as wide as the keys the chunk sees (at least K, which the top-k requires).
            let cols = cols(&c);
            let scores = scratch(gpu, &mut scores, c.qc * cols)?;
            chunk_scores((gpu, products, ws, &mut g), (qk, w), &c, [s, t, n, d], scale, (&mut *scores, 0, cols))?;
            // Row i of the chunk is the query at position first + i.
            let (ci, cm) = (scratch(gpu, &mut chunk_idx, c.qc * kk)?, scratch(gpu, &mut chunk_margin, c.qc)?);
            ws.step(gpu, ("indexer: top-k", 0), || {
                gpu.topk_causal_by(
                    gpu.topk_path(cols, kk),
                    scores,
                    [c.qc, c.qc, cols, c.first, kk],
                    &mut *ci,
                    &mut *cm,
                )?;
                gpu.copy_into(ci, c.qc * kk, &mut idx, row0 * kk)?;
                gpu.copy_into(cm, c.qc, &mut margin, row0)
            })?;
        }
        Ok(())
    })?;
    Ok((idx, margin))
}

/// Attention over the selection in the masked form: q [B, S, nh, nope + rd], kv [B, T, nh,
/// nope + vd], k_rope [B, T, rd], idx [B, S, K] -> [B, S, nh, vd] (the
/// `Ops::sparse_attention` contract; dims = [B, S, T, nh, nope, rd, vd, K, offset]).
pub fn masked(
    (gpu, products, ws): (&Gpu, &Products, &Workspace),
    chunk_values: usize,
    (q, kv, k_rope, idx): (&Buf<f32>, &Buf<f32>, &Buf<f32>, &Buf<i32>),
    dims: [usize; 9],
    scale: f32,
) -> Result<Buf<f32>> {
    let [batch_n, s, t, nh, _, _, vd, _, offset] = dims;
    let mut out = gpu.output(batch_n * s * nh * vd)?;
    let all = || chunks(batch_n, [s, t, offset], chunk_values, nh * t);
    reserve(gpu, &ws.products, all(), |c| nh * c.qc * c.t_eff)?;
    reserve(gpu, &ws.bits, all(), |c| c.qc * c.t_eff.div_ceil(32))?;
    if products.precision == Precision::Bf16 {
        reserve(gpu, &ws.bf16_p, all(), |c| nh * c.qc * c.t_eff.next_multiple_of(8))?;
    }
    let (mut p, mut bits) = (ws.products.borrow_mut(), ws.bits.borrow_mut());
    let mut rounded = match products.precision {
        Precision::F32 => None,
        Precision::Bf16 => {
            Some(ws.step(gpu, ("attention: round to bf16", 0), || Bf16Qkv::new((gpu, ws), (kv, k_rope), dims))?)
        }
    };
    for c in chunks(batch_n, [s, t, offset], chunk_values, nh * t) {
        let p = scratch(gpu, &mut p, nh * c.qc * c.t_eff)?;
        let bits = scratch(gpu, &mut bits, c.qc * c.t_eff.div_ceil(32))?;
        match rounded.as_mut() {
            None => ws.step(gpu, ("attention: a chunk in f32", 0), || {
                masked_chunk_f32((gpu, products), (q, kv, k_rope, idx), (p, bits), &c, dims, scale, &mut out)
            })?,
            Some(sp) => sp.chunk((gpu, products, ws), (q, idx), (p, bits), &c, dims, scale, &mut out)?,
        }
    }
    Ok(out)
}

/// One chunk of [`masked`] in f32: SGEMMs around `masked_softmax`.
#[allow(clippy::too_many_arguments)]
fn masked_chunk_f32(
    (gpu, products): (&Gpu, &Products),
    (q, kv, k_rope, idx): (&Buf<f32>, &Buf<f32>, &Buf<f32>, &Buf<i32>),
    (p, bits): (&mut Buf<f32>, &mut Buf<u32>),
    &Chunk { b, q0, qc, first, t_eff }: &Chunk,
    [_, s, t, nh, nope, rd, vd, kk, _]: [usize; 9],
    scale: f32,
    out: &mut Buf<f32>,
) -> Result<()> {
    let (qw, kvw) = (nh * (nope + rd), nh * (nope + vd)); // row widths of q and kv
    let (row0, key0) = (b * s + q0, b * t);
    // Per head h: scores_h^T [t_eff, qc] = k_nope_h (nope x t_eff, transposed) x q_nope_h.
    let nope_cfg =
        batch((true, false), [t_eff, qc, nope], [kvw, qw, t_eff], [nope + vd, nope + rd, qc * t_eff], nh, scale, 0.0)?;
    products.batched(nope_cfg, (kv, key0 * kvw), (q, row0 * qw), (p, 0))?;
    // ... + k_rope (rd x t_eff, shared by the heads: stride 0) x q_rope_h.
    if rd > 0 {
        let rope_cfg =
            batch((true, false), [t_eff, qc, rd], [rd, qw, t_eff], [0, nope + rd, qc * t_eff], nh, scale, 1.0)?;
        products.batched(rope_cfg, (k_rope, key0 * rd), (q, row0 * qw + nope), (p, 0))?;
    }
    gpu.selection_bits(idx, row0 * kk, bits, [qc, kk, t_eff], first)?;
    gpu.masked_softmax(p, bits, nh * qc, qc, t_eff)?;
    // out_h^T [vd, qc] = v_h (vd x t_eff) x P_h^T (t_eff x qc), into out's rows at head h.
    let pv_cfg =
        batch((false, false), [vd, qc, t_eff], [kvw, t_eff, nh * vd], [nope + vd, qc * t_eff, vd], nh, 1.0, 0.0)?;
    products.batched(pv_cfg, (kv, key0 * kvw + nope), (p, 0), (out, row0 * nh * vd))
}

/// Attention over the selection in the fused form (bf16 mode only; dims as [`masked`]): the keys
/// and values rounded once (`Bf16Qkv`), then each chunk's selection as bits and one
/// `flash_attention_bf16`, which keeps the scores in registers. Its scratch is the bits alone, so
/// a chunk may hold `chunk_values` queries x keys (a bit each, in words of 32).
pub fn fused(
    (gpu, products, ws): (&Gpu, &Products, &Workspace),
    chunk_values: usize,
    (q, kv, k_rope, idx): (&Buf<f32>, &Buf<f32>, &Buf<f32>, &Buf<i32>),
    dims: [usize; 9],
    scale: f32,
) -> Result<Buf<f32>> {
    let [batch_n, s, t, nh, nope, rd, vd, kk, offset] = dims;
    if products.precision != Precision::Bf16 {
        return Err(Error::Device("the fused attention computes in bf16 only (--precision bf16)".into()));
    }
    if let Some(why) = gpu.flash_refusal(nope + rd, vd) {
        return Err(Error::Device(why));
    }
    let mut out = gpu.output(batch_n * s * nh * vd)?;
    let qkv = ws.step(gpu, ("attention: round to bf16", 0), || Bf16Qkv::new((gpu, ws), (kv, k_rope), dims))?;
    let (ks, vs) = qkv.operands()?;
    reserve(gpu, &ws.bits, chunks(batch_n, [s, t, offset], chunk_values, t), |c| c.qc * c.t_eff.div_ceil(32))?;
    let mut bits = ws.bits.borrow_mut();
    for c in chunks(batch_n, [s, t, offset], chunk_values, t) {
        let bits = scratch(gpu, &mut bits, c.qc * c.t_eff.div_ceil(32))?;
        let row0 = c.b * s + c.q0;
        let (key0, bt, qk) = (c.b * t, batch_n * t, nope + rd);
        let fc = FlashChunk { row0, qc: c.qc, first: c.first, key0, t_eff: c.t_eff, bt, nh, qk, vd };
        ws.step(gpu, ("attention: selection bits", 0), || {
            gpu.selection_bits(idx, row0 * kk, &mut *bits, [c.qc, kk, c.t_eff], c.first)
        })?;
        ws.step(gpu, ("attention: fused scores, softmax, values", fc.flops()), || {
            gpu.flash_attention_bf16((q, ks, vs), bits, &mut out, &fc, scale)
        })?;
    }
    Ok(out)
}

/// The masked form's operands in bf16 mode, rounded to bf16 (`Gpu::split_bf16`, one copy): per
/// head, the keys' rows `[k_nope_h k_rope]` and the values' rows, once for every chunk; each
/// chunk's queries and its probabilities (`masked_softmax_bf16`). The keys and values are held
/// whole: 1 KB a key and head at GLM-5's widths (0.13 GB for 2048 tokens, 1.1 GB at the masked
/// form's limit of 16k keys); the queries a chunk at a time.
struct Bf16Qkv<'w> {
    keys: std::cell::RefMut<'w, Option<Buf<u16>>>,
    values: std::cell::RefMut<'w, Option<Buf<u16>>>,
}

impl<'w> Bf16Qkv<'w> {
    fn new(
        (gpu, ws): (&Gpu, &'w Workspace),
        (kv, k_rope): (&Buf<f32>, &Buf<f32>),
        [batch_n, _, t, nh, nope, rd, vd, _, _]: [usize; 9],
    ) -> Result<Self> {
        let (qk, kvw) = (nope + rd, nh * (nope + vd)); // a head's score width; kv's row width
        let (mut keys, mut values) = (ws.bf16_k.borrow_mut(), ws.bf16_v.borrow_mut());
        let split = |rows, a, b| Split { rows, heads: nh, a, b };
        let ks = scratch(gpu, &mut keys, nh * batch_n * t * qk)?;
        gpu.split_bf16((kv, k_rope), &split(batch_n * t, [0, kvw, nope + vd, nope], [0, rd, 0, rd]), ks, ROUNDED)?;
        let vs = scratch(gpu, &mut values, nh * batch_n * t * vd)?;
        gpu.split_bf16((kv, kv), &split(batch_n * t, [nope, kvw, nope + vd, vd], [0; 4]), vs, ROUNDED)?;
        Ok(Bf16Qkv { keys, values })
    }

    /// The rounded keys and values.
    fn operands(&self) -> Result<(&Buf<u16>, &Buf<u16>)> {
        let none = || Error::Device("bf16 operands missing".into());
        Ok((self.keys.as_ref().ok_or_else(none)?, self.values.as_ref().ok_or_else(none)?))
    }

    /// One chunk of [`masked`]: its queries rounded, its scores in one bf16 product, the
    /// selection as bits, the softmax rounded to bf16, then `P v` in one more.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &mut self,
        (gpu, products, ws): (&Gpu, &Products, &Workspace),
        (q, idx): (&Buf<f32>, &Buf<i32>),
        (p, bits): (&mut Buf<f32>, &mut Buf<u32>),
        &Chunk { b, q0, qc, first, t_eff }: &Chunk,
        [batch_n, s, t, nh, nope, rd, vd, kk, _]: [usize; 9],
        scale: f32,
        out: &mut Buf<f32>,
    ) -> Result<()> {
        let (ks, vs) = self.operands()?;
        let (qk, bt) = (nope + rd, batch_n * t);
        let (row0, key0) = (b * s + q0, b * t);
        let mut qs = ws.bf16_q.borrow_mut();
        let qs = scratch(gpu, &mut qs, nh * qc * qk)?;
        let queries = Split { rows: qc, heads: nh, a: [row0 * nh * qk, nh * qk, qk, qk], b: [0; 4] };
        ws.step(gpu, ("attention: round to bf16", 0), || gpu.split_bf16((q, q), &queries, &mut *qs, ROUNDED))?;
        // Per head h: scores_h^T [t_eff, qc] = keys_h (qk x t_eff, transposed) x queries_h.
        let cfg =
            batch((true, false), [t_eff, qc, qk], [qk, qk, t_eff], [bt * qk, qc * qk, qc * t_eff], nh, scale, 0.0)?;
        ws.step(gpu, ("attention: scores", 2 * nh * t_eff * qc * qk), || {
            products.batched_bf16(cfg, (ks, key0 * qk), (qs, 0), (&mut *p, 0))
        })?;
        // Each row of probabilities starts 16 bytes aligned (8 bf16), as cuBLAS's fastest
        // tensor-core kernels want their operands.
        let width = t_eff.next_multiple_of(8);
        let mut ps = ws.bf16_p.borrow_mut();
        let ps = scratch(gpu, &mut ps, nh * qc * width)?;
        ws.step(gpu, ("attention: selection bits, softmax", 0), || {
            gpu.selection_bits(idx, row0 * kk, &mut *bits, [qc, kk, t_eff], first)?;
            gpu.masked_softmax_bf16(p, bits, &mut *ps, nh * qc, [qc, t_eff, width])
        })?;
        // out_h^T [vd, qc] = v_h (vd x t_eff) x P_h^T (t_eff x qc), into out's rows at head h.
        let cfg =
            batch((false, false), [vd, qc, t_eff], [vd, width, nh * vd], [bt * vd, qc * width, vd], nh, 1.0, 0.0)?;
        ws.step(gpu, ("attention: values", 2 * nh * vd * qc * t_eff), || {
            products.batched_bf16(cfg, (vs, key0 * vd), (ps, 0), (&mut *out, row0 * nh * vd))
        })
    }
}
