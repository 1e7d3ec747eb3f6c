//! glimpse's terminal UI: step through the layers of a recorded run, side by side with its
//! reference. This crate only draws: it knows nothing of GLM-5. It defines the view data and the
//! [`Source`] trait it reads them from; the `glimpse` binary implements that trait over a live
//! run, a dump, or a dump plus its reference.
//!
//! Shaped like ratatui's demo apps: plain [`App`] state, key presses mapped to named methods,
//! drawing that never changes state, one file per view.

pub mod app;
pub mod data;
pub mod term;
pub mod ui;
pub mod views;

pub use app::{App, View};
pub use data::*;
/// The ratatui the views are drawn with, for callers' render tests.
pub use ratatui;
