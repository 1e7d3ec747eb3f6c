//! `glimpse selftest --device cuda`: every kernel against its CPU reference on random inputs
//! whose sizes are not multiples of the block sizes, into outputs poisoned with NaN (or -1 for
//! indices) so an element a kernel never writes fails the check. The references are the model's
//! own functions where the kernel computes the same thing (norms, RoPE tables, the router, the
//! causal top-k, FP8 dequantisation), else the op of [`CpuOps`], which the device forward pass
//! is tested with.

use super::gpu::{Gpu, TopK};
use crate::device::cpu::CpuOps;
use crate::device::{HostWeight, Ops};
use crate::error::Result;
use crate::model::moe::{route, RouterConfig};

mod attention;
pub use attention::{at_glm5_sizes, attention};

/// One kernel's verdict.
pub struct Check {
    pub name: String,
    pub max_abs: f64,
    pub ok: bool,
}

/// A deterministic generator of test inputs (xorshift).
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn check(name: impl Into<String>, gpu: &[f32], cpu: &[f32], tol: f64) -> Check {
    let mut max_abs = 0f64;
    let mut ok = gpu.len() == cpu.len();
    for (&a, &e) in gpu.iter().zip(cpu) {
        let same_inf = a.is_infinite() && a == e;
        let err = if same_inf { 0.0 } else { (a as f64 - e as f64).abs() };
        if err.is_nan() || err > tol * (1.0 + (e as f64).abs()) {
            ok = false;
        }
        max_abs = if err.is_nan() { f64::INFINITY } else { max_abs.max(err) };
    }
    Check { name: name.into(), max_abs, ok }
}

/// Whether a token's route hangs on two biased scores (or, grouped, two group scores) within
/// 1e-6 of each other, which a GPU's expf (up to 2 ulp from the host's) may order otherwise.
fn near_tie(rc: &RouterConfig, logits: &[f32], bias: &[f32]) -> bool {
    use crate::model::moe::{choice_scores, group_scores, sigmoid, top_indices};
    let close = |v: &[f32], n: usize| top_indices(v, n).windows(2).any(|p| (v[p[0]] - v[p[1]]).abs() < 1e-6);
    let scores: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
    let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    close(&choice_scores(rc, &scores, bias).0, rc.top_k + 1)
        || (rc.n_group > 1 && close(&group_scores(&biased, rc.n_group), rc.topk_group + 1))
}

/// `v`'s rows of `per` values, without the rows `excused`.
fn without<T: Copy>(v: &[T], per: usize, excused: &[usize]) -> Vec<T> {
    v.chunks(per.max(1)).enumerate().filter(|(t, _)| !excused.contains(t)).flat_map(|(_, r)| r.to_vec()).collect()
}

/// A selection's positions as the kernels' i32 ids.
fn selected_ids(sel: &crate::model::indexer::Selection) -> Vec<i32> {
    sel.idx.iter().map(|&i| i as i32).collect()
}

/// Rows of `k` keys, each sorted: selections compare as sets.
fn as_sets(v: &[i32], k: usize) -> Vec<i32> {
    v.chunks(k.max(1))
        .flat_map(|r| {
            let mut r = r.to_vec();
            r.sort_unstable();
            r
        })
        .collect()
}

fn check_ints(name: &str, gpu: &[i32], cpu: &[i32]) -> Check {
    let bad = gpu.len() != cpu.len() || gpu.iter().zip(cpu).any(|(a, b)| a != b);
    Check { name: name.into(), max_abs: if bad { f64::INFINITY } else { 0.0 }, ok: !bad }
}

/// The largest finite bf16: poison for a bf16 output where NaN is a value the kernel must write.
const BF16_POISON: u16 = 0x7F7F;

/// Every kernel's name, as `KERNELS` lists them.
pub fn kernel_names() -> impl Iterator<Item = &'static str> {
    super::KERNELS.iter().flat_map(|(_, _, names)| names.iter().copied())
}

/// The kernels not in `launched` (`Gpu::launched`): ones no check ran, so none checked.
pub fn unlaunched(launched: &std::collections::BTreeSet<&str>) -> Vec<&'static str> {
    kernel_names().filter(|k| !launched.contains(*k)).collect()
}

