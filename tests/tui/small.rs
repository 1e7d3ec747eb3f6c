//! Small terminals and paging where a view has nothing to page.

use super::*;

/// At 40x12 every view's key stays on screen (the tabs shorten to their numbers but the
/// selected view's), the key help line keeps whole entries, and `?` shows whole entries over
/// the whole screen, saying how many fit; at 80x24 all of it shows.
#[test]
fn a_small_terminal_keeps_every_key_in_reach() {
    let port = port_source();
    let mut app = at_view(&port, 3, View::Routing);
    let small = screen(&app, &port, 40, 12);
    let lines: Vec<&str> = small.lines().collect();
    assert_eq!(lines[1], " 1 │ 2 │ 3 routing │ 4 │ 5 │ 6", "{small}");
    assert_eq!(lines[11], "q quit | ? keys | tab view | j/k layer", "{small}");
    let large = screen(&app, &port, 80, 24);
    assert!(large.lines().nth(1).unwrap().contains("1 layers │ 2 activations │ 3 routing"), "{large}");
    assert!(large.lines().nth(23).unwrap().ends_with("/ filter"), "{large}");

    app.help = true;
    let small = screen(&app, &port, 40, 12);
    assert!(small.lines().next().unwrap().starts_with("┌keys: 6 of 9 fit (any key closes)"), "{small}");
    // Each entry shown is whole: its key, and its description's last word.
    for (key, what) in &glimpse_tui::app::KEYS[..6] {
        assert!(small.contains(&format!("│{key}  ")), "{key} in\n{small}");
        let last = what.split_whitespace().last().unwrap();
        assert!(small.contains(last), "{last} in\n{small}");
    }
    assert!(!small.contains("page the view"), "{small}");
    let large = screen(&app, &port, 80, 24);
    assert!(large.contains("┌keys (any key closes)"), "{large}");
    for (key, _) in &glimpse_tui::app::KEYS {
        assert!(large.lines().any(|l| l.starts_with(&format!("│{key} "))), "{key} in\n{large}");
    }
}

/// PgDn and PgUp page the layers view by the rows it shows, moving the selected layer (they did
/// nothing there), and stop at its first and last rows.
#[test]
fn paging_the_layers_view_moves_the_selected_layer() {
    let port = port_source();
    let mut app = App::default();
    app.page = glimpse_tui::views::page(&app, &port, ui::body(glimpse_tui::ratatui::layout::Rect::new(0, 0, 40, 12)));
    // The 12 lines leave 8 to the view, of which the first divergence's note takes 2 and the
    // table's borders and header 3.
    assert_eq!(app.page, 3);
    app.scroll_down(&port);
    assert_eq!(app.layer, 3);
    let s = screen(&app, &port, 40, 12);
    assert!(line_with(&s, "│2 ").starts_with("│2 "), "layer 2, the selected row, is drawn:\n{s}");
    for _ in 0..10 {
        app.scroll_down(&port);
    }
    assert_eq!(app.layer, port.layers().len() - 1);
    app.scroll_up(&port);
    assert_eq!(app.layer, port.layers().len() - 1 - 3);
    for _ in 0..10 {
        app.scroll_up(&port);
    }
    assert_eq!(app.layer, 0);
}

/// A dense layer's routing view lists no tokens: PgDn there leaves the selected token where it
/// was (it moved it, out of sight), as it does in the DSA view of a row that is not a layer.
#[test]
fn paging_a_view_with_no_rows_keeps_the_token() {
    let port = port_source();
    for (view, layer) in [(View::Routing, row_of(&port, 0)), (View::Dsa, 0)] {
        let mut app = App { view, layer, token: 5, page: 8, ..App::default() };
        app.scroll_down(&port);
        app.scroll_up(&port);
        app.scroll_up(&port);
        assert_eq!(app.token, 5, "{view:?}");
    }
}

/// The MTP layer has no row for a batch row's last position: its routing view says so for that
/// token, where no row is highlighted, and not for a token it has.
#[test]
fn the_mtp_routing_view_names_a_token_without_a_row() {
    let dir = common::golden("mtp");
    let reference = dir.join("reference.safetensors");
    let src = dumps_source(&reference, &reference, &DiffOptions::default());
    let seq = src.tokens() / 2;
    let mut app = App { token: seq - 1, ..at_view(&src, 3, View::Routing) };
    let label = src.token_label(seq - 1);
    let s = screen(&app, &src, 100, 24);
    assert!(s.contains(&format!("; {label} has no row")), "{s}");
    app.token = seq - 2;
    let s = screen(&app, &src, 100, 24);
    assert!(!s.contains("has no row"), "{s}");
}

/// The expert-load view keeps the selected layer's row and its two lines of numbers on screen
/// where its rows do not all fit (the numbers followed every row, past the box's bottom), and
/// PgDn and PgUp move the selected layer through its rows.
#[test]
fn the_load_view_keeps_the_selected_layer_and_its_numbers_in_view() {
    let port = port_source();
    let mut app = at_view(&port, 4, View::Load);
    app.page = glimpse_tui::views::page(&app, &port, ui::body(glimpse_tui::ratatui::layout::Rect::new(0, 0, 80, 10)));
    // The 10 lines leave 6 to the view: its borders, the key to the cells and the selected
    // layer's two lines take 5.
    assert_eq!(app.page, 1);
    let s = screen(&app, &port, 80, 10);
    assert!(line_with(&s, "│layer 4 ").contains("MaxVio"), "{s}");
    assert!(s.contains("│layer 4 busiest") && s.contains("│together"), "{s}");
    assert!(!s.contains("│layer 2 "), "{s}");
    app.scroll_up(&port);
    assert_eq!(app.layer, row_of(&port, 3));
    for _ in 0..3 {
        app.scroll_up(&port);
    }
    assert_eq!(app.layer, row_of(&port, 2));
    assert!(screen(&app, &port, 80, 10).contains("│layer 2 busiest"));
    for _ in 0..5 {
        app.scroll_down(&port);
    }
    assert_eq!(app.layer, row_of(&port, 4));
}

/// PgDn in the latent-kv view of a dump that records no decoder layer keeps the selection on a
/// row of the layers view (it went past the last: `j` and `n` then did nothing, and the status
/// line said "no layers").
#[test]
fn paging_the_latent_kv_view_of_a_dump_without_layers_stays_on_a_row() {
    let tmp = tempfile::tempdir().unwrap();
    let port = Path::new("golden/flat/bf16-port.safetensors");
    let ours =
        common::edit_dump(port, &tmp.path().join("head.st"), |t| t.retain(|(n, _, _)| !n.starts_with("layers.")));
    let src = dumps_source(&ours, &ours, &DiffOptions::default());
    let mut app = App { view: View::KvNorms, page: 8, ..App::default() };
    app.scroll_down(&src);
    assert!(app.layer < src.layers().len(), "row {} of {}", app.layer, src.layers().len());
}
