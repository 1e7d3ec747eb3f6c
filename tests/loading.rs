//! Checkpoint loading: the same weights stored single-file or sharded, per-expert or fused, give
//! the same model; FP8 checkpoints load; a checkpoint that does not fit its config is refused with
//! every problem named.

use std::collections::BTreeMap;
use std::path::Path;

use glimpse::checkpoint::Checkpoint;
use glimpse::hooks::NoObserver;
use glimpse::model::{Model, Tokens};
use glimpse::st::{self, Entry, StFile};
use glimpse::synth::{synth, SynthDtype, SynthOptions};
use serde_json::json;

fn tiny_config() -> serde_json::Value {
    json!({
        "model_type": "glm_moe_dsa", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 40,
        "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
        "n_routed_experts": 6, "num_experts_per_tok": 2, "q_lora_rank": 24, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "first_k_dense_replace": 1,
        "index_topk": 3, "index_head_dim": 8, "index_n_heads": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}
    })
}

fn write_synth(dir: &Path, dtype: SynthDtype, shards: usize) {
    let o = SynthOptions {
        config: tiny_config(),
        layers: None,
        dense: None,
        experts: None,
        vocab: None,
        dtype,
        shards,
        mtp: true,
        seed: 7,
        out: dir.to_path_buf(),
    };
    synth(&o).unwrap();
}

fn logits(dir: &Path) -> Vec<f32> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let model = Model::load(&ckpt).unwrap();
    let tokens = Tokens::new(2, 6, vec![1, 5, 9, 13, 17, 21, 2, 4, 6, 8, 10, 12]).unwrap();
    model.forward(&tokens, &mut NoObserver).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// A sharded checkpoint loads the weights its single-file twin does, and so it does with its
/// shards in a subfolder the index names (transformers joins such paths to the folder).
#[test]
fn sharded_and_single_file_load_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, three) = (tmp.path().join("one"), tmp.path().join("three"));
    write_synth(&one, SynthDtype::F32, 1);
    write_synth(&three, SynthDtype::F32, 3);
    assert!(three.join("model.safetensors.index.json").is_file());
    assert_eq!(Checkpoint::open(&three).unwrap().files.len(), 3);
    let single = logits(&one);
    assert_eq!(single, logits(&three));
    std::fs::create_dir(three.join("shards")).unwrap();
    let index_path = three.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    for shard in index["weight_map"].as_object_mut().unwrap().values_mut() {
        let name = shard.as_str().unwrap().to_string();
        if three.join(&name).exists() {
            std::fs::rename(three.join(&name), three.join("shards").join(&name)).unwrap();
        }
        *shard = format!("shards/{name}").into();
    }
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    assert_eq!(single, logits(&three));
}

/// A sharded checkpoint as the Hugging Face cache holds it (`REPO/snapshots/REV/` of links into
/// `REPO/blobs/`) loads the same weights; the same links from a folder that is no snapshot are
/// still refused (they lead outside it).
#[cfg(unix)]
#[test]
fn a_hugging_face_cache_snapshot_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let three = tmp.path().join("three");
    write_synth(&three, SynthDtype::F32, 3);
    let repo = tmp.path().join("models--zai-org--tiny");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots/0123abcd"));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    for (i, entry) in std::fs::read_dir(&three).unwrap().enumerate() {
        let name = entry.unwrap().file_name();
        std::fs::rename(three.join(&name), blobs.join(format!("blob{i}"))).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snapshot.join(&name)).unwrap();
        std::os::unix::fs::symlink(blobs.join(format!("blob{i}")), elsewhere.join(&name)).unwrap();
    }
    let one = tmp.path().join("one");
    write_synth(&one, SynthDtype::F32, 1);
    assert_eq!(logits(&snapshot), logits(&one));
    let e = Checkpoint::open(&elsewhere).err().unwrap().to_string();
    assert!(e.contains("links outside the model folder"), "{e}");
}

