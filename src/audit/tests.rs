//! `Audit`'s numbers by hand: shifts, MaxVio and its floor, per-prompt figures, the bias-changed
//! share.

use super::*;

/// Two slots of 8 moved (expert 0 lost two, experts 2 and 3 gained one each), in two tokens
/// of 4 (their sets kept, in either order); a layer only one side has is left out.
#[test]
fn shift_counts_the_slots_that_moved() {
    let (mut ours, mut reference) = (Audit::new(4), Audit::new(4));
    (ours.sets, reference.sets) = (Some(BTreeMap::new()), Some(BTreeMap::new()));
    ours.add(1, &[1, 2, 3, 1, 0, 1, 1, 0], 2, 1, None).unwrap();
    reference.add(1, &[0, 1, 0, 1, 0, 1, 0, 1], 2, 1, None).unwrap();
    ours.add(2, &[0, 1], 2, 1, None).unwrap();
    let shift = ours.shift(&reference);
    assert_eq!(shift.len(), 1);
    let l = &shift[0];
    assert_eq!((l.layer, l.slots, l.moved), (1, 8, 0.25));
    assert_eq!((l.gained.as_slice(), l.lost.as_slice()), (&[(2, 1), (3, 1)][..], &[(0, -2)][..]));
    assert_eq!(l.changed, Some(Changed { tokens: 2, of_tokens: 4, slots: 2, near_ties: 0, past_ties: 0 }));
    // With the margins that decided them: token 0 a near-tie on both sides, token 1 decided by
    // 2e-3 on the reference's (the margins of the layer's last add, its tokens in order).
    ours.add_margins(1, &[5e-4, 5e-4, 0.5, 0.5]);
    reference.add_margins(1, &[5e-4, 2e-3, 0.5, 0.5]);
    let c = ours.shift(&reference)[0].changed.unwrap();
    assert_eq!((c.near_ties, c.past_ties), (1, 1));
    // A side's margin unknown (negative: a writer's error) leaves a small one undecided.
    reference.add_margins(1, &[-1.0, 2e-3, 0.5, 0.5]);
    let c = ours.shift(&reference)[0].changed.unwrap();
    assert_eq!((c.near_ties, c.past_ties), (0, 1));
    let table = ours.shift_table(&reference);
    let row: Vec<&str> = table.lines().nth(2).unwrap().split_whitespace().collect();
    // MaxVio: ours loads [2, 4, 1, 1] (mean 2), the reference's [4, 4, 0, 0]: 1 both.
    assert_eq!(
        row,
        ["1", "8", "25.0%", "2", "50.0%", "0/1", "25.0%", "1.000", "1.000", "2:+1", "3:+1", "0:-2"],
        "{table}"
    );
    assert!(table.contains("\nnote: layer(s) 2 only in the audited runs: no shift there\n"), "{table}");
    assert!(
        table.contains("\nnote: some changed tokens are neither near-tie nor past one (layer 1: 1 of 2)"),
        "{table}"
    );
    // Without the sets, the gross change is unknown.
    ours.sets = None;
    assert_eq!(ours.shift(&reference)[0].changed, None);
    // Five experts gain one each (top-1 of 8, 5 tokens moved from expert 0): the three listed
    // cut a tie, said.
    let (mut a, mut b) = (Audit::new(8), Audit::new(8));
    a.add(1, &[1, 2, 3, 4, 5], 1, 1, None).unwrap();
    b.add(1, &[0, 0, 0, 0, 0], 1, 1, None).unwrap();
    let l = &a.shift(&b)[0];
    assert_eq!((l.gained.len(), l.tied), (3, [2, 0]));
    assert!(a.shift_table(&b).contains("1:+1 2:+1 3:+1 +2 tied"), "{}", a.shift_table(&b));
}

