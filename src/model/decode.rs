//! Decoding one token at a time the way serving engines do: per layer only the 576-value latent
//! (`kv_latent` after its norm, plus the roped shared `k_rope`) and the DSA indexer's key are
//! cached, and `kv_b_proj` is absorbed into the query and the output instead of expanding keys and
//! values:
//!
//! `q_abs = q_nope · W_UK` (per head, kv_lora_rank wide);
//! `score[t] = (q_abs · kv_latent[t] + q_rope · k_rope[t]) * scale` over the selected keys;
//! `o = W_UV · Σ p[t] kv_latent[t]`.
//!
//! It must agree with the expanded prefill (`mla.rs`); the tests check it token by token.

use candle_core::utils::get_num_threads;
use candle_core::{Device, Tensor, D};

use super::absorbed::absorbed_attention;
use super::attention::{non_finite_positions, Dims};
use super::gemv::{per_head_bf16, Form, MAX_ROWS};
use super::indexer::Selection;
use super::layer::DecoderLayer;
use super::mla::{Attention, Projected};
use super::mtp::Mtp;
use super::nn::Weight;
use super::rope::RopeTables;
use super::stream::LogitRows;
use super::{Model, Tokens, Weights};
use crate::error::{Error, Result};
use crate::hooks::{emit, with_f32, HookPoint, LayerHook, Observer};

/// One layer's cache: every position so far, position-major, so a step appends its own rows
/// in place (a `Tensor::cat` of the whole cache per step made decode O(T) in copies alone).
#[derive(Default)]
pub struct LayerCache {
    pub kv_latent: Positions,  // [T, B, kv_lora_rank]
    pub k_rope: Positions,     // [T, B, rope], roped
    pub index_keys: Positions, // [T, B, index_head_dim], roped (full indexer layers)
    /// Positions whose latent or rope key is not finite, ascending: attention gathers them with
    /// the kept keys, so they poison the output as the reference's masked sum does.
    pub non_finite: Vec<usize>,
}

impl LayerCache {
    /// Room for `positions` positions reserved at the first append (more still fit: they grow it).
    pub fn with_capacity(positions: usize) -> Self {
        let p = || Positions { reserve: positions, ..Positions::default() };
        LayerCache { kv_latent: p(), k_rope: p(), index_keys: p(), non_finite: Vec::new() }
    }

    /// Appends a call's latents [B, C, r] and roped shared keys [B, C, rope], noting the
    /// positions where either is not finite.
    pub fn append_latents(&mut self, kv_latent: &Tensor, k_rope: &Tensor) -> Result<()> {
        let first = self.kv_latent.len();
        self.kv_latent.append_tensor(kv_latent)?;
        self.k_rope.append_tensor(k_rope)?;
        let ((b, c, r), rope) = (kv_latent.dims3()?, k_rope.dims()[2]);
        // All at or past `first`, so the list stays ascending without a sort.
        let new =
            with_f32(kv_latent, |l| with_f32(k_rope, |k| non_finite_positions(&[(l, r), (k, rope)], b, c, first)))??;
        self.non_finite.extend(new);
        Ok(())
    }
}

/// Rows of `width` values for every position and batch row, flat `[T, B, width]`: appending a
/// step's positions extends the buffer; nothing already cached moves (but on reallocation).
#[derive(Default)]
pub struct Positions {
    data: Vec<f32>,
    batch: usize,
    width: usize,
    /// Positions to reserve room for at the first append.
    reserve: usize,
}

