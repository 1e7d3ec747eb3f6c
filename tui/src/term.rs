//! The terminal loop: raw mode and the alternate screen (restored on exit and on panic), draw,
//! wait for a key, update the state, until quit. Resizes just redraw.

use std::io::{self, IsTerminal};

use ratatui::crossterm::event::{self, Event, KeyEventKind};

use crate::app::App;
use crate::data::Source;
use crate::ui;

pub fn run(src: &dyn Source) -> io::Result<()> {
    if !io::stdout().is_terminal() {
        return Err(io::Error::other("needs an interactive terminal (stdout is not one)"));
    }
    let mut terminal = ratatui::try_init()?;
    let result = event_loop(&mut terminal, src);
    ratatui::restore();
    result
}

fn event_loop(terminal: &mut ratatui::DefaultTerminal, src: &dyn Source) -> io::Result<()> {
    let mut app = App::default();
    while !app.quit {
        terminal.draw(|f| ui::draw(f, &app, src))?;
        if let Event::Key(key) = event::read()? {
            if key.kind == KeyEventKind::Press {
                app.handle_key(key, src);
            }
        }
    }
    Ok(())
}
