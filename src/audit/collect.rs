//! Reading routing into an [`Audit`]: prompts run live through the model (`super::live`), and
//! recorded dumps (glimpse's, or another tool's in the spec's format), each checked before it
//! counts: one row of `moe.topk_ids` a token, `k` distinct experts in range, the same `k` in
//! every run, one bias-changed flag a token, and with `--model` experts its router picks from the
//! dump's own gate logits. Each token's routing also goes to `--routes`' file as it is read. The
//! options' own checks (`--layers`' window, `--against`'s tokens) come first, before anything
//! runs.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use super::live::{counted, read_prompts, run_prompts, sweep_prompts, Lines, Live, Side};
use super::routes::{LayerRoutes, Routes};
use super::{Audit, Run};
use crate::checkpoint::Checkpoint;
use crate::config::MAX_EXPERTS;
use crate::dump::{Dump, Values};
use crate::error::{Error, Result};
use crate::hooks::{HookPoint, LayerHook};
use crate::memory::Residency;
use crate::model::moe::{Route, Routers};
use crate::model::{Model, Tokens};

/// Routing counts over prompts run live (`prompts`: one per line, token ids or text) and over
/// recorded dumps. The checkpoint, when given, supplies the expert count, each expert's bias
/// (the MTP layer's too) and lets dumps without `moe.bias_changed` flags have them recomputed
/// from their router logits; the model itself is loaded only to run prompts.
pub fn collect(
    model_dir: Option<&Path>,
    prompts: Option<(&Path, Lines)>,
    dumps: &[PathBuf],
    opts: CollectOptions,
) -> Result<Audit> {
    collect_with_other(model_dir, prompts, None, dumps, opts).map(|(audit, _)| audit)
}

