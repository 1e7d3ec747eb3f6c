//! Prompts run live for an audit: the `--prompts` file read (token ids or text), each prompt
//! run through the model (on the `--device` asked, no further than `--layers`' window, and with
//! `--mtp` through the MTP head too), or with `--stream` every prompt swept through the layers
//! together, a layer at a time; and an observer that counts each layer's routing as the pass
//! reports it, without keeping any activation.

use std::ops::RangeInclusive;
use std::path::Path;

use candle_core::Tensor;

use super::collect::unbiased;
use super::routes::{LayerRoutes, Routes};
use super::{Audit, Run};
use crate::error::{Context, Error, Result};
use crate::hooks::{HookPoint, LayerHook, Observer, SweepObserver};
use crate::model::moe::Routers;
use crate::model::{Model, Tokens};

/// Collects routing counts during forward passes, without keeping any activation but the layer
/// in progress's routing weights and margins (the load by weight, the near-tie counts, and
/// `--routes`' lines).
pub struct AuditObserver<'a> {
    pub audit: &'a mut Audit,
    ids: Option<(usize, Vec<i64>, usize)>,
    /// The model's routers: with the gate logits, the experts each token would choose without
    /// the correction bias.
    routers: Option<&'a Routers>,
    /// The run's number (its index in [`Audit::runs`] and in `--routes`' file) and tokens (each
    /// batch row a prompt), once started.
    run: Option<(usize, &'a Tokens)>,
    /// `--routes`: the file.
    routes: Option<&'a mut Routes>,
    /// The layer in progress's weights and margins: counted by weight and by margin, and
    /// written to `routes`.
    weights: Option<Vec<f32>>,
    margin: Option<Vec<f32>>,
    /// `audit --mtp`: the run's final-norm hidden state, the MTP head's input.
    final_norm: Option<Option<Tensor>>,
}

/// Whether `--layers`' window (None: every layer) counts layer `i`.
pub(super) fn counted(window: Option<&RangeInclusive<usize>>, i: usize) -> bool {
    window.is_none_or(|w| w.contains(&i))
}

impl<'a> AuditObserver<'a> {
    /// `routes`: write each layer's routing there as it is decided. [`AuditObserver::start_run`]
    /// says which run the hook points are of.
    pub fn new(audit: &'a mut Audit, routers: Option<&'a Routers>, routes: Option<&'a mut Routes>) -> Self {
        AuditObserver { audit, ids: None, routers, run: None, routes, weights: None, margin: None, final_norm: None }
    }

    /// The hook points that follow are run number `run`'s, of `tokens`.
    pub fn start_run(&mut self, run: usize, tokens: &'a Tokens) {
        self.run = Some((run, tokens));
    }

    /// Keep the run's final-norm hidden state, for the MTP head.
    fn keeping_final_norm(mut self) -> Self {
        self.final_norm = Some(None);
        self
    }
}

