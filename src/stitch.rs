//! Laying decode steps end to end. Each decode call reports its hooks for the few positions it
//! ran; [`Stitcher`] keeps them and joins them along the sequence, so a decode run's record has
//! the names and shapes of a prefill's (`../shared/spec/dump-format.md`) and can be compared with
//! one, written as a dump, or diffed against a reference.
//!
//! Two kinds of tensor grow with the cache, not the chunk: `dsa.topk` (K = min(index_topk, T))
//! and `dsa.scores` (T keys). Early calls are padded to the final width the way a prefill pads
//! them: `dsa.topk` rows continue with the positions after the last key (past every causal key
//! of that row, so ignored by the spec's set rule), `dsa.scores` with -inf.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, D};

use crate::error::Result;
use crate::hooks::{HookPoint, LayerHook, Observer, Selector};

pub struct Stitcher {
    selector: Selector,
    parts: BTreeMap<HookPoint, Vec<Tensor>>,
    batch: Option<usize>,
}

impl Stitcher {
    pub fn new(selector: Selector) -> Self {
        Stitcher { selector, parts: BTreeMap::new(), batch: None }
    }

    /// Every recorded hook point joined over all calls, in forward order.
    pub fn finish(self) -> Result<Vec<(HookPoint, Tensor)>> {
        let batch = self.batch.unwrap_or(1);
        self.parts.into_iter().map(|(point, parts)| Ok((point, stitch(point, parts, batch)?))).collect()
    }
}

impl Observer for Stitcher {
    /// `input_ids` always: its batch size is what un-flattens the router's [B*C, ...] rows.
    fn wants(&self, point: HookPoint) -> bool {
        point == HookPoint::InputIds || self.selector.wants(point)
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        if point == HookPoint::InputIds {
            self.batch = Some(value.dims()[0]);
            if !self.selector.wants(point) {
                return Ok(());
            }
        }
        self.parts.entry(point).or_default().push(value.clone());
        Ok(())
    }
}

/// Joins one hook point's parts along the sequence.
fn stitch(point: HookPoint, parts: Vec<Tensor>, batch: usize) -> Result<Tensor> {
    let rows = matches!(point, HookPoint::Layer(_, h) if h.token_rows());
    let mut parts = parts
        .into_iter()
        .map(|t| {
            if !rows {
                return Ok(t);
            }
            // [B*C, ...] -> [B, C, ...]
            let mut shape = vec![batch, t.dims()[0] / batch];
            shape.extend_from_slice(&t.dims()[1..]);
            Ok(t.reshape(shape)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let grows = matches!(point, HookPoint::Layer(_, LayerHook::DsaTopk | LayerHook::DsaScores));
    let width = |t: &Tensor| t.dims().last().copied().unwrap_or(0);
    let full = parts.iter().map(width).max().unwrap_or(0);
    for t in parts.iter_mut().filter(|t| grows && width(t) < full) {
        let (b, c, w) = t.dims3()?;
        let pad = match point {
            HookPoint::Layer(_, LayerHook::DsaTopk) => {
                Tensor::arange(w as i64, full as i64, &Device::Cpu)?.broadcast_as((b, c, full - w))?.contiguous()?
            }
            _ => Tensor::full(f32::NEG_INFINITY, (b, c, full - w), &Device::Cpu)?.to_dtype(t.dtype())?,
        };
        *t = Tensor::cat(&[&*t, &pad], D::Minus1)?;
    }
    let joined = Tensor::cat(&parts, 1)?;
    Ok(if rows {
        let mut shape = vec![joined.dims()[0] * joined.dims()[1]];
        shape.extend_from_slice(&joined.dims()[2..]);
        joined.reshape(shape)?
    } else {
        joined
    })
}
