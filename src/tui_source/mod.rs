//! The terminal UI's [`Source`] over glimpse dumps: a run's dump (written by a live run or read
//! from a file), optionally with its reference. Layer status comes from the same engine as
//! `diff`; everything else is read from the memory-mapped dumps when a view asks for it.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;

use glimpse_tui::{
    DsaMatrix, Fit, FlipClass, HookRow, KvNormGrid, LayerRow, LoadRow, PairsRow, Part, RefCheck, RouteRow, Source,
    Status, Worst,
};

use crate::compare::{Comparison, Detail};
use crate::config::{IndexerKind, MlpKind};
use crate::diff::{diff, DiffOptions};
use crate::dump::{Dump, Values};
use crate::error::{Error, Result};
use crate::flips::{dsa_margins, margins_in, Class};
use crate::hooks::{HookPoint, LayerHook};
use crate::model::moe::Routers;
use crate::model::Tokens;

mod load;
mod open;
pub use open::{open, Open};

/// A layer and a batch row.
type LayerAndRow = (usize, usize);

pub struct DumpSource {
    title: String,
    ours: Dump,
    reference: Option<Dump>,
    tokens: Tokens,
    /// Whether `tokens` holds the run's ids (a dump without `input_ids`: its positions only).
    ids_known: bool,
    layers: Vec<LayerRow>,
    comparisons: BTreeMap<String, Comparison>,
    /// Flips whose margins on both sides are below this are near-ties.
    near_tie: f64,
    /// The checkpoint's routers, when given: they recompute the routing margins of a dump that
    /// records gate logits but no `moe.margin` (a transformers dump).
    routers: Option<Routers>,
    non_finite: Option<String>,
    /// `diff`'s first divergence and its reading, as it says them on top, with its notes on the
    /// precisions compared under the first line.
    divergence: Option<String>,
    /// The checkpoint's routed-expert count, when its config is given.
    experts: Option<usize>,
    /// The expert load view's count of experts, found when first drawn (`load::expert_count`).
    expert_count: std::cell::OnceCell<usize>,
    /// Each hook point's statistics and worst elements, computed when first drawn: every key
    /// redraws, and at 512 tokens of GLM-5 shapes a layer's took 4.4 s to compute.
    hook_rows: RefCell<HashMap<String, Option<HookRow>>>,
    /// The last DSA selection asked for, by (layer, batch row): moving along a batch row's tokens
    /// redraws the same one (at 4096 tokens reading it took 0.15 s).
    last_dsa: RefCell<Option<(LayerAndRow, Rc<DsaMatrix>)>>,
    /// Each MoE layer's co-activated pairs, counted when first drawn, not at every key, and
    /// their chance levels, drawn on a thread of their own.
    pairs: RefCell<HashMap<usize, Option<load::Counted>>>,
    /// The latent-kv view's grid, computed when first drawn: a reference of GLM-5 shapes holds
    /// its latents unnormed, some 166 M values at 4096 tokens, and every key redraws.
    kv_norms: std::cell::OnceCell<Option<Rc<KvNormGrid>>>,
    chances: load::Chances,
    warning: Option<String>,
}

/// The reference's tensor of a name beside ours ([`DumpSource::paired_ints`]).
enum Pairing<'a> {
    /// Both hold it in one shape: row for row, the reference's dump.
    Paired(&'a Dump),
    /// The reference holds it in another shape (another top-k, other positions).
    Shaped(Vec<usize>),
    /// Either side lacks it.
    OneSided,
}

/// Live runs' temporary dumps are named `glimpse-tui-PID-...` in the temp folder.
const LIVE_PREFIX: &str = "glimpse-tui-";

/// Removes the temporary dumps of live runs whose process is gone: a TUI killed during its
/// prefill (or by SIGKILL) cannot remove its own, so the next one does.
pub fn sweep_live_dumps(dir: &Path) {
    crate::output::sweep(dir, |name| name.strip_prefix(LIVE_PREFIX)?.split(['-', '.']).next()?.parse().ok());
}

