//! Per-drive progress bars on a terminal (nothing when stderr is not one).

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::export::Counters;

/// Progress bars, one per drive, fed from the exports' counters.
pub(crate) struct Progress {
    _multi: MultiProgress,
    bars: Vec<(ProgressBar, Arc<Counters>, u64)>,
}

impl Progress {
    /// Bars for `(device name, size, counters)`, or `None` when disabled
    /// or stderr is not a terminal.
    pub(crate) fn new(enabled: bool, drives: &[(String, u64, Arc<Counters>)]) -> Option<Progress> {
        if !enabled || !std::io::stderr().is_terminal() {
            return None;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
        let style = ProgressStyle::with_template(
            "{prefix:>14} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars = drives
            .iter()
            .map(|(name, size, counters)| {
                let bar = multi.add(ProgressBar::new(*size));
                bar.set_style(style.clone());
                bar.set_prefix(name.clone());
                (bar, Arc::clone(counters), *size)
            })
            .collect();
        Some(Progress {
            _multi: multi,
            bars,
        })
    }

    /// Redraws from the counters.
    pub(crate) fn update(&self) {
        for (bar, counters, size) in &self.bars {
            let done = counters.data_bytes.load(Ordering::Relaxed)
                + counters.zero_bytes.load(Ordering::Relaxed);
            bar.set_position(done.min(*size));
        }
    }

    /// Ends the bars: finished on success, abandoned otherwise.
    pub(crate) fn finish(self, ok: bool) {
        self.update();
        for (bar, _, _) in &self.bars {
            if ok {
                bar.finish();
            } else {
                bar.abandon();
            }
        }
        // indicatif leaves the cursor at the end of the last bar.
        eprintln!();
    }
}
