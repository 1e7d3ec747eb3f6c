//! The DSA selection of the selected layer as a query x key matrix for the batch row of the
//! selected token: `#` kept by both sides, `+` kept only by us, `-` kept only by the reference,
//! `.` a causal key nobody kept. Scrolls down the queries; recall per query on the left, marked
//! `~` for a near-tie flip, `!` a real one, `?` one of unknown margin, `R` one no rule makes.
//! Keys that do not fit are left out: a window of them follows the selected query's diagonal
//! (the title says which are shown), `<` starts and `>` ends a row that differs outside it, and
//! the bottom line lists a flipped query's keys kept on one side only.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};
use ratatui::Frame;

use super::{lead, margin};
use crate::app::App;
use crate::data::{counts, DsaMatrix, FlipClass, Source};

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let Some(layer) = src.layers().get(app.layer) else { return };
    let Some((index, m)) = layer.part.layer().and_then(|i| Some((i, src.dsa(i, app.token)?))) else {
        let msg = match layer.part.layer() {
            Some(i) => format!("no DSA selection recorded for layer {i}"),
            // The embeddings' and the head's rows select nothing.
            None => format!("no DSA selection in the {}: pick a layer (j/k)", layer.part.name()),
        };
        f.render_widget(Paragraph::new(msg).wrap(Wrap { trim: false }).block(Block::bordered().title("dsa")), area);
        return;
    };
    let label_w = 13;
    // When the keys do not fit, a window of them follows the selected query's diagonal (where
    // its most recent keys, and a mask's bugs, are), and the columns either side mark with `<`
    // and `>` the rows that differ before and past it.
    let room = (area.width as usize).saturating_sub(label_w + 2);
    let cut = m.seq > room;
    let keys = if cut { room.saturating_sub(2) } else { m.seq };
    let rows = area.height.saturating_sub(2) as usize;
    // The selected token's query stays in view (the MTP layer has none at a batch row's last
    // position: its last query stands in).
    let q_sel = app.token % m.seq.max(1);
    let no_row = q_sel >= m.queries;
    let q_sel = q_sel.min(m.queries.saturating_sub(1));
    let first_key = if cut { (q_sel + 1).saturating_sub(keys) } else { 0 };
    let start = super::first_row(app.scroll, q_sel, rows, m.queries);
    let lines: Vec<Line> = (start..m.queries)
        .take(rows)
        .map(|q| {
            let ours = &m.selected[q];
            let theirs = m.reference.as_ref().map(|r| &r[q]);
            let recall = m.recall(q).map(|r| format!("{r:4.2}")).unwrap_or_else(|| "  - ".into());
            let label_style = if q == q_sel { Style::new().add_modifier(Modifier::REVERSED) } else { Style::new() };
            let mark = m.flips.get(q).copied().flatten().map_or(' ', FlipClass::mark);
            let mut spans = vec![Span::styled(format!("q{q:<5} {recall}{mark} "), label_style)];
            let marked =
                |c: char| Span::styled(c.to_string(), Style::new().fg(Color::Red).add_modifier(Modifier::BOLD));
            // The keys before the window that either side keeps: the same or not.
            if cut {
                let before = theirs.is_some_and(|t| until(t, first_key) != until(ours, first_key));
                spans.push(if before { marked('<') } else { Span::raw(" ") });
            }
            for k in first_key..first_key + keys {
                let (a, b) = (DsaMatrix::keeps(ours, k), theirs.is_none_or(|t| DsaMatrix::keeps(t, k)));
                let (c, style) = match (k <= q, a, b) {
                    (false, _, _) => (' ', Style::new()),
                    (true, true, true) => ('#', Style::new().fg(Color::Green)),
                    (true, true, false) => ('+', Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
                    (true, false, true) if theirs.is_some() => {
                        ('-', Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD))
                    }
                    _ => ('.', Style::new().fg(Color::DarkGray)),
                };
                spans.push(Span::styled(c.to_string(), style));
            }
            // The keys past the width that either side keeps (both ascending): the same or not.
            let end = first_key + keys;
            if theirs.is_some_and(|t| past(t, end) != past(ours, end)) {
                spans.push(marked('>'));
            }
            Line::from(spans)
        })
        .collect();
    let flips = (0..m.queries).filter(|&q| m.recall(q).is_some_and(|r| r < 1.0)).count();
    let batch = src.tokens() / m.seq.max(1);
    // (Rows named as the tokens' labels name them: b0 first.)
    let row = match batch {
        1 => String::new(),
        _ => format!(" (batch row b{} of b0-b{})", app.token / m.seq.max(1), batch - 1),
    };
    // Keys past the width are not drawn: say so.
    let cut = match keys {
        0 if m.seq > 0 => format!(" no room for its {} keys", m.seq),
        k if k < m.seq => format!(" keys {first_key}-{}", first_key + k - 1),
        _ => String::new(),
    };
    // (Short, so the counts fit 80 columns at long context: the rule breaks' count matters most,
    // and the legend at the end gives way first.)
    let unpaired = src.reference_shape(&format!("layers.{index}.dsa.topk"));
    let title = match (m.reference.is_some(), unpaired) {
        (true, _) => format!(
            "layer {} dsa ({}){cut}: {} queries{row}, {flips} differ{}  # both +ours -ref",
            index,
            layer.indexer,
            m.queries,
            counts(m.flips.iter().flatten().copied())
        ),
        // Nothing compared: no count of rows that differ.
        (false, Some(shape)) => format!(
            "layer {index} dsa ({}){cut}: {} queries{row} (the reference's is {shape:?}: not compared)  # kept",
            layer.indexer, m.queries
        ),
        (false, None) => {
            format!("layer {index} dsa ({}){cut}: {} queries{row} (no reference)  # kept", layer.indexer, m.queries)
        }
    };
    // The selected query's margin at the cut, and for a flip the reference's beside it, with as
    // many of its one-sided keys as the line has room for.
    let width = (area.width as usize).saturating_sub(2);
    let ours = m.margin.as_ref().and_then(|v| v.get(q_sel).copied()).filter(|m| !m.is_nan());
    let margin = match (m.flips.get(q_sel).copied().flatten(), m.reference_margin.get(q_sel).copied().flatten()) {
        _ if no_row => format!(" {} has no row ", src.token_label(app.token)),
        // (A flip's margins are what decided it, the flipped keys' lead among them: an infinite
        // one is a masked key's, `inf`, unless the side kept every causal key, `none`.)
        (Some(_), reference) => {
            let every = |row: Option<&Vec<usize>>| row.is_some_and(|r| r.len() > q_sel);
            let side = |v: Option<f32>, kept_all: bool| if kept_all { margin(v) } else { lead(v) };
            let theirs_row = m.reference.as_ref().and_then(|r| r.get(q_sel));
            let theirs = reference.map(|r| format!(" (ref {})", side(Some(r), every(theirs_row)))).unwrap_or_default();
            let head = format!(" q{q_sel}: margin {}{theirs}", side(ours, every(m.selected.get(q_sel))));
            format!("{head}{} ", differing(&m, q_sel, width.saturating_sub(head.len() + 1)))
        }
        // A query that may see no more keys than it keeps has no cut.
        _ if ours.is_some_and(f32::is_infinite) => format!(" q{q_sel}: margin none (every causal key kept) "),
        _ => format!(" q{q_sel}: margin {} ", margin(ours)),
    };
    let block = Block::bordered().title(title).title_bottom(margin);
    f.render_widget(Paragraph::new(lines).block(block), area);
}

