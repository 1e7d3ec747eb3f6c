//! The UI state and what each key does. Keys map to named methods; drawing (in `ui` and
//! `views`) reads this state and never changes it.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::data::{HookRow, Source};

/// The views, in tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Layers,
    Activations,
    Routing,
    Load,
    Dsa,
    KvNorms,
}

impl View {
    pub const ALL: [View; 6] = [View::Layers, View::Activations, View::Routing, View::Load, View::Dsa, View::KvNorms];

    pub fn title(self) -> &'static str {
        match self {
            View::Layers => "layers",
            View::Activations => "activations",
            View::Routing => "routing",
            View::Load => "expert load",
            View::Dsa => "dsa",
            View::KvNorms => "latent kv",
        }
    }
    fn index(self) -> usize {
        View::ALL.iter().position(|v| *v == self).unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub view: View,
    /// Index into `Source::layers()`.
    pub layer: usize,
    /// Selected token position (batch rows flattened).
    pub token: usize,
    /// First row shown in scrollable views.
    pub scroll: usize,
    /// Hook-point name filter (substring); empty shows all.
    pub filter: String,
    pub editing_filter: bool,
    /// A one-line message for the status bar (e.g. "no more flips").
    pub message: String,
    /// The key help is open over the view.
    pub help: bool,
    /// Rows of the current view on screen (the terminal loop sets it after each draw): what
    /// `PgDn` moves by, and where paging stops.
    pub page: usize,
    pub quit: bool,
}

impl Default for App {
    fn default() -> Self {
        App {
            view: View::Layers,
            layer: 0,
            token: 0,
            scroll: 0,
            filter: String::new(),
            editing_filter: false,
            message: String::new(),
            help: false,
            page: 8,
            quit: false,
        }
    }
}

/// The key help shown at the bottom of the screen.
pub const HELP: &str = "q quit | ? keys | tab view | j/k layer | n next flip | h/l token | / filter";

/// Every key, as `?` lists them.
pub const KEYS: [(&str, &str); 9] = [
    ("q, ctrl-c", "quit"),
    ("?", "this help (any key closes it)"),
    ("tab, shift-tab, 1-6", "next, previous view; view by number"),
    ("j/k, down/up", "next, previous row: embeddings, each layer, head"),
    ("n", "next flip in the layer (routing, DSA), then next bad row"),
    ("h/l, left/right", "previous, next token"),
    ("pgdn/pgup, J/K", "page the view (and its selected token or layer)"),
    ("/", "filter the activations view's hook points (enter keeps it, esc clears it)"),
    ("esc", "close the help, or clear the filter"),
];

