//! The mixture of experts: a sigmoid router in f32 whose correction bias steers *selection only*,
//! flat or group-limited top-k, weights from the unbiased scores (normalised, then scaled by
//! `routed_scaling_factor`), the chosen experts' SwiGLU outputs summed by weight, plus the shared
//! expert. Experts load from per-expert tensors (the released layout) or from transformers' fused
//! `experts.gate_up_proj` / `experts.down_proj`.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use super::gemv::Bf16Weight;
use super::layer::{DecoderLayer, Ffn};
use super::mlp::Mlp;
use super::nn::{matmul_nt, Linear, Weight};
use crate::checkpoint::{Checkpoint, Loader};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hooks::{emit, HookPoint, LayerHook, Observer};

pub struct Moe {
    pub gate: Tensor,                      // [E, hidden], f32
    pub e_score_correction_bias: Vec<f32>, // [E]
    pub experts: Vec<Mlp>,
    pub shared_experts: Mlp,
    pub router: RouterConfig,
}

/// What the router needs from the config.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

impl RouterConfig {
    pub fn new(cfg: &Config) -> Self {
        RouterConfig {
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
        }
    }

    /// Whether every group is kept (one group, or `topk_group` of them all): then grouped
    /// routing is flat routing.
    pub fn is_flat(&self) -> bool {
        self.n_group <= 1 || self.topk_group >= self.n_group
    }
}

/// Every MoE layer's routing rule and correction bias: what recomputes the margin of a routing
/// decision from recorded gate logits (`flips::margins_in`), for dumps that hold logits, not margins.
#[derive(Debug, Clone)]
pub struct Routers {
    pub config: RouterConfig,
    /// Layer index -> its `e_score_correction_bias`.
    pub bias: BTreeMap<usize, Vec<f32>>,
}

impl Routers {
    /// From loaded layers (the main model's, the MTP layer).
    pub fn of_layers<'a>(cfg: &Config, layers: impl IntoIterator<Item = &'a DecoderLayer>) -> Self {
        let bias = layers
            .into_iter()
            .filter_map(|l| match &l.mlp {
                Ffn::Moe(m) => Some((l.index, m.e_score_correction_bias.clone())),
                Ffn::Dense(_) => None,
            })
            .collect();
        Routers { config: RouterConfig::new(cfg), bias }
    }

    /// The routers of the model `w` runs: a loaded model's layers', or read from the checkpoint
    /// a streamed run reads ([`Routers::read`]).
    pub fn of_weights(w: super::Weights) -> Result<Self> {
        match w {
            super::Weights::Resident(m) => Ok(Routers::of_layers(&m.config, &m.layers)),
            super::Weights::Streamed(c) => Routers::read(c),
        }
    }

    /// Read from a checkpoint without loading it: every layer that has a correction bias (the
    /// MTP layers' too).
    pub fn read(ckpt: &Checkpoint) -> Result<Self> {
        let mut bias = BTreeMap::new();
        let c = &ckpt.config;
        for i in 0..c.num_hidden_layers + c.num_nextn_predict_layers.max(1) {
            let name = format!("model.layers.{i}.mlp.gate.e_score_correction_bias");
            // A router still to be downloaded is no dense layer.
            if let Some(note) = ckpt.absent_note().filter(|_| ckpt.is_absent(&name)) {
                return Err(Error::checkpoint(&ckpt.dir, format!("`{name}` is missing: {note}")));
            }
            if ckpt.contains(&name) {
                // Checked here too: `diff`, `audit` and the TUI read routers without the loader.
                let (b, shape) = ckpt.f32(&name)?;
                let want = [c.n_routed_experts];
                let problem = (shape != want)
                    .then(|| format!("`{name}` has shape {shape:?}, expected {want:?}"))
                    .or_else(|| non_finite_bias(&name, &b));
                if let Some(problem) = problem {
                    return Err(Error::checkpoint(&ckpt.dir, problem));
                }
                bias.insert(i, b);
            }
        }
        Ok(Routers { config: RouterConfig::new(&ckpt.config), bias })
    }

    /// Layer `i`'s rule and bias; None for a dense layer.
    pub fn layer(&self, i: usize) -> Option<(&RouterConfig, &[f32])> {
        self.bias.get(&i).map(|b| (&self.config, b.as_slice()))
    }
}