/// Rewrites a per-expert checkpoint into transformers' fused layout
/// (`experts.gate_up_proj` [E, 2I, H] gate rows first, `experts.down_proj` [E, H, I]).
fn fuse_experts(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let file = StFile::open(&src.join("model.safetensors")).unwrap();
    let mut fused: BTreeMap<String, (Vec<f32>, Vec<f32>, usize)> = BTreeMap::new(); // prefix -> (gate_up, down, E)
    let mut out: Vec<(String, Entry)> = Vec::new();
    let mut names: Vec<String> = file.names().map(String::from).collect();
    // Expert order matters when concatenating: sort by layer prefix, then numerically by expert.
    names.sort_by_key(|n| {
        let parts: Vec<&str> = n.split('.').collect();
        let e = parts.iter().position(|p| *p == "experts").and_then(|i| parts[i + 1].parse::<usize>().ok());
        (parts[..parts.len().min(4)].join("."), e.unwrap_or(usize::MAX), n.clone())
    });
    for name in &names {
        let (data, shape) = file.f32(name).unwrap();
        let Some((prefix, rest)) = name.split_once(".experts.") else {
            out.push((name.clone(), Entry::f32(shape, &data)));
            continue;
        };
        let entry = fused.entry(prefix.to_string()).or_default();
        let (_, proj) = rest.split_once('.').unwrap();
        match proj {
            "gate_proj.weight" => {
                entry.0.extend(&data);
                entry.2 += 1;
            }
            "up_proj.weight" => entry.0.extend(&data),
            "down_proj.weight" => entry.1.extend(&data),
            _ => unreachable!(),
        }
    }
    for (prefix, (gate_up, down, e)) in fused {
        let (h, i) = (32, 16);
        // Per expert the rows came as gate then up: exactly [2I, H] per expert.
        out.push((format!("{prefix}.experts.gate_up_proj"), Entry::f32(vec![e, 2 * i, h], &gate_up)));
        out.push((format!("{prefix}.experts.down_proj"), Entry::f32(vec![e, h, i], &down)));
    }
    st::write(&dst.join("model.safetensors"), &out, &BTreeMap::new()).unwrap();
}

#[test]
fn fused_and_per_expert_experts_load_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (per_expert, fused) = (tmp.path().join("per"), tmp.path().join("fused"));
    write_synth(&per_expert, SynthDtype::F32, 1);
    fuse_experts(&per_expert, &fused);
    let ckpt = Checkpoint::open(&fused).unwrap();
    assert!(ckpt.contains("model.layers.1.mlp.experts.gate_up_proj"));
    assert!(!ckpt.contains("model.layers.1.mlp.experts.0.gate_proj.weight"));
    assert_eq!(logits(&per_expert), logits(&fused));
}

#[test]
fn fp8_and_bf16_checkpoints_load_and_stay_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let (f32_dir, bf16_dir, fp8_dir) = (tmp.path().join("f32"), tmp.path().join("bf16"), tmp.path().join("fp8"));
    write_synth(&f32_dir, SynthDtype::F32, 1);
    write_synth(&bf16_dir, SynthDtype::Bf16, 1);
    write_synth(&fp8_dir, SynthDtype::Fp8, 2);
    let ckpt = Checkpoint::open(&fp8_dir).unwrap();
    assert_eq!(ckpt.dtype("model.layers.0.self_attn.q_a_proj.weight"), Some(safetensors::Dtype::F8_E4M3));
    assert!(ckpt.contains("model.layers.0.self_attn.q_a_proj.weight_scale_inv"));
    // Same random weights, rounded: the models agree roughly, not exactly.
    let (a, b, c) = (logits(&f32_dir), logits(&bf16_dir), logits(&fp8_dir));
    let rel = |x: &[f32], y: &[f32]| {
        let num: f32 = x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum();
        let den: f32 = x.iter().map(|p| p * p).sum();
        (num / den).sqrt()
    };
    assert!(rel(&a, &b) < 0.05, "bf16 vs f32: {}", rel(&a, &b));
    assert!(rel(&a, &c) < 0.3, "fp8 vs f32: {}", rel(&a, &c));
    assert!(rel(&a, &c) > 0.0);
}

#[test]
fn missing_and_misshapen_tensors_are_all_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    write_synth(&src, SynthDtype::F32, 1);
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let file = StFile::open(&src.join("model.safetensors")).unwrap();
    let mut out = Vec::new();
    for name in file.names() {
        let (data, shape) = file.f32(name).unwrap();
        match name {
            "model.layers.0.self_attn.o_proj.weight" | "model.norm.weight" => continue,
            "model.layers.2.mlp.gate.weight" => {
                out.push((name.to_string(), Entry::f32(vec![shape[1], shape[0]], &data)))
            }
            _ => out.push((name.to_string(), Entry::f32(shape, &data))),
        }
    }
    st::write(&dst.join("model.safetensors"), &out, &BTreeMap::new()).unwrap();
    let ckpt = Checkpoint::open(&dst).unwrap();
    let err = Model::load(&ckpt).err().expect("load must fail").to_string();
    assert!(err.contains("3 weight problem(s)"), "{err}");
    assert!(err.contains("missing `model.layers.0.self_attn.o_proj.weight` (expected shape [32, 16])"), "{err}");
    assert!(err.contains("missing `model.norm.weight`"), "{err}");
    assert!(err.contains("`model.layers.2.mlp.gate.weight` has shape [32, 6], expected [6, 32]"), "{err}");
    // `inspect`, which loads nothing, says the files hold less than the config implies; the
    // whole checkpoint, and a fused-experts one of the same parameters, not.
    let describe = |dir: &Path| glimpse::inspect::describe(&Checkpoint::open(dir).unwrap()).unwrap();
    let human = glimpse::inspect::human;
    assert_eq!(total(&src) - total(&dst), 32 * 16 + 32, "o_proj [32, 16] and the final norm [32]");
    let line = format!("incomplete: the files hold {} of the {} parameters", human(total(&dst)), human(total(&src)));
    assert!(describe(&dst).contains(&line), "{}", describe(&dst));
    assert!(!describe(&src).contains("incomplete"));
    let fused = tmp.path().join("fused");
    fuse_experts(&src, &fused);
    assert!(!describe(&fused).contains("incomplete"), "{}", describe(&fused));
}

