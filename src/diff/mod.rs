//! `diff`: compare two dumps tensor by tensor with the engine `verify` uses, name the first hook
//! point (in forward order) where they part ways, and list every routing and DSA flip with the
//! margins that decided it, so a near-tie (rounding can flip it) is told apart from a real bug.

mod past;
mod tol;
pub use tol::{parse_tol, tol_for, tol_warnings, tolerance_json};

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{json, Value};

use crate::compare::{compare_tensor, Comparison, Detail, Flip, Tolerance};
use crate::config::Config;
use crate::dump::{Dump, Values};
use crate::error::{Error, Result};
use crate::flips::{self, Class};
use crate::hooks::{finite_expected, first_non_finite, HookPoint, NonFinite};
use crate::model::moe::Routers;
use crate::model::Tokens;

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
    /// The checkpoint itself (`diff --model`), opened once for the readings that rerun one of its
    /// blocks (an attention, a latent's norm, a MoE layer).
    pub checkpoint: Option<std::sync::Arc<crate::checkpoint::Checkpoint>>,
}

impl Default for DiffOptions {
    fn default() -> Self {
        let near_tie = Tolerance::default().near_tie();
        DiffOptions {
            tol: Tolerance::default(),
            per_name: Vec::new(),
            near_tie,
            routers: None,
            config: None,
            checkpoint: None,
        }
    }
}

impl DiffOptions {
    pub fn tol_for(&self, name: &str) -> Tolerance {
        tol_for(self.tol, &self.per_name, name)
    }
}

#[derive(Clone)]
pub struct DiffReport {
    pub results: Vec<Comparison>,
    /// The first NaN or Inf in forward order, in each dump.
    pub non_finite_a: Option<NonFinite>,
    pub non_finite_b: Option<NonFinite>,
    pub only_a: Vec<String>,
    pub only_b: Vec<String>,
    /// Each dump's tensors left unread, and why ([`Dump::unread`]).
    pub unread: [Vec<crate::dump::Unread>; 2],
    /// Of those, the ones both hold alike in an integer dtype, compared exactly.
    pub raw: Vec<crate::compare::RawComparison>,
    pub near_tie: f64,
    /// The tolerance the floats were compared at, and the `--tol` overrides by name pattern.
    pub tol: Tolerance,
    pub per_name: Vec<(String, Tolerance)>,
    /// Whether a checkpoint's config and routers were given to recompute margins a dump lacks.
    pub with_model: bool,
    /// With `--model`: each layer's MLP kind (the MTP layer's last, where there is one) and the
    /// MTP layer, which say what a layer's hook points are computed from.
    pub mlp_kinds: Option<Vec<crate::config::MlpKind>>,
    pub mtp_layer: Option<usize>,
    /// What the first divergence's values say beyond its numbers.
    pub notes: crate::reading::Notes,
    /// Where the first divergence reads as rounding (a selection whose every flip is a near-tie,
    /// or floats read as rounding's tail) or as where a hook sits: the first divergence they do
    /// not explain, and what its values say (or, where they say nothing, those of the first after
    /// it read on ours's own inputs). Where the first divergence has no reading and is neither,
    /// it, and the first after it read on ours's own inputs.
    pub past_rounding: Option<past::Past>,
    /// Which dumps hold only bf16 values (every float's low 16 bits 0), ours then the
    /// reference, when a float tensor differs at a tolerance tighter than bf16's (its own, with
    /// `--tol`: [`tighter_than_bf16`]): a hint to compare at bf16's.
    pub bf16_only: [bool; 2],
    /// The first float tensor outside its tolerance, where that tolerance is tighter than bf16's
    /// and one side holds bf16 values only in it and the other does not (ours, the reference): a
    /// port that keeps its activations in bf16 and its scores in f32 is bf16 where it first
    /// differs.
    pub bf16_first: Option<(String, [bool; 2])>,
    /// Which dumps hold only f16 values (each float an f16's: the spec lets a producer store F16)
    /// and not only bf16's, when a float tensor differs at an rtol below f16's rounding
    /// ([`F16_ROUNDING`]).
    pub f16_only: [bool; 2],
    /// Whether the dumps record different `config_sha256`s: two models, whose layers need not
    /// line up, so a layer ours lacks is not read as layers numbered from 1.
    pub configs_differ: bool,
}

