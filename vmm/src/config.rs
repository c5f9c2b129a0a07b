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
    /// The swap directory does not exist or is not a directory.
    #[error("swap directory {0} is not a directory")]
    SwapDir(PathBuf),
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
    /// A virtio-balloon device, if any.
    #[serde(default)]
    pub balloon: Option<balloon::BalloonConfig>,
    /// Mark guest RAM `MADV_MERGEABLE` so host KSM may merge identical pages (off by default:
    /// merging opens timing side channels between VMs). Implies 4K pages (no THP).
    #[serde(default)]
    pub mergeable: bool,
    /// A virtio-mem device and its hotplug region, if any. `region_addr` is normally left out:
    /// memvisor places the region above RAM.
    #[serde(default)]
    pub hotplug: Option<hotplug::VirtioMemConfig>,
    /// Where the VM's swap file goes (created at the first swap request, removed at exit);
    /// `None` is the current directory. `memvisor run` defaults it to the API socket's
    /// directory.
    #[serde(default)]
    pub swap_dir: Option<PathBuf>,
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
            balloon: None,
            mergeable: false,
            hotplug: None,
            swap_dir: None,
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
        if let Some(dir) = &self.swap_dir {
            if !dir.is_dir() {
                return Err(ConfigError::SwapDir(dir.clone()));
            }
        }
        Ok(())
    }
}

/// Parses `--balloon` options: empty (all defaults) or `key=value` pairs separated by commas,
/// keys `deflate_on_oom`, `free_page_reporting` (`on`/`off`) and `stats_interval_s` (seconds).
pub fn parse_balloon_options(s: &str) -> Result<balloon::BalloonConfig, String> {
    let mut config = balloon::BalloonConfig::default();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("balloon option '{item}' is not key=value"))?;
        let on_off = |v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(format!("balloon option {key} takes on or off, got '{v}'")),
        };
        match key {
            "deflate_on_oom" => config.deflate_on_oom = on_off(value)?,
            "free_page_reporting" => config.free_page_reporting = on_off(value)?,
            "stats_interval_s" => {
                config.stats_interval_s = value
                    .parse()
                    .map_err(|_| format!("balloon option stats_interval_s takes seconds, got '{value}'"))?
            }
            _ => {
                return Err(format!(
                    "unknown balloon option '{key}' (expected deflate_on_oom, free_page_reporting, stats_interval_s)"
                ))
            }
        }
    }
    Ok(config)
}

/// Parses `--hotplug`: the region size, then optional `key=value` pairs separated by commas,
/// keys `block_size` and `slot_size` (sizes with a K/M/G suffix).
pub fn parse_hotplug_options(s: &str) -> Result<hotplug::VirtioMemConfig, String> {
    let mut items = s.split(',').map(str::trim);
    let size = items.next().unwrap_or_default();
    if size.is_empty() || size.contains('=') {
        return Err("hotplug takes the region size first, e.g. 1G or 1G,block_size=2M".into());
    }
    let size: ByteSize = size.parse().map_err(|e| format!("hotplug size: {e}"))?;
    let mut config = hotplug::VirtioMemConfig::new(size.bytes());
    for item in items.filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("hotplug option '{item}' is not key=value"))?;
        let field = match key {
            "block_size" => &mut config.block_size,
            "slot_size" => &mut config.slot_size,
            _ => {
                return Err(format!(
                    "unknown hotplug option '{key}' (expected block_size, slot_size)"
                ))
            }
        };
        *field = value
            .parse()
            .map_err(|e| format!("hotplug option {key}: {e}"))?;
    }
    // Everything but the address can be checked now; the VMM places the region.
    hotplug::VirtioMemConfig {
        region_addr: Some(0),
        ..config
    }
    .validate()
    .map_err(|e| format!("hotplug: {e}"))?;
    Ok(config)
}

