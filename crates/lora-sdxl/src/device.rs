//! What a run computes on: the device, the CUDA and cuDNN versions libtorch
//! brings, the attention backends, and the CUDA caching allocator's memory
//! statistics (through the shim, `csrc/device.cpp`).
//!
//! ```no_run
//! let info = lora_sdxl::device::DeviceInfo::query();
//! println!("{}", info.describe(tch::Device::Cpu, tch::Kind::Float));
//! if let Some(m) = lora_sdxl::device::memory(tch::Device::Cuda(0)) {
//!     println!("peak {} MiB", m.peak_allocated >> 20);
//! }
//! ```

use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicI32, Ordering};
use tch::{Device, Kind, Tensor};

extern "C" {
    fn lorakit_cuda_versions(out: *mut i64);
    fn lorakit_sdpa_backends() -> i64;
    fn lorakit_cuda_memory(index: i64, out: *mut i64) -> *mut c_char;
    fn lorakit_cuda_reset_peak(index: i64) -> *mut c_char;
    fn lorakit_sync_debug(mode: c_int) -> c_int;
    fn lorakit_free(p: *mut c_char);
}

/// Takes an error message from the shim (`None` for success).
pub(crate) fn shim_error(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: a non-null return is a NUL-terminated string the shim
    // allocated with malloc; it is freed once, here.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { lorakit_free(p) };
    Some(s)
}

/// A CUDA library version as `major.minor[.patch]` from its integer form
/// (`13000` → `13.0`, cuDNN `91900` → `9.19.0`).
fn version(v: i64, cudnn: bool) -> Option<String> {
    (v > 0).then(|| {
        if cudnn {
            format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
        } else {
            format!("{}.{}", v / 1000, (v % 1000) / 10)
        }
    })
}

/// The compute facts of this process's libtorch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// libtorch's version (as built against).
    pub libtorch: String,
    /// CUDA GPUs visible (0 without CUDA).
    pub gpus: usize,
    /// The CUDA runtime libtorch was built for, e.g. `13.0`.
    pub cuda_runtime: Option<String>,
    /// The cuDNN libtorch was built with and the one loaded now.
    pub cudnn: Option<(String, Option<String>)>,
    /// Enabled attention (SDPA) backends, in torch's order of preference.
    pub sdpa: Vec<&'static str>,
}

impl DeviceInfo {
    /// Reads the facts from libtorch (no device work).
    pub fn query() -> Self {
        let mut v = [-1i64; 4];
        // SAFETY: the shim writes exactly four integers.
        unsafe { lorakit_cuda_versions(v.as_mut_ptr()) };
        // SAFETY: reads global flags only.
        let bits = unsafe { lorakit_sdpa_backends() };
        let names = [
            (8, "cudnn"),
            (1, "flash"),
            (2, "memory-efficient"),
            (4, "math"),
        ];
        Self {
            libtorch: tch_version(),
            gpus: v[3].max(0) as usize,
            cuda_runtime: version(v[0], false),
            cudnn: version(v[1], true).map(|b| (b, version(v[2], true))),
            sdpa: names
                .iter()
                .filter(|(b, _)| bits & b != 0)
                .map(|(_, n)| *n)
                .collect(),
        }
    }

    /// One line for logs and `--version`: device, dtype, attention backends,
    /// CUDA and cuDNN versions.
    pub fn describe(&self, device: Device, kind: Kind) -> String {
        let dev = match device {
            Device::Cuda(n) => format!("cuda:{n} (of {} GPU(s))", self.gpus),
            Device::Cpu => "cpu".to_string(),
            d => format!("{d:?}"),
        };
        let attention = if device.is_cuda() {
            format!("SDPA ({})", self.sdpa.join(" / "))
        } else {
            "SDPA (CPU kernels)".to_string()
        };
        format!(
            "device {dev}, dtype {}, attention {attention}, {}",
            lora_core::io::kind_job_name(kind)
                .map(str::to_string)
                .unwrap_or_else(|| format!("{kind:?}")),
            self.versions()
        )
    }

    /// What `lorakit --version` says after the version number: libtorch,
    /// CUDA and cuDNN versions, whether CUDA is usable here and the
    /// attention backends.
    pub fn summary(&self) -> String {
        let gpus = if self.gpus > 0 {
            format!("CUDA available, {} GPU(s)", self.gpus)
        } else {
            "CUDA not available: CPU only".to_string()
        };
        format!(
            "{}; {gpus}; attention SDPA: {}",
            self.versions(),
            self.sdpa.join(" / ")
        )
    }

    /// `libtorch 2.11.0, CUDA 13.0, cuDNN 9.19.0` (what is present).
    pub fn versions(&self) -> String {
        let mut s = format!("libtorch {}", self.libtorch);
        match &self.cuda_runtime {
            Some(c) => s.push_str(&format!(", CUDA {c}")),
            None => s.push_str(", no CUDA build"),
        }
        if let Some((built, loaded)) = &self.cudnn {
            s.push_str(&format!(", cuDNN {built}"));
            if let Some(l) = loaded.as_ref().filter(|l| *l != built) {
                s.push_str(&format!(" (loaded {l})"));
            }
        }
        s
    }
}

