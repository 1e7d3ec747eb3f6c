//! Hook points of the forward pass and the observer that receives them. A hook point is a typed
//! value (no string matching in the hot path); its dump name (`docs/spec/dump-format.md`) is
//! derived only when something is recorded. The forward pass asks `wants` before building any
//! tensor that exists only to be observed, so a run with no observer does no extra work.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::indexer::Selection;

/// A point inside one decoder layer, in forward order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LayerHook {
    InputNorm,
    QLatent,
    /// L2 norm per token of the compressed KV before `kv_a_layernorm` [B, S].
    KvNormPre,
    KvLatent,
    /// L2 norm per token of `kv_latent` (after `kv_a_layernorm`) [B, S].
    KvNorm,
    /// L2 norm per token of the roped shared key `k_rope` [B, S].
    KRopeNorm,
    /// Indexer scores [B, S, S], -inf at non-causal keys (full indexer layers only); a decode
    /// call's [B, C, T] over the T positions cached (a stitched run's padded to [B, S, T]).
    DsaScores,
    /// Indexer score of the K-th minus the (K+1)-th causal key [B, S]; +inf when all are kept.
    DsaMargin,
    DsaTopk,
    AttnOut,
    PostAttnNorm,
    RouterLogits,
    /// `sigmoid(router_logits)` [B*S, E].
    RouterScores,
    /// `scores + e_score_correction_bias`, the values selection ranks [B*S, E].
    RouterBiasedScores,
    TopkIds,
    TopkWeights,
    /// k-th minus (k+1)-th biased score among the experts routing may choose, or with grouped
    /// routing the groups' gap where smaller and it matters (`moe::Route::margin`) `[B*S]`.
    RouterMargin,
    /// 1 where the chosen set would differ without the correction bias `[B*S]`, I64.
    BiasChanged,
    MlpOut,
    Output,
}

impl LayerHook {
    pub const ALL: [LayerHook; 20] = [
        LayerHook::InputNorm,
        LayerHook::QLatent,
        LayerHook::KvNormPre,
        LayerHook::KvLatent,
        LayerHook::KvNorm,
        LayerHook::KRopeNorm,
        LayerHook::DsaScores,
        LayerHook::DsaMargin,
        LayerHook::DsaTopk,
        LayerHook::AttnOut,
        LayerHook::PostAttnNorm,
        LayerHook::RouterLogits,
        LayerHook::RouterScores,
        LayerHook::RouterBiasedScores,
        LayerHook::TopkIds,
        LayerHook::TopkWeights,
        LayerHook::RouterMargin,
        LayerHook::BiasChanged,
        LayerHook::MlpOut,
        LayerHook::Output,
    ];

    /// Whether the tensor is laid out one row per token, [B*S, ...] (the router's), rather than
    /// [B, S, ...].
    pub fn token_rows(self) -> bool {
        use LayerHook::*;
        matches!(
            self,
            RouterLogits | RouterScores | RouterBiasedScores | TopkIds | TopkWeights | RouterMargin | BiasChanged
        )
    }

    /// The name after `layers.{i}.` in a dump.
    pub fn suffix(self) -> &'static str {
        match self {
            LayerHook::InputNorm => "input_norm",
            LayerHook::QLatent => "attn.q_latent",
            LayerHook::KvNormPre => "attn.kv_norm_pre",
            LayerHook::KvLatent => "attn.kv_latent",
            LayerHook::KvNorm => "attn.kv_norm",
            LayerHook::KRopeNorm => "attn.k_rope_norm",
            LayerHook::DsaScores => "dsa.scores",
            LayerHook::DsaMargin => "dsa.margin",
            LayerHook::DsaTopk => "dsa.topk",
            LayerHook::AttnOut => "attn.out",
            LayerHook::PostAttnNorm => "post_attn_norm",
            LayerHook::RouterLogits => "moe.router_logits",
            LayerHook::RouterScores => "moe.scores",
            LayerHook::RouterBiasedScores => "moe.biased_scores",
            LayerHook::TopkIds => "moe.topk_ids",
            LayerHook::TopkWeights => "moe.topk_weights",
            LayerHook::RouterMargin => "moe.margin",
            LayerHook::BiasChanged => "moe.bias_changed",
            LayerHook::MlpOut => "mlp.out",
            LayerHook::Output => "output",
        }
    }
}