/// [`collect`], and the audit of `other_prompts` (`audit --compare-prompts`, its lines read as
/// the `Lines` given with it) run on the same model after them: both files are read, encoded
/// and sized for memory before the model loads, and one Ctrl-C stops both (the other prompts
/// are not run when the audited ones were stopped). None for the other audit when it was not run.
pub fn collect_with_other(
    model_dir: Option<&Path>,
    prompts: Option<(&Path, Lines)>,
    other_prompts: Option<(&Path, Lines)>,
    dumps: &[PathBuf],
    opts: CollectOptions,
) -> Result<(Audit, Option<Audit>)> {
    let other = other_prompts.map(|(path, _)| path);
    let CollectOptions {
        experts,
        max_memory,
        target,
        residency,
        keep_sets,
        per_prompt,
        mut routes,
        window,
        mtp,
        against,
    } = opts;
    let streamed = residency == Residency::Streamed;
    let ckpt = model_dir.map(Checkpoint::open).transpose()?;
    let live = prompts.is_some() || other.is_some();
    if streamed && mtp {
        return Err(Error::Usage(
            "--mtp needs the whole model (its head reads the embeddings and lm_head): drop --stream".into(),
        ));
    }
    // Before the prompts are read, the model loaded: a checkpoint without the head is told at once.
    if let (Some(c), true) = (&ckpt, live && mtp) {
        if !crate::model::mtp::Mtp::present(c) {
            let n = c.config.num_hidden_layers;
            return Err(Error::Usage(format!("--mtp: the checkpoint has no MTP layer (model.layers.{n}.*)")));
        }
    }
    if let (Some(c), Some(w)) = (&ckpt, &window) {
        check_window(&c.config, w, live && !mtp)?;
        if mtp && !w.contains(&c.config.num_hidden_layers) {
            let (a, b, n) = (w.start(), w.end(), c.config.num_hidden_layers);
            return Err(Error::Usage(format!("--mtp: --layers {a}..{b} leaves out the MTP layer, {n}")));
        }
    }
    // Each token's text in --routes, where the checkpoint has a tokenizer.
    if let (Some(r), Some(dir)) = (routes.as_deref_mut(), model_dir) {
        match crate::tokenizer::Tokenizer::load(dir) {
            Ok(Some(decoder)) => r.decode_with(decoder),
            Ok(None) => {}
            Err(e) => eprintln!("glimpse: warning: {e}: --routes' text column is left empty"),
        }
    }
    // Prompts are read and encoded before the model is loaded, so the memory check sees them.
    let read = |file: Option<(&Path, Lines)>, flag: &str| match (file, model_dir) {
        (Some((path, lines)), Some(dir)) => read_prompts(path, lines, dir),
        (Some(_), None) => Err(Error::Usage(format!("{flag} needs --model"))),
        (None, _) => Ok(Vec::new()),
    };
    let prompt_tokens = read(prompts, "--prompts")?;
    let other_tokens = read(other_prompts, "--compare-prompts")?;
    if !against.is_empty() {
        // Before anything runs: a mismatch found after the prompts ran cost their time.
        let ours = match prompts {
            Some((path, _)) => {
                prompt_tokens.iter().map(|(line, t)| (format!("{} line {line}", path.display()), t.clone())).collect()
            }
            None => dump_tokens(dumps)?,
        };
        // (Another model's dumps are refused as such, by the expert counts, further on.)
        let width = match (experts, &ckpt) {
            (Some(given), _) => Some(given.n),
            (None, Some(c)) => Some(c.config.n_routed_experts),
            (None, None) => router_width(dumps)?,
        };
        let theirs = router_width(against)?;
        if width.is_none() || theirs.is_none() || width == theirs {
            check_against(ours, against)?;
        }
    }
    if let Some(c) = &ckpt {
        // The largest batch x positions for memory; the longest row for the trained positions.
        let all = || prompt_tokens.iter().chain(&other_tokens).map(|(_, t)| t);
        if streamed {
            let prompts: Vec<(usize, usize)> = all().map(|t| (t.batch, t.seq)).collect();
            crate::memory::check_sweep(c, &prompts, target, max_memory)?;
        } else if let Some(largest) = all().max_by_key(|t| t.ids.len()) {
            // (With --mtp, the head's layer too, as `run --mtp` counts it.)
            let layers = 0..=c.config.num_hidden_layers - 1 + usize::from(live && mtp);
            let dims = (largest.batch, largest.seq);
            let est = crate::memory::estimate_on(target, c, dims, &layers, crate::memory::Recording::Nothing);
            // (--stream does not run the MTP head.)
            let hint = if live && mtp { "shorter prompts" } else { "shorter prompts, or --stream" };
            crate::memory::check(&est, max_memory, hint)?;
            // And on a GPU its memory, the head's layer included where it runs there.
            let held = (Residency::Whole, live && mtp);
            crate::memory::check_gpu(c, dims, crate::memory::Recording::Nothing, target, held)?;
        }
        for (path, tokens) in [(prompts.map(|p| p.0), &prompt_tokens), (other, &other_tokens)] {
            let longest = tokens.iter().max_by_key(|(_, t)| t.seq);
            if let (Some(path), Some((line, t))) = (path, longest) {
                if let Some(past) = c.config.past_positions(t.seq) {
                    eprintln!("glimpse: warning: {} line {line} (the longest prompt): {past}", path.display());
                }
            }
        }
    }
    // The MTP head pairs each token with the hidden state before it: every prompt needs two.
    if mtp {
        for (path, tokens) in [(prompts.map(|p| p.0), &prompt_tokens), (other, &other_tokens)] {
            if let (Some(path), Some((line, t))) = (path, tokens.iter().find(|(_, t)| t.seq < 2)) {
                let e = crate::model::mtp::check_positions(t.seq).err().map(|e| e.to_string()).unwrap_or_default();
                return Err(Error::Usage(format!("--mtp: {} line {line}: {e}", path.display())));
            }
        }
    }
    // (Dumps without routing are refused one by one.)
    // Prompts to run, on either side: the model is loaded for them.
    if let (Some(c), true) = (&ckpt, live) {
        if !c.config.has_moe() {
            return Err(Error::Usage("the model has no MoE layer (every layer is dense): no routing to audit".into()));
        }
    }
    let routers = ckpt.as_ref().map(Routers::read).transpose()?;
    let model = match (&ckpt, live && !streamed) {
        (Some(c), true) => Some(Model::load(c)?),
        _ => None,
    };
    let mtp_head = match (&ckpt, live && mtp) {
        (Some(c), true) => Some(crate::model::mtp::Mtp::load(c)?),
        _ => None,
    };
    let live_run = |m| Live { model: m, mtp: mtp_head.as_ref(), target };
    let experts = match (experts, &ckpt) {
        (Some(given), _) => match router_width(dumps)? {
            Some(width) if width != given.n => {
                return Err(Error::Usage(format!(
                    "the dumps' routers have {width} experts, not {}: one model's routing",
                    given.n
                )))
            }
            _ => given,
        },
        (None, Some(c)) => match router_width(dumps)? {
            // The checkpoint's bias and routers would be another model's, and its expert count
            // would add dead experts (or refuse ids) that the dumps' routing never had.
            Some(width) if width != c.config.n_routed_experts => {
                return Err(Error::Usage(format!(
                    "the dumps' routers have {width} experts, --model's config {}: one model's routing",
                    c.config.n_routed_experts
                )))
            }
            _ => ExpertCount { n: c.config.n_routed_experts, guessed: false },
        },
        (None, None) => expert_count(dumps)?,
    };
    let new_audit = |keep_sets: bool| {
        let mut audit = Audit::new(experts.n);
        audit.sets = keep_sets.then(std::collections::BTreeMap::new);
        audit.per_prompt = per_prompt;
        audit.experts_guessed = experts.guessed;
        audit.mtp_layer = ckpt.as_ref().map(|c| c.config.num_hidden_layers);
        audit.window = window.clone();
        audit
    };
    let mut audit = new_audit(keep_sets);
    let mut other_audit = None;
    if let (Some(c), true) = (&ckpt, live && streamed) {
        // Ctrl-C (or SIGTERM) from here: the sweep stops after the layer in progress.
        let _stopping = crate::interrupt::stop_at_checkpoints();
        let mut o = other.map(|_| new_audit(false));
        let mut sides = Vec::new();
        if let Some((path, _)) = prompts {
            sides.push(Side { audit: &mut audit, path, prompts: prompt_tokens, routes: routes.as_deref_mut() });
        }
        if let (Some(path), Some(o)) = (other, o.as_mut()) {
            sides.push(Side { audit: o, path, prompts: other_tokens, routes: None });
        }
        sweep_prompts(sides, routers.as_ref(), c, target)?;
        // A stop that cut the other prompts' layers cuts the audited dumps' (read below) alike.
        if let Some(stop) = o.as_ref().filter(|_| prompts.is_none()).and_then(|o| o.stopped_after_layer) {
            audit.stopped_after_layer = Some(stop);
            audit.window = o.as_ref().and_then(|o| o.window.clone());
        }
        other_audit = o;
    } else if let Some(m) = &model {
        // Ctrl-C (or SIGTERM) from here, once the model is loaded: a stop asked for before the
        // first prompt stops after it, and one asked for in either set stops both.
        let _stopping = crate::interrupt::stop_at_checkpoints();
        if let Some((path, _)) = prompts {
            run_prompts(&mut audit, routers.as_ref(), live_run(m), prompt_tokens, path, routes.as_deref_mut())?;
        }
        match other {
            Some(path) if crate::interrupt::requested() => {
                eprintln!("glimpse: --compare-prompts {}: not run, the audit was stopped", path.display());
            }
            Some(path) => {
                let mut o = new_audit(false);
                run_prompts(&mut o, routers.as_ref(), live_run(m), other_tokens, path, None)?;
                other_audit = Some(o);
            }
            None => {}
        }
    }
    let mut seen: Vec<(PathBuf, &Path, Option<String>)> = Vec::new();
    let mut routed: Vec<(u64, &Path)> = Vec::new();
    for path in dumps {
        let d = Dump::open(path)?;
        // One model's load, each dump once: the same file twice would count its tokens twice,
        // and another model's dump adds layers and experts of another routing.
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        let sha = d.metadata().get("config_sha256").cloned();
        for (other, given, other_sha) in &seen {
            if *other == canonical {
                return Err(Error::Usage(format!("{} is given twice", path.display())));
            }
            if let (Some(a), Some(b)) = (&sha, other_sha) {
                if !crate::dump::same_config(a, b) {
                    return Err(Error::Usage(format!(
                        "{} was made from another config.json than {}: audit one model at a time",
                        path.display(),
                        given.display()
                    )));
                }
            }
        }
        audit.config_sha256 = audit.config_sha256.take().or_else(|| sha.clone());
        seen.push((canonical, path, sha));
        if let (Some(c), Some(dir)) = (&ckpt, model_dir) {
            if let Some(m) = d.other_config(&c.config_bytes, dir) {
                eprintln!("glimpse: warning: {m}");
            }
        }
        // Another file of the same routing (a copy, the same prompts run twice) counts twice: said.
        let routing = add_dump(&mut audit, &d, routers.as_ref(), routes.as_deref_mut())?;
        if let Some((_, first)) = routed.iter().find(|(r, _)| *r == routing) {
            eprintln!(
                "glimpse: warning: {} routes every token as {} does (a copy? the same prompts again?): both are counted",
                path.display(),
                first.display()
            );
        }
        routed.push((routing, path));
    }
    // The dumps' own record first: --model's config.json may be the same model in other bytes.
    if audit.config_sha256.is_none() {
        audit.config_sha256 = ckpt.as_ref().map(|c| crate::dump::sha256_hex(&c.config_bytes));
    }
    // The bias of the layers counted only: a layer no dump recorded is not a layer of dead experts.
    if let Some(r) = &routers {
        for a in std::iter::once(&mut audit).chain(other_audit.as_mut()) {
            for (&i, bias) in &r.bias {
                if a.layers.contains_key(&i) {
                    a.set_bias(i, bias.clone());
                }
            }
        }
    }
    if let Some(o) = other_audit.as_mut() {
        o.config_sha256 = audit.config_sha256.clone();
    }
    Ok((audit, other_audit))
}

