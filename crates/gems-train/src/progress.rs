//! Progress as events: the library reports what it is doing, the caller decides what to show.
//!
//! Long work is split into phases (`train`, `eval before test rec`, `perplexity`, `null-space
//! statistics`, `sasrec`, ...). A phase is announced by [`Event::PhaseStarted`], advances with
//! [`Event::Progress`] and ends with [`Event::PhaseFinished`] (a phase cut short by an error
//! has no `PhaseFinished`). One-off facts (resuming, the model loaded, the null space built)
//! are [`Event::Note`]s, and every validation during training is an [`Event::Validated`].
//!
//! Events go to an [`Observer`] through a [`Reporter`], which options carry
//! ([`crate::RunOptions`], [`crate::eval::EvalOptions`]); the default reporter is silent.
//! No code of this crate writes to the terminal: `gems` (the CLI) renders events as a progress
//! line on stderr.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// What the library reports while it works.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A phase of `total` units (steps, examples, windows, matrices) began.
    PhaseStarted {
        /// The phase's name, e.g. `train` or `eval before test rec`.
        phase: String,
        /// Units the phase will do.
        total: u64,
    },
    /// `done` of the phase's `total` units are done.
    Progress {
        /// The phase's name.
        phase: String,
        /// Units done so far (`done == total` at the last one).
        done: u64,
        /// Units the phase will do.
        total: u64,
        /// Seconds since the phase started.
        seconds: f64,
        /// About the latest unit: losses, rates, a matrix; may be empty.
        message: String,
    },
    /// The phase ended.
    PhaseFinished {
        /// The phase's name.
        phase: String,
        /// Seconds since the phase started.
        seconds: f64,
        /// How it ended (`6 steps`, `stopped after step 3 (resume to continue)`), for phases
        /// that summarise their end.
        summary: Option<String>,
    },
    /// A validation during training.
    Validated {
        /// The optimizer step it followed.
        step: u64,
        /// Full-catalogue NDCG@10 per task.
        ndcg10: BTreeMap<String, f64>,
        /// Mean target-token loss over the tasks.
        loss: f64,
        /// Whether it is the best validation so far (the tuned model was written).
        best: bool,
    },
    /// A one-off fact, in words (`resuming from ...`).
    Note(String),
}

/// Receives events. Shared by the reporters that carry it, possibly across threads.
///
/// Any `Fn(&Event) + Send + Sync` closure is an observer.
pub trait Observer: Send + Sync {
    /// Called once per event, in order.
    fn event(&self, event: &Event);
}

impl<F: Fn(&Event) + Send + Sync> Observer for F {
    fn event(&self, event: &Event) {
        self(event);
    }
}

/// Where events go: an observer, or nowhere ([`Reporter::silent`], the default). Cheap to
/// clone; clones share the observer.
#[derive(Clone, Default)]
pub struct Reporter(Option<Arc<dyn Observer>>);

impl Reporter {
    /// A reporter that drops every event.
    pub fn silent() -> Self {
        Self(None)
    }

    /// A reporter that hands every event to `observer`.
    pub fn new(observer: impl Observer + 'static) -> Self {
        Self(Some(Arc::new(observer)))
    }

    /// A reporter that hands every event to a shared `observer`.
    pub fn shared(observer: Arc<dyn Observer>) -> Self {
        Self(Some(observer))
    }

    /// Whether events are dropped.
    pub fn is_silent(&self) -> bool {
        self.0.is_none()
    }

    /// Hands `event` to the observer, if any.
    pub fn emit(&self, event: Event) {
        if let Some(o) = &self.0 {
            o.event(&event);
        }
    }

    /// Emits a [`Event::Note`].
    pub fn note(&self, note: impl FnOnce() -> String) {
        if !self.is_silent() {
            self.emit(Event::Note(note()));
        }
    }

    /// Starts a phase of `total` units (emits [`Event::PhaseStarted`]).
    pub fn phase(&self, phase: &str, total: u64) -> Phase {
        self.emit(Event::PhaseStarted { phase: phase.to_string(), total });
        Phase { reporter: self.clone(), phase: phase.to_string(), total, started: Instant::now() }
    }
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_silent() { "Reporter(silent)" } else { "Reporter(observed)" })
    }
}

/// One running phase: reports its progress and its end.
#[derive(Debug)]
pub struct Phase {
    reporter: Reporter,
    phase: String,
    total: u64,
    started: Instant,
}

impl Phase {
    /// Seconds since the phase started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Reports `done` units with a message (emits [`Event::Progress`]).
    pub fn update(&self, done: u64, message: &str) {
        if self.reporter.is_silent() {
            return;
        }
        self.reporter.emit(Event::Progress {
            phase: self.phase.clone(),
            done,
            total: self.total,
            seconds: self.elapsed(),
            message: message.to_string(),
        });
    }

