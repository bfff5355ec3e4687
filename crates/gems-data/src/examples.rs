//! Example construction: leave-one-out rec and search examples with sampled negatives.
//!
//! For a user with events `e_0 .. e_{n-1}`, every position `i >= 1` is a target whose history is
//! the items of the (at most `max_history`) events before it. The last target is `test`, the
//! second last `valid`, earlier ones `train` (GEMS-SPEC §6). Evaluation examples carry
//! `n_negatives` items drawn uniformly from the catalogue minus every item the user ever touched.
//! All randomness comes from [`SplitMix64`] streams labelled by user and position, so an example
//! does not depend on the order in which others were built.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{BehaviourSequence, Dataset, Event, EventKind};
use gems_rng::SplitMix64;

/// Which leave-one-out split an example belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Every target before the second last.
    Train,
    /// The second-last target.
    Valid,
    /// The last target.
    Test,
}

impl Split {
    /// All splits in output order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    /// Lowercase name, as in file names.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// Which task an example trains or evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// History -> next item.
    Rec,
    /// History + query -> item.
    Search,
}

impl Task {
    /// All tasks in output order.
    pub const ALL: [Task; 2] = [Task::Rec, Task::Search];

    /// Lowercase name, as in file names.
    pub fn name(self) -> &'static str {
        match self {
            Task::Rec => "rec",
            Task::Search => "search",
        }
    }
}

/// How target positions become rec and search examples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum TaskAssignment {
    /// Every target gives a rec example and, when its event has a query, a search example.
    Both,
    /// Every target gives one example. Events observed as searches (with a query) are search
    /// examples, events without a query are rec examples, and the rest (e.g. Amazon purchases
    /// with a synthesised query) are search examples with probability `search_probability`.
    Split {
        /// Probability that an undetermined event becomes a search example.
        search_probability: f64,
    },
}

/// Settings of example construction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BuildConfig {
    /// Task assignment (default `both`).
    pub assignment: TaskAssignment,
    /// Keep only the last `max_history` items of a history (default 20).
    pub max_history: usize,
    /// Sampled negatives per valid and test example (default 99).
    pub n_negatives: usize,
    /// Seed of every random choice (default 42).
    pub seed: u64,
}

impl Default for BuildConfig {
    fn default() -> Self {
        Self { assignment: TaskAssignment::Both, max_history: 20, n_negatives: 99, seed: 42 }
    }
}

/// One untokenised example: item indices and text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Index of the user in [`Dataset::users`].
    pub user: u32,
    /// Position of the target event in the user's sequence.
    pub position: u32,
    /// Leave-one-out split.
    pub split: Split,
    /// Task.
    pub task: Task,
    /// Items of the preceding events, oldest first, at most `max_history`.
    pub history: Vec<u32>,
    /// The query (search examples only).
    pub query: Option<String>,
    /// The target item.
    pub target: u32,
    /// Sampled negatives (valid and test only; empty for train).
    pub negatives: Vec<u32>,
}

// Stream labels, so task draws and negative draws never share random numbers.
const STREAM_TASK: u64 = 1;
const STREAM_NEGATIVES: u64 = 2;

/// Refuses `n_negatives` sampled negatives per example for a catalogue of `n_items` items: they
/// are other items than the target, so there can be at most `n_items - 1` (more used to be
/// capped silently, which changes what the sampled protocol measures).
///
/// # Errors
/// `n_negatives >= n_items`.
pub fn check_negatives(n_negatives: usize, n_items: usize) -> Result<()> {
    if n_negatives >= n_items {
        return Err(Error::Config(format!(
            "negatives {n_negatives} must be below the catalogue's {n_items} items (each is \
             another item than the target); at most {}",
            n_items.saturating_sub(1)
        )));
    }
    Ok(())
}

