//! In-training samples: the job's `[sample]` prompts rendered with the LoRA
//! under training (at `sample.strength`) at step 0 and every `sample_every`
//! steps (and at the last step) into `<run>/samples/`, plus
//! `samples/grid.png` (prompts × steps), so steps can be compared while the
//! run goes on.

use crate::error::{Result, SdxlError};
use crate::model::sdxl::SdxlModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::sample::SamplerSpec;
use crate::train::events::{Event, Observer, RunView};
use crate::train::job::JobConfig;
use std::path::{Path, PathBuf};

/// Whether a round of samples is due after optimizer step `step`: every
/// `sample_every` steps and at the last one.
fn due(job: &JobConfig, step: u64) -> bool {
    step.is_multiple_of(job.sample.sample_every) || step == job.train.steps
}

/// Renders a round of samples when due and emits [`Event::Samples`].
#[derive(Debug, Default)]
pub struct Samples;

impl Observer for Samples {
    fn on_event(&mut self, event: &Event, run: &RunView<'_>) -> Result<()> {
        let step = match *event {
            Event::Started { resumed: false, .. } => 0,
            Event::Step { step, .. } if due(run.job, step) => step,
            _ => return Ok(()),
        };
        // with what the files hold (the EMA, when on)
        let dir = run.with_saved_weights(|| {
            run.model.slots.in_eval(|| {
                training_samples(
                    run.job,
                    run.plan.sampler,
                    run.model,
                    run.tokenizer,
                    run.run_dir,
                    step,
                )
            })
        })?;
        run.emit(Event::Samples { step, dir });
        Ok(())
    }
}

/// Renders the job's sample prompts with the LoRA under training (at
/// `sample.strength`) into `<run>/samples/<step>_p<row>.png` and refreshes
/// `<run>/samples/grid.png` (prompts × steps).
fn training_samples(
    job: &JobConfig,
    sampler: SamplerSpec,
    model: &SdxlModel,
    tok: &ClipTokenizer,
    run_dir: &Path,
    step: u64,
) -> Result<PathBuf> {
    use crate::sample::grid::{
        parameters_text, software, training_sample_name, training_samples_grid,
    };
    let sample = &job.sample;
    let dir = run_dir.join("samples");
    std::fs::create_dir_all(&dir).map_err(|e| SdxlError::io(&dir, e))?;
    let trigger = job.job.trigger_word.as_deref();
    let prompts: Vec<String> = sample
        .prompts
        .iter()
        .map(|p| sample.generate_params(sampler, p, trigger).prompt)
        .collect();
    let model_name = job
        .model
        .name_or_path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lora = crate::sample::grid::LoraUse {
        path: PathBuf::from(format!("{}_{step:09}.safetensors", job.job.name)),
        strength: sample.strength,
    };
    model.slots.set_multiplier(sample.strength);
    let result = (|| -> Result<()> {
        for (r, prompt) in sample.prompts.iter().enumerate() {
            let p = sample.generate_params(sampler, prompt, trigger);
            let img = crate::sample::txt2img::txt2img(model, tok, &p, &mut |_| {})?.remove(0);
            let text = parameters_text(&p, &model_name, std::slice::from_ref(&lora), &[]);
            crate::render::save_png(
                dir.join(training_sample_name(step, r)),
                &img,
                &[("parameters", &text), ("software", &software())],
            )
            .map_err(|e| crate::SdxlError::train(e.to_string()))?;
        }
        Ok(())
    })();
    model.slots.set_multiplier(1.0);
    result?;
    let (sampler, schedule) = sampler.a1111_names();
    let title = format!(
        "{} | seed {} | {} steps | {sampler} {schedule} | CFG {} | strength {} | {}x{}",
        job.job.name,
        sample.seed,
        sample.sample_steps,
        sample.guidance_scale,
        sample.strength,
        sample.width,
        sample.height
    );
    training_samples_grid(&dir, &prompts, &title)?;
    Ok(dir)
}
