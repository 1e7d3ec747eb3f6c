//! Text prompts: encoded with the checkpoint's own `tokenizer.json` (the `tokenizers` crate), so
//! ids are exactly those the model was trained on. A checkpoint without one cannot take `--prompt`.

use std::path::Path;

use crate::error::{Error, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Encodes `text` without adding special tokens (the prompt is taken literally), as one row.
pub fn encode(model_dir: &Path, text: &str) -> Result<crate::model::Tokens> {
    let path = model_dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Err(Error::Usage(format!(
            "text needs {}, which does not exist; give token ids instead",
            path.display()
        )));
    }
    if text.is_empty() {
        return Err(Error::Usage("the prompt is empty".into()));
    }
    crate::st::check_regular(&path)?;
    let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    let enc =
        tok.encode(text, false).map_err(|e| Error::checkpoint(&path, format!("cannot encode the prompt: {e}")))?;
    let ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        return Err(Error::Usage("the prompt encodes to no tokens".into()));
    }
    crate::model::Tokens::new(1, ids.len(), ids)
}

/// A checkpoint's tokenizer, loaded once for decoding many steps.
pub struct Decoder {
    tok: tokenizers::Tokenizer,
    path: std::path::PathBuf,
}

impl Decoder {
    /// None when the checkpoint has no `tokenizer.json`.
    pub fn load(model_dir: &Path) -> Result<Option<Decoder>> {
        let path = model_dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        crate::st::check_regular(&path)?;
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        Ok(Some(Decoder { tok, path }))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok.decode(ids, false).map_err(|e| Error::checkpoint(&self.path, format!("cannot decode: {e}")))
    }
}
