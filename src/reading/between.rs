//! Where no reading names a cause: the first divergence localised by its inputs. A float
//! activation is computed from a few earlier hook points of its layer (an attention output from
//! the layer's `input_norm`, its latents and its DSA selection); where both dumps hold them and
//! they match, the difference is made in the operations between, which this says, naming them
//! as the checkpoint's modules (`kv_b_proj`, `o_proj`), and how much of it the inputs already
//! carry. A divergence past rounding that no pattern reads is then never left without a word.
//!
//! It localises, it does not judge: a difference as small as bf16 arithmetic leaves (a run with
//! bf16 products compared at f32's tolerance) is said to be that size, not a bug; and an input
//! neither dump holds may carry it, which is said instead of "all of it is made here".

use serde_json::{json, Value};

use crate::compare::{Comparison, Detail};
use crate::config::MlpKind;
use crate::diff::DiffReport;
use crate::hooks::{HookPoint, LayerHook};

/// An NMSE below this is the size of bf16 arithmetic's rounding: one operation with its products
/// rounded to bf16 leaves about 5e-6 (`golden/flat/reference-bf16.safetensors`' `q_latent`
/// against the f32 reference's).
const BF16_SIZED: f64 = 1e-4;

/// The first divergence's inputs, each matching the reference, and the operations between.
#[derive(Debug, Clone, PartialEq)]
pub struct Between {
    /// What computes it from its inputs.
    pub op: &'static str,
    /// Its inputs both dumps hold, each with its NMSE against the reference (0 for a selection
    /// that matches row for row).
    pub inputs: Vec<(String, f64)>,
    /// Its inputs neither or only one dump holds: the difference may come through them.
    pub unrecorded: Vec<String>,
    /// Its own NMSE.
    pub nmse: f64,
    /// Whether `--model` (not given) would rerun the operations on ours's inputs with the
    /// variants ports get wrong (`rerun`, `latent`, `moe_rerun`, the weights rule).
    pub rerun_with_model: bool,
    /// Whether it is the size and spread of bf16 arithmetic's rounding, compared at a tolerance
    /// tighter than bf16's: an NMSE under [`BF16_SIZED`] over at least half the elements (a bug
    /// of one row's is as small but concentrated).
    pub bf16_sized: bool,
}

/// How a layer is built, as far as its hook points' inputs go.
#[derive(Clone, Copy)]
struct Layer {
    /// What the layer starts from: the embeddings, the layer before's output, `mtp.eh_proj`.
    input: HookPoint,
    /// Whether it routes to experts; None where neither the config nor the dumps say (no
    /// `--model`, no layer's `moe.*` recorded).
    moe: Option<bool>,
}

/// The hook points `point` is computed from in the forward pass, and what computes it, in a
/// model whose main layers end at `last` and whose MTP layer is `mtp` (None where the dumps do
/// not say); None for points outside the spec's activations.
fn inputs(
    point: HookPoint,
    layer: impl Fn(usize) -> Layer,
    (last, mtp): (Option<usize>, Option<usize>),
) -> Option<(Vec<HookPoint>, &'static str)> {
    use LayerHook::*;
    let (i, hook) = match point {
        HookPoint::Layer(i, hook) => (i, hook),
        HookPoint::Embeddings => return Some((vec![HookPoint::InputIds], "embed_tokens")),
        HookPoint::FinalNorm => return Some((vec![HookPoint::Layer(last?, Output)], "the final norm (model.norm)")),
        HookPoint::Logits => return Some((vec![HookPoint::FinalNorm], "lm_head")),
        HookPoint::MtpInputHidden => {
            return Some((vec![HookPoint::FinalNorm], "the MTP head's slice of the final norm's positions"))
        }
        HookPoint::MtpEhProj => {
            let from = vec![HookPoint::MtpInputHidden, HookPoint::Embeddings];
            return Some((from, "the MTP head's enorm (of the next token's embedding), hnorm and eh_proj"));
        }
        HookPoint::MtpFinalNorm => return Some((vec![HookPoint::Layer(mtp?, Output)], "shared_head.norm")),
        HookPoint::MtpLogits => {
            return Some((vec![HookPoint::MtpFinalNorm], "the MTP head's shared_head.head (or the model's lm_head)"))
        }
        _ => return None,
    };
    let at = |h: LayerHook| HookPoint::Layer(i, h);
    let Layer { input, moe } = layer(i);
    Some(match hook {
        InputNorm => (vec![input], "input_layernorm"),
        QLatent => (vec![at(InputNorm)], "q_a_proj and q_a_layernorm"),
        KvLatent => (vec![at(InputNorm)], "kv_a_proj_with_mqa and kv_a_layernorm"),
        DsaScores => (vec![at(InputNorm), at(QLatent)], "the indexer (wq_b, wk, k_norm, weights_proj, its RoPE)"),
        AttnOut => (
            vec![at(InputNorm), at(QLatent), at(KvLatent), at(DsaTopk)],
            "the attention (q_b_proj, kv_a_proj_with_mqa's rope columns, kv_b_proj, RoPE, the softmax over the kept \
             keys, o_proj)",
        ),
        PostAttnNorm => (vec![input, at(AttnOut)], "the residual add and post_attention_layernorm"),
        RouterLogits => (vec![at(PostAttnNorm)], "the router's gate"),
        TopkWeights => {
            (vec![at(RouterLogits), at(TopkIds)], "the routing weights (sigmoid, normalisation, routed_scaling_factor)")
        }
        MlpOut if moe == Some(true) => (
            vec![at(PostAttnNorm), at(TopkIds), at(TopkWeights)],
            "the experts (routed and shared, and their weighted sum)",
        ),
        MlpOut if moe == Some(false) => (vec![at(PostAttnNorm)], "the dense MLP (gate_proj, up_proj, down_proj)"),
        MlpOut => (
            vec![at(PostAttnNorm)],
            "the MLP (a dense one, or the experts: the dumps record no routing of the layer to say which)",
        ),
        Output => (vec![input, at(AttnOut), at(MlpOut)], "the residual adds"),
        _ => return None,
    })
}

