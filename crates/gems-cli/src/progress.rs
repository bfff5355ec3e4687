//! The terminal rendering of the libraries' progress events (`gems_train::Event`).
//!
//! A phase shows as one line on stderr: `[phase] done/total message | elapsed | ETA`. On a
//! terminal the line redraws in place; otherwise (CI logs, files) a line is printed at most
//! every `interval` per phase and at the phase's last unit, so logs stay short. Notes and
//! validations get lines of their own. `--quiet` passes [`Reporter::silent`] instead.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gems_train::progress::clock;
use gems_train::{Event, Observer, Reporter};

/// The reporter of a command: the terminal renderer, or silent with `--quiet`.
pub fn reporter(quiet: bool) -> Reporter {
    if quiet { Reporter::silent() } else { Reporter::new(Terminal::stderr()) }
}

/// Renders events as progress lines on a writer (stderr).
pub struct Terminal<W: Write + Send> {
    state: Mutex<State<W>>,
}

struct State<W> {
    out: W,
    tty: bool,
    interval: Duration,
    /// When each phase last printed a line.
    last_print: HashMap<String, Instant>,
}

impl Terminal<std::io::Stderr> {
    /// Progress on stderr, redrawn in place when stderr is a terminal.
    pub fn stderr() -> Self {
        let tty = std::io::stderr().is_terminal();
        Self::new(std::io::stderr(), tty, Duration::from_secs(10))
    }
}

impl<W: Write + Send> Terminal<W> {
    /// Progress on `out`: redrawn in place when `tty`, else a line at most every `interval`
    /// per phase (and at its last unit).
    pub fn new(out: W, tty: bool, interval: Duration) -> Self {
        Self { state: Mutex::new(State { out, tty, interval, last_print: HashMap::new() }) }
    }

    /// The writer, once done.
    #[cfg(test)]
    fn into_inner(self) -> W {
        self.state.into_inner().unwrap_or_else(|e| e.into_inner()).out
    }
}

impl<W: Write + Send> State<W> {
    fn render(&mut self, event: &Event) -> std::io::Result<()> {
        match event {
            Event::PhaseStarted { phase, .. } => {
                self.last_print.remove(phase);
            }
            Event::Progress { phase, done, total, seconds, message } => {
                let now = Instant::now();
                let due = self.last_print.get(phase).is_none_or(|&t| now - t >= self.interval)
                    || done >= total;
                if !self.tty && !due {
                    return Ok(());
                }
                self.last_print.insert(phase.clone(), now);
                let eta = if *done > 0 && done < total {
                    format!(" | ETA {}", clock(seconds / *done as f64 * (total - done) as f64))
                } else {
                    String::new()
                };
                let line = format!("[{phase}] {done}/{total} {message} | {}{eta}", clock(*seconds));
                if self.tty {
                    write!(self.out, "\r\x1b[2K{line}")?;
                    if done >= total {
                        writeln!(self.out)?;
                    }
                } else {
                    writeln!(self.out, "{line}")?;
                }
            }
            Event::PhaseFinished { phase, seconds, summary } => {
                self.last_print.remove(phase);
                if let Some(summary) = summary {
                    if self.tty {
                        write!(self.out, "\r\x1b[2K")?;
                    }
                    writeln!(self.out, "[{phase}] {summary} ({})", clock(*seconds))?;
                }
            }
            Event::Validated { step, ndcg10, loss, best } => {
                let ndcg: Vec<String> = ndcg10.iter().map(|(t, v)| format!("{t} {v:.4}")).collect();
                writeln!(
                    self.out,
                    "\nvalid step {step}: NDCG@10 {} | loss {loss:.4}{}",
                    ndcg.join(", "),
                    if *best { " (best)" } else { "" }
                )?;
            }
            Event::Note(note) => writeln!(self.out, "{note}")?,
        }
        self.out.flush()
    }
}

impl<W: Write + Send> Observer for Terminal<W> {
    fn event(&self, event: &Event) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Progress is best effort: a closed stderr does not stop a run.
        let _ = state.render(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(tty: bool, interval: Duration, events: &[Event]) -> String {
        let terminal = Terminal::new(Vec::new(), tty, interval);
        for e in events {
            terminal.event(e);
        }
        String::from_utf8(terminal.into_inner()).unwrap()
    }

    fn step(done: u64, message: &str) -> Event {
        Event::Progress {
            phase: "train".into(),
            done,
            total: 4,
            seconds: done as f64,
            message: message.into(),
        }
    }

    fn run() -> Vec<Event> {
        vec![
            Event::Note("resuming from run/checkpoint".into()),
            Event::PhaseStarted { phase: "train".into(), total: 4 },
            step(1, "loss 1"),
            step(2, "loss 2"),
            Event::Validated {
                step: 2,
                ndcg10: [("rec".to_string(), 0.125), ("search".to_string(), 0.5)].into(),
                loss: 2.0,
                best: true,
            },
            step(3, "loss 3"),
            step(4, "loss 4"),
            Event::PhaseFinished {
                phase: "train".into(),
                seconds: 4.0,
                summary: Some("4 steps".into()),
            },
            Event::PhaseStarted { phase: "perplexity".into(), total: 1 },
            Event::PhaseFinished { phase: "perplexity".into(), seconds: 0.5, summary: None },
        ]
    }

    #[test]
    fn logs_get_rate_limited_lines_with_eta() {
        let text = render(false, Duration::from_secs(3600), &run());
        assert_eq!(
            text,
            "resuming from run/checkpoint\n\
             [train] 1/4 loss 1 | 1.0s | ETA 3.0s\n\
             \n\
             valid step 2: NDCG@10 rec 0.1250, search 0.5000 | loss 2.0000 (best)\n\
             [train] 4/4 loss 4 | 4.0s\n\
             [train] 4 steps (4.0s)\n"
        );
        // Without the rate limit every update prints.
        assert_eq!(render(false, Duration::ZERO, &run()).matches("[train] ").count(), 5);
    }

    #[test]
    fn terminals_redraw_in_place() {
        let text = render(true, Duration::from_secs(3600), &run());
        assert!(text.contains("\r\x1b[2K[train] 2/4 loss 2 | 2.0s | ETA 2.0s\nvalid step 2"));
        assert!(text.contains("\r\x1b[2K[train] 4/4 loss 4 | 4.0s\n\r\x1b[2K[train] 4 steps"));
        assert!(!text.contains("perplexity"), "{text:?}");
    }

    #[test]
    fn quiet_is_silent() {
        assert!(reporter(true).is_silent());
        assert!(!reporter(false).is_silent());
    }
}