/// The row of the layers view a tensor belongs to: its layer (a name of another tool's under
/// `layers.{i}.` too), the embeddings (with the input ids), or the head (everything else: the
/// final norm, the logits, the MTP head's own tensors).
fn part_of(name: &str) -> Part {
    match HookPoint::parse(name) {
        Some(HookPoint::InputIds | HookPoint::Embeddings) => Part::Embeddings,
        Some(HookPoint::Layer(i, _)) => Part::Layer(i),
        Some(_) => Part::Head,
        None => crate::hooks::layer_of_name(name).map_or(Part::Head, |(i, _)| Part::Layer(i)),
    }
}

/// The dump's names by row of the layers view, in forward order: embeddings, layers, head.
fn part_names(d: &Dump) -> Vec<(Part, Vec<String>)> {
    let order = |p: Part| match p {
        Part::Embeddings => (0, 0),
        Part::Layer(i) => (1, i),
        Part::Head => (2, 0),
    };
    let mut out: BTreeMap<(u8, usize), (Part, Vec<String>)> = BTreeMap::new();
    for n in d.names() {
        let part = part_of(&n);
        out.entry(order(part)).or_insert_with(|| (part, Vec::new())).1.push(n);
    }
    out.into_values().collect()
}

/// The decoder layers' names alone, by layer.
fn layer_names(d: &Dump) -> Vec<(usize, Vec<String>)> {
    part_names(d).into_iter().filter_map(|(part, names)| Some((part.layer()?, names))).collect()
}

