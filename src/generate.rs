//! The `generate` command: greedy decoding through the latent KV cache, streaming each step's
//! tokens (and text, with a tokenizer) as they come, with the cache's size for the run, the MTP
//! head's draft acceptance when asked, and every step's hooks written to one dump at the end.
//!
//! The dump lays the decode calls end to end ([`crate::stitch`]): it has the names and shapes of a
//! prefill dump of the tokens the model ran (the prompt and every generated token but the last),
//! so `diff` can compare it with `run --dump` of the same tokens or with a reference.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::dump::{self, DumpWriter};
use crate::error::Result;
use crate::hooks::{NoObserver, Observer, Selector};
use crate::model::decode::Flow;
use crate::model::mtp::Mtp;
use crate::model::{Model, Tokens};
use crate::stitch::Stitcher;

pub struct GenerateOptions {
    pub new_tokens: usize,
    /// Prompt positions per decode call (0: the whole prompt in one call).
    pub chunk: usize,
    /// Record these hook points of every step into this dump.
    pub dump: Option<(PathBuf, Selector)>,
    /// Draft with the MTP head and report its acceptance.
    pub mtp: bool,
    /// Stop once every row has produced one of these (config.json's `eos_token_id`).
    pub eos: Vec<u32>,
}

pub fn run(
    dir: &Path,
    ckpt: &crate::checkpoint::Checkpoint,
    model: &Model,
    prompt: &Tokens,
    opts: &GenerateOptions,
) -> Result<()> {
    let vocab = model.config.vocab_size;
    prompt.check_vocab(vocab)?;
    if let Some(e) = opts.eos.iter().find(|&&e| e as usize >= vocab) {
        eprintln!("glimpse: warning: eos_token_id {e} is past vocab_size {vocab}: no row can produce it");
    }
    // First: a dump that cannot be written is refused before anything is computed or printed.
    let mut stitcher = opts.dump.as_ref().map(|(path, sel)| Stitcher::spilling(sel.clone(), path)).transpose()?;
    let mtp = if opts.mtp { Some(Mtp::load(ckpt)?) } else { None };
    // The last generated token is printed, never fed back: the cache ends one position short.
    let cached = prompt.seq + opts.new_tokens.saturating_sub(1);
    eprintln!("{}", cache_report(model, prompt.batch, cached, mtp.is_some()));
    let obs: &mut dyn Observer = match stitcher.as_mut() {
        Some(s) => s,
        None => &mut NoObserver,
    };
    // Loaded once, outside the timed steps (a real tokenizer.json takes a while to parse).
    // Ids need no tokenizer: one that cannot be read costs the text, not the run.
    let decoder = match prompt.batch {
        1 => crate::tokenizer::Tokenizer::load(dir).unwrap_or_else(|e| {
            eprintln!("glimpse: warning: {e}: the steps are shown as ids only");
            None
        }),
        _ => None,
    };
    let t0 = std::time::Instant::now();
    let mut stamps = Vec::with_capacity(opts.new_tokens);
    // Ctrl-C ends the generation after the step (or the prompt's chunk) in progress, keeping what
    // it made (and its dump).
    let stopping = crate::interrupt::stop_at_checkpoints();
    let mut ended = vec![false; prompt.batch]; // rows that produced an eos id
    let stop = crate::interrupt::requested;
    let done = model.generate(prompt, opts.new_tokens, opts.chunk, mtp.as_ref(), obs, &stop, |step, next| {
        stamps.push(t0.elapsed().as_secs_f64());
        let text = decoder.as_ref().map(|d| d.decode(next)).transpose()?.map(|t| format!(" {t:?}"));
        let mut out = std::io::stdout();
        let _ = writeln!(out, "step {step}: {next:?}{}", text.unwrap_or_default());
        let _ = out.flush();
        ended.iter_mut().zip(next).for_each(|(e, t)| *e |= opts.eos.contains(t));
        let stop = crate::interrupt::requested() || ended.iter().all(|&e| e);
        Ok(if stop { Flow::Stop } else { Flow::Continue })
    })?;
    drop(stopping);
    let secs = t0.elapsed().as_secs_f64();
    let made = done.tokens.first().map_or(0, Vec::len);
    if made < opts.new_tokens {
        let why =
            if crate::interrupt::requested() { crate::interrupt::signal_name() } else { "eos_token_id in every row" };
        eprintln!("glimpse: stopped by {why} after {made} of {} new tokens", opts.new_tokens);
    }
    // A row that ended earlier than the others is shown up to its eos, and its drafts counted
    // up to it: the steps after are the other rows'.
    let ends: Vec<usize> =
        done.tokens.iter().map(|g| g.iter().position(|t| opts.eos.contains(t)).map_or(g.len(), |i| i + 1)).collect();
    for (r, (g, &end)) in done.tokens.iter().zip(&ends).enumerate() {
        println!("row {r}: generated {:?}", &g[..end]);
    }
    if let Some(hits) = &done.drafts {
        // Draft j is of token j + 1.
        let counted = hits.iter().zip(&ends).flat_map(|(row, &end)| &row[..row.len().min(end.saturating_sub(1))]);
        let (accepted, drafted) = counted.fold((0, 0), |(a, d), &hit| (a + usize::from(hit), d + 1));
        let rate = if drafted > 0 { format!("{:.1}%", 100.0 * accepted as f64 / drafted as f64) } else { "-".into() };
        println!("mtp: {accepted} of {drafted} drafts equal the main model's greedy token ({rate})");
    }
    match done.prompt_fed < prompt.seq {
        true => {
            eprintln!("{made} new tokens in {secs:.3} s, after {} of the {}-token prompt", done.prompt_fed, prompt.seq)
        }
        false => eprintln!("{made} new tokens in {secs:.3} s including the {}-token prompt", prompt.seq),
    }
    if let Some(line) = speed_line(&stamps, prompt.batch) {
        println!("{line}");
    }
    if let (Some((path, selector)), Some(stitcher)) = (&opts.dump, stitcher) {
        let mut writer = DumpWriter::create(path, selector.clone(), stitcher.len())?;
        stitcher.for_each(|point, t| writer.observe(point, &t))?;
        // (As `decode::generate` runs it: a chunk as long as the prompt is the expanded prefill.)
        let prompt_fed = match opts.chunk {
            c if c == 0 || c >= prompt.seq => "the prompt through the expanded prefill".to_string(),
            c => format!("the prompt through the latent cache {c} positions per call"),
        };
        let source = format!(
            "glimpse {} / candle, float32, cpu; generate: {prompt_fed}, each step through the latent cache",
            env!("CARGO_PKG_VERSION")
        );
        let meta = dump::metadata(&source, Some(&ckpt.config_bytes), Some(&dir.display().to_string()));
        let n = writer.finish(&meta)?;
        // (Its tokens are those the model ran: the last one made was never fed back.)
        println!(
            "wrote {n} tensors to {} (the positions run: the prompt and the tokens made but the last, which no step \
             fed; `run --tokens-from` it runs the same tokens)",
            path.display()
        );
    }
    Ok(())
}

