//! `merge_into_checkpoint`: LoRAs baked into a single-file checkpoint.

use lora_core::{LoraSet, UnknownKeys};
use lora_sdxl::model::keys::weight_location;
use lora_sdxl::{merge_into_checkpoint, Checkpoint, SdxlModel};
use lora_testkit::Tolerance;
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

/// The merged (fp16) UNet against base + LoRA at 0.8 computed in fp32, as
/// max |Δ| / max |ε|: the merged weights' fp16 rounding, 3.0e-4 by
/// default, with 1 thread and AVX2-limited. Margin 16 (the old limit).
const MERGED: Tolerance = Tolerance::new(
    3.1e-4,
    16.0,
    "merged fp16 weights vs base + LoRA in fp32: 3.0e-4 measured",
);

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
        MERGED.check("merged UNet vs base + LoRA: max |Δ| / max |ε|", d);
    });
}

/// How many fp16 steps apart two tensors are at most, both read as fp16:
/// the distance between their values' places in fp16's order.
fn fp16_steps(a: &Tensor, b: &Tensor) -> f64 {
    let place = |t: &Tensor| {
        let bits = t.view_dtype(Kind::Int16).to_kind(Kind::Int);
        // sign and magnitude to one line: −x sits at −(x's magnitude bits)
        let magnitude = bits.bitwise_and(0x7fff);
        magnitude.where_self(&bits.ge(0), &(-&magnitude))
    };
    (place(a) - place(b)).abs().max().double_value(&[])
}

/// W + 0.5·ΔW + 0.25·ΔW against W + 0.75·ΔW, each summed in fp32 and
/// written as fp16: sums a few fp32 ulps apart round to the same or
/// adjacent fp16 values, 1 step apart at most as measured (by default, with
/// 1 thread, AVX2-limited). Counted in steps, not absolutely: one step is
/// 3.9e-3 at the largest weight (4.6), where the old limit of 2e-3 would
/// fail on a rounding. Margin 4; the second LoRA dropped gives 2.2e4 steps.
const SUMMED: Tolerance = Tolerance::new(
    1.0,
    4.0,
    "two fp32 sums of the same terms rounded to fp16: 1 step measured",
);

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
        let x = ca.load(key, Kind::Half, Device::Cpu).unwrap();
        let y = cb.load(key, Kind::Half, Device::Cpu).unwrap();
        worst = worst.max(fp16_steps(&x, &y));
    }
    SUMMED.check("0.5 + 0.25 vs 0.75: fp16 steps apart", worst);
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
