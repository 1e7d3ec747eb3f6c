//! The terminal UI on the bundled case: render tests on ratatui's `TestBackend` pin what each view
//! shows (the default case's live run against its reference, and the bundled bf16 port, which
//! has real flips), (`tests/tui_live.rs` drives the real binary and live runs).

mod common;
use common::tui::*;

use std::path::Path;

use glimpse::checkpoint::Checkpoint;
use glimpse::diff::DiffOptions;
use glimpse::dump::{self, Dump, DumpWriter};
use glimpse::flips::Class;
use glimpse::hooks::Selector;
use glimpse::model::moe::Routers;
use glimpse::tui_source::DumpSource;
use glimpse_tui::ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use glimpse_tui::{ui, App, Part, Source, View};

/// The load, DSA and latent-KV views.
#[path = "tui/views.rs"]
mod views;

/// The routing view.
#[path = "tui/routing.rs"]
mod routing;

/// Small terminals, and paging.
#[path = "tui/small.rs"]
mod small;

#[test]
fn layers_view_of_the_default_case() {
    let tmp = tempfile::tempdir().unwrap();
    let src = default_source(tmp.path());
    let s = screen(&App::default(), &src, 80, 24);
    assert!(s.contains("1 layers"), "{s}");
    let words = |l: &str| l.trim_matches('│').split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(words(line_with(&s, "│0 "))[..6], ["0", "dense", "full", "match", "0", "0/0"]);
    assert_eq!(words(line_with(&s, "│3 "))[..6], ["3", "moe", "full", "match", "0", "0/0"]);
    assert!(s.contains("q quit | ? keys | tab view"), "the key help is on screen:\n{s}");
    // `?` lists every key over the view; any key closes it, and esc does not quit.
    let mut app = App::default();
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
    // ctrl-c quits from anywhere: with the help open, and while a filter is typed (it was typed
    // into the filter as a `c`).
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    for open in [App::open_help, App::start_filter] {
        let mut app = App::default();
        open(&mut app);
        app.handle_key(ctrl_c, &src);
        assert!(app.quit && app.filter.is_empty(), "{app:?}");
    }
    // Nothing to jump to.
    let mut app = App::default();
    app.next_problem(&src);
    assert!(screen(&app, &src, 80, 24).contains("no mismatch or flip in any layer"));
}

