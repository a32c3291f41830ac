//! The backup's CPU priority: a backup runs below the guest.
//!
//! During a live backup QEMU (the guest's vCPUs, the copy-before-write pushes, the
//! backup job feeding us) and this process share the host's cores. Measured in
//! benches/RESULTS.md ("The backup's CPU priority", and the 2 GiB runs after it), on 2
//! cores with a TCG guest, the backup process at nice 10 lowered the guest's write p99
//! during the backup (by 11–23% in five runs on an idle host, more on a busy one): when
//! the cores are contended the scheduler runs QEMU first, and the archive work takes what
//! is left; when they are not, nice changes nothing. What it costs in throughput is not
//! settled: 6–35% less than nice 0 where nice 0 ran just before it, but nothing beyond
//! the run-to-run spread (about ±15%) when the two alternated.

use std::io;

use rustix::process::{getpriority_process, setpriority_process};

/// The nice value `vma-live-backup` runs its backup at unless told otherwise.
pub const DEFAULT_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to nice value `nice` (0 to 19), unless it
/// runs at that or lower already; the threads it starts from then on inherit it (on
/// Linux the nice value is per thread). So call it before starting the backup. Never
/// raises the priority. Returns the nice value the thread then has.
pub fn lower_priority(nice: i32) -> io::Result<i32> {
    let nice = nice.clamp(0, 19);
    let current = getpriority_process(None)?;
    if current >= nice {
        return Ok(current);
    }
    setpriority_process(None, nice)?;
    Ok(nice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_goes_down_and_is_inherited_never_up() {
        // On a thread of its own: the test harness's threads keep theirs.
        std::thread::spawn(|| {
            let before = getpriority_process(None).unwrap();
            let target = (before + 3).min(19);
            assert_eq!(lower_priority(target).unwrap(), target);
            let child = std::thread::spawn(|| getpriority_process(None).unwrap());
            assert_eq!(child.join().unwrap(), target, "inherited");
            // Asking for a higher priority (a lower nice value) changes nothing.
            assert_eq!(lower_priority(before).unwrap(), target);
            assert_eq!(getpriority_process(None).unwrap(), target);
        })
        .join()
        .unwrap();
    }
}