/// Refuses replayed routing (`verify --force-routing`: the reference's `moe.topk_ids`) that does
/// not fit the run: another number of tokens, of experts a token (`k`, where the run fixes it),
/// or an expert the model does not have.
pub fn check_replayed(
    layer: usize,
    forced: &[Vec<usize>],
    tokens: usize,
    k: Option<usize>,
    experts: usize,
) -> Result<()> {
    let problem = if forced.len() != tokens {
        Some(format!("has {} tokens, the run {tokens}", forced.len()))
    } else if let Some(row) = forced.iter().position(|ids| k.is_some_and(|k| ids.len() != k)) {
        Some(format!("chooses {} experts for token {row}, the run {}", forced[row].len(), k.unwrap_or(0)))
    } else {
        forced.iter().enumerate().find_map(|(t, ids)| {
            // (A row is a set: an expert twice would run twice, and read as ours's bug.)
            if let Some((j, &id)) = ids.iter().enumerate().find(|&(j, id)| ids[..j].contains(id)) {
                return Some(format!("chooses expert {id} twice for token {t} (its place {j})"));
            }
            let id = ids.iter().find(|&&i| i >= experts)?;
            let id = if *id == usize::MAX { "a negative expert id".to_string() } else { format!("expert {id}") };
            Some(format!("holds {id} for token {t}, past the model's {experts}"))
        })
    };
    match problem {
        Some(p) => {
            Err(Error::Usage(format!("layer {layer}: the replayed routing (the reference's `moe.topk_ids`) {p}")))
        }
        None => Ok(()),
    }
}

/// What is wrong with a correction bias that is not finite: selection ranks by it, and a NaN
/// ranks below everything, so every token took the same experts with an infinite margin.
fn non_finite_bias(name: &str, bias: &[f32]) -> Option<String> {
    let j = bias.iter().position(|b| !b.is_finite())?;
    Some(format!("`{name}` holds {} at expert {j}: selection ranks experts by it", bias[j]))
}

/// One token's routing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub ids: Vec<usize>,
    pub weights: Vec<f32>,
    /// How close the choice came to another: k-th minus (k+1)-th biased score among the experts
    /// the groups allow (+inf if none is left), and with grouped routing, where that is smaller
    /// and the group choice matters ([`GroupCut::matters`]), the `topk_group`-th minus the next
    /// group's score (a near tie there swaps groups, and so experts, whatever the experts' own
    /// gap). NaN when either is.
    pub margin: f32,
}

pub fn sigmoid(l: f32) -> f32 {
    1.0 / (1.0 + (-l).exp())
}

/// Routes one token from its gate logits, as `GlmMoeDsaTopkRouter.forward`:
/// `s = sigmoid(logits)`; choose on `s + bias` (within the `topk_group` groups whose top-2 biased
/// scores sum highest); weight the chosen experts by the *unbiased* `s`.
pub fn route(rc: &RouterConfig, logits: &[f32], bias: &[f32]) -> Route {
    let scores: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
    let (choice, cut) = choice_scores(rc, &scores, bias);
    let order = top_indices(&choice, rc.top_k + 1);
    let ids = order[..rc.top_k.min(order.len())].to_vec();
    let experts = gap(&choice, &order, rc.top_k);
    let margin = match cut {
        Some(cut) if cut.matters(&ids, &choice) => match (experts, cut.margin) {
            (e, g) if e.is_nan() || g.is_nan() => f32::NAN,
            (e, g) => e.min(g),
        },
        _ => experts,
    };
    Route { weights: weights_for(rc, &scores, &ids), margin, ids }
}

