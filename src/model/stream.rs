//! Running the model over a window of layers, with weights either resident (loaded once) or
//! streamed: each layer is loaded from the memory-mapped shards just before it runs, and both its
//! f32 copy and its file pages are released right after, so peak memory is about one layer plus
//! activations whatever the depth. A window may start mid-model from a dump's hidden state
//! (`layers.{A-1}.output`), so one slice of a model too large to run whole can still be checked.

use std::ops::RangeInclusive;

use candle_core::{Device, Tensor};

use super::indexer::Selection;
use super::layer::DecoderLayer;
use super::nn::{Linear, RmsNorm, Weight};
use super::rope::{RopeTables, RotaryEmbedding};
use super::{Model, Tokens};
use crate::checkpoint::{Checkpoint, Loader};
use crate::config::{Config, IndexerKind};
use crate::dump::Dump;
use crate::error::{Error, Result};
use crate::hooks::{emit, in_prompt, HookPoint, LayerHook, Observer, SweepObserver};

/// Where the weights come from.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    Resident(&'a Model),
    Streamed(&'a Checkpoint),
}

impl Weights<'_> {
    pub fn config(&self) -> &Config {
        match self {
            Weights::Resident(m) => &m.config,
            Weights::Streamed(c) => &c.config,
        }
    }
}

/// The hidden state (and DSA selection) a window starts from, instead of the embeddings.
pub struct Start {
    pub hidden: Tensor, // [B, S, hidden]
    /// What a shared indexer layer at the window's start reuses.
    pub selection: Option<Selection>,
}

impl Start {
    /// From a dump: `layers.{first-1}.output` (`embeddings` for layer 0) and that layer's
    /// `dsa.topk`, which a shared first layer reuses, for a run whose hidden state is `want`
    /// ([B, S, hidden]).
    pub fn from_dump(d: &Dump, first: usize, want: [usize; 3]) -> Result<Start> {
        let (hidden_name, prev) = match first {
            0 => ("embeddings".to_string(), None),
            a => (HookPoint::Layer(a - 1, LayerHook::Output).name(), Some(a - 1)),
        };
        if !d.contains(&hidden_name) {
            return Err(Error::dump(&d.path, format!("has no `{hidden_name}` to start layer {first} from")));
        }
        let hidden = d.hidden(&hidden_name, want)?;
        let selection = match prev.map(|p| HookPoint::Layer(p, LayerHook::DsaTopk).name()) {
            Some(n) if d.contains(&n) => Some(d.selection(&n, want[0], want[1])?),
            _ => None,
        };
        Ok(Start { hidden, selection })
    }
}

/// Runs layers `window` (all of them when None); returns the logits of `rows` when the window
/// reaches the last layer ([`head_normed`]). `start` replaces the embeddings when the window
/// starts past layer 0.
pub fn run(
    w: Weights,
    tokens: &Tokens,
    (window, start): (Option<RangeInclusive<usize>>, Option<Start>),
    rows: LogitRows,
    obs: &mut dyn Observer,
) -> Result<Option<Tensor>> {
    let cfg = w.config();
    let n = cfg.num_hidden_layers;
    let window = window.unwrap_or(0..=n - 1);
    check_window(cfg, &window)?;
    let (first, last) = (*window.start(), *window.end());
    let rope = RotaryEmbedding::new(cfg).tables(&(0..tokens.seq).collect::<Vec<_>>());
    let (h, mut sel) = match start {
        Some(s) => {
            let want = [tokens.batch, tokens.seq, cfg.hidden_size];
            if s.hidden.dims() != want {
                return Err(Error::Usage(format!(
                    "the starting hidden state is {:?}, expected {want:?}",
                    s.hidden.dims()
                )));
            }
            if let Some(sel) = s.selection.as_ref().filter(|sel| (sel.batch, sel.seq) != (tokens.batch, tokens.seq)) {
                return Err(Error::Usage(format!(
                    "the starting DSA selection is for batch {} x seq {}, the run is {} x {}",
                    sel.batch, sel.seq, tokens.batch, tokens.seq
                )));
            }
            (s.hidden, s.selection)
        }
        None if first == 0 => (embed(w, tokens, obs)?, None),
        None => return Err(Error::Usage(format!("starting at layer {first} needs a hidden state: give --from-dump"))),
    };
    if cfg.indexer_kind(first) == IndexerKind::Shared && sel.is_none() {
        return Err(Error::Usage(format!(
            "layer {first} shares the previous layer's DSA selection, which the dump lacks"
        )));
    }
    let mut progress = crate::progress::Steps::layers(first, last);
    let mut h = layers(w, &rope, first..=last, h, &mut sel, obs, &mut progress)?;
    if last + 1 < n {
        return Ok(None);
    }
    if let Some(given) = obs.isolated_input(n)? {
        h = given;
    }
    Ok(Some(head_normed(w, &h, rows, obs)?.1))
}