/// How [`collect`] counts, runs and what else it writes.
pub struct CollectOptions<'a> {
    /// Overrides the expert count (`audit --against` gives the audited side's, and without a
    /// checkpoint both sides' [`expert_count`]); else it comes from the checkpoint, else from the
    /// dumps.
    pub experts: Option<ExpertCount>,
    pub max_memory: Option<u64>,
    /// Where prompts run.
    pub target: crate::device::Target,
    /// How prompts run: each through the whole model, loaded once; or (`--stream`) all of them
    /// layer by layer, each layer read from the checkpoint once for all of them.
    pub residency: Residency,
    /// Keep each token's expert set (`--against` counts the tokens that changed).
    pub keep_sets: bool,
    /// Keep each prompt's load per expert (`--compare`'s chance level; `Audit::per_prompt`).
    pub per_prompt: bool,
    /// Every token's routing, to `audit --routes`'s file.
    pub routes: Option<&'a mut Routes>,
    /// `--layers A..B`: count these layers only (live prompts run no further than B).
    pub window: Option<RangeInclusive<usize>>,
    /// `--mtp`: prompts run live also run the MTP head (where they run), whose layer is counted too.
    pub mtp: bool,
    /// `--against`'s dumps, whose tokens are checked against the audited ones' before any prompt
    /// runs (their routing is read apart, by another [`collect`]).
    pub against: &'a [PathBuf],
}

