//! `glimpse audit` end to end: prompts and dumps read and checked, the MTP layer, batch rows as
//! prompts, `--against` a reference's routing, and what it refuses.

use std::path::Path;

mod common;
use common::{assert_error, assert_ok, glimpse, synth, text};

/// Malformed and partial inputs, said with what is wrong.
#[path = "audit/inputs.rs"]
mod inputs;
#[path = "audit/model.rs"]
mod model;
/// The second side: `--against`, `--compare`, `--compare-prompts`; a dump's weights checked.
#[path = "audit/others.rs"]
mod others;
#[path = "audit/pairs.rs"]
mod pairs;

/// golden/flat with its config.json edited by `edit`, written to `dir/name` (the weights copied).
fn flat_with(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("golden/flat/config.json").unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    std::fs::copy("golden/flat/model.safetensors", out.join("model.safetensors")).unwrap();
    out
}

#[test]
fn audit_reads_prompts_and_dumps() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path(), 4);
    let m = model.to_str().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "1,2,3,4\n5,6,7,8,9\n").unwrap();
    let (svg, csv) = (tmp.path().join("load.svg"), tmp.path().join("load.csv"));
    let o = glimpse(&[
        "audit",
        "--model",
        m,
        "--prompts",
        prompts.to_str().unwrap(),
        "--heatmap",
        svg.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    // One MoE layer (layer 1), 9 tokens.
    assert!(out.contains("expert load over 2 prompt(s), 4 experts"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("1        9")), "{out}");
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let csv = std::fs::read_to_string(&csv).unwrap();
    let total: u64 = csv.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(total, 9 * 2, "9 tokens x top-2");
    // A prompt the model refuses is named by its line, as one that does not parse is.
    std::fs::write(&prompts, "1,2,3\n# a comment\n\n1,99\n").unwrap();
    assert_error(
        &glimpse(&["audit", "--model", m, "--prompts", prompts.to_str().unwrap()]),
        "prompts.txt line 4: token id 99",
    );
    // A slip in a line of ids is an error, not a text prompt.
    std::fs::write(&prompts, "1,2,x\n").unwrap();
    assert_error(
        &glimpse(&["audit", "--model", m, "--prompts", prompts.to_str().unwrap()]),
        "prompts.txt line 1: \"x\" is not a token id",
    );

    let dump = tmp.path().join("d.safetensors");
    let o = glimpse(&["run", "--model", m, "--tokens", "1,2,3,4", "--dump", dump.to_str().unwrap()]);
    assert!(o.status.success());
    let (out, _) = text(&glimpse(&["audit", "--dump", dump.to_str().unwrap(), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"][0]["tokens"], 4);
    assert_eq!(v["experts"], 4);
    // Each prompt's run named by its line (comments and blank lines skipped), its rows indexed.
    std::fs::write(&prompts, "# two prompts\n1,2,3\n\n4,5;6,7\n").unwrap();
    let (out, _) = assert_ok(&glimpse(&["audit", "--model", m, "--prompts", prompts.to_str().unwrap(), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = prompts.display();
    assert_eq!(
        v["runs"],
        serde_json::json!([
            {"source": format!("{p} line 2"), "rows": 1, "tokens": 3},
            {"source": format!("{p} line 4"), "rows": 2, "tokens": 2},
        ])
    );
    assert_eq!(v["layers"][0]["prompt_runs"], serde_json::json!([0, 1, 1]));
    assert_error(&glimpse(&["audit", "--prompts", prompts.to_str().unwrap()]), "--prompts needs --model");
}

/// The MTP head's layer is marked in the audit and its bias counts: the bias-changed share
/// recomputed from the transformers reference's gate logits with the checkpoint's routers is
/// the one glimpse's own `run --mtp` records.
#[test]
fn audit_marks_the_mtp_layer_and_uses_its_bias() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = "golden/mtp/reference.safetensors";
    let own = common::run_dump("golden/mtp", &["--tokens-from", reference, "--mtp"], tmp.path(), "own.st");
    let mtp_row = |dump: &str| {
        let (out, _) = assert_ok(&glimpse(&["audit", "--model", "golden/mtp", "--dump", dump, "--json"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let layers = v["layers"].as_array().unwrap().clone();
        let mtp: Vec<_> = layers.into_iter().filter(|l| l["mtp"] == true).collect();
        assert_eq!(mtp.len(), 1, "{out}");
        mtp[0].clone()
    };
    let (recomputed, recorded) = (mtp_row(reference), mtp_row(&own));
    assert_eq!(recomputed["layer"], 3);
    assert!(recorded["bias_changed_share"].is_number(), "{recorded}");
    assert_eq!(recomputed["bias_changed_share"], recorded["bias_changed_share"]);
    assert!(recomputed["bias_load_correlation"].is_number(), "{recomputed}");
    let (table, _) = assert_ok(&glimpse(&["audit", "--model", "golden/mtp", "--dump", reference]));
    assert!(table.lines().any(|l| l.trim_start().starts_with("3 mtp ")), "{table}");
    // The CSV (here on standard output) and the heatmap mark it too.
    let (csv, _) = assert_ok(&glimpse(&["audit", "--model", "golden/mtp", "--dump", reference, "--csv", "-"]));
    assert_eq!(csv.lines().next(), Some("layer,expert,count,share,weight,weight_share,bias,mtp"));
    assert!(csv.lines().skip(1).all(|l| l.ends_with(if l.starts_with("3,") { ",1" } else { ",0" })), "{csv}");
    let svg = tmp.path().join("load.svg");
    assert_ok(&glimpse(&["audit", "--model", "golden/mtp", "--dump", reference, "--heatmap", &common::s(&svg)]));
    assert!(std::fs::read_to_string(&svg).unwrap().contains(">layer 3 mtp</text>"));
    // Without a checkpoint or the head's own tensors, the MTP layer is told by its rows (one
    // position fewer), on both sides of --against.
    let args = ["--tokens-from", reference, "--mtp", "--record", "layers.*.moe.*"];
    let routing_only = common::run_dump("golden/mtp", &args, tmp.path(), "routing.st");
    let (out, _) = assert_ok(&glimpse(&["audit", "--dump", &routing_only, "--against", reference]));
    assert!(out.lines().any(|l| l.trim_start().starts_with("3 mtp ")), "{out}");
    assert!(out.contains("load shift against the reference"), "{out}");
}

/// `audit --prompts --mtp` runs the MTP head over every prompt live: the same table and routes
/// as the dumps `run --mtp` writes of those prompts; a prompt of one token, a window without the
/// MTP layer and `--mtp` without prompts run live are refused.
#[test]
fn audit_runs_the_mtp_head_over_live_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = ["5,6,7,8,9,10,11,12", "3,1,4,1,5;9,2,6,5,3"];
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, rows.join("\n")).unwrap();
    let dumps: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, t)| common::run_dump("golden/mtp", &["--tokens", t, "--mtp"], tmp.path(), &format!("{i}.st")))
        .collect();
    let (routes_live, routes_dumps) = (tmp.path().join("live.csv"), tmp.path().join("dumps.csv"));
    let base = ["audit", "--model", "golden/mtp"];
    let (live, _) = assert_ok(&glimpse(
        &[&base[..], &["--prompts", &common::s(&prompts), "--mtp", "--routes", &common::s(&routes_live)]].concat(),
    ));
    let (recorded, _) = assert_ok(&glimpse(
        &[&base[..], &["--dump", &dumps[0], "--dump", &dumps[1], "--routes", &common::s(&routes_dumps)]].concat(),
    ));
    assert!(live.lines().any(|l| l.trim_start().starts_with("3 mtp ")), "{live}");
    assert_eq!(live, recorded);
    // The head runs where the prompts run: on the device path too, counting the same.
    let on_device = ["--prompts", &common::s(&prompts), "--mtp", "--device", "cpu-ops"];
    assert_eq!(assert_ok(&glimpse(&[&base[..], &on_device].concat())).0, live);
    assert_eq!(std::fs::read_to_string(&routes_live).unwrap(), std::fs::read_to_string(&routes_dumps).unwrap());
    // Without --mtp the prompts route the main model's layers only.
    let (main_only, _) = assert_ok(&glimpse(&[&base[..], &["--prompts", &common::s(&prompts)]].concat()));
    assert!(!main_only.contains(" mtp "), "{main_only}");
    std::fs::write(&prompts, "5,6,7\n8\n").unwrap();
    assert_error(&glimpse(&[&base[..], &["--prompts", &common::s(&prompts), "--mtp"]].concat()), "--mtp: ");
    assert_error(
        &glimpse(&[&base[..], &["--prompts", &common::s(&prompts), "--mtp", "--layers", "1..2"]].concat()),
        "--mtp: --layers 1..2 leaves out the MTP layer, 3",
    );
    // A checkpoint without the head: said before anything loads.
    let headless = synth(tmp.path(), 3);
    let args = ["audit", "--model", headless.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--mtp"];
    assert_error(&glimpse(&args), "--mtp: the checkpoint has no MTP layer");
    assert_error(&glimpse(&[&base[..], &["--dump", &dumps[0], "--mtp"]].concat()), "--mtp is for prompts run live");
    assert_error(&glimpse(&[&base[..], &["--dump", &dumps[0], "--text"]].concat()), "--text is for prompts run live");
    // With --compare-prompts alone --text reads its lines as text (it read them as ids): here
    // that needs the checkpoint's tokenizer, which golden/flat has none of.
    let flat = common::golden("flat");
    let (flat, reference) = (common::s(&flat), common::s(&flat.join("reference.safetensors")));
    let other = ["--compare-prompts", prompts.to_str().unwrap(), "--text"];
    let args = [&["audit", "--model", &flat, "--dump", &reference][..], &other].concat();
    assert_error(&glimpse(&args), "tokenizer.json");
}

/// `audit` counts each batch row as a prompt (MaxVio/run is their mean), checks a dump's experts
/// a token against the checkpoint and the reference, and warns once of a guessed expert count.
#[test]
fn audit_counts_batch_rows_as_prompts_and_checks_experts_a_token() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let record = ["--record", "layers.*.moe.topk_ids"];
    let batch =
        common::run_dump("golden/flat", &[&["--tokens", "1,2,3;4,5,6"], &record[..]].concat(), tmp.path(), "b.st");
    let rows: Vec<String> = ["1,2,3", "4,5,6"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            common::run_dump("golden/flat", &[&["--tokens", *t], &record[..]].concat(), tmp.path(), &format!("r{i}.st"))
        })
        .collect();
    let per_run = |args: &[&str]| -> Vec<f64> {
        let (json, _) = assert_ok(&glimpse(&[&["audit", "--model", "golden/flat", "--json"], args].concat()));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["prompts"], 2, "{v}");
        v["layers"].as_array().unwrap().iter().map(|l| l["max_vio_per_run_mean"].as_f64().unwrap()).collect()
    };
    // The batch of two rows and the two rows run apart: the same prompts, the same measure.
    assert_eq!(per_run(&["--dump", &batch]), per_run(&["--dump", &rows[0], "--dump", &rows[1]]));
    // Layer 2 cut to 3 experts a token: the checkpoint chooses 4, and so does the reference.
    let cut = common::edit_dump(std::path::Path::new(&rows[0]), &tmp.path().join("k3.st"), |t| {
        for (name, v, shape) in t.iter_mut() {
            if let (true, Values::I64(ids)) = (name == "layers.2.moe.topk_ids", &mut *v) {
                *ids = ids.chunks(shape[1]).flat_map(|row| row[..3].to_vec()).collect();
                shape[1] = 3;
            }
        }
    });
    let cut = common::s(&cut);
    assert_error(
        &glimpse(&["audit", "--model", "golden/flat", "--dump", &cut]),
        "chooses 3 experts a token, the checkpoint's num_experts_per_tok 4",
    );
    assert_error(
        &glimpse(&["audit", "--dump", &cut, "--against", &rows[0]]),
        "layer 2: 3 experts a token against the reference's 4",
    );
    assert_error(
        &glimpse(&["audit", "--dump", &rows[0], "--dump", &cut]),
        "chooses 3 experts a token where another run of layer 2 chose 4",
    );
    // No router logits on either side: the count is guessed once, from both.
    let (_, err) = assert_ok(&glimpse(&["audit", "--dump", &rows[0], "--against", &rows[0]]));
    assert_eq!(err.matches("experts counted from the largest id").count(), 1, "{err}");
}

/// `audit` takes one model's dumps, each once, and says when it can only guess the expert count.
#[test]
fn audit_refuses_twice_the_same_dump_and_other_models_dumps() {
    let flat = "golden/flat/reference.safetensors";
    assert_error(&glimpse(&["audit", "--dump", flat, "--dump", flat]), "is given twice");
    // A copy under another name is not the same path: counted, and said.
    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("copy.safetensors");
    std::fs::copy(flat, &copy).unwrap();
    let (out, err) = assert_ok(&glimpse(&["audit", "--dump", flat, "--dump", copy.to_str().unwrap()]));
    assert!(out.contains("over 2 prompt(s)"), "{out}");
    assert!(err.contains("copy.safetensors routes every token as golden/flat/reference.safetensors does"), "{err}");
    let (_, err) = assert_ok(&glimpse(&["audit", "--dump", flat, "--dump", "golden/flat/bf16-port.safetensors"]));
    assert!(!err.contains("routes every token as"), "{err}");
    let mixed = glimpse(&["audit", "--dump", flat, "--dump", "golden/mtp/reference.safetensors"]);
    assert_error(&mixed, "was made from another config.json than golden/flat/reference.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let ids = common::run_dump(
        "golden/flat",
        &["--tokens", "1,2,3", "--record", "layers.*.moe.topk_ids"],
        tmp.path(),
        "ids.st",
    );
    let ids = ids.as_str();
    let (_, err) = assert_ok(&glimpse(&["audit", "--dump", ids]));
    assert!(err.contains("experts counted from the largest id"), "{err}");
    let (out, err) = assert_ok(&glimpse(&["audit", "--dump", ids, "--model", "golden/flat"]));
    assert!(out.contains("16 experts") && !err.contains("largest id"), "{out}{err}");
    // --against compares one model's routing: the mtp case has 8 experts, not 16.
    let other = glimpse(&["audit", "--dump", flat, "--against", "golden/mtp/reference.safetensors"]);
    assert_error(&other, "--against: the dumps' routers have 8 experts, not 16");
    let twice = glimpse(&["audit", "--dump", flat, "--dump", "golden/flat/bf16-port.safetensors", "--against", flat]);
    assert_error(&twice, "the audited runs hold 2 rows of tokens, --against's dumps 1");
    let port = glimpse(&["audit", "--dump", "golden/flat/bf16-port.safetensors", "--against", flat]);
    let (out, _) = assert_ok(&port);
    assert!(out.contains("load shift against the reference"), "{out}");
    // Every changed token's margin on the port's side is past 1e-3: no near-tie, none unknown.
    assert!(out.lines().any(|l| l.starts_with("    2      128") && l.contains(" 0/2 ")), "{out}");
    assert!(!out.contains("neither near-tie nor past one"), "{out}");
    // Gross, token by token: the tokens whose expert set changed are diff's routing flips (2, 4
    // and 6 in layers 2-4), and the slots that changed their experts chosen on one side only.
    let (json, _) =
        assert_ok(&glimpse(&["audit", "--dump", "golden/flat/bf16-port.safetensors", "--against", flat, "--json"]));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let (diff, _) = text(&glimpse(&["diff", "golden/flat/bf16-port.safetensors", flat, "--json"]));
    let diff: serde_json::Value = serde_json::from_str(&diff).unwrap();
    let shift = json["shift"].as_array().unwrap();
    assert!(shift.iter().any(|l| l["tokens_changed"].as_u64() > Some(0)), "some tokens changed experts: {shift:?}");
    // Counted here from the two dumps' expert ids, row by row.
    let ids = |file: &str, name: &str| match glimpse::dump::Dump::open(Path::new(file)).unwrap().values(name).unwrap() {
        (glimpse::dump::Values::I64(v), shape) => (v, shape[shape.len() - 1]),
        _ => panic!("{name}: expert ids"),
    };
    for layer in shift {
        let name = format!("layers.{}.moe.topk_ids", layer["layer"]);
        let ((a, k), (b, _)) = (ids("golden/flat/bf16-port.safetensors", &name), ids(flat, &name));
        let only_ours: Vec<usize> =
            a.chunks(k).zip(b.chunks(k)).map(|(x, y)| x.iter().filter(|e| !y.contains(e)).count()).collect();
        assert_eq!(layer["tokens_changed"], only_ours.iter().filter(|&&n| n > 0).count(), "{name}");
        assert_eq!(layer["slots_changed"], only_ours.iter().sum::<usize>(), "{name}");
        let name = format!("layers.{}.moe.topk_ids", layer["layer"]);
        let t = diff["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name.as_str()).unwrap();
        let flips = t["flips"].as_array().unwrap();
        let only_ours: u64 = flips.iter().map(|f| f["only_ours"].as_array().unwrap().len() as u64).sum();
        assert_eq!(layer["tokens_changed"], flips.len(), "{name}");
        // diff classes the same flips real (a side's margin past 1e-3: so do its leads).
        let real = flips.iter().filter(|f| f["class"] == "real").count();
        assert_eq!(layer["tokens_changed_past_tie"], real, "{name}");
        assert_eq!(layer["slots_changed"], only_ours, "{name}");
        assert_eq!(layer["tokens"], 32);
    }
    // The same count of tokens is not the same tokens; another config.json (a quantised twin's
    // differs) is compared, and said.
    let other_ids =
        common::run_dump("golden/flat", &["--tokens", "1,2,4", "--record", "layers.*.moe.*"], tmp.path(), "other.st");
    let same =
        common::run_dump("golden/flat", &["--tokens", "1,2,3", "--record", "layers.*.moe.*"], tmp.path(), "same.st");
    let moved = glimpse(&["audit", "--dump", &same, "--against", &other_ids]);
    assert_error(&moved, &format!("{same} differs from --against {other_ids} at position 2 (3 vs 4): --against takes"));
    // Prompts run live are checked before they run, each line named, in the order given.
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "1,2,4\n1,2,3\n").unwrap();
    let swapped = ["audit", "--model", "golden/flat", "--prompts", prompts.to_str().unwrap()];
    let swapped = glimpse(&[&swapped[..], &["--against", &same, "--against", &other_ids]].concat());
    assert_error(&swapped, &format!("prompts.txt line 1 differs from --against {same} at position 2 (4 vs 3)"));
    let yarn = common::run_dump(
        "golden/grouped-shared-yarn",
        &["--tokens", "1,2,3", "--record", "*.moe.*"],
        tmp.path(),
        "y.st",
    );
    let (_, err) = assert_ok(&glimpse(&["audit", "--dump", &same, "--against", &yarn]));
    assert!(
        err.contains("warning: the audited runs and --against's were made from different config.json files"),
        "{err}"
    );
}

/// A layer no dump recorded is left out of the audit, not shown as a layer of dead experts, even
/// when --model knows it is an MoE layer.
#[test]
fn audit_leaves_out_the_layers_no_dump_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let one =
        common::run_dump("golden/flat", &["--tokens", "1,2,3", "--record", "layers.3.moe.*"], tmp.path(), "l3.st");
    let (out, _) = assert_ok(&glimpse(&["audit", "--dump", &one, "--model", "golden/flat"]));
    let layers: Vec<&str> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<usize>().is_ok())
        .collect();
    assert_eq!(layers, ["3"], "{out}");
    // With a dump of every layer after it: layer 2's prompts are the second run's alone, which
    // `prompt_runs` says, and `runs` names each run's source.
    let all = common::run_dump("golden/flat", &["--tokens", "4,5"], tmp.path(), "all.st");
    let (out, _) = assert_ok(&glimpse(&["audit", "--dump", &one, "--dump", &all, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let runs: Vec<(&str, u64, u64)> = (v["runs"].as_array().unwrap().iter())
        .map(|r| (r["source"].as_str().unwrap(), r["rows"].as_u64().unwrap(), r["tokens"].as_u64().unwrap()))
        .collect();
    assert_eq!(runs, [(one.as_str(), 1, 3), (all.as_str(), 1, 2)]);
    let prompt_runs = |layer: u64| {
        let l = v["layers"].as_array().unwrap().iter().find(|l| l["layer"] == layer).unwrap();
        assert_eq!(l["max_vio_per_prompt"].as_array().unwrap().len(), l["prompt_runs"].as_array().unwrap().len());
        l["prompt_runs"].clone()
    };
    assert_eq!((prompt_runs(2), prompt_runs(3)), (serde_json::json!([1]), serde_json::json!([0, 1])));
}

/// `--layers A..B` counts those layers alone, on both sides of `--against`, with the same counts
/// as a whole audit's (prompts run live stop after B: the routing up to it is the same), and
/// refuses a window that holds no MoE layer.
#[test]
fn audit_counts_only_the_layers_asked() {
    let json = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&assert_ok(&glimpse(args)).0).unwrap() };
    let counts = |v: &serde_json::Value, layer: u64| {
        let l = v["layers"].as_array().unwrap().iter().find(|l| l["layer"] == layer).unwrap();
        l["counts"].clone()
    };
    let layers = |v: &serde_json::Value| -> Vec<u64> {
        v["layers"].as_array().unwrap().iter().map(|l| l["layer"].as_u64().unwrap()).collect()
    };
    let reference = "golden/flat/reference.safetensors";
    let base = ["audit", "--model", "golden/flat", "--json"];
    let whole = json(&[&base[..], &["--dump", reference]].concat());
    let window = json(&[&base[..], &["--dump", reference, "--against", reference, "--layers", "3..4"]].concat());
    assert_eq!(layers(&whole), [2, 3, 4]);
    assert_eq!(layers(&window), [3, 4]);
    assert_eq!(window["layer_window"], serde_json::json!([3, 4]));
    assert_eq!(whole["layer_window"], serde_json::Value::Null);
    assert_eq!(counts(&window, 3), counts(&whole, 3));
    let shifted: Vec<u64> = window["shift"].as_array().unwrap().iter().map(|l| l["layer"].as_u64().unwrap()).collect();
    assert_eq!(shifted, [3, 4], "{}", window["shift"]);
    // Live: the same routing of layer 3 whether the prompt runs on to the head or stops there.
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "1,2,3,4,5,6,7,8\n9,10,11\n").unwrap();
    let live = [&base[..], &["--prompts", prompts.to_str().unwrap()]].concat();
    let (all, three) = (json(&live), json(&[&live[..], &["--layers", "3"]].concat()));
    assert_eq!(layers(&three), [3]);
    assert_eq!(counts(&three, 3), counts(&all, 3));
    // The device path (here its code on the host) stops there too, with the same routing.
    let on_ops = json(&[&live[..], &["--layers", "3", "--device", "cpu-ops"]].concat());
    assert_eq!((layers(&on_ops), counts(&on_ops, 3)), (vec![3], counts(&all, 3)));
    let svg = tmp.path().join("w.svg");
    let args = ["audit", "--model", "golden/flat", "--dump", reference, "--layers", "2..3"];
    let (table, _) = assert_ok(&glimpse(&[&args[..], &["--heatmap", &common::s(&svg)]].concat()));
    assert!(std::fs::read_to_string(&svg).unwrap().contains(">golden/flat, layers 2..3</text>"));
    assert!(table.starts_with("expert load over 1 prompt(s), 16 experts, layers 2..3\n"), "{table}");
    // A window of dense layers counts nothing: refused, naming the MoE layers.
    assert_error(
        &glimpse(&["audit", "--model", "golden/flat", "--dump", reference, "--layers", "0..1"]),
        "--layers 0..1 holds no MoE layer of --model: its MoE layers are 2..4, its MTP layer 5",
    );
    let prompts = prompts.to_str().unwrap();
    assert_error(
        &glimpse(&["audit", "--model", "golden/flat", "--prompts", prompts, "--layers", "4..9"]),
        "--layers 4..9 runs past --model's last layer, 4",
    );
    assert_error(
        &glimpse(&["audit", "--model", "golden/flat", "--dump", reference, "--layers", "4..9"]),
        "--layers 4..9 runs past --model's last layer (its MTP layer), 5",
    );
    // The same file on both sides is measured against itself: said.
    let (_, err) = assert_ok(&glimpse(&["audit", "--dump", reference, "--against", reference]));
    assert!(err.contains("is both --dump and --against: it is measured against itself"), "{err}");
    assert_error(
        &glimpse(&["audit", "--dump", reference, "--layers", "7"]),
        "routes no layer of --layers 7..7 (its MoE layers: 2..4)",
    );
}

/// What the numbers are over, said when it is not every prompt: a batch dump without `input_ids`
/// still counts its rows as prompts (from its other `[B, S, ...]` tensors), a bias-changed share
/// over some runs only is marked, layers that different dumps cover are noted, and against a
/// reference a layer one side lacks is named instead of dropped.
#[test]
fn audit_says_what_its_numbers_are_over() {
    let tmp = tempfile::tempdir().unwrap();
    let batch = common::run_dump("golden/flat", &["--tokens", "1,2,3;4,5,6"], tmp.path(), "b.st");
    let json = |args: &[&str]| -> serde_json::Value {
        let (out, _) = assert_ok(&glimpse(&[&["audit", "--json"], args].concat()));
        serde_json::from_str(&out).unwrap()
    };
    let no_ids =
        common::edit_dump(Path::new(&batch), &tmp.path().join("no-ids.st"), |t| t.retain(|(n, _, _)| n != "input_ids"));
    let (with, without) = (json(&["--dump", &batch]), json(&["--dump", common::s(&no_ids).as_str()]));
    assert_eq!(without["prompts"], 2, "{without}");
    assert_eq!(with["layers"], without["layers"]);

    // The second run's flags and gate logits left out: its tokens have no known flag.
    let one = common::run_dump("golden/flat", &["--tokens", "7,8,9,10"], tmp.path(), "one.st");
    let unflagged = common::edit_dump(Path::new(&one), &tmp.path().join("unflagged.st"), |t| {
        t.retain(|(n, _, _)| !n.ends_with(".moe.bias_changed") && !n.ends_with(".moe.router_logits"))
    });
    let unflagged = common::s(&unflagged);
    let (out, _) = assert_ok(&glimpse(&["audit", "--dump", &batch, "--dump", &unflagged]));
    let row = out.lines().find(|l| l.trim_start().starts_with("2 ")).unwrap();
    assert!(row.contains("%*"), "{out}");
    assert!(out.contains("note: * bias-changed over the tokens with known flags only (layer 2: 6 of 10"), "{out}");
    let v = json(&["--dump", &batch, "--dump", &unflagged]);
    assert_eq!((v["layers"][0]["bias_known_tokens"].clone(), v["layers"][0]["tokens"].clone()), (6.into(), 10.into()));

    // Layers 3-4 of the batch's tokens again, from its layer-2 output: layer 2 counts one run's
    // prompts, layers 3 and 4 both runs'.
    let window = common::run_dump("golden/flat", &["--layers", "3..4", "--from-dump", &batch], tmp.path(), "w.st");
    let (out, _) = assert_ok(&glimpse(&["audit", "--dump", &one, "--dump", &window]));
    assert!(
        out.contains("note: the layers count different prompts (layer 2 over 1; layers 3, 4 over 3; of 3 in all)"),
        "{out}"
    );
    // Each layer over one prompt of two: as many prompts a layer, but not all of them.
    let single = common::run_dump("golden/flat", &["--layers", "3..4", "--from-dump", &one], tmp.path(), "s.st");
    let two = common::run_dump("golden/flat", &["--tokens", "7,8,9", "--record", "layers.2.*"], tmp.path(), "t.st");
    let (out, _) = assert_ok(&glimpse(&["audit", "--dump", &two, "--dump", &single]));
    assert!(out.contains("note: the layers count different prompts (layers 2, 3, 4 over 1; of 2 in all)"), "{out}");
    let (out, _) = assert_ok(&glimpse(&["audit", "--dump", &batch, "--against", &window]));
    assert!(out.contains("note: layer(s) 2 only in the audited runs: no shift there"), "{out}");
    let v = json(&["--dump", &batch, "--against", &window]);
    assert_eq!(v["shift_notes"], serde_json::json!(["layer(s) 2 only in the audited runs: no shift there"]));
    assert_eq!(v["schema"], "glimpse-audit/1");
}

/// A checkpoint that is not the dumps' model, or has no routing, is refused; a prompt of text
/// with numbers in it can be read as text.
#[test]
fn audit_refuses_another_models_checkpoint_and_reads_text_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    // golden/flat routes over 16 experts, golden/mtp over 8.
    let flat = common::run_dump("golden/flat", &["--tokens", "1,2,3"], tmp.path(), "flat.st");
    assert_error(
        &glimpse(&["audit", "--model", "golden/mtp", "--dump", &flat]),
        "the dumps' routers have 16 experts, --model's config 8",
    );
    let dense = flat_with(tmp.path(), "dense", |c| c["first_k_dense_replace"] = 5.into());
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "1,2,3\n").unwrap();
    assert_error(
        &glimpse(&["audit", "--model", common::s(&dense).as_str(), "--prompts", common::s(&prompts).as_str()]),
        "the model has no MoE layer (every layer is dense)",
    );

    let model = synth(tmp.path(), 5);
    let tokenizer = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "count": 7, "1": 3, ",": 5, "2": 4, "3": 6},
        "unk_token": "[UNK]"}}"#;
    std::fs::write(model.join("tokenizer.json"), tokenizer).unwrap();
    // A byte-order mark is not part of the first line; ids separated by spaces read as text, said.
    std::fs::write(&prompts, "\u{feff}1,2,3\n1 2 3\n").unwrap();
    let (out, err) =
        assert_ok(&glimpse(&["audit", "--model", model.to_str().unwrap(), "--prompts", common::s(&prompts).as_str()]));
    assert!(out.contains("over 2 prompt(s)"), "{out}");
    assert!(err.contains("p.txt line 2: integers separated by spaces are read as text"), "{err}");
    std::fs::write(&prompts, "count 1, 2, 3\n").unwrap();
    let args = ["audit", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()];
    assert_error(&glimpse(&args), "\"count 1\" is not a token id (a line of text? --text reads every line as text)");
    // Rows of ids of unequal length are no text: no hint that they are.
    let rows = prompts.with_file_name("rows.txt");
    std::fs::write(&rows, "1,2,3;4,5\n").unwrap();
    let e = glimpse(&["audit", "--model", model.to_str().unwrap(), "--prompts", rows.to_str().unwrap()]);
    assert_error(&e, "line 1: every batch row must have the same length");
    assert!(!common::text(&e).1.contains("a line of text?"), "{}", common::text(&e).1);
    // As text: "count 1 , 2 , 3", 6 tokens.
    let (out, _) = assert_ok(&glimpse(&[&args[..], &["--text", "--json"]].concat()));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"][0]["tokens"], 6, "{v}");
    // Two lines of text, through one tokenizer: 6 and 3 tokens.
    std::fs::write(&prompts, "count 1, 2, 3\ncount 1 2\n").unwrap();
    let (out, _) = assert_ok(&glimpse(&[&args[..], &["--text", "--json"]].concat()));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["layers"][0]["tokens"], 9, "{v}");
    // --routes gives each token's text (a comma quoted, as CSV quotes).
    let routes = tmp.path().join("routes.csv");
    assert_ok(&glimpse(&[&args[..], &["--text", "--routes", routes.to_str().unwrap()]].concat()));
    // (The fields before the text hold no comma.)
    let texts: Vec<String> = std::fs::read_to_string(&routes)
        .unwrap()
        .lines()
        .skip(1)
        .take(6)
        .map(|l| l.splitn(9, ',').nth(8).unwrap().to_string())
        .collect();
    assert_eq!(texts, ["count", "1", "\",\"", "2", "\",\"", "3"]);
}