/// How many hook points a forward pass over `layers` layers can report, the MTP head included
/// (sizes dump headers): the 8 outside the layers, one to spare, and every layer's, the MTP
/// layer's too.
pub fn max_points(layers: usize) -> usize {
    9 + (layers + 1) * LayerHook::ALL.len()
}

/// Every point where the forward pass reports a tensor, ordered as the forward pass visits them,
/// but for the MTP layer's `Layer(num_hidden_layers, _)`, which sorts among the layers, before
/// `FinalNorm` (it runs after `MtpEhProj`: `Dump::names` and [`HookPoint::all`] put it there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookPoint {
    InputIds,
    Embeddings,
    Layer(usize, LayerHook),
    FinalNorm,
    Logits,
    /// The MTP head's input: the main model's final-norm hidden state, positions 0..S-2.
    MtpInputHidden,
    /// `eh_proj(cat(enorm(embed(next token)), hnorm(h)))`: what the MTP decoder layer
    /// (`layers.{num_hidden_layers}.*`) starts from.
    MtpEhProj,
    /// `shared_head.norm` of the MTP decoder layer's output.
    MtpFinalNorm,
    /// The MTP draft logits: position s predicts token s + 2.
    MtpLogits,
}

/// The layer a dump name `layers.{i}.rest` is under, and its `rest` (a hook point's or another
/// tool's). The spec's `{i}` only: decimal digits, no sign and no leading zero
/// (`layers.01.output` is no layer's name, where it was read as layer 1's beside `layers.1.output`).
pub fn layer_of_name(name: &str) -> Option<(usize, &str)> {
    let (i, rest) = name.strip_prefix("layers.")?.split_once('.')?;
    let canonical = i.bytes().all(|b| b.is_ascii_digit()) && (i == "0" || !i.starts_with('0'));
    Some((i.parse().ok().filter(|_| canonical)?, rest))
}

impl HookPoint {
    pub fn name(&self) -> String {
        match self {
            HookPoint::InputIds => "input_ids".into(),
            HookPoint::Embeddings => "embeddings".into(),
            HookPoint::Layer(i, h) => format!("layers.{i}.{}", h.suffix()),
            HookPoint::FinalNorm => "final_norm".into(),
            HookPoint::Logits => "logits".into(),
            HookPoint::MtpInputHidden => "mtp.input_hidden".into(),
            HookPoint::MtpEhProj => "mtp.eh_proj".into(),
            HookPoint::MtpFinalNorm => "mtp.final_norm".into(),
            HookPoint::MtpLogits => "mtp.logits".into(),
        }
    }

    /// Parses a dump name back into its hook point; None for names outside the spec.
    pub fn parse(name: &str) -> Option<HookPoint> {
        match name {
            "input_ids" => return Some(HookPoint::InputIds),
            "embeddings" => return Some(HookPoint::Embeddings),
            "final_norm" => return Some(HookPoint::FinalNorm),
            "logits" => return Some(HookPoint::Logits),
            "mtp.input_hidden" => return Some(HookPoint::MtpInputHidden),
            "mtp.eh_proj" => return Some(HookPoint::MtpEhProj),
            "mtp.final_norm" => return Some(HookPoint::MtpFinalNorm),
            "mtp.logits" => return Some(HookPoint::MtpLogits),
            _ => {}
        }
        let (i, suffix) = layer_of_name(name)?;
        LayerHook::ALL.iter().find(|h| h.suffix() == suffix).map(|h| HookPoint::Layer(i, *h))
    }

