//! The Qilin (Xiaohongshu) CSV schema.
//!
//! `notes.csv` is the catalogue (`note_idx`, `note_title`, `note_content`, `taxonomy*_id`).
//! Behaviour comes from `search_{train,test}.csv` (a query, the result list with per-note
//! `click` and `search_timestamp` in seconds) and `recommendation_{train,test}.csv` (result list
//! with `click` and `request_timestamp` in milliseconds). Every clicked result becomes an event:
//! kind `search` with the row's query, or kind `rec`. A user's sequence starts with the
//! `recent_clicked_note_idxs` of their earliest row (no timestamps), then the clicks in time
//! order (milliseconds; ties keep file order). Cells hold Python literals, parsed by [`pylit`].
//!
//! [`pylit`]: super::pylit

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::pylit::{self, PyValue};
use super::{LoadOptions, require_data, require_items, resolve_item, text_start};
use crate::error::{Error, Result, quote};
use crate::model::{BehaviourSequence, Catalogue, Dataset, Event, EventKind, Item};
use crate::text::clean_text;

const BEHAVIOUR_FILES: &[(&str, EventKind)] = &[
    ("search_train.csv", EventKind::Search),
    ("search_test.csv", EventKind::Search),
    ("recommendation_train.csv", EventKind::Rec),
    ("recommendation_test.csv", EventKind::Rec),
];

struct Csv {
    path: PathBuf,
    headers: csv::StringRecord,
    reader: csv::Reader<std::fs::File>,
}

impl Csv {
    fn open(path: PathBuf) -> Result<Self> {
        let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // A UTF-8 byte-order mark is skipped, UTF-16 reported (the CSV reader would only say
        // "invalid UTF-8" or miss the first column's name).
        let mut head = Vec::with_capacity(4);
        (&mut file).take(4).read_to_end(&mut head).map_err(|e| Error::io(&path, e))?;
        let bom = text_start(&path, &head)?;
        file.seek(SeekFrom::Start(bom as u64)).map_err(|e| Error::io(&path, e))?;
        let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(file);
        let headers = reader.headers().map_err(|e| csv_error(&path, e))?.clone();
        Ok(Self { path, headers, reader })
    }

    fn column(&self, name: &str) -> Result<usize> {
        self.headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| Error::malformed(&self.path, 1, format!("missing column {name:?}")))
    }

    fn optional_column(&self, name: &str) -> Option<usize> {
        self.headers.iter().position(|h| h == name)
    }

    /// The next record and its 1-based starting line.
    fn next(&mut self) -> Result<Option<(csv::StringRecord, usize)>> {
        let mut record = csv::StringRecord::new();
        match self.reader.read_record(&mut record) {
            Ok(false) => Ok(None),
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line() as usize);
                Ok(Some((record, line)))
            }
            Err(e) => Err(csv_error(&self.path, e)),
        }
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map_or(0, |p| p.line() as usize);
    Error::malformed(path, line, format!("bad CSV: {e}"))
}

fn cell<'r>(
    record: &'r csv::StringRecord,
    column: usize,
    path: &Path,
    line: usize,
) -> Result<&'r str> {
    record
        .get(column)
        .ok_or_else(|| Error::malformed(path, line, format!("row has no column {}", column + 1)))
}

/// An integer id written as `12` or `12.0`.
fn parse_id(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if let Ok(i) = raw.parse::<u64>() {
        return Some(i.to_string());
    }
    let x = raw.parse::<f64>().ok()?;
    (x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 9.0e15).then(|| (x as u64).to_string())
}

fn bad_cell(path: &Path, line: usize, column: &str, why: impl std::fmt::Display) -> Error {
    Error::malformed(path, line, format!("bad cell in column {column:?}: {why}"))
}

/// Parses a list-of-ids cell such as `[1328732  944054 ...]`.
fn id_list(raw: &str, path: &Path, line: usize, column: &str) -> Result<Vec<String>> {
    let value = pylit::parse(raw).map_err(|e| bad_cell(path, line, column, e))?;
    let PyValue::List(values) = value else {
        return Err(bad_cell(path, line, column, "not a list"));
    };
    values
        .iter()
        .map(|v| {
            v.as_f64().and_then(|x| parse_id(&x.to_string())).ok_or_else(|| {
                bad_cell(path, line, column, format!("{} is not an id", quote(&format!("{v:?}"))))
            })
        })
        .collect()
}

#[derive(Default)]
struct UserAcc {
    /// `(row timestamp, history)` of the earliest row seen so far.
    prefix: Option<(i64, Vec<u32>)>,
    /// `(timestamp, event)` in file order.
    events: Vec<(i64, Event)>,
}

