//! Hostile and broken input, NaN/Inf, interrupted runs: every malformed file or argument is a
//! one-line error with exit code 2 and no panic; the first NaN/Inf is named with its coordinate;
//! a run killed mid-write leaves the previous dump intact.

mod common;
use common::{assert_error, glimpse, golden, s, spawn_catching_sigint};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Malformed-input cases: a name, how to make the input, the message expected.
type FileCase = (&'static str, Box<dyn Fn(&Path)>, &'static str);
type ConfigCase = (&'static str, Box<dyn Fn(&mut serde_json::Value)>, &'static str);

/// Runs stopped by a signal or a kill, resumed, refused while another lives.
#[path = "reliability/interrupted.rs"]
mod interrupted;

/// A copy of golden/flat whose files `edit` may change.
fn flat_copy(dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors", "reference.safetensors"] {
        std::fs::copy(golden("flat").join(f), dst.join(f)).unwrap();
    }
    dst.to_path_buf()
}

fn rewrite(file: &Path, edit: impl Fn(&str, &mut Vec<f32>)) {
    common::rewrite_st(file, file, |n, v, _| edit(n, v));
}

#[test]
fn the_first_nan_is_named_with_its_coordinate() {
    let tmp = tempfile::tempdir().unwrap();
    let m = flat_copy(&tmp.path().join("nan"));
    rewrite(&m.join("model.safetensors"), |n, v| {
        if n == "model.layers.2.self_attn.o_proj.weight" {
            v[0] = f32::NAN;
        }
    });
    let dump = tmp.path().join("run.safetensors");
    let o = glimpse(&[
        "run",
        "--model",
        &s(&m),
        "--tokens-from",
        &s(&m.join("reference.safetensors")),
        "--dump",
        &s(&dump),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("first NaN/Inf of the run: layers.2.attn.out at [0, 0, 0] = NaN"), "{err}");

    let o = glimpse(&["verify", "--model", &s(&m)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("first NaN/Inf of this run: layers.2.attn.out at [0, 0, 0] = NaN"), "{out}");

    let o = glimpse(&["diff", &s(&dump), &s(&m.join("reference.safetensors"))]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("first NaN/Inf in {} (ours): layers.2.attn.out at [0, 0, 0] = NaN", s(&dump))),
        "{out}"
    );

    use glimpse::dump::Dump;
    use glimpse_tui::Source;
    let opts = glimpse::diff::DiffOptions::default();
    let src = glimpse::tui_source::DumpSource::new("t".into(), Dump::open(&dump).unwrap(), None, &opts).unwrap();
    assert_eq!(src.first_non_finite().as_deref(), Some("layers.2.attn.out at [0, 0, 0] = NaN"));
}

/// Writes raw bytes as a safetensors file: an 8-byte header length, the header, the data.
fn raw_safetensors(path: &Path, header_len: u64, header: &str, data: &[u8]) {
    let mut bytes = header_len.to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn malformed_files_and_arguments_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let flat = golden("flat");
    let (model, reference) = (s(&flat), s(&flat.join("reference.safetensors")));
    // A FIFO stands for any non-regular file (as root a device like /dev/null would be one, but
    // a broken check must not replace the real one).
    let fifo = t.join("fifo");
    let c_fifo = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a NUL-terminated path in this test's own temporary folder.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let (fifo, x_st) = (s(&fifo), s(&t.join("x.st")));

    // Broken safetensors, used both as a dump and as a checkpoint.
    let st_cases: Vec<FileCase> = vec![
        ("header-past-end", Box::new(|p| raw_safetensors(p, 4096, "{}", b"")), "not a valid safetensors"),
        ("header-huge", Box::new(|p| raw_safetensors(p, u64::MAX / 2, "{}", b"")), "not a valid safetensors"),
        ("header-not-json", Box::new(|p| raw_safetensors(p, 8, "{not js}", b"")), "not a valid safetensors"),
        (
            "offsets-outside",
            Box::new(|p| {
                let h = r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,1600]}}"#;
                raw_safetensors(p, h.len() as u64, h, &[0; 16])
            }),
            "not a valid safetensors",
        ),
        (
            "shape-vs-bytes",
            Box::new(|p| {
                let h = r#"{"x":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#;
                raw_safetensors(p, h.len() as u64, h, &[0; 16])
            }),
            "not a valid safetensors",
        ),
        (
            "unknown-dtype",
            Box::new(|p| {
                let h = r#"{"x":{"dtype":"F33","shape":[4],"data_offsets":[0,16]}}"#;
                raw_safetensors(p, h.len() as u64, h, &[0; 16])
            }),
            "not a valid safetensors",
        ),
        (
            "duplicate-names",
            Box::new(|p| {
                let h = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
                raw_safetensors(p, h.len() as u64, h, &[0; 16])
            }),
            "names tensor `x` twice",
        ),
        (
            "data-cut-short",
            Box::new(|p| {
                let h = r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
                raw_safetensors(p, h.len() as u64, h, &[0; 8])
            }),
            "its tensors' data is 16 bytes, the file holds 8 after the header (cut short)",
        ),
        (
            "bytes-past-the-data",
            Box::new(|p| {
                let h = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
                raw_safetensors(p, h.len() as u64, h, &[0; 16])
            }),
            "the file holds 16 after the header (bytes past the last tensor)",
        ),
        (
            "gap-between-tensors",
            Box::new(|p| {
                let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#;
                raw_safetensors(p, h.len() as u64, h, &[0; 24])
            }),
            "tensor `b`: its data does not start where the tensor before it ends",
        ),
        (
            "metadata-not-strings",
            Box::new(|p| {
                let h = r#"{"__metadata__":{"n":3},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
                raw_safetensors(p, h.len() as u64, h, &[0; 8])
            }),
            "`__metadata__` of strings",
        ),
        ("empty-file", Box::new(|p| std::fs::write(p, b"").unwrap()), "not a valid safetensors"),
    ];
    let mut cases: Vec<(Vec<String>, String)> = Vec::new();
    for (name, make, needle) in &st_cases {
        let file = t.join(format!("{name}.safetensors"));
        make(&file);
        cases.push((
            vec!["verify".into(), "--model".into(), model.clone(), "--golden".into(), s(&file)],
            needle.to_string(),
        ));
        // The same file as a checkpoint's weights.
        let dir = t.join(format!("ckpt-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(flat.join("config.json"), dir.join("config.json")).unwrap();
        std::fs::copy(&file, dir.join("model.safetensors")).unwrap();
        cases.push((vec!["inspect".into(), "--model".into(), s(&dir)], needle.to_string()));
    }

    // Index files: escaping names, links out of the folder, broken JSON.
    let with_index = |name: &str, index: &str| {
        let dir = t.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(flat.join("config.json"), dir.join("config.json")).unwrap();
        std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
        dir
    };
    let abs = with_index("abs", r#"{"weight_map": {"lm_head.weight": "/etc/passwd"}}"#);
    cases.push((vec!["inspect".into(), "--model".into(), s(&abs)], "escapes the model folder".into()));
    let link = with_index("link", r#"{"weight_map": {"lm_head.weight": "w.safetensors"}}"#);
    std::os::unix::fs::symlink(flat.join("model.safetensors"), link.join("w.safetensors")).unwrap();
    cases.push((vec!["inspect".into(), "--model".into(), s(&link)], "links outside the model folder".into()));
    let fifo_weights = t.join("fifo-weights");
    std::fs::create_dir_all(&fifo_weights).unwrap();
    std::fs::copy(flat.join("config.json"), fifo_weights.join("config.json")).unwrap();
    let c_path = std::ffi::CString::new(s(&fifo_weights.join("model.safetensors"))).unwrap();
    // SAFETY: a NUL-terminated path in this test's own temporary folder.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    cases.push((
        vec!["inspect".into(), "--model".into(), s(&fifo_weights)],
        "model.safetensors: is not a regular file".into(),
    ));
    let bad_index = with_index("bad-index", "{ nope");
    cases.push((vec!["inspect".into(), "--model".into(), s(&bad_index)], "invalid JSON".into()));
    let no_map = with_index("no-map", r#"{"metadata": {}}"#);
    cases.push((vec!["inspect".into(), "--model".into(), s(&no_map)], "weight_map".into()));

    // A dump tensor of a dtype no dump holds: named once, with the file.
    let bool_dump = t.join("bool.safetensors");
    let h = r#"{"__metadata__":{"format":"glm5-dump/1"},"layers.2.moe.topk_ids":{"dtype":"BOOL","shape":[1,2],"data_offsets":[0,2]}}"#;
    raw_safetensors(&bool_dump, h.len() as u64, h, &[1, 0]);
    let needle = format!("dump {}: tensor `layers.2.moe.topk_ids` has dtype BOOL", s(&bool_dump));
    cases.push((vec!["audit".into(), "--dump".into(), s(&bool_dump)], needle));
    // No command at all: said, not clap's about text.
    cases.push((vec![], "no command given, e.g. glimpse verify".into()));

    // `-` is standard output only for `audit --csv`: a dump there would be a file named `-`.
    let run_to_stdout = ["run", "--model", &s(&flat), "--tokens", "1,2", "--dump", "-"];
    cases.push((run_to_stdout.map(String::from).to_vec(), "--dump -: this output is written as a file".into()));

    // A selection stored as floats (it would compare element by element, not as a set), and an
    // F64 value no f32 holds (1e40 and 3e40 would both read inf, and match).
    let float_topk = t.join("float-topk.safetensors");
    let h = r#"{"__metadata__":{"format":"glm5-dump/1"},"layers.0.dsa.topk":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}"#;
    raw_safetensors(&float_topk, h.len() as u64, h, &0f32.to_le_bytes());
    let needle = "tensor `layers.0.dsa.topk` has dtype F32: the spec stores token ids and selections as integers";
    cases.push((vec!["diff".into(), s(&float_topk), s(&float_topk)], needle.into()));
    // Logits stored as integers would be compared as if they were floats.
    let int_logits = t.join("int-logits.safetensors");
    let h =
        r#"{"__metadata__":{"format":"glm5-dump/1"},"logits":{"dtype":"I64","shape":[1,1,1],"data_offsets":[0,8]}}"#;
    raw_safetensors(&int_logits, h.len() as u64, h, &0i64.to_le_bytes());
    let needle = "tensor `logits` has dtype I64: the spec stores activations, scores and weights as floats";
    cases.push((vec!["diff".into(), s(&int_logits), s(&int_logits)], needle.into()));
    let huge = t.join("f64-huge.safetensors");
    let h =
        r#"{"__metadata__":{"format":"glm5-dump/1"},"logits":{"dtype":"F64","shape":[1,1,2],"data_offsets":[0,16]}}"#;
    let data: Vec<u8> = [1.0f64, 1e40].iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_safetensors(&huge, h.len() as u64, h, &data);
    cases.push((vec!["diff".into(), s(&huge), s(&huge)], "F64 value 1e40 (element 1) is beyond f32's range".into()));

    // Routing another tool wrote wrong: rows that are not one a token, an expert chosen twice.
    let routing = |name: &str, rows: usize, ids: &[i64]| {
        let path = t.join(format!("{name}.safetensors"));
        let h = format!(
            r#"{{"__metadata__":{{"format":"glm5-dump/1"}},"input_ids":{{"dtype":"I64","shape":[1,3],"data_offsets":[0,24]}},"layers.2.moe.topk_ids":{{"dtype":"I64","shape":[{rows},2],"data_offsets":[24,{}]}}}}"#,
            24 + 8 * ids.len()
        );
        let data: Vec<u8> = [1i64, 2, 3].iter().chain(ids).flat_map(|v| v.to_le_bytes()).collect();
        raw_safetensors(&path, h.len() as u64, &h, &data);
        vec!["audit".to_string(), "--dump".into(), s(&path)]
    };
    // (2 rows would be an MTP layer's: one position fewer.)
    cases.push((
        routing("rows", 5, &[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]),
        "holds 5 tokens' experts, its input_ids 1 x 3".into(),
    ));
    cases.push((routing("twice", 3, &[0, 1, 2, 2, 4, 5]), "chooses expert 2 twice for token [1]".into()));
    // No expert a token: it read "holds 0 tokens' experts".
    let none = t.join("k0.safetensors");
    let h = r#"{"__metadata__":{"format":"glm5-dump/1"},"layers.2.moe.topk_ids":{"dtype":"I64","shape":[3,0],"data_offsets":[0,0]}}"#;
    raw_safetensors(&none, h.len() as u64, h, &[]);
    let needle = "`layers.2.moe.topk_ids` has shape [3, 0]: the spec's is [tokens, experts per token], k > 0";
    cases.push((vec!["audit".into(), "--dump".into(), s(&none)], needle.into()));

    // A checkpoint's weights given as a dump, and a dump given as a checkpoint's weights.
    let weights_as_dump = vec!["audit".to_string(), "--dump".into(), s(&flat.join("model.safetensors"))];
    cases.push((weights_as_dump, "it holds a checkpoint's weights, not a dump".into()));
    let dump_as_weights = t.join("dump-as-weights");
    std::fs::create_dir_all(&dump_as_weights).unwrap();
    std::fs::copy(flat.join("config.json"), dump_as_weights.join("config.json")).unwrap();
    std::fs::copy(flat.join("reference.safetensors"), dump_as_weights.join("model.safetensors")).unwrap();
    let run = vec!["run".to_string(), "--model".into(), s(&dump_as_weights), "--tokens".into(), "1".into()];
    cases.push((run, "is an activation dump (format glm5-dump/1), not the checkpoint's weights".into()));

    // Weights of another config's shapes: `inspect` shows them, then refuses them.
    let other_weights = t.join("other-weights");
    std::fs::create_dir_all(&other_weights).unwrap();
    std::fs::copy(flat.join("config.json"), other_weights.join("config.json")).unwrap();
    std::fs::copy(golden("mtp").join("model.safetensors"), other_weights.join("model.safetensors")).unwrap();
    let needle =
        "4 tensor(s) of another shape than config.json implies (first: `model.layers.2.mlp.gate.weight` is [8, \
                  64], the config implies [16, 64])";
    cases.push((vec!["inspect".into(), "--model".into(), s(&other_weights)], needle.into()));

    // Configs whose values are wrong or inconsistent.
    let config_case = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = t.join(format!("cfg-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(flat.join("config.json")).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
        std::fs::copy(flat.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
        vec!["inspect".to_string(), "--model".into(), s(&dir)]
    };
    let cfgs: Vec<ConfigCase> = vec![
        ("not-object", Box::new(|v| *v = serde_json::json!([1, 2])), "must be a JSON object"),
        ("negative", Box::new(|v| v["hidden_size"] = (-4).into()), "`hidden_size`"),
        ("float-heads", Box::new(|v| v["num_attention_heads"] = 2.5.into()), "`num_attention_heads`"),
        ("zero-layers", Box::new(|v| v["num_hidden_layers"] = 0.into()), "`num_hidden_layers`"),
        ("groups", Box::new(|v| v["n_group"] = 3.into()), "not divisible by n_group"),
        ("topk-too-big", Box::new(|v| v["num_experts_per_tok"] = 99.into()), "`num_experts_per_tok`"),
        ("short-mlp-types", Box::new(|v| v["mlp_layer_types"] = serde_json::json!(["dense"])), "`mlp_layer_types`"),
        ("bad-indexer-type", Box::new(|v| v["indexer_types"] = serde_json::json!(["full", "half"])), "`indexer_types`"),
        ("odd-rope", Box::new(|v| v["qk_rope_head_dim"] = 7.into()), "`qk_rope_head_dim`"),
        ("quant", Box::new(|v| v["quantization_config"] = serde_json::json!({"quant_method": "gptq"})), "quant_method"),
        ("model-type", Box::new(|v| v["model_type"] = "llama".into()), "`model_type`"),
        ("kv-heads", Box::new(|v| v["num_key_value_heads"] = 1.into()), "`num_key_value_heads`"),
        ("huge-dims", Box::new(|v| v["qk_rope_head_dim"] = 2_000_000_000u64.into()), "beyond any supported model"),
        ("negative-eps", Box::new(|v| v["rms_norm_eps"] = (-1.0).into()), "`rms_norm_eps`: must be a positive number"),
        ("no-positions", Box::new(|v| v["max_position_embeddings"] = 0.into()), "`max_position_embeddings`"),
    ];
    for (name, edit, needle) in &cfgs {
        cases.push((config_case(name, edit.as_ref()), needle.to_string()));
    }

    // Arguments. A generation of 10^9 tokens would need terabytes of activations.
    let (other_run, not_a_dump) =
        (s(&golden("bf16-fused").join("reference.safetensors")), s(&flat.join("config.json")));
    let mtp = s(&golden("mtp"));
    let arg_cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--model", &model, "--tokens", ""], "is not a token id"),
        (vec!["run", "--model", &model, "--tokens", "1,-2"], "is not a token id"),
        (vec!["run", "--model", &model, "--tokens", "99999"], "out of range for vocab_size"),
        (vec!["run", "--model", &model, "--layers", "7..9", "--from-dump", &reference], "outside the model's layers"),
        (vec!["run", "--model", &model, "--layers", "2..3", "--tokens", "1,2"], "give --from-dump"),
        (vec!["run", "--model", &model], "give --tokens"),
        (vec!["--threads", "0", "run", "--model", &model, "--tokens", "1"], "--threads 0 is out of range"),
        (vec!["--threads", "100000", "run", "--model", &model, "--tokens", "1"], "give 1 to 1024"),
        (vec!["verify", "--atol=-1"], "invalid value '-1' for '--atol <ATOL>': must be a finite number, 0 or more"),
        (vec!["verify", "--rtol", "inf"], "invalid value 'inf' for '--rtol <RTOL>'"),
        (vec!["verify", "--atol", "-1"], "invalid value '-1' for '--atol <ATOL>'"),
        (vec!["diff", &reference, &reference, "--near-tie", "NaN"], "invalid value 'NaN' for '--near-tie"),
        (vec!["run"], "required arguments were not provided: --model <MODEL>"),
        (vec!["--max-memory", "1M", "run", "--model", &model, "--tokens", "1,2"], "but --max-memory is 1.0 MB"),
        (vec!["--max-memory", "lots", "verify"], "not a size like 500M"),
        (
            vec!["--max-memory", "16G", "generate", "--model", &model, "--tokens", "1", "--max-new-tokens", "10000000"],
            "but --max-memory is 16.00 GB",
        ),
        (vec!["diff", "--tol", "logits", &reference, &reference], "PATTERN=ATOL,RTOL"),
        (vec!["diff", &reference, &other_run], "runs of different inputs"),
        (vec!["audit", "--dump", &not_a_dump], "not a valid safetensors"),
        (vec!["tui", "--dump", &reference], "needs an interactive terminal"),
        // Said before a live run (minutes on a large checkpoint), not after it.
        (vec!["tui", "--model", &model, "--tokens", "1,2,3"], "tui needs an interactive terminal"),
        (vec!["audit", "--model", &model, "--prompts", "/no/such/prompts.txt"], "/no/such/prompts.txt"),
        (vec!["generate", "--model", &model, "--tokens", "1,999"], "out of range for vocab_size"),
        (
            vec!["generate", "--model", &model, "--tokens", "1", "--chunk", "0"],
            "invalid value '0' for '--chunk <CHUNK>': must be 1 or more",
        ),
        // 3 + 2^64 - 1 positions wrapped around and panicked at a capacity overflow.
        (
            vec!["generate", "--model", &model, "--tokens", "1,2,3", "--max-new-tokens", "18446744073709551615"],
            "is not in 0..=10000000",
        ),
        // Refused before the first step: the steps' parts go beside the dump as they come.
        (
            vec!["generate", "--model", &model, "--tokens", "1", "--dump", "/no/such/dir/gen.safetensors"],
            "/no/such/dir/",
        ),
        (vec!["verify", "--decode", "--chunk", "0"], "must be 1 or more"),
        // clap's tip survives the one-line error; I/O errors in words; a flag's zero blamed on it.
        (vec!["run", "--model", &model, "--token", "1,2"], "a similar argument exists: '--tokens'; see glimpse --help"),
        (vec!["diff", "--tol", "logits=-1,0", &reference, &reference], "tolerances must be finite numbers, 0 or more"),
        (
            vec!["verify", "--golden", "/no/such/reference.safetensors"],
            "/no/such/reference.safetensors: does not exist",
        ),
        (vec!["audit", "--model", &model, "--prompts", &model], "is a folder, not a file"),
        (vec!["synth", "--config", &not_a_dump, "--out", &reference], "is a file; give a folder for the checkpoint"),
        (vec!["synth", "--config", &not_a_dump, "--layers", "0", "--out", &model], "--layers 0: give 1 or more"),
        // Output paths that cannot become files are refused before any work, leaving nothing.
        (vec!["run", "--model", &model, "--tokens", "1,2", "--dump", &model], "is a folder; give a file path"),
        (vec!["audit", "--dump", &reference, "--csv", &model], "is a folder; give a file path"),
        // Written beside and renamed over: a FIFO or a device would become a regular file.
        (vec!["run", "--model", &model, "--tokens", "1,2", "--dump", &fifo], "is not a regular file"),
        (vec!["generate", "--model", &model, "--tokens", "1", "--dump", &fifo], "is not a regular file"),
        // Read from, a FIFO would wait for a writer forever.
        (vec!["diff", &fifo, &reference], "fifo: is not a regular file"),
        (vec!["run", "--model", &model, "--tokens-from", &fifo], "fifo: is not a regular file"),
        (vec!["synth", "--config", "/dev/null", "--out", &x_st], "/dev/null: is not a regular file"),
        (vec!["audit", "--dump", &reference, "--heatmap", "/tmp/load.png"], "name a .svg file"),
        (vec!["diff", &model, &reference], "is a folder, not a safetensors file"),
        (
            vec!["run", "--model", &model, "--tokens", "1", "--record", "layers.*.moe.nothing", "--dump", &x_st],
            "names no hook point of this model",
        ),
        (vec!["tui", "--dump", &reference, "--tokens", "1,2"], "cannot be used with"),
        (vec!["run", "--model", &model, "--tokens", "-1"], "\"-1\" is not a token id"),
        // Recording nowhere: it did nothing, silently.
        (
            vec!["run", "--model", &model, "--tokens", "1,2", "--record", "logits"],
            "required arguments were not provided: --dump",
        ),
        (vec!["verify", "--ordinal", "3"], "--ordinal 3 needs --device cuda"),
        (vec!["--precision", "bf16", "verify"], "go after a command that takes --device"),
        (vec!["diff", &reference, &reference, "--precision", "bf16"], "go after a command that takes --device"),
        (vec!["--max-memory", "16Gb2", "verify"], "not a size like"),
        (vec!["run", "--model", &mtp, "--tokens", "5", "--mtp"], "needs at least 2 tokens"),
        (vec!["run", "--model", &model, "--tokens", "5,6", "--mtp", "--stream"], "cannot be used with"),
    ];
    for (args, needle) in arg_cases {
        cases.push((args.iter().map(|a| a.to_string()).collect(), needle.to_string()));
    }

    assert!(cases.len() >= 30, "the table has {} cases", cases.len());
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        eprintln!("case {args:?}");
        assert_error(&glimpse(&args), needle);
    }
}

/// `audit` of a dump whose routing came from NaN gate logits counts it, but says so: the NaNs
/// rank first, so those experts are not a model's choice.
#[test]
fn audit_says_when_a_routing_came_from_nan_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("nan.st");
    std::fs::copy(golden("flat").join("reference.safetensors"), &dump).unwrap();
    rewrite(&dump, |name, v| {
        if name == "layers.3.moe.router_logits" {
            v[2 * 16 + 5] = f32::NAN; // row 2, expert 5 of 16
        }
    });
    let o = glimpse(&["audit", "--dump", &s(&dump)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`layers.3.moe.router_logits` holds NaN at [2, 5]: its routing is counted"), "{err}");
}

/// A bug under rounding noise: golden/flat with layer 3's correction bias negated, checked with
/// `--isolate` against the bf16 port (every layer a little off). The first divergence is layer
/// 0's rounding; the by-layer lines mark layer 3 alone, its output NMSE 10x the layer before's.
#[test]
fn the_by_layer_lines_mark_a_bug_under_rounding_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let model = flat_copy(&tmp.path().join("bug"));
    rewrite(&model.join("model.safetensors"), |name, v| {
        if name == "model.layers.3.mlp.gate.e_score_correction_bias" {
            v.iter_mut().for_each(|x| *x = -*x);
        }
    });
    let port = golden("flat").join("bf16-port.safetensors");
    let args =
        ["verify", "--model", &s(&model), "--golden", &s(&port), "--isolate", "--atol", "2e-2", "--rtol", "2e-2"];
    let o = glimpse(&args);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    let marked: Vec<&str> = out.lines().filter(|l| l.contains("<- nmse x")).collect();
    assert_eq!(marked.len(), 1, "{out}");
    assert!(marked[0].trim_start().starts_with("3 "), "{out}");

    // Accumulated (`diff` of the whole run against the port), errors compound and no layer's
    // NMSE jumps; but layer 3's expert flips happen where the gate's scores barely moved, which
    // one rule cannot do: that layer alone is marked. The port against its f32 reference (the
    // same rule, bf16 noise) marks nothing.
    let dump = tmp.path().join("bug.st");
    let run = ["run", "--model", &s(&model), "--tokens-from", &s(&golden("flat").join("reference.safetensors"))];
    assert!(glimpse(&[&run[..], &["--dump", &s(&dump)]].concat()).status.success());
    let diff = |a: &Path, b: &Path| {
        let o = glimpse(&["diff", &s(a), &s(b), "--model", &s(&golden("flat")), "--atol", "2e-2", "--rtol", "2e-2"]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = diff(&dump, &port);
    let marked: Vec<&str> =
        out.lines().filter(|l| l.contains("flips one rule cannot make: the rule differs")).collect();
    assert_eq!(marked.len(), 1, "{out}");
    assert!(marked[0].trim_start().starts_with("3 "), "{out}");
    // The flips it names are layer 3's routing flips, and only those.
    let named: Vec<&str> =
        out.lines().filter(|l| l.starts_with("  layers.") && l.contains("the rule differs")).collect();
    assert!(!named.is_empty() && named.iter().all(|l| l.contains("layers.3.moe.topk_ids [")), "{out}");
    let clean = diff(&port, &golden("flat").join("reference.safetensors"));
    assert!(clean.contains("within the layer's score changes") && !clean.contains("the rule differs"), "{clean}");
}
