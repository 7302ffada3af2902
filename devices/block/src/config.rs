//! The `[[drive]]` tables of the controller plugin's TOML.

use std::path::PathBuf;

use serde::Deserialize;

/// One drive from the plugin's TOML (`[[drive]]` tables of the LSI device).
///
/// ```toml
/// [[drive]]
/// id = "system"
/// file = "disk.img"      # relative paths are resolved against the config's directory
/// scsi-id = 0
/// read-only = false
/// direct = true          # O_DIRECT
/// serial = "SYS0001"
/// block-size = 512
/// delay-us = 0           # testing: each read/write/flush waits this long
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DriveConfig {
    /// Name for logs; also the default serial number.
    pub id: Option<String>,
    /// Raw image file (or block device).
    pub file: PathBuf,
    /// SCSI target ID on the controller's bus.
    pub scsi_id: u8,
    /// Logical unit number; only 0 is supported for now.
    #[serde(default)]
    pub lun: u8,
    #[serde(default)]
    pub read_only: bool,
    /// Open the image with `O_DIRECT` (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    /// Unit serial number (VPD page 80h); derived from `id` or the file path
    /// when absent.
    pub serial: Option<String>,
    /// Logical block size in bytes: 512 (default), 1024, 2048 or 4096.
    #[serde(default)]
    pub block_size: Option<u32>,
    /// Testing: every read, write and flush waits this many microseconds
    /// first (a slow disk; at most 10 s). 0 or absent: no delay.
    #[serde(default)]
    pub delay_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Plugin {
        drive: Vec<DriveConfig>,
    }

    #[test]
    fn parses_drive_tables() {
        let p: Plugin = toml::from_str(
            r#"
            [[drive]]
            file = "a.img"
            scsi-id = 0

            [[drive]]
            id = "data"
            file = "/images/b.img"
            scsi-id = 3
            read-only = true
            direct = true
            serial = "B0003"
            block-size = 4096
            "#,
        )
        .unwrap();
        assert_eq!(p.drive.len(), 2);
        let a = &p.drive[0];
        assert_eq!(a.file, PathBuf::from("a.img"));
        assert_eq!(
            (a.scsi_id, a.lun, a.read_only, a.direct),
            (0, 0, false, false)
        );
        assert_eq!(a.block_size, None);
        let b = &p.drive[1];
        assert_eq!(b.id.as_deref(), Some("data"));
        assert!(b.read_only && b.direct);
        assert_eq!(b.serial.as_deref(), Some("B0003"));
        assert_eq!(b.block_size, Some(4096));
    }

    #[test]
    fn rejects_unknown_fields() {
        let r: Result<Plugin, _> = toml::from_str(
            r#"
            [[drive]]
            file = "a.img"
            scsi-id = 0
            cache = "none"
            "#,
        );
        assert!(r.is_err());
        let r: Result<Plugin, _> = toml::from_str("[[drive]]\nscsi-id = 0\n");
        assert!(r.is_err(), "file is required");
    }
}
