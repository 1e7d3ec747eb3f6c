//! The `glimpse` binary end to end: exit codes (0 match, 1 mismatch, 2 error), one-line errors that
//! name the problem, and no panics on bad input.

use std::path::{Path, PathBuf};

mod common;
use common::{assert_error, assert_ok, glimpse, golden, s, synth, text};

fn with_config(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = synth(dir, 1);
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(common::TINY_CONFIG).unwrap();
    edit(&mut v);
    std::fs::write(dst.join("config.json"), v.to_string()).unwrap();
    dst
}

#[test]
fn verify_of_its_own_dump_matches_and_of_another_model_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (synth(tmp.path(), 1), synth(tmp.path(), 2));
    let dump = tmp.path().join("a.safetensors");
    let o = glimpse(&[
        "run",
        "--model",
        a.to_str().unwrap(),
        "--tokens",
        "1,2,3,4,5;6,7,8,9,10",
        "--dump",
        dump.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = glimpse(&["verify", "--model", a.to_str().unwrap(), "--golden", dump.to_str().unwrap()]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("layers.1.moe.topk_ids"), "{out}");
    let o = glimpse(&["verify", "--model", b.to_str().unwrap(), "--golden", dump.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("first mismatch: embeddings"), "{out}");
    // Both models share one config: no warning about a different config.json here.
    assert!(err.is_empty(), "{err}");
    // A reference made from another config is flagged, on one stderr line, once the comparison stands.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let other = root.join("mtp/reference.safetensors");
    let o = glimpse(&["verify", "--model", root.join("flat").to_str().unwrap(), "--golden", other.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("was made from a different config.json than") && err.lines().count() == 1, "{err}");
    // An error after it keeps it, on the error's one line: here the cause.
    let o =
        glimpse(&["verify", "--model", "golden/grouped-shared-yarn", "--golden", "golden/flat/reference.safetensors"]);
    let (_, err) = text(&o);
    let cause = "is out of range for vocab_size 128 (golden/flat/reference.safetensors was made from a different \
                 config.json than golden/grouped-shared-yarn)";
    assert!(o.status.code() == Some(2) && err.lines().count() == 1 && err.contains(cause), "{err}");
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let good = synth(t, 1);
    let good_s = good.to_str().unwrap();

    assert_error(
        &glimpse(&["verify", "--model", "/no/such/dir"]),
        "/no/such/dir: does not exist (expected a checkpoint folder",
    );
    assert_error(&glimpse(&["selftest", "--kernels-only"]), "--kernels-only needs --device cuda or cuda-emu");
    assert_error(&glimpse(&["inspect", "--model", t.to_str().unwrap()]), "config.json");

    let bad_json = t.join("bad-json");
    std::fs::create_dir_all(&bad_json).unwrap();
    std::fs::write(bad_json.join("config.json"), "{ not json").unwrap();
    assert_error(&glimpse(&["inspect", "--model", bad_json.to_str().unwrap()]), "invalid JSON");

    let groups = with_config(t, "groups", |v| v["n_group"] = 3.into());
    assert_error(&glimpse(&["inspect", "--model", groups.to_str().unwrap()]), "`n_group`");
    let rope =
        with_config(t, "rope", |v| v["rope_parameters"] = serde_json::json!({"rope_type": "linear", "factor": 2.0}));
    assert_error(&glimpse(&["inspect", "--model", rope.to_str().unwrap()]), "rope_parameters.rope_type");
    let shared0 = with_config(t, "shared0", |v| v["indexer_types"] = serde_json::json!(["shared", "full"]));
    assert_error(&glimpse(&["inspect", "--model", shared0.to_str().unwrap()]), "indexer_types");
    // YaRN's mscale values as numbers (they printed as `Some(1.0)`).
    let (out, _) = assert_ok(&glimpse(&["inspect", "--model", "golden/grouped-shared-yarn"]));
    assert!(out.contains("mscale 1, mscale_all_dim 1;") && !out.contains("Some("), "{out}");
    let act = with_config(t, "act", |v| v["hidden_act"] = "gelu".into());
    assert_error(&glimpse(&["inspect", "--model", act.to_str().unwrap()]), "hidden_act");
    let wide = with_config(t, "wide", |v| v["hidden_size"] = 48.into());
    assert_error(&glimpse(&["run", "--model", wide.to_str().unwrap(), "--tokens", "1,2"]), "weight problem(s)");

    let no_weights = t.join("no-weights");
    std::fs::create_dir_all(&no_weights).unwrap();
    std::fs::copy(good.join("config.json"), no_weights.join("config.json")).unwrap();
    assert_error(&glimpse(&["inspect", "--model", no_weights.to_str().unwrap()]), "no model.safetensors");

    let escape = t.join("escape");
    std::fs::create_dir_all(&escape).unwrap();
    std::fs::copy(good.join("config.json"), escape.join("config.json")).unwrap();
    std::fs::write(
        escape.join("model.safetensors.index.json"),
        r#"{"weight_map": {"lm_head.weight": "../model.safetensors"}}"#,
    )
    .unwrap();
    assert_error(&glimpse(&["inspect", "--model", escape.to_str().unwrap()]), "escapes the model folder");

    let garbage = t.join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\0\0\0\0\0\0\0{not a header}").unwrap();
    assert_error(
        &glimpse(&["verify", "--model", good_s, "--golden", garbage.to_str().unwrap()]),
        "garbage.safetensors",
    );

    // A valid safetensors file that is not a dump.
    let not_dump = good.join("model.safetensors");
    assert_error(&glimpse(&["verify", "--model", good_s, "--golden", not_dump.to_str().unwrap()]), "glm5-dump/1");

    assert_error(&glimpse(&["run", "--model", good_s, "--tokens", "1,x"]), "--tokens: \"x\" is not a token id");
    assert_error(&glimpse(&["run", "--model", good_s, "--tokens", "1,2;3"]), "same length");
    assert_error(&glimpse(&["run", "--model", good_s, "--tokens", "1,40"]), "out of range for vocab_size 40");
    assert_error(
        &glimpse(&["synth", "--preset", "glm5", "--shards", "0", "--out", t.join("s").to_str().unwrap()]),
        "--shards",
    );
}

#[test]
fn prompts_go_through_the_checkpoints_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path(), 3);
    let m = model.to_str().unwrap();
    let o = glimpse(&["run", "--model", m, "--prompt", "hello world"]);
    assert_error(&o, "tokenizer.json");
    let tokenizer = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 7, "world": 11}, "unk_token": "[UNK]"}}"#;
    std::fs::write(model.join("tokenizer.json"), tokenizer).unwrap();
    let (by_text, _) = text(&glimpse(&["run", "--model", m, "--prompt", "hello world"]));
    let (by_ids, _) = text(&glimpse(&["run", "--model", m, "--tokens", "7,11"]));
    assert!(by_text.contains("2 tokens"), "{by_text}");
    let rows = |out: &str| out.lines().filter(|l| l.starts_with("row ")).map(String::from).collect::<Vec<_>>();
    assert_eq!(rows(&by_text), rows(&by_ids));
    assert_error(&glimpse(&["run", "--model", m, "--prompt", ""]), "empty");
}

