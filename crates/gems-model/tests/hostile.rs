//! Hostile model files (issue 14): GGUF and safetensors whose tensor directories lie about the
//! data (duplicates, overlaps, gaps, reversed offsets, types that do not match the bytes), GGUF
//! metadata arrays that must not amplify memory, `config.json` with wrong types and absurd sizes,
//! and proptest "fuzzing" of mutated small valid files that must never panic or allocate more
//! than a small multiple of the input.
//!
//! Nothing here measures time or process memory: memory is checked through
//! [`GgufFile::parsed_bytes`], the parser's own accounting of what it holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gems_model::gguf::GgufArray;
use gems_model::weights::{parse_safetensors, write_safetensors};
use gems_model::{GgufFile, HostTensor, LlamaConfig};
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

// ------------------------------------------------------------------ GGUF builder

/// Bytes of one metadata value: its type id, then the value.
fn v_u32(x: u32) -> Vec<u8> {
    [4u32.to_le_bytes(), x.to_le_bytes()].concat()
}

fn gguf_str(s: &[u8]) -> Vec<u8> {
    [&(s.len() as u64).to_le_bytes()[..], s].concat()
}

fn v_str(s: &str) -> Vec<u8> {
    [&8u32.to_le_bytes()[..], &gguf_str(s.as_bytes())].concat()
}

/// An array value of `n` elements of type `elem`, each encoded as `one`.
fn v_array(elem: u32, n: u64, one: &[u8]) -> Vec<u8> {
    let mut b = [9u32.to_le_bytes(), elem.to_le_bytes()].concat();
    b.extend_from_slice(&n.to_le_bytes());
    for _ in 0..n {
        b.extend_from_slice(one);
    }
    b
}

/// One tensor of a built GGUF: `offset` overrides the contiguous layout.
struct T {
    name: &'static str,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    offset: Option<u64>,
}

fn t(name: &'static str, dims: &[u64], ty: u32, data_len: usize) -> T {
    let data = (0..data_len).map(|i| (i % 251) as u8).collect();
    T { name, dims: dims.to_vec(), ty, data, offset: None }
}

/// A GGUF v3 file with alignment 32, tensor data laid out as llama.cpp writes it (each tensor
/// padded to 32 bytes) unless a tensor overrides its offset.
fn gguf(meta: &[(&str, Vec<u8>)], tensors: &[T]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        b.extend_from_slice(&gguf_str(k.as_bytes()));
        b.extend_from_slice(v);
    }
    let mut data = Vec::new();
    for t in tensors {
        b.extend_from_slice(&gguf_str(t.name.as_bytes()));
        b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&t.ty.to_le_bytes());
        b.extend_from_slice(&t.offset.unwrap_or(data.len() as u64).to_le_bytes());
        data.extend_from_slice(&t.data);
        data.resize(data.len().div_ceil(32) * 32, 0);
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.extend_from_slice(&data);
    b
}

fn gguf_err(bytes: Vec<u8>) -> String {
    match GgufFile::parse(Path::new("hostile.gguf"), bytes) {
        Ok(f) => panic!("parsed {} tensors but should fail", f.tensors.len()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("hostile.gguf"), "error does not name the file: {e}");
            e
        }
    }
}

/// Three tensors: F32 [16] at 0..64, F16 [4, 4] at 64..96, Q8_0 [32, 2] at 96..164 (the data
/// section padded to 192 bytes).
fn three() -> Vec<T> {
    vec![t("a.weight", &[16], 0, 64), t("b.weight", &[4, 4], 1, 32), t("c.weight", &[32, 2], 8, 68)]
}

#[test]
fn gguf_builder_makes_a_valid_file() {
    let f = GgufFile::parse(Path::new("ok.gguf"), gguf(&[("x", v_u32(1))], &three())).unwrap();
    assert_eq!(f.tensors.len(), 3);
    let c = f.tensor(&f.tensors[2]).unwrap();
    assert_eq!(c.shape, vec![2, 32]);
    // The fixture, as llama.cpp lays files out, parses too.
    GgufFile::open(&fixtures().join("tiny_llama.gguf")).unwrap();
}

