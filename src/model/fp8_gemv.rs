//! Few-row products against block-FP8 weights read straight from the memory-mapped checkpoint:
//! `gemv.rs`'s decode products for GLM-5-FP8, streaming 1 byte a weight.
//!
//! Each 16 e4m3 codes become f32 in registers: placed in f16 bit positions (sign, then the 4
//! exponent and 3 mantissa bits shifted under f16's 5-bit exponent), converted by `vcvtph2ps`,
//! and multiplied by their block's scale times 2^8: the 2^8 makes up the two formats' exponent
//! biases (15 and 7) for normal and subnormal codes alike, and is exact, so the one rounding
//! leaves `e4m3(q) * scale`, the f32 product the reference's dequantisation computes
//! (`Fp8Weight::to_f32`). NaN codes (`S.1111.111`) are set to NaN. Accumulation is f32.
//!
//! AVX-512F, or AVX2 with F16C 8 codes at a time, and for scale blocks a multiple of 16 inputs
//! wide (GLM-5's are 128); other weights take the panel kernel (`bf16_gemm`), which handles any.
//!
//! With AVX-512BW and blocks a multiple of 32 wide, 32 codes at a time go through a table
//! instead (`load32`): a word permute looks up each code's 7 low bits among 128 bf16 values (the
//! NaN code's entry a NaN), the sign is or-ed in, and the bf16 bits widen to f32 by a shift,
//! then times the scale: the same single rounding of `e4m3(q) * scale`, in half the
//! instructions. Measured: docs/performance.md.

// Off x86_64 no kernel exists (`available` is false), and what only feeds it goes unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use super::fp8::Fp8Weight;
use super::gemv::{by_weight_rows, MAX_ROWS};
use super::{isa, Isa};

/// Whether this CPU and this weight's blocks take the kernel.
pub fn available(w: &Fp8Weight) -> bool {
    takes_blocks(w.block()[1])
}

/// Whether the kernel runs here and takes blocks of `cols` inputs.
pub fn takes_blocks(cols: usize) -> bool {
    isa().is_some() && cols.is_multiple_of(16)
}

/// `x W^T` for `x` [m, cols] (row-major, m <= MAX_ROWS) where [`available`]: returns [m, rows],
/// as `threads` blocks of contiguous weight rows on rayon's pool; None where not available.
pub fn matmul_nt_fp8(x: &[f32], m: usize, w: &Fp8Weight, threads: usize) -> Option<Vec<f32>> {
    // SAFETY: `isa` is a kernel this CPU runs, and `avx512bw` says whether it has the table's.
    unsafe { matmul_on(isa()?, avx512bw(), x, m, w, threads) }
}

/// Whether this CPU has AVX-512BW (the table's word permutes).
fn avx512bw() -> bool {
    static BW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(target_arch = "x86_64")]
    return *BW.get_or_init(|| is_x86_feature_detected!("avx512bw"));
    #[cfg(not(target_arch = "x86_64"))]
    return *BW.get_or_init(|| false);
}

