//! One decoder layer: pre-norm MLA with DSA, then a dense SwiGLU or MoE feed-forward, each added
//! back to the residual stream.

use candle_core::Tensor;

use super::indexer::Selection;
use super::mla::Attention;
use super::mlp::Mlp;
use super::moe::Moe;
use super::nn::RmsNorm;
use super::rope::RopeTables;
use crate::checkpoint::Loader;
use crate::config::{Config, MlpKind};
use crate::error::Result;
use crate::hooks::{emit, HookPoint, LayerHook, Observer};

pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

pub struct DecoderLayer {
    pub index: usize,
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Ffn,
}

impl DecoderLayer {
    pub fn load(l: &mut Loader, cfg: &Config, i: usize) -> Self {
        let p = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        DecoderLayer {
            index: i,
            input_layernorm: RmsNorm::load(l, &format!("{p}.input_layernorm"), h, cfg.rms_norm_eps),
            self_attn: Attention::load(l, cfg, i),
            post_attention_layernorm: RmsNorm::load(l, &format!("{p}.post_attention_layernorm"), h, cfg.rms_norm_eps),
            mlp: match cfg.mlp_kind(i) {
                MlpKind::Dense => Ffn::Dense(Mlp::load(l, &format!("{p}.mlp"), h, cfg.intermediate_size)),
                MlpKind::Moe => Ffn::Moe(Moe::load(l, cfg, i)),
            },
        }
    }

    /// h: [B, S, hidden] -> [B, S, hidden]
    pub fn forward(
        &self,
        h: &Tensor,
        rope: &RopeTables,
        sel: &mut Option<Selection>,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        self.forward_filling(h, rope, sel, None, obs)
    }

    /// `forward`, also filling an empty decode cache (`Attention::forward_filling`).
    pub(crate) fn forward_filling(
        &self,
        h: &Tensor,
        rope: &RopeTables,
        sel: &mut Option<Selection>,
        cache: Option<&mut super::decode::LayerCache>,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let i = self.index;
        let hook = |p| HookPoint::Layer(i, p);
        let x = self.input_layernorm.forward(h)?; // [B, S, hidden]
        emit(obs, hook(LayerHook::InputNorm), || Ok(x.clone()))?;
        let h = (h + self.self_attn.forward_filling(i, &x, rope, sel, cache, obs)?)?; // [B, S, hidden]
        self.feed_forward(&h, obs)
    }

    /// The second half of the layer: `h + mlp(post_attention_layernorm(h))`, [B, S, hidden].
    pub fn feed_forward(&self, h: &Tensor, obs: &mut dyn Observer) -> Result<Tensor> {
        let i = self.index;
        let hook = |p| HookPoint::Layer(i, p);
        let x = self.post_attention_layernorm.forward(h)?; // [B, S, hidden]
        emit(obs, hook(LayerHook::PostAttnNorm), || Ok(x.clone()))?;
        let mlp_out = match &self.mlp {
            Ffn::Dense(mlp) => mlp.forward(&x)?,
            Ffn::Moe(moe) => moe.forward(i, &x, obs)?,
        }; // [B, S, hidden]
        emit(obs, hook(LayerHook::MlpOut), || Ok(mlp_out.clone()))?;
        let out = (h + mlp_out)?;
        emit(obs, hook(LayerHook::Output), || Ok(out.clone()))?;
        Ok(out)
    }
}