/// A prompt past the config's `max_position_embeddings` is said, as `run` says it (audit ran it
/// silently).
#[test]
fn audit_says_a_prompt_runs_past_the_trained_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let model = flat_with(tmp.path(), "short-context", |c| c["max_position_embeddings"] = 8.into());
    let prompts = tmp.path().join("p.txt");
    std::fs::write(&prompts, "1,2,3\n# a comment\n1,2,3,4,5,6,7,8,9,10\n").unwrap();
    let (_, err) =
        assert_ok(&glimpse(&["audit", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()]));
    assert!(
        err.contains("p.txt line 3 (the longest prompt): 10 positions, 2 of them past max_position_embeddings (8)"),
        "{err}"
    );
}

/// The load without the correction bias: each token's top-k of `sigmoid(router_logits)` alone,
/// recounted here from the transformers reference's gate logits (golden/flat routes flat, top-4
/// of 16), is the MaxVio audit reports beside the biased one, from the dump and from a live run.
#[test]
fn audit_reports_the_load_without_the_bias() {
    use glimpse::dump::{Dump, Values};
    let reference = "golden/flat/reference.safetensors";
    let d = Dump::open(Path::new(reference)).unwrap();
    let (json, _) = assert_ok(&glimpse(&["audit", "--model", "golden/flat", "--dump", reference, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 3, "golden/flat's MoE layers: {v}");
    for l in v["layers"].as_array().unwrap() {
        let layer = l["layer"].as_u64().unwrap();
        let Ok((Values::F32(logits), shape)) = d.values(&format!("layers.{layer}.moe.router_logits")) else { panic!() };
        let (e, k) = (shape[1], 4);
        let mut counts = vec![0u64; e];
        for row in logits.chunks(e) {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b))); // sigmoid keeps the order
            order[..k].iter().for_each(|&x| counts[x] += 1);
        }
        let mean = counts.iter().sum::<u64>() as f64 / e as f64;
        let max_vio = *counts.iter().max().unwrap() as f64 / mean - 1.0;
        assert!((l["max_vio_without_bias"].as_f64().unwrap() - max_vio).abs() < 1e-12, "layer {layer}: {l}");
        assert_eq!(l["counts_without_bias"], serde_json::json!(counts));
    }
    // Live, from the same tokens: the same numbers; without --model's routers, none.
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    let Values::I64(ids) = d.values("input_ids").unwrap().0 else { panic!() };
    std::fs::write(&prompts, ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")).unwrap();
    let (live, _) =
        assert_ok(&glimpse(&["audit", "--model", "golden/flat", "--prompts", &common::s(&prompts), "--json"]));
    let live: serde_json::Value = serde_json::from_str(&live).unwrap();
    assert_eq!(live["layers"].as_array().unwrap().len(), 3, "{live}");
    for (a, b) in live["layers"].as_array().unwrap().iter().zip(v["layers"].as_array().unwrap()) {
        assert_eq!(a["counts_without_bias"], b["counts_without_bias"]);
    }
    let (bare, _) = assert_ok(&glimpse(&["audit", "--dump", reference, "--json"]));
    assert!(bare.contains("\"max_vio_without_bias\": null"), "{bare}");
    // A second run without layer 2's gate logits: that layer's is unknown, and said; and with
    // `--csv -` the notes go to stderr.
    let no_logits = common::edit_dump(Path::new(reference), &tmp.path().join("no-logits.st"), |t| {
        t.retain(|(n, _, _)| n != "layers.2.moe.router_logits")
    });
    let args = ["audit", "--model", "golden/flat", "--dump", reference, "--dump", &common::s(&no_logits)];
    let (table, _) = assert_ok(&glimpse(&args));
    let row = |layer: &str| table.lines().find(|l| l.trim_start().starts_with(layer)).unwrap().to_string();
    assert_eq!(row("2 ").split_whitespace().nth(3), Some("-"), "{table}");
    assert_ne!(row("3 ").split_whitespace().nth(3), Some("-"), "{table}");
    let note =
        "w/o bias is left out where some runs recorded no gate logits, or NaN ones (layer 2: 32 of 64 tokens known)";
    assert!(table.contains(note), "{table}");
    let (csv, err) = assert_ok(&glimpse(&[&args[..], &["--csv", "-"]].concat()));
    assert!(csv.starts_with("layer,expert,") && !csv.contains("note"), "{csv}");
    assert!(err.contains(&format!("glimpse: note: {note}")), "{err}");
}

