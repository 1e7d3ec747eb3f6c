//! Readings of routing that differs first: routing weights another rule made (the variants real
//! ports have shipped, tried on ours's own gate logits and experts), experts chosen without the
//! correction bias, and `moe.bias_changed` flags that differ at near-ties of the choice without
//! the bias.

use crate::compare::{Comparison, Detail, Side, Tolerance};
use crate::diff::{floats, ints, DiffOptions};
use crate::dump::Dump;
use crate::hooks::{HookPoint, LayerHook};
use crate::model::moe::{route, sigmoid, weights_for, RouterConfig};

/// Differences of `moe.bias_changed` (whether the correction bias changed a token's experts) at
/// tokens whose choice without the bias is a near-tie on both sides: the counterfactual flipped,
/// not the routing (a long generation against its prefill meets one now and then).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnbiasedTies {
    pub differing: usize,
    pub near_ties: usize,
    /// The largest of their margins, either side's.
    pub largest: f32,
}

impl UnbiasedTies {
    /// From both dumps' gate logits at the tokens where the flag differs: the margin of
    /// `route` without the bias, each side on its own. None where either lacks the logits.
    pub(crate) fn of(a: &Dump, b: &Dump, c: &Comparison, opts: &DiffOptions) -> Option<UnbiasedTies> {
        let Some(HookPoint::Layer(i, LayerHook::BiasChanged)) = HookPoint::parse(&c.name) else { return None };
        let Detail::Exact { differing, .. } = &c.detail else { return None };
        let (rc, bias) = opts.routers.as_ref()?.layer(i)?;
        let name = HookPoint::Layer(i, LayerHook::RouterLogits).name();
        let (ours, reference) = (floats(a, &name)?, floats(b, &name)?);
        let (e, unbiased) = (bias.len(), vec![0.0; bias.len()]);
        let margin =
            |logits: &[f32], t: usize| logits.get(t * e..(t + 1) * e).map(|row| route(rc, row, &unbiased).margin);
        let mut ties = UnbiasedTies { differing: differing.len(), near_ties: 0, largest: 0.0 };
        for d in differing {
            let (x, y) = (margin(&ours, d.index)?, margin(&reference, d.index)?);
            if (x as f64) < opts.near_tie && (y as f64) < opts.near_tie {
                ties.near_ties += 1;
                ties.largest = ties.largest.max(x).max(y);
            }
        }
        (ties.near_ties > 0).then_some(ties)
    }

    pub(crate) fn reading(self) -> String {
        match self.near_ties == self.differing {
            true => format!(
                "every difference a near-tie of the choice without the bias (margins up to {:.1e} on both sides): \
                 the counterfactual flipped, not the experts",
                self.largest
            ),
            false => format!(
                "{} of {} differences near-ties of the choice without the bias (margins up to {:.1e} on both \
                 sides); the rest are not",
                self.near_ties, self.differing, self.largest
            ),
        }
    }
}

/// Routing weights made by another rule than the checkpoint's, tried on ours's own gate logits
/// and chosen experts: the variants real ports have shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsRule {
    /// From `sigmoid + bias`, the scores selection ranks, not the unbiased sigmoid.
    Biased,
    /// Not divided by their sum (`norm_topk_prob`).
    Unnormalised,
    /// Not multiplied by `routed_scaling_factor`.
    Unscaled,
    /// From a softmax of the gate logits (DeepSeek-V2's router), not a sigmoid.
    Softmax,
}

impl WeightsRule {
    pub fn reading(self) -> &'static str {
        match self {
            WeightsRule::Biased => {
                "ours's weights are its gate's biased scores (sigmoid + e_score_correction_bias): \
                                    the bias is for selection only"
            }
            WeightsRule::Unnormalised => {
                "ours's weights are its gate's scores not divided by their sum (norm_topk_prob)"
            }
            WeightsRule::Unscaled => "ours's weights are its gate's scores without routed_scaling_factor",
            WeightsRule::Softmax => "ours's weights are a softmax of its gate logits, not their sigmoid",
        }
    }

    /// The rule `weights` (`[T, k]`, aligned with `ids`) follow on `logits` (`[T, E]`), where the
    /// checkpoint's rule (`rc`, `bias`) does not reproduce them within `tol` and exactly one
    /// variant does; None otherwise (also for shapes that do not fit).
    pub fn of(
        logits: &[f32],
        ids: &[i64],
        weights: &[f32],
        rc: &RouterConfig,
        bias: &[f32],
        tol: Tolerance,
    ) -> Option<WeightsRule> {
        let (e, k) = (bias.len(), rc.top_k);
        if e == 0
            || k == 0
            || !logits.len().is_multiple_of(e)
            || ids.len() != logits.len() / e * k
            || weights.len() != ids.len()
        {
            return None;
        }
        let ids: Vec<usize> = ids.iter().map(|&i| usize::try_from(i).ok().filter(|&i| i < e)).collect::<Option<_>>()?;
        let made_by = |rule: Option<WeightsRule>| {
            logits.chunks_exact(e).zip(ids.chunks_exact(k)).zip(weights.chunks_exact(k)).all(|((l, ids), w)| {
                let scores: Vec<f32> = match rule {
                    Some(WeightsRule::Biased) => l.iter().zip(bias).map(|(&l, b)| sigmoid(l) + b).collect(),
                    Some(WeightsRule::Softmax) => {
                        let max = l.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                        let exp: Vec<f32> = l.iter().map(|&x| (x - max).exp()).collect();
                        let sum: f32 = exp.iter().sum();
                        exp.iter().map(|x| x / sum).collect()
                    }
                    _ => l.iter().map(|&l| sigmoid(l)).collect(),
                };
                let variant = RouterConfig {
                    norm_topk_prob: rc.norm_topk_prob && rule != Some(WeightsRule::Unnormalised),
                    routed_scaling_factor: match rule {
                        Some(WeightsRule::Unscaled) => 1.0,
                        _ => rc.routed_scaling_factor,
                    },
                    ..rc.clone()
                };
                let expected = weights_for(&variant, &scores, ids);
                w.iter().zip(&expected).all(|(&a, &x)| crate::compare::element_ok(a, x, tol))
            })
        };
        if made_by(None) {
            return None;
        }
        let rules = [WeightsRule::Biased, WeightsRule::Unnormalised, WeightsRule::Unscaled, WeightsRule::Softmax];
        let mut matching = rules.into_iter().filter(|&r| made_by(Some(r)));
        match (matching.next(), matching.next()) {
            (Some(rule), None) => Some(rule),
            _ => None,
        }
    }
}

