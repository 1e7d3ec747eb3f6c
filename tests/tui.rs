//! The terminal UI on the bundled case: render tests on ratatui's `TestBackend` pin what each view
//! shows (the default case's live run against its reference, and the bundled bf16 port, which
//! has real flips), and a test drives the real binary in tmux.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use glimpse::checkpoint::Checkpoint;
use glimpse::diff::DiffOptions;
use glimpse::dump::{self, Dump, DumpWriter};
use glimpse::flips::Class;
use glimpse::hooks::Selector;
use glimpse::model::moe::Routers;
use glimpse::model::Model;
use glimpse::tui_source::DumpSource;
use glimpse_tui::ratatui::backend::TestBackend;
use glimpse_tui::ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use glimpse_tui::ratatui::Terminal;
use glimpse_tui::{ui, App, Part, Source, View};

fn flat() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat")
}

/// The default case, run live and compared with its reference (what `glimpse tui` opens).
fn default_source(tmp: &Path) -> DumpSource {
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
fn port_source() -> DumpSource {
    let (ours, reference) = port_dumps();
    DumpSource::new("bf16 port".into(), ours, Some(reference), &port_options()).unwrap()
}

fn port_dumps() -> (Dump, Dump) {
    let open = |f: &str| Dump::open(&flat().join(f)).unwrap();
    (open("bf16-port.safetensors"), open("reference.safetensors"))
}

fn port_options() -> DiffOptions {
    let routers = Routers::read(&Checkpoint::open(&flat()).unwrap()).unwrap();
    DiffOptions { routers: Some(routers), ..Default::default() }
}

/// How `diff` classes the port's flips in the selection `name`, by flat row, to check the views
/// show the same.
fn port_classes(name: &str) -> Vec<(usize, Class)> {
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
fn counts(classes: &[(usize, Class)]) -> (usize, usize) {
    let count = |c| classes.iter().filter(|x| x.1 == c).count();
    (count(Class::NearTie), count(Class::Real))
}

/// Rows of `layers.{layer}.{name}` whose selected set differs between the bundled bf16 port and
/// its reference, counted here from the two transformers dumps (DSA rows keep causal keys only),
/// independently of glimpse's own comparison.
fn flipped_rows(layer: usize, name: &str) -> usize {
    flipped_row_ids(layer, name).len()
}

/// The flat rows of the port's selection `name` in `layer` whose set (DSA: of causal keys)
/// differs from the reference's, in order, from the two dumps.
fn flipped_row_ids(layer: usize, name: &str) -> Vec<usize> {
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
fn routing_margin(d: &Dump, layer: usize, row: usize, bias: &[f32]) -> f32 {
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

/// The state a session opens in, moved to layer `i`'s row (the embeddings row is above layer 0).
fn at_layer(src: &dyn Source, i: usize) -> App {
    App { layer: row_of(src, i), ..App::new(src) }
}

fn row_of(src: &dyn Source, i: usize) -> usize {
    src.layers().iter().position(|l| l.part == Part::Layer(i)).unwrap()
}

fn screen(app: &App, src: &dyn Source, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(f, app, src)).unwrap();
    let buf = t.backend().buffer().clone();
    (0..h)
        .map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>().trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn line_with<'a>(screen: &'a str, needle: &str) -> &'a str {
    screen.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no line with {needle:?} in\n{screen}"))
}

#[test]
fn layers_view_of_the_default_case() {
    let tmp = tempfile::tempdir().unwrap();
    let src = default_source(tmp.path());
    let s = screen(&App::new(&src), &src, 80, 24);
    assert!(s.contains("1 layers"), "{s}");
    let words = |l: &str| l.trim_matches('│').split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(words(line_with(&s, "│0 "))[..6], ["0", "dense", "full", "match", "0", "0/0"]);
    assert_eq!(words(line_with(&s, "│3 "))[..6], ["3", "moe", "full", "match", "0", "0/0"]);
    assert!(s.contains("q quit | ? keys | tab view"), "the key help is on screen:\n{s}");
    // `?` lists every key over the view; any key closes it, and esc does not quit.
    let mut app = App::new(&src);
    let esc = KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE);
    app.handle_key(KeyEvent::new(KeyCode::Char('?'), KeyModifiers::NONE), &src);
    let keys = screen(&app, &src, 80, 24);
    for (key, _) in glimpse_tui::app::KEYS {
        assert!(keys.lines().any(|l| l.starts_with(&format!("│{key} "))), "{key} in\n{keys}");
    }
    app.handle_key(esc, &src);
    app.handle_key(esc, &src);
    assert!(!app.help && !app.quit, "{app:?}");
    // A filter kept with enter is cleared by esc.
    app.filter = "q_latent".into();
    app.handle_key(esc, &src);
    assert!(app.filter.is_empty(), "{app:?}");
    // Nothing to jump to.
    let mut app = App::new(&src);
    app.next_problem(&src);
    assert!(screen(&app, &src, 80, 24).contains("no mismatch or flip in any layer"));
}

#[test]
fn layers_view_flags_the_ports_flips() {
    let src = port_source();
    let s = screen(&App::new(&src), &src, 80, 24);
    let row = line_with(&s, "│3 ");
    let (routing, dsa) = (flipped_rows(3, "moe.topk_ids"), flipped_rows(3, "dsa.topk"));
    assert!(routing > 0 && dsa > 0, "the port flips in layer 3");
    let counts = format!("{routing}/{dsa}");
    assert!(row.contains("moe") && row.contains("FLIPS") && row.contains(&counts), "{row}");
    // The first bad column: the layer's first float tensor in the dump's (forward) order with an
    // element outside the default tolerance, found here from the two dumps' values.
    let ours = port_dumps().0;
    let first = ours.names().into_iter().filter(|n| n.starts_with("layers.3.")).find(|n| outside(n)).unwrap();
    let first = first.trim_start_matches("layers.3.");
    assert!(row.contains(&format!(" {first} ")), "{first}: {row}");
}

/// Whether the port's float tensor `name` has an element outside |a - e| <= 1e-4 + 1e-4 |e| of
/// the reference's (a NaN is outside), from the two dumps' values.
fn outside(name: &str) -> bool {
    let (ours, reference) = port_dumps();
    let floats = |d: &Dump| match d.values(name) {
        Ok((glimpse::dump::Values::F32(v), _)) => Some(v),
        _ => None,
    };
    floats(&ours).zip(floats(&reference)).is_some_and(|(a, e)| {
        a.iter().zip(&e).any(|(a, e)| (a - e).abs() > 1e-4 + 1e-4 * e.abs() || a.is_nan() || e.is_nan())
    })
}

/// The embeddings and the head are rows of their own: a difference there shows as a layer's does
/// (the bf16 port's embeddings already differ), and `n` from the embeddings row opens them.
#[test]
fn embeddings_and_head_are_rows_of_their_own() {
    let src = port_source();
    let s = screen(&App::new(&src), &src, 80, 24);
    let words = |l: &str| l.trim_matches('│').split_whitespace().map(String::from).collect::<Vec<_>>();
    for (label, names) in [("emb", &["input_ids", "embeddings"][..]), ("head", &["final_norm", "logits"])] {
        let bad = names.iter().filter(|n| outside(n)).count();
        assert!(bad > 0, "{label}");
        let row = words(line_with(&s, &format!("│{label} ")));
        assert_eq!((row[3].as_str(), row[4].parse::<usize>().unwrap()), ("MISMATCH", bad), "{s}");
        let first = names.iter().find(|n| outside(n)).unwrap();
        assert_eq!(row[6], *first, "{s}");
    }
    let mut app = App::new(&src);
    app.next_problem(&src);
    assert_eq!((app.view, app.layer), (View::Activations, 0));
    assert!(screen(&app, &src, 80, 24).contains("embeddings activations"));
}

/// The reference with some tensors edited, written as a dump: `edit(name, values)` may change
/// any float tensor's values.
fn edited_reference(path: &Path, edit: impl Fn(&str, &mut Vec<f32>)) -> Dump {
    use glimpse::hooks::{HookPoint, Observer};
    let reference = port_dumps().1;
    let mut w = DumpWriter::create(path, Selector::default(), reference.names().len()).unwrap();
    for name in reference.names() {
        let mut t = reference.tensor(&name).unwrap();
        if let Ok(mut v) = t.flatten_all().unwrap().to_vec1::<f32>() {
            edit(&name, &mut v);
            t = candle_core::Tensor::from_vec(v, t.dims(), &candle_core::Device::Cpu).unwrap();
        }
        w.observe(HookPoint::parse(&name).unwrap(), &t).unwrap();
    }
    w.finish(&dump::metadata("edited", None, None)).unwrap();
    Dump::open(path).unwrap()
}

/// Non-finite values are shown as such: the run's first NaN whole above the layers at 80
/// columns, an all-NaN tensor's statistics as NaN (not zeros), a NaN or infinite latent norm as
/// `!` while the layer's other tokens keep their shades; and the worst elements are elements that differ.
#[test]
fn nan_and_inf_are_shown_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = edited_reference(&tmp.path().join("nan.st"), |name, v| match name {
        // Token 4 NaN, token 5 infinite (kv_lora_rank 32): an Inf among the norms would
        // flatten the layer's other tokens to one shade if the scale took it.
        "layers.2.attn.kv_latent" => (v[4 * 32], v[5 * 32]) = (f32::NAN, f32::INFINITY),
        "layers.3.input_norm" => v.iter_mut().for_each(|x| *x = f32::NAN),
        "layers.1.attn.out" => v[7] += 0.05,
        _ => {}
    });
    let src = DumpSource::new("nan".into(), ours, Some(port_dumps().1), &DiffOptions::default()).unwrap();
    let s = screen(&App::new(&src), &src, 80, 24);
    assert!(s.contains("first NaN/Inf of this run: layers.2.attn.kv_latent at [0, 4, 0] = NaN"), "{s}");
    let mut app = at_layer(&src, 3);
    app.set_view(View::Activations);
    let s = screen(&app, &src, 100, 30);
    let row = line_with(&s, "│input_norm");
    assert_eq!(row.matches("NaN").count(), 4, "mean, std, min, max: {row}");
    let mut app = at_layer(&src, 1);
    app.set_view(View::Activations);
    let s = screen(&app, &src, 100, 30);
    let worst: Vec<&str> = s.lines().filter(|l| l.contains("layers.1.attn.out at")).collect();
    assert_eq!(worst.len(), 1, "one element differs: {s}");
    assert!(worst[0].contains("at [0, 0, 7]"), "{s}");
    let mut app = at_layer(&src, 2);
    app.set_view(View::KvNorms);
    let s = screen(&app, &src, 80, 24);
    let cells: String = line_with(&s, "│layer 2 ").chars().skip(11).take(32).collect();
    assert_eq!((cells.chars().nth(4), cells.chars().nth(5)), (Some('!'), Some('!')), "{s}");
    assert!(cells.chars().filter(|&c| c != ' ').count() > 16, "the other tokens keep their shades: {s}");
}

