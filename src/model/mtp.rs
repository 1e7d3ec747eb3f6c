//! The multi-token-prediction (MTP) head: `model.layers.{num_hidden_layers}`, kept in the
//! checkpoint and not used by the main forward. It drafts the token after next. For position s it
//! takes the main model's final-norm hidden state `h[s]` and the token `t[s+1]`:
//!
//! `x = eh_proj(cat(enorm(embed(t[s+1])), hnorm(h[s])))`, then one full MoE decoder layer (its own
//! DSA indexer, causal over its own positions, RoPE at position s), then
//! `logits = head(shared_head.norm(x))`, which predicts `t[s+2]`.
//!
//! It reuses the main embedding and lm_head where the checkpoint has no copies of its own
//! (`model.layers.{N}.embed_tokens`, `model.layers.{N}.shared_head.head`). Feeding it the hidden
//! state *before* the final norm is a bug real ports shipped; the dump's `mtp.input_hidden` makes
//! it visible to `diff`.

use candle_core::{Tensor, D};

use super::decode::KvCache;
use super::layer::DecoderLayer;
use super::nn::{Linear, RmsNorm};
use super::stream::LogitRows;
use super::{Model, Tokens};
use crate::checkpoint::{Checkpoint, Loader};
use crate::error::{Error, Result};
use crate::hooks::{emit, HookPoint, Observer};

pub struct Mtp {
    pub enorm: RmsNorm,               // [hidden]
    pub hnorm: RmsNorm,               // [hidden]
    pub eh_proj: Linear,              // [hidden, 2 * hidden]
    pub layer: DecoderLayer,          // model.layers.{N}.{input_layernorm, self_attn, mlp, ...}
    pub shared_head_norm: RmsNorm,    // [hidden]
    pub embed_tokens: Option<Tensor>, // [vocab, hidden], only when the layer has its own
    pub head: Option<Linear>,         // shared_head.head [vocab, hidden], only when it has its own
}

impl Mtp {
    /// Whether the checkpoint holds an MTP layer.
    pub fn present(ckpt: &Checkpoint) -> bool {
        ckpt.contains(&format!("model.layers.{}.eh_proj.weight", ckpt.config.num_hidden_layers))
    }

    /// Refuses a checkpoint with no MTP layer, naming the tensor it lacks (before a command
    /// that needs the head loads anything).
    pub fn require(ckpt: &Checkpoint) -> Result<()> {
        match Mtp::present(ckpt) {
            true => Ok(()),
            false => Err(Error::Usage(format!(
                "{}: the checkpoint has no MTP layer (model.layers.{}.eh_proj.weight is absent)",
                ckpt.dir.display(),
                ckpt.config.num_hidden_layers
            ))),
        }
    }

    pub fn load(ckpt: &Checkpoint) -> Result<Mtp> {
        let cfg = &ckpt.config;
        let (n, h, v) = (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size);
        Mtp::require(ckpt)?;
        let p = format!("model.layers.{n}");
        let mut l = Loader::new(ckpt);
        let own = |l: &mut Loader, name: String| l.has(&name).then(|| l.get(&name, &[v, h]));
        let mtp = Mtp {
            enorm: RmsNorm::load(&mut l, &format!("{p}.enorm"), h, cfg.rms_norm_eps),
            hnorm: RmsNorm::load(&mut l, &format!("{p}.hnorm"), h, cfg.rms_norm_eps),
            eh_proj: Linear::load(&mut l, &format!("{p}.eh_proj"), h, 2 * h, false),
            layer: DecoderLayer::load(&mut l, cfg, n),
            shared_head_norm: RmsNorm::load(&mut l, &format!("{p}.shared_head.norm"), h, cfg.rms_norm_eps),
            embed_tokens: own(&mut l, format!("{p}.embed_tokens.weight")),
            head: l
                .has(&format!("{p}.shared_head.head.weight"))
                .then(|| Linear::load(&mut l, &format!("{p}.shared_head.head"), v, h, false)),
        };
        l.finish(mtp)
    }

    /// Prefill form over a whole sequence `tokens` [B, S]. `hidden` is the main model's
    /// final-norm output at positions 0..S-2 [B, S-1, hidden] (the last position has no next
    /// token to pair with); returns draft logits [B, S-1, vocab], where position s predicts token
    /// s + 2.
    pub fn forward(&self, model: &Model, hidden: &Tensor, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        self.forward_rows(model, hidden, tokens, LogitRows::All, obs)
    }