/// `v[order[n-1]] - v[order[n]]` (`order` ranks `v`): how far the n-th is ahead of the next;
/// +inf when there is no finite next.
fn gap(v: &[f32], order: &[usize], n: usize) -> f32 {
    match (n.checked_sub(1).and_then(|i| order.get(i)), order.get(n)) {
        (Some(&a), Some(&b)) if v[b].is_finite() => v[a] - v[b],
        _ => f32::INFINITY,
    }
}

/// Where grouped routing cut its groups: between the last group it kept and the best it dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupCut {
    /// The last kept group's score minus the next group's (+inf when that one is not finite).
    pub margin: f32,
    pub last_kept: usize,
    /// The next group's best biased score.
    pub best_next: f32,
    /// Experts a group.
    pub per: usize,
}

impl GroupCut {
    /// Whether swapping the last kept group for the next could change the experts `ids` chosen
    /// from `choice`: the last kept group holds one of them, or the next holds an expert scoring
    /// at least the k-th. (Otherwise a near tie of the groups flips nothing, and its gap would
    /// class a bug's expert flips as near-ties.)
    pub fn matters(&self, ids: &[usize], choice: &[f32]) -> bool {
        let kth = ids.last().map_or(f32::NEG_INFINITY, |&i| choice[i]);
        ids.iter().any(|&i| i / self.per == self.last_kept) || self.best_next >= kth
    }
}

/// The values selection ranks: `s + bias`, with experts outside the kept groups at -inf; and, when
/// grouped routing drops some groups, where it cut them.
pub fn choice_scores(rc: &RouterConfig, scores: &[f32], bias: &[f32]) -> (Vec<f32>, Option<GroupCut>) {
    let e = scores.len();
    let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    if rc.is_flat() {
        return (choice, None);
    }
    let per = e / rc.n_group;
    let groups = group_scores(&choice, rc.n_group);
    let order = top_indices(&groups, rc.topk_group + 1);
    let cut = match (rc.topk_group.checked_sub(1).and_then(|i| order.get(i)), order.get(rc.topk_group)) {
        (Some(&last_kept), Some(&next)) => {
            let best_next = choice[next * per..(next + 1) * per].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            Some(GroupCut { margin: gap(&groups, &order, rc.topk_group), last_kept, best_next, per })
        }
        _ => None,
    };
    let kept = &order[..rc.topk_group.min(order.len())];
    for g in (0..rc.n_group).filter(|g| !kept.contains(g)) {
        choice[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
    }
    (choice, cut)
}

/// Each of `n_group` equal groups' score: the sum of its top 2 biased scores (of its only one
/// when a group holds one expert).
pub fn group_scores(choice: &[f32], n_group: usize) -> Vec<f32> {
    let per = (choice.len() / n_group.max(1)).max(1);
    choice.chunks(per).map(|g| top_indices(g, 2).iter().map(|&j| g[j]).sum()).collect()
}

/// Weights of the chosen experts: their unbiased scores, normalised (when `norm_topk_prob`), then
/// scaled by `routed_scaling_factor`.
pub fn weights_for(rc: &RouterConfig, scores: &[f32], ids: &[usize]) -> Vec<f32> {
    let mut weights: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
    if rc.norm_topk_prob {
        let denom = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= denom);
    }
    weights.iter_mut().for_each(|w| *w *= rc.routed_scaling_factor);
    weights
}

/// Whether the `chosen` set would differ with the correction bias removed.
pub fn bias_changed(rc: &RouterConfig, logits: &[f32], chosen: &[usize]) -> bool {
    let mut a = unbiased_ids(rc, logits);
    let mut b = chosen.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    a != b
}

/// The experts one token's gate `logits` choose without the correction bias (the same rule,
/// groups included): what the load would be had the bias never been learned.
pub fn unbiased_ids(rc: &RouterConfig, logits: &[f32]) -> Vec<usize> {
    route_ids(rc, logits, &vec![0.0; logits.len()])
}

