//! The generic JSONL layout (specified in docs/data-format.md): bring your own data.
//!
//! `items.jsonl`: one item per line, `{"id", "title", "text"?, "categories"?}`.
//! `events.jsonl`: one user per line, `{"user", "events": [{"item", "timestamp"?, "query"?,
//! "kind"?}]}` with events in time order. One user per line keeps the "empty or duplicate
//! user" checks exact and the file greppable.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

use super::{
    IdVisitor, LoadOptions, json_message, read_text, require_data, require_items, resolve_item,
};
use crate::error::{Error, Result, quote};
use crate::model::{BehaviourSequence, Catalogue, Dataset, Event, EventKind, Item};
use crate::text::clean_text;

fn item_id<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    d.deserialize_any(IdVisitor { field: "field \"id\"" })
}

fn event_item<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    d.deserialize_any(IdVisitor { field: "field \"events[].item\"" })
}

fn user_id<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    d.deserialize_any(IdVisitor { field: "field \"user\"" })
}

/// A timestamp as written: an integer, or a float (RecBole writes `timestamp:float`).
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Timestamp {
    Int(i64),
    Float(f64),
}

impl Timestamp {
    /// The stored integer clock: floats rounded to the nearest integer (rounding keeps a
    /// non-decreasing sequence non-decreasing; only the order matters downstream).
    fn to_i64(self) -> i64 {
        match self {
            Timestamp::Int(i) => i,
            Timestamp::Float(x) => x.round() as i64,
        }
    }

    /// Whether `self` is earlier than `other`, exactly for integers.
    fn before(self, other: Timestamp) -> bool {
        match (self, other) {
            (Timestamp::Int(a), Timestamp::Int(b)) => a < b,
            _ => self.as_f64() < other.as_f64(),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Timestamp::Int(i) => i as f64,
            Timestamp::Float(x) => x,
        }
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Timestamp::Int(i) => write!(f, "{i}"),
            Timestamp::Float(x) => write!(f, "{x}"),
        }
    }
}

struct TimestampVisitor;

impl serde::de::Visitor<'_> for TimestampVisitor {
    type Value = Option<Timestamp>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an integer or a number for field \"events[].timestamp\"")
    }

    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
        Ok(Some(Timestamp::Int(v)))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
        i64::try_from(v).map(|v| Some(Timestamp::Int(v))).map_err(|_| {
            E::custom(format!("field \"events[].timestamp\": {v} is larger than {}", i64::MAX))
        })
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
        // 2^63: the first float that does not fit an i64.
        const LIMIT: f64 = 9_223_372_036_854_775_808.0;
        if v.is_finite() && v.abs() < LIMIT {
            Ok(Some(Timestamp::Float(v)))
        } else {
            Err(E::custom(format!("field \"events[].timestamp\": {v:e} is out of range")))
        }
    }
}

fn timestamp<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Timestamp>, D::Error> {
    d.deserialize_any(TimestampVisitor)
}

#[derive(Deserialize)]
struct ItemLine {
    #[serde(deserialize_with = "item_id")]
    id: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    text: BTreeMap<String, String>,
    #[serde(default)]
    categories: Vec<String>,
}

#[derive(Deserialize)]
struct EventRecord {
    #[serde(deserialize_with = "event_item")]
    item: String,
    #[serde(default, deserialize_with = "timestamp")]
    timestamp: Option<Timestamp>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    kind: Option<EventKind>,
}

#[derive(Deserialize)]
struct UserLine {
    #[serde(deserialize_with = "user_id")]
    user: String,
    events: Vec<EventRecord>,
}

fn parse_line<T: serde::de::DeserializeOwned>(
    path: &Path,
    line_no: usize,
    line: &str,
) -> Result<T> {
    serde_json::from_str(line).map_err(|e| Error::malformed(path, line_no, json_message(&e)))
}