/// `--routes`: every token's routing, one line per token and MoE layer, as the dump recorded it
/// (ids and weights in the order chosen) with its margin recomputed from the gate logits and
/// the checkpoint's bias (golden/flat routes flat, top-4 of 16: the 4th minus the 5th of
/// `sigmoid(logit) + bias`, computed here); a live run of the same tokens writes the same lines.
#[test]
fn audit_writes_every_tokens_routing() {
    use glimpse::dump::{Dump, Values};
    let tmp = tempfile::tempdir().unwrap();
    let golden = "golden/flat/reference.safetensors";
    let csv = tmp.path().join("routes.csv");
    assert_ok(&glimpse(&["audit", "--dump", golden, "--model", "golden/flat", "--routes", csv.to_str().unwrap()]));
    let text = std::fs::read_to_string(&csv).unwrap();
    // `--routes -`: the same lines on standard output, in place of the table.
    let (piped, _) = assert_ok(&glimpse(&["audit", "--dump", golden, "--model", "golden/flat", "--routes", "-"]));
    assert_eq!(piped, text);
    assert_error(&glimpse(&["audit", "--dump", golden, "--routes", "-", "--json"]), "--json and --routes - both write");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "run,row,position,token,layer,experts,weights,margin,text");
    let d = Dump::open(Path::new(golden)).unwrap();
    let tokens = d.tokens().unwrap();
    assert_eq!(lines.len(), 1 + 3 * tokens.seq, "three MoE layers of 32 tokens");
    let ckpt = glimpse::checkpoint::Checkpoint::open(Path::new("golden/flat")).unwrap();
    let floats = |name: &str| match d.values(name).unwrap() {
        (Values::F32(v), _) => v,
        _ => panic!("{name}"),
    };
    let mut margins: [Vec<f32>; 3] = Default::default();
    for (n, line) in lines[1..].iter().enumerate() {
        let (layer, t) = (2 + n / tokens.seq, n % tokens.seq);
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(&f[..5], ["0", "0", &t.to_string(), &tokens.ids[t].to_string(), &layer.to_string()], "{line}");
        let Values::I64(ids) = d.values(&format!("layers.{layer}.moe.topk_ids")).unwrap().0 else { panic!() };
        let experts: Vec<String> = ids[t * 4..t * 4 + 4].iter().map(i64::to_string).collect();
        assert_eq!(f[5], experts.join(" "), "{line}");
        let weights: Vec<f32> = f[6].split(' ').map(|w| w.parse().unwrap()).collect();
        assert_eq!(weights, floats(&format!("layers.{layer}.moe.topk_weights"))[t * 4..t * 4 + 4], "{line}");
        let (bias, _) = ckpt.f32(&format!("model.layers.{layer}.mlp.gate.e_score_correction_bias")).unwrap();
        let logits = floats(&format!("layers.{layer}.moe.router_logits"));
        let mut biased: Vec<f32> =
            logits[t * 16..t * 16 + 16].iter().zip(&bias).map(|(l, b)| 1.0 / (1.0 + (-l).exp()) + b).collect();
        biased.sort_by(|a, b| b.total_cmp(a));
        let margin: f32 = f[7].parse().unwrap();
        approx::assert_abs_diff_eq!(margin, biased[3] - biased[4], epsilon = 1e-6);
        margins[layer - 2].push(biased[3] - biased[4]);
    }
    // The table's and JSON's share of tokens decided by less than 1e-3, and the margin bins,
    // counted here from the margins computed above.
    let (json, _) = assert_ok(&glimpse(&["audit", "--dump", golden, "--model", "golden/flat", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    for (l, m) in margins.iter().enumerate() {
        let layer = &json["layers"][l];
        let edges = [1e-4f32, 1e-3, 1e-2, 1e-1];
        let bins: Vec<u64> = (0..5)
            .map(|b| m.iter().filter(|&&x| edges.iter().take_while(|&&e| x >= e).count() == b).count() as u64)
            .collect();
        assert_eq!(layer["margin_bins"]["counts"], serde_json::json!(bins), "layer {}", l + 2);
        assert_eq!(layer["margin_bins"]["edges"], serde_json::json!([1e-4, 1e-3, 1e-2, 1e-1]));
        let share = m.iter().filter(|&&x| x < 1e-3).count() as f64 / m.len() as f64;
        approx::assert_abs_diff_eq!(layer["near_tie_share"].as_f64().unwrap(), share);
    }
    assert!(margins.iter().flatten().any(|&x| x < 1e-2), "the case has close decisions: {margins:?}");
    // An audit that fails leaves neither the file nor its temporary one: in its dumps, or after
    // them (an --against of another expert count).
    let failed = tmp.path().join("failed.csv");
    let f = failed.to_str().unwrap();
    let mtp = "golden/mtp/reference.safetensors";
    assert_error(&glimpse(&["audit", "--dump", golden, "--dump", mtp, "--routes", f]), "another config.json");
    assert_error(&glimpse(&["audit", "--dump", golden, "--against", mtp, "--routes", f]), "experts, not 16");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().starts_with("failed")), "{left:?}");
    // Two batch rows and the MTP layer (golden/mtp: 2 x 16 tokens; layer 3, the MTP head's, runs
    // 15 positions a row, each the position it drafts from).
    let two = tmp.path().join("mtp.csv");
    assert_ok(&glimpse(&["audit", "--dump", mtp, "--routes", two.to_str().unwrap()]));
    let two = std::fs::read_to_string(&two).unwrap();
    let m = Dump::open(Path::new(mtp)).unwrap().tokens().unwrap();
    let of_layer = |l: &str| two.lines().filter(|x| x.split(',').nth(4) == Some(l)).count();
    assert_eq!((of_layer("1"), of_layer("2"), of_layer("3")), (32, 32, 30), "{two}");
    let line = format!("0,1,14,{},3,", m.ids[16 + 14]);
    assert!(two.lines().any(|x| x.starts_with(&line)), "{line} in {two}");
    assert!(!two.lines().any(|x| x.starts_with("0,1,15,") && x.split(',').nth(4) == Some("3")), "{two}");
    assert!(two.lines().any(|x| x.starts_with(&format!("0,1,15,{},2,", m.ids[31]))), "{two}");
    // The same tokens live: the same experts (as sets: each run lists them in its own order).
    let prompts = tmp.path().join("p.txt");
    let ids: Vec<String> = tokens.ids.iter().map(u32::to_string).collect();
    std::fs::write(&prompts, ids.join(",")).unwrap();
    let live = tmp.path().join("live.csv");
    let args =
        ["audit", "--prompts", prompts.to_str().unwrap(), "--model", "golden/flat", "--routes", live.to_str().unwrap()];
    assert_ok(&glimpse(&args));
    let live = std::fs::read_to_string(&live).unwrap();
    assert_eq!(live.lines().count(), lines.len());
    for (a, b) in live.lines().zip(&lines).skip(1) {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split(',').collect(), b.split(',').collect());
        assert_eq!(a[..5], b[..5], "{a:?} {b:?}");
        // Each expert's weight, paired by id, and the margin: the live run's to rounding.
        let pairs = |e: &str, w: &str| {
            let mut v: Vec<(u32, f32)> =
                e.split(' ').map(|x| x.parse().unwrap()).zip(w.split(' ').map(|x| x.parse().unwrap())).collect();
            v.sort_by_key(|p| p.0);
            v
        };
        let (pa, pb) = (pairs(a[5], a[6]), pairs(b[5], b[6]));
        assert_eq!(pa.iter().map(|p| p.0).collect::<Vec<_>>(), pb.iter().map(|p| p.0).collect::<Vec<_>>());
        for ((_, x), (_, y)) in pa.iter().zip(&pb) {
            approx::assert_abs_diff_eq!(x, y, epsilon = 1e-4);
        }
        approx::assert_abs_diff_eq!(a[7].parse::<f32>().unwrap(), b[7].parse::<f32>().unwrap(), epsilon = 1e-4);
    }
}

