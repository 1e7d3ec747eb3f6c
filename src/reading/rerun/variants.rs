//! The ways a port computes MLA's attention, or the DSA indexer's scores, otherwise than the
//! checkpoint says, which `diff --model` reruns (`super`): the softmax scales, RoPE layouts and
//! YaRN omissions ports have shipped, and attention over every causal key; and how a reading
//! names each.

use super::{Part, Rerun};
use crate::config::{Config, Rope};
use crate::model::indexer::Selection;
use crate::model::rope::{Pairs, RopeTables, RotaryEmbedding};

/// The widths a port may take the softmax scale's square root of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDim {
    /// `qk_nope_head_dim + qk_rope_head_dim`: the checkpoint's.
    QkHead,
    /// `qk_nope_head_dim` alone.
    Nope,
    /// `v_head_dim`.
    V,
    /// `kv_lora_rank + qk_rope_head_dim`: the absorbed query's width, which decode kernels use.
    Absorbed,
}

impl ScaleDim {
    fn width(self, c: &Config) -> usize {
        match self {
            ScaleDim::QkHead => c.qk_head_dim(),
            ScaleDim::Nope => c.qk_nope_head_dim,
            ScaleDim::V => c.v_head_dim,
            ScaleDim::Absorbed => c.kv_lora_rank + c.qk_rope_head_dim,
        }
    }

    /// The config keys of the width, for JSON.
    fn key(self) -> &'static str {
        match self {
            ScaleDim::QkHead => "qk_nope_head_dim+qk_rope_head_dim",
            ScaleDim::Nope => "qk_nope_head_dim",
            ScaleDim::V => "v_head_dim",
            ScaleDim::Absorbed => "kv_lora_rank+qk_rope_head_dim",
        }
    }

    fn label(self) -> &'static str {
        match self {
            ScaleDim::QkHead => "qk_head_dim",
            ScaleDim::Nope => "qk_nope_head_dim",
            ScaleDim::V => "v_head_dim",
            ScaleDim::Absorbed => "(kv_lora_rank + qk_rope_head_dim)",
        }
    }
}

/// An attention computed otherwise than the checkpoint says, as ports have shipped it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    /// The softmax scale `width^-0.5 * mscale^mscale_power` (the checkpoint's: `QkHead`, 2);
    /// `also`, another width equal to `dim`'s (the same scale, so the same rerun).
    Scale { dim: ScaleDim, mscale_power: i32, also: Option<ScaleDim> },
    /// RoPE rotating the pairs `(x[j], x[j + half])` (`rotate_half`), not neighbours.
    RopeHalves,
    /// YaRN's frequencies left out (`rope_theta`'s own), its softmax scale kept.
    YarnFrequencies,
    /// YaRN left out altogether: `rope_theta`'s frequencies and the plain `qk_head_dim^-0.5`.
    NoYarn,
    /// Every causal key attended to: the DSA selection left out (dense attention).
    AllKeys,
}

impl Variant {
    /// The variants of the attention that compute otherwise than the checkpoint `c` says, most
    /// likely first, each with its softmax scale: a scale equal to the checkpoint's, or to an
    /// earlier one, is left out (without YaRN every mscale power is the same). Dense attention
    /// (`AllKeys`) is tried apart (`super::Rerun::of`).
    pub(super) fn candidates(c: &Config) -> Vec<(Variant, f64)> {
        let m = c.softmax_mscale();
        let mut out: Vec<(Variant, f64)> = Vec::new();
        for dim in [ScaleDim::QkHead, ScaleDim::Nope, ScaleDim::V, ScaleDim::Absorbed] {
            for mscale_power in [2, 0, 1] {
                let scale = (dim.width(c) as f64).powf(-0.5) * m.powi(mscale_power);
                let seen = |s: f64| (s / scale - 1.0).abs() < 1e-9;
                if seen(c.softmax_scale()) {
                    continue;
                }
                match out.iter_mut().find(|(_, s)| seen(*s)) {
                    // The same width under another name (DeepSeek-V3's nope and v are both 128).
                    Some((Variant::Scale { dim: d, also, .. }, _)) if *d != dim && d.width(c) == dim.width(c) => {
                        also.get_or_insert(dim);
                    }
                    Some(_) => {}
                    None => out.push((Variant::Scale { dim, mscale_power, also: None }, scale)),
                }
            }
        }
        out.push((Variant::RopeHalves, c.softmax_scale()));
        if matches!(c.rope, Rope::Yarn(_)) {
            out.push((Variant::YarnFrequencies, c.softmax_scale()));
            // (Without an mscale, YaRN left out altogether is its frequencies left out.)
            if m != 1.0 {
                out.push((Variant::NoYarn, (c.qk_head_dim() as f64).powf(-0.5)));
            }
        }
        out
    }