/// `selftest` verifies every bundled golden case on the CPU, normal and isolated; asking for the
/// GPU on a machine or build without one is a one-line error with exit code 2.
#[test]
fn selftest_checks_every_golden_case_and_refuses_a_missing_gpu() {
    let (code, out) = common::code_and_text(&["selftest"]);
    assert_eq!(code, 0, "{out}");
    for case in ["flat", "grouped-shared-yarn", "fp8-sharded", "bf16-fused", "mtp"] {
        assert!(out.contains(&format!("golden/{case} (cpu): ")), "{case}: {out}");
        assert!(out.contains(&format!("golden/{case} (cpu, --isolate): ")), "{case}: {out}");
    }
    assert!(!out.contains("FAILED"), "{out}");
    assert!(out.trim_end().ends_with("selftest: every check passed"), "{out}");
    // It loads models, so --max-memory holds for it as for every command that does.
    assert_error(&glimpse(&["--max-memory", "1K", "selftest"]), "but --max-memory is 1.0 KB");
    // A golden/ that holds no reference is an error, not a pass that checked nothing (the
    // binary finds the checkout it was built from first, so the library is asked directly).
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(empty.path().join("golden/flat")).unwrap();
    let target = glimpse::device::Target::from(glimpse::device::Backend::Cpu);
    let scope = glimpse::selftest::Scope::All;
    let err = glimpse::selftest::run(&empty.path().join("golden"), target, scope, None).unwrap_err().to_string();
    assert!(err.contains("no golden cases under"), "{err}");
    // Nor does another golden/flat in the working directory stand in for the bundled case.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .arg("verify")
        .current_dir(empty.path())
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains(&format!("verify {}", golden("flat").display())), "{out}{err}");
    // Without a GPU (or the `cuda` feature) a one-line error; with one, the kernel checks run.
    let o = glimpse(&["selftest", "--device", "cuda"]);
    if o.status.code() == Some(2) {
        assert_error(&o, "cuda: ");
        assert_error(&glimpse(&["verify", "--device", "cuda"]), "cuda: ");
    } else {
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}{err}");
        assert!(out.contains("kernel rms_norm") && out.contains("(cuda): ") && !out.contains("FAILED"), "{out}{err}");
    }
}

/// transformers run with bf16 products against its own f32 run, at bf16's tolerance: where the
/// first divergence is a float tensor with a few scattered elements past it, diff reads it as
/// rounding's tail; where it is a DSA selection, every flip is a near-tie. At f32's tolerance a
/// bf16 port is told to use bf16's.
#[test]
fn a_bf16_reference_against_the_f32_one_reads_as_rounding() {
    let first = |case: &str, tol: &str| {
        let (bf16, f32_) =
            (format!("golden/{case}/reference-bf16.safetensors"), format!("golden/{case}/reference.safetensors"));
        let args = ["diff", &bf16, &f32_, "--model", &format!("golden/{case}"), "--atol", tol, "--rtol", tol];
        let (out, _) = text(&glimpse(&args));
        out.lines().nth(1).unwrap_or_default().to_string()
    };
    // At 2e-2 every case's first divergence is a selection flipped by the rounding of the
    // attention before it; at 1e-2 fp8-sharded's is that attention's output, a few elements past.
    let fp8 = first("fp8-sharded", "1e-2");
    assert!(fp8.starts_with("first divergence: layers.0.attn.out (2 of 3840 elements outside, scattered"), "{fp8}");
    assert!(fp8.contains("the tail of rounding noise"), "{fp8}");
    assert_eq!(first("flat", "2e-2"), "first divergence: layers.1.dsa.topk (every flip a near-tie)");
    // At f32's tolerance, a port whose activations are bf16 values (its gate logits are not) is
    // told to compare at bf16's, from the first float tensor that differs.
    let port = ["diff", "golden/flat/bf16-port.safetensors", "golden/flat/reference.safetensors"];
    let (out, _) = text(&glimpse(&port));
    let note = "note: ours's embeddings, the first float tensor outside the tolerance, holds bf16 values only: \
                compare at bf16's tolerance, --atol 2e-2 --rtol 2e-2";
    assert!(out.contains(note) && !out.contains("ours holds bf16 values only"), "{out}");
    let (json, _) = text(&glimpse(&[&port[..], &["--json"]].concat()));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["bf16_first_divergence"], serde_json::json!({"name": "embeddings", "a": true, "b": false}));
    // The text's note is in the JSON too, as the other commands' notes are.
    let notes = json["notes"].as_array().unwrap();
    assert!(notes.iter().any(|n| n.as_str().unwrap().contains("holds bf16 values only")), "{notes:?}");
    // A bf16 checkpoint's embeddings are bf16 values on both sides: a lookup bug there (position
    // 5 given position 6's row) is no hint to loosen the tolerance.
    let tmp = tempfile::tempdir().unwrap();
    let reference = Path::new("golden/bf16-fused/reference.safetensors");
    let looked_up = common::edit_dump(reference, &tmp.path().join("lookup.st"), |t| {
        let (_, glimpse::dump::Values::F32(x), shape) = t.iter_mut().find(|(n, ..)| n == "embeddings").unwrap() else {
            panic!("embeddings are floats")
        };
        let h = shape[2];
        let next = x[6 * h..7 * h].to_vec();
        x[5 * h..6 * h].copy_from_slice(&next);
    });
    let (out, _) = text(&glimpse(&["diff", &s(&looked_up), reference.to_str().unwrap()]));
    assert!(out.contains("first divergence: embeddings") && !out.contains("note:"), "{out}");
    // Nor, at bf16's tolerance, is it read as rounding's tail: one position moved, the rest exact.
    let loose = ["--atol", "2e-2", "--rtol", "2e-2"];
    let (out, _) = text(&glimpse(&[&["diff", &s(&looked_up), reference.to_str().unwrap()][..], &loose].concat()));
    assert!(out.lines().nth(1) == Some("first divergence: embeddings"), "{out}");
}

