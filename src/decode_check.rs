//! `verify --decode`: the same tokens through the latent cache (one position per call, or in
//! chunks) and through the expanded prefill, compared hook by hook and position by position. A
//! prefill-only check cannot see cache, RoPE-offset or indexer-cache bugs; this one names the
//! first position (in decode order) and the first hook point there at which the two part, with
//! the margins of any DSA or routing flip so a near-tie can be told from a bug.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::compare::{self, Comparison, Detail, Tolerance};
use crate::config::Config;
use crate::dump::Values;
use crate::error::Result;
use crate::hooks::{HookPoint, LayerHook, Recorder, Selector};
use crate::model::{Model, Tokens};
use crate::stitch::Stitcher;

pub struct DecodeCheck {
    pub positions: usize,
    /// Every hook point both runs reported, prefill as the reference, in forward order.
    pub results: Vec<Comparison>,
    /// Per position: the largest |decode - prefill| of the logits.
    pub logits_max_abs: Vec<f64>,
    /// The first position at which the runs differ, and the index in `results` of the first hook
    /// point (in forward order) that differs there.
    pub first: Option<(usize, usize)>,
    /// Hook points one run reported and the other did not (`[prefill only, decode only]`): a
    /// decode that stops reporting a tensor fails, not passes with it unchecked.
    pub one_sided: [Vec<String>; 2],
}

impl DecodeCheck {
    pub fn all_match(&self) -> bool {
        self.first.is_none()
            && !self.results.is_empty()
            && self.one_sided.iter().all(Vec::is_empty)
            && self.logits_max_abs.len() == self.positions
    }
}

/// Runs `tokens` both ways (`chunk` positions per decode call) and compares, at `tol` or the last
/// of the `per_name` patterns (`--tol`) that matches a hook point's name.
pub fn check(
    model: &Model,
    tokens: &Tokens,
    chunk: usize,
    tol: Tolerance,
    per_name: &[(String, Tolerance)],
) -> Result<DecodeCheck> {
    let mut prefill = Recorder::new(Selector::default());
    model.forward(tokens, &mut prefill)?;
    // The decode's steps go to a file (in the temp folder, unlinked at once) until they are
    // joined: held, the many small tensors of one position each took more than the record.
    let parts = std::env::temp_dir().join("glimpse-verify-decode");
    let mut stitcher = Stitcher::spilling(Selector::default(), &parts)?;
    model.decode_all(tokens, chunk, &mut stitcher)?;
    let (prefill, decode) = (prefill.tensors.into_iter().collect(), stitcher.finish()?.into_iter().collect());
    compare(&prefill, &decode, tokens.seq, (tol, per_name), &model.config)
}

