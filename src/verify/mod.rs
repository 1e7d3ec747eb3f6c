//! `verify`: run a reference dump's `input_ids` through the model and compare every tensor the dump
//! holds, as it is produced (what is kept is the verdicts, each layer's selection margins and the
//! final norm the MTP head starts from: no layer's activations, so memory does not grow with
//! depth).
//! `isolate` feeds every layer the reference's own input, so an error in one layer is measured in
//! that layer alone instead of spreading down the stack.

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;

use candle_core::Tensor;

use crate::compare::{self, Comparison, Detail, Tolerance};
use crate::config::{Config, IndexerKind, MlpKind};
use crate::device::Prefill;
use crate::dump::{Dump, Values};
use crate::error::{Error, Result};
use crate::flips;
use crate::hooks::{finite_expected, first_non_finite, with_f32, HookPoint, LayerHook, NonFinite, Observer};
use crate::model::indexer::Selection;
use crate::model::moe::Routers;
use crate::model::mtp::Mtp;
use crate::model::rope::RotaryEmbedding;
use crate::model::stream::{self, Start, Weights};
use crate::model::Model;

mod print;
pub use print::{
    attribution, explained, format_line, format_line_as, print_replay, print_report, report_json, show, Explained,
};

/// Compares each reported tensor against the reference dump on arrival.
pub struct Verifier<'a> {
    golden: &'a Dump,
    tol: Tolerance,
    /// `--tol` overrides by name pattern (`diff::tol_for`).
    per_name: Vec<(String, Tolerance)>,
    replay: Replay,
    /// Answer `isolated_input` with the reference's hidden states (the device forward's
    /// isolation), which must have this shape ([B, S, hidden]).
    isolate: Option<[usize; 3]>,
    pub results: Vec<Comparison>,
    /// Our `moe.topk_ids` of the current layer, to align `moe.topk_weights` by expert.
    last_ids: Option<Vec<i64>>,
    /// Where this run first produced a NaN or Inf.
    pub non_finite: Option<NonFinite>,
    /// Our `final_norm`, which the MTP head consumes.
    final_norm: Option<Tensor>,
    /// A hook point already compared, whose second report is not ours (the MTP head fed the
    /// reference's input when isolated: ours was compared before).
    compared: Option<HookPoint>,
    /// Our margins (`dsa.margin`, `moe.margin`) by the selection they decided, for its flips.
    margins: HashMap<String, Vec<f32>>,
    /// Below this a lead of a key left out over one kept is rounding's (`VerifyOptions`).
    near_tie: f64,
    /// The model's routed experts: an expert id of the reference's past them is no selection.
    experts: Option<usize>,
    /// The model's config: which selection decided a shared layer's (`flips::deciding`).
    config: Option<Config>,
    /// Our latest indexer scores and gate logits (`[DSA, routing]`), with the selection each
    /// decides: a shared layer's selection is its source's, the latest full layer's, which the
    /// routing between them must not displace.
    last_scores: [Option<(HookPoint, Tensor)>; 2],
    /// Our side of each flip (by selection name, in the flips' order): DSA's lead, taken at
    /// once (a row is as wide as the sequence), or the gate logits of its row, ranked with the
    /// checkpoint's bias once the routers are read.
    ours: HashMap<String, Vec<OursOf>>,
}

/// Our side of one flip, kept by [`Verifier`] for its lead.
enum OursOf {
    Lead(Option<f32>),
    Logits(Vec<f32>),
}

impl<'a> Verifier<'a> {
    pub fn new(golden: &'a Dump, tol: Tolerance) -> Self {
        Verifier {
            golden,
            tol,
            per_name: Vec::new(),
            replay: Replay::default(),
            isolate: None,
            results: Vec::new(),
            last_ids: None,
            non_finite: None,
            final_norm: None,
            compared: None,
            margins: HashMap::new(),
            near_tie: tol.near_tie(),
            experts: None,
            config: None,
            last_scores: [None, None],
            ours: HashMap::new(),
        }
    }

