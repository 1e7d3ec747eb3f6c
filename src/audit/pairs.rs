//! Co-activation: which experts one token chooses together. A router whose experts specialise
//! sends some pairs far more tokens than their loads alone would (two halves of one skill, a
//! merge or pruning candidate); `audit --pairs` counts every pair a token chose and ranks them by
//! how surprising their count is at what independent choice at the experts' loads gives.
//!
//! The expected count is independent choice at the experts' loads, conditioned on k experts a
//! token ([`Expectation`]); for even loads that is exactly uniform routing of k distinct
//! experts, `tokens k (k - 1) / (E (E - 1))` a pair. A pair's surprise is
//! `-log10 P(X >= tokens)` for a Poisson X of that mean: unlike `(tokens - expected) /
//! sqrt(expected)`, it does not make one token shared by two rarely used experts (expected 0.004)
//! the strongest pair of a layer. Thousands of pairs make a large top surprise by chance alone,
//! and more so at uneven loads, so the chance level is drawn at the layer's own loads ([`chance`]).

use std::fmt::Write;

use serde_json::{json, Value};

use super::chance::{median, percentile, DRAWS};
use super::{Audit, LayerLoad};
use crate::rng::Rng;

/// The most experts whose pairs are counted: 4 bytes a pair, 0.5 MB a layer at 512 experts
/// (GLM-5's 256: 130 KB).
pub const MAX_EXPERTS: usize = 512;

/// Pairs chosen together, counted over one layer's tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pairs {
    experts: usize,
    /// `[a][b]` for `a < b`, the upper triangle row by row.
    counts: Vec<u32>,
}

/// One pair of experts and how many tokens chose both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    /// The two experts, the lower id first.
    pub experts: [usize; 2],
    pub tokens: u64,
    /// What independent choice at the two experts' loads gives (the module's null model).
    pub expected: f64,
}

impl Pair {
    /// Tokens over expected: 1 is independence, 3 three times as often as the loads give.
    pub fn lift(&self) -> f64 {
        self.tokens as f64 / self.expected
    }

    /// `(tokens - expected) / sqrt(expected)`: how far past independence, in its own noise.
    pub fn z(&self) -> f64 {
        (self.tokens as f64 - self.expected) / self.expected.sqrt()
    }

    /// Its surprise: `-log10 P(X >= tokens)`, X Poisson of mean `expected`.
    pub fn surprise(&self) -> f64 {
        surprise(self.tokens, self.expected)
    }
}

/// `-log10 P(X >= n)` for X ~ Poisson(`mean`), where `n > mean > 0`: the first term of the
/// tail, `e^-mean mean^n / n!`, times the sum of the ratios of the rest to it (each next one
/// `mean / (i + 1)` of the one before, under 1 past the mean).
fn surprise(n: u64, mean: f64) -> f64 {
    let (mut term, mut sum, mut i) = (1.0f64, 1.0f64, n as f64);
    while term > 1e-17 * sum && i < n as f64 + 1e6 {
        i += 1.0;
        term *= mean / i;
        sum += term;
    }
    -(ln_first_term(n, mean, ln_factorial(n)) + sum.ln()) / std::f64::consts::LN_10
}

/// `ln` of the tail's first term, `e^-mean mean^n / n!` (`ln_n_factorial` its `ln n!`): its
/// `-log10` bounds the surprise from above, the tail being at least its first term.
fn ln_first_term(n: u64, mean: f64, ln_n_factorial: f64) -> f64 {
    -mean + n as f64 * mean.ln() - ln_n_factorial
}

