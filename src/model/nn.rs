//! Small building blocks shared by the blocks of the model: linear layers, RMSNorm, LayerNorm and
//! softmax, computed in f32 in the order the transformers reference computes them (up to the
//! last bit: `x * (1 / sqrt(v))` where torch takes `rsqrt`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

use super::amx::{self, Tiles};
use super::bf16_gemm::{self, Panels};
use super::fp8::Fp8Weight;
use super::fp8_gemv;
use super::gemv::{matmul_nt_bf16, widen, Bf16Weight, MAX_ROWS};
use crate::checkpoint::Loader;
use crate::error::{Error, Result};

/// A `[out, in]` weight: f32 in memory (f32 checkpoints), or bf16 or block-FP8 read in place
/// from the memory-mapped checkpoint. Those are not converted at load: few-row products (decode)
/// stream a bf16 weight as bf16, the device path uploads both as stored, and what the CPU's
/// many-row products multiply ([`Product`]) is made the first time one needs it (on AMX, the
/// second: [`Packing`]), then kept.
pub enum Weight {
    F32(Tensor),
    Bf16(Bf16Weight, Packing),
    Fp8(Fp8Weight, Packing),
}

/// How a bf16 or block-FP8 weight's many-row products run: its first in place where the CPU
/// has AMX and it has fewer than [`Packing::IN_PLACE_MAX_ROWS`] rows ([`amx::InPlace`]: nothing
/// copied, so a one-off run's first prefill is about half as long and holds one copy of the
/// weights), then, from its second on, through its [`Product`], made then: a weight multiplied
/// twice is multiplied again (`bench`, the TUI's runs, `generate`'s prompt in chunks), and a
/// prefill on the packed tiles takes 0.75x as long.
#[derive(Default)]
pub struct Packing {
    product: OnceLock<Product>,
    used: AtomicBool,
    /// Every product of fewer rows reads in place, not the first only: a streamed layer that
    /// serves several prompts (`audit --stream`) would otherwise be packed by the second, its
    /// packed copy held beside the next layer's mapped pages (the memory a layer frees is kept
    /// for the next). Measured on an 8-layer GLM-5-shaped bf16 checkpoint, 8 prompts of 128
    /// tokens: 1.37 GB against 2.67 GB, in the same time (57-61 s against 58 s).
    always_in_place: bool,
}

impl Packing {
    /// Rows from which a first product packs the weight at once: packing costs about what 500
    /// rows lose in place (a 128-token prefill gains 1 s here, a 1024-token one lost 0.5 s).
    const IN_PLACE_MAX_ROWS: usize = 512;

    /// A weight's, as `l` loads it ([`Loader::reading_in_place`]).
    fn as_loaded(l: &Loader) -> Packing {
        Packing { always_in_place: l.in_place, ..Default::default() }
    }

    /// Whether a weight's first product of `rows` rows reads it where it is mapped (what the
    /// memory estimate of a one-off pass counts).
    pub(crate) fn reads_in_place(rows: usize) -> bool {
        rows < Self::IN_PLACE_MAX_ROWS && amx::available()
    }

    /// x [m, in] -> [m, out]: in place (`in_place`, when it gives one) or through the product
    /// (`make`, the first time).
    fn multiply(
        &self,
        x: &Tensor,
        out: usize,
        in_place: impl FnOnce() -> Option<amx::InPlace>,
        make: impl FnOnce() -> Result<Product>,
    ) -> Result<Tensor> {
        if Self::reads_in_place(x.dims2()?.0)
            && self.product.get().is_none()
            && (!self.used.swap(true, Ordering::Relaxed) || self.always_in_place)
        {
            if let Some(once) = in_place() {
                return with_rows(x, out, &|xs, m| amx::matmul_in_place(xs, m, &once));
            }
        }
        made(&self.product, make)?.multiply(x)
    }
}

impl Weight {
    pub fn bf16(w: Bf16Weight) -> Self {
        Weight::Bf16(w, Packing::default())
    }

