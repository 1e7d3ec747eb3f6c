//! `x W` through the system's OpenBLAS (feature `openblas`), for the projections that dominate
//! a forward pass, in place of candle-core's own CPU matmul (the `gemm` crate). Same math,
//! another summation order: results stay within f32 rounding of the default path.

use candle_core::{CpuStorage, Device, Storage, Tensor};

use crate::error::{Error, Result};

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

#[link(name = "openblas")]
extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn cblas_sgemm(
        order: i32,
        trans_a: i32,
        trans_b: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
    fn openblas_set_num_threads(n: i32);
}

/// Sets OpenBLAS's thread count (its pool is sized at load time, before `--threads` is read).
pub fn set_threads(n: usize) {
    // SAFETY: a plain setter of the library's global thread count.
    unsafe { openblas_set_num_threads(n as i32) }
}

/// x: [m, k], w: [k, n] -> [m, n]. `w` contiguous, or the transposed view of a contiguous
/// [n, k] (as the model's weights are held): OpenBLAS reads either in place.
pub fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (k2, n) = w.dims2()?;
    if k != k2 {
        return Err(Error::Usage(format!("matmul shapes [{m}, {k}] x [{k2}, {n}] do not fit")));
    }
    let x = x.contiguous()?;
    let transposed = w.t()?.is_contiguous();
    let w = if transposed || w.is_contiguous() { w.clone() } else { w.contiguous()? };
    let (trans_b, ldb) = if transposed { (TRANS, k) } else { (NO_TRANS, n) };
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(wv))) = (&*xs, &*ws) else {
        return Err(Error::Usage("the BLAS path takes CPU f32 tensors".into()));
    };
    let a = &xv[xl.start_offset()..xl.start_offset() + m * k];
    let b = &wv[wl.start_offset()..wl.start_offset() + n * k];
    let mut c = vec![0f32; m * n];
    if m > 0 && n > 0 && k > 0 {
        // SAFETY: a is m x k row-major, b holds k x n row-major (or n x k row-major, read
        // transposed), c is m x n row-major, as the leading dimensions passed say; the slices
        // outlive the call.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                trans_b,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                k as i32,
                b.as_ptr(),
                ldb as i32,
                0.0,
                c.as_mut_ptr(),
                n as i32,
            );
        }
    }
    Ok(Tensor::from_vec(c, (m, n), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's own matmul, on sizes that are not multiples of any kernel's tile, with
    /// the weight in each layout `matmul` reads in place and one it must copy first.
    #[test]
    fn blas_matches_candle() {
        let x = Tensor::randn(0f32, 1.0, (37, 129), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (53, 129), &Device::Cpu).unwrap(); // [n, k]
        let wt = w.t().unwrap().contiguous().unwrap(); // [k, n]
        let strided = Tensor::randn(0f32, 1.0, (129, 2, 53), &Device::Cpu).unwrap().narrow(1, 0, 1).unwrap();
        let strided = strided.squeeze(1).unwrap(); // [k, n], rows 106 apart
        for w in [w.t().unwrap(), wt, strided] {
            let ours = matmul(&x, &w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = x.matmul(&w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in ours.iter().zip(&want) {
                approx::assert_abs_diff_eq!(a, b, epsilon = 1e-4);
            }
        }
    }
}
