//! Small building blocks shared by the blocks of the model: linear layers, RMSNorm, LayerNorm and
//! softmax, computed in f32 exactly as the transformers reference orders the arithmetic.

use candle_core::{Tensor, D};

use super::gemv::{matmul_nt_bf16, Bf16Weight, MAX_ROWS};
use crate::checkpoint::Loader;
use crate::error::Result;

/// `y = x W^T (+ b)`, weight stored `[out, in]` as in the checkpoint.
pub struct Linear {
    pub weight: Tensor,       // [out, in]
    pub bias: Option<Tensor>, // [out]
    /// The same weight as stored in a bf16 checkpoint, read in place by few-row products.
    pub bf16: Option<Bf16Weight>,
}

impl Linear {
    pub fn load(l: &mut Loader, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Self {
        let weight = l.get(&format!("{prefix}.weight"), &[out_dim, in_dim]);
        let bias = bias.then(|| l.get(&format!("{prefix}.bias"), &[out_dim]));
        let bf16 = l.bf16(&format!("{prefix}.weight")).filter(|w| (w.rows, w.cols) == (out_dim, in_dim));
        Linear { weight, bias, bf16 }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x: [..., in] -> [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let x = x.reshape((rows, in_dim))?; // [rows, in]
        let y = match &self.bf16 {
            // Decode-sized inputs stream the bf16 weights instead of the f32 copy (gemv.rs).
            Some(w) if rows <= MAX_ROWS && w.cols == in_dim => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let y = matmul_nt_bf16(&xs, rows, w, candle_core::utils::get_num_threads());
                Tensor::from_vec(y, (rows, w.rows), x.device())?
            }
            _ => matmul_nt(&x, &self.weight)?,
        }; // [rows, out]
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out_dim();
        Ok(y.reshape(out_dims)?)
    }
}

/// `w * x / sqrt(mean(x^2) + eps)` over the last dimension.
pub struct RmsNorm {
    pub weight: Tensor, // [dim]
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(l: &mut Loader, prefix: &str, dim: usize, eps: f64) -> Self {
        RmsNorm { weight: l.get(&format!("{prefix}.weight"), &[dim]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
        let x = x.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        Ok(x.broadcast_mul(&self.weight)?)
    }
}

/// `x W^T` for x [m, k] and W [n, k]: OpenBLAS with the `openblas` feature, candle otherwise.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "openblas")]
    return super::blas::matmul_nt(x, w);
    #[cfg(not(feature = "openblas"))]
    return Ok(x.matmul(&w.t()?)?);
}

/// `(x - mean) / sqrt(var + eps) * w + b` (biased variance), as `nn.LayerNorm`.
pub struct LayerNorm {
    pub weight: Tensor, // [dim]
    pub bias: Tensor,   // [dim]
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(l: &mut Loader, prefix: &str, dim: usize, eps: f64) -> Self {
        LayerNorm {
            weight: l.get(&format!("{prefix}.weight"), &[dim]),
            bias: l.get(&format!("{prefix}.bias"), &[dim]),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let x = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(x.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Softmax over the last dimension; rows must hold at least one finite value.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}