/// Each dump's tokens, named by its path; none where a dump has no `input_ids`.
fn dump_tokens(dumps: &[PathBuf]) -> Result<Vec<(String, Tokens)>> {
    let mut all = Vec::new();
    for path in dumps {
        let d = Dump::open(path)?;
        if !d.contains("input_ids") {
            return Ok(Vec::new());
        }
        all.push((path.display().to_string(), d.tokens()?));
    }
    Ok(all)
}

/// `--against` dumps hold the audited runs' tokens, row for row and in order (each a batch row
/// of a prompt line or a dump). Not checked where a side's dumps lack `input_ids`: the counts'
/// check after the audit is then the only one.
fn check_against(ours: Vec<(String, Tokens)>, against: &[PathBuf]) -> Result<()> {
    let theirs = dump_tokens(against)?;
    if ours.is_empty() || theirs.is_empty() {
        return Ok(());
    }
    let rows = |runs: &[(String, Tokens)]| -> Vec<(String, Vec<u32>)> {
        let row = |(from, t): &(String, Tokens)| {
            let each = t.ids.chunks(t.seq.max(1)).enumerate();
            each.map(|(r, ids)| (if t.batch > 1 { format!("{from} row {r}") } else { from.clone() }, ids.to_vec()))
                .collect::<Vec<_>>()
        };
        runs.iter().flat_map(row).collect()
    };
    let (ours, theirs) = (rows(&ours), rows(&theirs));
    const ORDER: &str = "--against takes the dumps of the same prompts, in the same order";
    if ours.len() != theirs.len() {
        let msg =
            format!("the audited runs hold {} rows of tokens, --against's dumps {}: {ORDER}", ours.len(), theirs.len());
        return Err(Error::Usage(msg));
    }
    fn ids(rows: &[(String, Vec<u32>)]) -> Vec<&[u32]> {
        rows.iter().map(|(_, ids)| ids.as_slice()).collect()
    }
    match super::shift::first_difference(&ids(&ours), &ids(&theirs)) {
        Some(d) => Err(Error::Usage(format!(
            "{} differs from --against {} at position {} ({} vs {}): {ORDER}",
            ours[d.row].0, theirs[d.row].0, d.position, d.ours, d.theirs
        ))),
        None => Ok(()),
    }
}

/// Layer numbers as runs: `2..4, 7`.
fn list(layers: &[usize]) -> String {
    let mut sorted = layers.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for i in sorted {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => runs.push((i, i)),
        }
    }
    let run = |&(a, b): &(usize, usize)| if a == b { a.to_string() } else { format!("{a}..{b}") };
    runs.iter().map(run).collect::<Vec<_>>().join(", ")
}