/// Time to the first token (the prompt) and the median time of each later step, from the time
/// each step's token was known.
fn speed_line(stamps: &[f64], batch: usize) -> Option<String> {
    let first = *stamps.first()?;
    let mut steps: Vec<f64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    steps.sort_by(f64::total_cmp);
    let median = *steps.get(steps.len() / 2)?;
    Some(format!(
        "speed: prompt (first token) {first:.3} s; decode median {median:.4} s per step = {:.2} tok/s per row, batch {batch}",
        1.0 / median
    ))
}

/// What the cache holds per token and in all for `tokens` positions of `batch` rows: the latent
/// form this decode keeps against the expanded keys and values a naive port would.
pub fn cache_report(model: &Model, batch: usize, tokens: usize, mtp: bool) -> String {
    let (latent, expanded) = model.config.cache_values_per_token(mtp);
    let layers = model.layers.len() + usize::from(mtp);
    let mib = |values: usize| (4 * values * tokens * batch) as f64 / (1 << 20) as f64;
    format!(
        "cache: {} bytes per token over {layers} layers in f32 (kv_latent + k_rope, + the index key in full-indexer \
         layers), against {} expanded (per-head keys and values, + the same index keys) ({:.1}x); {tokens} positions \
         x batch {batch}: {:.2} MiB, against {:.2} MiB",
        4 * latent,
        4 * expanded,
        expanded as f64 / latent as f64,
        mib(latent),
        mib(expanded)
    )
}