#[test]
fn layers_view_flags_the_ports_flips() {
    let src = port_source();
    let s = screen(&App::default(), &src, 80, 24);
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
    // Above the table, the first divergence and its reading as `diff` says them on top.
    let (ours, reference) = port_dumps();
    let report = glimpse::diff::diff(&ours, &reference, &port_options()).unwrap();
    let lines = report.first_divergence_lines().unwrap();
    let top = lines.lines().next().unwrap();
    assert!(top.starts_with("first divergence: ") && s.lines().any(|l| l.trim_end() == top), "{top}\n{s}");
    // And diff's note that the port's values are bf16's (its first words: the line wraps).
    let note = &report.precision_notes()[0];
    assert!(s.contains(&format!("note: {}", &note[..40])), "{note}\n{s}");
    // A short terminal cuts the notes, not the table: its header and three rows stay.
    let short = screen(&App::default(), &src, 80, 12);
    assert!(short.contains("first divergence: "), "{short}");
    for row in ["│emb ", "│0 ", "│1 "] {
        line_with(&short, row);
    }
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
    let s = screen(&App::default(), &src, 80, 24);
    let words = |l: &str| l.trim_matches('│').split_whitespace().map(String::from).collect::<Vec<_>>();
    for (label, names) in [("emb", &["input_ids", "embeddings"][..]), ("head", &["final_norm", "logits"])] {
        let bad = names.iter().filter(|n| outside(n)).count();
        assert!(bad > 0, "{label}");
        let row = words(line_with(&s, &format!("│{label} ")));
        assert_eq!((row[3].as_str(), row[4].parse::<usize>().unwrap()), ("MISMATCH", bad), "{s}");
        let first = names.iter().find(|n| outside(n)).unwrap();
        assert_eq!(row[6], *first, "{s}");
    }
    let mut app = App::default();
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
    let s = screen(&App::default(), &src, 80, 24);
    assert!(s.contains("first NaN/Inf of this run: layers.2.attn.kv_latent at [0, 4, 0] = NaN"), "{s}");
    let app = at_view(&src, 3, View::Activations);
    let s = screen(&app, &src, 100, 30);
    let row = line_with(&s, "│input_norm");
    assert_eq!(row.matches("NaN").count(), 4, "mean, std, min, max: {row}");
    let app = at_view(&src, 1, View::Activations);
    let s = screen(&app, &src, 100, 30);
    let worst: Vec<&str> = s.lines().filter(|l| l.contains("layers.1.attn.out at")).collect();
    assert_eq!(worst.len(), 1, "one element differs: {s}");
    assert!(worst[0].contains("at [0, 0, 7]"), "{s}");
    let app = at_view(&src, 2, View::KvNorms);
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
    let mut app = at_view(&src, 2, View::Routing);
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

/// A routing that chooses an expert twice is named so in the activations view, as diff names it.
#[test]
fn an_invalid_routing_is_named_in_the_activations_view() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::golden("flat").join("reference.safetensors");
    let twice = common::edit_dump(&reference, &tmp.path().join("twice.st"), |t| {
        let (_, v, _) = t.iter_mut().find(|(n, _, _)| n == "layers.2.moe.topk_ids").unwrap();
        let dump::Values::I64(ids) = v else { panic!() };
        ids[1] = ids[0];
    });
    let src = dumps_source(&twice, &reference, &DiffOptions::default());
    let app = at_view(&src, 2, View::Activations);
    let s = screen(&app, &src, 130, 40);
    assert!(line_with(&s, "│moe.topk_ids").contains("BAD ours invalid"), "{s}");
}

#[test]
fn activations_view_lists_hook_points_with_stats() {
    let port = port_source();
    let mut app = at_view(&port, 0, View::Activations);
    let s = screen(&app, &port, 130, 30);
    assert!(s.contains("layer 0 activations"), "{s}");
    assert!(line_with(&s, "│attn.out").contains("BAD"), "{s}");
    assert!(line_with(&s, "│input_norm").contains(" 1x32x64 "), "wide terminals show shapes:\n{s}");
    // However wide the terminal, the shape follows the longest name (14 wide here) and a space:
    // the slack goes to the right of the table, not between a name and its numbers.
    let very_wide = screen(&app, &port, 240, 30);
    assert!(line_with(&very_wide, "│input_norm").starts_with("│input_norm     1x32x64"), "{very_wide}");
    assert!(s.contains("out of tolerance (largest error first)"), "{s}");
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
    assert!(s.contains("| filter: Q_Latent"), "{s}");
    // The other views show every hook point: the status line says whose filter it is.
    let mut routing = app.clone();
    routing.set_view(View::Routing);
    assert!(screen(&routing, &port, 100, 24).contains("| activations filter: Q_Latent"));
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
    paged.scroll_up(&port);
    assert_eq!(paged.scroll, (hooks - page).saturating_sub(page));
    assert_eq!(
        glimpse_tui::views::page(&top, &port, ui::body(glimpse_tui::ratatui::layout::Rect::new(0, 0, 80, 24))),
        page
    );
}

