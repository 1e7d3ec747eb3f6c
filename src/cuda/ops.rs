//! The device forward pass's operations ([`Ops`]) on one GPU (or its host emulation): our
//! kernels for everything but the matrix products, which go through cuBLAS in the chosen
//! precision (`gemm`), and the attention's quadratic steps, which are cuBLAS products around
//! kernels of ours (`attention`).

use super::attention::{self, AttentionPath, AttentionPlan, Workspace};
use super::gemm::{DeviceWeight, Products};
use super::gpu::{Buf, Gpu};
use crate::device::{HostWeight, Ops, Precision};
use crate::error::{Error, Result};
use crate::model::moe::RouterConfig;

pub struct CudaOps {
    pub gpu: Gpu,
    products: Products,
    workspace: Workspace,
    /// How [`Ops::sparse_attention`] runs (a Cell: selftest moves one ops between paths).
    attention: std::cell::Cell<AttentionPlan>,
}

impl CudaOps {
    pub fn new(gpu: Gpu, precision: Precision) -> Result<Self> {
        let products = Products::new(&gpu, precision)?;
        Ok(CudaOps { gpu, products, workspace: Workspace::default(), attention: Default::default() })
    }

    /// These ops with the attention run as `plan` says (the tests check every path).
    pub fn with_attention(self, plan: AttentionPlan) -> Self {
        self.attention.set(plan);
        self
    }

    /// From now on, the attention runs as `plan` says.
    pub fn set_attention(&self, plan: AttentionPlan) {
        self.attention.set(plan);
    }

    /// [`Ops::index_scores`] as `plan` chunks it.
    pub fn index_scores_with(
        &self,
        plan: AttentionPlan,
        (q, k, w): (&Buf<f32>, &Buf<f32>, &Buf<f32>),
        dims: [usize; 6],
        scale: f32,
    ) -> Result<Buf<f32>> {
        let on = (&self.gpu, &self.products, &self.workspace);
        attention::index_scores(on, plan.chunk_values, (q, k, w), dims, scale)
    }

    /// [`Ops::index_topk`] as `plan` chunks it.
    pub fn index_topk_with(
        &self,
        plan: AttentionPlan,
        (q, k, w): (&Buf<f32>, &Buf<f32>, &Buf<f32>),
        dims: [usize; 6],
        scale: f32,
        kk: usize,
    ) -> Result<(Buf<i32>, Buf<f32>)> {
        let on = (&self.gpu, &self.products, &self.workspace);
        attention::index_topk(on, plan.chunk_values, (q, k, w), dims, scale, kk)
    }

    /// [`Ops::sparse_attention`] on the path `plan` gives (or the one the sizes choose).
    pub fn sparse_attention_with(
        &self,
        plan: AttentionPlan,
        (q, kv, k_rope, idx): (&Buf<f32>, &Buf<f32>, &Buf<f32>, &Buf<i32>),
        dims: [usize; 9],
        scale: f32,
    ) -> Result<Buf<f32>> {
        let [b, s, t, nh, _, _, vd, k, _] = dims;
        match plan.path.unwrap_or_else(|| AttentionPath::choose(t, k)) {
            AttentionPath::Gathered => {
                let mut y = self.gpu.output(b * s * nh * vd)?;
                self.gpu.sparse_attention(q, kv, k_rope, idx, &mut y, dims, scale)?;
                Ok(y)
            }
            AttentionPath::Masked => {
                let on = (&self.gpu, &self.products, &self.workspace);
                attention::masked(on, plan.chunk_values, (q, kv, k_rope, idx), dims, scale)
            }
            AttentionPath::Fused => {
                let on = (&self.gpu, &self.products, &self.workspace);
                attention::fused(on, plan.chunk_values, (q, kv, k_rope, idx), dims, scale)
            }
        }
    }

    pub fn precision(&self) -> Precision {
        self.products.precision
    }
}

impl Ops for CudaOps {
    type F = Buf<f32>;
    type I = Buf<i32>;
    type W = DeviceWeight;

    fn upload_weight(&self, w: HostWeight, n: usize, k: usize) -> Result<DeviceWeight> {
        if w.rows(k) != Some(n) {
            return Err(crate::error::Error::Device(format!("a weight uploaded as {n} x {k} is not {n} rows of {k}")));
        }
        self.products.upload_weight(&self.gpu, w, k)
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
        self.gpu.zeros(n)
    }
    fn output(&self, n: usize) -> Result<Self::F> {
        self.gpu.output(n)
    }

    fn gemm_rows(
        &self,
        x: &Self::F,
        x_row0: usize,
        w: &DeviceWeight,
        y: &mut Self::F,
        y_row0: usize,
        mnk: [usize; 3],
        alpha: f32,
    ) -> Result<()> {
        self.products.gemm_rows(&self.gpu, x, x_row0, w, y, y_row0, mnk, alpha)
    }

    fn gemm_groups(
        &self,
        x: (&Self::F, Option<&Self::I>),
        groups: &[(&DeviceWeight, usize, usize)],
        y: &mut Self::F,
        nk: [usize; 2],
    ) -> Result<()> {
        self.products.gemm_groups(&self.gpu, x, groups, y, nk)
    }

    fn synchronize(&self) -> Result<()> {
        self.gpu.synchronize()
    }

    fn set_step_profiling(&self, on: bool) {
        self.workspace.set_profiling(on);
    }

    fn step_profile(&self) -> Option<crate::device::profile::Profile> {
        self.workspace.profile()
    }

