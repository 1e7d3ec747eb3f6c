//! Opening the TUI's data (`glimpse tui`'s arguments): a recorded dump as it is, or a live run of
//! a checkpoint recorded into a temporary dump, with the reference when there is one, after
//! checking that the dumps, tokens and checkpoint belong together.

use std::path::Path;

use super::{sweep_live_dumps, DumpSource, LIVE_PREFIX};
use crate::checkpoint::Checkpoint;
use crate::diff::DiffOptions;
use crate::dump::{self, Dump, DumpWriter};
use crate::error::{Context, Error, Result};
use crate::hooks::{HookPoint, Selector};
use crate::memory::Residency;
use crate::model::moe::Routers;
use crate::model::Tokens;

/// What the TUI opens (`glimpse tui`'s arguments).
pub struct Open<'a> {
    /// Run this checkpoint live.
    pub model: Option<&'a Path>,
    pub golden: Option<&'a Path>,
    /// Show this recorded dump instead.
    pub dump: Option<&'a Path>,
    pub tokens: Option<&'a str>,
    pub prompt: Option<&'a str>,
    pub max_memory: Option<u64>,
    pub target: crate::device::Target,
    /// The live run reads each layer just before it runs and releases it after (`--stream`: on
    /// a device, one layer's weights there at a time).
    pub stream: bool,
    /// Flips whose margins on both sides are below this are near-ties (default: `diff`'s).
    pub near_tie: Option<f64>,
    /// The comparison's tolerance, and per name pattern (`--tol`, last match wins).
    pub tol: crate::compare::Tolerance,
    pub per_name: &'a [(String, crate::compare::Tolerance)],
}

/// How a dump's shapes say it is not a run of the model `cfg` describes: its hidden size, its
/// routers' expert count, a layer past the model's (its MTP layer included). None where they fit.
fn misfit(d: &Dump, cfg: &crate::config::Config) -> Option<String> {
    let hidden = HookPoint::Embeddings.name();
    if let Some(width) = d.shape(&hidden).and_then(|s| s.last().copied()) {
        if width != cfg.hidden_size {
            return Some(format!("its {hidden} are {width} wide, the config's hidden_size {}", cfg.hidden_size));
        }
    }
    if let Some(width) = d.experts().filter(|&w| w != cfg.n_routed_experts) {
        return Some(format!("its routers have {width} experts, the config's {}", cfg.n_routed_experts));
    }
    let last = d.names().iter().filter_map(|n| HookPoint::parse(n).and_then(|p| p.layer())).max()?;
    (last > cfg.num_hidden_layers)
        .then(|| format!("it holds layer {last}, the config has {} and an MTP layer", cfg.num_hidden_layers))
}