#[test]
fn gguf_duplicate_tensor_entry_is_rejected() {
    let mut ts = three();
    ts[1].name = "a.weight";
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`a.weight`") && e.contains("duplicate tensor entry"), "{e}");
    // The same entry twice, pointing at the same bytes.
    let mut ts = three();
    ts.push(t("a.weight", &[16], 0, 0));
    ts[3].offset = Some(0);
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`a.weight`") && e.contains("duplicate tensor entry"), "{e}");
}

#[test]
fn gguf_duplicate_metadata_key_is_rejected() {
    let e = gguf_err(gguf(&[("k", v_u32(1)), ("k", v_u32(2))], &three()));
    assert!(e.contains("`k`") && e.contains("duplicate metadata key"), "{e}");
}

#[test]
fn gguf_overlapping_tensor_data_is_rejected() {
    let mut ts = three();
    ts[2].offset = Some(64); // c over b
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`c.weight`") && e.contains("overlaps tensor `b.weight`"), "{e}");
    let mut ts = three();
    ts[1].offset = Some(0); // b over a
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`b.weight`") && e.contains("overlaps tensor `a.weight`"), "{e}");
    assert!(!e.contains("truncated"), "{e}");
}

#[test]
fn gguf_shifted_offset_is_rejected() {
    let mut ts = three();
    ts[1].offset = Some(96); // a gap of 32 bytes after a
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`b.weight`") && e.contains("32 bytes belong to no tensor"), "{e}");
    let mut ts = three();
    ts[0].offset = Some(32);
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`a.weight`") && e.contains("not 0"), "{e}");
    // A hostile offset far past the end is a layout error, not a truncation.
    let mut ts = three();
    ts[2].offset = Some(1 << 62);
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`c.weight`") && !e.contains("truncated"), "{e}");
}

#[test]
fn gguf_tensor_type_that_does_not_match_its_bytes_is_rejected() {
    // a holds 16 F32 (64 bytes): declared F16 it would be 32 bytes, and b would not follow it.
    let mut ts = three();
    ts[0].ty = 1;
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`b.weight`") && e.contains("wrong type or shape for `a.weight`"), "{e}");
    // b declared F32: 64 bytes, over c's data.
    let mut ts = three();
    ts[1].ty = 0;
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`c.weight`") && e.contains("overlaps tensor `b.weight`"), "{e}");
    // The last tensor declared Q4_0 (36 bytes of 68): bytes left over after it.
    let mut ts = three();
    ts[2].ty = 2;
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`c.weight`") && e.contains("belong to no tensor"), "{e}");
    // A shape that does not match the bytes: a declared [32] F32.
    let mut ts = three();
    ts[0].dims = vec![32];
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("overlaps tensor `a.weight`"), "{e}");
    // A type id that is no GGML type.
    let mut ts = three();
    ts[1].ty = 77;
    let e = gguf_err(gguf(&[], &ts));
    assert!(e.contains("`b.weight`") && e.contains("tensor type 77"), "{e}");
    // The last tensor's bytes really missing: this one is a truncation.
    let mut b = gguf(&[], &three());
    b.truncate(b.len() - 40);
    let e = gguf_err(b);
    assert!(e.contains("`c.weight`") && e.contains("truncated?"), "{e}");
}

#[test]
fn gguf_fixture_with_two_entries_swapped_in_the_data_is_rejected() {
    // Swap the offsets of two same-size tensors in the real fixture: each still lies inside the
    // file, but the directory no longer follows the data.
    let bytes = std::fs::read(fixtures().join("tiny_llama.gguf")).unwrap();
    let f = GgufFile::parse(Path::new("x"), bytes.clone()).unwrap();
    let first = &f.tensors[0];
    let twin = f.tensors[1..]
        .iter()
        .find(|t| t.type_id == first.type_id && t.dims == first.dims)
        .expect("the fixture has two tensors of one type and shape");
    // An entry is the length-prefixed name, n_dims, the dims, the type, then the offset.
    let offset_field = |name: &str| {
        let entry = gguf_str(name.as_bytes());
        let at = bytes.windows(entry.len()).position(|w| w == entry).unwrap();
        let dims = f.tensors.iter().find(|t| t.name == name).unwrap().dims.len();
        at + entry.len() + 4 + 8 * dims + 4
    };
    let (a, b) = (offset_field(&first.name), offset_field(&twin.name));
    let mut hostile = bytes.clone();
    hostile.copy_within(a..a + 8, b);
    hostile[a..a + 8].copy_from_slice(&bytes[b..b + 8]);
    let e = gguf_err(hostile);
    assert!(e.contains(&format!("`{}`", first.name)), "{e}");
}