/// `ln n!`: summed up to 64, Stirling's series past it (its error under 1e-15 there).
fn ln_factorial(n: u64) -> f64 {
    if n < 64 {
        return (2..=n).map(|i| (i as f64).ln()).sum();
    }
    let x = n as f64 + 1.0;
    (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + 1.0 / (12.0 * x) - 1.0 / (360.0 * x.powi(3))
        + 1.0 / (1260.0 * x.powi(5))
}

impl Pairs {
    /// None past [`MAX_EXPERTS`] experts, or with fewer than two.
    pub fn new(experts: usize) -> Option<Pairs> {
        (2..=MAX_EXPERTS).contains(&experts).then(|| Pairs { experts, counts: vec![0; experts * (experts - 1) / 2] })
    }

    fn index(&self, a: usize, b: usize) -> usize {
        a * (2 * self.experts - a - 1) / 2 + (b - a - 1)
    }

    /// Counts every pair of one token's experts (distinct ids below the experts: `Audit::add`
    /// has checked them).
    pub fn add(&mut self, set: &[usize]) {
        for (i, &a) in set.iter().enumerate() {
            for &b in &set[i + 1..] {
                let at = self.index(a.min(b), a.max(b));
                self.counts[at] += 1;
            }
        }
    }

    pub fn clear(&mut self) {
        self.counts.fill(0);
    }

    /// Tokens that chose both `a` and `b` (0 for `a == b` or an id past the experts).
    pub fn get(&self, a: usize, b: usize) -> u64 {
        match (a.min(b), a.max(b)) {
            (lo, hi) if lo != hi && hi < self.experts => u64::from(self.counts[self.index(lo, hi)]),
            _ => 0,
        }
    }

    /// The pairs there are, and those some token chose.
    pub fn seen(&self) -> (usize, usize) {
        (self.counts.len(), self.counts.iter().filter(|&&c| c > 0).count())
    }

    /// Calls `f` with each pair some token chose and what independent choice at `loads` expects
    /// of it (of `tokens` tokens choosing `k` experts each), in id order; with none for `k < 2`
    /// or no tokens. (Plain loops, and no test of the pair: the chance level's draws run this
    /// hundreds of times a layer, and a branch on each pair's count against its expectation,
    /// taken half the time, cost them a fifth.)
    fn chosen(&self, loads: &[u64], tokens: u64, k: usize, mut f: impl FnMut(Pair)) {
        let Some(expect) = Expectation::of(loads, tokens, k) else { return };
        // A pair some token chose that Hájek's approximation gives no room (a negative joint,
        // near-fixed routing's) would expect nothing and drop out of the ranking: it takes what
        // independent choice at the loads expects of it, which never overstates its surprise.
        // The other pairs keep Hájek's, so one stray token does not move a whole layer's.
        let independent = expect.may_be_negative().then(|| Expectation::independent(loads, tokens, k)).flatten();
        let mut at = 0;
        for a in 0..self.experts {
            for b in a + 1..self.experts {
                let count = u64::from(self.counts[at]);
                at += 1;
                if count > 0 {
                    let expected = match (expect.pair(a, b), &independent) {
                        (e, Some(i)) if e <= 0.0 => i.pair(a, b),
                        (e, _) => e,
                    };
                    f(Pair { experts: [a, b], tokens: count, expected });
                }
            }
        }
    }

    /// The `n` most surprising pairs (largest surprise, then the lower ids), of `tokens` tokens
    /// choosing `k` experts each with `loads` tokens per expert; only pairs chosen more often
    /// than expected.
    pub fn strongest(&self, loads: &[u64], tokens: u64, k: usize, n: usize) -> Vec<Pair> {
        let mut out: Vec<Pair> = Vec::new();
        self.chosen(loads, tokens, k, |pair| {
            if pair.expected <= 0.0 || pair.tokens as f64 <= pair.expected {
                return;
            }
            // Kept sorted by surprise, strongest first; the pairs come in id order, so a tie keeps
            // the lower ids ahead.
            let surprise = pair.surprise();
            let pos = out.partition_point(|p| p.surprise() >= surprise);
            if pos < n {
                out.insert(pos, pair);
                out.truncate(n);
            }
        });
        out
    }

    /// The strongest pair's surprise ([`Pairs::strongest`]'s first, 0 without one), found without
    /// computing every pair's: of the pairs chosen by as many tokens, the one that expects fewest
    /// is the most surprising, so one tail a count is enough (the chance level's draws compute
    /// this hundreds of times a layer).
    pub fn top_surprise(&self, loads: &[u64], tokens: u64, k: usize) -> f64 {
        // The least expected count of a pair chosen by `n` tokens, by n.
        let mut least: Vec<f64> = Vec::new();
        self.chosen(loads, tokens, k, |p| {
            let n = p.tokens as usize;
            if least.len() <= n {
                least.resize(n + 1, f64::INFINITY);
            }
            least[n] = least[n].min(p.expected);
        });
        // The first term's bound lets counts that cannot beat the best so far skip the sum (the
        // pairs of an expert every token takes have counts of thousands, each tail a long sum).
        // (`ln n!` kept as n counts up: summing it afresh for each count cost a fifth of a draw.)
        let (mut best, mut ln_fact) = (0.0f64, 0.0);
        for (n, &e) in least.iter().enumerate() {
            if n > 1 {
                ln_fact += (n as f64).ln();
            }
            if e > 0.0 && (n as f64) > e && -ln_first_term(n as u64, e, ln_fact) / std::f64::consts::LN_10 > best {
                best = best.max(surprise(n as u64, e));
            }
        }
        best
    }
}

/// The strongest pair's surprise when each token's experts are drawn independently at a layer's
/// loads: the median and 95th percentile over `draws` draws. Past the 95th percentile, a layer's
/// top pair is past chance (and one layer in twenty is, by chance alone).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairChance {
    pub median: f64,
    pub p95: f64,
    pub draws: usize,
}

