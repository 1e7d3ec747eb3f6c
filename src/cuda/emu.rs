//! The CUDA backend without a GPU (`--device cuda-emu`): the kernels' own `.cu` source,
//! compiled for the host by build.rs over the runtime in `emu.h` (thread blocks as fibers,
//! barriers, warp shuffles), launched here with the argument lists the GPU launches take; and
//! cuBLAS's SGEMM replaced by [`gemm`](fn@gemm), the column-major BLAS contract computed plainly, so the
//! row-major-on-column-major configuration `CudaOps` hands cuBLAS is checked too.
//!
//! This is how the kernels' logic (indexing, reductions, bounds, barriers) is tested in CI. It
//! proves nothing about NVRTC's code, the hardware's scheduling or its math library: a GPU run
//! of `glimpse selftest --device cuda` still has the last word.

use std::ffi::{c_char, c_int, c_uint, c_void, CString};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{GemmConfig, StridedBatchedConfig};
use cudarc::driver::LaunchConfig;

use crate::error::{Error, Result};

extern "C" {
    fn glimpse_emu_launch(
        name: *const c_char,
        grid: c_uint,
        block: c_uint,
        shared: c_uint,
        order: c_int,
        seed: u64,
        params: *mut *mut c_void,
    ) -> c_int;
}

/// Which of a launch's threads the emulation runs when (see `emu.h`). A GPU promises no order,
/// so a kernel whose results differ between these has a race; the tests run every kernel under
/// each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// Blocks in order; every thread of a block, in order, runs to its next barrier, round after
    /// round.
    #[default]
    Lockstep,
    /// Blocks in order; one warp at a time runs as far as it can (up to a block barrier), in
    /// order: warps drift apart as on a GPU.
    WarpsAhead,
    /// As `WarpsAhead`, blocks and warps from the last.
    WarpsAheadReversed,
    /// As `WarpsAhead`, with blocks, warps and lanes in a fresh permutation (from this seed) at
    /// every step.
    Shuffled(u64),
}

impl Schedule {
    /// One of each kind, the shuffle seeded.
    pub const ALL: [Schedule; 4] =
        [Schedule::Lockstep, Schedule::WarpsAhead, Schedule::WarpsAheadReversed, Schedule::Shuffled(0x5eed)];
}

/// One kernel argument as the emulation takes it: a buffer's data pointer, or a pointer to a
/// scalar (`int`, `long long`, `float`) that outlives the launch.
pub enum Param {
    Data(*mut c_void),
    Value(*const c_void),
}

/// Runs kernel `name` over `cfg` with `params` in its signature's order, in `schedule`'s order.
///
/// # Safety
/// The parameters must match the kernel's signature in number and type, and every buffer must
/// hold what the kernel reads and writes (the launchers in `gpu` check this).
pub unsafe fn launch(name: &str, cfg: LaunchConfig, schedule: Schedule, params: &[Param]) -> Result<()> {
    let (grid, block) = (cfg.grid_dim, cfg.block_dim);
    if grid.1 != 1 || grid.2 != 1 {
        return Err(Error::Device(format!("{name}: the emulation runs one-dimensional grids only")));
    }
    // The kernel reads each argument through a pointer to it: buffers' pointers live in `data`.
    let mut data: Vec<*mut c_void> =
        params.iter().map(|p| if let Param::Data(d) = p { *d } else { std::ptr::null_mut() }).collect();
    let base = data.as_mut_ptr();
    let mut args: Vec<*mut c_void> = params
        .iter()
        .enumerate()
        .map(|(i, p)| match p {
            Param::Data(_) => base.add(i).cast(),
            Param::Value(v) => v.cast_mut(),
        })
        .collect();
    let cname = CString::new(name).map_err(|_| Error::Device(format!("kernel name {name:?}")))?;
    let (order, seed) = match schedule {
        Schedule::Lockstep => (0, 0),
        Schedule::WarpsAhead => (1, 0),
        Schedule::WarpsAheadReversed => (2, 0),
        Schedule::Shuffled(seed) => (3, seed),
    };
    match glimpse_emu_launch(cname.as_ptr(), grid.0, block.0, cfg.shared_mem_bytes, order, seed, args.as_mut_ptr()) {
        0 => Ok(()),
        -1 => Err(Error::Device(format!("kernel `{name}` is not in the emulation library"))),
        -2 => Err(Error::Device(format!("{name}: deadlock, threads of a block wait at different barriers"))),
        -3 => Err(Error::Device(format!("{name}: a block of {block:?} threads is beyond the hardware"))),
        -5 => Err(Error::Device(format!(
            "{name}: a block wrote past its {} bytes of dynamic shared memory",
            cfg.shared_mem_bytes
        ))),
        -6 => Err(Error::Device(format!(
            "{name}: threads met at different barriers or shuffles, or a shuffle's mask or an mma left out live lanes \
             (undefined on a GPU)"
        ))),
        -7 => Err(Error::Device(format!("{name}: a vector load or store off its alignment (a GPU faults)"))),
        code => Err(Error::Device(format!("{name}: the emulation failed ({code})"))),
    }
}

