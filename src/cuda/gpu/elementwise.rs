//! The launchers of `elementwise.cu`: SwiGLU over a stacked gate and up product, the residual
//! additions, and the cut of a stacked product's output into buffers of their own (`columns`).

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

    /// out [rows, cols] = columns `col0 .. col0 + cols` of x [rows, width].
    pub fn columns(
        &self,
        x: &Buf<f32>,
        out: &mut Buf<f32>,
        [rows, width]: [usize; 2],
        col0: usize,
        cols: usize,
    ) -> Result<()> {
        fits("columns", &[(x.len(), rows * width), (out.len(), rows * cols)])?;
        if col0 + cols > width {
            return Err(Error::Device(format!("columns: {col0}..{} past a row of {width}", col0 + cols)));
        }
        let [w32, c0, c32] = ints("columns", [width, col0, cols])?;
        launch!(self, "columns", per_item(rows, row_block(cols, 256), 0), [x, out, &w32, &c0, &c32])
    }
}