/// A dump that names the spec's hook points otherwise (here with a `model.` prefix) compares
/// almost nothing: the status line says so, where every row would read `match`.
#[test]
fn a_misnamed_dump_is_said_in_the_status_line() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = flat().join("reference.safetensors");
    let prefixed = common::edit_dump(&reference, &tmp.path().join("prefixed.st"), |t| {
        for (name, ..) in t.iter_mut().filter(|(n, ..)| n.starts_with("layers.")) {
            *name = format!("model.{name}");
        }
    });
    let src = dumps_source(&prefixed, &reference, &DiffOptions::default());
    let warning = src.warning().unwrap_or_default();
    assert!(warning.starts_with("misnamed: ours names them with a `model.` prefix ("), "{warning}");
    let s = screen(&App::default(), &src, 120, 24);
    assert!(s.contains("warning: misnamed: ours names them with a `model.` prefix"), "{s}");
    // The reference against itself: nothing to say.
    let same = dumps_source(&reference, &reference, &DiffOptions::default());
    assert_eq!(same.warning(), None);
}

/// A tensor of another shape than the reference's was not compared: its verdict names the
/// reference's shape, not an infinite error.
#[test]
fn a_tensor_of_another_shape_says_the_references() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = flat().join("reference.safetensors");
    let reshaped = common::edit_dump(&reference, &tmp.path().join("reshaped.st"), |t| {
        let (_, _, shape) = t.iter_mut().find(|(n, ..)| n == "layers.2.moe.router_logits").unwrap();
        shape.insert(0, 1);
    });
    let src = dumps_source(&reshaped, &reference, &DiffOptions::default());
    let s = screen(&at_view(&src, 2, View::Activations), &src, 160, 40);
    let row = line_with(&s, "moe.router_logits");
    assert!(row.contains("BAD ref shape [32, 16]") && !row.contains("inf"), "{row}");
}

/// The worst element of every float tensor that differs has the tensor's max_abs as its error:
/// routing weights pair by expert, as the comparison does (slot by slot, token 24 of layer 3
/// paired expert 0 with expert 5), and the `-inf` both sides hold past each query in
/// `dsa.scores` (and a `+inf` margin both hold) is no error (it was listed as the worst).
#[test]
fn the_worst_elements_are_the_comparisons_worst() {
    let port = port_source();
    let mut seen = Vec::new();
    for layer in 0..5 {
        for h in port.hooks(Part::Layer(layer)) {
            let Some(r) = h.reference.as_ref().filter(|r| !r.ok && !r.worst.is_empty()) else { continue };
            let w = &r.worst[0];
            approx::assert_abs_diff_eq!((w.ours - w.reference).abs() as f64, r.max_abs, epsilon = 1e-6);
            assert!(r.worst.iter().all(|w| w.ours != w.reference), "{}: {:?}", h.name, r.worst);
            seen.push(h.name);
        }
    }
    for name in ["layers.3.dsa.scores", "layers.2.moe.topk_weights", "layers.4.moe.topk_weights"] {
        assert!(seen.iter().any(|n| n == name), "{name} differs in the port: {seen:?}");
    }
}

/// Paging the latent-kv view stops at the last layer (not the head row, which it does not list),
/// and the DSA view of a batch of two pages over one row's queries, its last page full.
#[test]
fn paging_stops_at_what_the_view_lists() {
    let port = port_source();
    let area = |h| ui::body(glimpse_tui::ratatui::layout::Rect::new(0, 0, 80, h));
    let mut app = at_view(&port, 0, View::KvNorms);
    app.page = glimpse_tui::views::page(&app, &port, area(14));
    for _ in 0..6 {
        app.scroll_down(&port);
    }
    assert_eq!(port.layers()[app.layer].part, Part::Layer(4));
    for _ in 0..6 {
        app.scroll_up(&port);
    }
    assert_eq!(port.layers()[app.layer].part, Part::Layer(0));
    // golden/mtp's reference runs two rows of tokens.
    let mtp = common::golden("mtp").join("reference.safetensors");
    let two = dumps_source(&mtp, &mtp, &DiffOptions::default());
    let seq = two.dsa(0, 0).unwrap().seq;
    assert_eq!(two.tokens(), 2 * seq);
    let mut app = at_view(&two, 0, View::Dsa);
    app.page = glimpse_tui::views::page(&app, &two, area(14));
    for _ in 0..10 {
        app.scroll_down(&two);
    }
    assert!(app.page < seq && app.scroll == seq - app.page, "{} {}", app.scroll, app.page);
}

