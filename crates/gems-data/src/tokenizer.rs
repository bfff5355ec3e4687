//! The text-tokenizer boundary.
//!
//! The real tokenizer (SmolLM2's BPE) lives with the model, which this crate must not depend on;
//! so example tokenisation goes through the small [`TextTokenizer`] trait. [`HfTokenizer`]
//! implements it over a Hugging Face `tokenizer.json`, which is what the CLI loads.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// What example tokenisation needs from a text tokenizer.
pub trait TextTokenizer {
    /// Token ids of `text`, without special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Size of the text vocabulary; item `i` gets token id `vocab_size() + i`.
    fn vocab_size(&self) -> u32;
    /// The end-of-sequence id that closes every target.
    fn eos_id(&self) -> u32;
}

/// End-of-sequence tokens tried, in order, when none is named.
pub const EOS_CANDIDATES: &[&str] = &["<|im_end|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]"];

/// A [`TextTokenizer`] over a Hugging Face `tokenizers::Tokenizer`.
pub struct HfTokenizer {
    inner: Tokenizer,
    eos_id: u32,
    vocab_size: u32,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl HfTokenizer {
    /// Loads `tokenizer.json`; `eos` names the end-of-sequence token (default: the first of
    /// [`EOS_CANDIDATES`] in the vocabulary).
    pub fn from_file(path: &Path, eos: Option<&str>) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(inner, eos)
    }

    /// Wraps a tokenizer already in memory.
    pub fn new(inner: Tokenizer, eos: Option<&str>) -> Result<Self> {
        let eos_id = match eos {
            Some(token) => inner.token_to_id(token).ok_or_else(|| {
                Error::Tokenizer(format!("end-of-sequence token {token:?} not in the vocabulary"))
            })?,
            None => EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t)).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "no end-of-sequence token found (tried {EOS_CANDIDATES:?}); name one"
                ))
            })?,
        };
        let vocab_size = u32::try_from(inner.get_vocab_size(true))
            .map_err(|_| Error::Tokenizer("vocabulary larger than u32".into()))?;
        Ok(Self { inner, eos_id, vocab_size })
    }

    /// A whitespace word-level tokenizer whose vocabulary is every word of `corpus` (sorted),
    /// plus `[UNK]` = 0 and `<|im_end|>` = 1. For tests, benchmarks and smoke runs without a model;
    /// no network.
    pub fn word_level<'a>(corpus: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut words = std::collections::BTreeSet::new();
        for text in corpus {
            words.extend(split_words(text));
        }
        let specials = ["[UNK]", "<|im_end|>"];
        let ordered = specials
            .iter()
            .map(|s| s.to_string())
            .chain(words.into_iter().filter(|w| !specials.contains(&w.as_str())));
        let vocab: serde_json::Map<String, serde_json::Value> =
            ordered.enumerate().map(|(i, w)| (w, i.into())).collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 1, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        let inner: Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| Error::Tokenizer(format!("building the word-level tokenizer: {e}")))?;
        Self::new(inner, Some("<|im_end|>"))
    }

    /// The wrapped tokenizer (e.g. to save it with `save`).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Splits like the `Whitespace` pre-tokenizer: runs of word characters, runs of other
/// non-space characters.
fn split_words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut current_is_word = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        let is_word = c.is_alphanumeric() || c == '_';
        if !current.is_empty() && is_word != current_is_word {
            out.push(std::mem::take(&mut current));
        }
        current_is_word = is_word;
        current.push(c);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| {
            Error::Tokenizer(format!("encoding {}: {e}", crate::error::quote(text)))
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    fn eos_id(&self) -> u32 {
        self.eos_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_level_round_trip() {
        let tok = HfTokenizer::word_level(["Below is the user's history: x, y."]).unwrap();
        assert_eq!(tok.eos_id(), 1);
        let ids = tok.encode("the user's history").unwrap();
        assert_eq!(ids.len(), 5, "{ids:?}");
        assert!(ids.iter().all(|&i| i > 1 && i < tok.vocab_size()));
        assert_eq!(tok.encode("unseen").unwrap(), vec![0]);
    }

    /// GPT-2's byte-to-unicode table, as used by ByteLevel BPE vocabularies.
    fn byte_chars() -> Vec<char> {
        let mut shift = 0;
        (0u32..256)
            .map(|b| {
                let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
                if printable {
                    char::from_u32(b).unwrap()
                } else {
                    shift += 1;
                    char::from_u32(255 + shift).unwrap()
                }
            })
            .collect()
    }

    /// A SmolLM2-shaped pipeline (Digits then ByteLevel pre-tokenizer, BPE, added eos) with
    /// bytes as the only tokens: checks that the regex-backed pre-tokenizers work with the
    /// features this crate enables.
    #[test]
    fn byte_level_bpe_like_smollm2_loads_and_encodes() {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<|endoftext|>".into(), 0.into());
        vocab.insert("<|im_start|>".into(), 1.into());
        vocab.insert("<|im_end|>".into(), 2.into());
        for (i, c) in byte_chars().into_iter().enumerate() {
            vocab.insert(c.to_string(), (i + 3).into());
        }
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<|endoftext|>"), special(1, "<|im_start|>"), special(2, "<|im_end|>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab,
                "merges": []}
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let tok = HfTokenizer::from_file(&path, None).unwrap();
        assert_eq!(tok.eos_id(), 2);
        assert_eq!(tok.vocab_size(), 259);
        let ids = tok.encode(", lab 42°").unwrap();
        // One token per byte: ',', ' ', 'l', 'a', 'b', ' ', '4', '2', and two for the UTF-8 '°'.
        assert_eq!(ids.len(), 10, "{ids:?}");
        assert_eq!(ids[0], 3 + u32::from(b','));
    }
}
