//! Where a device prefill's time goes: the forward pass's sections (projections, the indexer,
//! the attention's quadratic step, the router, the expert GEMMs, ...) each timed between two
//! device synchronisations, with the matrix-product FLOPs they ran. The synchronisations cost
//! time of their own and stop the GPU from overlapping one section's launches with the last's
//! work, so a profiled prefill is slower than a timed one: the shares are what to read, not the
//! sum (`bench` prints both).

/// One section's totals over a profiled prefill.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub name: &'static str,
    /// How many times the section ran (once a layer, for most).
    pub calls: usize,
    pub seconds: f64,
    /// Matrix-product FLOPs (2 m n k each), the attention's score and value products included.
    pub flops: u64,
}

/// The sections in the order they first ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    pub sections: Vec<Section>,
}

impl Profile {
    /// Adds one run of section `name`.
    pub fn add(&mut self, name: &'static str, seconds: f64, flops: u64) {
        match self.sections.iter_mut().find(|s| s.name == name) {
            Some(s) => {
                s.calls += 1;
                s.seconds += seconds;
                s.flops += flops;
            }
            None => self.sections.push(Section { name, calls: 1, seconds, flops }),
        }
    }

    /// Seconds and FLOPs of the sections whose names start with `prefix`.
    pub fn total(&self, prefix: &str) -> (f64, u64) {
        self.sections
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .fold((0.0, 0), |(t, f), s| (t + s.seconds, f + s.flops))
    }

    /// Profiles of the same work (each the prefill once), section by section: each section's
    /// median time over them, and the first's calls and FLOPs (the same in every run). One
    /// profiled prefill is one sample of each section; the median of a few is what a rate quoted
    /// against a target (the expert GEMMs' share of peak) should rest on.
    pub fn median(runs: &[Profile]) -> Profile {
        let Some(first) = runs.first() else { return Profile::default() };
        let sections = (first.sections.iter())
            .map(|s| {
                let times: Vec<f64> = runs
                    .iter()
                    .filter_map(|p| p.sections.iter().find(|x| x.name == s.name))
                    .map(|x| x.seconds)
                    .collect();
                Section { seconds: crate::bench::median(&times), ..s.clone() }
            })
            .collect();
        Profile { sections }
    }

    /// A table: each section's time, its share of the profiled prefill, and its TFLOP/s.
    pub fn render(&self) -> String {
        let (all, _) = self.total("");
        let width = self.sections.iter().map(|s| s.name.len()).max().unwrap_or(0).max("section".len());
        let mut out =
            format!("{:width$}  calls  {:>9}  {:>6}  {:>10}  {:>8}\n", "section", "ms", "share", "GFLOP", "TFLOP/s");
        for s in &self.sections {
            let share = if all > 0.0 { 100.0 * s.seconds / all } else { 0.0 };
            let rate = match s.flops {
                0 => "".to_string(),
                f => format!("{:.1}", f as f64 / s.seconds.max(1e-12) / 1e12),
            };
            out += &format!(
                "{:width$}  {:5}  {:9.3}  {:5.1}%  {:10.1}  {:>8}\n",
                s.name,
                s.calls,
                s.seconds * 1e3,
                share,
                s.flops as f64 / 1e9,
                rate
            );
        }
        out + &format!("{:width$}         {:9.3}\n", "sum", all * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_add_up_by_name_in_first_run_order() {
        let mut p = Profile::default();
        p.add("experts: gate_up", 0.002, 4_000_000_000);
        p.add("router", 0.001, 0);
        p.add("experts: gate_up", 0.002, 4_000_000_000);
        p.add("experts: down", 0.001, 2_000_000_000);
        assert_eq!(
            p.sections.iter().map(|s| s.name).collect::<Vec<_>>(),
            ["experts: gate_up", "router", "experts: down"]
        );
        assert_eq!(p.sections[0].calls, 2);
        let (secs, flops) = p.total("experts");
        assert!((secs - 0.005).abs() < 1e-12);
        assert_eq!(flops, 10_000_000_000);
        let table = p.render();
        assert!(table.contains("experts: gate_up      2      4.000   66.7%         8.0       2.0"), "{table}");
        assert!(table.lines().last().is_some_and(|l| l.starts_with("sum") && l.ends_with("6.000")), "{table}");
    }

    /// The median profile takes each section's median time over the runs, in the first run's
    /// order, with its calls and FLOPs.
    #[test]
    fn the_median_profile_takes_each_sections_median() {
        let run = |gate_up: f64, router: f64| {
            let mut p = Profile::default();
            p.add("expert GEMMs: gate_up", gate_up, 8);
            p.add("router", router, 0);
            p
        };
        let m = Profile::median(&[run(3.0, 0.5), run(1.0, 0.7), run(2.0, 0.1)]);
        let got: Vec<_> = m.sections.iter().map(|s| (s.name, s.calls, s.seconds, s.flops)).collect();
        assert_eq!(got, [("expert GEMMs: gate_up", 1, 2.0, 8), ("router", 1, 0.5, 0)]);
        assert_eq!(Profile::median(&[]), Profile::default());
    }
}