/// In the routing and DSA views, which keep the selected token in sight, a page moves the
/// selection with it: from the last token PgUp shows the earlier ones (the view could not leave
/// the selection before), and PgDn brings the view back.
#[test]
fn paging_the_routing_and_dsa_views_moves_the_selected_token() {
    let port = port_source();
    let area = ui::body(glimpse_tui::ratatui::layout::Rect::new(0, 0, 80, 24));
    for (view, label) in [(View::Routing, "│s"), (View::Dsa, "│q")] {
        let mut app = App { view, token: port.tokens() - 1, ..at_layer(&port, 3) };
        app.page = glimpse_tui::views::page(&app, &port, area);
        let first_row = |app: &App| {
            let s = screen(app, &port, 80, 24);
            let row = s.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("{s}")).to_string();
            row[label.len()..].split_whitespace().next().unwrap().to_string()
        };
        let bottom = first_row(&app);
        app.scroll_up(&port);
        assert_eq!(app.token, port.tokens() - 1 - app.page, "{view:?}");
        let up = first_row(&app);
        assert!(up != bottom && up.trim_start_matches('#').parse::<usize>().is_ok_and(|t| t < 31), "{view:?}: {up}");
        app.scroll_down(&port);
        assert_eq!((app.token, first_row(&app)), (port.tokens() - 1, bottom), "{view:?}");
    }
}

/// A dump that records indexer scores but no `dsa.margin` (a transformers reference) shows each
/// query's margin recomputed from its scores, as `diff` classes its flips: the k-th causal score
/// minus the (k+1)-th, none where every causal key is kept ("margin -" before).
#[test]
fn dsa_view_recomputes_the_margin_of_a_dump_without_one() {
    let path = Path::new("golden/flat/reference.safetensors");
    let d = Dump::open(path).unwrap();
    assert!(!d.contains("layers.0.dsa.margin") && d.contains("layers.0.dsa.scores"));
    let (glimpse::dump::Values::F32(scores), shape) = d.values("layers.0.dsa.scores").unwrap() else { panic!() };
    let (seq, k) = (shape[1], 8);
    let src = DumpSource::new("reference".into(), Dump::open(path).unwrap(), None, &DiffOptions::default()).unwrap();
    let m = src.dsa(0, 0).unwrap();
    let margin = m.margin.as_ref().expect("recomputed from dsa.scores");
    for q in [0, k - 1, k, seq - 1] {
        let mut row: Vec<f32> = scores[q * seq..=q * seq + q].to_vec();
        row.sort_by(|a, b| b.total_cmp(a));
        let want = if q < k { f32::INFINITY } else { row[k - 1] - row[k] };
        assert_eq!(margin[q], want, "query {q}");
    }
    let mut app = at_view(&src, 0, View::Dsa);
    app.token = k;
    let want = format!("q{k}: margin {:.2e}", margin[k]);
    assert!(screen(&app, &src, 100, 30).contains(&want), "{want}");
    app.token = 0;
    let s = screen(&app, &src, 100, 30);
    assert!(s.contains("q0: margin none (every causal key kept)"));
    // With no reference nothing is compared, and no title or message counts a comparison.
    assert!(s.contains("queries (no reference)") && !s.contains("differ"), "{s}");
    app = at_layer(&src, 2);
    app.set_view(View::Routing);
    let s = screen(&app, &src, 100, 30);
    assert!(s.contains("layer 2 routing: 32 tokens (no reference)") && !s.contains("flips"), "{s}");
    app.next_problem(&src);
    assert!(screen(&app, &src, 100, 30).contains("no reference: nothing compared"));
}