impl App {
    pub fn handle_key(&mut self, key: KeyEvent, src: &dyn Source) {
        // ctrl-c quits from anywhere: while typing a filter, and with the help open.
        if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
            return self.quit();
        }
        if self.editing_filter {
            match key.code {
                KeyCode::Enter => self.finish_filter(),
                KeyCode::Esc => self.clear_filter(),
                KeyCode::Backspace => self.filter_pop(),
                KeyCode::Char(c) => self.filter_push(c),
                _ => {}
            }
            return;
        }
        self.message.clear();
        if self.help {
            return self.close_help();
        }
        match key.code {
            // Not esc: it clears a filter, and a slip of it used to end the session.
            KeyCode::Char('q') => self.quit(),
            KeyCode::Char('?') => self.open_help(),
            KeyCode::Tab => self.next_view(),
            KeyCode::BackTab => self.prev_view(),
            KeyCode::Char(c @ '1'..='6') => self.set_view(View::ALL[c as usize - '1' as usize]),
            KeyCode::Char('j') | KeyCode::Down => self.next_layer(src),
            KeyCode::Char('k') | KeyCode::Up => self.prev_layer(),
            KeyCode::Char('n') => self.next_problem(src),
            KeyCode::Char('l') | KeyCode::Right => self.next_token(src),
            KeyCode::Char('h') | KeyCode::Left => self.prev_token(),
            KeyCode::PageDown | KeyCode::Char('J') => self.scroll_down(src),
            KeyCode::PageUp | KeyCode::Char('K') => self.scroll_up(src),
            KeyCode::Char('/') => self.start_filter(),
            KeyCode::Esc => self.clear_filter(),
            _ => {}
        }
    }

    pub fn quit(&mut self) {
        self.quit = true;
    }
    pub fn open_help(&mut self) {
        self.help = true;
    }
    pub fn close_help(&mut self) {
        self.help = false;
    }

    pub fn set_view(&mut self, view: View) {
        self.view = view;
        self.scroll = 0;
    }
    pub fn next_view(&mut self) {
        self.set_view(View::ALL[(self.view.index() + 1) % View::ALL.len()]);
    }
    pub fn prev_view(&mut self) {
        self.set_view(View::ALL[(self.view.index() + View::ALL.len() - 1) % View::ALL.len()]);
    }

    pub fn next_layer(&mut self, src: &dyn Source) {
        if self.layer + 1 < src.layers().len() {
            self.layer += 1;
        }
    }
    pub fn prev_layer(&mut self) {
        self.layer = self.layer.saturating_sub(1);
    }

    /// The next flip: in the routing view, the layer's next flipped token, then its first DSA
    /// flip; in the DSA view, its next flipped query. Past the layer's last (or from any other
    /// view), the next row with a mismatch or a flip.
    pub fn next_problem(&mut self, src: &dyn Source) {
        let Some(row) = src.layers().get(self.layer) else { return };
        let Some(layer) = row.part.layer() else { return self.next_problem_row(src) };
        let after = self.token + 1;
        let next_route = || src.routing(layer)?.iter().find(|r| r.token >= after && r.is_flip()).map(|r| r.token);
        let found = match self.view {
            View::Routing => next_route()
                .map(|t| (View::Routing, t, "routing"))
                .or_else(|| next_dsa_flip(src, layer, 0).map(|t| (View::Dsa, t, "dsa"))),
            View::Dsa => next_dsa_flip(src, layer, after).map(|t| (View::Dsa, t, "dsa")),
            _ => None,
        };
        match found {
            Some((view, token, what)) => {
                if view != self.view {
                    self.set_view(view);
                }
                self.token = token;
                self.message = format!("layer {layer}: {what} flip at {}", src.token_label(token));
            }
            None => self.next_problem_row(src),
        }
    }

    /// Jumps to the next row (after the selected one, wrapping; from the layers view the
    /// selected one counts too, so the first press from layer 0 can open layer 0) with a mismatch
    /// or a flip, and to the view that shows it: routing for routing flips, DSA for selection
    /// flips, else the activations. Like tfdbg's `run -f`.
    pub fn next_problem_row(&mut self, src: &dyn Source) {
        let layers = src.layers();
        let n = layers.len();
        let first = if self.view == View::Layers { 0 } else { 1 };
        let found = (first..first + n).map(|d| (self.layer + d) % n).find(|&i| layers[i].status.is_problem());
        match found {
            Some(i) => {
                self.layer = i;
                let row = &layers[i];
                let view = if row.routing_flips > 0 {
                    View::Routing
                } else if row.dsa_flips > 0 {
                    View::Dsa
                } else {
                    View::Activations
                };
                self.set_view(view);
                // Put the cursor on the first flipped token, so the view opens on it.
                let first_flip = match view {
                    View::Routing => {
                        let routes = row.part.layer().and_then(|i| src.routing(i));
                        routes.and_then(|r| r.iter().find(|t| t.is_flip()).map(|t| t.token))
                    }
                    View::Dsa => row.part.layer().and_then(|i| next_dsa_flip(src, i, 0)),
                    _ => None,
                };
                if let Some(t) = first_flip {
                    self.token = t;
                }
                self.message = format!("{}: {}", row.part.name(), row.status.label());
            }
            // (Every row unchecked: there was nothing to find.)
            None if layers.iter().all(|l| l.status == crate::data::Status::Unchecked) => {
                self.message = match src.has_reference() {
                    true => "nothing compared: the dumps share no hook point".into(),
                    false => "no reference: nothing compared".into(),
                }
            }
            None => self.message = "no mismatch or flip in any layer".into(),
        }
    }

    pub fn next_token(&mut self, src: &dyn Source) {
        if self.token + 1 < src.tokens() {
            self.token += 1;
        }
    }
    pub fn prev_token(&mut self) {
        self.token = self.token.saturating_sub(1);
    }

    /// The selected layer's hook points that the filter lets through (the activations view's rows).
    pub fn hooks(&self, src: &dyn Source) -> Vec<HookRow> {
        let Some(row) = src.layers().get(self.layer) else { return Vec::new() };
        // Case-insensitive, as a search in a pager is by default.
        let filter = self.filter.to_lowercase();
        src.hooks(row.part).into_iter().filter(|h| h.short_name().to_lowercase().contains(&filter)).collect()
    }

    /// Pages down the current view, stopping at its last full page. Where the view keeps a
    /// selected row in sight (routing and DSA: the token; latent kv, expert load and layers: the
    /// layer), the selection moves by the page too, or the view could not leave it.
    pub fn scroll_down(&mut self, src: &dyn Source) {
        let rows = self.rows(src);
        self.scroll = (self.scroll + self.page).min(rows.saturating_sub(self.page));
        match self.view {
            // (A view that lists nothing, as a dense layer's routing, shows no token to move.)
            View::Routing | View::Dsa if rows > 0 => {
                self.token = (self.token + self.page).min(src.tokens().saturating_sub(1))
            }
            View::KvNorms => self.layer = clamp_to_layers(src, self.layer + self.page),
            View::Layers => self.layer = (self.layer + self.page).min(src.layers().len().saturating_sub(1)),
            View::Load => self.layer = load_row_moved(src, self.layer, self.page, true),
            _ => {}
        }
    }

    /// How many rows the current view lists (what `scroll` pages through).
    fn rows(&self, src: &dyn Source) -> usize {
        let layer = src.layers().get(self.layer).and_then(|l| l.part.layer());
        match self.view {
            View::Activations => self.hooks(src).len(),
            View::Routing => layer.and_then(|i| src.routing(i)).map_or(0, |r| r.len()),
            // The queries of the selected token's batch row.
            View::Dsa => layer.and_then(|i| src.dsa(i, self.token)).map_or(0, |m| m.queries),
            View::Load => src.load().len(),
            View::KvNorms => src.kv_norms().map_or(0, |g| g.layers.len()),
            View::Layers => 0,
        }
    }
    pub fn scroll_up(&mut self, src: &dyn Source) {
        self.scroll = self.scroll.saturating_sub(self.page);
        match self.view {
            View::Routing | View::Dsa if self.rows(src) > 0 => self.token = self.token.saturating_sub(self.page),
            View::KvNorms => self.layer = clamp_to_layers(src, self.layer.saturating_sub(self.page)),
            View::Layers => self.layer = self.layer.saturating_sub(self.page),
            View::Load => self.layer = load_row_moved(src, self.layer, self.page, false),
            _ => {}
        }
    }

    /// `/` starts a new filter, as a search does.
    pub fn start_filter(&mut self) {
        self.filter.clear();
        self.scroll = 0;
        self.editing_filter = true;
    }
    pub fn filter_push(&mut self, c: char) {
        self.filter.push(c);
    }
    pub fn filter_pop(&mut self) {
        self.filter.pop();
    }
    pub fn finish_filter(&mut self) {
        self.editing_filter = false;
    }
    pub fn clear_filter(&mut self) {
        self.filter.clear();
        self.editing_filter = false;
    }
}

