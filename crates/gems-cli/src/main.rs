//! `gems`: the command-line entry point of the workspace.
//!
//! The binary is the top layer: it parses arguments, resolves paths and environment, and calls
//! the library crates; it holds no dataset or model logic of its own. Errors are `anyhow` here
//! and typed (`thiserror`) in the libraries below.

mod data;
mod device;
mod drift_cmd;
mod fetch;
mod model_cmd;
mod progress;
mod run_cmd;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// GEMS: unified search and recommendation with gradient multi-subspace tuning.
#[derive(Debug, Parser)]
#[command(name = "gems", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare and inspect datasets.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Fetch, check and run pretrained models.
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
    /// Fine-tune a model for search and recommendation (gems, galore, full, lora, pcgrad).
    Train(Box<run_cmd::TrainArgs>),
    /// Evaluate a run's tuned model (full-catalogue and sampled ranking, perplexity).
    Eval(run_cmd::EvalArgs),
    /// How much a run changed each tuned projection's response to general text (‖ΔW x‖ /
    /// ‖W x‖ on the pretrained model's inputs).
    Drift(drift_cmd::DriftArgs),
    /// Top-k items for a user's next interaction, from a run's tuned model.
    Recommend(run_cmd::RankArgs),
    /// Top-k items for a user and a search query, from a run's tuned model.
    Search {
        #[command(flatten)]
        rank: run_cmd::RankArgs,
        /// The search query.
        #[arg(long)]
        query: String,
    },
    /// Markdown table across runs and SVG plots (losses, validation NDCG, gradient cosine).
    Report {
        /// Run directories (or directories holding runs).
        #[arg(required = true)]
        runs: Vec<std::path::PathBuf>,
        /// Output directory of report.md and the plots.
        #[arg(long, default_value = "runs/report")]
        out: std::path::PathBuf,
    },
    /// Export a run's tuned model (merged, Hugging Face layout) or its LoRA adapter (PEFT).
    Export {
        /// The run directory.
        run: std::path::PathBuf,
        /// Output directory.
        out: std::path::PathBuf,
        /// Export the LoRA adapter instead of the merged model.
        #[arg(long)]
        adapter: bool,
        /// With --adapter: the base model's name recorded in adapter_config.json
        /// (`base_model_name_or_path`: a Hub id, or the path OUT/base will have where the
        /// adapter is used); default: OUT/base's absolute path.
        #[arg(long, value_name = "NAME")]
        base_name: Option<String>,
    },
    /// Compare a backend with flex on one model and the same batches: losses, gradients, the
    /// optimizer's update and an evaluation (writes parity.json into --out).
    Parity(Box<run_cmd::ParityArgs>),
    /// Train and evaluate a tiny random model on a slice of Scientific on a backend.
    Selftest {
        #[command(flatten)]
        device: run_cmd::DeviceArgs,
        /// Where the shared data lives.
        #[arg(long, env = "GEMS_DATA_DIR", default_value = "../shared/data")]
        data_root: std::path::PathBuf,
        /// Training steps.
        #[arg(long, default_value_t = 6)]
        steps: u64,
    },
}

/// Errors print as their message chain (`error: what: why: cause`), never with a backtrace:
/// they are about the user's input or environment, and resolving a backtrace costs about half
/// a second and 150 MB. Bugs are panics, which keep Rust's own report (`RUST_BACKTRACE=1`).
fn main() -> std::process::ExitCode {
    // glibc's allocator told to keep freed memory (gems_host::allocator): re-executes.
    let untuned = gems_host::allocator::retain_freed_memory();
    if matches!(untuned, gems_host::allocator::Untuned::ReexecFailed(_)) {
        eprintln!("note: {untuned}");
    }
    quiet_on_closed_stdout();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = given_flags(&matches);
    match run(cli, &given) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A reader that stops reading (`gems data stats DIR | head -1`) makes the next `println!`
/// fail with a broken pipe, which Rust reports as a panic: end quietly instead, as Unix tools
/// do, with success (the output was wanted only up to there). Other panics are reported as
/// before.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info);
    }));
}

/// The ids of the arguments typed on the command line for the subcommand (not defaults or
/// environment variables), e.g. `lr` for `gems train --lr 0.1`.
fn given_flags(matches: &clap::ArgMatches) -> Vec<String> {
    let Some((_, sub)) = matches.subcommand() else { return Vec::new() };
    sub.ids()
        .filter(|id| sub.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.as_str().to_owned())
        .collect()
}

fn run(cli: Cli, given: &[String]) -> anyhow::Result<()> {
    match cli.command {
        Command::Data { command } => data::run(command),
        Command::Model { command } => model_cmd::run(command),
        Command::Train(args) => run_cmd::run_train(*args, given),
        Command::Eval(args) => run_cmd::run_eval(args),
        Command::Drift(args) => drift_cmd::run_drift(args),
        Command::Recommend(args) => run_cmd::run_rank(args, None),
        Command::Search { rank, query } => run_cmd::run_rank(rank, Some(&query)),
        Command::Report { runs, out } => run_cmd::run_report(&runs, &out),
        Command::Export { run, out, adapter, base_name } => {
            run_cmd::run_export(&run, &out, adapter, base_name.as_deref())
        }
        Command::Parity(args) => run_cmd::run_parity(*args),
        Command::Selftest { device, data_root, steps } => {
            run_cmd::run_selftest(&device, &data_root, steps)
        }
    }
}
