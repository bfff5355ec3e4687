//! The hidden states entering the first tuned layer, computed once per row and kept
//! (`model.frozen_cache`).
//!
//! With the lower layers frozen ([`Llama::freeze_lower_layers`]) and the input rows fixed (an
//! untied head, or no embedding training), the states entering the first tuned layer are a
//! function of a row's tokens alone. A run keeps them per row, computes a row the first time
//! one of its batches holds it, and builds every later batch from the kept states, so later
//! epochs run only the tuned layers. A batch's new rows are computed by length, each length's
//! rows as one batch without padding, which gives every row exactly its states alone, so a
//! row's states do not depend on the batch it first came in, and runs that share a model and
//! input rows (the methods and learning rates of one seed; with `model.item_collab` the item
//! rows, and so the file, differ between seeds) share one file: `frozen-<key>.bin` in the
//! cache directory, keyed by the model, its input rows, the frozen layers' output on a probe
//! row (which covers the code and the backend) and the device.
//!
//! A row alone and the same row in a padded batch agree to float rounding (about 1e-7 of the
//! states), not bit for bit, so a run with the cache differs from one without it by rounding;
//! with the cache, results do not depend on which rows an earlier run left in the file.
//!
//! File layout (little-endian): `GEMSFRZ1`, hidden size (u32), rows (u64); per row its length
//! (u32), token ids (u32 each) and states (`length x hidden` f32); then the SHA-256 of all
//! that. A damaged file is an error naming it, never a silent rebuild.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use burn::tensor::{Tensor, TensorData};
use gems_model::{Llama, TokenBatch};
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainError};
use crate::forward::read_f32;

const MAGIC: &[u8; 8] = b"GEMSFRZ1";

/// Kept frozen states of one model's rows, and the file they are read from and saved to.
#[derive(Debug)]
pub struct FrozenStates {
    file: PathBuf,
    hidden: usize,
    rows: Mutex<HashMap<Vec<u32>, Arc<[f32]>>>,
    /// Rows read from the file when opened.
    loaded: usize,
}

/// What a [`FrozenStates`] holds and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrozenStats {
    /// Rows read from the cache file when it was opened.
    pub loaded: usize,
    /// Rows held now (read and computed).
    pub rows: usize,
}

impl FrozenStates {
    /// The cache of `model`'s frozen states in `dir` (created when missing), with the rows its
    /// file already holds. `model_key` names the model file (its path, size and kept layers).
    ///
    /// # Errors
    /// No frozen layer, a damaged cache file, a failed forward pass.
    pub fn open(dir: &Path, model: &Llama, model_key: &str) -> Result<Self> {
        if model.frozen_layers == 0 {
            return Err(TrainError::Config(
                "model.frozen_cache needs frozen lower layers (model.tune_layers below the \
                 model's layer count)"
                    .into(),
            ));
        }
        let key = cache_key(model, model_key)?;
        let file = dir.join(format!("frozen-{}.bin", &key[..16]));
        let hidden = model.config.hidden_size;
        let rows =
            if file.is_file() { read_file(&file, hidden, |_| true)? } else { HashMap::new() };
        let loaded = rows.len();
        Ok(Self { file, hidden, rows: Mutex::new(rows), loaded })
    }

