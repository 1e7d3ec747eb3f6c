//! One row per layer: its type, its status against the reference, its first mismatching hook
//! point and its worst error.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

use super::{fitting, num, shown, wrapped_lines};
use crate::app::App;
use crate::data::{Source, Status};

pub fn status_style(s: Status) -> Style {
    match s {
        Status::Match => Style::new().fg(Color::Green),
        Status::Mismatch => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Status::Flips => Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD),
        Status::Rule => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD | Modifier::REVERSED),
        Status::Unchecked => Style::new().fg(Color::DarkGray),
    }
}

/// A note above the table: its text, colour, where it is drawn and whether it is cut.
struct Note {
    text: String,
    colour: Color,
    area: Rect,
    cut: bool,
}

/// The first NaN/Inf of the run and the first divergence with its reading, whole, above the
/// table (a title would cut them), and what they leave the table of `area`.
fn layout(area: Rect, src: &dyn Source) -> (Vec<Note>, Rect) {
    let texts = [
        src.first_non_finite().map(|nf| (format!("first NaN/Inf of this run: {nf}"), Color::Red)),
        src.first_divergence().map(|d| (d, Color::Yellow)),
    ];
    // Each note takes up to 6 lines of what the table leaves: its borders, header and 3 rows.
    const TABLE: u16 = 6;
    let (mut notes, mut area) = (Vec::new(), area);
    for (text, colour) in texts.into_iter().flatten() {
        let width = area.width.max(1) as usize;
        let lines: usize = text.lines().map(|l| wrapped_lines(l, width)).sum();
        let height = (lines as u16).clamp(1, 6).min(area.height.saturating_sub(TABLE));
        if height == 0 {
            break;
        }
        let [note, rest] = Layout::vertical([Constraint::Length(height), Constraint::Min(TABLE)]).areas(area);
        notes.push(Note { text, colour, area: note, cut: lines > height as usize });
        area = rest;
    }
    (notes, area)
}

/// The table's rows that fit `area` (what a page is): its borders and header take 3 lines.
pub fn page(area: Rect, src: &dyn Source) -> usize {
    (layout(area, src).1.height as usize).saturating_sub(3)
}

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let (notes, area) = layout(area, src);
    for note in notes {
        let style = Style::new().fg(note.colour).add_modifier(Modifier::BOLD);
        // A note longer than its lines ends with where to read it whole, not mid-sentence.
        // (A note left one line shows the marker alone: the table needs the rest.)
        let cut = u16::from(note.cut);
        let [text_area, more] =
            Layout::vertical([Constraint::Length(note.area.height - cut), Constraint::Length(cut)]).areas(note.area);
        f.render_widget(Paragraph::new(note.text).style(style).wrap(Wrap { trim: false }), text_area);
        if note.cut {
            f.render_widget(Paragraph::new("... (cut here: `glimpse diff` prints it whole)").style(style), more);
        }
    }
    // At narrow widths the type columns go first, then the worst hook, the mismatch count and the
    // first bad hook.
    // The count columns are as wide as their largest entries.
    let widest = |f: &dyn Fn(&crate::data::LayerRow) -> String| {
        src.layers().iter().map(|l| f(l).len()).max().unwrap_or(0) as u16
    };
    let bad = widest(&|l| l.mismatches.to_string()).max(5);
    let flips = widest(&|l| format!("{}/{}", l.routing_flips, l.dsa_flips)).max(7);
    let first = widest(&|l| l.first_bad.clone().unwrap_or_default()).max(9);
    let widths_wanted = [5, 6, 7, 9, bad, flips, first, 9, 10];
    let show = fitting(area.width.saturating_sub(2), &widths_wanted, &[1, 2, 8, 4, 6, 3]);
    let rows = src.layers().iter().map(|l| {
        let (worst_name, worst) = match &l.worst {
            Some((n, e)) => (n.clone(), num(*e)),
            None => ("-".into(), "-".into()),
        };
        Row::new(shown(
            [
                l.part.label(),
                l.ffn.clone(),
                l.indexer.clone(),
                // `^`: the output's error jumps here (the line below says by how much).
                format!("{}{}", l.status.label(), if l.jump.is_some() { "^" } else { "" }),
                // Without a reference there is nothing to count.
                if l.status == Status::Unchecked { "-".into() } else { l.mismatches.to_string() },
                if l.status == Status::Unchecked { "-".into() } else { format!("{}/{}", l.routing_flips, l.dsa_flips) },
                l.first_bad.clone().unwrap_or_else(|| "-".into()),
                worst,
                worst_name,
            ],
            &show,
        ))
        .style(status_style(l.status))
    });
    let last = widths_wanted.len() - 1;
    let widths =
        widths_wanted
            .iter()
            .enumerate()
            .map(|(i, &w)| if i == last { Constraint::Min(w) } else { Constraint::Length(w) });
    // The selected layer's output error, and its jump where the status is marked `^`.
    let error = match src.layers().get(app.layer).map(|l| (l.nmse, l.jump.as_deref())) {
        Some((Some(n), Some(j))) => format!(" | output nmse {n:.1e}, ^ {j}"),
        Some((Some(n), None)) => format!(" | output nmse {n:.1e}"),
        _ => String::new(),
    };
    let title = format!("layers (flips: routing/dsa){error}");
    let header = ["layer", "ffn", "indexer", "status", "bad", "flips", "first bad", "max err", "worst hook"];
    let header = Row::new(shown(header, &show)).style(Style::new().add_modifier(Modifier::UNDERLINED));
    let widths = shown(widths, &show);
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(title))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected(Some(app.layer));
    f.render_stateful_widget(table, area, &mut state);
}
