//! Expert load: a layer x expert heatmap (cells coloured by load relative to the layer mean), with
//! MaxVio and CV per layer, and against a reference the net load moved (`audit --against`'s
//! measure). With more experts than columns, neighbouring experts share a cell (the busiest of
//! them sets its colour). A dead expert's cell is `×`, also in a shared cell, and a used one is
//! never blank, however little it was used. Below, the selected layer's busiest and rarest
//! experts with their token counts, the numbers behind the colours, and the expert pairs its
//! tokens chose together most past their loads, against chance (`audit --pairs`).

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::{first_row, fit_list, heat_cell};
use crate::app::App;
use crate::data::{PairsRow, Source};

/// The cell of an expert no token chose (or of a group holding one).
const DEAD: &str = "×";

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let load = src.load();
    let experts = load.first().map_or(0, |l| l.counts.len());
    let block =
        Block::bordered().title(format!("expert load ({experts} experts; colour = load / layer mean, 2x = hot)"));
    if load.is_empty() {
        f.render_widget(Paragraph::new("no MoE routing recorded").block(block), area);
        return;
    }
    let label_w = if load.iter().any(|l| l.mtp) { 14 } else { 9 };
    let compared = load.iter().any(|l| l.moved.is_some());
    let stats_w = if compared { 44 } else { 31 };
    let cells = (area.width as usize).saturating_sub(label_w + stats_w + 2).max(1);
    let per_cell = experts.div_ceil(cells).max(1);
    let selected = src.layers().get(app.layer).and_then(|l| l.part.layer());
    // The selected layer's row stays in view; its two lines of numbers follow the rows shown.
    let visible = rows_shown(area);
    let start = match load.iter().position(|l| Some(l.layer) == selected) {
        Some(at) => first_row(app.scroll, at, visible, load.len()),
        None => app.scroll.min(load.len().saturating_sub(visible)),
    };
    let mut lines: Vec<Line> = load
        .iter()
        .skip(start)
        .take(visible)
        .map(|row| {
            let mean = row.counts.iter().sum::<u64>() as f64 / experts.max(1) as f64;
            let label = format!("layer {}{}", row.layer, if row.mtp { " mtp" } else { "" });
            let mut spans = vec![Span::styled(
                format!("{label:<label_w$}"),
                if Some(row.layer) == selected { Style::new().add_modifier(Modifier::REVERSED) } else { Style::new() },
            )];
            for chunk in row.counts.chunks(per_cell) {
                // A dead expert is marked whatever its neighbours' load: the colour of the
                // busiest would hide it.
                if chunk.contains(&0) {
                    spans.push(Span::styled(DEAD, Style::new().fg(Color::Gray).bg(Color::Black)));
                    continue;
                }
                let busiest = chunk.iter().copied().max().unwrap_or(0) as f64;
                let t = if mean > 0.0 { busiest / mean / 2.0 } else { 0.0 };
                spans.push(heat_cell(t));
            }
            let dead = row.counts.iter().filter(|&&c| c == 0).count();
            spans.push(Span::raw(format!(" MaxVio {:5.2} CV {:4.2} dead {dead:>3}", row.max_vio, row.cv)));
            if let Some(m) = row.moved {
                spans.push(Span::raw(format!(" moved {:5.1}%", 100.0 * m)));
            }
            Line::from(spans)
        })
        .collect();
    lines.push(Line::raw(match per_cell {
        1 => format!("one cell = 1 expert; {DEAD} = dead (no token)"),
        // (Short enough for 80 columns: GLM-5's 256 experts are 4 a cell there.)
        n => format!("one cell = {n} experts, coloured by the busiest; {DEAD} = one of them dead"),
    }));
    // The selected layer's numbers behind the colours, as `audit` lists them.
    if let Some(row) = load.iter().find(|l| Some(l.layer) == selected) {
        lines.push(Line::raw(extremes(row.layer, &row.counts, area.width.saturating_sub(2) as usize)));
        if let Some(p) = src.pairs(row.layer) {
            lines.push(Line::raw(pairs_line(&p, area.width.saturating_sub(2) as usize)));
        }
    }
    f.render_widget(Paragraph::new(lines).block(block), area);
}

/// The layer rows that fit `area`: less its borders, the key to the cells and the selected
/// layer's two lines.
pub fn rows_shown(area: Rect) -> usize {
    (area.height as usize).saturating_sub(5)
}

