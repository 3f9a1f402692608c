//! Output preservation: AI Toolkit's differential output preservation
//! (`train.diff_output_preservation`, DOP) and blank prompt preservation
//! (`train.blank_prompt_preservation`, BPP). A LoRA should change the model
//! only where its trigger is named; these add a loss that holds the LoRA's
//! prediction for captions *without* the trigger to the base model's.
//!
//! Each micro-step (see `step.rs`), with the batch's captions `c` and their
//! preserved form `c'` — `c` with the trigger replaced, as a whole word, by
//! the class word (DOP), or the empty caption (BPP):
//!
//! 1. **prior**: the base model's prediction for `c'` — the same UNet with
//!    every adapter switched off by [`Slots::without_network`] (one flag
//!    read per layer; nothing detached or re-attached), without gradients,
//!    on the *same* noisy latents, timesteps and size conditioning as the
//!    normal pass;
//! 2. **one forward with the LoRA** over the concatenated batch: `2B` rows,
//!    the noisy latents twice, captions `c` then `c'`. The first `B` rows
//!    give the normal loss, the last `B` rows the preserved prediction;
//! 3. `loss = normal + multiplier × mse(preserved, prior)` (mean over every
//!    element, in fp32; no loss mask, no min-SNR weight — as AI Toolkit),
//!    and one backward.
//!
//! The rule for one or two passes: always one concatenated forward (one
//! backward, and the UNet's weights read once for both); its activations
//! are those of a `2 × batch_size` micro-batch, so a `train.vram` preset's
//! batch cap counts the doubled batch and refuses a job that would not fit
//! (lower `batch_size`, raise `gradient_accumulation`). Two UNet passes
//! with gradients would cost the same memory with one backward.
//!
//! Text: `c'` is encoded with `c` in one call; with
//! `train.cache_text_embeddings` the preserved captions are cached like any
//! caption (they are as static as the captions they come from).
//!
//! Refused (AI Toolkit refuses the same): DOP without a trigger word or a
//! class, DOP or BPP while training the text encoders (the prior would see
//! their LoRA, and the class word's embedding would move), and DOP with BPP.
//!
//! The files record the settings as `lorakit.diff_output_preservation`,
//! `…_class`, `…_multiplier` and `lorakit.blank_prompt_preservation`,
//! `…_multiplier` (kohya has no keys for them).
//!
//! [`Slots::without_network`]: crate::model::nn::Slots::without_network

use super::job::{JobConfig, JobError};
use lora_core::metadata::{py_bool, py_float};
use std::path::Path;

/// The output preservation a run adds to its loss, resolved once from the
/// job (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub enum Preservation {
    /// None: the plain loss.
    None,
    /// Differential output preservation: captions with `trigger` replaced
    /// by `class`.
    Dop {
        /// `job.trigger_word`, trimmed.
        trigger: String,
        /// `train.diff_output_preservation_class`, trimmed.
        class: String,
        /// `train.diff_output_preservation_multiplier`.
        multiplier: f64,
    },
    /// Blank prompt preservation: the empty caption.
    Blank {
        /// `train.blank_prompt_preservation_multiplier`.
        multiplier: f64,
    },
}

