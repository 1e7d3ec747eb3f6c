//! How long the TUI's DSA view takes to draw a long prompt's selection: a dump of 4096 queries
//! each keeping 2048 keys (the first 2048 keep every causal key, the rest random ones, as
//! GLM-5's `index_topk` cuts past 2048), compared with itself, drawn at 160 x 48. The first
//! draw reads the selection; the next ones move along the same batch row. Medians of 5.
//!
//!     cargo run --release --example tui_dsa_redraw

use std::time::Instant;

use candle_core::{Device, Tensor};
use glimpse::bench::median;
use glimpse::diff::DiffOptions;
use glimpse::dump::{self, Dump, DumpWriter};
use glimpse::hooks::{HookPoint, LayerHook, Observer, Selector};
use glimpse::tui_source::DumpSource;
use glimpse_tui::ratatui::backend::TestBackend;
use glimpse_tui::ratatui::Terminal;
use glimpse_tui::{ui, App, View};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (s, k) = (4096usize, 2048usize);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("dsa.safetensors");
    let mut w = DumpWriter::create(&path, Selector::default(), 2)?;
    w.observe(HookPoint::InputIds, &Tensor::from_vec((0..s as i64).collect::<Vec<_>>(), (1, s), &Device::Cpu)?)?;
    let mut x = 12345u64; // xorshift
    let mut idx = Vec::with_capacity(s * k);
    for q in 0..s {
        for j in 0..k {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            idx.push(if q < k { j.min(q) as i64 } else { (x % (q as u64 + 1)) as i64 });
        }
    }
    w.observe(HookPoint::Layer(0, LayerHook::DsaTopk), &Tensor::from_vec(idx, (1, s, k), &Device::Cpu)?)?;
    w.finish(&dump::metadata("tui_dsa_redraw", None, None))?;

    let (mut first, mut next) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let src = DumpSource::new("t".into(), Dump::open(&path)?, Some(Dump::open(&path)?), &DiffOptions::default())?;
        let (mut app, mut term) = (App::default(), Terminal::new(TestBackend::new(160, 48))?);
        app.next_layer(&src);
        app.set_view(View::Dsa);
        for i in 0..2 {
            let t = Instant::now();
            term.draw(|f| ui::draw(f, &app, &src))?;
            [&mut first, &mut next][i].push(t.elapsed().as_secs_f64());
            app.next_token(&src);
        }
    }
    println!("DSA view, {s} queries keeping {k} keys, 160 x 48:");
    println!("  first draw (reads the selection): {:.3} s", median(&first));
    println!("  next token in the same batch row: {:.3} s", median(&next));
    Ok(())
}
