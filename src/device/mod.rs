//! The forward pass written against a small set of device operations ([`Ops`]), one per kernel
//! of the CUDA backend, so the same orchestration runs on the GPU (`cuda::ops`, feature `cuda`)
//! and on [`cpu::CpuOps`], a plain-slice implementation whose every op computes what its kernel
//! computes. The tests run this forward pass on `CpuOps` against every golden case, which checks
//! the orchestration and the ops' contracts without a GPU; `glimpse selftest --device cuda`
//! checks each CUDA kernel against its CPU reference and then runs this forward pass on the GPU.

pub mod cpu;
pub mod forward;
pub mod profile;
mod weights;

use candle_core::Tensor;

use crate::config::Config;
use crate::error::Result;
use crate::hooks::{Observer, SweepObserver};
use crate::model::moe::RouterConfig;
use crate::model::mtp::Mtp;
use crate::model::{Model, Tokens, Weights};

/// Where the forward pass runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The CPU model (`crate::model`), with every feature (replay, isolation, streaming, decode).
    Cpu,
    /// The device forward pass on the host implementation of its ops: the GPU path's code,
    /// checkable on any machine.
    CpuOps,
    /// The device forward pass on the GPU (a build with `--features cuda`).
    Cuda,
    /// The device forward pass through the CUDA kernels' own source run on the host (`cuda::emu`,
    /// a build with `--features cuda`): checks the kernels without a GPU; slow.
    CudaEmu,
}

impl Backend {
    /// As `--device` spells it.
    pub fn flag(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::CpuOps => "cpu-ops",
            Backend::Cuda => "cuda",
            Backend::CudaEmu => "cuda-emu",
        }
    }
}

/// The arithmetic of the device's matrix products (`--precision`; CUDA backends only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// f32 in, f32 accumulate (cuBLAS SGEMM; bf16 weights widened exactly): held to the spec's
    /// default tolerance.
    #[default]
    F32,
    /// bf16 in (weights as stored or rounded once at upload, activations rounded before each
    /// product), f32 accumulate, on tensor cores. The attention's products take q, k, the
    /// probabilities and v rounded to bf16, as a bf16 flash attention does (the gathered kernel,
    /// past 16k tokens, computes in f32); the indexer's are
    /// split bf16 (each operand `hi + lo`, three bf16 products: about 16 mantissa bits), since
    /// transformers computes them in f32 in a bf16 run too. Held to atol = rtol = 2e-2.
    Bf16,
}

impl Precision {
    /// The tolerance a verification of this precision is held to by default.
    pub fn tolerance(self) -> crate::compare::Tolerance {
        match self {
            Precision::F32 => crate::compare::Tolerance::default(),
            Precision::Bf16 => crate::compare::Tolerance { atol: 2e-2, rtol: 2e-2 },
        }
    }

    /// The reference dump a case folder holds for this precision: transformers' run with bf16
    /// products (`reference-bf16.safetensors`, from `golden/reference.py --products bf16`) for
    /// bf16 where the folder has one, else the f32 `reference.safetensors`.
    pub fn reference_in(self, dir: &std::path::Path) -> std::path::PathBuf {
        let bf16 = dir.join(BF16_REFERENCE);
        match self {
            Precision::Bf16 if bf16.is_file() => bf16,
            _ => dir.join("reference.safetensors"),
        }
    }
}

/// A case folder's reference for bf16 products (`golden/reference.py --products bf16`).
pub const BF16_REFERENCE: &str = "reference-bf16.safetensors";

/// How the CUDA backends compute attention over DSA's selection (`--attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Attention {
    /// `masked` while the causal keys are at most 8 times the selected ones (every prefill up to
    /// 16k tokens on GLM-5), `gathered` past that.
    #[default]
    Auto,
    /// Every causal key's score by cuBLAS, masked to the selection, then a softmax and `P v`.
    Masked,
    /// bf16 only: the masked form in one flash-attention kernel on tensor cores, the scores
    /// never in memory. Not yet timed on a GPU. Like `masked`, it holds every key and value
    /// rounded to bf16 (1 KB a key and head at GLM-5's widths) and computes every causal key:
    /// past 16k tokens, where `auto` takes `gathered`, that grows with the context.
    Fused,
    /// One thread block per (query, head) over its selected keys only.
    Gathered,
}

