//! The `audit` command: expert load over prompts run live or recorded dumps (`glimpse::audit`),
//! against a reference's runs (`--against`) or other prompts' (`--compare`,
//! `--compare-prompts`), printed as tables, CSV or JSON, with the heatmap and every token's
//! routes written beside them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use glimpse::error::{Context, Error, Result};
use glimpse::memory::Residency;

use crate::cli::AuditArgs;
use crate::warn;

/// `audit`: see the module's description.
pub(crate) fn audit(args: AuditArgs, max_memory: Option<u64>) -> Result<ExitCode> {
    let AuditArgs {
        model,
        prompts,
        text,
        dumps,
        against,
        compare,
        compare_prompts,
        json,
        csv,
        heatmap,
        routes,
        layers,
        mtp,
        pairs,
        device,
        stream,
        gpu,
    } = args;
    let pairs = pairs.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if let Some(p) = heatmap.as_ref().filter(|p| !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"))) {
        return Err(Error::Usage(format!("--heatmap {}: the heatmap is SVG; name a .svg file", p.display())));
    }
    // (Not clap's `requires`: it counts `--dump`, of the same group, as `--prompts`.)
    for (given, flag) in [(text, "--text"), (mtp, "--mtp"), (stream, "--stream")] {
        if given && prompts.is_none() && compare_prompts.is_none() {
            return Err(Error::Usage(format!("{flag} is for prompts run live: give --prompts FILE")));
        }
    }
    // `--csv -`: the CSV on standard output, in place of the table.
    let csv_out = csv.as_deref() == Some(Path::new("-"));
    // `--routes -`: the routes on standard output as they are decided, in place of the table.
    let routes_out = routes.as_deref().is_some_and(glimpse::audit::Routes::to_stdout);
    let stdout: Vec<&str> = [(json, "--json"), (csv_out, "--csv -"), (routes_out, "--routes -")]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect();
    if let [a, b, ..] = stdout[..] {
        return Err(Error::Usage(format!("{a} and {b} both write to standard output: give one a file")));
    }
    if let (Some(_), Some(flag)) = (pairs, stdout.first().filter(|_| !json)) {
        return Err(Error::Usage(format!("--pairs prints a table, which {flag} replaces: leave one out")));
    }
    let target = gpu.target(device, &[])?;
    // Against a reference, both keep their expert sets token by token, to count what changed;
    // against other prompts, each prompt's load, to split them at random for chance.
    let sets = !against.is_empty();
    let contrast = !compare.is_empty() || compare_prompts.is_some();
    // Without a checkpoint, both sides count the experts their dumps record (or guess
    // it from the ids of both).
    // (Each other dump opened first, so that one that cannot be names its flag.)
    for (flag, paths) in [("--against", &against), ("--compare", &compare)] {
        for path in paths {
            glimpse::dump::Dump::open(path).context(|| flag.into())?;
        }
    }
    let experts = match model {
        Some(_) => None,
        None => {
            let count = glimpse::audit::expert_count(&[&dumps[..], &against, &compare].concat())?;
            // Said before the audit, which refuses an id past that count as the audited dump's.
            if !count.guessed && glimpse::audit::router_width(&dumps)?.is_none() {
                let n = count.n;
                eprintln!(
                    "glimpse: note: the audited dumps record no router: the expert count, {n}, is the router width \
                     of the --against or --compare dumps"
                );
            }
            Some(count)
        }
    };
    let lines = if text { glimpse::audit::Lines::Text } else { glimpse::audit::Lines::Auto };
    let mut routes = routes.as_deref().map(glimpse::audit::Routes::create).transpose()?;
    let opts = glimpse::audit::CollectOptions {
        experts,
        max_memory,
        target,
        residency: if stream { Residency::Streamed } else { Residency::Whole },
        keep_sets: sets,
        per_prompt: contrast,
        routes: routes.as_mut(),
        window: layers,
        mtp,
        against: &against,
    };
    // (--compare-prompts: other prompts, run on the same model after the audited ones.)
    let (prompts, other) = (prompts.as_deref().map(|p| (p, lines)), compare_prompts.as_deref().map(|p| (p, lines)));
    let (mut audit, live_other) = glimpse::audit::collect_with_other(model.as_deref(), prompts, other, &dumps, opts)?;
    audit.pairs_listed = pairs;
    // --against (the same prompts) or --compare (others): the second side's counts.
    // A stop during the audited prompts keeps the runs done: --against's first as many.
    let done = audit.runs.len().min(against.len());
    let others = match (against.is_empty(), audit.stopped) {
        (true, _) => &compare[..],
        (false, Some(_)) => &against[..done],
        (false, None) => &against[..],
    };
    let cut = (others.len() < against.len()).then(|| {
        format!(
            "the prompts were stopped: the shift is against the first {done} of {} --against dumps, those of \
             the prompts run",
            against.len()
        )
    });
    let reference = match (others.is_empty(), live_other) {
        (_, Some(other)) => Some(other),
        (true, None) => None,
        (false, None) => {
            // Counts only (the model is not loaded again), but each dump's routing checked
            // against --model's router as the audited side's: another model's is refused.
            let experts = glimpse::audit::ExpertCount { n: audit.experts, guessed: audit.experts_guessed };
            let opts = glimpse::audit::CollectOptions {
                experts: Some(experts),
                max_memory,
                target,
                residency: Residency::Whole, // (no prompts run)
                keep_sets: sets,
                per_prompt: contrast,
                routes: None,
                // (A stopped sweep's: the layers the audited side counted.)
                window: audit.window.clone(),
                mtp: false,
                against: &[],
            };
            // (An error names the side: the dump alone reads as an audited one.)
            let side = if against.is_empty() { "--compare" } else { "--against" };
            let other = glimpse::audit::collect(model.as_deref(), None, others, opts);
            Some(other.map_err(|e| Error::Context { context: side.into(), source: Box::new(e) })?)
        }
    };
    if let Some(r) = &reference {
        let flag = match (against.is_empty(), compare_prompts.is_some()) {
            (false, _) => "--against",
            (true, false) => "--compare",
            (true, true) => "--compare-prompts",
        };
        match contrast {
            true => glimpse::audit::contrast::check(&audit, r, flag)?,
            false => audit.check_comparable(r)?,
        }
        warn(audit.other_config(r, flag));
    }
    // The same file on both sides measures nothing (a copy is told by its routing, below).
    let same = |a: &PathBuf, b: &PathBuf| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    for (flag, files) in [("--against", &against), ("--compare", &compare)] {
        if let Some(f) = files.iter().find(|f| dumps.iter().any(|d| same(d, f))) {
            warn(Some(format!("{} is both --dump and {flag}: it is measured against itself", f.display())));
        }
    }
    warn(experts.and_then(glimpse::audit::ExpertCount::warning));
    let other = reference.as_ref().map(|r| (r, if contrast { "compared" } else { "reference" }));
    if json {
        let mut v = audit.to_json();
        if let (Some(r), Some(map)) = (&reference, v.as_object_mut()) {
            if contrast {
                let c = glimpse::audit::contrast::contrast(&audit, r);
                map.insert("compare".into(), glimpse::audit::contrast::to_json(&c));
                map.insert("compare_prompts".into(), r.prompts().into());
                map.insert("compare_notes".into(), glimpse::audit::contrast::notes(&audit, r).into());
                map.insert("compare_counts".into(), r.counts_json());
                // (Prompts run live: a stop may have cut them short, as `complete` says
                // of the audited ones.)
                map.insert("compare_complete".into(), r.complete().into());
            } else {
                map.insert("shift".into(), glimpse::audit::shift_json(&audit.shift(r)));
                map.insert("reference_counts".into(), r.counts_json());
                let notes = audit.shift_notes(r).into_iter().chain(cut.clone());
                map.insert("shift_notes".into(), serde_json::json!(notes.collect::<Vec<_>>()));
            }
        }
        // A stop before the other prompts ran: no comparison, and said so.
        if let (Some(path), None, Some(map)) = (&compare_prompts, &reference, v.as_object_mut()) {
            map.insert("compare_complete".into(), false.into());
            let note = format!("--compare-prompts {}: not run, the audit was stopped", path.display());
            map.insert("compare_notes".into(), serde_json::json!([note]));
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if csv_out || routes_out {
        // The CSV alone on standard output; what the table would say of it, on stderr.
        if csv_out {
            print!("{}", audit.to_csv(other));
        }
        let by = glimpse::interrupt::signal_name();
        if let Some(stop) = audit.stopped {
            eprintln!("glimpse: {by} stopped the prompts {}", stop.words());
        }
        if let Some(layer) = audit.stopped_after_layer {
            eprintln!("glimpse: {by} stopped the layers after layer {layer}");
        }
        audit.notes().iter().for_each(|n| eprintln!("glimpse: note: {n}"));
    } else {
        print!("{}", audit.table());
        if let Some(n) = pairs {
            print!("\n{}", audit.pairs_table(n));
        }
        match &reference {
            Some(r) if contrast => {
                let c = glimpse::audit::contrast::contrast(&audit, r);
                print!("\n{}", glimpse::audit::contrast::table(&c, audit.prompts(), r.prompts()));
                for note in glimpse::audit::contrast::notes(&audit, r) {
                    println!("note: {note}");
                }
                if let Some(stop) = r.stopped {
                    let by = glimpse::interrupt::signal_name();
                    println!("({by} stopped the other prompts {}: the comparison covers those)", stop.words());
                }
            }
            Some(r) => {
                print!("\n{}", audit.shift_table(r));
                if let Some(cut) = &cut {
                    println!("({cut})");
                }
            }
            None => {}
        }
    }
    if let Some(path) = csv.filter(|_| !csv_out) {
        glimpse::output::write_atomic(&path, audit.to_csv(other).as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = heatmap {
        let title = model.as_ref().map(|m| m.display().to_string()).unwrap_or_else(|| "routing dumps".into());
        // (A stopped sweep's window: the layers counted.)
        let title = match &audit.window {
            Some(w) => format!("{title}, layers {}..{}", w.start(), w.end()),
            None => title,
        };
        glimpse::output::write_atomic(&path, glimpse::heatmap::svg(&audit, &title).as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    // Last: an audit refused on the way (--against of other prompts) leaves no file.
    if let Some(path) = routes.map(glimpse::audit::Routes::finish).transpose()?.flatten() {
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