/// The users of the behaviour files as they are read: their order of first appearance and what
/// each has gathered so far.
#[derive(Default)]
struct Users {
    /// User ids in order of first appearance.
    order: Vec<String>,
    /// What each user has gathered so far.
    accs: HashMap<String, UserAcc>,
}

/// The columns of one behaviour file, and the key and scale (to milliseconds) of its result
/// timestamps.
struct BehaviourColumns {
    user: usize,
    history: usize,
    results: usize,
    query: Option<usize>,
    results_name: &'static str,
    ts_key: &'static str,
    ts_scale: f64,
}

/// `(timestamp, note id)` of the clicked results of a row, in result order.
type Clicks = Vec<(i64, String)>;

/// One behaviour row, parsed but not yet resolved against the catalogue.
struct Row {
    /// 1-based starting line of the row.
    line: usize,
    user: String,
    /// The cleaned query, when non-empty (search files only).
    query: Option<String>,
    /// The earliest result timestamp of the row, when it has results.
    row_ts: Option<i64>,
    /// `(timestamp, note id)` of every clicked result, in result order.
    clicks: Clicks,
    /// The `recent_clicked_note_idxs` cell.
    history: Vec<String>,
}

pub(super) fn load(dir: &Path, options: &LoadOptions) -> Result<Dataset> {
    let notes_path = dir.join("notes.csv");
    let mut catalogue = read_notes(&notes_path)?;

    require_items(&catalogue, &notes_path, options)?;

    let mut inputs = vec![notes_path];
    let mut users = Users::default();
    for &(file, kind) in BEHAVIOUR_FILES {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        read_behaviour_file(&path, kind, &mut catalogue, &mut users, options)?;
        inputs.push(path);
    }

    let users = users.into_sequences();
    if inputs.len() == 1 && !catalogue.is_empty() {
        let names: Vec<&str> = BEHAVIOUR_FILES.iter().map(|(name, _)| *name).collect();
        return Err(Error::empty(
            dir,
            format!("no behaviour file, so no users: expected one of {}", names.join(", ")),
        ));
    }
    let dataset = Dataset { catalogue, users, inputs };
    require_data(&dataset, &dataset.inputs[0], &dataset.inputs[1..])?;
    Ok(dataset)
}

/// Reads `notes.csv` into a catalogue, refusing a note id seen twice.
fn read_notes(notes_path: &Path) -> Result<Catalogue> {
    let mut catalogue = Catalogue::new();
    let mut notes = Csv::open(notes_path.to_path_buf())?;
    let id_col = notes.column("note_idx")?;
    let title_col = notes.column("note_title")?;
    let content_col = notes.optional_column("note_content");
    let taxonomy: Vec<usize> = ["taxonomy1_id", "taxonomy2_id", "taxonomy3_id"]
        .iter()
        .filter_map(|c| notes.optional_column(c))
        .collect();
    let mut note_lines: HashMap<String, usize> = HashMap::new();
    while let Some((record, line)) = notes.next()? {
        let raw_id = cell(&record, id_col, notes_path, line)?;
        let id = parse_id(raw_id).ok_or_else(|| {
            bad_cell(notes_path, line, "note_idx", format!("{} is not an id", quote(raw_id)))
        })?;
        if let Some(&first_line) = note_lines.get(&id) {
            return Err(Error::DuplicateItem {
                path: notes_path.to_path_buf(),
                line,
                item: id,
                first_line,
            });
        }
        note_lines.insert(id.clone(), line);
        let title = clean_text(cell(&record, title_col, notes_path, line)?);
        let mut text = Vec::new();
        if let Some(c) = content_col {
            let content = clean_text(cell(&record, c, notes_path, line)?);
            if !content.is_empty() {
                text.push(("content".to_string(), content));
            }
        }
        let categories = taxonomy
            .iter()
            .filter_map(|&c| record.get(c))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        let title = if title.is_empty() { id.clone() } else { title };
        let _ = catalogue.push(Item { id, title, text, categories });
    }
    Ok(catalogue)
}

/// Reads one behaviour file of `kind` into `users`, resolving its notes against `catalogue`.
fn read_behaviour_file(
    path: &Path,
    kind: EventKind,
    catalogue: &mut Catalogue,
    users: &mut Users,
    options: &LoadOptions,
) -> Result<()> {
    let mut csv = Csv::open(path.to_path_buf())?;
    let columns = BehaviourColumns::find(&csv, kind)?;
    while let Some((record, line)) = csv.next()? {
        let row = columns.parse_row(&record, path, line)?;
        users.add_row(row, kind, catalogue, options, path)?;
    }
    Ok(())
}

