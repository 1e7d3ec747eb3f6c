//! How fast, and how steadily, this machine's AMX tile unit works alone (`amx::tile_rates`):
//! tile products on registers (no memory), and tile loads from L1, 20 rounds of 4 M each on one
//! thread, then the products on every core at once. A CPU benchmark's products can go no faster
//! than the first, and `amx::matmul` loads 8 tiles for each 12 products; on a shared or virtual
//! machine the spread also shows how much the unit's own rate moves from one second to the
//! next, which no kernel change can be measured through.
//!
//!     cargo run --release --example amx_peak

use glimpse::model::amx;
use rayon::prelude::*;

const ROUNDS: usize = 1_000_000;

fn main() {
    if amx::tile_rates(1).is_none() {
        println!("no AMX tiles here (or GLIMPSE_NO_AMX is set): nothing to measure");
        return;
    }
    let one: Vec<amx::TileRates> = (0..20).filter_map(|_| amx::tile_rates(ROUNDS)).collect();
    report("products, one thread", "GFLOP/s bf16", one.iter().map(|r| r.products_gflops));
    report("a tile load, one thread", "ns", one.iter().map(|r| r.load_ns));
    let threads = rayon::current_num_threads();
    let all = (0..20)
        .map(|_| (0..threads).into_par_iter().filter_map(|_| amx::tile_rates(ROUNDS)).map(|r| r.products_gflops).sum());
    report(&format!("products, {threads} threads"), "GFLOP/s bf16", all);
}

fn report(what: &str, unit: &str, rates: impl Iterator<Item = f64>) {
    let mut sorted: Vec<f64> = rates.collect();
    sorted.sort_by(f64::total_cmp);
    let (lo, hi, median) = (sorted[0], sorted[sorted.len() - 1], sorted[sorted.len() / 2]);
    println!("{what:>24}: median {median:>6.1} {unit} (min {lo:.1}, max {hi:.1}, max/min {:.2})", hi / lo);
}