    /// The cache file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Rows read when opened, and held now.
    pub fn stats(&self) -> FrozenStats {
        FrozenStats { loaded: self.loaded, rows: self.lock().len() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u32>, Arc<[f32]>>> {
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Final hidden states of the right-padded `batch`, as [`Llama::hidden_states`] gives
    /// them up to rounding: the kept states of its rows (computed now for rows not kept yet)
    /// through `model`'s trainable layers.
    ///
    /// # Errors
    /// A batch that is not right-padded, a failed forward pass or read-back.
    pub fn hidden_states(&self, model: &Llama, batch: &TokenBatch) -> Result<Tensor<3>> {
        self.keep(model, batch)?;
        let (b, t, d) = (batch.batch_size, batch.seq_len, self.hidden);
        let mut states = vec![0f32; b * t * d];
        let rows = self.lock();
        for r in 0..b {
            let row = real_tokens(batch, r)?;
            let kept = rows.get(row).ok_or_else(|| {
                TrainError::Training(format!("frozen states: row {r} was not kept"))
            })?;
            states[r * t * d..][..kept.len()].copy_from_slice(kept);
        }
        drop(rows);
        let frozen = Tensor::<3>::from_data(TensorData::new(states, [b, t, d]), &model.device());
        Ok(model.hidden_states_from(batch, frozen)?)
    }

    /// Computes and keeps the states of the rows of the right-padded `batch` not kept yet,
    /// without running the trainable layers: the missing rows of each length together, as
    /// one batch without padding ([`rows_states`]).
    ///
    /// # Errors
    /// A batch that is not right-padded, a failed forward pass or read-back.
    pub fn keep(&self, model: &Llama, batch: &TokenBatch) -> Result<()> {
        let mut missing: Vec<&[u32]> = Vec::new();
        {
            let rows = self.lock();
            for r in 0..batch.batch_size {
                let row = real_tokens(batch, r)?;
                if !rows.contains_key(row) && !missing.contains(&row) {
                    missing.push(row);
                }
            }
        }
        missing.sort_by_key(|r| r.len());
        for group in missing.chunk_by(|a, b| a.len() == b.len()) {
            let states = rows_states(model, group)?;
            let mut rows = self.lock();
            for (row, s) in group.iter().zip(states) {
                rows.insert(row.to_vec(), s);
            }
        }
        Ok(())
    }

    /// Writes the kept rows, with those another run added to the file meanwhile, atomically
    /// to the cache file, streamed (memory holds the rows once); nothing when this run added
    /// no row. Returns the rows written (or read, when nothing was written).
    ///
    /// # Errors
    /// A damaged cache file, I/O failures.
    pub fn save(&self) -> Result<usize> {
        let mut rows = self.lock();
        if rows.len() == self.loaded && self.file.is_file() {
            return Ok(self.loaded);
        }
        if self.file.is_file() {
            // Rows another run added since this one opened the file.
            let others = read_file(&self.file, self.hidden, |ids| !rows.contains_key(ids))?;
            rows.extend(others);
        }
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        gems_io::write_atomic_with(&self.file, |w| encode(&rows, self.hidden, w))?;
        Ok(rows.len())
    }
}

/// The frozen states of `rows`, all of one length, as one batch without padding: each row's
/// are those of the row alone, to the bit (the products' sums run in the same order whatever
/// the number of rows; tested), so a row's states do not depend on the rows beside it.
fn rows_states(model: &Llama, rows: &[&[u32]]) -> Result<Vec<Arc<[f32]>>> {
    let len = rows.first().map_or(0, |r| r.len());
    let ids: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let batch = TokenBatch::new(ids, vec![true; rows.len() * len], rows.len(), len)?;
    let states = read_f32(model.frozen_states(&batch)?, "FrozenStates::keep")?;
    Ok(states.chunks(len * model.config.hidden_size).map(Arc::from).collect())
}

/// Row `r`'s real tokens of a right-padded batch.
fn real_tokens(batch: &TokenBatch, r: usize) -> Result<&[u32]> {
    let t = batch.seq_len;
    let mask = &batch.mask[r * t..(r + 1) * t];
    let len = mask.iter().take_while(|&&m| m).count();
    if mask[len..].iter().any(|&m| m) || len == 0 {
        return Err(TrainError::Training(format!(
            "frozen states: row {r} of the batch is not right-padded or is empty"
        )));
    }
    Ok(&batch.ids[r * t..r * t + len])
}

/// The cache key: the model file, its frozen layer count and hidden size, the device, the
/// input rows, and the frozen layers' output on a probe row (so a change of weights, code or
/// backend gives another key).
fn cache_key(model: &Llama, model_key: &str) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"gems-frozen-states-1");
    h.update(model_key.as_bytes());
    h.update((model.frozen_layers as u64).to_le_bytes());
    h.update((model.config.hidden_size as u64).to_le_bytes());
    h.update(format!("{:?}", model.device()).as_bytes());
    for v in read_f32(model.embed_tokens.weight.val(), "frozen cache key")? {
        h.update(v.to_le_bytes());
    }
    let vocab = model.embed_tokens.weight.dims()[0];
    let probe: Vec<u32> = (0..16u32).map(|i| (i * 7919) % vocab as u32).collect();
    let batch = TokenBatch::new(probe.clone(), vec![true; probe.len()], 1, probe.len())?;
    for v in read_f32(model.frozen_states(&batch)?, "frozen cache key")? {
        h.update(v.to_le_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Writes `rows` in the file layout (module documentation), rows in id order.
fn encode(
    rows: &HashMap<Vec<u32>, Arc<[f32]>>,
    hidden: usize,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let mut keys: Vec<&Vec<u32>> = rows.keys().collect();
    keys.sort();
    let mut out = Hashing { inner: out, sum: Sha256::new() };
    out.write_all(MAGIC)?;
    out.write_all(&(hidden as u32).to_le_bytes())?;
    out.write_all(&(keys.len() as u64).to_le_bytes())?;
    let mut buf = Vec::new();
    for k in keys {
        buf.clear();
        buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
        k.iter().for_each(|t| buf.extend_from_slice(&t.to_le_bytes()));
        rows[k].iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        out.write_all(&buf)?;
    }
    let sum = out.sum.finalize();
    out.inner.write_all(&sum)
}

/// A writer that hashes what passes through it.
struct Hashing<'a> {
    inner: &'a mut dyn Write,
    sum: Sha256,
}

impl Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The rows of the cache file `path` for which `wanted(ids)` holds (the others are read,
/// checked and dropped), streamed: memory is what is kept, not the file.
fn read_file(
    path: &Path,
    hidden: usize,
    wanted: impl Fn(&[u32]) -> bool,
) -> Result<HashMap<Vec<u32>, Arc<[f32]>>> {
    let file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let len = file.metadata().map_err(|e| TrainError::io(path, e))?.len();
    decode(std::io::BufReader::new(file), len, hidden, wanted).map_err(|detail| {
        TrainError::format(path, format!("{detail}; delete the file to rebuild the cache"))
    })
}

/// Reads the file layout from `input` of `len` bytes, checking the checksum at the end.
fn decode(
    input: impl Read,
    len: u64,
    hidden: usize,
    wanted: impl Fn(&[u32]) -> bool,
) -> std::result::Result<HashMap<Vec<u32>, Arc<[f32]>>, String> {
    if len < 20 + 32 {
        return Err("not a frozen-states cache file (too short)".into());
    }
    let body = len - 32;
    let mut r = Reader { input, left: body, sum: Sha256::new() };
    if &r.take::<8>()? != MAGIC {
        return Err("not a frozen-states cache file (bad header)".into());
    }
    let h = r.u32()? as usize;
    if h != hidden {
        return Err(format!("hidden size {h}, the model's is {hidden}"));
    }
    let n = r.u64()?;
    let mut rows = HashMap::new();
    for i in 0..n {
        let len = r.u32()? as u64;
        if len == 0 || len.saturating_mul(4 + 4 * hidden as u64) > r.left {
            return Err(format!("row {i}: length {len} runs past the end of the file"));
        }
        let ids: Vec<u32> = (0..len).map(|_| r.u32()).collect::<std::result::Result<_, _>>()?;
        let states: Vec<f32> = (0..len as usize * hidden)
            .map(|_| r.u32().map(f32::from_bits))
            .collect::<std::result::Result<_, _>>()?;
        if wanted(&ids) {
            rows.insert(ids, states.into());
        }
    }
    if r.left != 0 {
        return Err(format!("{} bytes after the last row", r.left));
    }
    let sum = r.sum.finalize();
    let mut stored = [0u8; 32];
    r.input.read_exact(&mut stored).map_err(|_| "the file ends early".to_string())?;
    if sum.as_slice() != stored {
        return Err("checksum mismatch (a damaged or truncated file)".into());
    }
    Ok(rows)
}

/// Little-endian reads from the body of a cache file, hashed, never past its end.
struct Reader<R> {
    input: R,
    left: u64,
    sum: Sha256,
}

impl<R: Read> Reader<R> {
    fn take<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut b = [0u8; N];
        if self.left < N as u64 || self.input.read_exact(&mut b).is_err() {
            return Err("the file ends early".into());
        }
        self.left -= N as u64;
        self.sum.update(b);
        Ok(b)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        self.take::<8>().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HashMap<Vec<u32>, Arc<[f32]>> {
        let mut rows = HashMap::new();
        rows.insert(vec![3, 4], Arc::from(vec![1.0f32, -2.0, 0.5, 7.0]));
        rows.insert(vec![9], Arc::from(vec![f32::MIN_POSITIVE, 3.25]));
        rows
    }

    fn bytes(rows: &HashMap<Vec<u32>, Arc<[f32]>>, hidden: usize) -> Vec<u8> {
        let mut out = Vec::new();
        encode(rows, hidden, &mut out).unwrap();
        out
    }

    fn read(b: &[u8], hidden: usize) -> std::result::Result<HashMap<Vec<u32>, Arc<[f32]>>, String> {
        decode(b, b.len() as u64, hidden, |_| true)
    }

    #[test]
    fn files_round_trip_and_damage_is_refused() {
        let bytes = bytes(&sample(), 2);
        assert_eq!(read(&bytes, 2).unwrap(), sample());
        assert!(read(&bytes, 3).unwrap_err().contains("hidden size 2"));
        let only = decode(&bytes[..], bytes.len() as u64, 2, |ids| ids == [9]).unwrap();
        assert_eq!(only.keys().collect::<Vec<_>>(), [&vec![9]]);
        for cut in [0, 10, 30, bytes.len() - 1] {
            assert!(read(&bytes[..cut], 2).is_err(), "cut at {cut}");
        }
        for flip in [9, 25, bytes.len() / 2, bytes.len() - 3] {
            let mut bad = bytes.clone();
            bad[flip] ^= 1;
            assert!(read(&bad, 2).is_err(), "flip at {flip}");
        }
        // A row length past the end is caught before allocating, with a valid checksum.
        let mut huge = bytes[..bytes.len() - 32].to_vec();
        huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        let sum = Sha256::digest(&huge);
        huge.extend_from_slice(&sum);
        assert!(read(&huge, 2).unwrap_err().contains("runs past the end"));
    }
}