fn route_ids(rc: &RouterConfig, logits: &[f32], bias: &[f32]) -> Vec<usize> {
    let scores: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
    top_indices(&choice_scores(rc, &scores, bias).0, rc.top_k)
}

/// Indices of the `k` largest values, largest first, ties by index. A NaN ranks above every
/// number whatever its sign, as `torch.topk` ranks it (and the route kernel, `cuda/router.cu`).
pub fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    use std::cmp::Ordering;
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| {
        let by_value = match (v[a].is_nan(), v[b].is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => v[b].partial_cmp(&v[a]).unwrap_or(Ordering::Equal),
        };
        by_value.then(a.cmp(&b))
    });
    order.truncate(k);
    order
}

impl Moe {
    pub fn load(l: &mut Loader, cfg: &Config, layer: usize) -> Self {
        let p = format!("model.layers.{layer}.mlp");
        let (h, e, inter) = (cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size);
        let gate = l.get(&format!("{p}.gate.weight"), &[e, h]);
        let bias = l.get(&format!("{p}.gate.e_score_correction_bias"), &[e]);
        let bias = bias.to_vec1::<f32>().unwrap_or_default();
        if let Some(problem) = non_finite_bias(&format!("{p}.gate.e_score_correction_bias"), &bias) {
            l.refuse(problem);
        }
        let experts = if l.has(&format!("{p}.experts.gate_up_proj")) {
            load_fused_experts(l, &p, e, h, inter)
        } else {
            (0..e).map(|j| Mlp::load(l, &format!("{p}.experts.{j}"), h, inter)).collect()
        };
        Moe {
            gate,
            e_score_correction_bias: bias,
            experts,
            shared_experts: Mlp::load(l, &format!("{p}.shared_experts"), h, cfg.shared_intermediate_size()),
            router: RouterConfig::new(cfg),
        }
    }

    /// x: [B, S, hidden] (post-attention-normed) -> [B, S, hidden]
    pub fn forward(&self, layer: usize, x: &Tensor, obs: &mut dyn Observer) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = dims[dims.len() - 1];
        let flat = x.reshape(((), hidden))?; // [N, hidden]
        let n = flat.dims()[0];
        let logits = matmul_nt(&flat, &self.gate)?; // [N, E], f32
        emit(obs, HookPoint::Layer(layer, LayerHook::RouterLogits), || Ok(logits.clone()))?;
        let logits_v = logits.to_vec2::<f32>()?;
        let bias = &self.e_score_correction_bias;
        let rc = &self.router;
        let mut routes: Vec<Route> = logits_v.iter().map(|row| route(rc, row, bias)).collect();
        if let Some(forced) = obs.forced_routing(layer)? {
            check_replayed(layer, &forced, n, None, bias.len())?;
            // The margin stays our own decision's (as a replayed DSA selection's does), so a run
            // that replays its own choices records what it would have recorded.
            for ((r, ids), row) in routes.iter_mut().zip(forced).zip(&logits_v) {
                let scores: Vec<f32> = row.iter().map(|&l| sigmoid(l)).collect();
                *r = Route { weights: weights_for(rc, &scores, &ids), ids, margin: r.margin };
            }
        }
        let k = routes.first().map_or(rc.top_k, |r| r.ids.len());
        let hook = |h| HookPoint::Layer(layer, h);
        emit(obs, hook(LayerHook::RouterScores), || sigmoid_tensor(&logits))?;
        emit(obs, hook(LayerHook::RouterBiasedScores), || {
            let b = Tensor::from_vec(bias.clone(), bias.len(), &Device::Cpu)?;
            Ok(sigmoid_tensor(&logits)?.broadcast_add(&b)?)
        })?;
        emit(obs, hook(LayerHook::TopkIds), || {
            let ids: Vec<i64> = routes.iter().flat_map(|r| r.ids.iter().map(|&i| i as i64)).collect();
            Ok(Tensor::from_vec(ids, (n, k), &Device::Cpu)?)
        })?;
        emit(obs, hook(LayerHook::TopkWeights), || {
            let w: Vec<f32> = routes.iter().flat_map(|r| r.weights.iter().copied()).collect();
            Ok(Tensor::from_vec(w, (n, k), &Device::Cpu)?)
        })?;
        emit(obs, hook(LayerHook::RouterMargin), || {
            Ok(Tensor::from_vec(routes.iter().map(|r| r.margin).collect::<Vec<_>>(), n, &Device::Cpu)?)
        })?;
        emit(obs, hook(LayerHook::BiasChanged), || {
            let changed: Vec<i64> =
                routes.iter().zip(&logits_v).map(|(r, row)| bias_changed(rc, row, &r.ids) as i64).collect();
            Ok(Tensor::from_vec(changed, n, &Device::Cpu)?)
        })?;

