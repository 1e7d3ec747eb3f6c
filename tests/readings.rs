//! `diff --model`'s readings of ports with a bug: each port dump is transformers' forward of a
//! golden case with one bug real ports have shipped planted in its own modules
//! (`golden/port_bugs.py`), and `diff` must name that bug: by rerunning the attention or the
//! indexer with the port's scale, RoPE or keys, or by the pattern the bug leaves. An attention
//! output off by a factor of no such bug, and the runs without `--model`, get no rerun reading.

mod common;
use common::{code_and_text, edit_dump, edit_floats, golden, s, Named};

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

/// Every other value of `x` times `1 + by`, the rest times `1 - by`: a difference no factor,
/// row scale or port's bug explains.
fn wobble(x: &mut [f32], by: f32) {
    x.iter_mut().enumerate().for_each(|(i, e)| *e *= if i % 2 == 0 { 1.0 + by } else { 1.0 - by });
}

/// `glimpse diff OURS` against the case's reference with `--model` at `--atol TOL --rtol TOL`.
fn diff_at(case: &str, ours: &str, tol: &str) -> (i32, String) {
    let dir = golden(case);
    let reference = s(&dir.join("reference.safetensors"));
    code_and_text(&["diff", ours, &reference, "--model", &s(&dir), "--atol", tol, "--rtol", tol])
}

/// `src` with layer 0's attention output times 1.03 from position 1 on: a factor no bug of the
/// readings' list makes, written to `dst`.
fn attention_off_by_3_percent(src: &std::path::Path, dst: &std::path::Path) -> std::path::PathBuf {
    edit_dump(src, dst, |t: &mut Vec<Named>| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.0.attn.out").unwrap();
        let Values::F32(x) = v else { panic!("attn.out is F32") };
        x[shape[2]..].iter_mut().for_each(|e| *e *= 1.03);
    })
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
    let attention = "layers.0.attn.out (ours is this layer's attention rerun on its input with";
    let halves = "RoPE rotating halves (`rotate_half`: x[j] with x[j + d/2]), where";
    for (case, port, reading) in [
        (
            yarn,
            "port-no-mscale",
            format!(
                "{attention} the softmax scale qk_head_dim^-0.5 = {plain:.6} (YaRN's mscale² left out), where the \
                 checkpoint's is {checkpoint:.6})"
            ),
        ),
        (yarn, "port-rotate-half", format!("{attention} {halves} GLM-5 rotates neighbours")),
        (
            "flat",
            "port-absorbed-scale",
            format!(
                "{attention} the softmax scale (kv_lora_rank + qk_rope_head_dim)^-0.5 = {absorbed:.6}, where the \
                 checkpoint's is {:.6})",
                qk("flat").powf(-0.5)
            ),
        ),
        ("flat", "port-dense", format!("{attention} every causal key: the DSA selection is not applied)")),
        (
            "flat",
            "port-indexer-rotate-half",
            format!(
                "layers.0.dsa.scores (ours is this layer's indexer rerun on its input with {halves} GLM-5's indexer \
                 (not DeepSeek-V3.2's) rotates neighbours"
            ),
        ),
    ] {
        let text = diff_port(case, port, true);
        let first = format!("first divergence: {reading}");
        assert!(text.lines().nth(1).is_some_and(|l| l.starts_with(&first)), "{port}: want {first}\n{text}");
        // The onset's list of the kinds of cause it may be gives way to the one named.
        let causes = ["something that acts by position", "(attention over all keys?)"];
        assert!(causes.iter().all(|c| !text.contains(c)), "{port}\n{text}");
        let dir = golden(case);
        let args = [&s(&dir.join(format!("{port}.safetensors"))), &s(&dir.join("reference.safetensors"))];
        let (_, json) = code_and_text(&["diff", args[0], args[1], "--model", &s(&dir), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let part = if port.contains("indexer") { "indexer" } else { "attention" };
        assert_eq!(v["first_divergence_rerun"]["part"], part, "{json}");
        // Without the checkpoint there is nothing to rerun: where the divergence starts, and where
        // it is made, with a pointer to --model.
        let text = diff_port(case, port, false);
        assert!(text.contains("and every later one differs") && !text.contains("rerun on its input"), "{port}\n{text}");
        assert!(text.contains("--model DIR reruns it on ours's inputs"), "{port}\n{text}");
        assert!(causes.iter().any(|c| text.contains(c)), "{port}\n{text}");
    }
}

/// The indexer's RoPE bug in a dump without the indexer's scores: its selections are rerun.
#[test]
fn an_indexer_rerun_reads_selections_where_the_scores_are_not_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("flat");
    let port = dir.join("port-indexer-rotate-half.safetensors");
    let ours = edit_dump(&port, &tmp.path().join("no-scores.safetensors"), |t: &mut Vec<Named>| {
        t.retain(|(n, _, _)| !n.ends_with(".dsa.scores"))
    });
    let reference = s(&dir.join("reference.safetensors"));
    let (code, text) = code_and_text(&["diff", &s(&ours), &reference, "--model", &s(&dir)]);
    let first = "first divergence: layers.0.dsa.topk (ours is this layer's indexer rerun on its input with RoPE \
                 rotating halves";
    assert!(code == 1 && text.contains(first), "{text}");
}

