//! Per-name tolerances (`--tol PATTERN=ATOL,RTOL`, last match wins): parsing them, the one a
//! tensor is compared at, what the JSON says of them, and the warning a pattern that changed
//! nothing deserves.

use serde_json::{json, Value};

use crate::compare::{Comparison, Detail, Tolerance};
use crate::error::{Error, Result};
use crate::hooks::glob;

/// The tolerance of `name`: the last `--tol` pattern that matches it, else `default`.
pub fn tol_for(default: Tolerance, per_name: &[(String, Tolerance)], name: &str) -> Tolerance {
    per_name.iter().rev().find(|(p, _)| glob(p, name)).map(|(_, t)| *t).unwrap_or(default)
}

/// The tolerances a comparison used, as `diff --json` and `verify --json` give them.
pub fn tolerance_json(tol: Tolerance, per_name: &[(String, Tolerance)]) -> Value {
    let overrides: Vec<Value> =
        per_name.iter().map(|(p, t)| json!({"pattern": p, "atol": t.atol, "rtol": t.rtol})).collect();
    json!({ "atol": tol.atol, "rtol": tol.rtol, "per_name": overrides })
}

/// What a `--tol` pattern that changed nothing deserves: one that matches no tensor compared, or
/// only selections and integer tensors, which no tolerance applies to.
pub fn tol_warnings(per_name: &[(String, Tolerance)], results: &[Comparison]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (pattern, _) in per_name {
        let matched: Vec<_> = results.iter().filter(|c| glob(pattern, &c.name)).collect();
        if matched.is_empty() {
            warnings.push(format!("--tol {pattern} matches no tensor compared"));
        } else if matched.iter().all(|c| matches!(c.detail, Detail::Sets { .. } | Detail::Exact { .. })) {
            warnings.push(format!(
                "--tol {pattern} matches only selections and integer tensors, which compare as sets or exactly: a \
                 tolerance does not apply to them"
            ));
        }
    }
    warnings
}

/// Parses `PATTERN=ATOL,RTOL`.
pub fn parse_tol(s: &str) -> Result<(String, Tolerance)> {
    let bad = || Error::Usage(format!("--tol \"{s}\": expected PATTERN=ATOL,RTOL, e.g. 'layers.*.moe.*=1e-3,1e-3'"));
    let (pattern, nums) = s.split_once('=').ok_or_else(bad)?;
    let pattern = pattern.trim();
    let (a, r) = nums.split_once(',').ok_or_else(bad)?;
    let atol: f64 = a.trim().parse().map_err(|_| bad())?;
    let rtol: f64 = r.trim().parse().map_err(|_| bad())?;
    if pattern.is_empty() {
        return Err(bad());
    }
    if !(atol >= 0.0 && rtol >= 0.0 && atol.is_finite() && rtol.is_finite()) {
        return Err(Error::Usage(format!("--tol \"{s}\": tolerances must be finite numbers, 0 or more")));
    }
    Ok((pattern.to_string(), Tolerance { atol, rtol }))
}
