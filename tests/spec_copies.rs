//! `docs/spec/` holds verbatim copies of the shared specifications (the dump format's contract,
//! the architecture notes), so a clone carries them; where the originals sit beside the checkout
//! (`../shared/`), the copies must equal them.

use std::path::Path;

#[test]
fn the_spec_copies_equal_the_shared_originals() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared");
    for (copy, original) in
        [("dump-format.md", "spec/dump-format.md"), ("glm5-reference.md", "design/glm5-reference.md")]
    {
        let copy_path = root.join("docs/spec").join(copy);
        let ours = std::fs::read(&copy_path).unwrap_or_else(|e| panic!("{}: {e}", copy_path.display()));
        let original = shared.join(original);
        match std::fs::read(&original) {
            Ok(theirs) => {
                assert!(ours == theirs, "docs/spec/{copy} differs from {}: copy the original again", original.display())
            }
            Err(e) => println!("skipped docs/spec/{copy}: no original at {} ({e})", original.display()),
        }
    }
}