/// The parameters of a checkpoint's files, the MTP layer's left out.
fn total(dir: &Path) -> usize {
    let ckpt = Checkpoint::open(dir).unwrap();
    let mtp = format!("model.layers.{}.", ckpt.config.num_hidden_layers);
    ckpt.names().filter(|n| !n.starts_with(&mtp)).map(|n| ckpt.shape(n).unwrap().iter().product::<usize>()).sum()
}

#[test]
fn the_mtp_layer_is_recognised_not_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    write_synth(tmp.path(), SynthDtype::F32, 1);
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let mtp = ckpt.mtp_names();
    assert!(mtp.contains(&"model.layers.3.eh_proj.weight"), "{mtp:?}");
    assert!(mtp.iter().all(|n| n.starts_with("model.layers.3.")));
    Model::load(&ckpt).unwrap();
}

/// `tie_word_embeddings` with an `lm_head.weight` stored beside the embedding: transformers keeps
/// the stored head (it unties the two when they differ), so glimpse multiplies by it too, in the
/// resident model and when streaming; without one stored, the head is the embedding.
#[test]
fn a_stored_lm_head_is_the_head_even_when_tied() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_synth(&dir, SynthDtype::F32, 1);
    let untied = logits(&dir);
    let config = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    c["tie_word_embeddings"] = json!(true);
    std::fs::write(&config, serde_json::to_vec(&c).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(!ckpt.tied_head() && ckpt.head_name() == "lm_head.weight");
    assert_eq!(logits(&dir), untied, "the stored head, not the embedding");
    let tokens = Tokens::new(2, 6, vec![1, 5, 9, 13, 17, 21, 2, 4, 6, 8, 10, 12]).unwrap();
    use glimpse::model::stream::{run, LogitRows, Weights};
    let streamed =
        run(Weights::Streamed(&ckpt), &tokens, (None, None), LogitRows::All, &mut NoObserver).unwrap().unwrap();
    assert_eq!(streamed.flatten_all().unwrap().to_vec1::<f32>().unwrap(), untied, "streamed alike");

    // Without a stored head, tying makes the embedding the head: other logits.
    rewrite_weights(&dir, |t| t.retain(|(n, _)| n != "lm_head.weight"));
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.tied_head() && ckpt.head_name() == "model.embed_tokens.weight");
    assert_ne!(logits(&dir), untied);
}

/// `tie_word_embeddings` with only `lm_head.weight` stored: transformers 5.24 loads the head
/// into the embedding too (seen with `from_pretrained`: the two share one tensor, equal to the
/// stored head), so the logits are those of an untied checkpoint whose embedding is a copy of
/// its head, resident and streamed, in f32 and in bf16 (whose head is read in place). It was
/// refused as a missing `model.embed_tokens.weight`.
#[test]
fn a_tied_checkpoint_storing_only_the_head_embeds_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [SynthDtype::F32, SynthDtype::Bf16] {
        let (copied, only_head) =
            (tmp.path().join(format!("copied-{dtype}")), tmp.path().join(format!("head-{dtype}")));
        write_synth(&copied, dtype, 1);
        let untied = logits(&copied);
        rewrite_weights(&copied, |t| {
            let head = &t.iter().find(|(n, _)| n == "lm_head.weight").unwrap().1;
            let head = Entry { dtype: head.dtype, shape: head.shape.clone(), data: head.data.clone() };
            t.iter_mut().find(|(n, _)| n == "model.embed_tokens.weight").unwrap().1 = head;
        });
        let want = logits(&copied);
        assert_ne!(want, untied, "the head differs from the embedding it replaces");

        write_synth(&only_head, dtype, 1);
        let config = only_head.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        c["tie_word_embeddings"] = json!(true);
        std::fs::write(&config, serde_json::to_vec(&c).unwrap()).unwrap();
        rewrite_weights(&only_head, |t| t.retain(|(n, _)| n != "model.embed_tokens.weight"));
        let ckpt = Checkpoint::open(&only_head).unwrap();
        assert!(ckpt.embedding_is_head() && !ckpt.tied_head() && ckpt.head_name() == "lm_head.weight");
        assert_eq!(logits(&only_head), want, "{dtype}: the stored head embeds");
        let tokens = Tokens::new(2, 6, vec![1, 5, 9, 13, 17, 21, 2, 4, 6, 8, 10, 12]).unwrap();
        use glimpse::model::stream::{run, LogitRows, Weights};
        let streamed =
            run(Weights::Streamed(&ckpt), &tokens, (None, None), LogitRows::All, &mut NoObserver).unwrap().unwrap();
        assert_eq!(streamed.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{dtype}: streamed alike");
        let described = glimpse::inspect::describe(&ckpt).unwrap();
        assert!(described.contains("it is the embedding too") && !described.contains("incomplete"), "{described}");
    }
}

