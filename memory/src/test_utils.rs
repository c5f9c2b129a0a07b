//! What a test needs from the machine, checked one way for the whole workspace (feature
//! `test-utils`).
//!
//! A test that needs KVM, root, userfaultfd write-protect or the built guest starts with
//! [`require!`](crate::require) (or calls [`met`]). Each need is probed once per process. When one
//! is missing the test prints one line, `skipped <test>: needs <need>: <why>`, and returns (it
//! passes); with `MEMVISOR_REQUIRE_KVM=1` in the environment (CI sets it) a missing need fails
//! the test instead, so a CI run can never skip silently.
//!
//! `MEMVISOR_TEST_WITHOUT=kvm,root,userfaultfd-wp,guest` (any of them, or `all`) makes the
//! helper treat those needs as missing: it shows what a machine without them would do.
//!
//! Also here: [`FakeDiscard`], the [`DiscardRam`] that records what it is asked, shared by the
//! device crates' tests, and [`FakeClock`], a [`Clock`] that moves only when told.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;

use crate::clock::Clock;
use crate::ram::{DiscardRam, RamError};
use crate::swap::uffd;

/// With this set to `1`, a missing need fails the test.
pub const REQUIRE_ENV: &str = "MEMVISOR_REQUIRE_KVM";
/// A comma-separated list of needs ([`Need::name`], or `all`) to treat as missing.
pub const WITHOUT_ENV: &str = "MEMVISOR_TEST_WITHOUT";
/// Where the built guest is, if not in `target/guest/` of the workspace.
pub const GUEST_DIR_ENV: &str = "MEMVISOR_GUEST_DIR";

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `/dev/kvm`, open for reading and writing.
    Kvm,
    /// Effective user id 0 (`/proc/kpagecount`, PFNs in `/proc/self/pagemap`, KSM settings).
    Root,
    /// userfaultfd with write-protect faults on anonymous memory (the swapper).
    UffdWriteProtect,
    /// The default guest `guest-images/build` produces (`vmlinux`, `initramfs.cpio.gz`).
    Guest,
}

impl Need {
    /// Every need.
    pub const ALL: [Need; 4] = [Need::Kvm, Need::Root, Need::UffdWriteProtect, Need::Guest];

    /// The need's name in [`WITHOUT_ENV`] and in skip lines.
    pub fn name(self) -> &'static str {
        match self {
            Need::Kvm => "kvm",
            Need::Root => "root",
            Need::UffdWriteProtect => "userfaultfd-wp",
            Need::Guest => "guest",
        }
    }

    /// Why the need is missing on this machine, `None` if it is there. Probed once per process.
    pub fn missing(self) -> Option<String> {
        static PROBED: [OnceLock<Option<String>>; 4] = [const { OnceLock::new() }; 4];
        let index = Need::ALL
            .iter()
            .position(|n| *n == self)
            .expect("every need is in Need::ALL");
        PROBED[index].get_or_init(|| self.probe()).clone()
    }

    fn probe(self) -> Option<String> {
        if simulated_missing(self, std::env::var(WITHOUT_ENV).ok().as_deref()) {
            return Some(format!("{WITHOUT_ENV} lists it"));
        }
        match self {
            Need::Kvm => kvm_missing(),
            Need::Root => {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let euid = unsafe { libc::geteuid() };
                (euid != 0).then(|| format!("running as user {euid}"))
            }
            Need::UffdWriteProtect => match uffd::probe_features() {
                Err(e) => Some(format!("no userfaultfd: {e}")),
                Ok(f) if f & uffd::FEATURE_PAGEFAULT_FLAG_WP == 0 => Some(format!(
                    "userfaultfd offers no write-protect on anonymous memory (features {f:#x})"
                )),
                Ok(_) => None,
            },
            Need::Guest => {
                let dir = guest_dir();
                let missing: Vec<_> = ["vmlinux", "initramfs.cpio.gz"]
                    .into_iter()
                    .filter(|f| !dir.join(f).exists())
                    .collect();
                (!missing.is_empty()).then(|| {
                    format!(
                        "no {} in {} (run guest-images/build)",
                        missing.join(" or "),
                        dir.display()
                    )
                })
            }
        }
    }
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why `/dev/kvm` is not a usable KVM, `None` if it answers `KVM_GET_API_VERSION` with the
/// stable API version (12). Opening is not enough: a `/dev/null` bind-mounted over it opens.
fn kvm_missing() -> Option<String> {
    /// `KVM_GET_API_VERSION` (`_IO(KVMIO, 0x00)`), and the version every KVM since 2.6.22 gives.
    const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
    const KVM_API_VERSION: libc::c_int = 12;
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(kvm) => kvm,
        Err(e) => return Some(format!("cannot open /dev/kvm: {e}")),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value; on a file that
    // is not KVM the ioctl fails with ENOTTY and changes nothing.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _) };
    match version {
        KVM_API_VERSION => None,
        v if v < 0 => Some(format!(
            "/dev/kvm is not KVM: KVM_GET_API_VERSION failed: {}",
            std::io::Error::last_os_error()
        )),
        v => Some(format!(
            "/dev/kvm answers API version {v}, not {KVM_API_VERSION}"
        )),
    }
}

