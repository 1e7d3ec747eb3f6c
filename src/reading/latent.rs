//! A latent (`attn.q_latent`, `attn.kv_latent`) that parts from the reference's: with `--model`,
//! its projection and RMSNorm (`q_a_proj` and `q_a_layernorm`; `kv_a_proj_with_mqa` and
//! `kv_a_layernorm`) are rerun on ours's own `input_norm` with the norms ports have got wrong, and
//! the one that gives ours's latent is named: the mean square taken over the rope columns of
//! `kv_a_proj_with_mqa`'s output too, the norm's weight left out (a weight not loaded), the norm
//! left out. A pattern of rows scaled by factors of their own says as much in f32, but a bf16
//! port's noise hides it; the rerun on ours's own input does not carry that noise in.
//!
//! As the attention's reruns ([`super::rerun`]): trusted only where the checkpoint's rerun gives
//! the reference's latent from the reference's input, and a variant is named only where it
//! explains ours (within the tolerance or off it by rounding's tail alone, its error against ours
//! under 1/200 of the checkpoint's rerun's, and no other nearly as close).

use candle_core::{Device, Tensor, D};

use super::rerun::{pick, Output};
use crate::checkpoint::{Checkpoint, Loader};
use crate::compare::Tolerance;
use crate::diff::floats;
use crate::dump::Dump;
use crate::hooks::{HookPoint, LayerHook};
use crate::model::nn::{Linear, RmsNorm};

/// Tokens rerun at most: the latent is made token by token.
const TOKENS: usize = 64;

/// How ours's latent was normalised, where not as the checkpoint's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentNorm {
    /// `kv_a_layernorm`'s mean square over the whole `kv_a_proj_with_mqa` output, its
    /// `qk_rope_head_dim` rope columns included.
    OverRope,
    /// The norm without its weight (ones: a weight not loaded).
    WithoutWeight,
    /// No norm: the projection's output itself.
    Unnormed,
}

/// Which latent: the query's or the KV's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latent {
    Q,
    Kv,
}

impl Latent {
    fn of(name: &str) -> Option<(usize, Latent)> {
        match HookPoint::parse(name)? {
            HookPoint::Layer(i, LayerHook::QLatent) => Some((i, Latent::Q)),
            HookPoint::Layer(i, LayerHook::KvLatent) => Some((i, Latent::Kv)),
            _ => None,
        }
    }

    /// The projection and the norm, as the checkpoint names them.
    fn keys(self) -> (&'static str, &'static str) {
        match self {
            Latent::Q => ("q_a_proj", "q_a_layernorm"),
            Latent::Kv => ("kv_a_proj_with_mqa", "kv_a_layernorm"),
        }
    }
}

/// One layer's latent projection and norm as the checkpoint has them.
struct Block {
    proj: Linear,
    norm: RmsNorm,
    /// The latent's width: the first columns of the projection's output.
    width: usize,
    hidden: usize,
}

impl Block {
    /// The projection's output of `d`'s `input_norm` over its first [`TOKENS`] tokens
    /// (`[N, out]`), and `d`'s latent over them (`[N * width]`).
    fn inputs(&self, d: &Dump, i: usize, name: &str) -> Option<(Tensor, Vec<f32>)> {
        let x = floats(d, &HookPoint::Layer(i, LayerHook::InputNorm).name())?;
        let latent = floats(d, name)?;
        let hidden = self.hidden;
        if hidden == 0
            || self.width == 0
            || !x.len().is_multiple_of(hidden)
            || x.len() / hidden * self.width != latent.len()
        {
            return None;
        }
        let n = (x.len() / hidden).min(TOKENS);
        let x = Tensor::from_vec(x[..n * hidden].to_vec(), (n, hidden), &Device::Cpu).ok()?;
        Some((self.proj.forward(&x).ok()?, latent[..n * self.width].to_vec()))
    }

