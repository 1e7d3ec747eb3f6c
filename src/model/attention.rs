//! Attention over the DSA selection and the indexer's scores, one block of queries at a time.
//!
//! The reference builds every head's `[S, T]` score matrix, adds the selection as a `-inf` mask,
//! takes the softmax and multiplies the values; its indexer builds `[n_heads, S, T]` before
//! summing the heads. At GLM-5's 64 attention heads and 32 index heads that is about 1 KB of f32
//! per query-key pair held at once: 17 GB at 4096 tokens. Here a task takes one batch row and
//! [`BLOCK`] queries, and for each head scores only the keys up to the block's last position
//! (the rest are causally masked anyway), drops the keys the selection did not keep, normalises,
//! and multiplies the values straight into the output: the reference's math, per query, in
//! another summation order, with scratch of one block's scores. When the block's queries keep
//! few of those keys (a decode step past `index_topk` positions), only the kept ones are
//! gathered and scored ([`Keys`]); otherwise the products go through the `gemm` crate (candle's
//! own CPU matmul) on strided views, so no key or value is copied. The indexer's scores go the
//! same way, and its top-k is taken per block ([`index_topk`]), so its `[B, S, T]` scores exist
//! only when they are recorded ([`index_scores`]).

use gemm::Parallelism;
use rayon::prelude::*;

use super::indexer::{select_row, Selection};

/// Queries per task. Each task's products repack a head's keys, so larger blocks repack less: 64
/// measured about 5% faster than 32 on a 1024-token prefill and the same on 128 tokens, where
/// two blocks still make a task for each of two threads.
pub(crate) const BLOCK: usize = 64;

/// A row-major f32 matrix inside a slice: `rows` x `cols` values from `data[0]`, rows `stride`
/// apart.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a> View<'a> {
    /// The view of `rows` x `cols` starting at `data[start]`.
    pub fn at(data: &'a [f32], start: usize, [rows, cols, stride]: [usize; 3]) -> Self {
        let v = View { data: &data[start.min(data.len())..], rows, cols, stride };
        assert!(rows == 0 || cols == 0 || (rows - 1) * stride + cols <= v.data.len(), "view past its slice");
        v
    }
}

/// `dst[i, j] = (dst[i, j] if accumulate) + scale · Σ_k a[i, k] · b[j, k]`, dst rows `stride` apart.
pub(crate) fn abt(dst: &mut [f32], stride: usize, a: View, b: View, scale: f32, accumulate: bool) {
    assert_eq!(a.cols, b.cols, "a·bᵀ needs equal widths");
    product(dst, stride, a, [a.stride, 1], b, [1, b.stride], b.rows, scale, accumulate);
}

/// `dst[i, j] = Σ_k a[i, k] · b[k, j]`, dst rows `stride` apart.
pub(crate) fn ab(dst: &mut [f32], stride: usize, a: View, b: View) {
    assert_eq!(a.cols, b.rows, "a·b needs a's width to be b's height");
    product(dst, stride, a, [a.stride, 1], b, [b.stride, 1], b.cols, 1.0, false);
}

/// The one call into `gemm`: `m = a.rows` by `n` outputs over `k = a.cols`, each operand given by
/// its (row, column) strides. The asserts are what makes the raw pointers sound.
#[allow(clippy::too_many_arguments)]
fn product(
    dst: &mut [f32],
    stride: usize,
    a: View,
    [ars, acs]: [usize; 2],
    b: View,
    [brs, bcs]: [usize; 2],
    n: usize,
    scale: f32,
    accumulate: bool,
) {
    let (m, k) = (a.rows, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * stride + n <= dst.len(), "product past its output");
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * stride..i * stride + n].fill(0.0));
        }
        return;
    }
    assert!((m - 1) * ars + (k - 1) * acs < a.data.len(), "product past its left operand");
    assert!((k - 1) * brs + (n - 1) * bcs < b.data.len(), "product past its right operand");
    let s = |x: usize| x as isize;
    // SAFETY: every index the product touches is inside its slice (the asserts above), and `dst`
    // is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            s(stride),
            accumulate,
            a.data.as_ptr(),
            s(acs),
            s(ars),
            b.data.as_ptr(),
            s(bcs),
            s(brs),
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// The sizes of one attention call: `T = offset + S` keys, of which the last `S` are the queries'
/// own positions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub keys: usize,
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
}