/// In the routing view `n` steps through the layer's flipped tokens in order, then its DSA
/// flips, each counted here from the two dumps.
#[test]
fn next_flip_steps_through_a_layers_flips() {
    let src = port_source();
    let mut app = at_layer(&src, 2);
    app.set_view(View::Routing);
    let (mut routing, mut dsa) = (Vec::new(), Vec::new());
    let mut left = false;
    for _ in 0..64 {
        app.next_problem(&src);
        if app.layer != row_of(&src, 2) {
            left = true;
            break;
        }
        match app.view {
            View::Routing => routing.push(app.token),
            View::Dsa => dsa.push(app.token),
            other => panic!("n opened {other:?} in layer 2"),
        }
    }
    assert!(left, "n never left layer 2");
    // Token 0 is where the view opened: the first press goes past it.
    let routing_want: Vec<usize> = flipped_row_ids(2, "moe.topk_ids").into_iter().filter(|&t| t > 0).collect();
    assert_eq!(routing, routing_want);
    assert_eq!(dsa, flipped_row_ids(2, "dsa.topk"));
}

#[test]
fn routing_view_shows_experts_margins_and_a_flagged_flip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = default_source(tmp.path());
    let mut app = at_layer(&src, 2);
    app.set_view(View::Routing);
    let s = screen(&app, &src, 100, 30);
    assert!(s.contains("layer 2 routing: 32 tokens, 0 flips"), "{s}");
    // Token 0's experts and weights, as the model chose them.
    let routes = src.routing(2).unwrap();
    let r0 = &routes[0];
    let first = format!("{}:{:.2}", r0.ids[0], r0.weights[0]);
    assert!(line_with(&s, "s0 #").contains(&first), "{s}");

    let port = port_source();
    // From the layers view the selected layer counts: layer 0's one DSA flip opens first.
    let mut app = at_layer(&port, 0);
    app.next_problem(&port);
    assert_eq!((app.view, app.layer), (View::Dsa, row_of(&port, 0)));
    // Layer 0 has one DSA flip: the next is layer 1's first.
    app.next_problem(&port);
    assert_eq!((app.view, app.layer), (View::Dsa, row_of(&port, 1)));
    app.next_problem_row(&port); // layer 2 has routing flips: the routing view opens on the first.
    assert_eq!((app.view, app.layer), (View::Routing, row_of(&port, 2)));
    let s = screen(&app, &port, 120, 30);
    let classes = port_classes("layers.2.moe.topk_ids");
    let (near, real) = counts(&classes);
    let title = format!("layer 2 routing: 32 tokens, {} flips ({near}~ {real}!)", near + real);
    assert_eq!(near + real, flipped_rows(2, "moe.topk_ids"));
    assert!(s.contains(&title), "{title}\n{s}");
    let flip = line_with(&s, &format!("s{} #", app.token));
    let class = match classes.iter().find(|c| c.0 == app.token).map(|c| c.1) {
        Some(Class::NearTie) => "FLIP~",
        Some(Class::Real) => "FLIP!",
        other => panic!("the cursor's token {} is not a classed flip: {other:?}", app.token),
    };
    // What differs, from the two dumps: `-` the reference's experts we lack, `+` ours it lacks.
    let row = |d: &Dump| match d.values("layers.2.moe.topk_ids").unwrap() {
        (glimpse::dump::Values::I64(v), shape) => v[app.token * shape[1]..][..shape[1]].to_vec(),
        _ => panic!("expert ids are integers"),
    };
    let (ours, reference) = port_dumps();
    let (ours, reference) = (row(&ours), row(&reference));
    let only = |a: &[i64], b: &[i64]| a.iter().filter(|x| !b.contains(x)).copied().collect::<Vec<_>>();
    let differs = format!("{class} -{:?} +{:?}", only(&reference, &ours), only(&ours, &reference));
    assert!(flip.contains(&differs), "cursor on the flipped token, classed: {differs} in {flip}");
}

