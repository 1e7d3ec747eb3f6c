//! A MoE layer's output that is the checkpoint's MoE computed another way: with `--model`, the
//! layer's experts (the model's own `Moe`, checked against transformers) are rerun on ours's
//! `post_attn_norm` with ours's own routing (its `moe.topk_ids` and `moe.topk_weights`, where it
//! recorded them whole), and ours's `mlp.out` is compared with the variants ports have shipped:
//! the routed experts' sum alone (no shared expert), the shared expert added twice, and the
//! routed experts' gate and up projections swapped (a fused `gate_up_proj` split the wrong way
//! round). On ours's own input and routing, neither the routing's bugs nor the noise a bf16 port
//! carries in from earlier layers enters the comparison.
//!
//! As the attention's reruns ([`super::rerun`]): the checkpoint's rerun must give the reference's
//! `mlp.out` from the reference's input and routing (another checkpoint's dump gets no reading),
//! and a variant is named only where it explains ours: within the tolerance or off it by
//! rounding's tail alone (a bf16 port's own rounding), its error against ours under 1/200 of the
//! checkpoint's rerun's, and for the shared expert's variants, its best-fitting share of ours the
//! variant's count.

use candle_core::{Device, Tensor};

use super::rerun::{pick, Output};
use crate::checkpoint::{Checkpoint, Loader};
use crate::compare::Tolerance;
use crate::diff::{floats, ints};
use crate::dump::Dump;
use crate::hooks::{HookPoint, LayerHook};
use crate::model::mlp::Mlp;
use crate::model::moe::{route, Moe, Route};
use crate::model::nn::matmul_nt;

/// Tokens rerun at most: the MoE works token by token, and a bug of the shared expert shows in
/// every one.
const TOKENS: usize = 256;

/// How far the shared expert's best-fitting share of ours may be from a variant's count (0, 2):
/// bf16 and fp16 ports' noise moved it by 1e-5 to 4e-4 (transformers ports of four cases, with
/// batches and 300 tokens).
const FITTED: f64 = 0.01;

/// How ours's MoE output was computed, where not as the checkpoint's, and which routing the
/// rerun replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeRerun {
    pub variant: MoeVariant,
    /// Ours's own recorded routing (`moe.topk_ids`, `moe.topk_weights`), or, where its dump holds
    /// none whole, the checkpoint's routing of ours's input.
    pub recorded_routing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeVariant {
    /// Ours is the routed experts' sum alone.
    SharedMissing,
    /// Ours adds the shared expert twice.
    SharedTwice,
    /// Ours's `mlp.out` is the routed experts' sum alone, but its layer output is the
    /// reference's: it records `mlp.out` before adding the shared expert (a split of the routed
    /// and shared outputs, as some engines keep them).
    RecordedBefore,
    /// Ours's routed experts run `down(silu(up x) * gate x)`: their gate and up projections
    /// swapped.
    GateUpSwapped,
}

/// One dump's MoE layer over its first tokens: input, routing and output.
struct Side {
    x: Tensor, // [N, hidden]
    routes: Vec<Route>,
    out: Vec<f32>, // [N * hidden]
}

impl Side {
    /// `d`'s layer `i` over its first [`TOKENS`] tokens: its recorded routing where it holds
    /// `moe.topk_ids` and `moe.topk_weights` of the layer's k, else the checkpoint's of the input
    /// (and whether it was recorded).
    fn read(d: &Dump, i: usize, moe: &Moe) -> Option<(Side, bool)> {
        let name = |h| HookPoint::Layer(i, h).name();
        let (x, out) = (floats(d, &name(LayerHook::PostAttnNorm))?, floats(d, &name(LayerHook::MlpOut))?);
        let hidden = moe.gate.dims2().ok()?.1;
        if hidden == 0 || x.len() != out.len() || !x.len().is_multiple_of(hidden) {
            return None;
        }
        let tokens = x.len() / hidden;
        let n = tokens.min(TOKENS);
        let (x, out) = (x[..n * hidden].to_vec(), out[..n * hidden].to_vec());
        let x = Tensor::from_vec(x, (n, hidden), &Device::Cpu).ok()?;
        let (k, experts) = (moe.router.top_k, moe.experts.len());
        let recorded = ints(d, &name(LayerHook::TopkIds)).zip(floats(d, &name(LayerHook::TopkWeights)));
        let (routes, recorded) = match recorded {
            // (Of the layer's k for every token: ids of another k would be cut into misaligned rows.)
            Some((ids, weights)) if k > 0 && ids.len() == tokens * k && weights.len() == ids.len() => {
                let ids: Vec<usize> = ids[..n * k]
                    .iter()
                    .map(|&j| usize::try_from(j).ok().filter(|&j| j < experts))
                    .collect::<Option<_>>()?;
                let rows = ids.chunks_exact(k).zip(weights.chunks_exact(k));
                (
                    rows.map(|(ids, w)| Route { ids: ids.to_vec(), weights: w.to_vec(), margin: f32::NAN }).collect(),
                    true,
                )
            }
            _ => {
                let logits = matmul_nt(&x, &moe.gate).ok()?.to_vec2::<f32>().ok()?; // [N, E]
                let routes = logits.iter().map(|row| route(&moe.router, row, &moe.e_score_correction_bias)).collect();
                (routes, false)
            }
        };
        Some((Side { x, routes, out }, recorded))
    }

