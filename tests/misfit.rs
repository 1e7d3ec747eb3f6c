//! Files that parse but do not fit what reads them: a dump whose hidden state or DSA selection is
//! for another run, expert ids or router widths no model has, zero-width selections and latents,
//! a checkpoint's correction bias of the wrong length. Each is a one-line error naming the file
//! and tensor, or (where a view can do without the tensor) shown without it; never a panic or
//! an abort.

mod common;
use common::{assert_error, code_and_text, edit_dump, glimpse, golden, s, Named};

use std::path::{Path, PathBuf};

use glimpse::diff::DiffOptions;
use glimpse::dump::{Dump, Values};
use glimpse::tui_source::DumpSource;
use glimpse_tui::Source;

/// The tensor `name` of `t`.
fn tensor<'a>(t: &'a mut [Named], name: &str) -> &'a mut Named {
    t.iter_mut().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no {name}"))
}

/// A dump whose starting hidden state or DSA selection is for another run: named, with the shape
/// the run needs (it panicked slicing the selection, or deep in RoPE).
#[test]
fn a_start_from_another_run_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let case = golden("grouped-shared-yarn"); // batch 2 x 40 tokens, hidden 48; layer 1 shares layer 0's selection
    let reference = case.join("reference.safetensors");
    let one_key = edit_dump(&reference, &tmp.path().join("sel.st"), |t| {
        *tensor(t, "layers.0.dsa.topk") = ("layers.0.dsa.topk".into(), Values::I64(vec![0]), vec![1, 1, 1]);
    });
    let run = ["run", "--model", &s(&case), "--tokens-from", &s(&one_key), "--layers", "1..1"];
    let o = glimpse(&[&run[..], &["--from-dump", &s(&one_key)]].concat());
    assert_error(&o, "`layers.0.dsa.topk` is [1, 1, 1]; the run needs [batch, seq, K] with batch 2, seq 40");
    let verify = |golden: &Path| glimpse(&["verify", "--model", &s(&case), "--golden", &s(golden), "--isolate"]);
    assert_error(&verify(&one_key), "`layers.0.dsa.topk` is [1, 1, 1]");

    // The same bytes in another shape, and another hidden size.
    let reshaped =
        edit_dump(&reference, &tmp.path().join("h.st"), |t| tensor(t, "layers.1.output").2 = vec![1, 80, 48]);
    assert_error(
        &verify(&reshaped),
        "`layers.1.output` is [1, 80, 48]; the run it feeds needs [batch, seq, hidden] = [2, 40, 48]",
    );
    let narrow = edit_dump(&reference, &tmp.path().join("n.st"), |t| {
        let (_, v, shape) = tensor(t, "layers.0.output");
        *v = Values::F32(vec![0.5; 2 * 40 * 24]);
        *shape = vec![2, 40, 24];
    });
    assert_error(&verify(&narrow), "`layers.0.output` is [2, 40, 24]");
}

/// A window started from a dump's hidden state runs that dump's tokens: other tokens given
/// were written to the window's dump as its `input_ids` (and printed as the tokens whose next
/// token it gave) though the state it ran was the other run's.
#[test]
fn a_window_from_a_dump_refuses_other_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let case = golden("flat");
    let reference = s(&case.join("reference.safetensors"));
    let ids = Dump::open(Path::new(&reference)).unwrap().tokens().unwrap().ids;
    let other: Vec<String> = ids.iter().map(|&t| ((t + 1) % 64).to_string()).collect();
    let window = s(&tmp.path().join("w.st"));
    let run = |tokens: &str| {
        let args = ["run", "--model", &s(&case), "--layers", "2..3", "--from-dump", &reference, "--dump", &window];
        glimpse(&[&args[..], &["--tokens", tokens]].concat())
    };
    assert_error(&run(&other.join(",")), "ran other tokens than the ones given");
    assert!(!Path::new(&window).exists());
    let own: Vec<String> = ids.iter().map(u32::to_string).collect();
    let (code, text) = code_and_text(&[
        "run",
        "--model",
        &s(&case),
        "--layers",
        "2..3",
        "--from-dump",
        &reference,
        "--dump",
        &window,
        "--tokens",
        &own.join(","),
    ]);
    assert_eq!(code, 0, "{text}");
}

