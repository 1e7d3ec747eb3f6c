//! The DSA selection of the selected layer as a query x key matrix for the batch row of the
//! selected token: `#` kept by both sides, `+` kept only by us, `-` kept only by the reference,
//! `.` a causal key nobody kept. Scrolls down the queries; recall per query on the left, marked
//! `~` for a near-tie flip, `!` a real one, `?` one of unknown margin. Keys past the width are
//! left out (the title says which are shown), and `>` ends a row that differs among them.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::margin;
use crate::app::App;
use crate::data::{counts, DsaMatrix, FlipClass, Source};

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let Some(layer) = src.layers().get(app.layer) else { return };
    let Some((index, m)) = layer.part.layer().and_then(|i| Some((i, src.dsa(i, app.token)?))) else {
        f.render_widget(Paragraph::new("no DSA selection recorded").block(Block::bordered().title("dsa")), area);
        return;
    };
    let label_w = 13;
    // When the keys do not fit, the last column marks with `>` the rows that differ past it.
    let room = (area.width as usize).saturating_sub(label_w + 2);
    let keys = if m.seq > room { room.saturating_sub(1) } else { m.seq };
    let rows = area.height.saturating_sub(2) as usize;
    // The selected token's query stays in view.
    let q_sel = app.token % m.seq.max(1);
    let start = super::first_row(app.scroll, q_sel, rows, m.seq);
    let lines: Vec<Line> = (start..m.seq)
        .take(rows)
        .map(|q| {
            let ours = &m.selected[q];
            let theirs = m.reference.as_ref().map(|r| &r[q]);
            let recall = m.recall(q).map(|r| format!("{r:4.2}")).unwrap_or_else(|| "  - ".into());
            let label_style = if q == q_sel { Style::new().add_modifier(Modifier::REVERSED) } else { Style::new() };
            let mark = m.flips.get(q).copied().flatten().map_or(' ', FlipClass::mark);
            let mut spans = vec![Span::styled(format!("q{q:<5} {recall}{mark} "), label_style)];
            for k in 0..keys {
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
            let hidden = theirs.is_some_and(|t| past(t, keys) != past(ours, keys));
            if hidden {
                spans.push(Span::styled(">", Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)));
            }
            Line::from(spans)
        })
        .collect();
    let flips = (0..m.seq).filter(|&q| m.recall(q).is_some_and(|r| r < 1.0)).count();
    let batch = src.tokens() / m.seq.max(1);
    let row = if batch > 1 { format!(" (batch row {} of {batch})", app.token / m.seq.max(1)) } else { String::new() };
    // Keys past the width are not drawn: say so.
    let cut = match keys {
        0 if m.seq > 0 => format!(" no room for its {} keys", m.seq),
        k if k < m.seq => format!(" keys 0-{} of {}", k - 1, m.seq),
        _ => String::new(),
    };
    let title = format!(
        "layer {} dsa ({}){cut}: {} queries{row}, {flips} differ{}  # both +ours -ref",
        index,
        layer.indexer,
        m.seq,
        counts(m.flips.iter().flatten().copied())
    );
    // The selected query's margin at the cut, and for a flip the reference's beside it.
    let ours = m.margin.as_ref().and_then(|v| v.get(q_sel).copied());
    let margin = match (m.flips.get(q_sel).copied().flatten(), m.reference_margin.get(q_sel).copied().flatten()) {
        (Some(_), Some(r)) => format!(" q{q_sel}: margin {} (ref {}) ", margin(ours), margin(Some(r))),
        // A query that may see no more keys than it keeps has no cut.
        _ if ours.is_some_and(f32::is_infinite) => format!(" q{q_sel}: margin none (every causal key kept) "),
        _ => format!(" q{q_sel}: margin {} ", margin(ours)),
    };
    let block = Block::bordered().title(title).title_bottom(margin);
    f.render_widget(Paragraph::new(lines).block(block), area);
}

/// The keys of a selection row (ascending) from `first` on.
fn past(row: &[usize], first: usize) -> &[usize] {
    &row[row.partition_point(|&k| k < first)..]
}