    /// Every hook point of a model of `layers` layers and its MTP layer, in forward order.
    pub fn all(layers: usize) -> impl Iterator<Item = HookPoint> {
        use HookPoint::*;
        let of = |i| LayerHook::ALL.map(move |h| Layer(i, h));
        let main = (0..layers).flat_map(of);
        let head = [FinalNorm, Logits, MtpInputHidden, MtpEhProj];
        [InputIds, Embeddings].into_iter().chain(main).chain(head).chain(of(layers)).chain([MtpFinalNorm, MtpLogits])
    }

    pub fn layer(&self) -> Option<usize> {
        match self {
            HookPoint::Layer(i, _) => Some(*i),
            _ => None,
        }
    }

    /// Whether the dump spec's table names it (the rest are glimpse's extras).
    pub fn in_spec(&self) -> bool {
        use LayerHook::*;
        match self {
            HookPoint::InputIds | HookPoint::Embeddings | HookPoint::FinalNorm | HookPoint::Logits => true,
            HookPoint::Layer(_, h) => matches!(
                h,
                InputNorm
                    | QLatent
                    | KvLatent
                    | DsaTopk
                    | AttnOut
                    | PostAttnNorm
                    | RouterLogits
                    | TopkIds
                    | TopkWeights
                    | MlpOut
                    | Output
            ),
            _ => false,
        }
    }

    /// For a selection (`dsa.topk`, `moe.topk_ids`), the hook point holding the margin that
    /// decided each of its rows (`dsa.margin` `[B, S]`, `moe.margin` `[B*S]`: the same flat rows).
    pub fn margin(&self) -> Option<HookPoint> {
        match self {
            HookPoint::Layer(i, LayerHook::DsaTopk) => Some(HookPoint::Layer(*i, LayerHook::DsaMargin)),
            HookPoint::Layer(i, LayerHook::TopkIds) => Some(HookPoint::Layer(*i, LayerHook::RouterMargin)),
            _ => None,
        }
    }

    /// For a margin (`dsa.margin`, `moe.margin`), the selection whose rows it decided.
    pub fn decides(&self) -> Option<HookPoint> {
        match self {
            HookPoint::Layer(i, LayerHook::DsaMargin) => Some(HookPoint::Layer(*i, LayerHook::DsaTopk)),
            HookPoint::Layer(i, LayerHook::RouterMargin) => Some(HookPoint::Layer(*i, LayerHook::TopkIds)),
            _ => None,
        }
    }
}

/// Receives tensors from the forward pass. Float activations are F32; index tensors are I64.
pub trait Observer {
    /// Whether `point` should be reported. The forward pass skips building observe-only tensors
    /// (e.g. the I64 copy of a selection) when this is false.
    fn wants(&self, point: HookPoint) -> bool;
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()>;

    /// Whether logits (`point`: `logits` or `mtp.logits`) that the caller needs at the last
    /// position only ([`LogitRows::Last`]) must still be computed at every position for this
    /// observer: by default, where it wants them. (A run's NaN watch wants them when they are
    /// made, but is no reason to make them.)
    ///
    /// [`LogitRows::Last`]: crate::model::stream::LogitRows::Last
    fn wants_every_position(&self, point: HookPoint) -> bool {
        self.wants(point)
    }

