//! From a configuration to a model with item tokens and tokenised examples.
//!
//! The model is either a pretrained one (item tokens are added here) or one this crate saved
//! (its tokenizer already has `<item_0>` ... `<item_{n-1}>`, so nothing is added). Either way
//! the text vocabulary ends where `<item_0>` begins, and item `i` has token id `base + i`,
//! which is exactly how `gems-data` tokenises prompts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gems_data::{
    Example, HfTokenizer, PrepareConfig, Split, Task, TextTokenizer, prepare, resolve_dataset,
};
use gems_model::{ItemInit, ItemSpec, Pretrained, add_items};

use crate::config::{CollabSource, DataSettings, ItemWeights, RecTargets, TrainConfig};
use crate::error::{Result, TrainError};

/// The path of the model a configuration names (the fetched default when none is given).
///
/// # Errors
/// No path given and nothing fetched yet, or the path does not exist.
pub fn model_path(config: &TrainConfig) -> Result<PathBuf> {
    match &config.model.path {
        Some(p) if p.exists() => Ok(p.clone()),
        Some(p) => Err(TrainError::Config(format!(
            "model.path {} does not exist (a Hugging Face directory or a GGUF file)",
            p.display()
        ))),
        None => gems_model::fetch::cached_gguf().ok_or_else(|| {
            TrainError::Config(format!(
                "no model.path given and the default model is not fetched ({} missing): run \
                 `gems model fetch` first",
                gems_model::fetch::gguf_path().display()
            ))
        }),
    }
}

/// A text tokenizer whose vocabulary ends at `base` (item tokens after it are ignored).
#[derive(Debug)]
pub struct TextVocab {
    inner: HfTokenizer,
    base: u32,
}

impl TextTokenizer for TextVocab {
    fn encode(&self, text: &str) -> gems_data::Result<Vec<u32>> {
        self.inner.encode(text)
    }
    fn vocab_size(&self) -> u32 {
        self.base
    }
    fn eos_id(&self) -> u32 {
        self.inner.eos_id()
    }
}

/// One tokenised example, ready for batching.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// User index (load order).
    pub user: u32,
    /// Position of the target event in the user's sequence (the history is the events before
    /// it, at most `max_history`).
    pub position: u32,
    /// Prompt ids, the target item's token, end-of-sequence.
    pub ids: Vec<u32>,
    /// Where the target item token is in `ids` (the prompt is `ids[..target_pos]`).
    pub target_pos: usize,
    /// The target item index.
    pub target: u32,
    /// History item indices.
    pub history: Vec<u32>,
    /// The query (search samples).
    pub query: Option<String>,
    /// Sampled negative item indices (valid and test).
    pub negatives: Vec<u32>,
}

/// The tokenised dataset with its item vocabulary.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Dataset name.
    pub dataset: String,
    /// First item token id; text tokens are below it.
    pub base_vocab: u32,
    /// End-of-sequence id.
    pub eos_id: u32,
    /// Item titles by index.
    pub titles: Vec<String>,
    /// Item categories by index (the category path, as in the source data).
    pub categories: Vec<Vec<String>>,
    /// Item ids as in the source data.
    pub item_ids: Vec<String>,
    /// User ids as in the source data, by user index.
    pub users: Vec<String>,
    /// Each user's items in event order, every split ([`user_sequences`]): what the user is
    /// known to have done, which the rankings "without history" leave out ([`UNKNOWN_ITEM`]
    /// where no sample names the event).
    pub sequences: Vec<Vec<u32>>,
    /// Samples per split and task.
    pub samples: BTreeMap<(Split, Task), Vec<Sample>>,
    /// The preparation configuration (saved with the run).
    pub prepare: PrepareConfig,
}

impl Corpus {
    /// Number of items.
    pub fn n_items(&self) -> usize {
        self.titles.len()
    }

