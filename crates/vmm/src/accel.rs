//! Choosing the accelerator.
//!
//! `/dev/kvm` existing does not mean KVM is usable: on some hosts it is there but every
//! guest instruction is emulated (~1 µs each), so a kernel never finishes booting, and how
//! slow that looks to a timed loop varies by host (38 ms on one, 84 ms on another, for a
//! loop hardware runs in ~50 µs). `auto` therefore decides in stages, each cheaper than
//! the next and each able to say no:
//!
//! 1. **Timing** ([`probe`]): a real-mode guest (on ARM64, an EL1 one) runs a
//!    100,000-iteration loop through the KVM API, and the host runs the same two
//!    instructions. KVM passes only under [`KVM_LIMIT`] (5 ms) *and* under
//!    [`ENTRY_ALLOWANCE`] + [`HOST_FACTOR`] × the host's time. The absolute limit is 8×
//!    below the fastest emulation seen; the relative one keeps a fast emulator on a fast
//!    host from passing (hardware runs guest code at host speed, an emulator cannot).
//! 2. **Boot canary** ([`canary`]): the guest kernel and initramfs under `-accel kvm` must
//!    reach `/init` within 15 s. Only then is KVM trusted.
//! 3. **Verdict cache**: the answer is kept in `$HEARTH_HOME/accel.json`, keyed by the
//!    host's kernel release, CPU model and QEMU version; a different key, or
//!    `hearth accel --recheck` ([`recheck`]), decides again.
//! 4. **Boot fallback**: a VM booted with KVM under `auto` that times out with an empty
//!    console is booted again under TCG and the verdict recorded
//!    ([`record_boot_without_progress`]), so later boots go straight to TCG.

pub mod canary;
pub mod probe;

use canary::CanarySpec;
use probe::Timing;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
/// Accelerator for guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Accel {
    /// Measure KVM; fall back to TCG.
    Auto,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!("unknown accelerator {s:?}; use auto, kvm or tcg")),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// KVM slower than this at the probe loop is not hardware virtualization (hardware: ~50 µs;
/// emulation seen at 38–84 ms).
pub const KVM_LIMIT: Duration = Duration::from_millis(5);
/// How many times the host's own time for the loop KVM may take, beyond [`ENTRY_ALLOWANCE`].
pub const HOST_FACTOR: u32 = 20;
/// Fixed cost allowed for entering the probe VM (tens of µs on hardware).
pub const ENTRY_ALLOWANCE: Duration = Duration::from_millis(1);
/// The probe runs at most this long (an emulating host may be far slower than seen).
const PROBE_DEADLINE: Duration = Duration::from_secs(2);
/// Version of `accel.json`; another version is ignored (decided again).
pub const CACHE_VERSION: u32 = 1;
/// Largest `accel.json` read.
const MAX_CACHE_BYTES: u64 = 64 << 10;

/// What the verdict is keyed by: change any and KVM is measured again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostKey {
    /// The host kernel's release (`uname -r`).
    pub kernel_release: String,
    /// The CPU's model name (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// The first line of `qemu --version`.
    pub qemu_version: String,
}

impl HostKey {
    /// This host's key for `qemu`.
    pub fn current(qemu: &Path) -> HostKey {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
            .unwrap_or_else(|| "unknown".into());
        HostKey {
            kernel_release: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model,
            qemu_version: crate::snapshot::qemu_version(qemu),
        }
    }
}

/// How a verdict was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Timing stage and, when that passed, the boot canary.
    Probe,
    /// A VM booted with KVM made no progress.
    BootFallback,
}

/// The accelerator `auto` picks on this host, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// Format version ([`CACHE_VERSION`]).
    pub version: u32,
    /// `Kvm` or `Tcg`.
    pub accel: Accel,
    /// Why (for TCG: what KVM failed; for KVM: what it passed).
    pub reason: String,
    /// The host the verdict is for.
    pub host: HostKey,
    /// The probe guest's time for the loop, when it ran.
    pub kvm_probe_ms: Option<f64>,
    /// The host's time for the same loop, when measured.
    pub host_loop_ms: Option<f64>,
    /// The canary's time to `/init`, when it got there.
    pub canary_ms: Option<f64>,
    /// How the verdict was reached.
    pub origin: Origin,
    /// When it was reached.
    pub checked_unix_ms: u64,
    /// Read from `accel.json` rather than decided now (not stored).
    #[serde(skip)]
    pub cached: bool,
}