    /// Counterfactual replay: a DSA selection to use in `layer` instead of the indexer's.
    fn forced_selection(&mut self, _layer: usize) -> Result<Option<Selection>> {
        Ok(None)
    }
    /// Counterfactual replay: the experts each token of `layer` must use (weights still come from
    /// this model's own router scores for those experts).
    fn forced_routing(&mut self, _layer: usize) -> Result<Option<Vec<Vec<usize>>>> {
        Ok(None)
    }
    /// Isolation: the hidden state to feed layer `layer` (the final norm for `layer` = the depth)
    /// instead of the one this run computed. Both forward passes ask (`verify --isolate` on a
    /// device answers with the reference's, and hands a shared-indexer layer the reference's
    /// selection through `forced_selection`; the CPU's `verify --isolate` runs layer windows
    /// instead, which start so too).
    fn isolated_input(&mut self, _layer: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Called after each layer with the hidden state and DSA selection the next layer starts from
    /// (a dump writer checkpoints here so a killed run can resume).
    fn layer_done(&mut self, _layer: usize, _hidden: &Tensor, _selection: Option<&Selection>) -> Result<()> {
        Ok(())
    }
}

/// Receives the hook points of several prompts run layer by layer (`audit --stream`: each
/// layer's weights are read once for every prompt, not once a prompt).
pub trait SweepObserver {
    /// The observer of prompt `p`'s hook points, until the next call.
    fn prompt(&mut self, p: usize) -> &mut dyn Observer;
    /// Every prompt has run layer `layer`: whether to go on to the next (false stops the sweep
    /// there, as Ctrl-C asks).
    fn layer_done(&mut self, layer: usize) -> bool;
    /// Prompt `p` as an error names it (e.g. its file and line).
    fn name(&self, p: usize) -> String {
        format!("prompt {p}")
    }
}

/// The `result` of prompt `p`'s work in a sweep, an error named as `obs` names the prompt.
pub fn in_prompt<T>(obs: &dyn SweepObserver, p: usize, result: Result<T>) -> Result<T> {
    result.map_err(|e| crate::error::Error::Context { context: obs.name(p), source: Box::new(e) })
}

/// The observer that wants nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn wants(&self, _: HookPoint) -> bool {
        false
    }
    fn observe(&mut self, _: HookPoint, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Which hook points to keep: name patterns (`*` matches any run of characters; a point is kept
/// when any pattern matches its dump name) and an optional layer range (points outside layers,
/// such as `logits`, are kept whenever their name matches).
#[derive(Debug, Clone)]
pub struct Selector {
    pub patterns: Vec<String>,
    pub layers: Option<std::ops::RangeInclusive<usize>>,
}

impl Default for Selector {
    /// Every hook point except the full indexer score matrices (`*.dsa.scores`, S x S per layer).
    fn default() -> Self {
        Selector { patterns: vec!["*".into()], layers: None }
    }
}

impl Selector {
    /// Parses `PATTERN[,PATTERN...]`.
    pub fn new(patterns: &str, layers: Option<std::ops::RangeInclusive<usize>>) -> Self {
        Selector {
            patterns: patterns.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect(),
            layers,
        }
    }

    /// The patterns that name no hook point of a model of `layers` layers (its MTP layer
    /// included): a typo that would record nothing.
    pub fn unmatched(&self, layers: usize) -> Vec<&str> {
        let records = |p: &String| {
            let one = Selector { patterns: vec![p.clone()], layers: self.layers.clone() };
            HookPoint::all(layers).any(|point| one.wants(point))
        };
        self.patterns.iter().filter(|p| !records(p)).map(String::as_str).collect()
    }

    pub fn wants(&self, point: HookPoint) -> bool {
        if let (Some(range), Some(i)) = (&self.layers, point.layer()) {
            if !range.contains(&i) {
                return false;
            }
        }
        let name = point.name();
        self.patterns.iter().any(|p| (!is_scores(point) || names_scores(p)) && glob(p, &name))
    }

    /// A pattern that reaches the S x S score matrices of a model of `layers` layers by a
    /// wildcard alone, so records everything it names but them (only a pattern naming them
    /// records them): the one to tell a user who gave it about (the default `*` is not told).
    pub fn scores_left_out(&self, layers: usize) -> Option<&str> {
        if self.patterns.iter().any(|p| names_scores(p)) {
            return None;
        }
        let reaches = |p: &&String| HookPoint::all(layers).any(|point| is_scores(point) && glob(p, &point.name()));
        self.patterns.iter().find(reaches).map(String::as_str)
    }
}

/// The S x S score matrices are recorded only when a pattern names them explicitly.
fn is_scores(point: HookPoint) -> bool {
    matches!(point, HookPoint::Layer(_, LayerHook::DsaScores))
}

fn names_scores(pattern: &str) -> bool {
    pattern.contains("dsa.scores")
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            pi += 1;
            mark = ni;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Keeps the selected tensors in memory, in the order reported.
#[derive(Default)]
pub struct Recorder {
    pub selector: Selector,
    pub tensors: Vec<(HookPoint, Tensor)>,
}

impl Observer for Recorder {
    fn wants(&self, point: HookPoint) -> bool {
        self.selector.wants(point)
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        self.tensors.push((point, value.clone()));
        Ok(())
    }
}

impl Recorder {
    pub fn new(selector: Selector) -> Self {
        Recorder { selector, tensors: Vec::new() }
    }
    pub fn get(&self, point: HookPoint) -> Option<&Tensor> {
        self.tensors.iter().find(|(p, _)| *p == point).map(|(_, t)| t)
    }
}

/// Two observers at once: each gets what it wants; replayed decisions come from the first.
pub struct Tee<'a>(pub &'a mut dyn Observer, pub &'a mut dyn Observer);

impl Observer for Tee<'_> {
    fn wants(&self, point: HookPoint) -> bool {
        self.0.wants(point) || self.1.wants(point)
    }
    fn wants_every_position(&self, point: HookPoint) -> bool {
        self.0.wants_every_position(point) || self.1.wants_every_position(point)
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        if self.0.wants(point) {
            self.0.observe(point, value)?;
        }
        if self.1.wants(point) {
            self.1.observe(point, value)?;
        }
        Ok(())
    }
    fn forced_selection(&mut self, layer: usize) -> Result<Option<Selection>> {
        self.0.forced_selection(layer)
    }
    fn forced_routing(&mut self, layer: usize) -> Result<Option<Vec<Vec<usize>>>> {
        self.0.forced_routing(layer)
    }
    fn isolated_input(&mut self, layer: usize) -> Result<Option<Tensor>> {
        self.0.isolated_input(layer)
    }
    fn layer_done(&mut self, layer: usize, hidden: &Tensor, selection: Option<&Selection>) -> Result<()> {
        self.0.layer_done(layer, hidden, selection)?;
        self.1.layer_done(layer, hidden, selection)
    }
}

/// Where a NaN or an Inf first appeared (tfdbg's `has_inf_or_nan`).
#[derive(Debug, Clone, PartialEq)]
pub struct NonFinite {
    pub name: String,
    pub at: Vec<usize>,
    pub value: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} at {:?} = {}", self.name, self.at, self.value)
    }
}