/// A transformers dump records gate logits, no `moe.margin`: given the checkpoint's routers, the
/// routing view shows each token's margin recomputed from them, here checked against the flat
/// sigmoid-plus-bias rule computed in the test (k-th minus (k+1)-th biased score).
#[test]
fn routing_view_recomputes_margins_a_dump_does_not_record() {
    let (reference, again) = (port_dumps().1, port_dumps().1);
    let src = DumpSource::new("reference".into(), again, Some(reference), &port_options()).unwrap();
    let ckpt = Checkpoint::open(&flat()).unwrap();
    let (k, e) = (ckpt.config.num_experts_per_tok, ckpt.config.n_routed_experts);
    let bias = Routers::read(&ckpt).unwrap().bias[&2].clone();
    let logits = match port_dumps().1.values("layers.2.moe.router_logits").unwrap() {
        (glimpse::dump::Values::F32(v), _) => v,
        _ => panic!("router logits are floats"),
    };
    let routes = src.routing(2).unwrap();
    assert_eq!(routes.len(), 32, "one row a token");
    for (t, route) in routes.iter().enumerate() {
        let mut scores: Vec<f32> =
            logits[t * e..][..e].iter().zip(&bias).map(|(&l, &b)| 1.0 / (1.0 + (-l).exp()) + b).collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        let margin = route.margin.unwrap_or_else(|| panic!("token {t} has a margin"));
        assert!((margin - (scores[k - 1] - scores[k])).abs() < 1e-6, "token {t}: {margin}");
    }
    let mut app = at_layer(&src, 2);
    app.set_view(View::Routing);
    let s = screen(&app, &src, 100, 30);
    assert!(line_with(&s, "s0 #").contains(&format!("{:.2e}", routes[0].margin.unwrap())), "{s}");
}

