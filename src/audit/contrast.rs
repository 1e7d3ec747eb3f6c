//! `audit --compare`: the load of one set of prompts against another's on the same model (code
//! against prose, one language against another). Their tokens differ, so nothing is compared
//! token by token (that is `--against`, for a port's runs of the same prompts): per layer, the
//! total variation distance between the two load distributions (half the summed difference of
//! each expert's share of the routing slots: 0 the same, 1 disjoint experts), the experts whose
//! share grew and shrank most, and both MaxVios.

use std::fmt::Write;

use serde_json::{json, Value};

use super::chance::{split_distance, NoChance, SplitChance};
use super::{max_vio, Audit};
use crate::error::{Error, Result};

/// One layer of two prompt sets' loads.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerContrast {
    pub layer: usize,
    /// Routing slots (tokens x k) of each side.
    pub slots: u64,
    pub other_slots: u64,
    /// `sum |share - other share| / 2` over the experts.
    pub distance: f64,
    /// The three experts whose share grew most and shrank most (share - other share), ties by id.
    pub gained: Vec<(usize, f64)>,
    pub lost: Vec<(usize, f64)>,
    pub max_vio: f64,
    pub other_max_vio: f64,
    /// How far apart random splits of the pooled prompts fall, or why that is not measured
    /// (None: the prompts' loads were not kept).
    pub chance: Option<Result<SplitChance, NoChance>>,
}

/// Refuses a contrast of another model's routing: another expert count or `k`, or no MoE layer
/// in common. `flag` names the other side (`--compare`, `--compare-prompts`).
pub fn check(ours: &Audit, other: &Audit, flag: &str) -> Result<()> {
    if ours.experts != other.experts {
        let msg = format!("{flag} routes over {} experts, the audited runs over {}", other.experts, ours.experts);
        return Err(Error::Usage(msg));
    }
    for (i, l) in &ours.layers {
        if let Some(r) = other.layers.get(i).filter(|r| r.k != l.k) {
            let msg = format!("layer {i}: {} experts a token against {flag}'s {}: one model's routing", l.k, r.k);
            return Err(Error::Usage(msg));
        }
    }
    if !ours.layers.keys().any(|i| other.layers.contains_key(i)) {
        return Err(Error::Usage(format!("{flag} shares no MoE layer with the audited runs")));
    }
    Ok(())
}

/// Per layer both sides route, their loads' distance and the experts that moved most.
pub fn contrast(ours: &Audit, other: &Audit) -> Vec<LayerContrast> {
    let shares = |c: &[u64]| {
        let total = c.iter().sum::<u64>().max(1) as f64;
        c.iter().map(|&n| n as f64 / total).collect::<Vec<f64>>()
    };
    ours.layers
        .iter()
        .filter_map(|(&layer, l)| {
            let r = other.layers.get(&layer)?;
            let (a, b) = (shares(&l.counts), shares(&r.counts));
            let delta: Vec<f64> = (0..a.len().max(b.len()))
                .map(|e| a.get(e).copied().unwrap_or(0.0) - b.get(e).copied().unwrap_or(0.0))
                .collect();
            let pick = |sign: f64| {
                let mut order: Vec<usize> = (0..delta.len()).filter(|&e| delta[e] * sign > 0.0).collect();
                order.sort_by(|&x, &y| (delta[y] * sign).total_cmp(&(delta[x] * sign)).then(x.cmp(&y)));
                order.into_iter().take(3).map(|e| (e, delta[e])).collect::<Vec<_>>()
            };
            let distance = delta.iter().map(|d| d.abs()).sum::<f64>() / 2.0;
            let chance = match (&l.prompt_counts, &r.prompt_counts) {
                (Some(a), Some(b)) => Some(split_distance(a, b, ours.experts, distance)),
                _ => None,
            };
            Some(LayerContrast {
                layer,
                slots: l.counts.iter().sum(),
                other_slots: r.counts.iter().sum(),
                distance,
                gained: pick(1.0),
                lost: pick(-1.0),
                max_vio: max_vio(&l.counts),
                other_max_vio: max_vio(&r.counts),
                chance,
            })
        })
        .collect()
}