    /// Samples of one split and task (empty when there are none).
    pub fn get(&self, split: Split, task: Task) -> &[Sample] {
        self.samples.get(&(split, task)).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The item co-occurrences of the training recommendation examples (validation and test
    /// events are never read): what the `itemknn` floor and the collaborative item rows use.
    pub fn co_occurrence(&self) -> crate::collab::CoOccurrence {
        let train = self.get(Split::Train, Task::Rec);
        let examples = train.iter().map(|s| (s.history.as_slice(), s.target));
        crate::collab::CoOccurrence::from_examples(self.n_items(), examples)
    }

    /// The directed successor counts of the training rec examples (the `successors` floor).
    pub fn successors(&self) -> crate::collab::Successors {
        let train = self.get(Split::Train, Task::Rec);
        let examples = train.iter().map(|s| (s.history.as_slice(), s.target));
        crate::collab::Successors::from_examples(self.n_items(), examples)
    }

    /// Whether item `i` has a title: ID-only sources (the SASRec layout, an ID-only JSONL) use
    /// the id as the title (`gems_data::Item::title`), which says nothing about the item.
    pub fn has_title(&self, i: usize) -> bool {
        self.titles.get(i).zip(self.item_ids.get(i)).is_some_and(|(t, id)| t != id)
    }

    /// The number of items without a title ([`Corpus::has_title`]).
    pub fn untitled(&self) -> usize {
        (0..self.n_items()).filter(|&i| !self.has_title(i)).count()
    }

    /// The items `sample`'s user had interacted with before its target event (the whole known
    /// history, of which the prompt shows the last `max_history`): what a ranking "without
    /// history" leaves out.
    pub fn seen(&self, sample: &Sample) -> &[u32] {
        let events = self.sequences.get(sample.user as usize).map_or(&[][..], Vec::as_slice);
        &events[..(sample.position as usize).min(events.len())]
    }

    /// The user index of a source user id.
    pub fn user_index(&self, id: &str) -> Option<u32> {
        self.users.iter().position(|u| u == id).map(|i| i as u32)
    }
}

/// A model with item tokens and the data tokenised for it.
pub struct Setup {
    /// The model and its tokenizer (with item tokens).
    pub pretrained: Pretrained,
    /// The data.
    pub corpus: Corpus,
    /// Text tokenizer (for prompts typed at run time).
    pub text: TextVocab,
    /// The rec training rows of `data.rec_targets = "all"` ([`stretch_rows`]), whose history
    /// items are targets too; `None` trains the corpus's examples on their answers
    /// ([`Setup::train_rows`], [`Setup::history_targets`]).
    pub rec_all_targets: Option<Vec<Sample>>,
    /// Whether item targets' training softmax runs over the catalogue only
    /// (`data.item_softmax = "catalogue"`).
    pub catalogue_softmax: bool,
    /// Whether item targets' training softmax leaves out what their user had before them
    /// (`data.train_exclude_history`).
    pub exclude_seen: bool,
    /// How recommendation prompts are worded (`data.rec_prompt`), for the prompts asked at run
    /// time ([`Setup::prompt_ids`]).
    pub rec_prompt: gems_data::RecPrompt,
}

/// What a training loss counts: see [`crate::forward::target_loss`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossTargets<'a> {
    /// The history items of a row are targets too, from this item token id on
    /// ([`crate::forward::training_positions`]).
    pub history_from: Option<u32>,
    /// Item targets' softmax runs over the item tokens only: (first item token id, items).
    pub catalogue: Option<(u32, usize)>,
    /// With it, an item target's softmax leaves out the items its user had before it (the
    /// target kept), as `eval.exclude_history` leaves them out of the ranking
    /// (`data.train_exclude_history`).
    pub exclude_seen: Option<SeenItems<'a>>,
}

/// What [`LossTargets::exclude_seen`] needs: each user's items in event order
/// ([`Corpus::sequences`]) and where the item tokens are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenItems<'a> {
    /// Each user's items in event order.
    pub sequences: &'a [Vec<u32>],
    /// First item token id.
    pub base: u32,
    /// Items in the catalogue.
    pub n_items: usize,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup").field("corpus", &self.corpus.dataset).finish_non_exhaustive()
    }
}

