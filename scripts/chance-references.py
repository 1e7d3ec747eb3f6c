#!/usr/bin/env python3
"""Independent references, in numpy, for the chance levels `glimpse audit` prints, which tests
pin. Each is computed here from its definition, not from glimpse's code:

1. Uniform routing's MaxVio (`src/audit/chance.rs`, `uniform_routing_matches_what_can_be_computed`):
   each token chooses k distinct of E experts at random (`rng.choice(E, k, replace=False)`);
   MaxVio = max load / mean load - 1; the median (and 95th percentile) over the draws.
2. The co-activation chance level (`src/audit/pairs.rs`, `the_chance_level_is_numpys`): each
   token's k experts drawn one by one in proportion to weights (`rng.choice(E, k, replace=False,
   p=w / w.sum())`), the weights first corrected until each expert's share of the draws is its
   share of the loads (8 rounds of 20000 tokens, w *= (share * n + 1) / (got + 1)); each draw's
   strongest pair: the largest -log10 P(X >= count), X Poisson at the pair's expected count
   under Hajek's approximation of the joint inclusion, pi_a pi_b (1 - (1 - pi_a)(1 - pi_b) / d),
   d = sum pi (1 - pi), clamped at 0 and scaled so the pairs add up to k (k - 1) / 2 a token (a
   pair some token chose that it gives no room takes independence's pi_a pi_b, scaled alike).
3. `--compare`'s permutation test (`tests/audit/others.rs`,
   `audit_compare_measures_the_distance_against_chance`): the test's prompts (SplitMix64 ids,
   rewritten here) audited by the glimpse binary with `--routes`, each prompt's expert counts a
   layer read from that CSV; the two sets' total variation distance against 5000 random splits
   of the pooled prompts into sets of the same sizes (one band: every prompt has 64 tokens).

    scripts/chance-references.py [--glimpse target/release/glimpse]     (needs numpy; about a minute)

The draws are numpy's, not glimpse's: the printed values agree with the tests' pinned ones to
within the draws' noise, which is what the tests' tolerances allow.
"""

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nearest_rank(values, q):
    v = np.sort(np.asarray(values))
    return v[min(max(math.ceil(q * len(v)), 1), len(v)) - 1]


# 1. Uniform routing ---------------------------------------------------------------------------

def uniform(lengths, experts, k, draws, rng):
    """(median MaxVio, its 95th percentile, median MaxVio/run, median dead experts)."""
    whole, per_run, dead = [], [], []
    for _ in range(draws):
        total = np.zeros(experts)
        runs = []
        for n in lengths:
            counts = np.zeros(experts)
            for _ in range(n):
                counts[rng.choice(experts, k, replace=False)] += 1
            runs.append(counts.max() / counts.mean() - 1)
            total += counts
        whole.append(total.max() / total.mean() - 1)
        per_run.append(np.mean(runs))
        dead.append(int((total == 0).sum()))
    return np.median(whole), nearest_rank(whole, 0.95), np.median(per_run), np.median(dead)


def largest_load_cdf(tokens, experts, k, n, rng):
    """P(the largest of the experts' loads <= m) over n draws of uniform routing, by m: where a
    median or percentile of a few thousand draws falls when it sits near a step."""
    choices = np.argsort(rng.random((n, tokens, experts)), axis=2)[:, :, :k].reshape(n, -1)
    counts = np.zeros((n, experts), int)
    np.add.at(counts, (np.repeat(np.arange(n), tokens * k), choices.ravel()), 1)
    largest, dead = counts.max(1), (counts == 0).sum(1)
    return ({m: (largest <= m).mean() for m in range(largest.min(), largest.max() + 1)},
            {m: (dead <= m).mean() for m in range(dead.min(), dead.max() + 1)})


# 2. Co-activation chance level ----------------------------------------------------------------

def poisson_surprise(n, mean):
    """-log10 P(X >= n), X ~ Poisson(mean): the tail summed from its first term on."""
    log_first = -mean + n * math.log(mean) - math.lgamma(n + 1)
    term, total, i = 1.0, 1.0, n
    while term > 1e-17 * total:
        i += 1
        term *= mean / i
        total += term
    return -(log_first + math.log(total)) / math.log(10)


def expected_pairs(loads, tokens, k):
    """[E, E] expected tokens of each pair (upper triangle), and independence's."""
    pi = np.minimum(np.asarray(loads, float) / tokens, 1.0)
    d = (pi * (1 - pi)).sum()
    upper = np.triu(np.ones((len(pi), len(pi)), bool), 1)
    indep = np.outer(pi, pi)
    hajek = indep * (1 - np.outer(1 - pi, 1 - pi) / d) if d > 0 else indep
    pairs = tokens * k * (k - 1) / 2
    scaled = lambda j: pairs * np.where(upper, np.maximum(j, 0), 0) / np.where(upper, np.maximum(j, 0), 0).sum()
    return scaled(hajek), scaled(indep)


