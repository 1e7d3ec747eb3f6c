//! The GLM-5 model: embedding, decoder layers, final norm and lm_head, run in f32 on the CPU.
//! [`Model::forward`] runs a whole batch; `embed`, `layer` and `head` expose the same steps one at
//! a time so `verify --isolate` can feed any layer the reference's own input.

pub mod absorbed;
pub mod amx;
pub mod attention;
pub mod bf16_gemm;
pub mod decode;
pub mod fp8;
pub mod fp8_gemv;
pub mod gemv;
pub mod indexer;
pub mod layer;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod mtp;
pub mod nn;
pub mod rope;
pub mod stream;

use std::io::IsTerminal;
use std::sync::OnceLock;

use candle_core::Tensor;

use crate::checkpoint::{Checkpoint, Loader};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hooks::Observer;
use layer::DecoderLayer;
use nn::{Linear, RmsNorm, Weight};
use rope::{RopeTables, RotaryEmbedding};
pub use stream::Weights;

pub struct Model {
    pub config: Config,
    pub embed_tokens: Tensor, // [vocab, hidden]
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear, // [vocab, hidden] (the embedding itself when tied)
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
    /// `1,2,3` (one row) or `1,2;3,4` (a batch of rows of equal length). Errors say what is
    /// wrong; the caller says where (`--tokens`, a prompts file's line).
    pub fn parse(s: &str) -> Result<Self> {
        let rows: Vec<Vec<u32>> = s
            .split(';')
            .map(|row| {
                row.split(',')
                    .map(|t| {
                        t.trim().parse::<u32>().map_err(|_| Error::Usage(format!("\"{}\" is not a token id", t.trim())))
                    })
                    .collect()
            })
            .collect::<Result<_>>()?;
        let seq = rows[0].len();
        if rows.iter().any(|r| r.len() != seq) {
            return Err(Error::Usage("every batch row must have the same length".into()));
        }
        Tokens::new(rows.len(), seq, rows.concat())
    }

    /// Positions `range` of every row.
    pub fn columns(&self, range: std::ops::Range<usize>) -> Result<Tokens> {
        let ids = (0..self.batch).flat_map(|b| self.ids[b * self.seq + range.start..b * self.seq + range.end].iter());
        Tokens::new(self.batch, range.len(), ids.copied().collect())
    }

    /// The sequence cut into pieces of `chunk` positions (the last may be shorter; 0 means one piece).
    pub fn chunks(&self, chunk: usize) -> impl Iterator<Item = Result<Tokens>> + '_ {
        let chunk = if chunk == 0 { self.seq } else { chunk };
        (0..self.seq).step_by(chunk).map(move |p| self.columns(p..(p + chunk).min(self.seq)))
    }

    pub fn new(batch: usize, seq: usize, ids: Vec<u32>) -> Result<Self> {
        if batch == 0 || seq == 0 {
            return Err(Error::Usage(format!("no token ids (batch x seq = {batch} x {seq})")));
        }
        if ids.len() != batch * seq {
            return Err(Error::Usage(format!("need batch x seq = {batch} x {seq} token ids, got {}", ids.len())));
        }
        Ok(Tokens { batch, seq, ids })
    }

    /// Refuses an id past the vocabulary, naming it and where it is.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        match self.ids.iter().position(|&t| t as usize >= vocab) {
            Some(i) => Err(Error::Usage(format!(
                "token id {} at [{}, {}] is out of range for vocab_size {vocab}",
                self.ids[i],
                i / self.seq,
                i % self.seq
            ))),
            None => Ok(()),
        }
    }

    /// Where two runs' inputs part: their shapes (`1 x 32 vs 1 x 16 tokens`, with the first id
    /// their common positions disagree on), or the first id that differs (`token [0, 5]: 17 vs 4`);
    /// None when they are the same.
    pub fn difference(&self, other: &Tokens) -> Option<String> {
        if (self.batch, self.seq) != (other.batch, other.seq) {
            let shapes = format!("{} x {} vs {} x {} tokens", self.batch, self.seq, other.batch, other.seq);
            // Rows of different lengths: the first token their common positions disagree on.
            let common = self.seq.min(other.seq);
            let at = |t: &Tokens, b: usize, s: usize| t.ids.get(b * t.seq + s).copied();
            let first = (self.batch == other.batch)
                .then(|| (0..self.batch).flat_map(|b| (0..common).map(move |s| (b, s))))
                .into_iter()
                .flatten()
                .find(|&(b, s)| at(self, b, s) != at(other, b, s));
            return Some(match first {
                Some((b, s)) => format!(
                    "{shapes}; token [{b}, {s}]: {} vs {}",
                    at(self, b, s).unwrap_or_default(),
                    at(other, b, s).unwrap_or_default()
                ),
                None => shapes,
            });
        }
        let i = self.ids.iter().zip(&other.ids).position(|(a, b)| a != b)?;
        Some(format!("token [{}, {}]: {} vs {}", i / self.seq, i % self.seq, self.ids[i], other.ids[i]))
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
            // The progress line is erased, as cargo's is: nothing of it stays in the shell.
            eprint!("\r\x1b[2K");
        }
        let (norm, lm_head) = Model::load_head(&mut l, Some(&embed_tokens))?;
        let model = Model { rotary: RotaryEmbedding::new(&cfg), config: cfg, embed_tokens, layers, norm, lm_head };
        l.finish(model)
    }

    /// The final norm and lm_head, as [`Model::load`] holds them (a bf16 head read in place); a
    /// tied head is `embed_tokens`, which is also kept as f32 for the CPU's products where it is
    /// given. Without it (a device's streamed model, which uploads the head as stored) a tied bf16
    /// head is read in place as an untied one is, and only a tied head of another dtype is read
    /// as f32.
    pub fn load_head(l: &mut Loader, embed_tokens: Option<&Tensor>) -> Result<(RmsNorm, Linear)> {
        let ckpt: &Checkpoint = l.ckpt;
        let cfg = &ckpt.config;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let norm = RmsNorm::load(l, "model.norm", h, cfg.rms_norm_eps);
        let (head_name, tied) = (ckpt.head_name(), ckpt.tied_head());
        let bf16 = l.bf16(head_name).filter(|w| (w.rows, w.cols) == (v, h));
        let weight = Weight::head(bf16, tied && embed_tokens.is_some(), || {
            Ok(match embed_tokens.filter(|_| tied) {
                Some(e) => e.clone(),
                None => l.get(head_name, &[v, h]),
            })
        })?;
        Ok((norm, Linear { weight, bias: None }))
    }

    /// How many hook points a forward pass can report (sizes dump headers).
    pub fn max_hook_points(&self) -> usize {
        crate::hooks::max_points(self.layers.len())
    }

    pub fn rope_tables(&self, seq: usize) -> RopeTables {
        self.rotary.tables(&(0..seq).collect::<Vec<_>>())
    }

    /// ids -> [B, S, hidden]
    pub fn embed(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        stream::embed(Weights::Resident(self), tokens, obs)
    }

    /// [B, S, hidden] -> logits [B, S, vocab]
    pub fn head(&self, h: &Tensor, obs: &mut dyn Observer) -> Result<Tensor> {
        stream::head(Weights::Resident(self), h, obs)
    }

    /// The whole forward pass: ids -> logits [B, S, vocab].
    pub fn forward(&self, tokens: &Tokens, obs: &mut dyn Observer) -> Result<Tensor> {
        stream::run(Weights::Resident(self), tokens, (None, None), stream::LogitRows::All, obs)?
            .ok_or_else(|| Error::Usage("the forward pass stopped before the head".into()))
    }
}

