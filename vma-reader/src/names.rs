//! The one place where names from an archive become file names; what a name may be is
//! vma-format's policy ([`vma_format::names`]).

use vma_format::names::check_file_name;
use vma_format::DeviceInfo;

use crate::error::{Error, Result};

/// File name the RAM state (device `vmstate`) is extracted to.
pub const VMSTATE_FILE_NAME: &str = "vmstate.bin";

pub use vma_format::names::MAX_FILE_NAME_LEN;

/// Returns `name` if it is a plain file name ([`vma_format::names::check_file_name`]):
/// not empty, not `.` or `..`, without `/`, NUL or control characters, and at most 255
/// bytes long. Anything else is [`Error::UnsafeName`].
///
/// Every path this crate builds from a name found in an archive goes through here, so an
/// archive can never make it write outside the target folder.
pub fn safe_file_name(name: &str) -> Result<&str> {
    check(name, "file name")
}

fn check<'a>(name: &'a str, what: &'static str) -> Result<&'a str> {
    let Err(reason) = check_file_name(name) else {
        return Ok(name);
    };
    let mut shown = name.to_owned();
    if shown.len() > 80 {
        let mut cut = 80;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push_str("...");
    }
    Err(Error::UnsafeName {
        what,
        name: shown,
        reason,
    })
}

/// The file name a device is extracted to, as Proxmox's `vma extract` names it:
/// `disk-<name>.raw`, or `vmstate.bin` for the RAM state. Fails with
/// [`Error::UnsafeName`] unless the device name itself is a safe file name, and so is
/// the temporary name it is written under ([`device_temp_file_name`]).
pub fn device_file_name(device: &DeviceInfo) -> Result<String> {
    if device.is_vmstate() {
        return Ok(VMSTATE_FILE_NAME.to_owned());
    }
    check(&device.name, "device name")?;
    let file = format!("disk-{}.raw", device.name);
    check(&file, "device file name")?;
    check(&device_temp_file_name(device), "device file name")?;
    Ok(file)
}

/// The temporary name a device is extracted under until the whole archive has
/// validated: `tmp-disk-<name>.raw`, as Proxmox's `vma extract` names it (and prints in
/// its `DEVINFO` line), or `tmp-vmstate.bin`. Only meaningful for a device whose
/// [`device_file_name`] is valid.
pub fn device_temp_file_name(device: &DeviceInfo) -> String {
    if device.is_vmstate() {
        format!("tmp-{VMSTATE_FILE_NAME}")
    } else {
        format!("tmp-disk-{}.raw", device.name)
    }
}

/// The file name a config entry is extracted to: its own name, if that is a safe file
/// name (see [`safe_file_name`]).
pub fn config_file_name(name: &str) -> Result<&str> {
    check(name, "config name")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn only_plain_names_pass() {
        for ok in ["qemu-server.conf", "a", ".hidden", "...", "x y", "ä"] {
            assert_eq!(safe_file_name(ok).unwrap(), ok);
        }
        let long = "x".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/etc",
            "../../x",
            "a\0b",
            "a\nb",
            "\x7f",
            long.as_str(),
        ] {
            let e = safe_file_name(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnsafeName, "{bad:?}");
        }
        assert!(safe_file_name(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn device_names_follow_proxmox() {
        let dev = |name: &str| DeviceInfo {
            id: vma_format::DeviceId::new(1).unwrap(),
            name: name.into(),
            size: 1,
        };
        assert_eq!(
            device_file_name(&dev("drive-scsi0")).unwrap(),
            "disk-drive-scsi0.raw"
        );
        assert_eq!(device_file_name(&dev("vmstate")).unwrap(), "vmstate.bin");
        assert!(device_file_name(&dev("..")).is_err());
        assert!(device_file_name(&dev("a/b")).is_err());
        // The name fits, "tmp-disk-" + name + ".raw" does not.
        assert!(device_file_name(&dev(&"x".repeat(243))).is_err());
        assert!(device_file_name(&dev(&"x".repeat(242))).is_ok());
        assert!(device_file_name(&dev("a\nb")).is_err());
        assert_eq!(
            device_temp_file_name(&dev("drive-scsi0")),
            "tmp-disk-drive-scsi0.raw"
        );
    }
}
