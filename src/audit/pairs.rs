//! Co-activation: which experts one token chooses together. A router whose experts specialise
//! sends some pairs far more tokens than their loads alone would (two halves of one skill, a
//! merge or pruning candidate); `audit` counts every pair a token chose and ranks them by how
//! far their count is past what independent choice at the experts' loads gives.
//!
//! The null model: a token's pair (a, b) is chosen with probability proportional to `p_a p_b`
//! (`p` each expert's share of tokens), scaled so that the expected pairs add up to the pairs
//! observed (`k (k - 1) / 2` a token). For uniform loads that is exactly uniform routing of k
//! distinct experts: `tokens k (k - 1) / (E (E - 1))` a pair. Pairs are ranked by
//! `z = (tokens - expected) / sqrt(expected)`; a few hundred tokens over 32640 pairs make large
//! z by chance alone, so the table gives uniform routing's top z beside ours (`chance`).

use std::fmt::Write;

use serde_json::{json, Value};

use super::{chance, Audit, LayerLoad};

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

    /// The `n` pairs furthest past independence (largest z, then the lower ids), of `tokens`
    /// tokens choosing `k` experts each with `loads` tokens per expert; only pairs chosen more
    /// often than expected. Empty for `k < 2` or no tokens.
    pub fn strongest(&self, loads: &[u64], tokens: u64, k: usize, n: usize) -> Vec<Pair> {
        let Some(scale) = expectation_scale(loads, tokens, k) else {
            return Vec::new();
        };
        let mut out: Vec<Pair> = Vec::new();
        let mut at = 0;
        for a in 0..self.experts {
            for b in a + 1..self.experts {
                let observed = u64::from(self.counts[at]);
                at += 1;
                let expected = scale * loads[a] as f64 * loads[b] as f64;
                if expected <= 0.0 || observed as f64 <= expected {
                    continue;
                }
                let pair = Pair { experts: [a, b], tokens: observed, expected };
                // Kept sorted by z, strongest first; the pairs come in id order, so a tie keeps
                // the lower ids ahead.
                let z = pair.z();
                let pos = out.partition_point(|p| p.z() >= z);
                if pos < n {
                    out.insert(pos, pair);
                    out.truncate(n);
                }
            }
        }
        out
    }
}

/// `s` such that pair (a, b) expects `s * load_a * load_b` tokens: `p_a p_b` scaled so the pairs
/// expected add up to `tokens k (k - 1) / 2`, i.e. `k (k - 1) N / (k^2 N^2 - sum load^2)`. None
/// for `k < 2`, no tokens, or loads that no k-of-E routing makes.
fn expectation_scale(loads: &[u64], tokens: u64, k: usize) -> Option<f64> {
    let (n, k) = (tokens as f64, k as f64);
    let squares: f64 = loads.iter().map(|&l| l as f64 * l as f64).sum();
    let denominator = k * k * n * n - squares;
    (k >= 2.0 && n > 0.0 && denominator > 0.0).then(|| k * (k - 1.0) * n / denominator)
}

/// The pairs the JSON lists a layer, unless `--pairs N` says.
const LISTED_IN_JSON: usize = 10;