impl BehaviourColumns {
    /// Finds the columns a behaviour file of `kind` needs.
    fn find(csv: &Csv, kind: EventKind) -> Result<Self> {
        let user = csv.column("user_idx")?;
        let history = csv.column("recent_clicked_note_idxs")?;
        let (results_name, ts_key, ts_scale) = match kind {
            EventKind::Search => ("search_result_details_with_idx", "search_timestamp", 1000.0),
            EventKind::Rec => ("rec_result_details_with_idx", "request_timestamp", 1.0),
        };
        let results = csv.column(results_name)?;
        let query = match kind {
            EventKind::Search => Some(csv.column("query")?),
            EventKind::Rec => None,
        };
        Ok(Self { user, history, results, query, results_name, ts_key, ts_scale })
    }

    /// Parses the row `record`, which starts at `line` of `path`.
    fn parse_row(&self, record: &csv::StringRecord, path: &Path, line: usize) -> Result<Row> {
        let raw_user = cell(record, self.user, path, line)?;
        let user = parse_id(raw_user).ok_or_else(|| {
            bad_cell(path, line, "user_idx", format!("{} is not an id", quote(raw_user)))
        })?;
        let query = match self.query {
            Some(c) => Some(clean_text(cell(record, c, path, line)?)).filter(|q| !q.is_empty()),
            None => None,
        };
        let (row_ts, clicks) = self.clicks(cell(record, self.results, path, line)?, path, line)?;
        let history = id_list(
            cell(record, self.history, path, line)?,
            path,
            line,
            "recent_clicked_note_idxs",
        )?;
        Ok(Row { line, user, query, row_ts, clicks, history })
    }

    /// Parses a result-list cell: the earliest result timestamp (in milliseconds) and the
    /// `(timestamp, note id)` of every clicked result.
    fn clicks(&self, raw: &str, path: &Path, line: usize) -> Result<(Option<i64>, Clicks)> {
        let results_name = self.results_name;
        let results = pylit::parse(raw).map_err(|e| bad_cell(path, line, results_name, e))?;
        let PyValue::List(results) = results else {
            return Err(bad_cell(path, line, results_name, "not a list"));
        };
        let mut row_ts: Option<i64> = None;
        let mut clicks = Vec::new();
        for result in &results {
            let field = |key: &str| {
                result.get(key).and_then(PyValue::as_f64).ok_or_else(|| {
                    bad_cell(path, line, results_name, format!("a result lacks a numeric {key:?}"))
                })
            };
            let ts = (field(self.ts_key)? * self.ts_scale).round() as i64;
            row_ts = Some(row_ts.map_or(ts, |r| r.min(ts)));
            if field("click")? > 0.0 {
                let raw = field("note_idx")?;
                let id = parse_id(&raw.to_string()).ok_or_else(|| {
                    bad_cell(path, line, results_name, format!("bad note_idx {raw}"))
                })?;
                clicks.push((ts, id));
            }
        }
        Ok((row_ts, clicks))
    }
}

impl Users {
    /// Adds a row of a `kind` file read from `path`: its history becomes the user's prefix when
    /// the row is the user's earliest so far, and its clicks become events.
    fn add_row(
        &mut self,
        row: Row,
        kind: EventKind,
        catalogue: &mut Catalogue,
        options: &LoadOptions,
        path: &Path,
    ) -> Result<()> {
        let Row { line, user, query, row_ts, clicks, history } = row;
        let acc = self.accs.entry(user.clone()).or_insert_with(|| {
            self.order.push(user.clone());
            UserAcc::default()
        });
        let row_ts = row_ts.unwrap_or(i64::MAX);
        if acc.prefix.as_ref().is_none_or(|(ts, _)| row_ts < *ts) {
            let items = history
                .iter()
                .map(|id| resolve_item(catalogue, id, options.unknown_items, path, line))
                .collect::<Result<Vec<u32>>>()?;
            acc.prefix = Some((row_ts, items));
        }
        for (ts, id) in clicks {
            let item = resolve_item(catalogue, &id, options.unknown_items, path, line)?;
            let query = if kind == EventKind::Search { query.clone() } else { None };
            acc.events.push((ts, Event { item, timestamp: Some(ts), query, kind }));
        }
        Ok(())
    }

    /// The users' sequences in order of first appearance: the prefix, then the clicks in time
    /// order; users without events are left out.
    fn into_sequences(mut self) -> Vec<BehaviourSequence> {
        let mut users = Vec::new();
        for user in self.order {
            let Some(mut acc) = self.accs.remove(&user) else { continue };
            acc.events.sort_by_key(|(ts, _)| *ts);
            let mut events: Vec<Event> = acc
                .prefix
                .map(|(_, items)| items)
                .unwrap_or_default()
                .into_iter()
                .map(|item| Event { item, timestamp: None, query: None, kind: EventKind::Rec })
                .collect();
            events.extend(acc.events.into_iter().map(|(_, e)| e));
            if !events.is_empty() {
                users.push(BehaviourSequence { user, events });
            }
        }
        users
    }
}