/// A window must lie within the model's layers.
pub fn check_window(cfg: &Config, window: &RangeInclusive<usize>) -> Result<()> {
    let n = cfg.num_hidden_layers;
    if window.start() > window.end() || *window.end() >= n {
        return Err(Error::Usage(format!(
            "--layers {}..{} is outside the model's layers 0..{}",
            window.start(),
            window.end(),
            n - 1
        )));
    }
    Ok(())
}

/// What a streamed run of `window` will read, checked before its first layer: it reads each
/// layer's weights only as it reaches it, so a shard still downloading showed after minutes of
/// layers, and a config whose hidden size the embedding does not have read as a tensor op's
/// shape error. The embedding (from layer 0) and the head (to the last layer) there, in their
/// shapes, and no tensor of the window, the embedding or the head in a shard the index names but
/// the folder lacks; the layers' own shapes are checked as each loads (`Loader`).
pub fn check_streamed(ckpt: &Checkpoint, window: &RangeInclusive<usize>) -> Result<()> {
    check_reads(ckpt, window, *window.end() + 1 >= ckpt.config.num_hidden_layers)
}

/// [`check_streamed`] for a sweep (`audit --stream`), which runs the window's layers and never
/// the head: a checkpoint whose head is still downloading can be audited.
pub fn check_swept(ckpt: &Checkpoint, window: &RangeInclusive<usize>) -> Result<()> {
    check_reads(ckpt, window, false)
}

/// [`check_streamed`]'s checks, of the head's tensors where `last`: the run reaches the head.
fn check_reads(ckpt: &Checkpoint, window: &RangeInclusive<usize>, last: bool) -> Result<()> {
    let cfg = &ckpt.config;
    let first = *window.start() == 0;
    let mut l = Loader::new(ckpt);
    let mut want = |name: &str, shape: Vec<usize>| match ckpt.shape(name) {
        Some(s) if s != shape => l.refuse(format!("`{name}` has shape {s:?}, expected {shape:?} (config.json)")),
        // (One in a shard the folder lacks is named below.)
        None if !ckpt.is_absent(name) => l.refuse(format!("missing `{name}` (expected shape {shape:?})")),
        _ => {}
    };
    if first {
        want("model.embed_tokens.weight", vec![cfg.vocab_size, cfg.hidden_size]);
    }
    if last {
        want(ckpt.head_name(), vec![cfg.vocab_size, cfg.hidden_size]);
        want("model.norm.weight", vec![cfg.hidden_size]);
    }
    let needed = |name: &str| match crate::layout::layer_of(name) {
        Some(i) => window.contains(&i),
        None if name.starts_with("model.embed_tokens.") => first || (last && ckpt.tied_head()),
        None => last,
    };
    for name in ckpt.absent().filter(|n| needed(n)) {
        l.refuse(format!("missing `{name}` (its shard is not in the folder)"));
    }
    l.finish(())
}

/// Runs `range` of layers on the hidden state `h` ([B, S, hidden]), carrying the DSA selection
/// between them; loads and releases each layer when streaming. `progress` is the pass's (a pass
/// may run its layers one call at a time, as `verify --isolate` does).
pub fn layers(
    w: Weights,
    rope: &RopeTables,
    range: RangeInclusive<usize>,
    mut h: Tensor,
    sel: &mut Option<Selection>,
    obs: &mut dyn Observer,
    progress: &mut crate::progress::Steps,
) -> Result<Tensor> {
    for i in range {
        progress.step(i);
        h = with_layer(w, i, |layer| step(layer, i, &h, rope, sel, obs))?;
    }
    Ok(h)
}

