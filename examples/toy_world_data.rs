//! The Rust half of `make toy-world`: writes what `scripts/fixtures/toy_world.py`
//! trains the toy-world base model on.
//!
//! ```text
//! cargo run --release --example toy_world_data -- --out target/toy_world [--images 12000] [--seed 2026]
//! ```
//!
//! * `base.safetensors` — an SDXL-architecture checkpoint for
//!   `SdxlConfig::toy_world()` with random weights (fp16). Its text encoders
//!   stay as they are (frozen random, CLIP's full vocabulary); the script
//!   replaces the UNet and the VAE with trained ones.
//! * `world.safetensors` — `images` u8 `[N, 64, 64, 3]` of random toy-world
//!   scenes with `caption` i64 `[N]` (an index into the metadata's
//!   `captions` JSON list) and `caption_aug` i64 `[N]`, the same tags
//!   shuffled and mixed with unrelated tags (`masterpiece`, `solo`, …), so
//!   the UNet learns to find a tag wherever it stands, as real captions with
//!   a trigger word in front need; `vae_images` u8 `[N/2, 64, 64, 3]`, the
//!   same backgrounds with one to three overlapping shapes of random RGB
//!   colours and sizes, some with small eye-like dots (so the VAE is a codec
//!   for any colour and for compound objects, the character's orange
//!   included, without the UNet ever seeing one); `context` f16
//!   `[C, 77, 64]` and `pooled` f32 `[C, 32]`, every
//!   caption encoded by lorakit's own conditioning with those text
//!   encoders; `uncond_context` / `uncond_pooled` for the empty prompt
//!   (caption dropout, classifier-free guidance).

use lorakit::data::toy_world::{draw, Scene, Shape, SIZE};
use lorakit::sdxl::model::conditioning::encode_batch;
use lorakit::sdxl::{ClipTokenizer, SdxlConfig, SdxlModel};
use lorakit::tch::{Device, Kind, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

#[path = "common/mod.rs"]
mod common;
use common::arg;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(arg(&args, "--out").unwrap_or_else(|| "target/toy_world".into()));
    let n: usize = arg(&args, "--images").map_or(Ok(12000), |s| s.parse())?;
    let seed: u64 = arg(&args, "--seed").map_or(Ok(2026), |s| s.parse())?;
    std::fs::create_dir_all(&out)?;

    let base = out.join("base.safetensors");
    lorakit::sdxl::synthetic::write_random_checkpoint(
        &base,
        &SdxlConfig::toy_world(),
        seed as i64,
        Kind::Half,
    )?;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut captions: Vec<String> = Vec::new();
    let mut index: HashMap<String, i64> = HashMap::new();
    let mut intern = |cap: String| -> i64 {
        let next = index.len() as i64;
        *index.entry(cap.clone()).or_insert_with(|| {
            captions.push(cap);
            next
        })
    };
    let mut pixels = Vec::with_capacity(n * 64 * 64 * 3);
    let (mut ids, mut aug_ids) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let scene = Scene::random(&mut rng);
        pixels.extend_from_slice(scene.render(SIZE, SIZE).as_raw());
        let cap = scene.caption();
        aug_ids.push(intern(augment(&cap, &mut rng)));
        ids.push(intern(cap));
    }
    let m = n / 2;
    let mut vae_pixels = Vec::with_capacity(m * 64 * 64 * 3);
    for _ in 0..m {
        vae_pixels.extend_from_slice(codec_scene(&mut rng).as_raw());
    }

    let model = SdxlModel::load(&base, Kind::Float, Device::Cpu)?;
    let tok = ClipTokenizer::new();
    let (mut ctx, mut pooled) = (Vec::new(), Vec::new());
    for chunk in captions.chunks(64) {
        let c = lorakit::tch::no_grad(|| encode_batch(&tok, &model.te1, &model.te2, chunk))?;
        ctx.push(c.context);
        pooled.push(c.pooled);
    }
    let empty =
        lorakit::tch::no_grad(|| encode_batch(&tok, &model.te1, &model.te2, &[String::new()]))?;
    let u8s = |v: &[u8], count: usize| {
        Tensor::from_slice(v).view([count as i64, SIZE as i64, SIZE as i64, 3])
    };
    let tensors = vec![
        ("images".to_string(), u8s(&pixels, n)),
        ("caption".to_string(), Tensor::from_slice(&ids)),
        ("caption_aug".to_string(), Tensor::from_slice(&aug_ids)),
        ("vae_images".to_string(), u8s(&vae_pixels, m)),
        (
            "context".to_string(),
            Tensor::cat(&ctx, 0).to_kind(Kind::Half),
        ),
        ("pooled".to_string(), Tensor::cat(&pooled, 0)),
        (
            "uncond_context".to_string(),
            empty.context.to_kind(Kind::Half),
        ),
        ("uncond_pooled".to_string(), empty.pooled),
    ];
    let mut meta = BTreeMap::new();
    meta.insert("captions".to_string(), serde_json::to_string(&captions)?);
    meta.insert("seed".to_string(), seed.to_string());
    let bytes = lorakit::core::io::serialize(&tensors, &meta)?;
    lorakit::core::io::write_atomic(out.join("world.safetensors"), &bytes)?;
    println!(
        "{n} scenes ({} captions) + {m} VAE scenes → {}",
        captions.len(),
        out.display()
    );
    Ok(())
}