// ------------------------------------------------------------------ GGUF memory

#[test]
fn gguf_large_metadata_arrays_cost_a_small_multiple_of_their_bytes() {
    // 2^22 one-byte elements: u8, i8, bool. As one enum value each they would cost ~130 MB each.
    let n = 1u64 << 22;
    for elem in [0u32, 1, 7] {
        let bytes = gguf(&[("big", v_array(elem, n, &[1]))], &[]);
        let len = bytes.len();
        let f = GgufFile::parse(Path::new("big.gguf"), bytes).unwrap();
        let a = f.meta("big").unwrap().as_array().unwrap();
        assert_eq!(a.len(), n as usize);
        let held = f.parsed_bytes();
        assert!(held <= len + 4096, "type {elem}: {held} bytes held for a {len}-byte file");
    }
    // 2^18 one-character strings (9 bytes each in the file).
    let bytes = gguf(&[("toks", v_array(8, 1 << 18, &gguf_str(b"x")))], &[]);
    let len = bytes.len();
    let f = GgufFile::parse(Path::new("big.gguf"), bytes).unwrap();
    let a = f.meta("toks").unwrap().as_array().unwrap();
    assert_eq!((a.len(), a.get_str(12345)), (1 << 18, Some("x")));
    assert!(f.parsed_bytes() <= 2 * len, "{} bytes held for {len}", f.parsed_bytes());
    // 2^16 empty nested arrays (12 bytes each), the densest element.
    let empty_u8 = [0u32.to_le_bytes().as_slice(), &0u64.to_le_bytes()].concat();
    let bytes = gguf(&[("nest", v_array(9, 1 << 16, &empty_u8))], &[]);
    let len = bytes.len();
    let f = GgufFile::parse(Path::new("big.gguf"), bytes).unwrap();
    assert!(
        matches!(f.meta("nest").unwrap().as_array(), Some(GgufArray::Array(v)) if v.len() == 1 << 16)
    );
    assert!(f.parsed_bytes() <= 6 * len, "{} bytes held for {len}", f.parsed_bytes());
    // 2^16 distinct scalar keys.
    let keys: Vec<String> = (0..1u32 << 16).map(|i| format!("{i:x}")).collect();
    let meta: Vec<(&str, Vec<u8>)> =
        keys.iter().map(|k| (k.as_str(), [0u32.to_le_bytes().as_slice(), &[7]].concat())).collect();
    let bytes = gguf(&meta, &[]);
    let len = bytes.len();
    let f = GgufFile::parse(Path::new("big.gguf"), bytes).unwrap();
    assert!(f.parsed_bytes() <= 6 * len, "{} bytes held for {len}", f.parsed_bytes());
}

#[test]
fn gguf_hostile_array_counts_fail_before_allocating() {
    for (elem, n) in [(0u32, 1u64 << 40), (8, 1 << 62), (9, u64::MAX), (12, 1 << 61)] {
        let mut v = [9u32.to_le_bytes(), elem.to_le_bytes()].concat();
        v.extend_from_slice(&n.to_le_bytes());
        let e = gguf_err(gguf(&[("arr", v)], &three()));
        assert!(e.contains("`arr`") && e.contains("exceeds the file"), "{e}");
    }
}

