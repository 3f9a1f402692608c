//! Data-parallel training on libtorch's own `torch.distributed` (c10d,
//! through the shim's `csrc/dist.cpp`): a TCPStore rendezvous at torchrun's
//! `MASTER_ADDR:MASTER_PORT` and a Gloo process group, which reduces CPU
//! tensors and, with a CUDA build of libtorch, CUDA tensors through host
//! copies.
//!
//! A run of `WORLD_SIZE` processes trains one LoRA: rank 0's initial LoRA is
//! broadcast, each rank takes its slice of every global batch, the
//! gradients are averaged in flat buckets before each optimizer step, and
//! only rank 0 writes files (see `train::shard`). Every collective has a
//! timeout (`LORAKIT_DIST_TIMEOUT`, seconds, default 1800), so a rank that
//! dies makes the others fail with an error instead of hanging.
//!
//! ```no_run
//! use lora_sdxl::dist::{DistEnv, ProcessGroup};
//! // under `lorakit train job.toml --nproc 2`, or torchrun's variables
//! if let Some(env) = DistEnv::from_env()? {
//!     let pg = ProcessGroup::join(&env)?;
//!     let t = tch::Tensor::from_slice(&[pg.rank() as f32]);
//!     pg.all_reduce_sum(&t)?; // 0 + 1 + … on every rank
//!     pg.barrier()?;
//! }
//! # Ok::<(), lora_sdxl::SdxlError>(())
//! ```

