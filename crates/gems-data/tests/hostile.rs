//! Hostile inputs for every parser of user files (issue 14): regression tests for each defect
//! found by hand, and proptest "fuzzing" of hostile bytes that must never panic.
//!
//! Nothing here measures time. Inputs that were quadratic are made big enough (1.6 MB) that the
//! old code would take minutes, so a regression shows as a hung test, not as a flaky bound.

use std::error::Error as _;
use std::path::Path;

use gems_data::{
    DataFormat, Dataset, Error, LoadOptions, PrepareConfig, clean_text, load_dataset, prepare,
};
use proptest::prelude::*;

/// File names and contents.
type Files<'a> = &'a [(&'a str, &'a [u8])];
type OwnedFiles = Vec<(&'static str, Vec<u8>)>;

/// Writes `files` into a fresh temporary directory.
fn dir_with(files: Files) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    dir
}

fn load(dir: &Path, format: DataFormat) -> gems_data::Result<Dataset> {
    load_dataset(dir, format, &LoadOptions::default())
}

fn load_err(dir: &Path, format: DataFormat) -> String {
    match load(dir, format) {
        Ok(d) => panic!("loaded {} users but should fail", d.users.len()),
        Err(e) => e.to_string(),
    }
}

fn prepare_err(dir: &Path, format: DataFormat) -> String {
    let config = PrepareConfig {
        dataset: "hostile".into(),
        format,
        load: LoadOptions::default(),
        query_synthesis: format.default_query_synthesis(),
        build: Default::default(),
    };
    match prepare(dir, &config, None) {
        Ok(p) => panic!("prepared {} examples but should fail", p.examples.len()),
        Err(e) => e.to_string(),
    }
}

/// The longest message a hostile input may produce: paths plus about 300 characters.
const MAX_MESSAGE: usize = 1000;

/// The first 300 characters of a message, for assertion output.
fn head(message: &str) -> String {
    message.chars().take(300).collect()
}

fn assert_short(message: &str) {
    assert!(message.len() < MAX_MESSAGE, "{} bytes: {}...", message.len(), head(message));
}

const QILIN_NOTES: &str = "note_idx,note_title\n0,first\n1,second\n";
const SEARCH_HEADER: &str =
    "query,recent_clicked_note_idxs,search_result_details_with_idx,user_idx";

/// A Qilin directory whose one search row has the given history and results cells.
fn qilin_with_cells(history: &str, results: &str) -> tempfile::TempDir {
    let row = format!("{SEARCH_HEADER}\ntea,\"{history}\",\"{results}\",7\n");
    dir_with(&[("notes.csv", QILIN_NOTES.as_bytes()), ("search_train.csv", row.as_bytes())])
}

const GOOD_RESULTS: &str = "[{'click': 1, 'note_idx': 0, 'search_timestamp': 5.0}]";

// ------------------------------------------------------------ 1. Python-literal nesting

#[test]
fn qilin_deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [257, 20_000, 30_000, 1_000_000] {
        for (open, close) in [("[", "]"), ("(", ")"), ("{'a': ", "}"), ("array(", ")")] {
            let cell = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let dir = qilin_with_cells("[]", &cell);
            let err = load_err(dir.path(), DataFormat::Qilin);
            assert!(err.contains("search_train.csv:2:"), "{err}");
            assert!(err.contains("search_result_details_with_idx"), "{err}");
            assert!(err.contains("nested deeper than 256 levels"), "{}", head(&err));
            assert_short(&err);
        }
    }
}

#[test]
fn qilin_nesting_at_the_limit_parses_and_errors_quote_little() {
    // 200 levels parse; the history "id" is then a nested list, and the message quotes at
    // most 100 characters of it (it once printed the whole structure).
    let cell = format!("[{}1{}]", "[".repeat(199), "]".repeat(199));
    let dir = qilin_with_cells(&cell, GOOD_RESULTS);
    let err = load_err(dir.path(), DataFormat::Qilin);
    assert!(err.contains("recent_clicked_note_idxs"), "{err}");
    assert!(err.contains("is not an id"), "{err}");
    assert_short(&err);
    // A megabyte-long word, number or note id is cut too.
    for cell in
        ["[x".to_string() + &"y".repeat(1 << 20) + "]", format!("[1{}]", "e".repeat(1 << 20))]
    {
        let err = load_err(qilin_with_cells(&cell, GOOD_RESULTS).path(), DataFormat::Qilin);
        assert_short(&err);
    }
    let notes = format!("note_idx,note_title\n{},t\n", "z".repeat(1 << 20));
    let dir = dir_with(&[("notes.csv", notes.as_bytes())]);
    let err = load_err(dir.path(), DataFormat::Qilin);
    assert!(err.contains("notes.csv:2: bad cell in column \"note_idx\""), "{err}");
    assert_short(&err);
}

