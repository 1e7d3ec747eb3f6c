//! The launchers of `elementwise.cu`: SwiGLU over a stacked gate and up product, the residual
//! additions, and copies of columns between buffers (`columns`): a stacked product's output cut
//! into buffers of their own, or buffers put side by side.

use super::{cfg, emu, fits, ints, per_item, row_block, Buf, Engine, Gpu, KernelArg};
use crate::error::{Error, Result};

impl Gpu {
    /// gate_up: [rows, 2 * inter] (gate half, then up half) -> out: [rows, inter].
    pub fn swiglu(&self, gate_up: &Buf<f32>, out: &mut Buf<f32>, rows: usize, inter: usize) -> Result<()> {
        fits("swiglu", &[(gate_up.len(), rows * 2 * inter), (out.len(), rows * inter)])?;
        let (rows64, [i32_]) = (rows as i64, ints("swiglu", [inter])?);
        launch!(self, "swiglu", per_item(rows, 256, 0), [gate_up, out, &rows64, &i32_])
    }

    pub fn add(&self, a: &Buf<f32>, b: &Buf<f32>, out: &mut Buf<f32>, n: usize) -> Result<()> {
        fits("add", &[(a.len(), n), (b.len(), n), (out.len(), n)])?;
        let n64 = n as i64;
        launch!(self, "add", cfg(n, 256, 0), [a, b, out, &n64])
    }

    /// Columns `in_col0 .. in_col0 + cols` of x [rows, in_width] into columns `out_col0 ..` of
    /// out [rows, out_width] (its other columns left as they are).
    pub fn columns(
        &self,
        (x, [rows, in_width], in_col0): (&Buf<f32>, [usize; 2], usize),
        (out, out_width, out_col0): (&mut Buf<f32>, usize, usize),
        cols: usize,
    ) -> Result<()> {
        fits("columns", &[(x.len(), rows * in_width), (out.len(), rows * out_width)])?;
        for (col0, width) in [(in_col0, in_width), (out_col0, out_width)] {
            if col0 + cols > width {
                return Err(Error::Device(format!("columns: {col0}..{} past a row of {width}", col0 + cols)));
            }
        }
        let args = ints("columns", [in_width, in_col0, out_width, out_col0, cols])?;
        let [iw, ic, ow, oc, c] = &args;
        launch!(self, "columns", per_item(rows, row_block(cols, 256), 0), [x, out, iw, ic, ow, oc, c])
    }
}