    /// A bf16 weight as `l` loads it: read in place by every product of fewer rows where the
    /// loader says so ([`Loader::reading_in_place`]).
    pub fn bf16_as(l: &Loader, w: Bf16Weight) -> Self {
        Weight::Bf16(w, Packing::as_loaded(l))
    }
    pub fn fp8(w: Fp8Weight) -> Self {
        Weight::Fp8(w, Packing::default())
    }

    /// lm_head's weight, or a band of its rows, as the model multiplies it: a bf16 one as stored,
    /// except that a tied head's many-row products take `f32()` (the embedding's f32 rows, the
    /// same values already widened) rather than a second copy; without bf16, `f32()` itself.
    /// The resident model and the streamed head's bands both take it, so `--stream` multiplies
    /// the head through the same kernels and gives the same bits.
    pub fn head(bf16: Option<Bf16Weight>, tied: bool, f32: impl FnOnce() -> Result<Tensor>) -> Result<Self> {
        Ok(match bf16 {
            Some(w) if tied => {
                Weight::Bf16(w, Packing { product: OnceLock::from(Product::F32T(f32()?.t()?)), ..Default::default() })
            }
            Some(w) => Weight::bf16(w),
            None => Weight::F32(f32()?),
        })
    }
}

/// What a bf16 or FP8 weight's many-row products (a prefill's) multiply on the CPU.
pub enum Product {
    /// A bf16 weight's values, or a block-FP8 one's codes (with its scales beside them), in AMX's
    /// tile order (`amx`), where the CPU has AMX-BF16 (and the blocks fit): 2 bytes a weight.
    Tiles(Tiles),
    /// The values as bf16 (FP8 codes: exactly; their scales kept beside them) reordered into
    /// panels for the AVX-512 or AVX2 kernel (`bf16_gemm`): 2 bytes a weight.
    Panels(Panels),
    /// `W^T` `[in, out]` in f32 (where the CPU has neither AVX-512F nor AVX2 with FMA, FP8
    /// weights whose blocks the panels do not fit, and a tied head, as a view of the embedding's
    /// table). Transposed
    /// because the `gemm` crate behind candle's matmul reads it in its micro-kernel's order,
    /// where `[out, in]` made it repack the whole weight element by element on every product
    /// (docs/performance.md). f32 checkpoints' weights (the small test cases) are multiplied
    /// through a transposed view, the slower order, rather than held twice.
    F32T(Tensor),
}

impl Product {
    // Once packed, a weight's mapped pages are let go: a one-off prefill on a CPU without AMX
    // held both (5.0 GB for a 2.6 GB estimate on the bench checkpoint). A decode step that reads
    // the weight in place later pages it back in.
    fn of_bf16(w: &Bf16Weight) -> Result<Self> {
        let product = match Tiles::new(w) {
            Some(t) => Product::Tiles(t),
            None => match Panels::new(w) {
                Some(p) => Product::Panels(p),
                None => Product::F32T(transposed(w.bits(), [w.rows, w.cols], widen)?),
            },
        };
        w.release();
        Ok(product)
    }

    fn of_fp8(w: &Fp8Weight) -> Result<Self> {
        let product = match Tiles::from_fp8(w) {
            Some(t) => Product::Tiles(t),
            None => match Panels::from_fp8(w) {
                Some(p) => Product::Panels(p),
                None => Product::F32T(transposed(&w.to_f32(), w.shape(), |x| x)?),
            },
        };
        w.release();
        Ok(product)
    }

    /// x [m, in] -> [m, out]
    fn multiply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Product::Tiles(t) => with_rows(x, t.shape()[0], &|xs, m| amx::matmul(xs, m, t)),
            Product::Panels(p) => with_rows(x, p.shape()[0], &|xs, m| bf16_gemm::matmul(xs, m, p)),
            Product::F32T(wt) => matmul(x, wt),
        }
    }
}