/// The spec requires no name, `input_ids` neither: a dump without it opens (it was refused with
/// "no tensor `input_ids`"), its tokens laid out by its hook points' `[B, S, ...]`, their ids
/// the reference's where it has them, else unknown (`#?`).
#[test]
fn a_dump_without_input_ids_opens_with_its_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = Path::new("golden/flat/reference.safetensors");
    let no_ids = common::edit_dump(golden, &tmp.path().join("no-ids.st"), |t| t.retain(|(n, _, _)| n != "input_ids"));
    let ids = Dump::open(golden).unwrap().tokens().unwrap();
    let alone = DumpSource::new("x".into(), Dump::open(&no_ids).unwrap(), None, &DiffOptions::default()).unwrap();
    assert_eq!(alone.tokens(), ids.seq);
    assert_eq!(alone.token_label(3), "s3 #?");
    let reference = Some(Dump::open(golden).unwrap());
    let both = DumpSource::new("x".into(), Dump::open(&no_ids).unwrap(), reference, &DiffOptions::default()).unwrap();
    assert_eq!(both.token_label(3), format!("s3 #{}", ids.ids[3]));
    let app = at_layer(&both, 3);
    assert!(screen(&app, &both, 80, 24).contains("q quit"));
    // Nothing to lay tokens out by: said, naming the file.
    // (A zero-width tensor's [B, S] is its header's word alone: 2^40 positions asked 4 TB.)
    let nothing = common::edit_dump(golden, &tmp.path().join("none.st"), |t| {
        t.retain(|(n, _, _)| n.ends_with(".moe.topk_ids"));
        t.push(("embeddings".into(), glimpse::dump::Values::F32(vec![]), vec![1, 1 << 40, 0]));
    });
    let err = DumpSource::new("x".into(), Dump::open(&nothing).unwrap(), None, &DiffOptions::default()).err().unwrap();
    assert!(err.to_string().contains("none.st") && err.to_string().contains("holds neither `input_ids`"), "{err}");
}

/// A reference that holds some layers only (a routing-only dump): the layers it holds nothing of
/// read as unchecked (`-`), not as a match.
#[test]
fn layers_the_reference_lacks_are_unchecked() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--tokens-from", "golden/flat/reference.safetensors", "--record", "layers.*.moe.*,logits"];
    let partial = common::run_dump("golden/flat", &args, tmp.path(), "moe.st");
    let src = dumps_source(Path::new("golden/flat/bf16-port.safetensors"), Path::new(&partial), &port_options());
    let s = screen(&App::default(), &src, 100, 24);
    let status = |row: &str| line_with(&s, row).trim_matches('│').split_whitespace().nth(3).unwrap_or("").to_string();
    // Layers 0 and 1 are dense (no `moe.*`) and the embeddings are not recorded; layer 2 routes.
    assert_eq!([status("│emb "), status("│0 "), status("│1 ")], ["-", "-", "-"], "{s}");
    assert_ne!(status("│2 "), "-", "{s}");
}

/// The layers view marks the layer whose output error jumps, as `diff` does (`^` on its status,
/// the NMSE and the factor in the title when it is selected): the place to look when every layer
/// is a little off.
#[test]
fn the_layer_whose_error_jumps_is_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = Path::new("golden/flat/reference.safetensors");
    // Layers 0-1 exact, layer 2's output 1% off and what follows it as well.
    let ours = common::edit_dump(golden, &tmp.path().join("jump.st"), |t| {
        for (name, v, _) in t.iter_mut() {
            let later = ["layers.2.output", "layers.3.output", "layers.4.output"].contains(&name.as_str());
            if let (true, glimpse::dump::Values::F32(x)) = (later, v) {
                x.iter_mut().for_each(|x| *x *= 1.01);
            }
        }
    });
    let src = dumps_source(&ours, golden, &DiffOptions::default());
    let marked: Vec<usize> = src.layers().iter().filter(|l| l.jump.is_some()).filter_map(|l| l.part.layer()).collect();
    assert_eq!(marked, [2]);
    let app = at_layer(&src, 2);
    let s = screen(&app, &src, 100, 24);
    assert!(line_with(&s, "│2 ").contains("MISMATCH^"), "{s}");
    // (The factor is over rounding's level, as `diff` says: layer 1 matched exactly.)
    assert!(s.contains("| output nmse 1.0e-4, ^ x999998 over rounding's level 1e-10"), "{s}");
    let s = screen(&at_layer(&src, 3), &src, 100, 24);
    assert!(s.contains("| output nmse 1.0e-4┐") || s.contains("| output nmse 1.0e-4─"), "{s}");
}

