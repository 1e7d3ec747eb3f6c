//! One row per layer: its type, its status against the reference, and its worst error.

use ratatui::layout::{Constraint, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Row, Table, TableState};
use ratatui::Frame;

use super::num;
use crate::app::App;
use crate::data::{Source, Status};

pub fn status_style(s: Status) -> Style {
    match s {
        Status::Match => Style::new().fg(Color::Green),
        Status::Mismatch => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Status::Flips => Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD),
        Status::Unchecked => Style::new().fg(Color::DarkGray),
    }
}

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let rows = src.layers().iter().map(|l| {
        let (worst_name, worst) = match &l.worst {
            Some((n, e)) => (n.clone(), num(*e)),
            None => ("-".into(), "-".into()),
        };
        Row::new(vec![
            l.index.to_string(),
            l.ffn.clone(),
            l.indexer.clone(),
            l.status.label().to_string(),
            l.mismatches.to_string(),
            format!("{}/{}", l.routing_flips, l.dsa_flips),
            worst,
            worst_name,
        ])
        .style(status_style(l.status))
    });
    let widths = [
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Min(10),
    ];
    let header = Row::new(["layer", "ffn", "indexer", "status", "bad", "flips", "max err", "worst hook"])
        .style(Style::new().add_modifier(Modifier::UNDERLINED));
    let table = Table::new(rows, widths)
        .header(header)
        .block(
            Block::bordered().title(match src.first_non_finite() {
                Some(nf) => Line::from(format!("layers (flips: routing/dsa) | first NaN/Inf: {nf}"))
                    .style(Style::new().fg(Color::Red)),
                None => Line::from("layers (flips: routing/dsa)"),
            }),
        )
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected(Some(app.layer));
    f.render_stateful_widget(table, area, &mut state);
}
