//! Block-wise ranks and learning rates against kohya's rules (fixture:
//! `scripts/fixtures/blocks.py`) and in real runs: the file holds each
//! block's rank and alpha, a zero block has no modules, a block's weight
//! scales exactly its modules' first update, and weights of 1 train the
//! plain LoRA.

mod common;
use lora_sdxl::train::blocks::{BlockPlan, BlockWeights, BLOCKS};
use lora_sdxl::train::job::{NetworkSection, TrainSection};
use lora_sdxl::train::train;
use lora_testkit::Tolerance;
use std::collections::HashMap;
use tch::Tensor;

fn fixture() -> HashMap<String, Tensor> {
    common::fixture_tensors("blocks.safetensors")
}

fn weights(t: &TrainSection) -> [f64; BLOCKS] {
    BlockPlan::new(&NetworkSection::default(), t)
        .unwrap()
        .unwrap()
        .lr_weights
        .unwrap()
}

/// Block weights (f64, pure Rust) against kohya's (Python floats, the same
/// formulas): bit-equal as measured (by default, with 1 thread,
/// AVX2-limited — no BLAS is involved), but a libm's `cos` / `sin` may
/// differ by an ulp and a formula may group its terms differently, so the
/// floor is 4 ulps of the largest weight (2): 8 × f64::EPSILON. Margin 560
/// keeps the old limit of 1e-12.
const KOHYA: Tolerance = Tolerance::new(
    8.0 * f64::EPSILON,
    560.0,
    "f64 rounding of weights up to 2 (bit-equal as measured)",
);

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    let d = got.iter().zip(want).map(|(x, y)| (x - y).abs());
    KOHYA.check(format!("{what}: max |Δ|"), d.fold(0.0, f64::max));
}

#[test]
fn presets_and_weights_match_kohya() {
    let f = fixture();
    for name in [
        "cosine",
        "sine",
        "linear",
        "reverse_linear",
        "zeros",
        "reverse_linear+0.5",
    ] {
        let want = Vec::<f64>::try_from(&f[&format!("preset.{name}")]).unwrap();
        let t = TrainSection {
            down_lr_weight: Some(BlockWeights::Preset(name.into())),
            ..Default::default()
        };
        let w = weights(&t);
        assert_close(name, &w[1..10], &want);
        assert_eq!(w[10..], [1.0; 13], "{name}: the other blocks keep 1");
    }
    let t = TrainSection {
        down_lr_weight: Some(BlockWeights::List(vec![0.5, 1.0, 0.0, 2.0])),
        mid_lr_weight: Some(vec![1.0, 0.2]),
        up_lr_weight: Some(BlockWeights::Preset("sine+0.1".into())),
        block_lr_zero_threshold: 0.15,
        ..Default::default()
    };
    let want = Vec::<f64>::try_from(&f["weights"]).unwrap();
    assert_close("lists, a preset and a threshold", &weights(&t), &want);
    // kohya's comma form is the same list: the same numbers, bit for bit
    let comma = TrainSection {
        down_lr_weight: Some(BlockWeights::Preset("0.5,1.0,,2.0".into())),
        ..t.clone()
    };
    assert_eq!(weights(&comma), weights(&t));
    assert!(BlockPlan::notes(&t)
        .iter()
        .any(|n| n.contains("down_lr_weight has 4 of 9")));
}

#[test]
fn bad_block_settings_name_their_field() {
    let plan = |n: NetworkSection, t: TrainSection| BlockPlan::new(&n, &t).unwrap_err();
    let (field, m) = plan(
        NetworkSection {
            block_dims: Some(vec![4; 22]),
            ..Default::default()
        },
        TrainSection::default(),
    );
    assert_eq!(field, "network.block_dims");
    assert!(m.contains("needs 23 values"), "{m}");
    let (field, _) = plan(
        NetworkSection {
            block_alphas: Some(vec![4.0; 23]),
            ..Default::default()
        },
        TrainSection::default(),
    );
    assert_eq!(field, "network.block_alphas");
    let (field, m) = plan(
        NetworkSection::default(),
        TrainSection {
            up_lr_weight: Some(BlockWeights::Preset("cosnie".into())),
            ..Default::default()
        },
    );
    assert_eq!(field, "train.up_lr_weight");
    assert!(m.contains("not a preset"), "{m}");
    let (field, _) = plan(
        NetworkSection::default(),
        TrainSection {
            mid_lr_weight: Some(vec![1.0; 4]),
            ..Default::default()
        },
    );
    assert_eq!(field, "train.mid_lr_weight");
}

type Lora = Vec<(String, Tensor)>;

fn get<'a>(lora: &'a Lora, key: &str) -> Option<&'a Tensor> {
    lora.iter().find(|(k, _)| k == key).map(|(_, t)| t)
}