    /// The routed experts' part and the shared expert's, each `[N * hidden]`, the experts run by
    /// `run` (`Mlp::forward`, or a variant of it).
    fn rerun(&self, moe: &Moe, run: fn(&Mlp, &Tensor) -> crate::error::Result<Tensor>) -> Option<[Vec<f32>; 2]> {
        let routed = moe.routed(&self.x, &self.routes, run).ok()?;
        let shared = moe.shared_experts.forward(&self.x).ok()?;
        let flat = |t: Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok();
        Some([flat(routed)?, flat(shared)?])
    }
}

/// `routed + times * shared`, element by element.
fn plus(routed: &[f32], shared: &[f32], times: f32) -> Output {
    Output::Floats(routed.iter().zip(shared).map(|(r, s)| r + times * s).collect())
}

impl MoeRerun {
    /// For `name` = `layers.{i}.mlp.out` of a MoE layer of the checkpoint `ckpt`: the variant of
    /// the MoE that gives ours (`a`) within its tolerance (`tol_for` a name; or off it by
    /// rounding's tail alone). None where none does, where the dumps lack `post_attn_norm`, or
    /// where the checkpoint's rerun is not the reference's (`b`).
    pub(crate) fn of(
        a: &Dump,
        b: &Dump,
        name: &str,
        ckpt: &Checkpoint,
        tol_for: impl Fn(&str) -> Tolerance,
    ) -> Option<MoeRerun> {
        let Some(HookPoint::Layer(i, LayerHook::MlpOut)) = HookPoint::parse(name) else { return None };
        let tol = tol_for(name);
        let c = &ckpt.config;
        if !c.is_moe(i) {
            return None;
        }
        let mut loader = Loader::new(ckpt);
        let moe = Moe::load(&mut loader, c, i);
        let moe = loader.finish(moe).ok()?;
        let ((ours, recorded_routing), (reference, _)) = (Side::read(a, i, &moe)?, Side::read(b, i, &moe)?);
        let [routed, shared] = reference.rerun(&moe, Mlp::forward)?;
        if !plus(&routed, &shared, 1.0).close(&Output::Floats(reference.out), tol) {
            return None;
        }
        let [routed, shared] = ours.rerun(&moe, Mlp::forward)?;
        let [swapped, _] = ours.rerun(&moe, Mlp::forward_swapped)?;
        // The shared expert's share of ours that fits best (least squares): a shared-expert
        // variant is its own count of shared experts, 0 or 2, not a scale near it (a shared
        // expert times 1.95 is no port's bug, and is close enough to twice to pass the error's
        // test).
        let (dot, norm) = (ours.out.iter().zip(&routed).zip(&shared))
            .fold((0f64, 0f64), |(d, n), ((&o, &r), &s)| (d + (o - r) as f64 * s as f64, n + s as f64 * s as f64));
        let fitted = dot / norm.max(f64::MIN_POSITIVE);
        let (ours, checkpoint) = (Output::Floats(ours.out), plus(&routed, &shared, 1.0));
        let unexplained = ours.distance(&checkpoint);
        if unexplained == 0.0 {
            return None;
        }
        let hidden = c.hidden_size;
        let candidates = [
            (MoeVariant::SharedMissing, plus(&routed, &shared, 0.0), Some(0.0)),
            (MoeVariant::SharedTwice, plus(&routed, &shared, 2.0), Some(2.0)),
            (MoeVariant::GateUpSwapped, plus(&swapped, &shared, 1.0), None),
        ];
        let found = candidates.into_iter().filter_map(|(variant, out, count)| {
            let fits = count.is_none_or(|count: f64| (fitted - count).abs() <= FITTED);
            (fits && ours.matches(&out, tol, hidden) && !out.close(&checkpoint, tol))
                .then(|| (variant, ours.distance(&out)))
        });
        let variant = match pick(found.collect(), unexplained)? {
            (variant, None) => variant,
            (_, Some(_)) => return None,
        };
        // The layer's output holds what its mlp.out lacks: where the hook was placed.
        let output = HookPoint::Layer(i, LayerHook::Output).name();
        let layer_matches = floats(a, &output)
            .zip(floats(b, &output))
            .is_some_and(|(x, y)| Output::Floats(x).matches(&Output::Floats(y), tol_for(&output), hidden));
        let variant = match (variant, layer_matches) {
            (MoeVariant::SharedMissing, true) => MoeVariant::RecordedBefore,
            (variant, _) => variant,
        };
        Some(MoeRerun { variant, recorded_routing })
    }

    pub(crate) fn reading(self) -> String {
        let routing = match self.recorded_routing {
            true => "ours's recorded experts and weights",
            false => "the checkpoint's routing of that input: ours's own routing is not recorded whole",
        };
        let rerun = format!("this layer's MoE rerun on its input (with {routing})");
        match self.variant {
            MoeVariant::SharedMissing => format!(
                "ours is {rerun} without the shared expert: the shared expert is not added to the routed experts' sum"
            ),
            MoeVariant::SharedTwice => format!("ours is {rerun} with the shared expert added twice"),
            MoeVariant::RecordedBefore => format!(
                "ours is {rerun} without the shared expert, yet its layer output matches the reference's: ours records \
                 mlp.out before the shared expert is added (where its hook sits, not a bug of the output)"
            ),
            MoeVariant::GateUpSwapped => format!(
                "ours is {rerun} with the routed experts' gate and up projections swapped (silu of up_proj times \
                 gate_proj: a fused gate_up_proj split the wrong way round)"
            ),
        }
    }
}
