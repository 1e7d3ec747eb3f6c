//! The prefill on a device: weights uploaded from a loaded [`Model`] as the checkpoint stores them
//! (`device::weights`: f32, bf16 or block-FP8, decoded for each product), the embedding table as
//! f32 so the prompt's rows are gathered on the device, then every layer through [`Ops`] in the
//! order the CPU model computes it (`model::mla`, `model::indexer`, `model::moe`). Or streamed
//! ([`DeviceModel::streamed`], `--stream`): each layer read from the checkpoint and uploaded as
//! the run reaches it, then freed, so a model larger than the device's memory runs on it. Hook
//! points are downloaded only when the observer wants them (a run that records nothing copies
//! back the logits, and per MoE layer how many (token, choice) pairs each expert got, which sizes
//! its GEMM).
//!
//! Isolation (`verify --isolate`: each layer fed the reference's hidden state) and replayed
//! decisions (`verify --force-routing --force-selection`) are taken from the observer as
//! the CPU model takes them: the replayed DSA selection and expert ids are uploaded in place of
//! our own (own scores and margins still reported, the margins of the decisions our own scores
//! make; a replayed route's weights come from our router scores).
//!
//! The MTP head runs here too (`mtp`). Not here yet: decode and `attention_bias`.

use candle_core::{Device, Tensor};

use super::profile::Profile;
use super::weights::{
    upload_layer, upload_linear, upload_norm, upload_values, DAttention, DFfn, DIndexer, DLayer, DLinear, DMlp,
};
use super::Ops;
use crate::checkpoint::{Checkpoint, Loader};
use crate::config::{Config, IndexerKind};
use crate::error::{Context, Error, Result};
use crate::hooks::{in_prompt, HookPoint, LayerHook, Observer, SweepObserver};
use crate::model::moe::RouterConfig;
use crate::model::nn::{Linear, RmsNorm};
use crate::model::rope::RotaryEmbedding;
use crate::model::stream::{self, Weights};
use crate::model::{Model, Tokens};

mod mtp;

/// The profile's sections of the routed experts' GEMMs (the benchmark's "expert GEMMs").
pub const EXPERT_GEMMS: [&str; 2] = ["expert GEMMs: gate_up", "expert GEMMs: down"];

/// The profile's section of an indexer layer that keeps every causal key without scoring them (a
/// prompt no longer than `index_topk`): work transformers' forward does, which a benchmark
/// against it says.
pub const INDEXER_NOT_SCORED: &str = "indexer: every causal key kept, not scored";

/// RoPE's cos and sin tables [seq, half] on the device.
struct Rope<O: Ops> {
    seq: usize,
    cos: O::F,
    sin: O::F,
    half: usize,
}

/// A DSA selection waiting on the host between a sweep's layers: idx [T, k], and k.
type HostSelection = (Vec<i32>, usize);

/// The start of a profiled section: when, and the FLOPs counted by then.
struct Mark {
    at: std::time::Instant,
    flops: u64,
}

pub use crate::model::stream::LogitRows;

pub struct DeviceModel<'m, O: Ops> {
    ops: &'m O,
    config: &'m Config,
    weights: DWeights<'m, O>,
    /// Matrix-product FLOPs (2 m n k each) since the model was built.
    flops: std::cell::Cell<u64>,
    /// The RoPE tables of the longest prefill so far, on the device.
    rope: std::cell::RefCell<Option<Rope<O>>>,
    /// When profiling: each section's time between device synchronisations (which cost time of
    /// their own, so a profiled prefill is not a timed one).
    profile: std::cell::RefCell<Option<Profile>>,
    /// The MTP head's weights once it has run ([`DeviceModel::mtp`]), with the address of the
    /// host's head they were uploaded from.
    mtp: std::cell::RefCell<Option<(usize, mtp::DMtp<O>)>>,
}

/// The final norm and lm_head on the device.
struct DHead<O: Ops> {
    norm: (O::F, f32),
    lm_head: DLinear<O>,
}

impl<O: Ops> DHead<O> {
    fn upload(ops: &O, norm: &RmsNorm, lm_head: &Linear) -> Result<Self> {
        Ok(DHead { norm: upload_norm(ops, norm)?, lm_head: upload_linear(ops, lm_head)? })
    }
}

/// Where the model's weights are.
enum DWeights<'m, O: Ops> {
    /// On the device, uploaded once: every layer, the head, and `embed_tokens` [vocab, hidden]
    /// in f32 (exact in both precisions: a lookup, not a product), from which the prompt's rows
    /// are gathered there.
    Resident { layers: Vec<DLayer<O>>, head: DHead<O>, embed: O::F },
    /// In the checkpoint (`--stream`): each layer, and the head after the last, is read and
    /// uploaded just before it runs and freed after it, so the device holds one layer's weights
    /// or the head's at a time, and the prompt's embedding rows are read on the host. How a
    /// checkpoint larger than the GPU's memory (GLM-5's 744B parameters, on one card) runs on it.
    /// A sweep (`audit --stream`) never reaches the head, so never uploads it (1.9 GB at
    /// GLM-5's vocabulary).
    Streamed(&'m Checkpoint),
}

