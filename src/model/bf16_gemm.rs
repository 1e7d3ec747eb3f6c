//! Many-row products `x W^T` against a bf16 or block-FP8 weight, on AVX-512 or AVX2 with FMA, from
//! a copy of the weight's values as bf16, reordered once into panels (2 bytes a weight, where an
//! f32 copy takes 4). An e4m3 code is exactly a bf16 value; a block-FP8 panel keeps its scales
//! beside it and the kernel multiplies each widened code by its block's scale, the f32 product the
//! reference's dequantisation computes (`Fp8Weight::to_f32`), so the weights multiplied are the
//! same f32 values on either path.
//!
//! The prefill multiplies every weight by 100s of token rows, so its speed is arithmetic, not
//! streaming (that is `gemv.rs`'s case). The kernel is an outer product: for each input position
//! `kk`, 32 outputs' weights are widened to f32 in registers and multiplied by 12 tokens' values,
//! into 24 f32 accumulators. The values are the f32 copy's exactly (bf16 -> f32 is exact) and the
//! accumulation is f32, in ascending `kk`; only the summation order differs from other GEMMs.
//!
//! Panel layout: panel `p` holds outputs `32 p .. 32 p + 32` as `[in][32]`, interleaved so that a
//! 32-bit lane `j` holds outputs `32 p + j` (low half) and `32 p + 16 + j` (high half). A shift
//! and a mask then widen one 64-byte load into the two 16-output vectors, with no shuffle.
//!
//! CPUs with AVX2 but no AVX-512F (most desktop Intel parts, AMD before Zen 4) run the same panels
//! through an 8-wide kernel: 16 registers hold 6 tokens x 16 outputs, so it makes two calls per
//! panel, each widening one 32-byte half of a panel's row (lanes `8 h .. 8 h + 8`: outputs
//! `8 h ..` and `16 + 8 h ..`).
//!
//! Measured against candle's f32 matmul on the `W^T` copy, at this model's shapes on the project's
//! 2-core AVX-512 VM: docs/performance.md. Where the CPU has AMX, `amx.rs` takes these products
//! (this kernel stays for other CPUs and for FP8 blocks the tiles do not fit).

// Off x86_64 no kernel exists (`available` is false), and what only feeds it goes unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use rayon::prelude::*;

use super::fp8::{codes_as_bf16, Fp8Weight};
use super::gemv::Bf16Weight;
use super::{isa, Isa};

/// Outputs per panel (two vectors of 16 f32).
const NR: usize = 32;
/// Token rows per kernel call (24 accumulators + 2 weight vectors + a broadcast of 32 registers).
const MR: usize = 12;
/// The AVX2 kernel's: 12 accumulators, 2 weight vectors, a broadcast and the widening mask fill
/// the 16 registers (FP8 panels' scale is read from memory).
const MR_AVX2: usize = 6;
/// Input positions per pass over the panels: a panel's slice (`KC x 32` bf16, 64 KB) stays in
/// L2 while every token block of the pass reuses it. (512, 1024, 2048 and 8192 measured: 1024
/// and up 5-10% ahead of 512 at 128 rows and more, docs/performance.md.)
const KC: usize = 1024;
/// Token rows per pass, all of its passes over k in a row: their `MC x KC` f32 slice (960 KB)
/// stays in L2 while every panel reads it, and their outputs in L3 between passes.
const MC: usize = 240;
const _: () =
    assert!(MC.is_multiple_of(MR) && MC.is_multiple_of(MR_AVX2), "a token block must not cross a pass's rows");

/// A weight `[n, k]` in panels for [`matmul`]. Only made where a kernel runs ([`available`]).
pub struct Panels {
    data: Vec<u16>, // [ceil(n / 32)][k][32]
    n: usize,
    k: usize,
    /// Block-FP8 weights: each panel's scale for each block of `bc` inputs,
    /// `[ceil(n / 32)][ceil(k / bc)]`, and `bc`.
    scale: Option<(Vec<f32>, usize)>,
}