/// Softmax over the selected keys of each query, in the expanded form.
/// q: [B, S, nh, nope + rope] (roped); kv: `kv_b_proj`'s output [B, T, nh, nope + v]; k_rope: the
/// shared roped key [B, T, rope] -> [B, S, nh * v].
pub(crate) fn sparse_attention(
    q: &[f32],
    kv: &[f32],
    k_rope: &[f32],
    sel: &Selection,
    d: Dims,
    scale: f32,
) -> Vec<f32> {
    let Dims { batch, seq: s, keys: t, heads: nh, nope, rope, v: vd } = d;
    let (qk, kvw, offset) = (nope + rope, nope + vd, t - s);
    assert!(q.len() == batch * s * nh * qk && kv.len() == batch * t * nh * kvw && k_rope.len() == batch * t * rope);
    let mut out = vec![0f32; batch * s * nh * vd];
    if out.is_empty() {
        return out;
    }
    // Only a block that gathers needs the non-finite keys, and none gathers when a row holds
    // as many keys as there are (a prefill shorter than `index_topk`: every causal key kept), so
    // then kv is not read a second time. (A replayed row that wide but keeping fewer keys could
    // gather: its NaN is named where it arises all the same.)
    let poisoned = match sel.k < t {
        true => non_finite_positions(&[(kv, nh * kvw), (k_rope, rope)], batch, t, 0),
        false => Vec::new(),
    };
    out.par_chunks_mut(s * nh * vd).enumerate().for_each(|(b, row)| {
        row.par_chunks_mut(BLOCK * nh * vd).enumerate().for_each(|(blk, out)| {
            let (i0, m) = (blk * BLOCK, out.len() / (nh * vd));
            let tb = offset + i0 + m; // the keys any query of the block may see
            let keys = Keys::kept(sel, b, i0..i0 + m, offset, tb, &poisoned);
            let mut p = vec![0f32; m * keys.width]; // [m, keys]
            let (kv, k_rope) = (&kv[b * t * nh * kvw..], &k_rope[b * t * rope..]);
            let (mut buf_rope, mut buf_k, mut buf_v) = (Vec::new(), Vec::new(), Vec::new());
            let k_rope = keys.rows(View::at(k_rope, 0, [tb, rope, rope]), &mut buf_rope);
            for h in 0..nh {
                let q0 = ((b * s + i0) * nh + h) * qk;
                let q = [View::at(q, q0, [m, nope, nh * qk]), View::at(q, q0 + nope, [m, rope, nh * qk])];
                let k = [keys.rows(View::at(kv, h * kvw, [tb, nope, nh * kvw]), &mut buf_k), k_rope];
                let v = keys.rows(View::at(kv, h * kvw + nope, [tb, vd, nh * kvw]), &mut buf_v);
                attend(&mut p, &keys.keep, q, k, v, scale, &mut out[h * vd..], nh * vd);
            }
        });
    });
    out
}

/// Softmax over the selected keys of each query, in the absorbed form (decode): every head reads
/// the same latent and rope key of a position, so a task takes a block of the folded
/// (head, query) rows. q_abs: [B, nh, C, r] (queries absorbed into the latent); q_rope:
/// [B, nh, C, rope]; latents: [T, B, r]; k_rope: [T, B, rope] (position-major, as the decode cache
/// holds them) -> the latents mixed by each row's probabilities, [B, nh, C, r]. In `d`, `nope`
/// and `v` are both the latent rank r. `poisoned`: the positions (ascending) whose latent or rope
/// key is not finite (the cache tracks them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn absorbed_attention(
    q_abs: &[f32],
    q_rope: &[f32],
    latents: &[f32],
    k_rope: &[f32],
    sel: &Selection,
    poisoned: &[usize],
    d: Dims,
    scale: f32,
) -> Vec<f32> {
    let Dims { batch, seq: c, keys: t, heads: nh, nope: r, rope, .. } = d;
    let offset = t - c;
    assert!(q_abs.len() == batch * nh * c * r && q_rope.len() == batch * nh * c * rope);
    assert!(latents.len() == batch * t * r && k_rope.len() == batch * t * rope);
    let mut out = vec![0f32; batch * nh * c * r];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(nh * c * r).enumerate().for_each(|(b, rows)| {
        rows.par_chunks_mut(BLOCK * r).enumerate().for_each(|(blk, out)| {
            let (r0, m) = (blk * BLOCK, out.len() / r); // folded rows r0.. are (head, query) pairs
            let last = (r0..r0 + m).map(|row| row % c).max().unwrap_or(0);
            let tb = offset + last + 1;
            let keys = Keys::kept(sel, b, (r0..r0 + m).map(|row| row % c), offset, tb, poisoned);
            let mut p = vec![0f32; m * keys.width]; // [m, keys]
            let (mut buf_latent, mut buf_rope) = (Vec::new(), Vec::new());
            let latent = keys.rows(View::at(latents, b * r, [tb, r, batch * r]), &mut buf_latent); // keys and values alike
            let q = [
                View::at(q_abs, (b * nh * c + r0) * r, [m, r, r]),
                View::at(q_rope, (b * nh * c + r0) * rope, [m, rope, rope]),
            ];
            let k = [latent, keys.rows(View::at(k_rope, b * rope, [tb, rope, batch * rope]), &mut buf_rope)];
            attend(&mut p, &keys.keep, q, k, latent, scale, out, r);
        });
    });
    out
}