impl<'m, O: Ops> DeviceModel<'m, O> {
    /// Uploads every weight of `model` the main forward pass uses.
    pub fn new(ops: &'m O, model: &'m Model) -> Result<Self> {
        let layers = (model.layers.iter().enumerate())
            .map(|(i, layer)| upload_layer(ops, layer).context(|| format!("model.layers.{i}: upload")))
            .collect::<Result<_>>()?;
        let head =
            DHead::upload(ops, &model.norm, &model.lm_head).context(|| "the final norm and lm_head: upload".into())?;
        let embed = upload_values(ops, &model.embed_tokens).context(|| "embed_tokens: upload".into())?;
        Ok(Self::with(ops, &model.config, DWeights::Resident { layers, head, embed }))
    }

    /// A model that uploads each decoder layer, and then the final norm and lm_head, from `ckpt`
    /// when the run reaches it ([`DWeights::Streamed`]). The weights are read as a run reaches
    /// them: [`crate::model::stream::check_streamed`] checks the checkpoint holds them first.
    pub fn streamed(ops: &'m O, ckpt: &'m Checkpoint) -> Self {
        Self::with(ops, &ckpt.config, DWeights::Streamed(ckpt))
    }

    fn with(ops: &'m O, config: &'m Config, weights: DWeights<'m, O>) -> Self {
        DeviceModel {
            ops,
            config,
            weights,
            flops: std::cell::Cell::new(0),
            rope: std::cell::RefCell::new(None),
            profile: std::cell::RefCell::new(None),
            mtp: std::cell::RefCell::new(None),
        }
    }

    /// Decoder layer `i` of a streamed model, read from `ckpt` and uploaded now (its file pages
    /// released once uploaded).
    fn upload_streamed(&self, ckpt: &Checkpoint, i: usize) -> Result<DLayer<O>> {
        let layer = stream::load_layer(ckpt, i)?;
        let uploaded = upload_layer(self.ops, &layer).context(|| format!("model.layers.{i}: upload"))?;
        drop(layer);
        ckpt.release(&format!("model.layers.{i}."));
        Ok(uploaded)
    }

    /// The final norm and lm_head of a streamed model, read from `ckpt` and uploaded now (the
    /// head's file pages released once uploaded).
    fn upload_streamed_head(&self, ckpt: &Checkpoint) -> Result<DHead<O>> {
        let mut l = Loader::new(ckpt);
        let head = Model::load_head(&mut l, None)?;
        let (norm, lm_head) = l.finish(head)?;
        let head = DHead::upload(self.ops, &norm, &lm_head).context(|| "the final norm and lm_head: upload".into())?;
        drop(lm_head);
        ckpt.release(ckpt.head_name());
        Ok(head)
    }

