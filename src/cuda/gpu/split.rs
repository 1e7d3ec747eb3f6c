//! The launchers of the kernels that make the bf16 operands of the attention's and the indexer's
//! products in bf16 mode (`cuda::attention`): `split_bf16` (`convert.cu`) copies values rounded
//! to bf16, or split as `x = hi + lo` into two bf16 halves; `masked_softmax_bf16`
//! (`attention.cu`) writes the probabilities rounded to bf16.

use super::{emu, fits, ints, per_item, row_block, Buf, Engine, Gpu, KernelArg};
use crate::error::{Error, Result};

/// Where [`Gpu::split_bf16`] reads: `rows` rows of `heads` segments, each segment `a`'s values
/// then `b`'s, each source as [first value, row stride, head stride, width] (a head stride of 0
/// shares one segment among the heads; a width of 0 reads nothing).
#[derive(Debug, Clone, Copy)]
pub struct Split {
    pub rows: usize,
    pub heads: usize,
    pub a: [usize; 4],
    pub b: [usize; 4],
}

impl Gpu {
    /// Split bf16 copies (`split_bf16`) of `rows` rows of `heads` segments, each segment `a`'s
    /// values then `b`'s ([`Split`] says where), into out [heads, rows, parts * w] with w the
    /// segment's width, copy p holding the low halves where bit p of `lo_parts` is set.
    pub fn split_bf16(
        &self,
        (a, b): (&Buf<f32>, &Buf<f32>),
        split: &Split,
        out: &mut Buf<u16>,
        (parts, lo_parts): (usize, u32),
    ) -> Result<()> {
        let Split { rows, heads, a: [a0, a_rs, a_hs, a_w], b: [b0, b_rs, b_hs, b_w] } = *split;
        let w = a_w + b_w;
        // One past the last value a source is read at, for the last row and head.
        let end = |[start, rs, hs, width]: [usize; 4]| match rows > 0 && heads > 0 && width > 0 {
            true => start + (rows - 1) * rs + (heads - 1) * hs + width,
            false => 0,
        };
        let need_out = heads * rows * parts * w;
        fits("split_bf16", &[(a.len(), end(split.a)), (b.len(), end(split.b)), (out.len(), need_out)])?;
        if parts == 0 || parts > 31 || lo_parts >> parts != 0 {
            return Err(Error::Device(format!("split_bf16: low halves {lo_parts:#b} outside {parts} copies")));
        }
        let [a_w, b_w, h32, p32] = ints("split_bf16", [a_w, b_w, heads, parts])?;
        let [a0, a_rs, a_hs, b0, b_rs, b_hs, rows64] = [a0, a_rs, a_hs, b0, b_rs, b_hs, rows].map(|v| v as i64);
        let lo = lo_parts as i32;
        launch!(
            self,
            "split_bf16",
            per_item(heads * rows, row_block(w, 256), 0),
            [a, &a0, &a_rs, &a_hs, &a_w, b, &b0, &b_rs, &b_hs, &b_w, out, &rows64, &h32, &p32, &lo]
        )
    }

    /// [`Gpu::masked_softmax`] over the keys bits [qc, ceil(t_eff / 32)] keep
    /// ([`Gpu::selection_bits`]), rounded to bf16 into out [rows, width]: each row's
    /// probabilities at 0 .. t_eff (`width` >= t_eff, so the value product can take rows aligned
    /// as it likes); the scores are left as they are.
    pub fn masked_softmax_bf16(
        &self,
        scores: &Buf<f32>,
        bits: &Buf<u32>,
        out: &mut Buf<u16>,
        rows: usize,
        [qc, t_eff, width]: [usize; 3],
    ) -> Result<()> {
        let kernel = "masked_softmax_bf16";
        let words = qc * t_eff.div_ceil(32);
        fits(kernel, &[(scores.len(), rows * t_eff), (bits.len(), words), (out.len(), rows * width)])?;
        if qc == 0 || !rows.is_multiple_of(qc) || width < t_eff {
            return Err(Error::Device(format!(
                "{kernel}: {rows} rows are not heads of {qc} queries, or rows of {width} hold fewer than {t_eff}"
            )));
        }
        let [r32, q32, te32, w32] = ints(kernel, [rows, qc, t_eff, width])?;
        // A warp a row, 8 rows a block.
        launch!(self, kernel, per_item(rows.div_ceil(8), 256, 0), [scores, bits, out, &r32, &q32, &te32, &w32])
    }
}