use crate::device::shim_error;
use crate::error::{Result, SdxlError};
use std::ffi::{c_char, c_void, CString};
use std::time::Duration;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn lorakit_dist_new(
        host: *const c_char,
        port: i64,
        rank: i64,
        world: i64,
        timeout_ms: i64,
        client_only: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn lorakit_dist_free(g: *mut c_void);
    fn lorakit_dist_buckets_new(
        params: *mut *mut C_tensor,
        n: i64,
        bucket_bytes: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn lorakit_dist_buckets_free(b: *mut c_void);
    fn lorakit_dist_average_grads(g: *mut c_void, b: *mut c_void) -> *mut c_char;
    fn lorakit_dist_broadcast(
        g: *mut c_void,
        ts: *mut *mut C_tensor,
        n: i64,
        root: i64,
    ) -> *mut c_char;
    fn lorakit_dist_all_reduce(g: *mut c_void, t: *mut C_tensor, op: i64) -> *mut c_char;
    fn lorakit_dist_barrier(g: *mut c_void) -> *mut c_char;
}

/// The collectives' time limit unless `LORAKIT_DIST_TIMEOUT` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// A free TCP port on the loopback interface, for a rendezvous of ranks on
/// this machine.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where this process stands in a data-parallel run, from torchrun's
/// environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this process, 0 … world − 1 (rank 0 writes the files).
    pub rank: usize,
    /// `WORLD_SIZE`: processes in the run.
    pub world: usize,
    /// `LOCAL_RANK`: this process on its machine (its GPU index on CUDA).
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: processes on this machine.
    pub local_world: usize,
    /// `MASTER_ADDR`: the host of the rendezvous store.
    pub master_addr: String,
    /// `MASTER_PORT`: its port.
    pub master_port: u16,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`: torchrun's agent already serves
    /// the store, so rank 0 joins it as a client.
    pub agent_store: bool,
    /// Every collective's (and the rendezvous') time limit.
    pub timeout: Duration,
}

impl DistEnv {
    /// The run this process belongs to, or `None` outside one (`WORLD_SIZE`
    /// unset or 1).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable source.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let world = match get("WORLD_SIZE") {
            None => return Ok(None),
            Some(w) => parse("WORLD_SIZE", &w, 0, 1)?,
        };
        if world <= 1 {
            return Ok(None);
        }
        let num = |key: &str, default: Option<usize>| -> Result<usize> {
            match (get(key), default) {
                (Some(v), _) => parse(key, &v, 0, world),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(env_error(0, world, format!("{key} is not set"))),
            }
        };
        let rank = num("RANK", None)?;
        if rank >= world {
            return Err(env_error(
                rank,
                world,
                format!("RANK={rank} is not below WORLD_SIZE={world}"),
            ));
        }
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let local_world = num("LOCAL_WORLD_SIZE", Some(world))?;
        let port = get("MASTER_PORT").unwrap_or_else(|| "29500".into());
        let master_port = port.parse::<u16>().map_err(|_| {
            env_error(
                rank,
                world,
                format!("MASTER_PORT={port} is not a port number"),
            )
        })?;
        let timeout = match get("LORAKIT_DIST_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Duration::from_secs_f64(s),
                _ => {
                    return Err(env_error(
                        rank,
                        world,
                        format!("LORAKIT_DIST_TIMEOUT={v}: give seconds, e.g. 600"),
                    ))
                }
            },
        };
        Ok(Some(Self {
            rank,
            world,
            local_rank,
            local_world,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
            timeout,
        }))
    }
}

impl DistEnv {
    /// Rank `rank` of `world` ranks on this machine, meeting on the
    /// loopback interface at `port` (see [`free_port`]).
    pub fn local(rank: usize, world: usize, port: u16) -> Self {
        Self {
            rank,
            world,
            local_rank: rank,
            local_world: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            agent_store: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The environment that makes a child process this rank: torchrun's
    /// variables and, unless this process sets them, Gloo over loopback
    /// (`GLOO_SOCKET_IFNAME=lo`) and the cores split between the local
    /// ranks (`OMP_NUM_THREADS`). The child reads its own
    /// `LORAKIT_DIST_TIMEOUT`.
    pub fn child_vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ];
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
        for (key, value) in [
            ("GLOO_SOCKET_IFNAME", "lo".to_string()),
            (
                "OMP_NUM_THREADS",
                (cores / self.local_world).max(1).to_string(),
            ),
        ] {
            if std::env::var_os(key).is_none() {
                vars.push((key, value));
            }
        }
        vars
    }
}

fn parse(key: &str, v: &str, rank: usize, world: usize) -> Result<usize> {
    v.trim()
        .parse::<usize>()
        .map_err(|_| env_error(rank, world, format!("{key}={v} is not a whole number")))
}

fn env_error(rank: usize, world: usize, what: String) -> SdxlError {
    SdxlError::Dist {
        rank,
        world,
        reason: format!(
            "{what} (a data-parallel run reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `lorakit train --nproc N` sets them)"
        ),
    }
}

/// This process's membership of a data-parallel run (a c10d Gloo process
/// group). Dropping it leaves the group.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    world: usize,
    local_rank: usize,
    timeout: Duration,
}

// SAFETY: c10d backends are used from any thread (torch's DDP reduces from
// autograd threads); lorakit calls them from one thread at a time.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

/// The gradients' flat buckets of a run (allocated once, see
/// [`ProcessGroup::buckets`]).
#[derive(Debug)]
pub struct GradBuckets {
    raw: *mut c_void,
}

// SAFETY: plain tensors owned by the shim, used from one thread at a time.
unsafe impl Send for GradBuckets {}
unsafe impl Sync for GradBuckets {}

impl Drop for GradBuckets {
    fn drop(&mut self) {
        // SAFETY: created by lorakit_dist_buckets_new, freed once.
        unsafe { lorakit_dist_buckets_free(self.raw) }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by lorakit_dist_new, freed once.
        unsafe { lorakit_dist_free(self.raw) }
    }
}

fn ptrs(ts: &[Tensor]) -> Vec<*mut C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

impl ProcessGroup {
    /// Joins the run: waits (up to the timeout) until all `world` ranks have
    /// reached the store, then connects the Gloo group.
    pub fn join(env: &DistEnv) -> Result<Self> {
        let host = CString::new(env.master_addr.clone()).map_err(|_| SdxlError::Dist {
            rank: env.rank,
            world: env.world,
            reason: "MASTER_ADDR contains a NUL byte".into(),
        })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer for the call.
        let err = shim_error(unsafe {
            lorakit_dist_new(
                host.as_ptr(),
                i64::from(env.master_port),
                env.rank as i64,
                env.world as i64,
                env.timeout.as_millis() as i64,
                i64::from(env.agent_store),
                &mut raw,
            )
        });
        if let Some(e) = err {
            return Err(SdxlError::Dist {
                rank: env.rank,
                world: env.world,
                reason: format!(
                    "could not join the run at {}:{} within {} s: {e}. Start all {} ranks with the same MASTER_ADDR and MASTER_PORT, or free the port",
                    env.master_addr,
                    env.master_port,
                    env.timeout.as_secs(),
                    env.world
                ),
            });
        }
        Ok(Self {
            raw,
            rank: env.rank,
            world: env.world,
            local_rank: env.local_rank,
            timeout: env.timeout,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the run.
    pub fn world(&self) -> usize {
        self.world
    }

    /// This process's rank on its machine.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Rank 0, the one that writes files.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn failed(&self, what: &str, err: Option<String>) -> Result<()> {
        match err {
            None => Ok(()),
            Some(e) => Err(SdxlError::Dist {
                rank: self.rank,
                world: self.world,
                reason: format!(
                    "{what} failed: {e}. Another rank exited or cannot be reached (its own output says why); collectives give up after {} s (LORAKIT_DIST_TIMEOUT)",
                    self.timeout.as_secs()
                ),
            }),
        }
    }

    /// Gives every rank rank `root`'s values of `tensors` (one flat copy).
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let mut ps = ptrs(tensors);
        // SAFETY: live tensors for the call.
        let err = shim_error(unsafe {
            lorakit_dist_broadcast(self.raw, ps.as_mut_ptr(), ps.len() as i64, root as i64)
        });
        self.failed("the broadcast", err)
    }

    /// Sums `t` over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        // SAFETY: a live tensor for the call.
        let err = shim_error(unsafe {
            lorakit_dist_all_reduce(self.raw, t.as_ptr() as *mut C_tensor, 0)
        });
        self.failed("an all-reduce", err)
    }

    /// The largest `t` over the ranks, in place.
    pub fn all_reduce_max(&self, t: &Tensor) -> Result<()> {
        // SAFETY: a live tensor for the call.
        let err = shim_error(unsafe {
            lorakit_dist_all_reduce(self.raw, t.as_ptr() as *mut C_tensor, 1)
        });
        self.failed("an all-reduce", err)
    }

    /// Waits until every rank has arrived.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the live group.
        let err = shim_error(unsafe { lorakit_dist_barrier(self.raw) });
        self.failed("a barrier", err)
    }

    /// Flat buckets of at most `bucket_bytes` for the gradients of `params`
    /// (in their order), to reuse at every step.
    pub fn buckets(&self, params: &[Tensor], bucket_bytes: usize) -> Result<GradBuckets> {
        let mut ps = ptrs(params);
        let mut raw = std::ptr::null_mut();
        // SAFETY: live tensors and an out-pointer for the call.
        let err = shim_error(unsafe {
            lorakit_dist_buckets_new(
                ps.as_mut_ptr(),
                ps.len() as i64,
                bucket_bytes as i64,
                &mut raw,
            )
        });
        self.failed("allocating the gradient buckets", err)?;
        Ok(GradBuckets { raw })
    }

    /// Averages the gradients of the buckets' parameters over the ranks (a
    /// missing gradient counts as zeros); afterwards each gradient is a view
    /// into its bucket.
    pub fn average_gradients(&self, buckets: &GradBuckets) -> Result<()> {
        // SAFETY: the live group and buckets.
        let err = shim_error(unsafe { lorakit_dist_average_grads(self.raw, buckets.raw) });
        self.failed("the all-reduce of the gradients", err)
    }
}
