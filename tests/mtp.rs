//! The MTP head: run beside generation through its own cache it equals the prefill form checked
//! against the `golden/mtp` reference, its acceptance count is what the drafts say, and a port
//! that feeds it the hidden state before the final norm is caught.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::Tolerance;
use glimpse::dump::Dump;
use glimpse::hooks::{HookPoint, LayerHook, Recorder, Selector};
use glimpse::model::decode::last_argmax;
use glimpse::model::mtp::Mtp;
use glimpse::model::{Model, Tokens};
use glimpse::stitch::Stitcher;
use glimpse::verify::{verify, verify_mtp};

mod common;

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/mtp")
}

/// Generation with drafts: every hook of the main model and of the MTP head, laid end to end,
/// equals a prefill of the same tokens followed by the MTP head's prefill form; the reported
/// acceptance is the share of drafts equal to the next greedy token. Also when `on_step` stops
/// the generation early (Ctrl-C, eos): the head then saw no pair past the main model's run.
#[test]
fn mtp_drafts_during_generation_equal_the_prefill_form() {
    use glimpse::model::decode::Flow;
    let ckpt = Checkpoint::open(&case()).unwrap();
    let (model, mtp) = (Model::load(&ckpt).unwrap(), Mtp::load(&ckpt).unwrap());
    let prompt = Tokens::parse("5,17,30,2,99,64,3,8;7,8,9,10,11,12,13,14").unwrap();
    for stop_after in [None, Some(2), Some(0)] {
        let mut stitcher = Stitcher::new(Selector::default());
        let flow = |step| if Some(step) == stop_after { Flow::Stop } else { Flow::Continue };
        let done =
            model.generate(&prompt, 6, 3, Some(&mtp), &mut stitcher, &|| false, |step, _| Ok(flow(step))).unwrap();
        let new = done.tokens[0].len();
        assert_eq!(new, stop_after.map_or(6, |s| s + 1));
        let decode: BTreeMap<HookPoint, _> = stitcher.finish().unwrap().into_iter().collect();

        let ids = decode[&HookPoint::InputIds].to_vec2::<i64>().unwrap();
        let seq = prompt.seq + new - 1;
        let tokens = Tokens::new(2, seq, ids.concat().iter().map(|&t| t as u32).collect()).unwrap();
        let mut prefill = Recorder::new(Selector::default());
        model.forward(&tokens, &mut prefill).unwrap();
        let h = prefill.get(HookPoint::FinalNorm).unwrap().narrow(1, 0, seq - 1).unwrap();
        let draft_logits = mtp.forward(&model, &h, &tokens, &mut prefill).unwrap(); // [B, seq-1, V]
        let prefill: BTreeMap<HookPoint, _> = prefill.tensors.into_iter().collect();

        let r =
            glimpse::decode_check::compare(&prefill, &decode, seq, (Tolerance::default(), &[]), &model.config).unwrap();
        let failed: Vec<String> = r.results.iter().filter(|c| !c.ok).map(glimpse::verify::format_line).collect();
        assert!(r.all_match(), "stop after {stop_after:?}: {failed:#?}");
        let n = model.layers.len();
        for point in [HookPoint::MtpInputHidden, HookPoint::Layer(n, LayerHook::TopkIds), HookPoint::MtpLogits] {
            assert!(r.results.iter().any(|c| c.name == point.name()), "{} not compared", point.name());
        }

        // Draft at MTP position s predicts token s + 2; generated tokens after the first were drafted.
        let mut want = (0, 0);
        for s in prompt.seq - 1..seq - 1 {
            let drafts = last_argmax(&draft_logits.narrow(1, s, 1).unwrap()).unwrap();
            for (b, d) in drafts.iter().enumerate() {
                let main = done.tokens[b][s + 2 - prompt.seq];
                want = (want.0 + usize::from(*d == main), want.1 + 1);
            }
        }
        let hits = done.drafts.as_ref().unwrap();
        let counted = hits.iter().flatten().fold((0, 0), |(a, d), &hit| (a + usize::from(hit), d + 1));
        assert_eq!(counted, want);
        assert_eq!(want.1, 2 * (new - 1));
    }
}