impl DumpSource {
    /// `opts` compare `ours` with the reference (its routers, config and near-tie threshold class
    /// the flips); its config, when it has one, also names each layer's blocks.
    pub fn new(title: String, ours: Dump, reference: Option<Dump>, opts: &DiffOptions) -> Result<Self> {
        let config = opts.config.as_ref();
        // Without `input_ids` (the spec requires no name), the positions of its hook points, and
        // the reference's ids where they are as many; else the ids are unknown (`#?`).
        let (tokens, ids_known) = match (ours.contains("input_ids"), ours.positions()) {
            (true, _) => (ours.tokens()?, true),
            (false, Some((b, s))) => match reference.as_ref().filter(|r| r.contains("input_ids")).map(Dump::tokens) {
                Some(Ok(t)) if (t.batch, t.seq) == (b, s) => (t, true),
                _ => (Tokens::new(b, s, vec![0; b * s])?, false),
            },
            (false, None) => {
                return Err(Error::dump(
                    &ours.path,
                    "holds neither `input_ids` nor a [B, S, ...] hook point to lay its tokens out by",
                ))
            }
        };
        let report = match &reference {
            Some(r) => Some(diff(&ours, r, opts)?),
            None => None,
        };
        // With a reference, the diff already found our first NaN/Inf.
        let non_finite = match &report {
            Some(r) => r.non_finite_a.clone(),
            None => crate::diff::first_non_finite_in(&ours)?,
        }
        .map(|nf| nf.to_string());
        // A dump that holds the spec's hook points under other names compares almost nothing:
        // said in the status line (`diff` says it on top and exits 1).
        let misnamed = report.as_ref().and_then(|r| {
            let hint = r.misnamed()?;
            Some(format!("misnamed: {hint} ({} spec hook points not compared)", r.missing_spec_names().len()))
        });
        // And a `--tol` pattern that matches nothing (a typo), as `diff` warns of it.
        let tol_warning = report.as_ref().map(|r| crate::diff::tol_warnings(&opts.per_name, &r.results).join("; "));
        let warning = misnamed.or(tol_warning.filter(|w| !w.is_empty()));
        // With the notes on the precisions compared (a bf16 run at f32's tolerance), as `diff`'s.
        // The notes (short, and what to do: compare at bf16's tolerance) right under the first
        // line, before the readings, which a short header cuts first.
        let divergence = report.as_ref().and_then(|r| {
            let notes: String = r.precision_notes().into_iter().map(|n| format!("\nnote: {n}")).collect();
            let lines = r.first_divergence_lines()?;
            Some(match lines.split_once('\n') {
                Some((first, rest)) => format!("{first}{notes}\n{rest}"),
                None => lines + &notes,
            })
        });
        // Each layer's output error and where it jumps, as `diff` and `verify` mark them.
        let by_layer = report.as_ref().map(|r| crate::layer_error::by_layer(&r.results, opts.near_tie));
        let by_layer = by_layer.unwrap_or_default();
        let jumps = crate::layer_error::jumps(&by_layer);
        let comparisons: BTreeMap<String, Comparison> =
            report.map(|r| r.results.into_iter().map(|c| (c.name.clone(), c)).collect()).unwrap_or_default();
        // Without a config, what a layer is reads from the names either dump holds of it (a dump
        // of the layers' outputs alone is compared with a reference that holds their routing).
        let theirs = reference.as_ref().map(Dump::names).unwrap_or_default();
        let parts = part_names(&ours);
        // And the MTP head's layer: the last one, where its positions are the head's
        // (`Dump::mtp_layer`, as a dump orders its names; a dump of the head need not hold its
        // layer). A layer no dump routes is dense
        // where the dumps route some layer, and unknown where they route none.
        let mtp_layer = ours.mtp_layer().or_else(|| reference.as_ref().and_then(Dump::mtp_layer));
        let mtp_layer = mtp_layer.filter(|_| config.is_none());
        let routed = ours.names().iter().chain(&theirs).any(|n| n.ends_with(".moe.topk_ids"));
        let layers = parts
            .into_iter()
            .map(|(part, names)| {
                let ours_has = |suffix: &str| names.iter().any(|n| n.ends_with(suffix));
                let (ffn, indexer) = match part {
                    Part::Layer(i) => {
                        let prefix = format!("layers.{i}.");
                        let has = |suffix: &str| {
                            ours_has(suffix) || theirs.iter().any(|n| n.starts_with(&prefix) && n.ends_with(suffix))
                        };
                        let ffn = match config.map(|c| (c.mlp_layer_types.get(i), i >= c.num_hidden_layers)) {
                            Some((_, true)) => "mtp",
                            Some((Some(MlpKind::Moe), _)) => "moe",
                            Some((Some(MlpKind::Dense), _)) => "dense",
                            _ if mtp_layer == Some(i) => "mtp",
                            _ if has(".moe.topk_ids") => "moe",
                            _ if routed => "dense",
                            _ => "?",
                        };
                        let indexer = match config.and_then(|c| c.indexer_types.get(i)) {
                            Some(IndexerKind::Full) => "full",
                            Some(IndexerKind::Shared) => "shared",
                            None if has(".dsa.margin") || has(".dsa.scores") => "full",
                            None => "?",
                        };
                        (ffn, indexer)
                    }
                    Part::Embeddings | Part::Head => ("-", "-"),
                };
                let mut row = LayerRow {
                    part,
                    ffn: ffn.into(),
                    indexer: indexer.into(),
                    // (A layer the reference holds nothing of is unchecked, not a match; the tokens
                    // alone do not check the embeddings.)
                    status: match names.iter().any(|n| n.as_str() != "input_ids" && comparisons.contains_key(n)) {
                        true => Status::Match,
                        false => Status::Unchecked,
                    },
                    mismatches: 0,
                    routing_flips: 0,
                    dsa_flips: 0,
                    worst: None,
                    first_bad: None,
                    nmse: part.layer().and_then(|i| by_layer.iter().find(|l| l.layer == i)).and_then(|l| l.nmse),
                    jump: part.layer().and_then(|i| jumps.iter().find(|j| j.layer == i)).map(|j| j.short_label()),
                };
                // `attn.out` for `layers.3.attn.out`: the row names the layer.
                let short = |name: &str| match part {
                    Part::Layer(_) => name.splitn(3, '.').nth(2).unwrap_or(name).to_string(),
                    _ => name.to_string(),
                };
                // Whether a flip of the layer is one one rule cannot make.
                let mut rule_broken = false;
                for c in names.iter().filter_map(|n| comparisons.get(n)) {
                    row.mismatches += usize::from(!c.ok);
                    if !c.ok && row.first_bad.is_none() {
                        row.first_bad = Some(short(&c.name));
                    }
                    if let Detail::Sets { flips, .. } = &c.detail {
                        rule_broken |= flips.iter().any(|f| f.unexplained());
                    }
                    match &c.detail {
                        Detail::Sets { flips, .. } if c.name.ends_with(".moe.topk_ids") => {
                            row.routing_flips = flips.len()
                        }
                        Detail::Sets { flips, .. } if c.name.ends_with(".dsa.topk") => row.dsa_flips = flips.len(),
                        Detail::Float { max_abs, .. } if row.worst.as_ref().is_none_or(|(_, e)| max_abs > e) => {
                            row.worst = Some((short(&c.name), *max_abs));
                        }
                        _ => {}
                    }
                }
                if rule_broken {
                    row.status = Status::Rule;
                } else if row.routing_flips + row.dsa_flips > 0 {
                    row.status = Status::Flips;
                } else if row.mismatches > 0 {
                    row.status = Status::Mismatch;
                }
                row
            })
            .collect();
        let near_tie = opts.near_tie;
        Ok(DumpSource {
            title,
            ours,
            reference,
            tokens,
            ids_known,
            layers,
            comparisons,
            near_tie,
            routers: opts.routers.clone(),
            non_finite,
            divergence,
            experts: config.map(|c| c.n_routed_experts),
            expert_count: std::cell::OnceCell::new(),
            hook_rows: RefCell::default(),
            last_dsa: RefCell::default(),
            pairs: RefCell::default(),
            kv_norms: std::cell::OnceCell::new(),
            chances: load::Chances::default(),
            warning,
        })
    }