/// An input's NMSE where it matches the reference (0 for a selection without flips, an exact
/// tensor without mismatches); None where it does not.
fn matching(c: &Comparison) -> Option<f64> {
    match &c.detail {
        _ if !c.ok => None,
        Detail::Float { nmse, .. } => Some(*nmse),
        Detail::Sets { flips, .. } => flips.is_empty().then_some(0.0),
        _ => Some(0.0),
    }
}

impl DiffReport {
    /// The first divergence localised by its inputs, where it is a float activation whose
    /// recorded inputs all match, and nothing reads it: no reading of its own, none past
    /// rounding, and not rounding's.
    pub fn between(&self) -> Option<Between> {
        let first = self.first_divergence()?;
        let Detail::Float { nmse, bad, total, .. } = first.detail else { return None };
        let tol = crate::diff::tol_for(self.tol, &self.per_name, &first.name);
        let bf16_sized = nmse < BF16_SIZED && 2 * bad >= total && crate::diff::tighter_than_bf16(tol);
        if self.reading(first).is_some() || self.past_rounding_reading().is_some() || self.first_reads_as_rounding() {
            return None;
        }
        let names = || self.results.iter().map(|c| &c.name).chain(&self.only_a).chain(&self.only_b);
        // The MTP layer starts from `mtp.eh_proj`: the config's last layer where it has one,
        // else (without --model) a layer whose positions are not the layer before's, as the MTP
        // head drafts from one position fewer a batch row. (The dumps' last layer is not taken
        // for it: a dump of the head may not hold its layer.) The first starts from the
        // embeddings, the others from the layer before. A layer is a MoE one by the config, else
        // where either dump routes it.
        let mtp = self.mtp_layer.filter(|_| self.with_model);
        let elements = |p: HookPoint| match self.results.iter().find(|c| c.name == p.name())?.detail {
            Detail::Float { elements, .. } => Some(elements),
            _ => None,
        };
        let short = |i: usize| match (elements(HookPoint::Layer(i, LayerHook::InputNorm)), i.checked_sub(1)) {
            (Some(here), Some(before)) => {
                elements(HookPoint::Layer(before, LayerHook::Output)).is_some_and(|e| e != here)
            }
            _ => false,
        };
        let layer = |i: usize| Layer {
            input: match i {
                0 => HookPoint::Embeddings,
                i if Some(i) == mtp || (!self.with_model && short(i)) => HookPoint::MtpEhProj,
                i => HookPoint::Layer(i - 1, LayerHook::Output),
            },
            moe: match &self.mlp_kinds {
                Some(kinds) => Some(kinds.get(i) == Some(&MlpKind::Moe)),
                // (Dumps that record some layer's routing record every routed layer's.)
                None => match names().any(|n| n.starts_with(&format!("layers.{i}.moe."))) {
                    true => Some(true),
                    false => names().any(|n| n.contains(".moe.")).then_some(false),
                },
            },
        };
        // The MTP layer, and the main model's last (the final norm's input): by the config, else
        // the dumps' layers, the last of them the MTP layer where it starts from `mtp.eh_proj`.
        let highest = names().filter_map(|n| HookPoint::parse(n)?.layer()).max();
        let mtp = mtp.or_else(|| highest.filter(|&i| layer(i).input == HookPoint::MtpEhProj));
        let last = match (mtp, &self.mlp_kinds) {
            (Some(m), _) => m.checked_sub(1),
            (None, Some(kinds)) => kinds.len().checked_sub(1),
            (None, None) => highest,
        };
        let point = HookPoint::parse(&first.name)?;
        let (points, op) = inputs(point, layer, (last, mtp))?;
        use LayerHook::*;
        let reruns = match point {
            HookPoint::Layer(_, QLatent | KvLatent | DsaScores | AttnOut | TopkWeights) => true,
            // (The MoE rerun's: a dense MLP has none.)
            HookPoint::Layer(i, MlpOut) => layer(i).moe != Some(false),
            _ => false,
        };
        let mut between = Between {
            op,
            inputs: Vec::new(),
            unrecorded: Vec::new(),
            nmse,
            rerun_with_model: reruns && !self.with_model && !bf16_sized,
            bf16_sized,
        };
        for p in points {
            match self.results.iter().find(|c| c.name == p.name()) {
                Some(c) => between.inputs.push((c.name.clone(), matching(c)?)),
                None => between.unrecorded.push(p.name()),
            }
        }
        (!between.inputs.is_empty()).then_some(between)
    }
}