pub(super) fn load(dir: &Path, options: &LoadOptions) -> Result<Dataset> {
    let items_path = dir.join("items.jsonl");
    let events_path = dir.join("events.jsonl");
    let mut catalogue = read_items(&items_path)?;

    require_items(&catalogue, &items_path, options)?;

    let users = read_users(&events_path, &mut catalogue, options)?;
    let dataset = Dataset { catalogue, users, inputs: vec![items_path.clone(), events_path] };
    require_data(&dataset, &items_path, &dataset.inputs[1..])?;
    Ok(dataset)
}

/// Reads `items.jsonl` into a catalogue, refusing an item id seen twice.
fn read_items(items_path: &Path) -> Result<Catalogue> {
    let mut catalogue = Catalogue::new();
    let mut item_lines: HashMap<String, usize> = HashMap::new();
    let text = read_text(items_path)?;
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let record: ItemLine = parse_line(items_path, line_no, line)?;
        let id = record.id;
        if let Some(&first_line) = item_lines.get(&id) {
            return Err(Error::DuplicateItem {
                path: items_path.to_path_buf(),
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
    Ok(catalogue)
}

/// Reads `events.jsonl` into behaviour sequences, one per line, refusing a user seen twice or
/// without events.
fn read_users(
    events_path: &Path,
    catalogue: &mut Catalogue,
    options: &LoadOptions,
) -> Result<Vec<BehaviourSequence>> {
    let text = read_text(events_path)?;
    let mut users = Vec::new();
    let mut user_lines: HashMap<String, usize> = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let record: UserLine = parse_line(events_path, line_no, line)?;
        let user = record.user;
        if let Some(&first_line) = user_lines.get(&user) {
            return Err(Error::DuplicateUser {
                path: events_path.to_path_buf(),
                line: line_no,
                user,
                first_line,
            });
        }
        user_lines.insert(user.clone(), line_no);
        if record.events.is_empty() {
            return Err(Error::EmptyUser { path: events_path.to_path_buf(), line: line_no, user });
        }
        let source = LineSource { path: events_path, line_no, user: &user };
        let events = user_events(record.events, &source, catalogue, options)?;
        users.push(BehaviourSequence { user, events });
    }
    Ok(users)
}

/// Where a user's events were read: the file, the 1-based line and the user (for errors).
struct LineSource<'a> {
    path: &'a Path,
    line_no: usize,
    user: &'a str,
}

/// Turns a user's event records into events, checking their time order and resolving their
/// items against `catalogue`.
fn user_events(
    records: Vec<EventRecord>,
    source: &LineSource,
    catalogue: &mut Catalogue,
    options: &LoadOptions,
) -> Result<Vec<Event>> {
    let &LineSource { path: events_path, line_no, user } = source;
    let mut events = Vec::with_capacity(records.len());
    let mut last_ts: Option<Timestamp> = None;
    for (position, event) in records.into_iter().enumerate() {
        if let (Some(prev), Some(ts)) = (last_ts, event.timestamp)
            && ts.before(prev)
        {
            return Err(Error::malformed(
                events_path,
                line_no,
                format!("user {}: events are not in time order ({ts} after {prev})", quote(user)),
            ));
        }
        last_ts = event.timestamp.or(last_ts);
        let item =
            resolve_item(catalogue, &event.item, options.unknown_items, events_path, line_no)?;
        let query = event.query.map(|q| clean_text(&q)).filter(|q| !q.is_empty());
        let kind = match (event.kind, &query) {
            (Some(EventKind::Search), None) => {
                return Err(Error::malformed(
                    events_path,
                    line_no,
                    format!(
                        "user {}, event {}: kind \"search\" needs a non-empty \
                         \"query\" (give the query, or use kind \"rec\")",
                        quote(user),
                        position + 1
                    ),
                ));
            }
            (Some(kind), _) => kind,
            (None, Some(_)) => EventKind::Search,
            (None, None) => EventKind::Rec,
        };
        events.push(Event { item, timestamp: event.timestamp.map(Timestamp::to_i64), query, kind });
    }
    Ok(events)
}
