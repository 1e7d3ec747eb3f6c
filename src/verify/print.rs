//! `verify`'s report: a line per tensor, the by-layer lines and the flips, the summary, the
//! notes (bf16, what was not checked), the JSON document, and with a replay what the flips
//! explain.

use super::{Report, VerifyOptions};
use crate::compare::{self, Comparison, Detail, Tolerance};
use crate::dump::{Dump, Values};
use crate::flips;

/// One line per compared tensor.
pub fn format_line(c: &Comparison) -> String {
    format_line_as(c, ["ours", "ref"])
}

/// [`format_line`] with the two sides named otherwise (`verify --decode`: decode, prefill).
pub fn format_line_as(c: &Comparison, [a, b]: [&str; 2]) -> String {
    let verdict = if c.ok { "ok" } else { "MISMATCH" };
    let body = match &c.detail {
        Detail::Float { max_abs, worst_at, first_at, ours, reference, max_rel, bad, total, .. } => {
            let mut s = format!("max_abs {max_abs:9.3e}  max_rel {max_rel:9.3e}");
            if *bad > 0 {
                s += &format!("  {bad}/{total} outside tol; worst at {worst_at:?}: {a} {ours:e} {b} {reference:e}");
            }
            if *bad > 1 && first_at != worst_at {
                s += &format!("; first at {first_at:?}");
            }
            s
        }
        Detail::Exact { elements, differing } => {
            let mut s = format!("{}/{elements} elements differ", differing.len());
            if let Some(d) = differing.first() {
                s += &format!("; first at {:?}: {a} [{}] {b} [{}]", d.at, d.ours, d.reference);
            }
            s
        }
        Detail::Sets { rows, flips, min_recall, .. } => {
            let mut s = format!("{}/{rows} rows differ", flips.len());
            if let Some(f) = flips.first() {
                s += &format!(
                    " (min recall {min_recall:.3}); first at {:?}: only {a} {:?}, only {b} {:?}",
                    f.at, f.only_ours, f.only_reference
                );
            }
            s
        }
        Detail::Shape { ours, reference } => {
            let n = ours.iter().product::<usize>();
            let same = n > 0 && n == reference.iter().product::<usize>();
            let layout =
                if same { " (as many elements, in another shape: the spec's shapes are the contract)" } else { "" };
            format!("shape {ours:?}, reference {reference:?}{layout}")
        }
        Detail::Invalid { side, problem } => format!("{} {problem}", side.label()),
    };
    format!("{:<34} {:<8} {body}", c.name, verdict)
}

/// Where the reference's first float tensor outside a tolerance tighter than bf16's holds bf16
/// values only (a reference run in bf16, where this run computes in f32): the note `diff` gives,
/// to compare at bf16's tolerance; or f16 values only, at an rtol below f16's rounding: `diff`'s
/// note on that. Reads that one tensor again.
pub fn precision_note(golden: &Dump, r: &Report, opts: &VerifyOptions) -> Option<String> {
    let bf16 = crate::device::Precision::Bf16.tolerance();
    let first = r.results.iter().find(|c| !c.ok && matches!(c.detail, Detail::Float { .. }))?;
    let tol = crate::diff::tol_for(opts.tol, &opts.per_name, &first.name);
    let (Values::F32(v), _) = golden.values(&first.name).ok()? else { return None };
    let only_bf16 = compare::tells_a_format(&v) && v.iter().all(|&x| compare::is_bf16(x));
    let only_f16 = compare::tells_a_format(&v) && !only_bf16 && v.iter().all(|&x| compare::is_f16(x));
    let rounding = crate::diff::F16_ROUNDING;
    if only_f16 && tol.rtol < rounding {
        return Some(format!(
            "note: the reference's {}, the first float tensor outside the tolerance, holds f16 values only: rounding \
             to f16 alone moves a value by up to {rounding:.1e} of it, more than --rtol {:e} allows",
            first.name, tol.rtol
        ));
    }
    (crate::diff::tighter_than_bf16(tol) && only_bf16).then(|| {
        format!(
            "note: the reference's {}, the first float tensor outside the tolerance, holds bf16 values only (a run \
             in bf16?): compare at bf16's tolerance, --atol {:e} --rtol {:e}",
            first.name, bf16.atol, bf16.rtol
        )
    })
}

