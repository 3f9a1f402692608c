//! The toy-world base model draws its world, does not know the demo
//! character, and a short LoRA run teaches it the character without bleed —
//! the project's proof that training teaches a concept.
//!
//! Detector thresholds have margins measured over several seeds; the
//! figures are in each test's comment (`cargo test --release --test
//! toy_world -- --nocapture` prints them).

use lora_core::LoraSet;
use lora_data::toy_world::{Analysis, Background};
use lora_sdxl::toy_world::{
    asset_path, character_job, character_rate, detect, params, share, GRID_PROMPTS, TRIGGER,
};
use lora_sdxl::train::{train, TrainOptions};
use lora_sdxl::{ClipTokenizer, SdxlModel};
use std::sync::Mutex;

/// Seeded runs share torch's global generator.
static SERIAL: Mutex<()> = Mutex::new(());

const SEEDS: usize = 8;
/// Share of trigger samples with the body after the demo's 500 steps:
/// measured 0.96 (base 0.00, without the trigger 0.00) on the 2-core dev
/// machine; after 100–450 steps it is 0.79–1.00 (`docs/demo_scores.txt`).
const BODY_AFTER: f64 = 0.6;
/// Share with the whole character (the body and the blue hat above it):
/// measured 0.46 after 500 steps (base 0.00, without the trigger 0.00 at
/// every checkpoint); the hat comes from about step 300 (0.12–0.25 at
/// 300–400).
const CHARACTER_AFTER: f64 = 0.25;

fn base() -> SdxlModel {
    SdxlModel::load(asset_path(), tch::Kind::Float, tch::Device::Cpu).unwrap()
}

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

/// Trains the demo's job on the toy base and scores samples at strength 0.8
/// with the detector: with the trigger the character's orange body appears
/// on most samples and the whole character (body and blue hat above it) on
/// a good share, where the base draws neither; without the trigger the
/// prompt keeps its green square and gets no character.
#[test]
fn a_short_lora_run_teaches_the_character_without_bleed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    lora_data::synthetic::write_character_dataset(&data, 16, 64, 64, TRIGGER, 2026).unwrap();
    let job_path = dir.path().join("job.toml");
    let mut job = character_job(&job_path, &asset_path(), &data, dir.path()).unwrap();
    job.save.save_every = job.train.steps;
    job.sample.disable = true;
    job.validation.images = None;
    let report = train(&job, &job_path, &TrainOptions::default()).unwrap();
    let lora = report.last_lora.unwrap();

    let model = base();
    let tok = ClipTokenizer::new();
    let s = &job.sample;
    let rows: Vec<_> = GRID_PROMPTS
        .iter()
        .map(|p| s.generate_params(p, Some(TRIGGER)))
        .collect();
    let with_trigger = |model: &SdxlModel| -> Vec<Analysis> {
        rows[..3]
            .iter()
            .flat_map(|p| detect(model, &tok, p, SEEDS).unwrap())
            .collect()
    };
    let body = Analysis::has_body;
    let before = with_trigger(&model);
    model
        .attach_lora(LoraSet::load(&lora).unwrap(), s.strength)
        .unwrap();
    let after = with_trigger(&model);
    let without = detect(&model, &tok, &rows[3], SEEDS).unwrap();
    let square = share(&without, |a| a.colour.is_some_and(|c| c.0 == "green"));
    println!(
        "body: base {:.2}, trained {:.2} with the trigger, {:.2} without (green square {square:.2}); full character {:.2} / {:.2} / {:.2}",
        share(&before, body),
        share(&after, body),
        share(&without, body),
        character_rate(&before),
        character_rate(&after),
        character_rate(&without)
    );
    for (i, a) in after.iter().enumerate() {
        println!(
            "  {} body {:.3} hat {:.3}",
            GRID_PROMPTS[i / SEEDS],
            a.body,
            a.hat
        );
    }
    assert!(
        share(&before, body) <= 0.1,
        "the base already draws it: {before:?}"
    );
    assert!(
        share(&after, body) >= BODY_AFTER,
        "the LoRA did not teach the body: {after:?}"
    );
    assert!(
        character_rate(&after) >= CHARACTER_AFTER,
        "the LoRA did not teach the whole character: {after:?}"
    );
    assert!(share(&without, body) <= 0.25, "concept bleed: {without:?}");
    assert!(
        character_rate(&without) <= 0.125,
        "concept bleed: {without:?}"
    );
    assert!(
        square >= 0.5,
        "the prompt without the trigger lost its square: {without:?}"
    );
}
