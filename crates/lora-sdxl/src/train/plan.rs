//! The typed plan of a run: every named choice of a job file parsed once,
//! here, into an enum or a typed value. [`JobConfig`] stays the mirror of
//! the file (TOML round trips, the UI's edits, the kohya metadata that
//! echoes it); [`JobConfig::validate`] checks ranges and combinations;
//! [`Plan::resolve`] turns names into types, and no code after it parses a
//! name or falls back to a default (ripgrep's `LowArgs` → `HiArgs`).
//!
//! | choice | key | type |
//! |---|---|---|
//! | network type (+ DoRA, LoKr's shape) | `network.type`, `dora`, `factor`, `decompose_both` | [`NetworkKind`] |
//! | optimizer, its arguments and weight decay (default: the optimizer's) | `train.optimizer`, `optimizer_args`, `weight_decay` | [`OptimizerArgs`] |
//! | learning-rate schedule (warm-up applied) | `train.lr_scheduler`, `warmup_steps` | [`LrSchedule`] |
//! | loss | `train.loss` | [`Loss`] |
//! | timestep distribution | `train.timestep_sampling` | [`TimestepSampling`] |
//! | prediction type (or the checkpoint's) | `model.prediction` | [`Prediction`] |
//! | base model and saved LoRA dtypes | `train.dtype`, `save.dtype` | [`TrainDtype`], [`SaveDtype`] |
//! | in-training sampler | `sample.sampler` | [`SamplerSpec`] |
//! | memory preset | `train.vram` | [`VramPreset`] |
//! | validation images, seed and cadence | `[validation]` (defaults from the job) | [`ValidationPlan`] |
//! | output preservation | `train.diff_output_preservation*`, `blank_prompt_preservation*` | [`Preservation`] |
//!
//! The decisions that depend on the machine are a second, small step,
//! [`Plan::place`] → [`Placement`]: the device (`job.device`, and one GPU
//! per local rank of a data-parallel run) and gradient checkpointing's
//! `auto`. They are apart because a job is validated where no device is
//! asked about (the UI's form, `lorakit train` before it starts its ranks),
//! and they take the machine's facts as arguments, so they are tested
//! without a GPU.

use super::choice::choices;
use super::job::vram::{self, VramPreset};
use super::job::{JobConfig, JobError};
use super::optim::OptimizerArgs;
pub use super::preservation::Preservation;
use super::schedule::LrSchedule;
use super::timesteps::TimestepSampling;
use crate::sample::SamplerSpec;
use lora_core::Prediction;
use std::path::Path;

choices! {
    /// `network.type`: the adapter every targeted module gets.
    pub enum NetworkKind {
        /// kohya's LoRA (a LoCon when `network.conv` > 0).
        Lora = "lora",
        /// kohya's LoCon: LoRA on 3x3 convs too (needs `network.conv` > 0).
        Locon = "locon",
        /// LyCORIS' LoHa: a Hadamard product of two low-rank pairs.
        Loha = "loha",
        /// LyCORIS' LoKr: a Kronecker product (`network.factor`, `decompose_both`).
        Lokr = "lokr",
    }
}

impl NetworkKind {
    /// LoHa and LoKr: saved under LyCORIS' keys.
    pub fn is_lycoris(self) -> bool {
        matches!(self, Self::Loha | Self::Lokr)
    }
}

choices! {
    /// `train.loss`.
    pub enum Loss {
        /// Squared error.
        L2 = "l2",
        /// Huber loss, its threshold scheduled by timestep (kohya's `huber`).
        Huber = "huber",
    }
}

choices! {
    /// `train.dtype`: the frozen base model's dtype (fp16 is refused: no
    /// loss scaling yet).
    pub enum TrainDtype {
        /// bfloat16.
        Bf16 = "bf16",
        /// float32.
        Fp32 = "fp32",
    }
}

choices! {
    /// `save.dtype`: the saved LoRA's dtype.
    pub enum SaveDtype {
        /// float16 (kohya's default).
        Fp16 = "fp16",
        /// bfloat16.
        Bf16 = "bf16",
        /// float32.
        Fp32 = "fp32",
    }
}

