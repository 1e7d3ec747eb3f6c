//! The device forward pass's operations ([`Ops`]) on one GPU: our kernels for everything but
//! the matrix products, which go through cuBLAS SGEMM (f32 in, f32 accumulate; cuBLAS's default
//! math mode, so no TF32). bf16 weights stay bf16 in device memory (half the footprint); each
//! product widens its weight, exactly, into a 64 MB scratch buffer a block of rows at a time
//! (`bf16_widen`) before the SGEMM. That adds 6 bytes of traffic per weight to the SGEMM's 4:
//! small beside a prefill's large GEMMs, but the expert GEMMs (few rows each) are memory-bound,
//! so a tensor-core bf16 GEMM is the step that remains.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};

use super::gpu::{Buf, Gpu};
use super::{probe, Lib};
use crate::device::{HostWeight, Ops};
use crate::error::{Error, Result};
use crate::model::moe::RouterConfig;

/// The widening scratch's size in f32 values (64 MB).
const SCRATCH_VALUES: usize = 16 << 20;

pub struct CudaOps {
    pub gpu: Gpu,
    /// None on the emulation, whose products go through `emu::gemm` with the same configuration.
    blas: Option<CudaBlas>,
    /// Where a bf16 weight is widened for its product, a block of rows at a time.
    scratch: std::cell::RefCell<Option<Buf<f32>>>,
}

/// A weight in device memory, as stored.
pub enum DeviceWeight {
    F32(Buf<f32>),
    Bf16(Buf<u16>),
}

impl CudaOps {
    pub fn new(gpu: Gpu) -> Result<Self> {
        let blas = match gpu.stream() {
            Some(stream) => {
                probe(&[Lib::Cublas])?;
                Some(CudaBlas::new(stream.clone()).map_err(|e| Error::Device(format!("cuBLAS: {e:?}")))?)
            }
            None => None,
        };
        Ok(CudaOps { gpu, blas, scratch: std::cell::RefCell::new(None) })
    }

    /// Row-major `y[:, n0 .. n0 + nt] = alpha * x w^T` for a block of `nt` weight rows, out of
    /// `n` outputs per row: column-major this is rows n0.. of `y^T = w x^T`, so cuBLAS gets A = w
    /// (transposed, leading dimension k), B = x (leading dimension k) and C = y from offset n0
    /// with leading dimension n. `w` may be longer than nt x k (the scratch buffer).
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        x: &Buf<f32>,
        x_row0: usize,
        w: &Buf<f32>,
        y: &mut Buf<f32>,
        y_row0: usize,
        (n0, nt, n): (usize, usize, usize),
        [m, k]: [usize; 2],
        alpha: f32,
    ) -> Result<()> {
        if m == 0 || nt == 0 {
            return Ok(());
        }
        let c_len = (m - 1) * n + nt; // the last output row ends at column n0 + nt
        if x.len() < (x_row0 + m) * k || w.len() < nt * k || y.len() < y_row0 * n + n0 + c_len {
            return Err(Error::Device(format!("SGEMM: buffers too small for rows {x_row0}+{m} x {k} -> {n}")));
        }
        let int =
            |v: usize| i32::try_from(v).map_err(|_| Error::Device(format!("SGEMM: size {v} exceeds cuBLAS's int")));
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int(nt)?,
            n: int(m)?,
            k: int(k)?,
            alpha,
            lda: int(k)?,
            ldb: int(k)?,
            beta: 0.0,
            ldc: int(n)?,
        };
        let (xs, ys) = (x_row0 * k..(x_row0 + m) * k, y_row0 * n + n0..y_row0 * n + n0 + c_len);
        match (&self.blas, x, w, y) {
            (Some(blas), Buf::Device(x), Buf::Device(w), Buf::Device(y)) => {
                let (wv, xv, mut yv) = (w.slice(..nt * k), x.slice(xs), y.slice_mut(ys));
                // SAFETY: the views hold the nt x k, m x k and (strided) m x nt values the config
                // reads and writes.
                unsafe { blas.gemm(cfg, &wv, &xv, &mut yv) }.map_err(|e| Error::Device(format!("cuBLAS SGEMM: {e:?}")))
            }
            (None, Buf::Host(x), Buf::Host(w), Buf::Host(y)) => {
                super::emu::gemm(&cfg, &w[..nt * k], &x[xs], &mut y[ys])
            }
            _ => Err(Error::Device("SGEMM: buffers from another device".into())),
        }
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone>(
        &self,
        n: usize,
    ) -> Result<Buf<T>> {
        self.gpu.zeros(n)
    }
}

impl Ops for CudaOps {
    type F = Buf<f32>;
    type I = Buf<i32>;
    type W = DeviceWeight;

    fn upload_weight(&self, w: HostWeight, _n: usize, _k: usize) -> Result<DeviceWeight> {
        Ok(match w {
            HostWeight::F32(v) => DeviceWeight::F32(self.gpu.upload(v)?),
            HostWeight::Bf16(bits) => DeviceWeight::Bf16(self.gpu.upload(bits)?),
        })
    }

    fn upload(&self, v: &[f32]) -> Result<Self::F> {
        self.gpu.upload(v)
    }
    fn upload_i32(&self, v: &[i32]) -> Result<Self::I> {
        self.gpu.upload(v)
    }
    fn download(&self, b: &Self::F) -> Result<Vec<f32>> {
        self.gpu.download(b)
    }
    fn download_i32(&self, b: &Self::I) -> Result<Vec<i32>> {
        self.gpu.download(b)
    }
    fn zeros(&self, n: usize) -> Result<Self::F> {
        self.alloc(n)
    }

