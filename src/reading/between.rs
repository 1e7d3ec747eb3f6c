//! Where no reading names a cause: the first divergence localised by its inputs. A float
//! activation is computed from a few earlier hook points of its layer (an attention output from
//! the layer's `input_norm`, its latents and its DSA selection); where both dumps hold them and
//! they match, the difference is made in the operations between, which this says, naming them
//! as the checkpoint's modules (`kv_b_proj`, `o_proj`), and how much of it the inputs already
//! carry. A divergence past rounding that no pattern reads is then never left without a word.

use serde_json::{json, Value};

use crate::compare::{Comparison, Detail};
use crate::diff::DiffReport;
use crate::hooks::{HookPoint, LayerHook};

/// The first divergence's inputs, each matching the reference, and the operations between.
#[derive(Debug, Clone, PartialEq)]
pub struct Between {
    pub name: String,
    /// What computes it from its inputs.
    pub op: &'static str,
    /// Its inputs both dumps hold, each with its NMSE against the reference (0 for a selection
    /// that matches row for row).
    pub inputs: Vec<(String, f64)>,
    /// Its inputs neither or only one dump holds.
    pub unrecorded: Vec<String>,
    /// Its own NMSE.
    pub nmse: f64,
    /// Whether `--model` (not given) would rerun the operations on ours's inputs with the
    /// variants ports get wrong (`rerun`, `latent`, `moe_rerun`, the weights rule).
    pub rerun_with_model: bool,
}

/// The hook points `point` is computed from in the forward pass, and what computes it; None
/// for points outside the spec's activations. `layer_input` is what the layer starts from.
fn inputs(
    point: HookPoint,
    layer_input: impl Fn(usize) -> Option<HookPoint>,
) -> Option<(Vec<HookPoint>, &'static str)> {
    use LayerHook::*;
    let (i, hook) = match point {
        HookPoint::Layer(i, hook) => (i, hook),
        HookPoint::Logits => return Some((vec![HookPoint::FinalNorm], "lm_head")),
        _ => return None,
    };
    let at = |h: LayerHook| HookPoint::Layer(i, h);
    let with_input = |mut v: Vec<HookPoint>| {
        v.extend(layer_input(i));
        v
    };
    Some(match hook {
        InputNorm => (layer_input(i).into_iter().collect(), "input_layernorm"),
        QLatent => (vec![at(InputNorm)], "q_a_proj and q_a_layernorm"),
        KvLatent => (vec![at(InputNorm)], "kv_a_proj_with_mqa and kv_a_layernorm"),
        DsaScores => (vec![at(InputNorm), at(QLatent)], "the indexer (wq_b, wk, k_norm, weights_proj, its RoPE)"),
        AttnOut => (
            vec![at(InputNorm), at(QLatent), at(KvLatent), at(DsaTopk)],
            "the attention (q_b_proj, kv_b_proj, RoPE, the softmax over the kept keys, o_proj)",
        ),
        PostAttnNorm => (with_input(vec![at(AttnOut)]), "the residual add and post_attention_layernorm"),
        RouterLogits => (vec![at(PostAttnNorm)], "the router's gate"),
        TopkWeights => {
            (vec![at(RouterLogits), at(TopkIds)], "the routing weights (sigmoid, normalisation, routed_scaling_factor)")
        }
        MlpOut => (vec![at(PostAttnNorm), at(TopkIds), at(TopkWeights)], "the MLP or experts"),
        Output => (with_input(vec![at(AttnOut), at(MlpOut)]), "the residual adds"),
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
        let Detail::Float { nmse, .. } = first.detail else { return None };
        if self.reading(first).is_some() || self.past_rounding_reading().is_some() || self.first_reads_as_rounding() {
            return None;
        }
        let find = |p: HookPoint| self.results.iter().find(|c| c.name == p.name());
        // The MTP layer (the last, where the dumps hold the head's `mtp.*`) starts from
        // `mtp.eh_proj`; the first from the embeddings; the others from the layer before.
        let last = self.results.iter().filter_map(|c| HookPoint::parse(&c.name)?.layer()).max();
        let mtp = self.results.iter().any(|c| c.name.starts_with("mtp."))
            || self.only_b.iter().any(|n| n.starts_with("mtp."));
        let layer_input = |i: usize| match i {
            0 => Some(HookPoint::Embeddings),
            i if mtp && Some(i) == last => Some(HookPoint::MtpEhProj),
            i => Some(HookPoint::Layer(i - 1, LayerHook::Output)),
        };
        let (points, op) = inputs(HookPoint::parse(&first.name)?, layer_input)?;
        use LayerHook::*;
        let point = HookPoint::parse(&first.name)?;
        let reruns =
            matches!(point, HookPoint::Layer(_, QLatent | KvLatent | DsaScores | AttnOut | TopkWeights | MlpOut));
        let mut between = Between {
            name: first.name.clone(),
            op,
            inputs: Vec::new(),
            unrecorded: Vec::new(),
            nmse,
            rerun_with_model: reruns && !self.with_model,
        };
        for p in points {
            match find(p) {
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
        // (A tenth of it in the inputs or less: the operations between make the rest.)
        let carried = match largest {
            0.0 => format!("are the reference's exactly: all of it is made in {}", self.op),
            x if self.nmse >= 10.0 * x => format!(
                "match (nmse at most {x:.1e}, against its {:.1e}: {:.1e}-fold), so most of it is made in {}",
                self.nmse,
                self.nmse / x,
                self.op
            ),
            x => format!(
                "match but carry much of it already (nmse up to {x:.1e}, against its {:.1e}): their own difference, \
                 grown past the tolerance in {}, may be all it is",
                self.nmse, self.op
            ),
        };
        let unrecorded = match self.unrecorded.is_empty() {
            true => String::new(),
            false => format!(" ({} not recorded on both sides)", self.unrecorded.join(", ")),
        };
        let rerun = match self.rerun_with_model {
            true => "; --model DIR reruns it on ours's inputs against the bugs ports have shipped",
            false => "",
        };
        // ("its input X is", "its inputs X, Y are".)
        let (noun, carried) = match names.len() {
            1 => (
                "input",
                carried.replacen("are ", "is ", 1).replacen("match ", "matches ", 1).replacen("carry ", "carries ", 1),
            ),
            _ => ("inputs", carried),
        };
        format!("no reading names the cause; its {noun} {}{unrecorded} {carried}{rerun}", names.join(", "))
    }

    pub fn json(&self) -> Value {
        let inputs: Vec<Value> = self.inputs.iter().map(|(n, nmse)| json!({"name": n, "nmse": nmse})).collect();
        json!({"op": self.op, "inputs": inputs, "unrecorded": self.unrecorded, "nmse": self.nmse})
    }
}