/// The least MaxVio a number of slots allows over the experts, by hand: 4 slots over 16
/// experts load 4 of them once (max 1, mean 1/4); 20 load 4 twice and 12 once (max 2, mean
/// 5/4); 32 can load each twice.
#[test]
fn the_least_max_vio_a_prompt_allows() {
    assert_eq!(max_vio_floor(4, 16), 3.0);
    assert!((max_vio_floor(20, 16) - 0.6).abs() < 1e-12);
    assert_eq!((max_vio_floor(32, 16), max_vio_floor(0, 16)), (0.0, 0.0));
    // Two prompts of one token (top-2 of 4 experts): each floor 1, so the mean is 1.
    let mut a = Audit::new(4);
    a.add(1, &[0, 1, 2, 3], 2, 2, None).unwrap();
    assert_eq!(a.layers[&1].stats().max_vio_per_run_floor, Some(1.0));
    assert!(a.notes().iter().any(|n| n.contains("least MaxVio (layer 1: 1.000)")), "{:?}", a.notes());
}

/// 4 experts, 3 tokens, top-2: loads [3, 2, 1, 0] by hand.
#[test]
fn balance_numbers_by_hand() {
    let mut a = Audit::new(4);
    a.add(5, &[0, 1, 0, 2, 1, 0], 2, 1, Some(&[1, 0, 0])).unwrap();
    let out_of_range = a.add(5, &[0, 4], 2, 1, None).unwrap_err().to_string();
    assert!(out_of_range.contains("expert id 4 at [0, 1], outside the experts 0-3"), "{out_of_range}");
    assert!(a.add(5, &[1, 1], 2, 1, None).unwrap_err().to_string().contains("chooses expert 1 twice"));
    assert!(a
        .add(5, &[1, 2], 2, 1, Some(&[0, 0]))
        .unwrap_err()
        .to_string()
        .contains("1 tokens and its layer's `moe.bias_changed` 2 flags"));
    let flag = a.add(5, &[1, 2], 2, 1, Some(&[5])).unwrap_err().to_string();
    assert!(flag.contains("`moe.bias_changed` 5 for token 0: a flag is 0 or 1"), "{flag}");
    assert!(a
        .add(5, &[1], 1, 1, None)
        .unwrap_err()
        .to_string()
        .contains("chooses 1 experts a token where another run of layer 5 chose 2"));
    a.set_bias(5, vec![0.3, 0.2, 0.1, 0.0]);
    let l = &a.layers[&5];
    assert_eq!(l.counts, vec![3, 2, 1, 0]);
    assert_eq!(l.tokens, 3);
    let s = l.stats();
    // mean load 1.5, max 3.
    approx::assert_abs_diff_eq!(s.max_vio, 3.0 / 1.5 - 1.0);
    approx::assert_abs_diff_eq!(s.balancedness, 0.5);
    // population std of [3,2,1,0] is sqrt(1.25).
    approx::assert_abs_diff_eq!(s.cv, 1.25f64.sqrt() / 1.5, epsilon = 1e-12);
    let p = [0.5f64, 1.0 / 3.0, 1.0 / 6.0];
    let h = -p.iter().map(|x| x * x.ln()).sum::<f64>() / 4f64.ln();
    approx::assert_abs_diff_eq!(s.entropy, h, epsilon = 1e-12);
    assert_eq!(s.dead, 1);
    approx::assert_abs_diff_eq!(s.bias_changed_share.unwrap(), 1.0 / 3.0);
    // Bias and load fall together linearly: correlation 1.
    approx::assert_abs_diff_eq!(s.bias_load_corr.unwrap(), 1.0, epsilon = 1e-6);
    // (No routing weights added: the weight columns are empty.)
    assert!(a.to_csv(None).contains("5,0,3,0.500000,,,0.3"), "{}", a.to_csv(None));
    a.set_bias(5, vec![0.3, 0.2, 0.1, -0.0]);
    assert!(a.to_csv(None).contains(",0,0\n") && !a.to_csv(None).contains("-0"), "{}", a.to_csv(None));
}