    /// Ends the phase (emits [`Event::PhaseFinished`]), with a summary when there is one.
    pub fn finish(self, summary: Option<String>) {
        let seconds = self.elapsed();
        self.reporter.emit(Event::PhaseFinished { phase: self.phase, seconds, summary });
    }
}

/// `1h02m03s`, `4m05s` or `6.1s`.
pub fn clock(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "?".into();
    }
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s % 3600 / 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{seconds:.1}s")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use burn::tensor::Device;

    use super::*;
    use crate::trainer::{RunOptions, RunOutcome, train};

    /// An observer that keeps every event.
    fn recorder() -> (Reporter, Arc<Mutex<Vec<Event>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        (Reporter::new(move |e: &Event| sink.lock().unwrap().push(e.clone())), events)
    }

    #[test]
    fn phases_report_progress_and_their_end() {
        let (reporter, events) = recorder();
        let phase = reporter.phase("work", 2);
        phase.update(1, "a");
        phase.update(2, "b");
        phase.finish(Some("2 units".into()));
        reporter.note(|| "done".into());
        let events = events.lock().unwrap();
        assert_eq!(events.len(), 5);
        assert_eq!(events[0], Event::PhaseStarted { phase: "work".into(), total: 2 });
        assert!(matches!(&events[2], Event::Progress { done: 2, total: 2, message, .. }
            if message == "b"));
        assert!(matches!(&events[3], Event::PhaseFinished { phase, summary: Some(s), .. }
            if phase == "work" && s == "2 units"));
        assert_eq!(events[4], Event::Note("done".into()));
    }

    #[test]
    fn the_silent_reporter_calls_nothing() {
        let reporter = Reporter::default();
        assert!(reporter.is_silent());
        reporter.note(|| panic!("a silent reporter formats no note"));
        let phase = reporter.phase("work", 1);
        phase.update(1, "");
        phase.finish(None);
        assert_eq!(format!("{reporter:?}"), "Reporter(silent)");
    }

    #[test]
    fn clock_formats() {
        assert_eq!(clock(6.12), "6.1s");
        assert_eq!(clock(245.0), "4m05s");
        assert_eq!(clock(3723.0), "1h02m03s");
        assert_eq!(clock(f64::NAN), "?");
    }

    /// A tiny gems run (null space, validation every 3 steps, before/after evaluation with
    /// perplexity) reports its phases in order, each started phase finished.
    #[test]
    fn a_tiny_run_reports_its_phases_in_order() {
        let data_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
        let root = tempfile::tempdir().unwrap();
        let mut config = crate::tiny::tiny_run_config(root.path(), &data_root, 3).unwrap();
        config.eval.floors = false;
        let (progress, events) = recorder();
        let options = RunOptions { device: Device::flex(), resume: false, progress };
        let outcome = train(&config, &root.path().join("run"), &options).unwrap();
        assert!(matches!(outcome, RunOutcome::Finished(_)));

        let events = events.lock().unwrap();
        let started: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::PhaseStarted { phase, .. } => Some(phase.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            started,
            [
                "eval before test rec",
                "eval before test search",
                "perplexity",
                "null-space statistics",
                "null-space eigendecompositions",
                "train",
                "eval after test rec",
                "eval after test search",
                "perplexity",
            ]
        );
        // Every phase ends before the next starts, its last progress at `total`.
        let mut open: Option<(&str, u64, u64)> = None;
        for e in events.iter() {
            match e {
                Event::PhaseStarted { phase, total } => {
                    assert!(open.is_none(), "{phase} started inside {open:?}");
                    open = Some((phase, *total, 0));
                }
                Event::Progress { phase, done, total, .. } => {
                    let (p, t, last) = open.as_mut().expect("progress inside a phase");
                    assert_eq!((*p, *t), (phase.as_str(), *total));
                    assert!(*done > *last && done <= total, "{phase}: {done} after {last}");
                    *last = *done;
                }
                Event::PhaseFinished { phase, summary, .. } => {
                    let (p, t, last) = open.take().expect("a finish ends a started phase");
                    assert_eq!((p, last), (phase.as_str(), t), "{phase} ended early");
                    if phase == "train" {
                        assert_eq!(summary.as_deref(), Some("3 steps"));
                    }
                }
                Event::Validated { step, ndcg10, loss, .. } => {
                    assert_eq!(open.map(|o| o.0), Some("train"));
                    assert_eq!(*step, 3);
                    assert_eq!(ndcg10.len(), 2);
                    assert!(loss.is_finite());
                }
                Event::Note(_) => assert!(open.is_none(), "a note inside a phase"),
            }
        }
        assert!(open.is_none());
        let notes: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::Note(n) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("model ") && notes[1].starts_with("null space: "));
    }
}