/// A `--layers` window must hold a MoE layer of the checkpoint (or, for dumps, its MTP layer,
/// `num_hidden_layers`): else the audit would count nothing.
fn check_window(cfg: &crate::config::Config, w: &RangeInclusive<usize>, live: bool) -> Result<()> {
    let n = cfg.num_hidden_layers;
    let last = if live { n.saturating_sub(1) } else { n };
    if *w.end() > last {
        let what = if live { "last layer" } else { "last layer (its MTP layer)" };
        // (Prompts run live reach the MTP layer with --mtp.)
        let mtp = if live && *w.end() == n { " (its MTP layer runs with --mtp)" } else { "" };
        let (a, b) = (w.start(), w.end());
        return Err(Error::Usage(format!("--layers {a}..{b} runs past --model's {what}, {last}{mtp}")));
    }
    let moe: Vec<usize> = (0..n).filter(|&i| cfg.mlp_kind(i) == crate::config::MlpKind::Moe).collect();
    let mtp = !live && w.contains(&n);
    if moe.iter().any(|i| w.contains(i)) || mtp {
        return Ok(());
    }
    let theirs = match moe.len() {
        0 => "it has no MoE layer".into(),
        1 => format!("its MoE layer is {}", list(&moe)),
        _ => format!("its MoE layers are {}", list(&moe)),
    };
    let mtp = if live { String::new() } else { format!(", its MTP layer {n}") };
    Err(Error::Usage(format!("--layers {}..{} holds no MoE layer of --model: {theirs}{mtp}", w.start(), w.end())))
}

/// How many routed experts an audit counts, and whether that is a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertCount {
    pub n: usize,
    /// Counted from the largest id (no router logits recorded): experts above it cannot show as
    /// dead.
    pub guessed: bool,
}

impl ExpertCount {
    /// The warning a guessed count deserves; None for a known one.
    pub fn warning(self) -> Option<String> {
        self.guessed.then(|| {
            format!(
                "the dumps hold no router logits: {} experts counted from the largest id, so experts above it cannot \
                 show as dead (--model DIR gives the checkpoint's count)",
                self.n
            )
        })
    }
}

/// The expert count of dumps without a checkpoint: the width of the first router they record,
/// else the largest expert id of any of them + 1 (a guess). `audit --against` asks it of both
/// sides' dumps at once, so the two count the same experts.
pub fn expert_count(dumps: &[PathBuf]) -> Result<ExpertCount> {
    Ok(match router_width(dumps)? {
        Some(n) => ExpertCount { n, guessed: false },
        None => ExpertCount { n: largest_id(dumps)?, guessed: true },
    })
}

