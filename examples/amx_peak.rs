//! How fast, and how steadily, this machine's AMX tile unit multiplies when nothing but its
//! registers is involved (`amx::tile_unit_rate`): 20 rounds of 4 M tile products on one thread,
//! then the same on every core at once. A CPU benchmark's products can go no faster than this;
//! on a shared or virtual machine it also shows how much the unit's own rate moves from one
//! second to the next, which no kernel change can be measured through.
//!
//!     cargo run --release --example amx_peak

use glimpse::model::amx;
use rayon::prelude::*;

const ROUNDS: usize = 1_000_000;

fn main() {
    if amx::tile_unit_rate(1).is_none() {
        println!("no AMX tiles here (or GLIMPSE_NO_AMX is set): nothing to measure");
        return;
    }
    let one: Vec<f64> = (0..20).filter_map(|_| amx::tile_unit_rate(ROUNDS)).collect();
    report("one thread", &one);
    let threads = rayon::current_num_threads();
    let all: Vec<f64> =
        (0..20).map(|_| (0..threads).into_par_iter().filter_map(|_| amx::tile_unit_rate(ROUNDS)).sum()).collect();
    report(&format!("{threads} threads, summed"), &all);
}

fn report(what: &str, rates: &[f64]) {
    let mut sorted = rates.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
    let median = sorted[sorted.len() / 2];
    println!("{what:>20}: median {median:>6.0} GFLOP/s bf16 (min {lo:.0}, max {hi:.0}, max/min {:.2})", hi / lo);
}