    /// This source with `warning` put first in its status-line warning.
    pub(crate) fn warned(mut self, warning: Option<String>) -> Self {
        self.warning = match (warning, self.warning.take()) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
        self
    }

    /// The class of each flipped row (flat, as the comparison indexes them) of the selection
    /// `name`, and the margins that decided it on each side (ours, reference; where known): the
    /// larger of its row's and the flipped keys' lead (`Flip::decided_by`), which its class was
    /// made from and the views show.
    fn flip_classes(&self, name: &str) -> BTreeMap<usize, (FlipClass, Option<f32>, Option<f32>)> {
        let Some(Detail::Sets { flips, .. }) = self.comparisons.get(name).map(|c| &c.detail) else {
            return BTreeMap::new();
        };
        let class = |f: &crate::compare::Flip| match Class::of(f, self.near_tie) {
            _ if f.unexplained() => FlipClass::Rule,
            Class::NearTie => FlipClass::NearTie,
            Class::Real => FlipClass::Real,
            Class::Unknown => FlipClass::Unknown,
        };
        let side = |f: &crate::compare::Flip, s| f.decided_by(s);
        use crate::compare::Side;
        flips.iter().map(|f| (f.row, (class(f), side(f, Side::Ours), side(f, Side::Reference)))).collect()
    }

    fn floats(d: &Dump, name: &str) -> Option<(Vec<f64>, Vec<usize>)> {
        match d.values(name).ok()? {
            (Values::F32(v), s) => Some((v.into_iter().map(f64::from).collect(), s)),
            (Values::I64(v), s) => Some((v.into_iter().map(|x| x as f64).collect(), s)),
        }
    }

    fn ints(d: &Dump, name: &str) -> Option<(Vec<i64>, Vec<usize>)> {
        match d.values(name).ok()? {
            (Values::I64(v), s) => Some((v, s)),
            _ => None,
        }
    }