/// Runs `prompts` through their embeddings and layers 0..=`last` layer by layer
/// ([`crate::device::Prefill::sweep`]): a streamed layer is loaded once for every prompt, and
/// each prompt's hidden state, DSA selection and RoPE tables are kept between layers. Returns the
/// last layer run (before `last` where `obs` stopped the sweep).
pub fn sweep(w: Weights, prompts: &[&Tokens], last: usize, obs: &mut dyn SweepObserver) -> Result<usize> {
    let cfg = w.config();
    check_window(cfg, &(0..=last))?;
    let mut held = Vec::with_capacity(prompts.len());
    for (p, tokens) in prompts.iter().enumerate() {
        let rope = RotaryEmbedding::new(cfg).tables(&(0..tokens.seq).collect::<Vec<_>>());
        let h = embed(w, tokens, obs.prompt(p));
        held.push((in_prompt(obs, p, h)?, None, rope)); // [B, S, hidden]
    }
    let mut progress = crate::progress::Steps::sweep(last, prompts.len());
    for i in 0..=last {
        with_layer(w, i, |layer| {
            for (p, (h, sel, rope)) in held.iter_mut().enumerate() {
                progress.step(i * prompts.len() + p);
                let out = step(layer, i, h, rope, sel, obs.prompt(p));
                *h = in_prompt(obs, p, out)?;
            }
            Ok(())
        })?;
        if !obs.layer_done(i) {
            return Ok(i);
        }
    }
    Ok(last)
}

/// Runs `f` on decoder layer `i`: the resident model's, or read from the checkpoint for `f`
/// alone, its pages released after.
fn with_layer<R>(w: Weights, i: usize, f: impl FnOnce(&DecoderLayer) -> Result<R>) -> Result<R> {
    match w {
        Weights::Resident(m) => {
            f(m.layers.get(i).ok_or_else(|| Error::Usage(format!("the model has no layer {i}")))?)
        }
        Weights::Streamed(ckpt) => {
            let out = f(&load_layer(ckpt, i)?);
            ckpt.release(&format!("model.layers.{i}."));
            out
        }
    }
}

/// Layer `i` on the hidden state `h` (or the one the observer isolates it with), reported done.
fn step(
    layer: &DecoderLayer,
    i: usize,
    h: &Tensor,
    rope: &RopeTables,
    sel: &mut Option<Selection>,
    obs: &mut dyn Observer,
) -> Result<Tensor> {
    let given = obs.isolated_input(i)?;
    let out = layer.forward(given.as_ref().unwrap_or(h), rope, sel, obs)?;
    obs.layer_done(i, &out, sel.as_ref())?;
    Ok(out)
}

/// Layer `i` of a streamed pass, read from the checkpoint (its shapes checked; bf16 and FP8
/// weights stay where they are mapped). The caller releases its pages once done with it
/// (`Checkpoint::release` of `model.layers.{i}.`).
///
/// Not done: asking the kernel to read the next layer in ahead (`MADV_WILLNEED` on a thread of
/// its own) while this one runs. From an evicted page cache, 128 tokens through the 2-layer
/// bench checkpoint took 3.34-3.67 s with it against 3.02-3.36 s without (next layer only:
/// 3.36-3.95 s against 3.32-3.65 s), on this project's VM (2026-12-01).
pub fn load_layer(ckpt: &Checkpoint, i: usize) -> Result<DecoderLayer> {
    let mut l = Loader::new(ckpt).reading_in_place();
    let layer = DecoderLayer::load(&mut l, &ckpt.config, i);
    l.finish(layer)
}

/// Checks the prompt's ids against the vocabulary and reports them (`input_ids`): the start of
/// every forward pass, the device's too.
pub fn input_ids(tokens: &Tokens, vocab: usize, obs: &mut dyn Observer) -> Result<()> {
    tokens.check_vocab(vocab)?;
    emit(obs, HookPoint::InputIds, || {
        let ids: Vec<i64> = tokens.ids.iter().map(|&t| t as i64).collect();
        Ok(Tensor::from_vec(ids, (tokens.batch, tokens.seq), &Device::Cpu)?)
    })
}