/// Where and how a prefill runs: `--device`, `--ordinal`, `--precision`, `--attention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub backend: Backend,
    /// Which GPU (CUDA device ordinal).
    pub ordinal: usize,
    pub precision: Precision,
    pub attention: Attention,
}

impl From<Backend> for Target {
    fn from(backend: Backend) -> Target {
        Target { backend, ordinal: 0, precision: Precision::F32, attention: Attention::Auto }
    }
}

impl Target {
    /// As run and verify print it, and as dumps' `source` records it.
    pub fn describe(self) -> String {
        let name = match self.backend {
            Backend::Cuda => format!("cuda (GPU {})", self.ordinal),
            other => other.flag().to_string(),
        };
        let attention = match self.attention {
            Attention::Auto => "",
            Attention::Masked => ", masked attention",
            Attention::Fused => ", fused attention",
            Attention::Gathered => ", gathered attention",
        };
        match self.precision {
            Precision::F32 => format!("{name}, float32{attention}"),
            Precision::Bf16 => format!("{name}, bf16 products with float32 accumulation{attention}"),
        }
    }

    /// Refuses a precision the backend does not have (only the CUDA backends compute in bf16).
    pub fn check(self) -> Result<Target> {
        match (self.backend, self.precision) {
            (Backend::Cpu | Backend::CpuOps, Precision::Bf16) => Err(crate::error::Error::Usage(
                "--precision bf16 needs --device cuda or cuda-emu (the CPU paths compute in f32)".into(),
            )),
            (Backend::Cpu | Backend::CpuOps | Backend::CudaEmu, _) if self.ordinal != 0 => {
                Err(crate::error::Error::Usage(format!("--ordinal {} needs --device cuda", self.ordinal)))
            }
            (Backend::Cpu | Backend::CpuOps, _) if self.attention != Attention::Auto => {
                Err(crate::error::Error::Usage(
                    "--attention needs --device cuda or cuda-emu (the CPU paths have only their own)".into(),
                ))
            }
            (_, Precision::F32) if self.attention == Attention::Fused => {
                Err(crate::error::Error::Usage("--attention fused computes in bf16 only: add --precision bf16".into()))
            }
            _ => Ok(self),
        }
    }

    /// Refuses, before anything is loaded, a config this backend's forward pass cannot run (the
    /// CPU model runs every config that validates): the device paths have no attention bias yet,
    /// and the CUDA router's warp holds at most 256 experts, 32 groups and a top-15.
    pub fn supports(self, config: &Config) -> Result<()> {
        let usage = |what: String| Err(crate::error::Error::Usage(what));
        if self.backend == Backend::Cpu {
            return Ok(());
        }
        let device = self.backend.flag();
        if config.attention_bias {
            return usage(format!(
                "attention_bias is true in the config: --device {device} has no attention bias yet \
                 (--device cpu runs it)"
            ));
        }
        let moe = config.num_nextn_predict_layers > 0
            || (0..config.num_hidden_layers).any(|i| config.mlp_kind(i) == crate::config::MlpKind::Moe);
        let (e, k, g) = (config.n_routed_experts, config.num_experts_per_tok, config.n_group);
        if self.backend != Backend::CpuOps && moe && !route_fits(e, k, g) {
            return usage(format!(
                "{e} routed experts, top-{k} in {g} groups in the config: the CUDA router takes at most \
                 {ROUTE_MAX_EXPERTS} experts, a top-{ROUTE_MAX_TOP_K} and {ROUTE_MAX_GROUPS} groups \
                 (--device cpu or cpu-ops run it)"
            ));
        }
        Ok(())
    }
}

/// The CUDA router kernel's bounds (`router.cu`: a warp a token, 8 experts a lane, one group a
/// lane, the top-k and one more held sorted in 16 slots).
pub const ROUTE_MAX_EXPERTS: usize = 256;
pub const ROUTE_MAX_GROUPS: usize = 32;
pub const ROUTE_MAX_TOP_K: usize = 15;

/// Whether the CUDA router takes `experts` experts, a top-`top_k` and `groups` groups (top_k <= e,
/// or it would read the logits at choices it never made; whole groups).
pub fn route_fits(experts: usize, top_k: usize, groups: usize) -> bool {
    (1..=ROUTE_MAX_TOP_K.min(experts)).contains(&top_k)
        && experts <= ROUTE_MAX_EXPERTS
        && (1..=ROUTE_MAX_GROUPS).contains(&groups)
        && experts.is_multiple_of(groups)
}