/// One of our kernels, which take x's values (read in place) and rows (its width checked by
/// `Linear::forward`) and give `n` outputs a row, on `x` [m, in] -> [m, n].
fn with_rows(x: &Tensor, n: usize, kernel: &dyn Fn(&[f32], usize) -> Vec<f32>) -> Result<Tensor> {
    let m = x.dims2()?.0;
    Ok(Tensor::from_vec(crate::hooks::with_f32(x, |xs| kernel(xs, m))?, (m, n), x.device())?)
}

/// The value in `slot`, made by `make` the first time.
fn made<T>(slot: &OnceLock<T>, make: impl FnOnce() -> Result<T>) -> Result<&T> {
    if let Some(v) = slot.get() {
        return Ok(v);
    }
    let v = make()?;
    Ok(slot.get_or_init(|| v))
}

/// `v` `[rows, cols]` row-major, each value mapped by `f`, as an f32 tensor `[cols, rows]`: a
/// band of 16 output rows per task on rayon's pool, moved 16 x 16 values at a time through a
/// buffer so both the reads and the writes are runs of 16 (20% faster than writing each value in
/// place).
fn transposed<T: Copy + Sync>(v: &[T], [rows, cols]: [usize; 2], f: impl Fn(T) -> f32 + Sync) -> Result<Tensor> {
    const TILE: usize = 16;
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() {
        return Ok(Tensor::from_vec(out, (cols, rows), &Device::Cpu)?);
    }
    out.par_chunks_mut(TILE * rows).enumerate().for_each(|(band, o)| {
        let (c0, cn) = (band * TILE, o.len() / rows); // output rows c0 .. c0 + cn
        let mut tile = [[0f32; TILE]; TILE]; // [c][r]
        for r0 in (0..rows).step_by(TILE) {
            let rn = TILE.min(rows - r0);
            for (r, row) in v[r0 * cols..].chunks(cols).take(rn).enumerate() {
                for (c, &x) in row[c0..c0 + cn].iter().enumerate() {
                    tile[c][r] = f(x);
                }
            }
            for (c, t) in tile.iter().enumerate().take(cn) {
                o[c * rows + r0..c * rows + r0 + rn].copy_from_slice(&t[..rn]);
            }
        }
    });
    Ok(Tensor::from_vec(out, (cols, rows), &Device::Cpu)?)
}

/// `y = x W^T (+ b)`, weight stored `[out, in]` as in the checkpoint.
pub struct Linear {
    pub weight: Weight,       // [out, in]
    pub bias: Option<Tensor>, // [out]
}