// ------------------------------------------------------------ 2. linear text cleaning

#[test]
fn text_cleaning_is_linear_on_runs_of_ampersands_and_open_tags() {
    const N: usize = 1_600_000;
    let amps = "&".repeat(N);
    assert_eq!(clean_text(&amps), amps);
    let open_tags = "<a".repeat(N / 2);
    assert_eq!(clean_text(&open_tags), open_tags);
    // Near misses of every kind: `&` followed by up to ten name characters, no `;`.
    let near = "&amp&#12&#x4<b<".repeat(N / 15);
    assert_eq!(clean_text(&near).len(), near.len());
    // A closed tag at the very end: every `<a` before it is part of one tag.
    let one_tag = format!("{}>", "<a".repeat(N / 2));
    assert_eq!(clean_text(&one_tag), "");
    // Many distinct words in a title (query synthesis from titles keeps them in a set).
    let words: String = (0..200_000).map(|i| format!("w{i} ")).collect();
    assert_eq!(clean_text(&words).len(), words.len() - 1);
}

#[test]
fn a_megabyte_title_of_ampersands_loads() {
    let title = "&".repeat(1_600_000);
    let items = format!("{{\"id\": 1, \"title\": \"{title}\"}}\n");
    let dir = dir_with(&[
        ("items.jsonl", items.as_bytes()),
        ("events.jsonl", b"{\"user\": 1, \"events\": [{\"item\": 1}, {\"item\": 1}]}\n"),
    ]);
    let dataset = load(dir.path(), DataFormat::Jsonl).unwrap();
    assert_eq!(dataset.catalogue.items()[0].title.len(), title.len());
}

// ------------------------------------------------------------ 4. empty inputs

#[test]
fn empty_inputs_fail_naming_the_file() {
    let item = b"{\"id\": 1}\n".as_slice();
    let cases: &[(Files, DataFormat, &str, &str)] = &[
        (
            &[("items.jsonl", b""), ("events.jsonl", b"")],
            DataFormat::Jsonl,
            "items.jsonl",
            "no items",
        ),
        (
            &[("items.jsonl", b"\n \n\t\n"), ("events.jsonl", b"\n")],
            DataFormat::Jsonl,
            "items.jsonl",
            "no items",
        ),
        (
            &[("items.jsonl", item), ("events.jsonl", b"")],
            DataFormat::Jsonl,
            "events.jsonl",
            "no users",
        ),
        (
            &[("items.jsonl", item), ("events.jsonl", b"\n\n  \n")],
            DataFormat::Jsonl,
            "events.jsonl",
            "no users",
        ),
        (
            &[("T.item.json", b"{}"), ("T.inter.json", b"{}")],
            DataFormat::LcRec,
            "T.item.json",
            "no items",
        ),
        (
            &[("T.item.json", b"{\"1\": {}}"), ("T.inter.json", b"{}")],
            DataFormat::LcRec,
            "T.inter.json",
            "no users",
        ),
        (&[("T.txt", b"")], DataFormat::Sasrec, "T.txt", "no users"),
        (&[("T.txt", b"\n   \n\n")], DataFormat::Sasrec, "T.txt", "no users"),
        (&[("notes.csv", b"note_idx,note_title\n")], DataFormat::Qilin, "notes.csv", "no items"),
        (&[("notes.csv", QILIN_NOTES.as_bytes())], DataFormat::Qilin, "", "no behaviour file"),
    ];
    for (files, format, file, what) in cases {
        let dir = dir_with(files);
        let err = load_err(dir.path(), *format);
        assert!(err.contains(what), "{err}");
        let named = if file.is_empty() { dir.path().to_path_buf() } else { dir.path().join(file) };
        assert!(err.starts_with(&format!("{}:", named.display())), "{err}");
    }
    // Qilin behaviour files with a header only: notes, but no users.
    let dir = dir_with(&[
        ("notes.csv", QILIN_NOTES.as_bytes()),
        ("search_train.csv", format!("{SEARCH_HEADER}\n").as_bytes()),
    ]);
    let err = load_err(dir.path(), DataFormat::Qilin);
    assert!(err.contains("search_train.csv: no users"), "{err}");
}