/// Pairs counted and examined a layer, at most, over all of [`chance`]'s draws (past it, fewer
/// draws, down to [`MIN_DRAWS`]).
const MAX_WORK: u64 = 50_000_000;
/// The fewest draws a chance level takes: its 95th percentile then rests on its five largest.
const MIN_DRAWS: usize = 100;
/// Rounds of correcting the draw's weights, and the tokens each round draws.
const CALIBRATION: (usize, u64) = (8, 20_000);

/// [`PairChance`] of `tokens` tokens each choosing `k` distinct experts, one by one in
/// proportion to weights that give each expert its share of `loads` (independent choice at
/// those loads), the surprise computed at each draw's own loads as the layer's is at its;
/// `seed` tells layers of the same tokens apart. None for `k < 2`, no tokens, fewer than k
/// experts loaded, or experts past [`MAX_EXPERTS`].
pub fn chance(loads: &[u64], tokens: u64, k: usize, seed: u64) -> Option<PairChance> {
    let experts = loads.len();
    if k < 2 || tokens == 0 || loads.iter().filter(|&&l| l > 0).count() < k {
        return None;
    }
    let mut pairs = Pairs::new(experts)?;
    let work = (experts * (experts - 1) / 2) as u64 + tokens * (k * (k - 1) / 2) as u64;
    let draws = (MAX_WORK / work.max(1)).clamp(MIN_DRAWS as u64, DRAWS as u64) as usize;
    let mut rng = Rng(0x3C6E_F372_FE94_F82B ^ tokens ^ ((experts as u64) << 32) ^ k as u64 ^ seed.rotate_left(17));
    let mut draw = Draw::new(loads, k);
    // Drawn one by one in proportion to the loads, heavy experts come out lighter (two at 0.59
    // of the tokens drew 0.49): the weights are corrected on a sample until the draws' shares
    // are the loads'.
    let (rounds, sample) = CALIBRATION;
    let shares: Vec<f64> = loads.iter().map(|&l| l as f64 / tokens as f64).collect();
    for _ in 0..rounds {
        let mut got = vec![0u64; experts];
        for _ in 0..sample {
            draw.token(&mut rng).iter().for_each(|&e| got[e] += 1);
        }
        draw.correct(&shares, &got, sample);
    }
    let mut drawn = vec![0u64; experts];
    let mut tops = Vec::with_capacity(draws);
    for _ in 0..draws {
        pairs.clear();
        drawn.fill(0);
        for _ in 0..tokens {
            let set = draw.token(&mut rng);
            set.iter().for_each(|&e| drawn[e] += 1);
            pairs.add(set);
        }
        tops.push(pairs.top_surprise(&drawn, tokens, k));
    }
    Some(PairChance { median: median(&mut tops), p95: percentile(&mut tops, 0.95), draws })
}

/// One token's k distinct experts drawn one by one in proportion to weights.
struct Draw {
    weights: Vec<f64>,
    cumulative: Vec<f64>,
    /// The experts of more than a tenth of the weight (at most 9), and the cumulative weights of
    /// the others: once a token holds every heavy one, its other experts are drawn from those
    /// (redrawn, a heavy one taken by nearly every token makes most draws misses).
    heavy: Vec<usize>,
    light: Vec<f64>,
    k: usize,
    /// `seen[e] == stamp`: expert e already chosen by the token being drawn.
    seen: Vec<u64>,
    stamp: u64,
    set: Vec<usize>,
}

impl Draw {
    fn new(loads: &[u64], k: usize) -> Draw {
        let weights: Vec<f64> = loads.iter().map(|&l| l as f64).collect();
        let seen = vec![0; loads.len()];
        let (heavy, light, cumulative) = (Vec::new(), Vec::new(), Vec::new());
        let mut d = Draw { weights, cumulative, heavy, light, k, seen, stamp: 0, set: Vec::new() };
        d.accumulate();
        d
    }

    fn accumulate(&mut self) {
        let running = |w: &mut dyn Iterator<Item = f64>| -> Vec<f64> {
            w.scan(0.0, |sum, x| Some(*sum + x).inspect(|s| *sum = *s)).collect()
        };
        self.cumulative = running(&mut self.weights.iter().copied());
        let total: f64 = self.weights.iter().sum();
        self.heavy = (0..self.weights.len()).filter(|&e| self.weights[e] > 0.1 * total).collect();
        let heavy = &self.heavy;
        let light = (0..self.weights.len()).map(|e| if heavy.contains(&e) { 0.0 } else { self.weights[e] });
        self.light = running(&mut light.into_iter());
    }

