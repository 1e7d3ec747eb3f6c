//! Block-FP8 weights (GLM-5-FP8) read in place: the e4m3 bytes stay in the checkpoint's memory
//! map and the weight is `e4m3(q[i, j]) * scale_inv[i / br, j / bc]`. The CPU dequantises one
//! whole on first use (as for bf16: `nn::Weight`); the device path uploads the bytes and the
//! scale grid as they are and dequantises a block of rows before each product (`cuda::gemm`), so
//! the weights stay FP8 in device memory.

use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::st::{e4m3_table, e4m3_to_f32};

/// Rows of a block-FP8 weight. A row range keeps the whole scale grid and remembers where it
/// starts (`row0`), since a range need not start on a block (kv_a_proj_with_mqa splits at row
/// kv_lora_rank, which on small test models is inside a block).
#[derive(Clone)]
pub struct Fp8Weight {
    map: Arc<Mmap>,
    offset: usize, // bytes, of this view's first row
    rows: usize,
    cols: usize,
    /// The stored weight's scale grid, `[ceil(R / br), ceil(cols / bc)]` row-major.
    scale: Arc<Vec<f32>>,
    /// The stored row this view starts at.
    row0: usize,
    /// The quantisation block, `[br, bc]`.
    block: [usize; 2],
    /// The map is a file's (a checkpoint's), so its pages may be dropped ([`Fp8Weight::release`]).
    in_file: bool,
}

impl Fp8Weight {
    /// None when the bytes are not in the map or the scale grid is not `[ceil(rows / br),
    /// ceil(cols / bc)]` for `block` = [br, bc] (then the checkpoint dequantises the weight and
    /// reports the problem).
    pub fn new(
        map: Arc<Mmap>,
        offset: usize,
        [rows, cols]: [usize; 2],
        (scale, scale_shape): (Vec<f32>, &[usize]),
        block: [usize; 2],
    ) -> Option<Self> {
        let end = offset.checked_add(rows.checked_mul(cols)?)?;
        let grid = [rows.div_ceil(block[0].max(1)), cols.div_ceil(block[1].max(1))];
        let fits = scale_shape == grid && scale.len() == grid[0] * grid[1];
        (block[0] > 0 && block[1] > 0 && end <= map.len() && fits).then(|| Fp8Weight {
            map,
            offset,
            rows,
            cols,
            scale: Arc::new(scale),
            row0: 0,
            block,
            in_file: false,
        })
    }

    /// Marks the map as a file's: [`Fp8Weight::release`] may then drop its pages.
    pub(crate) fn in_file(self) -> Self {
        Fp8Weight { in_file: true, ..self }
    }

    /// Drops this view's pages from the process where the map is a file's (as
    /// `Bf16Weight::release`).
    pub fn release(&self) {
        if self.in_file {
            crate::st::release_range(&self.map, self.offset, self.offset + self.rows * self.cols);
        }
    }

    /// A weight from codes in memory (tests and selftest; checkpoints are read in place).
    pub fn from_codes(codes: &[u8], shape: [usize; 2], scale: Vec<f32>, block: [usize; 2]) -> Result<Self> {
        let io = |e| Error::Device(format!("an anonymous map for FP8 codes: {e}"));
        let mut map = memmap2::MmapMut::map_anon(codes.len().max(1)).map_err(io)?;
        map[..codes.len()].copy_from_slice(codes);
        let map = Arc::new(map.make_read_only().map_err(io)?);
        let grid = [shape[0].div_ceil(block[0].max(1)), shape[1].div_ceil(block[1].max(1))];
        Fp8Weight::new(map, 0, shape, (scale, &grid), block)
            .ok_or_else(|| Error::Device(format!("FP8 codes or scales do not fit {shape:?} in blocks of {block:?}")))
    }

