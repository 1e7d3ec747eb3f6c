//! `audit` of malformed or partial inputs: each refused or read with what is wrong named, not
//! counted as a balanced load or blamed on the wrong file.

use super::*;

/// What a review found the audit said of malformed or partial inputs: a layer that routes no
/// token is refused, not counted as balanced; a missing `--against` names its flag; an expert
/// count taken from the other side's router is said; a bad bias-changed flag names its tensor;
/// the MTP layer is marked by its rows where the dump holds no input_ids; a non-canonical
/// layer name is not counted as its layer.
#[test]
fn audit_names_what_is_wrong_with_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    let flat = Path::new("golden/flat/reference.safetensors");
    let empty = common::edit_dump(flat, &t("empty.st"), |d| {
        d.retain(|(n, _, _)| n == "layers.2.moe.topk_ids");
        d[0].1 = glimpse::dump::Values::I64(Vec::new());
        d[0].2[0] = 0;
    });
    assert_error(
        &glimpse(&["audit", "--dump", &common::s(&empty)]),
        "`layers.2.moe.topk_ids` has shape [0, 4]: it routes no token",
    );
    let missing = common::s(&t("missing.st"));
    assert_error(&glimpse(&["audit", "--dump", &common::s(flat), "--against", &missing]), "--against: ");
    // Ids only on the audited side; the 8-expert mtp case's router on the other.
    let ids_only = common::edit_dump(flat, &t("ids.st"), |d| d.retain(|(n, _, _)| n.ends_with(".moe.topk_ids")));
    let o = glimpse(&["audit", "--dump", &common::s(&ids_only), "--compare", "golden/mtp/reference.safetensors"]);
    let (_, err) = text(&o);
    assert!(err.contains("the audited dumps record no router: the expert count, 8, is the router width"), "{err}");
    assert!(err.contains("outside the experts 0-7"), "{err}");
    let recorded =
        common::run_dump("golden/flat", &["--tokens", "1,2,3", "--record", "layers.*.moe.*"], tmp.path(), "f.st");
    let flags =
        common::edit_ints(Path::new(&recorded), &t("bad-flags.st"), "layers.2.moe.bias_changed", |v, _| v[1] = 2);
    assert_error(&glimpse(&["audit", "--dump", &common::s(&flags)]), "`moe.bias_changed` 2 for token 1");
    let no_ids = common::edit_dump(Path::new("golden/mtp/reference.safetensors"), &t("no-ids.st"), |d| {
        d.retain(|(n, _, _)| n != "input_ids")
    });
    let (out, _) = assert_ok(&glimpse(&["audit", "--dump", &common::s(&no_ids)]));
    assert!(out.lines().any(|l| l.trim_start().starts_with("3 mtp ")), "{out}");
    // `layers.02.*` is another tool's name, not layer 2's: it was counted as layer 2 a second time.
    let padded = common::edit_dump(flat, &t("padded.st"), |d| {
        let copy = d.iter().find(|(n, _, _)| n == "layers.2.moe.topk_ids").cloned().unwrap();
        d.push(("layers.02.moe.topk_ids".to_string(), copy.1, copy.2));
    });
    let (once, _) = assert_ok(&glimpse(&["audit", "--dump", &common::s(flat)]));
    let (padded, _) = assert_ok(&glimpse(&["audit", "--dump", &common::s(&padded)]));
    let rows = |out: &str| out.lines().filter(|l| !l.contains(".st")).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(rows(&padded), rows(&once));
}
