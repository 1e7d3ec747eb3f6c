//! The hook points of the selected layer: statistics, a histogram, and against the reference,
//! each hook point outside the tolerance as a whole (NMSE, cosine) and its worst elements.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;

use super::{fitting, num, shown, sparkline};
use crate::app::App;
use crate::data::Source;

/// The table's area and the out-of-tolerance panel's below it. The table keeps room for its
/// header and three rows: on a small screen the panel gives way (to nothing below 6 lines of its
/// own), not the rows. The panel takes up to 8 lines, or what the table (`rows` of it) leaves
/// where that is more.
fn split(area: Rect, worst_lines: usize, rows: usize) -> [Rect; 2] {
    let room = area.height.saturating_sub(6);
    let spare = area.height.saturating_sub(rows.saturating_add(3).min(u16::MAX as usize) as u16);
    let worst_height = match (worst_lines.min(u16::MAX as usize - 2) as u16 + 2).min(spare.max(8)).min(room) {
        h if worst_lines == 0 || h < 3 => 0,
        h => h,
    };
    Layout::vertical([Constraint::Min(3), Constraint::Length(worst_height)]).areas(area)
}

/// The table rows that fit `area` (what a page is).
pub fn page(area: Rect, app: &App, src: &dyn Source) -> usize {
    let hooks = app.hooks(src);
    let lines = worst_groups(&hooks).iter().map(Vec::len).sum();
    (split(area, lines, hooks.len())[0].height as usize).saturating_sub(3)
}