/// Whether the CPU kernels may use AVX-512F (`bf16_gemm`, `fp8_gemv`, `gemv`): the CPU has it and
/// neither `GLIMPSE_NO_AVX512` nor `GLIMPSE_NO_AVX2` is set. CI sets them to run the golden cases
/// through the paths of CPUs without AVX-512F (the AVX2 kernels) and without AVX2 either (the
/// f32 copies and plain loops) on a machine that has AVX-512.
pub fn avx512f() -> bool {
    static AVX512F: OnceLock<bool> = OnceLock::new();
    *AVX512F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has && avx2() && std::env::var_os("GLIMPSE_NO_AVX512").is_none()
    })
}

/// The vector kernels the CPU paths run (`bf16_gemm`, `fp8_gemv`): AVX-512F, else AVX2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
}

/// The widest kernel this CPU runs and `GLIMPSE_NO_*` allow; None for the portable paths.
pub(crate) fn isa() -> Option<Isa> {
    if avx512f() {
        Some(Isa::Avx512)
    } else if avx2() {
        Some(Isa::Avx2)
    } else {
        None
    }
}

/// What the many-row products (a prefill's) of bf16 and block-FP8 weights run on here, for
/// reports: AMX tiles (`amx`) where the CPU has them, else the panels of `bf16_gemm`, else f32
/// copies. (Block-FP8 weights whose blocks fit neither take the f32 copies.)
pub fn cpu_products() -> &'static str {
    match (amx::available(), isa()) {
        (true, _) => "AMX tiles",
        (false, Some(Isa::Avx512)) => "AVX-512 panels",
        (false, Some(Isa::Avx2)) => "AVX2 panels",
        (false, None) => "f32 copies",
    }
}

/// The kernels this CPU can run, whatever `GLIMPSE_NO_*` say, widest first: the kernels' tests
/// run each one the CPU has.
#[cfg(test)]
pub(crate) fn kernels_on_this_cpu() -> Vec<Isa> {
    #[cfg(target_arch = "x86_64")]
    let here: Vec<Isa> = {
        let avx2 =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let avx512 = avx2 && is_x86_feature_detected!("avx512f");
        [(avx512, Isa::Avx512), (avx2, Isa::Avx2)].into_iter().filter(|k| k.0).map(|k| k.1).collect()
    };
    #[cfg(not(target_arch = "x86_64"))]
    let here: Vec<Isa> = Vec::new();
    if here.is_empty() {
        eprintln!("skipped: this CPU has neither AVX-512F nor AVX2 with FMA and F16C");
    }
    here
}

/// Whether the CPU kernels may use AVX2 with FMA and F16C (`bf16_gemm`'s 8-wide kernel, `gemv`'s
/// and `fp8_gemv`'s 8-wide loops; every CPU with AVX2 has the other two): the CPU has them and
/// `GLIMPSE_NO_AVX2` is unset.
pub fn avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has && std::env::var_os("GLIMPSE_NO_AVX2").is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::Tokens;

    #[test]
    fn token_runs_of_different_lengths_name_the_first_token_they_disagree_on() {
        let tokens = |seq, ids: &[u32]| Tokens { ids: ids.to_vec(), batch: 1, seq };
        let (short, long) = (tokens(3, &[5, 6, 7]), tokens(4, &[5, 9, 7, 8]));
        assert_eq!(short.difference(&long).as_deref(), Some("1 x 3 vs 1 x 4 tokens; token [0, 1]: 6 vs 9"));
        // One run's tokens begin the other's: only the shapes (`diff` adds that they are a prefix).
        let prefix = tokens(2, &[5, 9]);
        assert_eq!(prefix.difference(&long).as_deref(), Some("1 x 2 vs 1 x 4 tokens"));
        assert_eq!(long.difference(&long), None);
    }
}
