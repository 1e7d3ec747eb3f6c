//! A comparison summed up by decoder layer: how far each layer's output is off (NMSE, cosine),
//! how many of its tensors are outside the tolerance, and its routing and DSA flips by class.
//! Where every layer is somewhat off (a quantised twin, a bf16 port) the first divergence is
//! layer 0's rounding; the table marks where to look for a bug: a layer whose output error jumps
//! against the one before, and one with flips one rule cannot make (`diff` measures flips against
//! both dumps' scores, `flips::add_movement`; `verify` the reference's against its own,
//! `flips::reference_rule_breaks`).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{json, Value};

use crate::compare::{Comparison, Detail};
use crate::flips::Class;
use crate::hooks::{HookPoint, LayerHook};

/// One decoder layer's share of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerError {
    pub layer: usize,
    /// `layers.{i}.output`'s NMSE and cosine, where both sides hold it.
    pub nmse: Option<f64>,
    pub cosine: Option<f64>,
    /// Tensors of the layer outside the tolerance, of those compared.
    pub off: usize,
    pub tensors: usize,
    /// Flips by class: near-tie, real, unknown.
    pub routing: [usize; 3],
    pub dsa: [usize; 3],
    /// Flips one rule cannot have made (`compare::RuleBreak`): the selection's rule differs in
    /// this layer.
    pub unexplained: usize,
}

/// Output NMSE growing by at least this factor over the layer before marks the layer.
const JUMP: f64 = 10.0;

/// NMSE at or below this is about f32 rounding's level (1e-5 of the values' scale: a few ulps
/// grown over layers and wide sums; the golden cases' layers show 3e-14 to 4e-13 at toy widths):
/// a jump is measured from here at least, so a port whose first layers are bit-exact does not get
/// its first rounding error marked as an infinite jump.
const NMSE_FLOOR: f64 = 1e-10;

/// `results` summed up by decoder layer, in order (flips classed at `near_tie`).
pub fn by_layer(results: &[Comparison], near_tie: f64) -> Vec<LayerError> {
    let mut layers: BTreeMap<usize, LayerError> = BTreeMap::new();
    for c in results {
        let Some(HookPoint::Layer(i, hook)) = HookPoint::parse(&c.name) else { continue };
        let e = layers.entry(i).or_insert(LayerError {
            layer: i,
            nmse: None,
            cosine: None,
            off: 0,
            tensors: 0,
            routing: [0; 3],
            dsa: [0; 3],
            unexplained: 0,
        });
        e.tensors += 1;
        e.off += usize::from(!c.ok);
        if let Detail::Sets { flips, .. } = &c.detail {
            e.unexplained += flips.iter().filter(|f| f.unexplained()).count();
        }
        match (&c.detail, hook) {
            (Detail::Float { nmse, cosine, .. }, LayerHook::Output) => {
                (e.nmse, e.cosine) = (Some(*nmse), Some(*cosine))
            }
            (Detail::Sets { flips, .. }, LayerHook::TopkIds) => e.routing = Class::counts(flips, near_tie),
            (Detail::Sets { flips, .. }, LayerHook::DsaTopk) => e.dsa = Class::counts(flips, near_tie),
            _ => {}
        }
    }
    layers.into_values().collect()
}

/// A layer whose output NMSE grew by [`JUMP`] or more over the layer before's (or over
/// [`NMSE_FLOOR`], where the layer before was below it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jump {
    pub layer: usize,
    pub factor: f64,
    /// The layer before's NMSE, when it was below [`NMSE_FLOOR`] (the factor is over the floor).
    pub from_rounding: Option<f64>,
}

impl Jump {
    /// By how much, over what: `x40 over the layer before`, or where the layer before was at
    /// rounding's level, `x396526775 over rounding's level 1e-10 (the layer before: 0.0e0)`.
    pub fn label(&self) -> String {
        match self.from_rounding {
            Some(before) => format!("{} (the layer before: {before:.1e})", self.short_label()),
            None => self.short_label(),
        }
    }

    /// [`Jump::label`] without the layer before's NMSE (a title's room).
    pub fn short_label(&self) -> String {
        match self.from_rounding {
            None => format!("x{:.0} over the layer before", self.factor),
            Some(_) => format!("x{:.0} over rounding's level {NMSE_FLOOR:.0e}", self.factor),
        }
    }
}