    /// The variants of the indexer's scores: its RoPE (its scale is no YaRN's, and a scale
    /// would move every score by one factor, which `diff` reads already).
    pub(super) fn candidates_of_indexer(c: &Config) -> Vec<(Variant, f64)> {
        let mut out = vec![(Variant::RopeHalves, c.softmax_scale())];
        if matches!(c.rope, Rope::Yarn(_)) {
            out.push((Variant::YarnFrequencies, c.softmax_scale()));
        }
        out
    }

    /// The selection this variant attends over, where `sel` is the one the run made.
    pub(super) fn selection(self, sel: &Selection) -> Selection {
        match self {
            Variant::AllKeys => {
                let idx = (0..sel.batch * sel.seq).flat_map(|_| 0..sel.seq).collect();
                let margin = vec![f32::INFINITY; sel.batch * sel.seq];
                Selection { batch: sel.batch, seq: sel.seq, k: sel.seq, idx, margin }
            }
            _ => sel.clone(),
        }
    }

    /// The RoPE tables of this variant for positions `0..seq`.
    pub(super) fn rope(self, c: &Config, seq: usize) -> RopeTables {
        let positions: Vec<usize> = (0..seq).collect();
        match (self, &c.rope) {
            (Variant::YarnFrequencies | Variant::NoYarn, Rope::Yarn(y)) => {
                let plain = Config { rope: Rope::Default { theta: y.theta }, ..c.clone() };
                RotaryEmbedding::new(&plain).tables(&positions)
            }
            (Variant::RopeHalves, _) => {
                RopeTables { pairs: Pairs::Halves, ..RotaryEmbedding::new(c).tables(&positions) }
            }
            _ => RotaryEmbedding::new(c).tables(&positions),
        }
    }
}

impl Rerun {
    pub(crate) fn reading(self) -> String {
        let checkpoint = match self.variant {
            Variant::Scale { .. } | Variant::NoYarn => {
                format!(", where the checkpoint's is {:.6}", self.checkpoint_scale)
            }
            _ => String::new(),
        };
        let or = self.or.map(|(v, s)| format!(" (or, nearly as close, {})", self.words(v, s))).unwrap_or_default();
        let what = self.words(self.variant, self.scale);
        format!("ours is this layer's {} rerun on its input with {what}{checkpoint}{or}", self.part.label())
    }

    /// The rerun for `diff --json`: the part, each variant's kind (and width and mscale power, for
    /// a scale) and softmax scale, the checkpoint's scale.
    pub(crate) fn json(self) -> serde_json::Value {
        let variant = |v: Variant, scale: f64| {
            let (kind, dims, power) = match v {
                Variant::Scale { dim, mscale_power, also } => {
                    let dims: Vec<&str> = [Some(dim), also].into_iter().flatten().map(ScaleDim::key).collect();
                    ("softmax_scale", Some(dims), Some(mscale_power))
                }
                Variant::RopeHalves => ("rope_rotate_half", None, None),
                Variant::YarnFrequencies => ("yarn_frequencies_left_out", None, None),
                Variant::NoYarn => ("yarn_left_out", None, None),
                Variant::AllKeys => ("every_causal_key", None, None),
            };
            serde_json::json!({"kind": kind, "scale_widths": dims, "mscale_power": power, "softmax_scale": scale})
        };
        serde_json::json!({
            "part": self.part.label(),
            "variant": variant(self.variant, self.scale),
            "or": self.or.map(|(v, s)| variant(v, s)),
            "checkpoint_softmax_scale": self.checkpoint_scale,
        })
    }