#[test]
fn activations_view_lists_hook_points_with_stats() {
    let port = port_source();
    let mut app = at_layer(&port, 0);
    app.set_view(View::Activations);
    let s = screen(&app, &port, 130, 30);
    assert!(s.contains("layer 0 activations"), "{s}");
    assert!(line_with(&s, "│attn.out").contains("BAD"), "{s}");
    assert!(line_with(&s, "│input_norm").contains("[1, 32, 64]"), "wide terminals show shapes:\n{s}");
    assert!(s.contains("worst elements"), "{s}");
    // A selection's error is the rows that differ, counted here from the two dumps.
    let layer2 = App { layer: row_of(&port, 2), ..app.clone() };
    let s2 = screen(&layer2, &port, 130, 40);
    let rows = format!("BAD {} rows", flipped_rows(2, "moe.topk_ids"));
    assert!(line_with(&s2, "│moe.topk_ids").contains(&rows), "{rows}: {s2}");
    app.start_filter();
    // Case-insensitive.
    for c in "Q_Latent".chars() {
        app.filter_push(c);
    }
    app.finish_filter();
    let s = screen(&app, &port, 80, 24);
    assert!(s.contains("│attn.q_latent") && !s.contains("│attn.out "), "{s}");
    // `/` starts a new filter; one that matches nothing says so.
    app.start_filter();
    "zzz".chars().for_each(|c| app.filter_push(c));
    app.finish_filter();
    assert!(screen(&app, &port, 80, 24).contains("no hook point matches \"zzz\""));
    // Unfiltered at 80x24 the rows run past the bottom: the title says which are shown, and
    // paging stops at the last full page (the table stays full).
    app.start_filter();
    app.finish_filter();
    let top = screen(&app, &port, 80, 24);
    let hooks = port.hooks(Part::Layer(0)).len();
    let page: usize = top.split("rows 1-").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(page < hooks && top.contains(&format!("rows 1-{page} of {hooks}")), "{top}");
    for _ in 0..10 {
        app.scroll_down(&port);
    }
    let bottom = screen(&app, &port, 80, 24);
    assert!(bottom.contains(&format!("rows {}-{hooks} of {hooks}", hooks - page + 1)), "{bottom}");
    // With the page the terminal loop measures, PgDn stops at the last full page and PgUp moves
    // back from there at once.
    let top = App { scroll: 0, page, ..app.clone() };
    let mut paged = top.clone();
    for _ in 0..10 {
        paged.scroll_down(&port);
    }
    assert_eq!(paged.scroll, hooks - page);
    paged.scroll_up();
    assert_eq!(paged.scroll, (hooks - page).saturating_sub(page));
    assert_eq!(
        glimpse_tui::views::page(&top, &port, ui::body(glimpse_tui::ratatui::layout::Rect::new(0, 0, 80, 24))),
        page
    );
}

#[test]
fn load_dsa_and_kv_views_draw_the_bundled_case() {
    let port = port_source();
    let mut app = at_layer(&port, 3);
    app.set_view(View::Load);
    let s = screen(&app, &port, 80, 24);
    assert!(s.contains("expert load (16 experts") && s.contains("layer 4") && s.contains("MaxVio"), "{s}");
    // Against the reference, each layer's net load moved: sum |ours - ref| / 2 over the slots,
    // counted here from the two dumps' expert ids.
    let (ours, reference) = port_dumps();
    for layer in 2..5 {
        let name = format!("layers.{layer}.moe.topk_ids");
        let counts = |d: &Dump| match d.values(&name).unwrap() {
            (glimpse::dump::Values::I64(v), _) => v.iter().fold(vec![0i64; 16], |mut c, &e| {
                c[e as usize] += 1;
                c
            }),
            _ => panic!("ids"),
        };
        let (a, b) = (counts(&ours), counts(&reference));
        let moved =
            a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<i64>() as f64 / 2.0 / b.iter().sum::<i64>() as f64;
        assert!(line_with(&s, &format!("layer {layer} ")).contains(&format!("moved {:5.1}%", 100.0 * moved)), "{s}");
    }

    app.set_view(View::Dsa);
    let s = screen(&app, &port, 80, 24);
    let classes = port_classes("layers.3.dsa.topk");
    let (near, real) = counts(&classes);
    assert_eq!(near + real, flipped_rows(3, "dsa.topk"));
    let title = format!("layer 3 dsa (full): 32 queries, {} differ ({near}~ {real}!)  # both +ours -ref", near + real);
    assert!(s.contains(&title), "{title}\n{s}");
    // 40 columns: 13 for the label, 2 borders, 24 keys and the `>` column. A row ends in `>`
    // exactly when it differs at a key past 23, counted here from the two dumps.
    let narrow_app = App { token: 31, ..app.clone() };
    let narrow = screen(&narrow_app, &port, 40, 24);
    assert!(narrow.contains("keys 0-23 of 32"), "{narrow}");
    let sets = |d: &Dump| match d.values("layers.3.dsa.topk").unwrap() {
        (glimpse::dump::Values::I64(v), shape) => v.chunks(shape[2]).map(<[i64]>::to_vec).collect::<Vec<_>>(),
        _ => panic!("DSA selections are integers"),
    };
    let (ours, reference) = port_dumps();
    let (ours, reference) = (sets(&ours), sets(&reference));
    let mut marked = 0;
    for q in 0..32usize {
        let Some(line) = narrow.lines().find(|l| l.contains(&format!("│q{q:<5} "))) else { continue };
        let differs = |k: i64| ours[q].contains(&k) != reference[q].contains(&k);
        let hidden = (24..=q as i64).any(differs);
        assert_eq!(line.trim_end_matches('│').trim_end().ends_with('>'), hidden, "q{q}: {line}");
        marked += usize::from(hidden);
    }
    assert!(marked > 0, "some row differs past the shown keys:\n{narrow}");
    // Each flipped query on screen is marked with its class after its recall (its label's last
    // character); the others are not.
    let label = |q: usize| -> Option<String> {
        let line = s.lines().find(|l| l.contains(&format!("│q{q:<5} ")))?;
        Some(line.split('│').nth(1)?.chars().take(12).collect())
    };
    let shown: Vec<usize> = (0..32).filter(|&q| label(q).is_some()).collect();
    assert!(classes.iter().any(|c| shown.contains(&c.0)), "a flipped query is on screen:\n{s}");
    for q in shown {
        let mark = match classes.iter().find(|c| c.0 == q).map(|c| c.1) {
            Some(Class::NearTie) => '~',
            Some(Class::Real) => '!',
            _ => ' ',
        };
        assert_eq!(label(q).and_then(|l| l.chars().last()), Some(mark), "q{q}:\n{s}");
    }
    // Query 0 keeps its only key, on both sides.
    assert!(line_with(&s, "q0 ").contains("1.00  #"), "{s}");
    // The selected query's margins at the bottom: a flip's both sides, as diff computes them.
    let (ours, theirs) = port_dumps();
    let report = glimpse::diff::diff(&ours, &theirs, &port_options()).unwrap();
    let c = report.results.iter().find(|c| c.name == "layers.3.dsa.topk").unwrap();
    let glimpse::compare::Detail::Sets { flips, .. } = &c.detail else { panic!("a selection") };
    let f = &flips[0];
    let q = App { token: f.row, ..app.clone() };
    let both = format!("q{}: margin {:.2e} (ref {:.2e})", f.row, f.margin_ours.unwrap(), f.margin_reference.unwrap());
    assert!(screen(&q, &port, 80, 24).contains(&both), "{both}");
    // And those margins are each side's indexer scores' gap at the cut, computed here.
    let gap = |d: &Dump| format!("{:.2e}", common::dsa_margin_from_scores(d, 3, f.row));
    assert!(both.contains(&format!("margin {} (ref {})", gap(&ours), gap(&theirs))), "{both}");

    app.set_view(View::KvNorms);
    app.token = 28;
    let s = screen(&app, &port, 80, 24);
    assert!(s.contains("latent kv norm") && s.contains("|kv_latent|"), "{s}");
    // The selected token's norm on both sides, from the two dumps' kv_latent of layer 3.
    let norm = |d: &Dump| match d.values("layers.3.attn.kv_latent").unwrap() {
        (glimpse::dump::Values::F32(v), shape) => {
            let r = shape[shape.len() - 1];
            v[28 * r..][..r].iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt()
        }
        _ => panic!("floats"),
    };
    let (ours, reference) = port_dumps();
    let both = format!("|kv_latent| {:.4} (ref {:.4})", norm(&ours), norm(&reference));
    assert!(s.contains(&both), "{both} in {s}");
    // Resize: the same state draws at another size, key help still on screen, and the selected
    // layer's row stays in view.
    let small = screen(&app, &port, 40, 12);
    assert!(small.contains("latent kv") && small.contains("q quit"), "{small}");
    assert!(small.contains("layer 3"), "{small}");
}