def top_surprise(sets, experts, k):
    tokens = len(sets)
    loads = np.zeros(experts)
    together = np.zeros((experts, experts))
    for s in sets:
        loads[s] += 1
        for i, a in enumerate(s):
            for b in s[i + 1:]:
                together[min(a, b), max(a, b)] += 1
    hajek, indep = expected_pairs(loads, tokens, k)
    best = 0.0
    for a, b in zip(*np.nonzero(together)):
        e = hajek[a, b] if hajek[a, b] > 0 else indep[a, b]
        if e > 0 and together[a, b] > e:
            best = max(best, poisson_surprise(int(together[a, b]), e))
    return best


def pair_chance(loads, tokens, k, draws, rng):
    loads = np.asarray(loads, float)
    share, w = loads / tokens, loads.copy()
    for _ in range(8):
        got = np.zeros(len(w))
        for _ in range(20000):
            got[rng.choice(len(w), k, replace=False, p=w / w.sum())] += 1
        w = np.where(w > 0, w * (share * 20000 + 1) / (got + 1), 0)
    tops = [
        top_surprise([rng.choice(len(w), k, replace=False, p=w / w.sum()) for _ in range(tokens)], len(w), k)
        for _ in range(draws)
    ]
    return np.median(tops), nearest_rank(tops, 0.95)


# 3. --compare's permutation test --------------------------------------------------------------

def test_prompts():
    """tests/audit/others.rs's prompts: 12 and 10 of 64 ids in 1..200, 10 in 1..20 (SplitMix64)."""
    x = 12345
    mask = (1 << 64) - 1

    def nxt(r):
        nonlocal x
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) % r + 1

    return [[[nxt(r) for _ in range(64)] for _ in range(n)] for n, r in [(12, 200), (10, 200), (10, 20)]]


def prompt_counts(glimpse, prompts, tmp, name):
    """{layer: [prompts, experts] counts} of golden/flat's routing of `prompts`, from --routes."""
    p, routes = os.path.join(tmp, name + ".txt"), os.path.join(tmp, name + ".csv")
    with open(p, "w") as f:
        f.write("\n".join(",".join(map(str, row)) for row in prompts))
    subprocess.run([glimpse, "audit", "--model", "golden/flat", "--prompts", p, "--routes", routes],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    counts = {}
    with open(routes) as f:
        for r in csv.DictReader(f):
            c = counts.setdefault(int(r["layer"]), np.zeros((len(prompts), 16)))
            for e in r["experts"].split():
                c[int(r["run"]), int(e)] += 1
    return counts


def tvd(part, rest):
    return np.abs(part / part.sum() - rest / rest.sum()).sum() / 2


def split_test(a, b, splits, rng):
    """(95th percentile of the splits' distances, p of the observed one)."""
    pool, na = np.vstack([a, b]), len(a)
    observed = tvd(a.sum(0), b.sum(0))
    distances = []
    for _ in range(splits):
        pick = np.zeros(len(pool), bool)
        pick[rng.choice(len(pool), na, replace=False)] = True
        distances.append(tvd(pool[pick].sum(0), pool[~pick].sum(0)))
    beyond = sum(d >= observed - 1e-12 for d in distances)
    return nearest_rank(distances, 0.95), (1 + beyond) / (1 + splits)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--glimpse", default=os.path.join(ROOT, "target/release/glimpse"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)

    print("1. uniform routing: median MaxVio (95th percentile), median MaxVio/run, median dead")
    for lengths, e, k, draws in [([64] * 20, 64, 8, 200), ([32], 16, 4, 5000), ([32], 64, 4, 5000)]:
        m, p95, run, dead = uniform(lengths, e, k, draws, rng)
        print(f"  {len(lengths)} prompt(s) of {lengths[0]} tokens, {k} of {e}, {draws} draws: "
              f"{m:.4f} ({p95:.4f}), per run {run:.4f}, dead {dead:g}")
    for e in [16, 64]:
        largest, dead = largest_load_cdf(32, e, 4, 100_000, rng)
        cdf = lambda c: ", ".join(f"<={m} {p:.3f}" for m, p in c.items() if 0.01 < p < 0.99)
        print(f"  32 tokens, 4 of {e}, 100000 draws: P(largest load {cdf(largest)}); P(dead {cdf(dead)})")

    print("2. co-activation chance: median (95th percentile) of the strongest pair's surprise, 2000 draws")
    skewed = [100] * 8 + [25] * 16 + [10] * 40
    heavy = [190, 180] + [30] * 8 + [18] * 53 + [36]
    for name, loads, tokens, k in [("even, 32 tokens 4 of 16", [8] * 16, 32, 4),
                                   ("skewed, 200 tokens 8 of 64", skewed, 200, 8),
                                   ("heavy, 200 tokens 8 of 64", heavy, 200, 8)]:
        m, p95 = pair_chance(loads, tokens, k, 2000, rng)
        print(f"  {name}: {m:.3f} ({p95:.3f})")

    print("3. --compare of tests/audit/others.rs's prompts on golden/flat, 5000 splits: 95th percentile, p")
    a, b, code = test_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        ca, cb, cc = (prompt_counts(args.glimpse, p, tmp, n) for p, n in [(a, "a"), (b, "b"), (code, "code")])
    for layer in sorted(ca):
        p95, p = split_test(ca[layer], cb[layer], 5000, rng)
        _, p_code = split_test(ca[layer], cc[layer], 5000, rng)
        print(f"  layer {layer}: against b {p95:.4f}, p {p:.4f}; against code p {p_code:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
