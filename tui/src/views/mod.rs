//! One file per view. Each `draw` reads the [`App`] and the source and never
//! changes either.

pub mod activations;
pub mod dsa;
pub mod kvnorms;
pub mod layers;
pub mod load;
pub mod routing;

use ratatui::layout::Rect;
use ratatui::style::Color;

use crate::app::{App, View};
use crate::data::Source;

/// The rows of the current view that fit its `area` (the body): what `PgDn` moves by.
pub fn page(app: &App, src: &dyn Source, area: Rect) -> usize {
    let rows = match app.view {
        View::Activations => activations::page(area, app, src),
        // Borders, and a header or a last line of their own.
        View::Routing => (area.height as usize).saturating_sub(3),
        // Borders, the key to the cells and the selected layer's two lines.
        View::Load => load::rows_shown(area),
        View::Dsa => (area.height as usize).saturating_sub(2),
        // The map above the 5 lines of the selected token's norms.
        View::KvNorms => (area.height as usize).saturating_sub(7),
        View::Layers => layers::page(area, src),
    };
    rows.max(1)
}

/// The first row a view `visible` rows tall shows of its `len`: the scroll position, moved as
/// little as keeps the `selected` row in view.
pub fn first_row(scroll: usize, selected: usize, visible: usize, len: usize) -> usize {
    let lowest = (selected + 1).saturating_sub(visible.max(1));
    scroll.clamp(lowest, selected.max(lowest)).min(len.saturating_sub(1))
}

/// A colour ramp for heatmaps: 0 = idle (dark blue) .. 0.5 = typical (teal) .. 1 = hot (yellow).
pub fn heat(t: f64) -> Color {
    let (r, g, b) = heat_rgb(t);
    Color::Rgb(r, g, b)
}

/// [`heat`]'s red, green and blue (viridis' five stops, linearly between them): the TUI's and
/// `audit --heatmap`'s SVG ramp.
pub fn heat_rgb(t: f64) -> (u8, u8, u8) {
    const STOPS: [(u8, u8, u8); 5] = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + f * (q as f64 - p as f64)).round() as u8;
    (mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A heatmap cell: a shade character whose density and colour both follow `t` in 0..=1, so the
/// map reads in colour, in monochrome and in a text capture alike. Only 0 is blank: a little
/// is the lightest shade.
pub fn heat_cell(t: f64) -> ratatui::text::Span<'static> {
    const SHADES: [&str; 5] = [" ", "░", "▒", "▓", "█"];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let level = ((t * 4.0).round() as usize).clamp(usize::from(t > 0.0), 4);
    let shade = SHADES[level];
    ratatui::text::Span::styled(shade, ratatui::style::Style::new().fg(heat(t)).bg(Color::Black))
}

/// A compact histogram as block characters.
pub fn sparkline(counts: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = counts.iter().copied().max().unwrap_or(0).max(1);
    counts.iter().map(|&c| if c == 0 { ' ' } else { BARS[((c * 7) / max) as usize] }).collect()
}

/// Which columns of a table fit `width` cells (its inner width, one cell between columns): all
/// when they do, else columns are dropped in `drop_order` until the rest fit. A squeezed column
/// would cut its numbers and change their meaning (`2.1e-6` read `2.1`); a missing one does not.
pub fn fitting(width: u16, widths: &[u16], drop_order: &[usize]) -> Vec<bool> {
    let mut shown = vec![true; widths.len()];
    let need = |shown: &[bool]| {
        let cols: Vec<u16> = widths.iter().zip(shown).filter(|(_, &s)| s).map(|(&w, _)| w).collect();
        cols.iter().sum::<u16>() + cols.len().saturating_sub(1) as u16
    };
    for &i in drop_order {
        if need(&shown) <= width {
            break;
        }
        shown[i] = false;
    }
    shown
}

