//! The hook points of the selected layer: statistics, a histogram, and the worst elements
//! against the reference.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;

use super::{num, sparkline};
use crate::app::App;
use crate::data::Source;

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let layer = src.layers().get(app.layer).map(|l| l.index);
    let hooks: Vec<_> = src.hooks(layer).into_iter().filter(|h| h.name.contains(&app.filter)).collect();
    let worst_lines: Vec<Line> = hooks
        .iter()
        .filter_map(|h| h.reference.as_ref().filter(|r| !r.ok).map(|r| (h, r)))
        .flat_map(|(h, r)| {
            r.worst.iter().map(move |w| {
                Line::from(format!(
                    "{} at {:?}: ours {} ref {}",
                    h.name,
                    w.at,
                    num(w.ours as f64),
                    num(w.reference as f64)
                ))
                .style(Style::new().fg(Color::Red))
            })
        })
        .collect();
    let worst_height = if worst_lines.is_empty() { 0 } else { (worst_lines.len() as u16 + 2).min(8) };
    let [table_area, worst_area] = Layout::vertical([Constraint::Min(3), Constraint::Length(worst_height)]).areas(area);

    let rows = hooks.iter().skip(app.scroll).map(|h| {
        let (verdict, err, style) = match &h.reference {
            Some(r) if r.ok => ("ok", num(r.max_abs), Style::new().fg(Color::Green)),
            Some(r) => ("BAD", num(r.max_abs), Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
            None => ("-", "-".into(), Style::new()),
        };
        let nonfinite_style = if h.nonfinite > 0 { Style::new().fg(Color::Red) } else { Style::new() };
        Row::new(vec![
            h.name.clone(),
            format!("{:?}", h.shape),
            num(h.mean),
            num(h.std),
            num(h.min),
            num(h.max),
            num(h.l2),
            h.nonfinite.to_string(),
            sparkline(&h.histogram),
            err,
            verdict.to_string(),
        ])
        .style(if h.nonfinite > 0 { nonfinite_style } else { style })
    });
    let widths = [
        Constraint::Min(16),
        Constraint::Length(12),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(3),
        Constraint::Length(12),
        Constraint::Length(9),
        Constraint::Length(3),
    ];
    let header = Row::new(["hook", "shape", "mean", "std", "min", "max", "l2", "nan", "histogram", "vs ref", ""])
        .style(Style::new().add_modifier(Modifier::UNDERLINED));
    let title = match layer {
        Some(i) => format!("layer {i} activations"),
        None => "activations".into(),
    };
    f.render_widget(Table::new(rows, widths).header(header).block(Block::bordered().title(title)), table_area);
    if !worst_lines.is_empty() {
        f.render_widget(Paragraph::new(worst_lines).block(Block::bordered().title("worst elements")), worst_area);
    }
}
