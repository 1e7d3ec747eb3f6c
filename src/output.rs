//! Where results go. Every output path a command names is checked before any work starts
//! ([`check`]), so a path that cannot be written is refused at once rather than after a long run;
//! and small reports are written atomically ([`write_atomic`]), leaving nothing behind on failure.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Refuses an output path that cannot become a file: an existing folder, a folder that does not
/// exist, or one this process cannot create files in (found by creating and removing a probe
/// file beside the target, named with this process's id).
pub fn check(flag: &str, path: &Path) -> Result<()> {
    // (`audit --csv -` and `--routes -` mean standard output and are not checked here.)
    if path.as_os_str() == "-" {
        return Err(Error::Usage(format!("{flag} -: this output is written as a file; give a file path")));
    }
    if path.is_dir() {
        return Err(Error::Usage(format!("{flag} {}: is a folder; give a file path", path.display())));
    }
    // (A trailing separator names a folder to be: the probe below, beside the name without it,
    // would pass, and the write fail after the work.)
    if path.to_str().and_then(|p| p.chars().last()).is_some_and(std::path::is_separator) {
        return Err(Error::Usage(format!("{flag} {}: ends in a separator; give a file path", path.display())));
    }
    // Outputs are written beside the target and renamed over it: a device or a FIFO there
    // (`--dump /dev/null`) would be replaced by a regular file.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(Error::Usage(format!("{flag} {}: is not a regular file; give a file path", path.display())));
    }
    // (A link's target is what is written, beside it.)
    let at = landing(path);
    let folder = match at.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        return Err(Error::Usage(format!("{flag} {}: folder {} does not exist", path.display(), folder.display())));
    }
    // (Not `create_new`: a probe a killed process of the same id left would refuse the folder.)
    let probe = own_sibling(&at, "probe");
    match std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::Usage(format!("{flag} {}: cannot write in {}: {e}", path.display(), folder.display()))),
    }
}

