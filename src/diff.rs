//! `diff`: compare two dumps tensor by tensor with the engine `verify` uses, name the first hook
//! point (in forward order) where they part ways, and list every routing and DSA flip with the
//! margins that decided it, so a near-tie (rounding can flip it) is told apart from a real bug.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::compare::{compare_tensor, Comparison, Detail, Flip, Tolerance};
use crate::config::Config;
use crate::dump::{Dump, Values};
use crate::error::{Error, Result};
use crate::flips::{self, Class};
use crate::hooks::{finite_expected, first_non_finite, glob, HookPoint, NonFinite};
use crate::model::moe::Routers;

#[derive(Debug, Clone)]
pub struct DiffOptions {
    pub tol: Tolerance,
    /// `(pattern, tolerance)` overrides; the last pattern that matches a name wins.
    pub per_name: Vec<(String, Tolerance)>,
    /// Flips whose margins on both sides are below this are near-ties.
    pub near_tie: f64,
    /// The routers of the checkpoint both dumps ran (`diff --model`), to recompute routing
    /// margins from recorded gate logits.
    pub routers: Option<Routers>,
    /// Its config (`diff --model`): a shared-indexer layer's DSA flips take the margins of the
    /// full layer whose keys it reuses.
    pub config: Option<Config>,
}

impl Default for DiffOptions {
    fn default() -> Self {
        let near_tie = Tolerance::default().near_tie();
        DiffOptions { tol: Tolerance::default(), per_name: Vec::new(), near_tie, routers: None, config: None }
    }
}

impl DiffOptions {
    pub fn tol_for(&self, name: &str) -> Tolerance {
        tol_for(self.tol, &self.per_name, name)
    }
}

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
    if pattern.is_empty() || !(atol >= 0.0 && rtol >= 0.0 && atol.is_finite() && rtol.is_finite()) {
        return Err(bad());
    }
    Ok((pattern.to_string(), Tolerance { atol, rtol }))
}

#[derive(Clone)]
pub struct DiffReport {
    pub results: Vec<Comparison>,
    /// The first NaN or Inf in forward order, in each dump.
    pub non_finite_a: Option<NonFinite>,
    pub non_finite_b: Option<NonFinite>,
    pub only_a: Vec<String>,
    pub only_b: Vec<String>,
    pub near_tie: f64,
    /// The tolerance the floats were compared at, and the `--tol` overrides by name pattern.
    pub tol: Tolerance,
    pub per_name: Vec<(String, Tolerance)>,
    /// Whether a checkpoint's config and routers were given to recompute margins a dump lacks.
    pub with_model: bool,
    /// What the first divergence's values say beyond its numbers.
    pub notes: crate::reading::Notes,
    /// Which dumps hold only bf16 values (every float's low 16 bits 0), ours then the
    /// reference, when floats differ at a tolerance tighter than bf16's: a hint to compare at
    /// bf16's.
    pub bf16_only: [bool; 2],
    /// The first float tensor outside the tolerance, where one side holds bf16 values only in it
    /// and the other does not, at a tolerance tighter than bf16's (ours, the reference): a port
    /// that keeps its activations in bf16 and its scores in f32 is bf16 where it first differs.
    pub bf16_first: Option<(String, [bool; 2])>,
}

/// What `diff` says of two dumps that share nothing but their tokens.
const TOKENS_ONLY: &str = "nothing compared but input_ids: the dumps share no hook point";

impl DiffReport {
    /// Whether every tensor both hold matches, and ours does not hold spec hook points under
    /// other names ([`DiffReport::misnamed`]): a partial recording matches, a misnamed one not.
    pub fn all_match(&self) -> bool {
        self.results.iter().all(|c| c.ok) && self.not_compared().is_none()
    }

    /// Why two dumps whose common tensors all match still do not: nothing compared but the
    /// tokens (a writer that wrote nothing else), or ours's spec hook points under other names.
    pub fn not_compared(&self) -> Option<String> {
        if let Some(m) = self.misnamed() {
            return Some(format!("the spec's hook points are not compared: {m}"));
        }
        crate::compare::tokens_only(&self.results).then(|| TOKENS_ONLY.into())
    }

    /// What ours's own names say of the spec hook points it lacks, where they say it holds
    /// them under other names (a prefix, layers numbered from 1): the names are the spec's
    /// contract, and most of the comparison did not happen.
    pub fn misnamed(&self) -> Option<String> {
        let missing = self.missing_spec_names();
        (!missing.is_empty()).then(|| self.missing_names_hint(&missing)).flatten()
    }
    /// The first tensor, in forward order, that does not match.
    pub fn first_divergence(&self) -> Option<&Comparison> {
        self.results.iter().find(|c| !c.ok)
    }
    pub fn flips(&self) -> Vec<(&str, &Flip)> {
        crate::compare::flips(&self.results)
    }
}

/// The first NaN or Inf of a dump in forward order (names where they are expected excepted).
pub fn first_non_finite_in(d: &Dump) -> Result<Option<NonFinite>> {
    first_non_finite_with(d, &HashMap::new())
}