    /// A verifier at `opts`' tolerances (`--tol` overrides too) and near-tie threshold, for a
    /// model of `config`.
    fn with_options(golden: &'a Dump, opts: &VerifyOptions, config: &Config) -> Self {
        let mut v = Verifier::new(golden, opts.tol);
        v.per_name = opts.per_name.clone();
        v.near_tie = opts.near_tie.unwrap_or(v.near_tie);
        v.experts = Some(config.n_routed_experts);
        v.config = Some(config.clone());
        v
    }

    /// Keeps our side of each flip of the selection `c`, from our scores that decided it: none
    /// past `flips::MOVEMENT_MAX` values, as `diff` takes none there.
    fn keep_ours(&mut self, point: HookPoint, c: &Comparison) -> Result<()> {
        let Detail::Sets { flips, .. } = &c.detail else { return Ok(()) };
        let deciding = self.config.as_ref().map_or(point, |cfg| flips::deciding(point, cfg));
        let dsa = matches!(point, HookPoint::Layer(_, LayerHook::DsaTopk));
        let Some((_, scores)) = self.last_scores[usize::from(!dsa)].as_ref().filter(|(p, _)| *p == deciding) else {
            return Ok(());
        };
        let width = scores.dims().last().copied().unwrap_or(1).max(1);
        if flips.is_empty() || scores.elem_count() > flips::MOVEMENT_MAX {
            return Ok(());
        }
        let kept = with_f32(scores, |v| {
            let row = |f: &compare::Flip| v.get(f.row * width..(f.row + 1) * width);
            flips
                .iter()
                .map(|f| match dsa {
                    true => OursOf::Lead(row(f).and_then(|r| flips::row_lead(f, compare::Side::Ours, r, None))),
                    false => row(f).map_or(OursOf::Lead(None), |r| OursOf::Logits(r.to_vec())),
                })
                .collect()
        })?;
        self.ours.insert(c.name.clone(), kept);
        Ok(())
    }

    fn compare(&mut self, name: &str, ours: &Tensor) -> Result<Comparison> {
        let (reference, ref_shape) = self.golden.values(name)?;
        let shape = ours.dims().to_vec();
        let ours = Values::from_tensor(ours)?;
        if name.ends_with(".moe.topk_ids") {
            if let Values::I64(ids) = &ours {
                self.last_ids = Some(ids.clone());
            }
            // A reference that chose an expert twice (or one past its router) is named as such,
            // as `diff` names it, not read as a set that kept fewer experts.
            let sides = [(&ours, shape.as_slice()), (&reference, ref_shape.as_slice())];
            let experts = self.golden.experts_of(name).or(self.experts);
            if let Some(c) = compare::invalid_selection(name, sides, [None, experts]) {
                return Ok(c);
            }
        }
        let ref_ids = match name.strip_suffix(".moe.topk_weights") {
            Some(layer) => match self.golden.values(&format!("{layer}.moe.topk_ids")) {
                Ok((Values::I64(ids), _)) => Some(ids),
                _ => None,
            },
            None => None,
        };
        let ids = match (&self.last_ids, &ref_ids) {
            (Some(a), Some(b)) => Some((a.as_slice(), b.as_slice())),
            _ => None,
        };
        let batch = self.golden.batch();
        let tol = crate::diff::tol_for(self.tol, &self.per_name, name);
        Ok(compare::compare_tensor(name, (&ours, &shape), (&reference, &ref_shape), ids, tol, batch))
    }
}