#[test]
fn gguf_tokenizer_still_loads_from_compact_arrays() {
    let f = GgufFile::open(&fixtures().join("tiny_llama.gguf")).unwrap();
    let toks = f.meta("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert!(toks.as_strings().is_some_and(|s| s.len() == 64), "{toks:?}");
    let types = f.meta("tokenizer.ggml.token_type").unwrap().as_array().unwrap();
    assert!(matches!(types, GgufArray::I32(_)));
    let tok = f.tokenizer().unwrap();
    assert_eq!(tok.get_vocab_size(true), 64);
    // Tokens that are not strings: named.
    let meta = [
        ("tokenizer.ggml.model", v_str("gpt2")),
        ("tokenizer.ggml.tokens", v_array(4, 2, &7u32.to_le_bytes())),
        ("tokenizer.ggml.merges", v_array(8, 0, &[])),
    ];
    let f = GgufFile::parse(Path::new("tok.gguf"), gguf(&meta, &[])).unwrap();
    let e = f.tokenizer().unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.tokens") && e.contains("not an array of strings"), "{e}");
}

// ------------------------------------------------------------------ safetensors

/// A safetensors file from a header (key, dtype, shape, [begin, end]) and a data section of
/// `data_len` bytes.
fn safetensors(entries: &[(&str, &str, &[usize], [u64; 2])], data_len: usize) -> Vec<u8> {
    let mut header = String::from("{");
    for (i, (k, dtype, shape, [b, e])) in entries.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{k}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{b},{e}]}}"
        ));
    }
    header.push('}');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..data_len).map(|i| (i % 7) as u8 * 16));
    out
}

fn st_err(bytes: &[u8]) -> String {
    match parse_safetensors(Path::new("hostile.safetensors"), bytes) {
        Ok(t) => panic!("parsed {} tensors but should fail", t.len()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("hostile.safetensors"), "error does not name the file: {e}");
            e
        }
    }
}

#[test]
fn safetensors_valid_layouts_parse() {
    // Header order need not be data order; empty tensors take no bytes.
    let b = safetensors(
        &[
            ("b", "F32", &[2], [16, 24]),
            ("a", "F16", &[2, 4], [0, 16]),
            ("empty", "F32", &[0, 3], [24, 24]),
        ],
        24,
    );
    let t = parse_safetensors(Path::new("ok.safetensors"), &b).unwrap();
    assert_eq!(t.len(), 3);
}

#[test]
fn safetensors_overlapping_offsets_are_rejected() {
    let b = safetensors(&[("a", "F32", &[4], [0, 16]), ("b", "F32", &[4], [8, 24])], 24);
    let e = st_err(&b);
    assert!(e.contains("`b`") && e.contains("overlap tensor `a`"), "{e}");
    assert!(!e.contains("truncated"), "{e}");
    // Two keys on the same bytes.
    let b = safetensors(&[("a", "F32", &[4], [0, 16]), ("b", "F32", &[4], [0, 16])], 16);
    assert!(st_err(&b).contains("overlap tensor `a`"));
}

#[test]
fn safetensors_shifted_offsets_are_rejected() {
    // A gap between tensors.
    let b = safetensors(&[("a", "F32", &[4], [0, 16]), ("b", "F32", &[4], [20, 36])], 36);
    let e = st_err(&b);
    assert!(e.contains("`b`") && e.contains("covered by no tensor") && e.contains("`a`"), "{e}");
    // Everything shifted by 4: the first 4 bytes belong to no tensor.
    let b = safetensors(&[("a", "F32", &[4], [4, 20])], 20);
    let e = st_err(&b);
    assert!(e.contains("`a`") && e.contains("bytes 0..4"), "{e}");
    // Bytes after the last tensor.
    let b = safetensors(&[("a", "F32", &[4], [0, 16])], 24);
    let e = st_err(&b);
    assert!(e.contains("`a`") && e.contains("8 bytes at the end"), "{e}");
}

#[test]
fn safetensors_reversed_offsets_are_rejected_without_a_truncation_hint() {
    let b = safetensors(&[("a", "F32", &[0], [16, 0])], 16);
    let e = st_err(&b);
    assert!(e.contains("`a`") && e.contains("reversed (begin > end)"), "{e}");
    assert!(!e.contains("truncated"), "{e}");
}