    fn stats(&self, name: &str) -> Option<HookRow> {
        let (v, shape) = Self::floats(&self.ours, name)?;
        let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        let n = finite.len().max(1) as f64;
        let mean = finite.iter().sum::<f64>() / n;
        let std = (finite.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
        let (min, max) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let mut histogram = vec![0u64; 10];
        for x in &finite {
            let b = if max > min { (((x - min) / (max - min)) * 10.0) as usize } else { 0 };
            histogram[b.min(9)] += 1;
        }
        let reference = self.comparisons.get(name).map(|c| self.ref_check(name, &v, &shape, c));
        Some(HookRow {
            name: name.to_string(),
            shape,
            // A tensor with no finite value has no statistics: NaN, not zeros that read as values.
            mean: if finite.is_empty() { f64::NAN } else { mean },
            std: if finite.is_empty() { f64::NAN } else { std },
            min: if finite.is_empty() { f64::NAN } else { min },
            max: if finite.is_empty() { f64::NAN } else { max },
            l2: finite.iter().map(|x| x * x).sum::<f64>().sqrt(),
            // Where infinities are by design (masked scores, uncut margins) only NaN counts.
            nonfinite: match crate::hooks::finite_expected(name) {
                true => v.len() - finite.len(),
                false => v.iter().filter(|x| x.is_nan()).count(),
            },
            histogram,
            reference,
        })
    }

    /// The comparison verdict plus the three worst elements (floats only).
    fn ref_check(&self, name: &str, ours: &[f64], shape: &[usize], c: &Comparison) -> RefCheck {
        let (max_abs, max_rel) = match &c.detail {
            Detail::Float { max_abs, max_rel, .. } => (*max_abs, *max_rel),
            Detail::Sets { mean_recall, .. } => (1.0 - mean_recall, 0.0),
            Detail::Exact { elements, differing } => (differing.len() as f64 / (*elements).max(1) as f64, 0.0),
            Detail::Shape { .. } | Detail::Invalid { .. } => (f64::INFINITY, f64::INFINITY),
        };
        let mut worst = Vec::new();
        if let (Detail::Float { .. }, Some((theirs, _))) =
            (&c.detail, self.reference.as_ref().and_then(|r| Self::floats(r, name)))
        {
            // Routing weights pair by expert, as the comparison does: (ours, theirs, flat index
            // in the reference tensor, whose slot the coordinate names) of the experts both
            // sides chose.
            let ids = |d: &Dump| Self::ints(d, &name.replace(".moe.topk_weights", ".moe.topk_ids")).map(|(v, _)| v);
            let by_expert = match (name.ends_with(".moe.topk_weights"), self.reference.as_ref().and_then(ids)) {
                (true, Some(ref_ids)) => ids(&self.ours).map(|our_ids| {
                    let k = shape.last().copied().unwrap_or(1).max(1);
                    crate::compare::align_by_expert(&our_ids, ours, &ref_ids, &theirs, k)
                }),
                _ => None,
            };
            let (ours, theirs, at): (&[f64], &[f64], Option<&[usize]>) = match &by_expert {
                Some((a, b, at)) => (a, b, Some(at)),
                None => (ours, &theirs, None),
            };
            // As the comparison measures it: an infinity both sides hold is no error.
            let err = |i: usize| crate::compare::element_error(ours[i], theirs[i]);
            // The three largest errors in one pass (largest first; ties by position), of the
            // elements that differ at all.
            let mut top: Vec<usize> = Vec::with_capacity(4);
            for i in (0..ours.len().min(theirs.len())).filter(|&i| err(i) > 0.0) {
                let at = top.iter().position(|&j| err(i) > err(j)).unwrap_or(top.len());
                if at < 3 {
                    top.insert(at, i);
                    top.truncate(3);
                }
            }
            worst = top
                .into_iter()
                .map(|i| Worst {
                    at: crate::compare::coord(shape, at.map_or(i, |at| at[i])),
                    ours: ours[i] as f32,
                    reference: theirs[i] as f32,
                })
                .collect();
        }
        let rows_differ = match &c.detail {
            Detail::Sets { flips, .. } => Some(flips.len()),
            Detail::Exact { differing, .. } => Some(differing.len()),
            _ => None,
        };
        let reference_shape = match &c.detail {
            Detail::Shape { reference, .. } => Some(reference.clone()),
            _ => None,
        };
        let invalid = match &c.detail {
            Detail::Invalid { side: crate::compare::Side::Ours, .. } => Some("ours"),
            Detail::Invalid { side: crate::compare::Side::Reference, .. } => Some("ref"),
            _ => None,
        };
        let fit = match c.detail {
            Detail::Float { nmse, cosine, bad, total, .. } => Some(Fit { nmse, cosine, bad, total }),
            _ => None,
        };
        RefCheck { ok: c.ok, rows_differ, reference_shape, invalid, max_abs, max_rel, fit, worst }
    }

    /// For a layer of `rows` rows, the run's token (batch rows flattened) of its row `t`: the
    /// same, except in the MTP layer, whose batch rows are one position shorter.
    fn token_of(&self, rows: usize) -> impl Fn(usize) -> usize {
        let (batch, seq) = (self.tokens.batch.max(1), self.tokens.seq.max(1));
        let positions = (rows / batch).clamp(1, seq);
        move |t| (t / positions) * seq + t % positions
    }

    /// The reference's integer tensor `name` where it pairs row for row with ours (Ok(None)
    /// where either side lacks it); Err with the reference's shape where it holds it in another
    /// shape (another top-k, other positions): its rows are then not ours' to pair.
    fn paired_ints(&self, name: &str) -> std::result::Result<Option<Vec<i64>>, Vec<usize>> {
        match self.pairing(name) {
            Pairing::Paired(reference) => Ok(Self::ints(reference, name).map(|(v, _)| v)),
            Pairing::Shaped(theirs) => Err(theirs),
            Pairing::OneSided => Ok(None),
        }
    }

    /// How the reference's tensor `name` stands beside ours, from the shapes alone (a redraw
    /// asks; decoding a selection to answer it cost a frame).
    fn pairing(&self, name: &str) -> Pairing<'_> {
        let (Some(reference), Some(ours)) = (self.reference.as_ref(), self.ours.shape(name)) else {
            return Pairing::OneSided;
        };
        match reference.shape(name) {
            Some(theirs) if theirs != ours => Pairing::Shaped(theirs),
            Some(_) => Pairing::Paired(reference),
            None => Pairing::OneSided,
        }
    }