/// Every layer that jumps: two bugs make two jumps.
pub fn jumps(layers: &[LayerError]) -> Vec<Jump> {
    layers
        .windows(2)
        .filter_map(|w| {
            let (before, now) = (w[0].nmse?, w[1].nmse?);
            let factor = now / before.max(NMSE_FLOOR);
            let from_rounding = (before < NMSE_FLOOR).then_some(before);
            (factor >= JUMP).then_some(Jump { layer: w[1].layer, factor, from_rounding })
        })
        .collect()
}

/// The table, for two or more layers (one says nothing the tensor lines do not).
pub fn render(layers: &[LayerError]) -> String {
    if layers.len() < 2 {
        return String::new();
    }
    let mut out = String::from(
        "by layer (output nmse and cosine; tensors outside the tolerance; flips near-tie/real/unknown):\n\
         layer  output nmse  cosine      off       routing flips  dsa flips\n",
    );
    let jumps = jumps(layers);
    let num = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map_or("-".to_string(), f);
    let flips = |c: [usize; 3]| if c == [0; 3] { "0".to_string() } else { format!("{}/{}/{}", c[0], c[1], c[2]) };
    for l in layers {
        let _ = write!(
            out,
            "{:>5}  {:<11}  {:<10}  {:<8}  {:<13}  {}",
            l.layer,
            num(l.nmse, &|x| format!("{x:.3e}")),
            num(l.cosine, &|x| format!("{x:.6}")),
            format!("{} of {}", l.off, l.tensors),
            flips(l.routing),
            flips(l.dsa)
        );
        if let Some(j) = jumps.iter().find(|j| j.layer == l.layer) {
            let _ = write!(out, "   <- nmse {}", j.label());
        }
        if l.unexplained > 0 {
            let _ = write!(out, "   <- {} flips one rule cannot make: the rule differs", l.unexplained);
        }
        out.push('\n');
    }
    out
}