impl Linear {
    pub fn load(l: &mut Loader, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Self {
        let name = format!("{prefix}.weight");
        let shape_ok = l.ckpt.shape(&name) == Some(vec![out_dim, in_dim]);
        let weight = match (l.bf16(&name).filter(|_| shape_ok), l.fp8(&name).filter(|_| shape_ok)) {
            (Some(w), _) => Weight::bf16_as(l, w),
            (None, Some(w)) => Weight::Fp8(w, Packing::as_loaded(l)),
            (None, None) => Weight::F32(l.get(&name, &[out_dim, in_dim])),
        };
        let bias = bias.then(|| l.get(&format!("{prefix}.bias"), &[out_dim]));
        Linear { weight, bias }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        match &self.weight {
            Weight::F32(w) => [w.dims()[0], w.dims()[1]],
            Weight::Bf16(w, _) => [w.rows, w.cols],
            Weight::Fp8(w, _) => w.shape(),
        }
    }

    /// The weight `[out, in]` in f32 (for a bf16 or FP8 one, a new copy each call).
    pub fn f32_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::F32(w) => w.clone(),
            Weight::Bf16(w, _) => Tensor::from_vec(w.to_f32(), (w.rows, w.cols), &Device::Cpu)?,
            Weight::Fp8(w, _) => Tensor::from_vec(w.to_f32(), w.shape().to_vec(), &Device::Cpu)?,
        })
    }

    /// x: [..., in] -> [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let [out_dim, weight_in] = self.shape();
        if in_dim != weight_in {
            // Before anything is widened or packed for the product.
            return Err(Error::Usage(format!("a product of [.., {in_dim}] with a [{out_dim}, {weight_in}] weight")));
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = out_dim;
        if rows == 0 {
            return Ok(Tensor::zeros(out_dims, DType::F32, x.device())?);
        }
        let x = x.reshape((rows, in_dim))?; // [rows, in]
        let y = match &self.weight {
            // Decode-sized inputs stream the bf16 weights (gemv.rs).
            Weight::Bf16(w, _) if rows <= MAX_ROWS => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let y = matmul_nt_bf16(&xs, rows, w, candle_core::utils::get_num_threads());
                Tensor::from_vec(y, (rows, w.rows), x.device())?
            }
            // And block-FP8 ones as FP8 (fp8_gemv.rs), where the kernel takes their blocks.
            Weight::Fp8(w, _) if rows <= MAX_ROWS && fp8_gemv::available(w) => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let y = fp8_gemv::matmul_nt_fp8(&xs, rows, w, candle_core::utils::get_num_threads())
                    .ok_or_else(|| Error::Usage(format!("an FP8 product of {rows} rows of {in_dim}")))?;
                Tensor::from_vec(y, (rows, out_dim), x.device())?
            }
            Weight::F32(w) => matmul_nt(&x, w)?,
            Weight::Bf16(w, packing) => {
                packing.multiply(&x, out_dim, || amx::InPlace::new(w), || Product::of_bf16(w))?
            }
            Weight::Fp8(w, packing) => {
                packing.multiply(&x, out_dim, || amx::InPlace::from_fp8(w), || Product::of_fp8(w))?
            }
        }; // [rows, out]
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(y.reshape(out_dims)?)
    }
}

/// `w * x / sqrt(mean(x^2) + eps)` over the last dimension.
pub struct RmsNorm {
    pub weight: Tensor, // [dim]
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(l: &mut Loader, prefix: &str, dim: usize, eps: f64) -> Self {
        RmsNorm { weight: l.get(&format!("{prefix}.weight"), &[dim]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
        let x = x.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        Ok(x.broadcast_mul(&self.weight)?)
    }
}

/// `x W` for x [m, k] and W [k, n] on candle's CPU matmul.
pub fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    // The `gemm` crate copies a block of the (transposed) weight into a contiguous panel only
    // when more than 16 x 6 token columns read it; below that (the experts' row groups: 64 rows
    // per expert at 128 tokens, 16 experts, top-8) its micro-kernel reads the weight in place,
    // a row of panel every 16 KB, and runs at half speed (100 against 215 GFLOP/s at 64 x 4096 x
    // 6144 on the 2-core AVX-512 VM). Packing always costs one contiguous copy of the block.
    static PACK_ALWAYS: std::sync::Once = std::sync::Once::new();
    PACK_ALWAYS.call_once(|| {
        gemm::set_lhs_packing_threshold_multi_thread(1);
        gemm::set_lhs_packing_threshold_single_thread(1);
    });
    Ok(x.matmul(w)?)
}

/// `x W^T` for x [m, k] and W [n, k].
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul(x, &w.t()?)
}

