//! Progress: a bar on a terminal, the reference tool's lines with `-v`, nothing otherwise.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use vma_format::{ArchiveHeader, VMA_CLUSTER_SIZE};
use vma_reader::{ReadProgress, VerifyReport};

/// Progress of reading an archive (verify, extract): Proxmox's lines with `-v`, else a
/// bar over device bytes on a terminal, else nothing.
pub enum ReadingProgress {
    /// No output.
    Quiet,
    /// A bar on stderr over the devices' bytes.
    Bar(ProgressBar),
    /// Proxmox's `progress N% (read N bytes, duration N sec)` lines on stdout.
    Lines(ProxmoxLines),
}

/// Proxmox's reading progress, exactly as its reader counts: after every cluster (vmstate
/// included), `percent = clusters * 100 / cluster_count`, where `cluster_count` adds up
/// each device's whole clusters (`size / 65536`, rounded down), so that the last lines
/// may pass 100 %; a line whenever the percentage changes (never for 0 %); `read` is the
/// clusters times 65536.
pub struct ProxmoxLines {
    cluster_count: u64,
    clusters: u64,
    last_percent: u64,
    start: Instant,
}

impl ProxmoxLines {
    /// Lines for an archive with this header.
    pub fn new(header: &ArchiveHeader) -> ProxmoxLines {
        ProxmoxLines {
            cluster_count: header
                .devices
                .iter()
                .filter(|d| !d.is_vmstate())
                .map(|d| d.size / VMA_CLUSTER_SIZE as u64)
                .sum(),
            clusters: 0,
            last_percent: 0,
            start: Instant::now(),
        }
    }

    /// The lines for clusters read up to `clusters`, one per change of percentage.
    pub fn advance(&mut self, clusters: u64) -> Vec<String> {
        let mut lines = Vec::new();
        // Proxmox's reader divides by zero here (and dies of SIGFPE); print nothing.
        if self.cluster_count == 0 {
            self.clusters = clusters;
            return lines;
        }
        let duration = self.start.elapsed().as_secs();
        while self.clusters < clusters {
            self.clusters += 1;
            let percent = self.clusters * 100 / self.cluster_count;
            if percent != self.last_percent {
                self.last_percent = percent;
                lines.push(format!(
                    "progress {percent}% (read {} bytes, duration {duration} sec)",
                    self.clusters * VMA_CLUSTER_SIZE as u64
                ));
            }
        }
        lines
    }
}

impl ReadingProgress {
    /// Chooses: Proxmox's lines when `verbose`, a bar when stderr is a terminal.
    pub fn new(verbose: bool, header: &ArchiveHeader, message: &str) -> ReadingProgress {
        if verbose {
            return ReadingProgress::Lines(ProxmoxLines::new(header));
        }
        let total: u64 = header.devices.iter().map(|d| d.size).sum();
        match bar(total, message) {
            Some(bar) => ReadingProgress::Bar(bar),
            None => ReadingProgress::Quiet,
        }
    }

    /// Reports how far reading has come.
    pub fn update(&mut self, p: &ReadProgress) {
        match self {
            ReadingProgress::Quiet => {}
            ReadingProgress::Bar(bar) => bar.set_position(p.device_bytes),
            ReadingProgress::Lines(lines) => {
                let text = lines.advance(p.clusters);
                if !text.is_empty() {
                    let mut out = std::io::stdout().lock();
                    for line in text {
                        let _ = writeln!(out, "{line}");
                    }
                    let _ = out.flush();
                }
            }
        }
    }