    /// What `variant` (of softmax scale `scale`) computes, in words.
    fn words(self, variant: Variant, scale: f64) -> String {
        match variant {
            Variant::Scale { dim, mscale_power, also } => {
                let mscale = match (self.mscale == 1.0, mscale_power) {
                    (true, _) | (false, 0) => String::new(),
                    (false, 1) => " x mscale (once, not squared)".into(),
                    (false, _) => " x mscale²".into(),
                };
                let without = match (self.mscale != 1.0 && mscale_power == 0, dim) {
                    (true, ScaleDim::QkHead) => " (YaRN's mscale² left out)",
                    (true, _) => " (and no YaRN mscale²)",
                    _ => "",
                };
                let label = match also {
                    Some(other) => format!("{} (= {})", dim.label(), other.label()),
                    None => dim.label().to_string(),
                };
                format!("the softmax scale {label}^-0.5{mscale} = {scale:.6}{without}")
            }
            Variant::RopeHalves => {
                let whose = match self.part {
                    Part::Attention => "GLM-5",
                    Part::Indexer => "GLM-5's indexer (not DeepSeek-V3.2's)",
                };
                format!(
                    "RoPE rotating halves (`rotate_half`: x[j] with x[j + d/2]), where {whose} rotates neighbours (x[2j] \
                     with x[2j+1])"
                )
            }
            Variant::YarnFrequencies => "RoPE at rope_theta's frequencies: YaRN's interpolation left out".into(),
            Variant::NoYarn => {
                format!("YaRN left out: RoPE at rope_theta's frequencies and the softmax scale {scale:.6} without its mscale²")
            }
            Variant::AllKeys => "every causal key: the DSA selection is not applied".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(case: &str) -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case).join("config.json");
        let text = std::fs::read_to_string(path).expect("a golden config");
        Config::from_json(&serde_json::from_str(&text).expect("JSON")).expect("a config")
    }

    /// Without YaRN every mscale power is one scale, and widths equal to another's are one
    /// variant named by both (flat: qk_nope_head_dim = v_head_dim = 16); with YaRN each power of
    /// each width is a variant of its own, and YaRN's two omissions are there.
    #[test]
    fn candidates_are_the_distinct_computations() {
        let flat = config("flat");
        let kinds: Vec<Variant> = Variant::candidates(&flat).into_iter().map(|(v, _)| v).collect();
        let nope_v = Variant::Scale { dim: ScaleDim::Nope, mscale_power: 2, also: Some(ScaleDim::V) };
        let absorbed = Variant::Scale { dim: ScaleDim::Absorbed, mscale_power: 2, also: None };
        assert_eq!(kinds, [nope_v, absorbed, Variant::RopeHalves]);
        let yarn = config("grouped-shared-yarn");
        let kinds: Vec<Variant> = Variant::candidates(&yarn).into_iter().map(|(v, _)| v).collect();
        let scales = kinds.iter().filter(|v| matches!(v, Variant::Scale { .. })).count();
        assert_eq!(scales, 2 + 3 + 3, "{kinds:?}"); // qk_head_dim's powers 0 and 1; nope (= v) and absorbed's 3
        assert!(kinds.ends_with(&[Variant::RopeHalves, Variant::YarnFrequencies, Variant::NoYarn]), "{kinds:?}");
    }
}
