//! The toy-world base model draws its world, does not know the demo
//! character, and a short LoRA run teaches it the character, which comes
//! with the trigger and not without it — the project's proof that training
//! teaches a concept.
//!
//! Detector thresholds have margins measured over several seeds; the
//! figures are in each test's comment (`cargo test --release --test
//! toy_world -- --nocapture` prints them; `examples/toy_world_spread.rs`
//! measures the trained one's spread).

use lora_core::LoraSet;
use lora_data::toy_world::Background;
use lora_sdxl::toy_world::{
    asset_path, character_job, character_rate, detect, params, share, Scores, TRIGGER,
};
use lora_sdxl::train::checkpoint::checkpoint_path;
use lora_sdxl::train::{train, TrainOptions};
use lora_sdxl::{ClipTokenizer, SdxlModel};
use std::sync::Mutex;

/// Seeded runs share torch's global generator.
static SERIAL: Mutex<()> = Mutex::new(());

const SEEDS: usize = 8;

// The quality test's thresholds, calibrated by `examples/toy_world_spread.rs`
// over training seeds 42, 1, 2, 3, 4, 5 (sampling seeds 1 and 7, steps 400,
// 450 and 500; the figures are the means the test computes) on the 2-core
// AMD EPYC dev machine, and over seeds 42, 3, 6 with MKL / oneDNN held to
// AVX2 and ATen to its plain kernels (another CPU's rounding, which moves a
// seeded run's outcome as much as another seed does):
//
//   trigger rows:     body 0.83–0.97, character 0.03–0.22 (base 0.00 / 0.00)
//   row without it:   body 0.00–0.54, character 0.00, green square 0.35–0.94
//   body with the trigger − body without it: 0.29–0.85
//
// (AVX2-limited: body 0.88–0.96, character 0.03–0.22, without the trigger
// body 0.23–0.40, green square 0.63–0.67.) Mutations, scored the same way:
// captions without the trigger word (seeds 42, 3) give body 0.03–0.08
// with the trigger prompts; empty captions (seed 42) body 0.00 and the
// green square 0.27; scoring the trigger row as the row without the
// trigger fails the trigger-effect check (0.00).
//
// Single checkpoints and sampling seeds move far more (character 0.00–0.42,
// body without the trigger 0.00–0.88), which is why the test averages six
// rounds. Each threshold is about half the worst mean measured: a threshold
// at the edge of one run's figure fails on the next CPU (issue 25).

/// Trigger rows, share with the body: worst mean 0.83, threshold 0.4.
const BODY_AFTER: f64 = 0.4;
/// Trigger rows, share with the whole character (body and the blue hat
/// above it): worst mean 0.028 (seed 6, AVX2-limited; the base: 0.00),
/// threshold 0.013 — at least 2 of the 144 trigger samples. The hat is the
/// weak part of what 500 steps teach; the body carries the proof.
const CHARACTER_AFTER: f64 = 0.013;
/// The trigger must matter: the body's share with the trigger minus its
/// share without (the LoRA bleeds the body into the prompt without the
/// trigger in some seeds — output preservation is issue 30): worst 0.29,
/// threshold 0.15.
const TRIGGER_EFFECT: f64 = 0.15;
/// The row without the trigger never shows the whole character: 0.00 in
/// every seed; threshold 0.02 (one or two of its 48 samples).
const BLEED_CHARACTER: f64 = 0.02;
/// The row without the trigger keeps its green square: worst mean 0.35,
/// threshold 0.17.
const GREEN_SQUARE: f64 = 0.17;
/// The checkpoints whose scores are averaged.
const STEPS: [u64; 3] = [400, 450, 500];
/// The sampling seeds, each a round of [`SEEDS`] samples per prompt.
const SAMPLE_SEEDS: [u64; 2] = [1, 7];

fn base() -> SdxlModel {
    SdxlModel::load(asset_path(), tch::Kind::Float, tch::Device::Cpu).unwrap()
}

