//! The prepared-dataset directory: examples per split and task, the item vocabulary, a manifest.
//!
//! Layout (docs/data-format.md): `{train,valid,test}.{rec,search}.jsonl`, `items.json`,
//! `manifest.json`. Every file is written to a temporary name in the same directory and renamed,
//! so a crash never leaves a half-written file under a final name. Output is a pure function of
//! the inputs and the configuration: struct fields serialise in declaration order, maps are
//! `BTreeMap`s, and nothing iterates a hash map.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::examples::{BuildConfig, Example, Split, Task, build_examples};
use crate::load::{DataFormat, DatasetSpec, LoadOptions, load_dataset};
use crate::model::Dataset;
use crate::prompt::{RecPrompt, TokenizedExample, item_token, prompt_text, tokenize_examples};
use crate::text::{QuerySynthesis, synthesize_queries};
use crate::tokenizer::TextTokenizer;

/// Version of the prepared-directory layout.
pub const FORMAT_VERSION: u32 = 1;

/// Everything that decides a prepared dataset, saved in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareConfig {
    /// Dataset name (built-in name or directory name).
    pub dataset: String,
    /// Input layout.
    pub format: DataFormat,
    /// Loader options.
    pub load: LoadOptions,
    /// How missing queries were filled in.
    pub query_synthesis: QuerySynthesis,
    /// Example construction.
    pub build: BuildConfig,
}

impl PrepareConfig {
    /// The configuration implied by a resolved dataset, with default example construction.
    pub fn from_spec(spec: &DatasetSpec) -> Self {
        Self {
            dataset: spec.name.clone(),
            format: spec.format,
            load: spec.load,
            query_synthesis: spec.query_synthesis,
            build: BuildConfig::default(),
        }
    }
}

/// One hashed input file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// File name inside the dataset directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Hex sha256 of the contents.
    pub sha256: String,
}

/// The tokenizer an output was tokenised with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// Where it was loaded from, if from a file.
    pub path: Option<String>,
    /// Hex sha256 of that file.
    pub sha256: Option<String>,
    /// Text vocabulary size; item `i` has id `vocab_size + i`.
    pub vocab_size: u32,
    /// End-of-sequence id (last target token).
    pub eos_id: u32,
}

/// Counts of a prepared dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Users loaded.
    pub users: usize,
    /// Items in the vocabulary.
    pub items: usize,
    /// Events loaded.
    pub events: usize,
    /// Events carrying a query (observed or synthesised).
    pub events_with_query: usize,
    /// Distinct queries over all events.
    pub distinct_queries: usize,
    /// Examples per split, then task.
    pub examples: BTreeMap<String, BTreeMap<String, usize>>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version.
    pub format_version: u32,
    /// The configuration; `build.seed` seeds every random choice.
    pub config: PrepareConfig,
    /// How seeds are used.
    pub seeds: BTreeMap<String, String>,
    /// Hashed input files.
    pub inputs: Vec<InputFile>,
    /// Whether `input_ids` are present.
    pub tokenized: bool,
    /// The tokenizer, when tokenised.
    pub tokenizer: Option<TokenizerInfo>,
    /// Counts.
    pub counts: Counts,
    /// Output files with their number of lines and sha256.
    pub files: BTreeMap<String, OutputFile>,
}

/// One written file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Number of records (lines for JSONL, items for `items.json`).
    pub records: usize,
    /// Hex sha256 of the contents.
    pub sha256: String,
}

/// One line of an example file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExampleRecord {
    /// User id as in the source.
    pub user: String,
    /// Index of the user in load order.
    pub user_index: u32,
    /// Position of the target event in the user's sequence.
    pub position: u32,
    /// Split.
    pub split: Split,
    /// Task.
    pub task: Task,
    /// History item indices, oldest first.
    pub history: Vec<u32>,
    /// Query (search examples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Target item index.
    pub target: u32,
    /// Sampled negatives (valid and test).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub negatives: Vec<u32>,
    /// Prompt text with `<item_N>` tokens.
    pub prompt: String,
    /// Prompt ids, target item id, end-of-sequence (when tokenised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ids: Option<Vec<u32>>,
    /// `[start, end)` of the target in `input_ids` (when tokenised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_span: Option<[u32; 2]>,
}

