//! Chance levels for audit's numbers, so a reader can tell a router's doing from sampling's:
//! what uniformly random routing of the same tokens gives (MaxVio, MaxVio/run: a few hundred
//! tokens over 256 experts are far from even by chance alone), and how far apart two prompt
//! sets' loads fall when their prompts are split at random (the `--compare` distance's
//! permutation test: prose against code is a difference only where it is past that).

use super::max_vio;
use crate::rng::Rng;

/// Draws of uniform routing whose medians [`uniform`] gives, at most: MaxVio is a ratio of whole
/// counts, so few tokens' values are coarse steps, and a median of 20 draws fell on the lower
/// step about a quarter of the time; the 95th percentile wants more (of 200 draws, a 95th
/// percentile rests on its ten largest).
pub const DRAWS: usize = 1000;
/// Random splits [`split_distance`] makes of a layer's pooled prompts, at most.
pub const SPLITS: usize = 1000;
/// The most expert picks (tokens x k, over all draws) [`uniform`] makes for one layer: fewer
/// draws where the tokens are many (their chance level varies less).
const MAX_PICKS: u64 = 50_000_000;
/// The most counts [`split_distance`] adds up for one layer (splits x prompts x experts).
const MAX_ADDS: usize = 20_000_000;

/// What uniformly random routing gives: MaxVio over all the tokens (the median, and the 95th
/// percentile: a MaxVio past it is past chance), the mean of each prompt's own (MaxVio/run), and
/// the experts no token chose (the median).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Uniform {
    pub max_vio: f64,
    pub max_vio_p95: f64,
    pub max_vio_per_run: f64,
    pub dead: f64,
    /// The draws whose medians these are.
    pub draws: usize,
}

/// Uniform routing of prompts of `lengths` tokens, each token choosing `k` distinct of
/// `experts` at random: the medians over up to [`DRAWS`] draws. None without tokens or with
/// `k` past the experts.
pub fn uniform(lengths: &[u32], experts: usize, k: usize) -> Option<Uniform> {
    let tokens: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
    if tokens == 0 || k == 0 || k > experts {
        return None;
    }
    let draws = (MAX_PICKS / (tokens * k as u64)).clamp(1, DRAWS as u64) as usize;
    let mut rng = Rng(0x6A09_E667_F3BC_C908 ^ tokens ^ ((experts as u64) << 32) ^ k as u64);
    // `seen[e] == stamp`: expert e already chosen by the token being drawn.
    let (mut seen, mut stamp) = (vec![0u64; experts], 0u64);
    let (mut whole, mut per_run, mut dead) =
        (Vec::with_capacity(draws), Vec::with_capacity(draws), Vec::with_capacity(draws));
    let (mut total, mut counts) = (vec![0u64; experts], vec![0u64; experts]);
    for _ in 0..draws {
        total.fill(0);
        let mut sum = 0.0;
        for &len in lengths {
            counts.fill(0);
            for _ in 0..len {
                stamp += 1;
                let mut chosen = 0;
                while chosen < k {
                    let e = rng.below(experts);
                    if seen[e] != stamp {
                        seen[e] = stamp;
                        counts[e] += 1;
                        chosen += 1;
                    }
                }
            }
            sum += max_vio(&counts);
            total.iter_mut().zip(&counts).for_each(|(t, c)| *t += c);
        }
        whole.push(max_vio(&total));
        per_run.push(sum / lengths.len() as f64);
        dead.push(total.iter().filter(|&&c| c == 0).count() as f64);
    }
    Some(Uniform {
        max_vio: median(&mut whole),
        max_vio_p95: percentile(&mut whole, 0.95),
        max_vio_per_run: median(&mut per_run),
        dead: median(&mut dead),
        draws,
    })
}

/// The smallest value at or below which a fraction `q` of `v` lies (nearest rank).
pub(super) fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or(0.0)
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n % 2 {
        1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `--compare` distance's chance level for one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitChance {
    /// The 95th percentile of the distances between random splits of the pooled prompts into
    /// sets like the two sides (their sizes, and their lengths: [`split_distance`]).
    pub p95: f64,
    /// `(1 + n) / (1 + splits)`, n the splits at least as far apart as the two sides.
    pub p: f64,
    pub splits: usize,
}

