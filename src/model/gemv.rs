//! Few-row products against bf16 weights read straight from the memory-mapped checkpoint.
//!
//! Decode multiplies one row (or a handful: batch rows, a short chunk) by every weight matrix of
//! the model, so its speed is how fast the weights stream from memory, not arithmetic. Reading the
//! stored bf16 (2 bytes a weight) instead of the f32 copy the prefill's GEMM uses (4 bytes) halves
//! that traffic. Each weight row is widened to f32 in registers and used for every input row;
//! accumulation is f32. The values are the f32 copy's exactly (bf16 -> f32 is exact); only the
//! summation order differs from the GEMM's.

use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;

/// Inputs with at most this many rows take the bf16 path; more rows amortise the f32 GEMM.
pub const MAX_ROWS: usize = 8;

/// A row-major `[rows, cols]` bf16 matrix inside a memory-mapped file.
#[derive(Clone)]
pub struct Bf16Weight {
    map: Arc<Mmap>,
    offset: usize, // bytes
    pub rows: usize,
    pub cols: usize,
    /// The map is a file's (a checkpoint's), so its pages may be dropped ([`Bf16Weight::release`]).
    in_file: bool,
}

impl Bf16Weight {
    /// None when the bytes are not there or not 2-byte aligned (then the f32 path is used), or on
    /// a big-endian host (the file is little endian).
    pub fn new(map: Arc<Mmap>, offset: usize, rows: usize, cols: usize) -> Option<Self> {
        let end = offset.checked_add(rows.checked_mul(cols)?.checked_mul(2)?)?;
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<u16>());
        (cfg!(target_endian = "little") && aligned && end <= map.len()).then_some(Bf16Weight {
            map,
            offset,
            rows,
            cols,
            in_file: false,
        })
    }

    /// Marks the map as a file's: [`Bf16Weight::release`] may then drop its pages.
    pub(crate) fn in_file(self) -> Self {
        Bf16Weight { in_file: true, ..self }
    }

    /// Drops this weight's pages from the process where the map is a file's (re-read if touched):
    /// once a weight is packed for many-row products, its mapped bytes would otherwise stay
    /// resident beside the packed copy.
    pub fn release(&self) {
        if self.in_file {
            crate::st::release_range(&self.map, self.offset, self.offset + self.rows * self.cols * 2);
        }
    }

    /// Rows `start .. start + count` (e.g. one expert of a fused `[E, R, C]` tensor viewed as
    /// `[E * R, C]`).
    pub fn rows(&self, start: usize, count: usize) -> Option<Self> {
        let offset = start.checked_mul(self.cols)?.checked_mul(2)?.checked_add(self.offset)?;
        (start.checked_add(count)? <= self.rows).then(|| Bf16Weight { offset, rows: count, ..self.clone() })
    }

    /// Every value widened to f32, row-major (in parallel: this is a memory-bound copy).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(1 << 16).zip(self.data().par_chunks(1 << 16)).for_each(|(o, w)| {
            for (d, &b) in o.iter_mut().zip(w) {
                *d = widen(b);
            }
        });
        out
    }

    /// A weight from bf16 bit patterns in memory (tests and benchmarks; checkpoints are read in
    /// place), `offset` bytes into an anonymous map.
    pub fn from_bits(bits: &[u16], rows: usize, cols: usize, offset: usize) -> crate::error::Result<Self> {
        let io = |e| crate::error::Error::Device(format!("an anonymous map for bf16 values: {e}"));
        let mut map = memmap2::MmapMut::map_anon((offset + bits.len() * 2).max(1)).map_err(io)?;
        for (to, b) in map[offset..].chunks_exact_mut(2).zip(bits) {
            to.copy_from_slice(&b.to_le_bytes());
        }
        Bf16Weight::new(Arc::new(map.make_read_only().map_err(io)?), offset, rows, cols).ok_or_else(|| {
            crate::error::Error::Device(format!(
                "{} bf16 values at offset {offset} are not [{rows}, {cols}]",
                bits.len()
            ))
        })
    }

    /// A `[rows, cols]` test matrix of values in [-1, 1], 2 bytes into its map.
    #[cfg(test)]
    pub fn test_matrix(rows: usize, cols: usize) -> Self {
        let bits: Vec<u16> = (0..rows * cols)
            .map(|i| (((i * 7919) % 2001) as f32 / 1000.0 - 1.0).to_bits().wrapping_shr(16) as u16)
            .collect();
        Bf16Weight::from_bits(&bits, rows, cols, 2).unwrap()
    }

    /// The bf16 bit patterns, row-major.
    pub fn bits(&self) -> &[u16] {
        self.data()
    }

    fn data(&self) -> &[u16] {
        // (Saturating, and indexed: a shape set past what `new` checked panics here, not reads
        // past the map.)
        let len = self.rows.saturating_mul(self.cols).saturating_mul(2);
        let bytes = &self.map[self.offset..self.offset.saturating_add(len)];
        // SAFETY: `bytes` is in the map (indexed above) and 2-byte aligned (`new` checked the
        // offset, which `rows` moves by whole 2-byte values); any bit pattern is a valid u16.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u16>(), bytes.len() / 2) }
    }
}