#[test]
fn every_user_with_one_event_fails_at_prepare() {
    let dir = dir_with(&[
        ("items.jsonl", b"{\"id\": 1}\n{\"id\": 2}\n"),
        ("events.jsonl", b"{\"user\": 1, \"events\": [{\"item\": 1}]}\n{\"user\": 2, \"events\": [{\"item\": 2}]}\n"),
    ]);
    let err = prepare_err(dir.path(), DataFormat::Jsonl);
    assert!(err.contains("events.jsonl: no examples: all 2 users have a single event"), "{err}");
    let dir = dir_with(&[("T.txt", b"u1 1\nu2 2\nu3 1\n")]);
    let err = prepare_err(dir.path(), DataFormat::Sasrec);
    assert!(err.contains("T.txt: no examples: all 3 users have a single event"), "{err}");
}

// ------------------------------------------------------------ 5. SASRec ids

#[test]
fn sasrec_non_integer_id_is_an_error_naming_file_line_and_id() {
    let dir = dir_with(&[("T.txt", b"1 1 2 3\n2 4 B00X 5\n")]);
    let err = load_err(dir.path(), DataFormat::Sasrec);
    assert!(err.contains("T.txt:2: item id \"B00X\" is not a non-negative integer"), "{err}");
    for bad in ["-3", "+3", "1.0", "1e3", "18446744073709551616"] {
        let text = format!("1 1 {bad}\n");
        let dir = dir_with(&[("T.txt", text.as_bytes())]);
        let err = load_err(dir.path(), DataFormat::Sasrec);
        assert!(err.contains(&format!("T.txt:1: item id \"{bad}\"")), "{err}");
    }
}

#[test]
fn sasrec_vocabulary_is_in_numeric_order() {
    let dir = dir_with(&[("T.txt", b"u 10 9 2\nv 1 007 3 4 5 6 8\n")]);
    let dataset = load(dir.path(), DataFormat::Sasrec).unwrap();
    let ids: Vec<&str> = dataset.catalogue.items().iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]);
    for (index, item) in dataset.catalogue.items().iter().enumerate() {
        assert_eq!(item.id.parse::<usize>().unwrap(), index + 1);
    }
    // `007` is item 7.
    assert_eq!(dataset.users[1].events[1].item, 6);
}

// ------------------------------------------------------------ 6. messages and encodings

fn jsonl(items: &str, events: &str) -> tempfile::TempDir {
    dir_with(&[("items.jsonl", items.as_bytes()), ("events.jsonl", events.as_bytes())])
}

const TWO_ITEMS: &str = "{\"id\": 1}\n{\"id\": \"b\"}\n";

#[test]
fn bad_ids_name_the_field_and_the_value() {
    let dir = jsonl(TWO_ITEMS, "{\"user\": 1, \"events\": [{\"item\": 1.5}]}\n");
    let err = load_err(dir.path(), DataFormat::Jsonl);
    assert!(err.contains("events.jsonl:1:"), "{err}");
    assert!(err.contains("1.5") && err.contains("field \"events[].item\""), "{err}");
    assert!(!err.contains("untagged"), "{err}");
    let dir = jsonl("{\"id\": [1]}\n", "");
    let err = load_err(dir.path(), DataFormat::Jsonl);
    assert!(err.contains("items.jsonl:1:") && err.contains("field \"id\""), "{err}");
    let dir = jsonl(TWO_ITEMS, "{\"user\": null, \"events\": [{\"item\": 1}]}\n");
    let err = load_err(dir.path(), DataFormat::Jsonl);
    assert!(err.contains("null") && err.contains("field \"user\""), "{err}");
    let dir =
        dir_with(&[("T.item.json", b"{\"1\": {}}"), ("T.inter.json", b"{\n\"u\": [1, 2.5]}")]);
    let err = load_err(dir.path(), DataFormat::LcRec);
    assert!(err.contains("T.inter.json:2:") && err.contains("2.5"), "{err}");
    assert!(err.contains("\"u\"") && err.contains("item id"), "{err}");
}

