//! `state.safetensors`: what `--resume` needs to continue bit-identically —
//! the fp32 LoRA, both optimizers' moments and step counts, the position in
//! the data (step, epoch, batch) and a hash of the settings the state depends
//! on. Written atomically (temp file, fsync, rename).

use super::ema::Ema;
use super::job::JobConfig;
use super::network::Network;
use super::optim::Optimizer;
use super::plan::{NetworkKind, Plan};
use crate::error::Result;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Tensor};

/// Where a run is in its data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Position {
    /// Optimizer steps done.
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    /// Batches of the current epoch consumed.
    pub batch: usize,
    /// Items per batch over all ranks (`batch_size × world`), which the
    /// epoch plan depends on; 0 in states written before it was recorded.
    pub global_batch: u64,
}

/// Hash of the settings a saved state depends on (ranks, alphas, targets, base model).
pub(crate) fn shape_hash(job: &JobConfig, plan: &Plan) -> String {
    let model_size = std::fs::metadata(&job.model.name_or_path)
        .map(|m| m.len())
        .unwrap_or(0);
    let network = &job.network;
    let mut s = format!(
        "v1 linear={} alpha={} conv={} conv_alpha={} unet={} te={} model={} size={}",
        network.linear,
        network.linear_alpha,
        network.conv,
        network.conv_alpha,
        job.train.train_unet,
        job.train.train_text_encoder,
        job.model
            .name_or_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        model_size
    );
    if job.train.loraplus_lr_ratio.is_some() {
        s.push_str(" loraplus"); // its optimizer groups differ
    }
    if plan.network != NetworkKind::Lora || plan.dora {
        let (factor, both) = plan.lokr;
        let kind = plan.network.name();
        s.push_str(&format!(" type={kind} factor={factor} both={both}"));
        // DoRA adds a magnitude per module (issue 28: LoHa/LoKr/LoCon with
        // and without it hashed alike, and a resume with DoRA switched
        // panicked in the optimizer). A plain LoRA's DoRA is already told
        // apart by the line above, so its states keep their hash.
        if plan.dora && plan.network != NetworkKind::Lora {
            s.push_str(" dora");
        }
    }
    // block-wise ranks change the modules, block rates the groups
    for (k, v) in crate::train::blocks::BlockPlan::network_args(network, &job.train) {
        s.push_str(&format!(" {k}={v}"));
    }
    lora_core::io::hex(&<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()))[..16].to_string()
}

/// The metadata key of the `job.id` that wrote a state.
const JOB_ID: &str = "lorakit.job_id";

/// Why a job with `job_id` may not resume the state at `path` (`None`: it
/// may): a state records the `job.id` of the job that wrote it, and a job
/// with an id resumes only its own. A job without one is not checked (job
/// files from before ids).
fn refusal(path: &Path, state_id: Option<&str>, job_id: Option<&str>) -> Option<String> {
    let id = job_id?;
    if state_id == Some(id) {
        return None;
    }
    let writer = match state_id {
        Some(other) => format!("another job (job.id = {other:?})"),
        None => "a job without a job.id".into(),
    };
    Some(format!(
        "{} was written by {writer}, not by this one (job.id = {id:?}): resuming it would continue that run's weights and step count. Start a new run under another job.name or output_dir, or delete that run's folder; to resume it on purpose, set job.id to the writer's",
        path.display()
    ))
}

/// Why a job with `job_id` may not resume the state at `path`, from its
/// header alone (what `lorakit ui` asks before it queues a resume).
///
/// ```no_run
/// let why = lora_sdxl::train::foreign_state("output/x/state.safetensors".as_ref(), Some("5e1f0c2a9b7d4e63"))?;
/// assert!(why.is_none(), "{why:?}");
/// # Ok::<(), lora_sdxl::SdxlError>(())
/// ```
pub fn foreign_state(path: &Path, job_id: Option<&str>) -> Result<Option<String>> {
    if job_id.is_none() {
        return Ok(None);
    }
    let file = std::fs::File::open(path)
        .map_err(|e| crate::SdxlError::train(format!("{}: {e}", path.display())))?;
    // SAFETY: read-only map of a state file, read while this process holds it
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| crate::SdxlError::train(format!("{}: {e}", path.display())))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        crate::SdxlError::train(format!("{}: not a state file: {e}", path.display()))
    })?;
    let md = meta.metadata().as_ref();
    let state_id = md.and_then(|m| m.get(JOB_ID)).map(String::as_str);
    Ok(refusal(path, state_id, job_id))
}

