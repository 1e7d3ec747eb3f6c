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
//! many more causal keys, [`Absorbed`]), take the absorbed form: every head of a query reads the
//! same latents, so a query and all its heads gather the latents of just the keys it keeps
//! ([`attend_gathered`]), and past `index_topk` attention's work grows with the prompt, not its
//! square.

use gemm::Parallelism;
use rayon::prelude::*;

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
/// on (when given) in the absorbed form ([`absorbed_from`]).
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
            let mut p = non_finite_positions(&[(kv, nh * kvw)], batch, expanded, 0);
            p.extend(non_finite_positions(&[(k_rope, rope)], batch, t, 0));
            if let Some(a) = absorbed {
                p.extend(non_finite_positions(&[(a.latents, a.rank)], batch, t, 0));
            }
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

/// Where a prefill's queries switch to the absorbed form: the first block start (a multiple of
/// [`BLOCK`], or `S`) whose first query's kept keys cost fewer multiply-adds through the latent
/// than its causal keys expanded. Per head, a query at position `p` keeping `n = min(k, p + 1)`:
/// - expanded: `(p + 1)·(nope + rope + v)` (its scores and values over every causal key, the
///   dropped ones masked) + `r·(nope + v)` (its own position's keys and values from `kv_b_proj`);
/// - absorbed: `nope·r` (the query into the latent) + `n·(2r + rope)` (scores and mix over its
///   kept keys) + `r·v` (the mix out of the latent).
///
/// The first grows with `p` and the second stops growing at `n = k`, so past one point every
/// query is cheaper absorbed: from 4,352 at GLM-5's sizes (`r` 512, `k` 2048), where an 8k-token
/// prefill then does 1.25x fewer attention products and a 16k-token one 2x by this count (the
/// indexer's scores stay quadratic). The count takes the expanded form to score every causal
/// key, which its blocks do unless their queries keep mostly the same keys ([`Keys`]); measured
/// (docs/performance.md), the time is flat from 2048 to this crossover.
/// `GLIMPSE_ABSORBED_FROM=P` moves the switch to `P` (rounded up to a block): `0` runs every query
/// absorbed, which is how CI takes the golden cases through this form.
pub(crate) fn absorbed_from(d: Dims, rank: usize, topk: usize) -> Result<usize, String> {
    let from = absorbed_override()?.unwrap_or_else(|| crossover(d, rank, topk));
    Ok(from.checked_next_multiple_of(BLOCK).unwrap_or(d.seq).min(d.seq))
}

/// `GLIMPSE_ABSORBED_FROM`, when set and not empty: the binary checks it before any work, so a
/// bad value is refused at once, not after a checkpoint has loaded.
pub fn absorbed_override() -> Result<Option<usize>, String> {
    match std::env::var("GLIMPSE_ABSORBED_FROM").ok().filter(|p| !p.trim().is_empty()) {
        Some(p) => p.trim().parse().map(Some).map_err(|_| format!("GLIMPSE_ABSORBED_FROM={p}: not a position")),
        None => Ok(None),
    }
}

/// [`absorbed_from`]'s cost model alone, solved for the first position: with `p` keys seen, the
/// expanded form costs minus the absorbed one `p·(nope + v - 2r)` while `p <= k` (the terms in
/// `r` alone cancel) and `p·(nope + rope + v) - k·(2r + rope)` after.
fn crossover(d: Dims, rank: usize, topk: usize) -> usize {
    let Dims { seq: s, keys: t, nope, rope, v, .. } = d;
    let keys = match nope + v >= 2 * rank {
        true => 1, // a latent narrower than a head's keys and values: absorbed from the start
        false => (topk + 1).max((topk * (2 * rank + rope)).div_ceil((nope + rope + v).max(1))),
    };
    // The block whose first query (at offset + i0, seeing offset + i0 + 1 keys) sees enough.
    let i0 = keys.saturating_sub(t - s + 1);
    i0.checked_next_multiple_of(BLOCK).unwrap_or(s).min(s)
}

