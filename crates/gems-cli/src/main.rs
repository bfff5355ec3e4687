//! `gems`: the command-line entry point of the workspace.
//!
//! The binary is the top layer: it parses arguments, resolves paths and environment, and calls
//! the library crates; it holds no dataset or model logic of its own. Errors are `anyhow` here
//! and typed (`thiserror`) in the libraries below.

mod data;
mod model_cmd;

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Data { command } => data::run(command),
        Command::Model { command } => model_cmd::run(command),
    }
}