/// A `--config` file: every `memvisor run` flag, all optional; flags given on the command line
/// override it. JSON or TOML (by extension: `.toml` is TOML, anything else JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--cpus`.
    pub cpus: Option<u8>,
    /// `--memory`, a size string or a number of bytes.
    #[serde(default, deserialize_with = "opt_size")]
    pub memory: Option<ByteSize>,
    /// `--thp`.
    pub thp: Option<bool>,
    /// `--balloon`, as a table/object of its options.
    pub balloon: Option<balloon::BalloonConfig>,
    /// `--api-socket`.
    pub api_socket: Option<PathBuf>,
    /// `--mergeable`.
    pub mergeable: Option<bool>,
    /// `--hotplug`, as a table/object (`region_size`, `block_size`, `slot_size`).
    pub hotplug: Option<hotplug::VirtioMemConfig>,
    /// `--swap-dir`.
    pub swap_dir: Option<PathBuf>,
}

fn opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    size_serde::deserialize(d).map(Some)
}

impl RunFile {
    /// Reads and parses `path`. The error is one line naming the file and the problem.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text, path.extension().is_some_and(|e| e == "toml"))
            .map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Parses TOML or JSON text.
    pub fn parse(text: &str, toml: bool) -> Result<Self, String> {
        if toml {
            ::toml::from_str(text).map_err(|e| e.message().to_string())
        } else {
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
    }
}

/// The host's total RAM, from `/proc/meminfo`.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub use memory::size::size_serde;

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
    fn balloon_options_parse_and_reject_unknown_keys() {
        assert_eq!(
            parse_balloon_options(""),
            Ok(balloon::BalloonConfig::default())
        );
        let c =
            parse_balloon_options("deflate_on_oom=on,free_page_reporting=on,stats_interval_s=5")
                .expect("parse");
        assert!(c.deflate_on_oom && c.free_page_reporting);
        assert_eq!(c.stats_interval_s, 5);
        assert!(parse_balloon_options("deflate_on_oom=maybe").is_err());
        assert!(parse_balloon_options("stats_interval_s=-1").is_err());
        let e = parse_balloon_options("inflate=on").expect_err("unknown key");
        assert!(e.contains("unknown balloon option 'inflate'"), "{e}");
        assert!(parse_balloon_options("deflate_on_oom").is_err());
    }

    #[test]
    fn hotplug_options_parse_and_reject_bad_sizes() {
        let c = parse_hotplug_options("1G").expect("size only");
        assert_eq!(c.region_size, ByteSize(1 << 30));
        assert_eq!(c.block_size, ByteSize(hotplug::DEFAULT_BLOCK_SIZE));
        assert_eq!(c.region_addr, None);
        let c = parse_hotplug_options("512M,block_size=4M").expect("with block size");
        assert_eq!(c.block_size, ByteSize(4 << 20));
        for bad in [
            "",
            "block_size=2M",
            "lots",
            "1G,block_size=3M",
            "1G,block_size",
            "1G,colour=red",
            "1G+1",
            "0",
        ] {
            let e = parse_hotplug_options(bad).expect_err(bad);
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
        let e = parse_hotplug_options("1G,colour=red").expect_err("unknown");
        assert!(e.contains("unknown hotplug option 'colour'"), "{e}");
    }

    #[test]
    fn run_files_parse_as_json_and_toml_and_name_unknown_fields() {
        let j = RunFile::parse(
            r#"{"kernel": "/k", "memory": "256M", "balloon": {"deflate_on_oom": true}}"#,
            false,
        )
        .expect("json");
        assert_eq!(j.memory, Some(ByteSize(256 << 20)));
        assert!(j.balloon.expect("balloon").deflate_on_oom);
        let t = RunFile::parse("kernel = \"/k\"\ncpus = 2\napi_socket = \"/tmp/s\"\n", true)
            .expect("toml");
        assert_eq!(t.cpus, Some(2));
        assert_eq!(t.api_socket, Some(PathBuf::from("/tmp/s")));
        let e = RunFile::parse(r#"{"kernal": "/k"}"#, false).expect_err("unknown");
        assert!(e.contains("kernal"), "{e}");
        let e = RunFile::parse("memroy = \"1G\"", true).expect_err("unknown");
        assert!(e.contains("memroy"), "{e}");
        let e = RunFile::parse(r#"{"cpus": "two"}"#, false).expect_err("type");
        assert!(e.contains("invalid type"), "{e}");
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