#[test]
fn blocks_shape_the_file_and_scale_the_updates() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, data) = common::tiny_model_and_dataset(root, 2);
    let run = |name: &str, edit: &dyn Fn(&mut lora_sdxl::JobConfig)| {
        let (mut c, path) = common::small_cpu_job(root, &model, &data, name);
        c.train.steps = 1; // one AdamW update: proportional to its rate
        edit(&mut c);
        let r = train(&c, &path, &common::quiet())?;
        let file = r.last_lora.clone().unwrap();
        let meta = lora_core::io::read_tensors(&file).unwrap().metadata;
        Ok::<_, lora_sdxl::SdxlError>((common::sorted_tensors(&file), meta))
    };
    let (plain, _) = run("plain", &|_| {}).unwrap();

    // ranks and alphas by block; zero blocks have no modules
    let mut dims = [4i64; BLOCKS];
    dims[5] = 2; // input_blocks.4
    dims[11] = 0; // middle_block.1
    dims[14] = 8; // output_blocks.1
    let mut alphas = [4.0f64; BLOCKS];
    alphas[14] = 2.0;
    let (shaped, meta) = run("dims", &|c| {
        c.network.block_dims = Some(dims.to_vec());
        c.network.block_alphas = Some(alphas.to_vec());
    })
    .unwrap();
    let rank =
        |lora: &Lora, m: &str| get(lora, &format!("{m}.lora_down.weight")).map(|t| t.size()[0]);
    let alpha =
        |lora: &Lora, m: &str| get(lora, &format!("{m}.alpha")).map(|t| t.double_value(&[]));
    assert_eq!(rank(&shaped, "lora_unet_input_blocks_4_1_proj_in"), Some(2));
    assert_eq!(
        rank(&shaped, "lora_unet_output_blocks_1_1_proj_in"),
        Some(8)
    );
    assert_eq!(
        alpha(&shaped, "lora_unet_output_blocks_1_1_proj_in"),
        Some(2.0)
    );
    assert_eq!(rank(&shaped, "lora_unet_input_blocks_7_1_proj_in"), Some(4));
    assert!(get(&plain, "lora_unet_middle_block_1_proj_in.lora_down.weight").is_some());
    assert!(!shaped
        .iter()
        .any(|(k, _)| k.starts_with("lora_unet_middle_block_1_")));
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!(
        args["block_dims"],
        "4,4,4,4,4,2,4,4,4,4,4,0,4,4,8,4,4,4,4,4,4,4,4"
    );

    // weights of 1 split the optimizer by block but train the same LoRA
    let (ones, _) = run("ones", &|c| {
        c.train.down_lr_weight = Some(BlockWeights::List(vec![1.0; 9]))
    })
    .unwrap();
    assert!(plain
        .iter()
        .zip(&ones)
        .all(|((ka, a), (kb, b))| ka == kb && a.equal(b)));

    // half the rate in the input blocks: half their first update, the rest
    // unchanged (same modules, so the same initialisation and gradients)
    let (half, _) = run("half", &|c| {
        c.train.down_lr_weight = Some(BlockWeights::List(vec![0.5; 9]))
    })
    .unwrap();
    let mut checked = 0;
    for (k, t) in half.iter().filter(|(k, _)| k.ends_with("lora_up.weight")) {
        let p = get(&plain, k).unwrap();
        let want = if k.starts_with("lora_unet_input_blocks_") {
            p * 0.5
        } else {
            p.shallow_clone()
        };
        // bit for bit: the up factors start at zero, and one AdamW step
        // moves them by rate × (the same m̂ / (√v̂ + ε)); halving the rate
        // (a power of two) halves that product exactly
        assert!(
            t.equal(&want),
            "{k}: not exactly the plain run's update × its weight"
        );
        checked += 1;
    }
    assert!(
        checked > 10
            && half
                .iter()
                .any(|(k, t)| k.starts_with("lora_unet_input_blocks_")
                    && k.ends_with("lora_up.weight")
                    && t.abs().max().double_value(&[]) > 0.0)
    );

    // a zero weight removes the block's modules
    let (nomid, _) = run("nomid", &|c| c.train.mid_lr_weight = Some(vec![0.0; 3])).unwrap();
    assert!(!nomid
        .iter()
        .any(|(k, _)| k.starts_with("lora_unet_middle_block_")));
    assert!(nomid
        .iter()
        .any(|(k, _)| k.starts_with("lora_unet_output_blocks_")));

    // Prodigy takes one rate: block weights are refused
    let e = run("prodigy", &|c| {
        c.train.optimizer = "prodigy".into();
        c.train.lr = 1.0;
        c.train.up_lr_weight = Some(BlockWeights::Preset("linear".into()));
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("train.down_lr_weight"), "{e}");
}
