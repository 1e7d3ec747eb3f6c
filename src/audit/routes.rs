//! `audit --routes`: every token's routing, one CSV line per token and MoE layer, for the
//! questions the counts cannot answer (which tokens an expert takes, how confident each choice
//! was), streamed to a temporary file as the prompts run and renamed into place when the audit
//! is done, so a killed audit leaves no half file under the name; or (`--routes -`) to standard
//! output as it is decided, for a pipe.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::Tokens;
use crate::tokenizer::Tokenizer;

/// The CSV's header: `run` is the dump or `--prompts` line in order (0-based), `row` its batch
/// row, `position` and `token` the position's (in the MTP layer, the position it drafts from),
/// `experts` and `weights` space-separated in the order chosen, `margin` the one that decided the
/// choice as `diff` gives it (`flips::margins_in`; empty where unknown), `text` the token as the
/// checkpoint's tokenizer decodes it alone (empty without one; quoted as CSV quotes).
pub const HEADER: &str = "run,row,position,token,layer,experts,weights,margin,text\n";

/// One MoE layer of one run, as recorded: `ids` (`[tokens, k]`), its weights and margins where
/// recorded (or recomputed).
pub struct LayerRoutes<'a> {
    pub layer: usize,
    pub ids: &'a [i64],
    pub k: usize,
    pub weights: Option<&'a [f32]>,
    pub margin: Option<&'a [f32]>,
}

/// The open `--routes` file.
pub struct Routes {
    out: BufWriter<Box<dyn Write>>,
    /// The temporary file written, renamed to `path` when done; `-` for standard output.
    tmp: PathBuf,
    path: PathBuf,
    /// The runs written so far: the next one's number.
    pub runs: usize,
    /// The checkpoint's tokenizer, for each token's text, and the texts decoded so far.
    decoder: Option<Tokenizer>,
    texts: HashMap<u32, String>,
}

impl Routes {
    /// The file at `path`, or standard output for `-`.
    pub fn create(path: &Path) -> Result<Routes> {
        let path = &crate::output::landing(path);
        let (tmp, out): (PathBuf, Box<dyn Write>) = match Self::to_stdout(path) {
            true => (path.to_path_buf(), Box::new(std::io::stdout())),
            false => {
                let tmp = crate::output::tmp_sibling(path);
                let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
                (tmp, Box::new(file))
            }
        };
        let mut routes = Routes {
            out: BufWriter::with_capacity(1 << 20, out),
            tmp,
            path: path.to_path_buf(),
            runs: 0,
            decoder: None,
            texts: HashMap::new(),
        };
        routes.write(HEADER)?;
        Ok(routes)
    }

    /// Decode each token's text with `decoder` (the checkpoint's tokenizer).
    pub fn decode_with(&mut self, decoder: Tokenizer) {
        self.decoder = Some(decoder);
    }

    /// Token `id` as the tokenizer decodes it alone, as a CSV field (quoted where it holds a
    /// comma, quote or line break); empty without a tokenizer or where it cannot decode it.
    fn text(&mut self, id: u32) -> &str {
        let decoder = &self.decoder;
        self.texts.entry(id).or_insert_with(|| {
            let text = decoder.as_ref().and_then(|d| d.decode(&[id]).ok()).unwrap_or_default();
            match text.contains([',', '"', '\n', '\r']) {
                true => format!("\"{}\"", text.replace('"', "\"\"")),
                false => text,
            }
        })
    }

    fn write(&mut self, s: &str) -> Result<()> {
        self.out.write_all(s.as_bytes()).map_err(|e| Error::io(&self.tmp, e))
    }

    /// One layer of run `run` of `batch` rows: its tokens' lines, in order. The MTP layer holds
    /// one position fewer a row, each the position it drafts from; `tokens` (when known) gives
    /// each position's id.
    pub fn layer(&mut self, run: usize, batch: usize, tokens: Option<&Tokens>, l: &LayerRoutes) -> Result<()> {
        let k = l.k.max(1);
        let rows = l.ids.len() / k;
        let per_row = rows / batch.max(1);
        let mut line = String::new();
        for (r, ids) in l.ids.chunks(k).enumerate() {
            let (row, position) = (r / per_row.max(1), r % per_row.max(1));
            let id = tokens.filter(|t| position < t.seq).and_then(|t| t.ids.get(row * t.seq + position)).copied();
            let token = id.map_or(String::new(), |id| id.to_string());
            let list = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(" ");
            let experts = list(&mut ids.iter().map(i64::to_string));
            let weights = l
                .weights
                .and_then(|w| w.get(r * k..(r + 1) * k))
                .map_or(String::new(), |w| list(&mut w.iter().map(|x| format!("{x}"))));
            let margin =
                l.margin.and_then(|m| m.get(r)).filter(|m| !m.is_nan()).map_or(String::new(), |m| format!("{m}"));
            line.clear();
            use std::fmt::Write as _;
            let text = id.map_or("", |id| self.text(id));
            let _ = writeln!(line, "{run},{row},{position},{token},{},{experts},{weights},{margin},{text}", l.layer);
            self.write(&line)?;
        }
        Ok(())
    }

    /// `--routes -`: standard output.
    pub fn to_stdout(path: &Path) -> bool {
        path == Path::new("-")
    }

    /// Flushes and renames the file into place; its path (None for standard output).
    pub fn finish(mut self) -> Result<Option<PathBuf>> {
        self.out.flush().map_err(|e| Error::io(&self.tmp, e))?;
        if Self::to_stdout(&self.path) {
            return Ok(None);
        }
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(Some(self.path.clone()))
    }
}

impl Drop for Routes {
    /// An audit that failed leaves no temporary file (after `finish` it is gone already).
    fn drop(&mut self) {
        if !Self::to_stdout(&self.path) {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