/// Writes the state atomically.
pub(crate) fn save_state(
    path: &Path,
    network: &Network,
    opt: &dyn Optimizer,
    ema: Option<&Ema>,
    hash: &str,
    job_id: Option<&str>,
    pos: Position,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for l in &network.leaves {
        for (suffix, t) in &l.params {
            tensors.push((l.state_name(suffix), t.detach().to_device(Device::Cpu)));
        }
    }
    let mut md = BTreeMap::from([
        ("lorakit.job_hash".to_string(), hash.to_string()),
        ("lorakit.step".to_string(), pos.step.to_string()),
        ("lorakit.epoch".to_string(), pos.epoch.to_string()),
        ("lorakit.batch".to_string(), pos.batch.to_string()),
        (
            "lorakit.global_batch".to_string(),
            pos.global_batch.to_string(),
        ),
    ]);
    if let Some(id) = job_id {
        md.insert(JOB_ID.into(), id.to_string());
    }
    tensors.extend(opt.state_tensors());
    if let Some(e) = ema {
        let cpu = e.weights().iter().map(|t| t.to_device(Device::Cpu));
        tensors.extend(cpu.enumerate().map(|(i, t)| (format!("ema.{i}"), t)));
        md.insert("lorakit.ema.steps".into(), e.steps().to_string());
    }
    md.insert("lorakit.optimizer".into(), opt.family().into());
    md.insert(
        "lorakit.optimizer.steps".into(),
        opt.steps_taken().to_string(),
    );
    let bytes = lora_core::io::serialize(&tensors, &md)?;
    lora_core::io::write_atomic(path, &bytes)?;
    Ok(())
}

/// Restores the LoRA and both optimizers from `path` and returns the saved
/// position; refuses a state saved for other network or model settings.
pub(crate) fn restore_state(
    path: &Path,
    hash: &str,
    job_id: Option<&str>,
    network: &Network,
    opt: &mut dyn Optimizer,
    ema: Option<&mut Ema>,
    device: Device,
) -> Result<Position> {
    let st = lora_core::io::read_tensors(path)
        .map_err(|e| crate::SdxlError::train(format!("--resume: {e}")))?;
    let md = &st.metadata;
    if let Some(why) = refusal(path, md.get(JOB_ID).map(String::as_str), job_id) {
        return Err(crate::SdxlError::train(format!("--resume: {why}")));
    }
    if md.get("lorakit.job_hash").map(String::as_str) != Some(hash) {
        return Err(crate::SdxlError::train(format!(
            "--resume: {} was saved for other network/model settings (rank, alpha, conv, trained parts, LoRA+ on or off, or base model changed); start a new run (another job.name) or restore those settings",
            path.display()
        )));
    }
    let num = |k: &str| {
        md.get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| crate::SdxlError::train(format!("--resume: state lacks {k}")))
    };
    let pos = Position {
        step: num("lorakit.step")?,
        epoch: num("lorakit.epoch")?,
        batch: num("lorakit.batch")? as usize,
        global_batch: num("lorakit.global_batch").unwrap_or(0),
    };
    let map: BTreeMap<String, Tensor> = st.tensors.into_iter().collect();
    let get = |k: String| {
        map.get(&k)
            .map(|t| t.to_device(device))
            .ok_or_else(|| crate::SdxlError::train(format!("--resume: state lacks `{k}`")))
    };
    tch::no_grad(|| -> Result<()> {
        for l in &network.leaves {
            for (suffix, t) in &l.params {
                let name = l.state_name(suffix);
                let saved = get(name.clone())?;
                if saved.size() != t.size() {
                    return Err(crate::SdxlError::train(format!(
                        "--resume: `{name}` is {:?} in the state but {:?} in this network; the network settings changed: restore them or start a new run (another job.name)",
                        saved.size(),
                        t.size()
                    )));
                }
                t.shallow_clone().copy_(&saved);
            }
        }
        Ok(())
    })?;
    let family = md.get("lorakit.optimizer").map_or("adam", String::as_str);
    if family != opt.family() {
        return Err(crate::SdxlError::train(format!(
            "--resume: {} holds a {family} state but train.optimizer is now {}; restore train.optimizer or start a new run (another job.name)",
            path.display(),
            opt.family()
        )));
    }
    // States written before the optimizer choice kept AdamW's count per group.
    let steps = num("lorakit.optimizer.steps").or_else(|_| num("lorakit.adam.unet.steps"))?;
    let lookup = |k: &str| map.get(k).map(|t| t.shallow_clone());
    opt.load_state(&lookup, steps)
        .map_err(|k| crate::SdxlError::train(format!("--resume: state lacks `{k}`")))?;
    if let Some(e) = ema {
        match md.get("lorakit.ema.steps").and_then(|v| v.parse::<u64>().ok()) {
            Some(n) => {
                let shadow = (0..e.weights().len())
                    .map(|i| get(format!("ema.{i}")))
                    .collect::<Result<Vec<_>>>()?;
                e.restore(shadow, n);
            }
            None => tracing::warn!(
                "--resume: the state has no EMA (train.ema_decay was off): the average starts at the resumed weights"
            ),
        }
    }
    Ok(pos)
}