impl Audit {
    /// The co-activation table: per layer, the pairs counted and seen, the strongest pair's z
    /// against uniform routing's (median and 95th percentile), and the `n` strongest pairs.
    pub fn pairs_table(&self, n: usize) -> String {
        let uniform = self.uniform();
        let mut s = format!(
            "co-activation: expert pairs one token chose together, by how far past independent choice at their loads \
             (z = (tokens - expected) / sqrt(expected); chance: uniform routing's top z, median and 95%)\n{:>7} {:>13} \
             {:>7} {:>14}  strongest (a+b tokens/expected)\n",
            "layer", "pairs seen", "top z", "chance"
        );
        let mut past = Vec::new();
        let mut uncounted = Vec::new();
        for l in self.layers.values() {
            let Some(pairs) = l.pairs.as_ref() else {
                uncounted.push(l.layer.to_string());
                continue;
            };
            let (all, seen) = pairs.seen();
            let strongest = l.strongest_pairs(n.max(1));
            let top = strongest.first().map(Pair::z);
            let u = uniform.get(&l.layer);
            let chance = match u.and_then(|u| Some((u.pair_z?, u.pair_z_p95?))) {
                Some((median, p95)) => format!("{median:.2} ({p95:.2})"),
                None => "-".into(),
            };
            if let (Some(z), Some(p95)) = (top, u.and_then(|u| u.pair_z_p95)) {
                if z > p95 {
                    past.push(l.layer.to_string());
                }
            }
            let list: Vec<String> = (strongest.iter().take(n))
                .map(|p| format!("{}+{} {}/{:.1}", p.experts[0], p.experts[1], p.tokens, p.expected))
                .collect();
            let _ = writeln!(
                s,
                "{:>7} {:>13} {:>7} {chance:>14}  {}",
                l.layer,
                format!("{seen} of {all}"),
                top.map_or("-".into(), |z| format!("{z:.2}")),
                list.join("  ")
            );
        }
        if !uncounted.is_empty() {
            let _ = writeln!(
                s,
                "note: layer(s) {} not counted: a token chooses one expert there, or the experts are past {MAX_EXPERTS}",
                uncounted.join(", ")
            );
        }
        let _ = match past.is_empty() {
            true => writeln!(
                s,
                "note: no layer's strongest pair is past uniform routing's 95th percentile: as chance gives"
            ),
            false => writeln!(
                s,
                "note: layer(s) {}: the strongest pair is past uniform routing's 95th percentile of top z",
                past.join(", ")
            ),
        };
        s
    }

    /// A layer's co-activation in the JSON: pairs counted and seen, the strongest
    /// (`--pairs N`, else 10) and uniform routing's top z; null where not counted.
    pub(super) fn pairs_json(&self, l: &LayerLoad, uniform: Option<&chance::Uniform>) -> Value {
        let Some(pairs) = l.pairs.as_ref() else {
            return Value::Null;
        };
        let (all, seen) = pairs.seen();
        let strongest: Vec<Value> = (l.strongest_pairs(self.pairs_listed.unwrap_or(LISTED_IN_JSON)).iter())
            .map(|p| json!({"experts": p.experts, "tokens": p.tokens, "expected": p.expected, "lift": p.lift(), "z": p.z()}))
            .collect();
        json!({
            "pairs": all, "pairs_seen": seen, "strongest": strongest,
            "top_z_uniform": uniform.and_then(|u| u.pair_z), "top_z_uniform_p95": uniform.and_then(|u| u.pair_z_p95),
        })
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

    /// 4 experts, 4 tokens of top-2, by hand: {0,1} three times, {2,3} once. Loads [3, 3, 1, 1],
    /// squares 20, so the scale is 2*1*4 / (4*16 - 20) = 2/11 and pair {0,1} expects 18/11.
    #[test]
    fn expected_pairs_by_hand() {
        let mut p = Pairs::new(4).unwrap();
        for set in [[0, 1], [1, 0], [0, 1], [3, 2]] {
            p.add(&set);
        }
        assert_eq!((p.get(1, 0), p.get(2, 3), p.get(0, 2), p.get(1, 1)), (3, 1, 0, 0));
        assert_eq!(p.seen(), (6, 2));
        let top = p.strongest(&[3, 3, 1, 1], 4, 2, 5);
        // {0,1}: z = (3 - 18/11) / sqrt(18/11); {2,3}: expects 2/11, z = (1 - 2/11) / sqrt(2/11).
        assert_eq!(top.iter().map(|p| p.experts).collect::<Vec<_>>(), [[2, 3], [0, 1]]);
        assert!((top[1].expected - 18.0 / 11.0).abs() < 1e-12);
        assert!((top[0].z() - (9.0 / 11.0) / (2.0f64 / 11.0).sqrt()).abs() < 1e-12);
        assert!((top[1].lift() - 33.0 / 18.0).abs() < 1e-12);
        // The expected pairs add up to the observed ones: 4 tokens of one pair each.
        let scale = expectation_scale(&[3, 3, 1, 1], 4, 2).unwrap();
        let loads = [3.0, 3.0, 1.0, 1.0];
        let total: f64 =
            (0..4).flat_map(|a| (a + 1..4).map(move |b| (a, b))).map(|(a, b)| scale * loads[a] * loads[b]).sum();
        assert!((total - 4.0).abs() < 1e-12);
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
        assert!(a.to_json()["layers"][0]["co_activation"].is_null());
    }
}