/// `files` of the golden case `case` copied into `dir` (made); returns the case's folder.
fn copy_golden(case: &str, dir: &Path, files: &[&str]) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case);
    std::fs::create_dir_all(dir).unwrap();
    for f in files {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    src
}

/// A weight file's tensors as stored, by name.
type Tensors = Vec<(String, Entry)>;

/// Rewrites `dir`'s single weight file through `edit`, which sees every tensor as stored.
fn rewrite_weights(dir: &Path, edit: impl Fn(&mut Tensors)) {
    let path = dir.join("model.safetensors");
    let file = StFile::open(&path).unwrap();
    let mut entries: Tensors = file
        .names()
        .map(|n| {
            let (info, bytes) = file.bytes(n).unwrap();
            (n.to_string(), Entry { dtype: info.dtype, shape: info.shape.clone(), data: bytes.to_vec() })
        })
        .collect();
    drop(file);
    edit(&mut entries);
    st::write(&path, &entries, &BTreeMap::new()).unwrap();
}

/// An FP8 weight without its block scales, a scale beside a weight that is not FP8, and scales
/// that are not finite or are negative are refused, naming the tensor (each ran before: the
/// codes as the weight, the scale applied twice, NaN activations far downstream), and so is an
/// F8_E5M2 weight.
#[test]
fn fp8_scales_must_pair_with_fp8_weights_and_be_finite() {
    let tmp = tempfile::tempdir().unwrap();
    let w = "model.layers.1.mlp.experts.3.gate_proj.weight";
    let scale = format!("{w}_scale_inv");
    let case = |name: &str, dtype, edit: &dyn Fn(&mut Tensors)| {
        let dir = tmp.path().join(name);
        write_synth(&dir, dtype, 1);
        rewrite_weights(&dir, edit);
        Checkpoint::open(&dir).and_then(|c| Model::load(&c)).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let e = case("no-scale", SynthDtype::Fp8, &|t| t.retain(|(n, _)| *n != scale));
    assert!(e.contains(&format!("F8_E4M3 tensor `{w}` has no `{scale}`")), "{e}");
    let e = case("stray-scale", SynthDtype::Bf16, &|t| {
        t.push((scale.clone(), Entry::f32(vec![1, 1], &[2.0])));
    });
    assert!(e.contains(&format!("`{scale}` scales `{w}`, which is BF16")), "{e}");
    for (name, bad) in [("nan-scale", f32::NAN), ("inf-scale", f32::INFINITY), ("negative-scale", -0.5)] {
        let e = case(name, SynthDtype::Fp8, &|t| {
            let (_, entry) = t.iter_mut().find(|(n, _)| *n == scale).unwrap();
            entry.data[..4].copy_from_slice(&bad.to_le_bytes());
        });
        assert!(e.contains(&format!("`{scale}` [0, 0] is {bad}")), "{name}: {e}");
    }
    // E5M2 codes at face value are a weight nobody quantised that way (dumps may hold E5M2).
    let e = case("e5m2", SynthDtype::Bf16, &|t| {
        let (_, entry) = t.iter_mut().find(|(n, _)| n == w).unwrap();
        entry.dtype = safetensors::Dtype::F8_E5M2;
        entry.data.truncate(entry.data.len() / 2);
    });
    assert!(e.contains(&format!("`{w}` is F8_E5M2: a checkpoint's FP8 weights are F8_E4M3")), "{e}");
    // A scale of 0 is a block of zeros, as a quantiser writes one.
    let e = case("zero-scale", SynthDtype::Fp8, &|t| {
        let (_, entry) = t.iter_mut().find(|(n, _)| *n == scale).unwrap();
        entry.data[..4].copy_from_slice(&0f32.to_le_bytes());
    });
    assert_eq!(e, "");
}

/// A sharded download in progress (the index names a shard not yet in the folder) opens: its
/// tensors are missing, which `inspect` counts (naming the shard) and loading lists, where the
/// missing file stopped both with "No such file" (an FP8 weight whose scale is in that shard is
/// missing too, not refused).
#[test]
fn a_shard_still_to_come_is_missing_tensors_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("partial");
    let files = ["config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors"];
    let src = copy_golden("fp8-sharded", &dir, &files);
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.absent_shards, ["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]);
    let described = glimpse::inspect::describe(&ckpt).unwrap();
    assert!(described.contains("incomplete: the files hold"), "{described}");
    let shards =
        "names 2 shard(s) not in the folder, model-00002-of-00003.safetensors and 1 more: a download in progress?";
    assert!(described.contains(shards), "{described}");
    let err = Model::load(&ckpt).err().expect("load must fail").to_string();
    assert!(err.contains("weight problem(s): missing `") && err.contains(shards), "{err}");
    // The routers `diff`, `audit` and the TUI read without loading: a bias still to come is no
    // dense layer's absence.
    let Err(err) = glimpse::model::moe::Routers::read(&ckpt) else { panic!("its routers are missing") };
    let err = err.to_string();
    assert!(err.contains("e_score_correction_bias` is missing: ") && err.contains(shards), "{err}");
    let whole = Checkpoint::open(&src).unwrap();
    assert!(whole.absent_shards.is_empty() && whole.absent_note().is_none());
    // `--stream` reads each layer as it reaches it: the shard still to come is said before the
    // first layer runs, for the window's tensors only (it ran the layers before, then failed).
    let err = glimpse::model::stream::check_streamed(&ckpt, &(0..=ckpt.config.num_hidden_layers - 1))
        .expect_err("the whole model needs the missing shards")
        .to_string();
    assert!(
        err.contains("missing `") && err.contains("(its shard is not in the folder)") && err.contains(shards),
        "{err}"
    );
    for i in 0..ckpt.config.num_hidden_layers {
        let absent = ckpt.absent().any(|n| glimpse::layout::layer_of(n) == Some(i));
        let window = glimpse::model::stream::check_streamed(&ckpt, &(i..=i));
        assert_eq!(
            window.is_err(),
            absent || i + 1 == ckpt.config.num_hidden_layers && ckpt.absent().any(|n| n == "lm_head.weight"),
            "layer {i}"
        );
    }
}

/// A config whose hidden size the weights do not have is said by name before a streamed run
/// starts (it was a tensor op's "Shape mismatch, got buffer of size ...").
#[test]
fn a_streamed_run_names_a_config_the_embedding_does_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wide");
    let src = copy_golden("flat", &dir, &["model.safetensors"]);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let hidden = config["hidden_size"].as_u64().unwrap();
    config["hidden_size"] = (2 * hidden).into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["run", "--model", dir.to_str().unwrap(), "--tokens", "1,2,3", "--stream"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let expected =
        format!("`model.embed_tokens.weight` has shape [256, {hidden}], expected [256, {}] (config.json)", 2 * hidden);
    assert!(err.contains(&expected) && err.lines().count() == 1, "{err}");
}

/// A final norm missing from the files is said before a streamed run's first layer (it read as
/// the head's upload failing after every layer had run), for a window that reaches the head only,
/// and not for a sweep, which never runs the head.
#[test]
fn a_streamed_run_names_a_missing_final_norm_before_its_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("headless");
    copy_golden("flat", &dir, &["config.json", "model.safetensors"]);
    rewrite_weights(&dir, |t| t.retain(|(n, _)| n != "model.norm.weight"));
    let ckpt = Checkpoint::open(&dir).unwrap();
    let n = ckpt.config.num_hidden_layers;
    let err = glimpse::model::stream::check_streamed(&ckpt, &(0..=n - 1)).expect_err("no final norm").to_string();
    let expected = format!("missing `model.norm.weight` (expected shape [{}])", ckpt.config.hidden_size);
    assert!(err.contains(&expected), "{err}");
    assert!(glimpse::model::stream::check_streamed(&ckpt, &(0..=n - 2)).is_ok(), "a window short of the head");
    // A sweep (`audit --stream`) never runs the head.
    assert!(glimpse::model::stream::check_swept(&ckpt, &(0..=n - 1)).is_ok());
}