/// The panel below the activations lists the hook points outside the tolerance largest error
/// first: its top lines are the layer's worst (the bf16 port's layer 3: `output`, 3.2854), not
/// the first hook point's in forward order, as a whole (its NMSE and cosine, computed here from
/// the two dumps) and then its worst elements.
#[test]
fn the_worst_elements_are_the_layers_worst_first() {
    let src = port_source();
    let app = at_view(&src, 3, View::Activations);
    let s = screen(&app, &src, 100, 30);
    let mut panel = s.lines().skip_while(|l| !l.contains("out of tolerance (largest error first)")).skip(1);
    let (whole, first) = (panel.next().unwrap_or(""), panel.next().unwrap_or(""));
    let (ours, reference) = port_dumps();
    let values = |d: &glimpse::dump::Dump| match d.values("layers.3.output").unwrap().0 {
        glimpse::dump::Values::F32(v) => v,
        _ => panic!(),
    };
    let (a, e) = (values(&ours), values(&reference));
    let err: f64 = a.iter().zip(&e).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
    let energy: f64 = e.iter().map(|&y| f64::from(y).powi(2)).sum();
    let dot: f64 = a.iter().zip(&e).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (norm(&a) * norm(&e));
    let expected = format!("│layers.3.output: nmse {:.2e}, cos {cos:.6}, ", err / energy);
    assert!(whole.starts_with(&expected), "want {expected}\n{s}");
    assert!(first.contains("layers.3.output at"), "{s}");
    // Its title says how many of the layer's 12 hook points outside the tolerance it has room
    // for; a tall screen gives it what the table's 14 rows leave (it stopped at 8 lines).
    let bad = src.hooks(Part::Layer(3)).iter().filter(|h| h.reference.as_ref().is_some_and(|r| !r.ok)).count();
    assert_eq!(bad, 12);
    let s = screen(&app, &src, 80, 24);
    assert!(s.contains("out of tolerance (largest error first): 1 of 12 shown"), "{s}");
    // A name the hook column cuts says so.
    assert!(s.contains("│moe.router_lo… ") && s.contains("│post_attn_norm "), "{s}");
    // And draws the groups it counts, whole: none of a fifth below the four that fit in 40 rows.
    let s = screen(&app, &src, 80, 40);
    assert!(s.contains(": 4 of 12 shown"), "{s}");
    let groups = s.lines().filter(|l| l.starts_with("│layers.3.") && l.contains(": nmse ")).count();
    assert_eq!(groups, 4, "{s}");
    let s = screen(&app, &src, 160, 60);
    let panel = s.lines().skip_while(|l| !l.contains("out of tolerance")).take_while(|l| !l.starts_with('└'));
    assert!(panel.count() > 30, "{s}");
}