    /// Rows `start .. start + count` of this view.
    pub fn rows(&self, start: usize, count: usize) -> Option<Self> {
        (start.checked_add(count)? <= self.rows).then(|| Fp8Weight {
            offset: self.offset + start * self.cols,
            rows: count,
            row0: self.row0 + start,
            ..self.clone()
        })
    }

    /// `[rows, cols]` of this view.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The stored weight's whole scale grid, row-major.
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// The stored row this view starts at.
    pub fn row0(&self) -> usize {
        self.row0
    }

    /// The quantisation block, `[br, bc]`.
    pub fn block(&self) -> [usize; 2] {
        self.block
    }

    /// The e4m3 codes, row-major.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.rows * self.cols]
    }

    /// Columns of the scale grid.
    pub fn scale_cols(&self) -> usize {
        self.cols.div_ceil(self.block[1])
    }

    /// The scales of each run of `run` rows of this view, `[ceil(rows / run)][scale_cols]`, for
    /// kernels that hold `run` outputs together; None where a run would span two blocks of rows
    /// (the block's rows, or the view's first row, not a multiple of `run`).
    pub fn scales_by_rows(&self, run: usize) -> Option<Vec<f32>> {
        let ([br, _], cols) = (self.block, self.scale_cols());
        if run == 0 || !br.is_multiple_of(run) || !self.row0.is_multiple_of(run) {
            return None;
        }
        let runs = (0..self.rows.div_ceil(run)).map(|r| (self.row0 + r * run) / br * cols);
        Some(runs.flat_map(|from| self.scale[from..from + cols].iter().copied()).collect())
    }

    /// The weight dequantised to f32, row-major: the same products, in the same order, as
    /// `checkpoint::dequantize_blocks` on the decoded codes.
    pub fn to_f32(&self) -> Vec<f32> {
        let (sc, [br, bc]) = (self.scale_cols(), self.block);
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (i, row) in self.bytes().chunks_exact(self.cols.max(1)).enumerate() {
            let srow = &self.scale[(self.row0 + i) / br * sc..];
            out.extend(row.iter().enumerate().map(|(j, &q)| e4m3_to_f32(q) * srow[j / bc]));
        }
        out
    }
}

/// Each e4m3 code's value as bf16 bits: exact (a code has 3 mantissa bits), so kernels that
/// multiply bf16 take FP8 codes through this table.
pub fn codes_as_bf16() -> [u16; 256] {
    e4m3_table().map(|v| (v.to_bits() >> 16) as u16)
}

#[cfg(test)]
mod tests {
    use crate::checkpoint::Checkpoint;

    /// Every FP8 weight of the fp8-sharded case, read in place, dequantises to exactly what the
    /// checkpoint's own decoding gives, whole and as a row range that starts inside a block (and,
    /// in weights of over 128 rows, crosses into the next); and
    /// the model keeps those weights as FP8.
    #[test]
    fn in_place_fp8_weights_dequantise_as_the_checkpoint_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/fp8-sharded");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let names: Vec<String> = ckpt.names().filter(|n| ckpt.scale_name(n).is_some()).map(String::from).collect();
        assert!(names.len() > 10, "{} FP8 weights", names.len());
        for name in &names {
            let w = ckpt.fp8_weight(name).unwrap_or_else(|| panic!("{name} is not read in place"));
            let (want, shape) = ckpt.f32(name).unwrap();
            let [rows, cols] = w.shape();
            assert_eq!([rows, cols], [shape[0], shape[1]], "{name}");
            let got = w.to_f32();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}");
            let count = rows / 2; // the last half: crosses row 128 where the weight has more
            let start = rows - count;
            let part = w.rows(start, count).unwrap().to_f32();
            assert_eq!(part, want[start * cols..(start + count) * cols], "{name} rows {start}..");
        }
        let model = crate::model::Model::load(&ckpt).unwrap();
        let q_a = &model.layers[0].self_attn.q_a_proj.weight;
        assert!(matches!(q_a, crate::model::nn::Weight::Fp8(..)));
    }
}