        let out = self.routed(&flat, &routes, Mlp::forward)?; // [N, hidden]
        let out = (out.reshape(dims)? + self.shared_experts.forward(x)?)?;
        Ok(out)
    }

    /// The routed experts' part of the output, `flat` ([N, hidden]) routed as `routes` say (one a
    /// token): each token's experts' outputs (`run`: `Mlp::forward`, or a variant of it) times
    /// its weights, summed. Every expert runs once on the tokens routed to it, in expert order
    /// (the reference's summation order), and adds its weighted output back. -> [N, hidden]
    pub fn routed(
        &self,
        flat: &Tensor,
        routes: &[Route],
        run: impl Fn(&Mlp, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (n, hidden) = flat.dims2()?;
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut token_w: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (t, r) in routes.iter().enumerate() {
            for (&id, &w) in r.ids.iter().zip(&r.weights) {
                let (Some(rows), Some(ws)) = (tokens.get_mut(id), token_w.get_mut(id)) else {
                    return Err(Error::Usage(format!("token {t} routed to expert {id} of {}", self.experts.len())));
                };
                rows.push(t as u32);
                ws.push(w);
            }
        }
        // Added in place, in expert order (a tensor `index_add` would copy [N, hidden] per expert).
        let mut out = vec![0f32; n * hidden]; // [N, hidden]
        for (j, mlp) in self.experts.iter().enumerate() {
            if tokens[j].is_empty() {
                continue;
            }
            let (rows, w) = (std::mem::take(&mut tokens[j]), std::mem::take(&mut token_w[j]));
            let m = rows.len();
            let idx = Tensor::from_vec(rows.clone(), m, &Device::Cpu)?;
            let w = Tensor::from_vec(w, (m, 1), &Device::Cpu)?;
            let y = run(mlp, &flat.index_select(&idx, 0)?)?.broadcast_mul(&w)?; // [m, hidden]
            let y = y.flatten_all()?.to_vec1::<f32>()?;
            for (&t, yr) in rows.iter().zip(y.chunks_exact(hidden)) {
                for (o, v) in out[t as usize * hidden..(t as usize + 1) * hidden].iter_mut().zip(yr) {
                    *o += v;
                }
            }
        }
        Ok(Tensor::from_vec(out, (n, hidden), &Device::Cpu)?)
    }
}

