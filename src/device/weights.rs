//! The device model's weights: a struct per block, fields named after the checkpoint's keys, each
//! weight as the device holds it ([`Ops::upload_weight`]: as stored, f32, bf16 or block-FP8), and
//! their upload from the CPU model's loaded layers. Two pairs are stacked at upload so one product
//! computes both: every MLP's `gate_proj` and `up_proj`, and the attention's `q_a_proj` and
//! `kv_a_proj_with_mqa`.

use candle_core::{DType, Tensor};

use super::{HostWeight, Ops};
use crate::error::{Error, Result};
use crate::model::indexer::Indexer;
use crate::model::layer::{DecoderLayer, Ffn};
use crate::model::mlp::Mlp;
use crate::model::moe::RouterConfig;
use crate::model::nn::{Linear, RmsNorm, Weight};

/// A `[out, in]` weight on the device.
pub(super) struct DLinear<O: Ops> {
    pub(super) w: O::W,
    pub(super) out: usize,
    pub(super) inp: usize,
}

/// An MLP with `gate_proj` and `up_proj` stacked into one `[2 * inter, in]` weight, so one
/// product computes both (`Ops::swiglu` takes its two halves).
pub(super) struct DMlp<O: Ops> {
    pub(super) gate_up: DLinear<O>,
    pub(super) down: DLinear<O>,
}

pub(super) struct DIndexer<O: Ops> {
    pub(super) wq_b: DLinear<O>,
    pub(super) wk: DLinear<O>,
    pub(super) k_norm: (O::F, O::F, f32),
    pub(super) weights_proj: DLinear<O>,
    pub(super) heads: usize,
    pub(super) dim: usize,
    pub(super) topk: usize,
}

pub(super) struct DAttention<O: Ops> {
    /// `q_a_proj` and `kv_a_proj_with_mqa` stacked into one `[q_lora_rank + kv_lora_rank +
    /// qk_rope_head_dim, hidden]` weight: one product from the layer's input (read, and in bf16
    /// mode rounded, once) instead of three, the narrow ones (the latent's 512 and the rope key's
    /// 64 columns) too few tiles to fill a GPU alone. (FP8 parts keep their own scale grids: a
    /// product each, into their columns.)
    pub(super) q_kv_a_proj: DLinear<O>,
    pub(super) q_a_layernorm: (O::F, f32),
    pub(super) q_b_proj: DLinear<O>,
    pub(super) kv_a_layernorm: (O::F, f32),
    pub(super) kv_b_proj: DLinear<O>,
    pub(super) o_proj: DLinear<O>,
    pub(super) indexer: Option<DIndexer<O>>,
}

pub(super) enum DFfn<O: Ops> {
    Dense(DMlp<O>),
    Moe { gate: DLinear<O>, bias: O::F, experts: Vec<DMlp<O>>, shared: DMlp<O>, router: RouterConfig },
}

pub(super) struct DLayer<O: Ops> {
    pub(super) input_layernorm: (O::F, f32),
    pub(super) attn: DAttention<O>,
    pub(super) post_attention_layernorm: (O::F, f32),
    pub(super) ffn: DFfn<O>,
}

/// A tensor's values as f32, to upload.
pub(super) fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A tensor uploaded as f32: straight from its storage where it is f32 already (no host copy:
/// GLM-5's embedding table is 3.8 GB), else through one.
pub(super) fn upload_values<O: Ops>(ops: &O, t: &Tensor) -> Result<O::F> {
    crate::hooks::with_f32(t, |v| ops.upload(v))?
}

/// A weight's rows on the host as stored, to upload: f32 values are copied, bf16 and FP8 ones
/// are views of the memory-mapped checkpoint.
enum HostRows {
    F32(Vec<f32>),
    Bf16(crate::model::gemv::Bf16Weight),
    Fp8(crate::model::fp8::Fp8Weight),
}

impl HostRows {
    fn weight(&self) -> HostWeight<'_> {
        match self {
            HostRows::F32(v) => HostWeight::F32(v),
            HostRows::Bf16(w) => HostWeight::Bf16(w.bits()),
            HostRows::Fp8(w) => HostWeight::Fp8(w),
        }
    }
}