/// [`matmul_nt_fp8`] on the AVX-512 kernel (through the table where `table` and the blocks allow)
/// or the AVX2 one (the tests run each where they can).
///
/// # Safety
/// The CPU must run `isa` (`model::isa` says it does, or the tests' `kernels_on_this_cpu`), and
/// have AVX-512BW where `table`.
unsafe fn matmul_on(isa: Isa, table: bool, x: &[f32], m: usize, w: &Fp8Weight, threads: usize) -> Option<Vec<f32>> {
    let ([n, k], [br, bc], row0, sc) = (w.shape(), w.block(), w.row0(), w.scale_cols());
    if !bc.is_multiple_of(16) || m > MAX_ROWS || x.len() != m * k {
        return None;
    }
    let table = table && isa == Isa::Avx512 && bc.is_multiple_of(32);
    let (codes, grid) = (w.bytes(), w.scale());
    Some(by_weight_rows(m, n, threads, |j, o| {
        let scale = &grid[(row0 + j) / br * sc..][..sc];
        // SAFETY: the caller checked the kernel's features; bc % 16 == 0 (% 32 for the table); x
        // holds m rows of k.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let w = &codes[j * k..(j + 1) * k];
            match (isa, table) {
                (Isa::Avx512, true) => x86::dots_table(w, scale, bc, x, m, o),
                (Isa::Avx512, false) => x86::dots(w, scale, bc, x, m, o),
                _ => x86::dots_avx2(w, scale, bc, x, m, o),
            }
        }
    }))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::st::e4m3_to_f32;

    /// As `gemv.rs`: prefetch 8 KB of codes ahead of the loads.
    const PREFETCH: usize = 8192;

    /// `$f::<M>(args)` for the `M` (1 ..= 8) that is `$m`: a row count the kernels' loops unroll.
    macro_rules! by_rows {
        ($m:expr, $f:ident($($a:expr),*)) => {
            match $m {
                1 => $f::<1>($($a),*),
                2 => $f::<2>($($a),*),
                3 => $f::<3>($($a),*),
                4 => $f::<4>($($a),*),
                5 => $f::<5>($($a),*),
                6 => $f::<6>($($a),*),
                7 => $f::<7>($($a),*),
                _ => $f::<8>($($a),*),
            }
        };
    }

    /// `s` plus the codes from `from` on (past the vector steps) times x's row, one at a time.
    fn tail(s: f32, w: &[u8], scale: &[f32], bc: usize, x: &[f32], from: usize) -> f32 {
        (from..w.len()).fold(s, |s, j| s + e4m3_to_f32(w[j]) * scale[j / bc] * x[j])
    }

    /// 16 codes at `p` as f32, each times `scale256` (their block's scale times 2^8, see the
    /// module's doc): each byte moved to the high byte of a 16-bit lane (sign at bit 15), shifted
    /// right by one arithmetically (the 7 low bits under f16's sign; bit 14, a copy of the sign,
    /// cleared), converted, and NaN codes set to NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const u8, scale256: __m512) -> __m512 {
        let b = _mm_loadu_si128(p.cast());
        let high = _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(b));
        let half = _mm256_and_si256(_mm256_srai_epi16::<1>(high), _mm256_set1_epi16(!0x4000 & !0x7F));
        let v = _mm512_mul_ps(_mm512_cvtph_ps(half), scale256);
        let nan = _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F)));
        _mm512_mask_mov_ps(v, nan as u16, _mm512_set1_ps(f32::NAN))
    }

    /// `out[r] = x[r] · w` for the m (1 ..= 8) rows of x, w's codes scaled by `scale[i / bc]`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dots(w: &[u8], scale: &[f32], bc: usize, x: &[f32], m: usize, out: &mut [f32]) {
        by_rows!(m, dots_m(w, scale, bc, x, out))
    }

    /// Two accumulators a row (alternate 16-code steps), so one row keeps two FMAs in flight.
    #[target_feature(enable = "avx512f")]
    unsafe fn dots_m<const M: usize>(w: &[u8], scale: &[f32], bc: usize, x: &[f32], out: &mut [f32]) {
        let k = w.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        let mut i = 0;
        while i + 32 <= k {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH).cast());
            for h in 0..2 {
                let at = i + 16 * h;
                let wv = load16(wp.add(at), _mm512_set1_ps(scale[at / bc] * 256.0));
                for (r, a) in acc.iter_mut().enumerate() {
                    a[h] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(r * k + at)), a[h]);
                }
            }
            i += 32;
        }
        for (r, a) in acc.iter().enumerate() {
            let s = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            out[r] = tail(s, w, scale, bc, &x[r * k..], i);
        }
    }

    /// Each e4m3 code's magnitude (its 7 low bits) as bf16 bits, the NaN code's a NaN: 128
    /// words in four registers, two pairs for `_mm512_permutex2var_epi16` (index bits 0-4 pick a
    /// word, bit 5 the register of the pair; bit 6 picks the pair, the sign bit 7 is ignored).
    #[target_feature(enable = "avx512f")]
    unsafe fn magnitudes() -> [__m512i; 4] {
        static WORDS: std::sync::OnceLock<[u16; 128]> = std::sync::OnceLock::new();
        let words = WORDS.get_or_init(|| std::array::from_fn(|q| (e4m3_to_f32(q as u8).to_bits() >> 16) as u16));
        std::array::from_fn(|r| _mm512_loadu_si512(words[32 * r..].as_ptr().cast()))
    }

    /// 32 codes at `p` as f32, each times `scale`: looked up in `table` ([`magnitudes`]), the
    /// sign or-ed in, widened from bf16 by a shift. `e4m3(q)` is exactly a bf16 value, so the
    /// product is the reference's `e4m3(q) * scale`, rounded once.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load32(p: *const u8, table: &[__m512i; 4], scale: __m512) -> [__m512; 2] {
        let q = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.cast()));
        let (low, high) =
            (_mm512_permutex2var_epi16(table[0], q, table[1]), _mm512_permutex2var_epi16(table[2], q, table[3]));
        let magnitude = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(q, _mm512_set1_epi16(0x40)), low, high);
        // magnitude | (q << 8 & 0x8000): the sign into bf16's bit 15.
        let bits = _mm512_ternarylogic_epi32::<0xF8>(magnitude, _mm512_slli_epi16::<8>(q), _mm512_set1_epi16(i16::MIN));
        let widen = |half: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)));
        let (lo, hi) = (widen(_mm512_castsi512_si256(bits)), widen(_mm512_extracti64x4_epi64::<1>(bits)));
        [_mm512_mul_ps(lo, scale), _mm512_mul_ps(hi, scale)]
    }

    /// [`dots`] through the table ([`load32`]): blocks a multiple of 32 wide.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dots_table(w: &[u8], scale: &[f32], bc: usize, x: &[f32], m: usize, out: &mut [f32]) {
        by_rows!(m, dots_table_m(w, scale, bc, x, out))
    }

    /// [`dots_m`]'s accumulators and order (alternate 16-code halves), 32 codes a step.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dots_table_m<const M: usize>(w: &[u8], scale: &[f32], bc: usize, x: &[f32], out: &mut [f32]) {
        let k = w.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let table = magnitudes();
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        // Block by block (bc a multiple of 32), so a block's scale is read once, not divided for.
        let steps = k / 32 * 32;
        for (b, b0) in (0..steps).step_by(bc).enumerate() {
            let sv = _mm512_set1_ps(scale[b]);
            for i in (b0..(b0 + bc).min(steps)).step_by(32) {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH).cast());
                let wv = load32(wp.add(i), &table, sv);
                for (r, a) in acc.iter_mut().enumerate() {
                    for h in 0..2 {
                        a[h] = _mm512_fmadd_ps(wv[h], _mm512_loadu_ps(xp.add(r * k + i + 16 * h)), a[h]);
                    }
                }
            }
        }
        let i = steps;
        for (r, a) in acc.iter().enumerate() {
            let s = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            out[r] = tail(s, w, scale, bc, &x[r * k..], i);
        }
    }

    /// [`load16`] for 8 codes: the bytes unpacked straight into the high bytes of the lanes, and
    /// NaN lanes set by OR-ing all ones (a NaN) over them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8, scale256: __m256) -> __m256 {
        let b = _mm_loadl_epi64(p.cast());
        let half = _mm_and_si128(
            _mm_srai_epi16::<1>(_mm_unpacklo_epi8(_mm_setzero_si128(), b)),
            _mm_set1_epi16(!0x4000 & !0x7F),
        );
        let v = _mm256_cvtph_ps(half);
        let nan = _mm256_cvtepi8_epi32(_mm_cmpeq_epi8(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F)));
        // All ones is a NaN.
        _mm256_or_ps(_mm256_mul_ps(v, scale256), _mm256_castsi256_ps(nan))
    }

    /// [`dots`] on AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_avx2(w: &[u8], scale: &[f32], bc: usize, x: &[f32], m: usize, out: &mut [f32]) {
        by_rows!(m, dots_m_avx2(w, scale, bc, x, out))
    }

    /// [`dots_m`] 8 codes a step: two accumulators a row over alternate 8-code steps.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots_m_avx2<const M: usize>(w: &[u8], scale: &[f32], bc: usize, x: &[f32], out: &mut [f32]) {
        let k = w.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let mut i = 0;
        while i + 16 <= k {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH).cast());
            for h in 0..2 {
                let at = i + 8 * h;
                let wv = load8(wp.add(at), _mm256_set1_ps(scale[at / bc] * 256.0));
                for (r, a) in acc.iter_mut().enumerate() {
                    a[h] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(r * k + at)), a[h]);
                }
            }
            i += 16;
        }
        for (r, a) in acc.iter().enumerate() {
            let v = _mm256_add_ps(a[0], a[1]);
            let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let s = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps::<1>(q, q)));
            out[r] = tail(s, w, scale, bc, &x[r * k..], i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view starting 37 rows into the weight (off the blocks of rows), blocks of 64 x 32 with a
    /// partial last one and a tail past the 32-code steps, each row count: against the f32
    /// dequantisation, summed in f64. Then a NaN code, which must reach its output only.
    #[test]
    fn fp8_products_match_the_dequantised_weight() {
        for (isa, table) in kernels() {
            check_kernel(isa, table);
        }
    }

    /// Every one of the 256 codes in every lane of a step (32 through the table, 16 on AVX-512,
    /// 8 on AVX2) widens to exactly `e4m3_to_f32`'s value times the scale (NaN codes to NaN): a
    /// weight whose row `q` holds code `q` in all 32 inputs, times one-hot rows of x.
    #[test]
    fn every_code_widens_exactly_in_every_lane() {
        let codes: Vec<u8> = (0..=255u8).flat_map(|q| [q; 32]).collect();
        let w = Fp8Weight::from_codes(&codes, [256, 32], vec![0.5, 3.0], [128, 32]).unwrap();
        for (isa, table) in kernels() {
            for lane in 0..32 {
                let x: Vec<f32> = (0..32).map(|i| if i == lane { 1.0 } else { 0.0 }).collect();
                // SAFETY: `kernels` lists what this CPU runs.
                let y = unsafe { matmul_on(isa, table, &x, 1, &w, 2) }.unwrap();
                for (q, &got) in y.iter().enumerate() {
                    let want = crate::st::e4m3_to_f32(q as u8) * if q < 128 { 0.5 } else { 3.0 };
                    assert!(
                        got == want || got.is_nan() && want.is_nan(),
                        "{isa:?} (table {table}), code {q:#04x}, lane {lane}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Every kernel this CPU runs: the ISAs, and on AVX-512 with and without the table.
    fn kernels() -> Vec<(Isa, bool)> {
        let isas = crate::model::kernels_on_this_cpu();
        let tables = |isa| if isa == Isa::Avx512 && avx512bw() { vec![false, true] } else { vec![false] };
        isas.into_iter().flat_map(|isa| tables(isa).into_iter().map(move |t| (isa, t))).collect()
    }

    fn check_kernel(isa: Isa, table: bool) {
        let (rows, k, block) = (150, 300, [64, 32]);
        let mut codes: Vec<u8> = (0..rows * k).map(|i| ((i * 37 + 11) % 256) as u8 & 0xf7).collect(); // no NaN
        let scale: Vec<f32> = (0..3 * 10).map(|i| 0.25 + i as f32 * 0.125).collect();
        let check = |codes: &[u8]| -> Vec<(f32, f64)> {
            let stored = Fp8Weight::from_codes(codes, [rows, k], scale.clone(), block).unwrap();
            let view = stored.rows(37, 100).unwrap();
            let wide = view.to_f32();
            let mut pairs = Vec::new();
            for m in 1..=MAX_ROWS {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
                // SAFETY: `kernels` lists what this CPU runs.
                let y = unsafe { matmul_on(isa, table, &x, m, &view, 3) }.unwrap();
                for r in 0..m {
                    for j in 0..100 {
                        let want: f64 = (0..k).map(|c| wide[j * k + c] as f64 * x[r * k + c] as f64).sum();
                        pairs.push((y[r * 100 + j], want));
                    }
                }
            }
            pairs
        };
        for (got, want) in check(&codes) {
            assert!((got as f64 - want).abs() <= 1e-3 * (1.0 + want.abs()), "{isa:?} ({table}): {got} against {want}");
        }
        codes[(37 + 5) * k + 290] = 0xff; // output 5's row, in the scalar tail
        codes[(37 + 9) * k + 7] = 0x7f; // output 9's, in the vector steps
        for (got, want) in check(&codes) {
            assert_eq!(got.is_nan(), want.is_nan(), "{isa:?}: {got} against {want}");
        }
        let stored = Fp8Weight::from_codes(&codes, [rows, k], scale.clone(), block).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { matmul_on(isa, table, &[], 0, &stored, 2) }, Some(vec![]), "no rows");
        let narrow = Fp8Weight::from_codes(&codes, [rows, k], vec![1.0; 3 * 38], [64, 8]).unwrap();
        assert!(unsafe { matmul_on(isa, table, &vec![0.0; k], 1, &narrow, 1) }.is_none(), "blocks of 8 inputs");
    }
}