impl Panels {
    /// A bf16 weight's values in panels, or None when no kernel runs on this CPU.
    pub fn new(w: &Bf16Weight) -> Option<Self> {
        available().then(|| Panels::of(w))
    }

    fn of(w: &Bf16Weight) -> Self {
        Panels { data: interleave(w.bits(), w.rows, w.cols, |b| b), n: w.rows, k: w.cols, scale: None }
    }

    /// A block-FP8 weight's codes (as bf16) in panels with its scales, or None when no kernel
    /// runs on this CPU or a panel's 32 outputs would span two blocks of rows (blocks of rows, or a
    /// view's first row, not a multiple of 32; GLM-5's blocks are 128 x 128).
    pub fn from_fp8(w: &Fp8Weight) -> Option<Self> {
        available().then(|| Panels::of_fp8(w)).flatten()
    }

    fn of_fp8(w: &Fp8Weight) -> Option<Self> {
        let ([n, k], [_, bc]) = (w.shape(), w.block());
        let scale = w.scales_by_rows(NR)?;
        let bf16 = codes_as_bf16();
        Some(Panels { data: interleave(w.bytes(), n, k, |q| bf16[q as usize]), n, k, scale: Some((scale, bc)) })
    }

    /// `[n, k]`: outputs, inputs.
    pub fn shape(&self) -> [usize; 2] {
        [self.n, self.k]
    }
}

/// `w` `[n, k]` row-major, each value mapped by `f` to bf16 bits, in panels (the last one padded
/// with zeros). A panel is filled `TILE` inputs at a time, each of its rows read in a run, so the
/// 32-way interleaved writes land in 4 KB that stays in L1 (a whole row at a time rewrote each
/// of the panel's lines once per output: 0.090 s against 0.060 s for a 16384 x 6144 weight on
/// the project's 2-core VM; tiles of 16 to 128 inputs measured alike).
fn interleave<T: Copy + Sync>(w: &[T], n: usize, k: usize, f: impl Fn(T) -> u16 + Sync) -> Vec<u16> {
    const TILE: usize = 64;
    let mut data = vec![0u16; n.div_ceil(NR) * k * NR];
    if k > 0 {
        data.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| {
            for k0 in (0..k).step_by(TILE) {
                let tile = &mut panel[k0 * NR..(k0 + TILE).min(k) * NR];
                for c in 0..NR.min(n - p * NR) {
                    let slot = if c < 16 { 2 * c } else { 2 * (c - 16) + 1 };
                    let row = &w[(p * NR + c) * k + k0..(p * NR + c + 1) * k];
                    for (to, &v) in tile[slot..].iter_mut().step_by(NR).zip(row) {
                        *to = f(v);
                    }
                }
            }
        });
    }
    data
}

/// Whether this CPU runs a kernel (`model::isa`).
pub fn available() -> bool {
    isa().is_some()
}

/// Whether block-FP8 weights quantised in blocks of `br` rows fit the panels (a panel's 32
/// outputs must share a block of rows).
pub fn takes_fp8_rows(br: usize) -> bool {
    br.is_multiple_of(NR)
}

/// `x W^T`: x `[m, k]` row-major -> `[m, n]` row-major, on rayon's pool (a task per panel).
pub fn matmul(x: &[f32], m: usize, w: &Panels) -> Vec<f32> {
    // (`Panels` exist only where `isa` is Some.)
    matmul_on(isa(), x, m, w)
}

