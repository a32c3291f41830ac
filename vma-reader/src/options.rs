//! What readers, verification and extraction are told to do: [`OnDamage`],
//! [`ReadOptions`], [`VerifyOptions`]. Fields are private and set by builder methods, so
//! that options can be added without breaking callers.

use crate::stream::ReadProgress;

/// What a reader does with damaged data: an extent whose CRC32C does not match, or a seal
/// that does not hold. (Structural damage, such as a bad header MD5 or a missing cluster,
/// is always an error.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnDamage {
    /// Fail at the first mismatch ([`Error::DataChecksum`](crate::Error::DataChecksum),
    /// [`Error::SealMismatch`](crate::Error::SealMismatch)).
    Fail,
    /// Read on, recording each mismatch in the
    /// [`IntegrityReport`](crate::IntegrityReport) (and, for extraction, the damaged
    /// ranges in the [`ExtractReport`](crate::ExtractReport)).
    Report,
}

/// What a reader checks beyond the format itself.
///
/// ```
/// use vma_reader::{OnDamage, ReadOptions};
/// let options = ReadOptions::new().verify_seal(false).on_damage(OnDamage::Fail);
/// assert!(options.verifies_checksums() && !options.verifies_seal());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    verify_checksums: bool,
    verify_seal: bool,
    on_damage: OnDamage,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            verify_checksums: true,
            verify_seal: true,
            on_damage: OnDamage::Report,
        }
    }
}

impl ReadOptions {
    /// The defaults: CRC32Cs and seal checked, damage reported.
    pub fn new() -> ReadOptions {
        ReadOptions::default()
    }

    /// Whether to check each extent's CRC32C where it carries one (cheap; default true).
    pub fn verify_checksums(mut self, yes: bool) -> Self {
        self.verify_checksums = yes;
        self
    }

    /// Whether to hash the headers to check a seal against (cheap: 512 bytes an extent;
    /// default true). Without it a seal is reported as
    /// [`SealStatus::NotVerified`](crate::SealStatus::NotVerified).
    pub fn verify_seal(mut self, yes: bool) -> Self {
        self.verify_seal = yes;
        self
    }

    /// What to do with a CRC32C or seal mismatch (default [`OnDamage::Report`]: record
    /// it in the [`IntegrityReport`](crate::IntegrityReport)).
    pub fn on_damage(mut self, on_damage: OnDamage) -> Self {
        self.on_damage = on_damage;
        self
    }

    /// Whether CRC32Cs are checked.
    pub fn verifies_checksums(&self) -> bool {
        self.verify_checksums
    }

    /// Whether the seal is checked against the headers.
    pub fn verifies_seal(&self) -> bool {
        self.verify_seal
    }

    /// What is done with damage.
    pub fn damage_policy(&self) -> OnDamage {
        self.on_damage
    }
}

/// The progress callback of [`verify`](crate::verify) and of an
/// [`Extractor`](crate::Extractor).
pub(crate) type ProgressFn<'a> = Box<dyn FnMut(&ReadProgress) + 'a>;

/// Options of [`verify`](crate::verify).
///
/// ```
/// use vma_reader::{OnDamage, VerifyOptions};
/// let mut extents = 0;
/// let options = VerifyOptions::new()
///     .on_damage(OnDamage::Fail)
///     .progress(|_| extents += 1);
/// # drop(options);
/// ```
pub struct VerifyOptions<'a> {
    on_damage: OnDamage,
    progress: Option<ProgressFn<'a>>,
}

impl Default for VerifyOptions<'_> {
    fn default() -> Self {
        VerifyOptions {
            on_damage: OnDamage::Report,
            progress: None,
        }
    }
}

impl<'a> VerifyOptions<'a> {
    /// The defaults: every check, damage reported, no progress callback.
    pub fn new() -> VerifyOptions<'a> {
        VerifyOptions::default()
    }

    /// What to do with a CRC32C or seal mismatch (default [`OnDamage::Report`]: list it
    /// in the report, whose [`is_ok`](crate::VerifyReport::is_ok) is then false).
    pub fn on_damage(mut self, on_damage: OnDamage) -> Self {
        self.on_damage = on_damage;
        self
    }

    /// Called after each extent with how far reading has come.
    pub fn progress(mut self, progress: impl FnMut(&ReadProgress) + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// What is done with damage.
    pub fn damage_policy(&self) -> OnDamage {
        self.on_damage
    }

    pub(crate) fn take_progress(&mut self) -> Option<ProgressFn<'a>> {
        self.progress.take()
    }
}

impl std::fmt::Debug for VerifyOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyOptions")
            .field("on_damage", &self.on_damage)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}
