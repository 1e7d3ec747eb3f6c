//! The data the views show, and the [`Source`] trait that supplies it. Everything here is plain
//! numbers and strings: the source decides what a layer, a hook point or an expert is.

/// How a layer compares with the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Match,
    /// Some tensor differs beyond tolerance.
    Mismatch,
    /// Selections differ (routing or DSA flips); may come with mismatches downstream.
    Flips,
    /// Some flips one rule cannot make (`compare::RuleBreak`: a side's choice its own scores
    /// contradict, or keys that moved too little): the selection's rule differs here.
    Rule,
    /// No reference to compare with.
    Unchecked,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Match => "match",
            Status::Mismatch => "MISMATCH",
            Status::Flips => "FLIPS",
            Status::Rule => "RULE",
            Status::Unchecked => "-",
        }
    }
    pub fn is_problem(self) -> bool {
        matches!(self, Status::Mismatch | Status::Flips | Status::Rule)
    }
}

/// What a row of the layers view stands for: the embeddings before the first layer, a decoder
/// layer, or the head after the last (final norm, logits, and the MTP head's own tensors). The
/// first and the last are rows too, so that a difference there is seen like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Embeddings,
    Layer(usize),
    Head,
}

impl Part {
    pub fn layer(self) -> Option<usize> {
        match self {
            Part::Layer(i) => Some(i),
            _ => None,
        }
    }
    /// As the layers view's first column shows it.
    pub fn label(self) -> String {
        match self {
            Part::Embeddings => "emb".into(),
            Part::Layer(i) => i.to_string(),
            Part::Head => "head".into(),
        }
    }
    /// As titles and messages name it: `layer 3`, `embeddings`, `head`.
    pub fn name(self) -> String {
        match self {
            Part::Embeddings => "embeddings".into(),
            Part::Layer(i) => format!("layer {i}"),
            Part::Head => "head".into(),
        }
    }
}

/// One row of the layers view.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRow {
    pub part: Part,
    /// "dense", "moe", "mtp", or "?" where neither the config nor the dumps say.
    pub ffn: String,
    /// e.g. "full" or "shared".
    pub indexer: String,
    pub status: Status,
    pub mismatches: usize,
    pub routing_flips: usize,
    pub dsa_flips: usize,
    /// The hook point with the largest error against the reference, and that error.
    pub worst: Option<(String, f64)>,
    /// The layer's first hook point in forward order that does not match: where to look first
    /// (the largest error is usually downstream of it, in `output`).
    pub first_bad: Option<String>,
    /// `output`'s NMSE against the reference, and where it jumps over the layer before's (10x
    /// or more, as `diff` marks it), by how much and over what (`x40 over the layer before's`, or
    /// over rounding's level where the layer before was at it): where to look when every layer
    /// is a little off.
    pub nmse: Option<f64>,
    pub jump: Option<String>,
}

/// The worst element of a tensor against its reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Worst {
    pub at: Vec<usize>,
    pub ours: f32,
    pub reference: f32,
}

/// One hook point of the selected layer: its statistics and its error against the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct HookRow {
    pub name: String,
    pub shape: Vec<usize>,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub l2: f64,
    /// NaNs and infinities; NaNs alone where infinities are by design (`hooks::finite_expected`).
    pub nonfinite: usize,
    /// Counts over equal-width bins between min and max.
    pub histogram: Vec<u64>,
    pub reference: Option<RefCheck>,
}

impl HookRow {
    /// The name as the activations view shows it and its filter matches it: `attn.out`, not
    /// `layers.3.attn.out` (the layer is in the title; a filter `3` would keep every row).
    pub fn short_name(&self) -> &str {
        let name = self.name.as_str();
        name.strip_prefix("layers.").and_then(|r| r.split_once('.')).map_or(name, |(_, n)| n)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RefCheck {
    pub ok: bool,
    /// For a selection or an integer tensor: how many of its rows differ (its error is no
    /// float difference); None for floats.
    pub rows_differ: Option<usize>,
    /// The reference's shape where it is not ours (nothing was compared; `max_abs` is infinite).
    pub reference_shape: Option<Vec<usize>>,
    /// The side ("ours", "ref") whose selection is no set of distinct experts in range (an
    /// expert chosen twice, an id past the router): nothing was compared.
    pub invalid: Option<&'static str>,
    pub max_abs: f64,
    pub max_rel: f64,
    /// For floats, the whole tensor's fit: what tells a rounding's spread from a bug's.
    pub fit: Option<Fit>,
    pub worst: Vec<Worst>,
}

/// A float tensor against the reference as a whole, as `diff` measures it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    pub nmse: f64,
    pub cosine: f64,
    /// Elements outside the tolerance, of `total`.
    pub bad: usize,
    pub total: usize,
}

/// How close the decision a flip overturned was, by the margins that decided it on each side:
/// rounding alone can flip a near-tie; a real flip needs a larger error; unknown when neither
/// side's margin is known. And, before any of those, a flip one rule cannot make (a side's choice
/// its own scores contradict, or keys that moved too little: `diff`'s rule break), whatever its
/// margins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlipClass {
    NearTie,
    Real,
    Unknown,
    Rule,
}

