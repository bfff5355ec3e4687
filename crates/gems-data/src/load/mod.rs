//! Loaders from the supported on-disk layouts into the canonical [`Dataset`].
//!
//! Each loader checks what the canonical model relies on (known item ids, non-empty and unique
//! users, well-formed cells) and reports violations with the file and the line, so a user can
//! fix their export instead of guessing.

mod generic;
mod lcrec;
mod pylit;
mod qilin;
mod sasrec;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub(crate) use crate::json_scan::json_message;
use crate::model::{Catalogue, Dataset, Item};
use crate::text::QuerySynthesis;

/// The on-disk layouts this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Amazon in the LC-Rec layout: `*.inter.json` + `*.item.json`.
    LcRec,
    /// SASRec / S3-Rec text: one `user item item ...` line per user in a `*.txt` file.
    Sasrec,
    /// The Qilin CSV schema: `notes.csv` plus search and recommendation CSVs.
    Qilin,
    /// The documented generic layout: `items.jsonl` + `events.jsonl` (docs/data-format.md).
    Jsonl,
}

impl DataFormat {
    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::LcRec => "lc-rec",
            DataFormat::Sasrec => "sasrec",
            DataFormat::Qilin => "qilin",
            DataFormat::Jsonl => "jsonl",
        }
    }

    /// Parses a name produced by [`DataFormat::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        [DataFormat::LcRec, DataFormat::Sasrec, DataFormat::Qilin, DataFormat::Jsonl]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// The query synthesis a format gets unless told otherwise: Amazon LC-Rec data has category
    /// paths and no queries, so it gets Ai et al. queries; the others keep their own.
    pub fn default_query_synthesis(self) -> QuerySynthesis {
        match self {
            DataFormat::LcRec => QuerySynthesis::Categories,
            _ => QuerySynthesis::Off,
        }
    }
}

/// What to do with an event whose item is not in the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum UnknownItemPolicy {
    /// Fail with the file and line (the default).
    #[default]
    Error,
    /// Add an ID-only item whose title is its id (for schema samples such as `qilin_toy`, whose
    /// events point at notes that the sample does not ship).
    Placeholder,
}

/// Options shared by all loaders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoadOptions {
    /// Policy for events that point at unknown items.
    pub unknown_items: UnknownItemPolicy,
}

/// Loads a dataset directory in the given layout.
pub fn load_dataset(dir: &Path, format: DataFormat, options: &LoadOptions) -> Result<Dataset> {
    if !dir.is_dir() {
        return Err(Error::Dataset {
            path: dir.to_path_buf(),
            message: "not a directory (is the data root right? see GEMS_DATA_DIR)".into(),
        });
    }
    match format {
        DataFormat::LcRec => lcrec::load(dir, options),
        DataFormat::Sasrec => sasrec::load(dir),
        DataFormat::Qilin => qilin::load(dir, options),
        DataFormat::Jsonl => generic::load(dir, options),
    }
}

/// Recognises a dataset directory's layout from the files in it.
pub fn detect_format(dir: &Path) -> Result<DataFormat> {
    let names = list_files(dir)?;
    let has = |pred: &dyn Fn(&str) -> bool| names.iter().any(|n| pred(n));
    if has(&|n| n.ends_with(".inter.json")) {
        Ok(DataFormat::LcRec)
    } else if has(&|n| n == "items.jsonl") {
        Ok(DataFormat::Jsonl)
    } else if has(&|n| n == "notes.csv") {
        Ok(DataFormat::Qilin)
    } else if has(&|n| n.ends_with(".txt")) {
        Ok(DataFormat::Sasrec)
    } else {
        Err(Error::Dataset {
            path: dir.to_path_buf(),
            message: "cannot tell the layout: expected *.inter.json (lc-rec), items.jsonl \
                      (jsonl), notes.csv (qilin) or *.txt (sasrec); pass --format"
                .into(),
        })
    }
}

/// A dataset argument resolved to a directory and the settings it implies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// The name given, or the directory's file name.
    pub name: String,
    /// The dataset directory.
    pub dir: PathBuf,
    /// Its layout.
    pub format: DataFormat,
    /// Loader options.
    pub load: LoadOptions,
    /// How missing queries are filled in.
    pub query_synthesis: QuerySynthesis,
}

/// Built-in dataset names and the folders they live in under the data root.
pub const KNOWN_DATASETS: &[(&str, &str, DataFormat)] = &[
    ("scientific", "amazon_scientific", DataFormat::LcRec),
    ("beauty", "amazon_beauty", DataFormat::Sasrec),
    ("qilin_toy", "qilin_toy", DataFormat::Qilin),
];

/// Resolves `--dataset NAME_OR_PATH`: a built-in name is looked up under `data_root`,
/// anything else is a directory whose layout is `format` or auto-detected.
pub fn resolve_dataset(
    name_or_path: &str,
    data_root: &Path,
    format: Option<DataFormat>,
) -> Result<DatasetSpec> {
    if let Some(&(name, folder, known_format)) =
        KNOWN_DATASETS.iter().find(|(name, _, _)| *name == name_or_path)
    {
        let dir = data_root.join(folder);
        if !dir.is_dir() {
            return Err(Error::Dataset {
                path: dir,
                message: format!(
                    "dataset {name:?} not found under the data root {} (set GEMS_DATA_DIR or \
                     --data-root)",
                    data_root.display()
                ),
            });
        }
        let format = format.unwrap_or(known_format);
        // The Qilin toy is a schema sample: its events point at notes it does not ship.
        let unknown_items = if name == "qilin_toy" {
            UnknownItemPolicy::Placeholder
        } else {
            UnknownItemPolicy::Error
        };
        return Ok(DatasetSpec {
            name: name.to_string(),
            dir,
            format,
            load: LoadOptions { unknown_items },
            query_synthesis: format.default_query_synthesis(),
        });
    }
    let dir = PathBuf::from(name_or_path);
    if !dir.is_dir() {
        let names: Vec<&str> = KNOWN_DATASETS.iter().map(|(n, _, _)| *n).collect();
        return Err(Error::Dataset {
            path: dir,
            message: format!("neither a known dataset name ({}) nor a directory", names.join(", ")),
        });
    }
    let format = match format {
        Some(f) => f,
        None => detect_format(&dir)?,
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| name_or_path.to_string());
    Ok(DatasetSpec {
        name,
        dir,
        format,
        load: LoadOptions::default(),
        query_synthesis: format.default_query_synthesis(),
    })
}