#[test]
fn negative_ids_and_float_timestamps_are_accepted() {
    let dir = jsonl(
        "{\"id\": -5}\n{\"id\": 7}\n",
        "{\"user\": -1, \"events\": [{\"item\": -5, \"timestamp\": 978300760.0}, \
         {\"item\": \"-5\", \"timestamp\": 978300760.5}, {\"item\": 7, \"timestamp\": 978300761}]}\n",
    );
    let dataset = load(dir.path(), DataFormat::Jsonl).unwrap();
    assert_eq!(dataset.catalogue.items()[0].id, "-5");
    assert_eq!(dataset.users[0].user, "-1");
    let events = &dataset.users[0].events;
    assert_eq!(events[0].item, 0);
    assert_eq!(events[1].item, 0);
    let stamps: Vec<i64> = events.iter().filter_map(|e| e.timestamp).collect();
    assert_eq!(stamps, [978300760, 978300761, 978300761]);
    // Order is checked on the values as written, before rounding.
    let dir = jsonl(
        TWO_ITEMS,
        "{\"user\": 1, \"events\": [{\"item\": 1, \"timestamp\": 1.7}, {\"item\": 1, \"timestamp\": 1.5}]}\n",
    );
    let err = load_err(dir.path(), DataFormat::Jsonl);
    assert!(err.contains("events.jsonl:1:") && err.contains("not in time order"), "{err}");
    let dir =
        jsonl(TWO_ITEMS, "{\"user\": 1, \"events\": [{\"item\": 1, \"timestamp\": 1e300}]}\n");
    let err = load_err(dir.path(), DataFormat::Jsonl);
    assert!(err.contains("events.jsonl:1:") && err.contains("out of range"), "{err}");
}

#[test]
fn a_search_event_without_a_query_is_an_error() {
    for event in [
        "{\"item\": 1, \"kind\": \"search\"}",
        "{\"item\": 1, \"kind\": \"search\", \"query\": \" <b></b> \"}",
    ] {
        let events = format!(
            "{{\"user\": 1, \"events\": [{{\"item\": 1}}]}}\n\n{{\"user\": 2, \"events\": [{{\"item\": 1}}, {event}]}}\n"
        );
        let err = load_err(jsonl(TWO_ITEMS, &events).path(), DataFormat::Jsonl);
        assert!(err.contains("events.jsonl:3: user \"2\", event 2: kind \"search\""), "{err}");
    }
    let events = "{\"user\": 1, \"events\": [{\"item\": 1, \"kind\": \"rec\"}, \
                  {\"item\": \"b\", \"query\": \"tea\"}]}\n";
    let dataset = load(jsonl(TWO_ITEMS, events).path(), DataFormat::Jsonl).unwrap();
    assert_eq!(dataset.users[0].events[1].kind, gems_data::EventKind::Search);
}

