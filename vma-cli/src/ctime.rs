//! `ctime(3)` text of a timestamp in local time, as the reference `vma list` prints it in
//! its `CTIME:` line (which Proxmox VE's restore parses).

/// Formats `t` (seconds since the epoch) as `ctime(3)` does, without the trailing newline:
/// `Sat Nov 28 01:21:43 2026`, in the local time zone (the `TZ` variable, else
/// `/etc/localtime`), exactly as the C library the reference tool uses would.
pub fn ctime(t: i64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let Some(tm) = local_time(t) else {
        // ctime(3) returns NULL for times it cannot represent; say so plainly.
        return format!("(unrepresentable time {t})");
    };
    format!(
        "{} {}{:3} {:02}:{:02}:{:02} {}",
        DAYS[tm.tm_wday.rem_euclid(7) as usize],
        MONTHS[tm.tm_mon.rem_euclid(12) as usize],
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        tm.tm_year as i64 + 1900
    )
}

fn local_time(t: i64) -> Option<libc::tm> {
    // time_t is i64 on every target this builds for; the conversion guards the others.
    #[allow(clippy::useless_conversion)]
    let t: libc::time_t = t.try_into().ok()?;
    // SAFETY: `tm` is plain old data for which all-zero bytes are a valid value;
    // `localtime_r` only writes through the two pointers, which point at live locals, and
    // is the thread-safe variant.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return None;
        }
        Some(tm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_ctime_in_utc() {
        // ctime follows TZ; pin it (no other test in this binary reads the time zone).
        std::env::set_var("TZ", "UTC");
        assert_eq!(ctime(1795828903), "Sat Nov 28 01:21:43 2026");
        assert_eq!(ctime(0), "Thu Jan  1 00:00:00 1970");
        assert_eq!(ctime(1_000_000_000), "Sun Sep  9 01:46:40 2001");
    }
}