    /// Scales each weight by how far its expert's draws (`got`, of `sample` tokens) fell short
    /// of its `share` of tokens (plus one to each count: an expert a sample missed doubles at
    /// most).
    fn correct(&mut self, shares: &[f64], got: &[u64], sample: u64) {
        for ((w, &share), &g) in self.weights.iter_mut().zip(shares).zip(got) {
            if *w > 0.0 {
                *w *= (share * sample as f64 + 1.0) / (g as f64 + 1.0);
            }
        }
        self.accumulate();
    }

    /// A token's experts. (Always k: every weight is a loaded expert's, and at least k are.)
    fn token(&mut self, rng: &mut Rng) -> &[usize] {
        self.stamp += 1;
        self.set.clear();
        while self.set.len() < self.k {
            let all_heavy = self.heavy.iter().all(|&e| self.seen[e] == self.stamp);
            // (Without a light expert left, from all: never in practice, as k < E.)
            let cumulative = match all_heavy && self.light.last().is_some_and(|&t| t > 0.0) {
                true => &self.light,
                false => &self.cumulative,
            };
            let r = rng.unit() * cumulative.last().copied().unwrap_or(0.0);
            let e = cumulative.partition_point(|&c| c <= r).min(self.weights.len() - 1);
            if self.seen[e] != self.stamp && self.weights[e] > 0.0 {
                self.seen[e] = self.stamp;
                self.set.push(e);
            }
        }
        &self.set
    }
}

/// What independent choice at a layer's loads expects of each pair: Hájek's approximation of
/// the joint inclusion of a fixed-size design of maximum entropy (independent choices conditioned
/// on k a token), `pi_a pi_b (1 - (1 - pi_a)(1 - pi_b) / d)` with `pi` each expert's share of
/// tokens and `d = sum pi (1 - pi)`, scaled so the pairs expected add up to the pairs chosen
/// (`k (k - 1) / 2` a token). An expert every token chooses then pairs with each other as often
/// as that one is chosen (`p_a p_b` alone gave it 0.89 of that at k = 8), and even loads give
/// uniform routing's `k (k - 1) / (E (E - 1))`.
struct Expectation {
    pi: Vec<f64>,
    d: f64,
    /// Tokens times the scale that makes the pairs add up.
    scale: f64,
}

impl Expectation {
    /// None for `k < 2`, no tokens, or loads that make no pair.
    fn of(loads: &[u64], tokens: u64, k: usize) -> Option<Expectation> {
        Expectation::with(loads, tokens, k, true)
    }

    /// Independent choice at the loads, `pi_a pi_b` scaled (no Hájek correction).
    fn independent(loads: &[u64], tokens: u64, k: usize) -> Option<Expectation> {
        Expectation::with(loads, tokens, k, false)
    }

    fn with(loads: &[u64], tokens: u64, k: usize, hajek: bool) -> Option<Expectation> {
        if k < 2 || tokens == 0 {
            return None;
        }
        let n = tokens as f64;
        let pi: Vec<f64> = loads.iter().map(|&l| (l as f64 / n).min(1.0)).collect();
        let u: Vec<f64> = pi.iter().map(|p| p * (1.0 - p)).collect();
        let d: f64 = if hajek { u.iter().sum() } else { 0.0 };
        let pairs = (k * (k - 1)) as f64 / 2.0;
        let mut e = Expectation { pi, d, scale: 1.0 };
        // Sum over pairs of pi_a pi_b, less the correction's: (S^2 - sum pi^2) / 2 and, where
        // d > 0, (d^2 - sum u^2) / (2 d). Where some pair's joint is negative (clamped to 0), its
        // pairs summed one by one, so the expected counts still add up to the pairs chosen.
        let total = match e.may_be_negative() {
            true => e.joint_sum(),
            false => {
                let (sum, squares) = (e.pi.iter().sum::<f64>(), e.pi.iter().map(|p| p * p).sum::<f64>());
                let correction = match d > 0.0 {
                    true => (d * d - u.iter().map(|x| x * x).sum::<f64>()) / (2.0 * d),
                    false => 0.0,
                };
                (sum * sum - squares) / 2.0 - correction
            }
        };
        e.scale = n * pairs / total;
        (total > 0.0).then_some(e)
    }

    /// Whether Hájek's joint inclusion is negative for some pair of experts in use: for a pair
    /// with (1 - pi_a)(1 - pi_b) > d, which only routing close to fixed reaches (d under 1). The
    /// two least loaded experts in use have the largest such product.
    fn may_be_negative(&self) -> bool {
        let (mut p1, mut p2) = (f64::INFINITY, f64::INFINITY);
        for &p in self.pi.iter().filter(|&&p| p > 0.0) {
            (p1, p2) = if p < p1 { (p, p1) } else { (p1, p.min(p2)) };
        }
        self.d > 0.0 && p2.is_finite() && (1.0 - p1) * (1.0 - p2) >= self.d
    }