/// Runs a prefill: the CPU model, or the device forward pass on some ops.
pub trait Prefill {
    /// The prefill's hook points, and its logits: every position's [B, S, vocab] where `obs`
    /// records them, else the last position's [B, 1, vocab], all the next token needs (at
    /// GLM-5's vocabulary, 4096 positions' f32 logits are 2.5 GB, and their lm_head 7.8 TFLOP).
    fn prefill(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor>;
    /// The prefill's hook points up to those of layer `last` (`audit --layers`, which needs
    /// nothing past it); the whole prefill's where `last` is the last layer.
    fn prefill_through(&self, tokens: &Tokens, last: usize, obs: &mut dyn Observer) -> Result<()>;
    /// `prompts` through their embeddings and layers 0..=`last`, layer by layer (`audit
    /// --stream`): each layer's weights are made ready (streamed: read, and uploaded) once for
    /// every prompt, and each prompt's hidden state is kept between layers. Returns the last
    /// layer run (before `last` where `obs` stopped the sweep).
    fn sweep(&self, prompts: &[&Tokens], last: usize, obs: &mut dyn SweepObserver) -> Result<usize>;
    /// The MTP head `head` over `hidden` [B, S-1, hidden] (the prefill's final norm at positions
    /// 0..S-2) and `tokens` [B, S] -> draft logits [B, S-1, vocab] where `obs` records them, else
    /// the last position's [B, 1, vocab] (as [`Prefill::prefill`]'s), where the prefill runs (it
    /// needs the resident model).
    fn mtp(&self, head: &Mtp, hidden: &Tensor, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor>;
}

impl Prefill for Model {
    fn prefill(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        Weights::Resident(self).prefill(tokens, obs)
    }
    fn prefill_through(&self, tokens: &Tokens, last: usize, obs: &mut dyn Observer) -> Result<()> {
        Weights::Resident(self).prefill_through(tokens, last, obs)
    }
    fn sweep(&self, prompts: &[&Tokens], last: usize, obs: &mut dyn SweepObserver) -> Result<usize> {
        Weights::Resident(self).sweep(prompts, last, obs)
    }
    fn mtp(&self, head: &Mtp, hidden: &Tensor, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        head.forward_rows(self, hidden, tokens, crate::model::stream::LogitRows::Last, obs)
    }
}

/// The CPU model over resident or streamed weights.
impl Prefill for Weights<'_> {
    fn prefill(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        crate::model::stream::run(*self, tokens, (None, None), crate::model::stream::LogitRows::Last, obs)?
            .ok_or_else(|| crate::error::Error::Usage("the forward pass stopped before the head".into()))
    }
    fn prefill_through(&self, tokens: &Tokens, last: usize, obs: &mut dyn Observer) -> Result<()> {
        let last = last.min(self.config().num_hidden_layers.saturating_sub(1));
        let rows = crate::model::stream::LogitRows::Last;
        crate::model::stream::run(*self, tokens, (Some(0..=last), None), rows, obs).map(|_| ())
    }
    fn sweep(&self, prompts: &[&Tokens], last: usize, obs: &mut dyn SweepObserver) -> Result<usize> {
        crate::model::stream::sweep(*self, prompts, last, obs)
    }
    fn mtp(&self, head: &Mtp, hidden: &Tensor, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        match self {
            Weights::Resident(model) => model.mtp(head, hidden, tokens, obs),
            Weights::Streamed(_) => Err(crate::model::mtp::needs_resident()),
        }
    }
}

impl<O: Ops> Prefill for forward::DeviceModel<'_, O> {
    fn prefill(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        match obs.wants_every_position(crate::hooks::HookPoint::Logits) {
            true => self.forward(tokens, obs),
            false => self.forward_last(tokens, obs),
        }
    }
    fn prefill_through(&self, tokens: &Tokens, last: usize, obs: &mut dyn Observer) -> Result<()> {
        self.forward_through(tokens, last, obs)
    }
    fn sweep(&self, prompts: &[&Tokens], last: usize, obs: &mut dyn SweepObserver) -> Result<usize> {
        forward::DeviceModel::sweep(self, prompts, last, obs)
    }
    fn mtp(&self, head: &Mtp, hidden: &Tensor, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        self.mtp_rows(head, hidden, tokens, crate::model::stream::LogitRows::Last, obs)
    }
}

