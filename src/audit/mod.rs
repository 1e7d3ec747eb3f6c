//! `audit`: expert load balance per MoE layer, over one or many prompts (or over the routing a dump
//! recorded). Only counts and the prompts' token ids are kept, never activations.
//!
//! Per layer: tokens per expert, MaxVio (`max load / mean load - 1`, the Loss-Free Balancing
//! paper's measure) over all prompts, with and without the correction bias, and the mean of each
//! prompt's own (a load balanced over many prompts can be hot in each), coefficient of
//! variation, normalised entropy of the load distribution, balancedness (`mean / max`, in the
//! JSON), dead experts, the share of tokens whose expert set the correction bias changed, the
//! Pearson correlation between each expert's bias and its load, how close its routing decisions
//! were (tokens by the margin that decided them), and which experts tokens choose together
//! (`pairs`).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::Tokens;

pub mod chance;
mod collect;
pub mod contrast;
mod live;
pub mod pairs;
mod routes;
mod shift;
pub use collect::{collect, collect_with_other, expert_count, router_width, CollectOptions, ExpertCount};
pub use live::{AuditObserver, Lines};
pub use pairs::{Pair, Pairs};
pub use routes::Routes;
pub use shift::{net_moved, shift_json, Changed, LayerShift};

/// The routing counts of one MoE layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerLoad {
    pub layer: usize,
    /// Selections per expert (a token choosing k experts adds 1 to each).
    pub counts: Vec<u64>,
    pub tokens: u64,
    /// Tokens whose chosen set would differ without the bias, of `bias_known` tokens whose flags
    /// are known (runs mixed with dumps that lack them count only the others); None when unknown.
    pub bias_changed: Option<u64>,
    pub bias_known: u64,
    pub bias: Option<Vec<f32>>,
    /// Experts a token chooses (0 before the first run).
    pub k: usize,
    /// Each prompt's own MaxVio, in order (a batch row's: a run or dump of `B` rows holds `B`):
    /// a load balanced over all prompts may still be hot in each, which is what a server batch
    /// meets.
    pub prompt_max_vio: Vec<f64>,
    /// The run (`Audit::runs`' index) of each of `prompt_max_vio`'s prompts: a layer that some
    /// runs do not route skips them.
    pub prompt_runs: Vec<u32>,
    /// The sum of each prompt's least possible MaxVio (`max_vio_floor`): short prompts cannot
    /// route evenly, whatever the router does.
    pub prompt_floor_sum: f64,
    /// Selections per expert had the correction bias been zero (the same gate logits and rule),
    /// over `unbiased_tokens` tokens whose gate logits are known (runs with router logits and
    /// the checkpoint's routers).
    pub unbiased_counts: Vec<u64>,
    pub unbiased_tokens: u64,
    /// Tokens by the margin that decided their experts (`moe.margin`: the k-th minus the
    /// (k+1)-th biased score, or grouped routing's smaller gap), in [`MARGIN_EDGES`]' bins (the
    /// last above the last edge), over `margins_known` tokens whose margin is known.
    pub margin_bins: [u64; 5],
    pub margins_known: u64,
    /// Each prompt's tokens, in order: what uniform routing's chance level is drawn over.
    pub prompt_tokens: Vec<u32>,
    /// Each prompt's load per expert (`[prompts, experts]` flattened), where the audit keeps
    /// them (`Audit::per_prompt`: `--compare`'s chance level splits the prompts at random).
    pub prompt_counts: Option<Vec<u32>>,
    /// The routing weight (`moe.topk_weights`) each expert received, summed over `mass_tokens`
    /// tokens whose weights are known: what each expert contributes to the layer's output, which
    /// may rank the experts otherwise than their counts.
    pub mass: Vec<f64>,
    pub mass_tokens: u64,
    /// The expert pairs its tokens chose together (None before its first tokens, with one expert a
    /// token, or past [`pairs::MAX_EXPERTS`] experts).
    pub pairs: Option<Pairs>,
}

/// The upper edges of [`LayerLoad::margin_bins`]' first four bins: how close routing decisions
/// were. Below 1e-3 (the near-tie margin `diff` and `verify` use in f32) a rounding can flip one.
pub const MARGIN_EDGES: [f32; 4] = [1e-4, 1e-3, 1e-2, 1e-1];

/// The least MaxVio `slots` routing slots can have over `experts` (as even as whole tokens go:
/// `ceil(s/E) / (s/E) - 1`, which is `E/s - 1` for fewer slots than experts).
pub fn max_vio_floor(slots: usize, experts: usize) -> f64 {
    if slots == 0 || experts == 0 {
        return 0.0;
    }
    let mean = slots as f64 / experts as f64;
    mean.ceil() / mean - 1.0
}