    /// [`Mtp::forward`], its draft logits at `rows`: with [`LogitRows::Last`] and no observer
    /// that wants them at every position, the last one's [B, 1, vocab] (the draft of the token
    /// after the prompt), reported to none.
    pub fn forward_rows(
        &self,
        model: &Model,
        hidden: &Tensor,
        tokens: &Tokens,
        rows: LogitRows,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let s = tokens.seq;
        let (b, pairs, _) = hidden.dims3()?;
        check_positions(s)?;
        if (b, pairs) != (tokens.batch, s - 1) {
            return Err(Error::Usage(format!(
                "the MTP head needs {} x {} hidden states for {} x {s} tokens, got {b} x {pairs}",
                tokens.batch,
                s - 1,
                tokens.batch
            )));
        }
        let x = self.input(model, hidden, &tokens.columns(1..s)?, obs)?; // [B, S-1, hidden]
        let rope = model.rope_tables(s - 1);
        let out = self.layer.forward(&x, &rope, &mut None, obs)?; // [B, S-1, hidden]
        self.logits(model, &out, rows, obs)
    }

    /// Decode form: C more (hidden state, next token) pairs per batch row, at the positions after
    /// the ones `cache` (a one-layer cache) holds. hidden [B, C, hidden], next [B, C] ->
    /// draft logits [B, C, vocab].
    pub fn decode(
        &self,
        model: &Model,
        hidden: &Tensor,
        next: &Tokens,
        cache: &mut KvCache,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let [layer_cache] = &mut cache.layers[..] else {
            return Err(Error::Usage("the MTP cache holds exactly one layer".into()));
        };
        // (`input` reshapes the embeddings to `hidden`'s shape: the same count in another shape
        // would pass it, and the cache would count other positions than it holds.)
        let (b, c, _) = hidden.dims3()?;
        if (b, c) != (next.batch, next.seq) {
            return Err(Error::Usage(format!(
                "the MTP head needs {} x {} hidden states for {} x {} next tokens, got {b} x {c}",
                next.batch, next.seq, next.batch, next.seq
            )));
        }
        let x = self.input(model, hidden, next, obs)?; // [B, C, hidden]
        let rope = model.rotary.tables(&(cache.len..cache.len + next.seq).collect::<Vec<_>>());
        let out = self.layer.decode(&x, &rope, layer_cache, &mut None, obs)?; // [B, C, hidden]
        cache.len += next.seq;
        self.logits(model, &out, LogitRows::All, obs)
    }

    /// `eh_proj(cat(enorm(embed(next)), hnorm(h)))`: [B, C, hidden].
    fn input(&self, model: &Model, h: &Tensor, next: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        emit(obs, HookPoint::MtpInputHidden, || Ok(h.clone()))?;
        let table = self.embed_tokens.as_ref().unwrap_or(&model.embed_tokens);
        let vocab = table.dims()[0];
        next.check_vocab(vocab)?;
        let ids = Tensor::from_vec(next.ids.clone(), next.ids.len(), h.device())?;
        let e = table.index_select(&ids, 0)?.reshape(h.dims())?; // [B, C, hidden]
        let cat = Tensor::cat(&[&self.enorm.forward(&e)?, &self.hnorm.forward(h)?], D::Minus1)?; // [B, C, 2 * hidden]
        let x = self.eh_proj.forward(&cat)?; // [B, C, hidden]
        emit(obs, HookPoint::MtpEhProj, || Ok(x.clone()))?;
        Ok(x)
    }

    /// `head(shared_head.norm(x))`: [B, C, hidden] -> [B, C, vocab] (or the last position's,
    /// [B, 1, vocab], as [`Mtp::forward_rows`] says).
    fn logits(&self, model: &Model, x: &Tensor, rows: LogitRows, obs: &mut dyn Observer) -> Result<Tensor> {
        let (b, c, hidden) = x.dims3()?;
        let x = self.shared_head_norm.forward(x)?; // [B, C, hidden]
        emit(obs, HookPoint::MtpFinalNorm, || Ok(x.clone()))?;
        let kept = match rows {
            LogitRows::Last if !obs.wants_every_position(HookPoint::MtpLogits) => c.min(1),
            _ => c,
        };
        let x2 = x.narrow(1, c - kept, kept)?.contiguous()?.reshape((b * kept, hidden))?;
        let logits = self.head.as_ref().unwrap_or(&model.lm_head).forward(&x2)?;
        let logits = logits.reshape((b, kept, ()))?; // [B, kept, vocab]
        if kept == c {
            emit(obs, HookPoint::MtpLogits, || Ok(logits.clone()))?;
        }
        Ok(logits)
    }
}

/// The MTP head pairs each token with the hidden state before it: a row of one token has no pair.
/// (`run --mtp` asks before the main model runs.)
pub fn check_positions(seq: usize) -> Result<()> {
    match seq {
        0 | 1 => Err(Error::Usage(format!(
            "the MTP head needs at least 2 tokens (it pairs each token with the hidden state before it), got {seq}"
        ))),
        _ => Ok(()),
    }
}

/// What asking a streamed model (`--stream`) for the MTP head says: the head reuses the main
/// model's embeddings and lm_head, which a streamed run does not keep.
pub fn needs_resident() -> Error {
    Error::Usage("the MTP head needs the resident model: it does not run with --stream".into())
}