/// `x W^T` for `x` [m, cols] (row-major, m <= MAX_ROWS): returns [m, rows], computed as `threads`
/// blocks of contiguous weight rows on rayon's pool (sized by `--threads`).
pub fn matmul_nt_bf16(x: &[f32], m: usize, w: &Bf16Weight, threads: usize) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    // The SIMD kernels read m rows of k from `x` unchecked: hold them to it.
    assert!(m <= MAX_ROWS && x.len() == m * k, "matmul_nt_bf16: x has {} values, not {m} x {k}", x.len());
    let data = w.data();
    by_weight_rows(m, n, threads, |j, o| row_dots(&data[j * k..(j + 1) * k], x, m, o))
}

/// The `[m, n]` outputs of a few-row product, computed a weight row at a time: `dots(j, out)`
/// writes the m inputs' dots with weight row j, on `threads` blocks of contiguous rows on rayon's
/// pool (each thread streams its own part of the weight).
pub fn by_weight_rows(m: usize, n: usize, threads: usize, dots: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    let mut out_t = vec![0f32; n * m]; // [n, m]: each thread fills whole output rows
    let per = n.div_ceil(threads.max(1)).max(1);
    out_t.par_chunks_mut(per * m).enumerate().for_each(|(block, out)| {
        for (i, o) in out.chunks_exact_mut(m).enumerate() {
            dots(block * per + i, o);
        }
    });
    let mut y = vec![0f32; m * n];
    for (j, o) in out_t.chunks_exact(m).enumerate() {
        for (r, v) in o.iter().enumerate() {
            y[r * n + j] = *v;
        }
    }
    y
}

/// The absorbed-MLA products against `kv_b_proj` ([heads * stride, cols] bf16), per head h over
/// its `count` rows from `h * stride + start`, for `x` [m, heads, *] (m <= MAX_ROWS), on `threads`
/// threads taking whole heads:
/// - `Form::XW`: x [m, heads, count] -> x_h W_h: [m, heads, cols] (the query through W_UK);
/// - `Form::XWt`: x [m, heads, cols] -> x_h W_h^T: [m, heads, count] (the output through W_UV).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Form {
    XW,
    XWt,
}