/// The other bugs `port_bugs.py` plants, each read by the pattern it leaves.
#[test]
fn the_ports_routing_and_mask_bugs_are_read() {
    for (port, reading) in [
        (
            "port-indexer-own-key",
            "layers.0.dsa.scores (ours masks 32 causal keys the reference scores, every one a query's own key (the \
             diagonal): a causal mask off by one",
        ),
        (
            "port-no-bias",
            "layers.2.moe.topk_ids (ours chooses every token's experts by the unbiased scores (sigmoid of the gate \
             logits;",
        ),
        (
            "port-biased-weights",
            "layers.2.moe.topk_weights (ours's weights are its gate's biased scores (sigmoid + \
             e_score_correction_bias): the bias is for selection only)",
        ),
        (
            "port-no-scaling",
            "layers.2.moe.topk_weights (ours's weights are its gate's scores without routed_scaling_factor)",
        ),
        (
            "port-no-shared-expert",
            "layers.2.mlp.out (ours is this layer's MoE rerun on its input (with ours's recorded experts and weights) without \
             the shared expert",
        ),
        (
            "port-experts-gate-up-swapped",
            "layers.2.mlp.out (ours is this layer's MoE rerun on its input (with ours's recorded experts and weights) \
             with the routed experts' gate and up projections swapped",
        ),
        (
            "port-kv-norm-over-rope",
            "layers.0.attn.kv_latent (ours is this layer's kv_a_layernorm rerun on its input with its mean square \
             over all of kv_a_proj_with_mqa's output, the rope columns (qk_rope_head_dim) too",
        ),
        (
            "port-kv-norm-unloaded",
            "layers.0.attn.kv_latent (ours is this layer's kv_a_layernorm rerun on its input without its weight",
        ),
        (
            "port-mtp-prenorm",
            "mtp.input_hidden (ours feeds the MTP head layers.2.output, the hidden state before the final norm",
        ),
    ] {
        let case = if port.starts_with("port-mtp") { "mtp" } else { "flat" };
        let text = diff_port(case, port, true);
        let first = format!("first divergence: {reading}");
        assert!(text.lines().nth(1).is_some_and(|l| l.starts_with(&first)), "{port}: want {first}\n{text}");
    }
}

/// A latent normalised otherwise is read by a rerun of its norm on ours's own input: in f32 (where
/// the rows' own factors say so too, and alone without `--model`) and in a bf16 port, whose noise
/// hides those factors.
#[test]
fn a_latent_norms_bug_is_read_on_ours_own_input_in_f32_and_bf16() {
    let over_rope = "first divergence: layers.0.attn.kv_latent (ours is this layer's kv_a_layernorm rerun on its \
                     input with its mean square over all of kv_a_proj_with_mqa's output";
    let text = diff_port("flat", "port-kv-norm-over-rope", false);
    assert!(
        text.contains("each of its 32 rows is a scaled copy of the reference's") && !text.contains("rerun"),
        "{text}"
    );
    let flat = golden("flat");
    let (port, reference) =
        (s(&flat.join("port-kv-norm-over-rope-bf16.safetensors")), s(&flat.join("reference.safetensors")));
    for tol in ["2e-2", "5e-2"] {
        let (code, text) = diff_at("flat", &port, tol);
        assert!(code == 1 && text.lines().nth(1).is_some_and(|l| l.starts_with(over_rope)), "{tol}: {text}");
        // (Without --model, nothing reads it: the rows' factors are lost in the port's noise.)
        let (_, text) = code_and_text(&["diff", &port, &reference, "--atol", tol, "--rtol", tol]);
        assert!(text.lines().nth(1) == Some("first divergence: layers.0.attn.kv_latent"), "{tol}: {text}");
    }
}