/// Two prompts each sending all their tokens to one expert, a different one: balanced over
/// both (MaxVio 0), hot in each (MaxVio 1 a prompt, the mean of the prompts' own), whether
/// they ran apart or as the rows of one batch.
#[test]
fn a_load_balanced_over_runs_can_be_hot_in_each() {
    let mut a = Audit::new(2);
    a.add(0, &[0, 0], 1, 1, None).unwrap();
    a.add(0, &[1, 1], 1, 1, None).unwrap();
    let s = a.layers[&0].stats();
    assert_eq!((s.max_vio, s.max_vio_per_run), (0.0, Some(1.0)));
    assert_eq!(a.to_json()["layers"][0]["max_vio_per_prompt"], json!([1.0, 1.0]));
    assert!(a.table().lines().nth(2).unwrap().contains("  0.000   ") && a.table().contains("1.000"));
    // The row's MaxVio, without the bias (unknown: no gate logits), by weight (unknown: no
    // weights), CV, entropy and MaxVio/run, as printed.
    let table = a.table();
    let row: Vec<&str> = table.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(row[2..8], ["0.000", "-", "-", "0.000", "1.000", "1.000"], "{table}");
    // The same two prompts as the rows of one batch: each row is a prompt.
    let mut batch = Audit::new(2);
    batch.add(0, &[0, 0, 1, 1], 1, 2, None).unwrap();
    assert_eq!(batch.layers[&0].stats(), s);
    assert!(batch.add(0, &[0, 0, 1], 1, 2, None).unwrap_err().to_string().contains("3 tokens, which do not split"));
}

#[test]
fn uniform_load_is_perfectly_balanced() {
    let mut a = Audit::new(3);
    a.add(0, &[0, 1, 2, 0, 1, 2], 1, 1, None).unwrap();
    let s = a.layers[&0].stats();
    assert_eq!((s.max_vio, s.cv, s.balancedness, s.dead), (0.0, 0.0, 1.0, 0));
    approx::assert_abs_diff_eq!(s.entropy, 1.0, epsilon = 1e-12);
    assert_eq!(s.bias_changed_share, None);
    assert_eq!(s.bias_load_corr, None);
}

/// Runs without bias flags, mixed with runs that have them, count in the loads but not in
/// the share of bias-changed tokens: 1 of the 4 tokens whose flags are known, not of 6.
#[test]
fn the_bias_changed_share_counts_only_tokens_whose_flags_are_known() {
    let mut a = Audit::new(3);
    a.add(0, &[0, 1, 2, 0], 1, 1, Some(&[0, 1, 0, 0])).unwrap();
    a.add(0, &[1, 2], 1, 1, None).unwrap();
    assert_eq!(a.layers[&0].tokens, 6);
    approx::assert_abs_diff_eq!(a.layers[&0].stats().bias_changed_share.unwrap(), 0.25);
}

/// Margins fall in the bins below 1e-4, 1e-3, 1e-2, 1e-1 and above (an edge opens the next
/// bin); NaN is unknown, and the near-tie share is known only when every token's margin is.
#[test]
fn margins_are_binned_and_the_near_tie_share_needs_them_all() {
    let mut a = Audit::new(4);
    a.add(2, &[0, 1, 0, 1, 2, 3, 0, 2], 2, 1, None).unwrap();
    a.add_margins(2, &[5e-5, 1e-3, f32::INFINITY, f32::NAN, -0.5]);
    let l = &a.layers[&2];
    assert_eq!((l.margin_bins, l.margins_known), ([1, 0, 1, 0, 1], 3));
    assert_eq!(l.stats().near_tie_share, None, "one token's margin unknown");
    a.add_margins(2, &[0.0]);
    approx::assert_abs_diff_eq!(a.layers[&2].stats().near_tie_share.unwrap(), 0.5);
}