/// Whether a NaN or Inf at this name is a bug: the S x S scores are -inf off the causal triangle
/// and margins are +inf where nothing was cut, by design.
pub fn finite_expected(name: &str) -> bool {
    !(name.ends_with(".dsa.scores") || name.ends_with(".dsa.margin") || name.ends_with(".moe.margin"))
}

/// The first non-finite element of a row-major tensor.
pub fn first_non_finite(name: &str, values: &[f32], shape: &[usize]) -> Option<NonFinite> {
    let i = values.iter().position(|x| !x.is_finite())?;
    Some(NonFinite { name: name.to_string(), at: crate::compare::coord(shape, i), value: values[i] })
}

/// Calls `f` on a float tensor's values, straight from its storage when it is a contiguous CPU
/// f32 tensor (the usual case), else on a converted copy.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_f32s(&[t], |x| f(x[0]))
}

/// [`with_f32`] of several tensors at once: `f` gets their values in order.
pub fn with_f32s<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    use candle_core::{CpuStorage, DType, Storage};
    let in_place = |t: &Tensor| {
        t.dtype() == DType::F32 && t.is_contiguous() && matches!(&*t.storage_and_layout().0, Storage::Cpu(_))
    };
    // The copies first: a tensor's storage is not read again while its guard is held.
    let copies = ts
        .iter()
        .map(|t| match in_place(t) {
            true => Ok(None),
            false => Ok(Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)),
        })
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let values = ts
        .iter()
        .zip(&guards)
        .zip(&copies)
        .map(|((t, (storage, layout)), copy)| match (copy, &**storage) {
            (Some(v), _) => Ok(v.as_slice()),
            (None, Storage::Cpu(CpuStorage::F32(v))) => Ok(&v[layout.start_offset()..][..t.elem_count()]),
            (None, _) => Err(Error::Usage("a tensor changed storage while read".into())),
        })
        .collect::<Result<Vec<&[f32]>>>()?;
    Ok(f(&values))
}

