//! The launcher of `flash_attention_bf16` (`attention.cu`): bf16 mode's attention over the
//! selection in one pass on tensor cores, with no scores in memory (`cuda::attention`,
//! `AttentionPath::Fused`).

use super::{emu, fits, ints, per_item, Buf, Engine, Gpu, KernelArg};
use crate::error::{Error, Result};

/// Queries a block (16 a warp, 4 warps), keys a step, and the most values a head
/// (`FA_M`, `FA_N`, `8 * FA_VT` in `attention.cu`).
const BLOCK_QUERIES: usize = 64;
pub const FLASH_STEP_KEYS: usize = 32;
pub const FLASH_MAX_VD: usize = 256;

/// Where a chunk of queries and its keys lie for [`Gpu::flash_attention_bf16`]: queries `row0 ..
/// row0 + qc` of q and out (positions `first ..`), keys `key0 .. key0 + t_eff` of each head's `bt`
/// rows of keys and values, heads of `qk` score and `vd` value widths.
#[derive(Debug, Clone, Copy)]
pub struct FlashChunk {
    pub row0: usize,
    pub qc: usize,
    pub first: usize,
    pub key0: usize,
    pub t_eff: usize,
    pub bt: usize,
    pub nh: usize,
    pub qk: usize,
    pub vd: usize,
}

impl FlashChunk {
    /// The block's dynamic shared memory in bytes: a tile of queries and one of keys (rows of qk
    /// rounded up to 16, plus 8) and the values transposed (vd rounded up to 8 rows of 40).
    pub fn shared_bytes(&self) -> usize {
        let sq = self.qk.next_multiple_of(16) + 8;
        2 * ((BLOCK_QUERIES + FLASH_STEP_KEYS) * sq + self.vd.next_multiple_of(8) * (FLASH_STEP_KEYS + 8))
    }

    /// The products' FLOPs over the keys each block of queries reaches (its last query's causal
    /// keys): what the kernel computes, padding aside.
    pub fn flops(&self) -> usize {
        (0..self.qc)
            .step_by(BLOCK_QUERIES)
            .map(|i0| {
                let rows = BLOCK_QUERIES.min(self.qc - i0);
                let keys = self.t_eff.min(self.first + i0 + rows);
                2 * self.nh * rows * keys * (self.qk + self.vd)
            })
            .sum()
    }
}

impl Gpu {
    /// Whether [`Gpu::flash_attention_bf16`] runs heads of `qk` / `vd` here, and why not: it needs
    /// bf16 tensor cores (sm_80 or later), at most [`FLASH_MAX_VD`] values a head, and its tiles
    /// within the shared memory a block may take.
    pub fn flash_refusal(&self, qk: usize, vd: usize) -> Option<String> {
        let chunk = FlashChunk { row0: 0, qc: 0, first: 0, key0: 0, t_eff: 0, bt: 0, nh: 0, qk, vd };
        if let Some(why) = self.tensor_core_refusal() {
            Some(format!("the fused attention {why}"))
        } else if vd > FLASH_MAX_VD {
            Some(format!("the fused attention takes at most {FLASH_MAX_VD} values a head, not {vd}"))
        } else if chunk.shared_bytes() > self.shared_limit {
            Some(format!(
                "the fused attention's tiles at {qk} score dimensions need {} bytes of shared memory, more than the {} a block may take here",
                chunk.shared_bytes(),
                self.shared_limit
            ))
        } else {
            None
        }
    }

    /// Why this GPU has no bf16 tensor cores (`mma.sync` m16n8k16 needs sm_80 or later), if so.
    fn tensor_core_refusal(&self) -> Option<String> {
        let major = self.arch.strip_prefix("sm_").and_then(|a| a.get(..a.len().saturating_sub(1))?.parse::<u32>().ok());
        let refused = matches!(self.engine, Engine::Cuda { .. }) && major.is_none_or(|m| m < 8);
        refused.then(|| format!("needs bf16 tensor cores (sm_80 or later); this GPU is {}", self.arch))
    }

    /// `mma_probe`: d [16, 8] = a [16, 16] . bt [8, 16]^T in one tensor-core product, its
    /// fragments loaded and stored as `flash_attention_bf16` does (`selftest`'s layout check).
    pub fn mma_probe(&self, a: &Buf<u16>, bt: &Buf<u16>, d: &mut Buf<f32>) -> Result<()> {
        let kernel = "mma_probe";
        if let Some(why) = self.tensor_core_refusal() {
            return Err(Error::Device(format!("{kernel} {why}")));
        }
        fits(kernel, &[(a.len(), 16 * 16), (bt.len(), 8 * 16), (d.len(), 16 * 8)])?;
        launch!(self, kernel, per_item(1, 32, 0), [a, bt, d])
    }

    /// `flash_attention_bf16` over one chunk: q [.., nh, qk] (f32), keys [nh, bt, qk] and values
    /// [nh, bt, vd] (bf16), bits [qc, ceil(t_eff / 32)] (the selection,
    /// [`Gpu::selection_bits`]) -> out [.., nh, vd] at the chunk's rows.
    pub fn flash_attention_bf16(
        &self,
        (q, keys, values): (&Buf<f32>, &Buf<u16>, &Buf<u16>),
        bits: &Buf<u32>,
        out: &mut Buf<f32>,
        c: &FlashChunk,
        scale: f32,
    ) -> Result<()> {
        let kernel = "flash_attention_bf16";
        if let Some(why) = self.flash_refusal(c.qk, c.vd) {
            return Err(Error::Device(format!("{kernel}: {why}")));
        }
        let rows = c.row0 + c.qc;
        let key_rows = (c.nh.max(1) - 1) * c.bt + c.key0 + c.t_eff;
        fits(
            kernel,
            &[
                (q.len(), rows * c.nh * c.qk),
                (keys.len(), key_rows * c.qk),
                (values.len(), key_rows * c.vd),
                (bits.len(), c.qc * c.t_eff.div_ceil(32)),
                (out.len(), rows * c.nh * c.vd),
            ],
        )?;
        if c.key0 + c.t_eff > c.bt {
            return Err(Error::Device(format!(
                "{kernel}: keys {} .. {} past a head's {}",
                c.key0,
                c.key0 + c.t_eff,
                c.bt
            )));
        }
        let [qc, t_eff, first, nh, qk, vd] = ints(kernel, [c.qc, c.t_eff, c.first, c.nh, c.qk, c.vd])?;
        let [row0, key0, bt] = [c.row0, c.key0, c.bt].map(|v| v as i64);
        let shared = c.shared_bytes() as u32; // within shared_limit (flash_refusal)
        let blocks = c.nh * c.qc.div_ceil(BLOCK_QUERIES);
        launch!(
            self,
            kernel,
            per_item(blocks, 128, shared),
            [q, keys, values, bits, out, &row0, &key0, &bt, &qc, &t_eff, &first, &nh, &qk, &vd, &scale]
        )
    }
}

#[cfg(test)]
mod tests {
    /// The launcher's tile sizes are the kernel's.
    #[test]
    fn the_tiles_are_the_kernels() {
        let src = include_str!("../attention.cu");
        let define = |name: &str| -> usize {
            let line = src.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap_or_default();
            line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        assert_eq!(define("FA_M"), super::BLOCK_QUERIES);
        assert_eq!(define("FA_N"), super::FLASH_STEP_KEYS);
        assert_eq!(8 * define("FA_VT"), super::FLASH_MAX_VD);
    }
}
