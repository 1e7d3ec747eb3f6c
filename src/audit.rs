//! `audit`: expert load balance per MoE layer, over one or many prompts (or over the routing a dump
//! recorded). Only counts are kept, never activations, so any number of prompts fits in memory.
//!
//! Per layer: tokens per expert, MaxVio (`max load / mean load - 1`, the DeepSeek-V3 measure),
//! coefficient of variation, normalised entropy of the load distribution, balancedness
//! (`mean / max`), dead experts, the share of tokens whose expert set the correction bias changed,
//! and the Pearson correlation between each expert's bias and its load.

use std::collections::BTreeMap;
use std::fmt::Write;

use candle_core::Tensor;
use serde_json::{json, Value};

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::dump::{Dump, Values};
use crate::error::{Context, Error, Result};
use crate::hooks::{HookPoint, LayerHook, Observer};
use crate::model::{Model, Tokens};

/// How one layer's load moved against a reference's (`Audit::shift`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerShift {
    pub layer: usize,
    /// The reference's routing slots (tokens x k).
    pub slots: u64,
    /// The share of them that went to other experts.
    pub moved: f64,
    /// Up to three experts that gained most, and lost most: (expert, tokens gained or lost).
    pub gained: Vec<(usize, i64)>,
    pub lost: Vec<(usize, i64)>,
}

/// The routing counts of one MoE layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerLoad {
    pub layer: usize,
    /// Selections per expert (a token choosing k experts adds 1 to each).
    pub counts: Vec<u64>,
    pub tokens: u64,
    /// Tokens whose chosen set would differ without the bias, of `bias_known` tokens whose flags
    /// are known (runs mixed with dumps that lack them count only the others); None when unknown.
    pub bias_changed: Option<u64>,
    pub bias_known: u64,
    pub bias: Option<Vec<f32>>,
}

/// The derived balance numbers of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub max_vio: f64,
    pub cv: f64,
    pub entropy: f64,
    pub balancedness: f64,
    pub dead: usize,
    pub bias_changed_share: Option<f64>,
    pub bias_load_corr: Option<f64>,
}

impl LayerLoad {
    pub fn new(layer: usize, experts: usize) -> Self {
        LayerLoad { layer, counts: vec![0; experts], ..Default::default() }
    }

    pub fn stats(&self) -> Stats {
        let e = self.counts.len().max(1) as f64;
        let loads: Vec<f64> = self.counts.iter().map(|&c| c as f64).collect();
        let total: f64 = loads.iter().sum();
        let mean = total / e;
        let max = loads.iter().copied().fold(0.0, f64::max);
        let var = loads.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / e;
        let entropy = if total > 0.0 && e > 1.0 {
            -loads.iter().filter(|&&l| l > 0.0).map(|l| (l / total) * (l / total).ln()).sum::<f64>() / e.ln()
        } else {
            0.0
        };
        Stats {
            max_vio: if mean > 0.0 { max / mean - 1.0 } else { 0.0 },
            cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
            entropy,
            balancedness: if max > 0.0 { mean / max } else { 0.0 },
            dead: self.counts.iter().filter(|&&c| c == 0).count(),
            bias_changed_share: self
                .bias_changed
                .filter(|_| self.bias_known > 0)
                .map(|c| c as f64 / self.bias_known as f64),
            bias_load_corr: self.bias.as_ref().and_then(|b| pearson(b.iter().map(|&x| x as f64).collect(), &loads)),
        }
    }
}

/// `Audit::shift` as JSON: per layer, slots, moved share, and the gained / lost experts.
pub fn shift_json(shift: &[LayerShift]) -> Value {
    let pairs = |v: &[(usize, i64)]| v.iter().map(|(e, d)| json!({"expert": e, "tokens": d})).collect::<Vec<_>>();
    Value::Array(
        shift
            .iter()
            .map(|l| {
                json!({"layer": l.layer, "slots": l.slots, "moved": l.moved, "gained": pairs(&l.gained), "lost": pairs(&l.lost)})
            })
            .collect(),
    )
}