/// `diff --tol` says when a pattern can change nothing: it names no shared tensor, or only
/// selections and integer tensors (compared as sets or exactly, not at a tolerance).
#[test]
fn diff_tol_patterns_that_change_nothing_are_said() {
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat/reference.safetensors");
    let r = reference.to_str().unwrap();
    for (pattern, said) in [
        ("*.dsa.topk=1,1", "--tol *.dsa.topk matches only selections and integer tensors"),
        ("nothing.*=1,1", "--tol nothing.* matches no tensor compared"),
    ] {
        let (_, err) = assert_ok(&glimpse(&["diff", r, r, "--tol", pattern]));
        assert!(err.contains(said), "{pattern}: {err}");
    }
    let (_, err) = assert_ok(&glimpse(&["diff", r, r, "--tol", "*.dsa.*=1,1"]));
    assert!(!err.contains("warning"), "dsa.* also names the margins' and scores' floats: {err}");
}

/// Warnings and budgets that do not stop a run: `--stream` fits where the resident run fits (its
/// estimate once added a layer's copies to its file pages and refused it), `diff --model` names
/// a checkpoint whose config is not the one the dumps ran (diff, audit), and `generate` past
/// `max_position_embeddings` says so.
#[test]
fn streaming_fits_where_resident_does_and_mismatched_configs_are_named() {
    for stream in [&[][..], &["--stream"]] {
        // (golden/flat's resident estimate: 4.3 MB, its f32 copies and the file pages they were
        // read from; streamed, 3.4 MB.)
        let args: Vec<&str> = ["--max-memory", "5M", "verify"].iter().chain(stream).copied().collect();
        let (code, out) = common::code_and_text(&args);
        assert_eq!(code, 0, "{args:?}: {out}");
    }
    let reference = "golden/flat/reference.safetensors";
    // (audit goes on to find that this model's router did not choose the dump's experts.)
    for (args, code) in [
        (&["diff", reference, reference, "--model", "golden/grouped-shared-yarn"][..], 0),
        (&["audit", "--dump", reference, "--model", "golden/grouped-shared-yarn"], 2),
    ] {
        let o = glimpse(args);
        assert_eq!(o.status.code(), Some(code), "{args:?}");
        assert!(code == 0 || text(&o).1.contains("not the ones --model's router picks"), "{:?}", text(&o));
        assert!(
            text(&o).1.contains("was made from a different config.json than golden/grouped-shared-yarn"),
            "{args:?}: {:?}",
            text(&o)
        );
    }
    // A checkpoint of another expert count cannot recompute the dumps' routing margins: said.
    let mtp = "golden/mtp/reference.safetensors";
    let (_, err) = text(&glimpse(&["diff", mtp, mtp, "--model", "golden/flat"]));
    assert!(err.contains("routers have 8 experts, golden/flat's 16: its routing margins are not recomputed"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let short = with_config(tmp.path(), "short", |v| v["max_position_embeddings"] = 4.into());
    let o = glimpse(&["generate", "--model", short.to_str().unwrap(), "--tokens", "1,2,3", "--max-new-tokens", "3"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    // 3 prompt positions and 2 fed back (the third new token is only printed).
    assert!(text(&o).1.contains("5 positions, 1 of them past max_position_embeddings (4)"), "{:?}", text(&o).1);

    // An eos id no token can be is said; a tokenizer that cannot be read costs ids the text only.
    let odd = with_config(tmp.path(), "odd", |v| v["eos_token_id"] = 999.into());
    std::fs::write(odd.join("tokenizer.json"), "{broken").unwrap();
    let o = glimpse(&["generate", "--model", odd.to_str().unwrap(), "--tokens", "1,2,3", "--max-new-tokens", "2"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let (out, err) = text(&o);
    assert!(err.contains("eos_token_id 999 is past vocab_size"), "{err}");
    assert!(err.contains("tokenizer.json") && err.contains("shown as ids only"), "{err}");
    assert!(out.contains("row 0: generated ["), "{out}");
}

/// A run checked against its own dump with its decisions replayed matches everywhere, on both
/// paths: a replayed route keeps its own decision's margin (it was recorded as NaN, a mismatch).
#[test]
fn replaying_a_runs_own_decisions_matches_its_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let own =
        common::run_dump("golden/flat", &["--tokens-from", "golden/flat/reference.safetensors"], tmp.path(), "own.st");
    let own = own.as_str();
    for device in ["cpu", "cpu-ops"] {
        let args = ["verify", "--model", "golden/flat", "--golden", own, "--force-routing", "--force-selection"];
        let (code, out) = common::code_and_text(&[&args[..], &["--device", device]].concat());
        assert_eq!(code, 0, "{device}: {out}");
    }
}

/// The README's porting command: a replayed run's summary says what it replayed, and a last line
/// what matches without the replay (fewer tensors, first a decision), on both paths.
#[test]
fn a_replayed_verify_says_so_and_what_matches_without() {
    let args = ["verify", "--model", "golden/flat", "--golden", "golden/flat/bf16-port.safetensors", "--isolate"];
    let tol = ["--force-routing", "--force-selection", "--atol", "2e-2", "--rtol", "2e-2"];
    for device in ["cpu", "cpu-ops"] {
        let (code, out) = common::code_and_text(&[&args[..], &tol, &["--device", device]].concat());
        // Layer 0's output stays outside 2e-2 with the decisions replayed (README's porting step 2).
        assert_eq!(code, 1, "{device}: {out}");
        let count = |line: &str| -> usize { line.split(" of ").next().unwrap().trim().parse().unwrap() };
        let summary = out.lines().find(|l| l.contains(" tensors match (")).unwrap();
        let replayed = "isolated layers, the reference's expert choices and DSA selections replayed";
        assert!(summary.contains(replayed), "{device}: {out}");
        assert!(out.contains("explained by flips"), "{device}: {out}");
        let without = out.lines().find_map(|l| l.strip_prefix("without the replay: ")).unwrap();
        assert!(count(without) < count(summary), "{device}: {out}");
        let first = without.split("first mismatch: ").nth(1).unwrap();
        assert!(first.ends_with(".dsa.topk") || first.ends_with(".moe.topk_ids"), "{device}: {out}");
    }
}

/// `generate` stops once every row has produced one of config.json's `eos_token_id`s (one id or
/// a list), shows a row up to its eos, and `--ignore-eos` goes on.
#[test]
fn generate_stops_at_eos_unless_told_not_to() {
    let tmp = tempfile::tempdir().unwrap();
    let free = synth(tmp.path(), 1);
    let greedy = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--tokens", "1,2,3", "--max-new-tokens", "6"];
        args.extend(extra);
        let o = glimpse(&args);
        assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
        let (out, err) = text(&o);
        let row = out.lines().find(|l| l.starts_with("row 0: generated ")).unwrap().to_string();
        let ids: Vec<u32> = serde_json::from_str(row.trim_start_matches("row 0: generated ")).unwrap();
        (ids, err)
    };
    let (all, _) = greedy(&free, &["--ignore-eos"]);
    assert_eq!(all.len(), 6);
    // The third greedy token made the eos (in a list, as GLM-5's config has it).
    let eos = with_config(tmp.path(), "eos", |v| v["eos_token_id"] = serde_json::json!([all[2], 99_999]));
    let (stopped, err) = greedy(&eos, &[]);
    let first = all.iter().position(|&t| t == all[2]).unwrap();
    assert_eq!(stopped, all[..=first], "{err}");
    assert!(err.contains(&format!("stopped by eos_token_id in every row after {} of 6", first + 1)), "{err}");
    assert_eq!(greedy(&eos, &["--ignore-eos"]).0, all);
}

/// The GPU's flags are a section of their own in the help of each command with `--device`, and
/// only they are in it (a heading set for them once headed every flag after them).
#[test]
fn the_gpu_section_of_the_help_holds_the_gpu_flags_only() {
    for cmd in ["verify", "run", "audit", "bench", "tui", "selftest"] {
        let (out, _) = assert_ok(&glimpse(&[cmd, "-h"]));
        let section: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("GPU (with --device"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(section, ["--ordinal", "--precision", "--attention"], "{cmd}: {out}");
    }
}

/// An output never replaces what the command reads (a dump over the weights or over the dump it
/// was run from, a CSV over an audited dump) nor another output; the files stay as they were.
#[test]
fn outputs_never_replace_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("flat");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors", "reference.safetensors"] {
        std::fs::copy(golden("flat").join(f), model.join(f)).unwrap();
    }
    let (m, reference) = (model.to_str().unwrap(), model.join("reference.safetensors"));
    let r = reference.to_str().unwrap();
    let weights = model.join("model.safetensors");
    let before = |p: &Path| std::fs::read(p).unwrap();
    let (weights_before, reference_before) = (before(&weights), before(&reference));
    let dotted = format!("{m}/../flat/model.safetensors");
    let cases: [(&[&str], &str); 5] = [
        (&["run", "--model", m, "--tokens", "1,2", "--dump", &dotted], "is --model's "),
        (&["run", "--model", m, "--tokens-from", r, "--dump", r], "is --tokens-from's "),
        (&["generate", "--model", m, "--tokens", "1", "--dump", &format!("{m}/config.json")], "is --model's "),
        (&["audit", "--dump", r, "--csv", r], &format!("--csv {r} is --dump's {r}")),
        (&["audit", "--dump", r, "--csv", &format!("{m}/x"), "--heatmap", &format!("{m}/./x")], "is also --csv's path"),
    ];
    for (args, needle) in cases {
        assert_error(&glimpse(args), needle);
    }
    assert!(before(&weights) == weights_before && before(&reference) == reference_before);
    assert!(!model.join("x").exists());
    // A dump beside the weights is fine, and so is writing it again, and into an empty file.
    for _ in 0..2 {
        assert_ok(&glimpse(&["run", "--model", m, "--tokens", "1,2", "--dump", &format!("{m}/ours.st")]));
    }
    let empty = model.join("empty.st");
    std::fs::write(&empty, b"").unwrap();
    assert_ok(&glimpse(&["run", "--model", m, "--tokens", "1,2", "--dump", empty.to_str().unwrap()]));
    // What glimpse did not write it does not replace, even where the command does not read it: a
    // reference another tool wrote (`verify` would then check glimpse against itself), a file
    // that is no dump, or a dump under a report.
    let notes = model.join("notes.txt");
    std::fs::write(&notes, b"keep me").unwrap();
    let n = notes.to_str().unwrap();
    let refused: [(&[&str], &str); 4] = [
        (&["run", "--model", m, "--tokens", "1,2", "--dump", r], "a dump another tool wrote (transformers 5.24.0"),
        (&["generate", "--model", m, "--tokens", "1", "--dump", n], "a file that is not a safetensors dump is there"),
        (&["run", "--model", m, "--tokens", "1,2", "--dump", &format!("{m}/model.safetensors")], "is --model's"),
        (&["audit", "--dump", &format!("{m}/ours.st"), "--csv", r], "a safetensors file is there"),
    ];
    for (args, needle) in refused {
        assert_error(&glimpse(args), needle);
    }
    assert!(before(&reference) == reference_before && before(&notes) == b"keep me");
    // A report replaces text, never a dump cut short (known by its header) or a binary file;
    // a dump of glimpse's own cut short is replaced by a --dump.
    let ours = std::fs::read(model.join("ours.st")).unwrap();
    let cut = model.join("cut.st");
    std::fs::write(&cut, &ours[..ours.len() - 64]).unwrap();
    let binary = model.join("data.bin");
    std::fs::write(&binary, [0u8, 159, 146, 150, 255]).unwrap();
    let dump = format!("{m}/ours.st");
    assert_error(&glimpse(&["audit", "--dump", &dump, "--csv", cut.to_str().unwrap()]), "a safetensors file is there");
    assert_error(&glimpse(&["audit", "--dump", &dump, "--csv", binary.to_str().unwrap()]), "a binary file is there");
    assert_ok(&glimpse(&["run", "--model", m, "--tokens", "1,2", "--dump", cut.to_str().unwrap()]));
    assert_ok(&glimpse(&["audit", "--dump", &dump, "--csv", n]));
}

/// `synth` does not write random weights over a checkpoint it did not write (it marks its own),
/// nor over its `--config`; it refuses shards it cannot fill and checkpoints the disk cannot
/// hold, before creating anything; a folder it did not finish is refused as a checkpoint.
#[test]
fn synth_refuses_what_it_would_destroy() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::copy(golden("flat").join("config.json"), real.join("config.json")).unwrap();
    std::fs::copy(golden("flat").join("model.safetensors"), real.join("model.safetensors")).unwrap();
    let cfg = golden("flat").join("config.json");
    let cfg = cfg.to_str().unwrap();
    let o = glimpse(&["synth", "--config", cfg, "--out", &t("real")]);
    assert_error(&o, "holds weights without synth's mark");
    // Nor over a config with no weights of its own beside it.
    let notes = tmp.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("config.json"), b"{}").unwrap();
    assert_error(&glimpse(&["synth", "--config", cfg, "--out", &t("notes")]), "but no weights synth wrote");
    assert_eq!(std::fs::read(notes.join("config.json")).unwrap(), b"{}");
    assert!(!notes.join("model.safetensors").exists());
    assert_eq!(
        std::fs::read(real.join("model.safetensors")).unwrap(),
        std::fs::read(golden("flat").join("model.safetensors")).unwrap()
    );
    // Its own checkpoint it rewrites, from its own config too (read whole before writing).
    for shards in ["1", "2"] {
        assert_ok(&glimpse(&["synth", "--config", cfg, "--dtype", "f32", "--shards", shards, "--out", &t("mine")]));
    }
    assert_ok(&glimpse(&["synth", "--config", &t("mine/config.json"), "--seed", "3", "--out", &t("mine")]));
    // What a synth stopped mid-way leaves (its shards may be of two seeds) is no checkpoint until
    // synth runs again.
    std::fs::write(tmp.path().join("mine").join(glimpse::checkpoint::SYNTH_UNFINISHED), b"").unwrap();
    assert_error(&glimpse(&["inspect", "--model", &t("mine")]), "synth did not finish writing it");
    assert_ok(&glimpse(&["synth", "--config", cfg, "--out", &t("mine")]));
    assert_ok(&glimpse(&["inspect", "--model", &t("mine")]));
    assert_error(
        &glimpse(&["synth", "--config", cfg, "--shards", "100000", "--out", &t("many")]),
        "more than the checkpoint's",
    );
    let o = glimpse(&["synth", "--preset", "glm5", "--layers", "2000", "--out", &t("huge/x")]);
    assert_error(&o, "GB are free there");
    assert!(!tmp.path().join("many").exists() && !tmp.path().join("huge").exists());
}

/// Standard output that cannot be written (`> /dev/full`) is a one-line error with exit code 2,
/// not a panic.
#[cfg(target_os = "linux")]
#[test]
fn a_full_standard_output_is_a_one_line_error() {
    let reference = golden("flat").join("reference.safetensors");
    let r = reference.to_str().unwrap();
    for args in [&["verify"][..], &["diff", r, r, "--json"], &["inspect", "--model", golden("flat").to_str().unwrap()]]
    {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).stdout(full).output().unwrap();
        assert_error(&o, "cannot write to standard output: No space left on device");
    }
}

