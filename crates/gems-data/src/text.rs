//! Text cleaning and Amazon query synthesis.
//!
//! Amazon metadata carries HTML entities (`&amp;`), stray tags and ragged whitespace; prompts
//! should not. Amazon has no real queries, so search examples use the convention of Ai et al.
//! (SIGIR 2017) that the GEMS authors and UniSAR follow: a query is the item's category path
//! without its root level, lowercased, without stop words and repeated words.
//! `Industrial & Scientific,Fasteners,Collated Fasteners,Staples` becomes
//! `fasteners collated staples`.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::model::{Dataset, Item};

/// Decodes HTML entities, drops HTML tags and collapses whitespace runs to one space.
///
/// Entities are decoded twice at most, which undoes the double escaping (`&amp;amp;`) seen in
/// scraped metadata without looping on adversarial input.
pub fn clean_text(raw: &str) -> String {
    let once = decode_entities(raw);
    let twice = if once.contains('&') { decode_entities(&once) } else { once };
    let no_tags = strip_tags(&twice);
    let mut out = String::with_capacity(no_tags.len());
    for word in no_tags.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

fn named_entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => ' ',
        "reg" => '®',
        "copy" => '©',
        "trade" => '™',
        "deg" => '°',
        "ndash" => '–',
        "mdash" => '—',
        "hellip" => '…',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "frac12" => '½',
        "frac14" => '¼',
        "frac34" => '¾',
        "times" => '×',
        "micro" => 'µ',
        "plusmn" => '±',
        "bull" => '•',
        "middot" => '·',
        "eacute" => 'é',
        "ohm" => 'Ω',
        "sup2" => '²',
        "sup3" => '³',
        _ => return None,
    })
}

/// The longest entity body (between `&` and `;`) that is looked up; longer runs are text.
const MAX_ENTITY_BODY: usize = 10;

fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let tail = &rest[amp..];
        // An entity is at most ~10 chars: `&` name-or-number `;`. Only that window is searched
        // for the `;`, so a run of `&` costs linear time, not a scan to the end per `&`.
        let window = &tail.as_bytes()[1..tail.len().min(MAX_ENTITY_BODY + 2)];
        let decoded = window.iter().position(|&b| b == b';').and_then(|end| {
            // `;` is ASCII, so `1 + end` is a char boundary.
            let body = &tail[1..1 + end];
            let c = if let Some(num) = body.strip_prefix('#') {
                let code = if let Some(hex) = num.strip_prefix(['x', 'X']) {
                    u32::from_str_radix(hex, 16).ok()
                } else {
                    num.parse::<u32>().ok()
                };
                code.and_then(char::from_u32)
            } else {
                named_entity(body)
            };
            c.map(|c| (c, end + 2))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &tail[len..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Removes `<tag ...>` and `</tag>` spans (a letter or `/` right after `<`), keeping other `<`.
///
/// Linear time: a tag jumps past its `>`, and once no `>` is left nothing after can be a tag, so
/// the rest is copied as is instead of being searched again for every `<`.
fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let tail = &rest[lt..];
        let is_tag = tail[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '/');
        if !is_tag {
            out.push('<');
            rest = &tail[1..];
            continue;
        }
        match tail.find('>') {
            Some(gt) => {
                out.push(' ');
                rest = &tail[gt + 1..];
            }
            None => {
                rest = tail;
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// English stop words (the NLTK list), dropped from synthesised queries.
pub const STOP_WORDS: &[&str] = &[
    "i",
    "me",
    "my",
    "myself",
    "we",
    "our",
    "ours",
    "ourselves",
    "you",
    "you're",
    "you've",
    "you'll",
    "you'd",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "he",
    "him",
    "his",
    "himself",
    "she",
    "she's",
    "her",
    "hers",
    "herself",
    "it",
    "it's",
    "its",
    "itself",
    "they",
    "them",
    "their",
    "theirs",
    "themselves",
    "what",
    "which",
    "who",
    "whom",
    "this",
    "that",
    "that'll",
    "these",
    "those",
    "am",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "have",
    "has",
    "had",
    "having",
    "do",
    "does",
    "did",
    "doing",
    "a",
    "an",
    "the",
    "and",
    "but",
    "if",
    "or",
    "because",
    "as",
    "until",
    "while",
    "of",
    "at",
    "by",
    "for",
    "with",
    "about",
    "against",
    "between",
    "into",
    "through",
    "during",
    "before",
    "after",
    "above",
    "below",
    "to",
    "from",
    "up",
    "down",
    "in",
    "out",
    "on",
    "off",
    "over",
    "under",
    "again",
    "further",
    "then",
    "once",
    "here",
    "there",
    "when",
    "where",
    "why",
    "how",
    "all",
    "any",
    "both",
    "each",
    "few",
    "more",
    "most",
    "other",
    "some",
    "such",
    "no",
    "nor",
    "not",
    "only",
    "own",
    "same",
    "so",
    "than",
    "too",
    "very",
    "s",
    "t",
    "can",
    "will",
    "just",
    "don",
    "don't",
    "should",
    "should've",
    "now",
    "d",
    "ll",
    "m",
    "o",
    "re",
    "ve",
    "y",
    "ain",
    "aren",
    "aren't",
    "couldn",
    "couldn't",
    "didn",
    "didn't",
    "doesn",
    "doesn't",
    "hadn",
    "hadn't",
    "hasn",
    "hasn't",
    "haven",
    "haven't",
    "isn",
    "isn't",
    "ma",
    "mightn",
    "mightn't",
    "mustn",
    "mustn't",
    "needn",
    "needn't",
    "shan",
    "shan't",
    "shouldn",
    "shouldn't",
    "wasn",
    "wasn't",
    "weren",
    "weren't",
    "won",
    "won't",
    "wouldn",
    "wouldn't",
];

/// Builds a query from words of `levels`: lowercase, split on non-alphanumerics, stop words and
/// repeats dropped, order of first appearance kept. `None` if no word survives.
fn words_to_query<'a>(levels: impl IntoIterator<Item = &'a str>) -> Option<String> {
    // A set for the repeat check keeps a title of many distinct words linear; `words` keeps
    // the order of first appearance.
    let mut words: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for level in levels {
        for word in level.to_lowercase().split(|c: char| !c.is_alphanumeric()) {
            if word.is_empty() || STOP_WORDS.contains(&word) || seen.contains(word) {
                continue;
            }
            seen.insert(word.to_string());
            words.push(word.to_string());
        }
    }
    (!words.is_empty()).then(|| words.join(" "))
}

/// The Ai et al. query of a category path: levels after the root, see the module docs.
///
/// `None` when the path has no level below the root or only stop words.
pub fn category_query(categories: &[String]) -> Option<String> {
    words_to_query(categories.iter().skip(1).map(String::as_str))
}

/// How to fill in queries for events that have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum QuerySynthesis {
    /// Keep the queries the source provides; synthesise nothing.
    #[default]
    Off,
    /// Ai et al.: a query from the category path; items without categories get none.
    Categories,
    /// As `Categories`, falling back to a query from the title (a labelled option, not the
    /// authors' protocol).
    CategoriesOrTitle,
}

/// The synthesised query of one item under `mode`.
pub fn item_query(item: &Item, mode: QuerySynthesis) -> Option<String> {
    match mode {
        QuerySynthesis::Off => None,
        QuerySynthesis::Categories => category_query(&item.categories),
        QuerySynthesis::CategoriesOrTitle => {
            category_query(&item.categories).or_else(|| words_to_query([item.title.as_str()]))
        }
    }
}

/// Gives every event without a query the synthesised query of its item; returns how many
/// events received one. Observed queries are never overwritten.
pub fn synthesize_queries(dataset: &mut Dataset, mode: QuerySynthesis) -> usize {
    if mode == QuerySynthesis::Off {
        return 0;
    }
    let per_item: Vec<Option<String>> =
        dataset.catalogue.items().iter().map(|item| item_query(item, mode)).collect();
    let mut filled = 0;
    for user in &mut dataset.users {
        for event in &mut user.events {
            if event.query.is_none()
                && let Some(q) = per_item.get(event.item as usize).cloned().flatten()
            {
                event.query = Some(q);
                filled += 1;
            }
        }
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_entities_tags_and_whitespace() {
        assert_eq!(
            clean_text("  Tom &amp;amp; Jerry&#39;s <b>best</b>\n\tkit "),
            "Tom & Jerry's best kit"
        );
        assert_eq!(clean_text("a < b &unknown; &#x41;"), "a < b &unknown; A");
        assert_eq!(clean_text("5&quot; x 3&frac12;"), "5\" x 3½");
    }

    /// The quadratic scans this module used before, kept as an oracle for the linear ones.
    fn reference_clean_text(raw: &str) -> String {
        fn decode(s: &str) -> String {
            let mut out = String::new();
            let mut rest = s;
            while let Some(amp) = rest.find('&') {
                out.push_str(&rest[..amp]);
                let tail = &rest[amp..];
                let decoded = tail[1..].find(';').filter(|&end| end <= 10).and_then(|end| {
                    let body = &tail[1..1 + end];
                    let c = if let Some(num) = body.strip_prefix('#') {
                        let code = if let Some(hex) = num.strip_prefix(['x', 'X']) {
                            u32::from_str_radix(hex, 16).ok()
                        } else {
                            num.parse::<u32>().ok()
                        };
                        code.and_then(char::from_u32)
                    } else {
                        named_entity(body)
                    };
                    c.map(|c| (c, end + 2))
                });
                match decoded {
                    Some((c, len)) => {
                        out.push(c);
                        rest = &tail[len..];
                    }
                    None => {
                        out.push('&');
                        rest = &tail[1..];
                    }
                }
            }
            out.push_str(rest);
            out
        }
        fn strip(s: &str) -> String {
            let mut out = String::new();
            let mut rest = s;
            while let Some(lt) = rest.find('<') {
                out.push_str(&rest[..lt]);
                let tail = &rest[lt..];
                let is_tag = tail[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '/');
                match (is_tag, tail.find('>')) {
                    (true, Some(gt)) => {
                        out.push(' ');
                        rest = &tail[gt + 1..];
                    }
                    _ => {
                        out.push('<');
                        rest = &tail[1..];
                    }
                }
            }
            out.push_str(rest);
            out
        }
        let once = decode(raw);
        let twice = if once.contains('&') { decode(&once) } else { once };
        strip(&twice).split_whitespace().collect::<Vec<_>>().join(" ")
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// The linear scans give exactly the old output, over strings dense in `&`, `;`, `#`,
        /// `<`, `>` and entity names.
        #[test]
        fn linear_scans_match_the_reference(
            raw in "([&;#<>/ xX0-9a-f]|amp|lt|gt|quot|frac12|#39|#x41|<b>|</b>|é|\\n){0,40}"
        ) {
            proptest::prop_assert_eq!(clean_text(&raw), reference_clean_text(&raw));
        }
    }

    #[test]
    fn synthesises_the_documented_example() {
        let path: Vec<String> = "Industrial & Scientific,Fasteners,Collated Fasteners,Staples"
            .split(',')
            .map(String::from)
            .collect();
        assert_eq!(category_query(&path).as_deref(), Some("fasteners collated staples"));
        assert_eq!(category_query(&path[..1]), None);
        assert_eq!(category_query(&[]), None);
    }

    #[test]
    fn drops_stop_words() {
        let path = vec!["Root".to_string(), "Tools and Parts for the Lab".to_string()];
        assert_eq!(category_query(&path).as_deref(), Some("tools parts lab"));
    }
}