/// Pearson correlation; None when either side is constant.
pub fn pearson(x: Vec<f64>, y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n as f64, y.iter().sum::<f64>() / n as f64);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx.sqrt() * syy.sqrt()))
}

/// Accumulates routing over any number of runs.
#[derive(Debug, Default)]
pub struct Audit {
    pub layers: BTreeMap<usize, LayerLoad>,
    pub experts: usize,
    /// The expert count is the dumps' largest id + 1, not a model's or a router's.
    pub experts_guessed: bool,
    pub prompts: usize,
    /// Each run's token ids, in order (None for a dump without `input_ids`): `--against` must
    /// have run the same.
    pub inputs: Vec<Option<Tokens>>,
    /// The model's `config_sha256`: the checkpoint's, else the first dump's that records one.
    pub config_sha256: Option<String>,
}

impl Audit {
    pub fn new(experts: usize) -> Self {
        Audit { experts, ..Default::default() }
    }

    /// Adds one layer's chosen ids (`[tokens, k]`, flattened) and optional bias-changed flags.
    /// Returns the first id outside `0..experts`, adding nothing, when there is one.
    pub fn add(&mut self, layer: usize, ids: &[i64], k: usize, bias_changed: Option<&[i64]>) -> Option<i64> {
        let experts = self.experts;
        if let Some(&bad) = ids.iter().find(|&&id| id < 0 || id as usize >= experts) {
            return Some(bad);
        }
        let l = self.layers.entry(layer).or_insert_with(|| LayerLoad::new(layer, experts));
        for &id in ids {
            l.counts[id as usize] += 1;
        }
        l.tokens += (ids.len() / k.max(1)) as u64;
        if let Some(flags) = bias_changed {
            *l.bias_changed.get_or_insert(0) += flags.iter().filter(|&&f| f != 0).count() as u64;
            l.bias_known += flags.len() as u64;
        }
        None
    }

