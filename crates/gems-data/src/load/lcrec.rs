//! Amazon in the LC-Rec layout: `NAME.item.json` and `NAME.inter.json`.
//!
//! `item.json` maps an item id to `{title, description, brand, categories}` (categories a
//! comma-separated path from the root); `inter.json` maps a user id to the chronological list of
//! item ids. Items keep the order of `item.json`, so their dense index equals LC-Rec's index.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::{
    IdVisitor, LoadOptions, read_text, require_data, require_items, resolve_item, single_file,
};
use crate::error::{Error, Result};
use crate::json_scan::ObjectEntries;
use crate::model::{BehaviourSequence, Catalogue, Dataset, Event, EventKind, Item};
use crate::text::clean_text;

#[derive(Deserialize)]
struct ItemRecord {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    brand: Option<String>,
    #[serde(default)]
    categories: Option<String>,
}

/// An item id in `inter.json`: a JSON string or integer (see [`IdVisitor`]).
struct ItemId(String);

impl<'de> Deserialize<'de> for ItemId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(IdVisitor { field: "an item id in a user's list" }).map(ItemId)
    }
}

pub(super) fn load(dir: &Path, options: &LoadOptions) -> Result<Dataset> {
    let item_path = single_file(dir, ".item.json")?;
    let inter_path = single_file(dir, ".inter.json")?;

    let text = read_text(&item_path)?;
    let mut entries = ObjectEntries::new(&text, &item_path);
    let mut catalogue = Catalogue::new();
    let mut item_lines: HashMap<String, usize> = HashMap::new();
    while let Some((id, line, record)) = entries.next_entry::<ItemRecord>()? {
        if let Some(&first_line) = item_lines.get(&id) {
            return Err(Error::DuplicateItem {
                path: item_path.clone(),
                line,
                item: id,
                first_line,
            });
        }
        item_lines.insert(id.clone(), line);
        catalogue
            .push(lcrec_item(id, record))
            .map_err(|_| Error::malformed(&item_path, line, "duplicate item after cleaning"))?;
    }

    require_items(&catalogue, &item_path, options)?;

    let text = read_text(&inter_path)?;
    let mut entries = ObjectEntries::new(&text, &inter_path);
    let mut users = Vec::new();
    let mut user_lines: HashMap<String, usize> = HashMap::new();
    while let Some((user, line, items)) = entries.next_entry::<Vec<ItemId>>()? {
        if let Some(&first_line) = user_lines.get(&user) {
            return Err(Error::DuplicateUser { path: inter_path.clone(), line, user, first_line });
        }
        user_lines.insert(user.clone(), line);
        if items.is_empty() {
            return Err(Error::EmptyUser { path: inter_path.clone(), line, user });
        }
        let mut events = Vec::with_capacity(items.len());
        for ItemId(id) in items {
            let item = resolve_item(&mut catalogue, &id, options.unknown_items, &inter_path, line)?;
            events.push(Event { item, timestamp: None, query: None, kind: EventKind::Rec });
        }
        users.push(BehaviourSequence { user, events });
    }
    let dataset = Dataset { catalogue, users, inputs: vec![item_path.clone(), inter_path] };
    require_data(&dataset, &item_path, &dataset.inputs[1..])?;
    Ok(dataset)
}

fn lcrec_item(id: String, record: ItemRecord) -> Item {
    let title = record.title.map(|t| clean_text(&t)).filter(|t| !t.is_empty());
    let mut text = Vec::new();
    for (field, value) in [("brand", record.brand), ("description", record.description)] {
        if let Some(v) = value.map(|v| clean_text(&v)).filter(|v| !v.is_empty()) {
            text.push((field.to_string(), v));
        }
    }
    let categories = record
        .categories
        .map(|c| c.split(',').map(clean_text).filter(|c| !c.is_empty()).collect())
        .unwrap_or_default();
    Item { title: title.unwrap_or_else(|| id.clone()), id, text, categories }
}