/// Loads the model at `path` (pretrained or saved by a run) onto `device`, truncated to
/// `keep_layers` when it has more.
///
/// # Errors
/// The model does not load; `keep_layers` is more than the model has.
pub fn load_model(path: &Path, keep_layers: Option<usize>, device: &Device) -> Result<Pretrained> {
    let mut p = gems_model::check::load(path, device)?;
    let n = p.model.layers.len();
    match keep_layers {
        Some(k) if k > n => {
            return Err(TrainError::Config(format!(
                "model.keep_layers {k} exceeds the {n} layers of {}",
                path.display()
            )));
        }
        Some(k) if k < n => {
            p.model.layers.truncate(k);
            p.model.config.num_hidden_layers = k;
        }
        _ => {}
    }
    Ok(p)
}

/// The data of a run before it meets the model: the catalogue, the users and the examples with
/// their tokenisation in the run's prompt form (`data.rec_prompt`), from a raw dataset or a
/// prepared directory.
struct Source {
    name: String,
    prepare: PrepareConfig,
    titles: Vec<String>,
    categories: Vec<Vec<String>>,
    item_ids: Vec<String>,
    users: Vec<String>,
    examples: Vec<Example>,
    tokenized: Vec<gems_data::TokenizedExample>,
}

/// Loads and prepares `data.dataset` (a name or a raw dataset directory) here.
fn from_dataset(d: &DataSettings, text: &TextVocab) -> Result<Source> {
    let spec = resolve_dataset(&d.dataset, &d.data_root, None)?;
    let mut prep = PrepareConfig::from_spec(&spec);
    prep.build.max_history = d.max_history;
    prep.build.n_negatives = d.negatives;
    prep.build.seed = d.seed;
    let prepared = prepare(&spec.dir, &prep, None)?;
    gems_data::check_negatives(d.negatives, prepared.dataset.catalogue.len())?;
    let tokenized = gems_data::tokenize_examples(&prepared.examples, d.rec_prompt, text)?;
    let catalogue = prepared.dataset.catalogue.items();
    Ok(Source {
        name: spec.name.clone(),
        prepare: prep,
        titles: catalogue.iter().map(|i| i.title.clone()).collect(),
        categories: catalogue.iter().map(|i| i.categories.clone()).collect(),
        item_ids: catalogue.iter().map(|i| i.id.clone()).collect(),
        users: prepared.dataset.users.iter().map(|u| u.user.clone()).collect(),
        examples: prepared.examples,
        tokenized,
    })
}

/// The settings of `data` that a prepared directory decides, for `gems train --data`: the
/// dataset name, `max_history`, `negatives` and `seed` are copied from `dir`'s manifest and
/// `prepared` is set to `dir`.
///
/// # Errors
/// `dir` is not a prepared directory of this format version.
pub fn adopt_prepared(data: &mut DataSettings, dir: &Path) -> Result<()> {
    let manifest = gems_data::read_manifest(dir)?;
    let build = &manifest.config.build;
    data.prepared = Some(dir.to_path_buf());
    data.dataset = manifest.config.dataset.clone();
    data.max_history = build.max_history;
    data.negatives = build.n_negatives;
    data.seed = build.seed;
    Ok(())
}

