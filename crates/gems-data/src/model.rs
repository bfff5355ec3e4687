//! The canonical in-memory model every loader produces.
//!
//! One shape for all sources keeps example construction, statistics and output independent of
//! where the data came from: a [`Catalogue`] of items with dense indices, and one
//! [`BehaviourSequence`] per user whose events point at those indices.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One catalogue item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The id as written in the source data.
    pub id: String,
    /// Cleaned title; ID-only sources use the id.
    pub title: String,
    /// Other free-text fields (description, brand, ...), cleaned, sorted by field name.
    pub text: Vec<(String, String)>,
    /// Category path from the root, e.g. `["Industrial & Scientific", "Fasteners"]`; may be empty.
    pub categories: Vec<String>,
}

impl Item {
    /// Whether the item has a title of its own: ID-only sources use the id as the title.
    pub fn has_title(&self) -> bool {
        self.title != self.id
    }
}

/// The item catalogue: items in a fixed order; an item's position is its dense index.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    items: Vec<Item>,
    // Lookup only; never iterated, so output order never depends on hashing.
    by_id: HashMap<String, u32>,
}

impl Catalogue {
    /// An empty catalogue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an item and returns its dense index, or `Err(existing index)` if the id is taken.
    pub fn push(&mut self, item: Item) -> std::result::Result<u32, u32> {
        if let Some(&existing) = self.by_id.get(&item.id) {
            return Err(existing);
        }
        let index = self.items.len() as u32;
        self.by_id.insert(item.id.clone(), index);
        self.items.push(item);
        Ok(index)
    }

    /// The dense index of the item with this source id.
    pub fn index_of(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// The item at a dense index.
    pub fn get(&self, index: u32) -> Option<&Item> {
        self.items.get(index as usize)
    }

    /// All items in index order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the catalogue has no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// How an interaction happened in the source data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The user reached the item through a search query.
    Search,
    /// The user reached the item through browsing or recommendation (or the source does not say).
    Rec,
}

/// One interaction of a user with an item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Dense catalogue index of the item.
    pub item: u32,
    /// Source timestamp, any monotone integer clock (only the order matters); `None` if unknown.
    pub timestamp: Option<i64>,
    /// The search query that led to the item, observed or synthesised.
    pub query: Option<String>,
    /// How the interaction happened in the source.
    pub kind: EventKind,
}

/// One user's events in time order (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BehaviourSequence {
    /// The user id as written in the source.
    pub user: String,
    /// Events, oldest first.
    pub events: Vec<Event>,
}

/// A loaded dataset: catalogue plus per-user sequences, in a deterministic order.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The item catalogue.
    pub catalogue: Catalogue,
    /// One sequence per user, in source order.
    pub users: Vec<BehaviourSequence>,
    /// The files that were read, in reading order (hashed into the manifest).
    pub inputs: Vec<PathBuf>,
}

impl Dataset {
    /// Total number of events over all users.
    pub fn n_events(&self) -> usize {
        self.users.iter().map(|u| u.events.len()).sum()
    }
}