fn with_bom(text: &str) -> Vec<u8> {
    let mut bytes = vec![0xEF, 0xBB, 0xBF];
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

fn utf16(text: &str, bom: bool) -> Vec<u8> {
    let mut bytes = if bom { vec![0xFF, 0xFE] } else { Vec::new() };
    bytes.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    bytes
}

#[test]
fn a_utf8_byte_order_mark_is_skipped_in_every_layout() {
    let events = "{\"user\": 1, \"events\": [{\"item\": 1}, {\"item\": \"b\"}]}\n";
    let dir =
        dir_with(&[("items.jsonl", &with_bom(TWO_ITEMS)), ("events.jsonl", &with_bom(events))]);
    assert_eq!(load(dir.path(), DataFormat::Jsonl).unwrap().users.len(), 1);
    let dir = dir_with(&[
        ("T.item.json", &with_bom("{\"1\": {\"title\": \"x\"}}")),
        ("T.inter.json", &with_bom("{\"u\": [1, 1]}")),
    ]);
    assert_eq!(load(dir.path(), DataFormat::LcRec).unwrap().users.len(), 1);
    let dir = dir_with(&[("T.txt", &with_bom("1 1 2\n"))]);
    assert_eq!(load(dir.path(), DataFormat::Sasrec).unwrap().users.len(), 1);
    let search = format!("{SEARCH_HEADER}\ntea,[1],\"{GOOD_RESULTS}\",7\n");
    let dir = dir_with(&[
        ("notes.csv", &with_bom(QILIN_NOTES)),
        ("search_train.csv", &with_bom(&search)),
    ]);
    let dataset = load(dir.path(), DataFormat::Qilin).unwrap();
    assert_eq!(dataset.users[0].events.len(), 2);
}

#[test]
fn utf16_is_reported_as_utf16() {
    for bom in [true, false] {
        let dir = dir_with(&[("items.jsonl", &utf16(TWO_ITEMS, bom)), ("events.jsonl", b"")]);
        let err = load_err(dir.path(), DataFormat::Jsonl);
        assert!(err.contains("items.jsonl:1: the file is UTF-16LE"), "{err}");
        assert!(err.contains("re-encode it as UTF-8"), "{err}");
        let dir = dir_with(&[("notes.csv", &utf16(QILIN_NOTES, bom))]);
        let err = load_err(dir.path(), DataFormat::Qilin);
        assert!(err.contains("notes.csv:1: the file is UTF-16LE"), "{err}");
        let dir = dir_with(&[("T.txt", &utf16("1 1 2\n", bom))]);
        assert!(load_err(dir.path(), DataFormat::Sasrec).contains("UTF-16LE"));
        let dir = dir_with(&[("T.item.json", &utf16("{}", bom)), ("T.inter.json", b"{}")]);
        assert!(load_err(dir.path(), DataFormat::LcRec).contains("UTF-16LE"));
    }
    let mut be = vec![0xFE, 0xFF];
    be.extend("1 1 2\n".encode_utf16().flat_map(u16::to_be_bytes));
    let dir = dir_with(&[("T.txt", &be)]);
    assert!(load_err(dir.path(), DataFormat::Sasrec).contains("UTF-16BE"));
}

#[test]
fn a_missing_file_states_its_cause_once() {
    let dir = dir_with(&[("items.jsonl", TWO_ITEMS.as_bytes())]);
    let err = load(dir.path(), DataFormat::Jsonl).unwrap_err();
    assert!(matches!(err, Error::Files(gems_io::Error::Io { .. })), "{err:?}");
    assert!(err.source().is_none(), "the cause is in the message; source() would repeat it");
    let message = err.to_string();
    assert!(message.contains("events.jsonl: "), "{message}");
    let dir = dir_with(&[("search_train.csv", b"x\n")]);
    let err = load(dir.path(), DataFormat::Qilin).unwrap_err();
    assert!(err.to_string().contains("notes.csv: ") && err.source().is_none(), "{err}");
}

#[test]
fn hostile_strings_are_quoted_short() {
    let long = "q".repeat(1 << 20);
    // An unknown item, a duplicate user, a wrong-typed field holding a long string.
    let events = format!("{{\"user\": 1, \"events\": [{{\"item\": \"{long}\"}}]}}\n");
    let err = load_err(jsonl(TWO_ITEMS, &events).path(), DataFormat::Jsonl);
    assert!(err.contains("unknown item id \"qqq"), "{}", head(&err));
    assert_short(&err);
    let events = format!(
        "{{\"user\": \"{long}\", \"events\": [{{\"item\": 1}}]}}\n{{\"user\": \"{long}\", \"events\": [{{\"item\": 1}}]}}\n"
    );
    let err = load_err(jsonl(TWO_ITEMS, &events).path(), DataFormat::Jsonl);
    assert!(err.contains("duplicate user"), "{}", head(&err));
    assert_short(&err);
    let items = format!("{{\"id\": 1, \"categories\": \"{long}\"}}\n");
    let err = load_err(jsonl(&items, "").path(), DataFormat::Jsonl);
    assert!(err.contains("items.jsonl:1: invalid type: string"), "{}", head(&err));
    assert!(err.contains("expected a sequence"), "{}", head(&err));
    assert_short(&err);
    let inter = format!("{{\"{long}\": 5}}");
    let dir = dir_with(&[("T.item.json", b"{\"1\": {}}"), ("T.inter.json", inter.as_bytes())]);
    assert_short(&load_err(dir.path(), DataFormat::LcRec));
}

#[test]
fn deep_json_never_overflows_the_stack() {
    let deep = format!("{}{}", "[".repeat(1 << 20), "]".repeat(1 << 20));
    let events = "{\"user\": 1, \"events\": [{\"item\": 1}, {\"item\": 1}]}\n";
    // In an unknown field it is skipped (serde_json skips without recursing).
    let items = format!("{{\"id\": 1, \"extra\": {deep}}}\n");
    assert_eq!(load(jsonl(&items, events).path(), DataFormat::Jsonl).unwrap().users.len(), 1);
    // In a typed field it is an error.
    let items = format!("{{\"id\": 1, \"categories\": [{deep}]}}\n");
    let err = load_err(jsonl(&items, events).path(), DataFormat::Jsonl);
    assert!(err.contains("items.jsonl:1:"), "{}", head(&err));
    assert_short(&err);
    let item = format!("{{\"1\": {{\"title\": {deep}}}}}");
    let dir = dir_with(&[("T.item.json", item.as_bytes()), ("T.inter.json", b"{}")]);
    assert_short(&load_err(dir.path(), DataFormat::LcRec));
    let inter = format!("{{\"u\": {deep}}}");
    let dir = dir_with(&[("T.item.json", b"{\"1\": {}}"), ("T.inter.json", inter.as_bytes())]);
    assert_short(&load_err(dir.path(), DataFormat::LcRec));
}

// ------------------------------------------------------------ fuzzing

/// Outcome of one hostile load: never a panic; an error message short and naming its file.
fn check_outcome(result: gems_data::Result<Dataset>, dir: &Path) {
    if let Err(err) = result {
        let message = err.to_string();
        assert!(message.len() < MAX_MESSAGE, "{} bytes: {}", message.len(), head(&message));
        assert!(message.starts_with(&dir.display().to_string()), "{message}");
    }
}

/// Bytes that are mostly the syntax of the layouts, so generated inputs get past the first
/// character; raw bytes (invalid UTF-8, NUL, BOM pieces) mixed in.
fn hostile_bytes(alphabet: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        4 => prop::sample::select(alphabet).prop_map(|s| s.as_bytes().to_vec()),
        1 => any::<u8>().prop_map(|b| vec![b]),
        1 => "[ -~]{0,8}".prop_map(String::into_bytes),
    ];
    prop::collection::vec(token, 0..120).prop_map(|parts| parts.concat())
}