/// One line per tensor, the errors by layer, then the flips with their margins (near-ties below
/// `near_tie`), then a summary.
pub fn print_report(r: &Report, tol: Tolerance, near_tie: f64) {
    for c in &r.results {
        println!("{}{}", format_line(c), compare::weights_note(c, &r.results).unwrap_or_default());
    }
    print!("{}", crate::layer_error::render(&crate::layer_error::by_layer(&r.results, near_tie)));
    if let Some(line) = crate::layer_error::shared_first_mismatch(&r.results).filter(|_| r.isolate) {
        println!("{line}");
    }
    print!("{}", flips::render(&compare::flips(&r.results), near_tie, ""));
    for n in &r.only_in_reference {
        println!("{n:<34} {:<8} only in the reference (not produced by this run)", "skipped");
    }
    for u in &r.unread {
        println!("{:<34} {:<8} only in the reference, not read ({}, {})", u.name, "skipped", u.dtype, u.why);
    }
    if let Some(line) = unchecked_line(&r.unchecked) {
        println!("{line}");
    }
    if let Some(why) = r.not_compared() {
        println!("{why}");
    }
    if let Some(nf) = &r.non_finite {
        println!("first NaN/Inf of this run: {nf}");
    }
    // A replayed run matches by taking the reference's decisions: the summary says so.
    let replayed = r.replay.describe().map(|what| format!(", the reference's {what} replayed")).unwrap_or_default();
    let mode = format!("{}{replayed}", if r.isolate { ", isolated layers" } else { "" });
    let first = match (r.first_mismatch(), r.mismatches() == 0 && !r.all_match()) {
        (Some(c), _) => format!("; first mismatch: {}", c.name),
        (None, true) => "; not passed: the reference could not be compared".into(),
        (None, false) => String::new(),
    };
    println!(
        "{} of {} tensors match (atol {:e}, rtol {:e}{mode}){first}",
        r.results.len() - r.mismatches(),
        r.results.len(),
        tol.atol,
        tol.rtol
    );
}

/// `verify`'s report: its lines under `header`, or one JSON document (`json`), then warnings of
/// `--tol` patterns that changed nothing; whether everything matched. `free` is the run without
/// the replay, where one was replayed.
pub fn show(
    json: bool,
    header: &str,
    reference: &Dump,
    (report, free): (&Report, Option<&Report>),
    opts: &VerifyOptions,
) -> bool {
    let near_tie = opts.near_tie.unwrap_or(opts.tol.near_tie());
    let note = precision_note(reference, report, opts);
    if json {
        let mut v = report_json(report, opts, near_tie, free);
        v["notes"] = serde_json::json!(note.into_iter().collect::<Vec<_>>());
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("{header}");
        print_report(report, opts.tol, near_tie);
        if let Some(note) = note {
            println!("{note}");
        }
        if let Some(free) = free {
            print_replay(free, report);
        }
    }
    for w in crate::diff::tol_warnings(&opts.per_name, &report.results) {
        eprintln!("glimpse: warning: {w}");
    }
    report.all_match()
}

/// The line saying which spec hook points the reference lacks (the first few named).
fn unchecked_line(unchecked: &[String]) -> Option<String> {
    const LISTED: usize = 6;
    let (first, rest) = unchecked.split_at(unchecked.len().min(LISTED));
    let more = if rest.is_empty() { String::new() } else { format!(", ... and {} more", rest.len()) };
    (!first.is_empty()).then(|| {
        format!(
            "not checked: the reference lacks {} of the spec hook points this run produces ({}{more})",
            unchecked.len(),
            first.join(", ")
        )
    })
}