impl Positions {
    /// Appends `c` positions of `batch` rows, `new` laid out `[B, C, width]` as a layer computes
    /// them.
    pub fn append(&mut self, new: &[f32], batch: usize, c: usize) -> Result<()> {
        if batch * c == 0 {
            return Ok(());
        }
        let width = new.len() / (batch * c);
        if width * batch * c != new.len() {
            return Err(Error::Usage(format!("{} values are not {batch} x {c} rows of one width", new.len())));
        }
        if self.data.is_empty() {
            (self.batch, self.width) = (batch, width);
            // A hint: if the room cannot be had up front, the buffer grows as it fills.
            let room = self.reserve.max(c).saturating_mul(batch * width);
            let _ = self.data.try_reserve_exact(room);
        } else if (batch, width) != (self.batch, self.width) {
            return Err(Error::Usage(format!(
                "the cache holds batch {} of width {}, a step brought batch {batch} of width {width}",
                self.batch, self.width
            )));
        }
        for i in 0..c {
            for b in 0..batch {
                self.data.extend_from_slice(&new[(b * c + i) * width..][..width]);
            }
        }
        Ok(())
    }

    /// `c` positions of `batch` rows, `[B, C, width]`, as a cache holds them: one batch row is
    /// laid out so already and is taken as it is (a prefill's own index keys, not copied).
    pub fn of(rows: Vec<f32>, batch: usize, c: usize) -> Result<Self> {
        let mut p = Positions::default();
        match batch {
            1 if c > 0 && rows.len().is_multiple_of(c) => (p.batch, p.width, p.data) = (1, rows.len() / c, rows),
            _ => p.append(&rows, batch, c)?,
        }
        Ok(p)
    }

    /// Appends the rows of a `[B, C, width]` tensor.
    pub fn append_tensor(&mut self, new: &Tensor) -> Result<()> {
        let (b, c, _) = new.dims3()?;
        with_f32(new, |v| self.append(v, b, c))?
    }

    /// Every cached row, `[T, B, width]`.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// How many positions are cached.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.batch * self.width).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The whole model's cache and how many positions it holds.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self::with_capacity(layers, 0)
    }

    /// A cache that reserves room for `positions` positions per layer as it is first filled
    /// (the prompt plus the tokens to generate), so it never grows by reallocating.
    pub fn with_capacity(layers: usize, positions: usize) -> Self {
        KvCache { layers: (0..layers).map(|_| LayerCache::with_capacity(positions)).collect(), len: 0 }
    }
}

impl Attention {
    /// `q_nope · W_UK` per head: [B, nh, C, nope] -> [B, nh, C, r]. Decode-sized inputs read
    /// `kv_b_proj` in place as bf16 when the checkpoint stores it so (gemv.rs).
    fn absorb_query(&self, q_nope: &Tensor) -> Result<Tensor> {
        let (b, nh, c, nope) = q_nope.dims4()?;
        match &self.kv_b_proj.weight {
            Weight::Bf16(w, _) if b * c <= MAX_ROWS => {
                let x = q_nope.transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?; // [B, C, nh, nope]
                let rows = (nope + self.v_dim, 0, nope);
                let y = per_head_bf16(&x, b * c, nh, w, rows, Form::XW, get_num_threads()); // [B, C, nh, r]
                Ok(Tensor::from_vec(y, (b, c, nh, self.kv_lora_rank), q_nope.device())?.transpose(1, 2)?)
            }
            _ => Ok(q_nope.broadcast_matmul(&self.absorbed()?.0)?),
        }
    }

    /// `mixed · W_UV^T` per head, heads side by side: mixed [B, C, nh, r] -> [B, C, nh * v].
    fn absorb_output(&self, mixed: Vec<f32>, (b, c): (usize, usize), device: &Device) -> Result<Tensor> {
        let (nh, r, nope, vd) = (self.heads, self.kv_lora_rank, self.nope, self.v_dim);
        match &self.kv_b_proj.weight {
            Weight::Bf16(w, _) if b * c <= MAX_ROWS => {
                let y = per_head_bf16(&mixed, b * c, nh, w, (nope + vd, nope, vd), Form::XWt, get_num_threads());
                Ok(Tensor::from_vec(y, (b, c, nh * vd), device)?)
            }
            _ => {
                let mixed = Tensor::from_vec(mixed, (b, c, nh, r), device)?.transpose(1, 2)?.contiguous()?; // [B, nh, C, r]
                let o = mixed.broadcast_matmul(&self.absorbed()?.1)?; // [B, nh, C, v]
                Ok(o.transpose(1, 2)?.reshape((b, c, nh * vd))?)
            }
        }
    }

