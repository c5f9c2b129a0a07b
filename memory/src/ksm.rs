//! Host KSM (kernel samepage merging) control through `/sys/kernel/mm/ksm`.
//!
//! KSM is host-wide: `run`, `pages_to_scan` and `sleep_millisecs` apply to every process that
//! marked memory `MADV_MERGEABLE`. Which VMs take part is a per-VM opt-in
//! ([`GuestRam::set_mergeable`](crate::GuestRam::set_mergeable), `--mergeable`), off by default
//! because merging opens timing side channels between VMs (see `docs/sharing.md`).
//!
//! [`Ksm::enable`] returns the settings it replaced so that [`Ksm::restore`] can put them back;
//! [`Ksm::enable_scoped`] does the same on drop.
//!
//! The VMM uses [`Ksm::share_on`]: one process may run several mergeable VMs, and the host's
//! settings must come back only when the last of them is gone, not when the first one that
//! happened to switch KSM on stops. Its [`KsmUser`]s are counted per KSM directory, process-wide.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// Where the kernel exposes KSM.
pub const KSM_SYSFS_DIR: &str = "/sys/kernel/mm/ksm";

/// Pages ksmd scans per wake-up when memvisor switches KSM on.
pub const DEFAULT_PAGES_TO_SCAN: u64 = 1000;

/// Milliseconds ksmd sleeps between scans when memvisor switches KSM on. With
/// [`DEFAULT_PAGES_TO_SCAN`] that is at most 50,000 pages (195 MiB) scanned per second.
pub const DEFAULT_SLEEP_MS: u64 = 20;

/// Errors from reading or changing host KSM settings.
#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    /// The kernel has no KSM (built without `CONFIG_KSM`) or sysfs is not mounted.
    #[error("KSM is not available on this host: {} does not exist", dir.display())]
    Unavailable {
        /// The directory that was looked for.
        dir: PathBuf,
    },
    /// Changing KSM settings needs root.
    #[error("changing KSM settings needs root (cannot write {})", path.display())]
    PermissionDenied {
        /// The file that could not be written.
        path: PathBuf,
    },
    /// sysfs is mounted read-only (as in many containers).
    #[error("KSM settings are read-only on this host ({} is on a read-only file system)", path.display())]
    ReadOnly {
        /// The file that could not be written.
        path: PathBuf,
    },
    /// A KSM file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a value.
    #[error("cannot write {value} to {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The value that was refused.
        value: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A KSM file did not hold a number.
    #[error("{} holds {text:?}, not a number", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held.
        text: String,
    },
    /// A setting memvisor would not write.
    #[error("invalid KSM setting: {0}")]
    InvalidSetting(&'static str),
}

/// The state of `/sys/kernel/mm/ksm/run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KsmRun {
    /// 0: ksmd does not scan; pages already merged stay merged.
    Stopped,
    /// 1: ksmd scans mergeable memory.
    Running,
    /// 2: ksmd stops and unmerges every merged page.
    Unmerge,
}

impl KsmRun {
    fn from_value(value: u64) -> Option<Self> {
        match value {
            0 => Some(KsmRun::Stopped),
            1 => Some(KsmRun::Running),
            2 => Some(KsmRun::Unmerge),
            _ => None,
        }
    }

    fn value(self) -> u64 {
        match self {
            KsmRun::Stopped => 0,
            KsmRun::Running => 1,
            KsmRun::Unmerge => 2,
        }
    }
}

/// The KSM settings memvisor changes, as read from or written to sysfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KsmSettings {
    /// `run`.
    pub run: KsmRun,
    /// `pages_to_scan`: pages scanned per ksmd wake-up.
    pub pages_to_scan: u64,
    /// `sleep_millisecs`: ksmd's sleep between scans.
    pub sleep_millisecs: u64,
}

/// Host-wide KSM counters (see the kernel's `Documentation/admin-guide/mm/ksm.rst`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KsmCounters {
    /// `pages_shared`: KSM pages in use (each backs two or more mappings).
    pub pages_shared: u64,
    /// `pages_sharing`: mappings that point at a KSM page beyond the first; roughly the pages
    /// saved.
    pub pages_sharing: u64,
    /// `pages_unshared`: pages ksmd checked that are unique (repeatedly, so wasted work).
    pub pages_unshared: u64,
    /// `full_scans`: completed passes over all mergeable memory.
    pub full_scans: u64,
}