const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\n",
    " ",
    "\"id\"",
    "\"user\"",
    "\"events\"",
    "\"item\"",
    "\"title\"",
    "\"text\"",
    "\"categories\"",
    "\"timestamp\"",
    "\"query\"",
    "\"kind\"",
    "\"search\"",
    "\"rec\"",
    "1",
    "-1",
    "1.5",
    "1e999",
    "18446744073709551616",
    "null",
    "true",
    "\"a\"",
    "&amp;",
    "<b>",
    "\\u0000",
    "\\ud800",
    "\u{feff}",
];

const CSV_TOKENS: &[&str] = &[
    ",",
    "\"",
    "\n",
    "\r\n",
    "[",
    "]",
    "(",
    ")",
    "{",
    "}",
    "'",
    ":",
    " ",
    "1",
    "-1",
    "1.5",
    "nan",
    "inf",
    "None",
    "True",
    "array(",
    "'click'",
    "'note_idx'",
    "'search_timestamp'",
    "'request_timestamp'",
    "\\",
    "e+",
    "\u{feff}",
    "x",
];

const TXT_TOKENS: &[&str] = &[" ", "\t", "\n", "\r\n", "1", "12", "007", "-1", "a", "\u{feff}"];

/// One JSON value of any type, biased to the ids, numbers and strings the loaders meet.
fn json_leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|i| i.to_string()),
        (0u8..4).prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        "[a-z0-9&<>;# ]{0,12}".prop_map(|s| format!("\"{s}\"")),
        prop::sample::select(&["null", "true", "[]", "{}", "\"search\"", "\"rec\"", "1e400"][..])
            .prop_map(String::from),
    ]
}

/// A field `"name": value` present or absent.
fn json_field(name: &'static str) -> impl Strategy<Value = Option<String>> {
    prop::option::of(json_leaf().prop_map(move |v| format!("\"{name}\": {v}")))
}

fn json_object(fields: Vec<Option<String>>) -> String {
    format!("{{{}}}", fields.into_iter().flatten().collect::<Vec<_>>().join(", "))
}

/// `items.jsonl` and `events.jsonl` of the right shape with hostile values.
fn structured_jsonl() -> impl Strategy<Value = (String, String)> {
    let item = (json_field("id"), json_field("title"), json_field("categories"))
        .prop_map(|(a, b, c)| json_object(vec![a, b, c]));
    let event =
        (json_field("item"), json_field("timestamp"), json_field("query"), json_field("kind"))
            .prop_map(|(a, b, c, d)| json_object(vec![a, b, c, d]));
    let user = (json_field("user"), prop::collection::vec(event, 0..5)).prop_map(|(u, events)| {
        json_object(vec![u, Some(format!("\"events\": [{}]", events.join(", ")))])
    });
    (prop::collection::vec(item, 0..6), prop::collection::vec(user, 0..6))
        .prop_map(|(items, users)| (items.join("\n"), users.join("\n")))
}

/// One Python literal leaf as Qilin cells hold them.
fn py_leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        (0u8..3).prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        "[a-z0-9 ]{0,8}".prop_map(|s| format!("'{s}'")),
        prop::sample::select(&["nan", "inf", "None", "True", "-0.0", "1e400", "[]"][..])
            .prop_map(String::from),
    ]
}