/// `layer L busiest 5:19 3:15 15:15, rarest 0:0 6:2 12:4 (expert:tokens)` (ties by id, lowest
/// first; with few experts the rarest are those the busiest leave), the key left out where the
/// line would pass `width` (four-digit counts at 80 columns).
fn extremes(layer: usize, counts: &[u64], width: usize) -> String {
    let mut busiest: Vec<usize> = (0..counts.len()).collect();
    busiest.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let mut rarest = busiest.clone();
    rarest.sort_by(|&a, &b| counts[a].cmp(&counts[b]).then(a.cmp(&b)));
    rarest.retain(|e| !busiest[..3.min(busiest.len())].contains(e));
    let list = |experts: &[usize]| experts.iter().take(3).map(|&e| format!("{e}:{}", counts[e])).collect::<Vec<_>>();
    let line = format!("layer {layer} busiest {}, rarest {}", list(&busiest).join(" "), list(&rarest).join(" "));
    const KEY: &str = " (expert:tokens)";
    if line.len() + KEY.len() <= width {
        line + KEY
    } else {
        line
    }
}

/// A pair's expected count as this view and `audit --pairs` print it: under 0.1 (most pairs at
/// GLM-5's 256 experts) in two significant digits, as `2/0.0` would read as nothing expected.
pub fn expected(e: f64) -> String {
    match e {
        e if e > 0.0 && e < 0.1 => format!("{e:.1e}"),
        e => format!("{e:.1}"),
    }
}

/// `together 12+40 9/1.2 3+7 6/0.8 (surprise 6.10, past chance's 95% 5.01)`: the strongest
/// pairs as tokens/expected, and the top one's surprise against chance's, in `width` columns
/// (whole pairs).
fn pairs_line(p: &PairsRow, width: usize) -> String {
    let Some(top) = p.pairs.first() else {
        return "together: no pair chosen more often than their loads give".into();
    };
    let verdict = match p.chance_p95 {
        _ if p.chance_pending => format!("surprise {:.2}, chance's 95% being drawn", top.surprise),
        Some(c) if top.surprise > c => format!("surprise {:.2}, past chance's 95% {c:.2}", top.surprise),
        Some(c) => format!("surprise {:.2}, within chance's 95% {c:.2}", top.surprise),
        None => format!("surprise {:.2}", top.surprise),
    };
    let tail = format!(" ({verdict})");
    let items: Vec<String> = (p.pairs.iter())
        .map(|q| format!("{}+{} {}/{}", q.experts[0], q.experts[1], q.tokens, expected(q.expected)))
        .collect();
    let room = width.saturating_sub("together ".len() + tail.len());
    format!("together {}{tail}", fit_list(&items, room))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ExpertPair;

    /// Past chance said as such; pairs that do not fit are counted, not cut.
    #[test]
    fn the_pairs_line_fits_and_weighs_the_top_z() {
        let pair = |a, b, surprise| ExpertPair { experts: [a, b], tokens: 9, expected: 1.25, surprise };
        let pairs = vec![pair(12, 40, 6.1), pair(3, 7, 5.0), pair(100, 200, 4.0)];
        let p = PairsRow { pairs: pairs.clone(), chance_p95: Some(5.01), chance_pending: false };
        assert_eq!(
            pairs_line(&p, 120),
            "together 12+40 9/1.2 3+7 9/1.2 100+200 9/1.2 (surprise 6.10, past chance's 95% 5.01)"
        );
        assert_eq!(pairs_line(&p, 66), "together 12+40 9/1.2 +2 (surprise 6.10, past chance's 95% 5.01)");
        let rare = PairsRow { pairs: vec![ExpertPair { expected: 0.011, ..pair(1, 2, 4.2) }], ..p.clone() };
        assert!(pairs_line(&rare, 80).starts_with("together 1+2 9/1.1e-2 ("), "{}", pairs_line(&rare, 80));
        let none = PairsRow { pairs: vec![], chance_p95: None, chance_pending: false };
        assert!(pairs_line(&none, 80).starts_with("together: no pair"));
        let pending = PairsRow { pairs, chance_p95: None, chance_pending: true };
        assert!(pairs_line(&pending, 120).ends_with("(surprise 6.10, chance's 95% being drawn)"));
    }
}