/// The report as one JSON document (`verify --json`): what `print_report` says, with each
/// tensor as `diff --json` gives it; `replay`, with a replayed run, is what the same run without
/// the replay matched and what the flips explain (`print_replay`'s lines).
pub fn report_json(r: &Report, opts: &VerifyOptions, near_tie: f64, replay: Option<&Report>) -> serde_json::Value {
    use crate::diff::{comparison_json, json_number};
    serde_json::json!({
        "schema": "glimpse-verify/1",
        "match": r.all_match(),
        "first_mismatch": r.first_mismatch().map(|c| c.name.clone()),
        "not_compared": r.not_compared(),
        "tensors_matching": r.results.len() - r.mismatches(),
        "tensors": r.results.iter().map(|c| comparison_json(c, near_tie)).collect::<Vec<_>>(),
        "by_layer": crate::layer_error::json(&crate::layer_error::by_layer(&r.results, near_tie)),
        "near_tie_threshold": json_number(near_tie),
        "tolerance": crate::diff::tolerance_json(opts.tol, &opts.per_name),
        "isolated": r.isolate,
        "shared_first_mismatch": crate::layer_error::shared_first_mismatch(&r.results).filter(|_| r.isolate),
        "replayed": r.replay.describe(),
        "only_in_reference": r.only_in_reference,
        "unchecked": r.unchecked,
        "unread_in_reference": Dump::unread_json(&r.unread),
        "first_non_finite": r.non_finite.as_ref().map(|n| serde_json::json!({"name": n.name, "at": n.at, "value": n.value.to_string()})),
        "without_replay": replay.map(|free| serde_json::json!({
            "match": free.all_match(),
            "tensors_matching": free.results.len() - free.mismatches(),
            "first_mismatch": free.first_mismatch().map(|c| c.name.clone()),
            "explained": explained(free, r).iter().map(|e| serde_json::json!({
                "name": e.name,
                "nmse_without": json_number(e.nmse[0]), "nmse_with": json_number(e.nmse[1]),
                "max_abs_without": json_number(e.max_abs[0]), "max_abs_with": json_number(e.max_abs[1]),
                "explained_share": e.share.map(json_number),
            })).collect::<Vec<_>>(),
        })),
    })
}

/// After a replayed run's report: how much of each layer's error the flips explain (`free`: the
/// same run without the replay, over the same tensors), and how many match without the replay
/// (what it hid: a run that matches only with the reference's decisions).
pub fn print_replay(free: &Report, replayed: &Report) {
    let what = replayed.replay.describe().unwrap_or_default();
    println!("replay of the reference's {what}: error without -> with replay");
    for line in attribution(free, replayed) {
        println!("  {line}");
    }
    let first = free.first_mismatch().map(|c| format!("; first mismatch: {}", c.name));
    println!(
        "without the replay: {} of {} tensors match{}",
        free.results.len() - free.mismatches(),
        free.results.len(),
        first.unwrap_or_default()
    );
}

/// How much of the difference the flips caused: for each float tensor compared in both runs, the
/// NMSE without and with replay, and the share of the error that replay removed. Only the final
/// tensors (`final_norm`, `logits`) and each layer's `output` are listed.
pub fn attribution(free: &Report, replayed: &Report) -> Vec<String> {
    explained(free, replayed)
        .iter()
        .map(|e| {
            let share = e.share.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x));
            format!(
                "{:<22} nmse {:9.3e} -> {:9.3e}  max_abs {:9.3e} -> {:9.3e}  explained by flips: {share}",
                e.name, e.nmse[0], e.nmse[1], e.max_abs[0], e.max_abs[1]
            )
        })
        .collect()
}

/// One tensor's error without and with the replay: what the flips explain of it.
pub struct Explained {
    pub name: String,
    /// [without the replay, with it].
    pub nmse: [f64; 2],
    pub max_abs: [f64; 2],
    /// `1 - nmse with / nmse without` (at least 0); None where there was no error to explain.
    pub share: Option<f64>,
}

/// [`attribution`]'s numbers: each layer output's, `final_norm`'s and `logits`' error without and
/// with the replay.
pub fn explained(free: &Report, replayed: &Report) -> Vec<Explained> {
    let nmse = |r: &Report, name: &str| {
        r.results.iter().find(|c| c.name == name).and_then(|c| match c.detail {
            Detail::Float { nmse, max_abs, .. } => Some((nmse, max_abs)),
            _ => None,
        })
    };
    free.results
        .iter()
        .filter(|c| c.name.ends_with(".output") || c.name == "final_norm" || c.name == "logits")
        .filter_map(|c| {
            let ((n0, a0), (n1, a1)) = (nmse(free, &c.name)?, nmse(replayed, &c.name)?);
            let share = (n0 > 0.0).then(|| (1.0 - n1 / n0).max(0.0));
            Some(Explained { name: c.name.clone(), nmse: [n0, n1], max_abs: [a0, a1], share })
        })
        .collect()
}