    pub fn set_bias(&mut self, layer: usize, bias: Vec<f32>) {
        let experts = self.experts;
        self.layers.entry(layer).or_insert_with(|| LayerLoad::new(layer, experts)).bias = Some(bias);
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "expert load over {} prompt(s), {} experts\n{:>5} {:>8} {:>8} {:>7} {:>8} {:>9} {:>5} {:>12} {:>10}  {:<30}  rarest (expert:tokens)\n",
            self.prompts, self.experts, "layer", "tokens", "MaxVio", "CV", "entropy", "balanced", "dead", "bias-changed", "corr(b,l)", "busiest (expert:tokens)"
        );
        for l in self.layers.values() {
            let st = l.stats();
            let opt = |x: Option<f64>, pct: bool| match x {
                Some(v) if pct => format!("{:.1}%", 100.0 * v),
                Some(v) => format!("{v:.3}"),
                None => "-".into(),
            };
            let mut order: Vec<usize> = (0..l.counts.len()).collect();
            order.sort_by(|&a, &b| l.counts[b].cmp(&l.counts[a]).then(a.cmp(&b)));
            let list = |experts: &mut dyn Iterator<Item = &usize>| {
                experts.take(3).map(|&e| format!("{e}:{}", l.counts[e])).collect::<Vec<_>>().join(" ")
            };
            // With few experts the rarest are those the busiest leave.
            let rarest_pool: Vec<usize> = order.iter().rev().take(order.len().saturating_sub(3)).copied().collect();
            let (busiest, rarest) = (list(&mut order.iter()), list(&mut rarest_pool.iter()));
            let _ = writeln!(
                s,
                "{:>5} {:>8} {:>8.3} {:>7.3} {:>8.3} {:>9.3} {:>5} {:>12} {:>10}  {busiest:<30}  {rarest}",
                l.layer,
                l.tokens,
                st.max_vio,
                st.cv,
                st.entropy,
                st.balancedness,
                st.dead,
                opt(st.bias_changed_share, true),
                opt(st.bias_load_corr, false),
            );
        }
        s
    }

    /// Refuses a reference of another model, or whose runs held other tokens (or, where ids
    /// are not recorded, another count of routing slots): their loads would differ by the
    /// inputs, not by the routing.
    pub fn check_comparable(&self, reference: &Audit) -> Result<()> {
        if let (Some(a), Some(b)) = (&self.config_sha256, &reference.config_sha256) {
            if a != b {
                return Err(Error::Usage("--against was made from another config.json: one model's routing".into()));
            }
        }
        if let (Some(ours), Some(theirs)) = (rows(&self.inputs), rows(&reference.inputs)) {
            if ours.len() != theirs.len() {
                return Err(Error::Usage(format!(
                    "the audited runs hold {} rows of tokens, --against {}: it must run the same prompts",
                    ours.len(),
                    theirs.len()
                )));
            }
            if let Some((r, (a, b))) = ours.iter().zip(&theirs).enumerate().find(|(_, (a, b))| a != b) {
                let p = a.iter().zip(b.iter()).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
                let id = |row: &[u32]| row.get(p).map_or("none".to_string(), u32::to_string);
                return Err(Error::Usage(format!(
                    "row {r} of the audited runs differs from --against's at position {p} ({} vs {}): it must run the same prompts",
                    id(a),
                    id(b)
                )));
            }
        }
        let slots = |l: &LayerLoad| l.counts.iter().sum::<u64>();
        let mut common = 0;
        for (i, l) in &self.layers {
            let Some(r) = reference.layers.get(i) else { continue };
            common += 1;
            if slots(l) != slots(r) {
                return Err(Error::Usage(format!(
                    "layer {i}: {} routing slots against the reference's {}: --against must run the same tokens",
                    slots(l),
                    slots(r)
                )));
            }
        }
        if common == 0 {
            return Err(Error::Usage("--against shares no MoE layer with the audited runs".into()));
        }
        Ok(())
    }

    /// Per layer, how the load moved from `reference`'s to this one (same model, the same layers):
    /// the share of routing slots that went to other experts (`sum |ours - reference| / 2` over
    /// the reference's slots) and the experts that gained and lost most. A net measure of load:
    /// tokens that swapped experts both ways cancel out (`diff` counts the flips themselves).
    pub fn shift(&self, reference: &Audit) -> Vec<LayerShift> {
        self.layers
            .iter()
            .filter_map(|(i, l)| {
                let r = reference.layers.get(i)?;
                // (Two guessed expert counts may differ: a missing expert has no tokens.)
                let count = |c: &[u64], e: usize| c.get(e).copied().unwrap_or(0) as i64;
                let delta: Vec<i64> = (0..l.counts.len().max(r.counts.len()))
                    .map(|e| count(&l.counts, e) - count(&r.counts, e))
                    .collect();
                let slots: u64 = r.counts.iter().sum();
                let moved = delta.iter().map(|d| d.unsigned_abs()).sum::<u64>() as f64 / 2.0 / slots.max(1) as f64;
                let mut order: Vec<usize> = (0..delta.len()).collect();
                order.sort_by(|&a, &b| delta[b].cmp(&delta[a]).then(a.cmp(&b)));
                let pick = |it: &mut dyn Iterator<Item = &usize>, keep: &dyn Fn(i64) -> bool| {
                    it.filter(|&&e| keep(delta[e])).take(3).map(|&e| (e, delta[e])).collect::<Vec<_>>()
                };
                let gained = pick(&mut order.iter(), &|d| d > 0);
                let lost = pick(&mut order.iter().rev(), &|d| d < 0);
                Some(LayerShift { layer: *i, slots, moved, gained, lost })
            })
            .collect()
    }

    pub fn shift_table(&self, reference: &Audit) -> String {
        let list = |v: &[(usize, i64)]| v.iter().map(|(e, d)| format!("{e}:{d:+}")).collect::<Vec<_>>().join(" ");
        let mut s = format!(
            "load shift against the reference ({} prompt(s)): share of routing slots moved to other experts\n\
             {:>5} {:>8} {:>7}  {:<30}  lost most\n",
            reference.prompts, "layer", "slots", "moved", "gained most"
        );
        for l in self.shift(reference) {
            let moved = format!("{:.1}%", 100.0 * l.moved);
            let _ = writeln!(s, "{:>5} {:>8} {moved:>7}  {:<30}  {}", l.layer, l.slots, list(&l.gained), list(&l.lost));
        }
        s
    }

    pub fn to_json(&self) -> Value {
        let layers: Vec<Value> = self
            .layers
            .values()
            .map(|l| {
                let st = l.stats();
                json!({
                    "layer": l.layer, "tokens": l.tokens, "counts": l.counts, "max_vio": st.max_vio, "cv": st.cv,
                    "entropy": st.entropy, "balancedness": st.balancedness, "dead_experts": st.dead,
                    "bias_changed_share": st.bias_changed_share, "bias_load_correlation": st.bias_load_corr,
                })
            })
            .collect();
        json!({ "prompts": self.prompts, "experts": self.experts, "layers": layers })
    }

    /// One row per (layer, expert): `layer,expert,count,share,bias`.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("layer,expert,count,share,bias\n");
        for l in self.layers.values() {
            let total = l.counts.iter().sum::<u64>().max(1) as f64;
            for (e, &c) in l.counts.iter().enumerate() {
                let bias = l.bias.as_ref().and_then(|b| b.get(e)).map(|b| b.to_string()).unwrap_or_default();
                let _ = writeln!(s, "{},{e},{c},{:.6},{bias}", l.layer, c as f64 / total);
            }
        }
        s
    }
}

