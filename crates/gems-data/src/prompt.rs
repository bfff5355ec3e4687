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
/// Text before the history of a recommendation prompt in the [`RecPrompt::HistoryLast`] form.
pub const REC_INSTRUCTION_FIRST: &str =
    "Please recommend the next item the user is likely to click. The user's interaction history: ";

/// How a recommendation prompt is worded (`data.rec_prompt`); search prompts keep GEMS-SPEC §2's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum RecPrompt {
    /// GEMS-SPEC §2: the history, then the instruction; the answer follows the instruction.
    #[default]
    Paper,
    /// The instruction, then the history, each item followed by the separator; the answer
    /// follows the last item's separator, where every history item after the first is
    /// predicted too (`data.rec_targets = "all"`), so the answer is asked at the kind of
    /// position the history's targets train.
    HistoryLast,
}

impl RecPrompt {
    /// Whether this is GEMS-SPEC §2's form (what a configuration leaves out).
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    pub fn is_paper(&self) -> bool {
        *self == Self::Paper
    }
}

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

/// The prompt for `history` (item indices, oldest first) and an optional `query`, as segments:
/// the search template of GEMS-SPEC §2 when a query is given, else the recommendation
/// template in the form `rec`. Every prompt goes through here: the examples' ([`segments`])
/// and those typed at run time ([`tokenize_prompt`]).
pub fn prompt_segments<'a>(
    history: &[u32],
    query: Option<&'a str>,
    rec: RecPrompt,
) -> Vec<Segment<'a>> {
    let mut out = Vec::with_capacity(2 * history.len() + 2);
    let history_last = query.is_none() && rec == RecPrompt::HistoryLast;
    out.push(Segment::Text(if history_last { REC_INSTRUCTION_FIRST } else { PREFIX }.into()));
    for (i, &item) in history.iter().enumerate() {
        if i > 0 {
            out.push(Segment::Text(HISTORY_SEPARATOR.into()));
        }
        out.push(Segment::Item(item));
    }
    match query {
        Some(query) => {
            out.push(Segment::Text(format!("{SEARCH_QUERY_INTRO}{query}{SEARCH_SUFFIX}").into()));
        }
        None if history_last => out.push(Segment::Text(HISTORY_SEPARATOR.into())),
        None => out.push(Segment::Text(REC_SUFFIX.into())),
    }
    out
}

/// The prompt of an example as segments: [`prompt_segments`] of its history and, for a search
/// example, its query (a recommendation example's query is not shown).
pub fn segments(example: &Example, rec: RecPrompt) -> Vec<Segment<'_>> {
    let query = match example.task {
        Task::Search => example.query.as_deref(),
        Task::Rec => None,
    };
    prompt_segments(&example.history, query, rec)
}