/// `row` (an index into `Source::layers()`) held to the rows of layers, which the latent-kv view
/// lists (not the embeddings or the head).
fn clamp_to_layers(src: &dyn Source, row: usize) -> usize {
    let layers = src.layers();
    let is_layer = |i: &usize| layers[*i].part.layer().is_some();
    match ((0..layers.len()).find(is_layer), (0..layers.len()).rev().find(is_layer)) {
        (Some(first), Some(last)) => row.clamp(first, last),
        _ => row.min(layers.len().saturating_sub(1)),
    }
}

/// The row of `Source::layers()` of the MoE layer `by` rows of the load view down (or up) from
/// the selected `layer`'s, held to the view's first and last; `layer` itself where the view has
/// no row for it (a dense layer's), as PgDn then only scrolls.
fn load_row_moved(src: &dyn Source, layer: usize, by: usize, down: bool) -> usize {
    let (load, layers) = (src.load(), src.layers());
    let at = layers.get(layer).and_then(|l| l.part.layer()).and_then(|i| load.iter().position(|r| r.layer == i));
    let Some(at) = at else { return layer };
    let to = if down { (at + by).min(load.len().saturating_sub(1)) } else { at.saturating_sub(by) };
    load.get(to).and_then(|r| layers.iter().position(|l| l.part.layer() == Some(r.layer))).unwrap_or(layer)
}

/// The first token (batch rows flattened) from `from` on whose DSA selection in `layer` differs
/// from the reference.
fn next_dsa_flip(src: &dyn Source, layer: usize, from: usize) -> Option<usize> {
    // (The batch row being drawn: `Source::dsa` keeps its last one, which row 0 would evict.)
    let seq = src.dsa(layer, from)?.seq.max(1);
    let mut start = from - from % seq;
    while start < src.tokens() {
        let m = src.dsa(layer, start)?;
        let first = from.saturating_sub(start);
        if let Some(q) = (first..m.seq).find(|&q| m.recall(q).is_some_and(|r| r < 1.0)) {
            return Some(start + q);
        }
        start += seq;
    }
    None
}
