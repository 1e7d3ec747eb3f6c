//! The GLM-5 model: embedding, decoder layers, final norm and lm_head, run in f32 on the CPU.
//! [`Model::forward`] runs a whole batch; `embed`, `layer` and `head` expose the same steps one at
//! a time so `verify --isolate` can feed any layer the reference's own input.

pub mod indexer;
pub mod layer;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod nn;
pub mod rope;

use std::io::IsTerminal;

use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, Loader};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hooks::{emit, HookPoint, Observer};
use indexer::Selection;
use layer::DecoderLayer;
use nn::RmsNorm;
use rope::{RopeTables, RotaryEmbedding};

pub struct Model {
    pub config: Config,
    pub embed_tokens: Tensor, // [vocab, hidden]
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Tensor, // [vocab, hidden] (the embedding itself when tied)
    pub rotary: RotaryEmbedding,
}

/// Token ids of a batch: `batch` rows of `seq` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<u32>,
}

impl Tokens {
    /// `1,2,3` (one row) or `1,2;3,4` (a batch of rows of equal length).
    pub fn parse(s: &str) -> Result<Self> {
        let rows: Vec<Vec<u32>> = s
            .split(';')
            .map(|row| {
                row.split(',')
                    .map(|t| {
                        t.trim()
                            .parse::<u32>()
                            .map_err(|_| Error::Usage(format!("--tokens: \"{}\" is not a token id", t.trim())))
                    })
                    .collect()
            })
            .collect::<Result<_>>()?;
        let seq = rows[0].len();
        if rows.iter().any(|r| r.len() != seq) {
            return Err(Error::Usage("--tokens: every batch row must have the same length".into()));
        }
        Tokens::new(rows.len(), seq, rows.concat())
    }

    pub fn new(batch: usize, seq: usize, ids: Vec<u32>) -> Result<Self> {
        if batch == 0 || seq == 0 || ids.len() != batch * seq {
            return Err(Error::Usage(format!("need batch x seq = {batch} x {seq} token ids, got {}", ids.len())));
        }
        Ok(Tokens { batch, seq, ids })
    }
}

impl Model {
    /// Loads every weight the config calls for, f32 on the CPU; lists all missing or misshapen
    /// tensors at once when the checkpoint does not fit.
    pub fn load(ckpt: &Checkpoint) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let mut l = Loader::new(ckpt);
        let embed_tokens = l.get("model.embed_tokens.weight", &[v, h]);
        let progress = std::io::stderr().is_terminal() && cfg.num_hidden_layers > 4;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                if progress {
                    eprint!("\rloading layer {}/{}", i + 1, cfg.num_hidden_layers);
                }
                DecoderLayer::load(&mut l, &cfg, i)
            })
            .collect();
        if progress {
            eprintln!();
        }
        let norm = RmsNorm::load(&mut l, "model.norm", h, cfg.rms_norm_eps);
        let lm_head = if cfg.tie_word_embeddings { embed_tokens.clone() } else { l.get("lm_head.weight", &[v, h]) };
        let model = Model { rotary: RotaryEmbedding::new(&cfg), config: cfg, embed_tokens, layers, norm, lm_head };
        l.finish(model)
    }

    /// How many hook points a forward pass can report (sizes dump headers).
    pub fn max_hook_points(&self) -> usize {
        5 + self.layers.len() * crate::hooks::LayerHook::ALL.len()
    }

    pub fn rope_tables(&self, seq: usize) -> RopeTables {
        self.rotary.tables(&(0..seq).collect::<Vec<_>>())
    }

    /// ids -> [B, S, hidden]
    pub fn embed(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        let vocab = self.config.vocab_size;
        if let Some(bad) = tokens.ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Usage(format!("token id {bad} is out of range for vocab_size {vocab}")));
        }
        emit(obs, HookPoint::InputIds, || {
            let ids: Vec<i64> = tokens.ids.iter().map(|&t| t as i64).collect();
            Ok(Tensor::from_vec(ids, (tokens.batch, tokens.seq), &Device::Cpu)?)
        })?;
        let ids = Tensor::from_vec(tokens.ids.clone(), tokens.ids.len(), &Device::Cpu)?;
        let h =
            self.embed_tokens.index_select(&ids, 0)?.reshape((tokens.batch, tokens.seq, self.config.hidden_size))?;
        emit(obs, HookPoint::Embeddings, || Ok(h.clone()))?;
        Ok(h)
    }

    /// [B, S, hidden] -> logits [B, S, vocab]
    pub fn head(&self, h: &Tensor, obs: &mut dyn Observer) -> Result<Tensor> {
        let x = self.norm.forward(h)?;
        emit(obs, HookPoint::FinalNorm, || Ok(x.clone()))?;
        let (b, s, hidden) = x.dims3()?;
        let logits = x.reshape((b * s, hidden))?.matmul(&self.lm_head.t()?)?.reshape((b, s, self.config.vocab_size))?;
        emit(obs, HookPoint::Logits, || Ok(logits.clone()))?;
        Ok(logits)
    }

    /// The whole forward pass: ids -> logits [B, S, vocab].
    pub fn forward(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        let rope = self.rope_tables(tokens.seq);
        let mut h = self.embed(tokens, obs)?;
        let mut sel: Option<Selection> = None;
        for layer in &self.layers {
            h = layer.forward(&h, &rope, &mut sel, obs)?;
        }
        self.head(&h, obs)
    }
}