/// Watches the float activations of a run for the first NaN or Inf.
#[derive(Default)]
pub struct NonFiniteWatch {
    pub first: Option<NonFinite>,
}

impl Observer for NonFiniteWatch {
    /// The activations every run computes anyway (no observe-only extras are built for it).
    fn wants(&self, point: HookPoint) -> bool {
        use LayerHook::*;
        self.first.is_none()
            && match point {
                HookPoint::Embeddings
                | HookPoint::FinalNorm
                | HookPoint::Logits
                | HookPoint::MtpInputHidden
                | HookPoint::MtpEhProj
                | HookPoint::MtpFinalNorm
                | HookPoint::MtpLogits => true,
                HookPoint::Layer(_, h) => {
                    matches!(
                        h,
                        InputNorm
                            | QLatent
                            | KvLatent
                            | AttnOut
                            | PostAttnNorm
                            | RouterLogits
                            | TopkWeights
                            | MlpOut
                            | Output
                    )
                }
                HookPoint::InputIds => false,
            }
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        self.first = with_f32(value, |v| first_non_finite(&point.name(), v, value.dims()))?;
        Ok(())
    }
    fn wants_every_position(&self, _: HookPoint) -> bool {
        false
    }
}

impl NonFiniteWatch {
    /// The logits (`point`: `logits` or `mtp.logits`) a run returns where it computed the last
    /// position's only, which no hook point reports: [B, R, vocab], the last R of `seq`.
    pub fn check_logits(&mut self, point: HookPoint, logits: &Tensor, seq: usize) -> Result<()> {
        if self.first.is_some() {
            return Ok(());
        }
        let past = seq.saturating_sub(logits.dim(1)?);
        let first = with_f32(logits, |v| first_non_finite(&point.name(), v, logits.dims()))?;
        self.first = first.map(|mut nf| {
            if let Some(p) = nf.at.get_mut(1) {
                *p += past;
            }
            nf
        });
        Ok(())
    }
}

