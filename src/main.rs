//! The `glimpse` command line. Each subcommand is a thin layer over the library (`run`'s, the
//! thickest, in `run_command.rs`); errors print as one line (`glimpse: error: ...`) and exit with
//! code 2, comparisons exit 1 on a mismatch.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::Tolerance;
use glimpse::device::{Backend, Target};
use glimpse::dump::Dump;
use glimpse::error::{Context, Error, Result};
use glimpse::hooks::Selector;
use glimpse::model::stream::Weights;
use glimpse::model::{Model, Tokens};
use glimpse::synth::{self, SynthOptions};
use glimpse::{diff, inspect, memory, verify};

mod audit_command;
mod cli;
mod run_command;
use cli::{Cli, Command, MAX_THREADS};

/// The bundled default case: GLM-5's own layer pattern at toy size, with its transformers reference.
const DEFAULT_CASE: &str = "golden/flat";

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, which turns `glimpse ... | head` into a panic on the next print;
    // restore the default so the process ends quietly, as other Unix tools do.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to its default, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    glimpse::interrupt::report_bus_errors();
    memory::keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("glimpse: error: no command given, e.g. glimpse verify (see glimpse --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            // One line, like every other error: clap's first line, then where to look.
            let text = e.render().to_string();
            let first: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            let first = first.join(" ");
            // --precision and --ordinal were global flags once (`glimpse --precision bf16 verify`).
            let moved = e.kind() == clap::error::ErrorKind::UnknownArgument
                && ["'--precision'", "'--ordinal'"].iter().any(|f| first.contains(f));
            // clap's own tip, where it has one (a similar argument's name), is kept.
            let tip = text.lines().map(str::trim).find_map(|l| l.strip_prefix("tip: "));
            let hint = match (moved, tip) {
                (true, _) => "--precision and --ordinal go after a command that takes --device, e.g. glimpse verify --device cuda --precision bf16".to_string(),
                (false, Some(tip)) => format!("{tip}; see glimpse --help"),
                (false, None) => "see glimpse --help".to_string(),
            };
            eprintln!("glimpse: error: {} ({hint})", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    // Standard output that cannot be written (`> /dev/full`, a closed descriptor) makes `print!`
    // panic; that one panic is a one-line error here, after unwinding (which removes unfinished
    // files as any error does), and says nothing through the panic hook.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if stdout_failure(info.payload()).is_none() {
            hook(info)
        }
    }));
    let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(result) => result,
        Err(payload) => match stdout_failure(payload.as_ref()) {
            // A reader that stopped reading (`| head`, where SIGPIPE is blocked): quietly, with
            // the status SIGPIPE would have given.
            Some(msg) if msg.contains("Broken pipe") => return ExitCode::from(141),
            Some(msg) => Err(Error::Usage(msg)),
            None => std::panic::resume_unwind(payload),
        },
    };
    match result {
        Ok(code) => code,
        // The signal's exit status, as a shell reports a process it ended (130 for Ctrl-C).
        Err(Error::Interrupted(msg)) => {
            eprintln!("glimpse: {msg}");
            ExitCode::from(glimpse::interrupt::exit_status())
        }
        Err(e) => {
            eprintln!("glimpse: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The message of the standard library's panic on a failed `print!` to standard output, reworded.
fn stdout_failure(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    let text = payload.downcast_ref::<String>()?;
    let why = text.strip_prefix("failed printing to stdout: ")?;
    Some(format!("cannot write to standard output: {why}"))
}

/// 0 where everything matched, 1 where a comparison found a difference.
fn exit(matched: bool) -> ExitCode {
    if matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The bundled case, found next to the binary's sources or under the current directory.
fn default_case() -> PathBuf {
    // The checkout this binary was built from first: another project's `golden/flat` in the
    // working directory is not the bundled case. A binary carried elsewhere (the GPU machine)
    // finds the case in the copy of the repository it runs in.
    // (Named as the README shows it when the working directory is that checkout.)
    let (built, here) = (Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CASE), PathBuf::from(DEFAULT_CASE));
    let same =
        |a: &Path, b: &Path| std::fs::canonicalize(a).ok().is_some_and(|a| std::fs::canonicalize(b).ok() == Some(a));
    match built.is_dir() {
        true if same(&built, &here) => here,
        true => built,
        false => here,
    }
}

/// The hook points `--record` names (without it, `*`: every one but the S x S scores); patterns
/// that name none of this model's are refused, as the dump would silently hold nothing of them.
fn recording(patterns: Option<&str>, config: &glimpse::config::Config) -> Result<Selector> {
    let selector = Selector::new(patterns.unwrap_or("*"), None);
    if selector.patterns.is_empty() {
        return Err(Error::Usage("--record names no hook point (give e.g. 'layers.*.moe.*,logits')".into()));
    }
    let unmatched = selector.unmatched(config.num_hidden_layers);
    if !unmatched.is_empty() {
        return Err(Error::Usage(format!(
            "--record {}: names no hook point of this model (names as in `glimpse diff` output, e.g. layers.3.moe.topk_ids)",
            unmatched.join(",")
        )));
    }
    Ok(selector)
}

/// The note for a `--record` given that left out the S x S score matrices
/// (`Selector::scores_left_out`; the default says nothing): said after the dump is written, so
/// an error stays one line.
fn scores_left_out(patterns: Option<&str>, config: &glimpse::config::Config) -> Option<String> {
    let selector = Selector::new(patterns?, None);
    selector.scores_left_out(config.num_hidden_layers).map(|p| {
        format!("glimpse: note: --record {p} left out the S x S `dsa.scores`, which only a pattern naming them records (e.g. '{p},*.dsa.scores')")
    })
}

/// The comparison's tolerance: the flags', else the default of the products' precision (the
/// spec's 1e-4 in f32, 2e-2 in bf16).
fn tolerance(target: Target, atol: Option<f64>, rtol: Option<f64>) -> Tolerance {
    let default = target.precision.tolerance();
    Tolerance { atol: atol.unwrap_or(default.atol), rtol: rtol.unwrap_or(default.rtol) }
}

/// Prints a warning, when there is one, as every warning of the command line reads.
fn warn(message: Option<String>) {
    if let Some(m) = message {
        eprintln!("glimpse: warning: {m}");
    }
}

/// Positions past the config's `max_position_embeddings` still run (RoPE extends, as in
/// transformers), but the model was not trained there: say so once.
fn warn_past_positions(config: &glimpse::config::Config, positions: usize) {
    warn(config.past_positions(positions));
}

fn run(cli: Cli) -> Result<ExitCode> {
    let max_memory = cli.max_memory;
    if cli.command.runs_model() {
        glimpse::model::absorbed::absorbed_override().map_err(Error::Usage)?;
    }
    if let Some(n) = cli.threads {
        // Each thread is started up front, and a pool of 100,000 took minutes to start a
        // two-token run: more than MAX_THREADS is refused as a slip.
        if n == 0 || n > MAX_THREADS {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            return Err(Error::Usage(format!(
                "--threads {n} is out of range: give 1 to {MAX_THREADS} (this machine has {cores} cores)"
            )));
        }
        // candle's CPU kernels size their thread pools from this, read on first use.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    } else if std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse::<usize>().ok()).is_none_or(|n| n == 0) {
        // Without it candle counts the physical cores at every product, reading /proc/cpuinfo
        // (56,015 opens for `audit --prompts` of 300 prompts of the bundled case, 108 with it).
        // Counted once here, with rayon's own pool started first on its default (every logical
        // core), as before.
        let _ = rayon::ThreadPoolBuilder::new().build_global();
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    for (flag, path) in cli.command.outputs() {
        glimpse::output::check(flag, path)?;
    }
    glimpse::output::check_distinct(&cli.command.outputs(), &cli.command.inputs())?;
    for (flag, path) in cli.command.outputs() {
        glimpse::output::check_replaceable(flag, path)?;
    }
    match cli.command {
        Command::Verify {
            model,
            golden,
            atol,
            rtol,
            tols,
            near_tie,
            json,
            isolate,
            force_routing,
            force_selection,
            layers,
            stream,
            decode,
            chunk,
            device,
            gpu,
        } => {
            glimpse::progress::enable();
            let model_dir = model.unwrap_or_else(default_case);
            let target = gpu.target(device, &[("--layers", layers.is_some()), ("--decode", decode)])?;
            let golden = golden.unwrap_or_else(|| target.precision.reference_in(&model_dir));
            let tol = tolerance(target, atol, rtol);
            let per_name = tols.iter().map(|t| diff::parse_tol(t)).collect::<Result<Vec<_>>>()?;
            let near_tie = near_tie.unwrap_or(tol.near_tie());
            let ckpt = Checkpoint::open(&model_dir)?;
            let reference = Dump::open(&golden)?;
            // Warned once the comparison stands, as diff does (an error alone is one line).
            let config_warning = reference.other_config(&ckpt.config_bytes, &model_dir);
            let code = (|| -> Result<ExitCode> {
                let tokens = reference.tokens_for(ckpt.config.vocab_size)?;
                verify::Replay { routing: force_routing, selection: force_selection }
                    .check(&reference, layers.as_ref())?;
                if decode {
                    println!(
                        "verify --decode {}: glimpse's decode through the latent cache against its own prefill, on \
                         the tokens of {} (whose tensors are not compared: `diff` compares a port's decode dump \
                         with a reference)",
                        model_dir.display(),
                        golden.display()
                    );
                    return verify_decode(&ckpt, &tokens, chunk as usize, (tol, &per_name), max_memory);
                }
                if device != Backend::Cpu {
                    // The MTP head the reference checks runs on the device too, from the device's
                    // final norm: its layer is held beside the model's, and loaded first, so a
                    // checkpoint without it fails before the run.
                    let mtp = verify::has_mtp(&reference);
                    if stream && mtp {
                        return Err(Error::Usage(format!(
                            "the reference checks the MTP head, which --stream does not run (it needs the resident \
                             model): drop --stream, or drop --device and give --stream --layers 0..{}",
                            ckpt.config.num_hidden_layers - 1
                        )));
                    }
                    let n = ckpt.config.num_hidden_layers;
                    let dims = (tokens.batch, tokens.seq);
                    let mut resident = None;
                    let weights = match stream {
                        true => {
                            let (rec, hint) = (memory::Recording::compared(&reference), "a --layers window on the CPU");
                            memory::check_run(
                                &ckpt,
                                dims,
                                rec,
                                (target, memory::Residency::Streamed, false),
                                max_memory,
                                hint,
                            )?;
                            glimpse::model::stream::check_streamed(&ckpt, &(0..=n - 1))?;
                            Weights::Streamed(&ckpt)
                        }
                        false => {
                            let layers = 0..=n - 1 + usize::from(mtp);
                            let est = memory::estimate_on(target, &ckpt, dims, &layers, memory::Recording::Nothing);
                            // (--stream does not run the MTP head a reference may check.)
                            let hint = match mtp {
                                true => "a --layers window of the main layers on the CPU",
                                false => "--stream, or a --layers window on the CPU",
                            };
                            memory::check(&est, max_memory, hint)?;
                            let rec = memory::Recording::compared(&reference);
                            memory::check_gpu(&ckpt, dims, rec, target, (memory::Residency::Whole, mtp))?;
                            Weights::Resident(resident.insert(Model::load(&ckpt)?))
                        }
                    };
                    let head = match mtp {
                        true => Some(glimpse::model::mtp::Mtp::load(&ckpt)?),
                        false => None,
                    };
                    let replay = verify::Replay { routing: force_routing, selection: force_selection };
                    let opts = verify::VerifyOptions {
                        tol,
                        per_name: per_name.clone(),
                        isolate,
                        replay,
                        layers: None,
                        near_tie: Some(near_tie),
                    };
                    // With a replay, the same prefill once more without it, for what the flips
                    // explain; each with the MTP head on the device.
                    let (report, free) = glimpse::device::with_prefill(target, weights, |p| {
                        let run = |opts: &verify::VerifyOptions| -> Result<verify::Report> {
                            let mut report = verify::verify_prefill(p, weights, &reference, opts)?;
                            if let Some(head) = &head {
                                verify::verify_mtp(p, (&ckpt.config, head), &reference, opts, &mut report)?;
                            }
                            Ok(report)
                        };
                        let report = run(&opts)?;
                        let free = match replay == verify::Replay::default() {
                            true => None,
                            false => Some(run(&verify::VerifyOptions { replay: Default::default(), ..opts.clone() })?),
                        };
                        Ok((report, free))
                    })?;
                    let header =
                        format!("verify {} against {} on {}", model_dir.display(), golden.display(), target.describe());
                    let paths = (model_dir.as_path(), golden.as_path());
                    return Ok(show_verify(json, &header, &reference, (&report, free.as_ref()), &opts, paths));
                }
                if stream && layers.is_none() && verify::has_mtp(&reference) {
                    return Err(Error::Usage(format!(
                        "the reference checks the MTP head, which --stream does not run (it needs the resident \
                         model): drop --stream, or give --layers 0..{} for the main model alone",
                        ckpt.config.num_hidden_layers - 1
                    )));
                }
                let mut resident = None;
                // A replay runs the forward pass a second time, which packs what the first read
                // (streamed, each pass loads each layer anew, and reads it once).
                let replays = (force_routing || force_selection) && !stream;
                let passes = if replays { memory::Passes::Many } else { memory::Passes::One };
                let budget = Budget {
                    tokens: &tokens,
                    fixed: true,
                    window: layers.as_ref(),
                    mtp: verify::has_mtp(&reference),
                    stream,
                    recording: memory::Recording::compared(&reference),
                    passes,
                    max: max_memory,
                };
                let weights = load_weights(&ckpt, &mut resident, &budget)?;
                let replay = verify::Replay { routing: force_routing, selection: force_selection };
                let opts = verify::VerifyOptions {
                    tol,
                    per_name: per_name.clone(),
                    isolate,
                    replay,
                    layers,
                    near_tie: Some(near_tie),
                };
                // The MTP head, when the reference checks it: resident whole-model runs only.
                let mtp = match (weights, verify::has_mtp(&reference), &opts.layers) {
                    (Weights::Resident(m), true, None) => Some((m, glimpse::model::mtp::Mtp::load(&ckpt)?)),
                    _ => None,
                };
                let run = |opts: &verify::VerifyOptions| -> Result<verify::Report> {
                    let mut report = verify::verify_with(weights, &reference, opts)?;
                    if let Some((m, head)) = &mtp {
                        verify::verify_mtp(*m, (&m.config, head), &reference, opts, &mut report)?;
                    }
                    Ok(report)
                };
                let report = run(&opts)?;
                // The same tensors without the replay (the MTP head's too), so the counts compare.
                let free = match replay == verify::Replay::default() {
                    true => None,
                    false => Some(run(&verify::VerifyOptions { replay: Default::default(), ..opts.clone() })?),
                };
                // After the runs, as the device path does: an error on the way is its one line alone.
                let header = format!("verify {} against {}", model_dir.display(), golden.display());
                let paths = (model_dir.as_path(), golden.as_path());
                Ok(show_verify(json, &header, &reference, (&report, free.as_ref()), &opts, paths))
            })()
            .map_err(|e| match &config_warning {
                // An error the other config may explain keeps it, on its one line.
                Some(w) if !matches!(e, Error::Interrupted(_) | Error::Device(_)) => Error::Usage(format!("{e} ({w})")),
                _ => e,
            })?;
            warn(config_warning);
            warn(reference.no_source());
            Ok(code)
        }
        Command::Diff { a, b, atol, rtol, tols, near_tie, json, model } => {
            glimpse::progress::enable();
            let near_tie = near_tie.unwrap_or(Tolerance { atol, rtol }.near_tie());
            let per_name = tols.iter().map(|t| diff::parse_tol(t)).collect::<Result<Vec<_>>>()?;
            let (da, db) = (Dump::open(&a)?, Dump::open(&b)?);
            let ckpt = model.as_ref().map(|dir| Checkpoint::open(dir)).transpose()?;
            // Warned once the comparison stands (an error alone is one line).
            let mut warnings: Vec<String> = da.other_config_than(&db).into_iter().collect();
            warnings.extend([&da, &db].into_iter().filter_map(Dump::no_source));
            warnings.dedup();
            if let (Some(c), Some(dir)) = (&ckpt, &model) {
                let experts = c.config.n_routed_experts;
                let misfits = |d: &Dump| [d.other_config(&c.config_bytes, dir), d.other_experts(experts, dir)];
                for w in [&da, &db].into_iter().flat_map(misfits).flatten() {
                    // (Once for a dump given as both sides.)
                    if !warnings.contains(&w) {
                        warnings.push(w);
                    }
                }
            }
            let routers = ckpt.as_ref().map(glimpse::model::moe::Routers::read).transpose()?;
            let config = ckpt.as_ref().map(|c| c.config.clone());
            let checkpoint = ckpt.map(std::sync::Arc::new);
            let opts =
                diff::DiffOptions { tol: Tolerance { atol, rtol }, per_name, near_tie, routers, config, checkpoint };
            let report = diff::diff(&da, &db, &opts)?;
            warnings.into_iter().for_each(|w| warn(Some(w)));
            diff::tol_warnings(&opts.per_name, &report.results).into_iter().for_each(|w| warn(Some(w)));
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json(&a, &b)).unwrap_or_default());
            } else {
                print!("{}", report.render(&a, &b));
            }
            Ok(exit(report.all_match()))
        }
        Command::Audit(args) => audit_command::audit(args, max_memory),
        Command::Bench { model, tokens, repeat, device, gpu } => {
            let target = gpu.target(device, &[])?;
            let ckpt = Checkpoint::open(&model)?;
            warn_past_positions(&ckpt.config, tokens);
            if device != Backend::Cpu {
                memory::check_run(
                    &ckpt,
                    (1, tokens),
                    memory::Recording::Nothing,
                    (target, memory::Residency::Whole, false),
                    max_memory,
                    "fewer --tokens",
                )?;
                let model = Model::load(&ckpt)?;
                print!("{}", glimpse::bench::run_on(target, &model, tokens, repeat)?);
                if target.backend == Backend::Cuda {
                    // Beside the memory in use the GPU reports, which adds the CUDA context.
                    let need = memory::device_need(&ckpt, (1, tokens), (target, false), memory::Residency::Whole);
                    println!("device memory estimated before the runs: {need}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            // (It opens the checkpoint again: opening is part of the load it times.)
            let report = glimpse::bench::run(&model, tokens, repeat, &std::env::temp_dir(), max_memory)?;
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Tui { model, golden, dump, tokens, prompt, stream, device, gpu, atol, rtol, tols, near_tie } => {
            let model = model.or_else(|| dump.is_none().then(default_case));
            let per_name = tols.iter().map(|t| diff::parse_tol(t)).collect::<Result<Vec<_>>>()?;
            let target = gpu.target(device, &[("--dump", dump.is_some())])?;
            // Before the run or the comparison, which can take minutes: the UI needs a terminal.
            if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                return Err(Error::Usage("tui needs an interactive terminal (stdout is not one)".into()));
            }
            // The run or the comparison comes before the first screen: said while it lasts.
            let waiting = std::io::IsTerminal::is_terminal(&std::io::stderr());
            if waiting {
                let what = if dump.is_some() { "reading and comparing the dumps" } else { "running the model" };
                eprint!("glimpse: {what}...");
            }
            // A live run of a large checkpoint takes minutes: its layer in progress shows (the
            // terminal is the UI's only once the run is done).
            if dump.is_none() {
                glimpse::progress::enable();
            }
            let src = glimpse::tui_source::open(&glimpse::tui_source::Open {
                model: model.as_deref(),
                golden: golden.as_deref(),
                dump: dump.as_deref(),
                tokens: tokens.as_deref(),
                prompt: prompt.as_deref(),
                max_memory,
                target,
                stream,
                near_tie,
                tol: tolerance(target, atol, rtol),
                per_name: &per_name,
            });
            if waiting {
                eprint!("\r\x1b[2K");
            }
            let src = src?;
            memory::release_freed_memory();
            glimpse_tui::term::name_mapped_files(glimpse::mapped::name_at);
            let signal = glimpse_tui::term::run(&src).map_err(|e| Error::Usage(format!("terminal: {e}")))?;
            // Ended by SIGTERM or SIGINT from outside: the status a shell expects of it.
            Ok(signal.map_or(ExitCode::SUCCESS, |s| ExitCode::from((128 + s).clamp(0, 255) as u8)))
        }
        Command::Inspect { model } => {
            let ckpt = Checkpoint::open(&model)?;
            print!("{}", inspect::describe(&ckpt)?);
            // The report first (what the files hold), then why they cannot run.
            match inspect::misshapen(&ckpt) {
                Some(why) => Err(Error::Weights(why)),
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Run(args) => {
            glimpse::progress::enable();
            run_command::run(args, max_memory)
        }
        Command::Generate { model, tokens, prompt, max_new_tokens, chunk, dump, record, mtp, ignore_eos } => {
            let ckpt = Checkpoint::open(&model)?;
            let tokens = match (tokens, prompt) {
                (Some(t), _) => Tokens::parse(&t).context(|| "--tokens".into())?,
                (_, Some(p)) => glimpse::tokenizer::encode(&model, &p)?,
                _ => return Err(Error::Usage("give --tokens or --prompt".into())),
            };
            let eos = if ignore_eos { Vec::new() } else { glimpse::config::generation_eos(&ckpt.dir, &ckpt.config)? };
            let max_new_tokens = max_new_tokens as usize;
            let (size, feed) = ((tokens.batch, tokens.seq), chunk.unwrap_or(0) as usize);
            let layers = ckpt.config.num_hidden_layers;
            let recorded =
                memory::Recording::to(dump.as_deref(), &recording(record.as_deref(), &ckpt.config)?, layers, mtp);
            if mtp {
                glimpse::model::mtp::Mtp::require(&ckpt)?; // before minutes of loading the model
            }
            memory::check_generate(&ckpt, size, feed, max_new_tokens, mtp, recorded, max_memory)?;
            // The last generated token is printed, never fed back: one position fewer runs.
            warn_past_positions(&ckpt.config, tokens.seq + max_new_tokens.saturating_sub(1));
            let opts = glimpse::generate::GenerateOptions {
                new_tokens: max_new_tokens,
                chunk: chunk.unwrap_or(0) as usize,
                dump: dump.map(|d| recording(record.as_deref(), &ckpt.config).map(|s| (d, s))).transpose()?,
                mtp,
                eos,
            };
            glimpse::generate::run(&model, &ckpt, &Model::load(&ckpt)?, &tokens, &opts)?;
            if let Some(note) = opts.dump.as_ref().and_then(|_| scores_left_out(record.as_deref(), &ckpt.config)) {
                eprintln!("{note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { device, gpu, kernels_only } => {
            if gpu.attention != glimpse::device::Attention::Auto {
                return Err(Error::Usage("selftest checks every attention path: --attention does not apply".into()));
            }
            let root = default_case().parent().map(Path::to_path_buf).unwrap_or_default();
            let scope = if kernels_only { glimpse::selftest::Scope::Kernels } else { glimpse::selftest::Scope::All };
            let ok = glimpse::selftest::run(&root, gpu.target(device, &[])?, scope, max_memory)?;
            println!("selftest: {}", if ok { "every check passed" } else { "a check FAILED (marked above)" });
            Ok(exit(ok))
        }
        Command::Synth { config, preset, layers, dense, experts, vocab, dtype, shards, mtp, seed, out } => {
            let source = config.clone();
            let config = match (config, preset) {
                (Some(path), _) => {
                    let bytes = glimpse::st::read_input(&path)?;
                    serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.clone(), source })?
                }
                _ => synth::preset_glm5(),
            };
            let opts =
                SynthOptions { config, layers, dense, experts, vocab, dtype, shards, mtp, seed, out: out.clone() };
            // A field the config file got wrong is named with the file.
            let cfg = synth::synth(&opts).map_err(|e| match (e, &source) {
                (e @ Error::Config { .. }, Some(path)) => {
                    Error::Context { context: path.display().to_string(), source: Box::new(e) }
                }
                (e, _) => e,
            })?;
            println!(
                "wrote a {}-layer random checkpoint ({} experts, vocab {}, {}) to {}",
                cfg.num_hidden_layers,
                cfg.n_routed_experts,
                cfg.vocab_size,
                dtype,
                out.display()
            );
            if !cfg.has_moe() {
                eprintln!(
                    "glimpse: warning: every layer ({}) is dense: no routing to audit{} (--dense N keeps N \
                     dense layers, the rest MoE)",
                    cfg.num_hidden_layers,
                    if experts.is_some() { ", and --experts has no effect" } else { "" }
                );
            }
            if cfg.has_moe() && cfg.num_experts_per_tok >= cfg.n_routed_experts {
                eprintln!(
                    "glimpse: warning: every token takes all {} experts (top-{}): its routing decides nothing \
                     (give --experts more than {})",
                    cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.num_experts_per_tok
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `verify::show`, then, where a tensor did not match, how to have its first mismatch read: the
/// readings are `diff`'s, of two dumps (verify keeps no tensor of its run). The reference is
/// `diff`'s "ours" there, and glimpse's run its reference: `diff --model` reads what a dump does
/// otherwise than the checkpoint, and glimpse's run is the checkpoint's (a port's dump given as
/// the reference gets its bug named; the other way round, the readings' check that the reference
/// is the checkpoint's would refuse it). The run records the MTP head where the reference holds
/// it, and the diff compares at verify's tolerances.
fn show_verify(
    json: bool,
    header: &str,
    reference: &Dump,
    reports: (&verify::Report, Option<&verify::Report>),
    opts: &verify::VerifyOptions,
    (model, golden): (&Path, &Path),
) -> ExitCode {
    let passed = verify::show(json, header, reference, reports, opts);
    if !passed && !json && reports.0.first_mismatch().is_some() {
        let mtp = if verify::has_mtp(reference) { " --mtp" } else { "" };
        let mut tolerances = String::new();
        if opts.tol != Tolerance::default() {
            tolerances += &format!(" --atol {:e} --rtol {:e}", opts.tol.atol, opts.tol.rtol);
        }
        if let Some(m) = opts.near_tie {
            tolerances += &format!(" --near-tie {m:e}");
        }
        for (pattern, t) in &opts.per_name {
            tolerances += &format!(" --tol '{pattern}={:e},{:e}'", t.atol, t.rtol);
        }
        println!(
            "(a reading of the first mismatch: glimpse run --model {m} --tokens-from {g}{mtp} --dump GLIMPSE.safetensors, \
             then glimpse diff {g} GLIMPSE.safetensors --model {m}{tolerances})",
            m = model.display(),
            g = golden.display()
        );
    }
    exit(passed)
}

/// What a run will hold, for the memory check before its weights load.
struct Budget<'a> {
    tokens: &'a Tokens,
    /// The tokens are a reference's (verify), not the user's to shorten.
    fixed: bool,
    passes: memory::Passes,
    window: Option<&'a std::ops::RangeInclusive<usize>>,
    /// A whole run also runs the MTP head, whose layer is loaded and run too.
    mtp: bool,
    stream: bool,
    recording: memory::Recording,
    max: Option<u64>,
}

/// Checks the memory budget, then loads the weights into `resident`, or leaves them to be
/// streamed from the checkpoint.
fn load_weights<'a>(ckpt: &'a Checkpoint, resident: &'a mut Option<Model>, b: &Budget) -> Result<Weights<'a>> {
    let window = b.window.cloned().unwrap_or(0..=ckpt.config.num_hidden_layers - 1 + usize::from(b.mtp));
    let tokens = (b.tokens.batch, b.tokens.seq);
    let residency = if b.stream { memory::Residency::Streamed } else { memory::Residency::Whole };
    let est = memory::estimate(ckpt, tokens, &window, residency, b.recording, b.passes);
    // (What the command takes: `run --mtp` neither --stream nor --layers; `verify` of a reference
    // that checks the MTP head --stream only with a window of the main layers, the head left out.)
    let main_layers =
        format!("--stream --layers 0..{} (the MTP head left unchecked)", ckpt.config.num_hidden_layers - 1);
    let hint = match (b.fixed, b.stream, b.mtp) {
        (false, _, true) => "fewer tokens",
        (false, true, false) => "fewer tokens or a --layers window",
        (false, false, false) => "fewer tokens, --stream or a --layers window",
        (true, true, _) => "a --layers window",
        (true, false, true) => &main_layers,
        (true, false, false) => "--stream or a --layers window",
    };
    memory::check(&est, b.max, hint)?;
    if b.stream {
        glimpse::model::stream::check_streamed(ckpt, &window)?;
    }
    Ok(if b.stream { Weights::Streamed(ckpt) } else { Weights::Resident(resident.insert(Model::load(ckpt)?)) })
}

/// `verify --decode`: prefill vs decode through the latent cache, hook by hook, per position.
fn verify_decode(
    ckpt: &Checkpoint,
    tokens: &Tokens,
    chunk: usize,
    (tol, per_name): (Tolerance, &[(String, Tolerance)]),
    max: Option<u64>,
) -> Result<ExitCode> {
    memory::check_decode(ckpt, (tokens.batch, tokens.seq), chunk, max, "a reference of fewer tokens")?;
    let model = &Model::load(ckpt)?;
    println!("{}", glimpse::generate::cache_report(model, tokens.batch, tokens.seq, false));
    let report = glimpse::decode_check::check(model, tokens, chunk, tol, per_name)?;
    glimpse::decode_check::print(&report, tol, per_name, chunk);
    diff::tol_warnings(per_name, &report.results).into_iter().for_each(|w| warn(Some(w)));
    // The main model's decode only: a checkpoint's MTP head is not checked here, which its
    // `verify` (without --decode) would check against a reference that holds `mtp.*`.
    if glimpse::model::mtp::Mtp::present(ckpt) {
        println!(
            "(the MTP head, model.layers.{}, is not decoded here: `generate --mtp --dump` against `run --mtp --dump` \
             of its tokens checks it)",
            ckpt.config.num_hidden_layers
        );
    }
    Ok(exit(report.all_match()))
}
