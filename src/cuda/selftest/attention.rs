//! The attention's checks for `selftest`: the bf16 softmax kernel, the indexer's scores and
//! selection, attention over the selection on every path and in both precisions (against
//! `CpuOps` in f32, and in bf16 against the arithmetic each bf16 path does, computed here), at
//! small sizes and at GLM-5's.

use super::{as_sets, check, check_ints, selected_ids, Check, Rng, BF16_POISON};
use crate::cuda::gpu::{Gpu, FLASH_STEP_KEYS};
use crate::device::cpu::CpuOps;
use crate::device::Ops;
use crate::error::Result;

/// `masked_softmax_bf16` against the softmax computed here in f64: 2 heads of 3 queries over 37,
/// 2048 and 2100 keys (rows a lane holds in registers, the longest such, and rows read three
/// times), some masked out, the last query's all (its rows NaN, as `masked_softmax` makes them),
/// rows padded to a multiple of 8; each probability the f64 one rounded to the nearest bf16.
pub(super) fn masked_softmax_bf16(gpu: &Gpu, rng: &mut Rng) -> Result<Check> {
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for t_eff in [37, 2048, 2100] {
        let (g, w) = masked_softmax_bf16_rows(gpu, rng, t_eff)?;
        got.extend(g);
        want.extend(w);
    }
    let c = check_with_nans("masked_softmax_bf16", &got, &want, 1.0 / 512.0);
    // Each probability is the f64 one rounded to the nearest bf16, or, where that lies within
    // 1e-6 of halfway to its neighbour (the device's expf and the host's exp may fall either
    // side), that neighbour: no flush to zero, no truncation.
    let nearest = got.iter().zip(&want).filter(|(_, w)| !w.is_nan()).all(|(&g, &w)| {
        let r = half::bf16::from_f32(w).to_f32();
        g == r || ((w as f64 - (g as f64 + r as f64) / 2.0).abs() <= 1e-6 * (w as f64).abs())
    });
    Ok(Check { ok: c.ok && nearest, ..c })
}

/// One shape of [`masked_softmax_bf16`]: (the kernel's probabilities, the f64 ones).
fn masked_softmax_bf16_rows(gpu: &Gpu, rng: &mut Rng, t_eff: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (heads, qc, width) = (2, 3, t_eff.next_multiple_of(8)); // width: a row's, padded
    let scores = rng.vec(heads * qc * t_eff).iter().map(|v| 8.0 * v).collect::<Vec<_>>();
    let none = (qc - 1) * t_eff; // the last query's keys, all masked out
    let mask: Vec<f32> = (0..qc * t_eff).map(|i| if i % 5 == 2 || i >= none { 0.0 } else { 1.0 }).collect();
    // The mask as selection_bits gives it: bit j % 32 of word j / 32.
    let words = t_eff.div_ceil(32);
    let mut bits = vec![0u32; qc * words];
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m != 0.0) {
        let (q, j) = (i / t_eff, i % t_eff);
        bits[q * words + j / 32] |= 1 << (j % 32);
    }
    let (d_scores, d_bits) = (gpu.upload(&scores)?, gpu.upload(&bits)?);
    // Poisoned with the largest finite bf16, not NaN: a row with no key must come out NaN.
    let mut probs = gpu.filled(heads * qc * width, BF16_POISON)?;
    gpu.masked_softmax_bf16(&d_scores, &d_bits, &mut probs, heads * qc, [qc, t_eff, width])?;
    let want: Vec<f32> = scores
        .chunks_exact(t_eff)
        .enumerate()
        .flat_map(|(r, row)| {
            let kept = |j: usize| mask[(r % qc) * t_eff + j] != 0.0;
            let max = (0..t_eff).filter(|&j| kept(j)).map(|j| row[j] as f64).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = (0..t_eff).map(|j| if kept(j) { (row[j] as f64 - max).exp() } else { 0.0 }).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(move |x| (x / sum) as f32) // 0 / 0: NaN for a row with no key
        })
        .collect();
    let probs = gpu.download(&probs)?;
    let widen = |b: u16| half::bf16::from_bits(b).to_f32();
    let got = probs.chunks_exact(width).flat_map(|row| row[..t_eff].iter().map(|&b| widen(b))).collect();
    Ok((got, want))
}