/// Expert ids or router widths past `MAX_EXPERTS` are refused before anything is allocated for
/// them (an id of 2^40 made `audit` ask for 8 TB and abort); the TUI's load view caps its count.
#[test]
fn expert_counts_no_model_has_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = golden("flat").join("reference.safetensors");
    let no_logits = |t: &mut Vec<Named>| t.retain(|(n, _, _)| !n.ends_with(".moe.router_logits"));
    let huge_id = edit_dump(&reference, &tmp.path().join("id.st"), |t| {
        no_logits(t);
        let Values::I64(ids) = &mut tensor(t, "layers.3.moe.topk_ids").1 else { panic!() };
        ids[0] = 1 << 40;
    });
    let o = glimpse(&["audit", "--dump", &s(&huge_id)]);
    assert_error(&o, "`layers.3.moe.topk_ids` holds expert id 1099511627776 at [0, 0], outside the experts 0-65535");
    let wide = edit_dump(&reference, &tmp.path().join("wide.st"), |t| {
        no_logits(t);
        t.push(("layers.3.moe.router_logits".into(), Values::F32(vec![]), vec![0, 1 << 40]));
    });
    assert_error(&glimpse(&["audit", "--dump", &s(&wide)]), "its router logits are 1099511627776 experts wide");

    let d = Dump::open(&huge_id).unwrap();
    let src = DumpSource::new("huge id".into(), d, None, &DiffOptions::default()).unwrap();
    let load = src.load();
    let layer3 = load.iter().find(|l| l.layer == 3).unwrap();
    assert_eq!(layer3.counts.len(), glimpse::config::MAX_EXPERTS);
    // Every id but the one past the cap is counted: one slot fewer than layer 4 routed.
    let routed = |layer: usize| load.iter().find(|l| l.layer == layer).unwrap().counts.iter().sum::<u64>();
    assert_eq!(routed(3) + 1, routed(4));
}

/// Zero-width selections and latents (shapes like [2, 0]): the views that read them show nothing
/// for them, and `diff --model` (which recomputes a shared layer's margins from its source
/// layer's) does not divide by them.
#[test]
fn zero_width_selections_and_latents_show_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = golden("flat").join("reference.safetensors");
    let empty = edit_dump(&reference, &tmp.path().join("empty.st"), |t| {
        let (_, v, shape) = tensor(t, "layers.3.moe.topk_ids");
        (*v, *shape) = (Values::I64(vec![]), vec![shape[0], 0]);
        let (_, v, shape) = tensor(t, "layers.1.attn.kv_latent");
        (*v, *shape) = (Values::F32(vec![]), vec![shape[0], shape[1], 0]);
    });
    let src = DumpSource::new("empty".into(), Dump::open(&empty).unwrap(), None, &DiffOptions::default()).unwrap();
    assert!(src.routing(3).is_none());
    assert!(src.routing(4).is_some());
    let grid = src.kv_norms().unwrap();
    assert!(!grid.layers.contains(&1) && grid.layers.contains(&2), "{:?}", grid.layers);

    let case = golden("grouped-shared-yarn");
    let theirs = case.join("reference.safetensors");
    let k0 = edit_dump(&theirs, &tmp.path().join("k0.st"), |t| {
        let (_, v, shape) = tensor(t, "layers.0.dsa.topk");
        (*v, *shape) = (Values::I64(vec![]), vec![2, 40, 0]);
        let Values::I64(ids) = &mut tensor(t, "layers.1.dsa.topk").1 else { panic!() };
        ids.swap(12 * 39, 12 * 39 + 1); // the same set, and one key changed:
        ids[12 * 39] = (ids[12 * 39] + 1) % 40;
    });
    let (code, text) = code_and_text(&["diff", &s(&k0), &s(&theirs), "--model", &s(&case)]);
    assert_eq!(code, 1, "{text}");
    // Layer 1's flip is listed, its margin unknown (its source layer's selection is empty).
    assert!(text.contains("layers.1.dsa.topk [0, 39]: ") && text.contains("margin ours unknown"), "{text}");
}

/// grouped-shared-yarn with layer 1's correction bias edited, in `dir`.
fn with_bias(dir: &Path, edit: impl Fn(&mut Vec<f32>)) -> PathBuf {
    let case = golden("grouped-shared-yarn");
    std::fs::create_dir(dir).unwrap();
    std::fs::copy(case.join("config.json"), dir.join("config.json")).unwrap();
    common::rewrite_st(&case.join("model.safetensors"), &dir.join("model.safetensors"), |n, v, shape| {
        if n == BIAS {
            edit(v);
            *shape = vec![v.len()];
        }
    });
    dir.to_path_buf()
}

const BIAS: &str = "model.layers.1.mlp.gate.e_score_correction_bias";