/// One entry of `items.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VocabEntry {
    /// Dense index.
    pub index: u32,
    /// Id in the source data.
    pub id: String,
    /// Cleaned title.
    pub title: String,
    /// Token string, `<item_N>`.
    pub token: String,
    /// Token id (when tokenised): `vocab_size + index`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<u32>,
    /// Category path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
}

/// Everything a prepared dataset holds, in memory (what the benchmark measures).
#[derive(Debug)]
pub struct Prepared {
    /// The loaded dataset, queries filled in.
    pub dataset: Dataset,
    /// Examples in build order.
    pub examples: Vec<Example>,
    /// Their tokenisations, when a tokenizer was given.
    pub tokenized: Option<Vec<TokenizedExample>>,
}

/// Loads, synthesises queries, builds and (optionally) tokenises, without writing anything.
pub fn prepare(
    dir: &Path,
    config: &PrepareConfig,
    tokenizer: Option<&dyn TextTokenizer>,
) -> Result<Prepared> {
    let mut dataset = load_dataset(dir, config.format, &config.load)?;
    synthesize_queries(&mut dataset, config.query_synthesis);
    let examples = build_examples(&dataset, &config.build)?;
    if examples.is_empty() {
        // Loaders refuse no users and no items; this is the remaining case: users, but none
        // with the two events that make one leave-one-out example.
        let behaviour = dataset.inputs.last().cloned().unwrap_or_else(|| dir.to_path_buf());
        return Err(Error::empty(
            behaviour,
            format!(
                "no examples: all {} users have a single event (an example needs a history of \
                 at least one event before its target)",
                dataset.users.len()
            ),
        ));
    }
    // A prepared directory stores the paper's prompts (training re-tokenises for another form).
    let tokenized =
        tokenizer.map(|t| tokenize_examples(&examples, RecPrompt::Paper, t)).transpose()?;
    Ok(Prepared { dataset, examples, tokenized })
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    loop {
        let chunk = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(chunk);
        bytes += chunk.len() as u64;
        let n = chunk.len();
        reader.consume(n);
    }
    Ok((bytes, hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `contents` to `dir/name` ([`gems_io::write_atomic`]) and returns its checksum.
fn write_output(dir: &Path, name: &str, contents: &[u8]) -> Result<OutputFile> {
    gems_io::write_atomic(&dir.join(name), contents)?;
    Ok(OutputFile { records: 0, sha256: hex(&Sha256::digest(contents)) })
}

fn to_json<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|cause| Error::Serialize { what: what.into(), cause })
}

/// Writes a prepared dataset to `out` and returns its manifest.
///
/// The directory is written whole beside `out` and renamed into place
/// ([`gems_io::replace_dir`]): a crash leaves the previous dataset or the new one, never a mix,
/// and `checksums.json` lets [`read_stats`] notice later damage. An existing `out` is replaced
/// only when it is a prepared dataset itself (it holds `manifest.json`) or empty.
/// `tokenizer_file` is hashed into the manifest when given.
///
/// # Errors
/// `out` holds something else; I/O failures naming the file.
pub fn write_prepared(
    prepared: &Prepared,
    source_dir: &Path,
    config: &PrepareConfig,
    tokenizer: Option<&dyn TextTokenizer>,
    tokenizer_file: Option<&Path>,
    out: &Path,
) -> Result<Manifest> {
    if out.is_dir() && !out.join("manifest.json").is_file() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::io(
                out,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "refusing to replace a directory that is not a prepared dataset (no \
                     manifest.json); choose an empty or new directory",
                ),
            ));
        }
    }
    let mut manifest = None;
    gems_io::replace_dir(out, |dir| -> Result<()> {
        manifest = Some(write_prepared_into(
            prepared,
            source_dir,
            config,
            tokenizer,
            tokenizer_file,
            dir,
        )?);
        Ok(())
    })?;
    manifest.ok_or_else(|| Error::io(out, std::io::Error::other("nothing was written")))
}

/// Per-split example counts by task.
type ExampleCounts = BTreeMap<String, BTreeMap<String, usize>>;