/// One block of rows against keys `0..tb`, the step both forms share: `p` (`[rows, tb]` scratch)
/// = scale · (q[0] · k[0]ᵀ + q[1] · k[1]ᵀ) (the latent or nope part, then the rope part), the
/// softmax over the `keep` keys, and `out` (rows `stride` apart) = p · v.
#[allow(clippy::too_many_arguments)]
fn attend(
    p: &mut [f32],
    keep: &[bool],
    q: [View; 2],
    k: [View; 2],
    v: View,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let tb = k[0].rows;
    abt(p, tb, q[0], k[0], scale, false);
    abt(p, tb, q[1], k[1], scale, true);
    softmax_kept(p, keep, tb);
    ab(out, stride, View::at(p, 0, [q[0].rows, tb, tb]), v);
}

/// The keys one block of queries attends to, and which of them each query keeps.
///
/// Past `index_topk` keys a query keeps only some of those it may see. When the keys any query
/// of the block keeps are at most [`GATHER_BELOW`] of them, they are copied together and scored
/// alone: a decode step then scores `index_topk` keys, not every cached one, so DSA cuts the
/// work as well as the choice. Otherwise (a prefill block whose queries keep different keys,
/// or no cut at all) the block scores every key up to its last query, where it reads them in
/// place, and drops the ones not kept. Either way each query's softmax covers the same keys in
/// the same order; only the products' blocking (ulp-level rounding) may differ. And a key whose
/// row is not finite is gathered too, dropped: its values, times a probability of 0, make the
/// block's outputs NaN either way. (The reference sums over every key, so there every query
/// turns NaN; here the queries of blocks that reach the key. The first NaN is found where it
/// arises, before attention, all the same.)
struct Keys {
    /// The positions of the gathered keys (ascending), or None: the keys `0..tb` in place.
    gathered: Option<Vec<usize>>,
    /// [queries, width]: whether each query keeps each key.
    keep: Vec<bool>,
    /// How many keys the block scores: `tb`, or how many were gathered.
    width: usize,
}

/// Gather the kept keys when they are at most this share of the keys the block may see (3/4: a
/// copied key costs one read and write of its row, a scored one a multiply-add per query).
const GATHER_BELOW: (usize, usize) = (3, 4);

impl Keys {
    /// Batch row `b`'s `queries` (indices into its queries) against keys `0..tb`: each keeps its
    /// selected keys at or before its own position. `poisoned`: positions whose key or value row
    /// is not finite, gathered whether kept or not.
    fn kept(
        sel: &Selection,
        b: usize,
        queries: impl ExactSizeIterator<Item = usize>,
        offset: usize,
        tb: usize,
        poisoned: &[usize],
    ) -> Self {
        let (mut keep, mut any) = (vec![false; queries.len() * tb], vec![false; tb]);
        for (row, q) in keep.chunks_exact_mut(tb).zip(queries) {
            for &key in sel.row(b, q).iter().filter(|&&key| key <= offset + q) {
                (row[key], any[key]) = (true, true);
            }
        }
        poisoned.iter().take_while(|&&p| p < tb).for_each(|&p| any[p] = true);
        let any: Vec<usize> = (0..tb).filter(|&key| any[key]).collect();
        // (A block that keeps nothing scores its keys in place, to give the reference's NaN.)
        if any.is_empty() || any.len() * GATHER_BELOW.1 > tb * GATHER_BELOW.0 {
            return Keys { gathered: None, keep, width: tb };
        }
        let keep = keep.chunks_exact(tb).flat_map(|row| any.iter().map(|&key| row[key])).collect();
        Keys { width: any.len(), gathered: Some(any), keep }
    }

    /// The rows of `all` (one row per key `0..tb`) the block reads: `all` itself, or its gathered
    /// rows copied into `buf`.
    fn rows<'a>(&self, all: View<'a>, buf: &'a mut Vec<f32>) -> View<'a> {
        let Some(keys) = &self.gathered else { return all };
        buf.clear();
        for &key in keys {
            buf.extend_from_slice(&all.data[key * all.stride..][..all.cols]);
        }
        View { data: buf, rows: keys.len(), cols: all.cols, stride: all.cols }
    }
}

