//! A float difference row by row: every row of ours a scaled copy of the reference's, by factors
//! that vary from row to row. That is a normalisation whose statistic differs (an RMSNorm's eps,
//! or its mean taken over other elements, the rope part too): its output is the right direction
//! at the wrong length, by a factor of each row's own.

/// Rows (of the last dimension) each a scaled copy of the reference's, by factors from `min` to
/// `max`: none further from a multiple than f32 rounding, at least two rows apart by more than
/// bf16's rounding would scale them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScale {
    pub rows: usize,
    pub min: f64,
    pub max: f64,
}

impl RowScale {
    pub fn of(ours: &[f32], reference: &[f32], width: usize) -> Option<RowScale> {
        if width < 2 || ours.len() != reference.len() || !ours.len().is_multiple_of(width) {
            return None;
        }
        let (mut min, mut max, mut rows) = (f64::INFINITY, f64::NEG_INFINITY, 0);
        for (a, e) in ours.chunks_exact(width).zip(reference.chunks_exact(width)) {
            let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
            let (ae, ee, aa) = (dot(a, e), dot(e, e), dot(a, a));
            if ee == 0.0 && aa == 0.0 {
                continue;
            }
            // What is left of the row once its scale is taken out, against the row: rounding's.
            let cos2 = ae * ae / (ee * aa);
            if !(cos2.is_finite() && 1.0 - cos2 < 1e-9) {
                return None;
            }
            let scale = ae / ee;
            (min, max, rows) = (min.min(scale), max.max(scale), rows + 1);
        }
        // (One factor for all is `factor`'s reading; factors within 1e-3 of 1, rounding's.)
        let varies = max - min > 1e-3 * max.abs().max(min.abs());
        let off = (min - 1.0).abs().max((max - 1.0).abs()) > 1e-3;
        (rows >= 2 && varies && off).then_some(RowScale { rows, min, max })
    }

    /// Said of the tensor `name`: routing weights rescaled per token are normalised otherwise.
    pub fn reading(self, name: &str) -> String {
        let cause = match name.ends_with(".moe.topk_weights") {
            true => "the weights normalised otherwise (norm_topk_prob, or a sum over other experts)",
            false => "a normalisation whose statistic differs (its eps, or a mean over other elements)",
        };
        format!(
            "each of its {} rows is a scaled copy of the reference's, by factors {:.4} to {:.4}: {cause}",
            self.rows, self.min, self.max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows scaled by factors of their own are read; one factor for all (`factor`'s), factors
    /// within rounding of 1, and rows that are not multiples (noise, a bf16 run) are not.
    #[test]
    fn rows_each_a_multiple_are_read() {
        let reference: Vec<f32> = (0..64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        let scaled = |f: &dyn Fn(usize) -> f32| -> Vec<f32> {
            reference.chunks(8).enumerate().flat_map(|(r, row)| row.iter().map(move |x| x * f(r))).collect()
        };
        let read = RowScale::of(&scaled(&|r| 1.0 + 0.05 * r as f32), &reference, 8).unwrap();
        assert_eq!(read.rows, 8);
        assert!((read.min - 1.0).abs() < 1e-6 && (read.max - 1.35).abs() < 1e-6, "{read:?}");
        assert_eq!(RowScale::of(&scaled(&|_| 1.5), &reference, 8), None);
        assert_eq!(RowScale::of(&scaled(&|r| 1.0 + 1e-5 * r as f32), &reference, 8), None);
        let mut noisy = scaled(&|r| 1.0 + 0.05 * r as f32);
        noisy[3] += 0.01;
        assert_eq!(RowScale::of(&noisy, &reference, 8), None);
    }
}