    /// The DSA selection of `layer` for batch row `b` (see [`Source::dsa`]).
    fn dsa_of(&self, layer: usize, b: usize) -> Option<DsaMatrix> {
        let name = HookPoint::Layer(layer, LayerHook::DsaTopk).name();
        let seq = self.tokens.seq;
        // Queries a batch row: the run's positions, one fewer in the MTP layer (its last
        // position's row is left empty, so the rows stay the run's tokens).
        let p = self.ours.shape(&name).and_then(|s| s.len().checked_sub(2).map(|i| s[i])).unwrap_or(seq).min(seq);
        // Each query's keys, ascending, each once: the causal ones (`later` false), or those past
        // the query (a causality bug's, or padding).
        let rows = |d: &Dump, later: bool| -> Option<Vec<Vec<usize>>> {
            let (idx, shape) = Self::ints(d, &name)?;
            let k = *shape.last()?;
            Some(
                (0..seq)
                    .map(|q| {
                        if q >= p {
                            return Vec::new();
                        }
                        let start = (b * p + q) * k;
                        let mut r: Vec<usize> = idx
                            .get(start..start + k)
                            .unwrap_or(&[])
                            .iter()
                            .filter_map(|&j| usize::try_from(j).ok())
                            .filter(|&j| (j > q) == later)
                            .collect();
                        r.sort_unstable();
                        r.dedup();
                        r
                    })
                    .collect(),
            )
        };
        // Recorded, else recomputed from the indexer scores (a transformers dump), as `diff` does.
        // (This batch row's only: the scores are read a slice at a time.)
        let margin = dsa_margins(&self.ours, layer, b * p..(b + 1) * p);
        let classes = self.flip_classes(&name);
        let flip = |q: usize| if q < p { classes.get(&(b * p + q)).copied() } else { None };
        let flips = (0..seq).map(|q| flip(q).map(|f| f.0)).collect();
        let reference_margin = (0..seq).map(|q| flip(q).and_then(|f| f.2)).collect();
        // A flip's own margin where the comparison knows it (a shared layer's is the layer's
        // whose keys it reuses: its dump holds no scores of its own, so the flips' are all there
        // is, NaN, unknown, elsewhere), else the recorded one.
        let own = |q: usize| flip(q).and_then(|f| f.1);
        let margin = match margin {
            Some(m) => Some((0..m.len()).map(|q| own(q).unwrap_or(m[q])).collect::<Vec<f32>>()),
            None if (0..p).any(|q| own(q).is_some()) => Some((0..p).map(|q| own(q).unwrap_or(f32::NAN)).collect()),
            None => None,
        };
        let reference = match self.pairing(&name) {
            Pairing::Paired(r) => rows(r, false),
            _ => None,
        };
        let (selected, past) = (rows(&self.ours, false)?, rows(&self.ours, true).unwrap_or_default());
        Some(DsaMatrix { seq, queries: p, selected, reference, margin, flips, reference_margin, past })
    }