/// Writes the six `{split}.{task}.jsonl` files into `out`; returns them (with their record
/// counts and checksums) and the example counts.
fn write_example_files(
    prepared: &Prepared,
    out: &Path,
) -> Result<(BTreeMap<String, OutputFile>, ExampleCounts)> {
    let dataset = &prepared.dataset;
    let mut files = BTreeMap::new();
    let mut example_counts = ExampleCounts::new();

    for split in Split::ALL {
        for task in Task::ALL {
            let mut buffer = Vec::new();
            let mut records = 0;
            for (i, example) in prepared.examples.iter().enumerate() {
                if example.split != split || example.task != task {
                    continue;
                }
                let tokens = prepared.tokenized.as_ref().and_then(|t| t.get(i));
                let record = ExampleRecord {
                    user: dataset.users[example.user as usize].user.clone(),
                    user_index: example.user,
                    position: example.position,
                    split,
                    task,
                    history: example.history.clone(),
                    query: example.query.clone(),
                    target: example.target,
                    negatives: example.negatives.clone(),
                    prompt: prompt_text(example, RecPrompt::Paper),
                    input_ids: tokens.map(|t| t.input_ids.clone()),
                    target_span: tokens.map(|t| t.target_span),
                };
                buffer.extend(to_json(&record, "an example")?);
                buffer.push(b'\n');
                records += 1;
            }
            let name = format!("{}.{}.jsonl", split.name(), task.name());
            let mut written = write_output(out, &name, &buffer)?;
            written.records = records;
            files.insert(name, written);
            example_counts
                .entry(split.name().into())
                .or_default()
                .insert(task.name().into(), records);
        }
    }
    Ok((files, example_counts))
}

/// Writes the prepared files and `manifest.json` into `out` and returns the manifest.
fn write_prepared_into(
    prepared: &Prepared,
    source_dir: &Path,
    config: &PrepareConfig,
    tokenizer: Option<&dyn TextTokenizer>,
    tokenizer_file: Option<&Path>,
    out: &Path,
) -> Result<Manifest> {
    let dataset = &prepared.dataset;
    let (mut files, example_counts) = write_example_files(prepared, out)?;
    let (name, written) = write_vocabulary(dataset, tokenizer, out)?;
    files.insert(name, written);

    let inputs = input_files(dataset, source_dir)?;
    let tokenizer_info = match tokenizer {
        Some(t) => Some(TokenizerInfo {
            path: tokenizer_file.map(|p| p.display().to_string()),
            sha256: tokenizer_file.map(sha256_file).transpose()?.map(|(_, h)| h),
            vocab_size: t.vocab_size(),
            eos_id: t.eos_id(),
        }),
        None => None,
    };
    let mut seeds = BTreeMap::new();
    seeds.insert("seed".to_string(), config.build.seed.to_string());
    seeds.insert(
        "streams".to_string(),
        "SplitMix64 per (seed, purpose, user index, position); purpose 1 = split task draw, \
         2 = negatives"
            .to_string(),
    );
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        config: config.clone(),
        seeds,
        inputs,
        tokenized: prepared.tokenized.is_some(),
        tokenizer: tokenizer_info,
        counts: dataset_counts(dataset, example_counts),
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|cause| Error::Serialize { what: "manifest.json".into(), cause })?;
    write_output(out, "manifest.json", &json)?;
    Ok(manifest)
}

/// Writes `items.json`, the item vocabulary (with token ids after the tokenizer's vocabulary
/// when there is one), into `out`; returns its name and the written file.
fn write_vocabulary(
    dataset: &Dataset,
    tokenizer: Option<&dyn TextTokenizer>,
    out: &Path,
) -> Result<(String, OutputFile)> {
    let base = tokenizer.map(|t| t.vocab_size());
    let vocab: Vec<VocabEntry> = dataset
        .catalogue
        .items()
        .iter()
        .enumerate()
        .map(|(i, item)| VocabEntry {
            index: i as u32,
            id: item.id.clone(),
            title: item.title.clone(),
            token: item_token(i as u32),
            token_id: base.map(|b| b + i as u32),
            categories: item.categories.clone(),
        })
        .collect();
    let mut written = write_output(out, "items.json", &to_json(&vocab, "items.json")?)?;
    written.records = vocab.len();
    Ok(("items.json".into(), written))
}

