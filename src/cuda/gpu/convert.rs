//! The launchers of `convert.cu`'s weight decoders: block-FP8 codes dequantised to f32 or
//! straight to bf16, and bf16 widened to f32, a block of a weight's rows at a time (`cuda::gemm`
//! decodes a weight so for each product), and activation rows rounded to bf16.

use super::{cfg, emu, fits, ints, per_item, row_block, Buf, Engine, Gpu, KernelArg};
use crate::error::{Error, Result};

/// The kernel arguments of rows `start .. start + n` of an FP8 view [*, cols] that starts at
/// stored row `row0`, with `block` quantisation blocks, decoded into `out` values: `start`, then
/// `n`, `cols`, `row0` and the block's rows and columns as ints. Refuses buffers too short for
/// them and a block of zero.
fn fp8_rows(
    kernel: &str,
    (q, scale_inv, out): (usize, usize, usize),
    [start, n, cols]: [usize; 3],
    row0: usize,
    block: [usize; 2],
) -> Result<(i64, [i32; 5])> {
    if block.contains(&0) {
        return Err(Error::Device(format!("{kernel}: a quantisation block of zero")));
    }
    // (Saturated: a wrapped product would pass `fits`.)
    let end = row0.saturating_add(start).saturating_add(n);
    let scales = end.div_ceil(block[0]).saturating_mul(cols.div_ceil(block[1]));
    let (view, values) = (start.saturating_add(n).saturating_mul(cols), n.saturating_mul(cols));
    fits(kernel, &[(q, view), (scale_inv, scales), (out, values)])?;
    Ok((start as i64, ints(kernel, [n, cols, row0, block[0], block[1]])?))
}

/// What an FP8 weight is decoded to, and the kernel that does it: f32 (`fp8_dequant`), or bf16
/// bits for a bf16 product (`fp8_dequant_bf16`).
pub trait Fp8Out {
    const KERNEL: &'static str;
}

impl Fp8Out for f32 {
    const KERNEL: &'static str = "fp8_dequant";
}

impl Fp8Out for u16 {
    const KERNEL: &'static str = "fp8_dequant_bf16";
}

impl Gpu {
    /// Rows `start .. start + n` of the block-FP8 codes q [*, cols] (a view starting at stored
    /// row `row0`; scale_inv is the weight's whole grid) dequantised into out [n, cols]: as f32,
    /// or rounded to bf16 where `out` holds bf16 bits.
    pub fn fp8_dequant<T: Fp8Out>(
        &self,
        (q, scale_inv): (&Buf<u8>, &Buf<f32>),
        out: &mut Buf<T>,
        rows: [usize; 3],
        row0: usize,
        block: [usize; 2],
    ) -> Result<()> {
        let lens = (q.len(), scale_inv.len(), out.len());
        let (start, [n, c, r0, br, bc]) = fp8_rows(T::KERNEL, lens, rows, row0, block)?;
        let launch = per_item(rows[1], row_block(rows[2], 256), 0);
        launch!(self, T::KERNEL, launch, [q, scale_inv, out, &start, &n, &c, &r0, &br, &bc])
    }

    /// Values `start .. start + n` of `x` widened into the first n of `out`.
    pub fn bf16_widen(&self, x: &Buf<u16>, start: usize, out: &mut Buf<f32>, n: usize) -> Result<()> {
        fits("bf16_widen", &[(x.len(), start.saturating_add(n)), (out.len(), n)])?;
        let (start64, n64) = (start as i64, n as i64);
        launch!(self, "bf16_widen", cfg(n, 256, 0), [x, &start64, out, &n64])
    }

    /// Values `start .. start + n` of `x` rounded to bf16 into the first n of `out`.
    pub fn bf16_round(&self, x: &Buf<f32>, start: usize, out: &mut Buf<u16>, n: usize) -> Result<()> {
        fits("bf16_round", &[(x.len(), start.saturating_add(n)), (out.len(), n)])?;
        let (start64, n64) = (start as i64, n as i64);
        launch!(self, "bf16_round", cfg(n, 256, 0), [x, &start64, out, &n64])
    }
}