#[allow(clippy::too_many_arguments)]
pub fn per_head_bf16(
    x: &[f32],
    m: usize,
    heads: usize,
    w: &Bf16Weight,
    (stride, start, count): (usize, usize, usize),
    form: Form,
    threads: usize,
) -> Vec<f32> {
    let cols = w.cols;
    let (x_width, y_width) = match form {
        Form::XW => (count, cols),
        Form::XWt => (cols, count),
    };
    assert!(
        m <= MAX_ROWS && x.len() == m * heads * x_width && heads * stride <= w.rows && start + count <= stride,
        "per_head_bf16: shapes do not fit"
    );
    let data = w.data();
    let mut y_heads = vec![0f32; heads * m * y_width]; // [heads, m, y_width]
    let per = heads.div_ceil(threads.max(1)).max(1);
    y_heads.par_chunks_mut(per * m * y_width).enumerate().for_each(|(block, ys)| {
        let mut xh = vec![0f32; m * x_width];
        let mut row = vec![0f32; cols];
        for (i, y) in ys.chunks_exact_mut(m * y_width).enumerate() {
            let h = block * per + i;
            for r in 0..m {
                let src = (r * heads + h) * x_width;
                xh[r * x_width..(r + 1) * x_width].copy_from_slice(&x[src..src + x_width]);
            }
            let rows = &data[(h * stride + start) * cols..(h * stride + start + count) * cols];
            match form {
                Form::XW => {
                    for (j, wrow) in rows.chunks_exact(cols).enumerate() {
                        for (d, &b) in row.iter_mut().zip(wrow) {
                            *d = widen(b);
                        }
                        for r in 0..m {
                            let a = xh[r * x_width + j];
                            for (o, &v) in y[r * cols..(r + 1) * cols].iter_mut().zip(&row) {
                                *o += a * v;
                            }
                        }
                    }
                }
                Form::XWt => {
                    let mut dots = [0f32; MAX_ROWS];
                    for (j, wrow) in rows.chunks_exact(cols).enumerate() {
                        row_dots(wrow, &xh, m, &mut dots[..m]);
                        for r in 0..m {
                            y[r * count + j] = dots[r];
                        }
                    }
                }
            }
        }
    });
    // [heads, m, y_width] -> [m, heads, y_width]
    let mut y = vec![0f32; m * heads * y_width];
    for (h, yh) in y_heads.chunks_exact(m * y_width).enumerate() {
        for r in 0..m {
            y[(r * heads + h) * y_width..(r * heads + h + 1) * y_width]
                .copy_from_slice(&yh[r * y_width..(r + 1) * y_width]);
        }
    }
    y
}