    fn per_token(&self, name: &str) -> Option<Vec<f32>> {
        match self.ours.values(name).ok()? {
            (Values::F32(v), _) => Some(v),
            _ => None,
        }
    }

    /// Each layer's latent-kv norms by token ([`Source::kv_norms`], uncached).
    fn kv_norm_grid(&self) -> Option<KvNormGrid> {
        let mut g = KvNormGrid::default();
        // Each layer's rows laid out by the run's tokens: the MTP layer's batch rows are one
        // position shorter, so its rows are mapped (`None` at each batch row's last position).
        let by_token = |v: Vec<f32>| {
            let token = self.token_of(v.len());
            let mut out = vec![None; self.tokens.ids.len()];
            for (t, x) in v.into_iter().enumerate() {
                if let Some(cell) = out.get_mut(token(t)) {
                    *cell = Some(x);
                }
            }
            out
        };
        for (i, _) in layer_names(&self.ours) {
            let name = |h: LayerHook| HookPoint::Layer(i, h).name();
            let Some(latent) = latent_norms(&self.ours, i) else { continue };
            g.layers.push(i);
            g.latent.push(by_token(latent));
            g.reference_latent
                .push(self.reference.as_ref().and_then(|r| latent_norms(r, i)).map(by_token).unwrap_or_default());
            g.pre_norm.push(self.per_token(&name(LayerHook::KvNormPre)).map(by_token).unwrap_or_default());
            g.k_rope.push(self.per_token(&name(LayerHook::KRopeNorm)).map(by_token).unwrap_or_default());
        }
        (!g.layers.is_empty()).then_some(g)
    }
}

impl Source for DumpSource {
    fn title(&self) -> String {
        self.title.clone()
    }
    fn layers(&self) -> &[LayerRow] {
        &self.layers
    }
    fn tokens(&self) -> usize {
        self.tokens.ids.len()
    }
    fn token_label(&self, token: usize) -> String {
        let (b, s) = (token / self.tokens.seq.max(1), token % self.tokens.seq.max(1));
        let id = match self.ids_known {
            true => self.tokens.ids.get(token).copied().unwrap_or(0).to_string(),
            false => "?".to_string(),
        };
        if self.tokens.batch > 1 {
            format!("b{b} s{s} #{id}")
        } else {
            format!("s{s} #{id}")
        }
    }

    fn hooks(&self, part: Part) -> Vec<HookRow> {
        self.ours
            .names()
            .into_iter()
            .filter(|n| part_of(n) == part)
            .filter_map(|n| self.hook_rows.borrow_mut().entry(n).or_insert_with_key(|n| self.stats(n)).clone())
            .collect()
    }

