//! The MTP head's input, read within one dump: `mtp.input_hidden` is the main model's final-norm
//! hidden state, its first S-1 positions. A port that feeds its head the state before the final
//! norm (a bug real ports shipped) differs from the reference first there, and since `hnorm`
//! renormalises whatever it gets, by little further on: the dump's own tensors say what it fed.

use crate::compare::{all_close, Side};
use crate::diff::floats;
use crate::dump::Dump;
use crate::hooks::{HookPoint, LayerHook};

/// A side that fed its MTP head something other than its own final norm's first S-1 positions:
/// the output of its last layer `before_norm` (the state before the final norm), or neither.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MtpInput {
    pub side: Side,
    pub before_norm: Option<usize>,
}

impl MtpInput {
    /// What `side`'s dump `d` fed its MTP head, where it is not its final norm's. None where it
    /// is, or the dump cannot say (it lacks the head's input or the final norm).
    pub fn of(d: &Dump, side: Side) -> Option<MtpInput> {
        let input = HookPoint::MtpInputHidden.name();
        let (fed, shape) = (floats(d, &input)?, d.shape(&input)?);
        let [b, s, h] = shape[..] else { return None };
        if b == 0 || h == 0 {
            return None;
        }
        // The first `s` positions of each batch row of a [B, S, H] tensor, where S = s + 1.
        let head_rows = |name: &str| -> Option<Vec<f32>> {
            if d.shape(name)?[..] != [b, s + 1, h] {
                return None;
            }
            let v = floats(d, name)?;
            Some(v.chunks_exact((s + 1) * h).flat_map(|row| &row[..s * h]).copied().collect())
        };
        // At bf16's tolerance: a head fed a bf16 copy of its final norm was fed the final norm
        // (the state before it is another by far, whole rows rescaled).
        let tol = crate::device::Precision::Bf16.tolerance();
        let same = |v: &[f32]| all_close(v, &fed, tol);
        if same(&head_rows(&HookPoint::FinalNorm.name())?) {
            return None;
        }
        // The main model's last layer: the last whose positions are S (the MTP layer's are S-1).
        let last = d
            .names()
            .iter()
            .filter_map(|n| match HookPoint::parse(n)? {
                HookPoint::Layer(i, LayerHook::Output) if d.shape(n)?.get(1) == Some(&(s + 1)) => Some(i),
                _ => None,
            })
            .max();
        let output = |i: usize| head_rows(&HookPoint::Layer(i, LayerHook::Output).name());
        Some(MtpInput { side, before_norm: last.filter(|&i| output(i).is_some_and(|v| same(&v))) })
    }

    pub fn reading(&self) -> String {
        let side = self.side.label();
        match self.before_norm {
            Some(i) => format!(
                "{side} feeds the MTP head layers.{i}.output, the hidden state before the final norm \
                 (mtp.input_hidden must be its final_norm's first S-1 positions)"
            ),
            None => format!(
                "{side}'s mtp.input_hidden is not its own final_norm's first S-1 positions, which the MTP head takes"
            ),
        }
    }
}