/// Calls `f` with the prefill `target` describes over `weights` (a device model is built, and its
/// weights uploaded, once for all of `f`'s calls; streamed weights upload each layer as it runs).
pub fn with_prefill<R>(target: Target, weights: Weights, f: impl FnOnce(&dyn Prefill) -> Result<R>) -> Result<R> {
    match target.check()?.backend {
        Backend::Cpu => f(&weights),
        Backend::CpuOps => f(&device_model(&cpu::CpuOps, weights)?),
        Backend::Cuda | Backend::CudaEmu => on_cuda(target, weights, f),
    }
}

/// The device model of `weights` on `ops`: resident, or streamed layer by layer.
fn device_model<'m, O: Ops>(ops: &'m O, weights: Weights<'m>) -> Result<forward::DeviceModel<'m, O>> {
    match weights {
        Weights::Resident(model) => forward::DeviceModel::new(ops, model),
        Weights::Streamed(ckpt) => Ok(forward::DeviceModel::streamed(ops, ckpt)),
    }
}

#[cfg(feature = "cuda")]
fn on_cuda<R>(target: Target, weights: Weights, f: impl FnOnce(&dyn Prefill) -> Result<R>) -> Result<R> {
    let ops = cuda_ops(target)?;
    f(&device_model(&ops, weights)?)
}

#[cfg(not(feature = "cuda"))]
fn on_cuda<R>(_: Target, _: Weights, _: impl FnOnce(&dyn Prefill) -> Result<R>) -> Result<R> {
    Err(no_cuda())
}

/// The CUDA ops a CUDA target runs on: GPU `ordinal`, or the host emulation of the kernels.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_ops(target: Target) -> Result<crate::cuda::ops::CudaOps> {
    let gpu = match target.backend {
        Backend::CudaEmu => crate::cuda::gpu::Gpu::emulated(),
        _ => crate::cuda::gpu::Gpu::open(target.ordinal)?,
    };
    use crate::cuda::attention::{AttentionPath, AttentionPlan};
    let path = AttentionPath::asked(target.attention);
    Ok(crate::cuda::ops::CudaOps::new(gpu, target.precision)?
        .with_attention(AttentionPlan { path, ..Default::default() }))
}

/// (free, total) bytes of the GPU a `cuda` target runs on; None for every other target, and in a
/// build without the `cuda` feature (whose run then says so).
pub fn gpu_memory(target: Target) -> Result<Option<(u64, u64)>> {
    #[cfg(feature = "cuda")]
    if target.backend == Backend::Cuda {
        let (free, total) = crate::cuda::gpu::Gpu::free_memory(target.ordinal)?;
        return Ok(Some((free as u64, total as u64)));
    }
    let _ = target;
    Ok(None)
}

/// What asking for the GPU says in a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub(crate) fn no_cuda() -> crate::error::Error {
    crate::error::Error::Device(
        "this glimpse was built without the `cuda` feature: cargo build --release --features cuda".into(),
    )
}

/// The contract of [`Ops::topk_causal`], checked the same way on every backend.
pub(crate) fn check_topk_causal(rows: usize, s: usize, t: usize, offset: usize, k: usize) -> Result<()> {
    if s == 0 || offset + s != t || !rows.is_multiple_of(s) || k == 0 || k > t {
        return Err(crate::error::Error::Device(format!(
            "topk_causal: {rows} rows of {s} queries after {offset} do not fit {t} keys (k {k})"
        )));
    }
    Ok(())
}

/// A `[n, k]` weight as the checkpoint holds it, to upload with [`Ops::upload_weight`].
#[derive(Clone, Copy)]
pub enum HostWeight<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns: kept as bf16 on the device and widened (exactly) for each product.
    Bf16(&'a [u16]),
    /// Block-FP8 codes and their scale grid: kept so on the device and dequantised for each
    /// product.
    Fp8(&'a crate::model::fp8::Fp8Weight),
    /// Weights of the same input width stacked by rows (an MLP's gate and up, so one product
    /// computes both): one weight where the parts can be joined as stored, else kept apart.
    Stacked(&'a [HostWeight<'a>]),
}

