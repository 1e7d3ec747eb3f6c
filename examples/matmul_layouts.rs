//! GFLOP/s of `x W^T` at GLM-5's projection shapes: candle's CPU matmul with the f32 weight held
//! as stored (`[out, in]`, multiplied through a transposed view) and as the model holds its f32
//! copies (`W^T` `[in, out]`, contiguous), with the `gemm` crate's default panel packing and with
//! packing always on (what `model::nn::matmul` sets); and the model's own kernel on the bf16
//! weight in panels (`model::bf16_gemm`: AVX-512F, or AVX2 with FMA; `GLIMPSE_NO_AVX512=1` times
//! the AVX2 one), on AMX's tiles packed (`amx::Tiles`) and in place (`amx::InPlace`, the rows 2
//! bytes off a 64-byte line as a checkpoint's may be). Medians of 5 runs.
//!
//!     cargo run --release --example matmul_layouts

use std::time::Instant;

use candle_core::{Device, Tensor};
use glimpse::model::amx::{self, InPlace, Tiles};
use glimpse::model::bf16_gemm::{self, Panels};
use glimpse::model::gemv::Bf16Weight;

/// GFLOP/s of one of our kernels (`flops` GFLOP a call), or `missing` where it has none.
fn gflops_or(flops: f64, kernel: Option<impl Fn() -> Vec<f32>>, missing: &str) -> candle_core::Result<String> {
    Ok(match kernel {
        Some(f) => format!("{:>12.0}", flops / median_secs(|| Tensor::new(&f()[..1], &Device::Cpu))?),
        None => format!("{missing:>12}"),
    })
}

fn median_secs(mut f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

fn main() -> candle_core::Result<()> {
    // (rows m, out n, in k): expert groups, attention and dense-MLP projections, a long prompt.
    let shapes = [
        (16, 4096, 6144),
        (64, 4096, 6144),
        (64, 6144, 2048),
        (128, 16384, 2048),
        (128, 24576, 6144),
        (1024, 4096, 6144),
    ];
    println!(
        "{:>5} {:>6} {:>6} | {:>14} {:>14} | {:>14} {:>14} | {:>12} {:>12} {:>12}",
        "m",
        "n",
        "k",
        "[n,k] default",
        "[k,n] default",
        "[n,k] packed",
        "[k,n] packed",
        "bf16 panels",
        "AMX tiles",
        "AMX in place"
    );
    let mut rows = Vec::new();
    for pack in [false, true] {
        if pack {
            gemm::set_lhs_packing_threshold_multi_thread(1);
            gemm::set_lhs_packing_threshold_single_thread(1);
        }
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?; // [n, k]
            let wt = w.t()?.contiguous()?; // [k, n]
            let flops = 2.0 * (m * n * k) as f64 / 1e9;
            let stored = flops / median_secs(|| x.matmul(&w.t()?))?;
            let transposed = flops / median_secs(|| x.matmul(&wt))?;
            if pack {
                let bits: Vec<u16> =
                    w.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                let weight = |offset| Bf16Weight::from_bits(&bits, n, k, offset).expect("bf16 weight");
                let xs = &x.flatten_all()?.to_vec1::<f32>()?;
                let (panels, tiles) = (Panels::new(&weight(0)), Tiles::new(&weight(0)));
                // In place, as a checkpoint's rows lie: 2 bytes past a 64-byte line.
                let in_place = InPlace::new(&weight(2));
                let ours = gflops_or(flops, panels.as_ref().map(|p| move || bf16_gemm::matmul(xs, m, p)), "no kernel")?;
                let amx = gflops_or(flops, tiles.as_ref().map(|t| move || amx::matmul(xs, m, t)), "no AMX")?;
                let amx_in_place =
                    gflops_or(flops, in_place.as_ref().map(|t| move || amx::matmul_in_place(xs, m, t)), "no AMX")?;
                rows[i] = format!("{} | {stored:>14.0} {transposed:>14.0} | {ours} {amx} {amx_in_place}", rows[i]);
            } else {
                rows.push(format!("{m:>5} {n:>6} {k:>6} | {stored:>14.0} {transposed:>14.0}"));
            }
        }
    }
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