/// An attention output that parts from position 1 on by a factor no bug of the list makes gets
/// no rerun reading, nor do transformers' controls (no port's bug) at any tolerance: a rerun
/// names only a variant that explains ours's values.
#[test]
fn a_difference_no_variant_makes_is_not_read_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("flat");
    let reference = dir.join("reference.safetensors");
    let ours = attention_off_by_3_percent(&reference, &tmp.path().join("off.safetensors"));
    let (code, text) = code_and_text(&["diff", &s(&ours), &s(&reference), "--model", &s(&dir)]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("first divergence: layers.0.attn.out") && !text.contains("rerun"), "{text}");
    // transformers with its softmax scale times 1.2, 2% off the scale of qk_nope_head_dim: inside
    // a loose tolerance of that variant, which explains too little of the difference to be named.
    // And with every shared expert's output times 1.95, near twice: the best-fitting share of the
    // shared expert is 1.95, not 2.
    for (control, first, named, tols) in [
        ("control-scale-x1.2", "layers.0.attn.out", "rerun", &["1e-4", "2e-2", "5e-2"][..]),
        ("control-shared-x1.95", "layers.2.mlp.out", "shared expert", &["1e-4", "2e-2", "5e-2", "1e-1"][..]),
    ] {
        let control = s(&dir.join(format!("{control}.safetensors")));
        for tol in tols {
            let (code, text) = diff_at("flat", &control, tol);
            let first = format!("first divergence: {first}\n");
            assert!(code == 1 && text.contains(&first) && !text.contains(named), "{control} {tol}: {text}");
        }
    }
}

/// A port that records `mlp.out` before adding the shared expert (the routed experts' sum of the
/// port without it, in every MoE layer of the reference's dump otherwise: the layers' outputs
/// hold the shared expert) is read as where its hook sits, not as a missing shared expert, and a
/// bug after it is read past those hooks (layer 4's routing weights scaled twice).
#[test]
fn a_mlp_out_recorded_before_the_shared_expert_is_read_as_the_hooks_place() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("flat");
    let reference = dir.join("reference.safetensors");
    let routed = glimpse::dump::Dump::open(&dir.join("port-no-shared-expert.safetensors")).unwrap();
    let rsf = config("flat", &["routed_scaling_factor"]) as f32;
    let ours = edit_dump(&reference, &tmp.path().join("hook.safetensors"), |t: &mut Vec<Named>| {
        for (name, v, _) in t.iter_mut() {
            match name.as_str() {
                "layers.2.mlp.out" | "layers.3.mlp.out" | "layers.4.mlp.out" => *v = routed.values(name).unwrap().0,
                "layers.4.moe.topk_weights" => {
                    let Values::F32(w) = v else { panic!("topk_weights is F32") };
                    w.iter_mut().for_each(|x| *x *= rsf);
                }
                _ => {}
            }
        }
    });
    let (code, text) = code_and_text(&["diff", &s(&ours), &s(&reference), "--model", &s(&dir)]);
    let read = "first divergence: layers.2.mlp.out (ours is this layer's MoE rerun on its input (with ours's recorded \
                experts and weights) without the shared expert, yet its layer output matches the reference's: ours \
                records mlp.out before the shared expert is added";
    let past = "\n  past the mlp.out hooks placed before the shared expert, the first divergence: \
                layers.4.moe.topk_weights (ours = 2.5000 x reference";
    assert!(code == 1 && text.contains(read) && text.contains(past), "{text}");
}

/// `verify --golden PORT` says how to have its first mismatch read, and those commands, run as
/// written, name the port's bug: the port's dump is `diff`'s ours, glimpse's run its reference,
/// at verify's tolerance (a bf16 port's), with the MTP head where the port's dump holds it.
#[test]
fn verifys_hint_has_a_ports_bug_named() {
    let tmp = tempfile::tempdir().unwrap();
    for (case, port, tol, read) in [
        (
            "flat",
            "port-no-scaling",
            &[][..],
            "layers.2.moe.topk_weights (ours's weights are its gate's scores without routed_scaling_factor)",
        ),
        (
            "flat",
            "port-no-bias-bf16",
            &["--atol", "2e-2", "--rtol", "2e-2"][..],
            "layers.2.moe.topk_ids (ours chooses every token's experts by the unbiased scores",
        ),
        ("mtp", "port-mtp-prenorm", &[][..], "mtp.input_hidden (ours feeds the MTP head layers.2.output"),
    ] {
        let (dir, port) = (s(&golden(case)), s(&golden(case).join(format!("{port}.safetensors"))));
        let args = [&["verify", "--model", &dir, "--golden", &port][..], tol].concat();
        let (code, out) = code_and_text(&args);
        let hint = out.lines().find_map(|l| l.strip_prefix("(a reading of the first mismatch: "));
        let hint = hint.unwrap_or_else(|| panic!("{port} {code}: {out}")).trim_end_matches(')');
        let glimpse = s(&tmp.path().join("glimpse.safetensors"));
        let mut last = String::new();
        for command in hint.split(", then ") {
            let command = command.replace("GLIMPSE.safetensors", &glimpse);
            let args: Vec<&str> = command.split(' ').skip(1).collect();
            last = code_and_text(&args).1;
        }
        assert!(last.contains(read), "{port}: want {read}\n{hint}\n{last}");
    }
}

