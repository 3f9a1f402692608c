//! LyCORIS LoHa / LoKr files: written under the keys LyCORIS writes, read
//! back to the same update, applied at a strength exactly as merged into the
//! checkpoint, and refused with a clear message by LoRA-only tools.

use lora_core::lycoris::LycoAdapter;
use lora_core::{Geometry, LoraAdapter, LoraFormat, LoraSet, UnknownKeys};
use lora_sdxl::{merge_into_checkpoint, SdxlModel};
use lora_testkit::Tolerance;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The tiny model's LoRA modules as LoHa (even) and LoKr (odd), random factors.
fn lycoris_set() -> LoraSet {
    let template = lora_core::load_lora(fixture("tiny_a_lora.safetensors"), UnknownKeys::Reject)
        .unwrap()
        .set;
    let opts = (Kind::Float, Device::Cpu);
    tch::manual_seed(5);
    let mut set = LoraSet::new();
    for (i, (key, a)) in template.iter().enumerate() {
        let g = match a.geometry() {
            Geometry::Linear => Geometry::Linear,
            Geometry::Conv2d { kernel, .. } => Geometry::conv(kernel[0], kernel[1]),
        };
        let (inp, out) = (a.in_features(), a.out_features());
        let mut l = if i % 2 == 0 {
            LycoAdapter::new_loha(inp, out, 4, Some(2.0), g, opts)
        } else {
            // rank 1 with decompose_both: w1 (4 × 4 at factor 4) is low-rank too
            let both = i % 4 == 1;
            let rank = if both { 1 } else { 4 };
            LycoAdapter::new_lokr(inp, out, rank, Some(2.0), (4, both), g, opts)
        }
        .unwrap();
        l.map_tensors(&mut |t| Tensor::randn(t.size().as_slice(), opts) * 0.3);
        set.insert(key.clone(), LoraAdapter::from_lyco(l));
    }
    set
}

/// The merged (fp16) UNet against base + LyCORIS at 0.8 computed in fp32,
/// as max |Δ| / max |ε|: the merged weights' fp16 rounding, 3.7e-4 by
/// default, with 1 thread and AVX2-limited. Margin 13 (the old limit).
const MERGED: Tolerance = Tolerance::new(
    3.8e-4,
    13.0,
    "merged fp16 weights vs base + LyCORIS in fp32: 3.7e-4 measured",
);

#[test]
fn lycoris_files_round_trip_apply_as_merged_and_refuse_resizing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lyco.safetensors");
    let mut set = lycoris_set();
    // DoRA on every third module, its magnitude moved off the base norm
    let model = SdxlModel::load(fixture("tiny_a.safetensors"), Kind::Float, Device::Cpu).unwrap();
    for (i, (key, a)) in set.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
        a.enable_dora(&model.slots.get(key).unwrap().weight)
            .unwrap();
        let m = a.dora_scale().unwrap() * (1.0 + 0.1 * (i % 5) as f64);
        a.set_dora_scale(m);
    }
    set.save(&file, Kind::Float, &Default::default()).unwrap();

    // LyCORIS' key names, an alpha per module, no lora_down/lora_up
    let raw = lora_core::io::read_tensors(&file).unwrap();
    let names: Vec<&str> = raw.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.iter().any(|n| n.ends_with(".hada_w2_b")));
    assert!(names.iter().any(|n| n.ends_with(".lokr_w1")));
    assert!(
        names.iter().any(|n| n.ends_with(".lokr_w1_a")),
        "decompose_both modules"
    );
    assert!(names
        .iter()
        .any(|n| n.ends_with(".lokr_w2_b") || n.ends_with(".lokr_w2")));
    assert!(!names.iter().any(|n| n.contains("lora_down")));
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".dora_scale")).count(),
        set.len().div_ceil(3)
    );
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".alpha")).count(),
        set.len()
    );

    // read back: the same update for every module
    let loaded = lora_core::load_lora(&file, UnknownKeys::Reject).unwrap();
    assert_eq!(loaded.format, LoraFormat::Lycoris);
    assert_eq!(loaded.set.len(), set.len());
    for ((k, a), (k2, b)) in set.iter().zip(loaded.set.iter()) {
        assert_eq!(k, k2);
        assert_eq!(a.dora_scale().is_some(), b.dora_scale().is_some());
        let (da, db) = (a.delta_weight(), b.delta_weight());
        assert_eq!(da.numel(), db.numel(), "{}", k.kohya_name());
        // the file holds the fp32 factors and alpha as they were, and ΔW is
        // rebuilt from them by the same operations: bit for bit
        assert!(
            da.reshape([-1]).equal(&db.reshape([-1])),
            "{}: read back to another update",
            k.kohya_name()
        );
    }

    // attached at 0.8 = merged at 0.8 (to the checkpoint's fp16 rounding)
    let out = dir.path().join("merged.safetensors");
    let base = fixture("tiny_a.safetensors");
    merge_into_checkpoint(&base, &[(&loaded.set, 0.8)], &out, Default::default()).unwrap();
    let b = SdxlModel::load(&base, Kind::Float, Device::Cpu).unwrap();
    let m = SdxlModel::load(&out, Kind::Float, Device::Cpu).unwrap();
    b.attach_lora(lora_core::LoraSet::load(&file).unwrap(), 0.8)
        .unwrap();
    tch::manual_seed(3);
    let cfg = &b.detected.config.unet;
    let opts = (Kind::Float, Device::Cpu);
    let (x, t) = (
        Tensor::randn([1, 4, 16, 16], opts),
        Tensor::from_slice(&[300f32]),
    );
    let ctx = Tensor::randn([1, 77, cfg.context_dim], opts);
    let y = Tensor::randn([1, cfg.adm_in_channels], opts);
    tch::no_grad(|| {
        let plain = SdxlModel::load(&base, Kind::Float, Device::Cpu).unwrap();
        let e0 = plain.unet.forward(&x, &t, &ctx, &y);
        let (eb, em) = (
            b.unet.forward(&x, &t, &ctx, &y),
            m.unet.forward(&x, &t, &ctx, &y),
        );
        let scale = eb.abs().max().double_value(&[]);
        let moved = (&eb - &e0).abs().max().double_value(&[]) / scale;
        let d = (&eb - &em).abs().max().double_value(&[]) / scale;
        // an effect, not a tolerance: the modules reach the output (4.3e-1)
        assert!(
            moved > 1e-3,
            "the LyCORIS modules did not change the output ({moved:.1e})"
        );
        MERGED.check("merged UNet vs base + LyCORIS: max |Δ| / max |ε|", d);
    });

    // resizing is for LoRA / LoCon
    let opts = lora_core::ResizeOptions {
        rank: 2,
        conv_rank: 2,
        rule: lora_core::RankRule::Fixed,
    };
    let e = lora_core::resize_set(&loaded.set, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("LoRA / LoCon") && (e.contains("loha") || e.contains("lokr")),
        "{e}"
    );
}