/// Runs every kernel check on `gpu`.
pub fn kernels(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut out = Vec::new();
    let nan = f32::NAN;

    // Norms: 37 rows of 1003 (not multiples of the 256-thread block).
    let (rows, cols) = (37, 1003);
    let (x, w, bias) = (rng.vec(rows * cols), rng.vec(cols), rng.vec(cols));
    let (dx, dw, db) = (gpu.upload(&x)?, gpu.upload(&w)?, gpu.upload(&bias)?);
    let xt = candle_core::Tensor::from_vec(x.clone(), (rows, cols), &candle_core::Device::Cpu)?;
    let wt = candle_core::Tensor::from_vec(w.clone(), cols, &candle_core::Device::Cpu)?;
    let bt = candle_core::Tensor::from_vec(bias.clone(), cols, &candle_core::Device::Cpu)?;
    let mut y = gpu.filled(rows * cols, nan)?;
    gpu.rms_norm(&dx, &dw, &mut y, rows, cols, 1e-6)?;
    let cpu = crate::model::nn::RmsNorm { weight: wt.clone(), eps: 1e-6 }.forward(&xt)?;
    out.push(check("rms_norm", &gpu.download(&y)?, &cpu.flatten_all()?.to_vec1()?, 1e-5));
    let mut y = gpu.filled(rows * cols, nan)?;
    gpu.layer_norm(&dx, &dw, &db, &mut y, rows, cols, 1e-6)?;
    let cpu = crate::model::nn::LayerNorm { weight: wt, bias: bt, eps: 1e-6 }.forward(&xt)?;
    out.push(check("layer_norm", &gpu.download(&y)?, &cpu.flatten_all()?.to_vec1()?, 1e-5));
    let mut n = gpu.filled(rows, nan)?;
    gpu.row_l2_norm(&dx, &mut n, rows, cols)?;
    out.push(check("row_l2_norm", &gpu.download(&n)?, &CpuOps.row_l2_norm(&x, rows, cols)?, 1e-5));

    // RoPE with YaRN-style attention scaling: 14 rows (2 x 7 positions) x 5 heads x width 24,
    // rope slice [8, 24); then 3 rows x 3 heads of 40 pairs (a lane's second pair, and the last
    // block's warps past the rows).
    for (r_rows, seq, heads, width, start, half) in [(14, 7, 5, 24, 8, 8), (3, 3, 3, 88, 8, 40)] {
        let rot = crate::model::rope::RotaryEmbedding {
            inv_freq: (0..half).map(|j| 1.0 / 10000f32.powf(2.0 * j as f32 / (2 * half) as f32)).collect(),
            attention_scaling: 1.2,
        };
        let tables = rot.tables(&(3..3 + seq).collect::<Vec<_>>());
        let mut x = rng.vec(r_rows * heads * width);
        let mut dx = gpu.upload(&x)?;
        let (cos, sin) = (gpu.upload(&tables.cos)?, gpu.upload(&tables.sin)?);
        gpu.rope(&mut dx, &cos, &sin, r_rows, seq, heads, width, start, half)?;
        tables.apply(&mut x, seq, heads, width, start);
        out.push(check(format!("rope_interleaved (half {half})"), &gpu.download(&dx)?, &x, 1e-5));
    }

    // SwiGLU over 37 rows of fused gate and up products (2 x 300 wide: a block of 256 threads
    // takes a row twice over), then adds of 10_007 values, then a cut of columns.
    let (sw_rows, inter) = (37, 300);
    let gate_up = rng.vec(sw_rows * 2 * inter);
    let mut y = gpu.filled(sw_rows * inter, nan)?;
    gpu.swiglu(&gpu.upload(&gate_up)?, &mut y, sw_rows, inter)?;
    out.push(check("swiglu", &gpu.download(&y)?, &CpuOps.swiglu(&gate_up, sw_rows, inter)?, 1e-5));
    let n_sw = 10_007;
    let (g, u) = (rng.vec(n_sw), rng.vec(n_sw));
    let mut y = gpu.filled(n_sw, nan)?;
    gpu.add(&gpu.upload(&g)?, &gpu.upload(&u)?, &mut y, n_sw)?;
    out.push(check("add", &gpu.download(&y)?, &CpuOps.add(&g, &u, n_sw)?, 0.0));
    // Columns 301 .. 578 of 37 rows of 640 (wider than a block, from an odd offset); from a
    // generator of their own, so the checks after them draw what they drew before.
    let (c_rows, c_width, col0, cols) = (37, 640, 301, 277);
    let x = Rng(0x6a09e667f3bcc909).vec(c_rows * c_width);
    let (dx, mut y) = (gpu.upload(&x)?, gpu.filled(c_rows * cols, nan)?);
    gpu.columns((&dx, [c_rows, c_width], col0), (&mut y, cols, 0), cols)?;
    out.push(check("columns", &gpu.download(&y)?, &CpuOps.columns(&x, [c_rows, c_width], col0, cols)?, 0.0));
    // And put side by side (the MTP head's input): columns 0 .. 13 of x, then the same cut, into
    // rows of 290 (the second copied from column 301 into column 13).
    let mut side = gpu.filled(c_rows * (13 + cols), nan)?;
    gpu.columns((&dx, [c_rows, c_width], 0), (&mut side, 13 + cols, 0), 13)?;
    gpu.columns((&dx, [c_rows, c_width], col0), (&mut side, 13 + cols, 13), cols)?;
    let first = CpuOps.columns(&x, [c_rows, c_width], 0, 13)?;
    let cut = CpuOps.columns(&x, [c_rows, c_width], col0, cols)?;
    let want = CpuOps.concat_columns(&[(&first, 13), (&cut, cols)], c_rows)?;
    out.push(check("columns side by side", &gpu.download(&side)?, &want, 0.0));

    // The router, flat and grouped: 77 tokens over 64 experts, top-6; and GLM-5's 256, top-8. The
    // biases shrink as the experts grow in number (and the gaps between their scores with them),
    // so that they change some routes and not others.
    // Groups of 64 put two of a group's experts in each lane of the kernel's warp.
    let routers = [
        ("route (flat)", 1, 1, 64, 6),
        ("route (grouped 8/3)", 8, 3, 64, 6),
        ("route (flat 256)", 1, 1, 256, 8),
        ("route (grouped 256 in 4/2)", 4, 2, 256, 8),
        // Every group kept: no cut, the experts' gap alone.
        ("route (grouped 4/4)", 4, 4, 64, 6),
    ];
    for (name, n_group, topk_group, e, top_k) in routers {
        let tokens = 77;
        let rc = RouterConfig { top_k, n_group, topk_group, norm_topk_prob: true, routed_scaling_factor: 2.5 };
        let (logits, bias) =
            (rng.vec(tokens * e), rng.vec(e).iter().map(|b| b * 25.0 / (e * e) as f32).collect::<Vec<_>>());
        let (mut ids, mut w, mut m) =
            (gpu.filled(tokens * rc.top_k, -1i32)?, gpu.filled(tokens * rc.top_k, nan)?, gpu.filled(tokens, nan)?);
        gpu.route(&gpu.upload(&logits)?, &gpu.upload(&bias)?, tokens, e, &rc, &mut ids, &mut w, &mut m)?;
        let routes: Vec<_> = logits.chunks(e).map(|l| route(&rc, l, &bias)).collect();
        let cpu_ids: Vec<i32> = routes.iter().flat_map(|r| r.ids.iter().map(|&i| i as i32)).collect();
        let cpu_w: Vec<f32> = routes.iter().flat_map(|r| r.weights.clone()).collect();
        let cpu_m: Vec<f32> = routes.iter().map(|r| r.margin).collect();
        let (gpu_ids, gpu_w, gpu_m) = (gpu.download(&ids)?, gpu.download(&w)?, gpu.download(&m)?);
        // A GPU's expf may differ from the host's by an ulp or two, which can reorder two
        // choices (or groups) that close: such a token, if it differs, is left out of the exact
        // comparison, and at most 3 of the 77 may be.
        let differs = |t: usize| gpu_ids[t * top_k..(t + 1) * top_k] != cpu_ids[t * top_k..(t + 1) * top_k];
        let excused: Vec<usize> =
            (0..tokens).filter(|&t| differs(t) && near_tie(&rc, &logits[t * e..][..e], &bias)).collect();
        let ids_ok = check_ints(name, &without(&gpu_ids, top_k, &excused), &without(&cpu_ids, top_k, &excused));
        let w_ok = check(name, &without(&gpu_w, top_k, &excused), &without(&cpu_w, top_k, &excused), 1e-5);
        let m_ok = check(name, &gpu_m, &cpu_m, 1e-5);
        let label = match excused.len() {
            0 => name.to_string(),
            n => format!("{name}, {n} near-tied tokens ordered otherwise"),
        };
        out.push(Check {
            name: label,
            max_abs: w_ok.max_abs.max(m_ok.max_abs),
            ok: ids_ok.ok && w_ok.ok && m_ok.ok && excused.len() <= 3,
        });

        let mut counts = gpu.filled(e, 0i32)?;
        gpu.expert_counts(&ids, tokens * rc.top_k, e, &mut counts)?;
        let mut cpu_counts = vec![0i32; e];
        gpu_ids.iter().for_each(|&i| cpu_counts[i as usize] += 1); // the kernel counts the ids it is given
        if name == "route (flat)" {
            out.push(check_ints("expert_counts", &gpu.download(&counts)?, &cpu_counts));
        }

        // The route without the bias, and which tokens it changes (some, with these biases).
        let (mut plain, mut pw, mut pm) =
            (gpu.filled(tokens * rc.top_k, -1i32)?, gpu.filled(tokens * rc.top_k, nan)?, gpu.filled(tokens, nan)?);
        let zeros = gpu.upload(&vec![0f32; e])?;
        gpu.route(&gpu.upload(&logits)?, &zeros, tokens, e, &rc, &mut plain, &mut pw, &mut pm)?;
        let mut changed = gpu.filled(tokens, -1i32)?;
        gpu.bias_changed(&ids, &plain, &mut changed, tokens, rc.top_k)?;
        let cpu_changed: Vec<i32> = logits
            .chunks(e)
            .zip(cpu_ids.chunks(rc.top_k))
            .map(|(l, chosen)| {
                let chosen: Vec<usize> = chosen.iter().map(|&i| i as usize).collect();
                i32::from(crate::model::moe::bias_changed(&rc, l, &chosen))
            })
            .collect();
        let some = cpu_changed.contains(&1) && cpu_changed.contains(&0);
        // Near ties of either route excuse a differing token, as above.
        let (gpu_changed, no_bias) = (gpu.download(&changed)?, vec![0f32; e]);
        let tied =
            |t: usize| near_tie(&rc, &logits[t * e..][..e], &bias) || near_tie(&rc, &logits[t * e..][..e], &no_bias);
        let excused: Vec<usize> = (0..tokens).filter(|&t| gpu_changed[t] != cpu_changed[t] && tied(t)).collect();
        let c = check_ints(
            &format!("bias_changed ({})", &name[7..name.len() - 1]),
            &without(&gpu_changed, 1, &excused),
            &without(&cpu_changed, 1, &excused),
        );
        out.push(Check { ok: c.ok && some && excused.len() <= 3, ..c });
    }

    // NaN logits of either sign rank first on both sides (torch.topk's order), flat and grouped:
    // the chosen ids must agree (the weights of a token that chose a NaN are NaN).
    for (name, n_group, topk_group) in [("route (NaN logits, flat)", 1, 1), ("route (NaN logits, grouped 8/3)", 8, 3)] {
        let (tokens, e) = (4, 64);
        let rc = RouterConfig { top_k: 6, n_group, topk_group, norm_topk_prob: true, routed_scaling_factor: 2.5 };
        let mut logits = rng.vec(tokens * e);
        let negative_nan = f32::from_bits(0xffc0_0000);
        for (at, v) in [(10, f32::NAN), (e, negative_nan), (2 * e + 2, f32::NAN), (2 * e + 40, negative_nan)] {
            logits[at] = v;
        }
        let bias = vec![0.0f32; e];
        let (mut ids, mut w, mut m) =
            (gpu.filled(tokens * rc.top_k, -1i32)?, gpu.filled(tokens * rc.top_k, nan)?, gpu.filled(tokens, nan)?);
        gpu.route(&gpu.upload(&logits)?, &gpu.upload(&bias)?, tokens, e, &rc, &mut ids, &mut w, &mut m)?;
        let cpu_ids: Vec<i32> =
            logits.chunks(e).flat_map(|l| route(&rc, l, &bias).ids.into_iter().map(|i| i as i32)).collect();
        // Tokens 0-2 hold a NaN each; every one of them must have been chosen.
        let chose_nan =
            (0..3).all(|t| cpu_ids[t * rc.top_k..][..rc.top_k].iter().any(|&i| logits[t * e + i as usize].is_nan()));
        let c = check_ints(name, &gpu.download(&ids)?, &cpu_ids);
        out.push(Check { ok: c.ok && chose_nan, ..c });
    }

    // Grouped routing's margin takes the groups' gap only where swapping the last kept group for
    // the next could change the experts. 8 groups of 8, 3 kept, top 2; token 0: groups 2 and 3
    // tie within 0.003 but the two chosen experts sit in group 0 and the next group's best is far
    // below them (the experts' gap, 0.33, decides); token 1: the second chosen expert sits in the
    // last kept group, which leads the next by 0.005 (the groups' gap decides).
    {
        let (e, low) = (64, -3.0f32);
        let rc = RouterConfig { top_k: 2, n_group: 8, topk_group: 3, norm_topk_prob: true, routed_scaling_factor: 2.5 };
        let token = |set: &[(usize, f32)]| {
            let mut l = vec![low; e];
            set.iter().for_each(|&(j, v)| l[j] = v);
            l
        };
        let logits = [
            token(&[(0, 3.0), (1, 3.0), (8, 0.5), (9, 0.5), (16, 0.5), (17, 0.49), (24, 0.5), (25, 0.48)]),
            token(&[(0, 3.0), (1, 0.0), (8, 0.5), (9, 0.5), (16, 1.5), (17, -2.0), (24, 0.5), (25, -0.8025)]),
        ]
        .concat();
        let bias = vec![0.0f32; e];
        let (mut ids, mut w, mut m) = (gpu.filled(2 * 2, -1i32)?, gpu.filled(2 * 2, nan)?, gpu.filled(2, nan)?);
        gpu.route(&gpu.upload(&logits)?, &gpu.upload(&bias)?, 2, e, &rc, &mut ids, &mut w, &mut m)?;
        let cpu: Vec<f32> = logits.chunks(e).map(|l| route(&rc, l, &bias).margin).collect();
        let c =
            check("route (grouped, a groups' near tie that decides nothing / decides)", &gpu.download(&m)?, &cpu, 1e-5);
        // The case is what it says: the experts' gap on token 0, the groups' on token 1.
        out.push(Check { ok: c.ok && cpu[0] > 0.3 && cpu[1] < 0.01, ..c });
    }

    // A replayed route may repeat an id: rows compare as multisets, as the CPU's sorted rows do.
    let (ids, plain) = (vec![1, 1, 2, 1, 2, 1, 4, 5, 6], vec![1, 2, 3, 2, 1, 1, 6, 4, 5]);
    let mut changed = gpu.filled(3, -1i32)?;
    gpu.bias_changed(&gpu.upload(&ids)?, &gpu.upload(&plain)?, &mut changed, 3, 3)?;
    let cpu = CpuOps.bias_changed(&ids, &plain, 3, 3)?;
    let c = check_ints("bias_changed (repeated ids)", &gpu.download(&changed)?, &cpu);
    out.push(Check { ok: c.ok && cpu == [1, 0, 0], ..c });

    // The causal top-k on every path, against the CPU's: indexer scores of random inputs for 2 x 5
    // new queries after 38 cached keys, coarsened to quarters so ties straddle the cut, one NaN
    // (ranks last); then 9 queries from position 0 with K = 6, so early rows keep every causal
    // key and are padded; then 3 queries after 200 keys with K = 6, coarsened, with a NaN, which
    // the chunked path (chunks of 16) cuts in five rounds; then 40 queries from position 0 with
    // K = 3, whose early rows end chunks before the row does; then 2 queries after 600 keys with
    // K = 300, more slots than a block's threads. Rows compare in order (best first,
    // ties to the lower position; a row kept whole by position), margins exactly.
    let (batch, s, offset, nh, d, topk) = (2, 5, 38, 4, 16, 24);
    let t = offset + s;
    let (q, k, w) = (rng.vec(batch * s * nh * d), rng.vec(batch * t * d), rng.vec(batch * s * nh));
    let mut coarse = CpuOps.index_scores(&q, &k, &w, [batch, s, t, nh, d, offset], (d as f32).powf(-0.5))?;
    coarse.iter_mut().for_each(|v| *v = (*v * 4.0).round() / 4.0);
    coarse[3 * t + 7] = f32::NAN;
    let prefix: Vec<f32> = rng.vec(9 * 9);
    let mut long: Vec<f32> = rng.vec(3 * 203).iter().map(|v| (v * 4.0).round() / 4.0).collect();
    long[203 + 150] = f32::NAN;
    // 40 queries from position 0 with K = 3: chunks of 8 that lie wholly past a row's query.
    let early: Vec<f32> = rng.vec(40 * 40).iter().map(|v| (v * 4.0).round() / 4.0).collect();
    // 2 queries after 600 keys with K = 300: more slots than a block's threads.
    let wide: Vec<f32> = rng.vec(2 * 602);
    let datasets = [
        (&coarse, batch, s, offset, topk),
        (&prefix, 1, 9, 0, 6),
        (&long, 1, 3, 200, 6),
        (&early, 1, 40, 0, 3),
        (&wide, 1, 2, 600, 300),
    ];
    for path in [TopK::Ranked, TopK::Sorted, TopK::Chunked { chunk: 0 }] {
        let name = match path {
            TopK::Chunked { .. } => "topk_causal (Chunked, the smallest chunks K allows)".to_string(),
            _ => format!("topk_causal ({path:?})"),
        };
        let mut worst = Check { name, max_abs: 0.0, ok: true };
        for (scores, batch, s, offset, topk) in datasets {
            let (t, rows) = (offset + s, batch * s);
            let kk = topk.min(t);
            let path = match path {
                TopK::Chunked { .. } => TopK::Chunked { chunk: (2 * (kk + 1)).next_power_of_two() },
                other => other,
            };
            let (mut idx, mut margin) = (gpu.filled(rows * kk, -1i32)?, gpu.filled(rows, nan)?);
            gpu.topk_causal_by(path, &gpu.upload(scores)?, [rows, s, t, offset, kk], &mut idx, &mut margin)?;
            let sel = crate::model::indexer::top_k_causal(scores, batch, s, offset, topk);
            let ids = check_ints("", &gpu.download(&idx)?, &selected_ids(&sel));
            let m = check("", &gpu.download(&margin)?, &sel.margin, 0.0);
            worst.max_abs = worst.max_abs.max(m.max_abs).max(ids.max_abs);
            worst.ok &= m.ok && ids.ok;
        }
        out.push(worst);
    }
    // index_combine over rows of 300 keys (two tiles of a block's 256, the second partial): 3
    // queries at positions 293 .. 295 whose products cover 295 keys (the last query's own key is
    // past them), -inf past each query and past those, from row 1 of the weights into rows 1 .. 3
    // of the scores; row 0 is left as it was.
    let (qc, n, t_eff, keys, first) = (3, 4, 295, 300, 293);
    let (g, wv) = (rng.vec(qc * n * t_eff), rng.vec((1 + qc) * n));
    let mut scores = gpu.filled((1 + qc) * keys, nan)?;
    gpu.index_combine(&gpu.upload(&g)?, &gpu.upload(&wv)?, &mut scores, [qc, n, t_eff, keys], (1, 1), first)?;
    let want: Vec<f32> = (0..qc * keys)
        .map(|at| match (at / keys, at % keys) {
            (i, j) if j > first + i || j >= t_eff => f32::NEG_INFINITY,
            (i, j) => (0..n).map(|h| g[(i * n + h) * t_eff + j].max(0.0) * wv[(1 + i) * n + h]).sum(),
        })
        .collect();
    let got = gpu.download(&scores)?;
    let combined = check("index_combine (300 keys)", &got[keys..], &want, 1e-5);
    out.push(Check { ok: combined.ok && got[..keys].iter().all(|x| x.is_nan()), ..combined });

    // Rows 3 .. 8 of a selection of 9 rows of K = 300 (more slots than a block's threads), the
    // others left as they were.
    let (row0, rows, kk) = (3, 5, 300);
    let (mut idx, mut margin) = (gpu.filled(9 * kk, -1i32)?, gpu.filled(9, -1f32)?);
    gpu.every_key(&mut idx, &mut margin, row0, rows, kk)?;
    let sel = crate::model::indexer::Selection::every_key(1, rows, kk);
    let mut want_idx = vec![-1i32; 9 * kk];
    want_idx[row0 * kk..(row0 + rows) * kk].copy_from_slice(&selected_ids(&sel));
    let mut want_margin = vec![-1f32; 9];
    want_margin[row0..row0 + rows].copy_from_slice(&sel.margin);
    let ids = check_ints("every_key", &gpu.download(&idx)?, &want_idx);
    let m = check("", &gpu.download(&margin)?, &want_margin, 0.0);
    out.push(Check { max_abs: ids.max_abs.max(m.max_abs), ok: ids.ok && m.ok, ..ids });

    // MoE dispatch: gather 9 of 13 rows; combine 13 tokens x 3 choices from 39 packed rows
    // (267 wide: past a block of 256 threads).
    let (tokens, kx, hidden) = (13, 3, 267);
    let x = rng.vec(tokens * hidden);
    let rows: Vec<i32> = vec![12, 0, 5, 5, 7, 3, 11, 1, 9];
    let mut g = gpu.filled(rows.len() * hidden, nan)?;
    gpu.gather_rows(&gpu.upload(&x)?, &gpu.upload(&rows)?, &mut g, rows.len(), hidden)?;
    out.push(check("gather_rows", &gpu.download(&g)?, &CpuOps.gather_rows(&x, &rows, rows.len(), hidden)?, 0.0));
    // A row index past the source's rows, or negative, reads as NaN, not past the buffer.
    let (outside, mut o) = (gpu.upload(&[3i32, 13, -1])?, gpu.filled(3 * hidden, 0f32)?);
    gpu.gather_rows(&gpu.upload(&x)?, &outside, &mut o, 3, hidden)?;
    let o = gpu.download(&o)?;
    let kept = check("gather_rows (rows outside read NaN)", &o[..hidden], &x[3 * hidden..4 * hidden], 0.0);
    out.push(Check { ok: kept.ok && o[hidden..].iter().all(|v| v.is_nan()), ..kept });
    let y = rng.vec(tokens * kx * hidden);
    let ids: Vec<i32> = (0..tokens * kx).map(|i| ((i * 7) % 11) as i32).collect();
    let slot: Vec<i32> = (0..tokens * kx).map(|i| ((i * 5) % (tokens * kx)) as i32).collect();
    let (wts, shared) = (rng.vec(tokens * kx), rng.vec(tokens * hidden));
    let mut c = gpu.filled(tokens * hidden, nan)?;
    let (dy, di, ds, dw, dsh) =
        (gpu.upload(&y)?, gpu.upload(&ids)?, gpu.upload(&slot)?, gpu.upload(&wts)?, gpu.upload(&shared)?);
    gpu.combine(&dy, &di, &ds, &dw, &dsh, &mut c, tokens, kx, hidden)?;
    let cpu = CpuOps.combine(&y, &ids, &slot, &wts, &shared, [tokens, kx, hidden])?;
    out.push(check("combine", &gpu.download(&c)?, &cpu, 1e-6));

    // FP8 block dequantisation with partial edge blocks (300 x 200, blocks 128 x 128): rows 50 ..
    // 200 of the view that starts at stored row 37 (so the rows cross two block boundaries off
    // the view's own block grid), against the whole weight dequantised on the CPU.
    let (fr, fc, row0, start, n) = (300, 200, 37, 50, 150);
    let q: Vec<u8> = (0..fr * fc).map(|i| ((i * 37 + 11) % 256) as u8).collect();
    let q: Vec<u8> = q.into_iter().map(|b| if b & 0x7f == 0x7f { b & 0xf0 } else { b }).collect(); // no NaN codes
    let scale: Vec<f32> = (0..3 * 2).map(|i| 0.5 + i as f32 * 0.25).collect();
    let mut f = gpu.filled(n * fc, nan)?;
    let (view, scale_inv) = (gpu.upload(&q[row0 * fc..])?, gpu.upload(&scale)?);
    gpu.fp8_dequant((&view, &scale_inv), &mut f, [start, n, fc], row0, [128, 128])?;
    let mut cpu: Vec<f32> = q.iter().map(|&b| crate::st::e4m3_to_f32(b)).collect();
    crate::checkpoint::dequantize_blocks(&mut cpu, &[fr, fc], &scale, &[3, 2], [128, 128])
        .map_err(crate::error::Error::Weights)?;
    let cpu = &cpu[(row0 + start) * fc..(row0 + start + n) * fc];
    out.push(check("fp8_dequant (a view's rows)", &gpu.download(&f)?, cpu, 0.0));
    // The same rows straight to bf16: the f32 values rounded, bit for bit.
    let mut b = gpu.filled(n * fc, u16::MAX)?;
    gpu.fp8_dequant((&view, &scale_inv), &mut b, [start, n, fc], row0, [128, 128])?;
    let got: Vec<f32> = gpu.download(&b)?.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect();
    let cpu: Vec<f32> = cpu.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    out.push(check("fp8_dequant_bf16 (a view's rows)", &got, &cpu, 0.0));
    let bits: Vec<u16> = rng.vec(1001).iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
    let mut f = gpu.filled(bits.len(), nan)?;
    gpu.bf16_widen(&gpu.upload(&bits)?, 0, &mut f, bits.len())?;
    let cpu: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
    out.push(check("bf16_widen", &gpu.download(&f)?, &cpu, 0.0));
    // Rounding to bf16, from an offset: ties to even, overflow to infinity, signed zero, NaN.
    let mut v = rng.vec(1003);
    v[3..11].copy_from_slice(&[
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        f32::MAX,
        -0.0,
        f32::INFINITY,
        1e-40,
        -3.5,
        f32::NAN,
    ]);
    let mut b = gpu.filled(v.len() - 3, BF16_POISON)?; // (not NaN: NaN must come out NaN)
    gpu.bf16_round(&gpu.upload(&v)?, 3, &mut b, v.len() - 3)?;
    let widen = |bits: Vec<u16>| -> Vec<f32> { bits.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect() };
    let cpu: Vec<f32> = v[3..].iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    let got = widen(gpu.download(&b)?);
    let nan_kept = got[7].is_nan();
    let (mut got, mut cpu) = (got, cpu);
    (got[7], cpu[7]) = (0.0, 0.0); // NaN == NaN fails the check; compared as "both NaN" above
    let c = check("bf16_round", &got, &cpu, 0.0);
    out.push(Check { ok: c.ok && nan_kept, ..c });
    out.push(split_bf16(gpu, &mut rng)?);
    out.push(attention::masked_softmax_bf16(gpu, &mut rng)?);
    out.push(attention::mma_layouts(gpu));

    gpu.synchronize()?;
    Ok(out)
}