fn tch_version() -> String {
    env!("LORAKIT_LIBTORCH_VERSION").to_string()
}

/// A host tensor on `device`: on CUDA through pinned memory and a
/// non-blocking copy, so the host does not wait for the GPU to reach it (a
/// copy from pageable memory synchronises the stream first).
pub fn upload(t: Tensor, device: Device) -> Tensor {
    if device.is_cuda() {
        t.pin_memory(device)
            .to_device_(device, t.kind(), true, false)
    } else {
        t.to_device(device)
    }
}

/// The CUDA caching allocator's figures for one GPU, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Allocated by tensors now (`torch.cuda.memory_allocated`).
    pub allocated: i64,
    /// The most allocated since the start or the last [`reset_peak`]
    /// (`torch.cuda.max_memory_allocated`).
    pub peak_allocated: i64,
    /// Held by the allocator now (`torch.cuda.memory_reserved`).
    pub reserved: i64,
    /// The most held (`torch.cuda.max_memory_reserved`).
    pub peak_reserved: i64,
}

/// The memory figures of a CUDA device (`None` on the CPU or when CUDA
/// is not initialised).
pub fn memory(device: Device) -> Option<MemoryStats> {
    let Device::Cuda(n) = device else { return None };
    let mut v = [0i64; 4];
    // SAFETY: the shim writes four integers or returns an error.
    let err = shim_error(unsafe { lorakit_cuda_memory(n as i64, v.as_mut_ptr()) });
    if let Some(e) = err {
        tracing::debug!("CUDA memory statistics unavailable: {e}");
        return None;
    }
    Some(MemoryStats {
        allocated: v[0],
        peak_allocated: v[1],
        reserved: v[2],
        peak_reserved: v[3],
    })
}

/// Starts a CUDA device's peak figures again from its current use (no-op
/// on the CPU).
pub fn reset_peak(device: Device) {
    if let Device::Cuda(n) = device {
        // SAFETY: plain call; an error is only logged.
        if let Some(e) = shim_error(unsafe { lorakit_cuda_reset_peak(n as i64) }) {
            tracing::debug!("cannot reset CUDA peak memory: {e}");
        }
    }
}

/// torch's CUDA sync-debug mode, for diagnostics: every operation that
/// makes the host wait for the GPU then warns (`Warn`, a line on stderr
/// that says "called a synchronizing CUDA operation") or fails (`Error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDebug {
    /// No checks (the default).
    Off = 0,
    /// A warning per synchronising call.
    Warn = 1,
    /// An error per synchronising call.
    Error = 2,
}

/// The mode last set through [`set_sync_debug`].
static SYNC_DEBUG: AtomicI32 = AtomicI32::new(0);

/// Sets the sync-debug mode; `false` when libtorch's CUDA library is not
/// loaded (then there is nothing to check).
pub fn set_sync_debug(mode: SyncDebug) -> bool {
    SYNC_DEBUG.store(mode as i32, Ordering::SeqCst);
    // SAFETY: writes one enum in libc10_cuda's global state, as
    // torch.cuda.set_sync_debug_mode does.
    unsafe { lorakit_sync_debug(mode as c_int) == 1 }
}

/// Runs `f` with the sync-debug mode off, then restores it: for work that
/// reads back to the host by design (validation, saving files).
pub fn unwatched<T>(f: impl FnOnce() -> T) -> T {
    let mode = SYNC_DEBUG.load(Ordering::SeqCst);
    if mode == 0 {
        return f();
    }
    // SAFETY: as in set_sync_debug.
    unsafe { lorakit_sync_debug(0) };
    let out = f();
    unsafe { lorakit_sync_debug(mode) };
    out
}

/// `LORAKIT_SYNC_DEBUG=warn|error` in the environment, for the trainer to
/// switch on once its first step ran (loading and the first step's caches
/// copy to the device by design).
pub fn sync_debug_from_env() -> Option<SyncDebug> {
    match std::env::var("LORAKIT_SYNC_DEBUG").ok()?.as_str() {
        "warn" => Some(SyncDebug::Warn),
        "error" => Some(SyncDebug::Error),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_people_write_them() {
        assert_eq!(version(13000, false).as_deref(), Some("13.0"));
        assert_eq!(version(12080, false).as_deref(), Some("12.8"));
        assert_eq!(version(91900, true).as_deref(), Some("9.19.0"));
        assert_eq!(version(-1, true), None);
    }

    #[test]
    fn the_cpu_has_no_allocator_figures_and_a_plain_description() {
        assert_eq!(memory(Device::Cpu), None);
        reset_peak(Device::Cpu);
        let info = DeviceInfo::query();
        let d = info.describe(Device::Cpu, Kind::BFloat16);
        assert!(
            d.starts_with("device cpu, dtype bf16, attention SDPA (CPU kernels), libtorch "),
            "{d}"
        );
        // the math backend is always on unless someone turned it off
        assert!(info.sdpa.contains(&"math"), "{:?}", info.sdpa);
    }
}