/// transformers' in-memory layout: `gate_up_proj` [E, 2I, H] (gate rows first), `down_proj` [E, H, I].
fn load_fused_experts(l: &mut Loader, p: &str, e: usize, h: usize, inter: usize) -> Vec<Mlp> {
    let (gate_up, down) = (format!("{p}.experts.gate_up_proj"), format!("{p}.experts.down_proj"));
    // bf16 in place, viewed as [E * 2I, H] and [E * H, I]: expert j's rows are contiguous.
    let shaped = |name: &str, shape: [usize; 3]| l.ckpt.shape(name) == Some(shape.to_vec());
    let views = (l.bf16(&gate_up).filter(|_| shaped(&gate_up, [e, 2 * inter, h])))
        .zip(l.bf16(&down).filter(|_| shaped(&down, [e, h, inter])));
    if let Some((gu, dn)) = views {
        let linear = |w: Option<Bf16Weight>| w.map(|w| Linear { weight: Weight::bf16_as(l, w), bias: None });
        let expert = |j: usize| -> Option<Mlp> {
            Some(Mlp {
                gate_proj: linear(gu.rows(2 * inter * j, inter))?,
                up_proj: linear(gu.rows(2 * inter * j + inter, inter))?,
                down_proj: linear(dn.rows(h * j, h))?,
            })
        };
        if let Some(experts) = (0..e).map(expert).collect() {
            return experts;
        }
    }
    let gate_up = l.get(&gate_up, &[e, 2 * inter, h]);
    let down = l.get(&down, &[e, h, inter]);
    let linear =
        |t: Tensor| -> candle_core::Result<Linear> { Ok(Linear { weight: Weight::F32(t.contiguous()?), bias: None }) };
    let expert = |j: usize| -> candle_core::Result<Mlp> {
        let gu = gate_up.get(j)?; // [2I, H]
        Ok(Mlp {
            gate_proj: linear(gu.narrow(0, 0, inter)?)?,
            up_proj: linear(gu.narrow(0, inter, inter)?)?,
            down_proj: linear(down.get(j)?)?,
        })
    };
    // Only fails on the empty placeholders of a shape problem the loader has already recorded.
    (0..e).map(expert).collect::<candle_core::Result<Vec<_>>>().unwrap_or_default()
}