/// The derived balance numbers of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub max_vio: f64,
    pub cv: f64,
    pub entropy: f64,
    pub balancedness: f64,
    pub dead: usize,
    pub bias_changed_share: Option<f64>,
    pub bias_load_corr: Option<f64>,
    /// The mean of the prompts' own MaxVio (the Loss-Free Balancing paper's MaxVio_batch).
    pub max_vio_per_run: Option<f64>,
    /// The mean of the least MaxVio each prompt's length allows (`max_vio_floor`).
    pub max_vio_per_run_floor: Option<f64>,
    /// MaxVio had the correction bias been zero, where every token's gate logits are known:
    /// against `max_vio`, what the bias does for the balance.
    pub max_vio_without_bias: Option<f64>,
    /// The share of tokens decided by a margin below 1e-3, where every token's margin is known:
    /// choices a rounding (a port, a quantisation) may flip.
    pub near_tie_share: Option<f64>,
    /// MaxVio of the routing weight each expert received, where every token's weights are known.
    pub max_vio_by_weight: Option<f64>,
}

/// `max load / mean load - 1` of per-expert counts (0 for no load).
fn max_vio(counts: &[u64]) -> f64 {
    max_vio_of(&counts.iter().map(|&c| c as f64).collect::<Vec<_>>())
}

/// `max load / mean load - 1` of per-expert loads (0 for no load).
fn max_vio_of(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let max = loads.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 {
        max / mean - 1.0
    } else {
        0.0
    }
}

impl LayerLoad {
    pub fn new(layer: usize, experts: usize) -> Self {
        LayerLoad { layer, counts: vec![0; experts], ..Default::default() }
    }

    /// The prompts this layer counts.
    pub fn prompts(&self) -> usize {
        self.prompt_max_vio.len()
    }

    /// Whether every token's routing weights were recorded (the weight mass covers the layer).
    pub fn mass_known(&self) -> bool {
        self.mass_tokens > 0 && self.mass_tokens == self.tokens
    }

    /// Whether its bias-changed share is over some of its tokens only (runs without flags).
    pub fn bias_partial(&self) -> bool {
        self.bias_changed.is_some() && self.bias_known > 0 && self.bias_known < self.tokens
    }

    /// Its `n` most surprising expert pairs ([`pairs`]).
    pub fn strongest_pairs(&self, n: usize) -> Vec<Pair> {
        self.pairs.as_ref().map_or_else(Vec::new, |p| p.strongest(&self.counts, self.tokens, self.k, n))
    }

    pub fn stats(&self) -> Stats {
        let e = self.counts.len().max(1) as f64;
        let loads: Vec<f64> = self.counts.iter().map(|&c| c as f64).collect();
        let total: f64 = loads.iter().sum();
        let mean = total / e;
        let max = loads.iter().copied().fold(0.0, f64::max);
        let var = loads.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / e;
        let entropy = if total > 0.0 && e > 1.0 {
            -loads.iter().filter(|&&l| l > 0.0).map(|l| (l / total) * (l / total).ln()).sum::<f64>() / e.ln()
        } else {
            0.0
        };
        Stats {
            max_vio: max_vio(&self.counts),
            cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
            entropy,
            balancedness: if max > 0.0 { mean / max } else { 0.0 },
            dead: self.counts.iter().filter(|&&c| c == 0).count(),
            bias_changed_share: self
                .bias_changed
                .filter(|_| self.bias_known > 0)
                .map(|c| c as f64 / self.bias_known as f64),
            bias_load_corr: self.bias.as_ref().and_then(|b| pearson(b.iter().map(|&x| x as f64).collect(), &loads)),
            max_vio_per_run: (self.prompts() > 0)
                .then(|| self.prompt_max_vio.iter().sum::<f64>() / self.prompts() as f64),
            max_vio_per_run_floor: (self.prompts() > 0).then(|| self.prompt_floor_sum / self.prompts() as f64),
            max_vio_without_bias: (self.unbiased_tokens > 0 && self.unbiased_tokens == self.tokens)
                .then(|| max_vio(&self.unbiased_counts)),
            near_tie_share: (self.margins_known > 0 && self.margins_known == self.tokens)
                .then(|| (self.margin_bins[0] + self.margin_bins[1]) as f64 / self.margins_known as f64),
            max_vio_by_weight: self.mass_known().then(|| max_vio_of(&self.mass)),
        }
    }
}