/// Whether `need` is listed in `without` (the value of [`WITHOUT_ENV`]).
fn simulated_missing(need: Need, without: Option<&str>) -> bool {
    without.is_some_and(|list| {
        list.split(',')
            .map(str::trim)
            .any(|n| n == "all" || n == need.name())
    })
}

/// The directory of the default guest: [`GUEST_DIR_ENV`], or `target/guest/` of the workspace.
pub fn guest_dir() -> PathBuf {
    std::env::var_os(GUEST_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest"))
}

/// The rule: true if every one of `needs` is met. Otherwise, with [`REQUIRE_ENV`]`=1` it
/// panics naming the first missing need; without, it prints one skip line naming the running
/// test and returns false, and the test returns.
pub fn met(needs: &[Need]) -> bool {
    let Some((need, why)) = needs.iter().find_map(|n| n.missing().map(|why| (*n, why))) else {
        return true;
    };
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test} needs {need}, and {REQUIRE_ENV}=1 forbids skipping: {why}");
    }
    // Straight to the process's stderr, past the test harness's capture: a skip is always seen.
    let _ = writeln!(std::io::stderr(), "skipped {test}: needs {need}: {why}");
    false
}

/// Returns from the calling test unless the machine has every listed [`Need`] (by variant
/// name), following [`met`]'s rule: `memory::require!(Kvm, Guest);`.
#[macro_export]
macro_rules! require {
    ($($need:ident),+ $(,)?) => {
        if !$crate::test_utils::met(&[$($crate::test_utils::Need::$need),+]) {
            return;
        }
    };
}

/// A [`DiscardRam`] that records every range it is asked to discard, and can be told to fail.
#[derive(Debug, Default)]
pub struct FakeDiscard {
    ranges: Mutex<Vec<(u64, u64)>>,
    fail: AtomicBool,
}

impl FakeDiscard {
    /// Every `(guest address, length)` asked for so far, in order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.lock().expect("fake discard lock").clone()
    }
    /// Makes later discards fail ([`RamError::NotRam`]) or succeed again; they are recorded
    /// either way.
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::Relaxed);
    }
    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.ranges.lock().expect("fake discard lock").clear();
    }
}

impl DiscardRam for FakeDiscard {
    fn discard_range(&self, addr: GuestAddress, len: u64) -> Result<(), RamError> {
        self.ranges
            .lock()
            .expect("fake discard lock")
            .push((addr.0, len));
        if self.fail.load(Ordering::Relaxed) {
            return Err(RamError::NotRam { addr: addr.0, len });
        }
        Ok(())
    }
}

/// A [`Clock`] that stands still until [`FakeClock::advance`] or [`Clock::sleep`] moves it
/// forward; it records how long it was asked to sleep.
#[derive(Debug)]
pub struct FakeClock {
    start: Instant,
    state: Mutex<FakeClockState>,
}

#[derive(Debug, Default)]
struct FakeClockState {
    elapsed: Duration,
    slept: Duration,
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeClock {
    /// A clock standing at the moment it was made.
    pub fn new() -> Self {
        FakeClock {
            start: Instant::now(),
            state: Mutex::new(FakeClockState::default()),
        }
    }
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.state.lock().expect("fake clock lock").elapsed += by;
    }
    /// How far the clock has moved since it was made.
    pub fn elapsed(&self) -> Duration {
        self.state.lock().expect("fake clock lock").elapsed
    }
    /// The total of every [`Clock::sleep`] asked of it.
    pub fn slept(&self) -> Duration {
        self.state.lock().expect("fake clock lock").slept
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }
    fn sleep(&self, duration: Duration) {
        let mut state = self.state.lock().expect("fake clock lock");
        state.elapsed += duration;
        state.slept += duration;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_lists_needs_by_name_or_all() {
        assert!(simulated_missing(Need::Kvm, Some("root, kvm")));
        assert!(!simulated_missing(Need::Guest, Some("root,kvm")));
        assert!(simulated_missing(Need::UffdWriteProtect, Some("all")));
        assert!(!simulated_missing(Need::Root, Some("")));
        assert!(!simulated_missing(Need::Root, None));
    }

    #[test]
    fn fake_clock_moves_only_when_told_or_slept() {
        let c = FakeClock::new();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_millis(5));
        c.sleep(Duration::from_millis(20));
        assert_eq!(c.now() - t0, Duration::from_millis(25));
        assert_eq!(c.slept(), Duration::from_millis(20));
    }

    #[test]
    fn fake_discard_records_and_fails_on_demand() {
        let d = FakeDiscard::default();
        d.discard_range(GuestAddress(0x1000), 4096).expect("ok");
        d.set_failing(true);
        assert!(d.discard_range(GuestAddress(0x2000), 4096).is_err());
        assert_eq!(d.ranges(), vec![(0x1000, 4096), (0x2000, 4096)]);
    }
}