/// The items of `v` whose column is shown.
pub fn shown<T>(v: impl IntoIterator<Item = T>, shown: &[bool]) -> Vec<T> {
    v.into_iter().zip(shown).filter(|(_, &s)| s).map(|(x, _)| x).collect()
}

/// `items` joined by spaces in at most `width` characters: whole items only, and `+N` for the
/// N that do not fit (a cut item, `9:0.` for `9:0.62`, would read as another value).
pub fn fit_list(items: &[String], width: usize) -> String {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let left = items.len() - i - 1;
        let sep = usize::from(!out.is_empty());
        // Room for this item, and for the marker of what follows if this is not the last.
        let marker = if left > 0 { format!(" +{left}").len() } else { 0 };
        if out.len() + sep + item.chars().count() + marker > width {
            let rest = format!("+{}", items.len() - i);
            return if out.is_empty() { rest } else { format!("{out} {rest}") };
        }
        if sep == 1 {
            out.push(' ');
        }
        out.push_str(item);
    }
    out
}

/// A decision's margin: `-` unknown, `none` where nothing was cut (every candidate kept: an
/// infinite margin), else in 3 significant digits.
pub fn margin(m: Option<f32>) -> String {
    match m {
        None => "-".into(),
        Some(m) if m.is_infinite() => "none".into(),
        Some(m) => format!("{m:.2e}"),
    }
}

/// A flip's margin (what decided it): as [`margin`], but an infinite one reads `inf` (a masked
/// key's lead), where a query's own margin reads `none` (nothing left out).
pub fn lead(m: Option<f32>) -> String {
    match m {
        Some(m) if m.is_infinite() => "inf".into(),
        m => margin(m),
    }
}

/// Numbers in at most 8 characters, with 4 significant digits where they fit.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if x == 0.0 {
        "0".into()
    } else if !x.is_finite() {
        format!("{x}")
    } else if !(1e-3..1e4).contains(&a) {
        format!("{x:.1e}")
    } else if a < 10.0 {
        format!("{x:.4}")
    } else if a < 100.0 {
        format!("{x:.3}")
    } else if a < 1000.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.1}")
    }
}

/// The lines `line` takes wrapped at words into `width` columns (a word longer than the width
/// split across lines; leading spaces kept), as a wrapping paragraph fills them.
pub fn wrapped_lines(line: &str, width: usize) -> usize {
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
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::widgets::{Paragraph, Wrap};
    use ratatui::Terminal;

    #[test]
    fn numbers_fit_eight_columns() {
        for x in [0.0, 1.0, -3.0312, 213.379, -9999.9, 12345.0, 8.65e-4, -1e-30, f64::INFINITY] {
            assert!(num(x).chars().count() <= 8, "{x} -> {}", num(x));
        }
        assert_eq!(num(213.379), "213.38");
        // 5 + 6 + 9 and two spaces fit 22; at 16 the first of the drop order goes.
        assert_eq!(fitting(22, &[5, 6, 9], &[1, 0]), [true, true, true]);
        assert_eq!(fitting(16, &[5, 6, 9], &[1, 0]), [true, false, true]);
        assert_eq!(fitting(9, &[5, 6, 9], &[1, 0]), [false, false, true]);
        assert_eq!(shown(["a", "b", "c"], &[true, false, true]), ["a", "c"]);
        let items: Vec<String> = ["1:0.50", "22:0.25", "3:0.25"].map(String::from).into();
        assert_eq!(fit_list(&items, 30), "1:0.50 22:0.25 3:0.25");
        assert_eq!(fit_list(&items, 20), "1:0.50 22:0.25 +1");
        assert_eq!(fit_list(&items, 10), "1:0.50 +2");
        assert_eq!(fit_list(&items, 3), "+3");
        assert_eq!(sparkline(&[0, 1, 7]), " ▂█");
    }

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
                assert_eq!(wrapped_lines(text, width as usize), filled, "{text:?} at {width}");
            }
        }
    }
}