impl TrainDtype {
    /// Its torch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::Bf16 => tch::Kind::BFloat16,
            Self::Fp32 => tch::Kind::Float,
        }
    }
}

impl SaveDtype {
    /// Its torch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::Fp16 => tch::Kind::Half,
            Self::Bf16 => tch::Kind::BFloat16,
            Self::Fp32 => tch::Kind::Float,
        }
    }
}

/// The validation loss's settings, defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationPlan {
    /// Images in the fixed validation set (`validation.images`, default 4).
    pub images: usize,
    /// Seed of its noise and timesteps (`validation.seed`, default derived
    /// from `job.seed`).
    pub seed: u64,
    /// Steps between measurements (`validation.every`, default `save.save_every`).
    pub every: u64,
}

/// Every named choice of a job, typed. Built by [`Plan::resolve`].
#[derive(Debug, Clone)]
pub struct Plan {
    /// The adapter type.
    pub network: NetworkKind,
    /// LoKr's `(factor, decompose_both)` (unused by the other types).
    pub lokr: (i64, bool),
    /// DoRA on top of the adapter.
    pub dora: bool,
    /// The optimizer with its arguments.
    pub optimizer: OptimizerArgs,
    /// `train.weight_decay`, else the optimizer's own default.
    pub weight_decay: f64,
    /// The schedule that runs (`constant` with a warm-up runs as
    /// `constant_with_warmup`; `schedule_note` says so).
    pub schedule: LrSchedule,
    /// Why the schedule differs from the one named, for the log.
    pub schedule_note: Option<String>,
    /// The loss.
    pub loss: Loss,
    /// The timestep distribution.
    pub timesteps: TimestepSampling,
    /// The job's prediction type; `None`: the checkpoint's.
    pub prediction: Option<Prediction>,
    /// The base model's dtype in training.
    pub train_dtype: TrainDtype,
    /// The saved LoRA's dtype.
    pub save_dtype: SaveDtype,
    /// The in-training samples' sampler.
    pub sampler: SamplerSpec,
    /// The fixed-seed validation loss: how many images, its seed, how often.
    pub validation: ValidationPlan,
    /// The memory preset the job named (already applied to the job's
    /// values when it was loaded; kept for its note).
    pub vram: Option<&'static VramPreset>,
    /// The output preservation added to the loss.
    pub preservation: Preservation,
}