/// Small inputs read whole may come through a pipe, as process substitution gives them.
#[cfg(unix)]
#[test]
fn small_inputs_may_be_pipes() {
    let tmp = tempfile::tempdir().unwrap();
    let (bin, flat) = (env!("CARGO_BIN_EXE_glimpse"), golden("flat"));
    let (cfg, out) = (flat.join("config.json"), tmp.path().join("piped"));
    let script = format!(
        "'{bin}' synth --config <(cat '{}') --out '{}' && '{bin}' audit --model '{}' --prompts <(printf '1,2,3\\n')",
        cfg.display(),
        out.display(),
        flat.display()
    );
    let o = std::process::Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").is_file());
}

/// Two dumps whose recorded config.json differ are compared with a warning saying so (printed
/// once the comparison stands: an error alone stays one line).
#[test]
fn diff_warns_when_the_dumps_configs_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let flat = golden("flat");
    let copy = tmp.path().join("flat");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(flat.join("model.safetensors"), copy.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(flat.join("config.json")).unwrap();
    std::fs::write(copy.join("config.json"), format!("{config}\n")).unwrap(); // other bytes, same config
    let reference = flat.join("reference.safetensors");
    let r = reference.to_str().unwrap();
    let ours = common::run_dump(copy.to_str().unwrap(), &["--tokens-from", r], tmp.path(), "ours.st");
    let (out, err) = text(&glimpse(&["diff", &ours, r]));
    assert!(out.contains("no divergence"), "{out}");
    assert!(err.contains("were made from different config.json files"), "{err}");
}