/// `mma_probe` against the product worked out here, with inputs that make each output name the
/// input it took. Three products: a's elements are 16 r + c + 1 and b picks a's column n (then
/// n + 8) into column n of d; then a is the identity and b's elements are 8 k + n + 1, so d is b.
/// Every value is an integer up to 256, exact in bf16 and in f32 sums, so the products are exact
/// (0 is an output no input reached). On a failure the name says which element the first outputs
/// that differ took (`d[i][n] took a[r][c]`): the fragment layout the hardware has, where it is not
/// the one `flash_attention_bf16` and the emulation's mma assume. A guide, not a proof: where the
/// operand that picks (b in the first two, a in the third) is the one laid out otherwise, an
/// output may be a sum of several elements, named as the one its value spells.
pub(super) fn mma_layouts(gpu: &Gpu) -> Check {
    let name = "mma_probe (m16n8k16 fragment layouts)";
    match mma_probes(gpu) {
        Ok((max_abs, wrong)) if wrong.is_empty() => Check { name: name.into(), max_abs, ok: true },
        Ok((max_abs, wrong)) => {
            let first: Vec<&str> = wrong.iter().take(4).map(String::as_str).collect();
            let name = format!("{name}: {} of 384 outputs differ: {}", wrong.len(), first.join("; "));
            Check { name, max_abs, ok: false }
        }
        Err(e) => Check { name: format!("{name}: {e}"), max_abs: f64::INFINITY, ok: false },
    }
}

/// The three products of [`mma_layouts`]: the largest difference, and each output that differs,
/// described.
fn mma_probes(gpu: &Gpu) -> Result<(f64, Vec<String>)> {
    let bf16 = |v: f32| half::bf16::from_f32(v).to_bits();
    let named = |v: f32, matrix: &str, cols: usize| match v {
        v if v >= 1.0 && v.fract() == 0.0 => {
            format!("{matrix}[{}][{}]", (v as usize - 1) / cols, (v as usize - 1) % cols)
        }
        v => format!("{v}"),
    };
    let counting_a: Vec<f32> = (0..256).map(|e| (e + 1) as f32).collect(); // a[r][c] = 16 r + c + 1
    let identity_a: Vec<f32> = (0..256).map(|e| if e / 16 == e % 16 { 1.0 } else { 0.0 }).collect();
    // b transposed, bt[n][k] = b[k][n]: picking a's column n + shift, or counting (8 k + n + 1).
    let picking = |shift: usize| (0..128).map(move |e| if e % 16 == e / 16 + shift { 1.0 } else { 0.0 }).collect();
    let counting_bt: Vec<f32> = (0..128).map(|e| (8 * (e % 16) + e / 16 + 1) as f32).collect();
    let (mut max_abs, mut wrong) = (0f64, Vec::new());
    for (a, bt, source) in [
        (&counting_a, picking(0), ("a", 16, 0)),
        (&counting_a, picking(8), ("a", 16, 8)),
        (&identity_a, counting_bt, ("b", 8, 0)),
    ] {
        let (da, dbt) = (
            gpu.upload(&a.iter().map(|&v| bf16(v)).collect::<Vec<_>>())?,
            gpu.upload(&bt.iter().map(|&v| bf16(v)).collect::<Vec<_>>())?,
        );
        let mut d = gpu.filled(128, f32::NAN)?;
        gpu.mma_probe(&da, &dbt, &mut d)?;
        let got = gpu.download(&d)?;
        for (e, &g) in got.iter().enumerate() {
            let want: f32 = (0..16).map(|k| a[e / 8 * 16 + k] * bt[e % 8 * 16 + k]).sum();
            let diff = (g as f64 - want as f64).abs();
            max_abs = if diff.is_nan() { f64::INFINITY } else { max_abs.max(diff) };
            if g != want {
                let (matrix, cols, shift) = source;
                let (i, n) = (e / 8, e % 8);
                let expected = if matrix == "a" { format!("a[{i}][{}]", n + shift) } else { format!("b[{i}][{n}]") };
                wrong.push(format!("d[{i}][{n}] took {}, not {expected}", named(g, matrix, cols)));
            }
        }
    }
    Ok((max_abs, wrong))
}

