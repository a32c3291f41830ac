//! Opening an archive for streaming: a file or standard input, plain or compressed
//! (zstd, gzip, lzop), recognised by its first bytes rather than its name, and read ahead
//! on a second thread so that reading and decompressing overlap with parsing.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender};
use vma_format::aligned::AlignedBuf;

use crate::lzop::{LzopReader, LZOP_MAGIC};

/// How the archive bytes are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain VMA archive.
    None,
    /// zstd (`.vma.zst`, Proxmox VE's default).
    Zstd,
    /// gzip (`.vma.gz`).
    Gzip,
    /// lzop (`.vma.lzo`).
    Lzop,
}

impl Compression {
    /// Recognises the packing from the first bytes of a stream.
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&LZOP_MAGIC) {
            Compression::Lzop
        } else {
            Compression::None
        }
    }

    /// The command that turns such a file into a plain archive, for messages.
    pub fn decompress_hint(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Zstd => Some("zstd -d -o ARCHIVE.vma ARCHIVE.vma.zst"),
            Compression::Gzip => Some("gzip -dc ARCHIVE.vma.gz > ARCHIVE.vma"),
            Compression::Lzop => Some("lzop -d -o ARCHIVE.vma ARCHIVE.vma.lzo"),
        }
    }
}

/// Size of the chunks passed between the read-ahead thread and the parser.
const CHUNK: usize = 1 << 20;
/// Chunks in flight: bounds the read-ahead memory to a few MiB.
const DEPTH: usize = 4;

/// The packing of a file, from its first bytes (a short or empty file is `None`).
pub fn detect_file(path: &Path) -> io::Result<Compression> {
    let mut head = [0u8; 9];
    let mut file = File::open(path)?;
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Compression::detect(&head[..got]))
}

/// Opens `path` (`-` is standard input) for one-pass reading, decompressing as needed.
pub fn open(path: &Path) -> io::Result<(Box<dyn Read + Send>, Compression)> {
    let source: Box<dyn Read + Send> = if path.as_os_str() == "-" {
        Box::new(io::stdin())
    } else {
        Box::new(File::open(path)?)
    };
    open_reader(source)
}

/// Wraps any byte source: detects compression and starts the read-ahead thread.
pub fn open_reader(
    mut source: Box<dyn Read + Send>,
) -> io::Result<(Box<dyn Read + Send>, Compression)> {
    let mut head = [0u8; 9];
    let mut got = 0;
    while got < head.len() {
        match source.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let compression = Compression::detect(&head[..got]);
    let rejoined: Box<dyn Read + Send> =
        Box::new(io::Cursor::new(head[..got].to_vec()).chain(source));
    let decoded: Box<dyn Read + Send> = match compression {
        Compression::None => rejoined,
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(rejoined)?),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(CHUNK, rejoined),
        )),
        Compression::Lzop => Box::new(
            LzopReader::new(io::BufReader::with_capacity(CHUNK, rejoined))
                .map_err(io::Error::from)?,
        ),
    };
    Ok((Box::new(ReadAhead::spawn(decoded)?), compression))
}

/// A `Read` fed by a thread that reads (and decompresses) ahead into a few chunks.
pub struct ReadAhead {
    chunks: Receiver<io::Result<AlignedBuf>>,
    recycle: Sender<AlignedBuf>,
    current: AlignedBuf,
    pos: usize,
    finished: bool,
}

impl ReadAhead {
    /// Starts the thread. It stops at end of input, at the first error (passed on to the
    /// reader), or when the `ReadAhead` is dropped.
    pub fn spawn(mut inner: Box<dyn Read + Send>) -> io::Result<ReadAhead> {
        let (tx, chunks) = bounded::<io::Result<AlignedBuf>>(DEPTH);
        let (recycle, free) = bounded::<AlignedBuf>(DEPTH + 2);
        thread::Builder::new()
            .name("vma-read-ahead".into())
            .spawn(move || loop {
                // Page-aligned chunks: reading page-aligned file data into a buffer 16
                // bytes past a page boundary (where a 1 MiB Vec lands) is many times
                // slower on some CPUs (rep movsb aliasing).
                let mut buf = match free.try_recv() {
                    Ok(buf) if buf.max_len() >= CHUNK => buf,
                    _ => AlignedBuf::new(CHUNK),
                };
                buf.set_len(CHUNK);
                let mut filled = 0;
                let result = loop {
                    match inner.read(&mut buf[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.set_len(filled);
                let last = filled < CHUNK;
                if filled > 0 && tx.send(Ok(buf)).is_err() {
                    return;
                }
                if let Err(e) = result {
                    let _ = tx.send(Err(e));
                    return;
                }
                if last {
                    return;
                }
            })?;
        Ok(ReadAhead {
            chunks,
            recycle,
            current: AlignedBuf::default(),
            pos: 0,
            finished: false,
        })
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.finished || buf.is_empty() {
                return Ok(0);
            }
            match self.chunks.recv() {
                Ok(Ok(chunk)) => {
                    let old = std::mem::replace(&mut self.current, chunk);
                    let _ = self.recycle.try_send(old);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.finished = true;
                    return Err(e);
                }
                Err(_) => {
                    self.finished = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        vma_format::aligned::copy(&mut buf[..n], &self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