/// The contrast as a table (share changes in percentage points).
pub fn table(c: &[LayerContrast], prompts: usize, other_prompts: usize) -> String {
    let list =
        |v: &[(usize, f64)]| v.iter().map(|(e, d)| format!("{e}:{:+.1}", 100.0 * d)).collect::<Vec<_>>().join(" ");
    let measured = |l: &LayerContrast| l.chance.and_then(Result::ok);
    let chance = match c.iter().filter_map(|l| measured(l).map(|ch| ch.splits)).min() {
        Some(n) => format!(
            "; chance, the 95th percentile of the distance between {n} random splits of the pooled prompts into \
             sets like these (their sizes, and their prompts' lengths: prompts move only among prompts of similar \
             length), and p, (1 + the splits at least as far apart) / (1 + {n}): a p below 0.05 says the two sets' \
             loads differ more than splits of their prompts do (one test a layer: of many layers, some fall below \
             0.05 by chance), a higher one gives no evidence of a difference"
        ),
        None => String::new(),
    };
    // Why layers have no chance level, each reason once (layers mostly share their prompts).
    let mut why: Vec<String> = Vec::new();
    for reason in c.iter().filter_map(|l| l.chance.and_then(Result::err)) {
        let line = match reason {
            NoChance::FewPrompts => "chance and p need 2 prompts or more a side".to_string(),
            NoChance::LengthsApart => "chance and p: no band of prompts of similar length (within 1.5x) holds \
                 prompts of both sets, so no split keeps the sets' lengths, and short prompts are further from any \
                 set by their sampling noise alone: compare prompts of similar lengths"
                .to_string(),
            NoChance::FewSplits(n) => format!(
                "chance and p: these prompts split into only {n} distinct distances, too few for p to fall below 0.05"
            ),
        };
        if !why.contains(&line) {
            why.push(line);
        }
    }
    let mut s = format!(
        "load against the other prompts ({prompts} against {other_prompts} prompt(s)): total variation distance \
         between the two load distributions (sum |share - its share| / 2: 0 the same, 1 disjoint){chance}; and the \
         experts whose share (in points, the audited prompts' minus the other prompts') grew and shrank most\n\
         {:>5} {:>8} {:>8} {:>9} {:>7} {:>6} {:>8} {:>8}  {:<30}  shrank most\n",
        "layer", "slots", "its", "distance", "chance", "p", "MaxVio", "its", "grew most"
    );
    for l in c {
        let (chance, p) = match measured(l) {
            Some(ch) => (format!("{:.3}", ch.p95), format!("{:.3}", ch.p)),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "{:>5} {:>8} {:>8} {:>9.3} {chance:>7} {p:>6} {:>8.3} {:>8.3}  {:<30}  {}",
            l.layer,
            l.slots,
            l.other_slots,
            l.distance,
            l.max_vio,
            l.other_max_vio,
            list(&l.gained),
            list(&l.lost)
        );
    }
    for line in why {
        let _ = writeln!(s, "note: {line}");
    }
    s
}

/// The contrast as JSON: per layer, slots, distance, the experts that grew and shrank (share
/// differences as fractions) and both MaxVios.
pub fn to_json(c: &[LayerContrast]) -> Value {
    let pairs = |v: &[(usize, f64)]| v.iter().map(|(e, d)| json!({"expert": e, "share_change": d})).collect::<Vec<_>>();
    c.iter()
        .map(|l| {
            let measured = l.chance.and_then(Result::ok);
            json!({
                "layer": l.layer, "slots": l.slots, "compare_slots": l.other_slots, "distance": l.distance,
                "grew": pairs(&l.gained), "shrank": pairs(&l.lost),
                "max_vio": l.max_vio, "compare_max_vio": l.other_max_vio,
                "distance_chance_p95": measured.map(|c| c.p95), "distance_p": measured.map(|c| c.p),
                "chance_splits": measured.map(|c| c.splits),
                "no_chance": l.chance.and_then(Result::err).map(|r| match r {
                    NoChance::FewPrompts => "few_prompts",
                    NoChance::LengthsApart => "lengths_apart",
                    NoChance::FewSplits(_) => "few_splits",
                }),
                "distinct_distances": match l.chance {
                    Some(Err(NoChance::FewSplits(n))) => Some(n),
                    _ => None,
                },
            })
        })
        .collect()
}

/// The layers only one side counted: not compared, said (both sides' dumps may record
/// different layers).
pub fn notes(ours: &Audit, other: &Audit) -> Vec<String> {
    ours.one_sided(other, "the other prompts", "not compared there")
}