/// An exclusive lock on a run folder (`<run>/.lock`, an OS file lock), held
/// for the whole run: a second `lorakit train` on the same folder is refused
/// instead of both writing. The OS releases it when the process ends, even
/// when killed, so a crash never leaves a stale lock.
#[derive(Debug)]
pub(crate) struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock of `run_dir` or says who has it.
    pub fn take(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| crate::SdxlError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(crate::SdxlError::train(format!(
                "another training run is using {} (it holds {}); wait for it to finish or stop it, or give this job another job.name",
                run_dir.display(),
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(crate::SdxlError::io(&path, e)),
        }
    }
}

/// Removes temp files of atomic writes that a killed run left behind
/// (`.<name>.<pid>.<nanos>.tmp`; never a file under a final name).
pub(crate) fn remove_stale_temp_files(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod owner_tests {
    use super::*;

    #[test]
    fn a_job_resumes_only_a_state_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, id: Option<&str>| {
            let path = dir.path().join(name);
            let mut md = BTreeMap::new();
            if let Some(id) = id {
                md.insert(JOB_ID.to_string(), id.to_string());
            }
            let t = vec![(
                "x".to_string(),
                Tensor::zeros([2], (tch::Kind::Float, Device::Cpu)),
            )];
            lora_core::io::write_atomic(&path, &lora_core::io::serialize(&t, &md).unwrap())
                .unwrap();
            path
        };
        let ours = write("ours.safetensors", Some("aaaa"));
        let theirs = write("theirs.safetensors", Some("bbbb"));
        let old = write("old.safetensors", None);
        assert_eq!(foreign_state(&ours, Some("aaaa")).unwrap(), None);
        // issue 26: a new job in an old job's folder continued its run
        let why = foreign_state(&theirs, Some("aaaa")).unwrap().unwrap();
        assert!(why.contains("another job (job.id = \"bbbb\")"), "{why}");
        assert!(foreign_state(&old, Some("aaaa"))
            .unwrap()
            .unwrap()
            .contains("without a job.id"));
        // a job file from before ids is not checked
        assert_eq!(foreign_state(&theirs, None).unwrap(), None);
    }
}

#[cfg(test)]
mod hash_tests {
    use super::*;

    #[test]
    fn the_shape_hash_tells_dora_apart_for_every_network_type() {
        let hash = |kind: &str, dora: bool| {
            let mut job = JobConfig::default();
            job.network.r#type = kind.into();
            job.network.dora = dora;
            job.network.conv = 4;
            let plan = Plan::resolve(&job, "j.toml".as_ref()).unwrap();
            shape_hash(&job, &plan)
        };
        for kind in ["lora", "locon", "loha", "lokr"] {
            assert_ne!(hash(kind, false), hash(kind, true), "{kind}");
        }
        // states written before this check resume as before: these three
        // hash as they did before it (values from the code before it)
        let before = [hash("lora", false), hash("lora", true), hash("loha", false)];
        assert_eq!(
            before,
            ["51a19cd804f9def4", "371474ca5aa7bff7", "8a633b521c1b5b0d"]
        );
        let mut all: Vec<String> = ["lora", "locon", "loha", "lokr"]
            .iter()
            .flat_map(|k| [hash(k, false), hash(k, true)])
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 8, "every type × DoRA hashes apart");
    }
}
