//! The routing view: each token's experts, weights and margins, a flagged flip, margins a dump
//! does not record recomputed, ids kept whole however narrow the view, invalid ids as recorded,
//! and a layer whose routing rule differs.

use super::*;

#[test]
fn routing_view_shows_experts_margins_and_a_flagged_flip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = default_source(tmp.path());
    let app = at_view(&src, 2, View::Routing);
    let s = screen(&app, &src, 100, 30);
    assert!(s.contains("layer 2 routing: 32 tokens, 0 flips"), "{s}");
    // Token 0's experts and weights, as the model chose them.
    let routes = src.routing(2).unwrap();
    let r0 = &routes[0];
    let first = format!("{}:{}", r0.ids[0], two_decimals(r0.weights[0]));
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
    let app = at_view(&src, 2, View::Routing);
    let s = screen(&app, &src, 100, 30);
    assert!(line_with(&s, "s0 #").contains(&format!("{:.2e}", routes[0].margin.unwrap())), "{s}");
}

/// A flip of three experts each way is shown whole at 80 columns (the column widens), and by
/// its lengths where even that does not fit: never a list cut short.
#[test]
fn a_flip_of_many_experts_is_never_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = flat().join("reference.safetensors");
    // Token 5 of layer 3 takes the 3 experts that follow its others instead of its last 3.
    let ours = common::edit_dump(&reference, &tmp.path().join("ours.st"), |t| {
        let (_, glimpse::dump::Values::I64(ids), shape) =
            t.iter_mut().find(|(n, ..)| n == "layers.3.moe.topk_ids").unwrap()
        else {
            panic!("ids are integers")
        };
        let (k, e) = (shape[1], 16);
        let row = &mut ids[5 * k..6 * k];
        let kept = row.to_vec();
        let mut free = (0..e as i64).filter(|x| !kept.contains(x));
        for slot in &mut row[1..] {
            *slot = free.next().unwrap();
        }
    });
    let src = dumps_source(&ours, &reference, &port_options());
    let app = App { view: View::Routing, token: 5, ..at_layer(&src, 3) };
    let wide = screen(&app, &src, 80, 24);
    let row = line_with(&wide, "│s5 ");
    let lists = row.split("FLIP").nth(1).unwrap_or_else(|| panic!("{wide}"));
    let counts = |side: char| lists.split(side).nth(1).unwrap().split(']').next().unwrap().split(',').count();
    assert!(lists.contains(" -[") && lists.contains(" +[") && counts('-') == 3 && counts('+') == 3, "{row}");
    let narrow = screen(&app, &src, 50, 24);
    assert!(line_with(&narrow, "│s5 ").contains(" -3 +3"), "{narrow}");
}

/// A layer with flips one rule cannot make (here ours's token 0 takes the expert its own
/// biased scores rank last) reads RULE in the layers view, not FLIPS.
#[test]
fn a_layer_whose_rule_differs_reads_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = flat().join("reference.safetensors");
    let ours = common::contradicted_routing(&reference, &flat(), 3, &tmp.path().join("ours.st"));
    // With the checkpoint's config (flat routing), as `tui --model` gives it.
    let opts = DiffOptions { config: Some(Checkpoint::open(&flat()).unwrap().config), ..port_options() };
    let (ours, reference) = (Dump::open(&ours).unwrap(), Dump::open(&reference).unwrap());
    let src = DumpSource::new("rule".into(), ours, Some(reference), &opts).unwrap();
    let status = |i: usize| src.layers()[row_of(&src, i)].status;
    assert_eq!((status(3), status(2)), (glimpse_tui::Status::Rule, glimpse_tui::Status::Match));
    assert!(line_with(&screen(&App::default(), &src, 80, 24), "│3 ").contains("RULE"));
    // The routing view marks the flip R (whatever its margins) and counts it in its title.
    let routes = src.routing(3).unwrap();
    assert_eq!(
        routes.iter().filter(|r| r.flip.is_some()).map(|r| (r.token, r.flip)).collect::<Vec<_>>(),
        [(0, Some(glimpse_tui::FlipClass::Rule))]
    );
    let app = at_view(&src, 3, View::Routing);
    assert!(screen(&app, &src, 100, 24).contains("1R)"), "{}", screen(&app, &src, 100, 24));
}

