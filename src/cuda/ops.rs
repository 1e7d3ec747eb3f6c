//! The device forward pass's operations ([`Ops`]) on one GPU: our kernels for everything but
//! the matrix products, which go through cuBLAS SGEMM (f32 in, f32 accumulate; cuBLAS's default
//! math mode, so no TF32). bf16 weights stay bf16 in device memory (half the footprint); each
//! product first widens its weight, exactly, into a scratch buffer (`bf16_widen`), which costs a
//! pass over the weight's bytes, small beside the GEMM.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;

use super::gpu::Gpu;
use super::{probe, Lib};
use crate::device::{HostWeight, Ops};
use crate::error::{Error, Result};
use crate::model::moe::RouterConfig;

pub struct CudaOps {
    pub gpu: Gpu,
    blas: CudaBlas,
    /// Where a bf16 weight is widened for its product; grows to the largest weight.
    scratch: std::cell::RefCell<Option<CudaSlice<f32>>>,
}

/// A weight in device memory, as stored.
pub enum DeviceWeight {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl CudaOps {
    pub fn new(gpu: Gpu) -> Result<Self> {
        probe(&[Lib::Cublas])?;
        let blas = CudaBlas::new(gpu.stream.clone()).map_err(|e| Error::Device(format!("cuBLAS: {e:?}")))?;
        Ok(CudaOps { gpu, blas, scratch: std::cell::RefCell::new(None) })
    }

    /// Row-major `y = x w^T` is column-major `y^T = w x^T`: cuBLAS with A = w (transposed),
    /// B = x, both with leading dimension k, and C with leading dimension n. `w` may be longer
    /// than n x k (the scratch buffer); only its first n x k values are read.
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        x: &CudaSlice<f32>,
        x_row0: usize,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        y_row0: usize,
        [m, n, k]: [usize; 3],
        alpha: f32,
    ) -> Result<()> {
        if x.len() < (x_row0 + m) * k || w.len() < n * k || y.len() < (y_row0 + m) * n {
            return Err(Error::Device(format!("SGEMM: buffers too small for rows {x_row0}+{m} x {k} -> {n}")));
        }
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: k as i32,
            ldb: k as i32,
            beta: 0.0,
            ldc: n as i32,
        };
        let (wv, xv) = (w.slice(..n * k), x.slice(x_row0 * k..(x_row0 + m) * k));
        let mut yv = y.slice_mut(y_row0 * n..(y_row0 + m) * n);
        // SAFETY: the views hold exactly the n x k, m x k and m x n values the config reads/writes.
        unsafe { self.blas.gemm(cfg, &wv, &xv, &mut yv) }.map_err(|e| Error::Device(format!("cuBLAS SGEMM: {e:?}")))
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.gpu.stream.alloc_zeros(n.max(1)).map_err(|e| Error::Device(format!("allocate {n} values: {e:?}")))
    }
}

impl Ops for CudaOps {
    type F = CudaSlice<f32>;
    type I = CudaSlice<i32>;
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
            DeviceWeight::F32(w) => self.sgemm(x, x_row0, w, y, y_row0, [m, n, k], alpha),
            DeviceWeight::Bf16(bits) => {
                let mut scratch = self.scratch.borrow_mut();
                if scratch.as_ref().is_none_or(|s| s.len() < n * k) {
                    *scratch = Some(self.alloc(n * k)?);
                }
                let wide = scratch.as_mut().ok_or_else(|| Error::Device("no scratch buffer".into()))?;
                self.gpu.bf16_widen(bits, wide, n * k)?;
                self.sgemm(x, x_row0, wide, y, y_row0, [m, n, k], alpha)
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
