//! Rotary position embedding, interleaved as GLM-5 uses it in both MLA and the DSA indexer: the
//! pair `(x[2j], x[2j+1])` rotates by `pos * inv_freq[j]`. Frequencies for the default and YaRN
//! types are computed as transformers computes them (in f32, YaRN ramp and attention factor
//! included). Like transformers we write the rotated pairs de-interleaved (evens, then odds), which
//! leaves every q·k product unchanged and keeps roped tensors comparable with the reference's.

use crate::config::{yarn_mscale, Config, Rope};

pub struct RotaryEmbedding {
    pub inv_freq: Vec<f32>, // [rope_dim / 2]
    /// Multiplies cos and sin (YaRN's attention factor; 1 for the default type).
    pub attention_scaling: f32,
}

/// cos and sin per position and frequency, already multiplied by the attention scaling.
pub struct RopeTables {
    pub half: usize,
    pub cos: Vec<f32>, // [S, half]
    pub sin: Vec<f32>, // [S, half]
    pub pairs: Pairs,
}

/// Which elements of a head's rope slice rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairs {
    /// `(x[2j], x[2j+1])`: GLM-5's layout, as DeepSeek-V3's.
    Interleaved,
    /// `(x[j], x[j + half])`: Llama's `rotate_half`, a port bug on GLM-5. The model never uses it;
    /// `diff`'s readings rerun attention with it to name that bug (`reading::rerun`), through
    /// [`RopeTables::apply`] only: the device paths (`device/`, `cuda/`) take `cos` and `sin` and
    /// rotate neighbours.
    Halves,
}