/// The MoE dispatch on the device (`expert_counts`, then `moe_dispatch`) against the host's sort
/// (`dispatch_on_host`): 300 tokens x 8 choices over 64 experts of which 16 get none (2400 pairs,
/// so the kernel's scan runs 10 chunks, the last partial), and an id outside the experts, which
/// both must refuse.
pub fn dispatch(ops: &super::ops::CudaOps) -> Result<Vec<Check>> {
    use crate::device::{dispatch_on_host, Ops};
    let (tokens, k, e) = (300, 8, 64);
    let ids: Vec<i32> = (0..tokens * k).map(|i| ((i * i * 7 + i / 3) % 48) as i32).collect();
    let (counts, slot, rows) = ops.dispatch(&ops.upload_i32(&ids)?, tokens, k, e)?;
    let (cpu_counts, cpu_slot, cpu_rows) = dispatch_on_host(&ids, k, e)?;
    let as_i32 = |c: &[usize]| c.iter().map(|&c| c as i32).collect::<Vec<_>>();
    let mut out = vec![
        check_ints("moe dispatch: group sizes", &as_i32(&counts), &as_i32(&cpu_counts)),
        check_ints("moe dispatch: each pair's packed row", &ops.download_i32(&slot)?, &cpu_slot),
        check_ints("moe dispatch: each packed row's token", &ops.download_i32(&rows)?, &cpu_rows),
    ];
    let mut bad = ids.clone();
    bad[777] = e as i32;
    let refused = ops.dispatch(&ops.upload_i32(&bad)?, tokens, k, e).is_err() && dispatch_on_host(&bad, k, e).is_err();
    out.push(Check { name: "moe dispatch: an id outside the experts is refused".into(), max_abs: 0.0, ok: refused });
    Ok(out)
}