impl Verifier<'_> {
    /// Gives each flip the margins that decided its row: ours as this run reported them, the
    /// reference's as its dump records them or as recomputed from its indexer scores and gate
    /// logits (`flips::margins_in`) with the routers `routers` gives (asked only when there are
    /// flips; None leaves the reference's routing margins unknown), from the selection that decided
    /// them (`flips::deciding`).
    fn attach_margins(&mut self, config: &Config, routers: impl FnOnce() -> Option<Routers>) {
        let has_flips = |c: &Comparison| matches!(&c.detail, Detail::Sets { flips, .. } if !flips.is_empty());
        if !self.results.iter().any(has_flips) {
            return;
        }
        let routers = routers();
        for c in self.results.iter_mut().filter(|c| has_flips(c)) {
            let Some(point) = HookPoint::parse(&c.name) else { continue };
            let router = routers.as_ref().zip(point.layer()).and_then(|(r, i)| r.layer(i));
            let reference = flips::deciding_margins(self.golden, point, Some(config), router);
            // Ours: the run's own margins of the deciding selection (a shared layer reuses it).
            let ours = self.margins.get(&flips::deciding(point, config).name());
            c.set_margins(ours.map(Vec::as_slice), reference.as_deref());
            flips::reference_rule_breaks(c, self.golden, config, router, self.near_tie);
            // Our side's lead from our own scores of the flipped rows (routing: flat only, with
            // the checkpoint's bias, as `diff` ranks them).
            let bias = router.filter(|(rc, _)| rc.is_flat()).map(|(_, b)| b);
            if let (Some(ours), Detail::Sets { flips, .. }) = (self.ours.get(&c.name), &mut c.detail) {
                for (f, o) in flips.iter_mut().zip(ours) {
                    f.lead_ours = match o {
                        OursOf::Lead(lead) => *lead,
                        OursOf::Logits(row) => bias.and_then(|b| flips::row_lead(f, compare::Side::Ours, row, Some(b))),
                    };
                }
            }
        }
    }

    fn into_report(self, only_in_reference: Vec<String>, unchecked: Vec<String>, opts: &VerifyOptions) -> Report {
        // (In a --layers window, those of its layers, as `only_in_reference` is.)
        let in_window = |n: &str| match (&opts.layers, crate::hooks::layer_of_name(n)) {
            (None, _) => true,
            (Some(w), Some((i, _))) => w.contains(&i),
            (Some(_), None) => false,
        };
        Report {
            unread: self.golden.unread().iter().filter(|u| in_window(&u.name)).cloned().collect(),
            results: self.results,
            non_finite: self.non_finite,
            only_in_reference,
            unchecked,
            isolate: opts.isolate,
            replay: opts.replay,
            final_norm: self.final_norm,
            first_layer: opts.layers.as_ref().map_or(0, |w| *w.start()),
        }
    }
}

impl Observer for Verifier<'_> {
    /// What the reference holds, and the margins deciding the selections it holds.
    fn wants(&self, point: HookPoint) -> bool {
        let held = |p: HookPoint| self.golden.contains(&p.name());
        self.compared != Some(point) && (held(point) || point.decides().is_some_and(held))
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        let name = point.name();
        if let Some(selection) = point.decides() {
            self.margins.insert(selection.name(), with_f32(value, <[f32]>::to_vec)?);
            if !self.golden.contains(&name) {
                return Ok(());
            }
        }
        if self.non_finite.is_none() && value.dtype() != candle_core::DType::I64 && finite_expected(&name) {
            self.non_finite = with_f32(value, |v| first_non_finite(&name, v, value.dims()))?;
        }
        if point == HookPoint::FinalNorm {
            self.final_norm = Some(value.clone());
        }
        let ranks = match point {
            HookPoint::Layer(i, LayerHook::DsaScores) => Some(HookPoint::Layer(i, LayerHook::DsaTopk)),
            HookPoint::Layer(i, LayerHook::RouterLogits) => Some(HookPoint::Layer(i, LayerHook::TopkIds)),
            _ => None,
        };
        if let Some(selection) = ranks {
            let slot = usize::from(matches!(selection, HookPoint::Layer(_, LayerHook::TopkIds)));
            self.last_scores[slot] = Some((selection, value.clone()));
        }
        let c = self.compare(&name, value)?;
        if matches!(point, HookPoint::Layer(_, LayerHook::DsaTopk | LayerHook::TopkIds)) {
            self.keep_ours(point, &c)?;
        }
        self.results.push(c);
        Ok(())
    }

    fn forced_selection(&mut self, layer: usize) -> Result<Option<Selection>> {
        // Isolated, a shared-indexer layer starts from the reference's selection as it starts
        // from the reference's hidden state: the one the layer before it carried, as the CPU's
        // layer windows start (`Start::from_dump`). Ours would carry a flip of an earlier full
        // layer into every shared one after it.
        let shared = |c: &Config| layer > 0 && c.indexer_kind(layer) == IndexerKind::Shared;
        // (Replayed too: a shared layer's recorded selection is the one it reused.)
        let name = match self.config.as_ref() {
            Some(c) if self.isolate.is_some() && shared(c) => HookPoint::Layer(layer - 1, LayerHook::DsaTopk).name(),
            _ if self.replay.selection => HookPoint::Layer(layer, LayerHook::DsaTopk).name(),
            _ => return Ok(None),
        };
        if !self.golden.contains(&name) {
            return Ok(None);
        }
        let tokens = self.golden.tokens()?;
        // The layer's own positions: the MTP layer's rows are one position shorter.
        let seq = match layer == self.config.as_ref().map_or(usize::MAX, |c| c.num_hidden_layers) {
            true => tokens.seq.saturating_sub(1),
            false => tokens.seq,
        };
        Ok(Some(self.golden.selection(&name, tokens.batch, seq)?))
    }

    fn isolated_input(&mut self, layer: usize) -> Result<Option<Tensor>> {
        let name = match layer {
            0 => return Ok(None), // the embedding is exact
            i => HookPoint::Layer(i - 1, LayerHook::Output).name(),
        };
        // The head (layer `num_hidden_layers`: the final norm's input) runs on our own state
        // where the reference lacks it, as the CPU path's does; a decoder layer cannot be
        // isolated without its input, and is refused as the CPU path refuses it.
        let head = self.config.as_ref().is_some_and(|c| layer >= c.num_hidden_layers);
        match self.isolate {
            Some(shape) if self.golden.contains(&name) => Ok(Some(self.golden.hidden(&name, shape)?)),
            Some(_) if !head => {
                Err(Error::dump(&self.golden.path, format!("has no `{name}` to start layer {layer} from")))
            }
            _ => Ok(None),
        }
    }

    fn forced_routing(&mut self, layer: usize) -> Result<Option<Vec<Vec<usize>>>> {
        let name = HookPoint::Layer(layer, LayerHook::TopkIds).name();
        if !self.replay.routing || !self.golden.contains(&name) {
            return Ok(None);
        }
        let (Values::I64(ids), shape) = self.golden.values(&name)? else {
            return Err(Error::dump(&self.golden.path, format!("`{name}` must be an integer tensor")));
        };
        let k = shape.last().copied().unwrap_or(1).max(1);
        let rows =
            ids.chunks(k).map(|row| row.iter().map(|&i| usize::try_from(i).unwrap_or(usize::MAX)).collect()).collect();
        Ok(Some(rows))
    }
}