impl Verdict {
    fn new(accel: Accel, reason: String, host: HostKey, origin: Origin) -> Verdict {
        Verdict {
            version: CACHE_VERSION,
            accel,
            reason,
            host,
            kvm_probe_ms: None,
            host_loop_ms: None,
            canary_ms: None,
            origin,
            checked_unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            cached: false,
        }
    }

    /// Worth keeping: a measurement was made. A `/dev/kvm` that cannot even be opened is
    /// checked again next time (it costs nothing, and permissions or modules change).
    fn worth_caching(&self) -> bool {
        self.kvm_probe_ms.is_some() || self.origin == Origin::BootFallback
    }
}

/// Milliseconds to the µs (a value that survives a JSON round trip unchanged).
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// The timing stage's rule: `Ok` when the loop's times look like hardware virtualization.
pub fn judge_timing(t: &Timing) -> Result<(), String> {
    let relative = ENTRY_ALLOWANCE + t.host * HOST_FACTOR;
    let limit = KVM_LIMIT.min(relative);
    if t.kvm <= limit {
        Ok(())
    } else {
        Err(format!(
            "/dev/kvm ran a {}-iteration loop in {:.3} ms, the host in {:.3} ms (limit {:.3} ms): it emulates instead of virtualizing",
            probe::ITERATIONS,
            ms(t.kvm),
            ms(t.host),
            ms(limit)
        ))
    }
}

/// What deciding needs from the host; faked in tests.
pub trait Host {
    /// The host's cache key.
    fn key(&self) -> HostKey;
    /// Runs the timing stage.
    fn time_kvm(&self) -> Result<Timing, String>;
    /// Boots the canary: time to `/init`, or why it made no progress.
    fn canary(&self) -> Result<Duration, String>;
}

/// Decides: the cached verdict when its key matches and `recheck` is false, else timing
/// then canary.
pub fn decide(host: &dyn Host, cached: Option<Verdict>, recheck: bool) -> Verdict {
    let key = host.key();
    if let Some(mut v) = cached.filter(|v| !recheck && v.version == CACHE_VERSION && v.host == key) {
        v.cached = true;
        return v;
    }
    let timing = match host.time_kvm() {
        Ok(t) => t,
        Err(e) => return Verdict::new(Accel::Tcg, e, key, Origin::Probe),
    };
    let mut v = match judge_timing(&timing) {
        Err(reason) => Verdict::new(Accel::Tcg, reason, key, Origin::Probe),
        Ok(()) => match host.canary() {
            Ok(d) => {
                let mut v = Verdict::new(
                    Accel::Kvm,
                    format!("the probe loop ran at hardware speed and a KVM boot reached /init in {:.0} ms", ms(d)),
                    key,
                    Origin::Probe,
                );
                v.canary_ms = Some(ms(d));
                v
            }
            Err(e) => Verdict::new(Accel::Tcg, format!("the probe loop passed, but {e}"), key, Origin::Probe),
        },
    };
    v.kvm_probe_ms = Some(ms(timing.kvm));
    v.host_loop_ms = Some(ms(timing.host));
    v
}

/// True when a failed boot means KVM cannot boot here: `auto` chose KVM and the guest
/// timed out without a single console line.
pub fn made_no_progress(requested: Accel, used: Accel, console: &str) -> bool {
    requested == Accel::Auto && used == Accel::Kvm && console.trim().is_empty()
}

/// Where the verdict is kept.
pub fn cache_path(home: &Path) -> PathBuf {
    home.join("accel.json")
}