/// A results cell: a list of dicts with (some of) the keys the loader reads.
fn py_results() -> impl Strategy<Value = String> {
    let key = prop::sample::select(
        &["'click'", "'note_idx'", "'search_timestamp'", "'request_timestamp'", "'x'"][..],
    );
    let entry = (key, py_leaf()).prop_map(|(k, v)| format!("{k}: {v}"));
    let dict = prop::collection::vec(entry, 0..6).prop_map(|e| format!("{{{}}}", e.join(", ")));
    prop::collection::vec(dict, 0..4).prop_map(|d| format!("[{}]", d.join("\n ")))
}

const SEARCH_HEADER_LINE: &str =
    "query,recent_clicked_note_idxs,search_result_details_with_idx,user_idx\n";
const REC_HEADER_LINE: &str = "recent_clicked_note_idxs,rec_result_details_with_idx,user_idx\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn fuzz_jsonl(items in hostile_bytes(JSON_TOKENS), events in hostile_bytes(JSON_TOKENS)) {
        let dir = dir_with(&[("items.jsonl", &items), ("events.jsonl", &events)]);
        check_outcome(load(dir.path(), DataFormat::Jsonl), dir.path());
        // The same lines after a valid catalogue, so event lines get parsed too.
        let dir = dir_with(&[("items.jsonl", b"{\"id\": 1}\n{\"id\": \"a\"}\n"), ("events.jsonl", &events)]);
        check_outcome(load(dir.path(), DataFormat::Jsonl), dir.path());
    }

    #[test]
    fn fuzz_jsonl_raw_bytes(items in prop::collection::vec(any::<u8>(), 0..600)) {
        let dir = dir_with(&[("items.jsonl", &items), ("events.jsonl", &items)]);
        check_outcome(load(dir.path(), DataFormat::Jsonl), dir.path());
    }

    #[test]
    fn fuzz_lcrec(item in hostile_bytes(JSON_TOKENS), inter in hostile_bytes(JSON_TOKENS)) {
        let dir = dir_with(&[("T.item.json", &item), ("T.inter.json", &inter)]);
        check_outcome(load(dir.path(), DataFormat::LcRec), dir.path());
        let dir = dir_with(&[("T.item.json", b"{\"1\": {}, \"a\": {}}"), ("T.inter.json", &inter)]);
        check_outcome(load(dir.path(), DataFormat::LcRec), dir.path());
    }

    #[test]
    fn fuzz_sasrec(text in hostile_bytes(TXT_TOKENS), raw in prop::collection::vec(any::<u8>(), 0..300)) {
        for bytes in [&text, &raw] {
            let dir = dir_with(&[("T.txt", bytes)]);
            check_outcome(load(dir.path(), DataFormat::Sasrec), dir.path());
        }
    }

    #[test]
    fn fuzz_qilin_csv(notes in hostile_bytes(CSV_TOKENS), search in hostile_bytes(CSV_TOKENS)) {
        let dir = dir_with(&[("notes.csv", &notes), ("search_train.csv", &search)]);
        check_outcome(load(dir.path(), DataFormat::Qilin), dir.path());
    }

    /// Valid headers, hostile cells: every generated cell reaches the Python-literal parser.
    #[test]
    fn fuzz_qilin_literals(history in hostile_bytes(CSV_TOKENS), results in hostile_bytes(CSV_TOKENS)) {
        let cell = |b: &[u8]| String::from_utf8_lossy(b).replace('"', "\"\"");
        let (history, results) = (cell(&history), cell(&results));
        for (name, header) in [("search_train.csv", SEARCH_HEADER_LINE), ("recommendation_train.csv", REC_HEADER_LINE)] {
            let row = if name.starts_with("search") {
                format!("{header}tea,\"{history}\",\"{results}\",7\n")
            } else {
                format!("{header}\"{history}\",\"{results}\",7\n")
            };
            let dir = dir_with(&[("notes.csv", QILIN_NOTES.as_bytes()), (name, row.as_bytes())]);
            check_outcome(load(dir.path(), DataFormat::Qilin), dir.path());
        }
    }

    /// Well-formed lines with hostile values: every semantic check (ids, timestamps, kinds,
    /// queries, duplicates, unknown items) is reached.
    #[test]
    fn fuzz_jsonl_structured((items, events) in structured_jsonl()) {
        let dir = dir_with(&[("items.jsonl", items.as_bytes()), ("events.jsonl", events.as_bytes())]);
        check_outcome(load(dir.path(), DataFormat::Jsonl), dir.path());
    }

    #[test]
    fn fuzz_lcrec_structured(lists in prop::collection::vec((json_leaf(), prop::collection::vec(json_leaf(), 0..5)), 0..5)) {
        let entries: Vec<String> = lists
            .iter()
            .enumerate()
            .map(|(i, (_, ids))| format!("\"u{i}\": [{}]", ids.join(", ")))
            .collect();
        let items: Vec<String> = lists
            .iter()
            .map(|(id, _)| format!("{}: {{\"title\": {id}}}", if id.starts_with('"') { id.clone() } else { format!("\"{id}\"") }))
            .collect();
        let dir = dir_with(&[
            ("T.item.json", format!("{{{}}}", items.join(",\n")).as_bytes()),
            ("T.inter.json", format!("{{{}}}", entries.join(",\n")).as_bytes()),
        ]);
        check_outcome(load(dir.path(), DataFormat::LcRec), dir.path());
    }

    /// Well-formed rows whose results and history cells hold hostile literals.
    #[test]
    fn fuzz_qilin_structured(results in py_results(), history in prop::collection::vec(py_leaf(), 0..5), user in py_leaf()) {
        let history = format!("[{}]", history.join(" "));
        let search = format!("{SEARCH_HEADER_LINE}tea,\"{history}\",\"{results}\",{user}\n");
        let rec = format!("{REC_HEADER_LINE}\"{history}\",\"{results}\",{user}\n");
        let dir = dir_with(&[
            ("notes.csv", QILIN_NOTES.as_bytes()),
            ("search_train.csv", search.as_bytes()),
            ("recommendation_test.csv", rec.as_bytes()),
        ]);
        check_outcome(load(dir.path(), DataFormat::Qilin), dir.path());
        let placeholders = LoadOptions { unknown_items: gems_data::UnknownItemPolicy::Placeholder };
        check_outcome(load_dataset(dir.path(), DataFormat::Qilin, &placeholders), dir.path());
    }

    #[test]
    fn fuzz_clean_text(raw in "\\PC{0,200}", dense in "[&;#<>/a-z0-9 ]{0,200}") {
        for text in [&raw, &dense] {
            let cleaned = clean_text(text);
            prop_assert!(!cleaned.starts_with(' ') && !cleaned.ends_with(' '));
        }
    }
}