    /// RoPE tables of at least `seq` positions on the device, kept for later prefills no longer
    /// (the host's sines and cosines of 2048 positions cost most of a millisecond; a position's
    /// row does not depend on the positions after it, so longer tables serve a shorter prompt, as
    /// the prompts of a sweep take turns).
    fn rope_tables(&self, seq: usize) -> Result<std::cell::Ref<'_, Rope<O>>> {
        if self.rope.borrow().as_ref().is_none_or(|r| r.seq < seq) {
            let tables = RotaryEmbedding::new(self.config).tables(&(0..seq).collect::<Vec<_>>());
            let (cos, sin) = (self.ops.upload(&tables.cos)?, self.ops.upload(&tables.sin)?);
            *self.rope.borrow_mut() = Some(Rope { seq, cos, sin, half: tables.half });
        }
        std::cell::Ref::filter_map(self.rope.borrow(), Option::as_ref)
            .map_err(|_| Error::Device("the RoPE tables are missing".into()))
    }

    /// RMSNorm with the loaded weight and eps.
    fn norm(&self, x: &O::F, (w, eps): &(O::F, f32), rows: usize, cols: usize) -> Result<O::F> {
        self.ops.rms_norm(x, w, rows, cols, *eps)
    }

    fn mm(&self, x: &O::F, l: &DLinear<O>, rows: usize, alpha: f32) -> Result<O::F> {
        self.count([rows, l.out, l.inp]);
        self.ops.matmul_nt(x, &l.w, [rows, l.out, l.inp], alpha)
    }

    fn count(&self, [m, n, k]: [usize; 3]) {
        self.flops.set(self.flops.get() + 2 * (m * n * k) as u64);
    }

    /// The matrix-product FLOPs run so far (a benchmark's work count).
    pub fn matmul_flops(&self) -> u64 {
        self.flops.get()
    }

    /// Starts (or stops) timing the prefill's sections; the totals restart from zero.
    pub fn set_profiling(&self, on: bool) {
        *self.profile.borrow_mut() = on.then(Profile::default);
    }

    /// The sections timed since profiling started.
    pub fn profile(&self) -> Option<Profile> {
        self.profile.borrow().clone()
    }

    /// When profiling: waits for the work queued so far and marks the start of a section.
    fn mark(&self) -> Result<Option<Mark>> {
        if self.profile.borrow().is_none() {
            return Ok(None);
        }
        self.ops.synchronize()?;
        Ok(Some(Mark { at: std::time::Instant::now(), flops: self.flops.get() }))
    }

    /// Ends the section `mark` started: its time once its work is done, the matrix products `mm`
    /// counted since, and `extra` FLOPs (products `mm` does not count).
    fn done(&self, mark: Option<Mark>, name: &'static str, extra: u64) -> Result<()> {
        let Some(mark) = mark else { return Ok(()) };
        self.ops.synchronize()?;
        let secs = mark.at.elapsed().as_secs_f64();
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            p.add(name, secs, self.flops.get() - mark.flops + extra);
        }
        Ok(())
    }

    /// A hidden state handed in by the observer (isolation), checked to hold `n` values.
    fn feed(&self, given: &Tensor, n: usize) -> Result<O::F> {
        if given.elem_count() != n {
            let have = given.elem_count();
            return Err(Error::Usage(format!("an isolated layer input of {have} values, the run needs {n}")));
        }
        upload_values(self.ops, given)
    }

    /// Reports an f32 buffer as `shape` if the observer wants `point`.
    fn report(&self, obs: &mut dyn Observer, point: HookPoint, buf: &O::F, shape: &[usize]) -> Result<()> {
        if obs.wants(point) {
            let t = Tensor::from_vec(self.ops.download(buf)?, shape, &Device::Cpu)?;
            obs.observe(point, &t)?;
        }
        Ok(())
    }

    fn report_ids(&self, obs: &mut dyn Observer, point: HookPoint, buf: &O::I, shape: &[usize]) -> Result<()> {
        if obs.wants(point) {
            let v: Vec<i64> = self.ops.download_i32(buf)?.into_iter().map(i64::from).collect();
            obs.observe(point, &Tensor::from_vec(v, shape, &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// The whole prefill: ids -> logits [B, S, vocab], copied to the host (and reported).
    pub fn forward(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        let logits = self.forward_on_device(tokens, LogitRows::All, obs)?;
        let shape = (tokens.batch, tokens.seq, self.config.vocab_size);
        let logits = Tensor::from_vec(self.ops.download(&logits)?, shape, &Device::Cpu)?;
        if obs.wants(HookPoint::Logits) {
            obs.observe(HookPoint::Logits, &logits)?;
        }
        Ok(logits)
    }

    /// The whole prefill's hook points but the logits, and the last position's logits
    /// [B, 1, vocab], copied to the host.
    pub fn forward_last(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        let logits = self.forward_on_device(tokens, LogitRows::Last, obs)?; // [B, vocab]
        let shape = (tokens.batch, 1, self.config.vocab_size);
        Ok(Tensor::from_vec(self.ops.download(&logits)?, shape, &Device::Cpu)?)
    }

    /// The prefill up to the logits of `rows` ([B * S, vocab] or [B, vocab]), left on the device
    /// (the benchmark's unit of work: at GLM-5's vocabulary, 2048 tokens of f32 logits are 1.3 GB
    /// to copy back); every hook point but `logits` is reported.
    pub fn forward_on_device(&self, tokens: &Tokens, rows: LogitRows, obs: &mut dyn Observer) -> Result<O::F> {
        let (b, s, hd) = (tokens.batch, tokens.seq, self.config.hidden_size);
        let t = b * s;
        let n = self.config.num_hidden_layers;
        let h = self.layers_through(tokens, n, obs)?;
        let h = self.isolated(n, h, t, obs)?;
        self.with_head(|head| {
            let mark = self.mark()?;
            let x = self.norm(&h, &head.norm, t, hd)?;
            self.report(obs, HookPoint::FinalNorm, &x, &[b, s, hd])?;
            let logits = match rows {
                LogitRows::All => self.mm(&x, &head.lm_head, t, 1.0)?, // [T, V]
                LogitRows::Last => {
                    let last: Vec<i32> = (1..=b).map(|r| (r * s - 1) as i32).collect(); // < T
                    let x = self.ops.gather_rows(&x, &self.ops.upload_i32(&last)?, b, hd)?; // [B, H]
                    self.mm(&x, &head.lm_head, b, 1.0)? // [B, V]
                }
            };
            self.done(mark, "final norm, lm_head", 0)?;
            Ok(logits)
        })
    }

    /// The prefill's hook points up to layer `last`'s: past the last layer, the whole prefill's.
    pub fn forward_through(&self, tokens: &Tokens, last: usize, obs: &mut dyn Observer) -> Result<()> {
        match last >= self.config.num_hidden_layers.saturating_sub(1) {
            true if obs.wants_every_position(HookPoint::Logits) => self.forward(tokens, obs).map(|_| ()),
            true => self.forward_last(tokens, obs).map(|_| ()),
            false => self.layers_through(tokens, last + 1, obs).map(|_| ()),
        }
    }

    /// The embeddings and the first `count` layers (each reporting its hook points): the hidden
    /// state after them [T, H]. `audit --layers` needs none past its window.
    pub fn layers_through(&self, tokens: &Tokens, count: usize, obs: &mut dyn Observer) -> Result<O::F> {
        let mut h = self.embed(tokens, obs)?;
        let mut selection = None;
        let count = count.min(self.config.num_hidden_layers);
        let mut progress = crate::progress::Steps::layers(0, count.saturating_sub(1));
        let bs = (tokens.batch, tokens.seq);
        for i in 0..count {
            progress.step(i);
            h = self.isolated(i, h, tokens.ids.len(), obs)?;
            h = self.with_layer(i, |layer| self.layer(i, layer, h, bs, &mut selection, obs))?;
        }
        Ok(h)
    }

    /// [`super::Prefill::sweep`]: `prompts` layer by layer, each layer made ready once for all of
    /// them. Between layers each prompt's hidden state waits on the host, and its DSA selection
    /// too where the next layer shares it, so the device holds one prompt's at a time, as a
    /// streamed run of the longest prompt does (the memory check's; a copy each way a prompt and
    /// layer costs little beside a layer's upload).
    pub fn sweep(&self, prompts: &[&Tokens], last: usize, obs: &mut dyn SweepObserver) -> Result<usize> {
        let hd = self.config.hidden_size;
        stream::check_window(self.config, &(0..=last))?;
        let shared = |i: usize| i <= last && self.config.indexer_kind(i) == IndexerKind::Shared;
        let mut held: Vec<(Vec<f32>, Option<HostSelection>)> = Vec::with_capacity(prompts.len()); // [T, H] each
        for (p, tokens) in prompts.iter().enumerate() {
            let h = self.embed(tokens, obs.prompt(p)).and_then(|h| self.ops.download(&h));
            let mut h = in_prompt(obs, p, h)?;
            h.truncate(tokens.ids.len() * hd);
            held.push((h, None));
        }
        let mut progress = crate::progress::Steps::sweep(last, prompts.len());
        for i in 0..=last {
            self.with_layer(i, |layer| {
                for (p, (state, tokens)) in held.iter_mut().zip(prompts).enumerate() {
                    progress.step(i * prompts.len() + p);
                    let done = self.sweep_step(i, layer, state, tokens, [shared(i), shared(i + 1)], obs.prompt(p));
                    in_prompt(obs, p, done)?;
                }
                Ok(())
            })?;
            if !obs.layer_done(i) {
                return Ok(i);
            }
        }
        Ok(last)
    }

    /// One prompt of a sweep through layer `i`: its held hidden state and DSA selection uploaded
    /// (the selection where the layer `shares` it), the layer run, and both downloaded again (the
    /// selection where `next_shares`: the next layer reuses it).
    fn sweep_step(
        &self,
        i: usize,
        layer: &DLayer<O>,
        (h, sel): &mut (Vec<f32>, Option<HostSelection>),
        tokens: &Tokens,
        [shares, next_shares]: [bool; 2],
        obs: &mut dyn Observer,
    ) -> Result<()> {
        let t = tokens.ids.len();
        let mut selection = match sel.take().filter(|_| shares) {
            Some((idx, k)) => Some((self.ops.upload_i32(&idx)?, k)),
            None => None,
        };
        let h_in = self.isolated(i, self.ops.upload(h)?, t, obs)?;
        let out = self.layer(i, layer, h_in, (tokens.batch, tokens.seq), &mut selection, obs)?;
        *h = self.ops.download(&out)?;
        h.truncate(t * self.config.hidden_size);
        if let Some((idx, k)) = selection.filter(|_| next_shares) {
            let mut idx = self.ops.download_i32(&idx)?;
            idx.truncate(t * k);
            *sel = Some((idx, k));
        }
        Ok(())
    }

    /// Runs `f` on decoder layer `i`: resident, or streamed (read and uploaded for `f` alone,
    /// freed after it).
    fn with_layer<R>(&self, i: usize, f: impl FnOnce(&DLayer<O>) -> Result<R>) -> Result<R> {
        match &self.weights {
            DWeights::Resident { layers, .. } => {
                f(layers.get(i).ok_or_else(|| Error::Device(format!("no layer {i}")))?)
            }
            DWeights::Streamed(ckpt) => f(&self.upload_streamed(ckpt, i)?),
        }
    }

    /// Runs `f` on the final norm and lm_head: resident, or streamed (read and uploaded for `f`
    /// alone, freed after it, as a layer is).
    fn with_head<R>(&self, f: impl FnOnce(&DHead<O>) -> Result<R>) -> Result<R> {
        match &self.weights {
            DWeights::Resident { head, .. } => f(head),
            DWeights::Streamed(ckpt) => f(&self.upload_streamed_head(ckpt)?),
        }
    }

    /// The prompt's embeddings [T, H] (reporting `input_ids` and `embeddings`), and its RoPE
    /// tables made ready.
    fn embed(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<O::F> {
        let cfg = self.config;
        let (b, s, hd) = (tokens.batch, tokens.seq, cfg.hidden_size);
        let mark = self.mark()?;
        let h = match &self.weights {
            DWeights::Resident { embed, .. } => {
                crate::model::stream::input_ids(tokens, cfg.vocab_size, obs)?;
                let ids: Vec<i32> = tokens.ids.iter().map(|&i| i as i32).collect(); // < vocab (checked)
                let h = self.ops.gather_rows(embed, &self.ops.upload_i32(&ids)?, b * s, hd)?; // [T, H]
                self.report(obs, HookPoint::Embeddings, &h, &[b, s, hd])?;
                h
            }
            // The prompt's rows only, as the CPU's streamed run reads them (reporting both hook points).
            DWeights::Streamed(ckpt) => upload_values(self.ops, &stream::embed(Weights::Streamed(ckpt), tokens, obs)?)?,
        };
        drop(self.rope_tables(s)?);
        self.done(mark, "embedding, RoPE tables", 0)?;
        Ok(h)
    }

    /// The hidden state `h` [T, H] layer `i` (or the head, at `num_hidden_layers`) takes: `h`, or
    /// the one the observer isolates it with.
    fn isolated(&self, i: usize, h: O::F, t: usize, obs: &mut dyn Observer) -> Result<O::F> {
        match obs.isolated_input(i)? {
            Some(given) => self.feed(&given, t * self.config.hidden_size),
            None => Ok(h),
        }
    }

    /// Decoder layer `i` on the hidden state `h` [T, H] of `b` rows of `s` positions, reporting
    /// its hook points; `selection` is the DSA selection carried between layers. (`h` is taken,
    /// so it is freed once the attention's residual is added.)
    fn layer(
        &self,
        i: usize,
        layer: &DLayer<O>,
        mut h: O::F,
        (b, s): (usize, usize),
        selection: &mut Option<(O::I, usize)>,
        obs: &mut dyn Observer,
    ) -> Result<O::F> {
        let hd = self.config.hidden_size;
        let t = b * s;
        let hook = |p| HookPoint::Layer(i, p);
        // (`h` is reassigned, not shadowed, below: each old hidden state is freed as the next is
        // made.)
        let rope = self.rope_tables(s)?;
        let Rope { cos, sin, half, .. } = &*rope;
        let mark = self.mark()?;
        let x = self.norm(&h, &layer.input_layernorm, t, hd)?; // [T, H]
        self.report(obs, hook(LayerHook::InputNorm), &x, &[b, s, hd])?;
        self.done(mark, "norms, residual adds", 0)?;
        let attn = self.attention(i, &layer.attn, &x, (cos, sin, *half), (b, s), selection, obs)?;
        drop(x); // (each buffer freed once read for the last time: the check before a run counts so)
        let mark = self.mark()?;
        h = self.ops.add(&h, &attn, t * hd)?;
        drop(attn);
        let x = self.norm(&h, &layer.post_attention_layernorm, t, hd)?;
        self.report(obs, hook(LayerHook::PostAttnNorm), &x, &[b, s, hd])?;
        self.done(mark, "norms, residual adds", 0)?;
        let mlp = match &layer.ffn {
            DFfn::Dense(m) => {
                let mark = self.mark()?;
                let mlp = self.mlp(m, &x, t)?;
                self.done(mark, "dense MLP", 0)?;
                mlp
            }
            DFfn::Moe { gate, bias, experts, shared, router } => {
                self.moe(i, (gate, bias, experts, shared, router), &x, t, obs)?
            }
        };
        drop(x);
        self.report(obs, hook(LayerHook::MlpOut), &mlp, &[b, s, hd])?;
        let mark = self.mark()?;
        h = self.ops.add(&h, &mlp, t * hd)?;
        self.done(mark, "norms, residual adds", 0)?;
        self.report(obs, hook(LayerHook::Output), &h, &[b, s, hd])?;
        Ok(h)
    }

    /// MLA with DSA over the selected keys, expanded form: [T, H] -> [T, H].
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        i: usize,
        a: &DAttention<O>,
        x: &O::F,
        (cos, sin, half): (&O::F, &O::F, usize),
        (b, s): (usize, usize),
        selection: &mut Option<(O::I, usize)>,
        obs: &mut dyn Observer,
    ) -> Result<O::F> {
        let cfg = self.config;
        let hook = |p| HookPoint::Layer(i, p);
        let t = b * s;
        let (nh, nope, rd, vd, r) =
            (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let qr = cfg.q_lora_rank;
        let mark = self.mark()?;
        let q_kv_a = self.mm(x, &a.q_kv_a_proj, t, 1.0)?; // [T, qr + r + rd]
        let shape = [t, qr + r + rd];
        let q_a = self.ops.columns(&q_kv_a, shape, 0, qr)?; // [T, qr]
        let c_kv = self.ops.columns(&q_kv_a, shape, qr, r)?; // [T, r]
        let mut k_rope = self.ops.columns(&q_kv_a, shape, qr + r, rd)?; // [T, rd]
        drop(q_kv_a); // freed now, not at the function's end: the attention's peak holds neither
        let q_latent = self.norm(&q_a, &a.q_a_layernorm, t, qr)?;
        drop(q_a);
        self.report(obs, hook(LayerHook::QLatent), &q_latent, &[b, s, qr])?;
        let mut q = self.mm(&q_latent, &a.q_b_proj, t, 1.0)?; // [T, nh, nope + rd]
        self.ops.rope(&mut q, cos, sin, [t, s, nh, nope + rd, nope, half])?;
        if obs.wants(hook(LayerHook::KvNormPre)) {
            self.report(obs, hook(LayerHook::KvNormPre), &self.ops.row_l2_norm(&c_kv, t, r)?, &[b, s])?;
        }
        let kv_latent = self.norm(&c_kv, &a.kv_a_layernorm, t, r)?;
        self.report(obs, hook(LayerHook::KvLatent), &kv_latent, &[b, s, r])?;
        if obs.wants(hook(LayerHook::KvNorm)) {
            self.report(obs, hook(LayerHook::KvNorm), &self.ops.row_l2_norm(&kv_latent, t, r)?, &[b, s])?;
        }
        self.ops.rope(&mut k_rope, cos, sin, [t, s, 1, rd, 0, half])?;
        if obs.wants(hook(LayerHook::KRopeNorm)) {
            self.report(obs, hook(LayerHook::KRopeNorm), &self.ops.row_l2_norm(&k_rope, t, rd)?, &[b, s])?;
        }
        let kv = self.mm(&kv_latent, &a.kv_b_proj, t, 1.0)?; // [T, nh, nope + vd]
        self.done(mark, "attention: projections, norms, RoPE", 0)?;

        if let Some(ix) = &a.indexer {
            *selection = Some(self.select(i, ix, (x, &q_latent), (cos, sin, half), (b, s), obs)?);
        }
        if let Some(forced) = obs.forced_selection(i)? {
            if (forced.batch, forced.seq) != (b, s) || forced.idx.len() != b * s * forced.k {
                return Err(Error::Usage(format!(
                    "layer {i}: the replayed selection is for batch {} x seq {} (k {}), the run is {b} x {s}",
                    forced.batch, forced.seq, forced.k
                )));
            }
            let idx: Vec<i32> = forced.idx.iter().map(|&j| j as i32).collect(); // entries <= seq (from_i64)
            *selection = Some((self.ops.upload_i32(&idx)?, forced.k));
        }
        let (idx, k) = selection
            .as_ref()
            .ok_or_else(|| Error::Usage("a shared indexer layer has no earlier full layer".into()))?;
        self.report_ids(obs, hook(LayerHook::DsaTopk), idx, &[b, s, *k])?;
        let scale = cfg.softmax_scale() as f32;
        let mark = self.mark()?;
        let att = self.ops.sparse_attention(&q, &kv, &k_rope, idx, [b, s, s, nh, nope, rd, vd, *k, 0], scale)?;
        // Scores and values over each query's selected keys (those it can see: k of them, or
        // fewer at the start).
        let pairs: usize = (0..s).map(|p| (p + 1).min(*k)).sum();
        self.done(mark, "attention: scores, softmax, values", (2 * b * pairs * nh * (nope + rd + vd)) as u64)?;
        let mark = self.mark()?;
        let out = self.mm(&att, &a.o_proj, t, 1.0)?;
        self.done(mark, "attention: o_proj", 0)?;
        self.report(obs, hook(LayerHook::AttnOut), &out, &[b, s, cfg.hidden_size])?;
        Ok(out)
    }

    /// A full indexer layer's selection -> (idx [T, k], k). A prompt no longer than `index_topk`
    /// keeps every causal key whatever the scores, so unless the scores are recorded it is not
    /// scored at all (`Ops::every_key`, as the CPU model does): no indexer projections, products
    /// or top-k.
    fn select(
        &self,
        i: usize,
        ix: &DIndexer<O>,
        (x, q_latent): (&O::F, &O::F),
        (cos, sin, half): (&O::F, &O::F, usize),
        (b, s): (usize, usize),
        obs: &mut dyn Observer,
    ) -> Result<(O::I, usize)> {
        let hook = |p| HookPoint::Layer(i, p);
        let (t, n, d, k) = (b * s, ix.heads, ix.dim, ix.topk.min(s));
        let (idx, margin) = if s <= ix.topk && !obs.wants(hook(LayerHook::DsaScores)) {
            let mark = self.mark()?;
            let every = self.ops.every_key(t, k)?;
            self.done(mark, INDEXER_NOT_SCORED, 0)?;
            every
        } else {
            let mark = self.mark()?;
            let mut qi = self.mm(q_latent, &ix.wq_b, t, 1.0)?; // [T, n, d]
            self.ops.rope(&mut qi, cos, sin, [t, s, n, d, 0, half])?;
            let ki = self.mm(x, &ix.wk, t, 1.0)?;
            let mut ki = self.ops.layer_norm(&ki, &ix.k_norm.0, &ix.k_norm.1, t, d, ix.k_norm.2)?; // [T, d]
            self.ops.rope(&mut ki, cos, sin, [t, s, 1, d, 0, half])?;
            let w = self.mm(x, &ix.weights_proj, t, (n as f32).powf(-0.5))?; // [T, n]
            let (dims, scale) = ([b, s, s, n, d, 0], (d as f32).powf(-0.5));
            self.done(mark, "indexer: projections, norm, RoPE", 0)?;
            let mark = self.mark()?;
            // The whole [B, S, S] scores only when they are recorded: otherwise the backend may
            // select a chunk of queries at a time (16 GB of scores at 64k tokens).
            let selected = if obs.wants(hook(LayerHook::DsaScores)) {
                let scores = self.ops.index_scores(&qi, &ki, &w, dims, scale)?;
                self.report(obs, hook(LayerHook::DsaScores), &scores, &[b, s, s])?;
                self.ops.topk_causal(&scores, t, s, s, 0, k)?
            } else {
                self.ops.index_topk(&qi, &ki, &w, dims, scale, k)?
            };
            // q k^T for every head over the causal keys (half of S x S).
            self.done(mark, "indexer: scores, top-k", (b * s * (s + 1) * n * d) as u64)?;
            selected
        };
        self.report(obs, hook(LayerHook::DsaMargin), &margin, &[b, s])?;
        Ok((idx, k))
    }

    /// The router's observe-only hook points, only when wanted: `moe.scores` and
    /// `moe.biased_scores` derived on the host from the logits (whole activations, so copied
    /// back only then), and `moe.bias_changed` computed on the device (the route again without
    /// the bias, compared with the chosen ids), so an audit copies back one flag per token.
    #[allow(clippy::type_complexity)]
    fn router_extras(
        &self,
        i: usize,
        (logits, ids, bias): (&O::F, &O::I, &O::F),
        (t, e, k): (usize, usize, usize),
        router: &RouterConfig,
        obs: &mut dyn Observer,
    ) -> Result<()> {
        let hook = |p| HookPoint::Layer(i, p);
        if obs.wants(hook(LayerHook::RouterScores)) || obs.wants(hook(LayerHook::RouterBiasedScores)) {
            let (logits, bias) = (self.ops.download(logits)?, self.ops.download(bias)?);
            let scores: Vec<f32> = logits.iter().map(|&l| crate::model::moe::sigmoid(l)).collect();
            if obs.wants(hook(LayerHook::RouterScores)) {
                obs.observe(hook(LayerHook::RouterScores), &Tensor::from_vec(scores.clone(), (t, e), &Device::Cpu)?)?;
            }
            if obs.wants(hook(LayerHook::RouterBiasedScores)) {
                let biased: Vec<f32> = scores.iter().enumerate().map(|(j, s)| s + bias[j % e]).collect();
                obs.observe(hook(LayerHook::RouterBiasedScores), &Tensor::from_vec(biased, (t, e), &Device::Cpu)?)?;
            }
        }
        if obs.wants(hook(LayerHook::BiasChanged)) {
            let (plain, _, _) = self.ops.route(logits, &self.ops.zeros(e)?, t, e, router)?;
            let changed = self.ops.download_i32(&self.ops.bias_changed(ids, &plain, t, k)?)?;
            let changed: Vec<i64> = changed.into_iter().map(i64::from).collect();
            obs.observe(hook(LayerHook::BiasChanged), &Tensor::from_vec(changed, t, &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// `down(silu(gate(x)) * up(x))` over `rows` rows.
    fn mlp(&self, m: &DMlp<O>, x: &O::F, rows: usize) -> Result<O::F> {
        let gate_up = self.mm(x, &m.gate_up, rows, 1.0)?; // [rows, 2 * inter]
        let act = self.ops.swiglu(&gate_up, rows, m.down.inp)?; // [rows, inter]
        drop(gate_up);
        self.mm(&act, &m.down, rows, 1.0) // [rows, H]
    }

    /// Router, grouped expert GEMMs over the tokens sorted by expert, weighted combine in
    /// ascending expert id, plus the shared expert: [T, H] -> [T, H].
    #[allow(clippy::type_complexity)]
    fn moe(
        &self,
        i: usize,
        (gate, bias, experts, shared, router): (&DLinear<O>, &O::F, &[DMlp<O>], &DMlp<O>, &RouterConfig),
        x: &O::F,
        t: usize,
        obs: &mut dyn Observer,
    ) -> Result<O::F> {
        let hook = |p| HookPoint::Layer(i, p);
        let (hd, e, k) = (gate.inp, gate.out, router.top_k);
        let mark = self.mark()?;
        let logits = self.mm(x, gate, t, 1.0)?; // [T, E]
        self.report(obs, hook(LayerHook::RouterLogits), &logits, &[t, e])?;
        // A replayed route keeps our own decision's margin, as a replayed DSA selection does.
        let (mut ids, mut w, margin) = self.ops.route(&logits, bias, t, e, router)?;
        self.done(mark, "router", 0)?;
        if let Some(forced) = obs.forced_routing(i)? {
            crate::model::moe::check_replayed(i, &forced, t, Some(k), e)?;
            let scores: Vec<f32> = self.ops.download(&logits)?.iter().map(|&l| crate::model::moe::sigmoid(l)).collect();
            let host_w: Vec<f32> = forced
                .iter()
                .zip(scores.chunks_exact(e))
                .flat_map(|(row, sc)| crate::model::moe::weights_for(router, sc, row))
                .collect();
            let host_ids: Vec<i32> = forced.iter().flatten().map(|&j| j as i32).collect();
            (ids, w) = (self.ops.upload_i32(&host_ids)?, self.ops.upload(&host_w)?);
        }
        self.report_ids(obs, hook(LayerHook::TopkIds), &ids, &[t, k])?;
        self.report(obs, hook(LayerHook::TopkWeights), &w, &[t, k])?;
        self.report(obs, hook(LayerHook::RouterMargin), &margin, &[t])?;

        self.router_extras(i, (&logits, &ids, bias), (t, e, k), router, obs)?;
        // The (token, choice) pairs grouped by expert: experts[j] multiplies rows start .. start
        // + count of the packed rows.
        let mark = self.mark()?;
        let (counts, slot, rows) = self.ops.dispatch(&ids, t, k, e)?;
        if counts.len() != experts.len() {
            let (groups, have) = (counts.len(), experts.len());
            return Err(Error::Device(format!("layer {i}: {groups} expert groups for {have} experts")));
        }
        let a = t * k;
        self.done(mark, "experts: dispatch", 0)?;
        let inter = experts.first().map_or(0, |m| m.down.inp);
        let mut gate_up = self.ops.output(a * 2 * inter)?; // [A, 2 inter]
        let (mut spans, mut start) = (Vec::new(), 0); // (expert, first packed row, rows)
        for (j, &count) in counts.iter().enumerate() {
            if count > 0 {
                spans.push((j, start, count));
            }
            start += count;
        }
        let groups = |w: fn(&DMlp<O>) -> &O::W| -> Vec<(&O::W, usize, usize)> {
            spans.iter().map(|&(j, start, count)| (w(&experts[j]), start, count)).collect()
        };
        let mark = self.mark()?;
        self.count([a, 2 * inter, hd]);
        // The packed rows [A, H] are gathered from x by the product's own preparation.
        self.ops.gemm_groups((x, Some(&rows)), &groups(|m| &m.gate_up.w), &mut gate_up, [2 * inter, hd])?;
        self.done(mark, EXPERT_GEMMS[0], 0)?;
        let mark = self.mark()?;
        let act = self.ops.swiglu(&gate_up, a, inter)?; // [A, inter]
        drop(gate_up);
        self.done(mark, "experts: SwiGLU", 0)?;
        let mark = self.mark()?;
        self.count([a, hd, inter]);
        let mut y = self.ops.output(a * hd)?; // [A, H]
        self.ops.gemm_groups((&act, None), &groups(|m| &m.down.w), &mut y, [hd, inter])?;
        drop(act);
        self.done(mark, EXPERT_GEMMS[1], 0)?;
        let mark = self.mark()?;
        let shared_out = self.mlp(shared, x, t)?;
        self.done(mark, "shared expert", 0)?;
        let mark = self.mark()?;
        let out = self.ops.combine(&y, &ids, &slot, &w, &shared_out, [t, k, hd])?;
        self.done(mark, "experts: combine", 0)?;
        Ok(out)
    }
}