impl Preservation {
    /// The job's preservation, or an error naming the field when the
    /// settings cannot act (see the module documentation for the refusals).
    pub fn resolve(job: &JobConfig, file: &Path) -> Result<Self, JobError> {
        let err = |field: &str, message: &str| JobError {
            file: file.to_path_buf(),
            field: field.to_string(),
            message: message.to_string(),
        };
        let t = &job.train;
        let (dop, bpp) = (t.diff_output_preservation, t.blank_prompt_preservation);
        let trimmed = |s: &Option<String>| {
            (s.as_deref().map(str::trim))
                .filter(|s| !s.is_empty())
                .map(String::from)
        };
        if dop && bpp {
            return Err(err("train.blank_prompt_preservation", "cannot be used together with diff_output_preservation (AI Toolkit refuses the pair too): keep one of them"));
        }
        if !dop && t.diff_output_preservation_class.is_some() {
            return Err(err("train.diff_output_preservation_class", "has no effect while diff_output_preservation = false: set diff_output_preservation = true or remove it"));
        }
        if !dop && t.diff_output_preservation_multiplier != 1.0 {
            return Err(err("train.diff_output_preservation_multiplier", "has no effect while diff_output_preservation = false: set diff_output_preservation = true or remove it"));
        }
        if !bpp && t.blank_prompt_preservation_multiplier != 1.0 {
            return Err(err("train.blank_prompt_preservation_multiplier", "has no effect while blank_prompt_preservation = false: set blank_prompt_preservation = true or remove it"));
        }
        if (dop || bpp) && t.train_text_encoder {
            return Err(err("train.train_text_encoder", "cannot be on with output preservation: the base model's prior pass would see the text encoders' LoRA, and the class word's embedding would move with it (AI Toolkit refuses it too): set train_text_encoder = false, or turn the preservation off"));
        }
        if bpp {
            let multiplier = t.blank_prompt_preservation_multiplier;
            return Ok(Self::Blank { multiplier });
        }
        if !dop {
            return Ok(Self::None);
        }
        let Some(trigger) = trimmed(&job.job.trigger_word) else {
            return Err(err("job.trigger_word", "train.diff_output_preservation replaces the trigger word by the class word in every caption, so it needs one: set job.trigger_word, or use blank_prompt_preservation instead"));
        };
        let Some(class) = trimmed(&t.diff_output_preservation_class) else {
            return Err(err("train.diff_output_preservation_class", "diff_output_preservation needs the word the trigger becomes in the preserved captions: set it to what the character is, e.g. \"person\" or \"woman\""));
        };
        if class.eq_ignore_ascii_case(&trigger) {
            return Err(err("train.diff_output_preservation_class", "is the trigger word itself, so nothing would be preserved: set it to what the character is, e.g. \"person\""));
        }
        let multiplier = t.diff_output_preservation_multiplier;
        Ok(Self::Dop {
            trigger,
            class,
            multiplier,
        })
    }

    /// The preservation loss's weight (`None`: no preservation).
    pub fn multiplier(&self) -> Option<f64> {
        match self {
            Self::None => None,
            Self::Dop { multiplier, .. } | Self::Blank { multiplier } => Some(*multiplier),
        }
    }

    /// Rows of the UNet forward per batch item: 2 with preservation (the
    /// concatenated batch), else 1.
    pub fn rows_per_item(&self) -> usize {
        if *self == Self::None {
            1
        } else {
            2
        }
    }

    /// The preserved captions of a batch's processed captions (`None`: no
    /// preservation).
    pub fn captions(&self, captions: &[String]) -> Option<Vec<String>> {
        match self {
            Self::None => None,
            Self::Dop { trigger, class, .. } => Some(
                (captions.iter())
                    .map(|c| lora_data::caption::replace_word(c, trigger, class))
                    .collect(),
            ),
            Self::Blank { .. } => Some(vec![String::new(); captions.len()]),
        }
    }