/// The dataset's input files, named relative to `source_dir` when under it, with their sizes
/// and checksums.
fn input_files(dataset: &Dataset, source_dir: &Path) -> Result<Vec<InputFile>> {
    let mut inputs = Vec::new();
    for path in &dataset.inputs {
        let (bytes, sha256) = sha256_file(path)?;
        let file = path.strip_prefix(source_dir).unwrap_or(path).display().to_string();
        inputs.push(InputFile { file, bytes, sha256 });
    }
    Ok(inputs)
}

/// The manifest's counts of users, items, events and queries of `dataset`, with
/// `example_counts`.
fn dataset_counts(dataset: &Dataset, example_counts: ExampleCounts) -> Counts {
    let queries: BTreeSet<&str> =
        dataset.users.iter().flat_map(|u| &u.events).filter_map(|e| e.query.as_deref()).collect();
    Counts {
        users: dataset.users.len(),
        items: dataset.catalogue.len(),
        events: dataset.n_events(),
        events_with_query: dataset
            .users
            .iter()
            .flat_map(|u| &u.events)
            .filter(|e| e.query.is_some())
            .count(),
        distinct_queries: queries.len(),
        examples: example_counts,
    }
}

/// A distribution summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Distribution {
    /// Number of values.
    pub count: usize,
    /// Smallest value.
    pub min: u64,
    /// Median (lower median for even counts).
    pub median: u64,
    /// Mean.
    pub mean: f64,
    /// 90th percentile (nearest rank).
    pub p90: u64,
    /// Largest value.
    pub max: u64,
}

impl Distribution {
    /// Summarises `values` (sorted in place).
    pub fn of(values: &mut [u64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_unstable();
        let n = values.len();
        let rank = |q: f64| values[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        Self {
            count: n,
            min: values[0],
            median: values[(n - 1) / 2],
            mean: values.iter().sum::<u64>() as f64 / n as f64,
            p90: rank(0.9),
            max: values[n - 1],
        }
    }
}

/// Statistics of one (split, task) example file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileStats {
    /// Split.
    pub split: String,
    /// Task.
    pub task: String,
    /// Number of examples.
    pub examples: usize,
    /// History lengths in items.
    pub history_length: Distribution,
    /// Prompt lengths: tokens when tokenised, otherwise whitespace-separated words.
    pub prompt_length: Distribution,
    /// Distinct queries (search files).
    pub distinct_queries: usize,
}

/// What `gems data stats` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The manifest's counts.
    pub counts: Counts,
    /// Whether prompt lengths are in tokens (else words).
    pub tokenized: bool,
    /// Per-file statistics, in split then task order.
    pub files: Vec<FileStats>,
    /// Search examples over all splits.
    pub search_examples: usize,
    /// Distinct queries over all search examples.
    pub distinct_search_queries: usize,
}

/// Reads a prepared directory and computes [`Stats`] from its files, after checking every file
/// against the directory's `checksums.json`.
///
/// # Errors
/// A file changed or missing since it was written, malformed files.
pub fn read_stats(dir: &Path) -> Result<Stats> {
    gems_io::verify_dir(dir)?;
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::malformed(&manifest_path, e.line(), format!("bad manifest: {e}")))?;
    let mut files = Vec::new();
    let mut all_queries: BTreeSet<String> = BTreeSet::new();
    let mut search_examples = 0;
    for split in Split::ALL {
        for task in Task::ALL {
            let path: PathBuf = dir.join(format!("{}.{}.jsonl", split.name(), task.name()));
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            let mut history = Vec::new();
            let mut prompt = Vec::new();
            let mut queries = BTreeSet::new();
            for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| Error::io(&path, e))?;
                let record: ExampleRecord = serde_json::from_str(&line)
                    .map_err(|e| Error::malformed(&path, index + 1, format!("bad example: {e}")))?;
                history.push(record.history.len() as u64);
                prompt.push(match &record.input_ids {
                    Some(ids) => u64::from(record.target_span.map_or(ids.len() as u32, |s| s[0])),
                    None => record.prompt.split_whitespace().count() as u64,
                });
                if let Some(q) = record.query {
                    queries.insert(q);
                }
            }
            if task == Task::Search {
                search_examples += history.len();
            }
            let distinct_queries = queries.len();
            all_queries.extend(queries);
            files.push(FileStats {
                split: split.name().into(),
                task: task.name().into(),
                examples: history.len(),
                history_length: Distribution::of(&mut history),
                prompt_length: Distribution::of(&mut prompt),
                distinct_queries,
            });
        }
    }
    Ok(Stats {
        counts: manifest.counts,
        tokenized: manifest.tokenized,
        files,
        search_examples,
        distinct_search_queries: all_queries.len(),
    })
}