/// tmux on a server of this test process's own (`-L`), so other tmux users, another run of
/// this test among them, cannot end its sessions.
fn tmux_command() -> Command {
    let mut c = Command::new("tmux");
    c.args(["-L", &format!("glimpse-test-{}", std::process::id())]);
    c
}

fn tmux(args: &[&str]) -> String {
    let o = tmux_command().args(args).output().expect("tmux runs");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The real binary in a real terminal: open the default case, step down two layers; then the
/// bf16 port, step down two layers, open that layer's flips and jump to the next layer's.
#[test]
fn the_binary_in_tmux() {
    if Command::new("tmux").arg("-V").output().is_err() {
        // CI installs tmux and must run this; elsewhere say why it was skipped.
        assert!(std::env::var_os("CI").is_none(), "tmux is required in CI (.ci/run installs it)");
        eprintln!("skipped: tmux is not installed (apt-get install tmux to run this test)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_glimpse");
    let root = env!("CARGO_MANIFEST_DIR");
    let session = format!("glimpse-test-{}", std::process::id());
    let wait_for = |needle: &str| {
        for _ in 0..100 {
            let s = tmux(&["capture-pane", "-p", "-t", &session]);
            if s.contains(needle) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{needle:?} never appeared:\n{}", tmux(&["capture-pane", "-p", "-t", &session]));
    };
    let run = |cmd: String| {
        tmux(&["kill-session", "-t", &session]);
        let o = tmux_command()
            .args(["new-session", "-d", "-s", &session, "-x", "80", "-y", "24", "-c", root, &cmd])
            .status()
            .unwrap();
        assert!(o.success());
    };

    run(format!("{bin} tui"));
    let s = wait_for("1 layers");
    assert!(s.contains("golden/flat (live) vs reference"), "{s}");
    // The first row is the embeddings: three rows down is layer 2.
    tmux(&["send-keys", "-t", &session, "j", "j", "j"]);
    let s = wait_for("layer 2 (moe, full)");
    assert!(s.contains("match"), "{s}");

    run(format!("{bin} tui --dump golden/flat/bf16-port.safetensors --golden golden/flat/reference.safetensors"));
    wait_for("1 layers");
    tmux(&["send-keys", "-t", &session, "j", "j", "j"]);
    wait_for("layer 2 (moe, full)");
    // From the layers view the selected layer's own flips open first, one by one (routing, then
    // DSA), then the next layer's.
    tmux(&["send-keys", "-t", &session, "n"]);
    wait_for("layer 2: FLIPS");
    tmux(&["send-keys", "-t", &session, "n"]);
    wait_for("layer 2: routing flip at s");
    let rest = flipped_rows(2, "moe.topk_ids") - 2 + flipped_rows(2, "dsa.topk");
    for _ in 0..rest {
        tmux(&["send-keys", "-t", &session, "n"]);
    }
    let last = flipped_row_ids(2, "dsa.topk").last().copied().unwrap();
    let s = wait_for(&format!("layer 2: dsa flip at s{last} #"));
    assert!(!s.contains("layer 3"), "{s}");
    tmux(&["send-keys", "-t", &session, "n"]);
    let s = wait_for("layer 3: FLIPS");
    assert!(s.contains(&format!("layer 3 routing: 32 tokens, {} flips", flipped_rows(3, "moe.topk_ids"))), "{s}");
    assert!(s.contains("FLIP! -["), "{s}");
    tmux(&["send-keys", "-t", &session, "q"]);

    // SIGTERM from outside ends it with the status a shell gives a process that signal ends
    // (143), with the terminal restored (a process the signal killed would leave the UI drawn).
    let dir = tempfile::tempdir().unwrap();
    let (pid_file, rc_file) = (dir.path().join("pid"), dir.path().join("rc"));
    run(format!("sh -c 'echo $$ > {}; {bin} tui; echo $? > {}; sleep 30'", pid_file.display(), rc_file.display()));
    wait_for("1 layers");
    let shell = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    let pid: i32 = (0..100)
        .find_map(|_| {
            let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).ok()?;
            let pid = children.split_whitespace().next().and_then(|p| p.parse().ok());
            if pid.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            pid
        })
        .unwrap_or_else(|| panic!("no child of the shell {shell}"));
    // SAFETY: signalling the TUI this test started (the only child of its shell).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // The shell creates the file before it writes the status: a whole line is the status.
    let rc = (0..100)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::read_to_string(&rc_file).ok().filter(|s| s.ends_with('\n'))
        })
        .unwrap_or_default();
    assert_eq!(rc.trim(), "143");
    let restored = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        !tmux(&["capture-pane", "-p", "-t", &session]).contains("1 layers")
    });
    assert!(restored, "the terminal is restored: {}", tmux(&["capture-pane", "-p", "-t", &session]));
    tmux(&["kill-session", "-t", &session]);
}

