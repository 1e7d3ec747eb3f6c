//! Latent KV norms per layer and token: a heatmap of the normed latent's L2 norm (each layer
//! scaled to its own range of finite norms, its lowest drawn `░`, never blank; a layer whose
//! norms vary by rounding alone is drawn flat, not stretched into false contrast; `!` marks a NaN
//! or an infinite norm, a blank a token the layer has no row for), and for the selected layer its
//! range and the three norms of the selected token.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::{heat_cell, num};
use crate::app::App;
use crate::data::Source;

pub fn draw(f: &mut Frame, area: Rect, app: &App, src: &dyn Source) {
    let Some(g) = src.kv_norms() else {
        f.render_widget(
            Paragraph::new("no latent KV norms recorded").block(Block::bordered().title("latent kv")),
            area,
        );
        return;
    };
    let [map_area, detail_area] = Layout::vertical([Constraint::Min(3), Constraint::Length(5)]).areas(area);
    let tokens = g.latent.first().map_or(0, |r| r.len());
    let cols = (map_area.width as usize).saturating_sub(12).max(1);
    let start = app.token.saturating_sub(cols - 1);
    let selected = src.layers().get(app.layer).and_then(|l| l.part.layer());
    // The selected layer's row stays in view.
    let visible = (map_area.height as usize).saturating_sub(2).max(1);
    let row = selected.and_then(|l| g.layers.iter().position(|x| *x == l)).unwrap_or(0);
    let first = super::first_row(app.scroll, row, visible, g.layers.len());
    let lines: Vec<Line> = g
        .layers
        .iter()
        .zip(&g.latent)
        .skip(first)
        .map(|(layer, row)| {
            let (lo, hi) = range(row);
            // A spread of rounding's size (every norm the same up to f32 noise, as where the norm's
            // weight was not loaded) stays flat: stretched, it looked as varied as a real layer.
            let varies = hi - lo > FLAT * hi.abs().max(lo.abs());
            let label_style =
                if Some(*layer) == selected { Style::new().add_modifier(Modifier::REVERSED) } else { Style::new() };
            let mut spans = vec![Span::styled(format!("layer {layer:<4}"), label_style)];
            for (t, &x) in row.iter().enumerate().skip(start).take(cols) {
                let cell = match x {
                    // A token the layer has no row for (the MTP layer's last position).
                    None => Span::raw(" "),
                    // A NaN or an infinite norm is marked, not shaded as the lowest.
                    Some(x) if !x.is_finite() => {
                        Span::styled("!", Style::new().fg(Color::Red).add_modifier(Modifier::BOLD))
                    }
                    // (The lowest is `░`: blank is a token without a row.)
                    Some(x) if varies => heat_cell((((x - lo) / (hi - lo)) as f64).max(f64::MIN_POSITIVE)),
                    Some(_) => heat_cell(0.5),
                };
                spans.push(if t == app.token {
                    cell.patch_style(Style::new().add_modifier(Modifier::REVERSED))
                } else {
                    cell
                });
            }
            Line::from(spans)
        })
        .collect();
    // The tokens shown, named as the status line names them (batch rows are laid end to end).
    let last = (start + cols).min(tokens).saturating_sub(1);
    let title = format!(
        "latent kv norm after kv_a_layernorm: layers x tokens {} to {}",
        src.token_label(start),
        src.token_label(last)
    );
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(title)), map_area);

    let detail = selected.and_then(|l| g.layers.iter().position(|x| *x == l)).map(|i| {
        let at = |v: &Vec<Vec<Option<f32>>>| {
            v.get(i).and_then(|r| r.get(app.token).copied().flatten()).map_or("-".into(), |x| num(x as f64))
        };
        let row = g.latent.get(i).map_or(&[][..], Vec::as_slice);
        let (lo, hi) = range(row);
        // Flat only where two norms or more are there to differ.
        let finite = row.iter().flatten().filter(|x| x.is_finite()).count();
        let spread = match finite >= 2 && hi - lo <= FLAT * hi.abs().max(lo.abs()) {
            true => " (flat: rounding)".into(),
            false => String::new(),
        };
        let (lo, hi) = if finite > 0 { (num(lo as f64), num(hi as f64)) } else { ("-".into(), "-".into()) };
        vec![
            Line::raw(format!(
                "token {}   layer {}: |kv_latent| {} to {}{spread}",
                src.token_label(app.token),
                g.layers[i],
                lo,
                hi
            )),
            Line::raw(format!(
                "|c_kv| before norm {}   |kv_latent| {}{}   |k_rope| {}",
                at(&g.pre_norm),
                at(&g.latent),
                match at(&g.reference_latent).as_str() {
                    "-" => String::new(),
                    r => format!(" (ref {r})"),
                },
                at(&g.k_rope)
            )),
        ]
    });
    // The embeddings' and the head's rows have no latent: said, not an empty box.
    let detail = detail.unwrap_or_else(|| {
        let part = src.layers().get(app.layer).map(|l| l.part);
        vec![Line::raw(match part.and_then(|p| p.layer()) {
            Some(i) => format!("no latent KV recorded for layer {i}"),
            None => format!("no latent KV in the {}: pick a layer (j/k)", part.map_or("row".into(), |p| p.name())),
        })]
    });
    f.render_widget(Paragraph::new(detail).block(Block::bordered().title("selected layer and token")), detail_area);
}

/// A layer's spread of norms under this fraction of their size is rounding's, drawn flat.
const FLAT: f32 = 1e-4;

/// The lowest and highest finite norm of a layer's row (one Inf would flatten the rest of the
/// layer to one shade).
fn range(row: &[Option<f32>]) -> (f32, f32) {
    let finite = row.iter().flatten().filter(|x| x.is_finite());
    finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)))
}
