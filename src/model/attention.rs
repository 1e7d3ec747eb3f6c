//! Attention over the DSA selection, one block of queries at a time, and the strided products
//! it and the indexer's scores (indexer.rs) are made of.
//!
//! The reference builds every head's `[S, T]` score matrix, adds the selection as a `-inf` mask,
//! takes the softmax and multiplies the values. At GLM-5's 64 attention heads that is 512 bytes
//! of f32 per query-key pair held at once. Here a task takes one batch row and [`BLOCK`] queries,
//! and for each head scores only the keys up to the block's last position (the rest are causally
//! masked anyway), drops the keys the selection did not keep, normalises, and multiplies the
//! values straight into the output: the reference's math, per query, in another summation order,
//! with scratch of one block's scores. When the block's queries keep few of those keys, only the
//! kept ones are gathered and scored ([`Keys`]); otherwise the products go through the `gemm`
//! crate (candle's own CPU matmul) on strided views, so no key or value is copied.
//!
//! Decode steps and chunks, and a long prefill's later queries (each keeping `index_topk` of
//! many more causal keys), take the absorbed form instead (absorbed.rs): a query and its heads
//! read the latents of just the keys it keeps.

use gemm::Parallelism;
use rayon::prelude::*;

use super::absorbed::Absorbed;
use super::indexer::Selection;

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

/// Softmax over the selected keys of each query: in the expanded form, and from `absorbed.from`
/// on (when given) in the absorbed form (`absorbed::absorbed_from`).
/// q: [B, S, nh, nope + rope] (roped); kv: `kv_b_proj`'s output [B, E, nh, nope + v] for the first
/// `E = T - S + from` positions (every one when nothing is absorbed); k_rope: the shared roped key
/// [B, T, rope] -> [B, S, nh * v].
pub(crate) fn sparse_attention(
    q: &[f32],
    kv: &[f32],
    k_rope: &[f32],
    absorbed: Option<&Absorbed>,
    sel: &Selection,
    d: Dims,
    scale: f32,
) -> Vec<f32> {
    let Dims { batch, seq: s, keys: t, heads: nh, nope, rope, v: vd } = d;
    let (qk, kvw, offset) = (nope + rope, nope + vd, t - s);
    let expanded = offset + absorbed.map_or(s, |a| a.from); // the positions kv holds
    assert!(
        q.len() == batch * s * nh * qk && kv.len() == batch * expanded * nh * kvw && k_rope.len() == batch * t * rope
    );
    assert!(absorbed.is_none_or(|a| a.fits(d)), "absorbed weights or latents of other sizes");
    let mut out = vec![0f32; batch * s * nh * vd];
    if out.is_empty() {
        return out;
    }
    // Only a block that gathers needs the non-finite keys, and no expanded block gathers when a
    // row holds as many keys as there are (a prefill shorter than `index_topk`: every causal key
    // kept), so then kv is not read a second time. (A replayed row that wide but keeping fewer
    // keys could gather: its NaN is named where it arises all the same.) Absorbed queries gather
    // whatever their rows hold.
    let poisoned = match sel.k < t || absorbed.is_some() {
        true => {
            let mut every_position = vec![(k_rope, rope)];
            every_position.extend(absorbed.map(|a| (a.latents, a.rank)));
            let mut p = non_finite_positions(&[(kv, nh * kvw)], batch, expanded, 0);
            p.extend(non_finite_positions(&every_position, batch, t, 0));
            p.sort_unstable();
            p.dedup();
            p
        }
        false => Vec::new(),
    };
    out.par_chunks_mut(s * nh * vd).enumerate().for_each(|(b, row)| {
        row.par_chunks_mut(BLOCK * nh * vd).enumerate().for_each(|(blk, out)| match absorbed {
            Some(a) if blk * BLOCK >= a.from => a.block(out, q, k_rope, sel, (b, blk * BLOCK), d, scale, &poisoned),
            _ => {
                let (i0, m) = (blk * BLOCK, out.len() / (nh * vd));
                let tb = offset + i0 + m; // the keys any query of the block may see
                let keys = Keys::kept(sel, b, i0..i0 + m, offset, tb, &poisoned);
                let mut p = vec![0f32; m * keys.width]; // [m, keys]
                let (kv, k_rope) = (&kv[b * expanded * nh * kvw..], &k_rope[b * t * rope..]);
                let (mut buf_rope, mut buf_k, mut buf_v) = (Vec::new(), Vec::new(), Vec::new());
                let k_rope = keys.rows(View::at(k_rope, 0, [tb, rope, rope]), &mut buf_rope);
                for h in 0..nh {
                    let q0 = ((b * s + i0) * nh + h) * qk;
                    let q = [View::at(q, q0, [m, nope, nh * qk]), View::at(q, q0 + nope, [m, rope, nh * qk])];
                    let k = [keys.rows(View::at(kv, h * kvw, [tb, nope, nh * kvw]), &mut buf_k), k_rope];
                    let v = keys.rows(View::at(kv, h * kvw + nope, [tb, vd, nh * kvw]), &mut buf_v);
                    attend(&mut p, &keys.keep, q, k, v, scale, &mut out[h * vd..], nh * vd);
                }
            }
        });
    });
    out
}