/// The positions `first + j` (ascending, each once) whose row is not finite in any of `parts`
/// (each `[B, positions, width]` with its width), in any batch row.
pub(crate) fn non_finite_positions(
    parts: &[(&[f32], usize)],
    batch: usize,
    positions: usize,
    first: usize,
) -> Vec<usize> {
    let bad = |j: usize, (x, width): (&[f32], usize)| {
        (0..batch).any(|b| x[(b * positions + j) * width..][..width].iter().any(|v| !v.is_finite()))
    };
    (0..positions).filter(|&j| parts.iter().any(|&part| bad(j, part))).map(|j| first + j).collect()
}

/// Each row of `p` (rows `tb` wide) becomes the softmax of its kept scores, 0 elsewhere. A row
/// that keeps nothing gives NaN, as the reference's softmax of an all `-inf` row does.
fn softmax_kept(p: &mut [f32], keep: &[bool], tb: usize) {
    for (row, keep) in p.chunks_exact_mut(tb).zip(keep.chunks_exact(tb)) {
        let max = row.iter().zip(keep).filter(|(_, &k)| k).fold(f32::NEG_INFINITY, |m, (&x, _)| m.max(x));
        let mut sum = 0f32;
        for (x, &k) in row.iter_mut().zip(keep) {
            *x = if k { (*x - max).exp() } else { 0.0 };
            sum += *x;
        }
        let sum = if sum > 0.0 { sum } else { f32::NAN };
        row.iter_mut().for_each(|x| *x /= sum);
    }
}

/// The sizes of one indexer call: `[batch, S, T, n_heads, head_dim]`.
pub(crate) type IndexDims = [usize; 5];

/// The indexer's scores, `Σ_h w[s, h] · relu(scale · q[s, h] · k[t])`, at every causal key and
/// `-inf` past it. q: [B, S, n, d] (roped); k: [T, B, d] (roped, position-major as the decode cache
/// holds them; the last S are the queries' own); w: [B, S, n] -> [B, S, T]. Heads are summed in order.
pub(crate) fn index_scores(q: &[f32], k: &[f32], w: &[f32], dims: IndexDims, scale: f32) -> Vec<f32> {
    let [batch, s, t, ..] = check_index(q, k, w, dims);
    let mut out = vec![0f32; batch * s * t];
    if !out.is_empty() {
        out.par_chunks_mut(s * t).enumerate().for_each(|(b, rows)| {
            rows.par_chunks_mut(BLOCK * t).enumerate().for_each(|(blk, out)| {
                index_block(q, k, w, dims, scale, b, blk * BLOCK, out);
            });
        });
    }
    out
}

/// [`index_scores`]' top `topk` causal keys per query (`top_k_causal`), one block of queries'
/// scores at a time: the `[B, S, T]` scores are never whole.
pub(crate) fn index_topk(q: &[f32], k: &[f32], w: &[f32], dims: IndexDims, scale: f32, topk: usize) -> Selection {
    let [batch, s, t, ..] = check_index(q, k, w, dims);
    let kk = topk.min(t);
    let tasks: Vec<(usize, usize)> = (0..batch).flat_map(|b| (0..s.div_ceil(BLOCK)).map(move |blk| (b, blk))).collect();
    let parts: Vec<(Vec<usize>, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(b, blk)| {
            let (i0, m) = (blk * BLOCK, BLOCK.min(s - blk * BLOCK));
            let mut scores = vec![0f32; m * t];
            index_block(q, k, w, dims, scale, b, i0, &mut scores);
            let (mut idx, mut margin, mut order) = (Vec::with_capacity(m * kk), Vec::with_capacity(m), Vec::new());
            for (i, row) in scores.chunks_exact(t).enumerate() {
                margin.push(select_row(row, t - s + i0 + i, kk, &mut order, &mut idx));
            }
            (idx, margin)
        })
        .collect();
    let (idx, margin): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    Selection { batch, seq: s, k: kk, idx: idx.concat(), margin: margin.concat() }
}

fn check_index(q: &[f32], k: &[f32], w: &[f32], dims: IndexDims) -> IndexDims {
    let [batch, s, t, n, d] = dims;
    assert!(q.len() == batch * s * n * d && k.len() == batch * t * d && w.len() == batch * s * n && t >= s);
    dims
}

