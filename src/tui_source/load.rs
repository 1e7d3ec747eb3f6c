//! The expert load view's data: each MoE layer's tokens per expert (against the reference's, the
//! net load moved), and the selected layer's co-activated expert pairs with their chance level,
//! counted as `audit --pairs` counts them. Each layer's pairs are counted once; its chance level's
//! draws (about 0.2 s at GLM-5's 256 experts, which froze the screen at each new layer on the UI
//! thread) run on a thread of their own ([`Chances`]), the view saying so meanwhile.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};

use glimpse_tui::{ExpertPair, LoadRow, PairsRow, Part};

use super::{layer_names, DumpSource};
use crate::audit::{pairs, Audit, LayerLoad};

/// The pairs listed under the heatmap.
const PAIRS_SHOWN: usize = 3;

impl DumpSource {
    /// `layer`'s expert ids (`[tokens, k]` flattened), the view's expert count and k; None where
    /// it routes nothing.
    fn layer_ids(&self, layer: usize) -> Option<(Vec<i64>, usize, usize)> {
        let name = format!("layers.{layer}.moe.topk_ids");
        let (ids, _) = Self::ints(&self.ours, &name)?;
        let k = self.ours.shape(&name).and_then(|s| s.last().copied()).unwrap_or(1).max(1);
        Some((ids, self.expert_count(), k))
    }

    /// The view's one expert count, every layer's and the reference's, as `audit` counts the
    /// dumps': the first router either records (ids past it are a port's bug, not experts), else
    /// the checkpoint's (never fewer than the ids need: a dump of a larger model than the config
    /// given), else the largest id of any layer of either dump + 1. At most `MAX_EXPERTS`,
    /// whatever a dump says: ids past it are not counted. (Per layer, the rows stopped lining
    /// up where a layer's largest id fell short, and one stray id shrank every other row.)
    fn expert_count(&self) -> usize {
        *self.expert_count.get_or_init(|| {
            let dumps = || std::iter::once(&self.ours).chain(self.reference.as_ref());
            let n = dumps().find_map(crate::dump::Dump::experts).unwrap_or_else(|| {
                let ids = dumps().flat_map(|d| {
                    let routed = d.names().into_iter().filter(|n| n.ends_with(".moe.topk_ids"));
                    routed.filter_map(|n| Self::ints(d, &n)).flat_map(|(v, _)| v).collect::<Vec<_>>()
                });
                let largest = ids.filter_map(|x| usize::try_from(x).ok()).max().map_or(0, |m| m + 1);
                self.experts.unwrap_or(largest).max(largest)
            });
            n.min(crate::config::MAX_EXPERTS)
        })
    }

    pub(super) fn load_rows(&self) -> Vec<LoadRow> {
        let mut rows = Vec::new();
        for (i, _) in layer_names(&self.ours) {
            let Some((ids, experts, k)) = self.layer_ids(i) else { continue };
            let counts = |ids: &[i64]| {
                let mut load = LayerLoad::new(i, experts);
                for id in ids.iter().filter_map(|&x| usize::try_from(x).ok()) {
                    if let Some(c) = load.counts.get_mut(id) {
                        *c += 1;
                    }
                }
                load
            };
            let load = counts(&ids);
            let name = format!("layers.{i}.moe.topk_ids");
            // (Against the reference's routing of the same tokens and top-k only, as `audit
            // --against` compares.)
            let theirs = self.paired_ints(&name).ok().flatten();
            let moved = theirs.map(|theirs| crate::audit::net_moved(&load.counts, &counts(&theirs).counts));
            let st = load.stats();
            let mtp = self.is_mtp(i, ids.len() / k);
            rows.push(LoadRow { layer: i, mtp, counts: load.counts, max_vio: st.max_vio, cv: st.cv, moved });
        }
        rows
    }

    /// The config's MTP layer, or a layer of `rows` tokens, one position short a batch row
    /// (what only the MTP layer is, and all there is to go by without a config).
    fn is_mtp(&self, layer: usize, rows: usize) -> bool {
        let short = self.tokens.seq > 1 && rows == self.tokens.batch * (self.tokens.seq - 1);
        short || self.layers.iter().any(|l| l.part == Part::Layer(layer) && l.ffn == "mtp")
    }