/// Pearson correlation of pairs `(x[i], y[i])`; None when either side is constant, there are
/// fewer than two pairs, or the two lengths differ.
pub fn pearson(x: Vec<f64>, y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 2 || n != y.len() {
        return None;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n as f64, y.iter().sum::<f64>() / n as f64);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx.sqrt() * syy.sqrt()))
}

/// One run counted: a prompt line run live, or a dump.
#[derive(Debug)]
pub struct Run {
    /// Its batch rows, each a prompt.
    pub batch: usize,
    /// Its token ids; None for a dump without `input_ids`.
    pub tokens: Option<Tokens>,
    /// Where it came from: `FILE line N` for a prompt line, a dump's path.
    pub source: String,
}

/// Accumulates routing over any number of runs.
#[derive(Debug, Default)]
pub struct Audit {
    pub layers: BTreeMap<usize, LayerLoad>,
    pub experts: usize,
    /// The expert count is the dumps' largest id + 1, not a model's or a router's.
    pub experts_guessed: bool,
    /// Each run, in order: `--against` must have run the same.
    pub runs: Vec<Run>,
    /// The model's `config_sha256`: the first dump's that records one, else the checkpoint's.
    pub config_sha256: Option<String>,
    /// The MTP head's decoder layer (`num_hidden_layers`), when known: marked in the table.
    pub mtp_layer: Option<usize>,
    /// Ctrl-C stopped the prompts.
    pub stopped: Option<Stopped>,
    /// Ctrl-C stopped a sweep (`audit --stream`) after this layer: every prompt ran the layers up
    /// to it, and [`Audit::window`] ends there.
    pub stopped_after_layer: Option<usize>,
    /// The prompt lines given to run live (`--prompts`), run or not.
    pub prompts_total: Option<usize>,
    /// Each layer's expert sets token by token (`[tokens, k]` flattened, each row ascending),
    /// kept when asked (`audit --against` compares them token by token: 2 bytes a slot).
    pub sets: Option<BTreeMap<usize, Vec<u16>>>,
    /// With the sets, the margin that decided each token (NaN where unknown), for `--against`
    /// to tell near-ties from choices a rounding cannot flip.
    pub set_margins: BTreeMap<usize, Vec<f32>>,
    /// Keep each prompt's load per expert ([`LayerLoad::prompt_counts`]: 4 bytes an expert a
    /// prompt a layer), for `--compare`'s chance level.
    pub per_prompt: bool,
    /// `--layers A..B`: only these layers were counted (said in the table's title and the JSON).
    pub window: Option<std::ops::RangeInclusive<usize>>,
    /// `--pairs N`: the strongest co-activated pairs listed a layer, in the table or the JSON
    /// (which has no co-activation without it: its chance levels take a while).
    pub pairs_listed: Option<usize>,
}

/// Where Ctrl-C stopped an audit's prompts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stopped {
    /// The prompts run, of how many the file holds (a prompt is a line of the file, less its
    /// comments and blank lines, and may hold several batch rows).
    pub run: usize,
    pub of: usize,
    /// The file's line of the last prompt run: a rerun of the rest starts past it.
    pub line: usize,
}

impl Stopped {
    /// "after 3 of 10 prompt lines (the last at line 5)": lines, where the title counts the
    /// prompts (batch rows) they held.
    pub fn words(&self) -> String {
        format!("after {} of {} prompt lines (the last at line {})", self.run, self.of, self.line)
    }
}

impl Audit {
    pub fn new(experts: usize) -> Self {
        Audit { experts, ..Default::default() }
    }

    /// Whether every prompt given ran every layer asked for (no stop cut them short).
    pub fn complete(&self) -> bool {
        self.stopped.is_none() && self.stopped_after_layer.is_none()
    }

    /// The prompts counted: every run's batch rows.
    pub fn prompts(&self) -> usize {
        self.runs.iter().map(|r| r.batch).sum()
    }

    /// Adds one layer's chosen ids (`[tokens, k]`, flattened: `prompts` batch rows of equal
    /// length, one after another) and optional bias-changed flags (one a token). Adds nothing and
    /// says what is wrong when an id is outside the experts or chosen twice by a token, the flags
    /// are not one a token, the tokens do not split into the prompts, or another run of the layer
    /// chose another number of experts a token.
    pub fn add(
        &mut self,
        layer: usize,
        ids: &[i64],
        k: usize,
        prompts: usize,
        bias_changed: Option<&[i64]>,
    ) -> Result<()> {
        // (Runs are pushed once their layers are added: this one is next.)
        self.add_run(self.runs.len(), layer, ids, k, prompts, bias_changed)
    }

