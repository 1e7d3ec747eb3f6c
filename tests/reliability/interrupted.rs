//! Interrupted runs: a killed run leaves the previous dump intact and resumes from its last
//! layer; Ctrl-C stops `generate` and `audit` keeping what they made; a second writer of a dump
//! is refused while the first lives; the next run removes what a killed one left.

use super::*;

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
    // A whole run from a dump's state (`--from-dump`, no --layers) checkpoints too, and its
    // --resume is taken (the CLI refused it, so the run's own advice could not be followed).
    let from = t.join("from.safetensors");
    let fargs = ["run", "--model", &s(&model), "--stream", "--from-dump", &s(&dump), "--dump", &s(&from)];
    signal_when_present(&fargs, &t.join("from.safetensors.resume.json"), libc::SIGKILL);
    let o = glimpse(&[&fargs[..], &["--resume"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("resuming"), "{err}");
    let o = glimpse(&["diff", "--atol", "0", "--rtol", "0", &s(&from), &s(&dump)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

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
    // (Naming what to delete to start over: the partial file, the state and the hidden state.)
    let [json_path, hidden] = ["json", "hidden"].map(|e| t.join(format!("stopped.safetensors.resume.{e}")));
    let (json, hidden) = (json_path.display(), hidden.display());
    assert_error(
        &glimpse(&sargs),
        &format!(
            "--resume finishes it (same tokens, config and --record); to start over, delete it, {json} and {hidden}"
        ),
    );
    assert_eq!(std::fs::read(&partial).unwrap(), kept);
    // A kill between the checkpoint's two renames leaves the JSON a layer behind the hidden
    // state; the state the hidden state's file carries wins. Here the JSON names another layer.
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
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("gen.safetensors");
    let (mut child, lines) = long_generate(|cmd| {
        cmd.args(["--dump", &s(&dump)]);
    });
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

/// A `generate` started with SIGINT ignored (a script's background job: `glimpse ... &` in a
/// shell without job control) keeps ignoring it, and still stops for SIGTERM.
#[test]
fn an_inherited_ignored_ctrl_c_stays_ignored() {
    use std::os::unix::process::CommandExt;
    let (mut child, mut lines) = long_generate(|cmd| {
        // SAFETY: between fork and exec the closure only calls signal(2), which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                Ok(())
            })
        };
    });
    // SAFETY: signalling a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    // (Lines read here may have been written before the signal arrived: what stopped it, below,
    // is the evidence that Ctrl-C did not.)
    assert!(lines.any(|l| l.unwrap().starts_with("step 40:")), "it goes on generating");
    assert!(child.try_wait().unwrap().is_none(), "still generating after Ctrl-C");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _rest: Vec<String> = lines.map(Result::unwrap).collect();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped by SIGTERM after") && !err.contains("Ctrl-C"), "{err}");
}

/// A `generate` of 5000 steps of golden/flat that no eos stops, taking signals, `setup` adding
/// to its command, once it has printed step 3; its remaining stdout lines. The step lines outgrow
/// the pipe, so the child waits for the test to read them and cannot finish before a signal.
fn long_generate(
    setup: impl FnOnce(&mut Command),
) -> (std::process::Child, std::io::Lines<std::io::BufReader<std::process::ChildStdout>>) {
    use std::io::BufRead;
    let mut cmd = common::glimpse_taking_signals();
    cmd.args(["generate", "--model", &s(&golden("flat")), "--tokens", "1,2,3", "--max-new-tokens", "5000"])
        .arg("--ignore-eos")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    setup(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().starts_with("step 3:")), "it generates");
    (child, lines)
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
    let mut child =
        common::glimpse_taking_signals().args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
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
    // Far more than run in the second before the signal (about 0.5 ms a prompt here), after a
    // comment and a blank line, which are no prompts.
    let line = (1..=16).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    std::fs::write(&prompts, format!("# 16 tokens a prompt\n\n{}", format!("{line}\n").repeat(200_000))).unwrap();
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
        assert_eq!(v["stopped_at_line"].as_u64(), Some(run + 2), "the file's line of the last prompt run");
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
/// live process's is kept, and so is a user's file that merely ends in a number and `.tmp`.
#[test]
fn the_next_run_removes_what_a_killed_one_left() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run.safetensors");
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let names = [format!("run.safetensors.glimpse-{dead}.partial"), format!("run.safetensors.glimpse-{dead}.tmp")];
    let kept = [
        "run.safetensors.glimpse-1.partial".to_string(),
        "other.glimpse-7.partial".into(),
        format!("run.safetensors.{dead}.tmp"),
    ];
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