/// A first divergence with no reading (layer 0's attention output off by 3% from position 1, a
/// factor no bug of the list makes, in the transformers port without the shared expert): the
/// first divergence after it that reads as a bug on ours's own inputs is read.
#[test]
fn past_an_unread_first_divergence_a_bug_on_ours_own_inputs_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("flat");
    let port = dir.join("port-no-shared-expert.safetensors");
    let ours = attention_off_by_3_percent(&port, &tmp.path().join("two.safetensors"));
    let reference = s(&dir.join("reference.safetensors"));
    let (code, text) = code_and_text(&["diff", &s(&ours), &reference, "--model", &s(&dir)]);
    let read = "first divergence: layers.0.attn.out\n  position 0 matches and every later one differs";
    let own = "\n  on ours's own inputs, the first divergence that reads as a bug: layers.2.mlp.out (ours is this \
               layer's MoE rerun on its input (with ours's recorded experts and weights) without the shared expert";
    assert!(code == 1 && text.contains(read) && text.contains(own), "{text}");
}

/// `verify --isolate` of a port whose bug every layer (or every MoE layer) runs says that each
/// layer, on the reference's input, first parts at the same hook point; one layer off alone gets
/// no such line.
#[test]
fn isolated_layers_that_part_at_the_same_hook_are_said_to_share_it() {
    let verify = |case: &str, port: &str| {
        let dir = golden(case);
        let dump = dir.join(format!("{port}.safetensors"));
        code_and_text(&["verify", "--model", &s(&dir), "--golden", &s(&dump), "--isolate"])
    };
    let shared = "each on the reference's input, first parts from it at its";
    for (case, port, which) in [
        ("grouped-shared-yarn", "port-no-mscale", "every layer (4 of 4), each on the reference's input, first parts from it at its attn.out: what they all run there differs"),
        ("flat", "port-no-shared-expert", "layers 2, 3, 4 (3 of 5), each on the reference's input, first parts from it at its mlp.out"),
    ] {
        let (code, text) = verify(case, port);
        assert!(code == 1 && text.contains(which), "{port}: {text}");
        let (_, json) = code_and_text(&["verify", "--model", &s(&golden(case)), "--golden", &s(&golden(case).join(format!("{port}.safetensors"))), "--isolate", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["shared_first_mismatch"].as_str().is_some_and(|l| l.starts_with(&which[..20])), "{json}");
    }
    // A difference in one layer alone (the reference's layer 3 MLP output, scaled) gets no line.
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("flat");
    let reference = dir.join("reference.safetensors");
    let one = edit_dump(&reference, &tmp.path().join("one.safetensors"), |t: &mut Vec<Named>| {
        let (_, v, _) = t.iter_mut().find(|(n, _, _)| n == "layers.3.mlp.out").unwrap();
        let Values::F32(x) = v else { panic!("mlp.out is F32") };
        x.iter_mut().for_each(|e| *e *= 1.5);
    });
    let (code, text) = code_and_text(&["verify", "--model", &s(&dir), "--golden", &s(&one), "--isolate"]);
    assert!(code == 1 && !text.contains(shared), "{text}");
}

/// A port that runs in bf16 first parts from the reference where rounding explains it (the
/// indexer scores' tail of noise, a near-tie flip of a selection): `diff` reads past that to the
/// first divergence rounding does not explain: its attention with YaRN's mscale² left out, or,
/// behind the positions a near-tie flip reaches, its routing weights without the scaling. The
/// reference's own bf16 runs and the bundled bf16 port, which have no bug, get no such line.
#[test]
fn past_what_rounding_explains_a_bf16_ports_bug_is_read() {
    let yarn = golden("grouped-shared-yarn");
    let port = s(&yarn.join("port-no-mscale-bf16.safetensors"));
    let past =
        "\n  past what rounding explains, the first divergence: layers.0.attn.out (ours is this layer's attention \
                rerun on its input with the softmax scale qk_head_dim^-0.5 =";
    for tol in ["2e-2", "5e-2"] {
        let reference = s(&yarn.join("reference.safetensors"));
        let args = ["diff", &port, &reference, "--model", &s(&yarn), "--atol", tol, "--rtol", tol];
        let (code, text) = code_and_text(&args);
        assert!(code == 1 && text.contains(past) && text.contains("(YaRN's mscale² left out)"), "{tol}: {text}");
        let (_, json) = code_and_text(&[&args[..], &["--json"]].concat());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["past_rounding"]["name"], "layers.0.attn.out", "{json}");
        assert_eq!(v["past_rounding"]["rerun"]["variant"]["mscale_power"], 0, "{json}");
    }
    // A bug of every token further on (the routing weights without routed_scaling_factor): its
    // difference reaches the positions before the first near-tie, where no flip reaches.
    let port = s(&yarn.join("port-no-scaling-bf16.safetensors"));
    for tol in ["5e-2", "1e-1"] {
        let (_, text) = diff_at("grouped-shared-yarn", &port, tol);
        let past =
            "\n  past what rounding explains, the first divergence: layers.1.moe.topk_weights (ours's weights are \
                    its gate's scores without routed_scaling_factor)";
        assert!(text.contains(past), "{tol}: {text}");
    }
    // Bugs of the MoE in a bf16 port whose noise has grown past the tolerance by then: the first
    // divergence rounding does not explain (a residual stream's noise) has no reading, and past
    // it the MoE is read on ours's own inputs (its gate logits; its input and routing, rerun).
    let flat = golden("flat");
    for (port, read) in [
        (
            "port-no-shared-expert-bf16",
            "layers.2.mlp.out (ours is this layer's MoE rerun on its input (with ours's recorded experts and weights) without \
             the shared expert",
        ),
        ("port-no-bias-bf16", "layers.2.moe.topk_ids (ours chooses every token's experts by the unbiased scores"),
    ] {
        let (port, reference) = (s(&flat.join(format!("{port}.safetensors"))), s(&flat.join("reference.safetensors")));
        for (tol, unread) in [("2e-2", Some("layers.0.output")), ("5e-2", None)] {
            let args = ["diff", &port, &reference, "--model", &s(&flat), "--atol", tol, "--rtol", tol];
            let (code, text) = code_and_text(&args);
            let past = match unread {
                Some(first) => format!(
                    "\n  past what rounding explains, the first divergence: {first} (no reading: the port's own noise, \
                     grown past the tolerance, may be all it is); on ours's own inputs, the first that reads as a bug: \
                     {read}"
                ),
                None => format!("\n  past what rounding explains, the first divergence: {read}"),
            };
            assert!(code == 1 && text.contains(&past), "{port} {tol}: want {past}\n{text}");
            let (_, json) = code_and_text(&[&args[..], &["--json"]].concat());
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["past_rounding"]["unread_before"].as_str(), unread, "{json}");
            assert!(read.starts_with(v["past_rounding"]["name"].as_str().unwrap_or("-")), "{json}");
        }
    }
    // Routing that reads as another rule on ours's own gate logits is no rounding's at a loose
    // tolerance either, where its flips' margins all fall under the near-tie threshold (grouped
    // routing: no flip is tested against its own scores).
    let port = s(&yarn.join("port-no-bias-bf16.safetensors"));
    for tol in ["5e-2", "1e-1"] {
        let (_, text) = diff_at("grouped-shared-yarn", &port, tol);
        let past = "\n  past what rounding explains, the first divergence: layers.1.moe.topk_ids (ours chooses every \
                    token's experts by the unbiased scores";
        assert!(text.contains(past), "{tol}: {text}");
    }
    // A first divergence read as a bug (the f32 port's attention, at a loose tolerance) is not
    // rounding's: nothing is read past it.
    let port = s(&golden("flat").join("port-absorbed-scale.safetensors"));
    for tol in ["1e-4", "5e-2", "1e-1"] {
        let (_, text) = diff_at("flat", &port, tol);
        assert!(text.contains("rerun") && !text.contains("past what rounding explains"), "{tol}: {text}");
    }
    let mut correct: Vec<(String, String)> = ["flat", "grouped-shared-yarn", "mtp", "bf16-fused", "fp8-sharded"]
        .iter()
        .map(|c| (c.to_string(), "reference-bf16".to_string()))
        .collect();
    correct.push(("flat".into(), "bf16-port".into()));
    // (Without --model too: a shared-indexer layer reusing a near-tie flip records no scores, and
    // its flip's margin is unknown, which is no bug's.)
    for (case, dump) in correct {
        let dir = golden(&case);
        let (ours, reference) = (s(&dir.join(format!("{dump}.safetensors"))), s(&dir.join("reference.safetensors")));
        for (tol, model) in [("2e-2", true), ("5e-2", true), ("1e-1", true), ("2e-2", false), ("1e-1", false)] {
            let mut args = vec!["diff", &ours, &reference, "--atol", tol, "--rtol", tol];
            let dir = s(&dir);
            if model {
                args.extend(["--model", &dir]);
            }
            let (_, text) = code_and_text(&args);
            assert!(!text.contains("past what rounding explains"), "{case}/{dump} {tol} {model}: {text}");
        }
    }
}