    /// [`Audit::add`] for run number `run` (a sweep adds each layer of every run before the
    /// runs are pushed).
    pub fn add_run(
        &mut self,
        run: usize,
        layer: usize,
        ids: &[i64],
        k: usize,
        prompts: usize,
        bias_changed: Option<&[i64]>,
    ) -> Result<()> {
        let (experts, k, prompts) = (self.experts, k.max(1), prompts.max(1));
        let rows = ids.len() / k;
        if !rows.is_multiple_of(prompts) {
            return Err(Error::Usage(format!("has {rows} tokens, which do not split into {prompts} prompts")));
        }
        if let Some(problem) = crate::compare::invalid_expert_ids(ids, &[rows, k], Some(experts)) {
            return Err(Error::Usage(problem));
        }
        if let Some(flags) = bias_changed.filter(|f| f.len() != rows) {
            let n = flags.len();
            return Err(Error::Usage(format!("has {rows} tokens and its layer's `moe.bias_changed` {n} flags")));
        }
        if let Some((t, f)) = bias_changed.and_then(|f| f.iter().enumerate().find(|(_, &x)| x != 0 && x != 1)) {
            return Err(Error::Usage(format!(
                "has its layer's `moe.bias_changed` {f} for token {t}: a flag is 0 or 1"
            )));
        }
        let l = self.layers.entry(layer).or_insert_with(|| LayerLoad::new(layer, experts));
        if l.k != 0 && l.k != k {
            return Err(Error::Usage(format!(
                "chooses {k} experts a token where another run of layer {layer} chose {}",
                l.k
            )));
        }
        l.k = k;
        // (Made on the first tokens, not in `LayerLoad::new`: the TUI's loads count ids only.)
        if l.pairs.is_none() && k >= 2 {
            l.pairs = Pairs::new(experts);
        }
        for prompt in ids.chunks((rows / prompts * k).max(1)) {
            let mut counts = vec![0u64; experts];
            for &id in prompt {
                counts[id as usize] += 1;
                l.counts[id as usize] += 1;
            }
            if let Some(pairs) = l.pairs.as_mut() {
                let mut set = Vec::with_capacity(k);
                for row in prompt.chunks(k) {
                    set.clear();
                    set.extend(row.iter().map(|&id| id as usize));
                    pairs.add(&set);
                }
            }
            l.prompt_max_vio.push(max_vio(&counts));
            l.prompt_runs.push(u32::try_from(run).unwrap_or(u32::MAX));
            l.prompt_floor_sum += max_vio_floor(prompt.len(), experts);
            l.prompt_tokens.push((prompt.len() / k) as u32);
            if self.per_prompt {
                l.prompt_counts.get_or_insert_with(Vec::new).extend(counts.iter().map(|&c| c as u32));
            }
        }
        if let Some(sets) = self.sets.as_mut() {
            // Ids are checked to lie within the experts, at most `MAX_EXPERTS` = 2^16 of them
            // (`collect` refuses more).
            let kept = sets.entry(layer).or_default();
            for row in ids.chunks(k) {
                let start = kept.len();
                kept.extend(row.iter().map(|&id| id as u16));
                kept[start..].sort_unstable();
            }
            // Unknown until `add_margins` gives them.
            self.set_margins.entry(layer).or_default().extend(std::iter::repeat_n(f32::NAN, rows));
        }
        l.tokens += rows as u64;
        if let Some(flags) = bias_changed {
            *l.bias_changed.get_or_insert(0) += flags.iter().filter(|&&f| f != 0).count() as u64;
            l.bias_known += flags.len() as u64;
        }
        Ok(())
    }

    /// Adds one layer's expert choices had the correction bias been zero (`[tokens, k]`,
    /// flattened, the same tokens as an [`Audit::add`] of the layer), ids in range.
    pub fn add_unbiased(&mut self, layer: usize, ids: &[usize], k: usize) {
        let experts = self.experts;
        let l = self.layers.entry(layer).or_insert_with(|| LayerLoad::new(layer, experts));
        l.unbiased_counts.resize(experts, 0);
        for &id in ids.iter().filter(|&&id| id < experts) {
            l.unbiased_counts[id] += 1;
        }
        l.unbiased_tokens += (ids.len() / k.max(1)) as u64;
    }