impl Observer for AuditObserver<'_> {
    fn wants(&self, point: HookPoint) -> bool {
        match point {
            HookPoint::Layer(i, _) if !counted(self.audit.window.as_ref(), i) => false,
            HookPoint::FinalNorm => self.final_norm.is_some(),
            HookPoint::Layer(_, LayerHook::TopkIds | LayerHook::BiasChanged) => true,
            HookPoint::Layer(_, LayerHook::RouterMargin) => true,
            HookPoint::Layer(_, LayerHook::TopkWeights) => true,
            HookPoint::Layer(i, LayerHook::RouterLogits) => self.routers.is_some_and(|r| r.layer(i).is_some()),
            _ => false,
        }
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        match point {
            HookPoint::FinalNorm => self.final_norm = Some(Some(value.clone())),
            HookPoint::Layer(i, LayerHook::RouterLogits) => {
                if let Some((rc, bias)) = self.routers.and_then(|r| r.layer(i)) {
                    let logits = value.flatten_all()?.to_vec1::<f32>()?;
                    if let Some(ids) = unbiased(rc, &logits, bias.len()) {
                        self.audit.add_unbiased(i, &ids, rc.top_k);
                    }
                }
            }
            // The forward pass reports a layer's ids, weights and margins, then its bias flags.
            HookPoint::Layer(i, LayerHook::TopkIds) => {
                let k = value.dims().last().copied().unwrap_or(1);
                self.ids = Some((i, value.flatten_all()?.to_vec1::<i64>()?, k));
            }
            HookPoint::Layer(_, h @ (LayerHook::TopkWeights | LayerHook::RouterMargin)) => {
                let v = Some(value.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
                match h {
                    LayerHook::TopkWeights => self.weights = v,
                    _ => self.margin = v,
                }
            }
            HookPoint::Layer(i, LayerHook::BiasChanged) => {
                let flags = value.flatten_all()?.to_vec1::<i64>()?;
                let (weights, margin) = (self.weights.take(), self.margin.take());
                if let Some((layer, ids, k)) = self.ids.take().filter(|(l, _, _)| *l == i) {
                    let (run, tokens) =
                        self.run.ok_or_else(|| Error::Usage(format!("layer {layer}: routing outside a run")))?;
                    (self.audit.add_run(run, layer, &ids, k, tokens.batch, Some(&flags)))
                        .context(|| format!("layer {layer}"))?;
                    if let Some(w) = weights.as_deref().filter(|w| w.len() == ids.len()) {
                        self.audit.add_mass(layer, &ids, w, k);
                    }
                    if let Some(m) = margin.as_deref().filter(|m| m.len() * k == ids.len()) {
                        self.audit.add_margins(layer, m);
                    }
                    if let Some(routes) = &mut self.routes {
                        let l =
                            LayerRoutes { layer, ids: &ids, k, weights: weights.as_deref(), margin: margin.as_deref() };
                        routes.layer(run, tokens.batch, Some(tokens), &l)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// What prompts run live on: the model, the MTP head when asked, and where the prefill runs.
#[derive(Clone, Copy)]
pub(super) struct Live<'a> {
    pub(super) model: &'a Model,
    pub(super) mtp: Option<&'a crate::model::mtp::Mtp>,
    pub(super) target: crate::device::Target,
}

/// Runs every prompt, counting its routing. Ctrl-C (while the caller's `Stopping` lives) stops
/// after the prompt in progress: the audit then covers the prompts run, and says so.
pub(super) fn run_prompts(
    audit: &mut Audit,
    routers: Option<&Routers>,
    live: Live,
    prompts: Vec<(usize, Tokens)>,
    path: &Path,
    mut routes: Option<&mut Routes>,
) -> Result<()> {
    let Live { model: m, mtp, target } = live;
    let total = prompts.len();
    let mut progress = crate::progress::Steps::prompts(total);
    audit.prompts_total = Some(total);
    let window = audit.window.clone();
    crate::device::with_prefill(target, crate::model::Weights::Resident(m), |p| {
        for (n, (line, tokens)) in prompts.into_iter().enumerate() {
            progress.step(n + 1);
            let mut obs = AuditObserver::new(audit, routers, routes.as_deref_mut());
            obs.start_run(obs.audit.runs.len(), &tokens);
            if mtp.is_some() {
                obs = obs.keeping_final_norm();
            }
            let run = match &window {
                Some(w) => p.prefill_through(&tokens, *w.end(), &mut obs),
                None => p.prefill(&tokens, &mut obs).map(|_| ()),
            };
            // The MTP head (where the prefill runs) from the run's final norm, as `run --mtp`
            // runs it.
            let run = run.and_then(|()| match (mtp, obs.final_norm.take().flatten()) {
                (Some(head), Some(h)) => {
                    let h = h.narrow(1, 0, tokens.seq - 1)?; // [B, S-1, hidden]
                    p.mtp(head, &h, &tokens, &mut obs).map(|_| ())
                }
                (Some(_), None) => Err(Error::Usage("--mtp: the run reported no final_norm".into())),
                (None, _) => Ok(()),
            });
            run.map_err(|e| Error::Usage(format!("{} line {line}: {e}", path.display())))?;
            push_run(audit, routes.as_deref_mut(), path, (line, tokens));
            if crate::interrupt::requested() && n + 1 < total {
                audit.stopped = Some(super::Stopped { run: n + 1, of: total, line });
                break;
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// One set of prompts of a sweep: the audit that counts them, the file they came from, its
/// prompts (with their line numbers) and, for the audited prompts, `--routes`' file.
pub(super) struct Side<'a> {
    pub(super) audit: &'a mut Audit,
    pub(super) path: &'a Path,
    pub(super) prompts: Vec<(usize, Tokens)>,
    pub(super) routes: Option<&'a mut Routes>,
}

/// `audit --stream`: every side's prompts (the audited ones, and `--compare-prompts`' others)
/// run together layer by layer, each layer's weights read once for all of them, not once a
/// prompt: a checkpoint too large for memory is read once an audit. The counts are those of
/// [`run_prompts`] (`--routes`' lines come a layer at a time, each layer's runs in order). Ctrl-C
/// (while the caller's `Stopping` lives) stops the sweep after the layer in progress, once a
/// counted layer has run: both audits then cover every prompt up to that layer, and say so.
pub(super) fn sweep_prompts(
    sides: Vec<Side>,
    routers: Option<&Routers>,
    ckpt: &crate::checkpoint::Checkpoint,
    target: crate::device::Target,
) -> Result<()> {
    let n = ckpt.config.num_hidden_layers;
    // Every side's audit has the same window.
    let window = sides.first().and_then(|s| s.audit.window.clone()).unwrap_or(0..=n - 1);
    let (first, last) = (*window.start(), *window.end());
    // The first layer an audit counts: a stop before it (GLM-5's three dense layers) would leave
    // an audit of nothing.
    let counted = window.clone().find(|&i| ckpt.config.mlp_kind(i) == crate::config::MlpKind::Moe).unwrap_or(first);
    crate::model::stream::check_swept(ckpt, &(0..=last))?;
    // Every id checked before the first layer: a bad one is named by its line, not hours in.
    for side in &sides {
        for (line, tokens) in &side.prompts {
            let bad = tokens.check_vocab(ckpt.config.vocab_size);
            bad.map_err(|e| Error::Usage(format!("{} line {line}: {e}", side.path.display())))?;
        }
    }
    let (mut observers, mut sets) = (Vec::new(), Vec::new());
    for side in sides {
        observers.push(AuditObserver::new(side.audit, routers, side.routes));
        sets.push((side.path, side.prompts));
    }
    let mut runs = Vec::new();
    for (side, (obs, (path, prompts))) in observers.iter().zip(&sets).enumerate() {
        let base = obs.audit.runs.len();
        for (q, (line, tokens)) in prompts.iter().enumerate() {
            runs.push(SweptPrompt { side, run: base + q, tokens, path, line: *line });
        }
    }
    let tokens: Vec<&Tokens> = runs.iter().map(|r| r.tokens).collect();
    let mut sweep = Sweep { observers, runs, counted, last, stopped: None };
    crate::device::with_prefill(target, crate::model::Weights::Streamed(ckpt), |p| p.sweep(&tokens, last, &mut sweep))?;
    for (obs, (path, prompts)) in sweep.observers.into_iter().zip(&sets) {
        let AuditObserver { audit, mut routes, .. } = obs;
        audit.prompts_total = Some(prompts.len());
        for (line, tokens) in prompts {
            push_run(audit, routes.as_deref_mut(), path, (*line, tokens.clone()));
        }
        if let Some(layer) = sweep.stopped {
            audit.stopped_after_layer = Some(layer);
            audit.window = Some(first..=layer);
        }
    }
    Ok(())
}

/// Counts the run of `tokens`, line `line` of `path`, as done: its ids kept (`--against` must
/// have run the same prompts), its number taken in `--routes`' file.
fn push_run(audit: &mut Audit, routes: Option<&mut Routes>, path: &Path, (line, tokens): (usize, Tokens)) {
    if let Some(r) = routes {
        r.runs += 1;
    }
    let source = format!("{} line {line}", path.display());
    audit.runs.push(Run { batch: tokens.batch, tokens: Some(tokens), source });
}

/// A prompt of a sweep: its side, its run number there, its tokens and where it came from.
struct SweptPrompt<'a> {
    side: usize,
    run: usize,
    tokens: &'a Tokens,
    path: &'a Path,
    line: usize,
}

/// A sweep's observer: each prompt's hook points go to its side's [`AuditObserver`], as that
/// prompt's run.
struct Sweep<'a> {
    observers: Vec<AuditObserver<'a>>,
    runs: Vec<SweptPrompt<'a>>,
    /// The first counted layer (the window's first MoE layer), and the last to run.
    counted: usize,
    last: usize,
    /// Where a stop ended the sweep: the last layer every prompt ran.
    stopped: Option<usize>,
}

impl SweepObserver for Sweep<'_> {
    fn prompt(&mut self, p: usize) -> &mut dyn Observer {
        let SweptPrompt { side, run, tokens, .. } = self.runs[p];
        let obs = &mut self.observers[side];
        obs.start_run(run, tokens);
        obs
    }
    fn name(&self, p: usize) -> String {
        let SweptPrompt { path, line, .. } = self.runs[p];
        format!("{} line {line}", path.display())
    }
    fn layer_done(&mut self, layer: usize) -> bool {
        // (As a stop before the first prompt stops after it, one before the first counted layer
        // stops after that.)
        let stop = layer >= self.counted && layer < self.last && crate::interrupt::requested();
        if stop {
            self.stopped = Some(layer);
        }
        !stop
    }
}

/// How the lines of a `--prompts` file are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// Token ids where a line's comma-separated items are mostly integers, else text.
    Auto,
    /// Every line is text (`Count: 1, 2, 3` too).
    Text,
}

/// The prompts of a `--prompts` file, with their line numbers: token ids (comma-separated, `;`
/// between batch rows, as `--tokens` takes them), else text for the checkpoint's tokenizer.
/// Blank lines and lines starting with `#` are skipped, and an ids line may end in a `# note`.
/// With [`Lines::Auto`] a line whose comma-separated items are mostly integers is read as ids, so
/// a mistyped id (`1,2,x`) is an error, not text.
pub(super) fn read_prompts(path: &Path, kind: Lines, dir: &Path) -> Result<Vec<(usize, Tokens)>> {
    let bytes = crate::st::read_input(path)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::Usage(format!("{}: is not UTF-8 text", path.display())))?;
    // A byte-order mark (Windows editors write one) is not part of the first prompt.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let lines: Vec<(usize, &str)> =
        text.lines().map(str::trim).enumerate().filter(|(_, l)| !l.is_empty() && !l.starts_with('#')).collect();
    if lines.is_empty() {
        return Err(Error::Usage(format!("{}: no prompts (one per line)", path.display())));
    }
    // Loaded at the first line of text, once (parsing a real tokenizer.json takes a while).
    let mut tokenizer = None;
    lines
        .iter()
        .map(|&(n, line)| {
            // An ids line may end in a `# note`; text keeps its `#` (C#, #tags).
            let ids = line.split_once('#').map_or(line, |(ids, _)| ids).trim();
            let tokens = match kind == Lines::Auto && looks_like_ids(ids) {
                // A line of text with numbers in it reads as ids with a slip: say how to read it as text.
                // (Only where an item is no id: rows of unequal length are ids all the same.)
                true => Tokens::parse(ids).map_err(|e| {
                    let slip = ids.split([',', ';']).any(|x| x.trim().parse::<u32>().is_err());
                    let hint = if slip { " (a line of text? --text reads every line as text)" } else { "" };
                    Error::Usage(format!("{e}{hint}"))
                }),
                false => {
                    if kind == Lines::Auto && spaced_ids(line) {
                        eprintln!(
                            "glimpse: warning: {} line {}: integers separated by spaces are read as text (ids are \
                             comma-separated)",
                            path.display(),
                            n + 1
                        );
                    }
                    let loaded = tokenizer.take().map_or_else(|| crate::tokenizer::Tokenizer::require(dir), Ok);
                    loaded.and_then(|t| tokenizer.insert(t).encode(line))
                }
            };
            Ok((n + 1, tokens.context(|| format!("{} line {}", path.display(), n + 1))?))
        })
        .collect()
}

/// Ids, not text: a single number, or items separated by `,`/`;` of which more than half are
/// integers ("1,2,x" is a slip in ids; "Hello, world" and "In 1990, 2000 people" are text).
fn looks_like_ids(line: &str) -> bool {
    let items: Vec<&str> = line.split([',', ';']).map(str::trim).collect();
    let numbers = items.iter().filter(|i| i.parse::<i64>().is_ok()).count();
    match items.len() {
        1 => numbers == 1,
        n => 2 * numbers > n,
    }
}

/// Integers separated by whitespace only (`1 2 3`): ids written the wrong way, or text of numbers.
fn spaced_ids(line: &str) -> bool {
    let items: Vec<&str> = line.split_whitespace().collect();
    items.len() > 1 && items.iter().all(|i| i.parse::<i64>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::{looks_like_ids, read_prompts, Lines};

    /// An ids line's trailing `# note` is no part of its ids (it was an error naming `3 # a note`).
    #[test]
    fn an_ids_line_may_end_in_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.txt");
        std::fs::write(&path, "# a whole-line comment\n1,2,3 # a note\n4,5;6,7#another\n").unwrap();
        let prompts = read_prompts(&path, Lines::Auto, dir.path()).unwrap();
        let lines: Vec<(usize, Vec<u32>, usize)> = prompts.iter().map(|(n, t)| (*n, t.ids.clone(), t.batch)).collect();
        assert_eq!(lines, vec![(2, vec![1, 2, 3], 1), (3, vec![4, 5, 6, 7], 2)]);
    }

    #[test]
    fn lines_of_mostly_integers_are_ids() {
        for ids in ["17", "1,2,3", "1, 2, 3", "1,2;3,4", "1,2,x", "1,-2,3", "1,2,3 # a note"] {
            assert!(looks_like_ids(ids), "{ids}");
        }
        for text in ["Hello, world", "In 1990, 2000 people", "1 2 3", "x", "one, 2, three"] {
            assert!(!looks_like_ids(text), "{text}");
        }
    }
}
