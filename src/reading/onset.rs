//! Where along the sequence a first divergence starts or ends: its leading positions match and
//! every later one differs (an onset: RoPE spares position 0, a DSA bug the queries that keep
//! every causal key, a decode path its prefill), or the leading ones differ and every later one
//! matches (the queries whose selections are padded past the query).

use super::factor;

/// A first divergence whose leading positions match and whose every later one does not
/// (`compare::matching_positions`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Onset {
    /// How many leading positions match.
    pub matching: usize,
    /// The reference's `index_topk` where its DSA selections cut (K < S), for a tensor the
    /// selection acts on (from `attn.out` on): queries before it keep every causal key.
    pub index_topk: Option<usize>,
    /// Batch rows: with more than one, a later position differs in one row at least.
    pub batch: usize,
    /// The scale and cosine of the positions after them, where they are a factor apart
    /// ([`factor`]): a bug of decode steps or later chunks only, such as a scaling they forget.
    pub factor: Option<(f64, f64)>,
}

impl Onset {
    /// The reading, with the kinds of cause its pattern allows (`causes`), or without them where
    /// another reading names the cause (a rerun's variant).
    pub(crate) fn reading_with(self, causes: bool) -> String {
        let (matched, why) = match self {
            Onset { matching: 1, factor: None, .. } => (
                "position 0 matches".into(),
                ": something that acts by position (RoPE, YaRN: they leave position 0 alone) or that its single key \
                 hides (the softmax scale, which keys a query may see)",
            ),
            Onset { matching: p, index_topk: Some(k), factor: None, .. } if p == k => (
                format!("queries 0-{} (which keep every causal key) match", p - 1),
                ": the DSA selection is applied otherwise (attention over all keys?)",
            ),
            Onset { matching: 1, .. } => ("position 0 matches".into(), ""),
            Onset { matching: p, .. } => (format!("positions 0-{} match", p - 1), ""),
        };
        // Batch rows may part at different positions.
        let later = match self.batch > 1 {
            true => " in every batch row and every later one differs in one row at least",
            false => " and every later one differs",
        };
        // (`factor` holds only a scale and cosine that read as one, of two elements or more.)
        let factor =
            self.factor.and_then(|(scale, cosine)| factor(scale, cosine, 2)).map(|f| format!("; past them {f}"));
        let why = if causes { why } else { "" };
        format!("{matched}{later}{why}{}", factor.unwrap_or_default())
    }
}

/// A first divergence whose leading positions differ (in one batch row at least) and whose every
/// later one matches (`compare::differing_positions`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Leading {
    /// How many leading positions differ.
    pub differing: usize,
    /// The reference's `index_topk` where its DSA selections cut, for a tensor the selection acts
    /// on: queries before `index_topk - 1` hold fewer causal keys than it, padded past the query.
    pub index_topk: Option<usize>,
}

impl Leading {
    pub(crate) fn reading(self) -> String {
        match self {
            Leading { differing: p, index_topk: Some(k) } if p + 1 == k => format!(
                "queries 0-{} (whose selections hold fewer than index_topk causal keys, padded past the query) \
                 differ and every later one matches: attention reads the padding, a key past the query (a mask \
                 off by one?)",
                p - 1
            ),
            Leading { differing: 1, .. } => "position 0 differs and every later one matches".into(),
            Leading { differing: p, .. } => format!("positions 0-{} differ and every later one matches", p - 1),
        }
    }
}
