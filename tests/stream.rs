//! Scale past RAM: `--stream` gives the same tensors as a resident run with a fraction of its
//! memory, and `--layers A..B --from-dump` reproduces one window of the full run; a window whose
//! dump the disk cannot hold leaves no partial file behind. `audit --stream` runs its prompts
//! layer by layer and counts what the resident audit counts.

mod common;
use common::code_and_text;

use std::path::Path;

fn peak_rss_mb(out: &str) -> f64 {
    let line = out.lines().find(|l| l.starts_with("peak RSS")).unwrap_or_else(|| panic!("no peak RSS in {out}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn streaming_matches_the_resident_run_in_a_fraction_of_the_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = t.join("config.json");
    std::fs::write(&cfg, common::EIGHT_LAYERS).unwrap();
    let model = t.join("model");
    let m = model.to_str().unwrap();
    let (code, out) =
        code_and_text(&["synth", "--config", cfg.to_str().unwrap(), "--dtype", "bf16", "--shards", "3", "--out", m]);
    assert_eq!(code, 0, "{out}");
    let f32_bytes = checkpoint_f32_bytes(&model);
    assert!(f32_bytes > 350e6, "the checkpoint is big enough to measure against: {f32_bytes}");

    let tokens = "5,17,300,2,999,64,128,7,42,511,1000,3";
    let p = |name: &str| t.join(name).to_string_lossy().into_owned();
    let (full, streamed, window) = (p("full.safetensors"), p("streamed.safetensors"), p("window.safetensors"));
    let (code, out_full) = code_and_text(&["run", "--model", m, "--tokens", tokens, "--dump", &full]);
    assert_eq!(code, 0, "{out_full}");
    let (code, out_stream) = code_and_text(&["run", "--model", m, "--tokens", tokens, "--stream", "--dump", &streamed]);
    assert_eq!(code, 0, "{out_stream}");

    // The same tensors, bit for bit.
    let (code, text) = code_and_text(&["diff", "--atol", "0", "--rtol", "0", &streamed, &full]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no divergence") && !text.contains("only in"), "{text}");

    // A fraction of the memory: about one layer resident at a time.
    let (resident, stream) = (peak_rss_mb(&out_full), peak_rss_mb(&out_stream));
    let f32_mb = f32_bytes / 1e6;
    // The resident run maps every bf16 weight (half the f32 size; of the embedding table, the
    // pages of the rows it looks up) and multiplies them where they lie (or, without AMX, also
    // holds them reordered).
    assert!(resident > 0.4 * f32_mb, "the resident run holds the weights: {resident} MB of {f32_mb} MB");
    println!("peak RSS: resident {resident:.1} MB, streamed {stream:.1} MB, of {f32_mb:.1} MB in f32");
    assert!(stream < 0.3 * f32_mb, "streamed peak {stream:.1} MB is not under 30% of {f32_mb:.1} MB");

    // An audit of prompts a memory limit refuses whole (and says to stream) runs streamed:
    // one layer at a time, beside each prompt's hidden state.
    let prompts = t.join("prompts.txt");
    std::fs::write(&prompts, format!("{tokens}\n1,2,3\n")).unwrap();
    let ckpt = glimpse::checkpoint::Checkpoint::open(&model).unwrap();
    let cpu = glimpse::device::Target::from(glimpse::device::Backend::Cpu);
    let all = 0..=ckpt.config.num_hidden_layers - 1;
    let whole = glimpse::memory::estimate_on(cpu, &ckpt, (1, 12), &all, glimpse::memory::Recording::Nothing);
    let limit = (whole.total() - 1).to_string();
    let audit = ["audit", "--model", m, "--prompts", prompts.to_str().unwrap(), "--max-memory", &limit, "--json"];
    let (code, text) = code_and_text(&audit);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("shorter prompts, or --stream"), "{text}");
    let (code, text) = code_and_text(&[&audit[..], &["--stream"]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("\"complete\": true"), "{text}");

    // One window, started from the full run's layer 2 output, reproduces layers 3..5.
    let (code, out) =
        code_and_text(&["run", "--model", m, "--stream", "--from-dump", &full, "--layers", "3..5", "--dump", &window]);
    assert_eq!(code, 0, "{out}");
    let (code, text) = code_and_text(&["diff", "--atol", "0", "--rtol", "0", &window, &full]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("layers.5.output") && !text.contains("\nlayers.2.output") && !text.contains("\nlogits"),
        "{text}"
    );
    // The window's dump names the tokens it ran, so diff can tell other runs' dumps from it.
    assert!(text.contains("\ninput_ids "), "{text}");
    // And verify can check that window against a reference directly.
    let (code, text) = code_and_text(&["verify", "--model", m, "--golden", &full, "--layers", "3..5", "--stream"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("layers.3.input_norm") && !text.contains("layers.2.output "), "{text}");
}

/// Bytes the checkpoint's tensors take as f32 (what a resident run holds).
fn checkpoint_f32_bytes(dir: &Path) -> f64 {
    let ckpt = glimpse::checkpoint::Checkpoint::open(dir).unwrap();
    let params: usize = ckpt.names().map(|n| ckpt.shape(n).unwrap().iter().product::<usize>()).sum();
    params as f64 * 4.0
}

/// The head is multiplied alike streamed or resident, whatever the rows: a tied bf16 head
/// (`golden/bf16-fused`) with a prefill's 12 tokens (its f32 copy) and a decode-sized 5 (its bf16
/// streaming kernel; a streamed band multiplied as f32 rows once differed in the last bits).
#[test]
fn a_streamed_head_gives_the_resident_logits_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for tokens in ["5,17,30,2,99,64,128,7,42,51,100,3", "1,2,3,4,5"] {
        let p = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
        let (resident, streamed) = (p("resident.safetensors"), p("streamed.safetensors"));
        for (dump, stream) in [(&resident, false), (&streamed, true)] {
            let mut args = vec!["run", "--model", "golden/bf16-fused", "--tokens", tokens, "--dump", dump];
            args.extend(stream.then_some("--stream"));
            let (code, out) = code_and_text(&args);
            assert_eq!(code, 0, "{out}");
        }
        let (code, text) = code_and_text(&["diff", "--atol", "0", "--rtol", "0", &streamed, &resident]);
        assert_eq!(code, 0, "{tokens}: {text}");
        assert!(text.contains("no divergence"), "{tokens}: {text}");
    }
}

/// A window run whose dump outgrows the disk (here the file size limit, `ulimit -f`, with its
/// signal ignored so writes fail as on a full disk) fails with one line and leaves no partial
/// file: it kept `w.st.glimpse-PID.partial`, filling the disk it had run out of.
#[test]
fn a_window_whose_dump_cannot_be_written_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = (0..3000).map(|i| (i % 199 + 1).to_string()).collect::<Vec<_>>().join(",");
    let dump = tmp.path().join("w.st");
    let glimpse = env!("CARGO_BIN_EXE_glimpse");
    let script = format!(
        "trap '' XFSZ; ulimit -f 4000; exec {glimpse} run --model golden/flat --tokens {tokens} --layers 0..3 --dump {}",
        dump.display()
    );
    let out = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("File too large") && err.lines().count() == 1, "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A sweep records what a prefill of each prompt records, layer by layer, on every golden case:
/// over streamed and resident weights on the CPU, and on the device path's host ops streamed.
#[test]
fn a_sweep_records_each_prompt_as_its_prefill() {
    use glimpse::model::Weights;
    for case in common::GOLDEN_CASES {
        let ckpt = glimpse::checkpoint::Checkpoint::open(&common::golden(case)).unwrap();
        common::assert_a_sweep_records_as_prefills(case, &Weights::Streamed(&ckpt));
        let model = glimpse::model::Model::load(&ckpt).unwrap();
        common::assert_a_sweep_records_as_prefills(case, &Weights::Resident(&model));
        let ops = glimpse::device::cpu::CpuOps;
        let device = glimpse::device::forward::DeviceModel::streamed(&ops, &ckpt);
        common::assert_a_sweep_records_as_prefills(case, &device);
    }
}

/// `audit --stream` counts what the audit without it counts, printed alike (the JSON, the table
/// with co-activation, a `--layers` window, `--compare-prompts`), on the CPU and on the device
/// path's host ops; its `--routes` holds the same lines, a layer at a time. The cases: a shared
/// indexer layer (each prompt's selection kept between layers), FP8 weights, the flat router.
#[test]
fn a_streamed_audit_counts_what_the_resident_one_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    let other = tmp.path().join("other.txt");
    let ids = |from: u32, n: u32| (from..from + n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    std::fs::write(&prompts, format!("{}\n# a comment\n{}\n{};{}\n", ids(1, 20), ids(5, 7), ids(2, 9), ids(11, 9)))
        .unwrap();
    std::fs::write(&other, format!("{}\n{}\n", ids(30, 14), ids(3, 3))).unwrap();
    let (p, o) = (prompts.to_str().unwrap(), other.to_str().unwrap());
    for (case, device) in [("grouped-shared-yarn", "cpu"), ("fp8-sharded", "cpu-ops"), ("flat", "cpu")] {
        let m = common::golden(case);
        let base = ["audit", "--model", m.to_str().unwrap(), "--prompts", p, "--device", device];
        let runs: [&[&str]; 3] = [&["--json"], &["--pairs", "--layers", "1..2"], &["--compare-prompts", o, "--json"]];
        for extra in runs {
            let out = |stream: &[&str], routes: &str| {
                let routes = tmp.path().join(routes);
                let args = [&base[..], extra, stream, &["--routes", routes.to_str().unwrap()]].concat();
                let (code, text) = code_and_text(&args);
                assert_eq!(code, 0, "{args:?}: {text}");
                (text.replace(&*routes.to_string_lossy(), "ROUTES"), std::fs::read_to_string(&routes).unwrap())
            };
            let ((whole, whole_routes), (streamed, streamed_routes)) = (out(&[], "w.csv"), out(&["--stream"], "s.csv"));
            assert_eq!(whole, streamed, "{case} {device} {extra:?}");
            let sorted = |csv: &str| {
                let mut lines: Vec<&str> = csv.lines().collect();
                lines.sort_unstable();
                lines.join("\n")
            };
            assert!(whole_routes.lines().count() > 40, "{whole_routes}");
            assert_eq!(sorted(&whole_routes), sorted(&streamed_routes), "{case} {device} {extra:?}");
            // A layer at a time: the layer column never goes back.
            let layers: Vec<usize> =
                streamed_routes.lines().skip(1).map(|l| l.split(',').nth(4).unwrap().parse().unwrap()).collect();
            assert!(layers.windows(2).all(|w| w[0] <= w[1]), "{case}: {layers:?}");
        }
    }
}

/// `audit --stream` runs prompts live only, not with the MTP head (which needs the whole model),
/// and a memory limit refuses it with what to do.
#[test]
fn a_streamed_audit_is_refused_where_it_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "1,2,3,4,5,6\n7,8,9\n").unwrap();
    let p = prompts.to_str().unwrap();
    let (code, text) = code_and_text(&["audit", "--dump", "golden/flat/reference.safetensors", "--stream"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--stream is for prompts run live: give --prompts FILE"), "{text}");
    let (code, text) = code_and_text(&["audit", "--model", "golden/mtp", "--prompts", p, "--stream", "--mtp"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("'--stream' cannot be used with '--mtp'"), "{text}");
    let args = ["audit", "--model", "golden/fp8-sharded", "--prompts", p, "--max-memory", "1000", "--stream"];
    let (code, text) = code_and_text(&args);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("fewer or shorter prompts") && text.lines().count() == 1, "{text}");
}

/// Ctrl-C (here SIGTERM, which does the same) during `audit --stream` stops the sweep after the
/// layer in progress, once a counted layer has run: every prompt is counted up to that layer, and
/// the JSON says where it stopped (`stopped_after_layer`, `complete` false, the window cut
/// there), on both sides of `--compare-prompts`; the table's title says it too. A window that
/// starts at dense layers runs on to its first MoE layer.
#[test]
fn ctrl_c_stops_a_streamed_audit_after_the_layer_in_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.txt");
    // Enough prompts that a layer takes a while (the signal comes within milliseconds of the
    // sweep's start, so well before layer 2, the first counted, is done).
    let line = (1..=16).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    std::fs::write(&prompts, format!("{line}\n").repeat(5000)).unwrap();
    let flat = common::golden("flat");
    let base = ["audit", "--model", flat.to_str().unwrap(), "--prompts", prompts.to_str().unwrap(), "--stream"];
    let stopped = |extra: &[&str]| {
        let child = common::spawn_catching_sigint(&[&base[..], &["--layers", "2..4"], extra].concat());
        // SAFETY: signalling a child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        let (stdout, err) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{err}");
        stdout
    };
    let v: serde_json::Value =
        serde_json::from_str(&stopped(&["--json", "--compare-prompts", prompts.to_str().unwrap()])).unwrap();
    assert_eq!((v["stopped_after_layer"].as_u64(), v["complete"].as_bool()), (Some(2), Some(false)), "{v}");
    assert_eq!((v["prompts"].as_u64(), v["prompts_total"].as_u64()), (Some(5000), Some(5000)));
    assert_eq!(v["layer_window"], serde_json::json!([2, 2]));
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{v}");
    assert_eq!((layers[0]["layer"].as_u64(), layers[0]["tokens"].as_u64()), (Some(2), Some(16 * 5000)));
    assert_eq!(v["compare_complete"], false, "{v}");
    // The other prompts were counted over the same layer, and compared.
    let layer_2 = serde_json::json!([2]);
    let compared: Vec<_> = v["compare_counts"].as_array().unwrap().iter().map(|l| l["layer"].clone()).collect();
    assert_eq!(serde_json::Value::from(compared), layer_2, "{v}");
    assert!(!v["compare"].is_null(), "{v}");
    let table = stopped(&[]);
    assert!(table.contains("stopped the layers after layer 2") && table.contains("layers 2..2"), "{table}");
    // With no --layers the window starts at the dense layers 0 and 1, which count nothing: the
    // sweep runs on to layer 2 before it stops (it stopped after layer 0, an audit of nothing).
    let child = common::spawn_catching_sigint(&[&base[..], &["--json"]].concat());
    // SAFETY: signalling a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["stopped_after_layer"].as_u64(), v["layer_window"].clone()), (Some(2), serde_json::json!([0, 2])));
    assert_eq!(v["layers"].as_array().map(Vec::len), Some(1), "{v}");

    // Audited dumps beside other prompts swept: a stop cuts the dumps' layers alike.
    let dump = flat.join("reference.safetensors");
    let args = ["audit", "--model", flat.to_str().unwrap(), "--dump", dump.to_str().unwrap(), "--stream"];
    let child = common::spawn_catching_sigint(
        &[&args[..], &["--compare-prompts", prompts.to_str().unwrap(), "--layers", "2..4", "--json"]].concat(),
    );
    // SAFETY: signalling a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["stopped_after_layer"].as_u64(), v["layer_window"].clone()), (Some(2), serde_json::json!([2, 2])));
    let audited: Vec<_> = v["layers"].as_array().unwrap().iter().map(|l| l["layer"].clone()).collect();
    assert_eq!(serde_json::Value::from(audited), layer_2, "{v}");
}