/// Every run's batch rows in order; None when a run's ids are unknown.
fn rows(inputs: &[Option<Tokens>]) -> Option<Vec<&[u32]>> {
    let runs = inputs.iter().map(|t| t.as_ref().map(|t| t.ids.chunks(t.seq.max(1)))).collect::<Option<Vec<_>>>()?;
    Some(runs.into_iter().flatten().collect())
}

/// Collects routing counts during forward passes, without keeping any activation.
pub struct AuditObserver<'a> {
    pub audit: &'a mut Audit,
    ids: Option<(usize, Vec<i64>, usize)>,
}

impl<'a> AuditObserver<'a> {
    pub fn new(audit: &'a mut Audit) -> Self {
        AuditObserver { audit, ids: None }
    }
}

impl Observer for AuditObserver<'_> {
    fn wants(&self, point: HookPoint) -> bool {
        matches!(point, HookPoint::Layer(_, LayerHook::TopkIds | LayerHook::BiasChanged))
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        match point {
            // The forward pass reports ids, then the bias flags of the same layer.
            HookPoint::Layer(i, LayerHook::TopkIds) => {
                let k = value.dims().last().copied().unwrap_or(1);
                self.ids = Some((i, value.flatten_all()?.to_vec1::<i64>()?, k));
            }
            HookPoint::Layer(i, LayerHook::BiasChanged) => {
                let flags = value.flatten_all()?.to_vec1::<i64>()?;
                if let Some((layer, ids, k)) = self.ids.take().filter(|(l, _, _)| *l == i) {
                    if let Some(bad) = self.audit.add(layer, &ids, k, Some(&flags)) {
                        return Err(Error::Usage(format!("layer {layer}: expert id {bad} out of range")));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Routing counts over prompts run live (`prompts`: one per line, token ids or text) and over
/// recorded dumps. The model, when given, supplies each expert's bias and lets dumps without
/// `moe.bias_changed` flags have them recomputed from their router logits.
/// `experts` overrides the expert count (`audit --against` gives the audited side's), else it
/// comes from the model, else from the dumps.
pub fn collect(
    model_dir: Option<&Path>,
    prompts: Option<&Path>,
    dumps: &[PathBuf],
    experts: Option<usize>,
    max_memory: Option<u64>,
    target: crate::device::Target,
) -> Result<Audit> {
    let ckpt = model_dir.map(Checkpoint::open).transpose()?;
    // Prompts are read and encoded before the model is loaded, so the memory check sees them.
    let prompt_tokens = match (prompts, model_dir) {
        (Some(path), Some(dir)) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            // Blank lines and `#` comments are skipped; lines keep their numbers for errors.
            let lines: Vec<(usize, &str)> =
                text.lines().map(str::trim).enumerate().filter(|(_, l)| !l.is_empty() && !l.starts_with('#')).collect();
            if lines.is_empty() {
                return Err(Error::Usage(format!("{}: no prompts (one per line)", path.display())));
            }
            let encode = |&(n, line): &(usize, &str)| -> Result<(usize, Tokens)> {
                // Ids (`;` separating batch rows, as --tokens takes them), else text: a line of
                // digits and spaces alone ("1 2 3") is text, as before.
                let ids = line.chars().all(|c| c.is_ascii_digit() || matches!(c, ',' | ';' | ' '))
                    && (line.contains([',', ';']) || line.chars().all(|c| c.is_ascii_digit()));
                let tokens = if ids { Tokens::parse(line) } else { crate::tokenizer::encode(dir, line) };
                Ok((n + 1, tokens.context(|| format!("{} line {}", path.display(), n + 1))?))
            };
            lines.iter().map(encode).collect::<Result<Vec<(usize, Tokens)>>>()?
        }
        (Some(_), None) => return Err(Error::Usage("--prompts needs --model".into())),
        (None, _) => Vec::new(),
    };
    if let (Some(c), Some(longest)) = (&ckpt, prompt_tokens.iter().map(|(_, t)| t).max_by_key(|t| t.ids.len())) {
        crate::memory::check_run(c, longest.batch, longest.seq, false, max_memory, "shorter prompts")?;
    }
    let model = ckpt.as_ref().map(Model::load).transpose()?;
    let mut guessed_experts = None;
    let experts = match (experts, &model) {
        (Some(n), _) => match router_width(dumps)? {
            Some(width) if width != n => {
                return Err(Error::Usage(format!(
                    "the dumps' routers have {width} experts, not {n}: one model's routing"
                )))
            }
            _ => n,
        },
        (None, Some(m)) => m.config.n_routed_experts,
        (None, None) => match router_width(dumps)? {
            Some(width) => width,
            None => {
                let n = largest_id(dumps)?;
                guessed_experts = Some(n);
                n
            }
        },
    };
    let mut audit = Audit::new(experts);
    audit.experts_guessed = guessed_experts.is_some();
    if let (Some(m), Some(path)) = (&model, prompts) {
        let progress = std::io::stderr().is_terminal();
        crate::device::with_prefill(target, m, |p| {
            for (n, (line, tokens)) in prompt_tokens.iter().enumerate() {
                if progress {
                    eprint!("\raudit: prompt {}/{}", n + 1, prompt_tokens.len());
                }
                p.prefill(tokens, &mut AuditObserver::new(&mut audit))
                    .map_err(|e| Error::Usage(format!("{} line {line}: {e}", path.display())))?;
                audit.prompts += tokens.batch;
                audit.inputs.push(Some(tokens.clone()));
            }
            Ok(())
        })?;
        if progress {
            eprintln!();
        }
    }
    let mut seen: Vec<(PathBuf, &Path, Option<String>)> = Vec::new();
    for path in dumps {
        let d = Dump::open(path)?;
        // One model's load, each dump once: the same file twice would count its tokens twice,
        // and another model's dump adds layers and experts of another routing.
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        let sha = d.metadata().get("config_sha256").cloned();
        for (other, given, other_sha) in &seen {
            if *other == canonical {
                return Err(Error::Usage(format!("--dump {} is given twice", path.display())));
            }
            if let (Some(a), Some(b)) = (&sha, other_sha) {
                if a != b {
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
        let mut found = false;
        for name in d.names() {
            let Some(layer) = name.strip_prefix("layers.").and_then(|r| r.strip_suffix(".moe.topk_ids")) else {
                continue;
            };
            let Ok(i) = layer.parse::<usize>() else { continue };
            let (Values::I64(ids), shape) = d.values(&name)? else {
                return Err(Error::dump(path, format!("`{name}` must be an integer tensor")));
            };
            let flags = match d.values(&format!("layers.{i}.moe.bias_changed")) {
                Ok((Values::I64(f), _)) => Some(f),
                // A dump without the flags (e.g. a transformers reference) still has the router
                // logits: with the model's bias, decide what the bias changed.
                _ => bias_changed_from_logits(model.as_ref(), &d, i)?,
            };
            if let Some(bad) = audit.add(i, &ids, shape.last().copied().unwrap_or(1), flags.as_deref()) {
                return Err(Error::dump(path, format!("`{name}` holds expert id {bad}, outside 0..{}", audit.experts)));
            }
            found = true;
        }
        if !found {
            return Err(Error::dump(path, "holds no `layers.*.moe.topk_ids` to audit"));
        }
        let tokens = d.contains("input_ids").then(|| d.tokens()).transpose()?;
        audit.prompts += tokens.as_ref().map_or(1, |t| t.batch);
        audit.inputs.push(tokens);
    }
    // The dumps' own record first: --model's config.json may be the same model in other bytes.
    if audit.config_sha256.is_none() {
        audit.config_sha256 = ckpt.as_ref().map(|c| crate::dump::sha256_hex(&c.config_bytes));
    }
    // The bias of the layers counted only: a layer no dump recorded is not a layer of dead experts.
    if let Some(m) = &model {
        for layer in &m.layers {
            if let (crate::model::layer::Ffn::Moe(moe), true) = (&layer.mlp, audit.layers.contains_key(&layer.index)) {
                audit.set_bias(layer.index, moe.e_score_correction_bias.clone());
            }
        }
    }
    if let Some(n) = guessed_experts {
        eprintln!(
            "glimpse: warning: the dumps hold no router logits: {n} experts counted from the largest id, \
             so experts above it cannot show as dead (--model DIR gives the checkpoint's count)"
        );
    }
    Ok(audit)
}

/// The width of the first router the dumps record (shapes only: nothing is read).
fn router_width(dumps: &[PathBuf]) -> Result<Option<usize>> {
    for path in dumps {
        let d = Dump::open(path)?;
        let logits = d.names().into_iter().filter(|n| n.ends_with(".moe.router_logits"));
        if let Some(width) = logits.filter_map(|n| d.shape(&n).and_then(|s| s.last().copied())).next() {
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
            if let (Values::I64(ids), _) = d.values(name)? {
                largest = ids.iter().fold(largest, |m, &id| m.max(id.saturating_add(1).max(0) as usize));
            }
        }
    }
    Ok(largest)
}

/// `moe.bias_changed` recomputed from a dump's `moe.router_logits` and the model's router.
fn bias_changed_from_logits(model: Option<&Model>, d: &Dump, layer: usize) -> Result<Option<Vec<i64>>> {
    let Some(crate::model::layer::Ffn::Moe(moe)) = model.and_then(|m| m.layers.get(layer)).map(|l| &l.mlp) else {
        return Ok(None);
    };
    let Ok((Values::F32(logits), shape)) = d.values(&format!("layers.{layer}.moe.router_logits")) else {
        return Ok(None);
    };
    let e = moe.e_score_correction_bias.len();
    if shape.last() != Some(&e) {
        return Err(Error::dump(
            &d.path,
            format!("layer {layer}: router_logits have {shape:?}, the model has {e} experts"),
        ));
    }
    use crate::model::moe::{bias_changed, route};
    Ok(Some(
        logits
            .chunks(e)
            .map(|row| {
                bias_changed(&moe.router, row, &route(&moe.router, row, &moe.e_score_correction_bias).ids) as i64
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two slots of 8 moved (expert 0 lost two, experts 2 and 3 gained one each); a layer only
    /// one side has is left out.
    #[test]
    fn shift_counts_the_slots_that_moved() {
        let mut ours = Audit::new(4);
        let mut reference = Audit::new(4);
        ours.add(1, &[1, 2, 1, 3, 0, 1, 0, 1], 2, None);
        reference.add(1, &[0, 1, 0, 1, 0, 1, 0, 1], 2, None);
        ours.add(2, &[0, 1], 2, None);
        let shift = ours.shift(&reference);
        assert_eq!(shift.len(), 1);
        let l = &shift[0];
        assert_eq!((l.layer, l.slots, l.moved), (1, 8, 0.25));
        assert_eq!((l.gained.as_slice(), l.lost.as_slice()), (&[(2, 1), (3, 1)][..], &[(0, -2)][..]));
        assert!(ours.shift_table(&reference).contains("25.0%  2:+1 3:+1"));
    }

    /// 4 experts, 3 tokens, top-2: loads [3, 2, 1, 0] by hand.
    #[test]
    fn balance_numbers_by_hand() {
        let mut a = Audit::new(4);
        assert_eq!(a.add(5, &[0, 1, 0, 2, 1, 0], 2, Some(&[1, 0, 0])), None);
        assert_eq!(a.add(5, &[0, 4], 2, None), Some(4), "id 4 of 4 experts");
        a.set_bias(5, vec![0.3, 0.2, 0.1, 0.0]);
        let l = &a.layers[&5];
        assert_eq!(l.counts, vec![3, 2, 1, 0]);
        assert_eq!(l.tokens, 3);
        let s = l.stats();
        // mean load 1.5, max 3.
        approx::assert_abs_diff_eq!(s.max_vio, 3.0 / 1.5 - 1.0);
        approx::assert_abs_diff_eq!(s.balancedness, 0.5);
        // population std of [3,2,1,0] is sqrt(1.25).
        approx::assert_abs_diff_eq!(s.cv, 1.25f64.sqrt() / 1.5, epsilon = 1e-12);
        let p = [0.5f64, 1.0 / 3.0, 1.0 / 6.0];
        let h = -p.iter().map(|x| x * x.ln()).sum::<f64>() / 4f64.ln();
        approx::assert_abs_diff_eq!(s.entropy, h, epsilon = 1e-12);
        assert_eq!(s.dead, 1);
        approx::assert_abs_diff_eq!(s.bias_changed_share.unwrap(), 1.0 / 3.0);
        // Bias and load fall together linearly: correlation 1.
        approx::assert_abs_diff_eq!(s.bias_load_corr.unwrap(), 1.0, epsilon = 1e-6);
        assert!(a.to_csv().contains("5,0,3,0.500000,0.3"));
    }

    #[test]
    fn uniform_load_is_perfectly_balanced() {
        let mut a = Audit::new(3);
        a.add(0, &[0, 1, 2, 0, 1, 2], 1, None);
        let s = a.layers[&0].stats();
        assert_eq!((s.max_vio, s.cv, s.balancedness, s.dead), (0.0, 0.0, 1.0, 0));
        approx::assert_abs_diff_eq!(s.entropy, 1.0, epsilon = 1e-12);
        assert_eq!(s.bias_changed_share, None);
        assert_eq!(s.bias_load_corr, None);
    }

    /// Runs without bias flags, mixed with runs that have them, count in the loads but not in
    /// the share of bias-changed tokens: 1 of the 4 tokens whose flags are known, not of 6.
    #[test]
    fn the_bias_changed_share_counts_only_tokens_whose_flags_are_known() {
        let mut a = Audit::new(3);
        a.add(0, &[0, 1, 2, 0], 1, Some(&[0, 1, 0, 0]));
        a.add(0, &[1, 2], 1, None);
        assert_eq!(a.layers[&0].tokens, 6);
        approx::assert_abs_diff_eq!(a.layers[&0].stats().bias_changed_share.unwrap(), 0.25);
    }
}