/// Compares a decode record (laid end to end, [`Stitcher`]) with a prefill record of the same
/// `seq` positions of the model `config` describes, at a tolerance and its `--tol` patterns.
pub fn compare(
    prefill: &BTreeMap<HookPoint, Tensor>,
    decode: &BTreeMap<HookPoint, Tensor>,
    seq: usize,
    (default, per_name): (Tolerance, &[(String, Tolerance)]),
    config: &Config,
) -> Result<DecodeCheck> {
    let mut results = Vec::new();
    let mut first: Option<(usize, usize)> = None;
    let batch = prefill.get(&HookPoint::InputIds).and_then(|t| t.dims().first().copied());
    for (&point, ours) in decode {
        let Some(reference) = prefill.get(&point) else { continue };
        let tol = crate::diff::tol_for(default, per_name, &point.name());
        let (a, e) = (Values::from_tensor(ours)?, Values::from_tensor(reference)?);
        let ids = match point {
            HookPoint::Layer(i, LayerHook::TopkWeights) => {
                let get = |m: &BTreeMap<HookPoint, Tensor>| {
                    m.get(&HookPoint::Layer(i, LayerHook::TopkIds)).map(Values::from_tensor)
                };
                match (get(decode).transpose()?, get(prefill).transpose()?) {
                    (Some(Values::I64(a)), Some(Values::I64(e))) => Some((a, e)),
                    _ => None,
                }
            }
            _ => None,
        };
        let ids_ref = ids.as_ref().map(|(a, e)| (a.as_slice(), e.as_slice()));
        let mut c =
            compare::compare_tensor(&point.name(), (&a, ours.dims()), (&e, reference.dims()), ids_ref, tol, batch);
        add_margins(&mut c, point, (decode, prefill), config)?;
        if !c.ok {
            let at = first_position(point, &c, (&a, &e), ours.dims(), seq, ids_ref, tol);
            if first.is_none_or(|(p, _)| at < p) {
                first = Some((at, results.len()));
            }
        }
        results.push(c);
    }
    let logits_max_abs = match (decode.get(&HookPoint::Logits), prefill.get(&HookPoint::Logits)) {
        (Some(d), Some(p)) => (0..seq)
            .map(|s| Ok((d.narrow(1, s, 1)? - p.narrow(1, s, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()? as f64))
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    let only = |a: &BTreeMap<HookPoint, Tensor>, b: &BTreeMap<HookPoint, Tensor>| -> Vec<String> {
        a.keys().filter(|p| !b.contains_key(p)).map(HookPoint::name).collect()
    };
    let one_sided = [only(prefill, decode), only(decode, prefill)];
    Ok(DecodeCheck { positions: seq, results, logits_max_abs, first, one_sided })
}

/// Each flip's margins on both sides: `dsa.margin` is `[B, S]` and `moe.margin` `[B*S]`, indexed by
/// the same flat row as the selection they decided (`flips::deciding`: a shared-indexer layer's
/// DSA rows take those of the full layer whose keys it reuses).
fn add_margins(
    c: &mut Comparison,
    point: HookPoint,
    (decode, prefill): (&BTreeMap<HookPoint, Tensor>, &BTreeMap<HookPoint, Tensor>),
    config: &Config,
) -> Result<()> {
    let Some(margin) = crate::flips::deciding(point, config).margin() else { return Ok(()) };
    let get = |m: &BTreeMap<HookPoint, Tensor>| -> Result<Option<Vec<f32>>> {
        Ok(match m.get(&margin) {
            Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        })
    };
    let (ours, reference) = (get(decode)?, get(prefill)?);
    c.set_margins(ours.as_deref(), reference.as_deref());
    Ok(())
}

/// The earliest sequence position at which a failed comparison differs.
fn first_position(
    point: HookPoint,
    c: &Comparison,
    (ours, reference): (&Values, &Values),
    dims: &[usize],
    seq: usize,
    ids: Option<(&[i64], &[i64])>,
    tol: Tolerance,
) -> usize {
    // Flat element index -> position: [B, S, ...] tensors, or [B*S, ...] rows for the router's.
    let token_rows = matches!(point, HookPoint::Layer(_, h) if h.token_rows());
    let inner: usize = dims.iter().skip(if token_rows { 1 } else { 2 }).product();
    let position = |i: usize| (i / inner.max(1)) % seq.max(1);
    match &c.detail {
        // Set rows are flat (batch, position) rows; so are exact integers' elements.
        Detail::Sets { flips, .. } => flips.iter().map(|f| f.row % seq.max(1)).min().unwrap_or(0),
        Detail::Exact { differing, .. } => differing.iter().map(|d| d.index % seq.max(1)).min().unwrap_or(0),
        Detail::Float { .. } => {
            let (a, e) = (compare::to_f32(ours), compare::to_f32(reference));
            let bad: Vec<usize> = match ids {
                Some((ia, ie)) if matches!(point, HookPoint::Layer(_, LayerHook::TopkWeights)) => {
                    let k = dims.last().copied().unwrap_or(1).max(1);
                    let (a, e, at) = compare::align_by_expert(ia, &a, ie, &e, k);
                    compare::elements_outside(&a, &e, tol).map(|i| at[i]).collect()
                }
                _ => compare::elements_outside(&a, &e, tol).collect(),
            };
            bad.into_iter().map(position).min().unwrap_or(0)
        }
        Detail::Shape { .. } | Detail::Invalid { .. } => 0,
    }
}

/// The report: each hook point's verdict, then each position's logits error, then the verdict.
pub fn print(r: &DecodeCheck, tol: Tolerance, per_name: &[(String, Tolerance)], chunk: usize) {
    for c in &r.results {
        // (The reference here is glimpse's own prefill, not the dump named on the first line.)
        println!("{}", crate::verify::format_line_as(c, ["decode", "prefill"]));
    }
    // A line a position, up to LISTED of them; past that the largest error, and five positions
    // from the first that differs (a 512-token check printed 512 lines of "ok").
    const LISTED: usize = 32;
    let line = |s: usize, max_abs: f64| {
        let ok = r.first.is_none_or(|(p, _)| s < p);
        println!("position {s:<5} logits max_abs {max_abs:9.3e}  {}", if ok { "ok" } else { "differs" });
    };
    let n = r.logits_max_abs.len();
    if n <= LISTED {
        r.logits_max_abs.iter().enumerate().for_each(|(s, &e)| line(s, e));
    } else {
        let (s, e) =
            r.logits_max_abs.iter().copied().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((0, 0.0));
        println!("logits over {n} positions: largest max_abs {e:.3e} at position {s}");
        if let Some((p, _)) = r.first {
            r.logits_max_abs.iter().enumerate().skip(p).take(5).for_each(|(s, &e)| line(s, e));
        }
    }
    // A chunk longer than the tokens runs them in one call: said as what ran.
    let how = match chunk.min(r.positions) {
        0 | 1 => "one position per call".to_string(),
        c if c == r.positions => format!("all {c} positions in one call"),
        c => format!("{c} positions per call"),
    };
    for (names, run) in r.one_sided.iter().zip(["prefill", "decode"]) {
        if !names.is_empty() {
            println!("only the {run} reported {} hook point(s): {}", names.len(), names.join(", "));
        }
    }
    if r.logits_max_abs.len() != r.positions {
        println!("the logits were not compared: a run did not report them");
    }
    match r.first {
        None if !r.all_match() => println!("decode and prefill agree where both reported ({how}), but not everywhere"),
        None => println!(
            "decode matches prefill at every position ({how}; {} tensors, atol {:e}, rtol {:e}{})",
            r.results.len(),
            tol.atol,
            tol.rtol,
            match per_name.len() {
                0 => String::new(),
                n => format!(" and {n} --tol pattern(s)"),
            }
        ),
        Some((s, i)) => {
            println!("first position where decode and prefill differ: {s}, first at {}", r.results[i].name);
            if let Detail::Sets { flips, .. } = &r.results[i].detail {
                if let Some(f) = flips.iter().find(|f| f.row % r.positions.max(1) == s) {
                    println!(
                        "  flip at {:?}: only decode {:?}, only prefill {:?}; margins decode {:?}, prefill {:?}",
                        f.at, f.only_ours, f.only_reference, f.margin_ours, f.margin_reference
                    );
                }
            }
        }
    }
}