/// One dump's routing: every `layers.{i}.moe.topk_ids`, checked against the dump's tokens (one
/// row a token; the MTP layer's one fewer a row) and its flags (recorded, or recomputed from the
/// router logits with the checkpoint's routers). Returns a hash of its tokens and routing.
fn add_dump(audit: &mut Audit, d: &Dump, routers: Option<&Routers>, mut routes: Option<&mut Routes>) -> Result<u64> {
    use std::hash::{Hash, Hasher};
    let mut routing = std::collections::hash_map::DefaultHasher::new();
    let tokens = d.contains("input_ids").then(|| d.tokens()).transpose()?;
    let layers: Vec<usize> = d
        .names()
        .iter()
        .filter_map(|n| match HookPoint::parse(n)? {
            HookPoint::Layer(i, LayerHook::TopkIds) => Some(i),
            _ => None,
        })
        .collect();
    if layers.is_empty() {
        return Err(Error::dump(&d.path, "holds no `layers.*.moe.topk_ids` to audit"));
    }
    let all = layers.clone();
    let layers: Vec<usize> = layers.into_iter().filter(|&i| counted(audit.window.as_ref(), i)).collect();
    if let (true, Some(w)) = (layers.is_empty(), &audit.window) {
        let msg = format!("routes no layer of --layers {}..{} (its MoE layers: {})", w.start(), w.end(), list(&all));
        return Err(Error::dump(&d.path, msg));
    }
    // The MTP head's layer runs one position fewer a row: the config's layer, else the dump's
    // last, when its rows say so.
    let last = layers.iter().max().copied();
    // The batch rows, each a prompt: the tokens', else found with the first layer's rows.
    let mut prompts = None;
    for i in layers {
        let name = format!("layers.{i}.moe.topk_ids");
        let (Values::I64(ids), shape) = d.values(&name)? else {
            return Err(Error::dump(&d.path, format!("`{name}` must be an integer tensor")));
        };
        // (`[B, S, k]`, outside the spec, is read as its `[B*S, k]`.)
        let k = match shape[..] {
            [_, .., k] if k > 0 => k,
            _ => {
                let msg = format!("`{name}` has shape {shape:?}: the spec's is [tokens, experts per token], k > 0");
                return Err(Error::dump(&d.path, msg));
            }
        };
        (i, &ids, &shape).hash(&mut routing);
        let router = match routers.map(|r| r.layer(i)) {
            // The checkpoint's bias would be read as this layer's: another model's routing.
            // Released and quantised checkpoints often leave the MTP layer out: counted unbiased.
            Some(None) if audit.mtp_layer == Some(i) => {
                let path = d.path.display();
                eprintln!("glimpse: warning: {path}: --model holds no MTP layer: layer {i} counted without its bias");
                None
            }
            Some(None) => {
                let msg =
                    format!("`{name}`: --model has no MoE layer {i} (no correction bias): another model's routing");
                return Err(Error::dump(&d.path, msg));
            }
            Some(Some(r)) => Some(r),
            None => None,
        };
        if let Some((rc, _)) = router.filter(|(rc, _)| rc.top_k != k) {
            let msg =
                format!("`{name}` chooses {k} experts a token, the checkpoint's num_experts_per_tok {}", rc.top_k);
            return Err(Error::dump(&d.path, msg));
        }
        let rows = ids.len() / k;
        if rows == 0 {
            return Err(Error::dump(&d.path, format!("`{name}` has shape {shape:?}: it routes no token")));
        }
        // The run's [B, S]: its input_ids', else its other hook points' (which only mark the MTP
        // layer: without the ids, rows that fit neither are split by `batch_without_ids`).
        let ids_dims = tokens.as_ref().map(|t| (t.batch, t.seq));
        if let Some((batch, seq)) = ids_dims.or_else(|| d.positions()) {
            let fits = |positions: usize| rows == batch * positions;
            let may_be_mtp = audit.mtp_layer.map_or(Some(i) == last, |m| m == i);
            if may_be_mtp && !fits(seq) && fits(seq.saturating_sub(1)) {
                audit.mtp_layer = Some(i);
            } else if !fits(seq) && ids_dims.is_some() {
                return Err(Error::dump(
                    &d.path,
                    format!("`{name}` holds {rows} tokens' experts, its input_ids {batch} x {seq}"),
                ));
            }
        }
        // Routing made from NaN gate logits is counted as recorded, but said: its experts are
        // the NaNs' (they rank first), not a model's choice.
        let name_logits = format!("layers.{i}.moe.router_logits");
        let logits = match d.values(&name_logits) {
            Ok((Values::F32(v), shape)) => Some((v, shape)),
            _ => None,
        };
        if let Some((v, shape)) = &logits {
            if let Some(at) = v.iter().position(|x| x.is_nan()).map(|i| crate::compare::coord(shape, i)) {
                let path = d.path.display();
                eprintln!(
                    "glimpse: warning: {path}: `{name_logits}` holds NaN at {at:?}: its routing is counted as recorded"
                );
            }
        }
        if let (Some((rc, bias)), Some((v, shape))) = (router, &logits) {
            // Without the bias: the checkpoint's rule on the dump's gate logits.
            let fits = shape.last() == Some(&bias.len()) && v.len() == rows * bias.len();
            if let Some(ids) = fits.then(|| unbiased(rc, v, bias.len())).flatten() {
                audit.add_unbiased(i, &ids, rc.top_k);
            }
        }
        let flags = match d.values(&format!("layers.{i}.moe.bias_changed")) {
            Ok((Values::I64(f), _)) => Some(f),
            // A dump without the flags (e.g. a transformers reference) still has the router
            // logits: with the checkpoint's bias, decide what the bias changed.
            _ => bias_changed_from_logits(routers, d, i, rows, logits.as_ref())?,
        };
        let prompts =
            *prompts.get_or_insert_with(|| tokens.as_ref().map_or_else(|| batch_without_ids(d, rows), |t| t.batch));
        audit.add(i, &ids, k, prompts, flags.as_deref()).map_err(|e| Error::dump(&d.path, format!("`{name}` {e}")))?;
        // (After `add`, which names ids chosen twice or past the router as such.)
        let weights = match d.values(&format!("layers.{i}.moe.topk_weights")) {
            Ok((Values::F32(w), _)) if w.len() == ids.len() => Some(w),
            _ => None,
        };
        if let Some(w) = &weights {
            audit.add_mass(i, &ids, w, k);
        }
        if let (Some((rc, bias)), Some((v, shape))) = (router, &logits) {
            if shape.last() == Some(&bias.len()) && v.len() == rows * bias.len() {
                // Each token routed once, for both checks.
                let routes: Vec<Route> =
                    v.chunks(bias.len()).map(|row| crate::model::moe::route(rc, row, bias)).collect();
                check_rule(d, &name, rc.top_k, &routes, v, &ids)?;
                if let Some(w) = &weights {
                    check_weights(d, i, rc.top_k, &routes, &ids, w);
                }
            }
        }
        // Recorded, or recomputed from the gate logits with --model's router.
        let margin =
            crate::flips::margins_in(d, HookPoint::Layer(i, LayerHook::TopkIds), router).filter(|m| m.len() == rows);
        if let Some(m) = &margin {
            audit.add_margins(i, m);
        }
        if let Some(r) = routes.as_deref_mut() {
            let l = LayerRoutes { layer: i, ids: &ids, k, weights: weights.as_deref(), margin: margin.as_deref() };
            let run = r.runs;
            r.layer(run, prompts, tokens.as_ref(), &l)?;
        }
    }
    if let Some(r) = routes {
        r.runs += 1;
    }
    tokens.as_ref().map(|t| &t.ids).hash(&mut routing);
    audit.runs.push(Run { batch: prompts.unwrap_or(1), tokens, source: d.path.display().to_string() });
    Ok(routing.finish())
}