/// Counterfactual replay: take the reference's decisions instead of our own, so what remains of
/// the difference is arithmetic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replay {
    /// Use the reference's `moe.topk_ids` (weights still from our router scores).
    pub routing: bool,
    /// Use the reference's `dsa.topk`.
    pub selection: bool,
}

impl Replay {
    /// What is replayed, as the reports name it; None when nothing is.
    pub fn describe(self) -> Option<&'static str> {
        match (self.routing, self.selection) {
            (true, true) => Some("expert choices and DSA selections"),
            (true, false) => Some("expert choices"),
            (false, true) => Some("DSA selections"),
            (false, false) => None,
        }
    }

    /// Refuses a replay of decisions `golden` does not hold in the `--layers` window (a run that
    /// replays nothing would say it replayed them).
    pub fn check(self, golden: &Dump, window: Option<&RangeInclusive<usize>>) -> Result<()> {
        let in_window = |n: &str| {
            let layer = HookPoint::parse(n).and_then(|p| p.layer());
            window.is_none_or(|w| layer.is_some_and(|i| w.contains(&i)))
        };
        let holds = |suffix: &str| golden.names().iter().any(|n| n.ends_with(suffix) && in_window(n));
        for (asked, flag, suffix) in
            [(self.routing, "--force-routing", ".moe.topk_ids"), (self.selection, "--force-selection", ".dsa.topk")]
        {
            if asked && !holds(suffix) {
                let within = window.map(|w| format!(" in layers {}..{}", w.start(), w.end())).unwrap_or_default();
                return Err(Error::Usage(format!(
                    "{flag}: {} holds no `layers.*{suffix}`{within} to replay",
                    golden.path.display()
                )));
            }
        }
        Ok(())
    }
}

