//! The one name policy: what a config or device name may be.
//!
//! Every name is printed by `vma list` and parsed back by Proxmox VE's restore code, one
//! line per name, so a name must be printable ([`check_printable`]: no control
//! characters). Extraction turns names into file names, so a name an archive is written
//! with must also be a plain file name ([`check_file_name`]). The writer applies both;
//! the decoder refuses names that are not printable; the extractor refuses names that
//! are not plain file names.

use crate::error::NameProblem;

/// Longest file name accepted, in bytes (Linux's `NAME_MAX`).
pub const MAX_FILE_NAME_LEN: usize = 255;

/// Checks that `name` can be stored and shown safely: not empty, no NUL and no control
/// character (a byte below 0x20, or 0x7f), which would inject lines into a listing.
///
/// On failure, returns the problem and the byte position in `name` it was found at.
pub fn check_printable(name: &str) -> Result<(), (NameProblem, usize)> {
    if name.is_empty() {
        return Err((NameProblem::Empty, 0));
    }
    match name.bytes().position(|b| b < 0x20 || b == 0x7f) {
        None => Ok(()),
        Some(at) if name.as_bytes()[at] == 0 => Err((NameProblem::InteriorNul, at)),
        Some(at) => Err((NameProblem::ControlCharacter(name.as_bytes()[at]), at)),
    }
}

/// Checks that `name` is printable (see [`check_printable`]) and a plain file name: not
/// `.` or `..`, no `/`, at most [`MAX_FILE_NAME_LEN`] bytes.
pub fn check_file_name(name: &str) -> Result<(), NameProblem> {
    check_printable(name).map_err(|(problem, _)| problem)?;
    if name == "." || name == ".." {
        Err(NameProblem::NotPlain)
    } else if name.contains('/') {
        Err(NameProblem::Slash)
    } else if name.len() > MAX_FILE_NAME_LEN {
        Err(NameProblem::TooLong(name.len()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_names() {
        for ok in ["qemu-server.conf", "a b", "ä", "../x", "~"] {
            assert_eq!(check_printable(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(check_printable(""), Err((NameProblem::Empty, 0)));
        assert_eq!(check_printable("a\0b"), Err((NameProblem::InteriorNul, 1)));
        for (bad, at, byte) in [("a\nb", 1, b'\n'), ("\t", 0, b'\t'), ("xy\x7f", 2, 0x7f)] {
            assert_eq!(
                check_printable(bad),
                Err((NameProblem::ControlCharacter(byte), at))
            );
        }
        for b in (0x01u8..0x20).chain([0x7f]) {
            let name = format!("x{}", b as char);
            assert!(check_printable(&name).is_err(), "{b:#x}");
        }
    }

    #[test]
    fn file_names() {
        for ok in ["qemu-server.conf", "a", ".hidden", "...", "x y", "ä"] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(check_file_name("."), Err(NameProblem::NotPlain));
        assert_eq!(check_file_name(".."), Err(NameProblem::NotPlain));
        assert_eq!(check_file_name("a/b"), Err(NameProblem::Slash));
        assert_eq!(
            check_file_name("a\nb"),
            Err(NameProblem::ControlCharacter(b'\n'))
        );
        assert_eq!(
            check_file_name(&"x".repeat(256)),
            Err(NameProblem::TooLong(256))
        );
        assert_eq!(check_file_name(&"x".repeat(255)), Ok(()));
    }
}