/// `split_bf16` over 7 rows of 3 heads, each segment 200 values of a per-head source from an
/// offset then 100 of a source shared by the heads, as `[hi | lo | hi]`: exactly the rounding of
/// x and of x - hi.
fn split_bf16(gpu: &Gpu, rng: &mut Rng) -> Result<Check> {
    let (rows, heads, parts, lo_parts) = (7, 3, 3, 0b010);
    // [first, row stride, head stride, width]: a block of 256 threads goes round a row of 300
    // values twice.
    let (a_at, b_at) = ([2, 601, 200, 200], [1, 103, 0, 100]);
    let end = |[first, rs, hs, w]: [usize; 4]| first + (rows - 1) * rs + (heads - 1) * hs + w;
    let (a, b) = (rng.vec(end(a_at)), rng.vec(end(b_at)));
    let w = a_at[3] + b_at[3];
    let mut got = gpu.filled(heads * rows * parts * w, u16::MAX)?;
    let split = super::gpu::Split { rows, heads, a: a_at, b: b_at };
    gpu.split_bf16((&gpu.upload(&a)?, &gpu.upload(&b)?), &split, &mut got, (parts, lo_parts))?;
    let round = |x: f32| half::bf16::from_f32(x);
    let mut cpu = Vec::with_capacity(heads * rows * parts * w);
    for h in 0..heads {
        for r in 0..rows {
            let x = |c: usize| match c < a_at[3] {
                true => a[a_at[0] + r * a_at[1] + h * a_at[2] + c],
                false => b[b_at[0] + r * b_at[1] + h * b_at[2] + c - a_at[3]],
            };
            for p in 0..parts {
                cpu.extend((0..w).map(|c| match (lo_parts >> p) & 1 {
                    1 => round(x(c) - round(x(c)).to_f32()).to_f32(),
                    _ => round(x(c)).to_f32(),
                }));
            }
        }
    }
    let got: Vec<f32> = gpu.download(&got)?.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect();
    Ok(check("split_bf16", &got, &cpu, 0.0))
}

