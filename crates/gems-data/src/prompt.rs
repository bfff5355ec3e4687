//! Prompts (GEMS-SPEC §2) and their tokenisation with atomic item tokens.
//!
//! A prompt is text segments around the history's item tokens. Each text segment is encoded by
//! the [`TextTokenizer`] and the item ids (`vocab_size + item index`) are spliced in between, so
//! an item is always exactly one token whatever the text tokenizer does. Segments repeat a lot
//! (the template, the separator, the ~750 queries), so encodings are memoised.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::examples::{Example, Task};
use crate::tokenizer::TextTokenizer;

/// Text before the history.
pub const PREFIX: &str = "Below is the user's interaction history: ";
/// Text between two history items.
pub const HISTORY_SEPARATOR: &str = ", ";
/// Text after the history of a recommendation prompt.
pub const REC_SUFFIX: &str = ". Please recommend the next item the user is likely to click.";
/// Text between the history and the query of a search prompt.
pub const SEARCH_QUERY_INTRO: &str = ". The user's search query is: ";
/// Text after the query of a search prompt.
pub const SEARCH_SUFFIX: &str = ". Please predict the next item the user might click.";

/// The token string of item `index`.
pub fn item_token(index: u32) -> String {
    format!("<item_{index}>")
}

/// One piece of a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Plain text.
    Text(std::borrow::Cow<'a, str>),
    /// An item, by dense index.
    Item(u32),
}

/// The prompt of an example as segments, exactly the GEMS-SPEC §2 templates.
pub fn segments(example: &Example) -> Vec<Segment<'_>> {
    let mut out = Vec::with_capacity(2 * example.history.len() + 2);
    out.push(Segment::Text(PREFIX.into()));
    for (i, &item) in example.history.iter().enumerate() {
        if i > 0 {
            out.push(Segment::Text(HISTORY_SEPARATOR.into()));
        }
        out.push(Segment::Item(item));
    }
    match (example.task, &example.query) {
        (Task::Search, Some(query)) => {
            out.push(Segment::Text(format!("{SEARCH_QUERY_INTRO}{query}{SEARCH_SUFFIX}").into()));
        }
        _ => out.push(Segment::Text(REC_SUFFIX.into())),
    }
    out
}

/// The prompt as text with `<item_N>` tokens.
pub fn prompt_text(example: &Example) -> String {
    let mut out = String::new();
    for segment in segments(example) {
        match segment {
            Segment::Text(t) => out.push_str(&t),
            Segment::Item(i) => out.push_str(&item_token(i)),
        }
    }
    out
}

/// A tokenised example: prompt and target in one id sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    /// Prompt ids, then the target item id, then end-of-sequence.
    pub input_ids: Vec<u32>,
    /// `[start, end)` of the target tokens in `input_ids` (item token and end-of-sequence).
    pub target_span: [u32; 2],
}

/// Tokenises examples in order; the text tokenizer sees each distinct segment once.
pub fn tokenize_examples(
    examples: &[Example],
    tokenizer: &dyn TextTokenizer,
) -> Result<Vec<TokenizedExample>> {
    let base = tokenizer.vocab_size();
    let eos = tokenizer.eos_id();
    // Memo of pure encodings: looked up, never iterated.
    let mut memo: HashMap<String, Vec<u32>> = HashMap::new();
    let mut out = Vec::with_capacity(examples.len());
    for example in examples {
        let mut ids = Vec::new();
        for segment in segments(example) {
            match segment {
                Segment::Item(i) => ids.push(base + i),
                Segment::Text(text) => {
                    if let Some(encoded) = memo.get(text.as_ref()) {
                        ids.extend_from_slice(encoded);
                    } else {
                        let encoded = tokenizer.encode(&text)?;
                        ids.extend_from_slice(&encoded);
                        memo.insert(text.into_owned(), encoded);
                    }
                }
            }
        }
        let start = ids.len() as u32;
        ids.push(base + example.target);
        ids.push(eos);
        out.push(TokenizedExample { input_ids: ids, target_span: [start, start + 2] });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::examples::Split;

    fn example(task: Task, query: Option<&str>) -> Example {
        Example {
            user: 0,
            position: 2,
            split: Split::Train,
            task,
            history: vec![3, 7],
            query: query.map(String::from),
            target: 9,
            negatives: vec![],
        }
    }

    #[test]
    fn prompts_match_the_spec_templates() {
        assert_eq!(
            prompt_text(&example(Task::Rec, None)),
            "Below is the user's interaction history: <item_3>, <item_7>. Please recommend the \
             next item the user is likely to click."
        );
        assert_eq!(
            prompt_text(&example(Task::Search, Some("lab gloves"))),
            "Below is the user's interaction history: <item_3>, <item_7>. The user's search query \
             is: lab gloves. Please predict the next item the user might click."
        );
    }
}