#[test]
fn safetensors_dtype_or_shape_not_matching_the_bytes_is_rejected() {
    let b = safetensors(&[("a", "F16", &[4], [0, 16])], 16);
    let e = st_err(&b);
    assert!(e.contains("`a`") && e.contains("needs 8 bytes"), "{e}");
    let b = safetensors(&[("a", "F32", &[1 << 62, 8], [0, 16])], 16);
    assert!(st_err(&b).contains("overflows"));
}

#[test]
fn safetensors_duplicate_key_is_rejected() {
    let b = safetensors(&[("a", "F32", &[4], [0, 16]), ("a", "F32", &[4], [16, 32])], 32);
    let e = st_err(&b);
    assert!(e.contains("`a`") && e.contains("duplicate"), "{e}");
}

#[test]
fn safetensors_unsupported_or_unknown_dtype_is_named() {
    // A dtype the safetensors crate knows but this reader does not convert.
    let b = safetensors(&[("a", "F32", &[2], [0, 8]), ("q", "I8", &[4], [8, 12])], 12);
    let e = st_err(&b);
    assert!(e.contains("`q`") && e.contains("dtype I8"), "{e}");
    // A dtype no one knows (the crate's JSON error would name neither file nor tensor).
    let b = safetensors(&[("a", "F32", &[2], [0, 8]), ("q", "Q4_K", &[4], [8, 12])], 12);
    let e = st_err(&b);
    assert!(e.contains("`q`") && e.contains("dtype Q4_K"), "{e}");
}

#[test]
fn safetensors_widened_dtypes_read_the_right_values() {
    let mut b = safetensors(
        &[("h", "F16", &[1], [0, 2]), ("b", "BF16", &[1], [2, 4]), ("d", "F64", &[1], [4, 12])],
        0,
    );
    b.extend_from_slice(&half::f16::from_f32(1.5).to_le_bytes());
    b.extend_from_slice(&half::bf16::from_f32(-2.0).to_le_bytes());
    b.extend_from_slice(&0.25f64.to_le_bytes());
    let t: BTreeMap<String, HostTensor> =
        parse_safetensors(Path::new("w.safetensors"), &b).unwrap().into_iter().collect();
    assert_eq!((t["h"].data[0], t["b"].data[0], t["d"].data[0]), (1.5, -2.0, 0.25));
}

#[test]
fn safetensors_truncated_file_gets_the_hint() {
    let b = safetensors(&[("a", "F32", &[4], [0, 16]), ("b", "F32", &[4], [16, 32])], 32);
    let e = st_err(&b[..b.len() - 5]);
    assert!(e.contains("`b`") && e.contains("truncated file?"), "{e}");
}

// ------------------------------------------------------------------ config.json

const CONFIG: &str = r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
  "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
  "max_position_embeddings": 128, "tie_word_embeddings": false, "hidden_act": "silu"}"#;

fn config_with(field: &str, value: &str) -> String {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(CONFIG).unwrap();
    v.insert(field.into(), serde_json::from_str(value).unwrap());
    serde_json::Value::Object(v).to_string()
}

fn config_err(text: &str) -> String {
    match LlamaConfig::from_json(Path::new("hostile/config.json"), text) {
        Ok(c) => panic!("accepted {c:?}"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("hostile/config.json"), "error does not name the file: {e}");
            e
        }
    }
}