/// cuBLAS's SGEMM contract on host slices (column-major): `C = alpha op(A) op(B) + beta C`,
/// C m x n with leading dimension ldc, op(A) m x k, op(B) k x n. Accumulates in f64: this
/// checks what the call computes, not cuBLAS's rounding.
pub fn gemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    let dims = [cfg.m, cfg.n, cfg.k, cfg.lda, cfg.ldb, cfg.ldc];
    let [m, n, k, lda, ldb, ldc] = dims.map(|v| usize::try_from(v).unwrap_or(0));
    if dims.iter().any(|&v| v < 0) {
        return Err(Error::Device(format!("SGEMM (emulated): a negative dimension in {dims:?}")));
    }
    let t = |op: cublasOperation_t| op != cublasOperation_t::CUBLAS_OP_N;
    let (ta, tb) = (t(cfg.transa), t(cfg.transb));
    // cuBLAS refuses (CUBLAS_STATUS_INVALID_VALUE) leading dimensions shorter than the stored
    // matrices' columns; so does the emulation, so a configuration it passes is one cuBLAS takes.
    let rows = |stored_t: bool, if_t: usize, if_n: usize| if stored_t { if_t } else { if_n }.max(1);
    if lda < rows(ta, k, m) || ldb < rows(tb, n, k) || ldc < m.max(1) {
        return Err(Error::Device(format!(
            "SGEMM (emulated): leading dimensions {lda}, {ldb}, {ldc} too short for {m} x {n} x {k} (cuBLAS would refuse them)"
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Where op(A)[i, l] and op(B)[l, j] sit; both grow with each index, so the last is the extent.
    let at = |i: usize, l: usize| if ta { l + i * lda } else { i + l * lda };
    let bt = |l: usize, j: usize| if tb { j + l * ldb } else { l + j * ldb };
    if k > 0 && (a.len() <= at(m - 1, k - 1) || b.len() <= bt(k - 1, n - 1)) || c.len() <= m - 1 + (n - 1) * ldc {
        return Err(Error::Device(format!("SGEMM (emulated): buffers too small for {m} x {n} x {k}")));
    }
    for j in 0..n {
        for i in 0..m {
            let dot: f64 = (0..k).map(|l| a[at(i, l)] as f64 * b[bt(l, j)] as f64).sum();
            let o = &mut c[i + j * ldc];
            let prior = if cfg.beta == 0.0 { 0.0 } else { cfg.beta as f64 * *o as f64 };
            *o = (cfg.alpha as f64 * dot + prior) as f32;
        }
    }
    Ok(())
}

/// cuBLAS's strided-batched SGEMM on host slices: [`gemm`](fn@gemm) on each matrix of the batch.
pub fn gemm_batched(cfg: &StridedBatchedConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    let stride = |s: i64| usize::try_from(s).map_err(|_| Error::Device("batched GEMM: a negative stride".into()));
    let (sa, sb, sc) = (stride(cfg.stride_a)?, stride(cfg.stride_b)?, stride(cfg.stride_c)?);
    for i in 0..usize::try_from(cfg.batch_size).unwrap_or(0) {
        let (a, b) = (a.get(i * sa..).unwrap_or(&[]), b.get(i * sb..).unwrap_or(&[]));
        let c = c.get_mut(i * sc..).unwrap_or(&mut []);
        gemm(&cfg.gemm, a, b, c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(transa: bool, m: i32, n: i32, k: i32, [lda, ldb, ldc]: [i32; 3]) -> GemmConfig<f32> {
        let op = |t| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        GemmConfig { transa: op(transa), transb: op(false), m, n, k, alpha: 1.0, lda, ldb, beta: 0.0, ldc }
    }

    /// y = x W^T as the device products configure it: op(A) = W^T read at lda = k.
    #[test]
    fn the_row_major_product_and_cublas_leading_dimension_rules() {
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 rows of k = 3
        let x = [1.0, 0.0, -1.0]; // 1 row
        let mut y = [f32::NAN; 2];
        gemm(&cfg(true, 2, 1, 3, [3, 3, 2]), &w, &x, &mut y).unwrap();
        assert_eq!(y, [-2.0, -2.0]);
        for bad in [[2, 3, 2], [3, 2, 2], [3, 3, 1]] {
            let err = gemm(&cfg(true, 2, 1, 3, bad), &w, &x, &mut y).unwrap_err().to_string();
            assert!(err.contains("leading dimensions"), "{bad:?}: {err}");
        }
        assert!(gemm(&cfg(false, 2, 1, 3, [1, 3, 2]), &w, &x, &mut y).is_err(), "N: lda must cover m");
        assert!(gemm(&cfg(false, -1, 1, 3, [3, 3, 2]), &w, &x, &mut y).is_err(), "negative m");
    }
}
