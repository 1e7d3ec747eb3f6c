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

#[path = "cli/verify.rs"]
mod verify;

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
    assert_error(&o, "tokenizer.json, which does not exist");
    // One that is there but no file is not said not to exist.
    std::fs::create_dir(model.join("tokenizer.json")).unwrap();
    let o = glimpse(&["run", "--model", m, "--prompt", "hello world"]);
    assert_error(&o, "tokenizer.json: is not a regular file");
    std::fs::remove_dir(model.join("tokenizer.json")).unwrap();
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

/// `generate` stops once every row has produced one of config.json's `eos_token_id`s (one id or
/// a list), or generation_config.json's where there is one, shows a row up to its eos, and
/// `--ignore-eos` goes on.
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
    // A generation_config.json beside it decides, as it does for transformers' `generate`: its
    // ids, or none where it names none (config.json's are then not read).
    let generation = eos.join("generation_config.json");
    std::fs::write(&generation, serde_json::json!({"eos_token_id": all[4]}).to_string()).unwrap();
    let fifth = all.iter().position(|&t| t == all[4]).unwrap();
    assert_eq!(greedy(&eos, &[]).0, all[..=fifth]);
    std::fs::write(&generation, r#"{"do_sample": false}"#).unwrap();
    assert_eq!(greedy(&eos, &[]).0, all);
    std::fs::write(&generation, r#"{"eos_token_id": "end"}"#).unwrap();
    let args = ["generate", "--model", eos.to_str().unwrap(), "--tokens", "1,2,3"];
    assert_error(&glimpse(&args), "generation_config.json: `eos_token_id`: expected a token id or a list of them");
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

/// An output path that is a symbolic link writes the file the link names and leaves the link a
/// link (a rename over it put a plain file in its place and left the target stale), for a dump
/// and for a report; a link whose target does not exist yet creates it.
#[cfg(unix)]
#[test]
fn outputs_through_a_link_replace_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let (real, elsewhere) = (tmp.path().join("real"), tmp.path().join("elsewhere"));
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let link = |name: &str, target: &Path| {
        let at = elsewhere.join(name);
        std::os::unix::fs::symlink(target, &at).unwrap();
        at.to_str().unwrap().to_string()
    };
    let (dump, csv) = (real.join("run.st"), real.join("audit.csv"));
    std::fs::write(&csv, b"old report\n").unwrap();
    let (dump_link, csv_link) = (link("run.st", &dump), link("audit.csv", Path::new("../real/audit.csv")));
    let flat = golden("flat");
    for _ in 0..2 {
        assert_ok(&glimpse(&["run", "--model", flat.to_str().unwrap(), "--tokens", "1,2", "--dump", &dump_link]));
    }
    assert_ok(&glimpse(&["audit", "--dump", &dump_link, "--csv", &csv_link]));
    for (l, target) in [(&dump_link, &dump), (&csv_link, &csv)] {
        assert!(std::fs::symlink_metadata(l).unwrap().file_type().is_symlink(), "{l} is still a link");
        assert!(std::fs::metadata(target).unwrap().len() > 0, "{} was written", target.display());
    }
    assert!(std::fs::read_to_string(&csv).unwrap().starts_with("layer,"), "the report replaced the old one");
    let mut beside: Vec<_> = std::fs::read_dir(&elsewhere).unwrap().map(|e| e.unwrap().file_name()).collect();
    beside.sort();
    assert_eq!(beside, ["audit.csv", "run.st"], "nothing but the links beside the links");
    let mut written: Vec<_> = std::fs::read_dir(&real).unwrap().map(|e| e.unwrap().file_name()).collect();
    written.sort();
    assert_eq!(written, ["audit.csv", "run.st"], "no temporary file left beside the targets");
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
    // The single file of the first run is gone: transformers would load it ahead of the index. A
    // folder holding both is refused, not read one way here and the other there.
    let mine = tmp.path().join("mine");
    assert!(!mine.join("model.safetensors").exists());
    std::fs::copy(golden("flat").join("model.safetensors"), mine.join("model.safetensors")).unwrap();
    assert_error(&glimpse(&["inspect", "--model", &t("mine")]), "holds both model.safetensors and");
    std::fs::remove_file(mine.join("model.safetensors")).unwrap();
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

/// A config file `synth` starts from that has a wrong field is named with the field (a value a
/// flag set, with the flag), and a memory limit under a byte (a unit left out) is refused, not taken as 0 (which refused every
/// later run with a budget message).
#[test]
fn synth_names_its_config_file_and_max_memory_refuses_less_than_a_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.json");
    std::fs::write(&cfg, r#"{"model_type": "glm_moe_dsa", "n_group": 0}"#).unwrap();
    let out = tmp.path().join("out");
    let o = glimpse(&["synth", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_error(&o, &format!("{}: config field `n_group`: must be positive", cfg.display()));
    // A value a flag set is the flag's, not the file's.
    let flat = golden("flat").join("config.json");
    let o = glimpse(&["synth", "--config", &s(&flat), "--out", out.to_str().unwrap(), "--experts", "100000"]);
    assert_error(&o, "--experts 100000: 100000 is beyond any supported model (at most 65536)");
    // Another name of the expert count in the file, which transformers reads first, yields to the
    // flag (it was read instead, and its value blamed on the flag).
    let mut aliased: serde_json::Value = serde_json::from_slice(&std::fs::read(&flat).unwrap()).unwrap();
    aliased["num_local_experts"] = 100000.into();
    std::fs::write(&cfg, aliased.to_string()).unwrap();
    assert_ok(&glimpse(&[
        "synth",
        "--config",
        &s(&cfg),
        "--out",
        out.to_str().unwrap(),
        "--experts",
        "8",
        "--dtype",
        "f32",
    ]));
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((written["n_routed_experts"].as_u64(), written.get("num_local_experts")), (Some(8), None));
    assert_error(&glimpse(&["--max-memory", "0.5", "verify"]), "\"0.5\" is less than a byte (a unit missing? 16G)");
}

/// `synth --dense N` keeps N dense layers and makes the rest MoE (a shallow GLM-5-shaped model
/// with routing to audit); a checkpoint with no MoE layer is warned of, with --experts unused;
/// `--vocab` writes no end token.
#[test]
fn synth_sets_the_dense_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d1");
    let base = ["synth", "--config", "golden/flat/config.json", "--vocab", "64"];
    common::assert_ok(&glimpse(&[&base[..], &["--dense", "1", "--out", &s(&out)]].concat()));
    let (info, _) = common::assert_ok(&glimpse(&["inspect", "--model", &s(&out)]));
    assert!(info.contains("layers: 0 dense, 1-4 moe"), "{info}");
    // A vocabulary cut short keeps no end token: `null`, where a missing key would mean token 1.
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(written.get("eos_token_id"), Some(&serde_json::Value::Null));
    let all = tmp.path().join("d5");
    let (_, err) =
        common::assert_ok(&glimpse(&[&base[..], &["--dense", "5", "--experts", "8", "--out", &s(&all)]].concat()));
    assert!(err.contains("every layer (5) is dense: no routing to audit, and --experts has no effect"), "{err}");
    assert_error(
        &glimpse(&[&base[..], &["--dense", "6", "--out", &s(&all)]].concat()),
        "--dense 6: the checkpoint has 5 layers",
    );
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