/// Every golden case matches its transformers reference with every query of the prefill in the
/// absorbed form (`GLIMPSE_ABSORBED_FROM=0`; by default it starts past these cases' lengths), and
/// a value that is no position is refused before any work by the commands that run the model.
#[test]
fn golden_cases_match_with_every_query_absorbed() {
    let with = |from: &str, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_glimpse"))
            .args(args)
            .env("GLIMPSE_ABSORBED_FROM", from)
            .output()
            .unwrap()
    };
    for case in ["flat", "fp8-sharded", "grouped-shared-yarn", "bf16-fused", "mtp"] {
        let o = with("0", &["verify", "--model", &s(&golden(case))]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{case}: {out}{err}");
        assert!(out.lines().last().is_some_and(|l| l.contains("tensors match")), "{case}: {out}");
    }
    // The override is what put those queries in the absorbed form: the attention outputs of the
    // two forms differ in their last bits, and only there.
    let tmp = tempfile::tempdir().unwrap();
    let attn = |from: &str| {
        let out = tmp.path().join(format!("from{from}.st"));
        let args = ["run", "--model", "golden/flat", "--tokens", "1,2,3,4", "--dump", &s(&out)];
        assert_eq!(with(from, &args).status.code(), Some(0));
        match glimpse::dump::Dump::open(&out).unwrap().values("layers.0.attn.out").unwrap().0 {
            glimpse::dump::Values::F32(v) => v,
            _ => panic!("attn.out is not f32"),
        }
    };
    let (expanded, absorbed) = (attn(""), attn("0"));
    assert_ne!(expanded, absorbed, "GLIMPSE_ABSORBED_FROM=0 changed nothing");
    let worst = expanded.iter().zip(&absorbed).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "the two forms differ by {worst}");
    assert_error(&with("first", &["verify"]), "GLIMPSE_ABSORBED_FROM=first: not a position");
    // Commands that never run the model do not read it.
    let reference = s(&golden("flat").join("reference.safetensors"));
    assert_eq!(with("first", &["diff", &reference, &reference]).status.code(), Some(0));
}

