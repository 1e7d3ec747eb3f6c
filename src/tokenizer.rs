//! Text prompts: encoded with the checkpoint's own `tokenizer.json` (the `tokenizers` crate), so
//! ids are exactly those the model was trained on. A checkpoint without one cannot take `--prompt`.

use std::path::Path;

use crate::error::{Error, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Encodes `text` without adding special tokens (the prompt is taken literally).
pub fn encode(model_dir: &Path, text: &str) -> Result<Vec<u32>> {
    let path = model_dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Err(Error::Usage(format!(
            "--prompt needs {}, which does not exist; pass token ids with --tokens instead",
            path.display()
        )));
    }
    if text.is_empty() {
        return Err(Error::Usage("--prompt is empty".into()));
    }
    let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    let enc =
        tok.encode(text, false).map_err(|e| Error::checkpoint(&path, format!("cannot encode the prompt: {e}")))?;
    let ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        return Err(Error::Usage("--prompt encodes to no tokens".into()));
    }
    Ok(ids)
}

/// Decodes ids to text with the checkpoint's tokenizer; None when it has no `tokenizer.json`.
pub fn decode(model_dir: &Path, ids: &[u32]) -> Result<Option<String>> {
    let path = model_dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    tok.decode(ids, false).map(Some).map_err(|e| Error::checkpoint(&path, format!("cannot decode: {e}")))
}