/// A dump whose last layer is the MTP head (S-1 positions, `layers.{N}.*` past the main layers)
/// draws in every view, on every layer and token, without a panic.
#[test]
fn every_view_draws_a_dump_with_the_mtp_layer() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/mtp");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let reference = Dump::open(&dir.join("reference.safetensors")).unwrap();
    let again = Dump::open(&dir.join("reference.safetensors")).unwrap();
    let opts = DiffOptions { config: Some(ckpt.config), ..Default::default() };
    let src = DumpSource::new("mtp".into(), again, Some(reference), &opts).unwrap();
    let mut app = App::default();
    let mut seen_mtp_layer = false;
    for view in [View::Layers, View::Activations, View::Routing, View::Load, View::Dsa, View::KvNorms] {
        app.set_view(view);
        for _ in 0..6 {
            for _ in 0..20 {
                let s = screen(&app, &src, 80, 24);
                assert!(s.contains("q quit"), "{s}");
                seen_mtp_layer |= src.layers()[app.layer].part == Part::Layer(3);
                app.next_token(&src);
            }
            app.next_layer(&src);
        }
        app.layer = 0;
    }
    assert!(seen_mtp_layer, "the MTP layer (3) was reachable");
    // Batch 2: the DSA view says which row it shows, and follows the token into the second.
    let mut app = at_layer(&src, 0);
    app.set_view(View::Dsa);
    assert!(screen(&app, &src, 80, 24).contains("16 queries (batch row 0 of 2),"));

    app.token = 16;
    assert!(screen(&app, &src, 80, 24).contains("16 queries (batch row 1 of 2),"));
    // The MTP layer runs one position fewer a batch row: its rows are the run's tokens but the
    // last of each row (2 rows of 16 tokens here), and its DSA queries of batch row 1 are row 1's.
    let seq = src.tokens() / 2;
    let tokens: Vec<usize> = src.routing(3).unwrap().iter().map(|r| r.token).collect();
    let want: Vec<usize> = (0..2).flat_map(|b| (0..seq - 1).map(move |q| b * seq + q)).collect();
    assert_eq!(tokens, want);
    let reference = Dump::open(&dir.join("reference.safetensors")).unwrap();
    let (idx, shape) = match reference.values("layers.3.dsa.topk").unwrap() {
        (glimpse::dump::Values::I64(v), s) => (v, s),
        _ => panic!("selections are integers"),
    };
    assert_eq!(shape[1], seq - 1);
    let m = src.dsa(3, seq).unwrap();
    // Batch row 1's last MTP query: its causal keys, as the dump holds them for row 1 (read at
    // the main run's row length, they would lie past the tensor's end).
    let (k, q) = (shape[2], seq - 2);
    let keys = |flat_row: usize| {
        let mut r: Vec<usize> =
            idx[flat_row * k..][..k].iter().filter_map(|&j| usize::try_from(j).ok()).filter(|&j| j <= q).collect();
        r.sort_unstable();
        r.dedup();
        r
    };
    assert_eq!(keys(seq - 1 + q).len(), k, "a full selection");
    assert_eq!(m.selected[q], keys(seq - 1 + q));
    assert!(m.selected[seq - 1].is_empty(), "the MTP layer has no query at the last position");
    // The latent-KV grid lays the MTP layer's rows out by the same tokens: batch row 1's norms
    // are the dump's rows seq-1.., each batch row's last token has none.
    let latent = match reference.values("layers.3.attn.kv_latent").unwrap() {
        (glimpse::dump::Values::F32(v), s) => {
            v.chunks(s[2]).map(|c| c.iter().map(|x| x * x).sum::<f32>().sqrt()).collect::<Vec<_>>()
        }
        _ => panic!("the latent is float"),
    };
    assert_eq!(latent.len(), 2 * (seq - 1));
    let g = src.kv_norms().unwrap();
    let row = &g.latent[g.layers.iter().position(|&l| l == 3).unwrap()];
    assert_eq!(row.len(), 2 * seq);
    for b in 0..2 {
        for q in 0..seq - 1 {
            let (ours, want) = (row[b * seq + q].unwrap(), latent[b * (seq - 1) + q]);
            assert!((ours - want).abs() <= 1e-4 * want.max(1.0), "b{b} s{q}: {ours} against {want}");
        }
        assert_eq!(row[b * seq + seq - 1], None, "batch row {b}'s last token has no MTP row");
    }
    let main = &g.latent[g.layers.iter().position(|&l| l == 0).unwrap()];
    assert!(main.iter().all(Option::is_some), "a main layer has every token");
}

/// Live runs in this process, one at a time: one test looks for temporary files a live run left.
static LIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `tui --device cpu-ops`: the live run goes through the device path, says so in its title, and
/// every view draws it.
#[test]
fn the_live_run_can_go_through_the_device_path() {
    let _one_live_run_at_a_time = LIVE.lock();
    let src = glimpse::tui_source::open(&glimpse::tui_source::Open {
        model: Some(&flat()),
        golden: None,
        dump: None,
        tokens: None,
        prompt: None,
        max_memory: None,
        target: glimpse::device::Backend::CpuOps.into(),
        near_tie: None,
        tol: Default::default(),
    })
    .unwrap();
    let mut app = App::new(&src);
    let s = screen(&app, &src, 100, 24);
    assert!(s.contains("(live, cpu-ops, float32) vs reference"), "{s}");
    for view in [View::Activations, View::Routing, View::Dsa, View::KvNorms] {
        app.set_view(view);
        assert!(screen(&app, &src, 80, 24).contains("q quit"));
    }
}

