//! Opening an archive for streaming: a file or standard input, plain or compressed
//! (zstd, gzip, lzop), recognised by its first bytes rather than its name. The reader the
//! commands build on it (`cmd::open_stream`, private) reads and decompresses on a second
//! thread.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use vma_reader::lzop::{LzopReader, LZOP_MAGIC};
use vma_reader::{ParallelZstdReader, ReadAt};

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

    /// Whether the seekable reader can open such a file in place (zstd only when it has a
    /// seek table, which the reader finds out).
    pub fn is_random_access(self) -> bool {
        matches!(
            self,
            Compression::None | Compression::Zstd | Compression::Lzop
        )
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

/// Input buffer of the gzip and lzop decoders.
const CHUNK: usize = 1 << 20;

/// The packing of a file, from its first bytes (a short or empty file is `None`).
pub fn detect_file(path: &Path) -> io::Result<Compression> {
    let head = read_head(&mut File::open(path)?)?;
    Ok(Compression::detect(&head))
}

/// The packing of a positional source (an object in a bucket), from its first bytes.
pub fn detect_positional(source: &dyn ReadAt) -> io::Result<Compression> {
    let mut head = [0u8; 9];
    let n = source.size()?.min(head.len() as u64) as usize;
    source.read_exact_at(&mut head[..n], 0)?;
    Ok(Compression::detect(&head[..n]))
}

/// The first bytes of a stream, as many as arrive of the 9 that tell a compression
/// apart.
fn read_head(source: &mut dyn Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(9);
    source.take(9).read_to_end(&mut head)?;
    Ok(head)
}

/// Opens `path` (`-` is standard input) for one-pass reading, decompressing as needed. A
/// seekable zstd file (one with a seek table, as `vma create X.vma.zst` writes it) is
/// decompressed a frame per core at once ([`ParallelZstdReader`]); any other zstd file
/// through zstd's one-thread stream decoder.
pub fn open(path: &Path) -> io::Result<(Box<dyn Read + Send>, Compression)> {
    if path.as_os_str() == "-" {
        return open_reader(Box::new(io::stdin()));
    }
    let file = File::open(path)?;
    if file.metadata()?.is_file() && detect_file(path)? == Compression::Zstd {
        // Without a (valid) seek table the stream decoder reads it, as any zstd file.
        if let Ok(frames) = ParallelZstdReader::open(file.try_clone()?, threads()) {
            return Ok((Box::new(frames), Compression::Zstd));
        }
    }
    open_reader(Box::new(file))
}

/// [`open`] of a positional source (an object in a bucket): read once from its start, a
/// seekable zstd one a frame per core at once.
pub fn open_positional(source: Arc<dyn ReadAt>) -> io::Result<(Box<dyn Read + Send>, Compression)> {
    if detect_positional(&*source)? == Compression::Zstd {
        if let Ok(frames) = ParallelZstdReader::from_source(Arc::clone(&source), threads()) {
            return Ok((Box::new(frames), Compression::Zstd));
        }
    }
    open_reader(Box::new(Sequential::new(source)?))
}

/// Decompressing workers: one per core.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Wraps any byte source: detects compression and decompresses as needed.
pub fn open_reader(
    mut source: Box<dyn Read + Send>,
) -> io::Result<(Box<dyn Read + Send>, Compression)> {
    let head = read_head(&mut source)?;
    let compression = Compression::detect(&head);
    let rejoined = io::Cursor::new(head).chain(source);
    if compression == Compression::None {
        return Ok((Box::new(rejoined), compression));
    }
    let rejoined: Box<dyn Read + Send> = Box::new(Source(rejoined));
    let decoder: Box<dyn Read + Send> = match compression {
        Compression::None => rejoined,
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(rejoined)?),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(CHUNK, rejoined),
        )),
        Compression::Lzop => Box::new(
            LzopReader::new(io::BufReader::with_capacity(CHUNK, rejoined))
                .map_err(|e| Decoded::damage(compression, io::Error::from(e)))?,
        ),
    };
    Ok((Box::new(Decoded(decoder, compression)), compression))
}

impl Compression {
    /// The compressor's name, for messages.
    fn name(self) -> &'static str {
        match self {
            Compression::None => "plain",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::Lzop => "lzop",
        }
    }
}

/// An error of the bytes under a decompressor (the file or pipe), kept apart from the
/// decompressor's own so that a failing disk stays an I/O error.
#[derive(Debug)]
struct SourceError(io::Error);

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceError {}

/// The compressed input, its errors marked as [`SourceError`]s.
struct Source<R>(R);

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .read(buf)
            .map_err(|e| io::Error::new(e.kind(), SourceError(e)))
    }
}

/// A decompressor whose own failures (a corrupt or cut-off stream) are archive damage:
/// `InvalidData` errors that name the compressed stream. Errors of the input under it
/// pass unchanged.
struct Decoded(Box<dyn Read + Send>, Compression);

impl Decoded {
    fn damage(compression: Compression, e: io::Error) -> io::Error {
        match e.get_ref().is_some_and(|inner| inner.is::<SourceError>()) {
            true => match e.into_inner().map(|inner| inner.downcast::<SourceError>()) {
                Some(Ok(source)) => source.0,
                _ => unreachable!("checked to be a SourceError"),
            },
            false => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the {} stream is damaged: {e}", compression.name()),
            ),
        }
    }
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| Decoded::damage(self.1, e))
    }
}

/// A positional source read once from its start, as a `Read`.
struct Sequential {
    source: Arc<dyn ReadAt>,
    at: u64,
    len: u64,
}

impl Sequential {
    /// Reads `source` from its start.
    fn new(source: Arc<dyn ReadAt>) -> io::Result<Sequential> {
        let len = source.size()?;
        Ok(Sequential { source, at: 0, len })
    }
}

impl Read for Sequential {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len - self.at) as usize;
        self.source.read_exact_at(&mut buf[..n], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}
