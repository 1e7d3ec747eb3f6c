//! Text prompts: encoded with the checkpoint's own `tokenizer.json` (the `tokenizers` crate), so
//! ids are exactly those the model was trained on, and decoded back for `generate` and `--routes`.
//! A checkpoint without one cannot take `--prompt`. A real `tokenizer.json` takes a while to
//! parse: callers with many texts load it once ([`Tokenizer::load`]).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A checkpoint's tokenizer.
pub struct Tokenizer {
    tok: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// None when the checkpoint has no `tokenizer.json`; one that is there but is no regular
    /// file (a folder, a FIFO) or cannot be parsed is an error.
    pub fn load(model_dir: &Path) -> Result<Option<Tokenizer>> {
        let path = model_dir.join(TOKENIZER_FILE);
        match std::fs::metadata(&path) {
            Err(_) => return Ok(None),
            Ok(m) if !m.is_file() => return Err(Error::Usage(format!("{}: is not a regular file", path.display()))),
            Ok(_) => {}
        }
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        Ok(Some(Tokenizer { tok, path }))
    }

    /// [`Tokenizer::load`], where text needs it: a checkpoint without one is an error.
    pub fn require(model_dir: &Path) -> Result<Tokenizer> {
        Tokenizer::load(model_dir)?.ok_or_else(|| {
            let path = model_dir.join(TOKENIZER_FILE);
            Error::Usage(format!("text needs {}, which does not exist; give token ids instead", path.display()))
        })
    }

    /// Encodes `text` without adding special tokens (the prompt is taken literally), as one row.
    pub fn encode(&self, text: &str) -> Result<crate::model::Tokens> {
        if text.is_empty() {
            return Err(Error::Usage("the prompt is empty".into()));
        }
        let enc = (self.tok.encode(text, false))
            .map_err(|e| Error::checkpoint(&self.path, format!("cannot encode the prompt: {e}")))?;
        let ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            return Err(Error::Usage("the prompt encodes to no tokens".into()));
        }
        crate::model::Tokens::new(1, ids.len(), ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok.decode(ids, false).map_err(|e| Error::checkpoint(&self.path, format!("cannot decode: {e}")))
    }
}

/// Encodes one `text` with the checkpoint's tokenizer ([`Tokenizer::encode`]).
pub fn encode(model_dir: &Path, text: &str) -> Result<crate::model::Tokens> {
    Tokenizer::require(model_dir)?.encode(text)
}