/// [`check`] where `want` has NaNs (the rows of a query with no key): `got` must be NaN exactly
/// there, and within `tol` elsewhere.
fn check_with_nans(name: impl Into<String>, got: &[f32], want: &[f32], tol: f64) -> Check {
    let nan_alike = got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| g.is_nan() == w.is_nan())
        && want.iter().any(|w| w.is_nan());
    let finite = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| if x.is_nan() { 0.0 } else { *x }).collect() };
    let c = check(name, &finite(got), &finite(want), tol);
    Check { ok: c.ok && nan_alike, ..c }
}

/// `selection_bits` against the bits of the selection worked out here: 4 queries at positions
/// 30 .. 33 over 70 keys (three words a row, the last partial), their selections holding padding
/// (-1), later keys and keys past t_eff, none of which may set a bit.
fn selection_bits(gpu: &Gpu) -> Result<Check> {
    let (qc, kk, t_eff, first): (usize, usize, usize, usize) = (4, 9, 70, 30);
    let idx: Vec<i32> = (0..qc * kk).map(|i| ((i * 37 + 11) % 80) as i32 - 5).collect();
    let words = t_eff.div_ceil(32);
    let mut want = vec![0u32; qc * words];
    for (i, row) in idx.chunks(kk).enumerate() {
        for &key in row {
            if let Ok(key) = usize::try_from(key) {
                if key <= first + i && key < t_eff {
                    want[i * words + key / 32] |= 1 << (key % 32);
                }
            }
        }
    }
    let mut bits = gpu.filled(qc * words, u32::MAX)?;
    gpu.selection_bits(&gpu.upload(&idx)?, 0, &mut bits, [qc, kk, t_eff], first)?;
    let as_i32 = |v: Vec<u32>| v.into_iter().map(|w| w as i32).collect::<Vec<_>>();
    Ok(check_ints("selection_bits", &as_i32(gpu.download(&bits)?), &as_i32(want)))
}

/// bf16 mode's masked and fused paths over 70 queries after 10 cached keys, more than one block
/// of the fused kernel's 64, so a chunk has a second, partial tile of queries: with head widths
/// not whole vectors of 8 (the kernel's scalar loads) and whole ones (its 16-byte loads), and one
/// query whose selection is all padding (its output NaN on both paths, as in the reference).
fn bf16_paths_over_two_tiles(ops: &crate::cuda::ops::CudaOps, rng: &mut Rng) -> Result<Vec<Check>> {
    let gpu = &ops.gpu;
    let (s, offset, heads, kk) = (70, 10, 2, 16);
    let t = offset + s;
    let scores = rng.vec(s * t);
    let mut idx = selected_ids(&crate::model::indexer::top_k_causal(&scores, 1, s, offset, kk));
    idx[33 * kk..34 * kk].fill(-1);
    // Outputs poisoned with a finite value, not NaN: the query with no key must come out NaN.
    let before = gpu.poisoned();
    gpu.poison_outputs(Some(f32::MAX));
    let checks = bf16_tiles(ops, rng, (s, offset, heads, kk), &idx);
    gpu.poison_outputs(before);
    checks
}

/// [`bf16_paths_over_two_tiles`]'s checks, over `s` queries after `offset` keys.
fn bf16_tiles(
    ops: &crate::cuda::ops::CudaOps,
    rng: &mut Rng,
    (s, offset, heads, kk): (usize, usize, usize, usize),
    idx: &[i32],
) -> Result<Vec<Check>> {
    use crate::cuda::attention::{AttentionPath, AttentionPlan};
    let (gpu, t) = (&ops.gpu, offset + s);
    let mut out = Vec::new();
    for (nope, rd, vd, loads) in [(14, 6, 12, "scalar"), (16, 8, 16, "16-byte")] {
        let (q, kv, kr) = (rng.vec(s * heads * (nope + rd)), rng.vec(t * heads * (nope + vd)), rng.vec(t * rd));
        let dims = [1, s, t, heads, nope, rd, vd, kk, offset];
        let scale = ((nope + rd) as f32).powf(-0.5);
        let bufs = (gpu.upload(&q)?, gpu.upload(&kv)?, gpu.upload(&kr)?, gpu.upload(idx)?);
        for (path, rounding) in [
            (AttentionPath::Masked, ProbRounding::Divided),
            (AttentionPath::Fused, ProbRounding::Flash(FLASH_STEP_KEYS)),
        ] {
            let want = bf16_attention(&q, &kv, &kr, idx, dims, scale, rounding);
            let plan = AttentionPlan { path: Some(path), ..Default::default() };
            let got =
                ops.download(&ops.sparse_attention_with(plan, (&bufs.0, &bufs.1, &bufs.2, &bufs.3), dims, scale)?)?;
            let name =
                format!("sparse_attention ({path:?}, {s} queries, {loads} loads, a query with no key), bf16 mode");
            // As the small check's masked path: a rounding tie here and on a GPU moves an output
            // by up to 2^-8 of a probability.
            out.push(check_with_nans(name, &got, &want, 2e-3));
        }
    }
    Ok(out)
}