pub struct Report {
    pub results: Vec<Comparison>,
    /// Where this run first produced a NaN or Inf (among the compared tensors).
    pub non_finite: Option<NonFinite>,
    /// Names in the reference that this run did not produce.
    pub only_in_reference: Vec<String>,
    /// The spec's hook points this run produces that the reference does not hold: a partial
    /// reference checks the rest only.
    pub unchecked: Vec<String>,
    /// The reference's tensors left unread (a tool's extras), and why.
    pub unread: Vec<crate::dump::Unread>,
    pub isolate: bool,
    /// The reference's decisions this run took instead of its own.
    pub replay: Replay,
    /// Our `final_norm` (when the reference has one to compare): what the MTP head starts from.
    pub final_norm: Option<Tensor>,
    /// The first layer compared: `--layers`' start, else 0.
    pub first_layer: usize,
}

impl Report {
    pub fn mismatches(&self) -> usize {
        self.results.iter().filter(|c| !c.ok).count()
    }
    /// The first tensor (forward order) that does not match.
    pub fn first_mismatch(&self) -> Option<&Comparison> {
        self.results.iter().find(|c| !c.ok)
    }
    /// Whether every tensor compared matches, something besides `input_ids` was compared, and the
    /// reference does not hold this run's hook points under other names ([`Report::misnamed`]).
    pub fn all_match(&self) -> bool {
        self.mismatches() == 0 && self.not_compared().is_none()
    }

    /// Why a run whose compared tensors all match does not pass: the reference's hook points
    /// under other names, or nothing compared but the tokens.
    pub fn not_compared(&self) -> Option<String> {
        if let Some(m) = self.misnamed() {
            return Some(format!("{m} (the spec's names are the contract)"));
        }
        compare::tokens_only(&self.results)
            .then(|| "nothing verified: the reference holds none of this run's hook points but input_ids".into())
    }

    /// What the reference's names outside the spec say, where most of them are spec hook points
    /// behind one prefix (`model.layers.0.input_norm`) and they outnumber the tensors compared:
    /// the names are the spec's contract, and most of the reference went unverified. Or its
    /// layers numbered from 1: no `layers.0.*` anywhere (in a `--layers` window, none of its
    /// first layer, as the names are the window's), layered names the run did not produce,
    /// and no layer's activation that matched (which says the names line up, as `diff` takes
    /// it): its layer i was compared with our layer i, one off.
    pub fn misnamed(&self) -> Option<String> {
        let layer_of = |n: &str| HookPoint::parse(n).and_then(|p| p.layer());
        let named =
            || self.results.iter().map(|c| c.name.as_str()).chain(self.only_in_reference.iter().map(String::as_str));
        let unproduced = self.only_in_reference.iter().filter(|n| layer_of(n).is_some()).count();
        let lines_up = self
            .results
            .iter()
            .any(|c| c.ok && layer_of(&c.name).is_some() && matches!(c.detail, Detail::Float { .. }));
        let layered = named().any(|n| layer_of(n).is_some());
        if unproduced > 0 && !lines_up && layered && !named().any(|n| layer_of(n) == Some(self.first_layer)) {
            return Some(format!(
                "the reference numbers its layers from 1 (no `layers.{}.*`; {unproduced} of its layers' tensors not \
                 produced by this run)",
                self.first_layer
            ));
        }
        fn prefix(n: &str) -> Option<&str> {
            let mut cuts = n.match_indices('.').map(|(i, _)| n.split_at(i + 1));
            cuts.find(|(_, rest)| HookPoint::parse(rest).is_some_and(|p| p.in_spec())).map(|(p, _)| p)
        }
        let foreign = self.only_in_reference.iter().filter(|n| HookPoint::parse(n).is_none());
        let mut prefixes: Vec<&str> = foreign.filter_map(|n| prefix(n)).collect();
        prefixes.sort_unstable();
        let most = prefixes.chunk_by(|x, y| x == y).max_by_key(|run| run.len())?;
        (most.len() > self.results.len()).then(|| {
            format!("the reference names {} spec hook points with a `{}` prefix: not compared", most.len(), most[0])
        })
    }
}

