//! Copies an image in any format QEMU knows to a sparse raw file, or a raw
//! file into an existing image, through `qemu-storage-daemon` and the
//! pipelined NBD client: the streaming pattern `vma create` and restore
//! use, with the file I/O on a second thread.
//!
//! ```text
//! cargo run --release -p vma-nbd --example qemu_copy -- read  FORMAT IMAGE OUT.raw
//! cargo run --release -p vma-nbd --example qemu_copy -- write IN.raw FORMAT IMAGE
//! ```
//!
//! `read` asks block status and reads only what is allocated and not known
//! to be zero; `write` sends all-zero chunks as WRITE_ZEROES (the clusters
//! stay unallocated) and flushes at the end. `QEMU_COPY_CHUNK` (bytes per
//! request, default 1 MiB) and `QEMU_COPY_WINDOW` (requests in flight,
//! default 16) tune it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use vma_nbd::{Client, Error, StorageDaemon, ZeroMode};

/// Bytes per request (`QEMU_COPY_CHUNK` overrides).
static CHUNK: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| env("QEMU_COPY_CHUNK", 1 << 20));
/// Requests in flight (`QEMU_COPY_WINDOW` overrides).
static WINDOW: std::sync::LazyLock<usize> =
    std::sync::LazyLock::new(|| env("QEMU_COPY_WINDOW", 16));

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let started = Instant::now();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["read", format, image, out] => read(format, image, out),
        ["write", input, format, image] => write(input, format, image),
        _ => {
            eprintln!("usage: qemu_copy read FORMAT IMAGE OUT.raw | write IN.raw FORMAT IMAGE");
            std::process::exit(2);
        }
    };
    match result {
        Ok(bytes) => {
            let secs = started.elapsed().as_secs_f64();
            let mib = bytes as f64 / (1 << 20) as f64;
            println!(
                "{mib:.0} MiB of guest data in {secs:.3} s: {:.0} MiB/s",
                mib / secs
            );
        }
        Err(e) => {
            eprintln!("qemu_copy: {e}");
            std::process::exit(1);
        }
    }
}

/// Image to sparse raw file; returns the guest size.
fn read(format: &str, image: &str, out: &str) -> Result<u64, Error> {
    let daemon = StorageDaemon::builder(image, format).start()?;
    let client = daemon.connect_with(Client::builder().max_in_flight(*WINDOW))?;
    let size = client.size();
    let file = File::create(out)?;
    file.set_len(size)?;
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(*WINDOW);
    // Written buffers come back for the next reads.
    let (spare_tx, spare) = mpsc::channel::<Vec<u8>>();
    let writer = thread::spawn(move || -> std::io::Result<()> {
        for (offset, data) in rx {
            file.write_all_at(&data, offset)?;
            let _ = spare_tx.send(data);
        }
        Ok(())
    });
    let mut window = VecDeque::new();
    let mut pos = 0;
    while pos < size {
        for extent in client.block_status(pos, size - pos)? {
            if !extent.zero {
                let mut at = pos;
                while at < pos + extent.len {
                    let n = (pos + extent.len - at).min(*CHUNK as u64);
                    let mut buf = spare.try_recv().unwrap_or_default();
                    buf.resize(n as usize, 0);
                    window.push_back((at, client.submit_read_into(buf, at)?));
                    if window.len() >= *WINDOW {
                        send_oldest(&mut window, &tx)?;
                    }
                    at += n;
                }
            }
            pos += extent.len;
        }
    }
    while !window.is_empty() {
        send_oldest(&mut window, &tx)?;
    }
    drop(tx);
    writer.join().expect("writer thread")?;
    client.disconnect()?;
    daemon.shutdown()?;
    Ok(size)
}

/// Whether `data` is all zeroes (compared 4 KiB at a time, which the
/// compiler turns into fast compares, unlike a byte loop).
fn is_zero(data: &[u8]) -> bool {
    const ZERO: [u8; 4096] = [0; 4096];
    data.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

fn send_oldest(
    window: &mut VecDeque<(u64, vma_nbd::PendingRead)>,
    tx: &mpsc::SyncSender<(u64, Vec<u8>)>,
) -> Result<(), Error> {
    if let Some((at, p)) = window.pop_front() {
        let data = p.wait()?;
        tx.send((at, data))
            .map_err(|_| std::io::Error::other("writer thread ended"))?;
    }
    Ok(())
}

/// Raw file into an existing image; returns the bytes copied.
fn write(input: &str, format: &str, image: &str) -> Result<u64, Error> {
    let mut file = File::open(input)?;
    let size = file.metadata()?.len();
    let daemon = StorageDaemon::builder(image, format)
        .writable(true)
        .start()?;
    let client = daemon.connect_with(Client::builder().max_in_flight(*WINDOW))?;
    let (tx, rx) = mpsc::sync_channel::<std::io::Result<Vec<u8>>>(*WINDOW);
    // Sent buffers come back to be filled again.
    let (spare_tx, spare) = mpsc::channel::<Vec<u8>>();
    let reader = thread::spawn(move || {
        let mut left = size;
        while left > 0 {
            let mut buf = spare.try_recv().unwrap_or_default();
            buf.resize((left.min(*CHUNK as u64)) as usize, 0);
            let r = file.read_exact(&mut buf).map(|()| buf);
            let failed = r.is_err();
            left -= (*CHUNK as u64).min(left);
            if tx.send(r).is_err() || failed {
                break;
            }
        }
    });
    let mut window = VecDeque::new();
    let mut pos = 0u64;
    for chunk in rx {
        let chunk = chunk?;
        let pending = if is_zero(&chunk) {
            client.submit_write_zeroes(pos, chunk.len() as u64, ZeroMode::MayUnmap)?
        } else {
            client.submit_write(&chunk, pos)?
        };
        window.push_back(pending);
        if window.len() >= *WINDOW {
            window.pop_front().map_or(Ok(()), |p| p.wait())?;
        }
        pos += chunk.len() as u64;
        let _ = spare_tx.send(chunk);
    }
    reader.join().expect("reader thread");
    window.into_iter().try_for_each(|p| p.wait())?;
    client.flush()?;
    client.disconnect()?;
    daemon.shutdown()?;
    Ok(pos)
}