/// Sorted file names in a directory.
pub(crate) fn list_files(dir: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.path().is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The one file in `dir` whose name ends with `suffix`; an error if there are none or several.
pub(crate) fn single_file(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let matches: Vec<String> =
        list_files(dir)?.into_iter().filter(|n| n.ends_with(suffix)).collect();
    match matches.as_slice() {
        [one] => Ok(dir.join(one)),
        [] => {
            Err(Error::Dataset { path: dir.to_path_buf(), message: format!("no *{suffix} file") })
        }
        many => Err(Error::Dataset {
            path: dir.to_path_buf(),
            message: format!("several *{suffix} files ({}); keep one", many.join(", ")),
        }),
    }
}

/// Checks the first bytes of a text file: the length of a UTF-8 byte-order mark to skip (0 or
/// 3), or an error saying the file is UTF-16 (or UTF-32) and must be re-encoded as UTF-8.
///
/// UTF-16 without a byte-order mark is recognised by a NUL byte in one of the first two
/// positions, which no text file of these layouts has in UTF-8.
pub(crate) fn text_start(path: &Path, head: &[u8]) -> Result<usize> {
    const UTF8_BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
    if head.starts_with(&UTF8_BOM) {
        return Ok(UTF8_BOM.len());
    }
    let encoding = match head {
        [0xFF, 0xFE, ..] => "UTF-16LE (byte-order mark FF FE)",
        [0xFE, 0xFF, ..] => "UTF-16BE (byte-order mark FE FF)",
        [0, 0, 0xFE, 0xFF, ..] => "UTF-32BE (byte-order mark 00 00 FE FF)",
        [a, 0, ..] if *a != 0 => "UTF-16LE (every other byte is NUL)",
        [0, b, ..] if *b != 0 => "UTF-16BE (every other byte is NUL)",
        _ => return Ok(0),
    };
    Err(Error::malformed(
        path,
        1,
        format!("the file is {encoding}, not UTF-8; re-encode it as UTF-8"),
    ))
}

/// Reads a whole file as UTF-8, naming the line of the first invalid byte. A UTF-8
/// byte-order mark is skipped; UTF-16 is reported as such (see [`text_start`]).
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let mut bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bom = text_start(path, &bytes)?;
    bytes.drain(..bom);
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        Error::malformed(path, line, "not valid UTF-8")
    })
}

/// An id written as a JSON string or integer (negative integers included), kept as the string
/// or the integer's decimal digits. Anything else (a float, `null`, a list) is an error that
/// names the field and shows the value.
pub(crate) struct IdVisitor {
    /// The field, as the error message names it.
    pub(crate) field: &'static str,
}

impl serde::de::Visitor<'_> for IdVisitor {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a string or an integer for {}", self.field)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> std::result::Result<String, E> {
        Ok(v)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
}

/// Fails right after reading a catalogue that has no items, unless unknown items become
/// placeholders (then events alone can make the catalogue).
pub(crate) fn require_items(
    catalogue: &Catalogue,
    catalogue_file: &Path,
    options: &LoadOptions,
) -> Result<()> {
    if catalogue.is_empty() && options.unknown_items == UnknownItemPolicy::Error {
        return Err(Error::empty(catalogue_file, "no items: the catalogue is empty"));
    }
    Ok(())
}

/// Fails when a loaded dataset holds nothing to learn from: no items (naming the catalogue
/// file) or no user with events (naming the behaviour files).
pub(crate) fn require_data(
    dataset: &Dataset,
    catalogue_file: &Path,
    behaviour_files: &[PathBuf],
) -> Result<()> {
    if dataset.catalogue.is_empty() {
        return Err(Error::empty(catalogue_file, "no items: the catalogue is empty"));
    }
    let behaviour = behaviour_files.first().map_or(catalogue_file, PathBuf::as_path);
    if dataset.users.is_empty() {
        let names: Vec<String> = behaviour_files.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::empty(
            behaviour,
            match names.len() {
                0 => "no behaviour file, so no users".to_string(),
                1 => "no users: the file has no user with events".to_string(),
                _ => format!("no users: none of {} has a user with events", names.join(", ")),
            },
        ));
    }
    Ok(())
}

/// Looks an item up, or applies the unknown-item policy.
pub(crate) fn resolve_item(
    catalogue: &mut Catalogue,
    id: &str,
    policy: UnknownItemPolicy,
    path: &Path,
    line: usize,
) -> Result<u32> {
    if let Some(index) = catalogue.index_of(id) {
        return Ok(index);
    }
    match policy {
        UnknownItemPolicy::Error => {
            Err(Error::UnknownItem { path: path.to_path_buf(), line, item: id.to_string() })
        }
        UnknownItemPolicy::Placeholder => Ok(catalogue
            .push(Item {
                id: id.to_string(),
                title: id.to_string(),
                text: Vec::new(),
                categories: Vec::new(),
            })
            .unwrap_or_else(|existing| existing)),
    }
}
