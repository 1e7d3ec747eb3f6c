//! `audit --pairs`: the experts one token chooses together, counted and ranked here from a
//! transformers dump's expert ids.

use super::*;

/// `--pairs`: the expert pairs one token chose together, counted here from the transformers
/// reference's expert ids, with the expected count of independent choice at the experts' loads
/// (Hájek's joint inclusion, scaled to the pairs observed), ranked by the Poisson tail at that
/// count (summed here as `1 - P(X < n)`).
#[test]
fn audit_counts_the_experts_chosen_together() {
    use glimpse::dump::{Dump, Values};
    let reference = "golden/flat/reference.safetensors";
    let (json, _) = assert_ok(&glimpse(&["audit", "--dump", reference, "--json", "--pairs", "5"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let d = Dump::open(Path::new(reference)).unwrap();
    let tail = |n: u64, mean: f64| {
        let below: f64 = (0..n).map(|i| (-mean).exp() * mean.powi(i as i32) / (1..=i).product::<u64>() as f64).sum();
        -(1.0 - below).log10()
    };
    assert_eq!(v["layers"].as_array().unwrap().len(), 3, "golden/flat's MoE layers: {v}");
    for layer in v["layers"].as_array().unwrap() {
        let i = layer["layer"].as_u64().unwrap();
        let (Values::I64(ids), _) = d.values(&format!("layers.{i}.moe.topk_ids")).unwrap() else { panic!() };
        let (k, e) = (4usize, 16usize);
        let n = (ids.len() / k) as f64;
        let (mut loads, mut together) = (vec![0f64; e], vec![vec![0u64; e]; e]);
        for set in ids.chunks(k) {
            for (x, &a) in set.iter().enumerate() {
                loads[a as usize] += 1.0;
                for &b in &set[x + 1..] {
                    together[a.min(b) as usize][a.max(b) as usize] += 1;
                }
            }
        }
        // Hájek's joint inclusion at the shares, scaled to the pairs chosen.
        let pi: Vec<f64> = loads.iter().map(|l| l / n).collect();
        let d: f64 = pi.iter().map(|p| p * (1.0 - p)).sum();
        let joint = |a: usize, b: usize| pi[a] * pi[b] * (1.0 - (1.0 - pi[a]) * (1.0 - pi[b]) / d);
        let total: f64 = (0..e).flat_map(|a| (a + 1..e).map(move |b| (a, b))).map(|(a, b)| joint(a, b)).sum();
        let scale = n * (k * (k - 1)) as f64 / 2.0 / total;
        let mut pairs: Vec<(f64, [usize; 2], u64, f64)> = Vec::new();
        for (a, row) in together.iter().enumerate() {
            for (b, &t) in row.iter().enumerate().skip(a + 1) {
                let expected = scale * joint(a, b);
                if expected > 0.0 && t as f64 > expected {
                    pairs.push((tail(t, expected), [a, b], t, expected));
                }
            }
        }
        // (Ties, pairs of the same count over experts of the same loads, by the lower ids: the
        // two sums may differ in the last bits.)
        let key = |x: f64| (x * 1e9).round() as i64;
        pairs.sort_by(|x, y| key(y.0).cmp(&key(x.0)).then(x.1.cmp(&y.1)));
        let co = &layer["co_activation"];
        let seen = together.iter().flatten().filter(|&&t| t > 0).count();
        assert_eq!((co["pairs"].as_u64(), co["pairs_seen"].as_u64()), (Some(120), Some(seen as u64)), "layer {i}");
        let got = co["strongest"].as_array().unwrap();
        assert_eq!(got.len(), 5, "layer {i}: {co}");
        assert!(pairs.len() >= 5, "layer {i}: {} pairs worked out here", pairs.len());
        for (g, (surprise, experts, t, expected)) in got.iter().zip(&pairs) {
            assert_eq!(g["experts"], serde_json::json!(experts), "layer {i}: {co}");
            assert_eq!(g["tokens"].as_u64(), Some(*t));
            assert!((g["expected"].as_f64().unwrap() - expected).abs() < 1e-9, "layer {i}: {g}");
            assert!((g["surprise"].as_f64().unwrap() - surprise).abs() < 1e-9, "layer {i}: {g} vs {surprise}");
        }
        let chance = &co["chance"];
        assert!(chance["median"].as_f64().unwrap() < chance["p95"].as_f64().unwrap(), "{co}");
    }
    // Without --pairs the JSON has none (its chance levels take a while at GLM-5's size).
    let (json, _) = assert_ok(&glimpse(&["audit", "--dump", reference, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["layers"][0]["co_activation"].is_null(), "{}", v["layers"][0]);
    // The table: a row a layer, its strongest pair first.
    let (table, _) = assert_ok(&glimpse(&["audit", "--dump", reference, "--pairs"]));
    let (json, _) = assert_ok(&glimpse(&["audit", "--dump", reference, "--json", "--pairs"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let first = &v["layers"][0]["co_activation"]["strongest"][0];
    let pair = format!("{}+{} {}/", first["experts"][0], first["experts"][1], first["tokens"]);
    let (_, co) = table.split_once("co-activation: expert pairs one token chose together").expect(&table);
    let row = co.lines().find(|l| l.trim_start().starts_with("2 ")).expect(co);
    assert!(row.contains(&pair), "{table}");
    // Not with a CSV in the table's place, and a count of at least 1.
    common::assert_error(&glimpse(&["audit", "--dump", reference, "--pairs", "--csv", "-"]), "--pairs prints a table");
    common::assert_error(&glimpse(&["audit", "--dump", reference, "--pairs", "0"]), "must be 1 or more");
}