/// Expert ids outside the router (a port's top-k bug: an id past it, a negative one) show as
/// they are in the routing view, not clamped to expert 0; the load view keeps the router's
/// width, not one column per id up to the largest.
#[test]
fn invalid_expert_ids_show_as_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let port = Path::new("golden/flat/bf16-port.safetensors");
    let bad = common::edit_ints(port, &tmp.path().join("bad.st"), "layers.3.moe.topk_ids", |ids, _| {
        (ids[0], ids[5]) = (999, -3);
    });
    let src = dumps_source(&bad, Path::new("golden/flat/reference.safetensors"), &port_options());
    let mut app = at_view(&src, 3, View::Routing);
    let s = screen(&app, &src, 120, 30);
    assert!(s.contains("999:") && s.contains("-3:"), "{s}");
    app.set_view(View::Load);
    let s = screen(&app, &src, 120, 30);
    let row = line_with(&s, "layer 3 ");
    assert!(row.contains("MaxVio"), "the row keeps its numbers on screen: {s}");
    assert!(s.contains("expert load (16 experts") && s.contains("one cell = 1 expert"), "{s}");
}

/// Where the weights of the layer's rows do not fit, the routing view shows every chosen
/// expert's id rather than two `id:weight` pairs and `+N`; with room, the weights come back. The
/// columns are the layer's, not the rows on screen's: they stay put as the rows scroll.
#[test]
fn a_narrow_routing_view_keeps_every_expert_id() {
    let port = port_source();
    let app = at_view(&port, 2, View::Routing);
    let routes = port.routing(2).unwrap();
    for (width, weighted) in [(70, false), (120, true)] {
        let s = screen(&app, &port, width, 16);
        assert_eq!(s.contains("experts:weight"), weighted, "{s}");
        for r in &routes[..8] {
            let row = line_with(&s, &format!("│s{} #", r.token));
            let entries: Vec<String> = r
                .ids
                .iter()
                .zip(&r.weights)
                .map(|(i, w)| if weighted { format!("{i}:{}", two_decimals(*w)) } else { i.to_string() })
                .collect();
            assert!(row.contains(&format!(" {} ", entries.join(" "))), "{} in\n{s}", entries.join(" "));
        }
    }
    // The reference's layer 2 with its last token's experts all changed: a flip whose lists widen
    // the column against the reference, on every page.
    let tmp = tempfile::tempdir().unwrap();
    let golden = flat().join("reference.safetensors");
    let ours = common::edit_ints(&golden, &tmp.path().join("far.st"), "layers.2.moe.topk_ids", |ids, _| {
        let n = ids.len();
        let taken: Vec<i64> = ids[n - 4..].to_vec();
        let others: Vec<i64> = (0..16).filter(|e| !taken.contains(e)).take(4).collect();
        ids[n - 4..].copy_from_slice(&others);
    });
    let src = dumps_source(&ours, &golden, &DiffOptions::default());
    let app = at_view(&src, 2, View::Routing);
    let last = App { token: src.routing(2).unwrap().last().unwrap().token, ..app.clone() };
    let (top, bottom) = (screen(&app, &src, 100, 16), screen(&last, &src, 100, 16));
    assert!(bottom.contains("FLIP") && !top.contains("FLIP"), "{top}\n{bottom}");
    assert_eq!(line_with(&top, "│token"), line_with(&bottom, "│token"), "{top}\n{bottom}");
}

/// A dump without routing weights shows each token's expert ids (the list was empty, under an
/// `experts:weight` header). (`fit_list`'s own test covers a list too long for its column.)
#[test]
fn a_routing_view_without_weights_shows_the_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let port = flat().join("bf16-port.safetensors");
    let no_weights = common::edit_dump(&port, &tmp.path().join("no-weights.st"), |t| {
        t.retain(|(n, ..)| !n.ends_with(".moe.topk_weights"))
    });
    let src = dumps_source(&no_weights, &flat().join("reference.safetensors"), &port_options());
    let app = at_view(&src, 2, View::Routing);
    let r0 = &src.routing(2).unwrap()[0];
    let ids: Vec<String> = r0.ids.iter().map(|i| i.to_string()).collect();
    let s = screen(&app, &src, 120, 16);
    assert!(!s.contains("experts:weight") && line_with(&s, "│s0 ").contains(&format!(" {} ", ids.join(" "))), "{s}");
}

/// A routing weight as the routing view writes it: two decimals, no leading zero (`.31`).
fn two_decimals(w: f32) -> String {
    let s = format!("{w:.2}");
    s.strip_prefix("0.").map_or(s.clone(), |rest| format!(".{rest}"))
}
