//! `verify`: run a reference dump's `input_ids` through the model and compare every tensor the dump
//! holds, as it is produced (nothing is kept but the verdicts, so memory does not grow with depth).
//! `isolate` feeds every layer the reference's own input, so an error in one layer is measured in
//! that layer alone instead of spreading down the stack.

use std::collections::BTreeSet;

use candle_core::Tensor;

use crate::compare::{self, Comparison, Detail, Rule, Tolerance};
use crate::dump::{Dump, Values};
use crate::error::{Error, Result};
use crate::hooks::{HookPoint, LayerHook, Observer};
use crate::model::indexer::Selection;
use crate::model::Model;

/// Compares each reported tensor against the reference dump on arrival.
pub struct Verifier<'a> {
    golden: &'a Dump,
    tol: Tolerance,
    pub results: Vec<Comparison>,
    /// Our `moe.topk_ids` of the current layer, to align `moe.topk_weights` by expert.
    last_ids: Option<Vec<i64>>,
}

impl<'a> Verifier<'a> {
    pub fn new(golden: &'a Dump, tol: Tolerance) -> Self {
        Verifier { golden, tol, results: Vec::new(), last_ids: None }
    }

    fn compare(&mut self, name: &str, ours: &Tensor) -> Result<Comparison> {
        let (reference, ref_shape) = self.golden.values(name)?;
        let shape = ours.dims().to_vec();
        if shape != ref_shape {
            return Ok(Comparison {
                name: name.into(),
                ok: false,
                detail: Detail::Shape { ours: shape, reference: ref_shape },
            });
        }
        let ours_values = match ours.dtype() {
            candle_core::DType::I64 => Values::I64(ours.flatten_all()?.to_vec1::<i64>()?),
            _ => Values::F32(ours.flatten_all()?.to_vec1::<f32>()?),
        };
        let kind_error =
            || Error::dump(&self.golden.path, format!("`{name}` has a different element type than glimpse produces"));
        let (ok, detail) = match (Rule::for_name(name, &reference), &ours_values, &reference) {
            (Rule::Float, Values::F32(a), Values::F32(e)) => compare::compare_floats(a, e, &shape, self.tol),
            (Rule::DsaSelection, Values::I64(a), Values::I64(e)) => compare::compare_dsa(a, e, &shape),
            (Rule::ExpertSet, Values::I64(a), Values::I64(e)) => {
                self.last_ids = Some(a.clone());
                compare::compare_expert_sets(a, e, &shape)
            }
            (Rule::ExpertWeights, Values::F32(a), Values::F32(e)) => {
                let ref_ids_name = name.replace(".moe.topk_weights", ".moe.topk_ids");
                let (ref_ids, our_ids) = match (self.golden.values(&ref_ids_name), &self.last_ids) {
                    (Ok((Values::I64(r), _)), Some(o)) => (r, o.clone()),
                    // Without ids on both sides, weights can only be compared position by position.
                    _ => (Vec::new(), Vec::new()),
                };
                if ref_ids.is_empty() {
                    compare::compare_floats(a, e, &shape, self.tol)
                } else {
                    compare::compare_expert_weights(&our_ids, a, &ref_ids, e, &shape, self.tol)
                }
            }
            (Rule::Exact, Values::I64(a), Values::I64(e)) => compare::compare_expert_sets(
                // Exact: compare each element as its own one-member set.
                a,
                e,
                &[a.len(), 1],
            ),
            _ => return Err(kind_error()),
        };
        Ok(Comparison { name: name.into(), ok, detail })
    }
}

impl Observer for Verifier<'_> {
    fn wants(&self, point: HookPoint) -> bool {
        self.golden.contains(&point.name())
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        let c = self.compare(&point.name(), value)?;
        self.results.push(c);
        Ok(())
    }
}

pub struct Report {
    pub results: Vec<Comparison>,
    /// Names in the reference that this run did not produce.
    pub only_in_reference: Vec<String>,
    pub isolate: bool,
}

impl Report {
    pub fn mismatches(&self) -> usize {
        self.results.iter().filter(|c| !c.ok).count()
    }
    pub fn all_match(&self) -> bool {
        self.mismatches() == 0 && !self.results.is_empty()
    }
}

/// Runs the dump's tokens and compares. In `isolate` mode every layer's input (and the final
/// norm's) is the reference's `layers.{i-1}.output` (`embeddings` for layer 0).
pub fn verify(model: &Model, golden: &Dump, tol: Tolerance, isolate: bool) -> Result<Report> {
    let tokens = golden.tokens()?;
    let mut v = Verifier::new(golden, tol);
    if isolate {
        let rope = model.rope_tables(tokens.seq);
        let ours = model.embed(&tokens, &mut v)?;
        let reference_input = |name: &str, ours: Tensor| -> Result<Tensor> {
            if golden.contains(name) {
                let t = golden.tensor(name)?;
                if t.dims() != ours.dims() {
                    return Err(Error::dump(
                        &golden.path,
                        format!("`{name}` has shape {:?}, expected {:?}", t.dims(), ours.dims()),
                    ));
                }
                Ok(t)
            } else {
                Ok(ours)
            }
        };
        let mut h = reference_input("embeddings", ours)?;
        let mut sel: Option<Selection> = None;
        for layer in &model.layers {
            let ours = layer.forward(&h, &rope, &mut sel, &mut v)?;
            h = reference_input(&HookPoint::Layer(layer.index, LayerHook::Output).name(), ours)?;
        }
        model.head(&h, &mut v)?;
    } else {
        model.forward(&tokens, &mut v)?;
    }
    let produced: BTreeSet<&str> = v.results.iter().map(|c| c.name.as_str()).collect();
    let only_in_reference = golden.names().into_iter().filter(|n| !produced.contains(n.as_str())).collect();
    Ok(Report { results: v.results, only_in_reference, isolate })
}

/// One line per compared tensor.
pub fn format_line(c: &Comparison) -> String {
    let verdict = if c.ok { "ok" } else { "MISMATCH" };
    let body = match &c.detail {
        Detail::Float { max_abs, worst_at, ours, reference, max_rel, bad, total } => {
            let mut s = format!("max_abs {max_abs:9.3e}  max_rel {max_rel:9.3e}");
            if *bad > 0 {
                s += &format!("  {bad}/{total} outside tol; worst at {worst_at:?}: ours {ours:e} ref {reference:e}");
            }
            s
        }
        Detail::Sets { rows, differing, first } => {
            let mut s = format!("{differing}/{rows} rows differ");
            if let Some((at, ours, reference)) = first {
                s += &format!("; first at {at:?}: only ours {ours:?}, only ref {reference:?}");
            }
            s
        }
        Detail::Shape { ours, reference } => format!("shape {ours:?}, reference {reference:?}"),
    };
    format!("{:<34} {:<8} {body}", c.name, verdict)
}

pub fn print_report(r: &Report, tol: Tolerance) {
    for c in &r.results {
        println!("{}", format_line(c));
    }
    for n in &r.only_in_reference {
        println!("{n:<34} {:<8} only in the reference (not produced by this run)", "skipped");
    }
    let mode = if r.isolate { ", isolated layers" } else { "" };
    let first = r.results.iter().find(|c| !c.ok).map(|c| format!("; first mismatch: {}", c.name)).unwrap_or_default();
    println!(
        "{} of {} tensors match (atol {:e}, rtol {:e}{mode}){first}",
        r.results.len() - r.mismatches(),
        r.results.len(),
        tol.atol,
        tol.rtol
    );
}