/// The panel below the table: each hook point outside the tolerance, the largest error first
/// (in forward order it showed the first two hooks', often the smallest), as a whole (NMSE,
/// cosine, how many elements are out: what tells rounding's spread from a bug's, which the
/// table's largest error alone does not) and its worst elements: a group of lines a hook point.
fn worst_groups(hooks: &[crate::data::HookRow]) -> Vec<Vec<Line<'static>>> {
    let mut bad: Vec<_> = hooks.iter().filter_map(|h| h.reference.as_ref().filter(|r| !r.ok).map(|r| (h, r))).collect();
    bad.sort_by(|(_, a), (_, b)| b.max_abs.total_cmp(&a.max_abs));
    let red = Style::new().fg(Color::Red);
    let mut groups = Vec::new();
    for (h, r) in bad {
        let mut lines = Vec::new();
        if let Some(fit) = r.fit {
            lines.push(
                Line::from(format!(
                    "{}: nmse {:.2e}, cos {:.6}, {}/{} out of tolerance",
                    h.name, fit.nmse, fit.cosine, fit.bad, fit.total
                ))
                .style(red.add_modifier(Modifier::BOLD)),
            );
        }
        for w in &r.worst {
            let line = format!("{} at {:?}: ours {} ref {}", h.name, w.at, num(w.ours as f64), num(w.reference as f64));
            lines.push(Line::from(line).style(red));
        }
        // A selection, an integer tensor or a comparison that could not be made has no fit and
        // no worst elements: a line of its own, so every hook point counted is one listed.
        if lines.is_empty() {
            let what = match (r.invalid, &r.reference_shape, r.rows_differ) {
                (Some(side), _, _) => format!("{side}: no set of distinct ids in range, nothing compared"),
                (None, Some(shape), _) => format!("shape {:?} against the reference's {shape:?}", h.shape),
                (None, None, Some(n)) => format!("{n} rows differ"),
                (None, None, None) => format!("largest error {}", num(r.max_abs)),
            };
            lines.push(Line::from(format!("{}: {what}", h.name)).style(red.add_modifier(Modifier::BOLD)));
        }
        groups.push(lines);
    }
    groups
}

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let part = src.layers().get(app.layer).map(|l| l.part);
    let hooks = app.hooks(src);
    let groups = worst_groups(&hooks);
    let lines: usize = groups.iter().map(Vec::len).sum();
    let [table_area, worst_area] = split(area, lines, hooks.len());

    // Columns as wide as they fit: the shape and the L2 norm go first, then the histogram, the
    // NaN count and the spread, so no number is cut short. The NaN column is as wide as its
    // largest count.
    // `!fin`: NaNs and infinities both, the values that are not finite.
    let nan_width = hooks.iter().map(|h| h.nonfinite.to_string().len()).max().unwrap_or(0).max(4) as u16;
    // Floats by their largest error; selections by the rows that differ. The column is as wide
    // as its widest entry, so `BAD 2048 rows` is whole and the usual ones leave room.
    let error = |r: &crate::data::RefCheck| match (r.invalid, &r.reference_shape, r.rows_differ) {
        (Some(side), _, _) => format!("{side} invalid"),
        (None, Some(shape), _) => format!("ref shape {shape:?}"),
        (None, None, Some(n)) => format!("{n} rows"),
        (None, None, None) => num(r.max_abs),
    };
    let verdicts: Vec<(String, Style)> = hooks
        .iter()
        .map(|h| match &h.reference {
            Some(r) if r.ok => (format!("ok {}", error(r)), Style::new().fg(Color::Green)),
            Some(r) => (format!("BAD {}", error(r)), Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
            None => ("-".into(), Style::new()),
        })
        .collect();
    let vs_width = verdicts.iter().map(|(v, _)| v.len()).max().unwrap_or(0).max(10) as u16;
    let widths_wanted = [14, 14, 8, 8, 8, 8, 8, nan_width, 10, vs_width];
    let show = fitting(area.width.saturating_sub(2), &widths_wanted, &[1, 6, 8, 7, 3, 4, 5]);
    // The hook column takes the slack up to its longest name, and no further: on a wide terminal
    // the numbers stay next to the names they belong to.
    let inner = area.width.saturating_sub(2);
    let others: u16 = shown(widths_wanted.iter().skip(1), &show[1..]).into_iter().map(|w| w + 1).sum();
    let longest = hooks.iter().map(|h| h.short_name().chars().count()).max().unwrap_or(0) as u16;
    let hook_width = longest.max(widths_wanted[0]).min(inner.saturating_sub(others).max(widths_wanted[0]));
    // Paging stops at the last full page: the rows shown always fill the table.
    let visible = (table_area.height as usize).saturating_sub(3);
    let scroll = app.scroll.min(hooks.len().saturating_sub(visible));
    let rows = hooks.iter().zip(verdicts).skip(scroll).map(|(h, (vs_ref, style))| {
        let style = if h.nonfinite > 0 { Style::new().fg(Color::Red) } else { style };
        // A name longer than the column ends in `…`, so that a cut one does not pass for another.
        let short = match h.short_name().chars().count() > hook_width as usize {
            true => h.short_name().chars().take((hook_width as usize).saturating_sub(1)).chain(['…']).collect(),
            false => h.short_name().to_string(),
        };
        // `1x2048x2048`: a long context's S x S scores fit the column (`[1, 2048, 2048]` did not).
        let shape = h.shape.iter().map(usize::to_string).collect::<Vec<_>>().join("x");
        let nan = h.nonfinite.to_string();
        // No finite value, and none of them NaN (every margin +inf where the indexer keeps every
        // key, infinities by design): no statistics, not NaNs that read as a corrupt tensor. (A
        // tensor of NaNs keeps them, in its red row.)
        let [mean, std, min, max, l2, hist] = match h.mean.is_nan() && h.l2 == 0.0 && h.nonfinite == 0 {
            true => ["-", "-", "-", "-", "-", "no finite"].map(String::from),
            false => [num(h.mean), num(h.std), num(h.min), num(h.max), num(h.l2), sparkline(&h.histogram)],
        };
        let cells = [short, shape, mean, std, min, max, l2, nan, hist, vs_ref];
        Row::new(shown(cells, &show)).style(style)
    });
    let header = ["hook", "shape", "mean", "std", "min", "max", "l2", "!fin", "histogram", "vs ref"];
    let header = Row::new(shown(header, &show)).style(Style::new().add_modifier(Modifier::UNDERLINED));
    let widths = shown(
        widths_wanted.iter().enumerate().map(|(i, &w)| Constraint::Length(if i == 0 { hook_width } else { w })),
        &show,
    );
    let mut title = match part {
        Some(p) => format!("{} activations", p.name()),
        None => "activations".into(),
    };
    // Say what the table does not show: a filter that matches nothing, rows past the bottom.
    if hooks.is_empty() && !app.filter.is_empty() {
        title += &format!(": no hook point matches \"{}\"", app.filter);
    } else if visible == 0 && !hooks.is_empty() {
        title += &format!(": {} rows, none fits", hooks.len());
    } else if hooks.len() > visible {
        let (from, to) = (scroll + 1, (scroll + visible).min(hooks.len()));
        title += &format!(": rows {from}-{to} of {} (PgDn/PgUp)", hooks.len());
    }
    let table = Table::new(rows, widths).header(header).column_spacing(1).block(Block::bordered().title(title));
    f.render_widget(table, table_area);
    if lines > 0 {
        // Say how many hook points the panel has room for, where not all.
        let room = worst_area.height.saturating_sub(2) as usize;
        let whole = groups.iter().scan(0, |used, g| {
            *used += g.len();
            Some(*used <= room)
        });
        // Whole groups only (the first, cut, where not even it fits): a group cut at the bottom
        // would read as all there is of it.
        let fit = whole.take_while(|&w| w).count().max(1);
        let title = match fit < groups.len() {
            true => format!("out of tolerance (largest error first): {fit} of {} shown", groups.len()),
            false => "out of tolerance (largest error first)".into(),
        };
        let worst: Vec<Line> = groups.into_iter().take(fit).flatten().collect();
        f.render_widget(Paragraph::new(worst).block(Block::bordered().title(title)), worst_area);
    }
}