/// Without a config, a layer's feed-forward and indexer read from the names either dump holds of
/// it: a dump of the layers' outputs alone, against a reference that holds their routing and
/// scores, shows the reference's kinds (every layer read `dense ?` from the outputs alone).
#[test]
fn a_dump_of_outputs_alone_takes_the_layer_kinds_from_its_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = flat().join("reference.safetensors");
    let outputs = common::edit_dump(&reference, &tmp.path().join("outputs.st"), |t| {
        t.retain(|(n, ..)| n == "input_ids" || n == "logits" || n.ends_with(".output"))
    });
    let src = dumps_source(&outputs, &reference, &DiffOptions::default());
    let s = screen(&App::default(), &src, 80, 24);
    let names = Dump::open(&reference).unwrap().names();
    let holds = |i: usize, suffix: &str| names.contains(&format!("layers.{i}.{suffix}"));
    let routed = (0..5).filter(|&i| holds(i, "moe.topk_ids")).count();
    assert!(routed > 0 && routed < 5, "the flat case has dense and MoE layers");
    for i in 0..5 {
        let words: Vec<String> =
            line_with(&s, &format!("│{i} ")).trim_matches('│').split_whitespace().map(String::from).collect();
        let ffn = if holds(i, "moe.topk_ids") { "moe" } else { "dense" };
        assert_eq!(words[1], ffn, "layer {i}:\n{s}");
        if holds(i, "dsa.scores") {
            assert_eq!(words[2], "full", "layer {i}:\n{s}");
        }
    }
    // The routing view of a MoE layer whose routing ours did not record says so, and of a dense
    // one that it has no router. Where neither dump routes any layer, no layer is called dense.
    let at_routing = |src: &DumpSource, i| screen(&at_view(src, i, View::Routing), src, 80, 24);
    let (moe, dense) = ((0..5).find(|&i| holds(i, "moe.topk_ids")).unwrap(), 0);
    let s = at_routing(&src, moe);
    assert!(s.contains(&format!("no routing recorded for layer {moe} (moe feed-forward)")), "{s}");
    assert!(at_routing(&src, dense).contains("layer 0 has no router (dense feed-forward)"));
    let unrouted =
        common::edit_dump(&reference, &tmp.path().join("unrouted.st"), |t| t.retain(|(n, ..)| !n.contains(".moe.")));
    let src = dumps_source(&outputs, &unrouted, &DiffOptions::default());
    let s = at_routing(&src, dense);
    assert!(s.contains("no routing recorded for layer 0") && !s.contains("dense"), "{s}");
}

/// The DSA and latent KV views on the embeddings' or the head's row say there is nothing of the
/// kind there and how to get to a layer (an empty box, or "no DSA selection recorded", before).
#[test]
fn the_rows_that_are_not_layers_say_so_in_the_layer_views() {
    let src = port_source();
    for (view, what) in [
        (View::Dsa, "no DSA selection in the embeddings: pick a layer (j/k)"),
        (View::KvNorms, "no latent KV in the embeddings: pick a layer (j/k)"),
    ] {
        let app = App { view, ..App::default() };
        let s = screen(&app, &src, 80, 24);
        assert!(s.contains(what), "{s}");
    }
}

/// A first-divergence note longer than the lines above the table ends with where to read it
/// whole (it stopped mid-sentence): a bf16 port without its shared expert, at bf16's tolerance.
#[test]
fn a_cut_first_divergence_note_says_where_to_read_it_whole() {
    let ckpt = glimpse::checkpoint::Checkpoint::open(Path::new("golden/flat")).unwrap();
    let opts = DiffOptions {
        tol: glimpse::compare::Tolerance { atol: 2e-2, rtol: 2e-2 },
        near_tie: 4e-2,
        routers: Some(glimpse::model::moe::Routers::read(&ckpt).unwrap()),
        config: Some(ckpt.config.clone()),
        checkpoint: Some(std::sync::Arc::new(ckpt)),
        ..Default::default()
    };
    let port = Path::new("golden/flat/port-no-shared-expert-bf16.safetensors");
    let src = dumps_source(port, Path::new("golden/flat/reference.safetensors"), &opts);
    let s = screen(&App::default(), &src, 80, 24);
    assert!(s.contains("... (cut here: `glimpse diff` prints it whole)"), "{s}");
    assert!(!screen(&App::default(), &src, 200, 40).contains("cut here"));
}