/// The decode form refuses hidden states of another shape than its next tokens, though they hold
/// as many values (they would be paired with other tokens, and the cache count other positions).
#[test]
fn mtp_decode_refuses_hidden_states_of_another_shape() {
    let ckpt = Checkpoint::open(&case()).unwrap();
    let (model, mtp) = (Model::load(&ckpt).unwrap(), Mtp::load(&ckpt).unwrap());
    let hidden = candle_core::Tensor::zeros(
        (2, 1, model.config.hidden_size),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let next = Tokens::parse("5,6").unwrap(); // 1 x 2, where the hidden states are 2 x 1
    let mut cache = glimpse::model::decode::KvCache::new(1);
    let err = mtp.decode(&model, &hidden, &next, &mut cache, &mut glimpse::hooks::NoObserver).unwrap_err().to_string();
    assert!(err.contains("needs 1 x 2 hidden states for 1 x 2 next tokens, got 2 x 1"), "{err}");
    assert_eq!(cache.len, 0);
}

/// Feeding the head the hidden state before the final norm (a bug real ports shipped) fails
/// `mtp.input_hidden` and everything after it.
#[test]
fn mtp_fed_the_pre_norm_state_is_caught() {
    let ckpt = Checkpoint::open(&case()).unwrap();
    let (model, mtp) = (Model::load(&ckpt).unwrap(), Mtp::load(&ckpt).unwrap());
    let golden = Dump::open(&case().join("reference.safetensors")).unwrap();
    let mut report = verify(&model, &golden, Tolerance::default(), false).unwrap();
    let last = HookPoint::Layer(model.layers.len() - 1, LayerHook::Output).name();
    report.final_norm = Some(golden.tensor(&last).unwrap());
    verify_mtp(&model, (&model.config, &mtp), &golden, &Default::default(), &mut report).unwrap();
    let verdict = |name: &str| report.results.iter().find(|c| c.name == name).map(|c| c.ok);
    assert_eq!(verdict("final_norm"), Some(true));
    assert_eq!(verdict("mtp.input_hidden"), Some(false));
    assert_eq!(verdict("mtp.logits"), Some(false));
}

/// A port's dump whose head was fed its last layer's output (the state before the final norm):
/// `diff` names `mtp.input_hidden` first (the MTP layer's hook points, which run after it, sorted
/// before it) and reads what was fed, from the dump's own tensors; `verify --isolate` against it
/// fails there (it fed the head the reference's input and compared nothing else of it: 81 of 81
/// matched).
#[test]
fn a_port_feeding_its_head_the_pre_norm_state_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = case().join("reference.safetensors");
    let d = Dump::open(&reference).unwrap();
    let n = Checkpoint::open(&case()).unwrap().config.num_hidden_layers;
    // Forward order: the head's input, then its decoder layer (`layers.{n}`), then its norm.
    let names = d.names();
    let at = |name: &str| names.iter().position(|x| x == name).unwrap_or_else(|| panic!("{name}"));
    let mtp_layer = HookPoint::Layer(n, LayerHook::InputNorm).name();
    assert!(at("mtp.input_hidden") < at("mtp.eh_proj") && at("mtp.eh_proj") < at(&mtp_layer));
    assert!(at(&mtp_layer) < at("mtp.final_norm"));
    // The port: its head's input is layers.{n-1}.output's first S-1 positions.
    let last = HookPoint::Layer(n - 1, LayerHook::Output).name();
    let (pre_norm, shape) = match d.values(&last).unwrap() {
        (glimpse::dump::Values::F32(v), s) => (v, s),
        _ => panic!("floats"),
    };
    let (s, h) = (shape[1], shape[2]);
    let fed: Vec<f32> = pre_norm.chunks_exact(s * h).flat_map(|row| row[..(s - 1) * h].to_vec()).collect();
    let port = common::edit_dump(&reference, &tmp.path().join("port.st"), |t| {
        let (_, v, _) = t.iter_mut().find(|(name, ..)| name == "mtp.input_hidden").unwrap();
        *v = glimpse::dump::Values::F32(fed.clone());
    });
    let (model, port) = (case().to_str().unwrap().to_string(), port.to_str().unwrap().to_string());
    let (code, out) = common::code_and_text(&["diff", &port, reference.to_str().unwrap(), "--model", &model]);
    let first = format!(
        "first divergence: mtp.input_hidden (ours feeds the MTP head {last}, the hidden state before the final norm"
    );
    assert!(code == 1 && out.contains(&first), "{first}\nin\n{out}");
    let (code, out) = common::code_and_text(&["verify", "--model", &model, "--golden", &port, "--isolate"]);
    assert!(code == 1 && out.contains("first mismatch: mtp.input_hidden"), "{out}");
    // A head fed a bf16 copy of its final norm was fed the final norm: not read as another state.
    let rounded = common::edit_dump(&reference, &tmp.path().join("rounded.st"), |t| {
        let (_, v, _) = t.iter_mut().find(|(name, ..)| name == "mtp.input_hidden").unwrap();
        let glimpse::dump::Values::F32(x) = v else { panic!("floats") };
        x.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
    });
    let (_, out) = common::code_and_text(&["diff", rounded.to_str().unwrap(), reference.to_str().unwrap()]);
    assert!(out.contains("first divergence: mtp.input_hidden") && !out.contains("MTP head takes"), "{out}");
    assert!(!out.contains("feeds the MTP head"), "{out}");
}