/// [`matmul`] on the given kernel (its tests run both where the CPU has both).
fn matmul_on(isa: Option<Isa>, x: &[f32], m: usize, w: &Panels) -> Vec<f32> {
    let [n, k] = w.shape();
    assert_eq!(x.len(), m * k, "bf16_gemm::matmul: x has {} values, not {m} x {k}", x.len());
    let mut y = vec![0f32; m * n];
    let Some(isa) = isa.filter(|_| m > 0 && n > 0) else { return y };
    let mr = if isa == Isa::Avx512 { MR } else { MR_AVX2 };
    let out = Out(y.as_mut_ptr());
    for (m0, k0) in (0..m).step_by(MC).flat_map(|m0| (0..k).step_by(KC).map(move |k0| (m0, k0))) {
        let kc = KC.min(k - k0);
        (0..n.div_ceil(NR)).into_par_iter().for_each(|p| {
            let out = &out;
            let cols = NR.min(n - p * NR);
            let panel = &w.data[(p * k + k0) * NR..(p * k + k0 + kc) * NR];
            let scale = w.scale.as_ref().map(|(s, bc)| {
                let blocks = k.div_ceil(*bc);
                Scale { per_block: &s[p * blocks..(p + 1) * blocks], bc: *bc, k0 }
            });
            let m1 = (m0 + MC).min(m); // this pass's token rows: m0 .. m1
            for i0 in (m0..m1).step_by(mr) {
                let rows = mr.min(m1 - i0);
                // (No `Panels` exist off x86_64.)
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is a kernel this CPU runs. x holds rows i0 .. i0 + rows of k
                // values and the panel kc x 32; the block writes rows i0 .. i0 + rows of y, in
                // columns 32 p .. 32 p + cols <= n, which no other task writes (one task per panel,
                // and the passes over k run one after another).
                unsafe {
                    let y = out.0.add(i0 * n + p * NR);
                    block(isa, &x[i0 * k + k0..], rows, k, (panel, scale), kc, y, n, k0 > 0, cols);
                }
            }
        });
    }
    y
}

/// The output's base pointer, shared by the tasks of a product (here and in `amx`), which write
/// disjoint columns.
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: see `matmul` (and `amx::matmul`): every task writes its own columns, and none reads
// another's.
unsafe impl Sync for Out {}

/// A block-FP8 panel's scales: `per_block[b]` multiplies inputs `b * bc .. (b + 1) * bc`; the
/// kernel's slice starts at input `k0`.
#[derive(Clone, Copy)]
struct Scale<'a> {
    per_block: &'a [f32],
    bc: usize,
    k0: usize,
}

/// The kernel for `rows` token rows (1 ..= 12 on AVX-512, 1 ..= 6 on AVX2), with or without
/// scales; on AVX2 once for each half of the panel's outputs that holds any of its `cols`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    (w, scale): (&[u16], Option<Scale>),
    kc: usize,
    y: *mut f32,
    n: usize,
    add: bool,
    cols: usize,
) {
    macro_rules! by_rows {
        ($kernel:ident, $scaled:literal, $($r:literal)+) => {
            match rows {
                $($r => x86::$kernel::<$r, $scaled>,)+
                _ => x86::$kernel::<1, $scaled>,
            }
        };
    }
    match (isa, scale) {
        (Isa::Avx512, None) => by_rows!(kernel, false, 12 11 10 9 8 7 6 5 4 3 2)(x, k, w, None, kc, y, n, add, cols),
        (Isa::Avx512, Some(s)) => {
            by_rows!(kernel, true, 12 11 10 9 8 7 6 5 4 3 2)(x, k, w, Some(s), kc, y, n, add, cols)
        }
        (Isa::Avx2, scale) => {
            let kernel = match scale {
                None => by_rows!(kernel_avx2, false, 6 5 4 3 2),
                Some(_) => by_rows!(kernel_avx2, true, 6 5 4 3 2),
            };
            for half in (0..2).filter(|h| cols > 8 * h) {
                kernel(x, k, w, scale, kc, y, n, add, cols, half);
            }
        }
    }
}