#[test]
fn config_unknown_enum_values_are_named() {
    let e = config_err(&config_with("model_type", "\"mistral\""));
    assert!(e.contains("model_type `mistral` is not supported (only llama, qwen2)"), "{e}");
    let e = config_err(&config_with("rope_scaling", r#"{"rope_type": "yarn", "factor": 4}"#));
    assert!(e.contains("rope_scaling.rope_type `yarn` is not supported"), "{e}");
    let e = config_err(&config_with("rope_scaling", r#"{"type": "dynamic"}"#));
    assert!(e.contains("rope_scaling.rope_type `dynamic`"), "{e}");
    for bad in ["\"2\"", "-1", "1.5", "[1, \"2\"]", "4294967296", "{}"] {
        let e = config_err(&config_with("eos_token_id", bad));
        assert!(e.contains("eos_token_id: expected a token id or a list of token ids"), "{e}");
    }
}

#[test]
fn config_token_ids_and_enums_round_trip_in_their_json_form() {
    use gems_model::{ModelType, RopeType, TokenIds};
    let dir = tempfile::tempdir().unwrap();
    for (eos, want) in [("2", TokenIds::One(2)), ("[2, 7]", TokenIds::Many(vec![2, 7]))] {
        let mut text = config_with("eos_token_id", eos);
        text = text.replace("\"llama\"", "\"qwen2\"");
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["rope_scaling"] = serde_json::json!({"type": "llama3", "factor": 8.0});
        let c = LlamaConfig::from_json(Path::new("config.json"), &v.to_string()).unwrap();
        assert_eq!(c.eos_token_id, Some(want.clone()));
        assert_eq!(c.eos_ids(), want.ids());
        assert_eq!(c.model_type, ModelType::Qwen2);
        assert_eq!(c.rope_scaling.as_ref().unwrap().rope_type, RopeType::Llama3);
        let path = dir.path().join("config.json");
        c.to_file(&path).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back["eos_token_id"], serde_json::from_str::<serde_json::Value>(eos).unwrap());
        assert_eq!(
            (back["model_type"].as_str(), back["rope_scaling"]["rope_type"].as_str()),
            (Some("qwen2"), Some("llama3"))
        );
        assert_eq!(LlamaConfig::from_file(&path).unwrap(), c);
    }
    // Absent model_type: Llama.
    let mut v: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    v.as_object_mut().unwrap().remove("model_type");
    let c = LlamaConfig::from_json(Path::new("config.json"), &v.to_string()).unwrap();
    assert_eq!(c.model_type, ModelType::Llama);
}

#[test]
fn config_wrong_types_name_the_field() {
    let e = config_err(&config_with("hidden_size", "\"576\""));
    assert!(e.contains("hidden_size: expected an integer, got string \"576\""), "{e}");
    for (field, value, want) in [
        ("vocab_size", "64.5", "vocab_size: expected an integer, got number 64.5"),
        ("num_hidden_layers", "-2", "num_hidden_layers: expected a non-negative integer"),
        ("num_attention_heads", "null", "num_attention_heads: expected an integer, got null"),
        ("num_key_value_heads", "[2]", "num_key_value_heads: expected an integer, got an array"),
        ("rms_norm_eps", "\"1e-5\"", "rms_norm_eps: expected a number, got string"),
        ("rope_theta", "true", "rope_theta: expected a number, got boolean"),
        ("tie_word_embeddings", "\"false\"", "tie_word_embeddings: expected true or false"),
        ("hidden_act", "1", "hidden_act: expected a string, got number 1"),
        ("rope_scaling", "\"llama3\"", "rope_scaling: expected an object"),
        ("max_position_embeddings", "1e30", "max_position_embeddings: expected an integer"),
        (
            "rope_scaling",
            r#"{"rope_type": "llama3", "factor": "8"}"#,
            "rope_scaling.factor: expected a number",
        ),
    ] {
        let e = config_err(&config_with(field, value));
        assert!(e.contains(want), "{field} = {value}: {e}");
    }
    let mut v: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    v.as_object_mut().unwrap().remove("intermediate_size");
    assert!(config_err(&v.to_string()).contains("intermediate_size: missing"));
    assert!(config_err("[1, 2]").contains("expected a JSON object"));
    // Optional fields may be null; a byte-order mark is skipped.
    LlamaConfig::from_json(Path::new("c"), &config_with("head_dim", "null")).unwrap();
    LlamaConfig::from_json(Path::new("c"), &format!("\u{feff}{CONFIG}")).unwrap();
}

#[test]
fn config_zero_and_absurd_sizes_name_the_field() {
    for field in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    ] {
        let e = config_err(&config_with(field, "0"));
        assert!(e.contains(&format!("{field} = 0: must be positive")), "{e}");
    }
    for (field, _) in gems_model::config::SIZE_LIMITS {
        let e = config_err(&config_with(field, "1000000000000000000"));
        assert!(e.contains(&format!("{field} = 1000000000000000000 is absurd")), "{e}");
    }
    for (field, value) in [("rms_norm_eps", "0"), ("rope_theta", "-1")] {
        let e = config_err(&config_with(field, value));
        assert!(e.contains(&format!("{field} = ")) && e.contains("positive"), "{e}");
    }
    let e = config_err(&config_with(
        "rope_scaling",
        r#"{"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4}"#,
    ));
    assert!(e.contains("rope_scaling.high_freq_factor"), "{e}");
}

// ------------------------------------------------------------------ fuzzing

/// One mutation of a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    /// Cut the file at this fraction of its length.
    Truncate(f64),
    /// XOR the byte at this fraction of the length.
    Flip(f64, u8),
    /// Overwrite 8 bytes at this fraction with a hostile little-endian count.
    Count(f64, u64),
    /// Insert bytes at this fraction.
    Insert(f64, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = 0.0..1.0f64;
    let huge = prop_oneof![
        Just(u64::MAX),
        Just(1u64 << 62),
        Just(1u64 << 40),
        Just(1u64 << 32),
        Just(u32::MAX as u64),
        0u64..100_000,
        any::<u64>(),
    ];
    prop_oneof![
        1 => at.clone().prop_map(Mutation::Truncate),
        3 => (at.clone(), 1..=255u8).prop_map(|(a, x)| Mutation::Flip(a, x)),
        3 => (at.clone(), huge).prop_map(|(a, v)| Mutation::Count(a, v)),
        1 => (at, prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(a, b)| Mutation::Insert(a, b)),
    ]
}

/// Mutations biased to the first `hot` bytes (the headers), where hostile values do harm.
fn mutate(bytes: &[u8], hot: usize, muts: &[(bool, Mutation)]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for (in_header, m) in muts {
        let span = if *in_header { hot.min(b.len()) } else { b.len() };
        let pos = |f: f64| ((f * span as f64) as usize).min(span.saturating_sub(1));
        match m {
            Mutation::Truncate(f) => b.truncate(pos(*f)),
            Mutation::Flip(f, x) if !b.is_empty() => {
                let i = pos(*f);
                b[i] ^= x;
            }
            Mutation::Count(f, v) if b.len() >= 8 => {
                let i = pos(*f).min(b.len() - 8);
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            Mutation::Insert(f, x) => {
                let i = pos(*f).min(b.len());
                b.splice(i..i, x.iter().copied());
            }
            _ => {}
        }
    }
    b
}

fn mutations() -> impl Strategy<Value = Vec<(bool, Mutation)>> {
    prop::collection::vec((prop::bool::weighted(0.8), mutation()), 1..4)
}

fn gguf_fixture() -> &'static (Vec<u8>, usize) {
    static F: std::sync::OnceLock<(Vec<u8>, usize)> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let b = std::fs::read(fixtures().join("tiny_llama.gguf")).unwrap();
        let f = GgufFile::parse(Path::new("x"), b.clone()).unwrap();
        let header = f.tensors.iter().map(|t| t.range.0).min().unwrap();
        (b, header)
    })
}