impl HostWeight<'_> {
    /// Rows of this weight as `[rows, k]`; None when its values are not whole rows of `k` (or,
    /// for FP8, its width is not `k`).
    pub fn rows(&self, k: usize) -> Option<usize> {
        let whole = |len: usize| (k > 0 && len.is_multiple_of(k)).then(|| len / k);
        match self {
            HostWeight::F32(v) => whole(v.len()),
            HostWeight::Bf16(b) => whole(b.len()),
            HostWeight::Fp8(w) => (w.shape()[1] == k).then(|| w.shape()[0]),
            HostWeight::Stacked(parts) => parts.iter().map(|p| p.rows(k)).sum(),
        }
    }

    /// The values, decoded to f32 (the host's products use them so).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostWeight::F32(v) => v.to_vec(),
            HostWeight::Bf16(bits) => bits.iter().map(|&b| crate::model::gemv::widen(b)).collect(),
            HostWeight::Fp8(w) => w.to_f32(),
            HostWeight::Stacked(parts) => parts.iter().flat_map(|p| p.to_f32()).collect(),
        }
    }
}

/// Row-major f32 and i32 buffers on a device, weights kept as stored, and the operations the
/// forward pass needs. Shapes are passed explicitly; every op allocates its output (except
/// `rope`, in place).
pub trait Ops {
    type F;
    type I;
    /// A `[n, k]` weight.
    type W;

    fn upload_weight(&self, w: HostWeight, n: usize, k: usize) -> Result<Self::W>;

    fn upload(&self, v: &[f32]) -> Result<Self::F>;
    fn upload_i32(&self, v: &[i32]) -> Result<Self::I>;
    fn download(&self, b: &Self::F) -> Result<Vec<f32>>;
    fn download_i32(&self, b: &Self::I) -> Result<Vec<i32>>;
    fn zeros(&self, n: usize) -> Result<Self::F>;
    /// A buffer the op it is made for writes whole: uninitialised on a GPU, NaN on the host
    /// backends, so that an element an op leaves unwritten shows in every check.
    fn output(&self, n: usize) -> Result<Self::F>;

    /// `y[m, n] = alpha * x[m, k] w[n, k]^T`, for rows `x_row0 .. x_row0 + m` of `x`, written to
    /// rows `y_row0 .. y_row0 + m` of `y` (the expert GEMMs work on row ranges of packed buffers).
    #[allow(clippy::too_many_arguments)]
    fn gemm_rows(
        &self,
        x: &Self::F,
        x_row0: usize,
        w: &Self::W,
        y: &mut Self::F,
        y_row0: usize,
        mnk: [usize; 3],
        alpha: f32,
    ) -> Result<()>;

    /// Waits for the work queued so far (a GPU's stream; nothing to wait for on the host).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Starts (or stops) timing the backend's own steps inside its ops (the CUDA backend's
    /// attention and indexer: splits, products, masks, top-k); nothing to time by default.
    fn set_step_profiling(&self, _on: bool) {}

    /// The steps timed since [`Ops::set_step_profiling`] started them (None where not timed).
    fn step_profile(&self) -> Option<profile::Profile> {
        None
    }

    /// The expert GEMMs: for each group `(w, start, count)`, packed rows `start .. start +
    /// count` [*, k] times `w` [n, k]^T into the same rows of `y` [*, n]. The packed rows are
    /// `x`'s own, or with `gather` (the dispatch's `rows`) packed row `i` is `x[gather[i]]`. One
    /// op, so a device can prepare the activations once for all of them (bf16 mode gathers and
    /// rounds them in one pass).
    fn gemm_groups(
        &self,
        (x, gather): (&Self::F, Option<&Self::I>),
        groups: &[(&Self::W, usize, usize)],
        y: &mut Self::F,
        [n, k]: [usize; 2],
    ) -> Result<()> {
        let packed = match gather {
            Some(rows) => Some(self.gather_rows(x, rows, groups.iter().map(|g| g.1 + g.2).max().unwrap_or(0), k)?),
            None => None,
        };
        let x = packed.as_ref().unwrap_or(x);
        for &(w, start, count) in groups {
            self.gemm_rows(x, start, w, y, start, [count, n, k], 1.0)?;
        }
        Ok(())
    }

    /// `alpha * x w^T`: [m, k] x [n, k] -> [m, n].
    fn matmul_nt(&self, x: &Self::F, w: &Self::W, mnk: [usize; 3], alpha: f32) -> Result<Self::F> {
        let mut y = self.output(mnk[0] * mnk[1])?;
        self.gemm_rows(x, 0, w, &mut y, 0, mnk, alpha)?;
        Ok(y)
    }