/// The keys query `q` of a flip kept on one side only, up to 6 of each (the window may not show
/// them), as many as `room` characters hold (the rest counted, `+n`: a key is never cut in
/// half; nothing where not even the counts fit); a side that kept none the other did not kept
/// fewer causal keys.
fn differing(m: &DsaMatrix, q: usize, room: usize) -> String {
    let (Some(ours), Some(theirs)) = (m.selected.get(q), m.reference.as_ref().and_then(|r| r.get(q))) else {
        return String::new();
    };
    let only = |a: &[usize], b: &[usize], shown: usize| -> String {
        let keys: Vec<String> = a.iter().filter(|k| !b.contains(k)).map(usize::to_string).collect();
        match keys.len() {
            0 => "none".into(),
            n if shown == 0 => format!("{n} keys"),
            n if n > shown => format!("{} +{}", keys[..shown].join(","), n - shown),
            _ => keys.join(","),
        }
    };
    // Ours kept fewer causal keys: the keys past the query it holds instead, where it holds any
    // (shortened with the rest: at 80 columns it had pushed every key off the line).
    let held_past = m.past.get(q).filter(|p| !p.is_empty() && only(ours, theirs, 1) == "none");
    let line = |shown: usize| {
        let past = held_past.map(|p| format!(" (holds {} past q{q})", only(p, &[], shown.min(3)))).unwrap_or_default();
        format!(", only ours {}{past}, only ref {}", only(ours, theirs, shown), only(theirs, ours, shown))
    };
    // (Where not even the counts fit, the margins alone.)
    (0..=6).rev().map(line).find(|l| l.len() <= room).unwrap_or_default()
}

/// The keys of a selection row (ascending) before `end`.
fn until(row: &[usize], end: usize) -> &[usize] {
    &row[..row.partition_point(|&k| k < end)]
}

/// The keys of a selection row (ascending) from `first` on.
fn past(row: &[usize], first: usize) -> &[usize] {
    &row[row.partition_point(|&k| k < first)..]
}