    fn routing(&self, layer: usize) -> Option<Vec<RouteRow>> {
        let name = |h: LayerHook| HookPoint::Layer(layer, h).name();
        let (ids, shape) = Self::ints(&self.ours, &name(LayerHook::TopkIds))?;
        let k = shape.last().copied().filter(|&k| k > 0)?;
        let weights = self.per_token(&name(LayerHook::TopkWeights)).unwrap_or_default();
        // Recorded, else recomputed from the gate logits with the checkpoint's routers.
        let router = self.routers.as_ref().and_then(|r| r.layer(layer));
        let margin = margins_in(&self.ours, HookPoint::Layer(layer, LayerHook::TopkIds), router);
        let reference = self.paired_ints(&name(LayerHook::TopkIds)).ok().flatten();
        let flips = self.flip_classes(&name(LayerHook::TopkIds));
        let to_ids = <[i64]>::to_vec;
        // Row t of the layer is its position's token; the MTP layer has one position fewer a
        // batch row, so its rows are mapped to the main run's tokens.
        let token = self.token_of(ids.len() / k.max(1));
        Some(
            ids.chunks(k)
                .enumerate()
                .map(|(t, row)| RouteRow {
                    token: token(t),
                    ids: to_ids(row),
                    weights: weights.get(t * k..(t + 1) * k).map(<[f32]>::to_vec).unwrap_or_default(),
                    margin: flips
                        .get(&t)
                        .and_then(|f| f.1)
                        .or_else(|| margin.as_ref().and_then(|m| m.get(t).copied()).filter(|m| !m.is_nan())),
                    reference_ids: reference.as_ref().and_then(|r| r.get(t * k..(t + 1) * k)).map(to_ids),
                    flip: flips.get(&t).map(|f| f.0),
                    reference_margin: flips.get(&t).and_then(|f| f.2),
                })
                .collect(),
        )
    }

    fn load(&self) -> Vec<LoadRow> {
        self.load_rows()
    }

    fn pairs(&self, layer: usize) -> Option<PairsRow> {
        self.pairs_of(layer)
    }

    fn busy(&self) -> bool {
        self.chances.busy()
    }

    fn dsa(&self, layer: usize, token: usize) -> Option<Rc<DsaMatrix>> {
        let b = token / self.tokens.seq.max(1);
        let mut last = self.last_dsa.borrow_mut();
        match &*last {
            Some((at, m)) if *at == (layer, b) => Some(m.clone()),
            _ => {
                let m = Rc::new(self.dsa_of(layer, b)?);
                *last = Some(((layer, b), m.clone()));
                Some(m)
            }
        }
    }

    fn first_non_finite(&self) -> Option<String> {
        self.non_finite.clone()
    }
    fn first_divergence(&self) -> Option<String> {
        self.divergence.clone()
    }
    fn warning(&self) -> Option<String> {
        self.warning.clone()
    }
    fn has_reference(&self) -> bool {
        self.reference.is_some()
    }
    fn reference_shape(&self, name: &str) -> Option<Vec<usize>> {
        match self.pairing(name) {
            Pairing::Shaped(theirs) => Some(theirs),
            _ => None,
        }
    }

    fn kv_norms(&self) -> Option<Rc<KvNormGrid>> {
        self.kv_norms.get_or_init(|| self.kv_norm_grid().map(Rc::new)).clone()
    }
}

/// Layer `i`'s per-token norm of the normed latent KV: recorded (`attn.kv_norm`), else computed
/// from `attn.kv_latent` (a transformers reference records no norms).
fn latent_norms(d: &Dump, i: usize) -> Option<Vec<f32>> {
    let name = |h: LayerHook| HookPoint::Layer(i, h).name();
    if let Ok((Values::F32(v), _)) = d.values(&name(LayerHook::KvNorm)) {
        return Some(v);
    }
    let (v, shape) = DumpSource::floats(d, &name(LayerHook::KvLatent))?;
    let r = shape.last().copied().filter(|&r| r > 0)?;
    Some(v.chunks(r).map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt() as f32).collect())
}