    /// A chunk of `C` new positions per batch row, after the `T - C` already cached.
    /// x: [B, C, hidden] -> [B, C, hidden].
    fn decode(
        &self,
        layer: usize,
        x: &Tensor,
        rope: &RopeTables,
        cache: &mut LayerCache,
        sel: &mut Option<Selection>,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let c = x.dims()[1];
        let (nope, rd) = (self.nope, self.rope_dim);
        let Projected { q_latent, q, kv_latent, k_rope } = self.project(layer, x, rope, obs)?;
        cache.append_latents(&kv_latent, &k_rope)?;
        let (b, t) = (x.dims()[0], cache.kv_latent.len()); // T: the cached positions, then these C

        // DSA over the cached index keys: each new query sees every cached position up to its own.
        let selection = self.select(layer, x, &q_latent, rope, Some(&mut cache.index_keys), sel, obs)?;

        let (nh, r) = (self.heads, self.kv_lora_rank);
        let q = Tensor::from_vec(q, (b, c, nh, nope + rd), x.device())?.transpose(1, 2)?; // [B, nh, C, qk]
        let q_nope = q.narrow(D::Minus1, 0, nope)?.contiguous()?; // [B, nh, C, nope]
        let q_rope = q.narrow(D::Minus1, nope, rd)?.contiguous()?; // [B, nh, C, rope]
        let q_abs = self.absorb_query(&q_nope)?; // [B, nh, C, r]
        let dims = Dims { batch: b, seq: c, keys: t, heads: nh, nope: r, rope: rd, v: r };
        let (q_abs, q_rope) = (q_abs.flatten_all()?.to_vec1::<f32>()?, q_rope.flatten_all()?.to_vec1::<f32>()?);
        let (latents, k_ropes) = (cache.kv_latent.data(), cache.k_rope.data()); // read in place
        let scale = self.scale as f32;
        let mixed = absorbed_attention(&q_abs, &q_rope, latents, k_ropes, selection, &cache.non_finite, dims, scale);
        let o = self.absorb_output(mixed, (b, c), x.device())?; // [B, C, nh * v]
        let out = self.o_proj.forward(&o)?; // [B, C, hidden]
        emit(obs, HookPoint::Layer(layer, LayerHook::AttnOut), || Ok(out.clone()))?;
        Ok(out)
    }
}

impl DecoderLayer {
    /// [B, C, hidden] -> [B, C, hidden] through this layer's cache.
    pub(crate) fn decode(
        &self,
        h: &Tensor,
        rope: &RopeTables,
        cache: &mut LayerCache,
        sel: &mut Option<Selection>,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let x = self.input_layernorm.forward(h)?; // [B, C, hidden]
        emit(obs, HookPoint::Layer(self.index, LayerHook::InputNorm), || Ok(x.clone()))?;
        let h = (h + self.self_attn.decode(self.index, &x, rope, cache, sel, obs)?)?;
        self.feed_forward(&h, obs)
    }
}

impl Model {
    /// One decode call: `tokens` ([B, C]) are the next C positions of every batch row, from
    /// `cache.len` on. Returns their logits [B, C, vocab] and extends the cache. C = 1 is a
    /// single-token step; a larger C is a chunk (chunked prefill), causal within the chunk.
    pub fn decode_step(&self, tokens: &Tokens, cache: &mut KvCache, obs: &mut dyn Observer) -> Result<Tensor> {
        Ok(self.decode_hidden(tokens, cache, LogitRows::All, obs)?.1)
    }