/// Why a layer's distance has no chance level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoChance {
    /// A side has fewer than 2 prompts.
    FewPrompts,
    /// No band of similar lengths holds prompts of both sides: splits could only swap prompts
    /// of different lengths, whose sampling noise differs.
    LengthsApart,
    /// So few distinct split distances that p could not fall below 0.05: how many.
    FewSplits(u64),
}

/// A length band's longest prompt has at most this factor of its shortest's routing slots.
const LENGTH_BAND: f64 = 1.5;

/// Per-prompt counts of both sides (`[prompts, experts]` flattened, each row a prompt's expert
/// loads) pooled and split at random into sets like the two sides, up to [`SPLITS`] times: how
/// far apart the splits' load distributions fall (total variation distance of the shares)
/// against the two sides' `observed` distance. Prompts are the unit (a prompt's tokens route
/// alike: splitting tokens would understate chance), and they move only within bands of similar
/// length, each band keeping its count of each side's prompts: a set of short prompts is further
/// from any other set by its sampling noise alone, which splits that mix the lengths would not
/// have (sets of 8-token prompts against 200-token ones of the same routing read p = 0.005).
pub fn split_distance(ours: &[u32], other: &[u32], experts: usize, observed: f64) -> Result<SplitChance, NoChance> {
    let e = experts.max(1);
    let (na, nb) = (ours.len() / e, other.len() / e);
    if na < 2 || nb < 2 {
        return Err(NoChance::FewPrompts);
    }
    let pool: Vec<&[u32]> = ours.chunks_exact(e).chain(other.chunks_exact(e)).collect();
    let slots = |p: usize| pool[p].iter().map(|&c| u64::from(c)).sum::<u64>();
    let all: Vec<u64> = (0..e).map(|x| pool.iter().map(|row| u64::from(row[x])).sum()).collect();
    // Bands: prompts in order of length, cut at the widest gaps until no band's longest is past
    // LENGTH_BAND times its shortest (so near lengths stay together); each band with how many
    // of ours it holds.
    let mut order: Vec<usize> = (0..pool.len()).collect();
    order.sort_by_key(|&p| slots(p));
    let lengths: Vec<f64> = order.iter().map(|&p| slots(p).max(1) as f64).collect();
    let mut bands: Vec<(Vec<usize>, usize)> = bands_of(&lengths)
        .into_iter()
        .map(|r| {
            let band = order[r].to_vec();
            let ours_in = band.iter().filter(|&&p| p < na).count();
            (band, ours_in)
        })
        .collect();
    // Distinct split distances: the product of each band's ways to place its prompts of ours,
    // halved where every band holds as many of each side (a split and its mirror are as far
    // apart).
    let mirrored = bands.iter().all(|(band, k)| 2 * k == band.len());
    let distinct =
        bands.iter().fold(1f64, |n, (band, k)| n * choose(band.len(), *k)) / if mirrored { 2.0 } else { 1.0 };
    if distinct <= 1.0 {
        return Err(NoChance::LengthsApart);
    }
    // (With 20, the least p is 1/20: not below 0.05.)
    if distinct <= 20.0 {
        return Err(NoChance::FewSplits(distinct as u64));
    }
    let splits = (MAX_ADDS / (na * e)).clamp(20, SPLITS);
    let mut rng = Rng(0xBB67_AE85_84CA_A73B ^ ((na as u64) << 32) ^ nb as u64);
    let mut part = vec![0u64; e];
    let mut distances = Vec::with_capacity(splits);
    for _ in 0..splits {
        part.fill(0);
        for (band, k) in bands.iter_mut() {
            // A uniformly random `k`-subset of the band: a partial Fisher-Yates shuffle.
            for i in 0..*k {
                let j = i + rng.below(band.len() - i);
                band.swap(i, j);
            }
            for &p in &band[..*k] {
                part.iter_mut().zip(pool[p]).for_each(|(s, &c)| *s += u64::from(c));
            }
        }
        distances.push(tvd(&part, &all));
    }
    let beyond = distances.iter().filter(|&&d| d >= observed - 1e-12).count();
    distances.sort_by(f64::total_cmp);
    let at = ((splits as f64 * 0.95).ceil() as usize).clamp(1, splits) - 1;
    Ok(SplitChance { p95: distances[at], p: (1 + beyond) as f64 / (1 + splits) as f64, splits })
}