/// A linear layer's weight as stored, and its input width.
fn host_weight(l: &Linear) -> Result<(HostRows, usize)> {
    if l.bias.is_some() {
        return Err(Error::Device("attention_bias is not supported on the device path yet".into()));
    }
    let n = l.shape()[0];
    let out_of_range = || Error::Device(format!("weight rows 0..{n} out of range"));
    Ok(match &l.weight {
        Weight::F32(t) => (HostRows::F32(values(t)?), t.dims()[1]),
        Weight::Bf16(w, _) => (HostRows::Bf16(w.rows(0, n).ok_or_else(out_of_range)?), w.cols),
        Weight::Fp8(w, _) => (HostRows::Fp8(w.rows(0, n).ok_or_else(out_of_range)?), w.shape()[1]),
    })
}

/// Uploads a linear layer's weight as stored.
pub(super) fn upload_linear<O: Ops>(ops: &O, l: &Linear) -> Result<DLinear<O>> {
    let ((w, inp), out) = (host_weight(l)?, l.shape()[0]);
    Ok(DLinear { w: ops.upload_weight(w.weight(), out, inp)?, out, inp })
}

/// Uploads two weights of one input stacked by rows, so one product computes both.
fn upload_stacked<O: Ops>(ops: &O, [a, b]: [&Linear; 2]) -> Result<DLinear<O>> {
    let ((wa, inp), (wb, inp_b)) = (host_weight(a)?, host_weight(b)?);
    if inp != inp_b {
        return Err(Error::Device(format!("stacked weights of inputs {inp} and {inp_b}")));
    }
    let out = a.shape()[0] + b.shape()[0];
    Ok(DLinear { w: ops.upload_weight(HostWeight::Stacked(&[wa.weight(), wb.weight()]), out, inp)?, out, inp })
}

pub(super) fn upload_norm<O: Ops>(ops: &O, n: &RmsNorm) -> Result<(O::F, f32)> {
    Ok((upload_values(ops, &n.weight)?, n.eps as f32))
}

fn upload_mlp<O: Ops>(ops: &O, m: &Mlp) -> Result<DMlp<O>> {
    Ok(DMlp { gate_up: upload_stacked(ops, [&m.gate_proj, &m.up_proj])?, down: upload_linear(ops, &m.down_proj)? })
}

/// Uploads every weight of a decoder layer the main forward pass uses.
pub(super) fn upload_layer<O: Ops>(ops: &O, layer: &DecoderLayer) -> Result<DLayer<O>> {
    let a = &layer.self_attn;
    let indexer = match &a.indexer {
        Indexer::Full(w) => Some(DIndexer {
            wq_b: upload_linear(ops, &w.wq_b)?,
            wk: upload_linear(ops, &w.wk)?,
            k_norm: (upload_values(ops, &w.k_norm.weight)?, upload_values(ops, &w.k_norm.bias)?, w.k_norm.eps as f32),
            weights_proj: upload_linear(ops, &w.weights_proj)?,
            heads: w.n_heads,
            dim: w.head_dim,
            topk: w.topk,
        }),
        Indexer::Shared => None,
    };
    let attn = DAttention {
        q_kv_a_proj: upload_stacked(ops, [&a.q_a_proj, &a.kv_a_proj_with_mqa])?,
        q_a_layernorm: upload_norm(ops, &a.q_a_layernorm)?,
        q_b_proj: upload_linear(ops, &a.q_b_proj)?,
        kv_a_layernorm: upload_norm(ops, &a.kv_a_layernorm)?,
        kv_b_proj: upload_linear(ops, &a.kv_b_proj)?,
        o_proj: upload_linear(ops, &a.o_proj)?,
        indexer,
    };
    let ffn = match &layer.mlp {
        Ffn::Dense(m) => DFfn::Dense(upload_mlp(ops, m)?),
        Ffn::Moe(m) => {
            let (e, h) = m.gate.dims2()?;
            DFfn::Moe {
                gate: DLinear { w: ops.upload_weight(HostWeight::F32(&values(&m.gate)?), e, h)?, out: e, inp: h },
                bias: ops.upload(&m.e_score_correction_bias)?,
                experts: m.experts.iter().map(|x| upload_mlp(ops, x)).collect::<Result<_>>()?,
                shared: upload_mlp(ops, &m.shared_experts)?,
                router: m.router.clone(),
            }
        }
    };
    Ok(DLayer {
        input_layernorm: upload_norm(ops, &layer.input_layernorm)?,
        attn,
        post_attention_layernorm: upload_norm(ops, &layer.post_attention_layernorm)?,
        ffn,
    })
}