    /// Removes the bar, if any.
    pub fn finish(&self) {
        if let ReadingProgress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The statistics Proxmox's `vma verify -v` and `vma extract -v` end with, computed as
/// its reader computes them: bytes read are whole clusters; "sparse" are the bytes of
/// blocks not stored (in whole sectors inside the device); the "4K zero blocks" are the
/// sparse bytes of clusters that store some blocks, against the non-sparse bytes.
pub fn statistics(r: &VerifyReport) -> Vec<String> {
    let read: u64 = r
        .devices
        .iter()
        .map(|d| d.clusters * VMA_CLUSTER_SIZE as u64)
        .sum();
    if read == 0 {
        return vec!["vma archive contains no image data".into()];
    }
    let sparse: u64 = r.devices.iter().map(|d| d.sparse_bytes).sum();
    let partial: u64 = r.devices.iter().map(|d| d.partial_sparse_bytes).sum();
    let mut lines = vec![format!(
        "total bytes read {read}, sparse bytes {sparse} ({}%)",
        format_g3(100.0 * sparse as f64 / read as f64)
    )];
    let data = read.saturating_sub(sparse);
    if data > 0 {
        lines.push(format!(
            "space reduction due to 4K zero blocks {}%",
            format_g3(100.0 * partial as f64 / data as f64)
        ));
    }
    lines
}

/// C's `%.3g`: three significant digits, trailing zeros dropped.
fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let exp = x.abs().log10().floor() as i32;
    if !(-5..3).contains(&exp) {
        return format!("{x:.2e}");
    }
    let decimals = (2 - exp).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A bar over `total` bytes on stderr, if stderr is a terminal.
fn bar(total: u64, message: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() || total == 0 {
        return None;
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
    Some(bar)
}

/// A bar on stderr over the device bytes done, when stderr is a terminal.
pub enum Progress {
    /// Nothing (stderr is not a terminal, or there is nothing to do).
    Quiet,
    /// A bar on stderr.
    Bar(ProgressBar),
}

impl Progress {
    /// A bar over `total` bytes if stderr is a terminal and `wanted`.
    pub fn bar(wanted: bool, total: u64, message: &str) -> Progress {
        match bar(total, message).filter(|_| wanted) {
            Some(bar) => Progress::Bar(bar),
            None => Progress::Quiet,
        }
    }

    /// Reports `done` bytes so far.
    pub fn update(&mut self, done: u64) {
        if let Progress::Bar(bar) = self {
            bar.set_position(done);
        }
    }

    /// Removes the bar, if any.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Proxmox's `vma create -v` figures, counted as its writer counts them, cluster by
/// cluster as clusters are recorded: `transferred` is device bytes (the last cluster cut
/// at the device end), `zero_bytes` adds 4096 for every block not stored (a zero block,
/// or one past the device end). A `progress N% TRANSFERRED/TOTAL ZEROBYTES` line goes to
/// stderr whenever the percentage changes; Proxmox samples the same figures from its main
/// loop, so its lines are a subset of these.
#[derive(Debug)]
pub struct CreateLines {
    verbose: bool,
    total: u64,
    transferred: u64,
    zero_bytes: u64,
    last_percent: Option<u64>,
    /// Per device id: zero bytes, for the closing `image` lines.
    device_zero_bytes: Vec<u64>,
}

impl CreateLines {
    /// Figures for devices of `total` bytes; lines only when `verbose`.
    pub fn new(verbose: bool, total: u64) -> CreateLines {
        CreateLines {
            verbose,
            total,
            transferred: 0,
            zero_bytes: 0,
            last_percent: None,
            device_zero_bytes: vec![0; 256],
        }
    }

    /// Counts a recorded cluster; returns the line to print, if the percentage changed.
    pub fn record(&mut self, c: &vma_writer::RecordedCluster) -> Option<String> {
        let zeros = ((16 - c.mask.stored_blocks()) * vma_format::VMA_BLOCK_SIZE) as u64;
        self.transferred += c.span as u64;
        self.zero_bytes += zeros;
        self.device_zero_bytes[c.device.index()] += zeros;
        let percent = self.transferred * 100 / self.total.max(1);
        if !self.verbose || self.last_percent == Some(percent) {
            return None;
        }
        self.last_percent = Some(percent);
        Some(format!(
            "progress {percent}% {}/{} {}",
            self.transferred, self.total, self.zero_bytes
        ))
    }

    /// Proxmox's closing line for a device.
    pub fn image_line(&self, d: &vma_writer::DeviceSummary) -> String {
        let zeros = self.device_zero_bytes[d.id.index()];
        format!(
            "image {}: size={} zeros={zeros} saved={}",
            d.name,
            d.size,
            d.size.saturating_sub(zeros)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_like_printf_g3() {
        assert_eq!(format_g3(98.5123), "98.5");
        assert_eq!(format_g3(5.08), "5.08");
        assert_eq!(format_g3(0.818), "0.818");
        assert_eq!(format_g3(100.0), "100");
        assert_eq!(format_g3(3.72), "3.72");
        assert_eq!(format_g3(54.2), "54.2");
        assert_eq!(format_g3(0.0), "0");
    }

    fn lines_for(sizes: &[u64], clusters_per_step: &[u64]) -> Vec<String> {
        let mut lines = ProxmoxLines {
            cluster_count: sizes.iter().map(|s| s / VMA_CLUSTER_SIZE as u64).sum(),
            clusters: 0,
            last_percent: 0,
            start: Instant::now(),
        };
        let mut out = Vec::new();
        let mut done = 0;
        for step in clusters_per_step {
            done += step;
            out.extend(lines.advance(done));
        }
        out
    }

    #[test]
    fn lines_per_cluster_whatever_the_extents() {
        // vec2: 7 whole clusters, 9 read: the last lines pass 100 %.
        let a = lines_for(&[1024, 262144, 197120], &[9]);
        let b = lines_for(&[1024, 262144, 197120], &[1, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 9);
        assert_eq!(a[0], "progress 14% (read 65536 bytes, duration 0 sec)");
        assert_eq!(a[8], "progress 128% (read 589824 bytes, duration 0 sec)");
        // No whole cluster: nothing (Proxmox's reader would divide by zero).
        assert!(lines_for(&[1024], &[1]).is_empty());
    }
}