/// Refuses an output whose path holds a non-empty file it must not replace: a `--dump` replaces
/// only a dump glimpse wrote (not a reference another tool wrote, which a later `verify` would
/// then read as glimpse checked against itself, nor any other file); a report (`--csv`,
/// `--routes`, `--heatmap`, all text) replaces only text, never a safetensors file. Only the
/// file's head is read: a dump cut short is still known by its header.
pub fn check_replaceable(flag: &str, path: &Path) -> Result<()> {
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0) {
        return Ok(());
    }
    let head = read_head(path).map_err(|e| Error::io(path, e))?;
    match not_to_replace(flag, &head) {
        Some(what) => Err(Error::Usage(format!(
            "{flag} {}: {what} is there, which glimpse does not replace: give another path or remove it",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// The first bytes of a file, enough for a safetensors header of any dump glimpse writes.
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)?.take(HEAD).read_to_end(&mut head)?;
    Ok(head)
}

/// How much of a file [`check_replaceable`] reads.
const HEAD: u64 = 4 << 20;

/// What a file starting with `head` holds, where output `flag` must not replace it.
fn not_to_replace(flag: &str, head: &[u8]) -> Option<String> {
    let metadata = safetensors_metadata(head);
    if flag != "--dump" {
        return match metadata {
            Some(_) => Some("a safetensors file".into()),
            // (A head cut inside a character is still text.)
            None if std::str::from_utf8(head).is_err_and(|e| e.error_len().is_some()) => Some("a binary file".into()),
            None => None,
        };
    }
    let Some(meta) = metadata else { return Some("a file that is not a safetensors dump".into()) };
    let field = |k: &str| meta.get(k).and_then(|v| v.as_str());
    let source = field("source").unwrap_or("no source");
    match field("format") {
        Some(crate::dump::FORMAT) if source.starts_with("glimpse ") => None,
        Some(crate::dump::FORMAT) => {
            // The source's first clause names the tool ("transformers 5.24.0 / torch 2.15.0, ...").
            let tool = source.split(',').next().unwrap_or(source);
            Some(format!("a dump another tool wrote ({tool})"))
        }
        Some(other) => Some(format!("a safetensors file that is not a dump (format \"{other}\")")),
        None => Some("a safetensors file that is not a dump (no format in its metadata)".into()),
    }
}

/// The `__metadata__` of a safetensors header at the start of `head` (an empty map where it has
/// none); None where `head` does not start with one.
fn safetensors_metadata(head: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    let len = usize::try_from(u64::from_le_bytes(head.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Value = serde_json::from_slice(head.get(8..8usize.checked_add(len)?)?).ok()?;
    let header = header.as_object()?;
    Some(header.get("__metadata__").and_then(|m| m.as_object()).cloned().unwrap_or_default())
}

/// Refuses outputs that would replace one of the command's `inputs` (a dump written over the
/// reference it was run from, a CSV over a dump, a dump over the weights) or each other (two
/// reports to one path: one would be lost). Paths are compared as they resolve (links
/// followed, `..` and `.` taken out).
pub fn check_distinct(outputs: &[(&str, &Path)], inputs: &[(&str, PathBuf)]) -> Result<()> {
    let resolved = |p: &Path| match p.canonicalize() {
        Ok(real) => Some(real),
        // Not there yet: its folder's real path and its name.
        Err(_) => {
            let folder = p.parent().filter(|f| !f.as_os_str().is_empty()).unwrap_or(Path::new("."));
            Some(folder.canonicalize().ok()?.join(p.file_name()?))
        }
    };
    for (i, (flag, out)) in outputs.iter().enumerate() {
        let Some(real) = resolved(out) else { continue };
        if let Some((input_flag, input)) = inputs.iter().find(|(_, p)| resolved(p).as_ref() == Some(&real)) {
            return Err(Error::Usage(format!(
                "{flag} {} is {input_flag}'s {}, which this command reads: give another path",
                out.display(),
                input.display()
            )));
        }
        if let Some((other, _)) = outputs[..i].iter().find(|(_, p)| resolved(p).as_ref() == Some(&real)) {
            return Err(Error::Usage(format!("{flag} {} is also {other}'s path: give each its own", out.display())));
        }
    }
    Ok(())
}

/// Removes the file at `path` when dropped, unless it was `removed` already: a temporary file
/// that must not outlive its owner, whatever error ends it.
pub struct Removal {
    pub path: PathBuf,
    pub removed: bool,
}

impl Removal {
    pub fn new(path: PathBuf) -> Self {
        Removal { path, removed: false }
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `path` with `suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Where a write of `path` lands: a symbolic link there is followed to the file it names, so the
/// rename replaces that file and the link stays a link (a rename over the link would put a plain
/// file in its place and leave its target stale). Every writer starts from here, so its
/// temporary file sits beside the file it replaces, on the same file system.
pub fn landing(path: &Path) -> PathBuf {
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&at) else { return at };
        at = match at.parent() {
            Some(folder) => folder.join(target),
            None => target,
        };
    }
    // A loop of links (or a chain past the system's own limit) names no file: the write lands
    // on the link given, as a rename over it does, not on whichever link of the loop was last.
    match std::fs::symlink_metadata(&at) {
        Ok(m) if m.file_type().is_symlink() => path.to_path_buf(),
        _ => at,
    }
}

/// A name beside `path` for this process's temporary file of kind `kind` (`NAME.glimpse-PID.tmp`,
/// `NAME.glimpse-PID.partial`). The word keeps [`sweep_leftovers`] off a user's own `NAME.7.tmp`.
pub fn own_sibling(path: &Path, kind: &str) -> PathBuf {
    sibling(path, &format!(".{OWN}{}.{kind}", std::process::id()))
}

/// What marks this tool's temporary files beside an output, before the process id.
const OWN: &str = "glimpse-";

/// The temporary file a write of `path` goes to before its rename (`NAME.glimpse-PID.tmp`), once
/// what killed runs left beside it is swept.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    sweep_leftovers(path);
    own_sibling(path, "tmp")
}

/// Removes the temporary files killed runs left beside `path` (`NAME.glimpse-PID.partial`,
/// `NAME.glimpse-PID.tmp`) whose process is gone: a run killed while writing (a second Ctrl-C,
/// SIGKILL) cannot remove its own, so the next one writing `path` does.
pub fn sweep_leftovers(path: &Path) {
    let (Some(name), Some(dir)) = (path.file_name().and_then(|n| n.to_str()), path.parent()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    sweep(dir, |file| {
        let rest = file.strip_prefix(name)?.strip_prefix('.')?.strip_prefix(OWN)?;
        rest.strip_suffix(".partial").or_else(|| rest.strip_suffix(".tmp"))?.parse().ok()
    });
}

/// Removes the files of `dir` whose name `pid_of` reads a process id from, where that process
/// is gone (not this one).
pub fn sweep(dir: &Path, pid_of: impl Fn(&str) -> Option<u32>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_str().and_then(&pid_of);
        if pid.is_some_and(|pid| pid != std::process::id() && !alive(pid)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether a process of this id exists (elsewhere than on Unix: assumed so, keeping its files).
pub fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return true };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Writes a report file atomically: a temporary file beside it, then a rename. On failure the
/// temporary file is removed and any earlier file at `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let path = &landing(path);
    let tmp = tmp_sibling(path);
    let result = std::fs::write(&tmp, bytes)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link is followed to the file it names; a loop of links lands on the link given (it
    /// landed on whichever link of the loop the 40th hop reached).
    #[cfg(unix)]
    #[test]
    fn a_loop_of_links_lands_on_the_link_given() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, file) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("file"));
        std::os::unix::fs::symlink("b", &a).unwrap();
        std::os::unix::fs::symlink("a", &b).unwrap();
        assert_eq!(landing(&a), a);
        assert_eq!(landing(&b), b);
        let to_file = tmp.path().join("to-file");
        std::os::unix::fs::symlink("file", &to_file).unwrap();
        assert_eq!(landing(&to_file), file);
    }

    #[test]
    fn folders_and_missing_folders_are_refused_and_nothing_is_left() {
        let dir = std::env::temp_dir().join(format!("glimpse-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = |p: &Path| check("--dump", p).unwrap_err().to_string();
        assert!(err(&dir).contains("is a folder"), "{}", err(&dir));
        assert!(err(&dir.join("no/such/x.safetensors")).contains("does not exist"));
        assert!(err(&dir.join("new.svg/")).contains("ends in a separator"), "{}", err(&dir.join("new.svg/")));
        check("--dump", &dir.join("x.safetensors")).unwrap();
        assert!(write_atomic(&dir, b"x").is_err(), "a folder cannot be replaced by a file");
        write_atomic(&dir.join("r.csv"), b"a,b\n").unwrap();
        let mut left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["r.csv"], "only the report is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
