//! glimpse: run GLM-5 (`glm_moe_dsa`), record every decision it makes inside, and prove it
//! against a reference.
//!
//! - [`config`] parses `config.json`; [`checkpoint`] memory-maps the weights (sharded, FP8);
//! - [`model`] is the f32 CPU forward pass, one file per block, reporting to [`hooks`];
//! - [`dump`] reads and writes `glm5-dump/1` files, [`compare`] checks one against another;
//! - [`synth`] writes random-weight checkpoints in the released layout.

// The model's and the comparisons' docs link to the private helpers and constants they rest on:
// read them with `cargo doc --document-private-items`, where those links resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod audit;
pub mod bench;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod hooks;
pub mod model;
pub mod output;
pub mod progress;
pub mod selftest;
pub mod st;
pub mod stitch;

pub use error::{Error, Result};
pub mod compare;
pub mod decode_check;
pub mod diff;
pub mod dump;
pub mod flips;
pub mod generate;
pub mod heatmap;
pub mod inspect;
pub mod interrupt;
pub mod layer_error;
pub mod layout;
pub mod mapped;
pub mod memory;
pub mod reading;
mod rng;
pub mod synth;
pub mod tokenizer;
pub mod tui_source;
pub mod verify;