impl Between {
    /// The line `diff` prints under the first divergence.
    pub fn line(&self) -> String {
        let names: Vec<&str> = self.inputs.iter().map(|(n, _)| n.as_str()).collect();
        let largest = self.inputs.iter().map(|i| i.1).fold(0.0, f64::max);
        let one = names.len() == 1;
        let (noun, are, matches) = if one { ("input", "is", "matches") } else { ("inputs", "are", "match") };
        let head = format!("its {noun} {}", names.join(", "));
        let (op, rms) = (self.op, 100.0 * self.nmse.sqrt());
        // Where an input is not recorded, the difference may come through it.
        let through = match self.unrecorded.is_empty() {
            true => String::new(),
            false => format!(" or comes through {}, which the dumps do not both record", self.unrecorded.join(", ")),
        };
        let made = match largest {
            0.0 => format!("{head} {are} the reference's exactly: the difference is made in {op}{through}"),
            // (A tenth of it in the inputs or less: the operations between make the rest.)
            x if self.nmse >= 10.0 * x => format!(
                "{head} {matches} (nmse at most {x:.1e}, against its {:.1e}: {:.1e}-fold): most of the difference is \
                 made in {op}{through}",
                self.nmse,
                self.nmse / x
            ),
            x => format!(
                "{head} {matches} but already carry much of it (nmse up to {x:.1e}, against its {:.1e}): their own \
                 difference, grown past the tolerance in {op}, may be all it is",
                self.nmse
            ),
        };
        let bf16 = crate::device::Precision::Bf16.tolerance();
        let verdict = match (self.bf16_sized, self.rerun_with_model) {
            (true, _) => format!(
                "; at nmse {:.1e} (an rms of {rms:.2}%) it is the size of bf16 arithmetic's rounding: a side that \
                 computes in bf16, compared at f32's tolerance (--atol {:e} --rtol {:e} for bf16)?",
                self.nmse, bf16.atol, bf16.rtol
            ),
            (false, true) => "; --model DIR reruns it on ours's inputs against the bugs ports have shipped".into(),
            (false, false) => String::new(),
        };
        format!("no reading names the cause; {made}{verdict}")
    }

    pub fn json(&self) -> Value {
        let number = crate::diff::json_number;
        let inputs: Vec<Value> =
            self.inputs.iter().map(|(n, nmse)| json!({"name": n, "nmse": number(*nmse)})).collect();
        json!({
            "op": self.op, "inputs": inputs, "unrecorded": self.unrecorded, "nmse": number(self.nmse),
            "bf16_sized": self.bf16_sized,
        })
    }
}