/// Reads the directory `gems data prepare` wrote (checksums verified) and tokenises its examples
/// with `text`, exactly as [`from_dataset`] does. Token ids stored in the directory must equal
/// those: a directory tokenised with another tokenizer is refused.
fn from_prepared(dir: &Path, d: &DataSettings, text: &TextVocab) -> Result<Source> {
    let p = gems_data::read_prepared(dir)?;
    let manifest_path = dir.join("manifest.json");
    let build = &p.manifest.config.build;
    let settings = [
        ("max_history", d.max_history as u64, build.max_history as u64),
        ("negatives", d.negatives as u64, build.n_negatives as u64),
        ("seed", d.seed, build.seed),
    ];
    if let Some((field, ours, theirs)) = settings.iter().find(|(_, a, b)| a != b) {
        return Err(TrainError::Config(format!(
            "data.{field} is {ours} but {} was prepared with {theirs}: the prepared directory \
             decides it, so set data.{field} to {theirs} (`gems train --data` does)",
            manifest_path.display()
        )));
    }
    // The stored ids are the paper's prompts: checked against them, then the run's form used.
    let paper = gems_data::tokenize_examples(&p.examples, gems_data::RecPrompt::Paper, text)?;
    if let Some(stored) = &p.tokenized {
        if let Some(info) = &p.manifest.tokenizer
            && (info.vocab_size, info.eos_id) != (text.vocab_size(), text.eos_id())
        {
            return Err(TrainError::Config(format!(
                "{} was tokenised with a tokenizer of {} text tokens and end-of-sequence id {}, \
                 but the model's has {} and {}: prepare the dataset again with the model's \
                 tokenizer.json, or without --tokenizer",
                manifest_path.display(),
                info.vocab_size,
                info.eos_id,
                text.vocab_size(),
                text.eos_id()
            )));
        }
        if let Some(i) = (0..stored.len()).find(|&i| stored[i] != paper[i]) {
            let (file, line) = &p.origins[i];
            return Err(TrainError::Config(format!(
                "{}:{line}: the stored input_ids differ from the model's tokenisation of the \
                 same prompt (prepared with another tokenizer): prepare the dataset again with \
                 the model's tokenizer.json, or without --tokenizer",
                file.display()
            )));
        }
    }
    let tokenized = match d.rec_prompt {
        gems_data::RecPrompt::Paper => paper,
        rec => gems_data::tokenize_examples(&p.examples, rec, text)?,
    };
    Ok(Source {
        name: p.manifest.config.dataset.clone(),
        prepare: p.manifest.config.clone(),
        titles: p.items.iter().map(|i| i.title.clone()).collect(),
        categories: p.items.iter().map(|i| i.categories.clone()).collect(),
        item_ids: p.items.iter().map(|i| i.id.clone()).collect(),
        users: p.users,
        examples: p.examples,
        tokenized,
    })
}

/// Builds the corpus with `pretrained`'s tokenizer and adds missing item tokens to the model.
///
/// The data is `config.data.prepared` (a directory written by `gems data prepare`) when set,
/// else `config.data.dataset` prepared here with the configuration's settings.
///
/// # Errors
/// The dataset does not load; the prepared directory is damaged or disagrees with the
/// configuration or the model's tokenizer; the model's item tokens do not match the catalogue.
pub fn build(mut pretrained: Pretrained, config: &TrainConfig) -> Result<Setup> {
    let d = &config.data;
    let existing = pretrained.tokenizer.token_to_id(&gems_data::prompt::item_token(0));
    let tokenizer = HfTokenizer::new(pretrained.tokenizer.clone(), None)?;
    let base = existing.unwrap_or_else(|| tokenizer.vocab_size());
    let text = TextVocab { inner: tokenizer, base };
    let source = match &d.prepared {
        Some(dir) => from_prepared(dir, d, &text)?,
        None => from_dataset(d, &text)?,
    };
    let n = source.titles.len();

    let mut samples: BTreeMap<(Split, Task), Vec<Sample>> = BTreeMap::new();
    for (example, tok) in source.examples.iter().zip(&source.tokenized) {
        samples.entry((example.split, example.task)).or_default().push(sample(example, tok));
    }
    let corpus = Corpus {
        dataset: source.name,
        base_vocab: base,
        eos_id: text.eos_id(),
        titles: source.titles,
        categories: source.categories,
        item_ids: source.item_ids,
        sequences: user_sequences(source.users.len(), &samples),
        users: source.users,
        samples,
        prepare: source.prepare,
    };
    if existing.is_none() {
        add_item_tokens(&mut pretrained, &corpus, config)?;
    }
    // Every item must sit at base + index, whichever way the tokens got there.
    for i in [0, n.saturating_sub(1)] {
        let token = gems_data::prompt::item_token(i as u32);
        let id = pretrained.tokenizer.token_to_id(&token);
        if id != Some(base + i as u32) {
            return Err(TrainError::Config(format!(
                "the model's {token} has id {id:?}, expected {} (the model was saved with a \
                 different catalogue?)",
                base + i as u32
            )));
        }
    }
    let vocab = pretrained.model.embed_tokens.weight.dims()[0];
    if (base as usize + n) > vocab {
        return Err(TrainError::Config(format!(
            "embedding has {vocab} rows but the catalogue needs {}",
            base as usize + n
        )));
    }

    let rec_all_targets = (d.rec_targets == RecTargets::All)
        .then(|| stretch_rows(corpus.get(Split::Train, Task::Rec)));
    let catalogue_softmax = d.item_softmax == crate::config::ItemSoftmax::Catalogue;
    Ok(Setup {
        pretrained,
        corpus,
        text,
        rec_all_targets,
        catalogue_softmax,
        exclude_seen: d.train_exclude_history,
        rec_prompt: d.rec_prompt,
    })
}

