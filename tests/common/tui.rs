//! Helpers of the terminal UI's tests (`tests/tui.rs`, `tests/tui_live.rs`): the bundled case's
//! sources and a screen drawn on ratatui's `TestBackend`.

use std::path::{Path, PathBuf};

use glimpse::checkpoint::Checkpoint;
use glimpse::diff::DiffOptions;
use glimpse::dump::{self, Dump, DumpWriter};
use glimpse::flips::Class;
use glimpse::hooks::Selector;
use glimpse::model::moe::Routers;
use glimpse::model::Model;
use glimpse::tui_source::DumpSource;
use glimpse_tui::ratatui::backend::TestBackend;
use glimpse_tui::ratatui::Terminal;
use glimpse_tui::{ui, App, Part, Source, View};

pub fn flat() -> PathBuf {
    super::golden("flat")
}

/// The default case, run live and compared with its reference (what `glimpse tui` opens).
pub fn default_source(tmp: &Path) -> DumpSource {
    let ckpt = Checkpoint::open(&flat()).unwrap();
    let model = Model::load(&ckpt).unwrap();
    let reference = Dump::open(&flat().join("reference.safetensors")).unwrap();
    let path = tmp.join("live.safetensors");
    let mut w = DumpWriter::create(&path, Selector::default(), model.max_hook_points()).unwrap();
    model.forward(&reference.tokens().unwrap(), &mut w).unwrap();
    w.finish(&dump::metadata("test", None, None)).unwrap();
    let opts = DiffOptions { config: Some(ckpt.config.clone()), ..Default::default() };
    DumpSource::new("default".into(), Dump::open(&path).unwrap(), Some(reference), &opts).unwrap()
}

/// The bundled bf16 port (transformers in bfloat16) against the f32 reference: it has flips,
/// classed with golden/flat's routers (the reference records gate logits, not margins).
pub fn port_source() -> DumpSource {
    let (ours, reference) = port_dumps();
    DumpSource::new("bf16 port".into(), ours, Some(reference), &port_options()).unwrap()
}

/// The dump `ours` against the dump `reference`, compared with `opts`.
pub fn dumps_source(ours: &Path, reference: &Path, opts: &DiffOptions) -> DumpSource {
    let open = |p: &Path| Dump::open(p).unwrap();
    DumpSource::new("ours".into(), open(ours), Some(open(reference)), opts).unwrap()
}

pub fn port_dumps() -> (Dump, Dump) {
    let open = |f: &str| Dump::open(&flat().join(f)).unwrap();
    (open("bf16-port.safetensors"), open("reference.safetensors"))
}

pub fn port_options() -> DiffOptions {
    let routers = Routers::read(&Checkpoint::open(&flat()).unwrap()).unwrap();
    DiffOptions { routers: Some(routers), ..Default::default() }
}

/// The state a session opens in, moved to layer `i`'s row (the embeddings row is above layer 0).
pub fn at_layer(src: &dyn Source, i: usize) -> App {
    App { layer: row_of(src, i), ..App::default() }
}

/// At layer `i`'s row, in `view`.
pub fn at_view(src: &dyn Source, i: usize, view: View) -> App {
    App { view, ..at_layer(src, i) }
}

pub fn row_of(src: &dyn Source, i: usize) -> usize {
    src.layers().iter().position(|l| l.part == Part::Layer(i)).unwrap()
}

pub fn screen(app: &App, src: &dyn Source, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(f, app, src)).unwrap();
    let buf = t.backend().buffer().clone();
    (0..h)
        .map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>().trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn line_with<'a>(screen: &'a str, needle: &str) -> &'a str {
    screen.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no line with {needle:?} in\n{screen}"))
}

/// How `diff` classes the port's flips in the selection `name`, by flat row, to check the views
/// show the same.
pub fn port_classes(name: &str) -> Vec<(usize, Class)> {
    let (ours, reference) = port_dumps();
    let opts = port_options();
    let report = glimpse::diff::diff(&ours, &reference, &opts).unwrap();
    let classes: Vec<(usize, Class)> = report
        .flips()
        .into_iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, f)| (f.row, Class::of(f, opts.near_tie)))
        .collect();
    assert!(classes.iter().all(|c| c.1 != Class::Unknown), "{name}: both dumps give every flip a margin");
    classes
}

/// (near-tie, real) flips among `classes`.
pub fn counts(classes: &[(usize, Class)]) -> (usize, usize) {
    let count = |c| classes.iter().filter(|x| x.1 == c).count();
    (count(Class::NearTie), count(Class::Real))
}

/// Rows of `layers.{layer}.{name}` whose selected set differs between the bundled bf16 port and
/// its reference, counted here from the two transformers dumps (DSA rows keep causal keys only),
/// independently of glimpse's own comparison.
pub fn flipped_rows(layer: usize, name: &str) -> usize {
    flipped_row_ids(layer, name).len()
}

/// The flat rows of the port's selection `name` in `layer` whose set (DSA: of causal keys)
/// differs from the reference's, in order, from the two dumps.
pub fn flipped_row_ids(layer: usize, name: &str) -> Vec<usize> {
    let name = format!("layers.{layer}.{name}");
    let ids = |file: &str| match Dump::open(&flat().join(file)).unwrap().values(&name).unwrap() {
        (glimpse::dump::Values::I64(v), shape) => (v, shape),
        _ => panic!("{name} is not an index tensor"),
    };
    let ((a, shape), (b, _)) = (ids("bf16-port.safetensors"), ids("reference.safetensors"));
    let (k, seq) = (shape[shape.len() - 1], if name.ends_with("dsa.topk") { shape[1] } else { usize::MAX });
    let set = |row: &[i64], r: usize| {
        let mut v: Vec<i64> = row.iter().copied().filter(|&j| seq == usize::MAX || j <= (r % seq) as i64).collect();
        v.sort_unstable();
        v
    };
    a.chunks(k).zip(b.chunks(k)).enumerate().filter(|(r, (x, y))| set(x, *r) != set(y, *r)).map(|(r, _)| r).collect()
}

/// Row `row` of `layer`'s routing in `d`, its margin as its own decision: the lowest biased
/// score (`sigmoid(logit) + bias`) it chose minus the highest it left out.
pub fn routing_margin(d: &Dump, layer: usize, row: usize, bias: &[f32]) -> f32 {
    use glimpse::dump::Values;
    let e = bias.len();
    let (Values::F32(logits), _) = d.values(&format!("layers.{layer}.moe.router_logits")).unwrap() else { panic!() };
    let (Values::I64(ids), shape) = d.values(&format!("layers.{layer}.moe.topk_ids")).unwrap() else { panic!() };
    let k = shape[shape.len() - 1];
    let chosen = &ids[row * k..][..k];
    let score = |j: usize| 1.0 / (1.0 + (-logits[row * e + j]).exp()) + bias[j];
    let (kept, left): (Vec<usize>, Vec<usize>) = (0..e).partition(|&j| chosen.contains(&(j as i64)));
    let low = kept.iter().map(|&j| score(j)).fold(f32::INFINITY, f32::min);
    low - left.iter().map(|&j| score(j)).fold(f32::NEG_INFINITY, f32::max)
}