/// `(x - mean) / sqrt(var + eps) * w + b` (biased variance), as `nn.LayerNorm`.
pub struct LayerNorm {
    pub weight: Tensor, // [dim]
    pub bias: Tensor,   // [dim]
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(l: &mut Loader, prefix: &str, dim: usize, eps: f64) -> Self {
        LayerNorm {
            weight: l.get(&format!("{prefix}.weight"), &[dim]),
            bias: l.get(&format!("{prefix}.bias"), &[dim]),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let x = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(x.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing a weight read from a file lets its mapped pages go; read again (a decode step's
    /// product in place), they come back from the file with the same values. A weight in
    /// anonymous memory keeps its pages (dropped, they would read back as zeros).
    #[test]
    fn a_packed_weight_lets_its_file_pages_go_and_reads_them_back() {
        let (rows, cols) = (64, 1024); // 128 KB: whole pages to drop
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 1001) as f32 - 500.0) / 64.0).collect();
        let bits: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let entry = crate::st::Entry { dtype: safetensors::Dtype::BF16, shape: vec![rows, cols], data: bits.clone() };
        crate::st::write(&path, &[("w".into(), entry)], &Default::default()).unwrap();
        let file = crate::st::StFile::open(&path).unwrap();
        let w = file.bf16_weight("w").unwrap();
        let before = w.to_f32();
        // The file's resident KB in this process, as /proc/self/smaps counts them (Linux; smaps
        // names the file by its resolved path).
        let real = path.canonicalize().unwrap();
        let resident = || -> Option<u64> {
            let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
            let mut lines = smaps.lines().skip_while(|l| !l.ends_with(real.to_str().unwrap_or("?")));
            lines.next()?;
            let rss = lines.find(|l| l.starts_with("Rss:"))?;
            rss.split_whitespace().nth(1)?.parse().ok()
        };
        let held = resident();
        Product::of_bf16(&w).unwrap();
        if cfg!(target_os = "linux") {
            let (held, now) = (held.expect("the mapping in smaps"), resident().expect("the mapping in smaps"));
            assert!(held >= 120 && now <= 8, "{held} KB resident before, {now} KB after");
        }
        assert_eq!(w.to_f32(), before, "read back from the file");
        let halves: Vec<u16> = bits.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        let anon = Bf16Weight::from_bits(&halves, rows, cols, 0).unwrap();
        Product::of_bf16(&anon).unwrap();
        assert_eq!(anon.to_f32(), before, "anonymous memory kept");
    }

    /// A bf16 weight's first product of a few rows leaves nothing packed, its second packs it
    /// (where the tiles run; loaded to be read in place, it never does), and a first product of
    /// many rows packs at once; every one gives the same values within f32 rounding.
    #[test]
    fn a_bf16_weight_is_packed_at_its_second_product_or_a_first_of_many_rows_unless_read_in_place() {
        let (n, k) = (40, 64);
        let w = Bf16Weight::test_matrix(n, k);
        let x = |m: usize| {
            Tensor::from_vec((0..m * k).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), (m, k), &Device::Cpu)
                .unwrap()
        };
        let packing = Packing::default();
        let multiply =
            |p: &Packing, x: &Tensor| p.multiply(x, n, || amx::InPlace::new(&w), || Product::of_bf16(&w)).unwrap();
        let first = multiply(&packing, &x(3));
        assert_eq!(packing.product.get().is_none(), amx::available(), "in place where the tiles run");
        let second = multiply(&packing, &x(3));
        assert!(packing.product.get().is_some());
        let diff = (&first - &second).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        let many = Packing::default();
        multiply(&many, &x(Packing::IN_PLACE_MAX_ROWS));
        assert!(many.product.get().is_some());
        // A weight loaded to be read in place (a streamed layer's) is read so by every product of
        // fewer rows, the same values; one of many rows still packs it.
        let in_place = Packing { always_in_place: true, ..Default::default() };
        for _ in 0..3 {
            let again = multiply(&in_place, &x(3));
            assert_eq!(in_place.product.get().is_none(), amx::available(), "in place where the tiles run");
            let diff = (&again - &second).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
        multiply(&in_place, &x(Packing::IN_PLACE_MAX_ROWS));
        assert!(in_place.product.get().is_some());
    }

    /// Shapes on and off the 16 x 16 tiles, one band narrower than a tile, and empty ones.
    #[test]
    fn transpose_moves_every_value_once() {
        for (rows, cols) in [(70, 130), (16, 16), (1, 5), (5, 1), (0, 3), (3, 0)] {
            let v: Vec<u32> = (0..(rows * cols) as u32).collect();
            let t = transposed(&v, [rows, cols], |x| x as f32).unwrap();
            assert_eq!(t.dims(), [cols, rows]);
            let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(t.len(), rows * cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], (r * cols + c) as f32, "{rows} x {cols} at ({r}, {c})");
                }
            }
        }
    }
}