    /// `layer`'s strongest co-activated pairs, each batch row a prompt as `audit` counts a
    /// dump's; None where it routes nothing, chooses one expert a token, or holds ids no router
    /// makes (a port's bug: the routing view names them).
    pub(super) fn pairs_of(&self, layer: usize) -> Option<PairsRow> {
        let counted = self.pairs.borrow().get(&layer).cloned();
        let (pairs, job) = match counted {
            Some(counted) => counted?,
            None => {
                let counted = self.count_pairs(layer);
                self.pairs.borrow_mut().insert(layer, counted.clone());
                counted?
            }
        };
        Some(match self.chances.level(job) {
            Some(chance_p95) => PairsRow { pairs, chance_p95, chance_pending: false },
            None => PairsRow { pairs, chance_p95: None, chance_pending: true },
        })
    }

    /// `layer`'s strongest pairs, and what its chance level is drawn from.
    fn count_pairs(&self, layer: usize) -> Option<Counted> {
        let (ids, experts, k) = self.layer_ids(layer)?;
        let mut audit = Audit::new(experts);
        audit.add(layer, &ids, k, self.tokens.batch.max(1), None).ok()?;
        let l = audit.layers.get(&layer)?;
        l.pairs.as_ref()?;
        let pairs: Vec<ExpertPair> = (l.strongest_pairs(PAIRS_SHOWN).iter())
            .map(|p| ExpertPair { experts: p.experts, tokens: p.tokens, expected: p.expected, surprise: p.surprise() })
            .collect();
        Some((pairs, Job { layer, loads: l.counts.clone(), tokens: l.tokens, k: l.k }))
    }
}

/// A layer's strongest pairs, and what its chance level is drawn from.
pub(super) type Counted = (Vec<ExpertPair>, Job);

/// What one layer's chance level is drawn from (`pairs::chance`).
#[derive(Clone)]
pub(super) struct Job {
    layer: usize,
    loads: Vec<u64>,
    tokens: u64,
    k: usize,
}

impl Job {
    /// The 95th percentile of the layer's top surprise by chance; None where it has none.
    fn run(&self) -> Option<f64> {
        pairs::chance(&self.loads, self.tokens, self.k, self.layer as u64).map(|c| c.p95)
    }
}

/// The layers' chance levels, drawn on one thread of their own in the order they were asked for.
#[derive(Default)]
pub(super) struct Chances {
    jobs: RefCell<Option<mpsc::Sender<Job>>>,
    asked: RefCell<HashSet<usize>>,
    done: Arc<Mutex<HashMap<usize, Option<f64>>>>,
}

impl Chances {
    /// The job's layer's chance level (Some(None): it has none) once drawn; None while it is
    /// being drawn, asked for on the first call.
    fn level(&self, job: Job) -> Option<Option<f64>> {
        if let Some(level) = self.done().get(&job.layer) {
            return Some(*level);
        }
        if self.asked.borrow_mut().insert(job.layer) {
            let mut jobs = self.jobs.borrow_mut();
            if jobs.is_none() {
                *jobs = self.spawn();
            }
            let sent = match jobs.as_ref() {
                Some(tx) => tx.send(job),
                None => Err(mpsc::SendError(job)),
            };
            // Without a thread (none could start, or it stopped), drawn here after all.
            if let Err(mpsc::SendError(job)) = sent {
                let level = job.run();
                self.done().insert(job.layer, level);
                return Some(level);
            }
        }
        None
    }

    /// Whether a level asked for is still being drawn.
    pub(super) fn busy(&self) -> bool {
        let done = self.done();
        self.asked.borrow().iter().any(|layer| !done.contains_key(layer))
    }

    fn done(&self) -> MutexGuard<'_, HashMap<usize, Option<f64>>> {
        // (Poisoned only by a panic in the drawing thread, which leaves the map as it was.)
        self.done.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn(&self) -> Option<mpsc::Sender<Job>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let done = Arc::clone(&self.done);
        let drawing = move || {
            for job in rx {
                let level = job.run();
                done.lock().unwrap_or_else(PoisonError::into_inner).insert(job.layer, level);
            }
        };
        std::thread::Builder::new().name("pair-chance".into()).spawn(drawing).ok().map(|_| tx)
    }
}