/// The attention's quadratic steps (`cuda::attention`) against `CpuOps`: the indexer's scores
/// (cuBLAS products and `index_combine`) and attention over a top-k selection on both paths,
/// whole and in chunks of 2 queries (so chunks start past the first query and reach fewer keys).
/// Batch 2, 5 new queries after 38 cached keys; then 9 from position 0, whose first chunks see
/// no more than K keys and are not scored.
/// The products are SGEMM in f32 mode. In bf16 mode the indexer's are split bf16 (about 16
/// mantissa bits: held to 1e-4) and the masked attention's take bf16 operands (against
/// [`bf16_attention`]); the gathered attention computes in f32 in either mode. bf16 mode adds
/// the fused path, and both bf16 paths over two tiles of queries
/// ([`bf16_paths_over_two_tiles`]); both modes, `selection_bits`.
pub fn attention(ops: &crate::cuda::ops::CudaOps) -> Result<Vec<Check>> {
    use crate::cuda::attention::{AttentionPath, AttentionPlan};
    let mut rng = Rng(0x6a09e667f3bcc909);
    let mut out = Vec::new();
    let gpu = &ops.gpu;
    let bf16 = ops.precision() == crate::device::Precision::Bf16;
    // The indexer's products are split bf16 in bf16 mode: about 16 mantissa bits.
    let (mode, tol) = if bf16 { (", bf16 mode", 1e-4) } else { ("", 1e-5f64) };
    let (batch, s, offset, nh, d, topk) = (2, 5, 38, 4, 16, 24);
    let t = offset + s;
    let (q, k, w) = (rng.vec(batch * s * nh * d), rng.vec(batch * t * d), rng.vec(batch * s * nh));
    let (dq, dk, dw) = (gpu.upload(&q)?, gpu.upload(&k)?, gpu.upload(&w)?);
    let (dims, scale) = ([batch, s, t, nh, d, offset], (d as f32).powf(-0.5));
    let cpu_scores = CpuOps.index_scores(&q, &k, &w, dims, scale)?;
    let whole = AttentionPlan::default();
    let chunks_of_2 = |path, heads| AttentionPlan { path, chunk_values: 2 * heads * t };
    for (name, plan) in [("index_scores", whole), ("index_scores (chunks of 2 queries)", chunks_of_2(None, nh))] {
        let scores = ops.index_scores_with(plan, (&dq, &dk, &dw), dims, scale)?;
        out.push(check(format!("{name}{mode}"), &ops.download(&scores)?, &cpu_scores, tol.max(1e-4)));
        // The selection taken chunk by chunk, without the whole scores, is the selection of the
        // whole scores (the same products): the same keys in the same order, the same margins.
        let (idx, margin) = ops.topk_causal(&scores, batch * s, s, t, offset, topk.min(t))?;
        let (fused_idx, fused_margin) = ops.index_topk_with(plan, (&dq, &dk, &dw), dims, scale, topk.min(t))?;
        let ids = check_ints("", &ops.gpu.download(&fused_idx)?, &ops.gpu.download(&idx)?);
        let m = check("", &ops.download(&fused_margin)?, &ops.download(&margin)?, 0.0);
        let name = name.replace("index_scores", "index_topk");
        out.push(Check { name: format!("{name}{mode}"), max_abs: m.max_abs.max(ids.max_abs), ok: m.ok && ids.ok });
    }

    // 9 queries from position 0 with K = 6, in chunks of 2: the first three chunks see no more
    // than K keys, so index_topk writes them unscored (`every_key`), as the top-k of the whole
    // scores lists them (by position, margin +inf); the later chunks are scored.
    let (s0, k0) = (9, 6);
    let mut rng0 = Rng(0xbb67ae8584caa73b);
    let (q0, key0, w0) = (rng0.vec(batch * s0 * nh * d), rng0.vec(batch * s0 * d), rng0.vec(batch * s0 * nh));
    let operands = (&gpu.upload(&q0)?, &gpu.upload(&key0)?, &gpu.upload(&w0)?);
    let dims0 = [batch, s0, s0, nh, d, 0];
    let (idx, margin) =
        ops.topk_causal(&ops.index_scores_with(whole, operands, dims0, scale)?, batch * s0, s0, s0, 0, k0)?;
    let plan = AttentionPlan { path: None, chunk_values: 2 * nh * s0 };
    let (chunked_idx, chunked_margin) = ops.index_topk_with(plan, operands, dims0, scale, k0)?;
    let ids = check_ints("", &ops.gpu.download(&chunked_idx)?, &ops.gpu.download(&idx)?);
    let m = check("", &ops.download(&chunked_margin)?, &ops.download(&margin)?, 0.0);
    let name = format!("index_topk (chunks of 2 queries from position 0, the first 3 unscored){mode}");
    out.push(Check { name, max_abs: m.max_abs.max(ids.max_abs), ok: m.ok && ids.ok });

    // Attention over the CPU's top-k of those scores: 3 heads, nope 12, rope 4, v 10.
    let sel = crate::model::indexer::top_k_causal(&cpu_scores, batch, s, offset, topk);
    let idx = selected_ids(&sel);
    let (heads, nope, rd, vd, kk) = (3, 12, 4, 10, topk.min(t));
    let (q, kv, kr) =
        (rng.vec(batch * s * heads * (nope + rd)), rng.vec(batch * t * heads * (nope + vd)), rng.vec(batch * t * rd));
    let dims = [batch, s, t, heads, nope, rd, vd, kk, offset];
    let scale = ((nope + rd) as f32).powf(-0.5);
    let cpu = CpuOps.sparse_attention(&q, &kv, &kr, &idx, dims, scale)?;
    // The masked path in bf16 mode against its own arithmetic (`bf16_attention`); a probability
    // on the other side of a bf16 rounding tie here and on the device moves an output by up to
    // 2^-8 of that probability (a third, at 24 keys), hence 2e-3.
    let (masked_cpu, masked_tol) = match bf16 {
        true => (bf16_attention(&q, &kv, &kr, &idx, dims, scale, ProbRounding::Divided), 2e-3),
        false => (cpu.clone(), tol),
    };
    let bufs = (gpu.upload(&q)?, gpu.upload(&kv)?, gpu.upload(&kr)?, gpu.upload(&idx)?);
    let masked = Some(AttentionPath::Masked);
    let mut plans = vec![
        ("sparse_attention (gathered)", AttentionPlan { path: Some(AttentionPath::Gathered), ..whole }, &cpu, tol),
        ("sparse_attention (masked)", AttentionPlan { path: masked, ..whole }, &masked_cpu, masked_tol),
        ("sparse_attention (masked, chunks of 2 queries)", chunks_of_2(masked, heads), &masked_cpu, masked_tol),
    ];
    let flash_cpu = match bf16 {
        true => bf16_attention(&q, &kv, &kr, &idx, dims, scale, ProbRounding::Flash(FLASH_STEP_KEYS)),
        false => Vec::new(),
    };
    if bf16 {
        let fused = Some(AttentionPath::Fused);
        plans.push(("sparse_attention (fused)", AttentionPlan { path: fused, ..whole }, &flash_cpu, masked_tol));
        let of_2 = AttentionPlan { path: fused, chunk_values: 2 * t }; // chunks of queries x keys: 2 queries
        plans.push(("sparse_attention (fused, chunks of 2 queries)", of_2, &flash_cpu, masked_tol));
    }
    // A path that fails with an error is a failed check, and the paths after it still run.
    for (name, plan, want, tol) in plans {
        let run = ops.sparse_attention_with(plan, (&bufs.0, &bufs.1, &bufs.2, &bufs.3), dims, scale);
        out.push(match run.and_then(|got| ops.download(&got)) {
            Ok(got) => check(format!("{name}{mode}"), &got, want, tol),
            Err(e) => Check { name: format!("{name}{mode}: {e}"), max_abs: f64::INFINITY, ok: false },
        });
    }
    out.push(selection_bits(gpu)?);
    if bf16 {
        out.extend(bf16_paths_over_two_tiles(ops, &mut rng)?);
    }
    Ok(out)
}

