//! `diff --model`'s attention reruns on ports with a bug: each port dump is transformers' forward
//! of a golden case with one bug real ports have shipped planted in its own modules
//! (`golden/port_bugs.py`), and `diff` must name that bug. An attention output off by a factor of
//! no such bug, and the runs without `--model`, get no such reading.

mod common;
use common::{code_and_text, edit_dump, golden, s, Named};

use glimpse::dump::Values;

/// `glimpse diff` of the case's `port` against its reference, with `--model` or without.
fn diff_port(case: &str, port: &str, model: bool) -> String {
    let dir = golden(case);
    let ours = dir.join(format!("{port}.safetensors"));
    let mut args = vec!["diff".to_string(), s(&ours), s(&dir.join("reference.safetensors"))];
    if model {
        args.extend(["--model".to_string(), s(&dir)]);
    }
    let (code, text) = code_and_text(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1, "{text}");
    text
}

/// A number of the case's config.json.
fn config(case: &str, path: &[&str]) -> f64 {
    let text = std::fs::read_to_string(golden(case).join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    path.iter().fold(&v, |v, key| &v[key]).as_f64().unwrap_or_else(|| panic!("{case}: {path:?}"))
}

#[test]
fn reruns_name_the_ports_softmax_scale_rope_and_dense_attention() {
    // The scales, from the configs by the formulas of `GlmMoeDsaAttention.__init__`.
    let qk = |case| config(case, &["qk_nope_head_dim"]) + config(case, &["qk_rope_head_dim"]);
    let yarn = "grouped-shared-yarn";
    let factor = config(yarn, &["rope_parameters", "factor"]);
    let mscale = 0.1 * config(yarn, &["rope_parameters", "mscale_all_dim"]) * factor.ln() + 1.0;
    let (plain, checkpoint) = (qk(yarn).powf(-0.5), qk(yarn).powf(-0.5) * mscale * mscale);
    let absorbed = (config("flat", &["kv_lora_rank"]) + config("flat", &["qk_rope_head_dim"])).powf(-0.5);
    let rerun = "(ours is this layer's attention rerun on its input with";
    for (case, port, reading) in [
        (
            yarn,
            "port-no-mscale",
            format!(
                "the softmax scale qk_head_dim^-0.5 = {plain:.6} (YaRN's mscale² left out), where the checkpoint's is \
                 {checkpoint:.6})"
            ),
        ),
        (yarn, "port-rotate-half", "RoPE rotating halves (`rotate_half`: x[j] with x[j + d/2])".into()),
        (
            "flat",
            "port-absorbed-scale",
            format!(
                "the softmax scale (kv_lora_rank + qk_rope_head_dim)^-0.5 = {absorbed:.6}, where the checkpoint's is \
                 {:.6})",
                qk("flat").powf(-0.5)
            ),
        ),
        ("flat", "port-dense", "every causal key: the DSA selection is not applied)".into()),
    ] {
        let text = diff_port(case, port, true);
        let first = format!("first divergence: layers.0.attn.out {rerun} {reading}");
        assert!(text.lines().nth(1).is_some_and(|l| l.starts_with(&first)), "{port}: want {first}\n{text}");
        // Without the checkpoint there is nothing to rerun: where the divergence starts, alone.
        let text = diff_port(case, port, false);
        assert!(text.contains("first divergence: layers.0.attn.out\n  ") && !text.contains(rerun), "{port}\n{text}");
    }
}

/// An attention output that parts from position 1 on by a factor no bug of the list makes gets
/// no rerun reading: the rerun names only a variant that gives ours's values.
#[test]
fn a_difference_no_variant_makes_is_not_read_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("flat");
    let reference = dir.join("reference.safetensors");
    let ours = edit_dump(&reference, &tmp.path().join("off.safetensors"), |t: &mut Vec<Named>| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.0.attn.out").unwrap();
        let Values::F32(x) = v else { panic!("attn.out is F32") };
        x[shape[2]..].iter_mut().for_each(|e| *e *= 1.03);
    });
    let (code, text) = code_and_text(&["diff", &s(&ours), &s(&reference), "--model", &s(&dir)]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("first divergence: layers.0.attn.out") && !text.contains("rerun"), "{text}");
}