/// The absorbed form of a prefill's later queries: `kv_b_proj` folded into each query and output
/// as in a decode step (decode.rs), so a query reads the 576-value latent and rope key of just the
/// keys it keeps, gathered, instead of every causal key's expanded keys and values.
pub(crate) struct Absorbed<'a> {
    /// The first query in this form, a multiple of [`BLOCK`] ([`absorbed_from`]).
    pub from: usize,
    /// The latents, `kv_a_layernorm`'s output: [B, T, r].
    pub latents: &'a [f32],
    /// `kv_b_proj` split per head: W_UK [nh, nope, r] into the query, W_UV^T [nh, r, v] out.
    pub w_uk: &'a [f32],
    pub w_uv_t: &'a [f32],
    pub rank: usize,
}

impl Absorbed<'_> {
    fn fits(&self, d: Dims) -> bool {
        let (r, nh) = (self.rank, d.heads);
        self.from.is_multiple_of(BLOCK)
            && self.from <= d.seq
            && self.latents.len() == d.batch * d.keys * r
            && self.w_uk.len() == nh * d.nope * r
            && self.w_uv_t.len() == nh * r * d.v
    }

    /// Queries `i0..` of batch row `b` into `out` ([m, nh * v]): `q_abs = q_nope · W_UK` per
    /// head, then per query the softmax over its own kept keys (with, dropped, the non-finite
    /// positions up to it: see [`Keys`]), and `o = mixed · W_UV^T` per head.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_rope: &[f32],
        sel: &Selection,
        (b, i0): (usize, usize),
        d: Dims,
        scale: f32,
        poisoned: &[usize],
    ) {
        let Dims { seq: s, keys: t, heads: nh, nope, rope, v: vd, .. } = d;
        let (qk, r, m, offset) = (nope + rope, self.rank, out.len() / (nh * vd), t - s);
        let mut q_abs = vec![0f32; m * nh * r]; // [m, nh, r]
        for h in 0..nh {
            let q_nope = View::at(q, ((b * s + i0) * nh + h) * qk, [m, nope, nh * qk]);
            ab(&mut q_abs[h * r..], nh * r, q_nope, View::at(self.w_uk, h * nope * r, [nope, r, r]));
        }
        let rows = KeyRows {
            latents: View::at(self.latents, b * t * r, [t, r, r]),
            k_rope: View::at(k_rope, b * t * rope, [t, rope, rope]),
        };
        let mut mixed = vec![0f32; m * nh * r]; // [m, nh, r]
        let mut scratch = Scratch::default();
        for (i, mixed) in mixed.chunks_exact_mut(nh * r).enumerate() {
            let q0 = (b * s + i0 + i) * nh * qk;
            let q = [View::at(&q_abs, i * nh * r, [nh, r, r]), View::at(q, q0 + nope, [nh, rope, qk])];
            let keys = (sel.row(b, i0 + i), offset + i0 + i, poisoned);
            attend_gathered(mixed, q, &rows, keys, scale, &mut scratch);
        }
        for h in 0..nh {
            let w_uv_t = View::at(self.w_uv_t, h * r * vd, [r, vd, vd]);
            ab(&mut out[h * vd..], nh * vd, View::at(&mixed, h * r, [m, r, nh * r]), w_uv_t);
        }
    }
}

/// Every position's latent and rope key, one row each (`[T, r]` and `[T, rope]` views: a
/// prefill's rows are a batch row's, a decode cache's are position-major, `B` rows apart).
struct KeyRows<'a> {
    latents: View<'a>,
    k_rope: View<'a>,
}

/// One query's scratch, kept across the queries of a task.
#[derive(Default)]
struct Scratch {
    keys: Vec<(usize, bool)>,
    keep: Vec<bool>,
    p: Vec<f32>,
    latents: Vec<f32>,
    k_rope: Vec<f32>,
}

