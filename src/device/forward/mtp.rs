//! The MTP head on a device, in the order the CPU's [`Mtp::forward`] computes it (the math is in
//! `model::mtp`): for each position s < S-1, the main model's final-norm hidden state `h[s]` and
//! the embedding of token `s + 1`, each through its own norm, side by side through `eh_proj`,
//! then one decoder layer over the S-1 positions (its own DSA indexer, RoPE at position s), then
//! `shared_head.norm` and the head. Its weights are uploaded from the host's [`Mtp`] at its first
//! run and kept for the next (an audit runs it once a prompt); the embeddings and lm_head are the
//! main model's unless the checkpoint gives the head its own.

use candle_core::{Device, Tensor};

use super::super::weights::{upload_layer, upload_linear, upload_norm, upload_values, DLayer, DLinear};
use super::super::Ops;
use super::{DWeights, DeviceModel};
use crate::error::{Error, Result};
use crate::hooks::{HookPoint, Observer};
use crate::model::mtp::{check_positions, Mtp};
use crate::model::stream::LogitRows;
use crate::model::Tokens;

/// The MTP head's weights on the device.
pub(super) struct DMtp<O: Ops> {
    enorm: (O::F, f32),
    hnorm: (O::F, f32),
    eh_proj: DLinear<O>, // [hidden, 2 * hidden]
    layer: DLayer<O>,
    shared_head_norm: (O::F, f32),
    /// `model.layers.{N}.embed_tokens` in f32 [vocab, hidden], and its vocab, where the
    /// checkpoint has its own.
    embed_tokens: Option<(O::F, usize)>,
    /// `shared_head.head` [vocab, hidden], where the checkpoint has its own.
    head: Option<DLinear<O>>,
}

impl<O: Ops> DMtp<O> {
    fn upload(ops: &O, m: &Mtp) -> Result<Self> {
        Ok(DMtp {
            enorm: upload_norm(ops, &m.enorm)?,
            hnorm: upload_norm(ops, &m.hnorm)?,
            eh_proj: upload_linear(ops, &m.eh_proj)?,
            layer: upload_layer(ops, &m.layer)?,
            shared_head_norm: upload_norm(ops, &m.shared_head_norm)?,
            embed_tokens: match &m.embed_tokens {
                Some(t) => Some((upload_values(ops, t)?, t.dims()[0])),
                None => None,
            },
            head: m.head.as_ref().map(|l| upload_linear(ops, l)).transpose()?,
        })
    }
}

impl<O: Ops> DeviceModel<'_, O> {
    /// The MTP head over `hidden` [B, S-1, hidden] (the main model's final norm at positions
    /// 0..S-2, on the host) and `tokens` [B, S]: draft logits [B, S-1, vocab] on the host, where
    /// position s predicts token s + 2. Reports the hook points the CPU's head reports.
    pub fn mtp(&self, head: &Mtp, hidden: &Tensor, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        self.mtp_rows(head, hidden, tokens, LogitRows::All, obs)
    }

    /// [`DeviceModel::mtp`], its draft logits at `logit_rows` as [`Mtp::forward_rows`] gives them.
    pub fn mtp_rows(
        &self,
        head: &Mtp,
        hidden: &Tensor,
        tokens: &Tokens,
        logit_rows: LogitRows,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let DWeights::Resident { embed, head: main, .. } = &self.weights else {
            return Err(crate::model::mtp::needs_resident());
        };
        let cfg = self.config;
        let (b, s, hd) = (tokens.batch, tokens.seq, cfg.hidden_size);
        check_positions(s)?;
        let t = b * (s - 1); // the (hidden state, next token) pairs
        if hidden.dims() != [b, s - 1, hd] {
            return Err(Error::Usage(format!(
                "the MTP head needs {b} x {} hidden states of {hd} for {b} x {s} tokens, got {:?}",
                s - 1,
                hidden.dims()
            )));
        }
        if obs.wants(HookPoint::MtpInputHidden) {
            obs.observe(HookPoint::MtpInputHidden, hidden)?;
        }
        let key = head as *const Mtp as usize;
        if self.mtp.borrow().as_ref().is_none_or(|(k, _)| *k != key) {
            // (The old head, if any, freed first.)
            *self.mtp.borrow_mut() = None;
            *self.mtp.borrow_mut() = Some((key, DMtp::upload(self.ops, head)?));
        }
        let held = self.mtp.borrow();
        let d = &held.as_ref().ok_or_else(|| Error::Device("the MTP head is not uploaded".into()))?.1;

        let next = tokens.columns(1..s)?; // [B, S-1]
        let (table, vocab) = match &d.embed_tokens {
            Some((own, vocab)) => (own, *vocab),
            None => (embed, cfg.vocab_size),
        };
        next.check_vocab(vocab)?;
        let ids: Vec<i32> = next.ids.iter().map(|&i| i as i32).collect(); // < vocab (checked)

        // Each raw input is freed as soon as it is normed: the head must hold no more than the
        // prefill did, which the check before a run counts for both.
        let rows = self.ops.gather_rows(table, &self.ops.upload_i32(&ids)?, t, hd)?; // [T, H]
        let e = self.norm(&rows, &d.enorm, t, hd)?; // [T, H]
        drop(rows);
        let h = self.norm(&upload_values(self.ops, hidden)?, &d.hnorm, t, hd)?; // [T, H]
        let cat = self.ops.concat_columns(&[(&e, hd), (&h, hd)], t)?; // [T, 2H]
        drop((e, h));
        let x = self.mm(&cat, &d.eh_proj, t, 1.0)?; // [T, H]
        drop(cat);
        self.report(obs, HookPoint::MtpEhProj, &x, &[b, s - 1, hd])?;

        // Causal over its own S-1 positions, with a DSA selection of its own.
        let out = self.layer(cfg.num_hidden_layers, &d.layer, x, (b, s - 1), &mut None, obs)?; // [T, H]
        let x = self.norm(&out, &d.shared_head_norm, t, hd)?;
        drop(out);
        self.report(obs, HookPoint::MtpFinalNorm, &x, &[b, s - 1, hd])?;
        let lm_head = d.head.as_ref().unwrap_or(&main.lm_head);
        if logit_rows == LogitRows::Last && !obs.wants_every_position(HookPoint::MtpLogits) {
            // Each row's last pair only: the draft of the token after the prompt.
            let last: Vec<i32> = (1..=b).map(|r| (r * (s - 1) - 1) as i32).collect(); // < T
            let x = self.ops.gather_rows(&x, &self.ops.upload_i32(&last)?, b, hd)?; // [B, H]
            let logits = self.mm(&x, lm_head, b, 1.0)?; // [B, V]
            return Ok(Tensor::from_vec(self.ops.download(&logits)?, (b, 1, lm_head.out), &Device::Cpu)?);
        }
        let logits = self.mm(&x, lm_head, t, 1.0)?; // [T, V]
        let logits = Tensor::from_vec(self.ops.download(&logits)?, (b, s - 1, lm_head.out), &Device::Cpu)?;
        if obs.wants(HookPoint::MtpLogits) {
            obs.observe(HookPoint::MtpLogits, &logits)?;
        }
        Ok(logits)
    }
}