#[test]
fn generate_mtp_reports_acceptance_and_refuses_a_checkpoint_without_mtp() {
    let dir = case();
    let args = ["generate", "--model", dir.to_str().unwrap(), "--tokens", "5,17,30,2", "--max-new-tokens", "5"];
    let (code, text) = common::code_and_text(&[&args[..], &["--mtp"]].concat());
    assert_eq!(code, 0, "{text}");
    // 5 new tokens: every one after the first was drafted.
    assert!(text.contains("drafts equal the main model's greedy token") && text.contains("of 4 drafts"), "{text}");
    assert!(
        text.contains("over 4 layers") && text.contains(" 8 positions"),
        "the cache report counts the MTP layer, and the 4 + 5 - 1 positions fed through it: {text}"
    );
    let no_mtp = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/grouped-shared-yarn");
    let o = common::glimpse(&["generate", "--model", no_mtp.to_str().unwrap(), "--tokens", "1,2", "--mtp"]);
    common::assert_error(&o, "has no MTP layer");
    // Said before the model loads: with a layer-0 weight missing too, the head is what it names.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(no_mtp.join("config.json"), tmp.path().join("config.json")).unwrap();
    let bytes = std::fs::read(no_mtp.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept = st.tensors().into_iter().filter(|(n, _)| n != "model.layers.0.input_layernorm.weight");
    safetensors::serialize_to_file(kept, None, &tmp.path().join("model.safetensors")).unwrap();
    let o = common::glimpse(&["generate", "--model", tmp.path().to_str().unwrap(), "--tokens", "1,2", "--mtp"]);
    common::assert_error(&o, "has no MTP layer");
}

/// A row that produced its eos stops counting drafts: the steps after it are the other rows'.
#[test]
fn drafts_after_a_rows_eos_are_not_counted() {
    let generate = |dir: &Path, extra: &[&str]| {
        let args = ["generate", "--model", dir.to_str().unwrap(), "--tokens", "5,17,30,2;9,10,11,12", "--mtp"];
        let (code, text) = common::code_and_text(&[&args[..], &["--max-new-tokens", "6"], extra].concat());
        assert_eq!(code, 0, "{text}");
        text
    };
    let text = generate(&case(), &["--ignore-eos"]);
    assert!(text.contains("of 10 drafts"), "2 rows x 5 drafted tokens: {text}");
    let row = |r: usize| -> Vec<u32> {
        let line = text.split(&format!("row {r}: generated ")).nth(1).unwrap().lines().next().unwrap();
        serde_json::from_str(line).unwrap()
    };
    let (row0, row1) = (row(0), row(1));
    // Row 0's second token as the eos: row 0 ends there, row 1 (without it) runs on.
    assert!(!row1.contains(&row0[1]) && !row0[..1].contains(&row0[1]), "{text}");
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(case()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    let config = tmp.path().join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    c["eos_token_id"] = serde_json::json!(row0[1]);
    std::fs::write(&config, serde_json::to_vec(&c).unwrap()).unwrap();
    let text = generate(tmp.path(), &[]);
    assert!(text.contains(&format!("row 0: generated {:?}", &row0[..2])), "{text}");
    assert!(text.contains("of 6 drafts"), "row 0's one drafted token up to its eos, row 1's 5: {text}");
}

/// `run --mtp --dump` writes the MTP head's tensors beside the main model's: `diff` against the
/// `golden/mtp` reference compares all of them (mtp.input_hidden included) and they match. On
/// the device path too, whose drafts are the CPU's.
#[test]
fn run_mtp_dump_diffs_clean_against_the_reference() {
    let dir = case();
    let reference = dir.join("reference.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let mut drafts = Vec::new();
    for device in ["cpu", "cpu-ops"] {
        let out = tmp.path().join(format!("mtp-{device}.safetensors"));
        let (code, text) = common::code_and_text(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--tokens-from",
            reference.to_str().unwrap(),
            "--mtp",
            "--record",
            "*,*.dsa.scores",
            "--dump",
            out.to_str().unwrap(),
            "--device",
            device,
        ]);
        assert_eq!(code, 0, "{device}: {text}");
        let drafted: Vec<String> =
            text.lines().filter(|l| l.contains(": mtp draft of the next token")).map(String::from).collect();
        assert_eq!(drafted.len(), 2, "{device}: {text}");
        drafts.push(drafted);
        let (code, text) = common::code_and_text(&["diff", out.to_str().unwrap(), reference.to_str().unwrap()]);
        assert_eq!(code, 0, "{device}: {text}");
        let names = Dump::open(&reference).unwrap().names().len();
        assert!(text.contains(&format!("{names} of {names} common tensors match")), "{device}: {text}");
        let only_ref = format!("only in {}", reference.display());
        assert!(!text.contains(&only_ref), "{device}: every reference tensor was produced: {text}");
    }
    assert_eq!(drafts[0], drafts[1]);
}

/// `verify` checks the MTP head the reference holds on every path that runs the whole model:
/// the device path runs it on the device from the device's final norm (its 16 tensors were once
/// left out, "37 of 37 match"), and `--stream`, which cannot run it, is refused with what to do
/// (it listed them as skipped and passed).
#[test]
fn verify_checks_the_mtp_head_on_the_device_path_and_stream_refuses_it() {
    let dir = case();
    let model = dir.to_str().unwrap();
    let (code, text) = common::code_and_text(&["verify", "--model", model, "--device", "cpu-ops"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("53 of 53 tensors match") && text.contains("mtp.logits"), "{text}");
    let o = common::glimpse(&["verify", "--model", model, "--stream"]);
    common::assert_error(&o, "the reference checks the MTP head, which --stream does not run");
    let (code, text) = common::code_and_text(&["verify", "--model", model, "--stream", "--layers", "0..2"]);
    assert_eq!(code, 0, "{text}");
}

/// `run --mtp` of one token is refused before the model runs (it ran the whole model, printed
/// its next token, then failed).
#[test]
fn run_mtp_of_one_token_is_refused_before_the_run() {
    let dir = case();
    let o = common::glimpse(&["run", "--model", dir.to_str().unwrap(), "--tokens", "5", "--mtp"]);
    common::assert_error(&o, "the MTP head needs at least 2 tokens");
    assert!(o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// `verify --force-routing` replays the reference's expert choices in the MTP head's layer too,
/// on the CPU and on the device path: a reference whose layer-3 (the head's) routing of one
/// token names other experts is matched there with the replay (ours then takes them), and
/// flagged without it. (The head took no replay before: its layer chose its own.)
#[test]
fn verify_replays_the_mtp_layers_routing() {
    let dir = case();
    let tmp = tempfile::tempdir().unwrap();
    let edited = tmp.path().join("other-route.safetensors");
    common::edit_ints(&dir.join("reference.safetensors"), &edited, "layers.3.moe.topk_ids", |ids, shape| {
        // Token 0's choices, each moved to the next expert not chosen (a set of the same size).
        let (k, experts) = (shape[1], 8);
        let row: Vec<i64> = ids[..k].to_vec();
        let mut free = (0..experts).filter(|e| !row.contains(e));
        for id in ids[..k].iter_mut() {
            *id = free.next().unwrap();
        }
    });
    let m = dir.to_str().unwrap();
    for device in ["cpu", "cpu-ops"] {
        let verify = ["verify", "--model", m, "--golden", edited.to_str().unwrap(), "--device", device];
        let (_, text) = common::code_and_text(&[&verify[..], &["--force-routing"]].concat());
        let line = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
        assert!(line("layers.3.moe.topk_ids ").contains(" ok "), "{device}: {text}");
        let (_, text) = common::code_and_text(&verify);
        let line = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
        assert!(line("layers.3.moe.topk_ids ").contains("1/30 rows differ"), "{device}: {text}");
    }
}