/// Whether a tolerance is tighter than bf16 arithmetic's (`Precision::Bf16`'s), in either
/// bound: a difference bf16 rounding makes can fall outside it.
pub(crate) fn tighter_than_bf16(tol: Tolerance) -> bool {
    let bf16 = crate::device::Precision::Bf16.tolerance();
    tol.atol < bf16.atol || tol.rtol < bf16.rtol
}

/// The most rounding a value to f16 moves it by, relative to it: half of f16's 2^-10 ulp.
pub const F16_ROUNDING: f64 = 1.0 / 2048.0;

/// Why two dumps' hook points need not line up, where they record different configs.
const OTHER_CONFIGS: &str = "the dumps ran different config.json files";

/// What `diff` says of two dumps that share nothing but their tokens.
const TOKENS_ONLY: &str = "nothing compared but input_ids: the dumps share no hook point";

/// A divergence past what rounding explains, read ([`DiffReport::past_rounding_reading`]).
pub struct PastReading<'r> {
    pub divergence: &'r Comparison,
    pub reading: String,
    pub notes: &'r crate::reading::Notes,
    /// The first divergence rounding does not explain, where it has no reading and this one (read
    /// on ours's own inputs) comes after it.
    pub unread: Option<&'r str>,
}

impl DiffReport {
    /// Whether every tensor both hold matches, and ours does not hold spec hook points under
    /// other names ([`DiffReport::misnamed`]): a partial recording matches, a misnamed one not.
    pub fn all_match(&self) -> bool {
        self.results.iter().all(|c| c.ok) && self.raw.iter().all(|r| r.differing == 0) && self.not_compared().is_none()
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

/// Where one run's rows begin the other's (one side ran more positions of the same tokens), what
/// to run instead: a `generate --dump` holds the positions it ran, which leave out its last token.
fn prefix_hint(a: &Tokens, b: &Tokens) -> String {
    let (short, long, which) = if a.seq < b.seq { (a, b, "ours") } else { (b, a, "the reference") };
    let begins = short.batch == long.batch
        && short.seq < long.seq
        && short.ids.chunks(short.seq.max(1)).zip(long.ids.chunks(long.seq)).all(|(s, l)| l.starts_with(s));
    match (begins, long.seq - short.seq.min(long.seq)) {
        (true, 1) => format!(
            "; {which}'s {} positions begin the other's: a `generate --dump` holds the positions it ran, not its \
             last token, and `run --tokens-from` that dump runs the same",
            short.seq
        ),
        (true, _) => {
            format!("; {which}'s {} positions begin the other's {}: the same tokens, run further", short.seq, long.seq)
        }
        (false, _) => String::new(),
    }
}

/// Compares `a` (ours) against `b` (the reference) on the names both hold.
pub fn diff(a: &Dump, b: &Dump, opts: &DiffOptions) -> Result<DiffReport> {
    // Runs of different inputs cannot be compared tensor by tensor.
    if a.contains("input_ids") && b.contains("input_ids") {
        let (ta, tb) = (a.tokens()?, b.tokens()?);
        if let Some(d) = ta.difference(&tb) {
            return Err(Error::Usage(format!(
                "{} and {} are runs of different inputs ({d}{})",
                a.path.display(),
                b.path.display(),
                prefix_hint(&ta, &tb)
            )));
        }
    }
    let names_a = a.names();
    let names_b = b.names();
    // (Sets to look names up in: a dump of tens of thousands of extra tensors took minutes.)
    let (in_a, in_b): (HashSet<&String>, HashSet<&String>) = (names_a.iter().collect(), names_b.iter().collect());
    if !names_b.iter().any(|n| in_a.contains(n)) {
        return Err(Error::Usage(format!(
            "{} and {} hold no tensor of the same name: nothing to compare",
            a.path.display(),
            b.path.display()
        )));
    }
    let mut results: Vec<Comparison> = Vec::new();
    let mut notes = crate::reading::Notes::default();
    // The run's batch rows: where the routing's `[B*S, ...]` rows sit along the positions.
    let batch = b.batch().or_else(|| a.batch());
    // Whether every float value of each dump is a bf16 (low 16 bits 0), or an f16; whether a float
    // tensor outside its tolerance was compared at one tighter than bf16's, or at an rtol below
    // f16's rounding (what the precision notes hint at); and the first such tensor's bf16-ness.
    let (mut bf16_only, mut f16_only, mut telling) = ([true; 2], [true; 2], [false; 2]);
    let (mut off_tighter_than_bf16, mut off_tighter_than_f16, mut float_off) = (false, false, false);
    let mut bf16_first = None;
    let is_bf16 = |v: &Values| matches!(v, Values::F32(v) if v.iter().all(|&x| crate::compare::is_bf16(x)));
    let tells = |v: &Values| matches!(v, Values::F32(v) if crate::compare::tells_a_format(v));
    // Each compared tensor is scanned for NaN/Inf while it is in memory, not read again for it.
    let (mut seen_a, mut seen_b) = (HashMap::new(), HashMap::new());
    // Whether a tensor compared so far failed (the first one's notes are the report's).
    let mut failed = false;
    for name in names_b.iter().filter(|n| in_a.contains(n)) {
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
                failed |= !c.ok;
                results.push(c);
                continue;
            }
        }
        for (seen, v, shape) in [(&mut seen_a, &va, &sa), (&mut seen_b, &vb, &sb)] {
            if let Values::F32(v) = v {
                seen.insert(name.clone(), first_non_finite(name, v, shape));
            }
        }
        let ids = expert_ids(a, b, name);
        let ids = ids.as_ref().map(|(x, y)| (x.as_slice(), y.as_slice()));
        for (side, v) in [&va, &vb].into_iter().enumerate() {
            if let Values::F32(_) = v {
                telling[side] = telling[side] || tells(v);
                // (Once a side holds a value that is no bf16, its tensors are not scanned again.)
                bf16_only[side] = bf16_only[side] && is_bf16(v);
                f16_only[side] =
                    f16_only[side] && matches!(v, Values::F32(v) if v.iter().all(|&x| crate::compare::is_f16(x)));
            }
        }
        let tol = opts.tol_for(name);
        let mut c = compare_tensor(name, (&va, &sa), (&vb, &sb), ids, tol, batch);
        if let (false, Detail::Float { .. }) = (c.ok, &c.detail) {
            let tight = tighter_than_bf16(tol);
            if !float_off {
                let sides = [is_bf16(&va) && tells(&va), is_bf16(&vb) && tells(&vb)];
                // (Both sides bf16 there is the checkpoint's doing, a bf16 embedding table: no hint.)
                bf16_first = Some((name.clone(), sides)).filter(|_| tight && sides[0] != sides[1]);
            }
            float_off = true;
            off_tighter_than_bf16 |= tight;
            off_tighter_than_f16 |= tol.rtol < F16_ROUNDING;
        }
        if !c.ok && !failed {
            // (Its values, while they are here.)
            notes = notes_from(a, b, &c, (&va, &vb, &sb), opts);
        }
        // Margins for the flips: recomputing them can read the S x S scores, so only where needed.
        if let (Detail::Sets { flips, .. }, Some(point)) = (&c.detail, HookPoint::parse(name)) {
            if !flips.is_empty() {
                let router = opts.routers.as_ref().zip(point.layer()).and_then(|(r, i)| r.layer(i));
                let margins = |d| flips::deciding_margins(d, point, opts.config.as_ref(), router);
                let (ma, mb) = (margins(a), margins(b));
                c.set_margins(ma.as_deref(), mb.as_deref());
                flips::add_movement(&mut c, a, b, opts.config.as_ref(), router, opts.near_tie);
            }
        }
        failed |= !c.ok;
        results.push(c);
    }
    // What neither reads as values (another tool's bool mask, or its own tensor under one of
    // glimpse's extra names) but both hold alike, in one dtype and shape: compared, integers
    // exactly and floats at their tolerance, as the spec compares every name both files have;
    // apart from the hook points' results, which the readings and the first divergence read.
    let unread_b: HashSet<&str> = b.unread().iter().map(|u| u.name.as_str()).collect();
    let raw = (a.unread().iter().filter(|u| unread_b.contains(u.name.as_str())))
        .filter_map(|u| {
            let (x, y) = a.unread_bytes(&u.name).zip(b.unread_bytes(&u.name))?;
            crate::compare::compare_raw(&u.name, x, y, opts.tol_for(&u.name))
        })
        .collect();
    let mut report = DiffReport {
        raw,
        results,
        non_finite_a: first_non_finite_with(a, &seen_a)?,
        non_finite_b: first_non_finite_with(b, &seen_b)?,
        only_a: names_a.iter().filter(|n| !in_b.contains(n)).cloned().collect(),
        only_b: names_b.iter().filter(|n| !in_a.contains(n)).cloned().collect(),
        unread: [a.unread().to_vec(), b.unread().to_vec()],
        near_tie: opts.near_tie,
        tol: opts.tol,
        per_name: opts.per_name.clone(),
        with_model: opts.config.is_some(),
        mlp_kinds: opts.config.as_ref().map(|c| {
            let layers = c.num_hidden_layers + usize::from(c.num_nextn_predict_layers > 0);
            (0..layers).map(|i| c.mlp_kind(i)).collect()
        }),
        mtp_layer: opts.config.as_ref().filter(|c| c.num_nextn_predict_layers > 0).map(|c| c.num_hidden_layers),
        notes,
        past_rounding: None,
        // (Only a float tensor outside a tighter tolerance is helped by bf16's, or f16's.)
        bf16_only: [0, 1].map(|side| bf16_only[side] && telling[side] && off_tighter_than_bf16),
        bf16_first,
        f16_only: [0, 1].map(|side| f16_only[side] && telling[side] && !bf16_only[side] && off_tighter_than_f16),
        configs_differ: a.other_config_than(b).is_some(),
    };
    report.past_rounding = match past::past_rounding(&report, a, b, opts)? {
        Some(past) => Some(past),
        None => past::past_unread_first(&report, a, b, opts)?,
    };
    Ok(report)
}

