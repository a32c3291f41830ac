//! Opening an archive for streaming: a file or standard input, plain or compressed
//! (zstd, gzip, lzop), recognised by its first bytes rather than its name. The reader the
//! commands build on it (`cmd::open_stream`, private) reads and decompresses on a second
//! thread.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

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

/// Input buffer of the gzip and lzop decoders.
const CHUNK: usize = 1 << 20;

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

/// Wraps any byte source: detects compression and decompresses as needed.
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
    Ok((decoded, compression))
}
