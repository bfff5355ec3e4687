//! The SASRec / S3-Rec text layout: one `user item item ...` line per user, items in time order.
//!
//! The layout is ID-only, so each item's title is its id. Item ids are non-negative decimal
//! integers, as every SASRec / S3-Rec preprocessing writes them, and the vocabulary is ordered
//! by their value, so the dense 1-based ids of the standard splits map to indices `id - 1`.
//! An id that is not an integer is an error naming the file, the line and the id: ordering the
//! whole vocabulary as strings instead (what this loader once did silently) would break
//! `index = id - 1` for every item. Datasets with string ids belong in the `jsonl` layout.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::{read_text, require_data, single_file};
use crate::error::{Error, Result, quote};
use crate::model::{BehaviourSequence, Catalogue, Dataset, Event, EventKind, Item};

pub(super) fn load(dir: &Path) -> Result<Dataset> {
    let path = single_file(dir, ".txt")?;
    let text = read_text(&path)?;
    let mut raw_users: Vec<(String, Vec<u64>)> = Vec::new();
    let mut user_lines: HashMap<&str, usize> = HashMap::new();
    let mut ids: BTreeSet<u64> = BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let mut fields = line.split_whitespace();
        let Some(user) = fields.next() else { continue };
        if let Some(&first_line) = user_lines.get(user) {
            return Err(Error::DuplicateUser {
                path,
                line: line_no,
                user: user.to_string(),
                first_line,
            });
        }
        user_lines.insert(user, line_no);
        let items = fields
            .map(|id| item_id(id).ok_or_else(|| not_an_integer(&path, line_no, id)))
            .collect::<Result<Vec<u64>>>()?;
        if items.is_empty() {
            return Err(Error::EmptyUser { path, line: line_no, user: user.to_string() });
        }
        ids.extend(items.iter().copied());
        raw_users.push((user.to_string(), items));
    }

    if raw_users.is_empty() {
        return Err(Error::empty(path, "no users: the file has no `user item ...` line"));
    }
    let mut catalogue = Catalogue::new();
    let mut index_of: HashMap<u64, u32> = HashMap::with_capacity(ids.len());
    // A `BTreeSet` iterates in ascending numeric order: the vocabulary order.
    for id in ids {
        let item = Item {
            id: id.to_string(),
            title: id.to_string(),
            text: Vec::new(),
            categories: Vec::new(),
        };
        // Ids come from a set, so they are unique.
        if let Ok(index) = catalogue.push(item) {
            index_of.insert(id, index);
        }
    }
    let users = raw_users
        .into_iter()
        .map(|(user, items)| BehaviourSequence {
            user,
            events: items
                .into_iter()
                .filter_map(|id| index_of.get(&id).copied())
                .map(|item| Event { item, timestamp: None, query: None, kind: EventKind::Rec })
                .collect(),
        })
        .collect();
    let dataset = Dataset { catalogue, users, inputs: vec![path.clone()] };
    require_data(&dataset, &path, &dataset.inputs)?;
    Ok(dataset)
}

/// An item id: ASCII digits only (leading zeros allowed: `007` is item 7), at most `u64::MAX`.
fn item_id(raw: &str) -> Option<u64> {
    if raw.bytes().all(|b| b.is_ascii_digit()) { raw.parse().ok() } else { None }
}

fn not_an_integer(path: &Path, line: usize, id: &str) -> Error {
    Error::malformed(
        path,
        line,
        format!(
            "item id {} is not a non-negative integer; the sasrec layout orders items by \
             integer id (index = id - 1 for ids 1..N), so every id must be one (for string \
             ids use the jsonl layout, see docs/data-format.md)",
            quote(id)
        ),
    )
}