/// A checkpoint's correction bias of the wrong length is named when routers are read without
/// loading the model (`diff --model`; grouped routing divided by zero on it); one that is not
/// finite is refused by both readers (a NaN sent every token to the same experts, margin inf).
#[test]
fn a_misshapen_or_non_finite_correction_bias_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let theirs = s(&golden("grouped-shared-yarn").join("reference.safetensors"));
    let short = with_bias(&tmp.path().join("short"), |v| v.truncate(3));
    let o = glimpse(&["diff", &theirs, &theirs, "--model", &s(&short)]);
    assert_error(&o, &format!("`{BIAS}` has shape [3], expected [16]"));
    let nan = with_bias(&tmp.path().join("nan"), |v| v[5] = f32::NAN);
    let o = glimpse(&["diff", &theirs, &theirs, "--model", &s(&nan)]);
    assert_error(&o, &format!("`{BIAS}` holds NaN at expert 5"));
    let o = glimpse(&["run", "--model", &s(&nan), "--tokens", "1,2"]);
    assert_error(&o, &format!("`{BIAS}` holds NaN at expert 5"));
}

/// A reference whose tokens or expert ids the model does not have: named with the dump (or the
/// replayed tensor) and where in it.
#[test]
fn ids_the_model_lacks_are_named_with_where_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let case = golden("flat");
    let reference = case.join("reference.safetensors");
    let token = edit_dump(&reference, &tmp.path().join("token.st"), |t| {
        let Values::I64(ids) = &mut tensor(t, "input_ids").1 else { panic!() };
        ids[3] = 9999;
    });
    let verify = |golden: &Path, extra: &[&str]| {
        glimpse(&[&["verify", "--model", &s(&case), "--golden", &s(golden)][..], extra].concat())
    };
    let needle = "`input_ids`: token id 9999 at [0, 3] is out of range for vocab_size 256";
    assert_error(&verify(&token, &[]), needle);
    assert_error(&glimpse(&["run", "--model", &s(&case), "--tokens-from", &s(&token)]), needle);
    let expert = edit_dump(&reference, &tmp.path().join("expert.st"), |t| {
        let Values::I64(ids) = &mut tensor(t, "layers.2.moe.topk_ids").1 else { panic!() };
        ids[8] = 999; // token 2 of top-4
    });
    let o = verify(&expert, &["--force-routing"]);
    assert_error(&o, "layer 2: the replayed routing (the reference's `moe.topk_ids`) holds expert 999 for token 2");
}

