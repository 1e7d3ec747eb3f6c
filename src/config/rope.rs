//! RoPE's parameters in a config: `rope_scaling` or `rope_parameters` (transformers'
//! standardisation, the older name first when it holds anything), default or YaRN, refused where
//! glimpse would read them otherwise than transformers.

use serde_json::{Map, Value};

use super::{as_f64, Fields};
use crate::error::{Error, Result};

/// RoPE frequencies and scaling, as transformers computes them for this model.
#[derive(Debug, Clone, PartialEq)]
pub enum Rope {
    Default { theta: f64 },
    Yarn(Yarn),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub theta: f64,
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

/// DeepSeek's YaRN `mscale`, as `yarn_get_mscale` in transformers.
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// `rope_parameters`, or the older `rope_scaling` + top-level `rope_theta`, standardised the way
/// `RotaryEmbeddingConfigMixin.convert_rope_params_to_dict` does it.
pub(super) fn rope(f: &Fields) -> Result<Rope> {
    // `rope_scaling or rope_parameters`, as transformers takes them: an empty `{}` is no scaling.
    let given = |v: &&Value| v.as_object().is_none_or(|m| !m.is_empty());
    let (field, params) = match (f.get("rope_scaling").filter(given), f.get("rope_parameters")) {
        (Some(v), _) => ("rope_scaling", v),
        (None, Some(v)) => ("rope_parameters", v),
        (None, None) => ("rope_parameters", &Value::Null),
    };
    let empty = Map::new();
    let p = match params {
        Value::Object(m) => m,
        Value::Null => &empty,
        _ => return Err(Error::config(field, "expected an object")),
    };
    // Parameters per layer type (`{"full_attention": {...}}`) are another model's: GLM-5's
    // layers share one rotary embedding. (transformers fails on them under its own layer type,
    // `indexed_attention`; under another key it runs default RoPE, the nested YaRN unread.)
    if let Some((key, _)) = p.iter().find(|(_, v)| v.is_object()) {
        return Err(Error::config(
            format!("{field}.{key}"),
            "nested rope parameters (per layer type) are not supported",
        ));
    }
    let pf = Fields { obj: p };
    let theta = match pf.given("rope_theta", &format!("{field}.rope_theta"))? {
        Some(v) => as_f64(&format!("{field}.rope_theta"), v)?,
        None => f.f64_or("rope_theta", 10_000.0)?,
    };
    if theta <= 0.0 {
        return Err(Error::config(format!("{field}.rope_theta"), "must be positive"));
    }
    let partial = match pf.get("partial_rotary_factor").or_else(|| f.get("partial_rotary_factor")) {
        Some(v) => as_f64("partial_rotary_factor", v)?,
        None => 1.0,
    };
    let rope_type = match pf.given("rope_type", &format!("{field}.rope_type"))?.or_else(|| pf.get("type")) {
        Some(v) => v
            .as_str()
            .ok_or_else(|| Error::config(format!("{field}.rope_type"), format!("expected a name, got {v}")))?,
        None => "default",
    };
    match rope_type {
        // (transformers' default RoPE rotates the whole `qk_rope_head_dim` whatever the factor
        // says: it does not read it, and the logits are the same; YaRN's frequencies do read it.)
        "default" => Ok(Rope::Default { theta }),
        "yarn" if partial != 1.0 => Err(Error::config(
            "partial_rotary_factor",
            format!("only 1.0 is supported with yarn, got {partial} (transformers fails on the shapes too)"),
        )),
        "yarn" => {
            let key = |k: &str| format!("{field}.{k}");
            let factor = match pf.get("factor") {
                Some(v) => as_f64(&key("factor"), v)?,
                None => return Err(Error::config(key("factor"), "required for yarn")),
            };
            // (transformers would divide by it: every attention output NaN.)
            if factor <= 0.0 {
                return Err(Error::config(key("factor"), format!("must be positive, got {factor}")));
            }
            let max_pos = f.usize_or("max_position_embeddings", 202752)? as f64;
            // A top-level `original_max_position_embeddings` wins, as in transformers.
            let in_params = pf.given("original_max_position_embeddings", &key("original_max_position_embeddings"))?;
            let original = match f.get("original_max_position_embeddings").or(in_params) {
                Some(v) => as_f64(&key("original_max_position_embeddings"), v)?,
                None => max_pos,
            };
            if original <= 0.0 {
                let msg = format!("must be positive, got {original}");
                return Err(Error::config(key("original_max_position_embeddings"), msg));
            }
            let opt = |k: &str| pf.get(k).map(|v| as_f64(&key(k), v)).transpose();
            for k in ["beta_fast", "beta_slow"] {
                if let Some(beta) = opt(k)?.filter(|b| *b < 0.0) {
                    return Err(Error::config(key(k), format!("must not be negative, got {beta}")));
                }
            }
            // `beta_fast or 32`: a 0 falls back to the default too.
            let nonzero_or = |v: Option<f64>, d: f64| v.filter(|x| *x != 0.0).unwrap_or(d);
            Ok(Rope::Yarn(Yarn {
                theta,
                factor,
                original_max_position_embeddings: original,
                beta_fast: nonzero_or(opt("beta_fast")?, 32.0),
                beta_slow: nonzero_or(opt("beta_slow")?, 1.0),
                mscale: opt("mscale")?,
                mscale_all_dim: opt("mscale_all_dim")?,
                attention_factor: opt("attention_factor")?,
                truncate: match pf.get("truncate") {
                    Some(v) => v.as_bool().ok_or_else(|| Error::config(key("truncate"), "expected a boolean"))?,
                    None => true,
                },
            }))
        }
        other => {
            Err(Error::config(format!("{field}.rope_type"), format!("\"{other}\" is not supported (default, yarn)")))
        }
    }
}
