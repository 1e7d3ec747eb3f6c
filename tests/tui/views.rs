//! Render tests of the load, DSA and latent-KV views, and of every view over a dump with the MTP
//! head's layer.

use super::*;

#[test]
fn load_dsa_and_kv_views_draw_the_bundled_case() {
    let port = port_source();
    let mut app = at_view(&port, 3, View::Load);
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
        let line = line_with(&s, &format!("layer {layer} "));
        assert!(line.contains(&format!("moved {:5.1}%", 100.0 * moved)), "{s}");
        // One cell an expert: `×` where none of its tokens chose it, a shade (never blank) where
        // any did, however few; and the dead count beside MaxVio.
        let cells: Vec<char> = line.split('│').nth(1).unwrap().chars().skip(9).take(16).collect();
        for (e, (&c, &n)) in cells.iter().zip(&a).enumerate() {
            assert_eq!(c == '×', n == 0, "layer {layer} expert {e} ({n} tokens): {line}");
            assert_ne!(c, ' ', "layer {layer} expert {e}: {line}");
        }
        let dead = a.iter().filter(|&&n| n == 0).count();
        assert!(line.contains(&format!("dead {dead:>3}")), "{line}");
    }
    assert!(s.contains("one cell = 1 expert; × = dead (no token)"), "{s}");

    app.set_view(View::Dsa);
    let s = screen(&app, &port, 80, 24);
    let classes = port_classes("layers.3.dsa.topk");
    let (near, real) = counts(&classes);
    assert_eq!(near + real, flipped_rows(3, "dsa.topk"));
    let title = format!("layer 3 dsa (full): 32 queries, {} differ ({near}~ {real}!)  # both +ours -ref", near + real);
    assert!(s.contains(&title), "{title}\n{s}");
    // 40 columns: 13 for the label, 2 borders, the `<` column, 23 keys and the `>` column. The
    // window follows the selected query's diagonal. A row starts with `<` exactly when it differs
    // at a key before the window, and ends in `>` when it does past it, counted here from the
    // two dumps.
    let sets = |d: &Dump| match d.values("layers.3.dsa.topk").unwrap() {
        (glimpse::dump::Values::I64(v), shape) => v.chunks(shape[2]).map(<[i64]>::to_vec).collect::<Vec<_>>(),
        _ => panic!("DSA selections are integers"),
    };
    let (ours, reference) = port_dumps();
    let (ours, reference) = (sets(&ours), sets(&reference));
    for (token, first, last) in [(22, 0, 22), (31, 9, 31)] {
        let narrow = screen(&App { token, scroll: 12, ..app.clone() }, &port, 40, 24);
        assert!(narrow.contains(&format!("keys {first}-{last}:")), "{narrow}");
        let mut marked = 0;
        for q in 0..32usize {
            let Some(line) = narrow.lines().find(|l| l.contains(&format!("│q{q:<5} "))) else { continue };
            let differs = |k: i64| ours[q].contains(&k) != reference[q].contains(&k);
            let (before, past) = ((0..first.min(q as i64 + 1)).any(differs), (last + 1..=q as i64).any(differs));
            let keys = line.split('│').nth(1).unwrap();
            assert_eq!(keys.chars().nth(13) == Some('<'), before, "q{q}: {line}");
            assert_eq!(keys.trim_end().ends_with('>'), past, "q{q}: {line}");
            marked += usize::from(before || past);
        }
        assert!(marked > 0, "some row differs outside the shown keys:\n{narrow}");
    }
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
    let list = |keys: &[i64]| keys.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let both = format!(
        "q{}: margin {:.2e} (ref {:.2e}), only ours {}, only ref {}",
        f.row,
        f.margin_ours.unwrap(),
        f.margin_reference.unwrap(),
        list(&f.only_ours),
        list(&f.only_reference)
    );
    assert!(screen(&q, &port, 100, 24).contains(&both), "{both}");
    // On a narrow screen fewer keys are listed and the rest counted (`+n`): a key is never cut
    // in half (at 80 columns "only ref 4" was the start of 40).
    let mut listed_keys = 0;
    for width in [40, 60, 66, 72] {
        let narrow = screen(&q, &port, width, 24);
        let bottom = narrow.lines().find(|l| l.contains(&format!("q{}: margin", f.row))).unwrap();
        let segment =
            |from: &str, to: &str| bottom.split(from).nth(1).map(|r| r.split(to).next().unwrap_or(r).to_string());
        let (o, r) = (segment("only ours ", ", only ref"), segment("only ref ", " "));
        // (The lists whole, or not at all.)
        assert_eq!(o.is_some(), bottom.contains("only ref "), "{width} columns: {bottom}");
        for (listed, keys) in [(o, &f.only_ours), (r, &f.only_reference)] {
            let Some(listed) = listed else { continue };
            listed_keys += 1;
            for item in listed.split(',').filter(|i| !i.starts_with('+') && !i.contains(' ') && !i.is_empty()) {
                let key: i64 =
                    item.trim_end_matches(['─', '┘']).parse().unwrap_or_else(|_| panic!("{item:?}: {bottom}"));
                assert!(keys.contains(&key), "{width} columns: {key} is not a one-sided key: {bottom}");
            }
        }
    }
    assert!(listed_keys > 0, "some width lists the one-sided keys");
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
    assert!(small.contains("latent kv norm") && small.contains("q quit"), "{small}");
    // (The map's row: the status line and the detail name the layer too.)
    assert!(small.contains("│layer 3   "), "{small}");
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
    // The expert load names the MTP head's layer as audit does.
    app.set_view(View::Load);
    let load = screen(&app, &src, 80, 24);
    assert!(load.contains("│layer 3 mtp ") && load.contains("│layer 2     "), "{load}");
    // Without the config, by its rows: one position short a batch row.
    let bare = Dump::open(&dir.join("reference.safetensors")).unwrap();
    let bare = DumpSource::new("mtp".into(), bare, None, &DiffOptions::default()).unwrap();
    assert!(screen(&app, &bare, 80, 24).contains("│layer 3 mtp "));
    // And the layers view and the status line name it alike, from the dump's `mtp.*` (they read
    // `moe` from its routing).
    let s = screen(&at_layer(&bare, 3), &bare, 80, 24);
    assert!(s.contains("layer 3 (mtp, ") && line_with(&s, "│3 ").contains(" mtp "), "{s}");
    // Batch 2: the DSA view says which row it shows, and follows the token into the second.
    let mut app = at_view(&src, 0, View::Dsa);
    assert!(screen(&app, &src, 80, 24).contains("16 queries (batch row b0 of b0-b1),"));

    app.token = 16;
    assert!(screen(&app, &src, 80, 24).contains("16 queries (batch row b1 of b0-b1),"));
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
    // Its DSA view counts the layer's queries, one fewer a batch row, and says a batch row's last
    // position has none (it drew an empty row, read as a query that kept no key).
    let mut app = at_view(&src, 3, View::Dsa);
    app.token = seq - 1;
    let s = screen(&app, &src, 80, 24);
    assert!(s.contains(&format!("{} queries (batch row b0 of b0-b1),", seq - 1)), "{s}");
    assert!(s.contains(&format!("b0 s{} #", seq - 1)) && s.contains("has no row"), "{s}");
    assert!(!s.contains(&format!("│q{} ", seq - 1)), "{s}");
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