/// Adds one token per catalogue item to a pretrained model and initialises its rows as
/// `config.model` says: from the item's text (or seeded random), plus the collaborative part of
/// [`crate::collab`] when `model.item_collab` is set.
fn add_item_tokens(
    pretrained: &mut Pretrained,
    corpus: &Corpus,
    config: &TrainConfig,
) -> Result<()> {
    let m = &config.model;
    let specs: Vec<ItemSpec> = corpus
        .titles
        .iter()
        .zip(&corpus.categories)
        .enumerate()
        .map(|(i, (title, categories))| {
            // An id is not a title: an untitled item's row comes from its categories if the
            // item text uses them, else the mean item row (gems_model::ItemInit).
            let title = if corpus.has_title(i) { title.as_str() } else { "" };
            let text = m.item_text.of(title, categories);
            ItemSpec { id: i.to_string(), title: (!text.is_empty()).then_some(text) }
        })
        .collect();
    let init = match (m.title_init, m.item_weights) {
        (true, ItemWeights::Mean) => ItemInit::TitleMean,
        (true, ItemWeights::Idf) => ItemInit::TitleIdf,
        (false, _) => ItemInit::Random { seed: config.seed },
    };
    let ids = add_items(pretrained, &specs, init)?;
    if m.item_collab > 0 {
        let scale = gems_model::item_row_norm(pretrained, &ids)? * m.item_collab_scale as f32;
        let hidden = pretrained.model.config.hidden_size;
        let parts = match m.item_collab_source {
            CollabSource::Ppmi => {
                let co = corpus.co_occurrence();
                crate::collab::collab_rows(&co, m.item_collab, hidden, scale, config.seed)?
            }
            CollabSource::Sasrec => {
                let seed = gems_rng::SplitMix64::for_stream(config.seed, &[0xc011ab, 3]).next_u64();
                let sasrec = crate::sasrec::SasrecConfig {
                    hidden: m.item_collab,
                    ..crate::sasrec::SasrecConfig::for_corpus(corpus, seed)
                };
                let trained = crate::sasrec::train(
                    corpus,
                    &sasrec,
                    &burn::tensor::Device::flex(),
                    &crate::progress::Reporter::silent(),
                )?;
                let rows = crate::collab::unit_rows(trained.item_embeddings()?);
                crate::collab::mapped_rows(&rows, hidden, scale, config.seed)?
            }
        };
        gems_model::add_to_item_rows(pretrained, &ids, &parts)?;
    }
    Ok(())
}

/// The entry of [`Corpus::sequences`] at a position no sample names.
pub const UNKNOWN_ITEM: u32 = u32::MAX;

/// Each user's items in event order, rebuilt from the samples of every split and task: a
/// sample at position p names the event at p (its target) and the events before it (its
/// history). Every event after a user's first is some example's target and the first is in
/// the history of the example at position 1, so nothing is missing for data built by
/// `gems_data::build_examples`; a position no sample names (hand-made samples) holds
/// [`UNKNOWN_ITEM`], which is never an item.
pub fn user_sequences(
    n_users: usize,
    samples: &BTreeMap<(Split, Task), Vec<Sample>>,
) -> Vec<Vec<u32>> {
    let mut events: Vec<Vec<u32>> = vec![Vec::new(); n_users];
    for s in samples.values().flatten() {
        let Some(seq) = events.get_mut(s.user as usize) else { continue };
        let position = s.position as usize;
        if seq.len() <= position {
            seq.resize(position + 1, UNKNOWN_ITEM);
        }
        seq[position] = s.target;
        let start = position - s.history.len().min(position);
        seq[start..position].copy_from_slice(&s.history[s.history.len() - (position - start)..]);
    }
    events
}

