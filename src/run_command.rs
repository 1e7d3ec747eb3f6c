//! The `run` command: one prefill on the CPU (whole, a `--layers` window from a dump's hidden
//! state, streamed, resumed after a kill, with the MTP head) or on a device backend, its hook
//! points to `--dump`, and each row's greedy next token.

use std::path::Path;
use std::process::ExitCode;

use glimpse::checkpoint::Checkpoint;
use glimpse::device::{Backend, Target};
use glimpse::dump::{self, Dump, DumpWriter};
use glimpse::error::{Context, Error, Result};
use glimpse::hooks::{HookPoint, NoObserver, NonFiniteWatch, Observer, Selector, Tee};
use glimpse::memory;
use glimpse::model::stream::{self, LogitRows, Start};
use glimpse::model::Tokens;

use crate::cli::RunArgs;
use crate::{load_weights, recording, scores_left_out, warn, warn_past_positions, Budget};

/// `run`: see the module's description.
pub(crate) fn run(args: RunArgs, max_memory: Option<u64>) -> Result<ExitCode> {
    let RunArgs {
        model,
        tokens,
        prompt,
        tokens_from,
        dump: out,
        record,
        layers,
        from_dump,
        stream,
        resume,
        mtp,
        device,
        gpu,
    } = args;
    let cpu_only = [("--layers", layers.is_some()), ("--from-dump", from_dump.is_some()), ("--resume", resume)];
    let target = gpu.target(device, &cpu_only)?;
    let ckpt = Checkpoint::open(&model)?;
    // Checked before any weight loads: a typo in --record is found at once.
    let selector = recording(record.as_deref(), &ckpt.config)?;
    let mut final_norm = glimpse::hooks::Recorder::new(Selector::new("final_norm", None));
    let from = from_dump.as_deref().map(Dump::open).transpose()?;
    // Another model's hidden state runs through this one's layers without an error: said.
    warn(from.as_ref().and_then(|d| d.other_config(&ckpt.config_bytes, &model)).map(|w| format!("--from-dump: {w}")));
    let tokens = match (tokens, prompt, tokens_from, &from) {
        (Some(t), _, _, _) => Tokens::parse(&t).context(|| "--tokens".into())?,
        (_, Some(p), _, _) => glimpse::tokenizer::encode(&model, &p)?,
        (_, _, Some(d), _) => Dump::open(&d)?.tokens_for(ckpt.config.vocab_size)?,
        (_, _, _, Some(d)) => d.tokens_for(ckpt.config.vocab_size)?,
        _ => return Err(Error::Usage("give --tokens, --prompt, --tokens-from or --from-dump".into())),
    };
    let mtp_head = match mtp {
        true => {
            glimpse::model::mtp::check_positions(tokens.seq)?;
            Some(glimpse::model::mtp::Mtp::load(&ckpt)?)
        }
        false => None,
    };
    // The hidden state it starts from is its own tokens': a dump naming others would lie.
    if let Some(d) = from.as_ref().filter(|d| d.contains("input_ids")) {
        if d.tokens()? != tokens {
            return Err(Error::Usage(format!(
                "--from-dump {} ran other tokens than the ones given: its hidden state is theirs",
                d.path.display()
            )));
        }
    }
    warn_past_positions(&ckpt.config, tokens.seq);
    if device != Backend::Cpu {
        let run = (&tokens, stream, mtp_head.as_ref());
        return run_on_device(&ckpt, &model, run, out.as_deref(), selector, target, max_memory);
    }
    if let Some(window) = &layers {
        stream::check_window(&ckpt.config, window)?;
    }
    let first = layers.as_ref().map_or(0, |r| *r.start());
    let start = match &from {
        Some(d) => Some(Start::from_dump(d, first, [tokens.batch, tokens.seq, ckpt.config.hidden_size])?),
        None => None,
    };
    // Before the weights load (minutes, at GLM-5's size): a whole run would not start over an
    // interrupted one's layers.
    if let (Some(path), false, None, None) = (&out, resume, &layers, &mtp_head) {
        DumpWriter::refuse_overwrite(path)?;
    }
    let mut resident = None;
    let budget = Budget {
        tokens: &tokens,
        fixed: false,
        window: layers.as_ref(),
        mtp: mtp_head.is_some(),
        stream,
        recording: memory::Recording::to(out.as_deref(), &selector, ckpt.config.num_hidden_layers, mtp_head.is_some()),
        passes: memory::Passes::One,
        max: max_memory,
    };
    let weights = load_weights(&ckpt, &mut resident, &budget)?;
    let expected = glimpse::hooks::max_points(ckpt.config.num_hidden_layers);
    let mut watch = NonFiniteWatch::default();
    let window = layers.clone();
    let logits = match &out {
        Some(path) => {
            let selector = selector.clone();
            let sha = dump::sha256_hex(&ckpt.config_bytes);
            let resumed = if resume { DumpWriter::resume(path, selector.clone(), &tokens, &sha)? } else { None };
            if resume && resumed.is_none() {
                eprintln!("glimpse: nothing to resume for {}: starting from the first layer", path.display());
            }
            let n = ckpt.config.num_hidden_layers;
            // A window starts from a dump's hidden state, and its dump names the tokens
            // it ran all the same (a resumed run's file holds them already).
            let window_from_dump = from.is_some() && resumed.is_none();
            let (mut writer, layers, start) = match resumed {
                Some((w, start, next)) => {
                    eprintln!("glimpse: resuming {} after layer {}", path.display(), next - 1);
                    (w, Some(next..=n - 1), Some(start))
                }
                // Whole runs checkpoint after every layer; windows are short and restartable,
                // and an MTP run cannot be resumed (its head needs every position's state).
                None if layers.is_none() && mtp_head.is_none() => {
                    (DumpWriter::create_resumable(path, selector, expected, &tokens, &sha)?, layers, start)
                }
                None => (DumpWriter::create(path, selector, expected)?, layers, start),
            };
            let stopping = writer.resumable().then(glimpse::interrupt::stop_at_checkpoints);
            let logits = {
                let mut side = Tee(&mut watch, &mut final_norm);
                let mut obs = Tee(&mut writer, &mut side);
                if window_from_dump {
                    stream::input_ids(&tokens, ckpt.config.vocab_size, &mut obs)?;
                }
                match (layers, start) {
                    // Killed after the last layer: only the head is left.
                    (Some(w), Some(s)) if *w.start() == n => {
                        Some(stream::head_normed(weights, &s.hidden, LogitRows::Last, &mut obs)?.1)
                    }
                    (layers, start) => stream::run(weights, &tokens, (layers, start), LogitRows::Last, &mut obs)?,
                }
            };
            // A Ctrl-C after the last checkpoint still stops here (the head is left to
            // resume); from now on one ends the run at once, as by default.
            if let Some(stopping) = stopping {
                drop(stopping);
                if glimpse::interrupt::requested() {
                    return Err(writer.interrupted(n - 1));
                }
            }
            if let Some(logits) = &logits {
                watch.check_logits(HookPoint::Logits, logits, tokens.seq)?;
            }
            if let Some(head) = &mtp_head {
                run_mtp(&weights, head, &final_norm, &tokens, (&mut writer, &mut watch))?;
            }
            let meta = dump::metadata(
                &format!("glimpse {} / candle, float32, cpu", env!("CARGO_PKG_VERSION")),
                Some(&ckpt.config_bytes),
                Some(&model.display().to_string()),
            );
            let n = writer.finish(&meta)?;
            println!("wrote {n} tensors to {}", path.display());
            logits
        }
        None => {
            let mut obs = Tee(&mut watch, &mut final_norm);
            let logits = stream::run(weights, &tokens, (layers, start), LogitRows::Last, &mut obs)?;
            if let Some(logits) = &logits {
                watch.check_logits(HookPoint::Logits, logits, tokens.seq)?;
            }
            if let Some(head) = &mtp_head {
                run_mtp(&weights, head, &final_norm, &tokens, (&mut NoObserver, &mut watch))?;
            }
            logits
        }
    };
    if let Some(nf) = &watch.first {
        eprintln!("glimpse: warning: first NaN/Inf of the run: {nf}");
    }
    match (logits, &window, &out) {
        (Some(logits), _, _) => {
            // (The last position's logits only, where the dump does not record them all.)
            let s = tokens.seq;
            for (bi, next) in glimpse::model::decode::last_argmax(&logits)?.iter().enumerate() {
                println!("row {bi}: {s} tokens, next token (greedy) {next}");
            }
        }
        // A window short of the head, recording nothing: say what ran, and that nothing stays.
        (None, Some(window), None) => {
            println!("layers {}..{} ran; nothing kept (give --dump FILE to record them)", window.start(), window.end())
        }
        (None, _, _) => {}
    }
    if let Some(rss) = glimpse::bench::peak_rss() {
        println!("peak RSS {:.1} MB", rss as f64 / 1e6);
    }
    if let Some(note) = out.as_ref().and_then(|_| scores_left_out(record.as_deref(), &ckpt.config)) {
        eprintln!("{note}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `run --device cpu-ops|cuda [--stream]`: the prefill on that backend (with `--stream`, one
/// layer's weights on the device at a time), its hook points to `--dump`.
fn run_on_device(
    ckpt: &Checkpoint,
    dir: &Path,
    (tokens, stream, mtp): (&Tokens, bool, Option<&glimpse::model::mtp::Mtp>),
    out: Option<&Path>,
    selector: Selector,
    device: Target,
    max: Option<u64>,
) -> Result<ExitCode> {
    let n = ckpt.config.num_hidden_layers;
    let (recording, dims) = (memory::Recording::to(out, &selector, n, mtp.is_some()), (tokens.batch, tokens.seq));
    let mut resident = None;
    let residency = if stream { memory::Residency::Streamed } else { memory::Residency::Whole };
    let held = (device, residency, mtp.is_some());
    let weights = memory::load_for_run(ckpt, &mut resident, (dims, recording), held, max)?;
    let mut watch = NonFiniteWatch::default();
    let mut final_norm = glimpse::hooks::Recorder::new(Selector::new("final_norm", None));
    // The prefill, its logits checked (the last position's, which no hook point reports), then
    // with --mtp the head (where the prefill ran) from its final norm. (The final norm is
    // copied back only for the head.)
    let mut run = |p: &dyn glimpse::device::Prefill, writer: &mut dyn Observer| {
        let logits = match mtp {
            Some(_) => p.prefill(tokens, &mut Tee(writer, &mut Tee(&mut watch, &mut final_norm)))?,
            None => p.prefill(tokens, &mut Tee(writer, &mut watch))?,
        };
        watch.check_logits(HookPoint::Logits, &logits, tokens.seq)?;
        if let Some(head) = mtp {
            run_mtp(p, head, &final_norm, tokens, (writer, &mut watch))?;
        }
        Ok(logits)
    };
    let logits = match out {
        Some(path) => {
            let mut writer = DumpWriter::create(path, selector, glimpse::hooks::max_points(n))?;
            let logits = glimpse::device::with_prefill(device, weights, |p| run(p, &mut writer))?;
            let source =
                format!("glimpse {} / device forward pass on {}", env!("CARGO_PKG_VERSION"), device.describe());
            let meta = dump::metadata(&source, Some(&ckpt.config_bytes), Some(&dir.display().to_string()));
            let n = writer.finish(&meta)?;
            println!("wrote {n} tensors to {}", path.display());
            logits
        }
        None => glimpse::device::with_prefill(device, weights, |p| run(p, &mut NoObserver))?,
    };
    if let Some(nf) = &watch.first {
        eprintln!("glimpse: warning: first NaN/Inf of the run: {nf}");
    }
    for (bi, row) in glimpse::model::decode::last_argmax(&logits)?.iter().enumerate() {
        println!("row {bi}: {} tokens on {}, next token (greedy) {row}", tokens.seq, device.describe());
    }
    Ok(ExitCode::SUCCESS)
}

/// `run --mtp`: the MTP head over the run's tokens, where `p` ran them, from the final-norm
/// hidden state the run recorded; prints each row's draft of the next token (its last position,
/// S - 2, takes the hidden state there and the prompt's last token: it drafts the token the main
/// model's last logits predict, a check of the head against the model).
fn run_mtp(
    p: &dyn glimpse::device::Prefill,
    head: &glimpse::model::mtp::Mtp,
    final_norm: &glimpse::hooks::Recorder,
    tokens: &Tokens,
    (writer, watch): (&mut dyn Observer, &mut NonFiniteWatch),
) -> Result<()> {
    let h = final_norm
        .get(HookPoint::FinalNorm)
        .ok_or_else(|| Error::Usage("--mtp: the run produced no final_norm".into()))?;
    let h = h.narrow(1, 0, tokens.seq.saturating_sub(1))?;
    let drafts = p.mtp(head, &h, tokens, &mut Tee(writer, watch))?;
    // (The last position's only, where no dump records them all.)
    watch.check_logits(HookPoint::MtpLogits, &drafts, tokens.seq.saturating_sub(1))?;
    let drafts = glimpse::model::decode::last_argmax(&drafts)?;
    for (row, d) in drafts.iter().enumerate() {
        println!("row {row}: mtp draft of the next token {d}");
    }
    Ok(())
}