impl KsmCounters {
    /// The counters as metrics (names to go after an exporter's `host_ksm_` prefix): the page
    /// figures are levels, `full_scans` only goes up.
    pub fn metrics(&self) -> Vec<crate::Metric> {
        use crate::Metric;
        vec![
            Metric::level("pages_shared", "KSM pages in use.", self.pages_shared),
            Metric::level(
                "pages_sharing",
                "Mappings sharing a KSM page beyond the first.",
                self.pages_sharing,
            ),
            Metric::counter("full_scans_total", "Completed KSM passes.", self.full_scans),
        ]
    }
}

/// Host KSM control.
#[derive(Debug, Clone)]
pub struct Ksm {
    dir: PathBuf,
}

impl Ksm {
    /// KSM at [`KSM_SYSFS_DIR`]. Fails with [`KsmError::Unavailable`] if the host has none.
    pub fn open() -> Result<Self, KsmError> {
        Self::with_dir(KSM_SYSFS_DIR)
    }

    /// KSM controlled through `dir` instead of sysfs (tests use a temporary directory).
    pub fn with_dir(dir: impl AsRef<Path>) -> Result<Self, KsmError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join("run").exists() {
            return Err(KsmError::Unavailable { dir });
        }
        Ok(Ksm { dir })
    }

    /// The directory this controls.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_u64(&self, name: &str) -> Result<u64, KsmError> {
        let path = self.dir.join(name);
        let text = fs::read_to_string(&path).map_err(|source| KsmError::Read {
            path: path.clone(),
            source,
        })?;
        text.trim().parse().map_err(|_| KsmError::Parse {
            path,
            text: text.trim().to_owned(),
        })
    }

    fn write_u64(&self, name: &str, value: u64) -> Result<(), KsmError> {
        let path = self.dir.join(name);
        // sysfs wants one write of the whole value; `fs::write` truncates, which sysfs ignores.
        fs::write(&path, format!("{value}\n")).map_err(|source| {
            match (source.kind(), source.raw_os_error()) {
                (io::ErrorKind::PermissionDenied, _) => KsmError::PermissionDenied { path },
                (_, Some(libc::EROFS)) => KsmError::ReadOnly { path },
                _ => KsmError::Write {
                    path,
                    value,
                    source,
                },
            }
        })
    }

    /// The current `run`, `pages_to_scan` and `sleep_millisecs`.
    pub fn settings(&self) -> Result<KsmSettings, KsmError> {
        let run_value = self.read_u64("run")?;
        let run = KsmRun::from_value(run_value).ok_or_else(|| KsmError::Parse {
            path: self.dir.join("run"),
            text: run_value.to_string(),
        })?;
        Ok(KsmSettings {
            run,
            pages_to_scan: self.read_u64("pages_to_scan")?,
            sleep_millisecs: self.read_u64("sleep_millisecs")?,
        })
    }

    /// The host-wide counters.
    pub fn counters(&self) -> Result<KsmCounters, KsmError> {
        Ok(KsmCounters {
            pages_shared: self.read_u64("pages_shared")?,
            pages_sharing: self.read_u64("pages_sharing")?,
            pages_unshared: self.read_u64("pages_unshared")?,
            full_scans: self.read_u64("full_scans")?,
        })
    }

    /// Writes `settings`: the scan rate first, then `run`, so that ksmd never runs at a rate
    /// nobody asked for.
    pub fn apply(&self, settings: &KsmSettings) -> Result<(), KsmError> {
        if settings.pages_to_scan == 0 {
            return Err(KsmError::InvalidSetting("pages_to_scan must be at least 1"));
        }
        self.write_u64("pages_to_scan", settings.pages_to_scan)?;
        self.write_u64("sleep_millisecs", settings.sleep_millisecs)?;
        self.write_u64("run", settings.run.value())
    }

    /// Switches KSM on at `pages_to_scan` pages every `sleep_ms` milliseconds and returns the
    /// settings it replaced, for [`Ksm::restore`]. Nothing is written if the settings cannot be
    /// read first. A kernel whose KSM advisor (`advisor_mode`) manages the scan rate refuses
    /// `pages_to_scan` with [`KsmError::Write`].
    pub fn enable(&self, pages_to_scan: u64, sleep_ms: u64) -> Result<KsmSettings, KsmError> {
        let previous = self.settings()?;
        let wanted = KsmSettings {
            run: KsmRun::Running,
            pages_to_scan,
            sleep_millisecs: sleep_ms,
        };
        if let Err(e) = self.apply(&wanted) {
            // Best effort: do not leave half the new settings behind.
            let _ = self.restore(&previous);
            return Err(e);
        }
        Ok(previous)
    }

    /// Puts back settings returned by [`Ksm::enable`] or [`Ksm::settings`]. A previous `run` of
    /// 2 (unmerge) is written back as such, which unmerges every page.
    pub fn restore(&self, previous: &KsmSettings) -> Result<(), KsmError> {
        // Stop first if the previous state was stopped, so the old rate never runs.
        if previous.run != KsmRun::Running {
            self.write_u64("run", previous.run.value())?;
        }
        self.apply(previous)
    }

    /// Like [`Ksm::enable`], but the previous settings come back when the guard drops (also on
    /// panic). For tests and benchmarks; the VMM restores explicitly so it can report failures.
    pub fn enable_scoped(&self, pages_to_scan: u64, sleep_ms: u64) -> Result<KsmGuard, KsmError> {
        let previous = self.enable(pages_to_scan, sleep_ms)?;
        Ok(KsmGuard {
            ksm: self.clone(),
            previous,
        })
    }
}