fn sample(example: &Example, tok: &gems_data::TokenizedExample) -> Sample {
    Sample {
        user: example.user,
        position: example.position,
        ids: tok.input_ids.clone(),
        target_pos: tok.target_span[0] as usize,
        target: example.target,
        history: example.history.clone(),
        query: example.query.clone(),
        negatives: example.negatives.clone(),
    }
}

/// The training rows of `data.rec_targets = "all"` from one task's training examples (grouped
/// by user, positions ascending, as built): per user the latest example, then, walking back,
/// each latest example whose target the history of the row picked after it does not reach. A
/// row with its target at position t and a history of L events predicts the events at t - L + 1
/// to t (every history item after the first, then the answer), so every training target is
/// predicted exactly once, and no row holds an event after the user's last training event.
pub fn stretch_rows(samples: &[Sample]) -> Vec<Sample> {
    let mut out = Vec::new();
    // (user, lowest position the last picked row predicts)
    let mut reach: Option<(u32, u32)> = None;
    for s in samples.iter().rev() {
        if matches!(reach, Some((user, low)) if user == s.user && s.position >= low) {
            continue;
        }
        let low = (s.position + 1).saturating_sub(s.history.len() as u32).max(1);
        reach = Some((s.user, low));
        out.push(s.clone());
    }
    out.reverse();
    out
}

impl Setup {
    /// The rows a run trains on for `task`: the corpus's training examples, or for rec under
    /// `data.rec_targets = "all"` the stretch rows.
    pub fn train_rows(&self, task: Task) -> &[Sample] {
        match (task, &self.rec_all_targets) {
            (Task::Rec, Some(rows)) => rows,
            _ => self.corpus.get(Split::Train, task),
        }
    }

    /// Whether `task`'s training rows have their history items as targets too: the first item
    /// token id to count as one ([`crate::forward::training_positions`]), else `None`.
    pub fn history_targets(&self, task: Task) -> Option<u32> {
        (task == Task::Rec && self.rec_all_targets.is_some()).then_some(self.corpus.base_vocab)
    }