/// What `verify` runs and how it compares.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub tol: Tolerance,
    /// `--tol PATTERN=ATOL,RTOL` overrides, the last that matches a name winning.
    pub per_name: Vec<(String, Tolerance)>,
    /// Feed every layer the reference's `layers.{i-1}.output` (`embeddings` for layer 0), and the
    /// final norm the reference's last output.
    pub isolate: bool,
    pub replay: Replay,
    /// Only these layers, started from the reference's hidden state before the first.
    pub layers: Option<RangeInclusive<usize>>,
    /// The near-tie threshold (`--near-tie`; None: the tolerance's), for the reference's rule
    /// breaks (`flips::reference_rule_breaks`).
    pub near_tie: Option<f64>,
}

/// Runs the dump's tokens and compares (whole model, resident weights, no replay).
pub fn verify(model: &Model, golden: &Dump, tol: Tolerance, isolate: bool) -> Result<Report> {
    verify_with(Weights::Resident(model), golden, &VerifyOptions { tol, isolate, ..Default::default() })
}

pub fn verify_with(w: Weights, golden: &Dump, opts: &VerifyOptions) -> Result<Report> {
    let tokens = golden.tokens()?;
    let mut v = Verifier::with_options(golden, opts, w.config());
    v.replay = opts.replay;
    let n = w.config().num_hidden_layers;
    let window = opts.layers.clone().unwrap_or(0..=n - 1);
    stream::check_window(w.config(), &window)?;
    if opts.isolate {
        let rope = RotaryEmbedding::new(w.config()).tables(&(0..tokens.seq).collect::<Vec<_>>());
        let embedded = match *window.start() {
            0 => Some(stream::embed(w, &tokens, &mut v)?),
            _ => None,
        };
        let mut last = None;
        let shape = [tokens.batch, tokens.seq, w.config().hidden_size];
        let mut progress = crate::progress::Steps::layers(*window.start(), *window.end());
        for i in window.clone() {
            // Layer 0 starts from the reference's embeddings where it holds them, else from ours
            // (a table lookup: exact), as the device path's isolation does; any later layer's
            // input the reference lacks is refused, on both paths.
            let start = match (i, &embedded) {
                (0, Some(h)) if !golden.contains("embeddings") => Start { hidden: h.clone(), selection: None },
                _ => Start::from_dump(golden, i, shape)?,
            };
            let mut sel = start.selection;
            last = Some(stream::layers(w, &rope, i..=i, start.hidden, &mut sel, &mut v, &mut progress)?);
        }
        if *window.end() + 1 == n {
            let final_input = HookPoint::Layer(n - 1, LayerHook::Output).name();
            let h = if golden.contains(&final_input) {
                golden.hidden(&final_input, shape)?
            } else {
                last.ok_or_else(|| Error::Usage("no layer ran".into()))?
            };
            stream::head(w, &h, &mut v)?;
        }
    } else {
        let start = match *window.start() {
            0 => None,
            first => Some(Start::from_dump(golden, first, [tokens.batch, tokens.seq, w.config().hidden_size])?),
        };
        stream::run(w, &tokens, (Some(window.clone()), start), stream::LogitRows::Last, &mut v)?;
    }
    let produced: BTreeSet<&str> = v.results.iter().map(|c| c.name.as_str()).collect();
    let in_window = |name: &str| match HookPoint::parse(name).and_then(|p| p.layer()) {
        Some(i) => opts.layers.as_ref().is_none_or(|r| r.contains(&i)),
        None => opts.layers.is_none(),
    };
    let only_in_reference =
        golden.names().into_iter().filter(|n| !produced.contains(n.as_str()) && in_window(n)).collect();
    let unchecked = unchecked(golden, w.config(), window);
    // Margins are advice on a finished comparison: a bias that cannot be read leaves them unknown.
    v.attach_margins(w.config(), || Routers::of_weights(w).ok());
    Ok(v.into_report(only_in_reference, unchecked, opts))
}