    /// Pair (a, b)'s joint inclusion, unscaled; Hájek's may be negative.
    fn joint(&self, a: usize, b: usize) -> f64 {
        let (x, y) = (self.pi[a], self.pi[b]);
        match self.d > 0.0 {
            true => x * y * (1.0 - (1.0 - x) * (1.0 - y) / self.d),
            false => x * y,
        }
    }

    /// The joints of every pair of experts in use, each clamped to 0.
    fn joint_sum(&self) -> f64 {
        let used: Vec<usize> = (0..self.pi.len()).filter(|&a| self.pi[a] > 0.0).collect();
        let pairs = used.iter().enumerate().flat_map(|(i, &a)| used[i + 1..].iter().map(move |&b| (a, b)));
        pairs.map(|(a, b)| self.joint(a, b).max(0.0)).sum()
    }

    /// The tokens pair (a, b) expects.
    fn pair(&self, a: usize, b: usize) -> f64 {
        self.scale * self.joint(a, b).max(0.0)
    }
}

/// Each counted layer's chance level, by layer.
type Chances = std::collections::BTreeMap<usize, PairChance>;

impl Audit {
    /// Each counted layer's chance level ([`chance`] at its loads), the layers shared among the
    /// CPU's cores, with progress on stderr (a fifth of a second a layer at GLM-5's size).
    fn pair_chances(&self) -> Chances {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;
        let layers: Vec<&LayerLoad> = self.layers.values().filter(|l| l.pairs.is_some()).collect();
        let (next, out) = (AtomicUsize::new(0), Mutex::new(std::collections::BTreeMap::new()));
        // Each worker takes the next layer until none is left; this thread, one of them, shows
        // the layer it takes.
        let work = |mut progress: Option<&mut crate::progress::Steps>| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(l) = layers.get(i) else { break };
            if let Some(p) = progress.as_deref_mut() {
                p.step(i + 1);
            }
            if let (Some(c), Ok(mut out)) = (chance(&l.counts, l.tokens, l.k, l.layer as u64), out.lock()) {
                out.insert(l.layer, c);
            }
        };
        // (As many as the products use: `--threads` sets rayon's pool.)
        let threads = rayon::current_num_threads().min(layers.len());
        let mut progress = crate::progress::Steps::pair_chances(layers.len());
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(|| work(None));
            }
            work(Some(&mut progress));
        });
        out.into_inner().unwrap_or_default()
    }

    /// The co-activation table: per layer, the pairs counted and seen, the strongest pair's
    /// surprise against chance's (median and 95th percentile), and the `n` strongest pairs.
    pub fn pairs_table(&self, n: usize) -> String {
        let chances = self.pair_chances();
        let draws = chances.values().map(|c| c.draws);
        let draws = match (draws.clone().min(), draws.max()) {
            (Some(a), Some(b)) if a < b => format!("{a} to {b}"),
            (_, b) => b.unwrap_or(0).to_string(),
        };
        let mut s = String::new();
        if self.layers.values().any(|l| l.pairs.is_some()) {
            let _ = write!(
                s,
                "co-activation: expert pairs one token chose together more often than independent choice at the \
                 experts' loads gives, by surprise (-log10 of the Poisson tail P(X >= tokens) at the expected count); \
                 chance: the strongest pair's surprise where each token's experts are drawn independently at the \
                 layer's loads (the median and 95th percentile of {draws} draws)\n{:>7} {:>17} {:>9} {:>14}  strongest \
                 (a+b tokens/expected)\n",
                "layer", "pairs seen", "surprise", "chance"
            );
        }
        for l in self.layers.values() {
            let Some(pairs) = l.pairs.as_ref() else { continue };
            let (all, seen) = pairs.seen();
            let strongest = l.strongest_pairs(n.max(1));
            let top = strongest.first().map(Pair::surprise);
            let c = chances.get(&l.layer);
            let list: Vec<String> = (strongest.iter().take(n))
                .map(|p| {
                    format!(
                        "{}+{} {}/{}",
                        p.experts[0],
                        p.experts[1],
                        p.tokens,
                        glimpse_tui::views::load::expected(p.expected)
                    )
                })
                .collect();
            let label = match self.mtp_layer == Some(l.layer) {
                true => format!("{} mtp", l.layer),
                false => l.layer.to_string(),
            };
            let _ = writeln!(
                s,
                "{label:>7} {:>17} {:>9} {:>14}  {}",
                format!("{seen} of {all}"),
                top.map_or("-".into(), |z| format!("{z:.2}")),
                c.map_or("-".into(), |c| format!("{:.2} ({:.2})", c.median, c.p95)),
                list.join("  ")
            );
        }
        for note in self.pair_notes(&chances) {
            let _ = writeln!(s, "note: {note}");
        }
        s
    }

    /// The co-activation's notes, which the table ends with and the JSON's `notes` carries: the
    /// layers not counted, and those whose strongest pair is past chance's 95th percentile.
    fn pair_notes(&self, chances: &Chances) -> Vec<String> {
        let (mut past, mut uncounted, mut weighed) = (Vec::new(), Vec::new(), 0);
        for l in self.layers.values() {
            if l.pairs.is_none() {
                uncounted.push(l.layer.to_string());
                continue;
            }
            let top = l.strongest_pairs(1).first().map(Pair::surprise);
            if let (Some(top), Some(c)) = (top, chances.get(&l.layer)) {
                weighed += 1;
                if top > c.p95 {
                    past.push(l.layer.to_string());
                }
            }
        }
        let mut notes = Vec::new();
        if !uncounted.is_empty() {
            notes.push(format!(
                "layer(s) {} not counted: a token chooses one expert there, or the experts are past {MAX_EXPERTS}",
                uncounted.join(", ")
            ));
        }
        match (weighed, past.is_empty()) {
            (0, _) => {}
            (_, true) => notes.push("no layer's strongest pair is past chance's 95th percentile".into()),
            (_, false) => notes.push(format!(
                "layer(s) {}: the strongest pair is past chance's 95th percentile (where chance alone puts one layer \
                 in twenty: {:.1} of these {weighed})",
                past.join(", "),
                weighed as f64 / 20.0
            )),
        }
        notes
    }

    /// Each layer's co-activation for the JSON, with `--pairs N` (null without): pairs counted
    /// and seen, the N strongest, and the chance level; and the co-activation's notes.
    pub(super) fn pairs_json(&self) -> (std::collections::BTreeMap<usize, Value>, Vec<String>) {
        let Some(n) = self.pairs_listed else { return Default::default() };
        let chances = self.pair_chances();
        let pair = |p: &Pair| {
            json!({
                "experts": p.experts, "tokens": p.tokens, "expected": p.expected, "lift": p.lift(), "z": p.z(),
                "surprise": p.surprise(),
            })
        };
        let layers = (self.layers.values())
            .filter_map(|l| {
                let (all, seen) = l.pairs.as_ref()?.seen();
                let strongest = l.strongest_pairs(n);
                let c = chances.get(&l.layer);
                let v = json!({
                    "pairs": all, "pairs_seen": seen, "strongest": strongest.iter().map(pair).collect::<Vec<_>>(),
                    "top_surprise": strongest.first().map(Pair::surprise),
                    "chance": c.map(|c| json!({"median": c.median, "p95": c.p95, "draws": c.draws})),
                });
                Some((l.layer, v))
            })
            .collect();
        (layers, self.pair_notes(&chances))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The triangle index visits every pair once, in order.
    #[test]
    fn every_pair_has_its_own_slot() {
        let p = Pairs::new(5).unwrap();
        let slots: Vec<usize> =
            (0..5).flat_map(|a| (a + 1..5).map(move |b| (a, b))).map(|(a, b)| p.index(a, b)).collect();
        assert_eq!(slots, (0..10).collect::<Vec<_>>());
        assert_eq!((Pairs::new(1), Pairs::new(MAX_EXPERTS + 1)), (None, None));
    }

    /// 4 experts, 4 tokens of top-2, by hand: {0,1} three times, {2,3} once. Shares pi = [3/4,
    /// 3/4, 1/4, 1/4], d = sum pi (1 - pi) = 3/4; Hájek's joint inclusion pi_a pi_b (1 - (1 -
    /// pi_a)(1 - pi_b) / d) is 33/64 for {0,1}, 1/64 for {2,3} and 9/64 for the four others,
    /// 70/64 in all, scaled to the 4 pairs chosen: {0,1} expects 66/35, {2,3} 2/35, the others
    /// 18/35 each.
    #[test]
    fn expected_pairs_by_hand() {
        let mut p = Pairs::new(4).unwrap();
        for set in [[0, 1], [1, 0], [0, 1], [3, 2]] {
            p.add(&set);
        }
        assert_eq!((p.get(1, 0), p.get(2, 3), p.get(0, 2), p.get(1, 1)), (3, 1, 0, 0));
        assert_eq!(p.seen(), (6, 2));
        let top = p.strongest(&[3, 3, 1, 1], 4, 2, 5);
        // {2,3}: P(X >= 1) at 2/35; {0,1}: P(X >= 3) at 66/35.
        assert_eq!(top.iter().map(|p| p.experts).collect::<Vec<_>>(), [[2, 3], [0, 1]]);
        assert!((top[1].expected - 66.0 / 35.0).abs() < 1e-12 && (top[0].expected - 2.0 / 35.0).abs() < 1e-12);
        let m = 66.0f64 / 35.0;
        let tail = 1.0 - (-m).exp() * (1.0 + m + m * m / 2.0);
        assert!((top[1].surprise() - -tail.log10()).abs() < 1e-12);
        assert!((top[1].lift() - 3.0 / m).abs() < 1e-12);
        let e = Expectation::of(&[3, 3, 1, 1], 4, 2).unwrap();
        assert!((e.pair(0, 2) - 18.0 / 35.0).abs() < 1e-12);
        // An expert every token chooses (of 256, top-8) pairs with another as often as that one
        // is chosen (p_a p_b scaled gave 0.89 of it).
        let loads: Vec<u64> = std::iter::once(2550).chain(std::iter::repeat_n(70, 255)).collect();
        let e = Expectation::of(&loads, 2550, 8).unwrap();
        assert!((e.pair(0, 1) / 70.0 - 1.0).abs() < 1e-3, "{}", e.pair(0, 1));
        assert!(p.strongest(&[3, 3, 1, 1], 4, 1, 5).is_empty());
    }

    /// A layer of one expert a token has no pairs: null in the JSON, said in the table.
    #[test]
    fn one_expert_a_token_has_no_pairs() {
        let mut a = Audit::new(4);
        a.add(1, &[0, 1, 2, 3], 1, 1, None).unwrap();
        a.add(2, &[0, 1, 2, 3], 2, 1, None).unwrap();
        assert_eq!((a.layers[&1].pairs.as_ref(), a.layers[&2].pairs.as_ref().map(Pairs::seen)), (None, Some((6, 2))));
        assert!(
            a.pairs_table(3).contains("note: layer(s) 1 not counted: a token chooses one expert"),
            "{}",
            a.pairs_table(3)
        );
        // (Listed, so the k = 2 layer's is not null: a null there is the k = 1 layer's own.)
        a.pairs_listed = Some(3);
        let json = a.to_json();
        assert!(json["layers"][0]["co_activation"].is_null(), "{json}");
        assert_eq!(json["layers"][1]["co_activation"]["pairs_seen"], 2, "{json}");
        let notes = json["notes"].as_array().map(|n| n.iter().filter_map(Value::as_str).collect::<Vec<_>>());
        assert!(notes.is_some_and(|n| n.iter().any(|n| n.starts_with("layer(s) 1 not counted"))), "{json}");
    }

    /// Routing close to fixed, where Hájek's joint inclusion of two rarely used experts is
    /// negative: 1000 tokens of top-3 of 5, 999 choosing {0, 1} and one of {2, 3, 4} (900, 50, 49
    /// times), one token {2, 3, 4}. Shares [0.999, 0.999, 0.901, 0.051, 0.050] give d = 0.187,
    /// under (1 - 0.051)(1 - 0.050). The pair {3, 4}, which that token chose, expected 0 and was
    /// never ranked: it takes independence's expectation, the others keep Hájek's, and Hájek's
    /// clamped joints add up to the 3000 pairs chosen (they added up to 3009.6).
    #[test]
    fn routing_close_to_fixed_drops_no_pair_a_token_chose() {
        let loads = [999, 999, 901, 51, 50];
        let mut p = Pairs::new(5).unwrap();
        for t in 0..999 {
            p.add(&[
                0,
                1,
                if t < 900 {
                    2
                } else if t < 950 {
                    3
                } else {
                    4
                },
            ]);
        }
        p.add(&[2, 3, 4]);
        let hajek = Expectation::of(&loads, 1000, 3).unwrap();
        assert!(hajek.may_be_negative() && hajek.pair(3, 4) == 0.0);
        let sum = |e: &Expectation| (0..5).flat_map(|a| (a + 1..5).map(move |b| e.pair(a, b))).sum::<f64>();
        assert!((sum(&hajek) - 3000.0).abs() < 1e-6, "{}", sum(&hajek));
        let independent = Expectation::independent(&loads, 1000, 3).unwrap();
        assert!((sum(&independent) - 3000.0).abs() < 1e-6, "{}", sum(&independent));
        let mut seen = Vec::new();
        p.chosen(&loads, 1000, 3, |q| seen.push((q.experts, q.expected)));
        let expected = |a, b| seen.iter().find(|(e, _)| *e == [a, b]).map(|&(_, x)| x);
        assert_eq!(expected(3, 4), Some(independent.pair(3, 4)));
        assert!(expected(3, 4).is_some_and(|x| x > 0.0));
        assert_eq!(expected(0, 1), Some(hajek.pair(0, 1)));
    }

    /// An expert every token takes at k = 2 leaves the others' pairs none, where Hájek's joint
    /// is negative for some: no token chose one, so the layer keeps Hájek's expectation (the
    /// fixed expert's pairs near the other's tokens), not independence's (which gave 0+1 380 of
    /// its 500 tokens, a surprise of 8.7 where Hájek's 454 gives about 1.8); and a stray token
    /// choosing such a pair moves that pair's alone.
    #[test]
    fn a_fixed_expert_at_k_2_keeps_hajeks_expectation() {
        let loads = [1000, 500, 300, 150, 49, 1];
        let mut p = Pairs::new(6).unwrap();
        for (e, &n) in loads.iter().enumerate().skip(1) {
            (0..n).for_each(|_| p.add(&[0, e]));
        }
        let hajek = Expectation::of(&loads, 1000, 2).unwrap();
        assert!(hajek.may_be_negative());
        let mut seen = Vec::new();
        p.chosen(&loads, 1000, 2, |q| seen.push((q.experts, q.expected)));
        assert_eq!(seen.len(), 5);
        assert!(seen.iter().all(|&([a, b], x)| x == hajek.pair(a, b)), "{seen:?}");
        assert!((seen[0].1 - 454.0).abs() < 0.5, "{seen:?}");
        // One stray token of {3, 4}, a pair Hájek gives no room: that pair alone takes
        // independence's expectation, the fixed expert's pairs keep Hájek's.
        p.add(&[3, 4]);
        let loads = [1000, 500, 300, 151, 50, 1];
        let (hajek, independent) =
            (Expectation::of(&loads, 1001, 2).unwrap(), Expectation::independent(&loads, 1001, 2).unwrap());
        assert!(hajek.joint(3, 4) < 0.0);
        let mut seen = Vec::new();
        p.chosen(&loads, 1001, 2, |q| seen.push((q.experts, q.expected)));
        for ([a, b], x) in seen {
            let want = if [a, b] == [3, 4] { independent.pair(3, 4) } else { hajek.pair(a, b) };
            assert_eq!(x, want, "{a}+{b}");
        }
    }

    /// The Poisson tail by hand: P(X >= 3) at mean 0.5 is 1 - e^-0.5 (1 + 0.5 + 0.125) =
    /// 0.0143877; at mean 900 against 1000, the normal approximation's z of 3.33 (p about 4e-4)
    /// bounds it loosely (the Poisson's right tail is heavier).
    #[test]
    fn surprise_is_the_poisson_tail() {
        let p = 1.0 - (-0.5f64).exp() * 1.625;
        assert!((surprise(3, 0.5) - -p.log10()).abs() < 1e-9, "{}", surprise(3, 0.5));
        // One token's pair of two experts that expect 0.004: 2.4, not a z of 15.7.
        assert!((surprise(1, 0.004) - -(1.0 - (-0.004f64).exp()).log10()).abs() < 1e-9);
        let far = surprise(1000, 900.0);
        assert!((3.0..4.5).contains(&far), "{far}");
        // ln n! past the summed range: within 1e-12 of the sum.
        let summed: f64 = (2..=200u64).map(|i| (i as f64).ln()).sum();
        assert!((ln_factorial(200) - summed).abs() < 1e-9, "{}", ln_factorial(200) - summed);
    }

    /// The chance level against numpy's (scripts/chance-references.py, part 2): its draws'
    /// weights corrected as [`chance`] corrects them (8 rounds of 20000 tokens), then 2000 draws
    /// of `rng.choice(E, k, replace=False, p=weights / sum)`, each draw's top surprise at Hájek's
    /// expectation as [`Expectation`] defines it: 32 tokens of 4 of 16 experts at even loads gave
    /// median 1.288 and 95th percentile 1.826; 200 tokens of 8 of 64 at loads of 100 (8 experts),
    /// 25 (16) and 10 (40) 2.460 and 3.209; at loads of 190, 180, 30 (8), 18 (53) and 36, 2.478
    /// and 3.181. (The values pinned before came from a numpy run whose script was not kept:
    /// 1.293 and 1.780, 2.461 and 3.209, 2.499 and 3.218, as far apart as the draws' noise.)
    #[test]
    fn the_chance_level_is_numpys() {
        let skewed: Vec<u64> = [vec![100; 8], vec![25; 16], vec![10; 40]].concat();
        let heavy: Vec<u64> = [vec![190, 180], vec![30; 8], vec![18; 53], vec![36]].concat();
        let cases = [(vec![8; 16], 32, 4, 1.288, 1.826), (skewed, 200, 8, 2.460, 3.209), (heavy, 200, 8, 2.478, 3.181)];
        for (loads, tokens, k, median, p95) in cases {
            let c = chance(&loads, tokens, k, 0).unwrap();
            assert!((c.median - median).abs() < 0.05 && (c.p95 - p95).abs() < 0.12, "{c:?}");
        }
        assert_eq!(chance(&[8; 16], 32, 1, 0), None);
        assert_eq!(chance(&[32, 32, 0, 0], 32, 3, 0), None, "fewer experts loaded than k");
    }
}