    /// `decode_step` that also returns the final-norm hidden state [B, C, hidden] (what the MTP
    /// head consumes).
    pub fn decode_hidden(
        &self,
        tokens: &Tokens,
        cache: &mut KvCache,
        rows: LogitRows,
        obs: &mut dyn Observer,
    ) -> Result<(Tensor, Tensor)> {
        if cache.layers.len() != self.layers.len() {
            return Err(Error::Usage(format!(
                "the cache has {} layers, the model {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let rope = self.rotary.tables(&(cache.len..cache.len + tokens.seq).collect::<Vec<_>>());
        let mut h = self.embed(tokens, obs)?; // [B, C, hidden]
        let mut sel = None;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.decode(&h, &rope, c, &mut sel, obs)?;
        }
        cache.len += tokens.seq;
        super::stream::head_normed(Weights::Resident(self), &h, rows, obs)
    }

    /// The expanded prefill of `tokens` into an empty cache: the same logits and hooks as
    /// `forward`, plus the final-norm hidden state, and the cache then holds every position (the
    /// fast way in for a long prompt; `decode_hidden` with the whole prompt gives the same).
    pub fn prefill_into(
        &self,
        tokens: &Tokens,
        cache: &mut KvCache,
        rows: LogitRows,
        obs: &mut dyn Observer,
    ) -> Result<(Tensor, Tensor)> {
        if cache.len != 0 || cache.layers.len() != self.layers.len() {
            return Err(Error::Usage("prefill_into needs an empty cache for every layer".into()));
        }
        let rope = self.rope_tables(tokens.seq);
        let mut h = self.embed(tokens, obs)?; // [B, S, hidden]
        let mut sel = None;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward_filling(&h, &rope, &mut sel, Some(c), obs)?;
        }
        cache.len = tokens.seq;
        super::stream::head_normed(Weights::Resident(self), &h, rows, obs)
    }

    /// Runs `tokens` ([B, S]) through the cache `chunk` positions at a time: logits [B, S, vocab].
    pub fn decode_all(&self, tokens: &Tokens, chunk: usize, obs: &mut dyn Observer) -> Result<Tensor> {
        let mut cache = KvCache::with_capacity(self.layers.len(), tokens.seq);
        let mut out = Vec::with_capacity(tokens.seq.div_ceil(chunk.max(1)));
        for part in tokens.chunks(chunk) {
            out.push(self.decode_step(&part?, &mut cache, obs)?);
        }
        Ok(Tensor::cat(&out, 1)?)
    }
}

/// Whether generation goes on after a step (`Model::generate`'s `on_step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// What `generate` produced.
pub struct Generation {
    /// Every row's generated tokens.
    pub tokens: Vec<Vec<u32>>,
    /// With an MTP head, per row: whether its draft of each generated token after the first
    /// equalled the main model's greedy token (entry `j` for token `j + 1`).
    pub drafts: Option<Vec<Vec<bool>>>,
    /// The prompt's positions fed (fewer than its length where a chunked prompt was stopped).
    pub prompt_fed: usize,
}

impl Model {
    /// Greedy generation: the prompt goes through the cache `chunk` positions at a time (0: all
    /// at once), then every step feeds back each row's argmax. `obs` sees every hook of every
    /// call; `on_step(step, tokens)` sees each step's tokens as soon as they are chosen, and
    /// returning `Flow::Stop` ends the generation there (fewer than `new` tokens). A prompt fed in
    /// chunks asks `stop_in_prompt` after each: true ends the generation with no token (the
    /// hooks of the positions fed so far observed).
    ///
    /// With `mtp`, the MTP head drafts each next token from the previous step's hidden state and
    /// token (through its own one-layer cache), and the drafts are scored against the main
    /// model's greedy choices. It sees the pairs (`h[s]`, `t[s+1]`) of every position but the last,
    /// as it would in a prefill of the tokens the main model ran.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        prompt: &Tokens,
        new: usize,
        chunk: usize,
        mtp: Option<&Mtp>,
        obs: &mut dyn Observer,
        stop_in_prompt: &dyn Fn() -> bool,
        mut on_step: impl FnMut(usize, &[u32]) -> Result<Flow>,
    ) -> Result<Generation> {
        let (b, p) = (prompt.batch, prompt.seq);
        // Positions fed: the prompt and every new token but the last (never fed); the MTP head
        // runs one fewer.
        let fed = p + new.saturating_sub(1);
        let mut cache = KvCache::with_capacity(self.layers.len(), fed);
        let (mut hidden, mut logits) = (Vec::new(), None);
        if chunk == 0 || chunk >= p {
            // The whole prompt at once: the expanded prefill, filling the cache as it goes.
            // (Only the last position's logits choose the next token: transformers' generate
            // keeps only those too, unless they are recorded.)
            let (h, l) = self.prefill_into(prompt, &mut cache, LogitRows::Last, obs)?;
            hidden.push(h);
            logits = Some(l);
        } else {
            for (i, part) in prompt.chunks(chunk).enumerate() {
                let (h, l) = self.decode_hidden(&part?, &mut cache, LogitRows::Last, obs)?;
                hidden.push(h);
                logits = Some(l);
                if stop_in_prompt() {
                    let (tokens, drafts) = (vec![Vec::new(); b], mtp.map(|_| vec![Vec::new(); b]));
                    return Ok(Generation { tokens, drafts, prompt_fed: ((i + 1) * chunk).min(p) });
                }
            }
        }
        let mut next = last_argmax(&logits.ok_or_else(|| Error::Usage("empty prompt".into()))?)?;
        let mut drafter = mtp.map(|m| Drafter {
            mtp: m,
            cache: KvCache::with_capacity(1, fed.saturating_sub(1)),
            draft: None,
            hits: vec![Vec::with_capacity(new); b],
        });
        // The MTP head sees the pair (h[s], t[s+1]) of each position the main model runs but the
        // last; a pair waits in `pending` until the step that makes it not the last is certain
        // (`on_step` may stop the generation), so an early stop leaves no extra MTP position.
        let mut pending = None;
        if let Some(d) = drafter.as_mut() {
            // The prompt's pairs; the last pairs h[P-1] with the first generated token.
            let shifted = (0..b).flat_map(|r| prompt.ids[r * p + 1..(r + 1) * p].iter().copied().chain([next[r]]));
            let (h, pairs) = (Tensor::cat(&hidden, 1)?, Tokens::new(b, p, shifted.collect())?); // [B, P, hidden]
            if p > 1 {
                d.feed(self, &h.narrow(1, 0, p - 1)?, &pairs.columns(0..p - 1)?, obs)?;
            }
            if new >= 2 {
                pending = Some((h.narrow(1, p - 1, 1)?, pairs.columns(p - 1..p)?));
            }
        }
        let mut generated = vec![Vec::with_capacity(new); b];
        for step in 0..new {
            for (row, &t) in generated.iter_mut().zip(&next) {
                row.push(t);
            }
            if on_step(step, &next)? == Flow::Stop {
                break;
            }
            if let (Some(d), Some((h, t))) = (drafter.as_mut(), pending.take()) {
                d.feed(self, &h, &t, obs)?;
            }
            if step + 1 < new {
                let (h, l) = self.decode_hidden(&Tokens::new(b, 1, next.clone())?, &mut cache, LogitRows::Last, obs)?;
                next = last_argmax(&l)?;
                if let Some(d) = drafter.as_mut() {
                    d.score(&next);
                    if step + 2 < new {
                        pending = Some((h, Tokens::new(b, 1, next.clone())?));
                    }
                }
            }
        }
        Ok(Generation { tokens: generated, drafts: drafter.map(|d| d.hits), prompt_fed: p })
    }
}

/// The MTP head running beside generation, and how often its drafts were right.
struct Drafter<'a> {
    mtp: &'a Mtp,
    cache: KvCache,
    /// Each row's draft for the token the main model chooses next.
    draft: Option<Vec<u32>>,
    /// Per row, whether each scored draft was the main model's choice.
    hits: Vec<Vec<bool>>,
}