/// A prefill (the CPU model, or the device forward pass on some backend) against a reference
/// dump: every main-model tensor the dump holds, with `opts`' replay and isolation (no layer
/// window, no MTP head). `w` is the model `p` runs: its depth leaves the MTP layer's
/// `layers.{N}.*` out of what must be produced, and its routers give the reference's margins.
pub fn verify_prefill(p: &dyn Prefill, w: Weights, golden: &Dump, opts: &VerifyOptions) -> Result<Report> {
    let config = w.config();
    let layers = config.num_hidden_layers;
    let mut v = Verifier::with_options(golden, opts, config);
    let tokens = golden.tokens()?;
    v.replay = opts.replay;
    v.isolate = opts.isolate.then_some([tokens.batch, tokens.seq, config.hidden_size]);
    p.prefill(&tokens, &mut v)?;
    let produced: BTreeSet<&str> = v.results.iter().map(|c| c.name.as_str()).collect();
    let only_in_reference = golden
        .names()
        .into_iter()
        .filter(|name| !produced.contains(name.as_str()))
        .filter(|name| {
            !name.starts_with("mtp.") && HookPoint::parse(name).and_then(|p| p.layer()).is_none_or(|i| i < layers)
        })
        .collect();
    v.attach_margins(config, || Routers::of_weights(w).ok()); // (as verify_with's)
    let unchecked = unchecked(golden, config, 0..=layers - 1);
    Ok(v.into_report(only_in_reference, unchecked, opts))
}

/// The spec's hook points a run of `config`'s `layers` produces (from layer 0, the tokens and
/// embeddings; to the last, the final norm and logits) that `golden` does not hold.
fn unchecked(golden: &Dump, config: &Config, layers: RangeInclusive<usize>) -> Vec<String> {
    let moe_only = |h: LayerHook| matches!(h, LayerHook::RouterLogits | LayerHook::TopkIds | LayerHook::TopkWeights);
    let (first, last) = (*layers.start() == 0, *layers.end() + 1 == config.num_hidden_layers);
    let produced = |p: &HookPoint| match *p {
        HookPoint::Layer(i, h) => layers.contains(&i) && (!moe_only(h) || config.mlp_kind(i) == MlpKind::Moe),
        HookPoint::InputIds | HookPoint::Embeddings => first,
        _ => last,
    };
    let points = HookPoint::all(config.num_hidden_layers).filter(|p| p.in_spec() && produced(p));
    points.map(|p| p.name()).filter(|n| !golden.contains(n)).collect()
}

/// Whether a reference dump holds the MTP head's tensors.
pub fn has_mtp(golden: &Dump) -> bool {
    golden.names().iter().any(|n| n.starts_with("mtp."))
}

/// Adds the MTP head's comparisons to `report`: the reference's `mtp.*` and
/// `layers.{num_hidden_layers}.*`, the head run where `p` runs the prefill. The head is fed our
/// own final-norm hidden state, or with `isolate` the reference's `mtp.input_hidden`, so its own
/// error is measured alone; ours, our final norm's, is compared with it all the same (a port that
/// feeds its head another state, the one before the final norm, differs there and nowhere else).
pub fn verify_mtp(
    p: &dyn Prefill,
    (config, mtp): (&Config, &Mtp),
    golden: &Dump,
    opts: &VerifyOptions,
    report: &mut Report,
) -> Result<()> {
    let tokens = golden.tokens()?;
    let mut v = Verifier::with_options(golden, opts, config);
    // The head's layer takes the reference's decisions too, as the main layers did.
    v.replay = opts.replay;
    let ours = report.final_norm.as_ref().map(|h| h.narrow(1, 0, tokens.seq.saturating_sub(1))).transpose()?;
    let hidden = if report.isolate {
        if let Some(ours) = ours.filter(|_| v.wants(HookPoint::MtpInputHidden)) {
            v.observe(HookPoint::MtpInputHidden, &ours)?;
            v.compared = Some(HookPoint::MtpInputHidden);
        }
        let shape = [tokens.batch, tokens.seq.saturating_sub(1), config.hidden_size];
        golden.hidden(&HookPoint::MtpInputHidden.name(), shape)?
    } else {
        let missing = "has MTP tensors but no `final_norm` to check the main model's hidden state by";
        ours.ok_or_else(|| Error::dump(&golden.path, missing))?
    };
    p.mtp(mtp, &hidden, &tokens, &mut v)?;
    v.attach_margins(config, || Some(Routers::of_layers(config, [&mtp.layer])));
    let produced: BTreeSet<String> = v.results.iter().map(|c| c.name.clone()).collect();
    report.only_in_reference.retain(|n| !produced.contains(n));
    report.results.extend(v.results);
    if report.non_finite.is_none() {
        report.non_finite = v.non_finite;
    }
    Ok(())
}
