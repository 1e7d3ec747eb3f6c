//! The SwiGLU feed-forward block `down(silu(gate(x)) * up(x))`: the dense layers' MLP, each routed
//! expert and the shared expert.

use candle_core::Tensor;

use super::nn::Linear;
use crate::checkpoint::Loader;
use crate::error::Result;

pub struct Mlp {
    pub gate_proj: Linear, // [inter, hidden]
    pub up_proj: Linear,   // [inter, hidden]
    pub down_proj: Linear, // [hidden, inter]
}

impl Mlp {
    pub fn load(l: &mut Loader, prefix: &str, hidden: usize, inter: usize) -> Self {
        Mlp {
            gate_proj: Linear::load(l, &format!("{prefix}.gate_proj"), inter, hidden, false),
            up_proj: Linear::load(l, &format!("{prefix}.up_proj"), inter, hidden, false),
            down_proj: Linear::load(l, &format!("{prefix}.down_proj"), hidden, inter, false),
        }
    }

    /// x: [..., hidden] -> [..., hidden]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?; // [..., inter]
        let up = self.up_proj.forward(x)?; // [..., inter]
        self.down_proj.forward(&(gate * up)?)
    }

    /// `down(silu(up(x)) * gate(x))`: the block with its gate and up projections swapped, as a
    /// port that splits a fused `gate_up_proj` the wrong way round runs it (`diff`'s readings).
    /// x: [..., hidden] -> [..., hidden]
    pub fn forward_swapped(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.up_proj.forward(x)?.silu()?; // [..., inter]
        let up = self.gate_proj.forward(x)?; // [..., inter]
        self.down_proj.forward(&(gate * up)?)
    }
}