fn safetensors_fixture() -> &'static (Vec<u8>, usize) {
    static F: std::sync::OnceLock<(Vec<u8>, usize)> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let mut tensors = BTreeMap::new();
        for (i, shape) in [vec![3, 4], vec![5], vec![0, 2], vec![2, 2, 2]].into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let data = (0..n).map(|x| x as f32 * 0.5).collect();
            tensors.insert(format!("t{i}.weight"), HostTensor::new(shape, data).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&p, &tensors, &meta).unwrap();
        let b = std::fs::read(&p).unwrap();
        let header = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        (b, header)
    })
}

/// Tokens that make a hostile JSON value for a config field.
fn json_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("1e308".to_string()),
        Just("18446744073709551616".to_string()),
        Just("18446744073709551615".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"32\"".to_string()),
        Just(r#"{"rope_type": "llama3", "factor": -1}"#.to_string()),
        (0u64..5000).prop_map(|x| x.to_string()),
        any::<u64>().prop_map(|x| x.to_string()),
    ]
}

const CONFIG_FIELDS: [&str; 16] = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Mutated GGUF files: parse, and everything a load does short of building the decoder,
    /// returns (Ok or Err) without panicking, and the parsed structure stays a small multiple
    /// of the file.
    #[test]
    fn fuzz_gguf(muts in mutations()) {
        let (bytes, header) = gguf_fixture();
        let b = mutate(bytes, *header, &muts);
        let len = b.len();
        if let Ok(f) = GgufFile::parse(Path::new("fuzz.gguf"), b) {
            prop_assert!(f.parsed_bytes() <= 6 * len + 4096, "{} bytes for {len}", f.parsed_bytes());
            if let Ok(c) = f.config() {
                let _ = f.weights(&c);
            }
            let _ = f.tokenizer();
        }
    }

    /// Mutated safetensors files: never a panic, and what parses holds at most 2 f32 per byte
    /// pair of the file (F16 widened).
    #[test]
    fn fuzz_safetensors(muts in mutations()) {
        let (bytes, header) = safetensors_fixture();
        let b = mutate(bytes, *header, &muts);
        match parse_safetensors(Path::new("fuzz.safetensors"), &b) {
            Ok(ts) => {
                let values: usize = ts.iter().map(|(_, t)| t.data.len()).sum();
                prop_assert!(values * 4 <= 2 * b.len(), "{values} values from {} bytes", b.len());
            }
            Err(e) => prop_assert!(e.to_string().contains("fuzz.safetensors"), "{e}"),
        }
    }

    /// Hostile safetensors headers built from parts: offsets and shapes of any size.
    #[test]
    fn fuzz_safetensors_offsets(
        entries in prop::collection::vec(
            (prop::sample::select(vec!["F32", "F16", "BF16", "F64", "I8"]),
             prop::collection::vec(prop_oneof![0usize..6, Just(usize::MAX)], 0..3),
             prop_oneof![0u64..64, any::<u64>()], prop_oneof![0u64..64, any::<u64>()]),
            0..5),
        data_len in 0usize..80,
    ) {
        let named: Vec<(String, &str, Vec<usize>, [u64; 2])> = entries
            .into_iter()
            .enumerate()
            .map(|(i, (d, s, b, e))| (format!("k{i}"), d, s, [b, e]))
            .collect();
        let refs: Vec<(&str, &str, &[usize], [u64; 2])> =
            named.iter().map(|(k, d, s, o)| (k.as_str(), *d, s.as_slice(), *o)).collect();
        let b = safetensors(&refs, data_len);
        if let Ok(ts) = parse_safetensors(Path::new("f.safetensors"), &b) {
            let values: usize = ts.iter().map(|(_, t)| t.data.len()).sum();
            prop_assert!(values * 2 <= data_len, "{values} values from {data_len} data bytes");
        }
    }

    /// `config.json` with one field replaced by a hostile value: accepted only when valid,
    /// otherwise an error naming the file and the field.
    #[test]
    fn fuzz_config_fields(field in prop::sample::select(CONFIG_FIELDS.to_vec()), value in json_value()) {
        let text = config_with(field, &value);
        match LlamaConfig::from_json(Path::new("fuzz/config.json"), &text) {
            Ok(c) => prop_assert!(c.validate(Path::new("x")).is_ok()),
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.contains("fuzz/config.json"), "{e}");
                // A bad value is named, unless it is a consistent-but-wrong size caught by a
                // cross-field check that names both fields, or an unsupported model_type/act.
                prop_assert!(e.contains(field) || e.contains("num_attention_heads")
                    || e.contains("head_dim"), "{field} = {value}: {e}");
            }
        }
    }

    /// Mutated `config.json` bytes: never a panic.
    #[test]
    fn fuzz_config_bytes(muts in mutations()) {
        let b = mutate(CONFIG.as_bytes(), CONFIG.len(), &muts);
        let text = String::from_utf8_lossy(&b);
        if let Err(e) = LlamaConfig::from_json(Path::new("fuzz/config.json"), &text) {
            prop_assert!(e.to_string().contains("fuzz/config.json"), "{e}");
        }
    }
}