/// A `moe.topk_ids` that chooses an expert twice or one past the router (a port's top-k bug) is a
/// difference that says so, on either side: exit 1 with the rest of the report, not an error
/// that hides it (diff), nor a set that "kept fewer" (verify).
#[test]
fn a_selection_that_is_no_set_is_a_difference_named() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = golden("flat").join("reference.safetensors");
    let with = |name: &str, slot: usize, id: i64| {
        edit_dump(&reference, &tmp.path().join(name), |t| {
            let Values::I64(ids) = &mut tensor(t, "layers.2.moe.topk_ids").1 else { panic!() };
            ids[slot] = id;
        })
    };
    // Token 0's first expert twice (top-4: slots 0-3), and an id past golden/flat's 16 experts.
    let twice = with("twice.st", 1, {
        let d = Dump::open(&reference).unwrap();
        let Ok((Values::I64(ids), _)) = d.values("layers.2.moe.topk_ids") else { panic!() };
        ids[0]
    });
    let past = with("past.st", 5, 16);
    let (code, out) = code_and_text(&["diff", &s(&twice), &s(&reference)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("first divergence: layers.2.moe.topk_ids"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("layers.2.moe.topk_ids") && l.contains("ours chooses expert")), "{out}");
    assert!(out.contains("logits "), "the report goes on: {out}");
    let (code, out) = code_and_text(&["diff", &s(&reference), &s(&past), "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids = v["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "layers.2.moe.topk_ids").unwrap();
    assert_eq!((&ids["kind"], &ids["side"]), (&"invalid".into(), &"reference".into()), "{ids}");
    assert_eq!(ids["problem"], "holds expert id 16 at [1, 1], outside the experts 0-15");
    let (code, out) = code_and_text(&["verify", "--golden", &s(&twice)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MISMATCH the reference chooses expert"), "{out}");
    // Without the reference's gate logits the expert count is the model's (verify), the other
    // dump's (diff).
    let past_no_logits = edit_dump(&past, &tmp.path().join("past-no-logits.st"), |t| {
        t.retain(|(n, _, _)| !n.ends_with(".moe.router_logits"))
    });
    let needle = "MISMATCH the reference holds expert id 16 at [1, 1], outside the experts 0-15";
    let (code, out) = code_and_text(&["verify", "--golden", &s(&past_no_logits)]);
    assert!(code == 1 && out.contains(needle), "{out}");
    let (code, out) = code_and_text(&["diff", &s(&reference), &s(&past_no_logits)]);
    assert!(code == 1 && out.contains(needle), "{out}");
}

/// Scores in another layout than the selection's rows (`dsa.scores` as `[S, B, T]`, or flat) are
/// not read as its rows: no rule break from another row's scores (verify read ten), no panic
/// (diff indexed a 1-D tensor's second-to-last dimension).
#[test]
fn scores_in_another_layout_are_not_read_as_the_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let case = golden("grouped-shared-yarn"); // batch 2, 40 tokens
    let bf16 = case.join("reference-bf16.safetensors");
    let swapped = edit_dump(&bf16, &tmp.path().join("sbt.st"), |t| {
        for (n, _, shape) in t.iter_mut().filter(|(n, _, _)| n.ends_with(".dsa.scores")) {
            assert_eq!(shape[..2], [2, 40], "{n}");
            *shape = vec![40, 2, 40];
        }
    });
    let args = ["verify", "--model", &s(&case), "--golden", &s(&swapped), "--atol", "2e-2", "--rtol", "2e-2"];
    let (code, text) = code_and_text(&args);
    assert!(code == 1 && text.contains("flips:") && !text.contains("rule"), "{text}");

    // One query keeping key 0 on one side, nothing on the other (padding), over 1-D scores.
    let write = |name: &str, row: [i64; 2]| {
        let path = tmp.path().join(name);
        let entries = vec![
            ("input_ids".to_string(), glimpse::st::Entry::i64(vec![1, 1], &[0])),
            ("layers.0.dsa.topk".to_string(), glimpse::st::Entry::i64(vec![1, 1, 2], &row)),
            ("layers.0.dsa.scores".to_string(), glimpse::st::Entry::f32(vec![2], &[1.0, 0.5])),
        ];
        glimpse::st::write(&path, &entries, &glimpse::dump::metadata("test", None, None)).unwrap();
        path
    };
    let (a, b) = (write("a.st", [0, -1]), write("b.st", [-1, -1]));
    let (code, text) = code_and_text(&["diff", &s(&a), &s(&b)]);
    assert!(code == 1 && text.contains("first divergence: layers.0.dsa.topk"), "{text}");
}

/// A dump that declares tensors larger than memory (a sparse file holds 1 TB in a few KB of
/// disk): each is a one-line error naming the file, tensor and size, where reading it aborted
/// the process (an allocation failure is no panic). Skipped where the kernel promises any
/// allocation (`vm.overcommit_memory` 1): there the reservation succeeds and filling it would
/// meet the OOM killer instead.
#[test]
fn tensors_larger_than_memory_are_refused() {
    if std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|m| m.trim() == "1") {
        eprintln!("skipped: vm.overcommit_memory is 1, so no allocation fails");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // 2^38 f32 logits and 2^37 i64 expert ids: a terabyte each.
    let huge = |name: &str, dtype: &str, shape: [u64; 3], width: u64| {
        let bytes = shape.iter().product::<u64>() * width;
        let header = format!(
            r#"{{"__metadata__":{{"format":"glm5-dump/1"}},"{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[0,{bytes}]}}}}"#
        );
        let path = tmp.path().join(format!("{name}.safetensors"));
        let mut f = std::fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut f, &[&(header.len() as u64).to_le_bytes()[..], header.as_bytes()].concat())
            .unwrap();
        f.set_len(8 + header.len() as u64 + bytes).unwrap();
        s(&path)
    };
    let logits = huge("logits", "F32", [1, 1 << 18, 1 << 20], 4);
    assert_error(
        &glimpse(&["diff", &logits, &logits]),
        "tensor `logits`: its 274877906944 values (1099.51 GB) do not fit in memory",
    );
    let ids = huge("layers.3.moe.topk_ids", "I64", [1, 1 << 34, 8], 8);
    assert_error(&glimpse(&["audit", "--dump", &ids]), "its 137438953472 values (1099.51 GB) do not fit in memory");
}

/// A dump another model ran: `diff` says the dumps ran different configs, not that ours numbers
/// its layers from 1 (the flat case's five layers against the MTP case's reference had read so),
/// and `run --from-dump` of another model's hidden state warns.
#[test]
fn another_models_dump_is_said_to_have_run_another_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (flat, mtp) = (golden("flat"), golden("mtp"));
    let reference = mtp.join("reference.safetensors");
    let ours = tmp.path().join("flat-on-mtp.st");
    let (code, _) = code_and_text(&["run", "--model", &s(&flat), "--tokens-from", &s(&reference), "--dump", &s(&ours)]);
    assert_eq!(code, 0);
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&reference)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("were made from different config.json files"), "{out}");
    assert!(out.contains("spec hook points of the reference not in ours: the dumps ran different config.json files"));
    assert!(!out.contains("numbers its layers from 1"), "{out}");
    let start = [
        "run",
        "--model",
        &s(&mtp),
        "--layers",
        "1..2",
        "--from-dump",
        &s(&golden("flat").join("reference.safetensors")),
    ];
    let (code, out) = code_and_text(&[&start[..], &["--dump", &s(&tmp.path().join("w.st"))]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning: --from-dump: ") && out.contains("was made from a different config.json than"));
}