    fn rms_norm(&self, x: &Self::F, w: &Self::F, rows: usize, cols: usize, eps: f32) -> Result<Self::F>;
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(&self, x: &Self::F, w: &Self::F, b: &Self::F, rows: usize, cols: usize, eps: f32) -> Result<Self::F>;
    fn row_l2_norm(&self, x: &Self::F, rows: usize, cols: usize) -> Result<Self::F>;
    /// Interleaved RoPE in place; `dims` = [rows, seq, heads, width, start, half].
    fn rope(&self, x: &mut Self::F, cos: &Self::F, sin: &Self::F, dims: [usize; 6]) -> Result<()>;
    /// SwiGLU over the fused gate and up products: [rows, 2 * inter] (gate half, then up half)
    /// -> silu(gate) * up, [rows, inter].
    fn swiglu(&self, gate_up: &Self::F, rows: usize, inter: usize) -> Result<Self::F>;
    fn add(&self, a: &Self::F, b: &Self::F, n: usize) -> Result<Self::F>;
    /// Columns `col0 .. col0 + cols` of x (`shape` [rows, width]), as a buffer [rows, cols] of their own.
    fn columns(&self, x: &Self::F, shape: [usize; 2], col0: usize, cols: usize) -> Result<Self::F>;
    /// `parts` ([rows, cols] each) side by side: [rows, sum of cols].
    fn concat_columns(&self, parts: &[(&Self::F, usize)], rows: usize) -> Result<Self::F>;
    /// The fused router: logits `[n, e]` -> (ids `[n, k]`, weights `[n, k]`, margin `[n]`).
    fn route(
        &self,
        logits: &Self::F,
        bias: &Self::F,
        n: usize,
        e: usize,
        rc: &RouterConfig,
    ) -> Result<(Self::I, Self::F, Self::F)>;
    /// Whether each token's chosen experts (ids [n, k]) differ, as a set, from `plain` (the
    /// route without the correction bias): `[n]` of 1 or 0.
    fn bias_changed(&self, ids: &Self::I, plain: &Self::I, n: usize, k: usize) -> Result<Self::I>;
    /// dims = [B, S, T, n_heads, head_dim, offset] -> scores [B, S, T].
    fn index_scores(&self, q: &Self::F, k: &Self::F, w: &Self::F, dims: [usize; 6], scale: f32) -> Result<Self::F>;
    /// scores `[rows, T]` -> (idx `[rows, k]`, margin `[rows]`) for queries at `offset + row % s`.
    #[allow(clippy::too_many_arguments)]
    fn topk_causal(
        &self,
        scores: &Self::F,
        rows: usize,
        s: usize,
        t: usize,
        offset: usize,
        k: usize,
    ) -> Result<(Self::I, Self::F)>;
    /// The indexer's selection, `index_scores` then `topk_causal` of `k` (dims as
    /// `index_scores`) -> (idx [B, S, k], margin [B, S]); a backend may compute it a chunk of
    /// queries at a time, so the whole [B, S, T] scores never exist at once.
    fn index_topk(
        &self,
        q: &Self::F,
        keys: &Self::F,
        w: &Self::F,
        dims: [usize; 6],
        scale: f32,
        k: usize,
    ) -> Result<(Self::I, Self::F)> {
        let [b, s, t, _, _, offset] = dims;
        let scores = self.index_scores(q, keys, w, dims, scale)?;
        self.topk_causal(&scores, b * s, s, t, offset, k)
    }
    /// The selection of `rows` queries that see no more than `k` keys, each keeping every causal
    /// one whatever the scores -> (idx `[rows, k]`, each row `0 .. k`, margin `[rows]` of +inf): what
    /// `index_topk` returns for them, without scoring (`Selection::every_key`).
    fn every_key(&self, rows: usize, k: usize) -> Result<(Self::I, Self::F)> {
        let sel = crate::model::indexer::Selection::every_key(1, rows, k);
        let idx: Vec<i32> = sel.idx.iter().map(|&j| j as i32).collect();
        Ok((self.upload_i32(&idx)?, self.upload(&sel.margin)?))
    }
    /// dims = [B, S, T, nh, nope, rd, vd, K, offset] -> out [B, S, nh, vd].
    #[allow(clippy::too_many_arguments)]
    fn sparse_attention(
        &self,
        q: &Self::F,
        kv: &Self::F,
        k_rope: &Self::F,
        idx: &Self::I,
        dims: [usize; 9],
        scale: f32,
    ) -> Result<Self::F>;
    /// The MoE dispatch: the expert ids [n, k] of n tokens' choices grouped by expert ->
    /// (the group sizes `[e]`, slot `[n * k]`: each (token, choice) pair's row among the packed rows,
    /// rows [n * k]: each packed row's token). By default on the host ([`dispatch_on_host`]).
    fn dispatch(&self, ids: &Self::I, n: usize, k: usize, e: usize) -> Result<(Vec<usize>, Self::I, Self::I)> {
        let ids = self.download_i32(ids)?;
        dispatch_pairs(ids.len(), n, k)?;
        let (counts, slot, rows) = dispatch_on_host(&ids, k, e)?;
        Ok((counts, self.upload_i32(&slot)?, self.upload_i32(&rows)?))
    }
    fn gather_rows(&self, x: &Self::F, rows: &Self::I, n: usize, cols: usize) -> Result<Self::F>;
    /// `out[t]` = sum over t's k choices in ascending expert id of `w * y[slot] + shared[t]`.
    #[allow(clippy::too_many_arguments)]
    fn combine(
        &self,
        y: &Self::F,
        ids: &Self::I,
        slot: &Self::I,
        w: &Self::F,
        shared: &Self::F,
        nkc: [usize; 3],
    ) -> Result<Self::F>;
}