/// Megabyte-sized hostile inputs of every layout finish (a quadratic scan would take minutes).
#[test]
fn megabyte_hostile_inputs_finish() {
    const N: usize = 1 << 20;
    let big: Vec<(DataFormat, OwnedFiles)> = vec![
        (DataFormat::Sasrec, vec![("T.txt", "1 ".repeat(N).into_bytes())]),
        (DataFormat::Sasrec, vec![("T.txt", "\n".repeat(N).into_bytes())]),
        (
            DataFormat::Jsonl,
            vec![
                ("items.jsonl", "{\"id\": 1}\n".repeat(N / 10).into_bytes()),
                ("events.jsonl", Vec::new()),
            ],
        ),
        (
            DataFormat::LcRec,
            vec![
                (
                    "T.item.json",
                    format!("{{\"1\": {{\"title\": \"{}\"}}}}", "<a&".repeat(N / 3)).into_bytes(),
                ),
                ("T.inter.json", format!("{{\"u\": [{}1]}}", "1, ".repeat(N / 3)).into_bytes()),
            ],
        ),
        (
            DataFormat::LcRec,
            vec![
                ("T.item.json", b"{\"1\": {}}".to_vec()),
                ("T.inter.json", format!("{{{}}}", "\n".repeat(N)).into_bytes()),
            ],
        ),
        (
            DataFormat::Qilin,
            vec![
                ("notes.csv", QILIN_NOTES.as_bytes().to_vec()),
                (
                    "search_train.csv",
                    format!("{SEARCH_HEADER_LINE}tea,\"[{}]\",\"[]\",7\n", "0 ".repeat(N / 2))
                        .into_bytes(),
                ),
            ],
        ),
        (
            DataFormat::Qilin,
            vec![
                ("notes.csv", QILIN_NOTES.as_bytes().to_vec()),
                (
                    "search_train.csv",
                    format!("{SEARCH_HEADER_LINE}tea,[],\"['{}\",7\n", "\\\\".repeat(N / 2))
                        .into_bytes(),
                ),
            ],
        ),
        (
            DataFormat::Qilin,
            vec![
                ("notes.csv", QILIN_NOTES.as_bytes().to_vec()),
                (
                    "search_train.csv",
                    format!("{SEARCH_HEADER_LINE}tea,[],\"[{}\",7\n", "array(1".repeat(N / 8))
                        .into_bytes(),
                ),
            ],
        ),
    ];
    for (format, files) in big {
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let dir = dir_with(&files);
        check_outcome(load(dir.path(), format), dir.path());
    }
}
