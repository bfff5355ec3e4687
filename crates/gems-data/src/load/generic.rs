//! The generic JSONL layout (specified in docs/data-format.md): bring your own data.
//!
//! `items.jsonl`: one item per line, `{"id", "title", "text"?, "categories"?}`.
//! `events.jsonl`: one user per line, `{"user", "events": [{"item", "timestamp"?, "query"?,
//! "kind"?}]}` with events in time order. One user per line keeps the "empty or duplicate
//! user" checks exact and the file greppable.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use super::{LoadOptions, read_text, resolve_item};
use crate::error::{Error, Result};
use crate::model::{BehaviourSequence, Catalogue, Dataset, Event, EventKind, Item};
use crate::text::clean_text;

/// An id written as a JSON string or integer.
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Int(u64),
    Str(String),
}

impl Id {
    fn into_string(self) -> String {
        match self {
            Id::Int(i) => i.to_string(),
            Id::Str(s) => s,
        }
    }
}

#[derive(Deserialize)]
struct ItemLine {
    id: Id,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    text: BTreeMap<String, String>,
    #[serde(default)]
    categories: Vec<String>,
}

#[derive(Deserialize)]
struct EventRecord {
    item: Id,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    kind: Option<EventKind>,
}

#[derive(Deserialize)]
struct UserLine {
    user: Id,
    events: Vec<EventRecord>,
}

fn parse_line<T: serde::de::DeserializeOwned>(
    path: &Path,
    line_no: usize,
    line: &str,
) -> Result<T> {
    serde_json::from_str(line).map_err(|e| {
        let mut message = e.to_string();
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        if e.is_eof() {
            message.push_str(" (truncated JSON?)");
        }
        Error::malformed(path, line_no, message)
    })
}

pub(super) fn load(dir: &Path, options: &LoadOptions) -> Result<Dataset> {
    let items_path = dir.join("items.jsonl");
    let events_path = dir.join("events.jsonl");
    let mut catalogue = Catalogue::new();
    let mut item_lines: HashMap<String, usize> = HashMap::new();
    let text = read_text(&items_path)?;
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let record: ItemLine = parse_line(&items_path, line_no, line)?;
        let id = record.id.into_string();
        if let Some(&first_line) = item_lines.get(&id) {
            return Err(Error::DuplicateItem {
                path: items_path,
                line: line_no,
                item: id,
                first_line,
            });
        }
        item_lines.insert(id.clone(), line_no);
        let title = record.title.map(|t| clean_text(&t)).filter(|t| !t.is_empty());
        let item = Item {
            title: title.unwrap_or_else(|| id.clone()),
            id,
            text: record
                .text
                .into_iter()
                .map(|(k, v)| (k, clean_text(&v)))
                .filter(|(_, v)| !v.is_empty())
                .collect(),
            categories: record
                .categories
                .iter()
                .map(|c| clean_text(c))
                .filter(|c| !c.is_empty())
                .collect(),
        };
        let _ = catalogue.push(item);
    }

    let text = read_text(&events_path)?;
    let mut users = Vec::new();
    let mut user_lines: HashMap<String, usize> = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let record: UserLine = parse_line(&events_path, line_no, line)?;
        let user = record.user.into_string();
        if let Some(&first_line) = user_lines.get(&user) {
            return Err(Error::DuplicateUser {
                path: events_path,
                line: line_no,
                user,
                first_line,
            });
        }
        user_lines.insert(user.clone(), line_no);
        if record.events.is_empty() {
            return Err(Error::EmptyUser { path: events_path, line: line_no, user });
        }
        let mut events = Vec::with_capacity(record.events.len());
        let mut last_ts: Option<i64> = None;
        for event in record.events {
            if let (Some(prev), Some(ts)) = (last_ts, event.timestamp)
                && ts < prev
            {
                return Err(Error::malformed(
                    &events_path,
                    line_no,
                    format!("user {user:?}: events are not in time order ({ts} after {prev})"),
                ));
            }
            last_ts = event.timestamp.or(last_ts);
            let id = event.item.into_string();
            let item =
                resolve_item(&mut catalogue, &id, options.unknown_items, &events_path, line_no)?;
            let query = event.query.map(|q| clean_text(&q)).filter(|q| !q.is_empty());
            let kind = event.kind.unwrap_or(if query.is_some() {
                EventKind::Search
            } else {
                EventKind::Rec
            });
            events.push(Event { item, timestamp: event.timestamp, query, kind });
        }
        users.push(BehaviourSequence { user, events });
    }
    Ok(Dataset { catalogue, users, inputs: vec![items_path, events_path] })
}