/// Where bf16 mode rounds the probabilities (see [`bf16_attention`]).
#[derive(Clone, Copy)]
enum ProbRounding {
    /// The masked path: each probability, after the division by the sum.
    Divided,
    /// The fused path: each `exp(s - m)` before the division, `m` the running maximum over the
    /// tiles of this many keys seen so far (a flash attention's online softmax).
    Flash(usize),
}

/// Attention over the selection as bf16 mode computes it (the `Ops::sparse_attention`
/// contract): q, k and v rounded to bf16, scores and softmax in f64 here, the probabilities
/// rounded to bf16 as `rounding` says, the values' sum in f64.
fn bf16_attention(
    q: &[f32],
    kv: &[f32],
    k_rope: &[f32],
    idx: &[i32],
    [batch, s, t, nh, nope, rd, vd, kk, offset]: [usize; 9],
    scale: f32,
    rounding: ProbRounding,
) -> Vec<f32> {
    let r = |x: f32| half::bf16::from_f32(x).to_f64();
    let mut out = vec![0f32; batch * s * nh * vd];
    for row in 0..batch * s {
        let (b, p) = (row / s, offset + row % s);
        let mut keys: Vec<usize> = idx[row * kk..(row + 1) * kk]
            .iter()
            .filter_map(|&j| usize::try_from(j).ok())
            .filter(|&j| j <= p && j < t)
            .collect();
        keys.sort_unstable();
        keys.dedup(); // the masked form counts a key once
        if keys.is_empty() {
            // No key: 0 / 0, as every path gives it.
            out[row * nh * vd..(row + 1) * nh * vd].fill(f32::NAN);
            continue;
        }
        for h in 0..nh {
            let qv = &q[(row * nh + h) * (nope + rd)..][..nope + rd];
            let kv_at = |j: usize, c: usize| kv[((b * t + j) * nh + h) * (nope + vd) + c];
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let kr = &k_rope[(b * t + j) * rd..][..rd];
                    let dot: f64 = (0..nope).map(|i| r(qv[i]) * r(kv_at(j, i))).sum::<f64>()
                        + (0..rd).map(|i| r(qv[nope + i]) * r(kr[i])).sum::<f64>();
                    dot * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
            let z: f64 = e.iter().sum();
            let probs: Vec<f64> = match rounding {
                ProbRounding::Divided => e.iter().map(|x| r((x / z) as f32)).collect(),
                ProbRounding::Flash(n) => {
                    // The running maximum each key's tile saw (keys ascending), and its weight
                    // bf16(exp(s - running)) rescaled to the final maximum.
                    let mut running = vec![f64::NEG_INFINITY; keys.len()];
                    let mut m = f64::NEG_INFINITY;
                    for (i, &j) in keys.iter().enumerate() {
                        if i == 0 || keys[i - 1] / n != j / n {
                            let end = i + keys[i..].iter().take_while(|&&x| x / n == j / n).count();
                            m = scores[i..end].iter().cloned().fold(m, f64::max);
                        }
                        running[i] = m;
                    }
                    let w = |(s, m): (&f64, &f64)| r((s - m).exp() as f32) * (m - max).exp() / z;
                    scores.iter().zip(&running).map(w).collect()
                }
            };
            for c in 0..vd {
                let acc: f64 = keys.iter().zip(&probs).map(|(&j, p)| p * r(kv_at(j, nope + c))).sum();
                out[(row * nh + h) * vd + c] = acc as f32;
            }
        }
    }
    out
}