/// Reports `value` to the observer if it wants `point`; `make` builds the tensor lazily.
pub fn emit(obs: &mut dyn Observer, point: HookPoint, make: impl FnOnce() -> Result<Tensor>) -> Result<()> {
    if obs.wants(point) {
        let t = make()?;
        obs.observe(point, &t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last position's logits a run returns are checked at their place in the run: a NaN in
    /// the last of 5 positions is at position 4, not 0; a NaN seen before them stays the first.
    #[test]
    fn the_returned_logits_are_checked_at_their_positions() {
        let logits = Tensor::from_vec(vec![0.0, f32::NAN, 1.0, 2.0], (2, 1, 2), &candle_core::Device::Cpu).unwrap();
        let mut watch = NonFiniteWatch::default();
        watch.check_logits(HookPoint::Logits, &logits, 5).unwrap();
        assert_eq!(watch.first.as_ref().map(|f| (f.name.as_str(), f.at.clone())), Some(("logits", vec![0, 4, 1])));
        let mut watch = NonFiniteWatch::default();
        watch.check_logits(HookPoint::MtpLogits, &logits, 4).unwrap();
        let at = watch.first.as_ref().map(|f| (f.name.as_str(), f.at.clone()));
        assert_eq!(at, Some(("mtp.logits", vec![0, 3, 1])));
        let earlier = NonFinite { name: "final_norm".into(), at: vec![0, 0, 0], value: f32::INFINITY };
        let mut watch = NonFiniteWatch { first: Some(earlier.clone()) };
        watch.check_logits(HookPoint::Logits, &logits, 5).unwrap();
        assert_eq!(watch.first, Some(earlier));
        assert!(!watch.wants_every_position(HookPoint::Logits) && !watch.wants_every_position(HookPoint::MtpLogits));
    }

    #[test]
    fn names_round_trip_and_keep_forward_order() {
        let mut points = vec![HookPoint::Logits, HookPoint::Layer(1, LayerHook::InputNorm), HookPoint::Embeddings];
        points.extend(LayerHook::ALL.iter().rev().map(|h| HookPoint::Layer(0, *h)));
        for p in &points {
            assert_eq!(HookPoint::parse(&p.name()), Some(*p), "{}", p.name());
        }
        points.sort();
        assert_eq!(points[0], HookPoint::Embeddings);
        assert_eq!(points[1], HookPoint::Layer(0, LayerHook::InputNorm));
        assert_eq!(points.last(), Some(&HookPoint::Logits));
        assert_eq!(HookPoint::parse("layers.x.output"), None);
        // The spec's decimal `{i}` only: another tool's `layers.+1.*` or `layers.01.*` is its own.
        for other in ["layers.+1.output", "layers.01.output", "layers.00.dsa.topk", "layers.-0.output"] {
            assert_eq!(HookPoint::parse(other), None, "{other}");
        }
        assert_eq!(HookPoint::parse("layers.10.output"), Some(HookPoint::Layer(10, LayerHook::Output)));
        assert_eq!(HookPoint::parse("layers.2.nonsense"), None);
        // `all` lists them as the pass runs them: the MTP layer (layers.2 of a 2-layer model)
        // after `mtp.eh_proj`, which feeds it, and before its head, each point once.
        let all: Vec<HookPoint> = HookPoint::all(2).collect();
        let at = |p: HookPoint| all.iter().position(|&q| q == p).unwrap();
        let (mtp_first, mtp_last) =
            (HookPoint::Layer(2, LayerHook::ALL[0]), HookPoint::Layer(2, *LayerHook::ALL.last().unwrap()));
        assert!(at(HookPoint::Layer(1, LayerHook::Output)) < at(HookPoint::FinalNorm));
        assert!(at(HookPoint::MtpEhProj) < at(mtp_first) && at(mtp_last) < at(HookPoint::MtpFinalNorm));
        assert_eq!((all.len(), all.last()), (8 + 3 * LayerHook::ALL.len(), Some(&HookPoint::MtpLogits)));
        assert_eq!(all.iter().collect::<std::collections::BTreeSet<_>>().len(), all.len());
    }

    #[test]
    fn selector_patterns_and_layer_ranges() {
        assert!(glob("layers.*.moe.*", "layers.12.moe.topk_ids"));
        assert!(!glob("layers.*.moe.*", "layers.12.mlp.out"));
        assert!(glob("*", "logits") && glob("log*s", "logits") && !glob("log", "logits"));
        let s = Selector::new("layers.*.moe.*,logits", Some(2..=3));
        assert!(s.wants(HookPoint::Layer(2, LayerHook::TopkIds)));
        assert!(!s.wants(HookPoint::Layer(4, LayerHook::TopkIds)));
        assert!(!s.wants(HookPoint::Layer(2, LayerHook::Output)));
        assert!(s.wants(HookPoint::Logits));
        let all = Selector::default();
        assert!(all.wants(HookPoint::Layer(0, LayerHook::DsaMargin)));
        assert!(!all.wants(HookPoint::Layer(0, LayerHook::DsaScores)), "S x S scores only on request");
        assert!(Selector::new("*.dsa.scores", None).wants(HookPoint::Layer(0, LayerHook::DsaScores)));
        // Patterns that would record nothing in a 3-layer model (its MTP layer is layers.3):
        // a typo, a layer past the model, and scores named by a wildcard alone.
        let s = Selector::new("logits,layers.*.moe.topk_id,layers.4.*,layers.*.dsa.score*,mtp.*", None);
        assert_eq!(s.unmatched(3), ["layers.*.moe.topk_id", "layers.4.*", "layers.*.dsa.score*"]);
    }
}