/// The (token, choice) pairs of [`Ops::dispatch`]: `n * k`, refused unless the ids hold that
/// many and there is at least one.
pub fn dispatch_pairs(ids: usize, n: usize, k: usize) -> Result<usize> {
    match n * k {
        0 => Err(crate::error::Error::Device(format!("dispatch: no pairs for {n} tokens of {k}"))),
        pairs if pairs != ids => Err(crate::error::Error::Device(format!("dispatch: {ids} ids for {n} tokens of {k}"))),
        pairs => Ok(pairs),
    }
}

/// [`Ops::dispatch`] on the host: the pairs sorted by (expert, pair index), so within an expert
/// they keep token order. Refuses an id outside `0..e`.
pub fn dispatch_on_host(ids: &[i32], k: usize, e: usize) -> Result<(Vec<usize>, Vec<i32>, Vec<i32>)> {
    if let Some(bad) = ids.iter().find(|&&j| usize::try_from(j).map_or(true, |j| j >= e)) {
        return Err(crate::error::Error::Device(format!("the router chose expert {bad}, outside 0..{e}")));
    }
    let mut order: Vec<usize> = (0..ids.len()).collect(); // pair index = token * k + choice
    order.sort_by_key(|&p| (ids[p], p));
    let (mut counts, mut slot) = (vec![0usize; e], vec![0i32; ids.len()]);
    for (pos, &p) in order.iter().enumerate() {
        slot[p] = pos as i32;
        counts[ids[p] as usize] += 1;
    }
    let rows = order.iter().map(|&p| (p / k.max(1)) as i32).collect();
    Ok((counts, slot, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// golden/flat's config with `edit` applied.
    fn flat(edit: impl FnOnce(&mut serde_json::Value)) -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat/config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut v);
        Config::from_json(&v).unwrap()
    }

    /// A config the device paths cannot run is refused by name before anything loads: an
    /// attention bias on every device backend, more experts than the CUDA router's warp holds
    /// on the CUDA ones; the CPU model runs both.
    #[test]
    fn configs_beyond_a_backend_are_refused_by_their_fields() {
        let on = |backend, config: &Config| Target::from(backend).supports(config).map_err(|e| e.to_string());
        let bias = flat(|v| v["attention_bias"] = true.into());
        assert!(on(Backend::Cpu, &bias).is_ok());
        for backend in [Backend::CpuOps, Backend::Cuda, Backend::CudaEmu] {
            let err = on(backend, &bias).unwrap_err();
            assert!(err.contains("attention_bias is true in the config"), "{err}");
        }
        let experts = flat(|v| v["n_routed_experts"] = 512.into());
        for backend in [Backend::Cpu, Backend::CpuOps] {
            assert!(on(backend, &experts).is_ok());
        }
        let err = on(Backend::Cuda, &experts).unwrap_err();
        assert!(err.contains("512 routed experts") && err.contains("at most 256 experts"), "{err}");
        assert!(on(Backend::Cuda, &flat(|_| ())).is_ok());
        assert!(route_fits(256, 15, 32) && route_fits(256, 8, 1));
        assert!(!route_fits(256, 16, 1) && !route_fits(8, 9, 1) && !route_fits(256, 8, 3) && !route_fits(256, 0, 1));
    }
}