    /// The LoRA file's metadata keys (both switches always; the class and
    /// multipliers of the one that is on).
    pub fn metadata(&self) -> Vec<(String, String)> {
        let dop = "lorakit.diff_output_preservation";
        let bpp = "lorakit.blank_prompt_preservation";
        let mut keys = vec![
            (dop.to_string(), py_bool(matches!(self, Self::Dop { .. }))),
            (bpp.to_string(), py_bool(matches!(self, Self::Blank { .. }))),
        ];
        match self {
            Self::None => {}
            Self::Dop {
                class, multiplier, ..
            } => {
                keys.push((format!("{dop}_class"), class.clone()));
                keys.push((format!("{dop}_multiplier"), py_float(*multiplier)));
            }
            Self::Blank { multiplier } => {
                keys.push((format!("{bpp}_multiplier"), py_float(*multiplier)));
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(edit: impl FnOnce(&mut JobConfig)) -> Result<Preservation, JobError> {
        let mut j = JobConfig::default();
        j.job.trigger_word = Some("myaku".into());
        edit(&mut j);
        Preservation::resolve(&j, "j.toml".as_ref())
    }

    #[test]
    fn refusals_name_the_field() {
        let dop = |j: &mut JobConfig| {
            j.train.diff_output_preservation = true;
            j.train.diff_output_preservation_class = Some("creature".into());
        };
        type Edit = fn(&mut JobConfig);
        let cases: [(&str, &str, Edit); 8] = [
            ("job.trigger_word", "needs one", |j| {
                j.train.diff_output_preservation = true;
                j.train.diff_output_preservation_class = Some("creature".into());
                j.job.trigger_word = Some("  ".into());
            }),
            (
                "train.diff_output_preservation_class",
                "e.g. \"person\"",
                |j| {
                    j.train.diff_output_preservation = true;
                },
            ),
            (
                "train.diff_output_preservation_class",
                "trigger word itself",
                |j| {
                    j.train.diff_output_preservation = true;
                    j.train.diff_output_preservation_class = Some("Myaku".into());
                },
            ),
            (
                "train.train_text_encoder",
                "set train_text_encoder = false",
                |j| {
                    j.train.diff_output_preservation = true;
                    j.train.diff_output_preservation_class = Some("creature".into());
                    j.train.train_text_encoder = true;
                },
            ),
            (
                "train.train_text_encoder",
                "set train_text_encoder = false",
                |j| {
                    j.train.blank_prompt_preservation = true;
                    j.train.train_text_encoder = true;
                },
            ),
            ("train.blank_prompt_preservation", "keep one", |j| {
                j.train.diff_output_preservation = true;
                j.train.diff_output_preservation_class = Some("creature".into());
                j.train.blank_prompt_preservation = true;
            }),
            ("train.diff_output_preservation_class", "no effect", |j| {
                j.train.diff_output_preservation_class = Some("creature".into());
            }),
            (
                "train.blank_prompt_preservation_multiplier",
                "no effect",
                |j| {
                    j.train.blank_prompt_preservation_multiplier = 2.0;
                },
            ),
        ];
        for (field, says, edit) in cases {
            let e = job(edit).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        assert_eq!(
            job(dop).unwrap(),
            Preservation::Dop {
                trigger: "myaku".into(),
                class: "creature".into(),
                multiplier: 1.0
            }
        );
        assert_eq!(job(|_| {}).unwrap(), Preservation::None);
    }

    #[test]
    fn preserved_captions_and_metadata() {
        let dop = Preservation::Dop {
            trigger: "myaku".into(),
            class: "creature".into(),
            multiplier: 0.5,
        };
        let caps = vec!["myaku, large, grass".to_string(), "myakus, sky".to_string()];
        assert_eq!(
            dop.captions(&caps).unwrap(),
            ["creature, large, grass", "myakus, sky"]
        );
        let blank = Preservation::Blank { multiplier: 2.0 };
        assert_eq!(blank.captions(&caps).unwrap(), ["", ""]);
        assert_eq!(Preservation::None.captions(&caps), None);
        assert_eq!(
            (dop.rows_per_item(), Preservation::None.rows_per_item()),
            (2, 1)
        );
        let md: std::collections::BTreeMap<_, _> = dop.metadata().into_iter().collect();
        assert_eq!(md["lorakit.diff_output_preservation"], "True");
        assert_eq!(md["lorakit.diff_output_preservation_class"], "creature");
        assert_eq!(md["lorakit.diff_output_preservation_multiplier"], "0.5");
        assert_eq!(md["lorakit.blank_prompt_preservation"], "False");
        let md: std::collections::BTreeMap<_, _> = blank.metadata().into_iter().collect();
        assert_eq!(md["lorakit.blank_prompt_preservation_multiplier"], "2.0");
    }

    /// The step's objective, computed by hand on the tiny model with a
    /// non-zero LoRA: `loss = plain + multiplier × mse(LoRA(c'), base(c'))`
    /// where the base is the model with the LoRA *detached* (not the switch
    /// the step uses) and `c'` the class captions (DOP) or `""` (BPP). Fails
    /// if the prior pass runs with the network on (the term is 0), if the
    /// term is not added, or if the captions are not the preserved ones.
    #[test]
    fn the_step_adds_the_distance_from_the_base_on_the_preserved_captions() {
        use crate::train::run::{Run, TrainOptions};
        use tch::Kind;
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        crate::synthetic::write_random_checkpoint(
            &model,
            &crate::SdxlConfig::tiny(),
            1,
            Kind::Float,
        )
        .unwrap();
        let data = dir.path().join("data");
        lora_data::synthetic::write_character_dataset(&data, 2, 256, 256, "trig", 1).unwrap();
        let path = dir.path().join("job.toml");
        let text = JobConfig::template(model.to_str(), data.to_str(), Some("trig"), None);
        let mut c = JobConfig::parse(&path, &text).unwrap();
        c.job.device = Some("cpu".into());
        c.job.output_dir = dir.path().join("out");
        (c.network.linear, c.network.linear_alpha, c.network.conv) = (4, 4.0, 0);
        (c.train.batch_size, c.train.gradient_accumulation) = (2, 1);
        (c.train.dtype, c.datasets[0].resolution) = ("fp32".into(), vec![128]);
        c.datasets[0].caption_dropout_rate = 0.0;
        let quiet = TrainOptions {
            quiet: true,
            ..Default::default()
        };
        let kinds = [
            Preservation::Dop {
                trigger: "trig".into(),
                class: "creature".into(),
                multiplier: 0.5,
            },
            Preservation::Blank { multiplier: 2.0 },
        ];
        for kind in kinds {
            let mut run = Run::prepare(&c, &path, &quiet).unwrap();
            tch::no_grad(|| {
                for leaf in &run.network.leaves {
                    for (_, t) in &leaf.params {
                        t.shallow_clone().copy_(&(t.randn_like() * 0.2));
                    }
                }
            });
            let batches = run.env.data.epoch(0, c.job.seed);
            let (planned, samples) = &batches[0];
            let plain = run.env.micro_step(planned, samples, 7).unwrap().unwrap();
            assert!(plain.preservation.is_none());
            run.env.plan.preservation = kind.clone();
            let env = &run.env;
            let got = env.micro_step(planned, samples, 7).unwrap().unwrap();
            // by hand, on the same draws
            let d = env.draw(planned, samples, 7).unwrap().unwrap();
            let preserved: Vec<String> = match &kind {
                Preservation::Dop { .. } => {
                    let p: Vec<String> = (d.captions.iter())
                        .map(|c| c.replace("trig", "creature"))
                        .collect();
                    assert!(p.iter().all(|c| c.starts_with("creature, ")), "{p:?}");
                    p
                }
                _ => vec![String::new(); d.captions.len()],
            };
            let ts = d.ts.to_kind(Kind::Float);
            let (ctx, y) = env.conditioning(&d.planned, &d.samples, preserved).unwrap();
            let unet = &env.model.unet;
            let lora = tch::no_grad(|| unet.forward(&d.noisy, &ts, &ctx, &y));
            env.model.detach_loras();
            let base = tch::no_grad(|| unet.forward(&d.noisy, &ts, &ctx, &y));
            let mse = (lora - base).square().mean(Kind::Float).double_value(&[]);
            let (plain, got_loss) = (plain.loss.double_value(&[]), got.loss.double_value(&[]));
            let term = got.preservation.unwrap().double_value(&[]);
            let m = kind.multiplier().unwrap();
            let want = plain + m * mse;
            eprintln!(
                "{kind:?}: term rel. error {:.1e}, loss rel. error {:.1e}, term / plain {:.3}",
                (term - mse).abs() / mse,
                (got_loss - want).abs() / want,
                mse / plain
            );
            assert!(
                mse > 1e-3 * plain,
                "the LoRA must change the prediction: {mse}"
            );
            // one batched forward vs two: measured ≤ 2.9e-7 relative (term) and
            // ≤ 1.2e-7 (loss) with 2 threads, 1 thread and MKL / oneDNN / ATen
            // held to AVX2; the limit 1e-5 is 34× the largest
            assert!(
                (term - mse).abs() <= 1e-5 * mse,
                "{kind:?}: term {term} vs by hand {mse}"
            );
            assert!(
                (got_loss - want).abs() <= 1e-5 * want,
                "{kind:?}: loss {got_loss} vs plain {plain} + {m} × {mse} = {want}"
            );
        }
    }
}
