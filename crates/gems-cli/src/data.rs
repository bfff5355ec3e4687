//! `gems data prepare` and `gems data stats`.
//!
//! Dataset names (`scientific`, `beauty`, `qilin_toy`) resolve under a data root taken from
//! `--data-root`, else `GEMS_DATA_DIR`, else `../shared/data` (the layout of a checkout next to
//! the shared data); any other argument is a dataset directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use gems_data::load::resolve_dataset;
use gems_data::prepare::FileStats;
use gems_data::{
    BuildConfig, DataFormat, HfTokenizer, PrepareConfig, QuerySynthesis, TaskAssignment,
    TextTokenizer, UnknownItemPolicy, prepare, read_stats, write_prepared,
};

/// Dataset subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Load a dataset, build leave-one-out examples, tokenise them and write a prepared directory.
    Prepare(PrepareArgs),
    /// Summarise a prepared directory: users, items, examples, lengths, queries.
    Stats {
        /// The prepared directory.
        dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AssignmentArg {
    Both,
    Split,
}

/// Arguments of `gems data prepare`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// A dataset name (scientific, beauty, qilin_toy) or a dataset directory.
    #[arg(long)]
    dataset: String,
    /// Output directory (created if missing; files in it are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Where dataset names are looked up.
    #[arg(long, env = "GEMS_DATA_DIR", default_value = "../shared/data")]
    data_root: PathBuf,
    /// Input layout (default: implied by the name, or detected from the directory).
    #[arg(long, value_enum)]
    format: Option<DataFormat>,
    /// A Hugging Face tokenizer.json; without it only untokenised examples are written.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// End-of-sequence token of the tokenizer (default: the first that exists of
    /// `<|im_end|>`, `<|endoftext|>`, `</s>`, `<eos>`, `[SEP]`).
    #[arg(long)]
    eos_token: Option<String>,
    /// Task assignment: every target gives rec (+ search when it has a query), or one of them.
    #[arg(long, value_enum, default_value = "both")]
    assignment: AssignmentArg,
    /// With `--assignment split`: probability that an event with a synthesised query is a
    /// search example.
    #[arg(long, default_value_t = 0.5)]
    search_probability: f64,
    /// Keep the last H history items.
    #[arg(long, default_value_t = 20)]
    max_history: usize,
    /// Sampled negatives per valid and test example.
    #[arg(long, default_value_t = 99)]
    negatives: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Query synthesis for events without a query (default: categories for lc-rec, off else).
    #[arg(long, value_enum)]
    queries: Option<QuerySynthesis>,
    /// What to do with events whose item is not in the catalogue (default: error, except
    /// placeholder for the qilin_toy schema sample).
    #[arg(long, value_enum)]
    unknown_items: Option<UnknownItemPolicy>,
}

/// Runs a data subcommand.
pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Prepare(args) => run_prepare(args),
        DataCommand::Stats { dir, json } => run_stats(&dir, json),
    }
}

fn run_prepare(args: PrepareArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.search_probability) {
        bail!("--search-probability must be in [0, 1]");
    }
    let spec = resolve_dataset(&args.dataset, &args.data_root, args.format)?;
    let mut config = PrepareConfig::from_spec(&spec);
    if let Some(q) = args.queries {
        config.query_synthesis = q;
    }
    if let Some(u) = args.unknown_items {
        config.load.unknown_items = u;
    }
    config.build = BuildConfig {
        assignment: match args.assignment {
            AssignmentArg::Both => TaskAssignment::Both,
            AssignmentArg::Split => {
                TaskAssignment::Split { search_probability: args.search_probability }
            }
        },
        max_history: args.max_history,
        n_negatives: args.negatives,
        seed: args.seed,
    };
    let tokenizer = match &args.tokenizer {
        Some(path) => Some(
            HfTokenizer::from_file(path, args.eos_token.as_deref())
                .with_context(|| format!("loading the tokenizer {}", path.display()))?,
        ),
        None => {
            eprintln!(
                "note: no --tokenizer given: writing untokenised examples (prompt text and item \
                 indices, no input_ids); the manifest records tokenized = false"
            );
            None
        }
    };
    let started = Instant::now();
    let tok: Option<&dyn TextTokenizer> = tokenizer.as_ref().map(|t| t as &dyn TextTokenizer);
    let prepared = prepare(&spec.dir, &config, tok)
        .with_context(|| format!("preparing {} ({})", spec.name, spec.dir.display()))?;
    gems_data::check_negatives(config.build.n_negatives, prepared.dataset.catalogue.len())
        .with_context(|| format!("--negatives for {}", spec.name))?;
    let manifest =
        write_prepared(&prepared, &spec.dir, &config, tok, args.tokenizer.as_deref(), &args.out)
            .with_context(|| format!("writing {}", args.out.display()))?;
    let n_examples: usize = manifest.counts.examples.values().flat_map(|t| t.values()).sum();
    eprintln!(
        "prepared {} ({}): {} users, {} items, {} examples in {:.2} s -> {}",
        spec.name,
        spec.format.name(),
        manifest.counts.users,
        manifest.counts.items,
        n_examples,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    let items = prepared.dataset.catalogue.items();
    let untitled = items.iter().filter(|i| !i.has_title()).count();
    if untitled > 0 {
        eprintln!(
            "note: {untitled} of {} items have no title (ID-only data): training builds their \
             rows from their categories or the mean item row, not from their ids",
            items.len()
        );
    }
    let searches: usize = manifest
        .counts
        .examples
        .values()
        .filter_map(|t| t.get(gems_data::Task::Search.name()))
        .sum();
    if searches == 0 {
        eprintln!(
            "note: no search examples (no event or item has a query): `gems train` will train \
             rec only (see --queries for synthetic ones)"
        );
    }
    Ok(())
}

fn run_stats(dir: &Path, json: bool) -> Result<()> {
    let stats = read_stats(dir).with_context(|| format!("reading {}", dir.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    let c = &stats.counts;
    println!("users                {}", c.users);
    println!("items                {}", c.items);
    println!("events               {}", c.events);
    println!("events with a query  {}", c.events_with_query);
    println!("distinct queries     {} (over events)", c.distinct_queries);
    println!("search examples      {}", stats.search_examples);
    println!("distinct queries     {} (over search examples)", stats.distinct_search_queries);
    let unit = if stats.tokenized { "tokens" } else { "words" };
    println!();
    println!(
        "{:<6} {:<7} {:>9}  {:<34}  {:<34}  {:>8}",
        "split",
        "task",
        "examples",
        "history (min/med/mean/p90/max)",
        format!("prompt {unit} (min/med/mean/p90/max)"),
        "queries"
    );
    for f in &stats.files {
        println!(
            "{:<6} {:<7} {:>9}  {:<34}  {:<34}  {:>8}",
            f.split,
            f.task,
            f.examples,
            distribution(f, |f| &f.history_length),
            distribution(f, |f| &f.prompt_length),
            f.distinct_queries
        );
    }
    Ok(())
}

fn distribution(
    f: &FileStats,
    pick: fn(&FileStats) -> &gems_data::prepare::Distribution,
) -> String {
    let d = pick(f);
    if d.count == 0 {
        return "-".into();
    }
    format!("{}/{}/{:.1}/{}/{}", d.min, d.median, d.mean, d.p90, d.max)
}
