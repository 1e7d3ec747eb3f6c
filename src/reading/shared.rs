//! A MoE layer's output that lacks its shared expert, or holds it twice: with `--model`, the
//! shared expert (the model's own `Mlp`, checked against transformers) is run on each side's
//! `post_attn_norm`, and ours's `mlp.out` compared with the reference's less it, or plus it.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, Loader};
use crate::compare::{all_close, Tolerance};
use crate::config::MlpKind;
use crate::diff::floats;
use crate::dump::Dump;
use crate::hooks::{HookPoint, LayerHook};
use crate::model::mlp::Mlp;

/// What ours's MoE output did with the shared expert, where it is not the reference's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedExpert {
    /// Ours is the reference's less the shared expert: the routed experts' sum alone.
    Missing,
    /// Ours is the reference's plus the shared expert: added twice.
    Twice,
}

impl SharedExpert {
    /// For `name` = `layers.{i}.mlp.out` of a MoE layer of the checkpoint in `model`: what ours
    /// (`a`) did with the shared expert, within `tol`. None where it is neither, or the dumps lack
    /// `post_attn_norm`, or the checkpoint its shared expert.
    pub(crate) fn of(a: &Dump, b: &Dump, name: &str, model: &Path, tol: Tolerance) -> Option<SharedExpert> {
        let Some(HookPoint::Layer(i, LayerHook::MlpOut)) = HookPoint::parse(name) else { return None };
        let ckpt = Checkpoint::open(model).ok()?;
        let c = &ckpt.config;
        if c.mlp_layer_types.get(i) != Some(&MlpKind::Moe) {
            return None;
        }
        let mut loader = Loader::new(&ckpt);
        let prefix = format!("model.layers.{i}.mlp.shared_experts");
        let shared = Mlp::load(&mut loader, &prefix, c.hidden_size, c.shared_intermediate_size());
        let shared = loader.finish(shared).ok()?;
        let input = HookPoint::Layer(i, LayerHook::PostAttnNorm).name();
        let of = |d: &Dump| -> Option<Vec<f32>> {
            let x = Tensor::from_vec(floats(d, &input)?, d.shape(&input)?, &Device::Cpu).ok()?;
            shared.forward(&x).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok()
        };
        let (ours, reference) = (floats(a, name)?, floats(b, name)?);
        let (shared_ours, shared_reference) = (of(a)?, of(b)?);
        let routed: Vec<f32> = reference.iter().zip(&shared_reference).map(|(r, s)| r - s).collect();
        let twice: Vec<f32> = reference.iter().zip(&shared_ours).map(|(r, s)| r + s).collect();
        if all_close(&ours, &routed, tol) {
            Some(SharedExpert::Missing)
        } else if all_close(&ours, &twice, tol) {
            Some(SharedExpert::Twice)
        } else {
            None
        }
    }

    pub(crate) fn reading(self) -> &'static str {
        match self {
            SharedExpert::Missing => {
                "ours is the reference's less its shared expert (run on post_attn_norm): the shared expert is not \
                 added to the routed experts' sum"
            }
            SharedExpert::Twice => "ours is the reference's plus its shared expert: the shared expert is added twice",
        }
    }
}