/// The scores of batch row `b`'s queries `i0..i0 + m` into `out` ([m, T], `m` from its length).
#[allow(clippy::too_many_arguments)]
fn index_block(
    q: &[f32],
    k: &[f32],
    w: &[f32],
    [batch, s, t, n, d]: IndexDims,
    scale: f32,
    b: usize,
    i0: usize,
    out: &mut [f32],
) {
    let (m, offset) = (out.len() / t, t - s);
    let tb = offset + i0 + m; // the keys any query of the block may see
    let keys = View::at(k, b * d, [tb, d, batch * d]);
    let q0 = (b * s + i0) * n * d;
    // A block of few queries (a decode step: one query, 32 heads) scores all its heads in one
    // product, its (query, head) rows being one after another: one pass over the keys instead of
    // one per head. A block of many scores a head at a time, so its scratch stays [m, tb].
    let heads = if m * n <= BLOCK { n } else { 1 };
    let mut scores = vec![0f32; m * heads * tb]; // [m, heads, tb]
    for h0 in (0..n).step_by(heads) {
        let rows = match heads {
            1 => View::at(q, q0 + h0 * d, [m, d, n * d]),
            _ => View::at(q, q0, [m * n, d, d]),
        };
        abt(&mut scores, tb, rows, keys, scale, false);
        for (i, (acc, scores)) in out.chunks_exact_mut(t).zip(scores.chunks_exact(heads * tb)).enumerate() {
            let causal = offset + i0 + i + 1;
            for (h, scores) in (h0..h0 + heads).zip(scores.chunks_exact(tb)) {
                let wi = w[(b * s + i0 + i) * n + h];
                for (a, &x) in acc[..causal].iter_mut().zip(&scores[..causal]) {
                    // relu that keeps a NaN, as torch's does
                    let term = wi * if x < 0.0 { 0.0 } else { x };
                    *a = if h == 0 { term } else { *a + term };
                }
            }
        }
    }
    for (i, acc) in out.chunks_exact_mut(t).enumerate() {
        acc[offset + i0 + i + 1..].fill(f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::indexer::top_k_causal;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.618_034).sin() * 1.5).collect()
    }

    /// The reference's form in f64: every head's scores over all T keys, -inf where the query's
    /// row of the selection does not keep the key (or it is past the query), softmax, values.
    fn attention_f64(q: &[f32], kv: &[f32], k_rope: &[f32], sel: &Selection, d: Dims, scale: f32) -> Vec<f64> {
        let Dims { batch, seq: s, keys: t, heads: nh, nope, rope, v: vd } = d;
        let (qk, kvw) = (nope + rope, nope + vd);
        let mut out = vec![0f64; batch * s * nh * vd];
        for b in 0..batch {
            for i in 0..s {
                let p = t - s + i;
                for h in 0..nh {
                    let qv = &q[((b * s + i) * nh + h) * qk..][..qk];
                    let score = |j: usize| {
                        let kn = &kv[((b * t + j) * nh + h) * kvw..][..nope];
                        let kr = &k_rope[(b * t + j) * rope..][..rope];
                        let dot: f64 = qv.iter().zip(kn.iter().chain(kr)).map(|(&a, &b)| a as f64 * b as f64).sum();
                        dot * scale as f64
                    };
                    let row = sel.row(b, i);
                    let kept: Vec<usize> = (0..t).filter(|&j| j <= p && row.contains(&j)).collect();
                    let scores: Vec<f64> = kept.iter().map(|&j| score(j)).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                    for c in 0..vd {
                        let acc: f64 = kept
                            .iter()
                            .zip(&scores)
                            .map(|(&j, x)| (x - max).exp() / z * kv[((b * t + j) * nh + h) * kvw + nope + c] as f64)
                            .sum();
                        out[((b * s + i) * nh + h) * vd + c] = acc;
                    }
                }
            }
        }
        out
    }

    /// Batch 2, sequences on and off the block size, keys cached before the queries (offset),
    /// and selections that keep every causal key, or cut them (top 5 of up to 77; top 5 of up to
    /// 64 for 4 queries, whose block gathers its at most 20 kept keys).
    #[test]
    fn sparse_attention_is_the_masked_softmax_of_the_selected_keys() {
        let cases = [(1, 0, 4), (45, 0, 64), (70, 0, 5), (33, 7, 5), (2 * BLOCK, 3, 2 * BLOCK + 3), (4, 60, 5)];
        for (s, offset, topk) in cases {
            let d = Dims { batch: 2, seq: s, keys: offset + s, heads: 3, nope: 12, rope: 4, v: 10 };
            let t = d.keys;
            let q = values(d.batch * s * d.heads * (d.nope + d.rope), 0.5);
            let kv = values(d.batch * t * d.heads * (d.nope + d.v), 1.5);
            let k_rope = values(d.batch * t * d.rope, 2.5);
            let sel = top_k_causal(&values(d.batch * s * t, 3.5), d.batch, s, offset, topk);
            let ours = sparse_attention(&q, &kv, &k_rope, &sel, d, 0.3);
            let want = attention_f64(&q, &kv, &k_rope, &sel, d, 0.3);
            let err = ours.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
            println!("S {s}, offset {offset}, top {topk}: max abs error {err:.2e}");
            assert!(err < 1e-5, "S {s}, offset {offset}, top {topk}: max abs error {err:.2e}");
        }
    }

    /// The absorbed form is the expanded form whose heads all expand the latent as itself (keys
    /// and values both the latent): checked against `sparse_attention` (itself checked in f64)
    /// with one query, and with 13 queries after 9 cached positions, where the first block of
    /// folded (head, query) rows ends inside the last head.
    #[test]
    fn absorbed_attention_is_the_expanded_form_with_the_latent_as_keys_and_values() {
        for (c, offset, topk) in [(1, 0, 4), (1, 20, 6), (13, 9, 5), (13, 9, 40)] {
            let (batch, nh, r, rope) = (2, 5, 8, 4); // 65 folded rows when C = 13
            let t = offset + c;
            let (q_abs, q_rope) = (values(batch * nh * c * r, 0.5), values(batch * nh * c * rope, 1.5));
            let (latents, k_rope) = (values(batch * t * r, 2.5), values(batch * t * rope, 3.5));
            let sel = top_k_causal(&values(batch * c * t, 4.5), batch, c, offset, topk);
            let d = Dims { batch, seq: c, keys: t, heads: nh, nope: r, rope, v: r };
            let ours = absorbed_attention(&q_abs, &q_rope, &latents, &k_rope, &sel, &[], d, 0.3); // [B, nh, C, r]
            let row = |b: usize, h: usize, i: usize| b * nh * c + h * c + i;
            let q: Vec<f32> = (0..batch)
                .flat_map(|b| (0..c).flat_map(move |i| (0..nh).map(move |h| row(b, h, i)))) // [B, C, nh]
                .flat_map(|x| q_abs[x * r..(x + 1) * r].iter().chain(&q_rope[x * rope..(x + 1) * rope]).copied())
                .collect();
            // The cache is [T, B, ...]; the expanded form reads [B, T, ...].
            let at = |x: usize, w: usize| ((x % t) * batch + x / t) * w..((x % t) * batch + x / t + 1) * w;
            let kv: Vec<f32> = (0..batch * t)
                .flat_map(|x| (0..nh).flat_map(move |_| (0..2).flat_map(move |_| at(x, r))))
                .map(|i| latents[i])
                .collect();
            let k_rope: Vec<f32> = (0..batch * t).flat_map(|x| at(x, rope)).map(|i| k_rope[i]).collect();
            let want = sparse_attention(&q, &kv, &k_rope, &sel, d, 0.3); // [B, C, nh, r]
            for (b, h, i) in (0..batch).flat_map(|b| (0..nh).flat_map(move |h| (0..c).map(move |i| (b, h, i)))) {
                let (a, e) = (&ours[row(b, h, i) * r..][..r], &want[((b * c + i) * nh + h) * r..][..r]);
                let err = a.iter().zip(e).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                assert!(err < 1e-5, "C {c}, offset {offset}, top {topk}, ({b}, {h}, {i}): {err:.2e}");
            }
        }
    }

    /// A block gathers the keys its queries keep when they are few (a decode step past the top-k,
    /// queries that keep the same keys), keeps every key in place when they are many or none,
    /// and each query's row of the mask covers the same keys either way.
    #[test]
    fn a_block_gathers_only_the_keys_it_keeps_when_they_are_few() {
        let sel = Selection { batch: 1, seq: 3, k: 2, idx: vec![9, 2, 9, 4, 0, 2], margin: vec![f32::NAN; 3] };
        // Queries at positions 8, 9, 10 (offset 8) see keys 0..11 and keep {2} (9 is after it),
        // {4, 9} and {0, 2}.
        let keys = Keys::kept(&sel, 0, 0..3, 8, 11, &[]);
        assert_eq!(keys.gathered.as_deref(), Some(&[0, 2, 4, 9][..]));
        let rows: Vec<Vec<bool>> = keys.keep.chunks(keys.width).map(<[bool]>::to_vec).collect();
        assert_eq!(rows, [[false, true, false, false], [false, false, true, true], [true, true, false, false]]);
        let latent: Vec<f32> = (0..11 * 3).map(|x| x as f32).collect();
        let mut buf = Vec::new();
        let v = keys.rows(View::at(&latent, 0, [11, 2, 3]), &mut buf); // 2 of each key's 3 values
        assert_eq!((v.rows, v.cols, v.data), (4, 2, &[0.0, 1.0, 6.0, 7.0, 12.0, 13.0, 27.0, 28.0][..]));
        // Query 9 alone keeps 2 of 10 keys; past the share, or keeping none, nothing is gathered.
        assert_eq!(Keys::kept(&sel, 0, 1..2, 8, 10, &[]).gathered.as_deref(), Some(&[4, 9][..]));
        let many = Selection { batch: 1, seq: 1, k: 4, idx: vec![0, 1, 2, 3], margin: vec![f32::NAN] };
        assert!(Keys::kept(&many, 0, 0..1, 4, 5, &[]).gathered.is_none());
        let none = Selection { batch: 1, seq: 1, k: 1, idx: vec![7], margin: vec![f32::NAN] };
        let keys = Keys::kept(&none, 0, 0..1, 4, 5, &[]);
        assert!(keys.gathered.is_none() && keys.width == 5 && keys.keep.iter().all(|&k| !k));
    }

    /// A value that is not finite at a key the selection dropped makes the output NaN whether a
    /// block gathers its keys or scores them all in place (0 · NaN in the values' sum, as the
    /// reference's masked softmax leaves it): the gather takes such keys along, dropped.
    #[test]
    fn a_non_finite_value_at_a_dropped_key_gives_nan_both_ways() {
        let (nh, r, rope) = (4, 8, 4);
        // Absorbed, one query after 20 cached keys keeping 6: its block gathers.
        let t = 21;
        let mut latents = values(t * r, 2.5);
        let sel = top_k_causal(&values(t, 4.5), 1, 1, 20, 6);
        let dropped = (0..t).find(|j| !sel.row(0, 0).contains(j)).unwrap();
        latents[dropped * r + 3] = f32::NAN;
        assert_eq!(non_finite_positions(&[(&latents, r)], 1, t, 0), [dropped]);
        let d = Dims { batch: 1, seq: 1, keys: t, heads: nh, nope: r, rope, v: r };
        let (q_abs, q_rope, k_rope) = (values(nh * r, 0.5), values(nh * rope, 1.5), values(t * rope, 3.5));
        let run = |poisoned: &[usize]| absorbed_attention(&q_abs, &q_rope, &latents, &k_rope, &sel, poisoned, d, 0.3);
        // Every head's output column 3 is NaN (0 · NaN); the other columns stay finite.
        let column3 = |out: Vec<f32>| out.chunks(r).map(|row| row[3].is_nan()).collect::<Vec<_>>();
        assert_eq!(column3(run(&[dropped])), [true; 4]);
        assert_eq!(column3(run(&[])), [false; 4], "without the position the gather would skip it");
        // Expanded, which finds such keys itself: 4 queries after 60 keys keeping 5 (gathered),
        // and 70 queries keeping 5 of up to 70 (in place).
        for (s, offset) in [(4, 60), (70, 0)] {
            let d = Dims { batch: 1, seq: s, keys: offset + s, heads: 2, nope: 6, rope: 4, v: 5 };
            let (kvw, t) = (d.nope + d.v, d.keys);
            let q = values(s * d.heads * (d.nope + d.rope), 0.5);
            let mut kv = values(t * d.heads * kvw, 1.5);
            let sel = top_k_causal(&values(s * t, 3.5), 1, s, offset, 5);
            let dropped = (0..t).find(|j| !(0..s).any(|i| sel.row(0, i).contains(j))).unwrap();
            kv[dropped * d.heads * kvw + d.nope] = f32::INFINITY; // head 0's first value
            let out = sparse_attention(&q, &kv, &values(t * d.rope, 2.5), &sel, d, 0.3);
            for i in 0..s {
                // A block reads the keys up to its last query: those past `dropped` see it.
                let tb = offset + ((i / BLOCK + 1) * BLOCK).min(s);
                let head0 = out[i * d.heads * d.v];
                assert_eq!(head0.is_nan(), tb > dropped, "S {s}: query {i} head 0 {head0}");
            }
        }
    }

    /// A query whose selection keeps no key at or before it gives NaN, as the reference's softmax
    /// over an all -inf row; the other rows are unaffected.
    #[test]
    fn a_query_that_keeps_nothing_gives_nan() {
        let d = Dims { batch: 1, seq: 2, keys: 2, heads: 1, nope: 2, rope: 2, v: 2 };
        let sel = Selection { batch: 1, seq: 2, k: 1, idx: vec![1, 0], margin: vec![f32::NAN; 2] };
        let out = sparse_attention(&values(8, 0.0), &values(8, 1.0), &values(4, 2.0), &sel, d, 1.0);
        assert!(out[..2].iter().all(|x| x.is_nan()), "{out:?}");
        let v0 = &values(8, 1.0)[2..4]; // key 0's values
        assert_eq!(&out[2..], v0);
    }

    /// Against the formula in f64, with negative terms (the relu), batch 2 (keys position-major),
    /// keys cached before the queries, and sequences off the block size; -inf exactly past each
    /// query's position.
    #[test]
    fn index_scores_sum_the_heads_relu_at_causal_keys() {
        for (s, offset) in [(1, 0), (45, 0), (2 * BLOCK + 1, 9)] {
            let (batch, n, d) = (2, 3, 8);
            let t = offset + s;
            let (q, k, w) = (values(batch * s * n * d, 0.25), values(batch * t * d, 1.25), values(batch * s * n, 2.25));
            let ours = index_scores(&q, &k, &w, [batch, s, t, n, d], 0.35);
            for (r, row) in ours.chunks_exact(t).enumerate() {
                let (b, i) = (r / s, r % s);
                for (j, &x) in row.iter().enumerate() {
                    if j > offset + i {
                        assert_eq!(x, f32::NEG_INFINITY, "row {r} key {j}");
                        continue;
                    }
                    let want: f64 = (0..n)
                        .map(|h| {
                            let qh = &q[((b * s + i) * n + h) * d..][..d];
                            let dot: f64 =
                                qh.iter().zip(&k[(j * batch + b) * d..]).map(|(&a, &c)| a as f64 * c as f64).sum();
                            w[(b * s + i) * n + h] as f64 * (dot * 0.35).max(0.0)
                        })
                        .sum();
                    assert!((x as f64 - want).abs() < 1e-5, "row {r} key {j}: {x} against {want}");
                }
            }
        }
    }

    /// The blocked selection is the selection of the whole scores, bit for bit (positions and
    /// margins), with cuts and without, off the block size, after cached keys, in batch 2.
    #[test]
    fn index_topk_selects_what_the_whole_scores_select() {
        for (s, offset, topk) in [(1, 0, 3), (45, 0, 64), (2 * BLOCK + 5, 0, 7), (40, 11, 9)] {
            let (batch, n, d) = (2, 3, 8);
            let t = offset + s;
            let (q, k, w) = (values(batch * s * n * d, 0.75), values(batch * t * d, 1.75), values(batch * s * n, 2.75));
            let dims = [batch, s, t, n, d];
            let whole = top_k_causal(&index_scores(&q, &k, &w, dims, 0.35), batch, s, offset, topk);
            let blocked = index_topk(&q, &k, &w, dims, 0.35, topk);
            assert_eq!((blocked.batch, blocked.seq, blocked.k, &blocked.idx), (batch, s, whole.k, &whole.idx));
            let bits = |m: &[f32]| m.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&blocked.margin), bits(&whole.margin), "S {s}, offset {offset}, top {topk}");
        }
    }

    /// The strided products against plain loops: a·bᵀ with accumulation and scale, a·b, and an
    /// empty inner dimension.
    #[test]
    fn strided_products_match_loops() {
        let (m, n, k) = (5, 7, 3);
        let a = values(m * 4, 0.1); // rows 4 apart, 3 used
        let b = values(n * 6, 0.2); // rows 6 apart
        let mut dst = vec![1f32; m * 9];
        abt(&mut dst, 9, View::at(&a, 0, [m, k, 4]), View::at(&b, 1, [n, k, 6]), 0.5, true);
        for i in 0..m {
            for j in 0..n {
                let want = 1.0 + 0.5 * (0..k).map(|x| a[i * 4 + x] * b[1 + j * 6 + x]).sum::<f32>();
                assert!((dst[i * 9 + j] - want).abs() < 1e-6);
            }
            assert_eq!(dst[i * 9 + n..i * 9 + 9], [1.0, 1.0]); // past the outputs: untouched
        }
        let bk = values(k * 8, 0.3); // [k, n] rows 8 apart
        ab(&mut dst, 9, View::at(&a, 0, [m, k, 4]), View::at(&bk, 0, [k, n, 8]));
        for i in 0..m {
            for j in 0..n {
                let want = (0..k).map(|x| a[i * 4 + x] * bk[x * 8 + j]).sum::<f32>();
                assert!((dst[i * 9 + j] - want).abs() < 1e-6);
            }
        }
        abt(&mut dst, 9, View::at(&a, 0, [m, 0, 4]), View::at(&b, 0, [n, 0, 6]), 1.0, false);
        assert!((0..m).all(|i| dst[i * 9..i * 9 + n].iter().all(|&x| x == 0.0)));
    }
}