/// Reads a cached verdict; anything unreadable, too big or of another version is none.
pub fn read_cache(path: &Path) -> Option<Verdict> {
    let f = std::fs::File::open(path).ok()?;
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_CACHE_BYTES + 1), &mut s).ok()?;
    if s.len() as u64 > MAX_CACHE_BYTES {
        return None;
    }
    serde_json::from_str::<Verdict>(&s).ok().filter(|v| v.version == CACHE_VERSION)
}

/// Writes the verdict (temp file and rename, so a reader never sees half of it).
pub fn write_cache(path: &Path, v: &Verdict) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// The real host: `/dev/kvm`, the host CPU and a canary of `spec`.
struct RealHost<'a> {
    spec: &'a CanarySpec,
}

impl Host for RealHost<'_> {
    fn key(&self) -> HostKey {
        HostKey::current(&self.spec.qemu)
    }

    fn time_kvm(&self) -> Result<Timing, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        // In its own thread: on an emulating host it may take a while, and we stop
        // waiting long before it finishes.
        std::thread::spawn(move || {
            let good = KVM_LIMIT;
            let _ = tx.send(probe::kvm_loop(3, good));
        });
        let kvm = match rx.recv_timeout(PROBE_DEADLINE) {
            Ok(r) => r?,
            Err(_) => return Err(format!("the KVM probe did not finish within {PROBE_DEADLINE:?}: /dev/kvm emulates")),
        };
        Ok(Timing { kvm, host: probe::host_loop() })
    }

    fn canary(&self) -> Result<Duration, String> {
        for (what, p) in [("guest kernel", &self.spec.kernel), ("initramfs", &self.spec.initramfs)] {
            if !p.exists() {
                return Err(format!("the {what} for the boot canary is missing at {}", p.display()));
            }
        }
        canary::run(self.spec, canary::TIMEOUT)
    }
}

/// The verdict this process uses (one decision at a time: a canary is not run twice).
static CURRENT: Mutex<Option<Verdict>> = Mutex::new(None);

/// The canary for the default set-up: the host architecture's QEMU (KVM runs only that
/// one) and its kernel and initramfs installed in `$HEARTH_HOME` (paths that do not exist
/// make the canary, if reached, fail).
pub fn default_canary() -> CanarySpec {
    let home = crate::home::hearth_home();
    let arch = crate::arch::Arch::host();
    let (kernel, initramfs) =
        crate::assets::boot_files_for(&home, arch).unwrap_or_else(|_| (home.join("kernel/missing"), home.join("initramfs/missing")));
    CanarySpec { qemu: arch.qemu_binary().into(), kernel, initramfs }
}

/// The verdict for `spec`'s host: this process's, else `accel.json`'s when its key
/// matches, else decided now (and stored). `recheck` decides again whatever is cached.
pub fn verdict(spec: &CanarySpec, recheck: bool) -> Verdict {
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let key = HostKey::current(&spec.qemu);
    if let Some(v) = current.as_ref().filter(|v| !recheck && v.host == key) {
        return v.clone();
    }
    let path = cache_path(&crate::home::hearth_home());
    let v = decide(&RealHost { spec }, read_cache(&path), recheck);
    if !v.cached {
        tracing::info!(accel = %v.accel, reason = %v.reason, "accelerator decided");
        if v.worth_caching() {
            if let Err(e) = write_cache(&path, &v) {
                tracing::warn!("could not record the accelerator verdict in {}: {e}", path.display());
            }
        }
    }
    *current = Some(v.clone());
    v
}

/// Decides again, ignoring what is cached (`hearth accel --recheck`).
pub fn recheck(spec: &CanarySpec) -> Verdict {
    verdict(spec, true)
}

/// Resolves `Auto` with the default set-up ([`default_canary`]); others pass through.
pub fn resolve(accel: Accel) -> Accel {
    match accel {
        Accel::Auto => verdict(&default_canary(), false).accel,
        other => other,
    }
}

