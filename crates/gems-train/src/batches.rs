//! Training batches: a seeded order of each task's rows per epoch, bucketed by length, and
//! the next batch of every task for a step from the tasks' cursors.

use gems_data::{Split, Task};
use gems_rng::SplitMix64;

use crate::checkpoint::{Cursor, TrainerState};
use crate::config::TrainConfig;
use crate::setup::{Corpus, Sample, Setup};

/// Tasks a configuration trains (and evaluates) that have training samples.
pub(crate) fn active_tasks(config: &TrainConfig, corpus: &Corpus) -> Vec<Task> {
    Task::ALL
        .into_iter()
        .filter(|&t| config.data.tasks.includes(t) && !corpus.get(Split::Train, t).is_empty())
        .collect()
}

/// A seeded permutation of `0..n` for one task and epoch.
pub(crate) fn permutation(n: usize, seed: u64, task: Task, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::for_stream(seed, &[task as u64 + 1, epoch]);
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    idx
}

/// The label of the random stream that orders a bucket's batches.
pub(crate) const BUCKET_STREAM: u64 = 0xB0C4E7;

/// A task's sample order for one epoch: its [`permutation`], and with length bucketing
/// (`bucket = Some((rows, k))`, k > 1) each run of `k` batches of `rows` samples sorted by
/// length (stable) and its full batches served in a seeded random order, so that a batch holds
/// samples of similar length and pads little. A pure function of its arguments, so a resumed
/// run continues exactly; without bucketing it is the permutation itself.
pub(crate) fn epoch_order(
    samples: &[Sample],
    seed: u64,
    task: Task,
    epoch: u64,
    bucket: Option<(usize, usize)>,
) -> Vec<usize> {
    let mut order = permutation(samples.len(), seed, task, epoch);
    let Some((rows, k)) = bucket.filter(|&(rows, k)| rows > 0 && k > 1) else { return order };
    let mut rng = SplitMix64::for_stream(seed, &[task as u64 + 1, epoch, BUCKET_STREAM]);
    for run in order.chunks_mut(rows * k) {
        run.sort_by_key(|&i| samples[i].ids.len());
        let mut batches: Vec<Vec<usize>> = run.chunks(rows).map(<[usize]>::to_vec).collect();
        // A short last batch (at the epoch's end) stays last, so batches stay aligned.
        let full = run.len() / rows;
        rng.shuffle(&mut batches[..full]);
        run.copy_from_slice(&batches.concat());
    }
    order
}

/// The next `rows` samples of a task's stream, advancing its cursor across epochs; `order`
/// gives an epoch's sample order ([`epoch_order`]).
pub(crate) fn next_batch<'a>(
    samples: &'a [Sample],
    cursor: &mut Cursor,
    rows: usize,
    order: impl Fn(u64) -> Vec<usize>,
    perm: &mut Option<(u64, Vec<usize>)>,
) -> Vec<&'a Sample> {
    let mut out = Vec::with_capacity(rows);
    while out.len() < rows {
        if perm.as_ref().is_none_or(|(e, _)| *e != cursor.epoch) {
            *perm = Some((cursor.epoch, order(cursor.epoch)));
        }
        let Some((_, order)) = perm.as_ref() else { break };
        while out.len() < rows && cursor.index < order.len() {
            out.push(&samples[order[cursor.index]]);
            cursor.index += 1;
        }
        if cursor.index >= order.len() {
            cursor.epoch += 1;
            cursor.index = 0;
        }
    }
    out
}

/// The batches of one optimizer step, in the order the trainer computes them: `grad_accum`
/// micro-batches, each holding `batch_size` samples of every trained task (task order as in
/// `tasks`), drawn from the tasks' data cursors, which advance across epochs.
pub(crate) fn step_batches<'a>(
    setup: &'a Setup,
    config: &TrainConfig,
    tasks: &[Task],
    state: &mut TrainerState,
    perms: &mut [Option<(u64, Vec<usize>)>],
) -> Vec<(Task, Vec<&'a Sample>)> {
    let mut batches = Vec::with_capacity(config.schedule.grad_accum * tasks.len());
    for _ in 0..config.schedule.grad_accum {
        for &task in tasks {
            let cursor = state.cursors.entry(task.name().to_string()).or_default();
            let samples = setup.train_rows(task);
            let rows = config.schedule.batch_size;
            let bucket = config.schedule.bucket.map(|k| (rows, k));
            let order = |epoch| epoch_order(samples, config.seed, task, epoch, bucket);
            let batch = next_batch(samples, cursor, rows, order, &mut perms[task as usize]);
            batches.push((task, batch));
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples_of_lengths(lengths: &[usize]) -> Vec<Sample> {
        lengths
            .iter()
            .map(|&n| Sample {
                user: 0,
                position: 1,
                ids: vec![1; n],
                target_pos: n - 1,
                target: 0,
                history: Vec::new(),
                query: None,
                negatives: Vec::new(),
            })
            .collect()
    }

    /// Padded tokens of the batches of `rows` an order gives.
    fn padded(samples: &[Sample], order: &[usize], rows: usize) -> usize {
        order
            .chunks(rows)
            .map(|b| b.len() * b.iter().map(|&i| samples[i].ids.len()).max().unwrap())
            .sum()
    }

    #[test]
    fn bucketing_reorders_within_runs_of_batches_and_pads_less() {
        let mut rng = SplitMix64::new(5);
        let lengths: Vec<usize> = (0..203).map(|_| 3 + rng.below(60) as usize).collect();
        let samples = samples_of_lengths(&lengths);
        let plain = epoch_order(&samples, 7, Task::Rec, 2, None);
        assert_eq!(plain, permutation(samples.len(), 7, Task::Rec, 2), "no bucketing: as before");
        assert_eq!(epoch_order(&samples, 7, Task::Rec, 2, Some((8, 1))), plain, "k = 1 is off");
        let (rows, k) = (8, 4);
        let bucketed = epoch_order(&samples, 7, Task::Rec, 2, Some((rows, k)));
        assert_eq!(bucketed, epoch_order(&samples, 7, Task::Rec, 2, Some((rows, k))), "seeded");
        // Each run of k batches holds the same samples as before, each batch a slice of the run
        // sorted by length, and the run's short last batch stays last.
        for (run, plain_run) in bucketed.chunks(rows * k).zip(plain.chunks(rows * k)) {
            let mut a = run.to_vec();
            let mut b = plain_run.to_vec();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
            let mut sorted = plain_run.to_vec();
            sorted.sort_by_key(|&i| samples[i].ids.len());
            let slices: Vec<&[usize]> = sorted.chunks(rows).collect();
            for (j, batch) in run.chunks(rows).enumerate() {
                assert!(slices.contains(&batch), "batch {j} is not a slice of its sorted run");
                if batch.len() < rows {
                    assert_eq!(j, run.len() / rows, "a short batch is the run's last");
                }
            }
        }
        assert!(padded(&samples, &bucketed, rows) < padded(&samples, &plain, rows) * 9 / 10);
    }
}