    /// Adds one layer's routing weights (`[tokens, k]`, aligned with the ids an [`Audit::add`] of
    /// the layer counted) to each chosen expert's weight mass; ids outside the experts are left out.
    pub fn add_mass(&mut self, layer: usize, ids: &[i64], weights: &[f32], k: usize) {
        // A weight that is not finite (a NaN router's) leaves this run's mass unknown: summed,
        // it made the layer read perfectly even.
        if weights.iter().any(|w| !w.is_finite()) {
            return;
        }
        let experts = self.experts;
        let l = self.layers.entry(layer).or_insert_with(|| LayerLoad::new(layer, experts));
        l.mass.resize(experts, 0.0);
        for (&id, &w) in ids.iter().zip(weights) {
            if let Some(m) = usize::try_from(id).ok().and_then(|e| l.mass.get_mut(e)) {
                *m += f64::from(w);
            }
        }
        l.mass_tokens += (ids.len().min(weights.len()) / k.max(1)) as u64;
    }

    /// The margins that decided `layer`'s tokens (one a token, those of the layer's last
    /// [`Audit::add`]; NaN where unknown; a negative one is not counted).
    pub fn add_margins(&mut self, layer: usize, margins: &[f32]) {
        if let Some(kept) = self.set_margins.get_mut(&layer).filter(|k| k.len() >= margins.len()) {
            let start = kept.len() - margins.len();
            for (k, &m) in kept[start..].iter_mut().zip(margins) {
                *k = if m >= 0.0 { m } else { f32::NAN };
            }
        }
        let experts = self.experts;
        let l = self.layers.entry(layer).or_insert_with(|| LayerLoad::new(layer, experts));
        // (A negative margin, which no top-k makes, is a writer's error: not counted as known.)
        for &m in margins.iter().filter(|&&m| m >= 0.0) {
            l.margin_bins[MARGIN_EDGES.iter().take_while(|&&edge| m >= edge).count()] += 1;
            l.margins_known += 1;
        }
    }

    pub fn set_bias(&mut self, layer: usize, bias: Vec<f32>) {
        let experts = self.experts;
        self.layers.entry(layer).or_insert_with(|| LayerLoad::new(layer, experts)).bias = Some(bias);
    }

    pub fn table(&self) -> String {
        let by = crate::interrupt::signal_name();
        let stopped = match (self.stopped, self.stopped_after_layer) {
            (Some(stop), _) => format!(" ({by} stopped the prompts {})", stop.words()),
            (None, Some(layer)) => format!(" ({by} stopped the layers after layer {layer})"),
            (None, None) => String::new(),
        };
        let window = self.window.as_ref().map_or(String::new(), |w| format!(", layers {}..{}", w.start(), w.end()));
        let mut s = format!(
            "expert load over {} prompt(s){stopped}, {} experts{window}\n{:>7} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8} {:>10} {:>5} {:>12} {:>10} {:>11}  {:<30}  rarest (expert:tokens)\n",
            self.prompts(), self.experts, "layer", "tokens", "MaxVio", "w/o bias", "by weight", "CV", "entropy", "MaxVio/run", "dead", "bias-changed", "corr(b,l)", "margin<1e-3", "busiest (expert:tokens)"
        );
        for l in self.layers.values() {
            let st = l.stats();
            let opt = |x: Option<f64>, pct: bool| match x {
                Some(v) if pct => format!("{:.1}%", 100.0 * v),
                Some(v) => format!("{v:.3}"),
                None => "-".into(),
            };
            // Ties by expert id, lowest first, in both lists.
            let mut busiest: Vec<usize> = (0..l.counts.len()).collect();
            busiest.sort_by(|&a, &b| l.counts[b].cmp(&l.counts[a]).then(a.cmp(&b)));
            let mut rarest = busiest.clone();
            rarest.sort_by(|&a, &b| l.counts[a].cmp(&l.counts[b]).then(a.cmp(&b)));
            // With few experts the rarest are those the busiest leave.
            rarest.retain(|e| !busiest[..3.min(busiest.len())].contains(e));
            let list = |experts: &[usize]| {
                experts.iter().take(3).map(|&e| format!("{e}:{}", l.counts[e])).collect::<Vec<_>>().join(" ")
            };
            let (busiest, rarest) = (list(&busiest), list(&rarest));
            // A share over some of the layer's tokens only (runs without flags or logits) is marked.
            let mut bias_changed = opt(st.bias_changed_share, true);
            if l.bias_partial() {
                bias_changed.push('*');
            }
            let label = match self.mtp_layer == Some(l.layer) {
                true => format!("{} mtp", l.layer),
                false => l.layer.to_string(),
            };
            let _ = writeln!(
                s,
                "{label:>7} {:>8} {:>8.3} {:>8} {:>9} {:>7.3} {:>8.3} {:>10} {:>5} {:>12} {:>10} {:>11}  {busiest:<30}  {rarest}",
                l.tokens,
                st.max_vio,
                opt(st.max_vio_without_bias, false),
                opt(st.max_vio_by_weight, false),
                st.cv,
                st.entropy,
                opt(st.max_vio_per_run, false),
                st.dead,
                bias_changed,
                opt(st.bias_load_corr, false),
                opt(st.near_tie_share, true),
            );
        }
        for note in self.notes() {
            let _ = writeln!(s, "note: {note}");
        }
        s
    }

