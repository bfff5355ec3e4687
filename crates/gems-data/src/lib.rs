//! Datasets for GEMS: catalogues and behaviour sequences in, token-id training examples out.
//!
//! Why a crate of its own: search and recommendation data come in many layouts (LC-Rec JSON,
//! SASRec text, Qilin CSV, a generic JSONL), but the trainer needs one thing: plain `Vec<u32>`
//! prompts with a target span. This crate turns every layout into one canonical in-memory model
//! ([`Dataset`]), builds leave-one-out examples from it ([`build_examples`]), tokenises them
//! ([`tokenize_examples`]) and writes a prepared-dataset directory ([`write_prepared`]), which
//! [`read_prepared`] reads back (checksums verified) for training.
//!
//! Invariants it keeps, stated as absences:
//! - it never creates a tensor and depends on no workspace crate but `gems-rng` (the seeded
//!   generator every crate shares);
//! - it never iterates a hash map when producing output: the same inputs and seed give
//!   byte-identical files;
//! - it never panics on bad input: every loader error names the file and the line.
//!
//! ```no_run
//! use gems_data::{BuildConfig, DataFormat, LoadOptions, build_examples, load_dataset};
//! let dataset = load_dataset("../shared/data/amazon_scientific".as_ref(), DataFormat::LcRec,
//!     &LoadOptions::default())?;
//! let examples = build_examples(&dataset, &BuildConfig::default())?;
//! println!("{} examples", examples.len());
//! # Ok::<(), gems_data::Error>(())
//! ```

mod error;
pub mod examples;
mod json_scan;
pub mod load;
pub mod model;
pub mod prepare;
pub mod prompt;
pub mod text;
pub mod tokenizer;

pub use error::{Error, Result};
pub use examples::{
    BuildConfig, Example, Split, Task, TaskAssignment, build_examples, check_negatives,
};
pub use load::{
    DataFormat, DatasetSpec, LoadOptions, UnknownItemPolicy, detect_format, load_dataset,
    resolve_dataset,
};
pub use model::{BehaviourSequence, Catalogue, Dataset, Event, EventKind, Item};
pub use prepare::{
    Manifest, PrepareConfig, Prepared, PreparedDir, Stats, prepare, read_manifest, read_prepared,
    read_stats, write_prepared,
};
pub use prompt::{
    RecPrompt, TokenizedExample, prompt_segments, tokenize_examples, tokenize_prompt,
};
pub use text::{QuerySynthesis, clean_text, synthesize_queries};
pub use tokenizer::{HfTokenizer, TextTokenizer};