/// A side whose experts, for every token of a layer, are the top-k of its unbiased scores (the
/// sigmoid of its own gate logits), where the checkpoint's rule picks by `sigmoid + bias`: a port
/// that left the correction bias out of selection (or never created it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BiasLeftOut {
    pub side: Side,
    /// Its tokens whose choice the bias changes (those the flips are made of).
    pub changed: usize,
}

impl BiasLeftOut {
    /// For the selection `name` (a `moe.topk_ids`) with `--model`'s routers: the side (ours
    /// first) whose choice is the checkpoint's rule without the bias at every token, and on one
    /// token at least not the rule with it. None otherwise.
    pub(crate) fn of(a: &Dump, b: &Dump, name: &str, opts: &DiffOptions) -> Option<BiasLeftOut> {
        let Some(HookPoint::Layer(i, LayerHook::TopkIds)) = HookPoint::parse(name) else { return None };
        let (rc, bias) = opts.routers.as_ref()?.layer(i)?;
        let logits_name = HookPoint::Layer(i, LayerHook::RouterLogits).name();
        let (e, k, unbiased) = (bias.len(), rc.top_k, vec![0.0; bias.len()]);
        let set = |mut ids: Vec<i64>| {
            ids.sort_unstable();
            ids
        };
        let of = |d: &Dump, side: Side| {
            let (logits, ids) = (floats(d, &logits_name)?, ints(d, name)?);
            if e == 0 || k == 0 || ids.len() != logits.len() / e * k {
                return None;
            }
            let mut changed = 0;
            for (row, chosen) in logits.chunks_exact(e).zip(ids.chunks_exact(k)) {
                let chosen = set(chosen.to_vec());
                let pick = |b: &[f32]| set(route(rc, row, b).ids.iter().map(|&j| j as i64).collect());
                if pick(&unbiased) != chosen {
                    return None;
                }
                changed += usize::from(pick(bias) != chosen);
            }
            (changed > 0).then_some(BiasLeftOut { side, changed })
        };
        of(a, Side::Ours).or_else(|| of(b, Side::Reference))
    }

    pub(crate) fn reading(self) -> String {
        format!(
            "{} chooses every token's experts by the unbiased scores (sigmoid of the gate logits; {} tokens \
             the correction bias would route otherwise): e_score_correction_bias is left out of selection",
            self.side.label(),
            self.changed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights made on the same logits and experts by each variant are told apart (and the
    /// checkpoint's own rule says nothing).
    #[test]
    fn the_rule_that_made_routing_weights_is_found() {
        let rc = RouterConfig { top_k: 2, n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 2.5 };
        let bias = [0.3f32, -0.2, 0.1, 0.0];
        let logits = [0.5f32, -1.0, 2.0, 0.1, -0.3, 1.2, 0.7, -2.0];
        let ids = [2i64, 0, 1, 2];
        let tol = Tolerance::default();
        let made = |rule: Option<WeightsRule>| -> Vec<f32> {
            let mut out = Vec::new();
            for (l, ids) in logits.chunks(4).zip(ids.chunks(2)) {
                let s: Vec<f32> = match rule {
                    Some(WeightsRule::Biased) => l.iter().zip(&bias).map(|(&l, b)| sigmoid(l) + b).collect(),
                    Some(WeightsRule::Softmax) => {
                        let sum: f32 = l.iter().map(|x| x.exp()).sum();
                        l.iter().map(|x| x.exp() / sum).collect()
                    }
                    _ => l.iter().map(|&l| sigmoid(l)).collect(),
                };
                let picked: Vec<f32> = ids.iter().map(|&i| s[i as usize]).collect();
                let sum: f32 = picked.iter().sum();
                let norm = if rule == Some(WeightsRule::Unnormalised) { 1.0 } else { sum };
                let scale = if rule == Some(WeightsRule::Unscaled) { 1.0 } else { 2.5 };
                out.extend(picked.iter().map(|p| p / norm * scale));
            }
            out
        };
        assert_eq!(WeightsRule::of(&logits, &ids, &made(None), &rc, &bias, tol), None);
        for rule in [WeightsRule::Biased, WeightsRule::Unnormalised, WeightsRule::Unscaled, WeightsRule::Softmax] {
            assert_eq!(WeightsRule::of(&logits, &ids, &made(Some(rule)), &rc, &bias, tol), Some(rule), "{rule:?}");
        }
        // Weights no variant makes: nothing said.
        assert_eq!(WeightsRule::of(&logits, &ids, &[1.0; 4], &rc, &bias, tol), None);
    }
}