/// Where the inputs from `from` on (of a pass's `kc`, starting at input `k0`) stop sharing one
/// scale, and that scale (all of them, and 1, when unscaled).
#[inline(always)]
fn scale_run(scale: Option<Scale>, from: usize, kc: usize) -> (usize, f32) {
    match scale {
        Some(s) => {
            let b = (s.k0 + from) / s.bc;
            (kc.min((b + 1) * s.bc - s.k0), s.per_block[b])
        }
        None => (kc, 1.0),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `y[r][c] (+)= sum_kk x[r][kk] w[kk][c]` (each `w` times its block's scale when `S`) for
    /// `R` rows and the panel's first `cols` outputs; x rows are `k` apart, y rows `n` apart.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel<const R: usize, const S: bool>(
        x: &[f32],
        k: usize,
        w: &[u16],
        scale: Option<super::Scale>,
        kc: usize,
        y: *mut f32,
        n: usize,
        add: bool,
        cols: usize,
    ) {
        debug_assert!(x.len() >= (R - 1) * k + kc && w.len() >= kc * super::NR && cols <= super::NR);
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let lanes = |c: usize| if c >= 16 { 0xFFFFu16 } else { ((1u32 << c) - 1) as u16 };
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // The high half only where the panel has outputs past 16: `y.add` must stay inside y.
        if add {
            for (r, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_maskz_loadu_ps(m0, y.add(r * n));
                if m1 != 0 {
                    a[1] = _mm512_maskz_loadu_ps(m1, y.add(r * n + 16));
                }
            }
        }
        let (x, w) = (x.as_ptr(), w.as_ptr());
        let mut from = 0;
        while from < kc {
            // Inputs from .. to share one scale (all of them when unscaled).
            let (to, sv) = super::scale_run(if S { scale } else { None }, from, kc);
            let sv = _mm512_set1_ps(sv);
            for kk in from..to {
                let v = _mm512_loadu_si512(w.add(kk * super::NR).cast());
                let mut lo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)); // outputs 0 .. 16
                let mut hi = _mm512_castsi512_ps(_mm512_and_si512(v, high)); // outputs 16 .. 32
                if S {
                    (lo, hi) = (_mm512_mul_ps(lo, sv), _mm512_mul_ps(hi, sv));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*x.add(r * k + kk));
                    a[0] = _mm512_fmadd_ps(b, lo, a[0]);
                    a[1] = _mm512_fmadd_ps(b, hi, a[1]);
                }
            }
            from = to;
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(y.add(r * n), m0, a[0]);
            if m1 != 0 {
                _mm512_mask_storeu_ps(y.add(r * n + 16), m1, a[1]);
            }
        }
    }

    /// [`kernel`] on AVX2 for `R` (1 ..= 6) rows and one half of the panel's outputs: lanes
    /// `8 half .. 8 half + 8` of each row, outputs `8 half ..` (low) and `16 + 8 half ..` (high),
    /// of which the first `cols` of the panel's 32 exist.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel_avx2<const R: usize, const S: bool>(
        x: &[f32],
        k: usize,
        w: &[u16],
        scale: Option<super::Scale>,
        kc: usize,
        y: *mut f32,
        n: usize,
        add: bool,
        cols: usize,
        half: usize,
    ) {
        debug_assert!(x.len() >= (R - 1) * k + kc && w.len() >= kc * super::NR && cols <= super::NR && half < 2);
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        // How many of each vector's 8 outputs exist, and the masks of those lanes.
        let (c0, c1) = (cols.saturating_sub(8 * half).min(8), cols.saturating_sub(16 + 8 * half).min(8));
        let lanes =
            |c: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(c as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        let (m0, m1) = (lanes(c0), lanes(c1));
        let (y0, y1) = (8 * half, 16 + 8 * half); // the vectors' first output columns
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // A vector's pointer only where it has outputs: `y.add` must stay inside y.
        if add {
            for (r, a) in acc.iter_mut().enumerate() {
                if c0 != 0 {
                    a[0] = _mm256_maskload_ps(y.add(r * n + y0), m0);
                }
                if c1 != 0 {
                    a[1] = _mm256_maskload_ps(y.add(r * n + y1), m1);
                }
            }
        }
        let (x, w) = (x.as_ptr(), w.as_ptr().add(16 * half));
        let mut from = 0;
        while from < kc {
            let (to, sv) = super::scale_run(if S { scale } else { None }, from, kc);
            let sv = _mm256_set1_ps(sv);
            for kk in from..to {
                let v = _mm256_loadu_si256(w.add(kk * super::NR).cast());
                let mut lo = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                let mut hi = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                if S {
                    (lo, hi) = (_mm256_mul_ps(lo, sv), _mm256_mul_ps(hi, sv));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let b = _mm256_set1_ps(*x.add(r * k + kk));
                    a[0] = _mm256_fmadd_ps(b, lo, a[0]);
                    a[1] = _mm256_fmadd_ps(b, hi, a[1]);
                }
            }
            from = to;
        }
        for (r, a) in acc.iter().enumerate() {
            if c0 != 0 {
                _mm256_maskstore_ps(y.add(r * n + y0), m0, a[0]);
            }
            if c1 != 0 {
                _mm256_maskstore_ps(y.add(r * n + y1), m1, a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemv::widen;
    use super::*;

    /// Sizes off every block (rows of either kernel, panels and their halves, KC), against an
    /// f64 sum of the same values, on each kernel.
    #[test]
    fn panels_multiply_as_the_plain_sum() {
        // (493 rows: three passes of 240, the last partial; 49 outputs: a panel's high half partial;
        // for the AVX2 kernel's halves, 45 outputs: the second half's low vector partial, 59: its
        // high one, 7: no second half.)
        for isa in crate::model::kernels_on_this_cpu() {
            for (m, n, k) in [
                (13, 45, 77),
                (1, 32, 600),
                (25, 1, 1030),
                (12, 64, 512),
                (493, 49, 1030),
                (7, 7, 9),
                (8, 59, 33),
                (5, 7, 0),
                (3, 0, 5),
                (0, 7, 5),
            ] {
                let w = Bf16Weight::test_matrix(n, k);
                let panels = Panels::of(&w);
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
                let y = matmul_on(Some(isa), &x, m, &panels);
                assert_eq!(y.len(), m * n);
                let bits = w.bits();
                let wide: Vec<f32> = bits.iter().map(|&b| widen(b)).collect();
                assert_matches_sum(&y, &x, &wide, (m, n, k), isa);
            }
        }
    }

    /// Block-FP8: a view starting 32 rows into the stored weight (so on a panel's boundary but
    /// not a block's), blocks of 64 x 100 (so a block of inputs crosses the kernel's pass at 512
    /// and the last is partial), 70 outputs (a partial panel); against the f32 dequantisation.
    /// Blocks of rows that a panel would straddle are refused (the f32 path takes those).
    #[test]
    fn fp8_panels_multiply_as_the_dequantised_weight() {
        let (rows, k, block) = (128, 600, [64, 100]);
        let codes: Vec<u8> = (0..rows * k).map(|i| ((i * 37 + 11) % 256) as u8 & 0xf7).collect(); // no NaN codes
        let scale: Vec<f32> = (0..2 * 6).map(|i| 0.25 + i as f32 * 0.125).collect();
        let stored = Fp8Weight::from_codes(&codes, [rows, k], scale, block).unwrap();
        let view = stored.rows(32, 70).unwrap();
        let panels = Panels::of_fp8(&view).unwrap();
        let m = 13;
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        for isa in crate::model::kernels_on_this_cpu() {
            assert_matches_sum(&matmul_on(Some(isa), &x, m, &panels), &x, &view.to_f32(), (m, 70, k), isa);
        }
        let straddled = Fp8Weight::from_codes(&codes, [rows, k], vec![1.0; 3 * 5], [48, 128]).unwrap();
        assert!(Panels::of_fp8(&straddled).is_none());
    }

    /// y [m, n] against the f64 sum of x [m, k] times w [n, k]^T.
    fn assert_matches_sum(y: &[f32], x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize), isa: Isa) {
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|c| w[j * k + c] as f64 * x[i * k + c] as f64).sum();
                let got = y[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                    "{isa:?} [{m}, {n}, {k}] at ({i}, {j}): {got} vs {want}"
                );
            }
        }
    }
}
