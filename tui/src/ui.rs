//! The frame: title, view tabs, the current view, and a status line with the key help.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Tabs, Wrap};
use ratatui::Frame;

use crate::app::{App, View, HELP, KEYS};
use crate::data::Source;
use crate::views::{self, wrapped_lines};

/// The screen's lines: title, view tabs, the view, status, key help.
fn areas(screen: Rect) -> [Rect; 5] {
    Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(screen)
}

/// Where the view is drawn on a screen of this size.
pub fn body(screen: Rect) -> Rect {
    areas(screen)[2]
}

pub fn draw(f: &mut Frame, app: &App, src: &dyn Source) {
    let [title, tabs, body, status, help] = areas(f.area());
    let text = fit_paths(&src.title(), title.width as usize);
    f.render_widget(Paragraph::new(text).style(Style::new().add_modifier(Modifier::BOLD)), title);
    let selected = View::ALL.iter().position(|v| *v == app.view).unwrap_or(0);
    f.render_widget(
        Tabs::new(tab_titles(selected, tabs.width as usize))
            .select(selected)
            .highlight_style(Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)),
        tabs,
    );
    draw_view(f, body, app, src);
    f.render_widget(Paragraph::new(status_line(app, src)), status);
    f.render_widget(Paragraph::new(fit_help(help.width as usize)).style(Style::new().fg(Color::DarkGray)), help);
    if app.help {
        draw_keys(f, body, f.area());
    }
}

/// The views' tabs, `1 layers` to `6 latent kv`; where they do not all fit `width`, the numbers
/// alone but the selected view's, so every view's key stays on screen.
fn tab_titles(selected: usize, width: usize) -> Vec<String> {
    // ratatui's tabs pad each title by a space either side and put a divider between them.
    let width_of = |titles: &[String]| titles.iter().map(|t| t.chars().count() + 3).sum::<usize>() - 1;
    let titles: Vec<String> = View::ALL.iter().enumerate().map(|(i, v)| format!("{} {}", i + 1, v.title())).collect();
    if width_of(&titles) <= width {
        return titles;
    }
    (0..View::ALL.len()).map(|i| if i == selected { titles[i].clone() } else { (i + 1).to_string() }).collect()
}

/// The key help line's entries that fit `width`, whole (`? keys` is among the first).
fn fit_help(width: usize) -> String {
    let mut line = String::new();
    for entry in HELP.split(" | ") {
        let next = if line.is_empty() { entry.to_string() } else { format!("{line} | {entry}") };
        if next.chars().count() > width {
            break;
        }
        line = next;
    }
    line
}

/// Every key and what it does, over the view (`?`), or over the whole `screen` where the view's
/// `body` is too short for them. Entries are shown whole; where not all fit, the title says how
/// many are.
fn draw_keys(f: &mut Frame, body: Rect, screen: Rect) {
    let key_width = KEYS.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    // Aligned in two columns where the descriptions keep 30 columns, else each key before its
    // description (a narrow column would wrap every description over many lines).
    let aligned = (body.width as usize).saturating_sub(2) >= key_width + 2 + 30;
    let entry = |k: &str| if aligned { format!("{k:<key_width$}  ") } else { format!("{k}  ") };
    let lines_in = |area: Rect| -> Vec<usize> {
        let inner = area.width.saturating_sub(2) as usize;
        KEYS.iter().map(|(k, what)| wrapped_lines(&format!("{}{what}", entry(k)), inner)).collect()
    };
    let needed = |area: Rect| lines_in(area).iter().sum::<usize>() + 2;
    let area = if needed(body) > body.height as usize { screen } else { body };
    // The entries that fit, whole.
    let room = (area.height as usize).saturating_sub(2);
    let (mut shown, mut used) = (0, 0);
    for n in lines_in(area) {
        if used + n > room {
            break;
        }
        (shown, used) = (shown + 1, used + n);
    }
    let lines: Vec<Line> = KEYS
        .iter()
        .take(shown)
        .map(|(k, what)| Line::from(vec![Span::styled(entry(k), Style::new().fg(Color::Yellow)), Span::raw(*what)]))
        .collect();
    let height = (used as u16 + 2).min(area.height);
    let popup = Rect { y: area.y + (area.height - height) / 2, height, ..area };
    f.render_widget(Clear, popup);
    let title = match shown == KEYS.len() {
        true => "keys (any key closes)".to_string(),
        false => format!("keys: {shown} of {} fit (any key closes)", KEYS.len()),
    };
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title(title)), popup);
}

