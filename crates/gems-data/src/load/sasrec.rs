//! The SASRec / S3-Rec text layout: one `user item item ...` line per user, items in time order.
//!
//! The layout is ID-only, so each item's title is its id. Items are numbered in ascending id
//! order (numeric when every id is a number), so the 1-based ids of the standard splits map to
//! dense indices `id - 1`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::{read_text, single_file};
use crate::error::{Error, Result};
use crate::model::{BehaviourSequence, Catalogue, Dataset, Event, EventKind, Item};

pub(super) fn load(dir: &Path) -> Result<Dataset> {
    let path = single_file(dir, ".txt")?;
    let text = read_text(&path)?;
    let mut raw_users: Vec<(String, Vec<&str>)> = Vec::new();
    let mut user_lines: HashMap<&str, usize> = HashMap::new();
    let mut ids: BTreeSet<&str> = BTreeSet::new();
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
        let items: Vec<&str> = fields.collect();
        if items.is_empty() {
            return Err(Error::EmptyUser { path, line: line_no, user: user.to_string() });
        }
        ids.extend(items.iter().copied());
        raw_users.push((user.to_string(), items));
    }

    let mut ordered: Vec<&str> = ids.into_iter().collect();
    if ordered.iter().all(|id| id.parse::<u64>().is_ok()) {
        ordered.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
    }
    let mut catalogue = Catalogue::new();
    for id in ordered {
        let item = Item {
            id: id.to_string(),
            title: id.to_string(),
            text: Vec::new(),
            categories: Vec::new(),
        };
        // Ids come from a set, so they are unique.
        let _ = catalogue.push(item);
    }
    let users = raw_users
        .into_iter()
        .map(|(user, items)| BehaviourSequence {
            user,
            events: items
                .into_iter()
                .filter_map(|id| catalogue.index_of(id))
                .map(|item| Event { item, timestamp: None, query: None, kind: EventKind::Rec })
                .collect(),
        })
        .collect();
    Ok(Dataset { catalogue, users, inputs: vec![path] })
}