/// The top-k and the attention at GLM-5's sizes, which the small checks do not reach: K = 2048
/// (`index_topk`) over rows of 10 000 keys, sorted in 128 KB of shared memory (past the 48 KB a
/// launch gets without the opt-in `Gpu::open` asks for), and of 20 000 keys, in chunks of the
/// largest the shared memory holds (two rounds); then attention over those 2048 keys of 2100 at
/// GLM-5's head sizes (64 heads, nope 192, rope 64, v 256; 2 heads on the emulation) on both
/// paths, and on the masked and fused paths in bf16 mode (`bf16_ops`: bf16 operands, against
/// [`bf16_attention`]).
/// Two queries each, at the ends of their rows. The path each top-k took is in its check's name:
/// a device that refused the opt-in takes smaller chunks.
pub fn at_glm5_sizes(ops: &crate::cuda::ops::CudaOps, bf16_ops: &crate::cuda::ops::CudaOps) -> Result<Vec<Check>> {
    use crate::cuda::attention::{AttentionPath, AttentionPlan};
    let mut rng = Rng(0xbb67ae8584caa73b);
    let mut out = Vec::new();
    let gpu = &ops.gpu;
    let (s, k) = (2, 2048);
    for (t, step) in [(10_000, 1.0 / 64.0), (20_000, 0.0)] {
        // Scores on a grid of 1/64 tie at the cut, and the positions must break the ties.
        let scores: Vec<f32> =
            rng.vec(s * t).iter().map(|&v| if step > 0.0 { (v / step).round() * step } else { v }).collect();
        let path = gpu.topk_path(t, k);
        let (mut idx, mut margin) = (gpu.filled(s * k, -1i32)?, gpu.filled(s, f32::NAN)?);
        gpu.topk_causal_by(path, &gpu.upload(&scores)?, [s, s, t, t - s, k], &mut idx, &mut margin)?;
        let sel = crate::model::indexer::top_k_causal(&scores, 1, s, t - s, k);
        let same = check_ints("", &as_sets(&gpu.download(&idx)?, k), &as_sets(&selected_ids(&sel), k));
        let m = check("", &gpu.download(&margin)?, &sel.margin, 0.0);
        let name = format!("topk_causal ({path:?}, {t} keys, K {k})");
        out.push(Check { name, max_abs: m.max_abs.max(same.max_abs), ok: m.ok && same.ok });
    }

    // The emulation runs a block's threads one at a time, and each key of the gathered path is a
    // block reduction: 2 heads there (the same loops over each row), 64 on a GPU.
    let heads = if gpu.stream().is_none() { 2 } else { 64 };
    let (t, nope, rd, vd) = (2100, 192, 64, 256);
    let scores = rng.vec(s * t);
    let idx = selected_ids(&crate::model::indexer::top_k_causal(&scores, 1, s, t - s, k));
    let (q, kv, kr) = (rng.vec(s * heads * (nope + rd)), rng.vec(t * heads * (nope + vd)), rng.vec(t * rd));
    let dims = [1, s, t, heads, nope, rd, vd, k, t - s];
    let scale = ((nope + rd) as f32).powf(-0.5);
    let cpu = CpuOps.sparse_attention(&q, &kv, &kr, &idx, dims, scale)?;
    // bf16 mode against its own arithmetic at 2e-5: over 2048 keys each probability is small, and
    // so is a rounding tie's 2^-8 of one. That is tight enough to tell it from f32's: the check
    // also asks the two references to lie more than 3 tolerances apart, so a path that skipped
    // the rounding could not pass.
    let bf16_cpu = bf16_attention(&q, &kv, &kr, &idx, dims, scale, ProbRounding::Divided);
    let flash_cpu = bf16_attention(&q, &kv, &kr, &idx, dims, scale, ProbRounding::Flash(FLASH_STEP_KEYS));
    // (bf16: the reference's own distance from the f32 result is part of the verdict.)
    for (path, ops, bf16, want, tol) in [
        (AttentionPath::Gathered, ops, false, &cpu, 1e-5),
        (AttentionPath::Masked, ops, false, &cpu, 1e-5),
        (AttentionPath::Masked, bf16_ops, true, &bf16_cpu, 2e-5),
        (AttentionPath::Fused, bf16_ops, true, &flash_cpu, 2e-5),
    ] {
        let plan = AttentionPlan { path: Some(path), ..Default::default() };
        // Each ops' own buffers: the two precisions' ops may be on different streams.
        let g = &ops.gpu;
        let bufs = (g.upload(&q)?, g.upload(&kv)?, g.upload(&kr)?, g.upload(&idx)?);
        let got = ops.sparse_attention_with(plan, (&bufs.0, &bufs.1, &bufs.2, &bufs.3), dims, scale)?;
        let name = format!("sparse_attention ({path:?}, {heads} heads of {nope}+{rd}/{vd}, {k} of {t} keys)");
        let c = check(&name, &ops.download(&got)?, want, tol);
        out.push(match bf16 {
            false => c,
            true => {
                let apart = check("", want, &cpu, 0.0).max_abs;
                Check { name: format!("{name}, bf16 mode (f32 {apart:.1e} away)"), ok: c.ok && apart > 3.0 * tol, ..c }
            }
        });
    }
    Ok(out)
}
