//! What users write: the VM configuration, from flags or a config file.

use std::path::{Path, PathBuf};

use memory::ByteSize;
use serde::{Deserialize, Serialize};

/// The marker line the default guest's `/init` prints once user space runs.
pub const GUEST_READY_MARKER: &str = "MEMVISOR-GUEST-READY";

/// Default kernel command line. `reboot=k` reboots through the i8042, which memvisor turns into
/// a clean exit; `panic=1` turns a guest panic into a prompt exit rather than a hang.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 8250.nr_uarts=1";

/// Default number of vCPUs.
pub const DEFAULT_CPUS: u8 = 1;
/// Default guest RAM.
pub const DEFAULT_MEMORY: ByteSize = ByteSize(128 << 20);
/// Smallest guest RAM memvisor accepts.
pub const MIN_MEMORY: ByteSize = ByteSize(16 << 20);

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Zero vCPUs, or more than the platform describes.
    #[error("cpus must be between 1 and {max}, got {got}")]
    Cpus {
        /// The requested count.
        got: u8,
        /// The largest allowed.
        max: u8,
    },
    /// Guest RAM below the minimum.
    #[error("memory must be at least {min}, got {got}")]
    MemoryTooSmall {
        /// The requested size.
        got: ByteSize,
        /// The minimum.
        min: ByteSize,
    },
    /// Guest RAM not a whole number of pages.
    #[error("memory must be a multiple of 4K, got {0} bytes")]
    MemoryUnaligned(u64),
    /// Guest RAM larger than the host.
    #[error("memory {got} is larger than the host's {host_mib} MiB")]
    MemoryTooLarge {
        /// The requested size.
        got: ByteSize,
        /// The host's total memory.
        host_mib: u64,
    },
}

/// Configuration of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: an ELF `vmlinux` or a `bzImage`.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` means [`DEFAULT_CMDLINE`].
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Guest RAM size.
    #[serde(default = "default_memory", with = "size_serde")]
    pub memory: ByteSize,
    /// Back guest RAM with transparent huge pages (`MADV_HUGEPAGE`), as Cloud Hypervisor and
    /// QEMU do by default.
    #[serde(default = "default_thp")]
    pub thp: bool,
}

fn default_thp() -> bool {
    true
}

fn default_cpus() -> u8 {
    DEFAULT_CPUS
}
fn default_memory() -> ByteSize {
    DEFAULT_MEMORY
}

impl VmConfig {
    /// A configuration for `kernel` with every other field at its default.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            cpus: DEFAULT_CPUS,
            memory: DEFAULT_MEMORY,
            thp: true,
        }
    }

    /// The default guest built by `guest-images/build` under `guest_dir`.
    pub fn default_guest(guest_dir: &Path) -> Self {
        VmConfig {
            initrd: Some(guest_dir.join("initramfs.cpio.gz")),
            ..VmConfig::new(guest_dir.join("vmlinux"))
        }
    }

    /// The command line the guest gets before memvisor's own additions.
    pub fn base_cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }

    /// Checks the values that need no host resources. `host_mem_bytes` is the host's total RAM.
    pub fn validate(&self, host_mem_bytes: Option<u64>) -> Result<(), ConfigError> {
        let max = crate::arch::mptable::MAX_CPUS;
        if self.cpus == 0 || self.cpus > max {
            return Err(ConfigError::Cpus {
                got: self.cpus,
                max,
            });
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall {
                got: self.memory,
                min: MIN_MEMORY,
            });
        }
        if !self.memory.bytes().is_multiple_of(4096) {
            return Err(ConfigError::MemoryUnaligned(self.memory.bytes()));
        }
        if let Some(host) = host_mem_bytes {
            if self.memory.bytes() > host {
                return Err(ConfigError::MemoryTooLarge {
                    got: self.memory,
                    host_mib: host >> 20,
                });
            }
        }
        Ok(())
    }
}

/// The host's total RAM, from `/proc/meminfo`.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sizes in config files: a string with a K/M/G suffix (`"512M"`) or a number of bytes.
pub mod size_serde {
    use memory::ByteSize;
    use serde::{de, Deserialize, Deserializer, Serializer};

    /// Writes the size as a suffixed string.
    pub fn serialize<S: Serializer>(v: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    /// Reads a suffixed string or a number of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom("expected a size such as \"512M\" or a number of bytes")
        })? {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).expect("parse");
        assert_eq!(c, VmConfig::new("/k"));
        assert_eq!(c.base_cmdline(), DEFAULT_CMDLINE);
    }

    #[test]
    fn sizes_parse_from_strings_and_numbers() {
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "memory": "256M"}"#).expect("parse");
        assert_eq!(c.memory, ByteSize(256 << 20));
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "memory": 33554432}"#).expect("parse");
        assert_eq!(c.memory, ByteSize(32 << 20));
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "memory": "lots"}"#)
            .expect_err("bad size");
        assert!(e.to_string().contains("invalid size"), "{e}");
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "memroy": "1G"}"#)
            .expect_err("unknown field");
        assert!(e.to_string().contains("memroy"), "{e}");
    }

    #[test]
    fn validation_bounds() {
        let ok = VmConfig::new("/k");
        assert_eq!(ok.validate(Some(1 << 30)), Ok(()));
        let c = VmConfig {
            cpus: 0,
            ..ok.clone()
        };
        assert!(matches!(c.validate(None), Err(ConfigError::Cpus { .. })));
        let c = VmConfig {
            memory: ByteSize(1 << 20),
            ..ok.clone()
        };
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        let c = VmConfig {
            memory: ByteSize((64 << 20) + 1),
            ..ok.clone()
        };
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        let c = VmConfig {
            memory: ByteSize(2 << 30),
            ..ok
        };
        assert!(matches!(
            c.validate(Some(1 << 30)),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }
}
