//! Many-row products `x W^T` against a bf16 weight, on AVX-512, from a copy of the weight's bf16
//! values reordered once into panels (2 bytes a weight, where an f32 copy takes 4).
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
//! Measured against candle's f32 matmul on the `W^T` copy, at this model's shapes on the project's
//! 2-core AVX-512 VM: docs/performance.md.

use rayon::prelude::*;

use super::gemv::Bf16Weight;

/// Outputs per panel (two vectors of 16 f32).
const NR: usize = 32;
/// Token rows per kernel call (24 accumulators + 2 weight vectors + a broadcast of 32 registers).
const MR: usize = 12;
/// Input positions per pass over the panels: a panel's slice (`KC x 32` bf16, 32 KB) and the
/// tokens' slice (`12 x KC` f32, 24 KB) stay in L1/L2 while every token block reuses them.
const KC: usize = 512;
/// Token rows per pass over the panels: their `MC x KC` f32 slice (480 KB) stays in L2 while
/// every panel reads it.
const MC: usize = 240;

/// A bf16 weight `[n, k]` in panels for [`matmul`]. Only made where the CPU has AVX-512F.
pub struct Panels {
    data: Vec<u16>, // [ceil(n / 32)][k][32]
    pub n: usize,
    pub k: usize,
}

impl Panels {
    /// The weight's values in panels (the last one padded with zeros), or None when this CPU has
    /// no AVX-512F.
    pub fn new(w: &Bf16Weight) -> Option<Self> {
        if !available() {
            return None;
        }
        let (n, k, bits) = (w.rows, w.cols, w.bits());
        let mut data = vec![0u16; n.div_ceil(NR) * k * NR];
        if k > 0 {
            data.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| {
                for c in 0..NR.min(n - p * NR) {
                    let slot = if c < 16 { 2 * c } else { 2 * (c - 16) + 1 };
                    let row = &bits[(p * NR + c) * k..(p * NR + c + 1) * k];
                    for (to, &v) in panel[slot..].iter_mut().step_by(NR).zip(row) {
                        *to = v;
                    }
                }
            });
        }
        Some(Panels { data, n, k })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// `x W^T`: x `[m, k]` row-major -> `[m, n]` row-major, on rayon's pool (a task per panel).
pub fn matmul(x: &[f32], m: usize, w: &Panels) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "bf16_gemm::matmul: x has {} values, not {m} x {k}", x.len());
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let out = Out(y.as_mut_ptr());
    for (k0, m0) in (0..k).step_by(KC).flat_map(|k0| (0..m).step_by(MC).map(move |m0| (k0, m0))) {
        let kc = KC.min(k - k0);
        (0..n.div_ceil(NR)).into_par_iter().for_each(|p| {
            let out = &out;
            let cols = NR.min(n - p * NR);
            let panel = &w.data[(p * k + k0) * NR..(p * k + k0 + kc) * NR];
            for i0 in (m0..(m0 + MC).min(m)).step_by(MR) {
                let rows = MR.min(m - i0);
                // (No `Panels` exist off x86_64.)
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Panels` exist only where AVX-512F does. x holds rows i0 .. i0 + rows of
                // k values and the panel kc x 32; the block writes rows i0 .. i0 + rows of y, in
                // columns 32 p .. 32 p + cols < n, which no other task writes (one task per panel,
                // and the passes over k run one after another).
                unsafe {
                    let y = out.0.add(i0 * n + p * NR);
                    block(&x[i0 * k + k0..], rows, k, panel, kc, y, n, k0 > 0, cols);
                }
            }
        });
    }
    y
}

/// The output's base pointer, shared by the tasks, which write disjoint columns.
struct Out(*mut f32);
// SAFETY: see `matmul`: every task writes its own columns, and none reads another's.
unsafe impl Sync for Out {}

/// The kernel for `rows` (1 ..= 12) token rows.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(x: &[f32], rows: usize, k: usize, w: &[u16], kc: usize, y: *mut f32, n: usize, add: bool, cols: usize) {
    let f = match rows {
        12 => x86::kernel::<12>,
        11 => x86::kernel::<11>,
        10 => x86::kernel::<10>,
        9 => x86::kernel::<9>,
        8 => x86::kernel::<8>,
        7 => x86::kernel::<7>,
        6 => x86::kernel::<6>,
        5 => x86::kernel::<5>,
        4 => x86::kernel::<4>,
        3 => x86::kernel::<3>,
        2 => x86::kernel::<2>,
        _ => x86::kernel::<1>,
    };
    f(x, k, w, kc, y, n, add, cols)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `y[r][c] (+)= sum_kk x[r][kk] w[kk][c]` for `R` rows and the panel's first `cols`
    /// outputs; x rows are `k` apart, y rows `n` apart.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel<const R: usize>(
        x: &[f32],
        k: usize,
        w: &[u16],
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
        if add {
            for (r, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_maskz_loadu_ps(m0, y.add(r * n));
                a[1] = _mm512_maskz_loadu_ps(m1, y.add(r * n + 16));
            }
        }
        let (x, w) = (x.as_ptr(), w.as_ptr());
        for kk in 0..kc {
            let v = _mm512_loadu_si512(w.add(kk * super::NR).cast());
            let lo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)); // outputs 0 .. 16
            let hi = _mm512_castsi512_ps(_mm512_and_si512(v, high)); // outputs 16 .. 32
            for (r, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*x.add(r * k + kk));
                a[0] = _mm512_fmadd_ps(b, lo, a[0]);
                a[1] = _mm512_fmadd_ps(b, hi, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(y.add(r * n), m0, a[0]);
            _mm512_mask_storeu_ps(y.add(r * n + 16), m1, a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemv::widen;
    use super::*;

    /// Sizes off every block (rows, panels, KC), against an f64 sum of the same values.
    #[test]
    fn panels_multiply_as_the_plain_sum() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F (the f32 path is used instead)");
            return;
        }
        for (m, n, k) in [(13, 45, 77), (1, 32, 600), (25, 1, 1030), (12, 64, 512), (3, 0, 5), (0, 7, 5)] {
            let w = Bf16Weight::test_matrix(n, k);
            let panels = Panels::new(&w).unwrap();
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
            let y = matmul(&x, m, &panels);
            assert_eq!(y.len(), m * n);
            let bits = w.bits();
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| widen(bits[j * k + c]) as f64 * x[i * k + c] as f64).sum();
                    approx::assert_abs_diff_eq!(y[i * n + j] as f64, want, epsilon = 1e-3);
                }
            }
        }
    }
}