/// The products through cuBLAS (row-major on a column-major library) against the CPU's, with an
/// f32, a bf16 and a block-FP8 weight (a view starting 3 rows into the stored one, so off its
/// block grid), on row ranges of packed buffers as the expert GEMMs use them, in `ops`'
/// precision. In bf16 the reference multiplies the bf16-rounded activations and weights (what
/// the tensor cores multiply), in f32.
pub fn products(ops: &super::ops::CudaOps) -> Result<Vec<Check>> {
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let mut out = Vec::new();
    let bf16 = ops.precision() == crate::device::Precision::Bf16;
    let emulated = ops.gpu.stream().is_none();
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
    // The last shape's decoded weights (17.5 M values) take two blocks of the 16 M scratch.
    for (m, n, k, x_row0, y_row0, block) in [(37, 29, 53, 5, 3, [16, 32]), (3, 2500, 7000, 1, 2, [128, 128])] {
        let x = rng.vec((x_row0 + m) * k);
        let w = rng.vec(n * k);
        let bits: Vec<u16> = w.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
        let codes: Vec<u8> = (0..(n + 3) * k).map(|_| (rng.f32().to_bits() >> 8) as u8).collect();
        let codes: Vec<u8> = codes.into_iter().map(|b| if b & 0x7f == 0x7f { b & 0xf0 } else { b }).collect(); // no NaN
        let grid = (n + 3).div_ceil(block[0]) * k.div_ceil(block[1]);
        let scale: Vec<f32> = (0..grid).map(|_| 0.01 + rng.f32().abs() * 0.02).collect();
        let fp8 = crate::model::fp8::Fp8Weight::from_codes(&codes, [n + 3, k], scale, block)?
            .rows(3, n)
            .ok_or_else(|| crate::error::Error::Device("fp8 view".into()))?;
        let fp8_wide = fp8.to_f32();
        let (cpu_x, cpu_w) = if bf16 { (round(&x), round(&w)) } else { (x.clone(), w.clone()) };
        let cpu_fp8 = if bf16 { round(&fp8_wide) } else { fp8_wide };
        // Stacked weights (an MLP's gate and up): f32 over bf16 rows, joined into one weight in
        // bf16 mode and kept as two parts in f32 mode; FP8 over bf16 rows, always two parts.
        let half = n / 2;
        let top_fp8 = fp8.rows(0, half).ok_or_else(|| crate::error::Error::Device("fp8 view".into()))?;
        let joined = [HostWeight::F32(&w[..half * k]), HostWeight::Bf16(&bits[half * k..])];
        let parts = [HostWeight::Fp8(&top_fp8), HostWeight::Bf16(&bits[half * k..])];
        let stacked_cpu = |parts: &[HostWeight]| {
            let v = HostWeight::Stacked(parts).to_f32();
            if bf16 {
                round(&v)
            } else {
                v
            }
        };
        let (cpu_joined, cpu_parts) = (stacked_cpu(&joined), stacked_cpu(&parts));
        let size = if n == 29 { "" } else { ", large" };
        // Two f32 products of 7000 terms summed in other orders (cuBLAS's blocking, the CPU's)
        // part by about eps x sqrt(k) x the partial sums (~30 here): the emulation's exact sums
        // are already 2.5e-5 from the CPU's, and a GPU's own order could take an output near 0
        // to the small shape's whole 1e-4. A layout bug is off by the outputs' size.
        let tol = if n == 29 { 1e-4 } else { 5e-4 };
        let mode = if bf16 { "gemm_rows bf16 mode" } else { "gemm_rows" };
        for (kind, weight, cpu_weight) in [
            ("f32", HostWeight::F32(&w), HostWeight::F32(&cpu_w)),
            ("bf16", HostWeight::Bf16(&bits), HostWeight::Bf16(&bits)),
            ("fp8", HostWeight::Fp8(&fp8), HostWeight::F32(&cpu_fp8)),
            ("f32 over bf16", HostWeight::Stacked(&joined), HostWeight::F32(&cpu_joined)),
            ("fp8 over bf16", HostWeight::Stacked(&parts), HostWeight::F32(&cpu_parts)),
        ]
        .into_iter()
        // Large stacked parts fit one scratch block anyway; the large FP8 weight (17.5 M codes
        // decoded thread by thread) would take the emulation minutes, and its block loop is the
        // bf16 weight's, so only a GPU runs it.
        .filter(|(kind, ..)| n == 29 || !(kind.contains(" over ") || *kind == "fp8" && emulated))
        {
            let cpu_w = CpuOps.upload_weight(cpu_weight, n, k)?;
            let mut cpu_y = vec![f32::NAN; (y_row0 + m) * n];
            CpuOps.gemm_rows(&cpu_x, x_row0, &cpu_w, &mut cpu_y, y_row0, [m, n, k], 0.5)?;
            let dw = ops.upload_weight(weight, n, k)?;
            let mut dy = ops.gpu.filled((y_row0 + m) * n, f32::NAN)?;
            ops.gemm_rows(&ops.upload(&x)?, x_row0, &dw, &mut dy, y_row0, [m, n, k], 0.5)?;
            let gpu_y = ops.download(&dy)?;
            // Rows outside the range must be left alone (NaN on both sides).
            let untouched = gpu_y[..y_row0 * n].iter().all(|v| v.is_nan());
            let c = check(format!("{mode} ({kind} weight{size})"), &gpu_y[y_row0 * n..], &cpu_y[y_row0 * n..], tol);
            out.push(Check { ok: c.ok && untouched, ..c });
        }
        if n == 29 {
            // The expert GEMMs' grouped form: three weights over row ranges of 24 rows, one
            // range empty; rows no group covers must stay NaN.
            let rows = 24;
            let x = rng.vec(rows * k);
            let weights = [HostWeight::Bf16(&bits), HostWeight::Fp8(&fp8), HostWeight::Stacked(&joined)];
            let cpu_weights = [HostWeight::Bf16(&bits), HostWeight::F32(&cpu_fp8), HostWeight::F32(&cpu_joined)];
            let spans = [(0, 2, 7), (1, 9, 0), (1, 10, 4), (2, 14, 8)];
            let device: Vec<_> = weights.iter().map(|w| ops.upload_weight(*w, n, k)).collect::<Result<_>>()?;
            let host: Vec<_> = cpu_weights.iter().map(|w| CpuOps.upload_weight(*w, n, k)).collect::<Result<_>>()?;
            let groups: Vec<_> = spans.iter().map(|&(w, start, count)| (&device[w], start, count)).collect();
            // Then the same rows gathered from 7 tokens, as the routed experts' first product
            // takes them (packed row i = token gather[i], tokens repeated and out of order).
            let tokens = rng.vec(7 * k);
            let gather: Vec<i32> = (0..rows).map(|i| ((i * 5 + 3) % 7) as i32).collect();
            let gathered = CpuOps.gather_rows(&tokens, &gather, rows, k)?;
            let (dtokens, dgather) = (ops.upload(&tokens)?, ops.gpu.upload(&gather)?);
            let sources = [
                ("grouped, 3 weights", &x, (ops.upload(&x)?, None)),
                ("grouped, 3 weights, rows gathered", &gathered, (dtokens, Some(&dgather))),
            ];
            for (name, x, (dx, dgather)) in sources {
                let mut dy = ops.gpu.filled(rows * n, f32::NAN)?;
                ops.gemm_groups((&dx, dgather), &groups, &mut dy, [n, k])?;
                let cpu_x = if bf16 { round(x) } else { x.clone() };
                let mut cpu_y = vec![f32::NAN; rows * n];
                for &(w, start, count) in &spans {
                    CpuOps.gemm_rows(&cpu_x, start, &host[w], &mut cpu_y, start, [count, n, k], 1.0)?;
                }
                let gpu_y = ops.download(&dy)?;
                let same_nan = gpu_y.iter().zip(&cpu_y).all(|(a, b)| a.is_nan() == b.is_nan());
                let covered = |v: &[f32]| -> Vec<f32> { v.iter().copied().filter(|x| !x.is_nan()).collect() };
                let c = check(format!("{mode} ({name})"), &covered(&gpu_y), &covered(&cpu_y), 1e-4);
                out.push(Check { ok: c.ok && same_nan, ..c });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel missing from the launched set is named; with every kernel launched, none is.
    #[test]
    fn a_kernel_no_check_launched_is_named() {
        let mut launched: std::collections::BTreeSet<&str> = kernel_names().collect();
        assert!(unlaunched(&launched).is_empty());
        launched.remove("columns");
        assert_eq!(unlaunched(&launched), ["columns"]);
    }

    /// A route that hangs on two scores 1e-7 apart is near-tied; one whose cut is clear is not.
    #[test]
    fn near_ties_at_the_cut_and_between_groups_are_recognised() {
        let rc = RouterConfig { top_k: 2, n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 1.0 };
        let bias = [0.0f32; 4];
        assert!(!near_tie(&rc, &[3.0, 2.0, 1.0, 0.0], &bias));
        // Experts 1 and 2 (the 2nd and 3rd) differ by 1e-7 once biased, or not at all.
        assert!(near_tie(&rc, &[3.0, 2.0, 2.0, 0.0], &[0.0, 0.0, 1e-7, 0.0]));
        assert!(near_tie(&rc, &[3.0, 2.0, 2.0, 0.0], &bias), "an exact tie at the cut");
        // Grouped: two groups of 2 whose top-2 sums tie; the experts themselves are apart.
        let grouped = RouterConfig { n_group: 2, topk_group: 1, ..rc };
        assert!(near_tie(&grouped, &[3.0, -1.0, -1.0, 3.0], &bias));
        assert!(!near_tie(&grouped, &[3.0, 1.0, -2.0, -3.0], &bias));
    }
}