impl Drafter<'_> {
    /// More (hidden state, next token) pairs; the last one's draft is kept.
    fn feed(&mut self, model: &Model, h: &Tensor, next: &Tokens, obs: &mut dyn Observer) -> Result<()> {
        let logits = self.mtp.decode(model, h, next, &mut self.cache, obs)?;
        self.draft = Some(last_argmax(&logits)?);
        Ok(())
    }

    /// Scores the pending draft against the main model's choice.
    fn score(&mut self, chosen: &[u32]) {
        if let Some(draft) = self.draft.take() {
            self.hits.iter_mut().zip(draft.iter().zip(chosen)).for_each(|(row, (a, b))| row.push(a == b));
        }
    }
}

/// Each row's greedy token at the last position of logits [B, C, vocab].
pub fn last_argmax(logits: &Tensor) -> Result<Vec<u32>> {
    let c = logits.dims()[1];
    let rows = logits.narrow(1, c - 1, 1)?.squeeze(1)?.to_vec2::<f32>()?; // [B, vocab]
    Ok(rows.iter().map(|r| argmax(r) as u32).collect())
}

/// torch's `argmax`: the first index of the largest value, a NaN counting as the largest (the
/// first NaN). Greedy decoding breaks a tie as transformers' does: the lower token id.
pub fn argmax(row: &[f32]) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in row.iter().enumerate() {
        match best {
            Some((_, b)) if !(x > b || (x.is_nan() && !b.is_nan())) => {}
            _ => best = Some((i, x)),
        }
    }
    best.map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ties go to the lower id and a NaN wins, as torch's argmax has them (torch 2 gives 0, 1
    /// and 1 for the first three rows).
    #[test]
    fn argmax_is_torchs() {
        assert_eq!(argmax(&[0.0, 0.0, 0.0]), 0);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[1.0, f32::NAN, 5.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    /// Steps of batch-major rows land position-major, past the reserved room too, and a step of
    /// another batch or width is refused.
    #[test]
    fn positions_append_in_place_position_major() {
        let mut p = LayerCache::with_capacity(2).kv_latent;
        // Batch 2, width 2: a chunk of 2 positions, then 1 step, then 1 more past the reserve.
        p.append(&[1., 1., 2., 2., /* row 1 */ 5., 5., 6., 6.], 2, 2).unwrap();
        p.append(&[3., 3., /* row 1 */ 7., 7.], 2, 1).unwrap();
        p.append(&[4., 4., /* row 1 */ 8., 8.], 2, 1).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p.data(), &[1., 1., 5., 5., 2., 2., 6., 6., 3., 3., 7., 7., 4., 4., 8., 8.]);
        assert!(p.append(&[0.; 4], 1, 2).is_err(), "batch 1 after batch 2");
        assert!(p.append(&[0.; 6], 2, 1).is_err(), "width 3 after width 2");
        assert!(p.append(&[0.; 5], 2, 1).is_err(), "5 values are not 2 rows of one width");
        assert_eq!(p.len(), 4);
        // Taken whole: one batch row as it is, two laid out position-major.
        let one = Positions::of(vec![1., 1., 2., 2.], 1, 2).unwrap();
        assert_eq!((one.len(), one.data()), (2, &[1., 1., 2., 2.][..]));
        let two = Positions::of(vec![1., 1., 2., 2., /* row 1 */ 5., 5., 6., 6.], 2, 2).unwrap();
        assert_eq!((two.len(), two.data()), (2, &[1., 1., 5., 5., 2., 2., 6., 6.][..]));
    }

    /// Both ways in (a prefill filling the cache, then decode calls) note the positions whose
    /// latent or rope key is not finite, counted from the positions already cached.
    #[test]
    fn appended_latents_note_their_non_finite_positions() {
        let mut cache = LayerCache::with_capacity(4);
        let t = |v: Vec<f32>, c: usize, w: usize| Tensor::from_vec(v, (1, c, w), &candle_core::Device::Cpu).unwrap();
        cache.append_latents(&t(vec![0., 1., f32::NAN, 0.], 2, 2), &t(vec![0., 0.], 2, 1)).unwrap();
        cache.append_latents(&t(vec![0., 0.], 1, 2), &t(vec![f32::INFINITY], 1, 1)).unwrap();
        cache.append_latents(&t(vec![0., 0.], 1, 2), &t(vec![0.], 1, 1)).unwrap();
        assert_eq!((cache.kv_latent.len(), &cache.non_finite[..]), (4, &[1, 2][..]));
    }
}