/// The users of KSM in this process, per KSM directory.
#[derive(Debug)]
struct Users {
    count: usize,
    /// The host's settings before the first user switched KSM on; `None` if it was already
    /// running (then it is left running: someone else wants it).
    previous: Option<KsmSettings>,
}

static USERS: Mutex<Option<HashMap<PathBuf, Users>>> = Mutex::new(None);

fn users() -> std::sync::MutexGuard<'static, Option<HashMap<PathBuf, Users>>> {
    USERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ksm {
    /// Makes sure KSM runs for as long as the returned [`KsmUser`] lives. The first user in the
    /// process switches KSM on at `pages_to_scan` every `sleep_ms` if it is not running, and
    /// remembers the host's settings; later users only count. When the last user goes, the
    /// host's settings come back (and nothing is written if KSM was running before the first).
    pub fn share_on(&self, pages_to_scan: u64, sleep_ms: u64) -> Result<KsmUser, KsmError> {
        let mut all = users();
        let all = all.get_or_insert_with(HashMap::new);
        if let Some(u) = all.get_mut(&self.dir) {
            u.count += 1;
        } else {
            let settings = self.settings()?;
            let previous = if settings.run == KsmRun::Running {
                None
            } else {
                Some(self.enable(pages_to_scan, sleep_ms)?)
            };
            all.insert(self.dir.clone(), Users { count: 1, previous });
        }
        Ok(KsmUser { ksm: self.clone() })
    }
}

/// One VM's need for KSM; see [`Ksm::share_on`].
#[derive(Debug)]
pub struct KsmUser {
    ksm: Ksm,
}

impl KsmUser {
    /// Whether this process switched KSM on (and will switch it back when its last user goes).
    pub fn switched_on(&self) -> bool {
        users()
            .as_ref()
            .and_then(|all| all.get(&self.ksm.dir))
            .is_some_and(|u| u.previous.is_some())
    }
}

impl Drop for KsmUser {
    fn drop(&mut self) {
        let mut all = users();
        let Some(all) = all.as_mut() else {
            return;
        };
        let Some(u) = all.get_mut(&self.ksm.dir) else {
            return;
        };
        u.count -= 1;
        if u.count > 0 {
            return;
        }
        if let Some(previous) = u.previous {
            if let Err(e) = self.ksm.restore(&previous) {
                tracing::error!("cannot restore KSM settings {previous:?}: {e}");
            }
        }
        all.remove(&self.ksm.dir);
    }
}

/// Restores KSM settings on drop; see [`Ksm::enable_scoped`].
#[derive(Debug)]
pub struct KsmGuard {
    ksm: Ksm,
    previous: KsmSettings,
}

