//! Hook points of the forward pass and the observer that receives them. A hook point is a typed
//! value (no string matching in the hot path); its dump name (`../shared/spec/dump-format.md`) is
//! derived only when something is recorded. The forward pass asks `wants` before building any
//! tensor that exists only to be observed, so a run with no observer does no extra work.

use candle_core::Tensor;

use crate::error::Result;

/// A point inside one decoder layer, in forward order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LayerHook {
    InputNorm,
    QLatent,
    KvLatent,
    DsaTopk,
    AttnOut,
    PostAttnNorm,
    RouterLogits,
    TopkIds,
    TopkWeights,
    MlpOut,
    Output,
}

impl LayerHook {
    pub const ALL: [LayerHook; 11] = [
        LayerHook::InputNorm,
        LayerHook::QLatent,
        LayerHook::KvLatent,
        LayerHook::DsaTopk,
        LayerHook::AttnOut,
        LayerHook::PostAttnNorm,
        LayerHook::RouterLogits,
        LayerHook::TopkIds,
        LayerHook::TopkWeights,
        LayerHook::MlpOut,
        LayerHook::Output,
    ];

    /// The name after `layers.{i}.` in a dump.
    pub fn suffix(self) -> &'static str {
        match self {
            LayerHook::InputNorm => "input_norm",
            LayerHook::QLatent => "attn.q_latent",
            LayerHook::KvLatent => "attn.kv_latent",
            LayerHook::DsaTopk => "dsa.topk",
            LayerHook::AttnOut => "attn.out",
            LayerHook::PostAttnNorm => "post_attn_norm",
            LayerHook::RouterLogits => "moe.router_logits",
            LayerHook::TopkIds => "moe.topk_ids",
            LayerHook::TopkWeights => "moe.topk_weights",
            LayerHook::MlpOut => "mlp.out",
            LayerHook::Output => "output",
        }
    }
}

/// Every point where the forward pass reports a tensor, ordered as the forward pass visits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookPoint {
    InputIds,
    Embeddings,
    Layer(usize, LayerHook),
    FinalNorm,
    Logits,
}

impl HookPoint {
    pub fn name(&self) -> String {
        match self {
            HookPoint::InputIds => "input_ids".into(),
            HookPoint::Embeddings => "embeddings".into(),
            HookPoint::Layer(i, h) => format!("layers.{i}.{}", h.suffix()),
            HookPoint::FinalNorm => "final_norm".into(),
            HookPoint::Logits => "logits".into(),
        }
    }

    /// Parses a dump name back into its hook point; None for names outside the spec.
    pub fn parse(name: &str) -> Option<HookPoint> {
        match name {
            "input_ids" => return Some(HookPoint::InputIds),
            "embeddings" => return Some(HookPoint::Embeddings),
            "final_norm" => return Some(HookPoint::FinalNorm),
            "logits" => return Some(HookPoint::Logits),
            _ => {}
        }
        let rest = name.strip_prefix("layers.")?;
        let (i, suffix) = rest.split_once('.')?;
        let i = i.parse().ok()?;
        LayerHook::ALL.iter().find(|h| h.suffix() == suffix).map(|h| HookPoint::Layer(i, *h))
    }

    pub fn layer(&self) -> Option<usize> {
        match self {
            HookPoint::Layer(i, _) => Some(*i),
            _ => None,
        }
    }
}

/// Receives tensors from the forward pass. Float activations are F32; index tensors are I64.
pub trait Observer {
    /// Whether `point` should be reported. The forward pass skips building observe-only tensors
    /// (e.g. the I64 copy of a selection) when this is false.
    fn wants(&self, point: HookPoint) -> bool;
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()>;
}

/// The observer that wants nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn wants(&self, _: HookPoint) -> bool {
        false
    }
    fn observe(&mut self, _: HookPoint, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Keeps every reported tensor in memory, in the order reported.
#[derive(Default)]
pub struct Recorder {
    pub tensors: Vec<(HookPoint, Tensor)>,
}

impl Observer for Recorder {
    fn wants(&self, _: HookPoint) -> bool {
        true
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        self.tensors.push((point, value.clone()));
        Ok(())
    }
}

impl Recorder {
    pub fn get(&self, point: HookPoint) -> Option<&Tensor> {
        self.tensors.iter().find(|(p, _)| *p == point).map(|(_, t)| t)
    }
}

/// Reports `value` to the observer if it wants `point`; `make` builds the tensor lazily.
pub fn emit(obs: &mut dyn Observer, point: HookPoint, make: impl FnOnce() -> Result<Tensor>) -> Result<()> {
    if obs.wants(point) {
        let t = make()?;
        obs.observe(point, &t)?;
    }
    Ok(())
}
