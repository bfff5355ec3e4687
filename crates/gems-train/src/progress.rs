//! A one-line progress display on stderr: done/total, a message, rate and ETA.
//!
//! On a terminal the line redraws in place; otherwise (CI logs, files) a line is printed at
//! most every `interval` and at the end, so logs stay short.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress of one phase.
#[derive(Debug)]
pub struct Progress {
    phase: String,
    total: u64,
    started: Instant,
    last_print: Option<Instant>,
    interval: Duration,
    tty: bool,
    enabled: bool,
}

impl Progress {
    /// A display for `total` units of `phase`; `enabled = false` prints nothing.
    pub fn new(phase: &str, total: u64, enabled: bool) -> Self {
        Self {
            phase: phase.to_string(),
            total,
            started: Instant::now(),
            last_print: None,
            interval: Duration::from_secs(10),
            tty: std::io::stderr().is_terminal(),
            enabled,
        }
    }

    /// Seconds since the display was created.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Reports `done` units with a message (losses, rates).
    pub fn update(&mut self, done: u64, message: &str) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let due = self.last_print.is_none_or(|t| now - t >= self.interval) || done >= self.total;
        if !self.tty && !due {
            return;
        }
        self.last_print = Some(now);
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if done > 0 && done < self.total {
            format!(" | ETA {}", clock(elapsed / done as f64 * (self.total - done) as f64))
        } else {
            String::new()
        };
        let line =
            format!("[{}] {done}/{} {message} | {}{eta}", self.phase, self.total, clock(elapsed));
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if done >= self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Ends the display with a final message on its own line.
    pub fn finish(&mut self, message: &str) {
        if !self.enabled {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "[{}] {message} ({})", self.phase, clock(self.elapsed()));
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