/// Checks that `ids` (`[tokens, k]`) are what --model's router picks from the dump's own gate
/// `logits` (`[tokens, experts]`): the bias-based numbers (bias-changed, corr(b,l), w/o bias)
/// take the checkpoint's bias as the one that chose. Another checkpoint of the same config (an
/// earlier training step) passed unseen, its numbers another model's. Tokens decided by less
/// than the near-tie margin are not counted (a rounding may flip those: 1e-3, or bf16's 4e-2
/// where the logits hold bf16 values only); a few others are warned of, and most tokens of a
/// layer off the rule refuse the dump.
fn check_rule(d: &Dump, name: &str, k: usize, routes: &[Route], logits: &[f32], ids: &[i64]) -> Result<()> {
    use crate::compare::Tolerance;
    let bf16 = logits.iter().all(|&x| crate::compare::is_bf16(x));
    let near_tie = if bf16 { Tolerance { atol: 2e-2, rtol: 2e-2 } } else { Tolerance::default() }.near_tie();
    let tokens = routes.len();
    let off = routes
        .iter()
        .zip(ids.chunks(k.max(1)))
        .filter(|(route, recorded)| {
            let mut picked: Vec<i64> = route.ids.iter().map(|&x| x as i64).collect();
            let mut recorded = recorded.to_vec();
            picked.sort_unstable();
            recorded.sort_unstable();
            picked != recorded && route.margin as f64 >= near_tie
        })
        .count();
    let what = format!(
        "`{name}`: {off} of {tokens} tokens' experts are not the ones --model's router picks from the dump's gate \
         logits (sigmoid + its correction bias) by a margin of {near_tie:e} or more"
    );
    if 2 * off > tokens {
        return Err(Error::dump(
            &d.path,
            format!("{what}: another model's routing, or another rule (the bias left out? `diff --model` names it)"),
        ));
    }
    if off > 0 {
        eprintln!(
            "glimpse: warning: {}: {what} (another rule, or scores rounded coarser): the bias-based numbers take \
             --model's bias as the one that chose",
            d.path.display()
        );
    }
    Ok(())
}

/// Warns where the dump's `topk_weights` are not, expert by expert, what --model's router gives
/// the experts `ids` records (normalised sigmoid scores times `routed_scaling_factor`), over
/// the tokens whose experts are the router's: `--routes` pairs each expert with the weight in its
/// slot. Weights of the right values in other slots (ids sorted without their weights) are said
/// as such; other values are another rule, which `diff --model` names.
fn check_weights(d: &Dump, layer: usize, k: usize, routes: &[Route], ids: &[i64], w: &[f32]) {
    let k = k.max(1);
    let close = |a: f32, b: f32| (a - b).abs() <= 2e-2 * b.abs().max(1e-2);
    // Weights moved to other slots are the router's own values: they match once sorted to
    // within rounding (a bf16 copy's 2^-9), where another rule's match only roughly, and a
    // rough match could pair them by chance (a port that weighs with the bias matched 2 of 32).
    let same = |a: f32, b: f32| (a - b).abs() <= 5e-3 * b.abs().max(1e-2);
    let (mut checked, mut misaligned, mut other) = (0, 0, 0);
    for ((route, recorded), weights) in routes.iter().zip(ids.chunks(k)).zip(w.chunks(k)) {
        let rule = |id: i64| route.ids.iter().position(|&x| x as i64 == id).map(|j| route.weights[j]);
        let Some(expected) = recorded.iter().map(|&id| rule(id)).collect::<Option<Vec<f32>>>() else { continue };
        checked += 1;
        if expected.iter().zip(weights).all(|(&x, &y)| close(y, x)) {
            continue;
        }
        let (mut a, mut b) = (expected.clone(), weights.to_vec());
        a.sort_by(f32::total_cmp);
        b.sort_by(f32::total_cmp);
        match a.iter().zip(&b).all(|(&x, &y)| same(y, x)) {
            true => misaligned += 1,
            false => other += 1,
        }
    }
    let path = d.path.display();
    let name = format!("layers.{layer}.moe.topk_weights");
    if misaligned > 0 {
        eprintln!(
            "glimpse: warning: {path}: `{name}`: {misaligned} of {checked} tokens' weights are the router's in other \
             slots than their experts in `moe.topk_ids` (ids reordered without their weights?): --routes pairs \
             experts with the wrong weights"
        );
    }
    if other > 0 {
        eprintln!(
            "glimpse: warning: {path}: `{name}`: {other} of {checked} tokens' weights are not --model's router's for \
             their experts (normalised sigmoid scores x routed_scaling_factor): another rule, which `diff --model` \
             names"
        );
    }
}