/// A DSA row that keeps a key past its query where a causal key belongs (a causality bug): the
/// footer names the later key it holds, not only the causal key it lost.
#[test]
fn the_dsa_view_names_a_key_past_the_query() {
    let tmp = tempfile::tempdir().unwrap();
    let golden = Path::new("golden/flat/reference.safetensors");
    let ours = common::edit_ints(golden, &tmp.path().join("future.st"), "layers.3.dsa.topk", |ids, shape| {
        ids[20 * shape[2]] = 30;
    });
    let src = dumps_source(&ours, golden, &DiffOptions::default());
    let mut app = at_view(&src, 3, View::Dsa);
    app.token = 20;
    let s = screen(&app, &src, 120, 30);
    assert!(s.contains("only ours none (holds 30 past q20), only ref"), "{s}");
}

/// The latent KV map: each layer's lowest norm is drawn `░` (blank is only a token without a
/// row), and a port whose `kv_a_layernorm` weight was never loaded (transformers, a planted bug:
/// every norm sqrt(kv_lora_rank) up to f32 noise) is drawn flat and said to be, where stretching
/// its 3e-6 spread had made it look as varied as the reference's.
#[test]
fn the_latent_kv_map_shows_flat_layers_flat_and_no_blank_minimum() {
    let reference = Path::new("golden/flat/reference.safetensors");
    let row = |s: &str, layer: usize| {
        let line = line_with(s, &format!("│layer {layer} "));
        line.trim_end_matches('│').trim_end().chars().skip(11).collect::<String>()
    };
    let src = dumps_source(reference, reference, &DiffOptions::default());
    let app = at_view(&src, 0, View::KvNorms);
    let s = screen(&app, &src, 80, 24);
    assert!((0..5).all(|l| !row(&s, l).contains(' ') && row(&s, l).chars().count() == 32), "{s}");
    assert!(s.contains("layer 0: |kv_latent| 5.6019 to 6.1627"), "{s}");
    let port = Path::new("golden/flat/port-kv-norm-unloaded.safetensors");
    let src = dumps_source(port, reference, &DiffOptions::default());
    let s = screen(&app, &src, 80, 24);
    assert!((0..5).all(|l| row(&s, l) == "▒".repeat(32)), "{s}");
    assert!(s.contains("layer 0: |kv_latent| 5.6568 to 5.6569 (flat: rounding)"), "{s}");
}