/// A prepared directory read back ([`read_prepared`]): what `gems train --data` trains on.
#[derive(Debug, Clone)]
pub struct PreparedDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The item vocabulary, by index.
    pub items: Vec<VocabEntry>,
    /// User ids by user index (`manifest.counts.users` of them). A user with a single event has
    /// no example, so its id is not in the directory: its entry is empty.
    pub users: Vec<String>,
    /// The examples, in split then task order and in build order within each file: the order
    /// of [`Prepared::examples`] once grouped by split and task.
    pub examples: Vec<Example>,
    /// The stored tokenisation of each example, when the directory was tokenised.
    pub tokenized: Option<Vec<TokenizedExample>>,
    /// The file and 1-based line each example was read from (for error messages).
    pub origins: Vec<(PathBuf, usize)>,
}

/// Reads a prepared directory written by [`write_prepared`] (`gems data prepare`).
///
/// The checks, in order: `dir` is a directory; it holds `manifest.json` with this crate's
/// [`FORMAT_VERSION`]; every file matches `checksums.json` ([`gems_io::verify_dir`]); the
/// vocabulary and example files are well formed and their indices in range.
///
/// # Errors
/// The first failed check, naming the file (and the line for malformed records).
pub fn read_prepared(dir: &Path) -> Result<PreparedDir> {
    let (manifest_path, text) = manifest_text(dir)?;
    gems_io::verify_dir(dir)?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::malformed(&manifest_path, e.line(), format!("bad manifest: {e}")))?;
    let items = read_vocabulary(dir, &manifest)?;
    let bounds = ExampleBounds {
        n_items: items.len() as u32,
        n_users: manifest.counts.users,
        tokenized: manifest.tokenized,
    };
    let mut read = ExamplesRead {
        users: vec![String::new(); bounds.n_users],
        examples: Vec::new(),
        tokenized: Vec::new(),
        origins: Vec::new(),
    };
    for split in Split::ALL {
        for task in Task::ALL {
            let path = dir.join(format!("{}.{}.jsonl", split.name(), task.name()));
            read.read_file(&path, split, task, &bounds)?;
        }
    }
    let ExamplesRead { users, examples, tokenized, origins } = read;
    Ok(PreparedDir {
        dir: dir.to_path_buf(),
        tokenized: manifest.tokenized.then_some(tokenized),
        manifest,
        items,
        users,
        examples,
        origins,
    })
}

/// Reads `dir/items.json` and checks its indices (0, 1, 2, ...) and its length against the
/// manifest's item count.
fn read_vocabulary(dir: &Path, manifest: &Manifest) -> Result<Vec<VocabEntry>> {
    let items_path = dir.join("items.json");
    let items_text = std::fs::read_to_string(&items_path).map_err(|e| Error::io(&items_path, e))?;
    let items: Vec<VocabEntry> = serde_json::from_str(&items_text)
        .map_err(|e| Error::malformed(&items_path, e.line(), format!("bad vocabulary: {e}")))?;
    if let Some((i, entry)) = items.iter().enumerate().find(|(i, e)| e.index as usize != *i) {
        return Err(Error::malformed(
            &items_path,
            1,
            format!("entry {i} has index {} (indices must be 0, 1, 2, ...)", entry.index),
        ));
    }
    if items.len() != manifest.counts.items {
        return Err(Error::malformed(
            &items_path,
            1,
            format!("{} items, but manifest.json counts {}", items.len(), manifest.counts.items),
        ));
    }
    Ok(items)
}

/// What every example record of a prepared directory must agree with: the vocabulary's size,
/// the manifest's user count and whether the manifest says tokenized.
struct ExampleBounds {
    n_items: u32,
    n_users: usize,
    tokenized: bool,
}

/// The examples of a prepared directory as they are read, file by file (the fields of
/// [`PreparedDir`] of the same names).
struct ExamplesRead {
    users: Vec<String>,
    examples: Vec<Example>,
    tokenized: Vec<TokenizedExample>,
    origins: Vec<(PathBuf, usize)>,
}