impl FlipClass {
    /// The one-character mark of a flip (a routing row's, a DSA query's).
    pub fn mark(self) -> char {
        match self {
            FlipClass::NearTie => '~',
            FlipClass::Real => '!',
            FlipClass::Unknown => '?',
            FlipClass::Rule => 'R',
        }
    }
}

/// Flips counted by class for a view's title: ` (1~ 11!)`, with `N?` when some have no known
/// margin and `NR` when some break the rule; nothing when there are none.
pub fn counts(flips: impl Iterator<Item = FlipClass>) -> String {
    let (mut near, mut real, mut unknown, mut rule) = (0, 0, 0, 0);
    for c in flips {
        *match c {
            FlipClass::NearTie => &mut near,
            FlipClass::Real => &mut real,
            FlipClass::Unknown => &mut unknown,
            FlipClass::Rule => &mut rule,
        } += 1;
    }
    if near + real + unknown + rule == 0 {
        return String::new();
    }
    let some = |n: usize, mark: char| if n > 0 { format!(" {n}{mark}") } else { String::new() };
    format!(" ({near}~ {real}!{}{})", some(unknown, '?'), some(rule, 'R'))
}

/// One token's routing in one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRow {
    pub token: usize,
    /// As recorded: an id outside the experts (a port's top-k bug) shows as it is.
    pub ids: Vec<i64>,
    pub weights: Vec<f32>,
    /// The margin that decided the row (k-th minus (k+1)-th biased score): recorded, or
    /// recomputed from the gate logits, where known.
    pub margin: Option<f32>,
    pub reference_ids: Option<Vec<i64>>,
    /// For a flip, its class, and the reference's margin that decided it (where known): the
    /// class weighs both margins, and a porter reads which side was close.
    pub flip: Option<FlipClass>,
    pub reference_margin: Option<f32>,
}

impl RouteRow {
    /// Experts chosen differently from the reference (as sets).
    pub fn is_flip(&self) -> bool {
        self.reference_ids.as_ref().is_some_and(|r| {
            let (mut a, mut b) = (self.ids.clone(), r.clone());
            a.sort_unstable();
            b.sort_unstable();
            a != b
        })
    }
}

/// Tokens per expert in one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRow {
    pub layer: usize,
    /// The MTP head's layer (`num_hidden_layers`), not one of the main model's.
    pub mtp: bool,
    pub counts: Vec<u64>,
    pub max_vio: f64,
    pub cv: f64,
    /// The net load moved from the reference's counts (`audit --against`'s measure), if any.
    pub moved: Option<f64>,
}

/// The expert pairs one MoE layer's tokens chose together most surprisingly often at what
/// independent choice at the experts' loads gives (`audit --pairs`' measure), the strongest
/// first.
#[derive(Debug, Clone, PartialEq)]
pub struct PairsRow {
    pub pairs: Vec<ExpertPair>,
    /// The 95th percentile of the strongest pair's surprise where each token's experts are drawn
    /// independently at the layer's loads: past it is past chance.
    pub chance_p95: Option<f64>,
    /// The chance level is still being drawn (in the background; [`Source::busy`]).
    pub chance_pending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertPair {
    pub experts: [usize; 2],
    pub tokens: u64,
    pub expected: f64,
    /// `-log10 P(X >= tokens)`, X Poisson of mean `expected`.
    pub surprise: f64,
}

/// The keys each query of one batch row attended to in one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct DsaMatrix {
    /// The run's positions a batch row, which the rows below are indexed by.
    pub seq: usize,
    /// The queries the layer has a batch row: `seq`, but one fewer in the MTP layer (its rows
    /// from there on are empty: no query).
    pub queries: usize,
    /// Selected causal keys per query, ascending, each once (what lets the views search them).
    pub selected: Vec<Vec<usize>>,
    pub reference: Option<Vec<Vec<usize>>>,
    /// Score margin at the cut per query, when recorded.
    pub margin: Option<Vec<f32>>,
    /// For each query whose selection flipped, its class, and the reference's margin that
    /// decided it (where known).
    pub flips: Vec<Option<FlipClass>>,
    pub reference_margin: Vec<Option<f32>>,
    /// Ours's keys past each query (ascending): where a flipped row kept fewer causal keys, the
    /// later keys it holds instead (a causality bug) are named.
    pub past: Vec<Vec<usize>>,
}