    fn gemm_rows(
        &self,
        x: &Self::F,
        x_row0: usize,
        w: &DeviceWeight,
        y: &mut Self::F,
        y_row0: usize,
        [m, n, k]: [usize; 3],
        alpha: f32,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        match w {
            DeviceWeight::F32(w) => self.sgemm(x, x_row0, w, y, y_row0, (0, n, n), [m, k], alpha),
            DeviceWeight::Bf16(bits) => {
                // Widened a block of rows at a time, so the scratch stays small whatever the
                // weight (GLM-5's lm_head alone would be 3.8 GB in f32).
                let rows = (SCRATCH_VALUES / k.max(1)).clamp(1, n);
                let mut scratch = self.scratch.borrow_mut();
                if scratch.as_ref().is_none_or(|s| s.len() < rows * k) {
                    *scratch = Some(self.alloc(rows * k)?);
                }
                let wide = scratch.as_mut().ok_or_else(|| Error::Device("no scratch buffer".into()))?;
                for n0 in (0..n).step_by(rows) {
                    let nt = rows.min(n - n0);
                    self.gpu.bf16_widen(bits, n0 * k, wide, nt * k)?;
                    self.sgemm(x, x_row0, wide, y, y_row0, (n0, nt, n), [m, k], alpha)?;
                }
                Ok(())
            }
        }
    }

    fn rms_norm(&self, x: &Self::F, w: &Self::F, rows: usize, cols: usize, eps: f32) -> Result<Self::F> {
        let mut y = self.alloc(rows * cols)?;
        self.gpu.rms_norm(x, w, &mut y, rows, cols, eps)?;
        Ok(y)
    }

    fn layer_norm(&self, x: &Self::F, w: &Self::F, b: &Self::F, rows: usize, cols: usize, eps: f32) -> Result<Self::F> {
        let mut y = self.alloc(rows * cols)?;
        self.gpu.layer_norm(x, w, b, &mut y, rows, cols, eps)?;
        Ok(y)
    }

    fn row_l2_norm(&self, x: &Self::F, rows: usize, cols: usize) -> Result<Self::F> {
        let mut y = self.alloc(rows)?;
        self.gpu.row_l2_norm(x, &mut y, rows, cols)?;
        Ok(y)
    }

    fn rope(
        &self,
        x: &mut Self::F,
        cos: &Self::F,
        sin: &Self::F,
        [rows, seq, heads, width, start, half]: [usize; 6],
    ) -> Result<()> {
        self.gpu.rope(x, cos, sin, rows, seq, heads, width, start, half)
    }

    fn silu_mul(&self, gate: &Self::F, up: &Self::F, n: usize) -> Result<Self::F> {
        let mut y = self.alloc(n)?;
        self.gpu.silu_mul(gate, up, &mut y, n)?;
        Ok(y)
    }

    fn add(&self, a: &Self::F, b: &Self::F, n: usize) -> Result<Self::F> {
        let mut y = self.alloc(n)?;
        self.gpu.add(a, b, &mut y, n)?;
        Ok(y)
    }

    fn route(
        &self,
        logits: &Self::F,
        bias: &Self::F,
        n: usize,
        e: usize,
        rc: &RouterConfig,
    ) -> Result<(Self::I, Self::F, Self::F)> {
        let (mut ids, mut w, mut m) = (self.alloc(n * rc.top_k)?, self.alloc(n * rc.top_k)?, self.alloc(n)?);
        self.gpu.route(logits, bias, n, e, rc, &mut ids, &mut w, &mut m)?;
        Ok((ids, w, m))
    }

    fn index_scores(&self, q: &Self::F, k: &Self::F, w: &Self::F, dims: [usize; 6], scale: f32) -> Result<Self::F> {
        let mut y = self.alloc(dims[0] * dims[1] * dims[2])?;
        self.gpu.index_scores(q, k, w, &mut y, dims, scale)?;
        Ok(y)
    }

    fn topk_causal(
        &self,
        scores: &Self::F,
        rows: usize,
        s: usize,
        t: usize,
        offset: usize,
        k: usize,
    ) -> Result<(Self::I, Self::F)> {
        let (mut idx, mut m) = (self.alloc(rows * k)?, self.alloc(rows)?);
        self.gpu.topk_causal(scores, rows, s, t, offset, k, &mut idx, &mut m)?;
        Ok((idx, m))
    }

    fn sparse_attention(
        &self,
        q: &Self::F,
        kv: &Self::F,
        k_rope: &Self::F,
        idx: &Self::I,
        dims: [usize; 9],
        scale: f32,
    ) -> Result<Self::F> {
        let [b, s, _, nh, _, _, vd, _, _] = dims;
        let mut y = self.alloc(b * s * nh * vd)?;
        self.gpu.sparse_attention(q, kv, k_rope, idx, &mut y, dims, scale)?;
        Ok(y)
    }

    fn gather_rows(&self, x: &Self::F, rows: &Self::I, n: usize, cols: usize) -> Result<Self::F> {
        let mut y = self.alloc(n * cols)?;
        self.gpu.gather_rows(x, rows, &mut y, n, cols)?;
        Ok(y)
    }

    fn combine(
        &self,
        y: &Self::F,
        ids: &Self::I,
        slot: &Self::I,
        w: &Self::F,
        shared: &Self::F,
        [n, k, cols]: [usize; 3],
    ) -> Result<Self::F> {
        let mut out = self.alloc(n * cols)?;
        self.gpu.combine(y, ids, slot, w, shared, &mut out, n, k, cols)?;
        Ok(out)
    }
}
