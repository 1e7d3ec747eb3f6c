//! The command line's grammar: every subcommand and flag with its help text (clap), the checks a
//! flag's value gets as it is parsed, and what each command will write, checked before any work.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use glimpse::device::{Attention, Backend, Precision, Target};
use glimpse::synth::SynthDtype;

#[derive(Parser)]
#[command(
    name = "glimpse",
    version,
    about = "Run GLM-5 (glm_moe_dsa), record what happens inside, and prove it against a reference"
)]
pub(crate) struct Cli {
    /// CPU threads for the tensor kernels (default: all cores).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub(crate) threads: Option<usize>,
    /// Refuse runs estimated to need more memory than this, e.g. 16G (default: available RAM).
    #[arg(long, global = true, value_parser = glimpse::memory::parse_size, help_heading = GLOBAL)]
    pub(crate) max_memory: Option<u64>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

const GLOBAL: &str = "Global options";

/// The GPU's flags, beside `--device` on each command that has one.
/// (A heading on each flag, not `next_help_heading`, which would also head the flags after them.)
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct Gpu {
    /// With --device cuda: which GPU (CUDA device ordinal).
    #[arg(long, default_value_t = 0, help_heading = GPU)]
    pub(crate) ordinal: usize,
    /// With --device cuda|cuda-emu: the matrix products' arithmetic. f32 (SGEMM) is verified at
    /// the spec's default tolerance; bf16 (tensor cores, f32 accumulation) at atol = rtol = 2e-2.
    #[arg(long, value_enum, default_value_t = Precision::F32, help_heading = GPU)]
    pub(crate) precision: Precision,
    /// With --device cuda|cuda-emu: how attention over DSA's selection is computed.
    #[arg(long, value_enum, default_value_t = Attention::Auto, help_heading = GPU)]
    pub(crate) attention: Attention,
}

const GPU: &str = "GPU (with --device cuda|cuda-emu)";

impl Gpu {
    /// Where and how a prefill runs, refused where the backend cannot do it, or beside any of
    /// `cpu_only`'s flags given (those only the CPU model takes) where it is not the CPU. (Not
    /// clap's `conflicts_with`, which would refuse `--device cpu`, the default, written out.)
    pub(crate) fn target(self, backend: Backend, cpu_only: &[(&str, bool)]) -> glimpse::Result<Target> {
        if let Some((flag, _)) = cpu_only.iter().find(|(_, given)| *given).filter(|_| backend != Backend::Cpu) {
            let name =
                clap::ValueEnum::to_possible_value(&backend).map(|v| v.get_name().to_string()).unwrap_or_default();
            return Err(glimpse::Error::Usage(format!(
                "--device {name} cannot be used with {flag}: only the CPU model takes it"
            )));
        }
        Target { backend, ordinal: self.ordinal, precision: self.precision, attention: self.attention }.check()
    }
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Compare a run of the model with a reference dump, tensor by tensor.
    Verify {
        /// Checkpoint folder (default: the bundled default case, golden/flat).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Reference dump (default: reference.safetensors in the model folder; with --precision
        /// bf16, its reference-bf16.safetensors where it has one: transformers with bf16 products).
        #[arg(long)]
        golden: Option<PathBuf>,
        /// Absolute tolerance (default 1e-4; 2e-2 with --precision bf16).
        #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
        atol: Option<f64>,
        /// Relative tolerance (default 1e-4; 2e-2 with --precision bf16).
        #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
        rtol: Option<f64>,
        /// Per-name tolerance, `PATTERN=ATOL,RTOL` (`*` wildcard); repeatable, last match wins.
        #[arg(long = "tol", value_name = "PATTERN=ATOL,RTOL")]
        tols: Vec<String>,
        /// Flips whose margins on both sides are below this are near-ties, which rounding alone can
        /// flip (default 1e-3, or twice --atol where larger: 4e-2 with --precision bf16).
        #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
        near_tie: Option<f64>,
        /// Feed every layer the reference's own input, so errors do not spread between layers.
        #[arg(long)]
        isolate: bool,
        /// Replay the reference's expert choices (counterfactual: what error is left without routing flips).
        #[arg(long)]
        force_routing: bool,
        /// Replay the reference's DSA selections.
        #[arg(long)]
        force_selection: bool,
        /// Check only layers A..B (inclusive), started from the reference's `layers.{A-1}.output`.
        #[arg(long, value_parser = parse_range)]
        layers: Option<std::ops::RangeInclusive<usize>>,
        /// Load each layer just before it runs and release it after: memory of about one layer.
        #[arg(long)]
        stream: bool,
        /// Instead: run the tokens through the latent KV cache (absorbed MLA) and compare every
        /// hook point, position by position, with the prefill of the same tokens.
        #[arg(long, conflicts_with_all = ["isolate", "force_routing", "force_selection", "layers", "stream", "near_tie", "json"])]
        decode: bool,
        /// Print one JSON document (`glimpse-verify/1`) instead of the lines: each tensor as `diff --json` gives it.
        #[arg(long)]
        json: bool,
        /// With --decode: positions per decode call (1: token by token; more: chunked prefill).
        #[arg(long, default_value_t = 1, requires = "decode", value_parser = positive)]
        chunk: u64,
        /// Where the forward pass runs: `cpu-ops` is the GPU path's code on the host; `cuda` needs a
        /// build with `--features cuda` and a GPU, `cuda-emu` that build. Each compares the main
        /// forward and the MTP head (not with --stream), with --isolate, --force-* and --stream.
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        device: Backend,
        #[command(flatten)]
        gpu: Gpu,
    },
    /// Compare two dumps: the first hook point where they part ways, per-tensor errors, flips.
    Diff {
        /// Ours.
        a: PathBuf,
        /// The reference.
        b: PathBuf,
        /// Absolute tolerance.
        #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true, value_parser = non_negative)]
        atol: f64,
        /// Relative tolerance.
        #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true, value_parser = non_negative)]
        rtol: f64,
        /// Per-name tolerance, `PATTERN=ATOL,RTOL` (`*` wildcard); repeatable, last match wins.
        #[arg(long = "tol", value_name = "PATTERN=ATOL,RTOL")]
        tols: Vec<String>,
        /// Flips whose margins on both sides are below this are near-ties, which rounding alone can flip
        /// (default 1e-3, or twice --atol where larger; --tol overrides do not move it).
        #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
        near_tie: Option<f64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The checkpoint both dumps ran: its routers recompute routing margins from recorded
        /// gate logits (`moe.router_logits`) where a dump holds no `moe.margin`, and its config
        /// gives shared-indexer layers' flips the margins of the layer whose keys they reuse.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Expert load balance per MoE layer, over prompts (run live) or over the routing dumps recorded.
    Audit(AuditArgs),
    /// Time prefill recording nothing vs recording every hook point (medians of alternating runs).
    Bench {
        /// The checkpoint folder (config.json and safetensors weights).
        #[arg(long)]
        model: PathBuf,
        /// Prompt length.
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Timed prefills of each kind (the medians are reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// `cpu-ops` / `cuda`: time the prefill of the device forward pass on that backend instead.
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        device: Backend,
        #[command(flatten)]
        gpu: Gpu,
    },
    /// Step through the layers of a run in a terminal UI, side by side with its reference.
    /// With no arguments: the bundled default case and its transformers reference.
    Tui {
        /// Run this checkpoint live (default: the bundled case, unless --dump is given); with
        /// --dump, the checkpoint the dump ran, whose routers and config class its flips.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The reference dump to compare with (default with a model: DIR/reference.safetensors).
        #[arg(long)]
        golden: Option<PathBuf>,
        /// Show this recorded dump instead of running a model.
        #[arg(long)]
        dump: Option<PathBuf>,
        /// Token ids for the live run (default: the reference's input_ids).
        #[arg(long, conflicts_with_all = ["prompt", "dump"], allow_hyphen_values = true)]
        tokens: Option<String>,
        /// Text for the live run, encoded with the model's tokenizer.json as it stands (no special tokens added).
        #[arg(long, conflicts_with = "dump")]
        prompt: Option<String>,
        /// The live run loads each layer just before it runs and releases it after: memory of
        /// about one layer (with --device, on the device too). Not the MTP head.
        #[arg(long, conflicts_with = "dump")]
        stream: bool,
        /// Where the live run goes (`cpu-ops`: the GPU path's code on the host; `cuda`: the GPU).
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        device: Backend,
        #[command(flatten)]
        gpu: Gpu,
        /// Absolute tolerance of the comparison with the reference (diff's; default 1e-4, 2e-2 with
        /// --precision bf16, as verify's).
        #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
        atol: Option<f64>,
        /// Relative tolerance of the comparison with the reference (default as --atol's).
        #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
        rtol: Option<f64>,
        /// Per-name tolerance, `PATTERN=ATOL,RTOL` (`*` wildcard); repeatable, last match wins.
        #[arg(long = "tol", value_name = "PATTERN=ATOL,RTOL")]
        tols: Vec<String>,
        /// Flips whose margins on both sides are below this are marked near-ties (default 1e-3, or
        /// twice --atol where larger).
        #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
        near_tie: Option<f64>,
    },
    /// Describe a checkpoint: what its config means, parameters per block, dtypes, shards, MTP layer.
    Inspect {
        /// The checkpoint folder (config.json and safetensors weights).
        #[arg(long)]
        model: PathBuf,
    },
    /// Run the model on token ids or a text prompt, optionally recording hook points to a dump.
    Run(RunArgs),
    /// Greedy generation through the latent KV cache, streaming tokens as they come.
    #[command(group(clap::ArgGroup::new("prompt_input").required(true).args(["tokens", "prompt"])))]
    Generate {
        /// The checkpoint folder (config.json and safetensors weights).
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated prompt token ids (`;` separates batch rows of equal length).
        #[arg(long, allow_hyphen_values = true)]
        tokens: Option<String>,
        /// Prompt text, encoded with the checkpoint's tokenizer.json as it stands (no special
        /// tokens added: write them into the text, or give ids).
        #[arg(long)]
        prompt: Option<String>,
        /// Tokens to generate after the prompt (at most 10,000,000; past that the position count
        /// and the memory estimate would overflow, and no GLM-5 context holds it).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
        max_new_tokens: u64,
        /// Prompt positions per decode call (default: the whole prompt in one call).
        #[arg(long, value_parser = positive)]
        chunk: Option<u64>,
        /// Write every step's hook points to this dump, laid end to end like a prefill's.
        #[arg(long)]
        dump: Option<PathBuf>,
        /// Hook points to record with --dump (`*` wildcard, comma-separated). Default: everything
        /// but the S x S `dsa.scores`.
        #[arg(long, requires = "dump")]
        record: Option<String>,
        /// Draft each next token with the MTP head and report how often it equals the greedy token.
        #[arg(long)]
        mtp: bool,
        /// Generate all --max-new-tokens even after every row has produced one of config.json's
        /// `eos_token_id`s (by default generation stops there).
        #[arg(long)]
        ignore_eos: bool,
    },
    /// Check this machine: every bundled golden case through verify, and with --device cpu-ops or
    /// cuda through the device forward pass too (cuda: every GPU kernel against its CPU reference first).
    Selftest {
        /// Where the checks run: cpu; cpu-ops (the GPU path's code on the host); cuda (kernels on the GPU, then the golden cases); cuda-emu (the kernels run on the host).
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        device: Backend,
        #[command(flatten)]
        gpu: Gpu,
        /// With --device cuda|cuda-emu: only the kernels' and the products' checks, no golden case
        /// (quick: e.g. under compute-sanitizer).
        #[arg(long)]
        kernels_only: bool,
    },
    /// Write a random-weight checkpoint in the released layout.
    #[command(group(clap::ArgGroup::new("start").required(true).args(["config", "preset"])))]
    Synth {
        /// Start from this config.json.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start from a published configuration.
        #[arg(long, value_parser = ["glm5"])]
        preset: Option<String>,
        /// Decoder layers (default: the config's; the first `first_k_dense_replace` stay dense).
        #[arg(long)]
        layers: Option<usize>,
        /// How many of the first layers are dense, the rest MoE (`first_k_dense_replace`;
        /// default: the config's, GLM-5's 3, halved where it would leave no MoE layer).
        #[arg(long)]
        dense: Option<usize>,
        /// Routed experts (default: the config's).
        #[arg(long)]
        experts: Option<usize>,
        /// Vocabulary size (default: the config's).
        #[arg(long)]
        vocab: Option<usize>,
        /// How the projections are stored: f32, bf16, or block-FP8 (128 x 128 blocks, f32 scales).
        #[arg(long, value_enum, default_value_t = SynthDtype::Bf16)]
        dtype: SynthDtype,
        /// Weight files (more than 1 writes model-0000i-of-0000n.safetensors and an index).
        #[arg(long, default_value_t = 1)]
        shards: usize,
        /// Also write the MTP layer (model.layers.{num_hidden_layers}.*).
        #[arg(long)]
        mtp: bool,
        /// Seed of the random weights: the same seed draws the same values in every --dtype (fp8
        /// stores their block quantisation, and keeps embeddings, norms, routers and lm_head in
        /// bf16 as released FP8 checkpoints do), so twins in two precisions compare a
        /// quantisation; fp8 against bf16 isolates the FP8 projections.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

impl Command {
    /// Whether the command may run the model's forward pass (and so read
    /// `GLIMPSE_ABSORBED_FROM`): not `diff`, `inspect`, `synth`, `audit` of dumps, or the TUI
    /// showing a dump.
    pub(crate) fn runs_model(&self) -> bool {
        match self {
            Command::Diff { .. } | Command::Inspect { .. } | Command::Synth { .. } => false,
            Command::Audit(AuditArgs { prompts, compare_prompts, .. }) => {
                prompts.is_some() || compare_prompts.is_some()
            }
            Command::Tui { dump, .. } => dump.is_none(),
            _ => true,
        }
    }

    /// The files a command reads, which no output may replace: dumps, prompt files, and a
    /// checkpoint's own files (`checkpoint::own_files`: its config, tokenizer, weights).
    pub(crate) fn inputs(&self) -> Vec<(&'static str, PathBuf)> {
        let file =
            |flag: &'static str, p: &Option<PathBuf>| p.iter().map(move |p| (flag, p.clone())).collect::<Vec<_>>();
        let model = |p: &Option<PathBuf>| {
            p.iter().flat_map(|dir| glimpse::checkpoint::own_files(dir)).map(|f| ("--model", f)).collect::<Vec<_>>()
        };
        let files = |flag: &'static str, ps: &[PathBuf]| ps.iter().map(|p| (flag, p.clone())).collect::<Vec<_>>();
        match self {
            Command::Run(r) => [
                model(&Some(r.model.clone())),
                file("--tokens-from", &r.tokens_from),
                file("--from-dump", &r.from_dump),
            ]
            .concat(),
            Command::Generate { model: m, .. } => model(&Some(m.clone())),
            Command::Audit(AuditArgs { model: m, prompts, dumps, against, compare, compare_prompts, .. }) => {
                let others = [files("--against", against), files("--compare", compare)].concat();
                let others = [others, file("--compare-prompts", compare_prompts)].concat();
                [model(m), file("--prompts", prompts), files("--dump", dumps), others].concat()
            }
            _ => Vec::new(),
        }
    }

    /// The files this command will write, with the flag that names each: checked before any work.
    pub(crate) fn outputs(&self) -> Vec<(&'static str, &Path)> {
        fn named<'a>(flag: &'static str, p: &'a Option<PathBuf>) -> Option<(&'static str, &'a Path)> {
            p.as_deref().map(|p| (flag, p))
        }
        match self {
            Command::Run(RunArgs { dump, .. }) | Command::Generate { dump, .. } => {
                named("--dump", dump).into_iter().collect()
            }
            Command::Audit(AuditArgs { csv, heatmap, routes, .. }) => {
                // (`--csv -` and `--routes -` are standard output, no file.)
                let file = |flag, p| named(flag, p).filter(|(_, p)| p.as_os_str() != "-");
                [file("--csv", csv), named("--heatmap", heatmap), file("--routes", routes)]
                    .into_iter()
                    .flatten()
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

/// `A..B` (inclusive) or a single layer `A`.
fn parse_range(s: &str) -> std::result::Result<std::ops::RangeInclusive<usize>, String> {
    let num = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("\"{s}\" is not a layer range like 3..5"));
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b.trim_start_matches('='))?);
            if a > b {
                return Err(format!("\"{s}\": the range is empty"));
            }
            Ok(a..=b)
        }
        None => num(s).map(|a| a..=a),
    }
}

/// A tolerance or margin: a finite number, 0 or more (NaN would fail every comparison, an
/// infinity pass every one, without a word).
fn non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.is_finite() => Ok(x),
        _ => Err("must be a finite number, 0 or more".into()),
    }
}

/// The most `--threads` accepted: far past any CPU's cores, far short of an OS's thread limit.
pub(crate) const MAX_THREADS: usize = 1024;

/// `audit`'s flags.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true)))]
pub(crate) struct AuditArgs {
    /// Checkpoint folder: needed with --prompts; with --dump its router checks every dump's
    /// routing (another model's is refused), gives each expert's bias (bias-changed, corr(b,l),
    /// w/o bias) and recomputes margins the dumps do not record.
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// One prompt per line: comma-separated token ids (`;` between rows of a batch), or text (needs the
    /// model's tokenizer.json); blank lines and lines starting with `#` are skipped.
    #[arg(long, group = "source")]
    pub(crate) prompts: Option<PathBuf>,
    /// Read every --prompts line as text, even one whose comma-separated items are mostly
    /// integers (`Count: 1, 2, 3`, which is otherwise read as token ids with a slip).
    #[arg(long)]
    pub(crate) text: bool,
    /// Dumps holding `layers.*.moe.topk_ids` (repeatable).
    #[arg(long = "dump", group = "source")]
    pub(crate) dumps: Vec<PathBuf>,
    /// Reference dumps of the same model (repeatable): per layer, how much of the load moved
    /// to other experts against them, and which experts gained and lost most (a quantised
    /// port's against the original's).
    #[arg(long = "against")]
    pub(crate) against: Vec<PathBuf>,
    /// Dumps of other prompts on the same model (repeatable): per layer, the total variation
    /// distance between the two load distributions and the experts whose share grew and
    /// shrank most (code against prose; nothing compared token by token, as --against does).
    #[arg(long = "compare", conflicts_with = "against")]
    pub(crate) compare: Vec<PathBuf>,
    /// Other prompts run live on the same model, one per line as --prompts takes them (and
    /// as --text reads them), compared as --compare compares dumps.
    #[arg(long = "compare-prompts", conflicts_with_all = ["against", "compare"], requires = "model")]
    pub(crate) compare_prompts: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write per-(layer, expert) counts as CSV here, with --against's or --compare's beside them
    /// (`-`: to standard output, in place of the tables).
    #[arg(long)]
    pub(crate) csv: Option<PathBuf>,
    /// Write the layer x expert load heatmap here (SVG).
    #[arg(long)]
    pub(crate) heatmap: Option<PathBuf>,
    /// Write every token's routing here as CSV, one line per token and MoE layer:
    /// `run,row,position,token,layer,experts,weights,margin,text` (`run` the dump or prompt
    /// line in order from 0; experts and weights space-separated in the order chosen; margin
    /// the one that decided the choice, as `diff` gives it, empty where unknown; text the token
    /// as --model's tokenizer decodes it): which tokens an expert takes (`-`: to standard output
    /// as decided, in place of the tables).
    #[arg(long)]
    pub(crate) routes: Option<PathBuf>,
    /// Count only layers A..B (inclusive), e.g. `40..45`, on every side; prompts run live stop
    /// after layer B (with --mtp, whose layer the window must hold, the whole pass runs).
    #[arg(long, value_parser = parse_range)]
    pub(crate) layers: Option<std::ops::RangeInclusive<usize>>,
    /// Also print co-activation: per layer, the N expert pairs (default 3) one token chose
    /// together most surprisingly often at their loads, against chance at the layer's loads
    /// (with --json: each layer's `co_activation`).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "3", value_parser = positive)]
    pub(crate) pairs: Option<u64>,
    /// Also run the MTP head (`model.layers.{num_hidden_layers}`) over every prompt, where the
    /// prompts run, and count its layer (dumps hold it when `run --mtp --dump` wrote them).
    #[arg(long)]
    pub(crate) mtp: bool,
    /// Where the prompts run (`cpu-ops`: the GPU path's code on the host; `cuda`: the GPU).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub(crate) device: Backend,
    /// Run every prompt (and --compare-prompts') layer by layer, each layer read from the
    /// checkpoint once for all of them and released after: memory of about a layer plus each
    /// prompt's hidden state, whatever the depth (a model larger than memory, or a GPU's).
    #[arg(long, conflicts_with = "mtp")]
    pub(crate) stream: bool,
    #[command(flatten)]
    pub(crate) gpu: Gpu,
}

/// `run`'s flags.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input")))]
pub(crate) struct RunArgs {
    /// The checkpoint folder (config.json and safetensors weights).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Comma-separated token ids; `;` separates batch rows of equal length.
    #[arg(long, group = "input", allow_hyphen_values = true)]
    pub(crate) tokens: Option<String>,
    /// Text, encoded with the checkpoint's tokenizer.json as it stands (no special tokens
    /// added: write them into the text, or give ids).
    #[arg(long, group = "input")]
    pub(crate) prompt: Option<String>,
    /// The `input_ids` of a dump (e.g. a golden reference), to rerun exactly its tokens.
    #[arg(long, group = "input", value_name = "DUMP")]
    pub(crate) tokens_from: Option<PathBuf>,
    /// Write a glm5-dump/1 file here (atomically: temporary file, then rename).
    #[arg(long)]
    pub(crate) dump: Option<PathBuf>,
    /// Hook points to record, as name patterns (`*` wildcard, comma-separated), e.g.
    /// `layers.*.moe.*,logits`. Default: everything but the S x S `dsa.scores`.
    #[arg(long, requires = "dump")]
    pub(crate) record: Option<String>,
    /// Run only layers A..B (inclusive), e.g. `3..5`; past layer 0 it starts from --from-dump.
    #[arg(long, value_parser = parse_range)]
    pub(crate) layers: Option<std::ops::RangeInclusive<usize>>,
    /// Start from this dump's `layers.{A-1}.output`, with its tokens (others given are refused: the
    /// state is its tokens').
    #[arg(long, value_name = "DUMP")]
    pub(crate) from_dump: Option<PathBuf>,
    /// Load each layer just before it runs and release it after: memory of about one layer
    /// (with --device, on the device too: how a checkpoint larger than the GPU runs on it).
    #[arg(long)]
    pub(crate) stream: bool,
    /// Continue a killed run with the same --dump, tokens (or --from-dump) and model from its last
    /// completed layer (runs with --dump and no --layers checkpoint after every layer).
    #[arg(long, requires = "dump", conflicts_with = "layers")]
    pub(crate) resume: bool,
    /// Also run the MTP head over the tokens (its `mtp.*` and `layers.{N}.*` hook points go to
    /// the dump) and print its draft of the next token (from the second-to-last position, as the
    /// main model's last logits predict it).
    #[arg(long, conflicts_with_all = ["stream", "layers", "from_dump", "resume"])]
    pub(crate) mtp: bool,
    /// Where the forward pass runs (`cpu-ops`: the GPU path's code on the host; `cuda`: the GPU).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub(crate) device: Backend,
    #[command(flatten)]
    pub(crate) gpu: Gpu,
}

/// A count of 1 or more (`--chunk` of verify and generate, audit's `--pairs`).
fn positive(s: &str) -> std::result::Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be 1 or more".into()),
        Ok(n) => Ok(n),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Err(format!("\"{s}\" is too large")),
        Err(_) => Err(format!("\"{s}\" is not a whole number")),
    }
}
