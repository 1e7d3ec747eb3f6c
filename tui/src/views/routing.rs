//! Tokens x chosen experts of the selected MoE layer, with weights and margins; rows whose
//! expert set differs from the reference are flips, shown in red with both sides' margins
//! (`ours (ref)`), their class (`~` near-tie, `!` real, `?` unknown, by those margins; `R` one
//! no rule makes) and what differs: `-` the experts only the reference chose, `+` those only we
//! chose (as the DSA view marks keys).

use ratatui::layout::{Constraint, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::widgets::{Block, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use super::{first_row, fit_list, fitting, lead, margin, shown};
use crate::app::App;
use crate::data::{counts, FlipClass, RouteRow, Source};

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let Some(layer) = src.layers().get(app.layer) else { return };
    let Some((index, routes)) = layer.part.layer().and_then(|i| Some((i, src.routing(i)?))) else {
        let msg = match layer.part.layer() {
            // A routed layer whose routing the dump did not record is no dense one.
            Some(i) if layer.ffn == "dense" => format!("layer {i} has no router (dense feed-forward)"),
            Some(i) if layer.ffn == "?" => format!("no routing recorded for layer {i}"),
            Some(i) => format!("no routing recorded for layer {i} ({} feed-forward)", layer.ffn),
            None => format!("no router in the {}", layer.part.name()),
        };
        f.render_widget(Paragraph::new(msg).wrap(Wrap { trim: false }).block(Block::bordered().title("routing")), area);
        return;
    };
    let flips = routes.iter().filter(|r| r.is_flip()).count();
    let visible = area.height.saturating_sub(3) as usize;
    // The selected token's row (the MTP layer has fewer rows than tokens) stays in view.
    let selected = routes.iter().position(|r| r.token >= app.token).unwrap_or(routes.len());
    let start = first_row(app.scroll, selected, visible, routes.len());
    // At narrow widths columns go rather than numbers being cut. Against a reference the flips
    // are what the view is for: the experts go first (they shrink to `+N` before that), then the
    // margin. Without one the empty reference column goes first.
    let compared = routes.iter().any(|r| r.reference_ids.is_some());
    // A flip's margin shows both sides, `ours (ref)`, where the reference's is known.
    let both = routes.iter().any(|r| r.flip.is_some() && r.reference_margin.is_some());
    let margin_width = if both { 17 } else { 9 };
    // What differs, never a list cut: the column widens past its header for the layer's rows into
    // what the experts leave beyond their 10; a row that still does not fit drops its lists'
    // spaces, else says only their lengths. (Over every row of the layer, not those on screen:
    // the columns then stay put as the rows scroll.)
    let room = area.width.saturating_sub(2 + 13 + 11 + margin_width + 1).max(24) as usize;
    let fit = |r: &RouteRow| (0..3).map(|form| versus(r, form)).find(|v| v.chars().count() <= room);
    let fit = |r: &RouteRow| fit(r).unwrap_or_else(|| versus(r, 2));
    let versus_width =
        routes.iter().filter(|r| r.is_flip()).map(|r| fit(r).chars().count()).fold(VERSUS.len(), usize::max);
    let widths: [u16; 4] = [12, 10, margin_width, versus_width as u16];
    let mut show = fitting(area.width.saturating_sub(2), &widths, if compared { &[1, 2] } else { &[3, 1] });
    // Without a reference its column would only say `-`: the experts' weights take the room.
    show[3] &= compared;
    // The experts column takes what the others leave (each with its space): whole entries, and
    // `+N` for the rest.
    let others: u16 = (0..4).filter(|&i| i != 1 && show[i]).map(|i| widths[i] + 1).sum();
    let experts_width = area.width.saturating_sub(2).saturating_sub(others) as usize;
    // Which experts matter more than their weights: where the layer's rows cannot show every
    // weight, the column shows the ids alone, and `+N` only where even those do not fit.
    let weighted =
        routes.iter().all(|r| r.weights.len() == r.ids.len() && joined_len(&experts(r, true)) <= experts_width);
    let rows = routes.iter().skip(start).map(|r| {
        let experts = experts(r, weighted);
        let reference = fit(r);
        let mut style =
            if r.is_flip() { Style::new().fg(Color::Red).add_modifier(Modifier::BOLD) } else { Style::new() };
        if r.token == app.token {
            style = style.add_modifier(Modifier::REVERSED);
        }
        let margin = match (r.flip, r.reference_margin) {
            (Some(_), Some(m)) => format!("{} ({})", lead(r.margin), lead(Some(m))),
            _ => margin(r.margin),
        };
        Row::new(shown([src.token_label(r.token), fit_list(&experts, experts_width), margin, reference], &show))
            .style(style)
    });
    let constraints = widths.map(Constraint::Length);
    let constraints = shown([constraints[0], Constraint::Min(widths[1]), constraints[2], constraints[3]], &show);
    let experts_header = if weighted && experts_width >= 14 { "experts:weight" } else { "experts" };
    let margin_header = if both { "margin (ref)" } else { "margin" };
    let header = Row::new(shown(["token", experts_header, margin_header, VERSUS], &show))
        .style(Style::new().add_modifier(Modifier::UNDERLINED));
    // A token the layer has no row for (the MTP layer's last position of each batch row): said,
    // as nothing is highlighted.
    let missing = match routes.iter().any(|r| r.token == app.token) {
        true => String::new(),
        false => format!("; {} has no row", src.token_label(app.token)),
    };
    let title = match compared {
        true => format!(
            "layer {} routing: {} tokens, {flips} flips{}{missing}",
            index,
            routes.len(),
            counts(routes.iter().filter_map(|r| r.flip))
        ),
        // Nothing to flip against: no count that would read as a comparison made.
        false => match src.reference_shape(&format!("layers.{index}.moe.topk_ids")) {
            Some(shape) => format!(
                "layer {index} routing: {} tokens (the reference's is {shape:?}: not compared){missing}",
                routes.len()
            ),
            None => format!("layer {index} routing: {} tokens (no reference){missing}", routes.len()),
        },
    };
    f.render_widget(Table::new(rows, constraints).header(header).block(Block::bordered().title(title)), area);
}

/// The header of the column of what differs, and its narrowest width.
const VERSUS: &str = "vs ref (-ref +ours)";

/// A row's experts, `id:weight` or the ids alone (also where the dump holds no weights).
fn experts(r: &RouteRow, weighted: bool) -> Vec<String> {
    let entry = |(j, i): (usize, &i64)| match r.weights.get(j).filter(|_| weighted) {
        Some(w) => format!("{i}:{}", weight(*w)),
        None => i.to_string(),
    };
    r.ids.iter().enumerate().map(entry).collect()
}

/// A weight in two decimals without a leading zero (`.31`, `1.23`): a token's eight experts and
/// their weights then fit 80 columns.
fn weight(w: f32) -> String {
    let s = format!("{w:.2}");
    match (s.strip_prefix("0."), s.strip_prefix("-0.")) {
        (Some(rest), _) => format!(".{rest}"),
        (_, Some(rest)) => format!("-.{rest}"),
        _ => s,
    }
}

/// The width of `items` joined by spaces.
fn joined_len(items: &[String]) -> usize {
    items.iter().map(|s| s.chars().count()).sum::<usize>() + items.len().saturating_sub(1)
}

/// A row against the reference: `=`, `-` (no reference), or a flip, its class and the experts
/// only the reference chose (`-`) and only we chose (`+`): in `form` 0 as lists, 1 as lists
/// without spaces, 2 as their lengths.
fn versus(r: &RouteRow, form: usize) -> String {
    let Some(ids) = r.reference_ids.as_ref() else { return "-".into() };
    if !r.is_flip() {
        return "=".into();
    }
    // (Ascending, as `diff` lists them.)
    let only = |a: &[i64], b: &[i64]| {
        let mut v: Vec<i64> = a.iter().filter(|x| !b.contains(x)).copied().collect();
        v.sort_unstable();
        v
    };
    let (theirs, ours) = (only(ids, &r.ids), only(&r.ids, ids));
    let list = |v: &[i64]| match form {
        0 => format!("{v:?}"),
        1 => format!("{v:?}").replace(", ", ","),
        _ => v.len().to_string(),
    };
    format!("FLIP{} -{} +{}", r.flip.map_or(' ', FlipClass::mark), list(&theirs), list(&ours))
}