/// ids -> [B, S, hidden], reporting `input_ids` and `embeddings`.
pub fn embed(w: Weights, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
    let cfg = w.config();
    input_ids(tokens, cfg.vocab_size, obs)?;
    let rows = match w {
        Weights::Resident(m) => {
            let ids = Tensor::from_vec(tokens.ids.clone(), tokens.ids.len(), &Device::Cpu)?;
            m.embed_tokens.index_select(&ids, 0)?
        }
        // Only the rows of the prompt's tokens: the table itself may be gigabytes.
        Weights::Streamed(ckpt) => {
            let name = "model.embed_tokens.weight";
            let rows = tokens.ids.iter().map(|&t| ckpt.rows(name, t as usize, 1)).collect::<Result<Vec<_>>>()?;
            ckpt.release(name);
            Tensor::cat(&rows, 0)?
        }
    };
    let h = rows.reshape((tokens.batch, tokens.seq, cfg.hidden_size))?; // [B, S, hidden]
    emit(obs, HookPoint::Embeddings, || Ok(h.clone()))?;
    Ok(h)
}

/// Vocabulary rows of lm_head converted at a time when streaming.
pub(crate) const HEAD_CHUNK: usize = 8192;

/// Which positions' logits a prefill computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Every position's, as a model's forward returns them (and transformers' forward does).
    All,
    /// Each sequence's last position's only: what generating the next token needs (transformers'
    /// `generate` prefills with `logits_to_keep=1`); the lm_head then costs B rows, not B * S.
    /// (Where an observer records the logits, the CPU head still computes every position's.)
    Last,
}

/// [B, S, hidden] -> logits [B, S, vocab], reporting `final_norm` and `logits`.
pub fn head(w: Weights, h: &Tensor, obs: &mut dyn Observer) -> Result<Tensor> {
    Ok(head_normed(w, h, LogitRows::All, obs)?.1)
}

/// `head`, also returning the final-norm hidden state [B, S, hidden] (what the MTP head reads);
/// with [`LogitRows::Last`] and no observer that wants every position's logits
/// ([`Observer::wants_every_position`]), the logits are [B, 1, vocab], reported to none.
pub fn head_normed(w: Weights, h: &Tensor, rows: LogitRows, obs: &mut dyn Observer) -> Result<(Tensor, Tensor)> {
    let cfg = w.config();
    let (b, s, hidden) = h.dims3()?;
    let x = match w {
        Weights::Resident(m) => m.norm.forward(h)?,
        Weights::Streamed(ckpt) => {
            let mut l = Loader::new(ckpt);
            let norm = RmsNorm::load(&mut l, "model.norm", hidden, cfg.rms_norm_eps);
            l.finish(norm)?.forward(h)?
        }
    }; // [B, S, hidden]
    emit(obs, HookPoint::FinalNorm, || Ok(x.clone()))?;
    let s = match rows {
        LogitRows::Last if !obs.wants_every_position(HookPoint::Logits) => 1,
        _ => s,
    };
    let whole = s == h.dim(1)?;
    let x2 = x.narrow(1, x.dim(1)? - s, s)?.contiguous()?.reshape((b * s, hidden))?;
    let logits = match w {
        Weights::Resident(m) => m.lm_head.forward(&x2)?,
        Weights::Streamed(ckpt) => {
            let name = ckpt.head_name();
            let want = vec![cfg.vocab_size, hidden];
            if ckpt.shape(name) != Some(want.clone()) {
                return Err(Error::Weights(format!("`{name}`: expected shape {want:?}, got {:?}", ckpt.shape(name))));
            }
            // Each band as the resident model holds lm_head (`Weight::head`): the kernels' outputs
            // do not depend on the banding, so the logits are the same bits.
            let bf16 = ckpt.bf16_weight(name);
            let mut parts = Vec::new();
            for start in (0..cfg.vocab_size).step_by(HEAD_CHUNK) {
                let count = HEAD_CHUNK.min(cfg.vocab_size - start);
                let band = bf16.as_ref().and_then(|w| w.rows(start, count));
                let weight = Weight::head(band, ckpt.tied_head(), || ckpt.rows(name, start, count))?; // [chunk, hidden]
                parts.push(Linear { weight, bias: None }.forward(&x2)?);
            }
            ckpt.release(name);
            Tensor::cat(&parts, 1)?
        }
    }; // [B*S, vocab]
    let logits = logits.reshape((b, s, cfg.vocab_size))?;
    // (The last position's alone are not the hook point's tensor: the caller has them.)
    if whole {
        emit(obs, HookPoint::Logits, || Ok(logits.clone()))?;
    }
    Ok((x, logits))
}