/// One query of the absorbed form, all its heads: `q` = (q_abs [nh, r], q_rope [nh, rope]) ->
/// `mixed` ([nh, r], rows `r` apart), the latents mixed by each head's softmax over the keys the
/// query keeps. `(row, pos, poisoned)`: its row of the selection, its position, and the
/// non-finite positions (ascending), taken along dropped (see [`Keys`]). The kept keys are
/// gathered: each once (a replayed row may repeat one), at or before `pos`, ascending; a query
/// that keeps every position up to its own reads them in place.
fn attend_gathered(
    mixed: &mut [f32],
    q: [View; 2],
    rows: &KeyRows,
    (row, pos, poisoned): (&[usize], usize, &[usize]),
    scale: f32,
    s: &mut Scratch,
) {
    let (nh, r, rope) = (q[0].rows, rows.latents.cols, rows.k_rope.cols);
    s.keys.clear();
    s.keys.extend(row.iter().filter(|&&key| key <= pos).map(|&key| (key, true)));
    s.keys.extend(poisoned.iter().take_while(|&&p| p <= pos).map(|&p| (p, false)));
    s.keys.sort_unstable_by_key(|&(key, kept)| (key, !kept));
    s.keys.dedup_by_key(|&mut (key, _)| key);
    let n = s.keys.len();
    if n == 0 {
        mixed[..nh * r].fill(f32::NAN); // the reference's softmax of an all -inf row
        return;
    }
    let every = s.keys.iter().enumerate().all(|(i, &(key, kept))| key == i && kept);
    let (latents, k_rope) = match every {
        true => (View { rows: n, ..rows.latents }, View { rows: n, ..rows.k_rope }),
        false => {
            s.latents.clear();
            s.k_rope.clear();
            for &(key, _) in &s.keys {
                s.latents.extend_from_slice(&rows.latents.data[key * rows.latents.stride..][..r]);
                s.k_rope.extend_from_slice(&rows.k_rope.data[key * rows.k_rope.stride..][..rope]);
            }
            (View::at(&s.latents, 0, [n, r, r]), View::at(&s.k_rope, 0, [n, rope, rope]))
        }
    };
    s.keep.clear();
    (0..nh).for_each(|_| s.keep.extend(s.keys.iter().map(|&(_, kept)| kept)));
    s.p.resize(nh * n, 0.0); // [nh, n]
    attend(&mut s.p, &s.keep, q, [latents, k_rope], latents, scale, mixed, r); // keys and values alike
}