fn draw_view(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    match app.view {
        View::Layers => views::layers::draw(f, area, app, src),
        View::Activations => views::activations::draw(f, area, app, src),
        View::Routing => views::routing::draw(f, area, app, src),
        View::Load => views::load::draw(f, area, app, src),
        View::Dsa => views::dsa::draw(f, area, app, src),
        View::KvNorms => views::kvnorms::draw(f, area, app, src),
    }
}

fn status_line(app: &App, src: &dyn Source) -> Line<'static> {
    let layer = src.layers().get(app.layer);
    let mut spans = vec![Span::raw(match layer {
        Some(l) if l.part.layer().is_some() => format!("{} ({}, {}) ", l.part.name(), l.ffn, l.indexer),
        Some(l) => format!("{} ", l.part.name()),
        None => "no layers ".into(),
    })];
    if src.tokens() > 0 {
        spans.push(Span::raw(format!("| token {} ", src.token_label(app.token))));
    }
    if app.editing_filter || !app.filter.is_empty() {
        let cursor = if app.editing_filter { "_" } else { "" };
        // (It filters the activations view's hook points: said, as the other views show all.)
        let label = if app.view == crate::app::View::Activations { "filter" } else { "activations filter" };
        spans.push(Span::styled(format!("| {label}: {}{cursor} ", app.filter), Style::new().fg(Color::Cyan)));
    }
    // A key's message, else the source's warning, which stays while nothing else is said.
    match (app.message.is_empty(), src.warning()) {
        (false, _) => spans.push(Span::styled(format!("| {}", app.message), Style::new().fg(Color::Yellow))),
        (true, Some(w)) => spans.push(Span::styled(format!("| warning: {w}"), Style::new().fg(Color::Yellow))),
        (true, None) => {}
    }
    Line::from(spans)
}

/// `text` made to fit `width` by writing its paths as their file names, the first first, until
/// it fits (cut at the end, the reference's path went first). A title's paths are its parts
/// either side of ` vs reference `, each up to a ` (` note: whole, spaces and all.
fn fit_paths(text: &str, width: usize) -> String {
    const SEP: &str = " vs reference ";
    let mut parts: Vec<String> = text.split(SEP).map(String::from).collect();
    for i in 0..parts.len() {
        if parts.join(SEP).chars().count() <= width {
            break;
        }
        let (path, note) = parts[i].split_once(" (").map_or((parts[i].as_str(), None), |(p, n)| (p, Some(n)));
        if let Some((_, name)) = path.rsplit_once('/').filter(|(_, name)| !name.is_empty()) {
            parts[i] = match note {
                Some(note) => format!("{name} ({note}"),
                None => name.to_string(),
            };
        }
    }
    parts.join(SEP)
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_shorten_to_their_names_until_the_title_fits() {
        let title = "golden/flat/port-no-shared-expert-bf16.safetensors vs reference golden/flat/reference.safetensors";
        assert_eq!(super::fit_paths(title, 200), title);
        assert_eq!(
            super::fit_paths(title, 90),
            "port-no-shared-expert-bf16.safetensors vs reference golden/flat/reference.safetensors"
        );
        // Paths with spaces shorten whole; a live run's note stays.
        let spaced = "/tmp/my runs/port.st vs reference /tmp/my runs/ref.st";
        assert_eq!(super::fit_paths(spaced, 30), "port.st vs reference ref.st");
        let live = "/data/glm5 (live, cuda) vs reference /data/glm5/reference.safetensors";
        assert_eq!(super::fit_paths(live, 50), "glm5 (live, cuda) vs reference reference.safetensors");
        assert_eq!(
            super::fit_paths(title, 60),
            "port-no-shared-expert-bf16.safetensors vs reference reference.safetensors"
        );
    }
}