/// The batch rows of a dump without `input_ids`, from its `[B, S, ...]` hook points
/// (`Dump::positions`) where they fit the routing's `rows` (the MTP layer's one fewer a row); one
/// (and said) when none records them.
fn batch_without_ids(d: &Dump, rows: usize) -> usize {
    let fits = |&(b, s): &(usize, usize)| rows == b * s || rows == b * s.saturating_sub(1) || rows == b * (s + 1);
    d.positions().filter(fits).map(|(b, _)| b).unwrap_or_else(|| {
        eprintln!(
            "glimpse: warning: {}: no input_ids, nor a [B, S, ...] tensor: counted as one prompt",
            d.path.display()
        );
        1
    })
}

/// Each token's experts without the correction bias, from `[tokens, experts]` gate logits; None
/// where a logit is NaN (it ranks first and would count as a choice: the run's w/o bias stays
/// unknown, recorded or live).
pub(super) fn unbiased(rc: &crate::model::moe::RouterConfig, logits: &[f32], experts: usize) -> Option<Vec<usize>> {
    if logits.iter().any(|x| x.is_nan()) {
        return None;
    }
    Some(logits.chunks(experts.max(1)).flat_map(|row| crate::model::moe::unbiased_ids(rc, row)).collect())
}

/// The width of the first router the dumps record (shapes only: nothing is read).
pub fn router_width(dumps: &[PathBuf]) -> Result<Option<usize>> {
    for path in dumps {
        if let Some(width) = Dump::open(path)?.experts() {
            if width > MAX_EXPERTS {
                let msg = format!("its router logits are {width} experts wide, past the {MAX_EXPERTS} glimpse reads");
                return Err(Error::dump(path, msg));
            }
            return Ok(Some(width));
        }
    }
    Ok(None)
}

/// The largest expert id of any layer of any dump, + 1: a guess of the expert count, blind to
/// experts above it (for dumps that record no router).
fn largest_id(dumps: &[PathBuf]) -> Result<usize> {
    let mut largest = 0;
    for path in dumps {
        let d = Dump::open(path)?;
        for name in d.names().iter().filter(|n| n.ends_with(".moe.topk_ids")) {
            if let (Values::I64(ids), shape) = d.values(name)? {
                if let Some(msg) = crate::compare::invalid_expert_ids(&ids, &shape, None) {
                    return Err(Error::dump(&d.path, format!("`{name}` {msg}")));
                }
                largest = ids.iter().fold(largest, |m, &id| m.max(id as usize + 1));
            }
        }
    }
    Ok(largest)
}

/// Per token of `layer` (`rows` of them), whether the correction bias changed its expert set,
/// from the dump's router `logits` (with their shape) and the checkpoint's routers; None when
/// either is missing.
fn bias_changed_from_logits(
    routers: Option<&Routers>,
    d: &Dump,
    layer: usize,
    rows: usize,
    logits: Option<&(Vec<f32>, Vec<usize>)>,
) -> Result<Option<Vec<i64>>> {
    let (Some((rc, bias)), Some((logits, shape))) = (routers.and_then(|r| r.layer(layer)), logits) else {
        return Ok(None);
    };
    let e = bias.len();
    if shape.last() != Some(&e) || logits.len() != rows * e {
        return Err(Error::dump(
            &d.path,
            format!("layer {layer}: router_logits have {shape:?}, for {rows} tokens of the model's {e} experts"),
        ));
    }
    use crate::model::moe::{bias_changed, route};
    Ok(Some(logits.chunks(e).map(|row| bias_changed(rc, row, &route(rc, row, bias).ids) as i64).collect()))
}
