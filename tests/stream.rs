//! Scale past RAM: `--stream` gives the same tensors as a resident run with a fraction of its
//! memory, and `--layers A..B --from-dump` reproduces one window of the full run; a window whose
//! dump the disk cannot hold leaves no partial file behind.

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
/// file: it kept `w.st.PID.partial`, filling the disk it had run out of.
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
