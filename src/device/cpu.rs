//! [`Ops`] on plain slices in host memory: each op computes the same formula as its CUDA kernel
//! (named in `src/cuda/*.cu`), to float tolerance (the GPU's `rsqrtf`, `expf` and summation
//! order differ), so it is both the kernels' reference in `selftest` and the way the device
//! forward pass is tested without a GPU. The router and the causal top-k are the model's own
//! functions; matrix products go through the model's `matmul_nt`.

use candle_core::{Device, Tensor};

use super::{HostWeight, Ops};
use crate::error::{Error, Result};
use crate::model::indexer::top_k_causal;
use crate::model::moe::{route, RouterConfig};

pub struct CpuOps;

impl Ops for CpuOps {
    type F = Vec<f32>;
    type I = Vec<i32>;
    /// Widened once at upload (bf16 -> f32 is exact, so this is the product a widening GEMM
    /// computes), as the [n, k] tensor every product then uses as it is.
    type W = Tensor;

    fn upload_weight(&self, w: HostWeight, n: usize, k: usize) -> Result<Tensor> {
        Ok(Tensor::from_vec(w.to_f32(), (n, k), &Device::Cpu)?)
    }

    fn upload(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn upload_i32(&self, v: &[i32]) -> Result<Vec<i32>> {
        Ok(v.to_vec())
    }
    fn download(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(b.clone())
    }
    fn download_i32(&self, b: &Vec<i32>) -> Result<Vec<i32>> {
        Ok(b.clone())
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn output(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![f32::NAN; n])
    }

    fn gemm_rows(
        &self,
        x: &Vec<f32>,
        x_row0: usize,
        w: &Tensor,
        y: &mut Vec<f32>,
        y_row0: usize,
        [m, n, k]: [usize; 3],
        alpha: f32,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let xt = Tensor::from_slice(&x[x_row0 * k..(x_row0 + m) * k], (m, k), &Device::Cpu)?;
        let out = crate::model::nn::matmul_nt(&xt, w)?.flatten_all()?.to_vec1::<f32>()?;
        for (dst, v) in y[y_row0 * n..(y_row0 + m) * n].iter_mut().zip(out) {
            *dst = alpha * v;
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, rows: usize, cols: usize, eps: f32) -> Result<Vec<f32>> {
        let mut y = vec![0.0; rows * cols];
        for (yr, xr) in y.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / cols as f32 + eps).sqrt();
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * inv * g;
            }
        }
        Ok(y)
    }

    fn layer_norm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<Vec<f32>> {
        let mut y = vec![0.0; rows * cols];
        for (yr, xr) in y.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            let mean = xr.iter().sum::<f32>() / cols as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (i, o) in yr.iter_mut().enumerate() {
                *o = (xr[i] - mean) * inv * w[i] + b[i];
            }
        }
        Ok(y)
    }

    fn row_l2_norm(&self, x: &Vec<f32>, rows: usize, cols: usize) -> Result<Vec<f32>> {
        Ok(x.chunks_exact(cols).take(rows).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        [rows, seq, heads, width, start, half]: [usize; 6],
    ) -> Result<()> {
        crate::model::rope::rotate(cos, sin, half, &mut x[..rows * heads * width], [seq, heads, width, start]);
        Ok(())
    }

    fn swiglu(&self, gate_up: &Vec<f32>, rows: usize, inter: usize) -> Result<Vec<f32>> {
        let halves = gate_up[..rows * 2 * inter].chunks_exact(2 * inter.max(1));
        Ok(halves.flat_map(|r| r[..inter].iter().zip(&r[inter..]).map(|(g, u)| g / (1.0 + (-g).exp()) * u)).collect())
    }

    fn add(&self, a: &Vec<f32>, b: &Vec<f32>, n: usize) -> Result<Vec<f32>> {
        Ok(a[..n].iter().zip(b).map(|(x, y)| x + y).collect())
    }

    fn columns(&self, x: &Vec<f32>, [rows, width]: [usize; 2], col0: usize, cols: usize) -> Result<Vec<f32>> {
        if col0 + cols > width || x.len() < rows * width {
            return Err(Error::Device(format!("columns {col0}..{} of {rows} rows of {width}", col0 + cols)));
        }
        Ok(x.chunks_exact(width.max(1)).take(rows).flat_map(|r| r[col0..col0 + cols].iter().copied()).collect())
    }

    fn concat_columns(&self, parts: &[(&Vec<f32>, usize)], rows: usize) -> Result<Vec<f32>> {
        if let Some((x, cols)) = parts.iter().find(|(x, cols)| x.len() < rows * cols) {
            return Err(Error::Device(format!("concat_columns: {} values for {rows} rows of {cols}", x.len())));
        }
        let row = |r: usize| parts.iter().flat_map(move |(x, cols)| x[r * cols..(r + 1) * cols].iter().copied());
        Ok((0..rows).flat_map(row).collect())
    }

    fn route(
        &self,
        logits: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        e: usize,
        rc: &RouterConfig,
    ) -> Result<(Vec<i32>, Vec<f32>, Vec<f32>)> {
        let routes: Vec<_> = logits.chunks_exact(e).take(n).map(|l| route(rc, l, bias)).collect();
        let ids = routes.iter().flat_map(|r| r.ids.iter().map(|&i| i as i32)).collect();
        let weights = routes.iter().flat_map(|r| r.weights.iter().copied()).collect();
        Ok((ids, weights, routes.iter().map(|r| r.margin).collect()))
    }

    fn bias_changed(&self, ids: &Vec<i32>, plain: &Vec<i32>, n: usize, k: usize) -> Result<Vec<i32>> {
        let sorted = |r: &[i32]| {
            let mut r = r.to_vec();
            r.sort_unstable();
            r
        };
        let rows = ids.chunks_exact(k.max(1)).zip(plain.chunks_exact(k.max(1))).take(n);
        Ok(rows.map(|(a, b)| i32::from(sorted(a) != sorted(b))).collect())
    }

    fn index_scores(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        w: &Vec<f32>,
        [batch, s, t, n, d, offset]: [usize; 6],
        scale: f32,
    ) -> Result<Vec<f32>> {
        let mut out = vec![f32::NEG_INFINITY; batch * s * t];
        for row in 0..batch * s {
            let b = row / s;
            for key in 0..=(offset + row % s).min(t - 1) {
                let kv = &k[(b * t + key) * d..(b * t + key + 1) * d];
                out[row * t + key] = (0..n)
                    .map(|h| {
                        let qv = &q[(row * n + h) * d..(row * n + h + 1) * d];
                        let dot: f32 = qv.iter().zip(kv).map(|(a, b)| a * b).sum();
                        (dot * scale).max(0.0) * w[row * n + h]
                    })
                    .sum();
            }
        }
        Ok(out)
    }

    fn topk_causal(
        &self,
        scores: &Vec<f32>,
        rows: usize,
        s: usize,
        t: usize,
        offset: usize,
        k: usize,
    ) -> Result<(Vec<i32>, Vec<f32>)> {
        super::check_topk_causal(rows, s, t, offset, k)?;
        let sel = top_k_causal(&scores[..rows * t], rows / s, s, offset, k);
        Ok((sel.idx.iter().map(|&i| i as i32).collect(), sel.margin))
    }

    fn sparse_attention(
        &self,
        q: &Vec<f32>,
        kv: &Vec<f32>,
        k_rope: &Vec<f32>,
        idx: &Vec<i32>,
        [batch, s, t, nh, nope, rd, vd, kk, offset]: [usize; 9],
        scale: f32,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; batch * s * nh * vd];
        for row in 0..batch * s {
            let (b, p) = (row / s, offset + row % s);
            let keys: Vec<usize> = idx[row * kk..(row + 1) * kk]
                .iter()
                .filter_map(|&j| usize::try_from(j).ok())
                .filter(|&j| j <= p && j < t)
                .collect();
            for h in 0..nh {
                let qv = &q[(row * nh + h) * (nope + rd)..(row * nh + h + 1) * (nope + rd)];
                let scores: Vec<f32> = keys
                    .iter()
                    .map(|&j| {
                        let kn = &kv[((b * t + j) * nh + h) * (nope + vd)..];
                        let kr = &k_rope[(b * t + j) * rd..(b * t + j + 1) * rd];
                        let dot = (0..nope).map(|i| qv[i] * kn[i]).sum::<f32>()
                            + (0..rd).map(|i| qv[nope + i] * kr[i]).sum::<f32>();
                        dot * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|v| (v - max).exp()).collect();
                let z: f32 = e.iter().sum();
                for c in 0..vd {
                    let acc: f32 = keys
                        .iter()
                        .zip(&e)
                        .map(|(&j, p)| p * kv[((b * t + j) * nh + h) * (nope + vd) + nope + c])
                        .sum();
                    out[(row * nh + h) * vd + c] = acc / z;
                }
            }
        }
        Ok(out)
    }

    fn gather_rows(&self, x: &Vec<f32>, rows: &Vec<i32>, n: usize, cols: usize) -> Result<Vec<f32>> {
        Ok(rows[..n].iter().flat_map(|&r| x[r as usize * cols..(r as usize + 1) * cols].iter().copied()).collect())
    }

    fn combine(
        &self,
        y: &Vec<f32>,
        ids: &Vec<i32>,
        slot: &Vec<i32>,
        w: &Vec<f32>,
        shared: &Vec<f32>,
        [n, k, cols]: [usize; 3],
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n * cols];
        for t in 0..n {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by_key(|&j| ids[t * k + j]);
            for c in 0..cols {
                let acc: f32 = order.iter().map(|&j| w[t * k + j] * y[slot[t * k + j] as usize * cols + c]).sum();
                out[t * cols + c] = acc + shared[t * cols + c];
            }
        }
        Ok(out)
    }
}