/// The DSA view's bottom line for a flipped query, on ports with planted bugs (transformers):
/// at 80 columns the keys a query kept on one side still show beside what it holds past itself
/// (that part never shortened, and pushed every key off the line); a flip decided by a masked
/// key's lead reads `inf`, a side that kept every causal key `none`; and a shared-indexer layer
/// shows ours's margin beside the reference's (it showed `-`: its dump has no scores of its own).
#[test]
fn the_dsa_bottom_line_keeps_the_keys_and_reads_its_margins() {
    let own_key = Path::new("golden/flat/port-indexer-own-key.safetensors");
    let src = dumps_source(own_key, Path::new("golden/flat/reference.safetensors"), &DiffOptions::default());
    let mut app = at_view(&src, 0, View::Dsa);
    let s = screen(&app, &src, 80, 24);
    assert!(s.contains("q0: margin - (ref none), only ours none (holds 17,18 +6 past q0), only ref 0"), "{s}");
    app.token = 9;
    assert!(screen(&app, &src, 80, 24).contains("q9: margin inf (ref 1.60e0), only ours 7, only ref 9"));
    let case = Path::new("golden/grouped-shared-yarn");
    // As `tui --model` gives them: the config says layer 3 reuses layer 2's selection.
    let ckpt = glimpse::checkpoint::Checkpoint::open(case).unwrap();
    let routers = glimpse::model::moe::Routers::read(&ckpt).unwrap();
    let opts = DiffOptions { routers: Some(routers), config: Some(ckpt.config.clone()), ..Default::default() };
    let src = dumps_source(&case.join("port-no-mscale.safetensors"), &case.join("reference.safetensors"), &opts);
    let mut app = at_layer(&src, 3);
    (app.view, app.token) = (View::Dsa, 13);
    let s = screen(&app, &src, 100, 30);
    assert!(s.contains("q13: margin 3.05e-1 (ref 5.53e-3)"), "{s}");
}

/// The expert load view gives the selected layer's busiest and rarest experts with their token
/// counts under the heatmap (two loads of one shade were not told apart): the bf16 port's layer
/// 3, as `audit --dump` of the same dump lists them (`5:17 7:15 0:13`, `6:0 2:1 13:1`).
#[test]
fn the_load_view_lists_the_selected_layers_busiest_and_rarest() {
    let src = port_source();
    let app = at_view(&src, 3, View::Load);
    let s = screen(&app, &src, 80, 24);
    assert!(s.contains("layer 3 busiest 5:17 7:15 0:13, rarest 6:0 2:1 13:1 (expert:tokens)"), "{s}");
    let (audit, _) = common::text(&common::glimpse(&["audit", "--dump", "golden/flat/bf16-port.safetensors"]));
    let row = audit.lines().find(|l| l.trim_start().starts_with("3 ")).unwrap();
    assert!(row.contains("5:17 7:15 0:13") && row.contains("6:0 2:1 13:1"), "{row}");
}

/// Under them, the pairs its tokens chose together most surprisingly often at their loads, as
/// `audit --pairs` lists them for the same dump, and the top one's surprise against chance's
/// 95th percentile at the layer's loads.
#[test]
fn the_load_view_lists_the_experts_chosen_together() {
    let src = port_source();
    let app = at_view(&src, 3, View::Load);
    // The first screen asks for the layer's chance level, drawn in the background; the terminal
    // redraws until it is in.
    let _ = screen(&app, &src, 100, 24);
    let asked = std::time::Instant::now();
    while src.busy() && asked.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!src.busy(), "the chance level is still being drawn");
    let s = screen(&app, &src, 100, 24);
    let args = ["audit", "--dump", "golden/flat/bf16-port.safetensors", "--json", "--pairs", "3"];
    let (json, _) = common::text(&common::glimpse(&args));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let co = &v["layers"].as_array().unwrap().iter().find(|l| l["layer"] == 3).unwrap()["co_activation"];
    let pairs: Vec<String> = (co["strongest"].as_array().unwrap().iter())
        .map(|p| {
            format!("{}+{} {}/{:.1}", p["experts"][0], p["experts"][1], p["tokens"], p["expected"].as_f64().unwrap())
        })
        .collect();
    let (top, p95) = (co["top_surprise"].as_f64().unwrap(), co["chance"]["p95"].as_f64().unwrap());
    let verdict = if top > p95 { "past" } else { "within" };
    let line = format!("together {} (surprise {top:.2}, {verdict} chance's 95% {p95:.2})", pairs.join(" "));
    assert!(s.contains(&line), "want {line}\n{s}");
}