/// The base is fixed, so only rounding moves these: measured backgrounds
/// 0.88–1.00, colours 1.00 and the character 0.00 on the trigger, the same
/// with 2 threads and with 1 thread and MKL / oneDNN / ATen held to AVX2.
#[test]
fn the_toy_base_draws_its_world_from_captions() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = base();
    let tok = ClipTokenizer::new();
    let cases = [
        (
            "red circle, large, in the center, white background",
            "red",
            Background::White,
        ),
        (
            "yellow star, large, in the center, night",
            "yellow",
            Background::Night,
        ),
        (
            "blue square, large, on the left, pink background",
            "blue",
            Background::Pink,
        ),
        (
            "purple triangle, large, in the center, beach",
            "purple",
            Background::Beach,
        ),
        (
            "white circle, large, on the right, sky",
            "white",
            Background::Sky,
        ),
    ];
    for (prompt, colour, bg) in cases {
        let seen = detect(&model, &tok, &params(prompt), SEEDS).unwrap();
        let right_bg = share(&seen, |a| a.background == bg);
        let right_colour = share(&seen, |a| a.colour.is_some_and(|c| c.0 == colour));
        println!("{prompt}: background {right_bg:.2}, colour {right_colour:.2}");
        assert!(
            right_bg >= 0.75,
            "{prompt}: background right in {right_bg:.2}: {seen:?}"
        );
        assert!(
            right_colour >= 0.6,
            "{prompt}: colour right in {right_colour:.2}: {seen:?}"
        );
    }
    // It has never seen the character: the trigger draws no orange body with a hat.
    let seen = detect(
        &model,
        &tok,
        &params("myakumyaku-san, large, in the center, sky"),
        SEEDS,
    )
    .unwrap();
    println!(
        "trigger on the base: character {:.2}",
        character_rate(&seen)
    );
    assert!(character_rate(&seen) <= 0.125, "{seen:?}");
}

/// Trains the demo's job on the toy base and scores it with the detector at
/// strength 0.8, averaged over [`STEPS`] × [`SAMPLE_SEEDS`] (six rounds of 8
/// samples per prompt: one round is too noisy to assert on): with the
/// trigger the character's orange body appears on most samples and the
/// whole character (body and blue hat above it) on a share, where the base
/// draws neither; without the trigger the prompt keeps its green square and
/// gets no character.
#[test]
fn a_short_lora_run_teaches_the_character_without_bleed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    lora_data::synthetic::write_character_dataset(&data, 16, 64, 64, TRIGGER, 2026).unwrap();
    let job_path = dir.path().join("job.toml");
    let mut job = character_job(&job_path, &asset_path(), &data, dir.path()).unwrap();
    job.sample.disable = true;
    job.validation.images = None;
    let report = train(&job, &job_path, &TrainOptions::default()).unwrap();

    let model = base();
    let tok = ClipTokenizer::new();
    let rounds = |model: &SdxlModel| -> Vec<Scores> {
        (SAMPLE_SEEDS.iter())
            .map(|&seed| {
                let mut s = job.sample.clone();
                s.seed = seed;
                Scores::of(model, &tok, &s, SEEDS).unwrap()
            })
            .collect()
    };
    let before = Scores::mean(&rounds(&model));
    let mut after = Vec::new();
    for step in STEPS {
        let last = step == job.train.steps;
        let path = checkpoint_path(&report.run_dir, &job.job.name, step, last);
        model.detach_loras();
        model
            .attach_lora(LoraSet::load(&path).unwrap(), job.sample.strength)
            .unwrap();
        for (seed, s) in SAMPLE_SEEDS.iter().zip(rounds(&model)) {
            println!("  step {step} sampling seed {seed}: {s:?}");
            after.push(s);
        }
    }
    let after = Scores::mean(&after);
    println!(
        "base: {before:?}\ntrained (mean of {} rounds): {after:?}",
        STEPS.len() * SAMPLE_SEEDS.len()
    );
    assert!(before.body <= 0.1, "the base already draws it: {before:?}");
    assert!(
        after.body >= BODY_AFTER,
        "the LoRA did not teach the body: {after:?}"
    );
    assert!(
        after.character >= CHARACTER_AFTER,
        "the LoRA did not teach the whole character: {after:?}"
    );
    assert!(
        after.body - after.bleed_body >= TRIGGER_EFFECT,
        "the body comes as much without the trigger as with it: {after:?}"
    );
    assert!(
        after.bleed_character <= BLEED_CHARACTER,
        "concept bleed: {after:?}"
    );
    assert!(
        after.green_square >= GREEN_SQUARE,
        "the prompt without the trigger lost its square: {after:?}"
    );
}