/// `out[r] = x[r] · w` for each of the m rows of x.
fn row_dots(w: &[u16], x: &[f32], m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512f() {
        // SAFETY: `avx512f` detected the feature at run time.
        unsafe {
            match m {
                1 => return x86::dot1_512(w, x, out),
                2 => return x86::dots_512::<2>(w, x, out),
                3 => return x86::dots_512::<3>(w, x, out),
                4 => return x86::dots_512::<4>(w, x, out),
                5 => return x86::dots_512::<5>(w, x, out),
                6 => return x86::dots_512::<6>(w, x, out),
                7 => return x86::dots_512::<7>(w, x, out),
                8 => return x86::dots_512::<8>(w, x, out),
                _ => {}
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: the features were detected at run time.
        unsafe {
            match m {
                1 => return x86::dot1(w, x, out),
                2 => return x86::dots::<2>(w, x, out),
                3 => return x86::dots::<3>(w, x, out),
                4 => return x86::dots::<4>(w, x, out),
                5 => return x86::dots::<5>(w, x, out),
                6 => return x86::dots::<6>(w, x, out),
                7 => return x86::dots::<7>(w, x, out),
                8 => return x86::dots::<8>(w, x, out),
                _ => {}
            }
        }
    }
    let k = w.len();
    for (r, o) in out.iter_mut().enumerate().take(m) {
        *o = w.iter().zip(&x[r * k..(r + 1) * k]).map(|(&b, &v)| widen(b) * v).sum();
    }
}

/// A bf16 bit pattern as the f32 it denotes (exact).
#[inline]
pub fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::widen;

    /// How far ahead (in weights, 8 KB) to prefetch: the hardware prefetcher alone leaves one
    /// core well short of its share of memory bandwidth (measured: 10.5 -> 15 GB/s a core, 21 ->
    /// 32 GB/s on two). Prefetching past the end of the matrix is harmless (a hint, never a fault).
    const PREFETCH: usize = 4096;

    /// 8 bf16 at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const u16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// One input row: four independent accumulators keep the FMA pipeline busy.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot1(w: &[u16], x: &[f32], out: &mut [f32]) {
        let k = w.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= k {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH).cast());
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(load8(wp.add(i + 8 * u)), _mm256_loadu_ps(xp.add(i + 8 * u)), *a);
            }
            i += 32;
        }
        while i + 8 <= k {
            acc[0] = _mm256_fmadd_ps(load8(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for j in i..k {
            s += widen(w[j]) * x[j];
        }
        out[0] = s;
    }

    /// M input rows: each widened weight vector feeds M accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots<const M: usize>(w: &[u16], x: &[f32], out: &mut [f32]) {
        let k = w.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); M];
        let mut i = 0;
        while i + 8 <= k {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH).cast());
            let wv = load8(wp.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(r * k + i)), *a);
            }
            i += 8;
        }
        for (r, a) in acc.iter().enumerate() {
            let mut s = hsum(*a);
            for j in i..k {
                s += widen(w[j]) * x[r * k + j];
            }
            out[r] = s;
        }
    }

    /// 16 bf16 at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const u16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())), 16))
    }

    /// `dot1` with 512-bit vectors: half the instructions per weight, which one core needs to
    /// keep up with memory.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot1_512(w: &[u16], x: &[f32], out: &mut [f32]) {
        let k = w.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= k {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH).cast());
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH + 32).cast());
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(load16(wp.add(i + 16 * u)), _mm512_loadu_ps(xp.add(i + 16 * u)), *a);
            }
            i += 64;
        }
        while i + 16 <= k {
            acc[0] = _mm512_fmadd_ps(load16(wp.add(i)), _mm512_loadu_ps(xp.add(i)), acc[0]);
            i += 16;
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
        for j in i..k {
            s += widen(w[j]) * x[j];
        }
        out[0] = s;
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dots_512<const M: usize>(w: &[u16], x: &[f32], out: &mut [f32]) {
        let k = w.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); M];
        let mut i = 0;
        while i + 16 <= k {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH).cast());
            let wv = load16(wp.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(r * k + i)), *a);
            }
            i += 16;
        }
        for (r, a) in acc.iter().enumerate() {
            let mut s = _mm512_reduce_add_ps(*a);
            for j in i..k {
                s += widen(w[j]) * x[r * k + j];
            }
            out[r] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count and a width that is not a multiple of 8 or 32, against the plain sum,
    /// with an output block per thread that does not divide the rows evenly.
    #[test]
    fn bf16_products_match_the_f32_reference() {
        let (n, k) = (13, 77);
        let weight = Bf16Weight::test_matrix(n, k);
        let w = weight.bits();
        assert!(Bf16Weight::new(weight.map.clone(), 1, n, k - 1).is_none(), "misaligned");
        assert!(Bf16Weight::new(weight.map.clone(), 2, n, k + 1).is_none(), "past the map");
        assert!(matmul_nt_bf16(&[], 0, &weight, 2).is_empty(), "no rows");
        for m in 1..=MAX_ROWS {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
            let y = matmul_nt_bf16(&x, m, &weight, 3);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|i| widen(w[j * k + i]) as f64 * x[r * k + i] as f64).sum();
                    approx::assert_abs_diff_eq!(y[r * n + j] as f64, want, epsilon = 1e-4);
                }
            }
        }
        // Per head: 13 rows = 2 heads of stride 6 (+1 spare row); rows 1..4 of each.
        let x: Vec<f32> = (0..2 * 2 * 3).map(|i| i as f32 / 7.0 - 0.5).collect(); // [m=2, heads=2, 3]
        let y = per_head_bf16(&x, 2, 2, &weight, (6, 1, 3), Form::XW, 2); // [2, 2, k]
        let xt: Vec<f32> = (0..2 * 2 * k).map(|i| ((i * 13) % 11) as f32 / 5.0 - 1.0).collect(); // [2, 2, k]
        let yt = per_head_bf16(&xt, 2, 2, &weight, (6, 1, 3), Form::XWt, 3); // [2, 2, 3]
        for r in 0..2 {
            for h in 0..2 {
                for c in 0..k {
                    let want: f32 = (0..3).map(|j| x[(r * 2 + h) * 3 + j] * widen(w[(h * 6 + 1 + j) * k + c])).sum();
                    approx::assert_abs_diff_eq!(y[(r * 2 + h) * k + c], want, epsilon = 1e-4);
                }
                for j in 0..3 {
                    let want: f32 = (0..k).map(|c| xt[(r * 2 + h) * k + c] * widen(w[(h * 6 + 1 + j) * k + c])).sum();
                    approx::assert_abs_diff_eq!(yt[(r * 2 + h) * 3 + j], want, epsilon = 1e-3);
                }
            }
        }
        let two = weight.rows(11, 2).unwrap();
        let y = matmul_nt_bf16(&vec![1.0; k], 1, &two, 2);
        let want: f32 = (0..k).map(|i| widen(w[12 * k + i])).sum();
        approx::assert_abs_diff_eq!(y[1], want, epsilon = 1e-4);
    }
}