/// Ranges of `lengths` (ascending) cut at their widest gaps (the largest ratio of a length to
/// the one before) until no range's last is past [`LENGTH_BAND`] times its first.
fn bands_of(lengths: &[f64]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut todo = Vec::new();
    todo.push(0..lengths.len());
    while let Some(r) = todo.pop() {
        if r.len() < 2 || lengths[r.end - 1] <= LENGTH_BAND * lengths[r.start] {
            out.push(r);
            continue;
        }
        // The cut goes before the widest gap's longer side (the first, where gaps tie).
        let cut = (r.start + 1..r.end)
            .max_by(|&a, &b| (lengths[a] / lengths[a - 1]).total_cmp(&(lengths[b] / lengths[b - 1])).then(b.cmp(&a)))
            .unwrap_or(r.end);
        todo.push(cut..r.end);
        todo.push(r.start..cut);
    }
    out
}

/// `n` choose `k`, as a float (large counts only compare with 20).
fn choose(n: usize, k: usize) -> f64 {
    (0..k.min(n - k)).fold(1.0, |c, i| c * (n - i) as f64 / (i + 1) as f64)
}

/// The total variation distance between the shares of `part` and of the rest of `all`.
fn tvd(part: &[u64], all: &[u64]) -> f64 {
    let (a, b) = (part.iter().sum::<u64>().max(1) as f64, (all.iter().sum::<u64>() - part.iter().sum::<u64>()));
    let b = b.max(1) as f64;
    part.iter().zip(all).map(|(&p, &t)| (p as f64 / a - (t - p) as f64 / b).abs()).sum::<f64>() / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform routing's MaxVio against its closed form where there is one: one token a prompt
    /// over E experts has MaxVio E/k - 1 exactly; and it falls as the tokens grow.
    #[test]
    fn uniform_routing_matches_what_can_be_computed() {
        let u = uniform(&[1; 50], 16, 2).unwrap();
        assert_eq!(u.max_vio_per_run, 16.0 / 2.0 - 1.0);
        let (short, long) = (uniform(&[64; 10], 64, 8).unwrap(), uniform(&[4096; 10], 64, 8).unwrap());
        assert!(short.max_vio_per_run > 3.0 * long.max_vio_per_run, "{short:?} {long:?}");
        assert!(long.max_vio < long.max_vio_per_run);
        // The references are numpy's (scripts/chance-references.py, part 1). 20 prompts of 64
        // tokens, 8 of 64 experts: `rng.choice(64, 8, replace=False)` gave a median MaxVio/run of
        // 0.8438 over 200 draws.
        let u = uniform(&[64; 20], 64, 8).unwrap();
        assert!((u.max_vio_per_run - 0.8438).abs() < 0.03, "{u:?}");
        // 32 tokens, 4 of E experts (128 picks). Over 16 (a mean load of 8), 100,000 draws put the
        // largest load at most 12 in 50.2% of them, 13 in 76.3%, 14 in 90.6% and 15 in 96.8%: a
        // median of the draws is 12 or 13 as they fall (MaxVio 0.5 or 0.625), the 95th percentile
        // 15 (0.875); no expert is left dead (99.8%). Over 64 (mean 2): largest at most 5 in 40.3%,
        // 6 in 81.5%, 7 in 96.0%, and at most 7 dead in 39.9%, 8 in 57.9%: medians MaxVio 2.0 and
        // 8 dead, 95th percentile 2.5.
        let u = uniform(&[32], 16, 4).unwrap();
        assert!([0.5, 0.625].contains(&u.max_vio), "{u:?}");
        assert_eq!((u.max_vio_p95, u.dead, u.draws), (0.875, 0.0, DRAWS), "{u:?}");
        let u = uniform(&[32], 64, 4).unwrap();
        assert_eq!((u.max_vio, u.max_vio_p95, u.dead), (2.0, 2.5, 8.0), "{u:?}");
        // k = E: every expert every token, perfectly even.
        assert_eq!(uniform(&[7; 3], 4, 4).unwrap().max_vio, 0.0);
        assert_eq!(uniform(&[7; 3], 4, 5), None);
    }

    /// Two sides drawn from one distribution sit within chance; two with disjoint experts are far
    /// past it.
    #[test]
    fn split_distance_tells_a_difference_from_chance() {
        let e = 8;
        let mut rng = Rng(1);
        let mut prompts = |experts: &[usize], n: usize| -> Vec<u32> {
            let mut v = vec![0u32; n * e];
            for row in v.chunks_mut(e) {
                for _ in 0..40 {
                    row[experts[rng.below(experts.len())]] += 1;
                }
            }
            v
        };
        let (a, b) = (prompts(&[0, 1, 2, 3, 4, 5, 6, 7], 10), prompts(&[0, 1, 2, 3, 4, 5, 6, 7], 12));
        let same = split_distance(&a, &b, e, tvd_of(&a, &b, e)).unwrap();
        assert!(same.p > 0.05, "{same:?}");
        let c = prompts(&[4, 5, 6, 7], 12);
        let apart = split_distance(&prompts(&[0, 1, 2, 3], 10), &c, e, 1.0).unwrap();
        assert!(apart.p < 0.01 && apart.p95 < 0.5, "{apart:?}");
        assert_eq!(split_distance(&a[..e], &b, e, 0.1), Err(NoChance::FewPrompts));
        // 2 against 2: 6 splits, 3 distances (a split and its mirror); 3 against 3 likewise 10.
        assert_eq!(split_distance(&a[..2 * e], &b[..2 * e], e, 0.1), Err(NoChance::FewSplits(3)));
        assert_eq!(split_distance(&a[..3 * e], &b[..3 * e], e, 0.1), Err(NoChance::FewSplits(10)));
    }

    /// Bands cut at the widest gaps: 15 against 16 tokens (60 and 64 slots) stay together when
    /// a 10-token prompt (40) widens the range; the greedy cut from each band's shortest parted
    /// them.
    #[test]
    fn length_bands_keep_near_lengths_together() {
        assert_eq!(bands_of(&[40.0, 60.0, 60.0, 64.0, 64.0, 64.0]), [0..1, 1..6]);
        assert_eq!(bands_of(&[8.0, 8.0, 200.0, 210.0]), [0..2, 2..4]);
        assert_eq!(bands_of(&[10.0, 14.0, 14.5, 15.0]).len(), 1);
        // A chain of gaps, none past 1.5, still cut where the range is: at the widest.
        assert_eq!(bands_of(&[1.0, 1.4, 1.96, 2.74]), [0..2, 2..4]);
    }

    /// Sets of one routing but other prompt lengths: long against short prompts alone cannot be
    /// split by chance at all (their lengths do not overlap); mostly long against mostly short
    /// sits within chance, as splits keep each band's count of each side (splits mixing the
    /// lengths read p = 0.005 for both: here, and for 2 of 5 seeds of the second).
    #[test]
    fn split_distance_keeps_the_sides_lengths() {
        let e = 16;
        let mut rng = Rng(8);
        let mut prompts = |lengths: &[u32]| -> Vec<u32> {
            let mut v = vec![0u32; lengths.len() * e];
            for (row, &n) in v.chunks_mut(e).zip(lengths) {
                for _ in 0..n {
                    row[rng.below(e)] += 1;
                }
            }
            v
        };
        let (long, short) = (prompts(&[200; 10]), prompts(&[8; 10]));
        assert_eq!(split_distance(&long, &short, e, 0.5), Err(NoChance::LengthsApart));
        let mostly_long = prompts(&[[200; 10].as_slice(), &[8; 2]].concat());
        let mostly_short = prompts(&[[200; 1].as_slice(), &[8; 11]].concat());
        let observed = tvd_of(&mostly_long, &mostly_short, e);
        let chance = split_distance(&mostly_long, &mostly_short, e, observed).unwrap();
        assert!(chance.p > 0.05, "{observed} {chance:?}");
    }

    fn tvd_of(a: &[u32], b: &[u32], e: usize) -> f64 {
        let sum = |v: &[u32]| (0..e).map(|x| v.chunks(e).map(|r| u64::from(r[x])).sum()).collect::<Vec<u64>>();
        let (sa, sb) = (sum(a), sum(b));
        let all: Vec<u64> = sa.iter().zip(&sb).map(|(x, y)| x + y).collect();
        tvd(&sa, &all)
    }
}