    /// The latent of the projection's output `p` (`[N, out]`), normalised as `variant` says
    /// (None: the checkpoint's norm).
    fn latent(&self, p: &Tensor, variant: Option<LatentNorm>) -> Option<Output> {
        let c = p.narrow(D::Minus1, 0, self.width).ok()?; // [N, width]
        let over = |x: &Tensor, with_weight: bool| -> candle_core::Result<Tensor> {
            let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + self.norm.eps)?.sqrt()?.recip()?; // [N, 1]
            let normed = c.broadcast_mul(&scale)?;
            if with_weight {
                normed.broadcast_mul(&self.norm.weight)
            } else {
                Ok(normed)
            }
        };
        let out = match variant {
            None => self.norm.forward(&c).ok()?,
            Some(LatentNorm::OverRope) => over(p, true).ok()?,
            Some(LatentNorm::WithoutWeight) => over(&c, false).ok()?,
            Some(LatentNorm::Unnormed) => c,
        };
        Some(Output::Floats(out.flatten_all().ok()?.to_vec1().ok()?))
    }
}

impl LatentNorm {
    /// For `name`, a `layers.{i}.attn.q_latent` or `attn.kv_latent`, with the checkpoint
    /// `ckpt`: the norm whose rerun on ours's `input_norm` explains ours's latent within `tol`.
    /// None where none does, where the dumps lack `input_norm`, or where the checkpoint's own
    /// rerun does not give the reference's.
    pub(crate) fn of(
        a: &Dump,
        b: &Dump,
        name: &str,
        ckpt: &Checkpoint,
        tol: Tolerance,
    ) -> Option<(LatentNorm, Latent)> {
        let (i, latent) = Latent::of(name)?;
        let c = &ckpt.config;
        let (proj, norm) = latent.keys();
        let p = format!("model.layers.{i}.self_attn");
        let (out, width) = match latent {
            Latent::Q => (c.q_lora_rank, c.q_lora_rank),
            Latent::Kv => (c.kv_a_dim(), c.kv_lora_rank),
        };
        let mut loader = Loader::new(ckpt);
        let proj = Linear::load(&mut loader, &format!("{p}.{proj}"), out, c.hidden_size, c.attention_bias);
        // (The reference builds both latent norms with the RMSNorm default eps, as `mla` does.)
        let norm = RmsNorm::load(&mut loader, &format!("{p}.{norm}"), width, 1e-6);
        let block = Block { proj, norm, width, hidden: c.hidden_size };
        let block = loader.finish(block).ok()?;
        let (p_ref, reference) = block.inputs(b, i, name)?;
        if !block.latent(&p_ref, None)?.close(&Output::Floats(reference), tol) {
            return None;
        }
        let (p_ours, ours) = block.inputs(a, i, name)?;
        let (ours, checkpoint) = (Output::Floats(ours), block.latent(&p_ours, None)?);
        let unexplained = ours.distance(&checkpoint);
        if unexplained == 0.0 {
            return None;
        }
        let variants = match latent {
            Latent::Q => &[LatentNorm::WithoutWeight, LatentNorm::Unnormed][..],
            Latent::Kv => &[LatentNorm::OverRope, LatentNorm::WithoutWeight, LatentNorm::Unnormed][..],
        };
        let found = variants.iter().filter_map(|&v| {
            let out = block.latent(&p_ours, Some(v))?;
            (ours.matches(&out, tol, width) && !out.close(&checkpoint, tol)).then(|| (v, ours.distance(&out)))
        });
        match pick(found.collect(), unexplained)? {
            (variant, None) => Some((variant, latent)),
            (_, Some(_)) => None,
        }
    }

    pub(crate) fn reading(self, latent: Latent) -> String {
        let (proj, norm) = latent.keys();
        match self {
            LatentNorm::OverRope => format!(
                "ours is this layer's {norm} rerun on its input with its mean square over all of {proj}'s output, \
                 the rope columns (qk_rope_head_dim) too, not over the kv_lora_rank latent alone"
            ),
            LatentNorm::WithoutWeight => {
                format!("ours is this layer's {norm} rerun on its input without its weight (not loaded?)")
            }
            LatentNorm::Unnormed => format!("ours is this layer's {proj} output on its input, without {norm}"),
        }
    }
}