impl ExamplesRead {
    /// Reads the example file of `split` and `task` at `path`, checking each record.
    fn read_file(
        &mut self,
        path: &Path,
        split: Split,
        task: Task,
        bounds: &ExampleBounds,
    ) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| Error::io(path, e))?;
            let bad = |message: String| Error::malformed(path, index + 1, message);
            let record: ExampleRecord =
                serde_json::from_str(&line).map_err(|e| bad(format!("bad example: {e}")))?;
            if record.split != split || record.task != task {
                return Err(bad(format!(
                    "a {} {} example in the {} {} file",
                    record.split.name(),
                    record.task.name(),
                    split.name(),
                    task.name()
                )));
            }
            self.add(record, bounds, path, index + 1)?;
        }
        Ok(())
    }

    /// Checks a record read from `line` of `path` (its split and task already checked) against
    /// `bounds` and the users seen so far, and adds it.
    fn add(
        &mut self,
        record: ExampleRecord,
        bounds: &ExampleBounds,
        path: &Path,
        line: usize,
    ) -> Result<()> {
        let bad = |message: String| Error::malformed(path, line, message);
        let (n_items, n_users) = (bounds.n_items, bounds.n_users);
        let user = record.user_index as usize;
        if user >= n_users {
            return Err(bad(format!(
                "user_index {user} out of range ({n_users} users in manifest.json)"
            )));
        }
        let users = &mut self.users;
        if users[user].is_empty() {
            users[user] = record.user.clone();
        } else if users[user] != record.user {
            return Err(bad(format!(
                "user_index {user} is user {:?} here but {:?} elsewhere",
                record.user, users[user]
            )));
        }
        let all_items = record.history.iter().chain(&record.negatives);
        if let Some(bad_item) = all_items.chain([&record.target]).find(|&&i| i >= n_items) {
            return Err(bad(format!(
                "item index {bad_item} out of range ({n_items} items in items.json)"
            )));
        }
        match (bounds.tokenized, record.input_ids, record.target_span) {
            (true, Some(input_ids), Some(target_span)) => {
                self.tokenized.push(TokenizedExample { input_ids, target_span });
            }
            (true, _, _) => {
                return Err(bad(
                    "no input_ids or target_span, but manifest.json says tokenized".into()
                ));
            }
            (false, _, _) => {}
        }
        self.examples.push(Example {
            user: record.user_index,
            position: record.position,
            split: record.split,
            task: record.task,
            history: record.history,
            query: record.query,
            target: record.target,
            negatives: record.negatives,
        });
        self.origins.push((path.to_path_buf(), line));
        Ok(())
    }
}

/// `dir/manifest.json` and its text, after checking that `dir` exists, holds it, and that it is
/// of this crate's [`FORMAT_VERSION`].
fn manifest_text(dir: &Path) -> Result<(PathBuf, String)> {
    if !dir.is_dir() {
        return Err(Error::Dataset {
            path: dir.to_path_buf(),
            message: "not a directory (expected one written by `gems data prepare --out`)".into(),
        });
    }
    let manifest_path = dir.join("manifest.json");
    if !manifest_path.is_file() {
        return Err(Error::Dataset {
            path: manifest_path,
            message: "missing: not a prepared dataset (write one with `gems data prepare`)".into(),
        });
    }
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    // The version first, from the raw JSON, so another layout is named as such rather than
    // reported as a parse error of its first unexpected field.
    let raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::malformed(&manifest_path, e.line(), format!("bad manifest: {e}")))?;
    match raw.get("format_version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(FORMAT_VERSION) => Ok((manifest_path, text)),
        other => {
            let found = other.map_or_else(|| "none".to_string(), |v| v.to_string());
            Err(Error::Dataset {
                path: manifest_path,
                message: format!(
                    "format_version {found}, but this gems reads version {FORMAT_VERSION}: \
                     prepare the dataset again with this version"
                ),
            })
        }
    }
}

/// The manifest of a prepared directory, checked as [`read_prepared`] checks it but without
/// reading (or verifying) the other files: for settings that must be known before training.
///
/// # Errors
/// `dir` is not a prepared directory, its manifest is missing, malformed or of another
/// [`FORMAT_VERSION`].
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let (path, text) = manifest_text(dir)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::malformed(&path, e.line(), format!("bad manifest: {e}")))
}