/// Builds every example of a dataset, ordered by user, then position, then task (rec first).
pub fn build_examples(dataset: &Dataset, config: &BuildConfig) -> Result<Vec<Example>> {
    check_build_config(config)?;
    let n_items = dataset.catalogue.len();
    let mut examples = Vec::new();
    let mut touched = vec![false; n_items];
    for (user_index, user) in dataset.users.iter().enumerate() {
        let n = user.events.len();
        if n < 2 {
            continue;
        }
        let n_touched = mark_touched(&mut touched, user);
        let user_index = user_index as u32;
        for position in 1..n {
            let split = split_of(position, n);
            let event = &user.events[position];
            let start = position.saturating_sub(config.max_history);
            let history: Vec<u32> = user.events[start..position].iter().map(|e| e.item).collect();
            let negatives = if split == Split::Train || config.n_negatives == 0 {
                Vec::new()
            } else {
                let mut rng = SplitMix64::for_stream(
                    config.seed,
                    &[STREAM_NEGATIVES, u64::from(user_index), position as u64],
                );
                sample_negatives(&mut rng, &touched, n_touched, config.n_negatives)
            };
            for &task in tasks_of(config, event, user_index, position) {
                examples.push(Example {
                    user: user_index,
                    position: position as u32,
                    split,
                    task,
                    history: history.clone(),
                    query: if task == Task::Search { event.query.clone() } else { None },
                    target: event.item,
                    negatives: negatives.clone(),
                });
            }
        }
        for event in &user.events {
            if let Some(t) = touched.get_mut(event.item as usize) {
                *t = false;
            }
        }
    }
    Ok(examples)
}

/// Refuses a `max_history` of 0 and a search probability outside [0, 1].
fn check_build_config(config: &BuildConfig) -> Result<()> {
    if config.max_history == 0 {
        return Err(Error::Config("max_history must be at least 1".into()));
    }
    if let TaskAssignment::Split { search_probability: p } = config.assignment
        && !(0.0..=1.0).contains(&p)
    {
        return Err(Error::Config(format!("search probability {p} is not in [0, 1]")));
    }
    Ok(())
}

/// Marks the items of `user`'s events in `touched` (indices past its end are skipped) and
/// returns how many were newly marked.
fn mark_touched(touched: &mut [bool], user: &BehaviourSequence) -> usize {
    let mut n_touched = 0;
    for event in &user.events {
        if let Some(t) = touched.get_mut(event.item as usize)
            && !*t
        {
            *t = true;
            n_touched += 1;
        }
    }
    n_touched
}

/// The split of the target at `position` in a sequence of `n` events: the last is test, the
/// second last valid, earlier ones train.
fn split_of(position: usize, n: usize) -> Split {
    if position == n - 1 {
        Split::Test
    } else if position == n - 2 {
        Split::Valid
    } else {
        Split::Train
    }
}

/// The tasks the target `event` at `position` of user `user_index` gives examples for, under
/// `config`'s task assignment.
fn tasks_of(
    config: &BuildConfig,
    event: &Event,
    user_index: u32,
    position: usize,
) -> &'static [Task] {
    match (config.assignment, event.query.is_some()) {
        (TaskAssignment::Both, true) => &[Task::Rec, Task::Search],
        (TaskAssignment::Both, false) | (TaskAssignment::Split { .. }, false) => &[Task::Rec],
        (TaskAssignment::Split { search_probability }, true) => {
            if event.kind == EventKind::Search {
                &[Task::Search]
            } else {
                let mut rng = SplitMix64::for_stream(
                    config.seed,
                    &[STREAM_TASK, u64::from(user_index), position as u64],
                );
                if rng.next_f64() < search_probability { &[Task::Search] } else { &[Task::Rec] }
            }
        }
    }
}

/// Draws up to `k` distinct items uniformly from those with `excluded[i] == false`, in draw
/// order. When fewer than `k` remain, returns all of them in index order.
/// `n_excluded` is the number of `true` entries of `excluded`.
fn sample_negatives(
    rng: &mut SplitMix64,
    excluded: &[bool],
    n_excluded: usize,
    k: usize,
) -> Vec<u32> {
    let n_items = excluded.len();
    let eligible = n_items - n_excluded.min(n_items);
    if eligible <= k {
        return (0..n_items as u32).filter(|&i| !excluded[i as usize]).collect();
    }
    if eligible < 4 * k {
        // Dense case: partial Fisher-Yates over the eligible list.
        let mut pool: Vec<u32> = (0..n_items as u32).filter(|&i| !excluded[i as usize]).collect();
        rng.partial_shuffle(&mut pool, k);
        pool.truncate(k);
        return pool;
    }
    let mut chosen: Vec<u32> = Vec::with_capacity(k);
    while chosen.len() < k {
        let candidate = rng.below(n_items as u64) as u32;
        if !excluded[candidate as usize] && !chosen.contains(&candidate) {
            chosen.push(candidate);
        }
    }
    chosen
}
