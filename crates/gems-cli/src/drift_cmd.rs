//! `gems drift`: how much a run changed each tuned projection's response to general text
//! (`gems_train::drift`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use gems_train::drift::projection_drift;
use gems_train::eval::text_windows;
use gems_train::infer::load_run;
use gems_train::setup::{load_model, model_path};

use crate::device::device;
use crate::progress::reporter;
use crate::run_cmd::DeviceArgs;

/// Arguments of `gems drift`.
#[derive(Debug, Args)]
pub struct DriftArgs {
    /// A run directory (its tuned model and configuration).
    pub run: PathBuf,
    /// The general text (default: WikiText-2 test of the run's data root; the null space is
    /// built from WikiText-2 valid, so the default is held out).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens of the text (0: all).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Window length.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Write the report as JSON here (default: print a table).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `gems drift`.
pub fn run_drift(args: DriftArgs) -> Result<()> {
    let dev = device(args.device.device, args.device.device_index)?;
    let loaded = load_run(&args.run, &dev)?;
    let config = &loaded.config;
    let base_path = model_path(config)?;
    let base = load_model(&base_path, config.model.keep_layers, &dev)
        .with_context(|| format!("loading the pretrained model {}", base_path.display()))?;
    let text = args
        .text
        .clone()
        .unwrap_or_else(|| config.data.data_root.join("wikitext2_general_text").join("test.txt"));
    let windows = text_windows(&text, &loaded.setup.text, args.tokens, args.window)?;
    let progress = reporter(args.quiet);
    let report =
        projection_drift(&base.model, &loaded.setup.pretrained.model, &windows, &progress)?;
    if let Some(out) = &args.out {
        let json = serde_json::to_string_pretty(&report)?;
        gems_train::checkpoint::write_atomic(out, json.as_bytes())?;
        return Ok(());
    }
    println!("{} real tokens of {}", report.tokens, text.display());
    println!("| projection | ‖ΔW x‖ / ‖W x‖ | ‖ΔW‖ / ‖W‖ |");
    println!("|---|---:|---:|");
    for p in &report.projections {
        println!("| {} | {:.5} | {:.5} |", p.path, p.relative_change, p.relative_weight_change);
    }
    Ok(())
}