impl KsmGuard {
    /// The settings that will be restored.
    pub fn previous(&self) -> &KsmSettings {
        &self.previous
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        if let Err(e) = self.ksm.restore(&self.previous) {
            tracing::error!("cannot restore KSM settings {:?}: {e}", self.previous);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake KSM directory with the given file contents.
    fn fake_dir(tag: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("memvisor-ksm-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create fake ksm dir");
        for (name, text) in files {
            fs::write(dir.join(name), text).expect("write fake ksm file");
        }
        dir
    }

    const FAKE: &[(&str, &str)] = &[
        ("run", "0\n"),
        ("pages_to_scan", "100\n"),
        ("sleep_millisecs", "20\n"),
        ("pages_shared", "3\n"),
        ("pages_sharing", "7\n"),
        ("pages_unshared", "11\n"),
        ("full_scans", "2\n"),
    ];

    #[test]
    fn missing_directory_is_reported_as_unavailable() {
        let err = Ksm::with_dir("/nonexistent/ksm").expect_err("no such dir");
        assert!(matches!(err, KsmError::Unavailable { .. }));
        assert!(err.to_string().contains("not available"), "{err}");
    }

    #[test]
    fn settings_and_counters_are_parsed() {
        let dir = fake_dir("parse", FAKE);
        let ksm = Ksm::with_dir(&dir).expect("fake ksm");
        assert_eq!(
            ksm.settings().expect("settings"),
            KsmSettings {
                run: KsmRun::Stopped,
                pages_to_scan: 100,
                sleep_millisecs: 20
            }
        );
        assert_eq!(
            ksm.counters().expect("counters"),
            KsmCounters {
                pages_shared: 3,
                pages_sharing: 7,
                pages_unshared: 11,
                full_scans: 2
            }
        );
        fs::write(dir.join("full_scans"), "many\n").expect("write");
        assert!(matches!(ksm.counters(), Err(KsmError::Parse { .. })));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn enable_then_restore_round_trips() {
        let dir = fake_dir("enable", FAKE);
        let ksm = Ksm::with_dir(&dir).expect("fake ksm");
        let before = ksm.settings().expect("settings");
        let previous = ksm.enable(4000, 5).expect("enable");
        assert_eq!(previous, before);
        assert_eq!(
            ksm.settings().expect("settings"),
            KsmSettings {
                run: KsmRun::Running,
                pages_to_scan: 4000,
                sleep_millisecs: 5
            }
        );
        ksm.restore(&previous).expect("restore");
        assert_eq!(ksm.settings().expect("settings"), before);
        {
            let guard = ksm.enable_scoped(10, 1).expect("enable");
            assert_eq!(guard.previous(), &before);
            assert_eq!(ksm.settings().expect("settings").run, KsmRun::Running);
        }
        assert_eq!(ksm.settings().expect("settings"), before);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn host_settings_come_back_only_when_the_last_user_goes() {
        let dir = fake_dir("users", FAKE);
        let ksm = Ksm::with_dir(&dir).expect("fake ksm");
        let before = ksm.settings().expect("settings");
        assert_eq!(before.run, KsmRun::Stopped);

        let first = ksm.share_on(1000, 20).expect("first VM");
        assert!(first.switched_on());
        let second = ksm.share_on(1000, 20).expect("second VM");
        assert_eq!(ksm.settings().expect("settings").run, KsmRun::Running);
        drop(first);
        assert_eq!(
            ksm.settings().expect("settings").run,
            KsmRun::Running,
            "the second VM still needs KSM"
        );
        drop(second);
        assert_eq!(ksm.settings().expect("settings"), before);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn ksm_running_before_the_first_user_is_left_alone() {
        let dir = fake_dir("already-on", FAKE);
        fs::write(dir.join("run"), "1\n").expect("write");
        fs::write(dir.join("pages_to_scan"), "77\n").expect("write");
        let ksm = Ksm::with_dir(&dir).expect("fake ksm");
        let before = ksm.settings().expect("settings");
        let user = ksm.share_on(1000, 20).expect("user");
        assert!(!user.switched_on());
        assert_eq!(ksm.settings().expect("settings"), before, "nothing written");
        drop(user);
        assert_eq!(ksm.settings().expect("settings"), before);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn zero_pages_to_scan_is_refused_without_writing() {
        let dir = fake_dir("zero", FAKE);
        let ksm = Ksm::with_dir(&dir).expect("fake ksm");
        assert!(matches!(
            ksm.enable(0, 20),
            Err(KsmError::InvalidSetting(_))
        ));
        assert_eq!(ksm.settings().expect("settings").run, KsmRun::Stopped);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn read_only_files_give_a_clear_error() {
        let dir = fake_dir("ro", FAKE);
        // A directory where a file should be makes the write fail even for root.
        fs::remove_file(dir.join("pages_to_scan")).expect("remove");
        fs::create_dir(dir.join("pages_to_scan")).expect("mkdir");
        let ksm = Ksm::with_dir(&dir).expect("fake ksm");
        let err = ksm
            .apply(&KsmSettings {
                run: KsmRun::Running,
                pages_to_scan: 10,
                sleep_millisecs: 10,
            })
            .expect_err("cannot write a directory");
        assert!(
            matches!(
                err,
                KsmError::Write { .. } | KsmError::PermissionDenied { .. }
            ),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(dir.join("run")).expect("read run"),
            "0\n",
            "run is not touched when the scan rate cannot be set"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