/// For a run whose layers each had the reference's input (`verify --isolate`): where two layers
/// or more are off and each parts from the reference first at the same hook point, the line that
/// says so. Each layer's error is then its own, and of the same origin in each: code they share
/// (RoPE, a softmax scale, a norm; or its precision, a bf16 or FP8 twin's), which marks no jump,
/// since no layer's error grows over the one before's.
pub fn shared_first_mismatch(results: &[Comparison]) -> Option<String> {
    let mut first: BTreeMap<usize, Option<LayerHook>> = BTreeMap::new();
    for c in results {
        if let Some(HookPoint::Layer(i, hook)) = HookPoint::parse(&c.name) {
            let slot = first.entry(i).or_insert(None);
            if slot.is_none() && !c.ok {
                *slot = Some(hook);
            }
        }
    }
    let off: Vec<(usize, LayerHook)> = first.iter().filter_map(|(&i, h)| Some((i, (*h)?))).collect();
    let hook = off.first()?.1;
    if off.len() < 2 || off.iter().any(|&(_, h)| h != hook) {
        return None;
    }
    let which = match off.len() == first.len() {
        true => "every layer".to_string(),
        false => format!("layers {}", off.iter().map(|(i, _)| i.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let name = hook.suffix();
    Some(format!(
        "{which} ({} of {}), each on the reference's input, first parts from it at its {name}: what they all run \
         there differs (a bug or a precision of code they share), not one layer",
        off.len(),
        first.len()
    ))
}

pub fn json(layers: &[LayerError]) -> Value {
    let classes = |c: [usize; 3]| json!({"near_tie": c[0], "real": c[1], "unknown": c[2]});
    let jumps = jumps(layers);
    json!(layers
        .iter()
        .map(|l| json!({
            "layer": l.layer,
            // NaN and infinite numbers as strings, as the tensors' lines keep them.
            "output_nmse": l.nmse.map(crate::diff::json_number),
            "output_cosine": l.cosine.map(crate::diff::json_number),
            "tensors_off": l.off,
            "tensors": l.tensors,
            "routing_flips": classes(l.routing),
            "dsa_flips": classes(l.dsa),
            "nmse_jump": jumps.iter().find(|j| j.layer == l.layer).map(|j| crate::diff::json_number(j.factor)),
            "nmse_jump_from_rounding": jumps.iter().find(|j| j.layer == l.layer).map(|j| j.from_rounding.is_some()),
            "unexplained_flips": l.unexplained,
        }))
        .collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::{compare_floats, Tolerance};

    fn output(layer: usize, ours: &[f32], reference: &[f32]) -> Comparison {
        let (ok, detail) = compare_floats(ours, reference, &[ours.len()], Tolerance::default());
        Comparison { name: format!("layers.{layer}.output"), ok, detail }
    }

    /// Three layers a little off (rounding) and one much more: the jump marks layer 2, not layer
    /// 0 where the divergence starts.
    #[test]
    fn the_layer_whose_error_jumps_is_marked() {
        let e = [1.0f32, -2.0, 3.0, 0.5];
        let off = |d: f32| e.iter().map(|x| x * (1.0 + d)).collect::<Vec<_>>();
        let results = vec![
            output(0, &off(1e-3), &e),
            output(1, &off(2e-3), &e),
            output(2, &[1.5, -1.0, 3.0, 0.0], &e),
            output(3, &[1.6, -1.0, 3.1, 0.0], &e),
        ];
        let layers = by_layer(&results, 1e-3);
        assert_eq!(layers.len(), 4);
        assert_eq!(layers.iter().map(|l| (l.off, l.tensors)).collect::<Vec<_>>(), [(1, 1); 4]);
        let [Jump { layer, factor, from_rounding: None }] = jumps(&layers)[..] else { panic!("{:?}", jumps(&layers)) };
        assert_eq!(layer, 2);
        assert!(factor > 1000.0, "{factor}");
        let table = render(&layers);
        let marked: Vec<&str> = table.lines().filter(|l| l.contains("<- nmse x")).collect();
        assert_eq!(marked.len(), 1, "{table}");
        assert!(marked[0].trim_start().starts_with("2 "), "{table}");
        assert_eq!(json(&layers)[2]["nmse_jump"], json!(factor));
        assert_eq!(json(&layers)[1]["nmse_jump"], json!(null));
        // Errors that grow smoothly mark nothing; one layer makes no table.
        assert_eq!(jumps(&layers[..2]), []);
        assert_eq!(render(&layers[..1]), "");
    }

    /// A port whose first layers are bit-exact: the first rounding error after them is no jump
    /// (the factor over 0 would be infinite), a bug's error after it is, measured over rounding's
    /// level; and a second bug further on is marked too.
    #[test]
    fn jumps_count_from_rounding_level_and_every_one_is_marked() {
        let e: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() + 2.0).collect();
        let off = |d: f32| e.iter().map(|x| x * (1.0 + d)).collect::<Vec<_>>();
        let mut rounding = e.clone();
        rounding[5] = f32::from_bits(rounding[5].to_bits() + 1); // one ulp
        let results = vec![
            output(0, &e, &e),
            output(1, &rounding, &e),
            output(2, &off(1e-2), &e),
            output(3, &off(1.1e-2), &e),
            output(4, &off(0.5), &e),
        ];
        let layers = by_layer(&results, 1e-3);
        assert!(layers[1].nmse.is_some_and(|n| n > 0.0 && n < NMSE_FLOOR), "{:?}", layers[1]);
        let jumps = jumps(&layers);
        assert_eq!(jumps.iter().map(|j| j.layer).collect::<Vec<_>>(), [2, 4], "{jumps:?}");
        assert_eq!(jumps[0].from_rounding, layers[1].nmse);
        assert!(jumps[0].factor > 1e5 && jumps[0].factor.is_finite(), "{jumps:?}");
        let table = render(&layers);
        assert_eq!(table.lines().filter(|l| l.contains("<- nmse x")).count(), 2, "{table}");
        assert!(table.contains("over rounding's level 1e-10 (the layer before: "), "{table}");
        assert_eq!(json(&layers)[1]["nmse_jump"], json!(null));
        assert!(json(&layers)[2]["nmse_jump"].is_number());
    }
}