/// A live run of other tokens than the folder's reference ran goes without it, and the title
/// says so; a reference named with --golden must have run the same tokens. The live run's
/// temporary dump is gone as soon as it is open (a killed TUI leaves nothing in the temp folder).
#[test]
fn a_live_run_of_other_tokens_runs_without_the_folders_reference() {
    let _one_live_run_at_a_time = LIVE.lock();
    let reference = flat().join("reference.safetensors");
    let open = |golden: Option<&std::path::Path>| {
        glimpse::tui_source::open(&glimpse::tui_source::Open {
            model: Some(&flat()),
            golden,
            dump: None,
            tokens: Some("1,2,3"),
            prompt: None,
            max_memory: None,
            target: glimpse::device::Backend::Cpu.into(),
            near_tie: None,
            tol: Default::default(),
        })
    };
    let src = open(None).unwrap();
    let s = screen(&App::default(), &src, 100, 24);
    assert!(s.contains("(live, no reference: it ran other tokens)"), "{s}");
    // Without a reference there is nothing to count: the counts read `-`.
    let words: Vec<&str> = line_with(&s, "│0 ").trim_matches('│').split_whitespace().collect();
    assert_eq!(words[3..6], ["-", "-", "-"], "{s}");
    let prefix = format!("glimpse-tui-{}-", std::process::id());
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".safetensors"))
        .collect();
    assert!(left.is_empty(), "left while the TUI runs: {left:?}");
    let err = open(Some(&reference)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("ran other tokens than --tokens/--prompt give"), "{err}");
}

/// At 40 columns the tables drop columns rather than squeeze them: every number shown is whole
/// (a squeezed `max err` column read `2.1` for 2.1e-6, a margin `7.` for 7.67e-2).
#[test]
fn narrow_screens_drop_columns_rather_than_cut_numbers() {
    let src = port_source();
    let mut app = at_layer(&src, 0);
    let s = screen(&app, &src, 40, 14);
    assert!(s.contains("max err") && !s.contains("worst hook"), "{s}");
    // Layer 0's largest error, 1.01, whole to four decimals (written here, not by the view's
    // formatter).
    let worst = src.layers()[row_of(&src, 0)].worst.as_ref().map(|(_, e)| *e).unwrap();
    assert!((1.0..10.0).contains(&worst), "{worst}");
    assert!(line_with(&s, "FLIPS").contains(&format!("{worst:.4}")), "{s}");
    app.next_layer(&src);
    app.next_layer(&src);
    app.set_view(View::Routing);
    // Against a reference the flips stay longest: at 40 columns the token and what differs.
    let routes = src.routing(2).unwrap();
    let flip = routes.iter().find(|r| r.is_flip()).unwrap();
    app.token = flip.token;
    let s = screen(&app, &src, 40, 14);
    assert!(s.contains("vs ref") && !s.contains("margin") && !s.contains("experts"), "{s}");
    assert!(line_with(&s, &format!("s{} #", flip.token)).contains("FLIP"), "{s}");
    // At 60 the margins too, whole: a flip's both sides, `ours (ref)`, as diff computes them.
    let s = screen(&app, &src, 60, 14);
    assert!(s.contains("vs ref") && s.contains("margin (ref)") && !s.contains("experts"), "{s}");
    let (ours, theirs) = port_dumps();
    let report = glimpse::diff::diff(&ours, &theirs, &port_options()).unwrap();
    let c = report.results.iter().find(|c| c.name == "layers.2.moe.topk_ids").unwrap();
    let glimpse::compare::Detail::Sets { flips, .. } = &c.detail else { panic!("a selection") };
    let f = flips.iter().find(|f| f.row == flip.token).unwrap();
    let both = format!("{:.2e} ({:.2e})", f.margin_ours.unwrap(), f.margin_reference.unwrap());
    assert!(line_with(&s, &format!("s{} #", flip.token)).contains(&both), "{both} in {s}");
    // And those margins are each dump's own: the reference's its lowest chosen biased score
    // minus its highest left out, computed here from its gate logits and the checkpoint's bias;
    // the port's the one it recorded (`moe.margin`, from its bf16 arithmetic: within 1e-3 of the
    // same computed in f32).
    let bias = Routers::read(&Checkpoint::open(&flat()).unwrap()).unwrap().bias[&2].clone();
    let own = |d: &Dump| routing_margin(d, 2, flip.token, &bias);
    assert!(
        (f.margin_reference.unwrap() - own(&theirs)).abs() < 1e-6,
        "{} against {}",
        f.margin_reference.unwrap(),
        own(&theirs)
    );
    let recorded = match ours.values("layers.2.moe.margin").unwrap() {
        (glimpse::dump::Values::F32(v), _) => v[flip.token],
        _ => panic!("margins are floats"),
    };
    assert_eq!(f.margin_ours, Some(recorded));
    assert!((recorded - own(&ours)).abs() < 1e-3, "{recorded} against {}", own(&ours));
    app.token = 0;
    let s = screen(&app, &src, 60, 14);
    let margin = format!("{:.2e}", routes[0].margin.unwrap());
    assert!(line_with(&s, "s0 ").contains(&format!(" {margin} ")), "{margin} in {s}");
    // At 80 the experts column holds whole entries, in order, and says how many more.
    let s = screen(&app, &src, 80, 14);
    let r0 = &routes[0];
    let words: Vec<&str> = line_with(&s, "s0 ").trim_matches('│').split_whitespace().skip(2).collect();
    let shown = words.iter().take_while(|w| !w.starts_with('+')).count();
    assert!(shown >= 1 && shown < r0.ids.len(), "{s}");
    for (j, w) in words[..shown].iter().enumerate() {
        assert_eq!(*w, format!("{}:{:.2}", r0.ids[j], r0.weights[j]), "{s}");
    }
    assert_eq!(words[shown], format!("+{}", r0.ids.len() - shown), "{s}");
}