/// A reference whose routing or selection has another shape than ours (another top-k; a layer
/// one position short) is not paired row by row: the views made up flips from rows that do not
/// correspond, and a load moved that `audit --against` refuses. Said instead.
#[test]
fn a_reference_of_another_shape_is_not_paired() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let reference = flat().join("reference.safetensors");
    let k2 = common::edit_dump(&reference, &tmp.path().join("k2.st"), |t| {
        for (_, v, shape) in t.iter_mut().filter(|(n, _, _)| n.contains(".moe.topk_")) {
            let k = shape[1];
            match v {
                Values::I64(x) => *x = x.chunks(k).flat_map(|r| r[..2].to_vec()).collect(),
                Values::F32(x) => *x = x.chunks(k).flat_map(|r| r[..2].to_vec()).collect(),
            }
            shape[1] = 2;
        }
    });
    let src = dumps_source(&k2, &reference, &DiffOptions::default());
    let s = screen(&at_view(&src, 2, View::Routing), &src, 100, 24);
    assert!(s.contains("32 tokens (the reference's is [32, 4]: not compared)") && !s.contains("FLIP"), "{s}");
    let s = screen(&at_view(&src, 2, View::Load), &src, 100, 24);
    assert!(s.contains("layer 2") && !s.contains("moved"), "{s}");
    // One layer's selection one position short: that layer's view pairs nothing, the others
    // are compared as before.
    let short = common::edit_dump(&reference, &tmp.path().join("short.st"), |t| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.3.dsa.topk").unwrap();
        let Values::I64(x) = v else { panic!("dsa.topk") };
        x.truncate(x.len() - shape[2]);
        shape[1] -= 1;
    });
    let src = dumps_source(&short, &reference, &DiffOptions::default());
    let s = screen(&at_view(&src, 3, View::Dsa), &src, 100, 40);
    assert!(s.contains("(the reference's is [1, 32, 8]: not compared)") && !s.contains(" differ"), "{s}");
    let s = screen(&at_view(&src, 2, View::Dsa), &src, 100, 40);
    assert!(s.contains("32 queries, 0 differ"), "{s}");
    // A reference that shares no hook point with ours: `n` says so, not that there is none.
    let ids = common::edit_dump(&reference, &tmp.path().join("ids.st"), |t| t.retain(|(n, _, _)| n == "input_ids"));
    let src = dumps_source(&ids, &reference, &DiffOptions::default());
    let mut app = App::default();
    app.handle_key(KeyEvent::new(KeyCode::Char('n'), KeyModifiers::NONE), &src);
    assert_eq!(app.message, "nothing compared: the dumps share no hook point");
}

/// The load view counts one expert count for every layer, as `audit` does: the first router
/// either dump records. A dump of ids alone whose layer 2 never chose expert 15 was drawn 15
/// experts wide there and 16 below, its statistics over 15.
#[test]
fn the_load_view_counts_the_same_experts_in_every_layer() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let reference = flat().join("reference.safetensors");
    let ids = common::edit_dump(&reference, &tmp.path().join("ids.st"), |t| {
        t.retain(|(n, _, _)| n == "input_ids" || n.ends_with(".moe.topk_ids"));
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.2.moe.topk_ids").unwrap();
        let (Values::I64(x), k) = (v, shape[1]) else { panic!("ids") };
        for row in x.chunks_mut(k) {
            if let Some(at) = row.iter().position(|&e| e == 15) {
                row[at] = (0..15).find(|e| !row.contains(e)).unwrap();
            }
        }
    });
    let src = dumps_source(&ids, &reference, &DiffOptions::default());
    let s = screen(&at_view(&src, 2, View::Load), &src, 100, 24);
    assert!(s.contains("expert load (16 experts"), "{s}");
    let cells = |layer: usize| {
        line_with(&s, &format!("layer {layer} "))
            .split('│')
            .nth(1)
            .unwrap()
            .chars()
            .skip(9)
            .take(17)
            .collect::<String>()
    };
    for layer in 2..5 {
        assert_eq!(cells(layer).chars().filter(|c| *c != ' ').count(), 16, "layer {layer}: {s}");
    }
    assert!(line_with(&s, "layer 2 ").contains("dead   1"), "expert 15: {s}");
}