/// Both dumps' expert ids for the routing weights `weights_name` (`moe.topk_weights`), which
/// pair the weights by expert; None for another tensor or where either lacks them.
fn expert_ids(a: &Dump, b: &Dump, weights_name: &str) -> Option<(Vec<i64>, Vec<i64>)> {
    let n = format!("{}.moe.topk_ids", weights_name.strip_suffix(".moe.topk_weights")?);
    ints(a, &n).zip(ints(b, &n))
}

/// `f` of the two dumps' values of `name` (of the reference's `shape`) as they were compared:
/// indexer scores at causal keys only, routing weights paired by expert (each row sorted where
/// the dumps do not both hold the experts' ids).
fn with_compared<T>(
    (a, b): (&Dump, &Dump),
    name: &str,
    (ours, reference, shape): (&Values, &Values, &[usize]),
    f: impl FnOnce(&Values, &Values) -> T,
) -> T {
    let causal = crate::compare::causal_scores(name, shape, ours, reference);
    let (x, y) = causal.as_ref().map_or((ours, reference), |(x, y)| (x, y));
    // Routing weights as compared: with both sides' ids, the reference's in the order of ours's
    // experts; without, each row of both sorted.
    let (true, Values::F32(v), Values::F32(w), Some(&k)) = (name.ends_with(".moe.topk_weights"), x, y, shape.last())
    else {
        return f(x, y);
    };
    match expert_ids(a, b, name).filter(|(ia, ib)| ia.len() == w.len() && ib.len() == w.len()) {
        Some((ia, ib)) => f(x, &Values::F32(crate::compare::in_order_of(&ia, &ib, w, k))),
        None => {
            use crate::compare::sorted_rows;
            f(&Values::F32(sorted_rows(v, k)), &Values::F32(sorted_rows(w, k)))
        }
    }
}