/// A divergence no reading names is localised by its inputs: the controls' (transformers with
/// an error of no port's kind planted) are made whole in the attention and the MoE, whose inputs
/// are the reference's exactly; inputs that differ within the tolerance carry a share of it,
/// which is weighed; an input neither dump holds may carry it; a difference the size of bf16
/// rounding is said to be that.
#[test]
fn a_divergence_no_reading_names_is_localised_by_its_inputs() {
    let dir = golden("flat");
    let reference = dir.join("reference.safetensors");
    let line = |text: &str| text.lines().find(|l| l.starts_with("  no reading names the cause")).map(str::to_string);
    let control = s(&dir.join("control-scale-x1.2.safetensors"));
    let (_, text) = code_and_text(&["diff", &control, &s(&reference)]);
    let expected = "  no reading names the cause; its inputs layers.0.input_norm, layers.0.attn.q_latent, \
                    layers.0.attn.kv_latent, layers.0.dsa.topk are the reference's exactly: the difference is made \
                    in the attention (q_b_proj, kv_a_proj_with_mqa's rope columns, kv_b_proj, RoPE, the softmax over \
                    the kept keys, o_proj); --model DIR reruns it on ours's inputs against the bugs ports have shipped";
    assert_eq!(line(&text).as_deref(), Some(expected), "{text}");
    // With --model, which reran it and named nothing: no hint.
    let (_, text) = diff_at("flat", &control, "1e-4");
    assert!(line(&text).is_some_and(|l| l.ends_with("o_proj)")), "{text}");
    let control = s(&dir.join("control-shared-x1.95.safetensors"));
    let (_, text) = code_and_text(&["diff", &control, &s(&reference), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let between = &v["first_divergence_between"];
    assert_eq!(between["op"], "the experts (routed and shared, and their weighted sum)", "{between}");
    let inputs: Vec<&str> = between["inputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(inputs, ["layers.2.post_attn_norm", "layers.2.moe.topk_ids", "layers.2.moe.topk_weights"]);
    // A bug's reading leaves no such line.
    let (_, text) = code_and_text(&["diff", &s(&dir.join("port-no-scaling.safetensors")), &s(&reference)]);
    assert_eq!(line(&text), None, "{text}");
    // transformers with bf16 products against its f32 run, at f32's tolerance: rounding-sized.
    let (_, text) = code_and_text(&["diff", &s(&dir.join("reference-bf16.safetensors")), &s(&reference)]);
    let l = line(&text).unwrap_or_else(|| panic!("{text}"));
    assert!(
        l.contains("made in q_a_proj and q_a_layernorm; at nmse 5.3e-6 (an rms of 0.23%) it is the size of bf16"),
        "{l}"
    );
    assert!(!l.contains("--model DIR"), "{l}");

    // The reference's layer 3 with its query latent moved by 1e-6 (inside the tolerance) and its
    // attention output by 3%, and without its DSA selection.
    let tmp = tempfile::tempdir().unwrap();
    let plant = |edits: &[(&str, f32)], name: &str, drop: &str| {
        edit_dump(&reference, &tmp.path().join(name), |t: &mut Vec<Named>| {
            for (n, v, _) in t.iter_mut() {
                let (Values::F32(x), Some(&(_, by))) = (v, edits.iter().find(|(e, _)| e == n)) else { continue };
                wobble(x, by);
            }
            t.retain(|(n, _, _)| n != drop);
        })
    };
    let grown = [("layers.3.attn.q_latent", 1e-6), ("layers.3.attn.out", 3e-2)];
    let ours = plant(&grown, "grown.st", "layers.3.dsa.topk");
    let (_, text) = code_and_text(&["diff", &s(&ours), &s(&reference), "--model", &s(&dir)]);
    let l = line(&text).unwrap_or_else(|| panic!("{text}"));
    // nmse of a +-x relative change is x^2: 1e-12 in the latent, 9e-4 out.
    let (_, nmse) = l.split_once("layers.3.attn.kv_latent match (nmse at most ").expect(&l);
    let input: f64 = nmse.split(',').next().unwrap().parse().unwrap();
    assert!((5e-13..2e-12).contains(&input) && nmse.contains("against its 9.0e-4"), "{l}");
    assert!(
        l.contains("most of the difference is made in the attention")
            && l.ends_with("or comes through layers.3.dsa.topk, which the dumps do not both record"),
        "{l}"
    );
    // Inputs that carry most of it: 3e-5 in the latent, 4e-5 out (past a tolerance of 3e-5 in
    // places).
    let carried = [("layers.3.attn.q_latent", 3e-5), ("layers.3.attn.out", 4e-5)];
    let ours = plant(&carried, "carried.st", "");
    let (_, text) =
        code_and_text(&["diff", &s(&ours), &s(&reference), "--model", &s(&dir), "--atol", "1e-6", "--rtol", "3e-5"]);
    let l = line(&text).unwrap_or_else(|| panic!("{text}"));
    assert!(l.contains("match but already carry much of it (nmse up to 9.0e-10, against its 1.6e-9)"), "{l}");
    // A dense layer's MLP is computed from its post_attn_norm alone, and has no MoE rerun.
    let ours = plant(&[("layers.0.mlp.out", 3e-2)], "dense.st", "");
    let (_, text) = code_and_text(&["diff", &s(&ours), &s(&reference)]);
    let l = line(&text).unwrap_or_else(|| panic!("{text}"));
    assert!(
        l.contains(
            "its input layers.0.post_attn_norm is the reference's exactly: the difference is made in the dense MLP"
        ),
        "{l}"
    );
    assert!(!l.contains("--model DIR"), "{l}");
    // Without --model and with no layer's routing recorded, nothing says whether a layer's MLP
    // is a dense one: it is not called one.
    let unrouted = |t: &mut Vec<Named>| t.retain(|(n, _, _)| !n.contains(".moe."));
    let ours = plant(&[("layers.2.mlp.out", 3e-2)], "moe.st", "");
    let ours = edit_dump(&ours, &tmp.path().join("unrouted.st"), unrouted);
    let unrouted_ref = edit_dump(&reference, &tmp.path().join("unrouted-ref.st"), unrouted);
    let (_, text) = code_and_text(&["diff", &s(&ours), &s(&unrouted_ref)]);
    let l = line(&text).unwrap_or_else(|| panic!("{text}"));
    assert!(l.contains("the difference is made in the MLP (a dense one, or the experts: the dumps record no"), "{l}");
    // The MTP layer (golden/mtp's layer 3) starts from the head's eh_proj, not the layer before.
    let mtp = golden("mtp");
    let ours =
        edit_floats(&mtp.join("reference.safetensors"), &tmp.path().join("mtp.st"), "layers.3.input_norm", |x, _| {
            wobble(x, 0.03)
        });
    let (_, text) = code_and_text(&["diff", &s(&ours), &s(&mtp.join("reference.safetensors")), "--model", &s(&mtp)]);
    assert!(
        text.contains("its input mtp.eh_proj is the reference's exactly: the difference is made in input_layernorm"),
        "{text}"
    );
    // Without the head's mtp.* and without --model, its layer still starts from no layer before
    // it (its rows are one position short a batch row): no line names layers.2.output.
    let no_head = |t: &mut Vec<Named>| t.retain(|(n, _, _)| !n.starts_with("mtp."));
    let bare = edit_dump(&ours, &tmp.path().join("bare.st"), no_head);
    let bare_ref = edit_dump(&mtp.join("reference.safetensors"), &tmp.path().join("bare-ref.st"), no_head);
    let (_, text) = code_and_text(&["diff", &s(&bare), &s(&bare_ref)]);
    assert!(text.contains("first divergence: layers.3.input_norm") && line(&text).is_none(), "{text}");
    // Without the MTP layer's own tensors (the head's mtp.* kept) and without --model, the dumps'
    // last layer is a main one: layer 2 starts from layer 1's output, not from the head's eh_proj.
    let no_layer = |t: &mut Vec<Named>| t.retain(|(n, _, _)| !n.starts_with("layers.3."));
    let ours =
        edit_floats(&mtp.join("reference.safetensors"), &tmp.path().join("l2.st"), "layers.2.input_norm", |x, _| {
            wobble(x, 0.03)
        });
    let headless = edit_dump(&ours, &tmp.path().join("headless.st"), no_layer);
    let headless_ref = edit_dump(&mtp.join("reference.safetensors"), &tmp.path().join("headless-ref.st"), no_layer);
    let (_, text) = code_and_text(&["diff", &s(&headless), &s(&headless_ref)]);
    let made = "its input layers.1.output is the reference's exactly: the difference is made in input_layernorm";
    assert!(text.contains(made), "{text}");
    // A bug as small as bf16 rounding but in one row (+-5% in layer 2's mlp.out at token 17: NMSE
    // 8e-5) is no rounding's: the MoE rerun is offered.
    let one_row = edit_floats(&reference, &tmp.path().join("row.st"), "layers.2.mlp.out", |x, shape| {
        wobble(&mut x[17 * shape[2]..18 * shape[2]], 0.05)
    });
    let (_, text) = code_and_text(&["diff", &s(&one_row), &s(&reference)]);
    let l = line(&text).unwrap_or_else(|| panic!("{text}"));
    assert!(
        !l.contains("bf16")
            && l.ends_with("--model DIR reruns it on ours's inputs against the bugs ports have shipped"),
        "{l}"
    );
    // Outside the layers too: the embeddings from the ids, the final norm from the last main
    // layer's output, the MTP head's norm from its layer's (said by the config, or found as the
    // dumps' layer that starts from the head's eh_proj), its logits from that norm.
    let (mtp_ref, mtp_dir) = (mtp.join("reference.safetensors"), s(&mtp));
    let planted = [
        (&reference, "embeddings", "its input input_ids is the reference's exactly: the difference is made in embed_tokens"),
        (&reference, "final_norm", "its input layers.4.output is the reference's exactly: the difference is made in the final norm"),
        (&mtp_ref, "final_norm", "its input layers.2.output is the reference's exactly: the difference is made in the final norm"),
        (&mtp_ref, "mtp.final_norm", "its input layers.3.output is the reference's exactly: the difference is made in shared_head.norm"),
        (&mtp_ref, "mtp.logits", "its input mtp.final_norm is the reference's exactly: the difference is made in the MTP head's shared_head.head"),
    ];
    for (i, (source, name, made)) in planted.into_iter().enumerate() {
        let ours = edit_floats(source, &tmp.path().join(format!("out{i}.st")), name, |x, _| wobble(x, 0.03));
        for model in [true, false] {
            let mut args = vec!["diff".to_string(), s(&ours), s(source)];
            if model {
                args.extend(["--model".to_string(), if source == &mtp_ref { mtp_dir.clone() } else { s(&dir) }]);
            }
            let (_, text) = code_and_text(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(line(&text).is_some_and(|l| l.contains(made)), "{name} (model {model}): {text}");
        }
    }
    // A first divergence of infinite NMSE (a NaN planted) is "inf" in the JSON, as elsewhere.
    let nan = edit_floats(&reference, &tmp.path().join("nan.st"), "layers.0.output", |x, _| x[0] = f32::NAN);
    let (_, text) = code_and_text(&["diff", &s(&nan), &s(&reference), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["first_divergence_between"]["nmse"], "inf", "{}", v["first_divergence_between"]);
}

/// Past a first divergence nothing reads, the first attention output is rerun on ours's own
/// input: the bf16 port without YaRN's mscale², its recorded query latent moved by 5% (a
/// divergence of no port's kind, before the attention), still has its softmax scale named.
#[test]
fn an_attention_past_an_unread_divergence_is_rerun_on_ours_own_input() {
    let dir = golden("grouped-shared-yarn");
    let tmp = tempfile::tempdir().unwrap();
    let port = dir.join("port-no-mscale-bf16.safetensors");
    let ours = edit_floats(&port, &tmp.path().join("q.st"), "layers.0.attn.q_latent", |x, _| wobble(x, 0.05));
    let (code, text) = diff_at("grouped-shared-yarn", &s(&ours), "2e-2");
    assert_eq!(code, 1, "{text}");
    assert!(text.lines().nth(1).is_some_and(|l| l == "first divergence: layers.0.attn.q_latent"), "{text}");
    let own = "  on ours's own inputs, the first divergence that reads as a bug: layers.0.attn.out (ours is this layer's \
               attention rerun on its input with the softmax scale qk_head_dim^-0.5 = 0.204124 (YaRN's mscale² left out)";
    assert!(text.contains(own), "{text}");
}

/// The MTP layer's routing weights (one position short a batch row) keep their rows: weights
/// normalised otherwise read as each row a scaled copy there too (its shape was dropped, and
/// with it the rows' reading).
#[test]
fn the_mtp_layers_weights_are_read_by_row() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = golden("mtp").join("reference.safetensors");
    let ours = edit_floats(&reference, &tmp.path().join("scaled.st"), "layers.3.moe.topk_weights", |w, shape| {
        let k = shape[shape.len() - 1];
        w.chunks_mut(k).enumerate().for_each(|(row, r)| r.iter_mut().for_each(|x| *x *= 1.1 + 0.01 * (row % 5) as f32));
    });
    let (code, text) = code_and_text(&["diff", &s(&ours), &s(&reference)]);
    assert_eq!(code, 1, "{text}");
    let first = "first divergence: layers.3.moe.topk_weights (each of its";
    assert!(
        text.contains(first) && text.contains("rows is a scaled copy of the reference's, by factors 1.1000 to 1.1400"),
        "{text}"
    );
}