/// [`first_non_finite_in`], taking the verdicts of tensors already scanned from `known` instead
/// of reading them again.
fn first_non_finite_with(d: &Dump, known: &HashMap<String, Option<NonFinite>>) -> Result<Option<NonFinite>> {
    for name in d.names().into_iter().filter(|n| finite_expected(n)) {
        let found = match known.get(&name) {
            Some(verdict) => verdict.clone(),
            None => match d.values(&name)? {
                (Values::F32(v), shape) => first_non_finite(&name, &v, &shape),
                _ => None,
            },
        };
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

pub(crate) fn floats(d: &Dump, name: &str) -> Option<Vec<f32>> {
    match d.values(name) {
        Ok((Values::F32(v), _)) => Some(v),
        _ => None,
    }
}

pub(crate) fn ints(d: &Dump, name: &str) -> Option<Vec<i64>> {
    match d.values(name) {
        Ok((Values::I64(v), _)) => Some(v),
        _ => None,
    }
}

/// Compares `a` (ours) against `b` (the reference) on the names both hold.
pub fn diff(a: &Dump, b: &Dump, opts: &DiffOptions) -> Result<DiffReport> {
    // Runs of different inputs cannot be compared tensor by tensor.
    if a.contains("input_ids") && b.contains("input_ids") {
        if let Some(d) = a.tokens()?.difference(&b.tokens()?) {
            return Err(Error::Usage(format!(
                "{} and {} are runs of different inputs ({d})",
                a.path.display(),
                b.path.display()
            )));
        }
    }
    let names_a = a.names();
    let names_b = b.names();
    if !names_b.iter().any(|n| names_a.contains(n)) {
        return Err(Error::Usage(format!(
            "{} and {} hold no tensor of the same name: nothing to compare",
            a.path.display(),
            b.path.display()
        )));
    }
    let mut results: Vec<Comparison> = Vec::new();
    let mut notes = crate::reading::Notes::default();
    // The run's batch rows: where the routing's `[B*S, ...]` rows sit along the positions.
    let batch = b.shape("input_ids").or_else(|| a.shape("input_ids")).and_then(|s| s.first().copied());
    // Whether every float value of each dump is a bf16 (low 16 bits 0), and any float compared.
    let (mut bf16_only, mut floats_seen) = ([true; 2], false);
    let mut bf16_first = None;
    let bf16 = crate::device::Precision::Bf16.tolerance();
    let is_bf16 = |v: &Values| matches!(v, Values::F32(v) if v.iter().all(|x| x.to_bits() & 0xFFFF == 0));
    // Each compared tensor is scanned for NaN/Inf while it is in memory, not read again for it.
    let (mut seen_a, mut seen_b) = (HashMap::new(), HashMap::new());
    for name in names_b.iter().filter(|n| names_a.contains(n)) {
        let (va, sa) = a.values(name)?;
        let (vb, sb) = b.values(name)?;
        if name.ends_with(".moe.topk_ids") {
            // The expert count: the width of the dump's own router logits, else the other's
            // (both ran one model), else the checkpoint's.
            let (own_a, own_b) = (a.experts_of(name), b.experts_of(name));
            let config = opts.config.as_ref().map(|c| c.n_routed_experts);
            let experts = [own_a.or(own_b).or(config), own_b.or(own_a).or(config)];
            let sides = [(&va, sa.as_slice()), (&vb, sb.as_slice())];
            if let Some(c) = crate::compare::invalid_selection(name, sides, experts) {
                results.push(c);
                continue;
            }
        }
        for (seen, v, shape) in [(&mut seen_a, &va, &sa), (&mut seen_b, &vb, &sb)] {
            if let Values::F32(v) = v {
                seen.insert(name.clone(), first_non_finite(name, v, shape));
            }
        }
        let ids = match name.strip_suffix(".moe.topk_weights") {
            Some(layer) => {
                let n = format!("{layer}.moe.topk_ids");
                ints(a, &n).zip(ints(b, &n))
            }
            None => None,
        };
        let ids = ids.as_ref().map(|(x, y)| (x.as_slice(), y.as_slice()));
        for (side, v) in [&va, &vb].into_iter().enumerate() {
            if let Values::F32(_) = v {
                floats_seen = true;
                // (Once a side holds a value that is no bf16, its tensors are not scanned again.)
                bf16_only[side] = bf16_only[side] && is_bf16(v);
            }
        }
        let mut c = compare_tensor(name, (&va, &sa), (&vb, &sb), ids, opts.tol_for(name), batch);
        let tighter = opts.tol_for(name).atol < bf16.atol;
        if let (None, false, true, Detail::Float { .. }) = (&bf16_first, c.ok, tighter, &c.detail) {
            let sides = [is_bf16(&va), is_bf16(&vb)];
            // (Both sides bf16 there is the checkpoint's doing, a bf16 embedding table: no hint.)
            bf16_first = Some((name.clone(), sides)).filter(|_| sides[0] != sides[1]);
        }
        // What the first divergence's values say, while they are here.
        // (Indexer scores as they were compared: at causal keys only.)
        let causal = crate::compare::causal_scores(name, &sb, &va, &vb);
        let (va, vb) = causal.as_ref().map_or((&va, &vb), |(x, y)| (x, y));
        if let (false, true, Values::F32(x), Values::F32(y)) = (c.ok, results.iter().all(|r| r.ok), va, vb) {
            notes = crate::reading::Notes::of(a, b, name, (x, y, &sb), opts);
        }
        if let (false, true, Some(config)) = (c.ok, results.iter().all(|r| r.ok), &opts.config) {
            notes.not_reused = crate::reading::Notes::not_reused(a, b, name, config);
        }
        // Margins for the flips: recomputing them can read the S x S scores, so only where needed.
        if let (Detail::Sets { flips, .. }, Some(point)) = (&c.detail, HookPoint::parse(name)) {
            if !flips.is_empty() {
                let router = opts.routers.as_ref().zip(point.layer()).and_then(|(r, i)| r.layer(i));
                let margins = |d| flips::deciding_margins(d, point, opts.config.as_ref(), router);
                let (ma, mb) = (margins(a), margins(b));
                c.set_margins(ma.as_deref(), mb.as_deref());
                flips::add_leads(&mut c, a, b, opts.config.as_ref(), router);
                flips::add_movement(&mut c, a, b, opts.config.as_ref(), router, opts.near_tie);
            }
        }
        results.push(c);
    }
    // (Only a float tensor outside the tolerance is helped by bf16's.)
    let float_off = results.iter().any(|c| !c.ok && matches!(c.detail, Detail::Float { .. }));
    let loose = !floats_seen || opts.tol.atol >= bf16.atol || !float_off;
    Ok(DiffReport {
        results,
        non_finite_a: first_non_finite_with(a, &seen_a)?,
        non_finite_b: first_non_finite_with(b, &seen_b)?,
        only_a: names_a.iter().filter(|n| !names_b.contains(n)).cloned().collect(),
        only_b: names_b.iter().filter(|n| !names_a.contains(n)).cloned().collect(),
        near_tie: opts.near_tie,
        tol: opts.tol,
        per_name: opts.per_name.clone(),
        with_model: opts.config.is_some(),
        notes,
        bf16_only: if loose { [false; 2] } else { bf16_only },
        bf16_first,
    })
}

/// A number for JSON, which has no Inf or NaN: those spelled as strings.
pub(crate) fn json_number(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

fn opt_f(x: Option<f32>) -> Value {
    x.map(|v| json_number(v as f64)).unwrap_or(Value::Null)
}

pub fn comparison_json(c: &Comparison, near_tie: f64) -> Value {
    let mut v = json!({ "name": c.name, "match": c.ok });
    let detail = match &c.detail {
        Detail::Float {
            max_abs,
            worst_at,
            first_at,
            ours,
            reference,
            max_rel,
            bad,
            total,
            mean_abs,
            nmse,
            cosine,
            scale,
        } => {
            // An empty tensor has no worst element: null, not element 0's coordinate and NaN.
            let value = |x: f32| if *total == 0 { Value::Null } else { json_number(x as f64) };
            let worst_at = if *total == 0 { Value::Null } else { json!(worst_at) };
            json!({
                "kind": "float", "max_abs": json_number(*max_abs), "worst_at": worst_at, "first_outside_at": first_at,
                "ours": value(*ours),
                "reference": value(*reference), "max_rel": json_number(*max_rel), "mean_abs": json_number(*mean_abs), "nmse": json_number(*nmse),
                "cosine": json_number(*cosine), "scale": json_number(*scale), "outside_tolerance": bad, "elements": total,
            })
        }
        Detail::Exact { elements, differing } => json!({
            "kind": "exact", "elements": elements, "differ": differing.len(),
            "differing": differing.iter().map(|d| json!({
                "at": d.at, "ours": d.ours, "reference": d.reference,
            })).collect::<Vec<_>>(),
        }),
        Detail::Sets { rows, mean_recall, min_recall, flips } => json!({
            "kind": "sets", "rows": rows, "mean_recall": json_number(*mean_recall), "min_recall": json_number(*min_recall),
            "flips": flips.iter().map(|fl| json!({
                "row": fl.row, "at": fl.at, "only_ours": fl.only_ours, "only_reference": fl.only_reference,
                "recall": json_number(fl.recall), "margin_ours": opt_f(fl.margin_ours),
                "margin_reference": opt_f(fl.margin_reference),
                "lead_ours": opt_f(fl.lead_ours), "lead_reference": opt_f(fl.lead_reference),
                "keys_moved": opt_f(fl.moved.map(|m| m.keys)), "layer_score_noise_p99": opt_f(fl.moved.map(|m| m.noise)),
                "moved_too_little": fl.moved.map(|_| fl.rule_break == Some(crate::compare::RuleBreak::TooLittle)),
                "within_noise": fl.moved.map(|_| fl.within_noise()),
                "scores_unmoved": fl.moved.map(|_| fl.unmoved()),
                "rule_break": fl.rule_break.map(rule_break_json),
                "class": Class::of(fl, near_tie).label(),
            })).collect::<Vec<_>>(),
        }),
        Detail::Shape { ours, reference } => json!({ "kind": "shape", "ours": ours, "reference": reference }),
        Detail::Invalid { side, problem } => json!({ "kind": "invalid", "side": side.key(), "problem": problem }),
    };
    if let (Value::Object(m), Value::Object(d)) = (&mut v, detail) {
        m.extend(d);
    }
    v
}

fn rule_break_json(r: crate::compare::RuleBreak) -> Value {
    match r {
        crate::compare::RuleBreak::TooLittle => json!({"kind": "too_little"}),
        crate::compare::RuleBreak::OwnScores { side, kept, left_out, by } => json!({
            "kind": "own_scores", "side": side.key(),
            "kept": kept, "left_out": left_out, "by": json_number(by as f64),
        }),
    }
}

/// Names only one dump has, listed per side before the rest are counted (a partial dump lacks
/// dozens).
const ONLY_IN_LISTED: usize = 10;

impl DiffReport {
    pub fn to_json(&self, a: &Path, b: &Path) -> Value {
        json!({
            "schema": "glimpse-diff/1",
            "a": a.display().to_string(),
            "b": b.display().to_string(),
            "match": self.all_match(),
            "first_divergence": self.first_divergence().map(|c| c.name.clone()),
            "not_compared": if self.first_divergence().is_none() { self.not_compared() } else { None },
            "first_divergence_reading": self.first_divergence().and_then(|c| self.reading(c)),
            "first_divergence_onset": self.notes.onset.map(|o| json!({"matching_positions": o.matching, "reading": o.reading()})),
            "first_divergence_weights_rule": self.notes.weights_rule.map(|r| r.reading()),
            "first_non_finite_a": self.non_finite_a.as_ref().map(|n| json!({"name": n.name, "at": n.at, "value": n.value.to_string()})),
            "first_non_finite_b": self.non_finite_b.as_ref().map(|n| json!({"name": n.name, "at": n.at, "value": n.value.to_string()})),
            "near_tie_threshold": self.near_tie,
            "tolerance": tolerance_json(self.tol, &self.per_name),
            "by_layer": crate::layer_error::json(&crate::layer_error::by_layer(&self.results, self.near_tie)),
            "tensors": self.results.iter().map(|c| comparison_json(c, self.near_tie)).collect::<Vec<_>>(),
            "missing_spec_names_in_a": self.missing_spec_names(),
            "misnamed_in_a": self.misnamed(),
            "bf16_only": {"a": self.bf16_only[0], "b": self.bf16_only[1]},
            "bf16_first_divergence": self.bf16_first.as_ref().map(|(name, [a, b])| json!({"name": name, "a": a, "b": b})),
            "only_in_a": self.only_a,
            "only_in_b": self.only_b,
        })
    }

    /// The report for a terminal: first divergence on top, one line per tensor, then the flips.
    pub fn render(&self, a: &Path, b: &Path) -> String {
        let mut out = format!("diff {} (ours) against {} (reference)\n", a.display(), b.display());
        let missing = self.missing_spec_names();
        match self.first_divergence() {
            Some(c) => {
                let reading = self.reading(c).map(|r| format!(" ({r})")).unwrap_or_default();
                out += &format!("first divergence: {}{reading}\n", c.name);
                if let Some(o) = self.notes.onset {
                    out += &format!("  {}\n", o.reading());
                }
            }
            None if crate::compare::tokens_only(&self.results) => out += &format!("{TOKENS_ONLY}\n"),
            None if !missing.is_empty() => {
                out += &format!("no divergence in the {} tensors both hold\n", self.results.len())
            }
            None => out += "no divergence\n",
        }
        if !missing.is_empty() {
            let listed = missing.iter().take(3).copied().collect::<Vec<_>>().join(", ");
            let more = if missing.len() > 3 { ", ..." } else { "" };
            let hint = self.missing_names_hint(&missing).map(|h| format!(": {h}")).unwrap_or_default();
            out += &format!(
                "not compared: ours lacks {} of the reference's spec hook points ({listed}{more}){hint}\n",
                missing.len()
            );
        }
        for (side, path, nf) in [("ours", a, &self.non_finite_a), ("reference", b, &self.non_finite_b)] {
            if let Some(nf) = nf {
                out += &format!("first NaN/Inf in {} ({side}): {nf}\n", path.display());
            }
        }
        for c in &self.results {
            out += &crate::verify::format_line(c);
            if let Detail::Float { mean_abs, nmse, cosine, .. } = &c.detail {
                out += &format!("  mean_abs {mean_abs:.3e}  nmse {nmse:.3e}  cos {cosine:.6}");
            }
            if let Detail::Sets { mean_recall, .. } = &c.detail {
                out += &format!("  mean recall {mean_recall:.4}");
            }
            // Weights align by expert only where both sides hold the ids (then compared too).
            if let Some(layer) = c.name.strip_suffix(".moe.topk_weights") {
                if !self.results.iter().any(|r| r.name == format!("{layer}.moe.topk_ids")) {
                    out += "  (slot by slot: the two dumps do not both hold moe.topk_ids to align them by expert)";
                }
            }
            out.push('\n');
        }
        out += &crate::layer_error::render(&crate::layer_error::by_layer(&self.results, self.near_tie));
        let flips = self.flips();
        out += &flips::render(&flips, self.near_tie, " (see --json)");
        // What --model would add for the flips of unknown margin: routing margins from the gate
        // logits; for DSA ones, only a shared-indexer layer's (the margins of the layer it reuses).
        let unknown = |routing: bool| {
            let of_kind = |name: &str| name.ends_with(".moe.topk_ids") == routing;
            flips.iter().any(|(name, fl)| of_kind(name) && Class::of(fl, self.near_tie) == Class::Unknown)
        };
        const ROUTING: &str = "routing margins a dump does not record are recomputed from its gate logits, and \
                               shared-indexer layers take those of the layer they reuse";
        const SHARED: &str = "a shared-indexer layer's DSA flips take the margins of the layer whose keys it reuses";
        let hint = match (self.with_model, unknown(true), unknown(false)) {
            (false, true, _) => ROUTING,
            (false, false, true) => SHARED,
            _ => "",
        };
        if !hint.is_empty() {
            out += &format!("  (with --model DIR, {hint})\n");
        }
        // DSA flips whose reference's scores ours lacks: our side's lead is unknown.
        let scoreless = self.only_b.iter().any(|n| n.ends_with(".dsa.scores"));
        if scoreless && flips.iter().any(|(name, fl)| name.ends_with(".dsa.topk") && fl.lead_ours.is_none()) {
            out += "  (ours records no dsa.scores: its side of each DSA flip is its row margin alone, not the flipped \
                    keys' lead; `run --record '*,*.dsa.scores'` records them)\n";
        }
        for (side, names) in [(a, &self.only_a), (b, &self.only_b)] {
            for n in names.iter().take(ONLY_IN_LISTED) {
                out += &format!("only in {}: {n}\n", side.display());
            }
            if names.len() > ONLY_IN_LISTED {
                out += &format!(
                    "only in {}: ... and {} more (see --json)\n",
                    side.display(),
                    names.len() - ONLY_IN_LISTED
                );
            }
        }
        let bf16 = crate::device::Precision::Bf16.tolerance();
        for (side, only) in ["ours", "the reference"].iter().zip(self.bf16_only) {
            if only {
                out += &format!(
                    "note: {side} holds bf16 values only (every float's low 16 bits are 0): compare at bf16's tolerance, \
                     --atol {:e} --rtol {:e}\n",
                    bf16.atol, bf16.rtol
                );
            }
        }
        if let Some((name, sides)) = &self.bf16_first {
            for ((side, first), whole) in ["ours", "the reference"].iter().zip(sides).zip(self.bf16_only) {
                if *first && !whole {
                    out += &format!(
                        "note: {side}'s {name}, the first float tensor outside the tolerance, holds bf16 values only: \
                         compare at bf16's tolerance, --atol {:e} --rtol {:e}\n",
                        bf16.atol, bf16.rtol
                    );
                }
            }
        }
        let bad = self.results.iter().filter(|c| !c.ok).count();
        let unmatched = match (missing.len(), self.misnamed()) {
            (0, _) => String::new(),
            (n, None) => format!(" ({n} spec hook points of the reference not in ours)"),
            (n, Some(hint)) => {
                format!(" ({n} spec hook points of the reference not in ours: {hint}, so the dumps do not match)")
            }
        };
        // (All that was compared may match and the dumps still not: say so where the count ends.)
        let not_passed = match bad == 0 && crate::compare::tokens_only(&self.results) {
            true => "; not passed: nothing compared but input_ids",
            false => "",
        };
        out += &format!(
            "{} of {} common tensors match{unmatched}{not_passed}\n",
            self.results.len() - bad,
            self.results.len()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of `results` with nothing else to say (no NaN, no names on one side only).
    fn report_of(results: Vec<Comparison>) -> DiffReport {
        DiffReport {
            results,
            non_finite_a: None,
            non_finite_b: None,
            only_a: vec![],
            only_b: vec![],
            near_tie: 1e-3,
            tol: Tolerance::default(),
            per_name: Vec::new(),
            with_model: false,
            notes: Default::default(),
            bf16_only: [false; 2],
            bf16_first: None,
        }
    }

    /// The first-divergence line reads a constant factor, a DSA row that kept padding for a key
    /// is marked, flips of unknown margin without a checkpoint point at --model, and long
    /// "only in" lists are cut.
    #[test]
    fn render_reads_the_first_divergence_and_bounds_its_lists() {
        use crate::compare::{compare_floats, Comparison};
        let (_, scaled) = compare_floats(&[0.8, -2.0], &[2.0, -5.0], &[2], Tolerance::default());
        let flip = Flip {
            row: 3,
            at: vec![0, 3],
            only_ours: vec![],
            only_reference: vec![2],
            recall: 0.5,
            ..Flip::with_margins(None, None)
        };
        let sets = Detail::Sets { rows: 4, mean_recall: 0.875, min_recall: 0.5, flips: vec![flip] };
        let report = DiffReport {
            results: vec![
                Comparison { name: "layers.0.moe.topk_weights".into(), ok: false, detail: scaled },
                Comparison { name: "layers.1.dsa.topk".into(), ok: false, detail: sets },
            ],
            only_a: (0..12).map(|i| format!("layers.{i}.output")).collect(),
            ..report_of(vec![])
        };
        let out = report.render(Path::new("a"), Path::new("b"));
        let first = "first divergence: layers.0.moe.topk_weights (ours = 0.4000 x reference, cosine 1.000000";
        assert!(out.contains(first), "{out}");
        // The DSA row that kept padding for a key, first, is read so on top.
        let padded = DiffReport { results: report.results[1..].to_vec(), ..report.clone() };
        let first = "first divergence: layers.1.dsa.topk (1 of 1 flips are rows where ours keeps fewer distinct \
                     causal keys (duplicates, padding or later keys where a causal key belongs";
        assert!(padded.render(Path::new("a"), Path::new("b")).contains(first));
        // A factor with some spread around it (a per-token normalisation skipped) is "mostly" one.
        let (_, mostly) = compare_floats(&[0.8, -2.0, 1.1], &[2.0, -5.0, 2.5], &[3], Tolerance::default());
        let x = Comparison { name: "x".into(), ok: false, detail: mostly };
        let one = DiffReport { results: vec![x], only_a: vec![], ..report.clone() };
        assert!(one
            .render(Path::new("a"), Path::new("b"))
            .contains("ours = 0.4071 x reference, cosine 0.999297: mostly a factor apart)"));
        // A large factor fitted to a tensor that mostly differs otherwise is not read as one (a
        // missing FP8 scale on one expert: 11 of 48 rows wrong read "ours = 119.6 x reference,
        // cosine 0.15: mostly a factor apart").
        let (_, few_rows) = compare_floats(&[1.0, 2.0, 300.0, -1.0], &[1.0, 2.0, 3.0, 4.0], &[4], Tolerance::default());
        let x = Comparison { name: "x".into(), ok: false, detail: few_rows };
        let one = DiffReport { results: vec![x], only_a: vec![], ..report.clone() };
        assert!(one.render(Path::new("a"), Path::new("b")).contains("first divergence: x\n"));
        // Rounding is not a factor: 0.2% apart (bf16's half ulp) is not read as one.
        let (_, rounded) = compare_floats(&[1.002, -2.004], &[1.0, -2.0], &[2], Tolerance::default());
        let x = Comparison { name: "x".into(), ok: false, detail: rounded };
        let one = DiffReport { results: vec![x], only_a: vec![], ..report.clone() };
        assert!(one.render(Path::new("a"), Path::new("b")).contains("first divergence: x\n"));
        assert!(out.contains("only ours [], only ref [2], margin ours unknown ref unknown -> real (ours keeps fewer"));
        // A row that kept fewer keys is real whatever its margins: --model would add nothing to it.
        assert!(!out.contains("with --model DIR"), "{out}");
        assert!(out.contains("only in a: layers.9.output\nonly in a: ... and 2 more (see --json)\n"), "{out}");
        assert!(!out.contains("layers.10.output"), "{out}");

        // Routing that differs over gate logits that match: the rule, not its input.
        let (_, logits) = compare_floats(&[1.0, 2.0], &[1.0, 2.0], &[2], Tolerance::default());
        let flip = Flip {
            only_ours: vec![1],
            margin_ours: Some(0.05),
            margin_reference: Some(0.02),
            ..report.flips()[0].1.clone()
        };
        let sets = Detail::Sets { rows: 4, mean_recall: 0.875, min_recall: 0.5, flips: vec![flip] };
        let report = DiffReport {
            results: vec![
                Comparison { name: "layers.2.moe.router_logits".into(), ok: true, detail: logits },
                Comparison { name: "layers.2.moe.topk_ids".into(), ok: false, detail: sets },
            ],
            only_a: vec![],
            ..report
        };
        let out = report.render(Path::new("a"), Path::new("b"));
        let first = "first divergence: layers.2.moe.topk_ids (its input layers.2.moe.router_logits matches (max_abs \
                     0.0e0, under half of every flip's margin) and the flips are real";
        assert!(out.contains(first), "{out}");
        let json = report.to_json(Path::new("a"), Path::new("b"));
        assert!(json["first_divergence_reading"].as_str().is_some_and(|r| r.starts_with("its input")), "{json}");
        // Logits that moved 0.03, past half the flip's larger margin (0.05): one rule can flip it.
        let (_, moved) = compare_floats(&[1.0, 2.03], &[1.0, 2.0], &[2], Tolerance { atol: 0.05, rtol: 0.0 });
        let mut loose = report.clone();
        loose.results[0].detail = moved;
        assert_eq!(loose.to_json(Path::new("a"), Path::new("b"))["first_divergence_reading"], Value::Null);

        // Without margins (no --model), flips over logits 7e-7 apart are still no ties: one rule
        // flips only choices tied within 1.4e-6. Logits 1e-2 apart (a bf16 port) say nothing.
        let unknown = Flip { margin_ours: None, margin_reference: None, ..report.flips()[0].1.clone() };
        let reading = |apart: f32| {
            let (_, logits) =
                compare_floats(&[1.0, 2.0 + apart], &[1.0, 2.0], &[2], Tolerance { atol: 2e-2, rtol: 0.0 });
            let flips = vec![unknown.clone(), Flip { row: 3, ..unknown.clone() }];
            let sets = Detail::Sets { rows: 4, mean_recall: 0.75, min_recall: 0.5, flips };
            let results = vec![
                Comparison { name: "layers.2.moe.router_logits".into(), ok: true, detail: logits },
                Comparison { name: "layers.2.moe.topk_ids".into(), ok: false, detail: sets },
            ];
            let report = DiffReport { results, ..report.clone() };
            report.to_json(Path::new("a"), Path::new("b"))["first_divergence_reading"].clone()
        };
        let read = reading(7.2e-7);
        let expected = "its input layers.2.moe.router_logits matches (max_abs 7.2e-7, so one rule flips only choices \
                        tied within 1.4e-6, about 0.0 of 4 tokens by chance): 2 flips say the routing rule or the \
                        correction bias differs; --model DIR tests each flip";
        assert_eq!(read, json!(expected));
        assert_eq!(reading(1e-2), Value::Null);
        // Two flips in 4 tokens where chance makes 0.33 (4 x 3.2e-4 x 256): not ten times that.
        assert_eq!(reading(1.6e-4), Value::Null);
    }

    /// Spec hook points the reference holds and ours does not are said on top and in the
    /// summary, with what ours's own names suggest (a prefix, layers numbered from 1); extras
    /// (`dsa.scores`) ours does not record are not.
    #[test]
    fn spec_names_ours_lacks_are_said_with_a_hint() {
        let (_, same) = crate::compare::compare_floats(&[1.0], &[1.0], &[1], Tolerance::default());
        let report = |only_a: &[&str], only_b: &[&str]| DiffReport {
            only_a: only_a.iter().map(|s| s.to_string()).collect(),
            only_b: only_b.iter().map(|s| s.to_string()).collect(),
            ..report_of(vec![Comparison { name: "logits".into(), ok: true, detail: same.clone() }])
        };
        let render = |r: DiffReport| r.render(Path::new("a"), Path::new("b"));
        let theirs = ["layers.0.output", "layers.0.attn.out", "layers.1.output", "layers.0.dsa.scores"];
        let out = render(report(&["model.layers.0.output", "model.layers.1.output"], &theirs));
        assert!(out.contains("no divergence in the 1 tensors both hold\n"), "{out}");
        let note =
            "not compared: ours lacks 3 of the reference's spec hook points (layers.0.output, layers.0.attn.out, \
                    layers.1.output): ours names them with a `model.` prefix\n";
        assert!(out.contains(note), "{out}");
        let summary = "1 of 1 common tensors match (3 spec hook points of the reference not in ours: ours names them \
                       with a `model.` prefix, so the dumps do not match)";
        assert!(out.contains(summary), "{out}");
        assert!(!report(&["model.layers.0.output", "model.layers.1.output"], &theirs).all_match());
        let out = render(report(&["layers.2.output", "layers.1.attn.out"], &theirs));
        assert!(out.contains("ours numbers its layers from 1"), "{out}");
        assert!(!report(&["layers.2.output", "layers.1.attn.out"], &theirs).all_match());
        // Selections that match across the shift (a prompt no longer than index_topk keeps every
        // key in every layer) do not line the names up: only an activation that matches does.
        let mut shifted = report(&["layers.2.output", "layers.1.attn.out"], &theirs);
        let all_kept = Detail::Sets { rows: 4, mean_recall: 1.0, min_recall: 1.0, flips: vec![] };
        shifted.results.push(Comparison { name: "layers.1.dsa.topk".into(), ok: true, detail: all_kept });
        assert!(shifted.misnamed().is_some_and(|h| h.contains("from 1")));
        // Two windows that overlap (layers 1-2 against 0-1): layer 1 matches, so the names line
        // up and what ours lacks it did not record.
        let mut windows = report(&["layers.2.output", "layers.2.attn.out"], &["layers.0.output", "layers.0.attn.out"]);
        for name in ["layers.1.output", "layers.1.attn.out"] {
            windows.results.push(Comparison { name: name.into(), ok: true, detail: same.clone() });
        }
        assert!(windows.misnamed().is_none() && windows.all_match());
        assert!(!render(windows).contains("from 1"));
        // A partial recording matches what it holds.
        let out = render(report(&[], &theirs));
        assert!(out.contains("(3 spec hook points of the reference not in ours)\n"), "{out}");
        assert!(report(&[], &theirs).all_match());
        // Not a shift: a window run from layer 1 (its last layer is the reference's); not a
        // prefix: the MTP head's own names (`mtp.logits` ends with `logits`).
        let out =
            render(report(&["layers.2.output", "layers.1.attn.out"], &[&theirs[..], &["layers.2.output"]].concat()));
        assert!(out.contains("not compared") && !out.contains("from 1"), "{out}");
        let out = render(report(&["mtp.logits", "mtp.final_norm"], &["logits", "final_norm", "embeddings"]));
        assert!(out.contains("not compared") && !out.contains("prefix"), "{out}");
        let out = render(report(&[], &["layers.0.dsa.scores"]));
        assert!(out.contains("no divergence\n") && !out.contains("not compared"), "{out}");
        assert_eq!(
            report(&[], &theirs).to_json(Path::new("a"), Path::new("b"))["missing_spec_names_in_a"]
                .as_array()
                .map(Vec::len),
            Some(3)
        );
    }

    /// An exact integer tensor that differs reads as elements, in text and JSON, not as flips.
    #[test]
    fn exact_integer_tensors_differ_by_element() {
        let (a, e) = (Values::I64(vec![1, 0, 0]), Values::I64(vec![0, 0, 0]));
        let c = compare_tensor("layers.2.moe.bias_changed", (&a, &[3]), (&e, &[3]), None, Tolerance::default(), None);
        assert_eq!(
            crate::verify::format_line(&c).split_whitespace().collect::<Vec<_>>()[1..5],
            ["MISMATCH", "1/3", "elements", "differ;"]
        );
        let json = comparison_json(&c, 1e-3);
        assert_eq!((json["kind"].as_str(), json["differ"].as_u64()), (Some("exact"), Some(1)));
        assert_eq!(json["differing"][0]["ours"], 1);
        assert!(crate::compare::flips(&[c]).is_empty());
        // An empty float tensor has no worst element to name.
        let empty = Values::F32(vec![]);
        let c = compare_tensor("logits", (&empty, &[1, 0, 8]), (&empty, &[1, 0, 8]), None, Tolerance::default(), None);
        let json = comparison_json(&c, 1e-3);
        assert_eq!((&json["worst_at"], &json["ours"], &json["elements"]), (&Value::Null, &Value::Null, &json!(0)));
    }

    #[test]
    fn per_name_tolerances_last_match_wins() {
        let t = |a, r| Tolerance { atol: a, rtol: r };
        let mut o = DiffOptions::default();
        o.per_name.push(parse_tol("layers.*=1e-2,0").unwrap());
        o.per_name.push(parse_tol("layers.3.*=0.5,0.25").unwrap());
        assert_eq!(o.tol_for("logits"), Tolerance::default());
        assert_eq!(o.tol_for("layers.1.output"), t(1e-2, 0.0));
        assert_eq!(o.tol_for("layers.3.output"), t(0.5, 0.25));
        for bad in ["logits", "logits=1", "=1,1", "x=a,1", "x=-1,0"] {
            assert!(parse_tol(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_tol(" logits = 2e-2, 0").unwrap(), ("logits".to_string(), t(2e-2, 0.0)));
    }

    /// The hint on what `--model` adds names only what it adds for the flips of unknown margin.
    #[test]
    fn the_model_hint_fits_the_unknown_flips() {
        let flip = Flip::with_margins(None, None);
        let sets = Detail::Sets { rows: 1, mean_recall: 0.5, min_recall: 0.5, flips: vec![flip] };
        let report = |name: &str| report_of(vec![Comparison { name: name.into(), ok: false, detail: sets.clone() }]);
        let hint = |name: &str| {
            let out = report(name).render(Path::new("a"), Path::new("b"));
            out.lines().find(|l| l.contains("with --model DIR")).map(String::from).unwrap_or_default()
        };
        assert!(hint("layers.2.moe.topk_ids").contains("routing margins"));
        assert!(hint("layers.1.dsa.topk").contains("a shared-indexer layer's DSA flips"));
        assert!(!hint("layers.1.dsa.topk").contains("routing"));
        // Weights without both sides' ids are compared slot by slot, and the line says so.
        let weights = report("layers.2.moe.topk_weights");
        assert!(weights.render(Path::new("a"), Path::new("b")).contains("(slot by slot: the two dumps do not both"));
        let ids = Comparison { name: "layers.2.moe.topk_ids".into(), ..weights.results[0].clone() };
        let both = DiffReport { results: vec![ids, weights.results[0].clone()], ..weights };
        assert!(!both.render(Path::new("a"), Path::new("b")).contains("slot by slot"));
    }
}