/// Softmax over the selected keys of each query, in the absorbed form (decode): a task takes one
/// query and its heads, which read the same keys (`attend_gathered`), so a chunk's queries each
/// read only the keys they keep. q_abs: [B, nh, C, r] (queries absorbed into the latent);
/// q_rope: [B, nh, C, rope]; latents: [T, B, r]; k_rope: [T, B, rope] (position-major, as the
/// decode cache holds them) -> the latents mixed by each row's probabilities, [B, nh, C, r]. In
/// `d`, `nope` and `v` are both the latent rank r. `poisoned`: the positions (ascending) whose
/// latent or rope key is not finite (the cache tracks them).
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
    // A task takes one query and a group of its heads: all of them when the queries are enough
    // to keep every thread busy, else fewer, so a decode step's one query uses every thread (each
    // group gathers the same keys).
    let group = nh.div_ceil(rayon::current_num_threads().div_ceil(batch * c).clamp(1, nh));
    let groups = nh.div_ceil(group);
    let parts: Vec<Vec<f32>> = (0..batch * c * groups)
        .into_par_iter()
        .map_init(Scratch::default, |scratch, x| {
            let (b, i, h0) = (x / groups / c, x / groups % c, x % groups * group);
            let rows = KeyRows {
                latents: View::at(latents, b * r, [t, r, batch * r]),
                k_rope: View::at(k_rope, b * rope, [t, rope, batch * rope]),
            };
            let (first, hn) = ((b * nh + h0) * c + i, group.min(nh - h0)); // its heads' rows are C apart
            let q = [View::at(q_abs, first * r, [hn, r, c * r]), View::at(q_rope, first * rope, [hn, rope, c * rope])];
            let mut mixed = vec![0f32; hn * r];
            attend_gathered(&mut mixed, q, &rows, (sel.row(b, i), offset + i, poisoned), scale, scratch);
            mixed
        })
        .collect();
    for (x, mixed) in parts.iter().enumerate() {
        let (b, i, h0) = (x / groups / c, x / groups % c, x % groups * group);
        for (h, head) in (h0..).zip(mixed.chunks_exact(r)) {
            out[((b * nh + h) * c + i) * r..][..r].copy_from_slice(head);
        }
    }
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
/// that keeps nothing gives NaN, as the reference's softmax of an all `-inf` row does, and so
/// does a row with a NaN or infinite score at a key it drops (the reference adds its `-inf` mask
/// to that score: NaN).
fn softmax_kept(p: &mut [f32], keep: &[bool], tb: usize) {
    for (row, keep) in p.chunks_exact_mut(tb).zip(keep.chunks_exact(tb)) {
        let max = row.iter().zip(keep).filter(|(_, &k)| k).fold(f32::NEG_INFINITY, |m, (&x, _)| m.max(x));
        let mut sum = 0f32;
        for (x, &k) in row.iter_mut().zip(keep) {
            *x = if k { (*x - max).exp() } else { *x * 0.0 }; // 0, or NaN from a non-finite score
            sum += *x;
        }
        let sum = if sum > 0.0 { sum } else { f32::NAN };
        row.iter_mut().for_each(|x| *x /= sum);
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
            let ours = sparse_attention(&q, &kv, &k_rope, None, &sel, d, 0.3);
            let want = attention_f64(&q, &kv, &k_rope, &sel, d, 0.3);
            let err = ours.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
            println!("S {s}, offset {offset}, top {topk}: max abs error {err:.2e}");
            assert!(err < 1e-5, "S {s}, offset {offset}, top {topk}: max abs error {err:.2e}");
        }
    }

    /// The absorbed form is the expanded form whose heads all expand the latent as itself (keys
    /// and values both the latent): checked against `sparse_attention` (itself checked in f64)
    /// with one query, and with a chunk of 13 queries after 9 cached positions, with cuts and
    /// without; on 1 thread and on 8, where a query's 5 heads are split in groups of 2, 2 and 1.
    #[test]
    fn absorbed_attention_is_the_expanded_form_with_the_latent_as_keys_and_values() {
        let pools = [1, 8].map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap());
        let cases = [(1, 0, 4), (1, 20, 6), (13, 9, 5), (13, 9, 40)];
        for (pool, (c, offset, topk)) in pools.iter().flat_map(|p| cases.map(|case| (p, case))) {
            let (batch, nh, r, rope) = (2, 5, 8, 4);
            let t = offset + c;
            let (q_abs, q_rope) = (values(batch * nh * c * r, 0.5), values(batch * nh * c * rope, 1.5));
            let (latents, k_rope) = (values(batch * t * r, 2.5), values(batch * t * rope, 3.5));
            let sel = top_k_causal(&values(batch * c * t, 4.5), batch, c, offset, topk);
            let d = Dims { batch, seq: c, keys: t, heads: nh, nope: r, rope, v: r };
            let ours = pool.install(|| absorbed_attention(&q_abs, &q_rope, &latents, &k_rope, &sel, &[], d, 0.3)); // [B, nh, C, r]
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
            let want = sparse_attention(&q, &kv, &k_rope, None, &sel, d, 0.3); // [B, C, nh, r]
            for (b, h, i) in (0..batch).flat_map(|b| (0..nh).flat_map(move |h| (0..c).map(move |i| (b, h, i)))) {
                let (a, e) = (&ours[row(b, h, i) * r..][..r], &want[((b * c + i) * nh + h) * r..][..r]);
                let err = a.iter().zip(e).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                assert!(err < 1e-5, "C {c}, offset {offset}, top {topk}, ({b}, {h}, {i}): {err:.2e}");
            }
        }
    }

    /// Latents [B, T, r] and a per-head `kv_b_proj` w [nh, nope + v, r]: the keys and values it
    /// expands them into [B, T, nh, nope + v], and w split as W_UK [nh, nope, r] and W_UV^T
    /// [nh, r, v].
    fn expanded_from_latents(batch: usize, t: usize, d: Dims, r: usize) -> [Vec<f32>; 4] {
        let (nh, nope, vd) = (d.heads, d.nope, d.v);
        let (latents, w) = (values(batch * t * r, 0.5), values(nh * (nope + vd) * r, 1.5));
        let kv: Vec<f32> = (0..batch * t * nh * (nope + vd))
            .map(|i| {
                let (x, row) = (i / (nh * (nope + vd)), i % (nh * (nope + vd)));
                (0..r).map(|j| latents[x * r + j] * w[row * r + j]).sum()
            })
            .collect();
        let w_uk: Vec<f32> = (0..nh).flat_map(|h| w[h * (nope + vd) * r..][..nope * r].to_vec()).collect();
        let w_uv_t: Vec<f32> =
            (0..nh * r * vd).map(|i| w[((i / (r * vd)) * (nope + vd) + nope + i % vd) * r + (i / vd) % r]).collect();
        [latents, kv, w_uk, w_uv_t]
    }

    /// The first `e` of each batch row's `t` positions of `x` ([B, T, ...]).
    fn first_positions(x: &[f32], batch: usize, t: usize, e: usize) -> Vec<f32> {
        let width = x.len() / (batch * t);
        (0..batch).flat_map(|b| x[b * t * width..][..e * width].to_vec()).collect()
    }

    /// A prefill's later queries in the absorbed form give the expanded form's outputs: keys and
    /// values made from latents by a per-head `kv_b_proj`, the f64 reference fed them all, ours
    /// the first `from` positions' only; from block 1 and from 0, after cached keys, with cuts
    /// and without, and a replayed row that repeats a key and one that keeps none (NaN).
    #[test]
    fn absorbed_queries_of_a_prefill_match_the_expanded_form() {
        let (batch, nh, nope, rope, vd, r) = (2, 3, 6, 4, 5, 7);
        for (s, offset, topk, from) in
            [(2 * BLOCK + 3, 0, 5, BLOCK), (2 * BLOCK + 3, 0, 500, 0), (70, 7, 9, 0), (2 * BLOCK + 3, 5, 7, BLOCK)]
        {
            let t = offset + s;
            let d = Dims { batch, seq: s, keys: t, heads: nh, nope, rope, v: vd };
            let [latents, kv, w_uk, w_uv_t] = expanded_from_latents(batch, t, d, r);
            let (q, k_rope) = (values(batch * s * nh * (nope + rope), 2.5), values(batch * t * rope, 3.5));
            let mut sel = crate::model::indexer::top_k_causal(&values(batch * s * t, 4.5), batch, s, offset, topk);
            if topk < t {
                let k = sel.k;
                sel.idx[(s - 1) * k..s * k].fill(offset + s - 2); // one key, k times
                sel.idx[(2 * s - 1) * k..2 * s * k].fill(t + 3); // none at or before the query
            }
            let first = first_positions(&kv, batch, t, offset + from); // ours reads the first E
            let a = Absorbed { from, latents: &latents, w_uk: &w_uk, w_uv_t: &w_uv_t, rank: r };
            let ours = sparse_attention(&q, &first, &k_rope, Some(&a), &sel, d, 0.3);
            let want = attention_f64(&q, &kv, &k_rope, &sel, d, 0.3);
            let compared = if topk < t { (2 * s - 1) * nh * vd } else { ours.len() }; // the last keeps none
            let err = ours[..compared].iter().zip(&want).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max);
            println!("S {s}, offset {offset}, top {topk}, from {from}: max abs error {err:.2e}");
            assert!(err < 1e-5, "S {s}, offset {offset}, top {topk}, from {from}: max abs error {err:.2e}");
            assert!(ours[compared..].iter().all(|x| x.is_nan()));
        }
    }

    /// Where the switch falls: nowhere in a prompt shorter than GLM-5's crossover, at 4,352 in a
    /// longer one, and, for other sizes, offsets and cuts, at the first block whose first query's
    /// multiply-adds (counted here, query by query) are no more absorbed than expanded.
    #[test]
    fn the_absorbed_form_starts_where_it_costs_less() {
        let glm5 = |s| Dims { batch: 1, seq: s, keys: s, heads: 64, nope: 192, rope: 64, v: 256 };
        assert_eq!(crossover(glm5(4096), 512, 2048), 4096);
        assert_eq!(crossover(glm5(16384), 512, 2048), 4352);
        assert_eq!(crossover(glm5(1 << 40), 512, 2048), 4352); // solved, not searched
        for (nope, rope, v, r, topk, offset) in
            [(16, 8, 16, 32, 64, 0), (16, 8, 16, 32, 8, 100), (24, 8, 24, 12, 10, 0)]
        {
            let d = Dims { batch: 1, seq: 500, keys: offset + 500, heads: 4, nope, rope, v };
            let cheaper =
                |p: usize| p * (nope + rope + v) + r * (nope + v) >= nope * r + topk.min(p) * (2 * r + rope) + r * v;
            let want = (0..500).step_by(BLOCK).find(|&i0| cheaper(offset + i0 + 1)).unwrap_or(500);
            assert_eq!(crossover(d, r, topk), want, "nope {nope}, r {r}, top {topk}, offset {offset}");
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

    /// A score that is not finite at a key a query drops (its rope key, or its latent in the
    /// absorbed prefill, not finite) makes the query's output NaN, as the reference's masked
    /// softmax does (its `-inf` mask added to a NaN score): in place, gathered, and absorbed.
    #[test]
    fn a_non_finite_key_at_a_dropped_position_gives_nan_in_every_form() {
        let r = 7;
        for (s, offset, from) in [(70, 0, None), (4, 60, None), (70, 0, Some(0))] {
            let d = Dims { batch: 1, seq: s, keys: offset + s, heads: 2, nope: 6, rope: 4, v: 5 };
            let t = d.keys;
            let [latents, kv, w_uk, w_uv_t] = expanded_from_latents(1, t, d, r);
            let (q, k_rope) = (values(s * d.heads * (d.nope + d.rope), 2.5), values(t * d.rope, 3.5));
            let sel = top_k_causal(&values(s * t, 4.5), 1, s, offset, 5);
            let last = s - 1; // the last query drops a key before it
            let dropped = (0..t).find(|j| !sel.row(0, last).contains(j)).unwrap();
            for poison in 0..2 {
                let (mut k_rope, mut latents) = (k_rope.clone(), latents.clone());
                match poison {
                    0 => k_rope[dropped * d.rope + 1] = f32::NAN,
                    _ if from.is_some() => latents[dropped * r + 2] = f32::INFINITY,
                    _ => continue, // the expanded form reads no latents
                }
                let first = first_positions(&kv, 1, t, offset + from.unwrap_or(s));
                let a = from.map(|from| Absorbed { from, latents: &latents, w_uk: &w_uk, w_uv_t: &w_uv_t, rank: r });
                let out = sparse_attention(&q, &first, &k_rope, a.as_ref(), &sel, d, 0.3);
                let row = &out[last * d.heads * d.v..];
                assert!(
                    row.iter().all(|x| x.is_nan()),
                    "S {s}, offset {offset}, from {from:?}, poison {poison}: {row:?}"
                );
            }
        }
        // A replayed selection as wide as the keys that keeps only key 0 (no cut, so the
        // expanded form would look for nothing non-finite): absorbed queries still find key 1's.
        let (s, r) = (3, 7);
        let d = Dims { batch: 1, seq: s, keys: s, heads: 2, nope: 6, rope: 4, v: 5 };
        let [latents, _, w_uk, w_uv_t] = expanded_from_latents(1, s, d, r);
        let (q, mut k_rope) = (values(s * d.heads * (d.nope + d.rope), 2.5), values(s * d.rope, 3.5));
        k_rope[d.rope] = f32::NAN;
        let sel = Selection { batch: 1, seq: s, k: s, idx: vec![0; s * s], margin: vec![f32::INFINITY; s] };
        let a = Absorbed { from: 0, latents: &latents, w_uk: &w_uk, w_uv_t: &w_uv_t, rank: r };
        let out = sparse_attention(&q, &[], &k_rope, Some(&a), &sel, d, 0.3);
        let nan: Vec<bool> = out.chunks(d.heads * d.v).map(|o| o.iter().all(|x| x.is_nan())).collect();
        assert_eq!(nan, [false, true, true]);
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
}