/// A `--record` pattern that reaches `dsa.scores` only by a wildcard records everything it names
/// but them, and says so after the dump is written; naming them records them, and the default
/// leaves them out, each with no note.
#[test]
fn a_wildcard_that_leaves_out_the_scores_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = s(&tmp.path().join("d.st"));
    let run = |patterns: &str| {
        glimpse(&["run", "--model", "golden/flat", "--tokens", "1,2,3", "--record", patterns, "--dump", &out])
    };
    let (_, err) = assert_ok(&run("layers.*.dsa.*"));
    assert!(err.contains("--record layers.*.dsa.* left out the S x S `dsa.scores`"), "{err}");
    assert!(!glimpse::dump::Dump::open(Path::new(&out)).unwrap().contains("layers.0.dsa.scores"));
    let (_, err) = assert_ok(&run("layers.*.dsa.*,*.dsa.scores"));
    assert!(!err.contains("left out"), "{err}");
    assert!(glimpse::dump::Dump::open(Path::new(&out)).unwrap().contains("layers.0.dsa.scores"));
    // The default (`*`) leaves them out as its help says, with no note; `*` given is told.
    let (_, err) = assert_ok(&glimpse(&["run", "--model", "golden/flat", "--tokens", "1,2,3", "--dump", &out]));
    assert!(!err.contains("left out"), "{err}");
    let (_, err) = assert_ok(&run("*"));
    assert!(err.contains("--record * left out the S x S `dsa.scores`"), "{err}");
}