/// What the values of the divergence `c` say beyond its numbers, read from the two dumps.
fn notes_of(a: &Dump, b: &Dump, c: &Comparison, opts: &DiffOptions) -> Result<crate::reading::Notes> {
    let ((va, _), (vb, sb)) = (a.values(&c.name)?, b.values(&c.name)?);
    Ok(notes_from(a, b, c, (&va, &vb, &sb), opts))
}

/// What the values of the divergence `c` (ours, the reference's, its shape) say beyond its
/// numbers.
fn notes_from(
    a: &Dump,
    b: &Dump,
    c: &Comparison,
    values: (&Values, &Values, &[usize]),
    opts: &DiffOptions,
) -> crate::reading::Notes {
    use crate::reading::{BiasLeftOut, Notes, Rerun, UnbiasedTies};
    let name = c.name.as_str();
    let mut notes = with_compared((a, b), name, values, |x, y| match (x, y) {
        (Values::F32(x), Values::F32(y)) => Notes::of(a, b, name, (x, y, values.2), opts),
        _ => Notes::default(),
    });
    notes.not_reused = opts.config.as_ref().and_then(|config| Notes::not_reused(a, b, name, config));
    notes.unbiased_ties = UnbiasedTies::of(a, b, c, opts);
    notes.bias_left_out = BiasLeftOut::of(a, b, name, opts);
    notes.rerun = opts.checkpoint.as_deref().and_then(|m| Rerun::of(a, b, name, m, opts.tol_for(name)));
    notes
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
            elements,
            mean_abs,
            nmse,
            cosine,
            scale,
        } => {
            // A tensor with nothing counted (empty, or infinities both sides hold) has no worst
            // element: null, not element 0's coordinate and values.
            let value = |x: f32| if *total == 0 { Value::Null } else { json_number(x as f64) };
            let worst_at = if *total == 0 { Value::Null } else { json!(worst_at) };
            json!({
                "kind": "float", "max_abs": json_number(*max_abs), "worst_at": worst_at, "first_outside_at": first_at,
                "ours": value(*ours),
                "reference": value(*reference), "max_rel": json_number(*max_rel), "mean_abs": json_number(*mean_abs), "nmse": json_number(*nmse),
                "cosine": json_number(*cosine), "scale": json_number(*scale), "outside_tolerance": bad, "elements": elements, "counted": total,
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
    /// What the text's `note:` lines say: dumps of bf16 values compared at a tighter tolerance,
    /// and of f16 values at an rtol below f16's rounding.
    pub fn precision_notes(&self) -> Vec<String> {
        let bf16 = crate::device::Precision::Bf16.tolerance();
        let at = format!("compare at bf16's tolerance, --atol {:e} --rtol {:e}", bf16.atol, bf16.rtol);
        let sides = ["ours", "the reference"];
        let mut notes: Vec<String> = sides
            .iter()
            .zip(self.bf16_only)
            .filter(|(_, only)| *only)
            .map(|(side, _)| format!("{side} holds bf16 values only (every float's low 16 bits are 0): {at}"))
            .collect();
        for (side, _) in sides.iter().zip(self.f16_only).filter(|(_, only)| *only) {
            notes.push(format!(
                "{side} holds f16 values only (every float is an f16): rounding to f16 alone moves a value by up to \
                 {F16_ROUNDING:.1e} of it, more than --rtol {:e} allows",
                self.tol.rtol
            ));
        }
        if let Some((name, first)) = &self.bf16_first {
            for ((side, first), whole) in sides.iter().zip(first).zip(self.bf16_only) {
                if *first && !whole {
                    notes.push(format!(
                        "{side}'s {name}, the first float tensor outside the tolerance, holds bf16 values only: {at}"
                    ));
                }
            }
        }
        notes
    }

    pub fn to_json(&self, a: &Path, b: &Path) -> Value {
        // As the text says them: where a rerun names the cause, the onset's list of the kinds it
        // may be is left out.
        let onset_json = |n: &crate::reading::Notes| {
            n.onset.map(|o| json!({"matching_positions": o.matching, "reading": o.reading_with(n.rerun.is_none())}))
        };
        let leading_json = |n: &crate::reading::Notes| {
            n.leading.map(|l| json!({"differing_positions": l.differing, "reading": l.reading()}))
        };
        json!({
            "schema": "glimpse-diff/1",
            "a": a.display().to_string(),
            "b": b.display().to_string(),
            "match": self.all_match(),
            "first_divergence": self.first_divergence().map(|c| c.name.clone()),
            "not_compared": if self.first_divergence().is_none() { self.not_compared() } else { None },
            "first_divergence_reading": self.first_divergence().and_then(|c| self.reading(c)),
            "first_divergence_rerun": self.notes.rerun.map(|r| r.json()),
            "first_divergence_between": self.between().map(|b| b.json()),
            "past_rounding": self.past_rounding_reading().map(|p| {
                json!({
                    "name": p.divergence.name, "reading": p.reading, "rerun": p.notes.rerun.map(|r| r.json()),
                    "unread_before": p.unread, "onset": onset_json(p.notes), "leading": leading_json(p.notes),
                })
            }),
            "first_divergence_onset": onset_json(&self.notes),
            "first_divergence_leading": leading_json(&self.notes),
            "first_divergence_weights_rule": self.notes.weights_reading(),
            "notes": self.precision_notes(),
            "first_non_finite_a": self.non_finite_a.as_ref().map(|n| json!({"name": n.name, "at": n.at, "value": n.value.to_string()})),
            "first_non_finite_b": self.non_finite_b.as_ref().map(|n| json!({"name": n.name, "at": n.at, "value": n.value.to_string()})),
            "near_tie_threshold": self.near_tie,
            "tolerance": tolerance_json(self.tol, &self.per_name),
            "by_layer": crate::layer_error::json(&crate::layer_error::by_layer(&self.results, self.near_tie)),
            "tensors": self.results.iter().map(|c| comparison_json(c, self.near_tie)).collect::<Vec<_>>(),
            "missing_spec_names_in_a": self.missing_spec_names(),
            "misnamed_in_a": self.misnamed(),
            "configs_differ": self.configs_differ,
            "bf16_only": {"a": self.bf16_only[0], "b": self.bf16_only[1]},
            "f16_only": {"a": self.f16_only[0], "b": self.f16_only[1]},
            "bf16_first_divergence": self.bf16_first.as_ref().map(|(name, [a, b])| json!({"name": name, "a": a, "b": b})),
            "only_in_a": self.only_a,
            "only_in_b": self.only_b,
            "unread_in_a": Dump::unread_json(&self.unread[0]),
            "unread_in_b": Dump::unread_json(&self.unread[1]),
            "unread_compared": self.raw.iter().map(|r| json!({
                "name": r.name, "elements": r.elements, "differing": r.differing, "first_differing": r.first,
                "atol": r.tol.map(|t| t.atol), "rtol": r.tol.map(|t| t.rtol),
            })).collect::<Vec<_>>(),
        })
    }

    /// The first divergence with its reading, and where along the sequence it starts or ends
    /// (each on a line of its own, indented), as the report says it on top.
    pub fn first_divergence_lines(&self) -> Option<String> {
        let c = self.first_divergence()?;
        let reading = self.reading(c).map(|r| format!(" ({r})")).unwrap_or_default();
        let mut out = format!("first divergence: {}{reading}", c.name);
        // (Where a rerun names the cause, the onset's list of the kinds it may be is left out.)
        let positions = |n: &crate::reading::Notes| {
            [n.onset.map(|o| o.reading_with(n.rerun.is_none())), n.leading.map(|l| l.reading())]
        };
        positions(&self.notes).into_iter().flatten().for_each(|p| out += &format!("\n  {p}"));
        if let Some(p) = self.past_rounding_reading() {
            let (name, reading) = (&p.divergence.name, &p.reading);
            out += &match p.unread {
                Some(first) if first == c.name => {
                    format!("\n  on ours's own inputs, the first divergence that reads as a bug: {name} ({reading})")
                }
                None if self.first_is_the_hooks_place() => {
                    format!("\n  past the mlp.out hooks placed before the shared expert, the first divergence: {name} ({reading})")
                }
                None => format!("\n  past what rounding explains, the first divergence: {name} ({reading})"),
                Some(first) => format!(
                    "\n  past what rounding explains, the first divergence: {first} (no reading: the port's own \
                     noise, grown past the tolerance, may be all it is); on ours's own inputs, the first that reads \
                     as a bug: {name} ({reading})"
                ),
            };
            positions(p.notes).into_iter().flatten().for_each(|p| out += &format!("\n    {p}"));
        }
        if let Some(b) = self.between() {
            out += &format!("\n  {}", b.line());
        }
        Some(out)
    }

    /// Whether the first divergence is a `mlp.out` recorded before the shared expert is added
    /// (its layer's output matching): where the hook sits, not a bug, so what comes after it is
    /// read as past rounding is.
    pub(crate) fn first_is_the_hooks_place(&self) -> bool {
        let recorded_before = |m: crate::reading::MoeRerun| m.variant == crate::reading::MoeVariant::RecordedBefore;
        self.first_divergence().is_some() && self.notes.moe_rerun.is_some_and(recorded_before)
    }

    /// Whether the first divergence's reading is rounding's: every flip a near-tie, or rounding's
    /// tail (and no reading of a bug before it, such as a rerun's).
    pub(crate) fn first_reads_as_rounding(&self) -> bool {
        let Some(first) = self.first_divergence() else { return false };
        match &first.detail {
            Detail::Sets { flips, .. } => Class::all_rounding(flips, self.near_tie),
            _ => self.notes.tail.is_some() && self.reading(first) == self.notes.tail.map(crate::reading::Tail::reading),
        }
    }

    /// The divergence past what rounding explains that has a reading ([`Self::past_rounding`]):
    /// the first rounding does not explain, or, where that one has none, the first after it read
    /// on ours's own inputs.
    pub fn past_rounding_reading(&self) -> Option<PastReading<'_>> {
        let past = self.past_rounding.as_ref()?;
        let find = |name: &str| self.results.iter().find(|c| c.name == name);
        let first = find(&past.name)?;
        if let Some(reading) = self.reading_with(first, &past.notes) {
            return Some(PastReading { divergence: first, reading, notes: &past.notes, unread: None });
        }
        let (name, notes) = past.own.as_ref()?;
        let divergence = find(name)?;
        let reading = self.reading_with(divergence, notes)?;
        Some(PastReading { divergence, reading, notes, unread: Some(&past.name) })
    }

    /// The report for a terminal: first divergence on top, one line per tensor, then the flips.
    pub fn render(&self, a: &Path, b: &Path) -> String {
        let mut out = format!("diff {} (ours) against {} (reference)\n", a.display(), b.display());
        let missing = self.missing_spec_names();
        match self.first_divergence_lines() {
            Some(lines) => out += &format!("{lines}\n"),
            None if crate::compare::tokens_only(&self.results) => out += &format!("{TOKENS_ONLY}\n"),
            None if !missing.is_empty() => {
                out += &format!("no divergence in the {} tensors both hold\n", self.results.len())
            }
            None => out += "no divergence\n",
        }
        if !missing.is_empty() {
            let listed = missing.iter().take(3).copied().collect::<Vec<_>>().join(", ");
            let more = if missing.len() > 3 { ", ..." } else { "" };
            let hint = match self.misnamed() {
                Some(h) => format!(": {h}"),
                None if self.configs_differ => format!(": {OTHER_CONFIGS}"),
                None => String::new(),
            };
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
            out += crate::compare::weights_note(c, &self.results).unwrap_or_default();
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
        for (side, unread) in [(a, &self.unread[0]), (b, &self.unread[1])] {
            for u in unread {
                out += &format!("not read in {}: {} ({}, {})\n", side.display(), u.name, u.dtype, u.why);
            }
        }
        for r in &self.raw {
            let first = r.first.map(|i| format!(", the first at flat index {i}")).unwrap_or_default();
            let how = match r.tol {
                Some(t) => format!("compared at atol {:e}, rtol {:e}", t.atol, t.rtol),
                None => "compared exactly".into(),
            };
            out += &match r.differing {
                0 => format!("not read, {how}: {} matches ({} elements)\n", r.name, r.elements),
                n => format!("not read, {how}: {} DIFFERS in {n} of {} elements{first}\n", r.name, r.elements),
            };
        }
        for note in self.precision_notes() {
            out += &format!("note: {note}\n");
        }
        let bad = self.results.iter().filter(|c| !c.ok).count();
        let unmatched = match (missing.len(), self.misnamed()) {
            (0, _) => String::new(),
            (n, None) if self.configs_differ => {
                format!(" ({n} spec hook points of the reference not in ours: {OTHER_CONFIGS})")
            }
            (n, None) => format!(" ({n} spec hook points of the reference not in ours)"),
            (n, Some(hint)) => {
                format!(" ({n} spec hook points of the reference not in ours: {hint}, so the dumps do not match)")
            }
        };
        // (All that was compared may match and the dumps still not: say so where the count ends.)
        let raw_bad = self.raw.iter().filter(|r| r.differing > 0).count();
        let not_passed = match (bad == 0 && crate::compare::tokens_only(&self.results), raw_bad) {
            (true, _) => "; not passed: nothing compared but input_ids".to_string(),
            (false, 0) => String::new(),
            (false, n) => format!("; not passed: {n} tensor(s) not read as values differ"),
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
mod tests;