    /// What `task`'s training loss counts ([`crate::forward::target_loss`]).
    pub fn loss_targets(&self, task: Task) -> LossTargets<'_> {
        LossTargets {
            history_from: self.history_targets(task),
            catalogue: self
                .catalogue_softmax
                .then_some((self.corpus.base_vocab, self.corpus.n_items())),
            exclude_seen: self.exclude_seen.then_some(SeenItems {
                sequences: &self.corpus.sequences,
                base: self.corpus.base_vocab,
                n_items: self.corpus.n_items(),
            }),
        }
    }

    /// Tokenises a prompt for `history` (item indices, oldest first) and an optional query,
    /// with the training templates; returns the prompt ids (no target).
    ///
    /// # Errors
    /// The tokenizer fails, or an item index is out of range.
    pub fn prompt_ids(&self, history: &[u32], query: Option<&str>) -> Result<Vec<u32>> {
        if let Some(&bad) = history.iter().find(|&&i| i as usize >= self.corpus.n_items()) {
            return Err(TrainError::Config(format!(
                "item index {bad} out of range ({} items)",
                self.corpus.n_items()
            )));
        }
        Ok(gems_data::tokenize_prompt(history, query, self.rec_prompt, &self.text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// User `u`'s sample at `position` (item `1000 u + p` at every position p), with a history
    /// of at most `max_history` events.
    fn event_sample(u: usize, position: u32, max_history: u32) -> Sample {
        let start = position.saturating_sub(max_history);
        Sample {
            user: u as u32,
            position,
            ids: Vec::new(),
            target_pos: 0,
            target: 1000 * u as u32 + position,
            history: (start..position).map(|p| 1000 * u as u32 + p).collect(),
            query: None,
            negatives: Vec::new(),
        }
    }

    /// The training rec examples of users with `lengths` events (positions 1 to n - 3 train).
    fn train_samples(lengths: &[u32], max_history: u32) -> Vec<Sample> {
        let mut out = Vec::new();
        for (u, &n) in lengths.iter().enumerate() {
            out.extend((1..n.saturating_sub(2)).map(|p| event_sample(u, p, max_history)));
        }
        out
    }

    /// Every split's samples of users with `lengths` events, prompts of `max_history`.
    fn all_samples(lengths: &[u32], max_history: u32) -> BTreeMap<(Split, Task), Vec<Sample>> {
        let mut out: BTreeMap<(Split, Task), Vec<Sample>> = BTreeMap::new();
        for (u, &n) in lengths.iter().enumerate() {
            for position in 1..n {
                let split = match n - position {
                    1 => Split::Test,
                    2 => Split::Valid,
                    _ => Split::Train,
                };
                let task = if position % 3 == 0 { Task::Search } else { Task::Rec };
                out.entry((split, task)).or_default().push(event_sample(u, position, max_history));
            }
        }
        out
    }

    #[test]
    fn user_sequences_hold_every_event_and_seen_is_the_whole_past() {
        let lengths = [2, 3, 7, 30];
        let samples = all_samples(&lengths, 4);
        let sequences = user_sequences(lengths.len() + 1, &samples);
        for (u, &n) in lengths.iter().enumerate() {
            let want: Vec<u32> = (0..n).map(|p| 1000 * u as u32 + p).collect();
            assert_eq!(sequences[u], want, "user {u}");
        }
        assert!(sequences[lengths.len()].is_empty(), "a user without samples");
        let corpus = Corpus {
            dataset: "t".into(),
            base_vocab: 0,
            eos_id: 0,
            titles: Vec::new(),
            categories: Vec::new(),
            item_ids: Vec::new(),
            users: Vec::new(),
            sequences,
            samples,
            prepare: PrepareConfig {
                dataset: "t".into(),
                format: gems_data::DataFormat::Jsonl,
                load: gems_data::LoadOptions::default(),
                query_synthesis: gems_data::QuerySynthesis::Off,
                build: gems_data::BuildConfig::default(),
            },
        };
        let test =
            corpus.get(Split::Test, Task::Rec).iter().chain(corpus.get(Split::Test, Task::Search));
        for s in test {
            // The prompt shows 4 items; what the user had before the target is all of it.
            let seen = corpus.seen(s);
            assert_eq!(seen.len(), s.position as usize);
            assert!(seen.ends_with(&s.history));
            assert!(!seen.contains(&s.target));
        }
        // A hand-made sample whose earlier events no sample names: those stay unknown.
        let lone = Sample {
            user: 0,
            position: 5,
            target: 7,
            ..corpus.get(Split::Test, Task::Rec)[0].clone()
        };
        let one =
            BTreeMap::from([((Split::Test, Task::Rec), vec![Sample { history: vec![6], ..lone }])]);
        let seq = &user_sequences(1, &one)[0];
        assert_eq!(seq, &[UNKNOWN_ITEM, UNKNOWN_ITEM, UNKNOWN_ITEM, UNKNOWN_ITEM, 6, 7]);
    }

    #[test]
    fn stretch_rows_predict_every_training_event_once() {
        let lengths = [3, 4, 12, 23, 24, 45, 70];
        let samples = train_samples(&lengths, 20);
        let rows = stretch_rows(&samples);
        // What the rows predict: history items after the first, then the answer.
        let mut predicted: Vec<u32> =
            rows.iter().flat_map(|r| r.history.iter().skip(1).copied().chain([r.target])).collect();
        predicted.sort_unstable();
        let mut want: Vec<u32> = samples.iter().map(|s| s.target).collect();
        want.sort_unstable();
        assert_eq!(predicted, want);
        // One row per user up to 21 training events, more for longer sequences; every row
        // is one of the training examples (no validation or test event is read).
        let per_user = |u: u32| rows.iter().filter(|r| r.user == u).count();
        assert_eq!((per_user(0), per_user(1), per_user(2), per_user(3)), (0, 1, 1, 1));
        assert_eq!((per_user(4), per_user(5), per_user(6)), (2, 3, 4));
        assert!(rows.iter().all(|r| samples.contains(r)));
    }
}
