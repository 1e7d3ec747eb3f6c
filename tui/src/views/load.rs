//! Expert load: a layer x expert heatmap (cells coloured by load relative to the layer mean), with
//! MaxVio and CV per layer, and against a reference the net load moved (`audit --against`'s
//! measure). With more experts than columns, neighbouring experts share a cell (the busiest of
//! them sets its colour).

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::heat_cell;
use crate::app::App;
use crate::data::Source;

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let load = src.load();
    let experts = load.first().map_or(0, |l| l.counts.len());
    let block =
        Block::bordered().title(format!("expert load ({experts} experts; colour = load / layer mean, 2x = hot)"));
    if load.is_empty() {
        f.render_widget(Paragraph::new("no MoE routing recorded").block(block), area);
        return;
    }
    let label_w = 9;
    let compared = load.iter().any(|l| l.moved.is_some());
    let stats_w = if compared { 35 } else { 22 };
    let cells = (area.width as usize).saturating_sub(label_w + stats_w + 2).max(1);
    let per_cell = experts.div_ceil(cells).max(1);
    let selected = src.layers().get(app.layer).and_then(|l| l.part.layer());
    let mut lines: Vec<Line> = load
        .iter()
        .skip(app.scroll)
        .map(|row| {
            let mean = row.counts.iter().sum::<u64>() as f64 / experts.max(1) as f64;
            let mut spans = vec![Span::styled(
                format!("layer {:<3}", row.layer),
                if Some(row.layer) == selected { Style::new().add_modifier(Modifier::REVERSED) } else { Style::new() },
            )];
            for chunk in row.counts.chunks(per_cell) {
                let busiest = chunk.iter().copied().max().unwrap_or(0) as f64;
                let t = if mean > 0.0 { busiest / mean / 2.0 } else { 0.0 };
                spans.push(heat_cell(t));
            }
            spans.push(Span::raw(format!(" MaxVio {:5.2} CV {:4.2}", row.max_vio, row.cv)));
            if let Some(m) = row.moved {
                spans.push(Span::raw(format!(" moved {:5.1}%", 100.0 * m)));
            }
            Line::from(spans)
        })
        .collect();
    lines.push(Line::raw(match per_cell {
        1 => "one cell = 1 expert(s)".to_string(),
        n => format!("one cell = {n} expert(s), coloured by the busiest"),
    }));
    f.render_widget(Paragraph::new(lines).block(block), area);
}