/// Resolves `Auto` for a VM: its QEMU, kernel and initramfs make the canary. Runs on a
/// blocking thread (a first decision may boot the canary for seconds).
pub async fn resolve_for(cfg: &crate::config::VmConfig) -> Accel {
    if cfg.accel != Accel::Auto {
        return cfg.accel;
    }
    if cfg.arch != crate::arch::Arch::host() {
        // KVM runs only the host's own architecture; another one is always emulated.
        return Accel::Tcg;
    }
    let spec = CanarySpec { qemu: cfg.qemu_binary.clone(), kernel: cfg.kernel.clone(), initramfs: cfg.initramfs.clone() };
    tokio::task::spawn_blocking(move || verdict(&spec, false).accel).await.unwrap_or(Accel::Tcg)
}

/// Records that a VM booted with KVM under `auto` made no progress: from now on `auto`
/// picks TCG on this host (until the key changes or a recheck).
pub fn record_boot_without_progress(qemu: &Path, reason: String) -> Verdict {
    let v = Verdict::new(Accel::Tcg, reason, HostKey::current(qemu), Origin::BootFallback);
    tracing::warn!(reason = %v.reason, "KVM made no progress; using TCG on this host from now on");
    let path = cache_path(&crate::home::hearth_home());
    if let Err(e) = write_cache(&path, &v) {
        tracing::warn!("could not record the accelerator verdict in {}: {e}", path.display());
    }
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(v.clone());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    struct Fake {
        key: HostKey,
        timing: Result<Timing, String>,
        canary: Result<Duration, String>,
        timed: Cell<u32>,
        booted: Cell<u32>,
    }

    fn key(kernel: &str) -> HostKey {
        HostKey { kernel_release: kernel.into(), cpu_model: "AMD EPYC".into(), qemu_version: "QEMU emulator version 10.0.2".into() }
    }

    fn t(kvm_us: u64, host_us: u64) -> Timing {
        Timing { kvm: Duration::from_micros(kvm_us), host: Duration::from_micros(host_us) }
    }

    fn fake(timing: Result<Timing, String>, canary: Result<Duration, String>) -> Fake {
        Fake { key: key("6.18"), timing, canary, timed: Cell::new(0), booted: Cell::new(0) }
    }

    impl Host for Fake {
        fn key(&self) -> HostKey {
            self.key.clone()
        }
        fn time_kvm(&self) -> Result<Timing, String> {
            self.timed.set(self.timed.get() + 1);
            self.timing.clone()
        }
        fn canary(&self) -> Result<Duration, String> {
            self.booted.set(self.booted.get() + 1);
            self.canary.clone()
        }
    }

    #[test]
    fn parses_names() {
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("xen".parse::<Accel>().is_err());
        assert_eq!(resolve(Accel::Tcg), Accel::Tcg);
    }

    #[test]
    fn timing_passes_hardware_and_fails_every_emulation_seen() {
        // Hardware: ~50 µs for the loop, the host ~30 µs.
        assert!(judge_timing(&t(50, 30)).is_ok());
        // The emulating hosts seen: 38, 40, 82 and 84 ms (the old 50 ms limit passed 38).
        for kvm_ms in [38, 40, 82, 84] {
            let e = judge_timing(&t(kvm_ms * 1000, 30)).unwrap_err();
            assert!(e.contains("emulates"), "{e}");
        }
        // Just over the absolute limit, even on a slow host.
        assert!(judge_timing(&t(5_100, 1_000)).is_err());
        // A fast emulator on a fast host: under 5 ms, but 100× the host.
        assert!(judge_timing(&t(3_000, 30)).is_err());
        // A slow host (loaded, throttled) keeps hardware passing.
        assert!(judge_timing(&t(2_500, 200)).is_ok());
    }

    #[test]
    fn kvm_needs_the_timing_and_the_canary() {
        let hw = fake(Ok(t(50, 30)), Ok(Duration::from_millis(600)));
        let v = decide(&hw, None, false);
        assert_eq!((v.accel, hw.booted.get()), (Accel::Kvm, 1));
        assert_eq!(v.canary_ms, Some(600.0));

        // Fast at the loop, but a real boot does not get anywhere: TCG, with the canary's words.
        let no_boot = fake(Ok(t(50, 30)), Err("a KVM boot of the guest kernel printed nothing in 15s".into()));
        let v = decide(&no_boot, None, false);
        assert_eq!(v.accel, Accel::Tcg);
        assert!(v.reason.contains("printed nothing"), "{}", v.reason);

        // Slow at the loop: no canary at all (it would cost 15 s for nothing).
        let slow = fake(Ok(t(38_000, 30)), Ok(Duration::from_millis(1)));
        let v = decide(&slow, None, false);
        assert_eq!((v.accel, slow.booted.get()), (Accel::Tcg, 0));
        assert_eq!(v.kvm_probe_ms, Some(38.0));
        assert!(v.worth_caching());

        // No /dev/kvm: TCG, and not cached.
        let none = fake(Err("cannot open /dev/kvm: No such file".into()), Ok(Duration::ZERO));
        let v = decide(&none, None, false);
        assert_eq!(v.accel, Accel::Tcg);
        assert!(!v.worth_caching());
    }

    #[test]
    fn the_cache_is_used_only_for_the_same_host_and_without_recheck() {
        let host = fake(Ok(t(50, 30)), Ok(Duration::from_millis(500)));
        let stored = decide(&fake(Ok(t(38_000, 30)), Ok(Duration::ZERO)), None, false);
        assert_eq!(stored.accel, Accel::Tcg);

        // Same key: the cached verdict, nothing measured.
        let v = decide(&host, Some(stored.clone()), false);
        assert!(v.cached && v.accel == Accel::Tcg && host.timed.get() == 0);

        // Recheck: measured again.
        let v = decide(&host, Some(stored.clone()), true);
        assert!(!v.cached && v.accel == Accel::Kvm && host.timed.get() == 1);

        // A new host kernel (or CPU, or QEMU): measured again.
        let mut other = stored.clone();
        other.host = key("6.19");
        let v = decide(&host, Some(other), false);
        assert!(!v.cached && host.timed.get() == 2);

        // Another format version: measured again.
        let mut old = stored;
        old.version = CACHE_VERSION + 1;
        assert!(!decide(&host, Some(old), false).cached);
    }

    #[test]
    fn the_cache_file_round_trips_and_refuses_what_it_does_not_understand() {
        let dir = tempfile::tempdir().unwrap();
        let path = cache_path(dir.path());
        assert_eq!(read_cache(&path), None);
        let v = decide(&fake(Ok(t(84_000, 30)), Ok(Duration::ZERO)), None, false);
        write_cache(&path, &v).unwrap();
        assert_eq!(read_cache(&path), Some(v.clone()));
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(read_cache(&path), None);
        let mut other = serde_json::to_value(&v).unwrap();
        other["version"] = (CACHE_VERSION + 1).into();
        std::fs::write(&path, other.to_string()).unwrap();
        assert_eq!(read_cache(&path), None);
        std::fs::write(&path, vec![b' '; (MAX_CACHE_BYTES + 1) as usize]).unwrap();
        assert_eq!(read_cache(&path), None);
    }

    #[test]
    fn a_kvm_boot_without_console_output_falls_back_and_the_next_decision_is_tcg() {
        assert!(made_no_progress(Accel::Auto, Accel::Kvm, "\n  \n"));
        // Asked for KVM explicitly: the user's choice stands.
        assert!(!made_no_progress(Accel::Kvm, Accel::Kvm, ""));
        // TCG, or a console that shows progress: some other failure.
        assert!(!made_no_progress(Accel::Auto, Accel::Tcg, ""));
        assert!(!made_no_progress(Accel::Auto, Accel::Kvm, "hearth-agent: mount /dev/vda failed"));

        // The recorded fallback is what the next decision reads, without measuring.
        let fallback = Verdict::new(Accel::Tcg, "no progress in 60 s".into(), key("6.18"), Origin::BootFallback);
        assert!(fallback.worth_caching());
        let host = fake(Ok(t(50, 30)), Ok(Duration::from_millis(500)));
        let v = decide(&host, Some(fallback), false);
        assert_eq!((v.accel, v.origin, host.timed.get()), (Accel::Tcg, Origin::BootFallback, 0));
    }
}
