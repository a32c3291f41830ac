//! What readers, verification and extraction are told to do.

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

impl OnDamage {
    /// The policy a `stop_on_damage` flag asks for.
    pub(crate) fn stop_if(stop: bool) -> OnDamage {
        if stop {
            OnDamage::Fail
        } else {
            OnDamage::Report
        }
    }
}