impl Plan {
    /// Parses every named choice of `job` (read from `file`, for errors).
    /// A name outside its list is an error naming the field; a validated
    /// job always resolves.
    ///
    /// ```
    /// use lora_sdxl::train::plan::{Loss, NetworkKind, Plan};
    /// let text = lora_sdxl::JobConfig::template(None, None, None, None)
    ///     .replace("type = \"lora\"", "type = \"lokr\"")
    ///     .replace("loss = \"l2\"", "loss = \"huber\"");
    /// let job = lora_sdxl::JobConfig::parse("job.toml".as_ref(), &text).unwrap();
    /// let plan = Plan::resolve(&job, "job.toml".as_ref()).unwrap();
    /// assert_eq!((plan.network, plan.loss), (NetworkKind::Lokr, Loss::Huber));
    /// ```
    pub fn resolve(job: &JobConfig, file: &Path) -> Result<Plan, JobError> {
        let err = |field: &str, message: String| JobError {
            file: file.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let named = |field: &str, value: &str, names: &[&str]| {
            err(
                field,
                format!("`{value}` is not one of: {}", names.join(", ")),
            )
        };
        let (n, t) = (&job.network, &job.train);
        let network = NetworkKind::parse(&n.r#type)
            .ok_or_else(|| named("network.type", &n.r#type, NetworkKind::NAMES))?;
        let weight_decay =
            (t.weight_decay).unwrap_or_else(|| super::optim::default_weight_decay(&t.optimizer));
        let optimizer = OptimizerArgs::parse(&t.optimizer, &t.optimizer_args, weight_decay)
            .map_err(|(key, m)| match key.is_empty() {
                true => err("train.optimizer", m),
                false => err(&format!("train.optimizer_args.{key}"), m),
            })?;
        let named_schedule = LrSchedule::parse(&t.lr_scheduler)
            .ok_or_else(|| named("train.lr_scheduler", &t.lr_scheduler, LrSchedule::NAMES))?;
        let (schedule, schedule_note) = named_schedule.for_job(t.warmup_steps);
        let loss = Loss::parse(&t.loss).ok_or_else(|| named("train.loss", &t.loss, Loss::NAMES))?;
        let timesteps = TimestepSampling::parse(&t.timestep_sampling).ok_or_else(|| {
            let names = TimestepSampling::NAMES;
            named("train.timestep_sampling", &t.timestep_sampling, names)
        })?;
        let prediction = match job.model.prediction.as_deref() {
            None => None,
            Some(p) => Some(
                Prediction::parse(p)
                    .ok_or_else(|| named("model.prediction", p, Prediction::NAMES))?,
            ),
        };
        let train_dtype = TrainDtype::parse(&t.dtype)
            .ok_or_else(|| named("train.dtype", &t.dtype, TrainDtype::NAMES))?;
        let save_dtype = SaveDtype::parse(&job.save.dtype)
            .ok_or_else(|| named("save.dtype", &job.save.dtype, SaveDtype::NAMES))?;
        let sampler =
            (job.sample.sampler.parse::<SamplerSpec>()).map_err(|e| err("sample.sampler", e))?;
        let vram = match t.vram.as_deref() {
            None => None,
            Some(v) => Some(vram::find(v).ok_or_else(|| named("train.vram", v, &vram::NAMES))?),
        };
        let val = &job.validation;
        let validation = ValidationPlan {
            images: val.images.unwrap_or(4).max(1),
            seed: val.seed.unwrap_or(job.job.seed ^ 0x7661_6c69_6461_7465),
            every: val.every.unwrap_or(job.save.save_every),
        };
        let preservation = Preservation::resolve(job, file)?;
        Ok(Plan {
            preservation,
            validation,
            network,
            lokr: (n.factor, n.decompose_both),
            dora: n.dora,
            optimizer,
            weight_decay,
            schedule,
            schedule_note,
            loss,
            timesteps,
            prediction,
            train_dtype,
            save_dtype,
            sampler,
            vram,
        })
    }
}

/// Where a run trains and what that decides. Built by [`Plan::place`].
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The device this process trains on.
    pub device: tch::Device,
    /// Gradient checkpointing (`train.gradient_checkpointing`, `auto`
    /// decided for the device).
    pub gradient_checkpointing: bool,
    /// What the run computes on (device, dtype, attention, versions), for
    /// the log's first line.
    pub device_note: String,
    /// Gradient checkpointing's setting and why, for the log.
    pub checkpointing_note: String,
}

impl Plan {
    /// Decides the device and what depends on it, on a machine described by
    /// `info` (only its GPU count is used for decisions), as local rank
    /// `local_rank` of a data-parallel run (`None`: a single process).
    /// Ranks take one GPU each, sharing them round-robin when there are
    /// more ranks than GPUs.
    ///
    /// ```
    /// use lora_sdxl::device::DeviceInfo;
    /// use lora_sdxl::train::plan::Plan;
    /// let job = lora_sdxl::JobConfig::default();
    /// let plan = Plan::resolve(&job, "job.toml".as_ref()).unwrap();
    /// let two_gpus = DeviceInfo { gpus: 2, ..DeviceInfo::query() };
    /// let placed = plan.place(&job, "job.toml".as_ref(), &two_gpus, Some(3)).unwrap();
    /// assert_eq!(placed.device, tch::Device::Cuda(1));
    /// assert!(placed.gradient_checkpointing, "auto is on for CUDA");
    /// ```
    pub fn place(
        &self,
        job: &JobConfig,
        file: &Path,
        info: &crate::device::DeviceInfo,
        local_rank: Option<usize>,
    ) -> Result<Placement, JobError> {
        let named = crate::model::sdxl::device_of(job.job.device.as_deref(), info.gpus);
        let device = match (named, local_rank) {
            (Ok(tch::Device::Cuda(_)), Some(rank)) => tch::Device::Cuda(rank % info.gpus.max(1)),
            (Ok(device), _) => device,
            (Err(message), _) => {
                return Err(JobError {
                    file: file.to_path_buf(),
                    field: "job.device".into(),
                    message,
                })
            }
        };
        let (gradient_checkpointing, why) = job.train.gradient_checkpointing.resolve(
            "train.gradient_checkpointing",
            device.is_cuda(),
            if device.is_cuda() {
                "on for CUDA (far less VRAM)"
            } else {
                "off on CPU (memory is not the limit there, and recomputing made steps 1.15-1.26x slower)"
            },
        );
        let on = if gradient_checkpointing { "on" } else { "off" };
        Ok(Placement {
            device,
            gradient_checkpointing,
            device_note: info.describe(device, self.train_dtype.kind()),
            checkpointing_note: format!("gradient checkpointing {on} ({why})"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed name parses to a variant whose name is that name: the
    /// lists `fields.rs` validates against and the parsing cannot disagree.
    #[test]
    fn every_listed_name_parses_and_round_trips() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(
            names: &[&str],
            parse: impl Fn(&str) -> Option<T>,
            name: impl Fn(T) -> &'static str,
        ) {
            for n in names {
                let v = parse(n).unwrap_or_else(|| panic!("{n} does not parse"));
                assert_eq!(name(v), *n);
            }
            assert_eq!(parse("no such name"), None);
        }
        check(NetworkKind::NAMES, NetworkKind::parse, NetworkKind::name);
        check(Loss::NAMES, Loss::parse, Loss::name);
        check(TrainDtype::NAMES, TrainDtype::parse, TrainDtype::name);
        check(SaveDtype::NAMES, SaveDtype::parse, SaveDtype::name);
        check(LrSchedule::NAMES, LrSchedule::parse, LrSchedule::name);
        check(
            TimestepSampling::NAMES,
            TimestepSampling::parse,
            TimestepSampling::name,
        );
        check(Prediction::NAMES, Prediction::parse, Prediction::name);
        for n in OptimizerArgs::NAMES {
            let args = OptimizerArgs::parse(n, &Default::default(), 0.0).unwrap();
            assert_eq!(args.name(), *n);
        }
        for n in crate::sample::SAMPLER_NAMES {
            let s: SamplerSpec = n.parse().unwrap();
            assert_eq!(s.to_string(), *n);
        }
        // the fields' lists are these lists
        for (path, names) in [
            ("network.type", NetworkKind::NAMES),
            ("train.loss", Loss::NAMES),
            ("train.dtype", TrainDtype::NAMES),
            ("save.dtype", SaveDtype::NAMES),
            ("train.lr_scheduler", LrSchedule::NAMES),
            ("train.timestep_sampling", TimestepSampling::NAMES),
            ("model.prediction", Prediction::NAMES),
            ("train.optimizer", OptimizerArgs::NAMES),
            ("train.vram", &vram::NAMES[..]),
        ] {
            let field = (super::super::job::fields::FIELDS.iter())
                .find(|f| f.path() == path)
                .unwrap();
            let listed = match field.rule {
                super::super::job::fields::Rule::OneOf(l) => l,
                _ => panic!("{path} has no list"),
            };
            assert_eq!(listed, names, "{path}");
        }
    }

    #[test]
    fn a_name_outside_its_list_is_an_error_naming_the_field() {
        let base = JobConfig::default();
        type Edit = fn(&mut JobConfig);
        let cases: [(&str, Edit); 4] = [
            ("network.type", |j| j.network.r#type = "lokra".into()),
            ("train.loss", |j| j.train.loss = "l1".into()),
            ("save.dtype", |j| j.save.dtype = "int8".into()),
            ("sample.sampler", |j| j.sample.sampler = "heun".into()),
        ];
        for (field, edit) in cases {
            let mut job = base.clone();
            edit(&mut job);
            let e = Plan::resolve(&job, "j.toml".as_ref()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let plan = Plan::resolve(&base, "j.toml".as_ref()).unwrap();
        assert_eq!(plan.network, NetworkKind::Lora);
        assert_eq!(plan.train_dtype.kind(), tch::Kind::BFloat16);
        assert_eq!(plan.save_dtype.kind(), tch::Kind::Half);
    }

    /// Issue 28: weight decay defaulted to 0.01 for every optimizer; the
    /// packages lion-pytorch, prodigyopt, transformers' Adafactor and
    /// bitsandbytes' Lion8bit default to 0, torch's AdamW to 0.01.
    #[test]
    fn weight_decay_defaults_to_the_optimizers_own() {
        let decay = |optimizer: &str, set: Option<f64>| {
            let mut job = JobConfig::default();
            job.train.optimizer = optimizer.into();
            job.train.weight_decay = set;
            Plan::resolve(&job, "j.toml".as_ref()).unwrap()
        };
        for (name, want) in [
            ("adamw", 0.01),
            ("adamw8bit", 0.01),
            ("lion", 0.0),
            ("lion8bit", 0.0),
            ("prodigy", 0.0),
            ("adafactor", 0.0),
        ] {
            let plan = decay(name, None);
            assert_eq!(plan.weight_decay, want, "{name}");
            // what the optimizer is built with, and what the file says
            let said = plan.optimizer.describe(plan.weight_decay);
            let want_said = format!("weight_decay={}", lora_core::metadata::py_float(want));
            assert!(said.contains(&want_said), "{name}: {said}");
            assert_eq!(
                decay(name, Some(0.05)).weight_decay,
                0.05,
                "{name}: the job's wins"
            );
        }
        match decay("prodigy", None).optimizer {
            OptimizerArgs::Prodigy(c) => assert_eq!(c.weight_decay, 0.0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_device_and_checkpointing_follow_the_machine_and_the_rank() {
        let job = JobConfig::default();
        let plan = Plan::resolve(&job, "j.toml".as_ref()).unwrap();
        let machine = |gpus| crate::device::DeviceInfo {
            gpus,
            ..crate::device::DeviceInfo::query()
        };
        let place = |job: &JobConfig, gpus, rank| {
            let placed = plan.place(job, "j.toml".as_ref(), &machine(gpus), rank);
            placed.map(|p| (p.device, p.gradient_checkpointing))
        };
        use tch::Device::{Cpu, Cuda};
        // no job.device: CUDA when there is one; auto checkpointing follows
        assert_eq!(place(&job, 0, None), Ok((Cpu, false)));
        assert_eq!(place(&job, 1, None), Ok((Cuda(0), true)));
        // ranks take a GPU each, round-robin; on CPU they share the CPU
        assert_eq!(place(&job, 2, Some(0)), Ok((Cuda(0), true)));
        assert_eq!(place(&job, 2, Some(1)), Ok((Cuda(1), true)));
        assert_eq!(place(&job, 2, Some(2)), Ok((Cuda(0), true)));
        assert_eq!(place(&job, 0, Some(1)), Ok((Cpu, false)));
        // the user's choices win over auto
        let mut cpu = job.clone();
        cpu.job.device = Some("cpu".into());
        cpu.train.gradient_checkpointing = crate::train::job::AutoBool::On;
        assert_eq!(place(&cpu, 2, Some(1)), Ok((Cpu, true)));
        // an impossible device is an error naming the field
        let mut far = job.clone();
        far.job.device = Some("cuda:3".into());
        let e = place(&far, 2, None).unwrap_err();
        assert_eq!(e.field, "job.device", "{e}");
        assert!(
            e.message
                .contains("cuda:3 does not exist (2 CUDA device(s))"),
            "{e}"
        );
        far.job.device = Some("cuda".into());
        assert!(place(&far, 0, None)
            .unwrap_err()
            .message
            .contains("not available"));
    }
}