/// One block of rows against keys `0..tb`, the step both forms share: `p` (`[rows, tb]` scratch)
/// = `scale · (q[0] · k[0]ᵀ + q[1] · k[1]ᵀ)` (the latent or nope part, then the rope part), the
/// softmax over the `keep` keys, and `out` (rows `stride` apart) = p · v.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
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
/// alone, so DSA cuts the work as well as the choice. Otherwise (a block whose queries keep different keys,
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
        queries: std::ops::Range<usize>,
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
/// that keeps nothing gives NaN, as the reference's softmax of an all `-inf` row does, and so
/// does a row with a NaN or `+inf` score at a key it drops (the reference adds its `-inf` mask to
/// that score: NaN; to a `-inf` one: `-inf`, which weighs 0).
fn softmax_kept(p: &mut [f32], keep: &[bool], tb: usize) {
    for (row, keep) in p.chunks_exact_mut(tb).zip(keep.chunks_exact(tb)) {
        let max = row.iter().zip(keep).filter(|(_, &k)| k).fold(f32::NEG_INFINITY, |m, (&x, _)| m.max(x));
        let mut sum = 0f32;
        for (x, &k) in row.iter_mut().zip(keep) {
            *x = if k {
                (*x - max).exp()
            } else if *x == f32::NEG_INFINITY {
                0.0
            } else {
                *x * 0.0 // 0, or NaN from a NaN or +inf score
            };
            sum += *x;
        }
        let sum = if sum > 0.0 { sum } else { f32::NAN };
        row.iter_mut().for_each(|x| *x /= sum);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::absorbed::absorbed_attention;
    use crate::model::indexer::top_k_causal;

    pub(crate) fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.618_034).sin() * 1.5).collect()
    }

    /// The reference's form in f64: every head's scores over all T keys, -inf where the query's
    /// row of the selection does not keep the key (or it is past the query), softmax, values.
    pub(crate) fn attention_f64(
        q: &[f32],
        kv: &[f32],
        k_rope: &[f32],
        sel: &Selection,
        d: Dims,
        scale: f32,
    ) -> Vec<f64> {
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
            let ours = sparse_attention(&q, &kv, &k_rope, None, &sel, d, 0.3);
            let want = attention_f64(&q, &kv, &k_rope, &sel, d, 0.3);
            let err = ours.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
            println!("S {s}, offset {offset}, top {topk}: max abs error {err:.2e}");
            assert!(err < 1e-5, "S {s}, offset {offset}, top {topk}: max abs error {err:.2e}");
        }
    }

    /// A block gathers the keys its queries keep when they are few (queries that keep the same
    /// keys), keeps every key in place when they are many or none,
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
            let out = sparse_attention(&q, &kv, &values(t * d.rope, 2.5), None, &sel, d, 0.3);
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
        let out = sparse_attention(&values(8, 0.0), &values(8, 1.0), &values(4, 2.0), None, &sel, d, 1.0);
        assert!(out[..2].iter().all(|x| x.is_nan()), "{out:?}");
        let v0 = &values(8, 1.0)[2..4]; // key 0's values
        assert_eq!(&out[2..], v0);
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

    /// A dropped key's score weighs 0 when it is finite or `-inf` (the reference's `-inf` mask
    /// keeps it `-inf`), and makes the row NaN when it is NaN or `+inf`, as the reference's does.
    #[test]
    fn a_dropped_keys_score_weighs_nothing_unless_the_reference_makes_it_nan() {
        let keep = [true, true, false];
        for (dropped, nan) in [(5.0, false), (f32::NEG_INFINITY, false), (f32::INFINITY, true), (f32::NAN, true)] {
            let mut p = [0.0, 0.0, dropped];
            super::softmax_kept(&mut p, &keep, 3);
            match nan {
                true => assert!(p.iter().all(|x| x.is_nan()), "{dropped}: {p:?}"),
                false => assert_eq!(p, [0.5, 0.5, 0.0], "{dropped}"),
            }
        }
    }
}