    fn rms_norm(&self, x: &Self::F, w: &Self::F, rows: usize, cols: usize, eps: f32) -> Result<Self::F> {
        let mut y = self.gpu.output(rows * cols)?;
        self.gpu.rms_norm(x, w, &mut y, rows, cols, eps)?;
        Ok(y)
    }

    fn layer_norm(&self, x: &Self::F, w: &Self::F, b: &Self::F, rows: usize, cols: usize, eps: f32) -> Result<Self::F> {
        let mut y = self.gpu.output(rows * cols)?;
        self.gpu.layer_norm(x, w, b, &mut y, rows, cols, eps)?;
        Ok(y)
    }

    fn row_l2_norm(&self, x: &Self::F, rows: usize, cols: usize) -> Result<Self::F> {
        let mut y = self.gpu.output(rows)?;
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

    fn swiglu(&self, gate_up: &Self::F, rows: usize, inter: usize) -> Result<Self::F> {
        let mut y = self.gpu.output(rows * inter)?;
        self.gpu.swiglu(gate_up, &mut y, rows, inter)?;
        Ok(y)
    }

    fn add(&self, a: &Self::F, b: &Self::F, n: usize) -> Result<Self::F> {
        let mut y = self.gpu.output(n)?;
        self.gpu.add(a, b, &mut y, n)?;
        Ok(y)
    }

    fn columns(&self, x: &Self::F, shape: [usize; 2], col0: usize, cols: usize) -> Result<Self::F> {
        let mut y = self.gpu.output(shape[0] * cols)?;
        self.gpu.columns((x, shape, col0), (&mut y, cols, 0), cols)?;
        Ok(y)
    }

    fn concat_columns(&self, parts: &[(&Self::F, usize)], rows: usize) -> Result<Self::F> {
        let width = parts.iter().map(|p| p.1).sum();
        let (mut y, mut col0) = (self.gpu.output(rows * width)?, 0);
        for &(x, cols) in parts {
            self.gpu.columns((x, [rows, cols], 0), (&mut y, width, col0), cols)?;
            col0 += cols;
        }
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
        let (mut ids, mut w, mut m) =
            (self.gpu.zeros(n * rc.top_k)?, self.gpu.output(n * rc.top_k)?, self.gpu.output(n)?);
        self.gpu.route(logits, bias, n, e, rc, &mut ids, &mut w, &mut m)?;
        Ok((ids, w, m))
    }

    fn bias_changed(&self, ids: &Self::I, plain: &Self::I, n: usize, k: usize) -> Result<Self::I> {
        let mut y = self.gpu.zeros(n)?;
        self.gpu.bias_changed(ids, plain, &mut y, n, k)?;
        Ok(y)
    }

    fn index_scores(&self, q: &Self::F, k: &Self::F, w: &Self::F, dims: [usize; 6], scale: f32) -> Result<Self::F> {
        self.index_scores_with(self.attention.get(), (q, k, w), dims, scale)
    }

    fn index_topk(
        &self,
        q: &Self::F,
        keys: &Self::F,
        w: &Self::F,
        dims: [usize; 6],
        scale: f32,
        k: usize,
    ) -> Result<(Self::I, Self::F)> {
        self.index_topk_with(self.attention.get(), (q, keys, w), dims, scale, k)
    }

    fn every_key(&self, rows: usize, k: usize) -> Result<(Self::I, Self::F)> {
        let (mut idx, mut margin) = (self.gpu.zeros(rows * k)?, self.gpu.output(rows)?);
        self.gpu.every_key(&mut idx, &mut margin, 0, rows, k)?;
        Ok((idx, margin))
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
        crate::device::check_topk_causal(rows, s, t, offset, k)?; // the contract, as on the CPU
        let (mut idx, mut m) = (self.gpu.zeros(rows * k)?, self.gpu.output(rows)?);
        self.gpu.topk_causal_by(self.gpu.topk_path(t, k), scores, [rows, s, t, offset, k], &mut idx, &mut m)?;
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
        self.sparse_attention_with(self.attention.get(), (q, kv, k_rope, idx), dims, scale)
    }

    /// On the device: the groups' sizes (`expert_counts`) are all that is copied back.
    fn dispatch(&self, ids: &Self::I, n: usize, k: usize, e: usize) -> Result<(Vec<usize>, Self::I, Self::I)> {
        let pairs = crate::device::dispatch_pairs(ids.len(), n, k)?;
        let mut counts = self.gpu.filled(e, 0i32)?;
        self.gpu.expert_counts(ids, pairs, e, &mut counts)?;
        let counts: Vec<usize> = self.gpu.download(&counts)?.into_iter().map(|c| c.max(0) as usize).collect();
        if counts.iter().sum::<usize>() != pairs {
            return Err(Error::Device(format!("the router chose an expert outside 0..{e}")));
        }
        let offsets: Vec<i32> =
            counts.iter().scan(0, |start, &c| Some(std::mem::replace(start, *start + c) as i32)).collect();
        let (mut slot, mut rows) = (self.gpu.filled(pairs, -1i32)?, self.gpu.filled(pairs, -1i32)?);
        self.gpu.moe_dispatch(ids, &self.gpu.upload(&offsets)?, &mut slot, &mut rows, pairs, k, e)?;
        Ok((counts, slot, rows))
    }

    fn gather_rows(&self, x: &Self::F, rows: &Self::I, n: usize, cols: usize) -> Result<Self::F> {
        let mut y = self.gpu.output(n * cols)?;
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
        let mut out = self.gpu.output(n * cols)?;
        self.gpu.combine(y, ids, slot, w, shared, &mut out, n, k, cols)?;
        Ok(out)
    }
}
