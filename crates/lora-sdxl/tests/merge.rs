//! `merge_into_checkpoint`: LoRAs baked into a single-file checkpoint.

use lora_core::{LoraSet, UnknownKeys};
use lora_sdxl::model::keys::weight_location;
use lora_sdxl::{merge_into_checkpoint, Checkpoint, SdxlModel};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn lora() -> LoraSet {
    lora_core::load_lora(fixture("tiny_a_lora.safetensors"), UnknownKeys::Reject)
        .unwrap()
        .set
}

#[test]
fn merged_weights_are_base_plus_strength_times_delta() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.safetensors");
    let set = lora();
    let meta = [("lorakit.merged".to_string(), "tiny_a_lora:0.8".to_string())].into();
    let r =
        merge_into_checkpoint(&fixture("tiny_a.safetensors"), &[(&set, 0.8)], &out, meta).unwrap();
    assert_eq!(r.modules, set.len());
    // bigG's q/k/v adapters all land in one fused in_proj tensor
    assert!(r.merged_tensors <= r.modules && r.merged_tensors > 0);
    let base = Checkpoint::open(fixture("tiny_a.safetensors")).unwrap();
    let merged = Checkpoint::open(&out).unwrap();
    assert_eq!(base.infos().len(), merged.infos().len());
    let mut changed = std::collections::BTreeSet::new();
    for (key, a) in set.iter() {
        let loc = weight_location(key).unwrap();
        changed.insert(loc.key.clone());
        let w = base.load(&loc.key, Kind::Float, Device::Cpu).unwrap();
        let m = merged.load(&loc.key, Kind::Float, Device::Cpu).unwrap();
        let (w, m) = match loc.fused_part {
            Some(p) => {
                let n = a.out_features();
                (w.narrow(0, p as i64 * n, n), m.narrow(0, p as i64 * n, n))
            }
            None => (w, m),
        };
        let want = (w + a.delta_weight() * 0.8)
            .to_kind(Kind::Half)
            .to_kind(Kind::Float);
        assert!(
            m.equal(&want),
            "{}: merged weight differs",
            key.kohya_name()
        );
    }
    // everything else is copied byte for byte, dtypes kept
    for (key, info) in base.infos() {
        assert_eq!(merged.infos()[key].kind, info.kind, "{key}");
        if !changed.contains(key) {
            assert_eq!(base.raw(key), merged.raw(key), "{key} changed");
        }
    }
    // and the merged model computes what base + LoRA at 0.8 computes (to fp16 rounding)
    let b = SdxlModel::load(fixture("tiny_a.safetensors"), Kind::Float, Device::Cpu).unwrap();
    let m = SdxlModel::load(&out, Kind::Float, Device::Cpu).unwrap();
    b.attach_lora(lora(), 0.8).unwrap();
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
        let (eb, em) = (
            b.unet.forward(&x, &t, &ctx, &y),
            m.unet.forward(&x, &t, &ctx, &y),
        );
        let d = (&eb - &em).abs().max().double_value(&[]) / eb.abs().max().double_value(&[]);
        assert!(d < 5e-3, "merged UNet differs from base + LoRA by {d:.1e}");
    });
}

#[test]
fn strengths_add_up_over_several_loras() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let (s1, s2) = (lora(), lora());
    let base = fixture("tiny_a.safetensors");
    merge_into_checkpoint(&base, &[(&s1, 0.5), (&s2, 0.25)], &a, Default::default()).unwrap();
    merge_into_checkpoint(&base, &[(&s1, 0.75)], &b, Default::default()).unwrap();
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let mut worst = 0f64;
    for key in ca.infos().keys() {
        if ca.infos()[key].kind == Kind::Int64 {
            continue;
        }
        let x = ca.load(key, Kind::Float, Device::Cpu).unwrap();
        let y = cb.load(key, Kind::Float, Device::Cpu).unwrap();
        worst = worst.max((x - y).abs().max().double_value(&[]));
    }
    assert!(
        worst < 2e-3,
        "0.5 + 0.25 vs 0.75: {worst:.1e} (fp16 rounding)"
    );
}

#[test]
fn a_lora_for_another_model_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.safetensors");
    let set = lora();
    let e = merge_into_checkpoint(
        &fixture("tiny_b.safetensors"),
        &[(&set, 1.0)],
        &out,
        Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tiny_b.safetensors") && e.contains("another model"),
        "{e}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing written"
    );
    let e = merge_into_checkpoint(
        &fixture("tiny_a_diffusers"),
        &[(&set, 1.0)],
        &out,
        Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("single-file"), "{e}");
}