impl DsaMatrix {
    /// |ours ∩ reference| / |reference| for query `q`.
    pub fn recall(&self, q: usize) -> Option<f64> {
        let r = self.reference.as_ref()?.get(q)?;
        if r.is_empty() {
            return Some(1.0);
        }
        let common = self.selected.get(q)?.iter().filter(|x| r.binary_search(x).is_ok()).count();
        Some(common as f64 / r.len() as f64)
    }

    /// Whether query `q`'s selection (ours, or the reference's) keeps key `k`.
    pub fn keeps(row: &[usize], k: usize) -> bool {
        row.binary_search(&k).is_ok()
    }
}

/// Per-layer, per-token norms of the latent KV.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvNormGrid {
    pub layers: Vec<usize>,
    /// `[layer][token]` L2 norm of the compressed KV after its layernorm; `None` where the layer
    /// has no row for the token (the MTP layer has none for each batch row's last position).
    pub latent: Vec<Vec<Option<f32>>>,
    /// The same of the reference, where there is one (empty rows where not).
    pub reference_latent: Vec<Vec<Option<f32>>>,
    /// Before the layernorm.
    pub pre_norm: Vec<Vec<Option<f32>>>,
    /// Of the roped shared key.
    pub k_rope: Vec<Vec<Option<f32>>>,
}

/// Where the views get their data. Implementations may compute lazily; they must not depend on
/// being called in any order.
pub trait Source {
    /// One line saying what is shown (model, dump, reference).
    fn title(&self) -> String;
    fn layers(&self) -> &[LayerRow];
    /// Token positions (batch rows flattened).
    fn tokens(&self) -> usize;
    fn token_label(&self, token: usize) -> String;
    /// Hook points of one row of the layers view.
    fn hooks(&self, part: Part) -> Vec<HookRow>;
    fn routing(&self, layer: usize) -> Option<Vec<RouteRow>>;
    fn load(&self) -> Vec<LoadRow>;
    /// The expert pairs `layer`'s tokens chose together most (the load view's selected layer).
    fn pairs(&self, _layer: usize) -> Option<PairsRow> {
        None
    }
    /// Whether something the screen shows is still being computed in the background: the
    /// terminal redraws while it is, so the result appears without a key.
    fn busy(&self) -> bool {
        false
    }
    /// The DSA selection of `layer` for the batch row holding `token` (shared: a long prompt's
    /// is large, and every key press redraws it).
    fn dsa(&self, layer: usize, token: usize) -> Option<std::rc::Rc<DsaMatrix>>;
    fn kv_norms(&self) -> Option<std::rc::Rc<KvNormGrid>>;
    /// Where the run first produced a NaN or an Inf, if it did (shown above the layers).
    fn first_non_finite(&self) -> Option<String> {
        None
    }
    /// The first hook point that differs from the reference, with what it reads as (`diff`'s
    /// first lines; shown above the layers).
    fn first_divergence(&self) -> Option<String> {
        None
    }
    /// What the session should know from the start (shown in the status line until a key):
    /// e.g. that the checkpoint given is not the one the dump ran.
    fn warning(&self) -> Option<String> {
        None
    }
    /// Whether a reference was given (whatever it holds).
    fn has_reference(&self) -> bool {
        false
    }
    /// The reference's shape of the hook point `name` where it holds it in another shape than
    /// ours (another top-k, other positions): its rows are then not paired with ours.
    fn reference_shape(&self, _name: &str) -> Option<Vec<usize>> {
        None
    }
}
