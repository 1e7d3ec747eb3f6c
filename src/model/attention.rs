//! Attention over the DSA selection and the indexer's scores, one block of queries at a time.
//!
//! The reference builds every head's `[S, T]` score matrix, adds the selection as a `-inf` mask,
//! takes the softmax and multiplies the values; its indexer builds `[n_heads, S, T]` before
//! summing the heads. At GLM-5's 64 attention heads and 32 index heads that is about 1 KB of f32
//! per query-key pair held at once: 17 GB at 4096 tokens. Here a task takes one batch row and
//! [`BLOCK`] queries, and for each head scores only the keys up to the block's last position
//! (the rest are causally masked anyway), drops the keys the selection did not keep, normalises,
//! and multiplies the values straight into the output: the reference's math, per query, in
//! another summation order, with scratch of one block's scores. The products go through the
//! `gemm` crate (candle's own CPU matmul) on strided views, so no key or value is copied.

use gemm::Parallelism;
use rayon::prelude::*;

use super::indexer::Selection;

/// Queries per task: enough rows for the products to run at speed, few enough that a prefill of
/// a few hundred tokens still makes a task for every thread.
pub(crate) const BLOCK: usize = 32;

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
/// q: [B, nh, S, nope + rope] (roped); kv: `kv_b_proj`'s output [B, T, nh, nope + v]; k_rope: the
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
    assert!(q.len() == batch * nh * s * qk && kv.len() == batch * t * nh * kvw && k_rope.len() == batch * t * rope);
    let mut out = vec![0f32; batch * s * nh * vd];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(s * nh * vd).enumerate().for_each(|(b, row)| {
        row.par_chunks_mut(BLOCK * nh * vd).enumerate().for_each(|(blk, out)| {
            let (i0, m) = (blk * BLOCK, out.len() / (nh * vd));
            let tb = offset + i0 + m; // the keys any query of the block may see
            let keep = kept(sel, b, i0, m, offset, tb);
            let mut p = vec![0f32; m * tb]; // [m, tb]
            let (kv, k_rope) = (&kv[b * t * nh * kvw..], &k_rope[b * t * rope..]);
            for h in 0..nh {
                let q0 = ((b * nh + h) * s + i0) * qk;
                abt(
                    &mut p,
                    tb,
                    View::at(q, q0, [m, nope, qk]),
                    View::at(kv, h * kvw, [tb, nope, nh * kvw]),
                    scale,
                    false,
                );
                abt(
                    &mut p,
                    tb,
                    View::at(q, q0 + nope, [m, rope, qk]),
                    View::at(k_rope, 0, [tb, rope, rope]),
                    scale,
                    true,
                );
                softmax_kept(&mut p, &keep, tb);
                let v = View::at(kv, h * kvw + nope, [tb, vd, nh * kvw]);
                ab(&mut out[h * vd..], nh * vd, View::at(&p, 0, [m, tb, tb]), v);
            }
        });
    });
    out
}

/// Which of the keys `0..tb` each of the queries `i0..i0 + m` of batch row `b` attends to: its
/// selected keys at or before its own position. [m, tb].
fn kept(sel: &Selection, b: usize, i0: usize, m: usize, offset: usize, tb: usize) -> Vec<bool> {
    let mut keep = vec![false; m * tb];
    for i in 0..m {
        let row = &mut keep[i * tb..(i + 1) * tb];
        sel.row(b, i0 + i).iter().filter(|&&key| key <= offset + i0 + i).for_each(|&key| row[key] = true);
    }
    keep
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

/// The indexer's scores, `Σ_h w[s, h] · relu(scale · q[s, h] · k[t])`, at every causal key and
/// `-inf` past it. q: [B, S, n, d] (roped); k: [B, T, d] (roped; the last S are the queries' own);
/// w: [B, S, n] -> [B, S, T]. Heads are summed in order.
pub(crate) fn index_scores(q: &[f32], k: &[f32], w: &[f32], [batch, s, t, n, d]: [usize; 5], scale: f32) -> Vec<f32> {
    assert!(q.len() == batch * s * n * d && k.len() == batch * t * d && w.len() == batch * s * n && t >= s);
    let offset = t - s;
    let mut out = vec![f32::NEG_INFINITY; batch * s * t];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(s * t).enumerate().for_each(|(b, rows)| {
        rows.par_chunks_mut(BLOCK * t).enumerate().for_each(|(blk, out)| {
            let (i0, m) = (blk * BLOCK, out.len() / t);
            let tb = offset + i0 + m;
            let mut head = vec![0f32; m * tb]; // [m, tb]
            let keys = View::at(k, b * t * d, [tb, d, d]);
            for h in 0..n {
                abt(&mut head, tb, View::at(q, ((b * s + i0) * n + h) * d, [m, d, n * d]), keys, scale, false);
                for (i, (acc, scores)) in out.chunks_exact_mut(t).zip(head.chunks_exact(tb)).enumerate() {
                    let wi = w[(b * s + i0 + i) * n + h];
                    let causal = offset + i0 + i + 1;
                    for (a, &x) in acc[..causal].iter_mut().zip(&scores[..causal]) {
                        // relu that keeps a NaN, as torch's does
                        let term = wi * if x < 0.0 { 0.0 } else { x };
                        *a = if h == 0 { term } else { *a + term };
                    }
                }
            }
        });
    });
    out
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
                    let qv = &q[((b * nh + h) * s + i) * qk..][..qk];
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
    /// and selections that keep every causal key, or cut them (top 5 of up to 77).
    #[test]
    fn sparse_attention_is_the_masked_softmax_of_the_selected_keys() {
        for (s, offset, topk) in [(1, 0, 4), (45, 0, 64), (70, 0, 5), (33, 7, 5), (2 * BLOCK, 3, 2 * BLOCK + 3)] {
            let d = Dims { batch: 2, seq: s, keys: offset + s, heads: 3, nope: 12, rope: 4, v: 10 };
            let t = d.keys;
            let q = values(d.batch * d.heads * s * (d.nope + d.rope), 0.5);
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

    /// Against the formula in f64, with negative terms (the relu), batch 2, keys cached before the
    /// queries, and sequences off the block size; -inf exactly past each query's position.
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
                                qh.iter().zip(&k[(b * t + j) * d..]).map(|(&a, &c)| a as f64 * c as f64).sum();
                            w[(b * s + i) * n + h] as f64 * (dot * 0.35).max(0.0)
                        })
                        .sum();
                    assert!((x as f64 - want).abs() < 1e-5, "row {r} key {j}: {x} against {want}");
                }
            }
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