    /// Each layer's chance level: uniform routing of its prompts' tokens ([`chance::uniform`]),
    /// drawn once for the layers that route the same prompts.
    pub fn uniform(&self) -> BTreeMap<usize, chance::Uniform> {
        let mut drawn: Vec<((&[u32], usize), chance::Uniform)> = Vec::new();
        let mut out = BTreeMap::new();
        for (&i, l) in &self.layers {
            let key = (l.prompt_tokens.as_slice(), l.k);
            let u = match drawn.iter().find(|(k, _)| *k == key) {
                Some((_, u)) => Some(*u),
                None => chance::uniform(key.0, self.experts, l.k).inspect(|u| drawn.push((key, *u))),
            };
            if let Some(u) = u {
                out.insert(i, u);
            }
        }
        out
    }

    /// The chance levels in one line, layers of the same levels together: what MaxVio and
    /// MaxVio/run are when the router plays no part.
    fn chance_note(uniform: &BTreeMap<usize, chance::Uniform>) -> Option<String> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for (i, u) in uniform {
            let level = format!(
                "MaxVio {:.3} (95%: {:.3}), MaxVio/run {:.3}, dead {}",
                u.max_vio, u.max_vio_p95, u.max_vio_per_run, u.dead
            );
            match groups.iter_mut().find(|(l, _)| *l == level) {
                Some((_, layers)) => layers.push(i.to_string()),
                None => groups.push((level, vec![i.to_string()])),
            }
        }
        let draws = uniform.values().map(|u| u.draws).min()?;
        let levels: Vec<String> = match groups.len() {
            1 => vec![format!("{} in every layer", groups[0].0)],
            _ => groups.iter().map(|(level, layers)| format!("{level} (layer(s) {})", layers.join(", "))).collect(),
        };
        Some(format!(
            "chance level, uniformly random routing of the same tokens (k distinct experts a token; the median of \
             {draws} draws, and MaxVio's 95th percentile: past it, the load is uneven beyond chance): {}",
            levels.join("; ")
        ))
    }

    /// What the table's numbers are over, where that limits them: layers with too few routed
    /// slots, prompts too short for their own MaxVio, a bias-changed share over some runs only,
    /// layers that count different prompts; and the chance levels.
    pub fn notes(&self) -> Vec<String> {
        self.notes_with(&self.uniform())
    }

    /// [`Audit::notes`] with the chance levels drawn already (drawing them again costs up to
    /// 50 million picks a layer).
    fn notes_with(&self, uniform: &BTreeMap<usize, chance::Uniform>) -> Vec<String> {
        let layers = |keep: &dyn Fn(&LayerLoad) -> bool| -> Vec<String> {
            self.layers.values().filter(|l| keep(l)).map(|l| l.layer.to_string()).collect()
        };
        let slots = |l: &LayerLoad| l.counts.iter().sum::<u64>();
        let mut notes = Vec::new();
        let sparse = layers(&|l| slots(l) < 2 * l.counts.len() as u64);
        if !sparse.is_empty() {
            notes.push(format!(
                "layer(s) {} routed fewer tokens x k than twice the experts: their MaxVio and dead experts say little",
                sparse.join(", ")
            ));
        }
        // Prompts too short to route evenly: MaxVio/run is much their lengths' doing.
        let floors: Vec<String> = (self.layers.values())
            .filter_map(|l| Some((l.layer, l.stats().max_vio_per_run_floor?)))
            .filter(|&(_, floor)| floor >= 0.1)
            .map(|(layer, floor)| format!("layer {layer}: {floor:.3}"))
            .collect();
        if !floors.is_empty() {
            notes.push(format!(
                "MaxVio/run of prompts this short cannot fall below the mean of their lengths' least MaxVio ({}), \
                 what perfectly even routing leaves",
                floors.join(", ")
            ));
        }
        if let Some(chance) = Self::chance_note(uniform) {
            notes.push(chance);
        }
        let partial: Vec<String> = (self.layers.values().filter(|l| l.bias_partial()))
            .map(|l| format!("layer {}: {} of {}", l.layer, l.bias_known, l.tokens))
            .collect();
        if !partial.is_empty() {
            notes.push(format!(
                "* bias-changed over the tokens with known flags only ({}): the other runs recorded no flags, and no \
                 router logits for --model's bias",
                partial.join(", ")
            ));
        }
        // The layers whose number is over some of their tokens only: left out, and said.
        let partly = |known: fn(&LayerLoad) -> u64| {
            let layers: Vec<String> = (self.layers.values())
                .filter(|l| known(l) > 0 && known(l) < l.tokens)
                .map(|l| format!("layer {}: {} of {}", l.layer, known(l), l.tokens))
                .collect();
            (!layers.is_empty()).then(|| layers.join(", "))
        };
        if let Some(layers) = partly(|l| l.unbiased_tokens) {
            notes.push(format!(
                "w/o bias is left out where some runs recorded no gate logits, or NaN ones ({layers} tokens known)"
            ));
        }
        if let Some(layers) = partly(|l| l.mass_tokens) {
            notes.push(format!(
                "by weight is left out where some runs recorded no routing weights, or weights not finite ({layers} \
                 tokens known)"
            ));
        }
        notes.extend(self.uneven_prompts());
        notes
    }

    /// When layers count different numbers of prompts (dumps of some layers only, a window of
    /// `run --layers`), which do: their numbers are over different tokens.
    pub fn uneven_prompts(&self) -> Option<String> {
        let mut by_count: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for l in self.layers.values() {
            by_count.entry(l.prompts()).or_default().push(l.layer.to_string());
        }
        // (Also where every layer counts as many, but fewer than all: dumps of other layers each.)
        let all = self.prompts();
        (by_count.len() > 1 || by_count.keys().any(|&n| n != all)).then(|| {
            let plural = |layers: &[String]| if layers.len() > 1 { "layers" } else { "layer" };
            let groups: Vec<String> =
                by_count.iter().map(|(n, l)| format!("{} {} over {n}", plural(l), l.join(", "))).collect();
            format!(
                "the layers count different prompts ({}; of {} in all): compare their numbers with care",
                groups.join("; "),
                all
            )
        })
    }

    /// The layers only one side counted (`other`, named `other_name`), each side's in a line
    /// ending with `what` (what is not measured there).
    pub fn one_sided(&self, other: &Audit, other_name: &str, what: &str) -> Vec<String> {
        fn only(a: &Audit, b: &Audit) -> Vec<String> {
            a.layers.keys().filter(|i| !b.layers.contains_key(i)).map(usize::to_string).collect()
        }
        [("the audited runs", only(self, other)), (other_name, only(other, self))]
            .into_iter()
            .filter(|(_, layers)| !layers.is_empty())
            .map(|(side, layers)| format!("layer(s) {} only in {side}: {what}", layers.join(", ")))
            .collect()
    }

    /// A reference made from another config.json: a quantised twin's differs (its dtype, its
    /// `quantization_config`), so it is compared, with this said.
    pub fn other_config(&self, reference: &Audit, flag: &str) -> Option<String> {
        let (a, b) = (self.config_sha256.as_ref()?, reference.config_sha256.as_ref()?);
        (!crate::dump::same_config(a, b)).then(|| {
            format!(
                "the audited runs and {flag}'s were made from different config.json files (a quantised twin's \
                 differs in its dtype and quantization_config): comparing their routing as one model's"
            )
        })
    }

    pub fn to_json(&self) -> Value {
        let uniform = self.uniform();
        let (pairs, pair_notes) = self.pairs_json();
        let notes = [self.notes_with(&uniform), pair_notes].concat();
        // As written (1e-4), not as the f32 widens (9.999999747378752e-5).
        let edges = MARGIN_EDGES.map(|e| e.to_string().parse::<f64>().unwrap_or(f64::from(e)));
        let layers: Vec<Value> = self
            .layers
            .values()
            .map(|l| {
                let st = l.stats();
                json!({
                    "layer": l.layer, "tokens": l.tokens, "counts": l.counts, "max_vio": st.max_vio, "cv": st.cv,
                    "entropy": st.entropy, "balancedness": st.balancedness, "dead_experts": st.dead,
                    "bias_changed_share": st.bias_changed_share, "bias_known_tokens": l.bias_known,
                    "bias_load_correlation": st.bias_load_corr, "prompts": l.prompts(),
                    "max_vio_per_prompt": l.prompt_max_vio, "prompt_runs": l.prompt_runs,
                    "max_vio_per_run_mean": st.max_vio_per_run, "max_vio_per_run_floor": st.max_vio_per_run_floor,
                    "max_vio_uniform": uniform.get(&l.layer).map(|u| u.max_vio),
                    "max_vio_per_run_uniform": uniform.get(&l.layer).map(|u| u.max_vio_per_run),
                    "max_vio_uniform_p95": uniform.get(&l.layer).map(|u| u.max_vio_p95),
                    "dead_experts_uniform": uniform.get(&l.layer).map(|u| u.dead),
                    "max_vio_without_bias": st.max_vio_without_bias,
                    "counts_without_bias": st.max_vio_without_bias.map(|_| &l.unbiased_counts),
                    "near_tie_share": st.near_tie_share,
                    "max_vio_by_weight": st.max_vio_by_weight,
                    "weight_mass": l.mass_known().then_some(&l.mass),
                    "margin_bins": { "edges": edges, "counts": l.margin_bins, "known_tokens": l.margins_known },
                    "mtp": self.mtp_layer == Some(l.layer),
                    "co_activation": pairs.get(&l.layer),
                })
            })
            .collect();
        json!({
            "schema": "glimpse-audit/1", "prompts": self.prompts(), "experts": self.experts, "experts_guessed": self.experts_guessed,
            "stopped_after": self.stopped.map(|s| s.run), "stopped_at_line": self.stopped.map(|s| s.line),
            "stopped_after_layer": self.stopped_after_layer,
            "complete": self.complete(),
            "prompts_total": self.prompts_total, "runs": self.runs_json(), "layers": layers,
            "layer_window": self.window.as_ref().map(|w| [*w.start(), *w.end()]),
            "notes": notes,
        })
    }

    /// Each run counted, in order: `[{"source", "rows", "tokens"}]` (`tokens` a row's, null for a
    /// dump without `input_ids`). A layer's `prompt_runs` index it.
    fn runs_json(&self) -> Value {
        (self.runs.iter())
            .map(|r| json!({"source": r.source, "rows": r.batch, "tokens": r.tokens.as_ref().map(|t| t.seq)}))
            .collect()
    }

    /// Each layer's count per expert, `[{"layer", "counts"}]`: the other side's numbers of an
    /// `--against` or `--compare` in the JSON.
    pub fn counts_json(&self) -> Value {
        self.layers.values().map(|l| json!({"layer": l.layer, "counts": l.counts})).collect()
    }

    /// One row per (layer, expert), `layer,expert,count,share,weight,weight_share,bias,mtp`: count,
    /// share, the routing weight the expert received and its share of the layer's (empty where some
    /// token's weights are unknown), bias, whether the layer is the MTP head's (1 on it); with
    /// `other` (`--against`'s reference or `--compare`'s prompts, and its name), its count and share too
    /// (empty where it does not route the layer), for per-expert shifts past the top three.
    pub fn to_csv(&self, other: Option<(&Audit, &str)>) -> String {
        let mut s = String::from("layer,expert,count,share,weight,weight_share,bias,mtp");
        if let Some((_, name)) = other {
            let _ = write!(s, ",{name}_count,{name}_share");
        }
        s.push('\n');
        let share = |c: u64, counts: &[u64]| c as f64 / counts.iter().sum::<u64>().max(1) as f64;
        for l in self.layers.values() {
            let mtp = u8::from(self.mtp_layer == Some(l.layer));
            let theirs = other.map(|(o, _)| o.layers.get(&l.layer));
            for (e, &c) in l.counts.iter().enumerate() {
                // `+ 0.0` writes a zero bias as 0, not -0.
                let bias = l.bias.as_ref().and_then(|b| b.get(e)).map(|b| (b + 0.0).to_string()).unwrap_or_default();
                // The routing weight it received, where every token's is known (else empty).
                let weight = match l.mass.get(e).filter(|_| l.mass_known()) {
                    Some(m) => format!("{m:.6},{:.6}", m / l.mass.iter().sum::<f64>().max(f64::MIN_POSITIVE)),
                    None => ",".into(),
                };
                let _ = write!(s, "{},{e},{c},{:.6},{weight},{bias},{mtp}", l.layer, share(c, &l.counts));
                match theirs {
                    Some(Some(r)) => {
                        let rc = r.counts.get(e).copied().unwrap_or(0);
                        let _ = write!(s, ",{rc},{:.6}", share(rc, &r.counts));
                    }
                    Some(None) => s.push_str(",,"),
                    None => {}
                }
                s.push('\n');
            }
        }
        s
    }
}

#[cfg(test)]
mod tests;