/// `verify` takes the spec's per-name tolerance overrides as `diff` does (and says a pattern that
/// matched nothing), and does not pass a reference it could not compare: one holding only the
/// tokens, or its hook points behind a prefix. `diff --json` says the tolerances it used.
#[test]
fn verify_takes_tol_overrides_and_does_not_pass_on_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::golden("flat").join("reference.safetensors");
    let logits_line = |args: &[&str]| {
        let (code, out) = common::code_and_text(&[&["verify", "--atol", "0", "--rtol", "0"], args].concat());
        assert_eq!(code, 1, "{out}");
        out.lines().find(|l| l.starts_with("logits ")).map(String::from).unwrap_or_else(|| panic!("{out}"))
    };
    assert!(logits_line(&[]).contains("MISMATCH"));
    assert!(logits_line(&["--tol", "logits=1e-4,1e-4"]).contains(" ok "));
    let (_, err) = text(&glimpse(&["verify", "--tol", "nothing*=1,1"]));
    assert!(err.contains("warning: --tol nothing* matches no tensor compared"), "{err}");

    let ids_only =
        common::edit_dump(&reference, &tmp.path().join("ids.st"), |t| t.retain(|(n, _, _)| n == "input_ids"));
    let (code, out) = common::code_and_text(&["verify", "--golden", &common::s(&ids_only)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("nothing verified: the reference holds none of this run's hook points but input_ids"),
        "{out}"
    );
    assert!(
        out.contains("1 of 1 tensors match (atol 1e-4, rtol 1e-4); not passed: the reference could not be"),
        "{out}"
    );
    // diff does not pass it either, whichever side holds only the tokens.
    let (i, r) = (common::s(&ids_only), common::s(&reference));
    for pair in [[&i, &r], [&r, &i]] {
        let (code, out) = common::code_and_text(&["diff", pair[0], pair[1], "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!((code, &v["match"]), (1, &serde_json::json!(false)), "{out}");
        assert_eq!(v["not_compared"], "nothing compared but input_ids: the dumps share no hook point");
        let (_, text_out) = common::code_and_text(&["diff", pair[0], pair[1]]);
        assert!(text_out.contains("; not passed: nothing compared but input_ids"), "{text_out}");
    }
    let prefixed = common::edit_dump(&reference, &tmp.path().join("prefixed.st"), |t| {
        for (n, _, _) in t.iter_mut().filter(|(n, _, _)| n.starts_with("layers.")) {
            *n = format!("model.{n}");
        }
    });
    let (code, out) = common::code_and_text(&["verify", "--golden", &common::s(&prefixed)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("spec hook points with a `model.` prefix: not compared"), "{out}");

    // A reference of bf16 values (truncated here) at f32's tolerance: the note diff gives.
    let bf16 = tmp.path().join("bf16.st");
    common::rewrite_st(&reference, &bf16, |_, v, _| {
        v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits() & !0xFFFF))
    });
    let (_, out) = common::code_and_text(&["verify", "--golden", &common::s(&bf16)]);
    assert!(out.contains("holds bf16 values only (a run in bf16?): compare at bf16's tolerance"), "{out}");
    let (_, out) =
        common::code_and_text(&["verify", "--golden", &common::s(&bf16), "--atol", "2e-2", "--rtol", "2e-2"]);
    assert!(!out.contains("holds bf16 values only"), "{out}");
    // (The tolerance that tensor was compared at is what counts: a --tol override.)
    let (_, out) = common::code_and_text(&["verify", "--golden", &common::s(&bf16), "--tol", "*=5e-2,5e-2"]);
    assert!(!out.contains("holds bf16 values only"), "{out}");

    // A dump without the `source` the spec asks for is compared, with a warning.
    let no_source = tmp.path().join("no-source.st");
    let meta = std::collections::BTreeMap::from([("format".to_string(), "glm5-dump/1".to_string())]);
    let logits = glimpse::st::Entry::f32(vec![1, 1, 2], &[0.5, 1.5]);
    glimpse::st::write(&no_source, &[("logits".to_string(), logits)], &meta).unwrap();
    let (_, err) = assert_ok(&glimpse(&["diff", &common::s(&no_source), &common::s(&no_source)]));
    assert!(err.contains("no-source.st: no `source` in its metadata"), "{err}");

    // --json: one document saying what the lines say.
    let (code, text_out) = common::code_and_text(&["verify", "--atol", "0", "--rtol", "0"]);
    let (json_code, json_out) = common::code_and_text(&["verify", "--atol", "0", "--rtol", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(
        (code, json_code, v["schema"].as_str(), v["match"].as_bool()),
        (1, 1, Some("glimpse-verify/1"), Some(false))
    );
    let first = v["first_mismatch"].as_str().unwrap();
    assert!(text_out.contains(&format!("first mismatch: {first}")), "{text_out}");
    let summary = format!("{} of {} tensors match", v["tensors_matching"], v["tensors"].as_array().unwrap().len());
    assert!(text_out.contains(&summary), "{summary}: {text_out}");
    let (json_out, _) = assert_ok(&glimpse(&["verify", "--json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json_out).unwrap()["match"], true);
    let (_, json_out) = common::code_and_text(&["verify", "--json", "--golden", &common::s(&ids_only)]);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert!(v["not_compared"].as_str().is_some_and(|n| n.starts_with("nothing verified")), "{v}");
    // A replay: the error without it and with it, tensor by tensor, as numbers.
    let port = common::s(&common::golden("flat").join("bf16-port.safetensors"));
    let (_, json_out) = common::code_and_text(&["verify", "--json", "--golden", &port, "--force-routing"]);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    let explained = v["without_replay"]["explained"].as_array().unwrap();
    let logits = explained.iter().find(|e| e["name"] == "logits").unwrap();
    let (without, with) = (logits["nmse_without"].as_f64().unwrap(), logits["nmse_with"].as_f64().unwrap());
    assert!((logits["explained_share"].as_f64().unwrap() - (1.0 - with / without).max(0.0)).abs() < 1e-12);
    assert_eq!(v["replayed"], "expert choices");

    let r = common::s(&reference);
    let (json, _) = assert_ok(&glimpse(&["diff", &r, &r, "--json", "--tol", "logits=2e-2,0"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["tolerance"]["per_name"][0], serde_json::json!({"pattern": "logits", "atol": 2e-2, "rtol": 0.0}));
    assert_eq!(v["tolerance"]["atol"], 1e-4);
}

/// A run's dump has the same bytes however its model folder was spelled (its `model` metadata is
/// the folder as it resolves), so a pipeline can cache dumps by their hash.
#[test]
fn a_dump_does_not_depend_on_how_the_model_was_spelled() {
    let tmp = tempfile::tempdir().unwrap();
    let dumps: Vec<Vec<u8>> = ["golden/flat", "./golden/flat/", &s(&golden("flat"))]
        .iter()
        .enumerate()
        .map(|(i, model)| {
            let path = tmp.path().join(format!("{i}.st"));
            assert_ok(&glimpse(&["run", "--model", model, "--tokens", "1,2,3", "--dump", &s(&path)]));
            std::fs::read(&path).unwrap()
        })
        .collect();
    assert!(dumps.windows(2).all(|w| w[0] == w[1]));
}

/// A config file `synth` starts from that has a wrong field is named with the field, and a
/// memory limit under a byte (a unit left out) is refused, not taken as 0 (which refused every
/// later run with a budget message).
#[test]
fn synth_names_its_config_file_and_max_memory_refuses_less_than_a_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.json");
    std::fs::write(&cfg, r#"{"model_type": "glm_moe_dsa", "n_group": 0}"#).unwrap();
    let out = tmp.path().join("out");
    let o = glimpse(&["synth", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_error(&o, &format!("{}: config field `n_group`: must be positive", cfg.display()));
    assert_error(&glimpse(&["--max-memory", "0.5", "verify"]), "\"0.5\" is less than a byte (a unit missing? 16G)");
}

/// `synth --dense N` keeps N dense layers and makes the rest MoE (a shallow GLM-5-shaped model
/// with routing to audit); a checkpoint with no MoE layer is warned of, with --experts unused.
#[test]
fn synth_sets_the_dense_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d1");
    let base = ["synth", "--config", "golden/flat/config.json", "--vocab", "64"];
    common::assert_ok(&glimpse(&[&base[..], &["--dense", "1", "--out", &s(&out)]].concat()));
    let (info, _) = common::assert_ok(&glimpse(&["inspect", "--model", &s(&out)]));
    assert!(info.contains("layers: 0 dense, 1-4 moe"), "{info}");
    let all = tmp.path().join("d5");
    let (_, err) =
        common::assert_ok(&glimpse(&[&base[..], &["--dense", "5", "--experts", "8", "--out", &s(&all)]].concat()));
    assert!(err.contains("every layer (5) is dense: no routing to audit, and --experts has no effect"), "{err}");
    assert_error(
        &glimpse(&[&base[..], &["--dense", "6", "--out", &s(&all)]].concat()),
        "--dense 6: the checkpoint has 5 layers",
    );
}

/// A reference whose layers are numbered from 1 (a port's off-by-one naming) fails `verify`
/// with that said, as `diff` says it of ours: its layer i was compared with our layer i.
#[test]
fn verify_names_a_reference_whose_layers_start_at_1() {
    let tmp = tempfile::tempdir().unwrap();
    let shifted = common::edit_dump(Path::new("golden/flat/reference.safetensors"), &tmp.path().join("s.st"), |t| {
        for (name, _, _) in t.iter_mut() {
            if let Some(rest) = name.strip_prefix("layers.") {
                let (i, tail) = rest.split_once('.').unwrap();
                *name = format!("layers.{}.{tail}", i.parse::<usize>().unwrap() + 1);
            }
        }
    });
    let (code, out) = common::code_and_text(&["verify", "--model", "golden/flat", "--golden", &s(&shifted)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the reference numbers its layers from 1 (no `layers.0.*`; 12 of its layers' tensors not"),
        "{out}"
    );
    // A routing-only dump of an MTP run (no `mtp.*`, so its layer 3 is not produced; layer 0 is
    // dense, so no `layers.0.*`): its router logits match, the names line up.
    let args = ["--tokens-from", "golden/mtp/reference.safetensors", "--mtp", "--record", "*.moe.*"];
    let routing = common::run_dump("golden/mtp", &args, tmp.path(), "moe.st");
    let (code, out) = common::code_and_text(&["verify", "--model", "golden/mtp", "--golden", &routing]);
    assert!(code == 0 && !out.contains("numbers its layers"), "{out}");
    // Its own reference, and a window of it, say nothing of the kind.
    let (code, out) = common::code_and_text(&["verify", "--model", "golden/flat", "--layers", "2..3"]);
    assert!(code == 0 && !out.contains("numbers its layers"), "{out}");
}

/// A window short of the head that records nothing says so (it printed only its memory), and
/// `bench` past the config's positions warns as `run` does.
#[test]
fn a_window_without_a_dump_and_a_long_bench_say_so() {
    let flat = s(&golden("flat"));
    let (out, _) = assert_ok(&glimpse(&["run", "--model", &flat, "--layers", "0..1", "--tokens", "1,2"]));
    assert!(out.contains("layers 0..1 ran; nothing kept (give --dump FILE to record them)"), "{out}");
    let (_, err) = assert_ok(&glimpse(&["bench", "--model", &flat, "--tokens", "4100", "--repeat", "1"]));
    assert!(err.contains("4100 positions, 4 of them past max_position_embeddings (4096)"), "{err}");
}
