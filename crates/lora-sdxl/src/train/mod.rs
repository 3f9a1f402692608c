//! **The training room**: `lorakit train job.toml`.
//!
//! | concept | file |
//! |---|---|
//! | the job file: schema, defaults, validation, template | [`job`] |
//! | every named choice of a job parsed once into enums ([`plan::Plan`]) | [`plan`] |
//! | setup: validate, load, attach the LoRA, resume ([`Run::prepare`]) | [`run`] |
//! | the loop ([`Run::fit`]) | `loop.rs` |
//! | one step's objective: noise, target, loss; validation loss | `step.rs` |
//! | what a step reads (`Env`) and its inputs: latent cache, prefetch, text conditioning | `inputs.rs` |
//! | datasets, epochs, the validation set | [`data`] |
//! | the LoRA under training | `network.rs` |
//! | block-wise ranks and learning rates | [`blocks`] |
//! | AdamW / 8-bit AdamW, Lion, Prodigy, Adafactor, gradient clipping | [`optim`] |
//! | a run's update: optimizer groups, LR schedule, clipping, EMA (and the weights validation sees) | `updates.rs` |
//! | output preservation (DOP, blank prompt): settings, preserved captions, metadata | [`preservation`] |
//! | noise offset, multires noise, input perturbation | [`noise`] |
//! | noise targets, min-SNR, losses, LR schedules | [`schedule`] |
//! | timestep distributions (uniform, sigmoid, logit-normal, shift) | [`timesteps`] |
//! | the EMA of the LoRA weights | [`ema`] |
//! | LoRA files and their kohya metadata | [`checkpoint`] |
//! | `state.safetensors` (resume) | `state.rs` |
//! | the event stream and the observer trait | [`events`] |
//! | progress, `loss.csv`, `loss.png`, rotation, samples | [`observers`] |

pub mod blocks;
pub mod checkpoint;
mod choice;
pub mod data;
pub mod ema;
pub mod events;
mod inputs;
pub mod job;
mod r#loop;
mod network;
pub mod noise;
pub mod observers;
pub mod optim;
pub mod plan;
pub mod preservation;
pub mod run;
pub mod schedule;
mod shard;
mod state;
mod step;
pub mod timesteps;
mod updates;

pub use data::DatasetSummary;
pub use events::{Event, ObserveFn, Observer, Observers, RunView};
pub use inputs::{DecodeStats, PREFETCH_DEPTH};
pub use observers::loss_chart::write_loss_chart;
pub use run::{train, train_with, Run, TrainOptions, TrainReport};
pub use state::foreign_state;