/// Elementwise sigmoid with the same formula as [`sigmoid`], so hooks report exactly the scores
/// routing used.
fn sigmoid_tensor(x: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = x.flatten_all()?.to_vec1::<f32>()?.into_iter().map(sigmoid).collect();
    Ok(Tensor::from_vec(v, x.dims(), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(top_k: usize, n_group: usize, topk_group: usize) -> RouterConfig {
        RouterConfig { top_k, n_group, topk_group, norm_topk_prob: true, routed_scaling_factor: 2.5 }
    }
    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    /// The bias decides *which* experts win; the weights come from the unbiased sigmoid scores.
    #[test]
    fn weights_come_from_unbiased_scores() {
        let probs = [0.9f32, 0.8, 0.3, 0.2];
        let logits: Vec<f32> = probs.iter().map(|&p| logit(p)).collect();
        let bias = [0.0f32, -1.0, 0.0, 1.0]; // pushes expert 3 in, expert 1 out
        let r = route(&rc(2, 1, 1), &logits, &bias);
        assert_eq!(r.ids, vec![3, 0]);
        // Margin: 2nd-best minus 3rd-best biased score (0.9 vs 0.3).
        approx::assert_abs_diff_eq!(r.margin, 0.9 - 0.3, epsilon = 1e-5);
        assert!(bias_changed(&rc(2, 1, 1), &logits, &r.ids), "unbiased choice would be {{0, 1}}");
        // Normalised over the unbiased scores 0.2 and 0.9, times 2.5.
        approx::assert_abs_diff_eq!(r.weights[0], 0.2 / 1.1 * 2.5, epsilon = 1e-5);
        approx::assert_abs_diff_eq!(r.weights[1], 0.9 / 1.1 * 2.5, epsilon = 1e-5);
    }

    /// Grouped routing keeps only the `topk_group` groups whose top-2 biased scores sum highest,
    /// so it can pick a different set from flat routing over the same scores.
    #[test]
    fn grouped_vs_flat_routing() {
        // Two groups of three. Group 0 holds the single best expert; group 1 has the best pair.
        let probs = [0.95f32, 0.1, 0.1, 0.7, 0.7, 0.6];
        let logits: Vec<f32> = probs.iter().map(|&p| logit(p)).collect();
        let bias = [0.0f32; 6];
        let flat = route(&rc(2, 1, 1), &logits, &bias);
        assert_eq!(flat.ids, vec![0, 3]);
        let grouped = route(&rc(2, 2, 1), &logits, &bias);
        assert_eq!(grouped.ids, vec![3, 4]); // group 0 scores 1.05, group 1 scores 1.4
        let both = route(&rc(2, 2, 2), &logits, &bias);
        assert_eq!(both.ids, flat.ids);
    }

    /// With groups, a route is as close to flipping as the smaller of its two gaps, the experts'
    /// (k-th minus (k+1)-th among the kept groups) and the groups' (kept minus the next), where
    /// swapping the two groups could change the experts at all.
    #[test]
    fn a_grouped_margin_is_the_smaller_gap_where_the_groups_matter() {
        let route_of = |probs: &[f32], (k, n, keep)| {
            let logits: Vec<f32> = probs.iter().map(|&p| logit(p)).collect();
            route(&rc(k, n, keep), &logits, &vec![0.0; probs.len()])
        };
        // Group 0 scores 0.95 + 0.1 = 1.05, group 1 0.7 + 0.69 = 1.39: group 1 is kept.
        let probs = [0.95f32, 0.1, 0.1, 0.7, 0.69, 0.2];
        let r = route_of(&probs, (1, 2, 1));
        assert_eq!(r.ids, vec![3]);
        approx::assert_abs_diff_eq!(r.margin, 0.7 - 0.69, epsilon = 1e-5); // the experts' gap
        let r = route_of(&probs, (2, 2, 1));
        assert_eq!(r.ids, vec![3, 4]);
        // The experts' gap is 0.69 - 0.2; the groups' 1.39 - 1.05 is smaller.
        approx::assert_abs_diff_eq!(r.margin, 1.39 - 1.05, epsilon = 1e-5);
        // Both groups kept: no cut, only the experts' gap (0.95 and 0.7 chosen, 0.69 next).
        let r = route_of(&probs, (2, 2, 2));
        assert_eq!(r.ids, vec![0, 3]);
        approx::assert_abs_diff_eq!(r.margin, 0.7 - 0.69, epsilon = 1e-5);
        assert_eq!(choice_scores(&rc(2, 2, 2), &probs, &[0.0; 6]).1, None);
        assert_eq!(choice_scores(&rc(2, 1, 1), &probs, &[0.0; 6]).1, None, "flat routing");

        // Three groups, two kept: 1.0, 0.95 and 0.94 (a near tie between groups 1 and 2).
        let probs = [0.9f32, 0.1, 0.5, 0.45, 0.5, 0.44];
        // Top 1 is expert 0: swapping groups 1 and 2 cannot change it (0.5 < 0.9), so the
        // experts' gap (0.9 - 0.5) is the margin.
        let r = route_of(&probs, (1, 3, 2));
        assert_eq!(r.ids, vec![0]);
        approx::assert_abs_diff_eq!(r.margin, 0.9 - 0.5, epsilon = 1e-5);
        // Top 2 takes expert 2 from group 1: the groups' 0.01 decides.
        let r = route_of(&probs, (2, 3, 2));
        assert_eq!(r.ids, vec![0, 2]);
        approx::assert_abs_diff_eq!(r.margin, 0.95 - 0.94, epsilon = 1e-5);
    }

    #[test]
    fn without_normalisation_weights_are_scaled_scores() {
        let logits = [logit(0.6), logit(0.4)];
        let mut c = rc(1, 1, 1);
        c.norm_topk_prob = false;
        let r = route(&c, &logits, &[0.0, 0.0]);
        assert_eq!(r.ids, vec![0]);
        approx::assert_abs_diff_eq!(r.weights[0], 0.6 * 2.5, epsilon = 1e-5);
    }
}
