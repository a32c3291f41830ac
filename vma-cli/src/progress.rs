//! Progress: a bar on a terminal, the reference tool's lines with `-v`, nothing otherwise.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
pub enum Progress {
    /// Nothing (output is not a terminal, or it was turned off).
    Quiet,
    /// A bar on stderr.
    Bar(ProgressBar),
    /// The reference's `progress N% ...` lines, printed when the percentage changes.
    Lines {
        /// Where the lines go: the reference prints extract progress on stdout and
        /// create progress on stderr.
        to_stderr: bool,
        /// Total bytes.
        total: u64,
        /// Last percentage printed.
        last: Option<u64>,
        /// Start time.
        start: Instant,
        /// Which line format.
        style: LineStyle,
    },
}

/// The reference tool's two progress line formats.
#[derive(Clone, Copy)]
pub enum LineStyle {
    /// `progress 5% (read 1234 bytes, duration 3 sec)` (extract, verify).
    Read,
    /// `progress 5% 1234/5678` (create: bytes done/total; the reference adds a zero-byte
    /// count, which is only known at the end here and printed in the summary).
    Create,
}

impl Progress {
    /// Chooses: reference lines when `verbose`, a bar when stderr is a terminal.
    pub fn new(verbose: bool, total: u64, style: LineStyle, message: &str) -> Progress {
        if verbose {
            return Progress::Lines {
                to_stderr: matches!(style, LineStyle::Create),
                total: total.max(1),
                last: None,
                start: Instant::now(),
                style,
            };
        }
        if !std::io::stderr().is_terminal() || total == 0 {
            return Progress::Quiet;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(message.to_string());
        Progress::Bar(bar)
    }

    /// Reports `done` bytes so far.
    pub fn update(&mut self, done: u64) {
        match self {
            Progress::Quiet => {}
            Progress::Bar(bar) => bar.set_position(done),
            Progress::Lines {
                to_stderr,
                total,
                last,
                start,
                style,
            } => {
                let percent = (done.min(*total) * 100) / *total;
                if *last == Some(percent) {
                    return;
                }
                *last = Some(percent);
                let line = match style {
                    LineStyle::Read => format!(
                        "progress {percent}% (read {done} bytes, duration {} sec)",
                        start.elapsed().as_secs()
                    ),
                    LineStyle::Create => format!("progress {percent}% {done}/{total}"),
                };
                if *to_stderr {
                    eprintln!("{line}");
                } else {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
            }
        }
    }

    /// Removes the bar, if any.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