/// Opens the TUI's data: a recorded dump as it is, or a live run of a model recorded into a
/// temporary dump; with the reference when there is one.
pub fn open(o: &Open) -> Result<DumpSource> {
    let Open { model, golden, dump, tokens, prompt, max_memory, target, stream, near_tie, tol, per_name } = *o;
    let near_tie = near_tie.unwrap_or(tol.near_tie());
    let mut opts = DiffOptions { tol, per_name: per_name.to_vec(), near_tie, ..DiffOptions::default() };
    let dir = match (dump, model) {
        (Some(path), model) => {
            let reference = golden.map(Dump::open).transpose()?;
            let title = match golden {
                Some(g) => format!("{} vs reference {}", path.display(), g.display()),
                // (Alone, nothing is compared: no flip or mismatch can show, and the title says why.)
                None => format!("{} (no reference: nothing compared)", path.display()),
            };
            // The checkpoint the dump ran, when given: its routers and config class the flips.
            let ckpt = model.map(Checkpoint::open).transpose()?.map(std::sync::Arc::new);
            if let Some(c) = &ckpt {
                (opts.routers, opts.config) = (Some(Routers::read(c)?), Some(c.config.clone()));
                opts.checkpoint = Some(c.clone());
            }
            let ours = Dump::open(path)?;
            // Another model's shapes would label its layers and class its flips with that model's
            // config and routers: refused here, where a warning fits the status line only cut.
            if let (Some(c), Some(dir)) = (&ckpt, model) {
                for d in std::iter::once(&ours).chain(reference.as_ref()) {
                    if let Some(why) = misfit(d, &c.config) {
                        return Err(Error::Usage(format!(
                            "--model {} is not the model {} ran ({why}): give the checkpoint it ran, or no --model",
                            dir.display(),
                            d.path.display()
                        )));
                    }
                }
            }
            // A checkpoint other than the one the dumps ran would label layers and recompute
            // margins with another model's routers: said in the status line, where a warning on
            // stderr would be hidden behind the terminal UI.
            let warning = ckpt.as_ref().zip(model).and_then(|(c, dir)| {
                let other = |d: &Dump| d.other_config(&c.config_bytes, dir).is_some();
                let which = match (other(&ours), reference.as_ref().is_some_and(other)) {
                    (true, true) => "the dumps",
                    (true, _) => "this dump",
                    (false, true) => "the reference",
                    (false, false) => return None,
                };
                Some(format!("--model {}: not the config.json {which} ran", dir.display()))
            });
            return Ok(DumpSource::new(title, ours, reference, &opts)?.warned(warning));
        }
        (None, Some(dir)) => dir,
        (None, None) => return Err(Error::Usage("give a model or a dump".into())),
    };
    let explicit = golden.is_some();
    // The folder's reference for the products' precision, as verify picks it.
    let mut golden =
        golden.map(Path::to_path_buf).or_else(|| Some(target.precision.reference_in(dir)).filter(|p| p.is_file()));
    let mut reference = golden.as_deref().map(Dump::open).transpose()?;
    let ckpt = std::sync::Arc::new(Checkpoint::open(dir)?);
    let tokens = match (tokens, prompt, &reference) {
        (Some(t), _, _) => Tokens::parse(t).context(|| "--tokens".into())?,
        (_, Some(p), _) => crate::tokenizer::encode(dir, p)?,
        (_, _, Some(r)) => r.tokens_for(ckpt.config.vocab_size)?,
        _ => {
            return Err(Error::Usage(format!(
                "{} has no reference.safetensors: give --tokens or --prompt",
                dir.display()
            )))
        }
    };
    // The folder's own reference ran its tokens: other tokens run without it (the title says
    // so); a reference named with --golden must have run the same ones.
    // (The folder's reference without `input_ids` is as good as of other tokens here.)
    let mut skipped = "";
    if let (Some(r), Some(g)) = (&reference, &golden) {
        let same = r.tokens().map(|t| t == tokens);
        if !matches!(same, Ok(true)) {
            if explicit {
                same?;
                return Err(Error::Usage(format!(
                    "{} ran other tokens than --tokens/--prompt give: drop them to run the reference's",
                    g.display()
                )));
            }
            (reference, golden, skipped) = (None, None, ", no reference: it ran other tokens");
        }
    }
    let n = ckpt.config.num_hidden_layers;
    let mut resident = None;
    let residency = if stream { Residency::Streamed } else { Residency::Whole };
    // A reference that checks the MTP head (`golden/mtp`) gets it run too (where the prefill
    // runs), from our final-norm hidden state, as `verify` and `run --mtp` do, where the
    // checkpoint has the head (a quantised release may drop it: the main model is still
    // compared). Not streamed: the head needs the resident model, and the title says it did not
    // run.
    let checks_mtp = reference.as_ref().is_some_and(crate::verify::has_mtp) && crate::model::mtp::Mtp::present(&ckpt);
    let runs_mtp = checks_mtp && !stream;
    let recording = crate::memory::Recording::of(&Selector::default(), n, runs_mtp);
    let dims = (tokens.batch, tokens.seq);
    let weights = crate::memory::load_for_run(
        &ckpt,
        &mut resident,
        (dims, recording),
        (target, residency, runs_mtp),
        max_memory,
    )?;
    // Named by process and by call: two live runs of one process (tests in threads) must not
    // share the file.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    sweep_live_dumps(&std::env::temp_dir());
    let tmp = std::env::temp_dir().join(format!("{LIVE_PREFIX}{}-{call}.safetensors", std::process::id()));
    let owned = crate::output::Removal::new(tmp.clone());
    let mut writer = DumpWriter::create(&tmp, Selector::default(), crate::hooks::max_points(n))?;
    let head = match runs_mtp {
        true => Some(crate::model::mtp::Mtp::load(&ckpt)?),
        false => None,
    };
    let mut final_norm = crate::hooks::Recorder::new(Selector::new("final_norm", None));
    // Ctrl-C (or SIGTERM) during the run stops it after the layer in progress, and the temporary
    // dump goes with it (killed, the run left it for the next live run to sweep). The UI sets its
    // own handlers once the run is done.
    let stopping = crate::interrupt::stop_at_checkpoints();
    crate::device::with_prefill(target, weights, |p| {
        let mut stop = StopAfterLayer;
        p.prefill(&tokens, &mut crate::hooks::Tee(&mut writer, &mut crate::hooks::Tee(&mut final_norm, &mut stop)))?;
        if let (Some(head), Some(h)) = (&head, final_norm.get(HookPoint::FinalNorm)) {
            p.mtp(head, &h.narrow(1, 0, tokens.seq.saturating_sub(1))?, &tokens, &mut writer)?;
        }
        Ok(())
    })?;
    drop(stopping);
    writer.finish(&dump::metadata("glimpse live run", Some(&ckpt.config_bytes), None))?;
    // Mapped, the dump outlives its name: removing the file now leaves none behind, however the
    // TUI ends (a kill included).
    let ours = Dump::open(&tmp)?;
    drop(owned);
    let streamed = match (stream, checks_mtp) {
        (false, _) => "",
        (true, false) => ", streamed",
        (true, true) => ", streamed: the MTP head not run",
    };
    let live = match target.backend {
        crate::device::Backend::Cpu => format!("live{streamed}{skipped}"),
        _ => format!("live, {}{streamed}{skipped}", target.describe()),
    };
    let title = match &golden {
        Some(g) => format!("{} ({live}) vs reference {}", dir.display(), g.display()),
        None if skipped.is_empty() => format!("{} ({live}, no reference: nothing compared)", dir.display()),
        None => format!("{} ({live})", dir.display()),
    };
    // The routers recompute the reference's routing margins from its gate logits.
    opts.routers = Some(Routers::of_weights(weights)?);
    opts.config = Some(ckpt.config.clone());
    opts.checkpoint = Some(ckpt.clone());
    // A reference another model ran compares nothing that lines up: said in the status line.
    let warning = reference
        .as_ref()
        .and_then(|r| r.other_config(&ckpt.config_bytes, dir))
        .map(|_| format!("--model {}: not the config.json the reference ran", dir.display()));
    Ok(DumpSource::new(title, ours, reference, &opts)?.warned(warning))
}

/// Stops a live run after the layer in progress once a stop is asked for (the CPU model reports
/// each layer done; a device's prefill runs to its end, in seconds).
struct StopAfterLayer;

impl crate::hooks::Observer for StopAfterLayer {
    fn wants(&self, _: HookPoint) -> bool {
        false
    }
    fn observe(&mut self, _: HookPoint, _: &candle_core::Tensor) -> Result<()> {
        Ok(())
    }
    fn layer_done(
        &mut self,
        layer: usize,
        _: &candle_core::Tensor,
        _: Option<&crate::model::indexer::Selection>,
    ) -> Result<()> {
        match crate::interrupt::requested() {
            true => Err(Error::Interrupted(format!(
                "the live run stopped by {} after layer {layer}; nothing kept",
                crate::interrupt::signal_name()
            ))),
            false => Ok(()),
        }
    }
}
