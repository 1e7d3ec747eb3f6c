//! `inspect`: what a checkpoint is, in words: its config's meaning (layer pattern, routing,
//! indexer sharing, RoPE, quantisation), parameters per block, storage dtypes, shards, and the MTP
//! layer the main forward does not use.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::checkpoint::Checkpoint;
use crate::config::{IndexerKind, MlpKind, Rope};
use crate::error::Result;
use crate::layout::block_of;

pub fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// A run-length summary of a per-layer pattern, e.g. `0-2 dense, 3-77 moe`.
fn runs<T: PartialEq + Copy>(v: &[T], name: impl Fn(T) -> &'static str) -> String {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=v.len() {
        if i == v.len() || v[i] != v[start] {
            let span = if i - 1 == start { format!("{start}") } else { format!("{start}-{}", i - 1) };
            out.push(format!("{span} {}", name(v[start])));
            start = i;
        }
    }
    out.join(", ")
}

pub fn describe(ckpt: &Checkpoint) -> Result<String> {
    let c = &ckpt.config;
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "checkpoint {}", ckpt.dir.display());
    let _ = writeln!(
        w,
        "  {} layers, hidden {}, vocab {}, {} heads (q_lora {}, kv_lora {}, nope {}, rope {}, v {})",
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        c.num_attention_heads,
        c.q_lora_rank,
        c.kv_lora_rank,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim
    );
    let _ =
        writeln!(w, "  layers: {}", runs(&c.mlp_layer_types, |k| if k == MlpKind::Dense { "dense" } else { "moe" }));
    if c.has_moe() {
        let routing = if c.n_group > 1 {
            format!("grouped: {} groups of {}, keep {}", c.n_group, c.experts_per_group(), c.topk_group)
        } else {
            "flat".into()
        };
        let _ = writeln!(
            w,
            "  moe: {} routed + {} shared experts (intermediate {}), top-{} sigmoid, {routing}, {}normalised, scaled by {}",
            c.n_routed_experts,
            c.n_shared_experts,
            c.moe_intermediate_size,
            c.num_experts_per_tok,
            if c.norm_topk_prob { "" } else { "not " },
            c.routed_scaling_factor
        );
    }
    let _ = writeln!(
        w,
        "  dsa indexer: {} heads x {}, top-{}; {}",
        c.index_n_heads,
        c.index_head_dim,
        c.index_topk,
        runs(&c.indexer_types, |k| if k == IndexerKind::Full { "full" } else { "shared" })
    );
    let rope = match &c.rope {
        Rope::Default { theta } => format!("default, theta {theta}"),
        Rope::Yarn(y) => {
            let unset = |x: Option<f64>| x.map_or("unset".to_string(), |x| x.to_string());
            format!(
                "yarn, theta {}, factor {}, original max positions {}, mscale {}, mscale_all_dim {}",
                y.theta,
                y.factor,
                y.original_max_position_embeddings,
                unset(y.mscale),
                unset(y.mscale_all_dim)
            )
        }
    };
    let _ = writeln!(w, "  rope: interleaved, {rope}; softmax scale {:.6}", c.softmax_scale());
    let _ = writeln!(
        w,
        "  rms_norm_eps {}, tie_word_embeddings {}{}, max positions {}{}",
        c.rms_norm_eps,
        c.tie_word_embeddings,
        match (c.tie_word_embeddings, ckpt.tied_head(), ckpt.embedding_is_head()) {
            (true, _, true) => " (only lm_head.weight is stored: it is the embedding too, as in transformers)",
            (true, false, _) => " (but lm_head.weight is stored: it is the head, as in transformers)",
            _ => "",
        },
        c.max_position_embeddings,
        match &c.fp8 {
            // The config's word: say so where no tensor is stored FP8.
            Some(f) if !ckpt.names().any(|n| ckpt.dtype(n) == Some(safetensors::Dtype::F8_E4M3)) => {
                format!(", block-FP8 {}x{} in the config, but no tensor is stored F8_E4M3", f.block[0], f.block[1])
            }
            Some(f) => format!(", block-FP8 {}x{}", f.block[0], f.block[1]),
            None => String::new(),
        }
    );

    if let Ok(raw) = serde_json::from_slice::<serde_json::Value>(&ckpt.config_bytes) {
        let unread = crate::config::Config::unread_keys(&raw);
        if !unread.is_empty() {
            let _ = writeln!(w, "  config keys glimpse does not read: {}", unread.join(", "));
        }
    }

    let mut blocks: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    for name in ckpt.names() {
        let n: usize = ckpt.shape(name).unwrap_or_default().iter().product();
        if !name.ends_with("_scale_inv") {
            *blocks.entry(block_of(name, c.num_hidden_layers)).or_default() += n;
            total += n;
        }
        *dtypes.entry(format!("{:?}", ckpt.dtype(name).map(|d| format!("{d:?}")).unwrap_or_default())).or_default() +=
            1;
    }
    let _ = writeln!(w, "parameters: {} in total", human(total));
    // A checkpoint that holds less of the main model than its config implies (a download in
    // progress, a shard left out) is said here: `run` would list every missing tensor.
    let mtp: std::collections::HashSet<&str> = ckpt.mtp_names().into_iter().collect();
    let held: usize = ckpt
        .names()
        .filter(|n| !n.ends_with("_scale_inv") && !mtp.contains(n))
        .map(|n| ckpt.shape(n).unwrap_or_default().iter().product::<usize>())
        .sum();
    let implied: usize =
        crate::layout::released_layout(c, false).iter().map(|t| t.shape.iter().product::<usize>()).sum();
    if held < implied {
        let _ = writeln!(
            w,
            "  incomplete: the files hold {} of the {} parameters the config implies for the main model",
            human(held),
            human(implied)
        );
    }
    if let Some(absent) = ckpt.absent_note() {
        let _ = writeln!(w, "  {absent}");
    }
    for (block, n) in &blocks {
        let _ = writeln!(w, "  {block:<18} {:>10}", human(*n));
    }
    let dt: Vec<String> = dtypes.iter().map(|(d, n)| format!("{} x{n}", d.trim_matches('"'))).collect();
    let _ = writeln!(w, "dtypes: {}", dt.join(", "));
    let _ = writeln!(w, "files: {}", ckpt.files.len());
    for f in &ckpt.files {
        let _ = writeln!(
            w,
            "  {:<40} {:>10} bytes",
            f.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            f.len_bytes()
        );
    }
    // What decoding caches per token (f32), as serving engines do (latent + rope key, + indexer key
    // in full-indexer layers), against expanded per-head keys and values (+ the same indexer keys).
    let (latent, expanded) = c.cache_values_per_token(false);
    let _ = writeln!(
        w,
        "kv cache per token: {latent} values over {} layers ({:.1} KB in f32: kv_latent + k_rope, + the index key in \
         full-indexer layers) latent, against {expanded} ({:.1} KB) expanded",
        c.num_hidden_layers,
        (latent * 4) as f64 / 1024.0,
        (expanded * 4) as f64 / 1024.0
    );
    let mtp = ckpt.mtp_names();
    if mtp.is_empty() {
        let _ =
            writeln!(w, "mtp layer: none in the checkpoint (num_nextn_predict_layers {})", c.num_nextn_predict_layers);
    } else {
        let _ = writeln!(
            w,
            "mtp layer: {} tensors under model.layers.{}.* (kept, not used by the main forward)",
            mtp.len(),
            c.num_hidden_layers
        );
    }
    Ok(s)
}

/// The tensors the checkpoint holds in another shape than its config implies (in the released
/// layout's names; a layout of other names, transformers' fused experts, is not judged here):
/// the first, and how many. Such a checkpoint never loads with this config (`run` lists them).
pub fn misshapen(ckpt: &Checkpoint) -> Option<String> {
    let layout = crate::layout::released_layout(&ckpt.config, crate::model::mtp::Mtp::present(ckpt));
    let off: Vec<String> = layout
        .iter()
        .filter_map(|t| {
            let held = ckpt.shape(&t.name)?;
            (held != t.shape).then(|| format!("`{}` is {held:?}, the config implies {:?}", t.name, t.shape))
        })
        .collect();
    let first = off.first()?;
    Some(format!(
        "{}: {} tensor(s) of another shape than config.json implies (first: {first}): not this config's checkpoint",
        ckpt.dir.display(),
        off.len()
    ))
}