/// Tags that say nothing about a toy-world scene, mixed into the augmented
/// captions (never the trigger, never a colour or shape of the world).
const DISTRACTORS: [&str; 14] = [
    "masterpiece",
    "best quality",
    "solo",
    "no humans",
    "highres",
    "simple",
    "looking at viewer",
    "full body",
    "standing",
    "smile",
    "cute",
    "toy",
    "1girl",
    "absurdres",
];

/// The caption's tags in a random order with zero to two distractor tags
/// inserted at random places.
fn augment(caption: &str, rng: &mut impl Rng) -> String {
    let mut tags: Vec<&str> = caption.split(", ").collect();
    for i in (1..tags.len()).rev() {
        tags.swap(i, rng.gen_range(0..=i));
    }
    for _ in 0..rng.gen_range(0..=2) {
        let at = rng.gen_range(0..=tags.len());
        tags.insert(at, DISTRACTORS[rng.gen_range(0..DISTRACTORS.len())]);
    }
    tags.join(", ")
}

/// A scene for the VAE only: a world background with one to three shapes of
/// random colours and sizes, often stacked or overlapping, a third of them
/// with two small eye-like dots.
fn codec_scene(rng: &mut impl Rng) -> image::RgbImage {
    let mut img = Scene::random(rng).background.render(SIZE, SIZE);
    let s = SIZE as f32;
    let (mut cx, mut cy) = (rng.gen_range(0.2..0.8) * s, rng.gen_range(0.25..0.75) * s);
    for _ in 0..rng.gen_range(1..=3) {
        let r = rng.gen_range(0.04..0.3) * s;
        let rgb: [u8; 3] = rng.gen();
        draw::shape(&mut img, Shape::ALL[rng.gen_range(0..4)], cx, cy, r, rgb);
        cx = (cx + rng.gen_range(-0.6..0.6) * r).clamp(0.0, s);
        cy = (cy - rng.gen_range(0.3..1.2) * r).clamp(0.0, s);
    }
    if rng.gen_range(0..3) == 0 {
        let (r, dx) = (rng.gen_range(1.5..3.5), rng.gen_range(3.0..8.0));
        let y = rng.gen_range(0.2..0.8) * s;
        let x = rng.gen_range(0.2..0.8) * s;
        for ex in [x - dx, x + dx] {
            draw::shape(&mut img, Shape::Circle, ex, y, r, [250, 250, 250]);
            draw::shape(&mut img, Shape::Circle, ex, y, r * 0.5, [10, 10, 10]);
        }
    }
    img
}
