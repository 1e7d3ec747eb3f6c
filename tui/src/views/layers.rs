//! One row per layer: its type, its status against the reference, its first mismatching hook
//! point and its worst error.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

use super::{fitting, num, shown};
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

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    // The first NaN/Inf of the run and the first divergence with its reading, whole, above the
    // table (a title would cut them).
    let notes = [
        src.first_non_finite().map(|nf| (format!("first NaN/Inf of this run: {nf}"), Color::Red)),
        src.first_divergence().map(|d| (d, Color::Yellow)),
    ];
    // Each note takes up to 6 lines of what the table leaves: its borders, header and 3 rows.
    const TABLE: u16 = 6;
    let mut area = area;
    for (text, colour) in notes.into_iter().flatten() {
        let width = area.width.max(1) as usize;
        let lines: usize = text.lines().map(|l| wrapped_lines(l, width)).sum();
        let height = (lines as u16).clamp(1, 6).min(area.height.saturating_sub(TABLE));
        if height == 0 {
            break;
        }
        let [note, rest] = Layout::vertical([Constraint::Length(height), Constraint::Min(TABLE)]).areas(area);
        let style = Style::new().fg(colour).add_modifier(Modifier::BOLD);
        // A note longer than its lines ends with where to read it whole, not mid-sentence.
        // (A note left one line shows the marker alone: the table needs the rest.)
        let cut = lines > height as usize;
        let [text_area, more] =
            Layout::vertical([Constraint::Length(height - u16::from(cut)), Constraint::Length(u16::from(cut))])
                .areas(note);
        f.render_widget(Paragraph::new(text).style(style).wrap(Wrap { trim: false }), text_area);
        if cut {
            f.render_widget(Paragraph::new("... (cut here: `glimpse diff` prints it whole)").style(style), more);
        }
        area = rest;
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

/// The lines `line` takes wrapped at words into `width` columns (a word longer than the width
/// split across lines; leading spaces kept), as the note's paragraph wraps it.
fn wrapped_lines(line: &str, width: usize) -> usize {
    let width = width.max(1);
    let body = line.trim_start_matches(' ');
    let (mut lines, mut used) = (1, line.len() - body.len());
    for (i, word) in body.split(' ').enumerate() {
        let len = word.chars().count();
        let need = used + usize::from(i > 0) + len;
        if need <= width {
            used = need;
        } else {
            // A new line unless this one is still empty, and as many more as the word spills.
            let spill = len.saturating_sub(1) / width;
            lines += usize::from(used > 0) + spill;
            used = len - spill * width;
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::widgets::{Paragraph, Wrap};
    use ratatui::Terminal;

    /// The count agrees with the lines ratatui's own wrapping fills, on a note's kinds of text:
    /// an indented long line, a word longer than the width, runs of spaces.
    #[test]
    fn wrapped_lines_counts_what_the_paragraph_fills() {
        let long = "  past what rounding explains, the first divergence: layers.0.output (no reading: the port's \
                    own noise, grown past the tolerance, may be all it is); on ours's own inputs, the first that \
                    reads as a bug: layers.2.mlp.out";
        let texts = [long, "short", "a_word_longer_than_twenty_columns_here and more", "two  spaces   here and there"];
        for text in texts {
            for width in [20u16, 33, 80] {
                let mut t = Terminal::new(TestBackend::new(width, 40)).unwrap();
                t.draw(|f| f.render_widget(Paragraph::new(text).wrap(Wrap { trim: false }), f.area())).unwrap();
                let buf = t.backend().buffer().clone();
                let filled = (0..40u16)
                    .filter(|&y| (0..width).any(|x| buf[(x, y)].symbol() != " "))
                    .max()
                    .map_or(0, |y| y as usize + 1);
                assert_eq!(super::wrapped_lines(text, width as usize), filled, "{text:?} at {width}");
            }
        }
    }
}