/// The routing weight each expert received: the JSON's `weight_mass` is the dump's
/// `moe.topk_weights` summed by expert (read here straight from the file), its MaxVio is
/// `max/mean - 1` of those sums, and the CSV's `weight_share` their shares; a run that recorded
/// no weights leaves them unknown, as the table's `-` and a note say.
#[test]
fn audit_sums_the_routing_weight_each_expert_received() {
    use glimpse::dump::{Dump, Values};
    let reference = "golden/flat/reference.safetensors";
    let (json, _) = assert_ok(&glimpse(&["audit", "--dump", reference, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let d = Dump::open(Path::new(reference)).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 3, "golden/flat's MoE layers: {v}");
    for layer in v["layers"].as_array().unwrap() {
        let i = layer["layer"].as_u64().unwrap();
        let (Values::I64(ids), _) = d.values(&format!("layers.{i}.moe.topk_ids")).unwrap() else { panic!() };
        let (Values::F32(w), _) = d.values(&format!("layers.{i}.moe.topk_weights")).unwrap() else { panic!() };
        let mut mass = vec![0.0f64; 16];
        for (&e, &x) in ids.iter().zip(&w) {
            mass[e as usize] += f64::from(x);
        }
        let got: Vec<f64> = layer["weight_mass"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert!(got.iter().zip(&mass).all(|(a, b)| (a - b).abs() < 1e-9), "layer {i}: {got:?} vs {mass:?}");
        let mean = mass.iter().sum::<f64>() / 16.0;
        let max_vio = mass.iter().copied().fold(0.0, f64::max) / mean - 1.0;
        assert!((layer["max_vio_by_weight"].as_f64().unwrap() - max_vio).abs() < 1e-9, "layer {i}");
    }
    let (csv, _) = assert_ok(&glimpse(&["audit", "--dump", reference, "--csv", "-"]));
    let share: f64 =
        csv.lines().filter(|l| l.starts_with("3,")).map(|l| l.split(',').nth(5).unwrap().parse::<f64>().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-4, "{share}");
    // Without the weights: unknown, not zero.
    let tmp = tempfile::tempdir().unwrap();
    let ids_only = common::run_dump(
        "golden/flat",
        &["--tokens-from", reference, "--record", "layers.*.moe.topk_ids"],
        tmp.path(),
        "ids.st",
    );
    let (json, _) = assert_ok(&glimpse(&["audit", "--dump", &ids_only, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["layers"][0]["weight_mass"].is_null() && v["layers"][0]["max_vio_by_weight"].is_null(), "{v}");
    let (table, _) = assert_ok(&glimpse(&["audit", "--dump", &ids_only, "--dump", reference]));
    assert!(
        table.contains("by weight is left out where some runs recorded no routing weights, or weights not finite (layer 2: 32 of 64"),
        "{table}"
    );
}
