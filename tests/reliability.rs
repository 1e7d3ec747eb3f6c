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

/// A model big enough that a run takes a while (8 layers of 16 experts), synthesised in `t`, and
/// 256 tokens for it.
fn slow_run(t: &Path) -> (PathBuf, String) {
    let cfg = t.join("config.json");
    std::fs::write(&cfg, common::EIGHT_LAYERS).unwrap();
    let model = t.join("model");
    assert!(glimpse(&["synth", "--config", &s(&cfg), "--out", &s(&model)]).status.success());
    let tokens: Vec<String> = (0..256).map(|i| (i * 7 % 1024).to_string()).collect();
    (model, tokens.join(","))
}

/// SIGKILL in the middle of writing a dump: the previous file under the target name survives
/// whole, and no partial file takes its name; `--resume` finishes a killed run from its last
/// completed layer, and refuses other tokens or other hook points to record.
#[test]
fn a_killed_run_leaves_the_previous_dump_intact_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (model, tokens) = slow_run(t);
    let dump = t.join("run.safetensors");
    let args = ["run", "--model", &s(&model), "--stream", "--tokens", &tokens, "--dump", &s(&dump)];
    assert!(glimpse(&args).status.success());
    let previous = std::fs::read(&dump).unwrap();

    // Killed while writing a run of other tokens (so a run that finished would change the file):
    // once as soon as its partial file exists, once after it checkpointed a layer.
    let other: Vec<String> = (0..256).map(|i| (i * 11 % 1024).to_string()).collect();
    let other = other.join(",");
    let kargs = ["run", "--model", &s(&model), "--stream", "--tokens", &other, "--dump", &s(&dump)];
    let (partial, state_of_dump) = (t.join("run.safetensors.partial"), t.join("run.safetensors.resume.json"));
    for wait_for in [&partial, &state_of_dump] {
        signal_when_present(&kargs, wait_for, libc::SIGKILL);
        assert_eq!(
            std::fs::read(&dump).unwrap(),
            previous,
            "killed once {wait_for:?} existed: the previous dump changed"
        );
        glimpse::dump::Dump::open(&dump).unwrap();
        for leftover in [&partial, &state_of_dump, &t.join("run.safetensors.resume.hidden")] {
            let _ = std::fs::remove_file(leftover);
        }
    }

    // Killed mid-run, then resumed: the finished dump equals an uninterrupted run's, bit for bit.
    let resumed = t.join("resumed.safetensors");
    let state = t.join("resumed.safetensors.resume.json");
    let rargs = ["run", "--model", &s(&model), "--stream", "--tokens", &tokens, "--dump", &s(&resumed)];
    signal_when_present(&rargs, &state, libc::SIGKILL);
    let other = ["run", "--model", &s(&model), "--stream", "--tokens", "1,2,3", "--dump", &s(&resumed), "--resume"];
    let o = glimpse(&other);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("written for other tokens"));
    let narrower: Vec<&str> = rargs.iter().copied().chain(["--resume", "--record", "layers.*.moe.*"]).collect();
    let o = glimpse(&narrower);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("recording other hook points"));
    let mut with_resume = rargs.to_vec();
    with_resume.push("--resume");
    // A partial file shorter than the layers its state recorded (truncated, or its disk filled)
    // is refused; it resumed into a dump whose first layers were zeros.
    let partial = t.join("resumed.safetensors.partial");
    let whole = std::fs::read(&partial).unwrap();
    std::fs::write(&partial, &whole[..1000]).unwrap();
    let o = glimpse(&with_resume);
    common::assert_error(&o, "short of the");
    std::fs::write(&partial, &whole).unwrap();
    let o = glimpse(&with_resume);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("resuming"), "{err}");
    let o = glimpse(&["diff", "--atol", "0", "--rtol", "0", &s(&resumed), &s(&dump)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(!state.exists(), "the resume state is removed once the dump is finished");

    // Ctrl-C: the run stops after the layer it is in, says how to go on (exit 130, Ctrl-C's
    // status), and --resume finishes it as if nothing happened.
    let stopped = t.join("stopped.safetensors");
    let sargs = ["run", "--model", &s(&model), "--stream", "--tokens", &tokens, "--dump", &s(&stopped)];
    // (SIGTERM, a CI's cancel, stops it the same way, with its own status, 143.)
    let sigterm = t.join("terminated.safetensors");
    let targs = ["run", "--model", &s(&model), "--stream", "--tokens", &tokens, "--dump", &s(&sigterm)];
    // GNU `timeout` sends its SIGTERM twice (to the child, then to its group): one request, not
    // the second signal that quits at once (which lost the checkpoint one run in four).
    let terminated = t.join("terminated.safetensors.resume.json");
    let out = signals_when_present(&targs, &terminated, &[libc::SIGTERM, libc::SIGTERM]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("--resume continues it"), "{err}");
    // Another signal after the first quits at once, as its default action does.
    std::fs::remove_file(&terminated).unwrap();
    let out = signals_when_present(&targs, &terminated, &[libc::SIGTERM, libc::SIGINT]);
    use std::os::unix::process::ExitStatusExt;
    // (By the second's default action; or by the first's, where a busy machine delivered both
    // at once: then SIGINT, the lower, was handled first.)
    let by = out.status.signal();
    assert!(
        matches!(by, Some(libc::SIGINT | libc::SIGTERM)),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&terminated);
    let out = signal_when_present(&sargs, &t.join("stopped.safetensors.resume.json"), libc::SIGINT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("stopping after the work in progress") && err.contains("--resume continues it"), "{err}");
    // (Its standard error is no terminal here: the notice is a log's line, no empty one before it.)
    assert!(err.starts_with("glimpse: stopping after the work in progress"), "{err}");
    assert!(!stopped.exists(), "no dump under the target name until the run is finished");
    // The same run without --resume does not overwrite it (it truncated the layers kept).
    let partial = t.join("stopped.safetensors.partial");
    let kept = std::fs::read(&partial).unwrap();
    assert_error(&glimpse(&sargs), "keeps an interrupted run of this dump: --resume finishes it");
    assert_eq!(std::fs::read(&partial).unwrap(), kept);
    // A kill between the checkpoint's two renames leaves the JSON a layer behind the hidden
    // state; the state the hidden state's file carries wins. Here the JSON names another layer.
    let json_path = t.join("stopped.safetensors.resume.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    let layer = json["layer"].as_u64().unwrap();
    json["layer"] = (if layer == 0 { 1 } else { layer - 1 }).into();
    std::fs::write(&json_path, json.to_string()).unwrap();
    let resumed: Vec<&str> = sargs.iter().copied().chain(["--resume"]).collect();
    assert!(glimpse(&resumed).status.success());
    let o = glimpse(&["diff", "--atol", "0", "--rtol", "0", &s(&stopped), &s(&dump)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Ctrl-C during `generate` ends it after the step in progress: the tokens so far, the speed
/// line, and a dump of those steps, exit 0.
#[test]
fn ctrl_c_stops_generate_and_keeps_what_it_made() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("gen.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["generate", "--model", &s(&golden("flat")), "--tokens", "1,2,3", "--max-new-tokens", "5000"])
        // Not stopped by an eos first; the 5000 step lines outgrow the pipe, so the child waits
        // for this test to read them and cannot finish before the signal.
        .arg("--ignore-eos")
        .args(["--dump", &s(&dump)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().starts_with("step 3:")), "it generates");
    assert!(child.try_wait().unwrap().is_none(), "still generating when signalled");
    // SAFETY: signalling a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped by Ctrl-C after"), "{err}");
    assert!(rest.iter().any(|l| l.starts_with("wrote ")), "{rest:?}");
    let d = glimpse::dump::Dump::open(&dump).unwrap();
    assert!(d.names().iter().any(|n| n == "logits"));
}

/// Ctrl-C while a prompt goes through the cache in chunks stops after the chunk in progress,
/// with no token made (a 10,000-token prompt fed a position at a time ran to its end before).
/// SIGTERM does the same, and the message names it (it said Ctrl-C).
#[test]
fn ctrl_c_stops_generate_during_a_chunked_prompt() {
    let tokens = (0..10_000).map(|i| (i % 200 + 1).to_string()).collect::<Vec<_>>().join(",");
    let flat = golden("flat");
    let args = ["generate", "--model", &s(&flat), "--tokens", &tokens, "--chunk", "1", "--max-new-tokens", "5"];
    for (signal, name) in [(libc::SIGINT, "Ctrl-C"), (libc::SIGTERM, "SIGTERM")] {
        let child = spawn_catching_sigint(&args);
        // SAFETY: signalling a child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{err}");
        assert!(err.contains(&format!("stopped by {name} after 0 of 5 new tokens")), "{err}");
        assert!(!stdout.contains("step 0:"), "no token was made: {stdout}");
        // The time line says how much of the prompt went through, not that all of it did.
        let fed = err.split("0 new tokens in ").nth(1).and_then(|l| l.split(", after ").nth(1)).unwrap_or_default();
        let n: usize = fed.split(' ').next().unwrap_or_default().parse().unwrap_or(usize::MAX);
        assert!(n < 10_000 && fed.contains("of the 10000-token prompt"), "{err}");
    }
}

/// Starts glimpse with `args`, waits until `path` exists, checks the run is still going, sends
/// it `signal` (SIGKILL: killed; SIGINT: Ctrl-C) and returns what it printed and how it ended.
fn signal_when_present(args: &[&str], path: &Path, signal: i32) -> std::process::Output {
    signals_when_present(args, path, &[signal])
}

/// [`signal_when_present`], sending `signals` one after the other, 2 ms apart: each handled
/// before the next arrives (a handler runs within microseconds), and all within a layer.
fn signals_when_present(args: &[&str], path: &Path, signals: &[i32]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before {path:?} appeared");
        assert!(start.elapsed() < Duration::from_secs(120), "{path:?} never appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be signalled");
    for (i, &signal) in signals.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        // SAFETY: signalling a child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
    }
    child.wait_with_output().unwrap()
}

/// Two runs writing one dump: the second is refused while the first owns its resume files (it
/// would truncate the first's partial file under it), and runs once the first is gone, however
/// it ended (the lock is the kernel's, released with the process).
#[test]
fn a_second_run_to_the_same_dump_is_refused_while_the_first_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (model, tokens) = slow_run(t);
    let dump = t.join("run.safetensors");
    let args = ["run", "--model", &s(&model), "--stream", "--tokens", &tokens, "--dump", &s(&dump)];
    let mut first = Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).stdout(Stdio::null()).spawn().unwrap();
    // Tried as soon as its partial file exists, and once it checkpointed a layer (whose files
    // read as an interrupted run's, which the refusal would have said to delete).
    let start = std::time::Instant::now();
    for wait_for in ["run.safetensors.partial", "run.safetensors.resume.json"] {
        while !t.join(wait_for).exists() {
            assert!(start.elapsed() < Duration::from_secs(120), "no {wait_for}");
            std::thread::sleep(Duration::from_millis(2));
        }
        // Stopped (not ended) while the second tries, so it cannot finish in between.
        // SAFETY: signalling a child this test started and has not reaped.
        unsafe { libc::kill(first.id() as i32, libc::SIGSTOP) };
        assert!(first.try_wait().unwrap().is_none(), "the first run finished before the second started");
        assert_error(&glimpse(&args), "another glimpse is writing this dump now");
        // SAFETY: as above.
        unsafe { libc::kill(first.id() as i32, libc::SIGCONT) };
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // (It checkpointed a layer: the next run finishes it.)
    common::assert_ok(&glimpse(&[&args[..], &["--resume"]].concat()));
    glimpse::dump::Dump::open(&dump).unwrap();
    assert!(!t.join("run.safetensors.resume.lock").exists(), "a finished dump leaves no lock file");
}

/// Ctrl-C during `audit --prompts` stops after the prompt in progress and audits the prompts
/// run, saying how many (exit 0: the numbers cover those prompts whole). SIGTERM, which a CI's
/// cancel sends, does the same: this test sends it.
#[test]
fn ctrl_c_stops_an_audit_after_the_prompt_in_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    // Far more than run in the second before the signal (about 0.5 ms a prompt here).
    let line = (1..=16).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    std::fs::write(&prompts, format!("{line}\n").repeat(200_000)).unwrap();
    let flat = golden("flat");
    // Once the audit catches SIGINT (its handler is installed before the prompts are read),
    // with a moment for prompts to run.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let child = spawn_catching_sigint(&["audit", "--model", &s(&flat), "--prompts", &s(&prompts), "--json"]);
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signalling a child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let run = v["stopped_after"].as_u64().unwrap_or_else(|| panic!("not stopped early: {v}"));
        assert!(run > 0 && run < 200_000, "{run}");
        assert_eq!((v["complete"].as_bool(), v["prompts_total"].as_u64()), (Some(false), Some(200_000)));
        assert_eq!(v["prompts"].as_u64(), Some(run));
        for layer in v["layers"].as_array().unwrap() {
            assert_eq!(layer["tokens"].as_u64(), Some(16 * run), "{layer}");
        }
    }
    // With --compare-prompts, the stop stops both sets: the other prompts are not run, and said.
    let args = ["audit", "--model", &s(&flat), "--prompts", &s(&prompts), "--compare-prompts", &s(&prompts), "--json"];
    let child = spawn_catching_sigint(&args);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("--compare-prompts") && err.contains("not run, the audit was stopped"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["stopped_after"].is_u64() && v.get("compare").is_none(), "{v}");
    // The JSON says so too, as it says of prompts run in part.
    assert_eq!(v["compare_complete"], false, "{v}");
    assert!(v["compare_notes"][0].as_str().unwrap().contains("not run, the audit was stopped"), "{v}");
}

/// A run killed while writing (a second Ctrl-C during the dump's last write, SIGKILL) leaves its
/// pid-named temporary file; the next run writing the same dump removes it, and only it: another
/// live process's is kept.
#[test]
fn the_next_run_removes_what_a_killed_one_left() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run.safetensors");
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let names = [format!("run.safetensors.{dead}.partial"), format!("run.safetensors.{dead}.tmp")];
    let kept = ["run.safetensors.1.partial".to_string(), "other.7.partial".into()];
    for f in names.iter().chain(&kept) {
        std::fs::write(tmp.path().join(f), b"left").unwrap();
    }
    let o = glimpse(&["run", "--model", &s(&golden("flat")), "--tokens", "1,2,3", "--dump", &s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut left: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    let mut want: Vec<String> = kept.to_vec();
    want.push("run.safetensors".into());
    want.sort();
    assert_eq!(left, want);
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