/// A live run's temporary dump whose process is gone (killed during its prefill, or by SIGKILL)
/// is removed by the next live run; a running process's and unrelated files stay.
#[test]
fn stale_live_dumps_of_dead_processes_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    // Past any pid_max, so no process has it (a finished child's pid could be reused).
    let dead = i32::MAX as u32;
    let own = std::process::id();
    let names = [
        format!("glimpse-tui-{dead}-0.safetensors"),
        format!("glimpse-tui-{dead}-1.safetensors.{dead}.partial"),
        format!("glimpse-tui-{own}-0.safetensors"),
        "notes.txt".to_string(),
    ];
    for n in &names {
        std::fs::write(dir.path().join(n), b"x").unwrap();
    }
    glimpse::tui_source::sweep_live_dumps(dir.path());
    let left: Vec<bool> = names.iter().map(|n| dir.path().join(n).exists()).collect();
    assert_eq!(left, [false, false, true, true]);
}

/// `tui --model` naming another checkpoint than the dumps ran is said in the status line (a
/// warning on stderr would be hidden behind the UI); the right one says nothing.
#[test]
fn another_models_checkpoint_is_said() {
    let other = open_port(Some(&flat().with_file_name("mtp")), Default::default());
    let s = screen(&App::new(&other), &other, 120, 24);
    assert!(s.contains("golden/mtp: not the config.json the dumps ran"), "{s}");
    let right = open_port(Some(&flat()), Default::default());
    assert!(App::new(&right).message.is_empty());
}

/// `tui --dump` of the bundled bf16 port against its reference, as the binary opens it.
fn open_port(model: Option<&Path>, tol: glimpse::compare::Tolerance) -> DumpSource {
    let (port, reference) = (flat().join("bf16-port.safetensors"), flat().join("reference.safetensors"));
    glimpse::tui_source::open(&glimpse::tui_source::Open {
        model,
        golden: Some(&reference),
        dump: Some(&port),
        tokens: None,
        prompt: None,
        max_memory: None,
        target: glimpse::device::Backend::Cpu.into(),
        near_tie: None,
        tol,
    })
    .unwrap()
}

/// `tui --atol/--rtol`: the comparison's tolerance is diff's, so the bf16 port at bf16's 2e-2
/// counts the mismatches diff counts there, and fewer than at the default 1e-4. (This checks
/// the plumbing of the tolerance into the view; `diff`'s rules are checked in their own tests.)
#[test]
fn the_tolerance_is_the_comparisons() {
    let open = |atol: f64| open_port(None, glimpse::compare::Tolerance { atol, rtol: atol });
    let (strict, loose) = (open(1e-4), open(2e-2));
    let tol = glimpse::compare::Tolerance { atol: 2e-2, rtol: 2e-2 };
    let (ours, theirs) = port_dumps();
    let opts = DiffOptions { tol, near_tie: tol.near_tie(), ..Default::default() };
    let report = glimpse::diff::diff(&ours, &theirs, &opts).unwrap();
    for (s, l) in strict.layers().iter().zip(loose.layers()) {
        let Some(i) = l.part.layer() else { continue };
        let prefix = format!("layers.{i}.");
        let want = report.results.iter().filter(|c| !c.ok && c.name.starts_with(&prefix)).count();
        assert_eq!(l.mismatches, want, "layer {i}");
        assert!(l.mismatches <= s.mismatches, "layer {i}: {} then {}", s.mismatches, l.mismatches);
    }
    let total = |src: &DumpSource| src.layers().iter().map(|l| l.mismatches).sum::<usize>();
    assert!(total(&loose) < total(&strict));
}

/// The expert-load view counts a layer's experts as `diff` and `audit` do: the router's width,
/// else the checkpoint's count (given its config), and only with neither the largest id + 1 (a
/// dump without router logits whose tokens chose experts 0 and 1 of 16).
#[test]
fn the_load_view_counts_the_checkpoints_experts_without_router_logits() {
    use candle_core::{Device, Tensor};
    use glimpse::hooks::{HookPoint, LayerHook, Observer};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ids-only.safetensors");
    let mut w = DumpWriter::create(&path, Selector::default(), 2).unwrap();
    let ids = Tensor::from_vec(vec![1i64, 2, 3, 4], (1, 4), &Device::Cpu).unwrap();
    w.observe(HookPoint::InputIds, &ids).unwrap();
    let topk = Tensor::from_vec(vec![0i64, 1, 1, 0, 0, 1, 1, 0], (1, 4, 2), &Device::Cpu).unwrap();
    w.observe(HookPoint::Layer(0, LayerHook::TopkIds), &topk).unwrap();
    w.finish(&dump::metadata("test", None, None)).unwrap();
    let config = Checkpoint::open(&flat()).unwrap().config;
    let load = |config| {
        let opts = DiffOptions { config, ..Default::default() };
        DumpSource::new("ids".into(), Dump::open(&path).unwrap(), None, &opts).unwrap().load()
    };
    let with = load(Some(config));
    assert_eq!(with[0].counts.len(), 16, "the checkpoint's 16 experts");
    assert_eq!(with[0].counts[..2], [4, 4]);
    assert_eq!(load(None)[0].counts.len(), 2, "guessed from the ids");

    // Ids past the config's count (a larger model's dump) are counted, not dropped.
    let mut w = DumpWriter::create(&path, Selector::default(), 2).unwrap();
    w.observe(HookPoint::InputIds, &ids).unwrap();
    let topk = Tensor::from_vec(vec![0i64, 20, 1, 20, 0, 1, 1, 0], (1, 4, 2), &Device::Cpu).unwrap();
    w.observe(HookPoint::Layer(0, LayerHook::TopkIds), &topk).unwrap();
    w.finish(&dump::metadata("test", None, None)).unwrap();
    let config = Checkpoint::open(&flat()).unwrap().config;
    let counts = &load(Some(config))[0].counts;
    assert_eq!((counts.len(), counts[20]), (21, 2));
}