impl RotaryEmbedding {
    pub fn new(cfg: &Config) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let exponents: Vec<f32> = (0..dim).step_by(2).map(|i| i as f32 / dim as f32).collect();
        match &cfg.rope {
            Rope::Default { theta } => RotaryEmbedding {
                inv_freq: exponents.iter().map(|e| 1.0 / (*theta as f32).powf(*e)).collect(),
                attention_scaling: 1.0,
            },
            Rope::Yarn(y) => {
                let pos_freqs: Vec<f32> = exponents.iter().map(|e| (y.theta as f32).powf(*e)).collect();
                let attention_factor = y.attention_factor.unwrap_or_else(|| match (y.mscale, y.mscale_all_dim) {
                    (Some(m), Some(a)) if m != 0.0 && a != 0.0 => yarn_mscale(y.factor, m) / yarn_mscale(y.factor, a),
                    _ => yarn_mscale(y.factor, 1.0),
                });
                // `find_correction_range`: the dims whose wavelength lies between beta_fast and beta_slow rotations.
                let correction_dim = |rotations: f64| {
                    dim as f64 * (y.original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * y.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
                if y.truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001; // transformers' guard against a zero-width ramp
                }
                let inv_freq = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(j, pf)| {
                        let ramp = ((j as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let extrapolation = 1.0 / pf;
                        let interpolation = 1.0 / (y.factor as f32 * pf);
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect();
                RotaryEmbedding { inv_freq, attention_scaling: attention_factor as f32 }
            }
        }
    }

    pub fn tables(&self, positions: &[usize]) -> RopeTables {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
        RopeTables { half, cos, sin, pairs: Pairs::Interleaved }
    }
}

impl RopeTables {
    /// Rotates `x[start .. start + 2*half]` of every row in place. `x` is row-major
    /// `[B, S, heads, width]`; rows of position `s` use table row `s`.
    pub fn apply(&self, x: &mut [f32], seq: usize, heads: usize, width: usize, start: usize) {
        match self.pairs {
            Pairs::Interleaved => rotate(&self.cos, &self.sin, self.half, x, [seq, heads, width, start]),
            Pairs::Halves => rotate_halves(&self.cos, &self.sin, self.half, x, [seq, heads, width, start]),
        }
    }
}

/// [`RopeTables::apply`] on borrowed tables (`cos`, `sin`: [S, half]).
pub fn rotate(cos_t: &[f32], sin_t: &[f32], half: usize, x: &mut [f32], [seq, heads, width, start]: [usize; 4]) {
    let mut buf = vec![0f32; 2 * half];
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        let s = (r / heads) % seq;
        let (cos, sin) = (&cos_t[s * half..(s + 1) * half], &sin_t[s * half..(s + 1) * half]);
        let v = &mut row[start..start + 2 * half];
        for j in 0..half {
            let (a, b) = (v[2 * j], v[2 * j + 1]);
            buf[j] = a * cos[j] - b * sin[j];
            buf[j + half] = b * cos[j] + a * sin[j];
        }
        v.copy_from_slice(&buf);
    }
}

/// [`rotate`] with the pairs `(x[j], x[j + half])`, written in place (`Pairs::Halves`).
fn rotate_halves(cos_t: &[f32], sin_t: &[f32], half: usize, x: &mut [f32], [seq, heads, width, start]: [usize; 4]) {
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        let s = (r / heads) % seq;
        let (cos, sin) = (&cos_t[s * half..(s + 1) * half], &sin_t[s * half..(s + 1) * half]);
        let (first, second) = row[start..start + 2 * half].split_at_mut(half);
        for j in 0..half {
            let (a, b) = (first[j], second[j]);
            first[j] = a * cos[j] - b * sin[j];
            second[j] = b * cos[j] + a * sin[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(theta: f32, dim: usize, positions: &[usize]) -> RopeTables {
        let inv_freq = (0..dim).step_by(2).map(|i| 1.0 / theta.powf(i as f32 / dim as f32)).collect();
        RotaryEmbedding { inv_freq, attention_scaling: 1.0 }.tables(positions)
    }

    /// `rotate_half` by hand: position 3, dim 4, theta 100 -> the pair (x0, x2) rotates by 3 rad
    /// and (x1, x3) by 0.3 rad, in place.
    #[test]
    fn halves_rope_matches_hand_computation() {
        let mut t = tables(100.0, 4, &[3]);
        t.pairs = Pairs::Halves;
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        t.apply(&mut x, 1, 1, 4, 0);
        let (c1, s1, c2, s2) = (3f32.cos(), 3f32.sin(), 0.3f32.cos(), 0.3f32.sin());
        let want = [1.0 * c1 - 3.0 * s1, 2.0 * c2 - 4.0 * s2, 3.0 * c1 + 1.0 * s1, 4.0 * c2 + 2.0 * s2];
        for (g, w) in x.iter().zip(want) {
            approx::assert_abs_diff_eq!(*g, w, epsilon = 1e-5);
        }
    }

    /// Interleaved RoPE by hand: position 3, dim 4, theta 100 -> frequencies 1 and 0.1; the pair
    /// (x0, x1) rotates by 3 rad and (x2, x3) by 0.3 rad; output is (evens, odds).
    #[test]
    fn interleaved_rope_matches_hand_computation() {
        let t = tables(100.0, 4, &[0, 1, 2, 3]);
        let mut x = vec![0f32; 4 * 4];
        x[12..16].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        t.apply(&mut x, 4, 1, 4, 0);
        let (c1, s1, c2, s2) = (3f32.cos(), 3f32.sin(), 0.3f32.cos(), 0.3f32.sin());
        let want = [1.0 * c1 - 2.0 * s1, 3.0 * c2 - 4.0 * s2, 2.0 * c1 + 1.0 * s1, 4.0 * c2 + 3.0 * s2];
        for (g, w) in x[12..16].iter().zip(want) {
            approx::assert_abs_diff_eq!(*g, w, epsilon = 1e-5);
        }
        // Position 0 is the identity up to the de-interleave.
        let mut y = vec![1.0, 2.0, 3.0, 4.0];
        tables(100.0, 4, &[0]).apply(&mut y, 1, 1, 4, 0);
        assert_eq!(y, vec![1.0, 3.0, 2.0, 4.0]);
    }

    /// Only the `[start, start + dim)` slice of each head rotates.
    #[test]
    fn rope_leaves_the_rest_of_the_head_alone() {
        let t = tables(10.0, 2, &[0, 5]);
        let mut x: Vec<f32> = (0..2 * 2 * 5).map(|i| i as f32).collect(); // [S=2, heads=2, width=5]
        let before = x.clone();
        t.apply(&mut x, 2, 2, 5, 3);
        for r in 0..4 {
            assert_eq!(x[r * 5..r * 5 + 3], before[r * 5..r * 5 + 3]);
        }
        let (a, b) = (before[2 * 5 + 3], before[2 * 5 + 4]);
        approx::assert_abs_diff_eq!(x[2 * 5 + 3], a * 5f32.cos() - b * 5f32.sin(), epsilon = 1e-4);
    }
}