/// The prompt as text with `<item_N>` tokens.
pub fn prompt_text(example: &Example, rec: RecPrompt) -> String {
    let mut out = String::new();
    for segment in segments(example, rec) {
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

/// Appends the ids of `segments` to `ids`: text through `tokenizer` (memoised in `memo`), item
/// `i` as `base + i` (`base` is the tokenizer's `vocab_size`).
fn encode_segments(
    segments: Vec<Segment<'_>>,
    tokenizer: &dyn TextTokenizer,
    base: u32,
    memo: &mut HashMap<String, Vec<u32>>,
    ids: &mut Vec<u32>,
) -> Result<()> {
    for segment in segments {
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
    Ok(())
}

/// The prompt ids for `history` (item indices, oldest first) and an optional `query`
/// ([`prompt_segments`]), without a target: exactly the ids before the target span of an
/// example with that history (and, for a search example, that query). What a trained model
/// is asked at run time (`gems recommend`, `gems search`).
///
/// # Errors
/// The tokenizer fails.
pub fn tokenize_prompt(
    history: &[u32],
    query: Option<&str>,
    rec: RecPrompt,
    tokenizer: &dyn TextTokenizer,
) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let base = tokenizer.vocab_size();
    let segments = prompt_segments(history, query, rec);
    encode_segments(segments, tokenizer, base, &mut HashMap::new(), &mut ids)?;
    Ok(ids)
}

/// Tokenises examples in order; the text tokenizer sees each distinct segment once.
pub fn tokenize_examples(
    examples: &[Example],
    rec: RecPrompt,
    tokenizer: &dyn TextTokenizer,
) -> Result<Vec<TokenizedExample>> {
    let base = tokenizer.vocab_size();
    let eos = tokenizer.eos_id();
    // Memo of pure encodings: looked up, never iterated.
    let mut memo: HashMap<String, Vec<u32>> = HashMap::new();
    let mut out = Vec::with_capacity(examples.len());
    for example in examples {
        let mut ids = Vec::new();
        encode_segments(segments(example, rec), tokenizer, base, &mut memo, &mut ids)?;
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

    /// One id per byte: enough to compare token sequences.
    struct Bytes;

    impl TextTokenizer for Bytes {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn vocab_size(&self) -> u32 {
            256
        }
        fn eos_id(&self) -> u32 {
            0
        }
    }

    #[test]
    fn a_prompt_is_an_example_before_its_target() {
        for rec in [RecPrompt::Paper, RecPrompt::HistoryLast] {
            for (task, query) in [(Task::Rec, None), (Task::Search, Some("lab gloves"))] {
                let e = example(task, query);
                let tokenized = tokenize_examples(std::slice::from_ref(&e), rec, &Bytes).unwrap();
                let [start, _] = tokenized[0].target_span;
                let prompt = tokenize_prompt(&e.history, query, rec, &Bytes).unwrap();
                assert_eq!(prompt, tokenized[0].input_ids[..start as usize]);
            }
            // A recommendation example does not show its query; a search example without one
            // is a recommendation prompt.
            let rec_with_query = example(Task::Rec, Some("lab gloves"));
            let search_without = example(Task::Search, None);
            let plain = prompt_text(&example(Task::Rec, None), rec);
            assert_eq!(prompt_text(&rec_with_query, rec), plain);
            assert_eq!(prompt_text(&search_without, rec), plain);
        }
    }

    #[test]
    fn prompts_match_the_spec_templates() {
        for rec in [RecPrompt::Paper, RecPrompt::HistoryLast] {
            // The search template is the paper's in either form.
            assert_eq!(
                prompt_text(&example(Task::Search, Some("lab gloves")), rec),
                "Below is the user's interaction history: <item_3>, <item_7>. The user's search \
                 query is: lab gloves. Please predict the next item the user might click."
            );
        }
        assert_eq!(
            prompt_text(&example(Task::Rec, None), RecPrompt::Paper),
            "Below is the user's interaction history: <item_3>, <item_7>. Please recommend the \
             next item the user is likely to click."
        );
        assert_eq!(
            prompt_text(&example(Task::Rec, None), RecPrompt::HistoryLast),
            "Please recommend the next item the user is likely to click. The user's interaction \
             history: <item_3>, <item_7>, "
        );
    }

    #[test]
    fn with_the_history_last_every_item_and_the_answer_follow_a_separator() {
        let e = example(Task::Rec, None);
        let ids = &tokenize_examples(std::slice::from_ref(&e), RecPrompt::HistoryLast, &Bytes)
            .unwrap()[0]
            .input_ids;
        let sep: Vec<u32> = HISTORY_SEPARATOR.bytes().map(u32::from).collect();
        let items: Vec<usize> = (0..ids.len()).filter(|&p| ids[p] >= 256).collect();
        // history 3, 7 and the answer 9 (ids 259, 263, 265), then end-of-sequence.
        assert_eq!(items.iter().map(|&p| ids[p]).collect::<Vec<_>>(), [259, 263, 265]);
        for &p in &items[1..] {
            assert_eq!(ids[p - sep.len()..p], sep[..], "item at {p} follows the separator");
        }
        assert_eq!(ids.last(), Some(&0));
    }
}
