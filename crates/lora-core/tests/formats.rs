//! Foreign LoRA formats normalise to the same set; kohya hashes match the
//! reference computed by `scripts/fixtures/lora_formats.py`; bad files give
//! clear errors.

use lora_core::io::read_tensors;
use lora_core::{load_lora, LoraAdapter, LoraError, LoraFormat, LoraSet, ModuleKey, UnknownKeys};
use lora_testkit::Tolerance;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

/// ΔW of a foreign file against the kohya one, relative to max |ΔW|: 0 where
/// the file holds the same tensors, 1.4e-7 for PEFT modules whose file has
/// the scale baked into `lora_B` (rounded in fp32 when the fixture was
/// written); the same with 2 threads, 1 thread and MKL/ATen held to AVX2 /
/// no SIMD. Margin 7: an alpha that is not read (alpha = rank) is off by
/// 0.5 (measured 0.5).
const SAME_DELTA: Tolerance =
    Tolerance::new(1.4e-7, 7.0, "fp32 rounding of a scale baked into lora_B");

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1e-12)
}

#[test]
fn foreign_formats_normalise_to_the_kohya_set() {
    let reference = load_lora(fixture("kohya.safetensors"), UnknownKeys::Reject).unwrap();
    assert_eq!(reference.format, LoraFormat::Kohya);
    let names: Vec<String> = expected()["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut ref_names: Vec<String> = reference.set.iter().map(|(k, _)| k.kohya_name()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    ref_names.sort();
    assert_eq!(ref_names, sorted);

    for (file, format) in [
        ("ai_toolkit.safetensors", LoraFormat::AiToolkit),
        ("peft.safetensors", LoraFormat::Peft),
        ("diffusers_legacy.safetensors", LoraFormat::DiffusersLegacy),
    ] {
        let other =
            load_lora(fixture(file), UnknownKeys::Reject).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(other.format, format, "{file}");
        assert!(other.unknown_keys.is_empty());
        let keys: Vec<&ModuleKey> = other.set.iter().map(|(k, _)| k).collect();
        let ref_keys: Vec<&ModuleKey> = reference.set.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ref_keys, "{file}: module keys differ");
        for (k, a) in reference.set.iter() {
            let b = other.set.get(k).unwrap();
            assert_eq!(a.geometry(), b.geometry(), "{file} {k}");
            let rel = max_rel_diff(&b.delta_weight(), &a.delta_weight());
            SAME_DELTA.check(format!("{file} {k}: ΔW vs kohya"), rel);
        }
    }
}

fn formula(n: i64) -> Tensor {
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919) % 2001) - 1000) as f32 / 1024.0)
        .collect();
    Tensor::from_slice(&v)
}

#[test]
fn kohya_hashes_match_reference() {
    let e = expected();
    let h = &e["hash_reference"];
    let up_factor = h["up_factor"].as_f64().unwrap();
    let mut set = LoraSet::new();
    for m in h["modules"].as_array().unwrap() {
        let ds: Vec<i64> = m["down"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let us: Vec<i64> = m["up"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let down = formula(ds.iter().product()).view(ds.as_slice());
        let up = formula(us.iter().product()).view(us.as_slice()) * up_factor;
        let (key, _) = ModuleKey::from_kohya_name(m["name"].as_str().unwrap()).unwrap();
        set.insert(
            key,
            LoraAdapter::from_weights(down, up, m["alpha"].as_f64()).unwrap(),
        );
    }
    let meta: BTreeMap<String, String> = h["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hash_reference.safetensors");
    let saved = set.save(&path, Kind::Float, &meta).unwrap();
    assert_eq!(saved.model_hash, h["sshs_model_hash"].as_str().unwrap());
    assert_eq!(saved.legacy_hash, h["sshs_legacy_hash"].as_str().unwrap());
    // The hash A1111 computes from the final file (data section) is the same.
    let back = read_tensors(&path).unwrap();
    assert_eq!(back.data_sha256, saved.model_hash);
    assert_eq!(back.metadata["sshs_model_hash"], saved.model_hash);
    assert_eq!(back.metadata["modelspec.title"], "not part of the hash");
}

#[test]
fn save_load_round_trip_in_each_dtype() {
    let reference = load_lora(fixture("kohya.safetensors"), UnknownKeys::Reject).unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("ss_output_name".to_string(), "round trip".to_string());
    meta.insert(
        "modelspec.trigger_phrase".to_string(),
        "myakumyaku-san".to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        let path = dir.path().join(format!("rt_{kind:?}.safetensors"));
        reference.set.save(&path, kind, &meta).unwrap();
        let back = load_lora(&path, UnknownKeys::Reject).unwrap();
        assert_eq!(back.format, LoraFormat::Kohya);
        assert_eq!(back.metadata["ss_output_name"], "round trip");
        assert_eq!(back.metadata["modelspec.trigger_phrase"], "myakumyaku-san");
        assert!(back.metadata.contains_key("sshs_legacy_hash"));
        assert_eq!(back.dtypes.len(), 1, "{:?}", back.dtypes);
        assert_eq!(back.set.len(), reference.set.len());
        for (k, a) in reference.set.iter() {
            let b = back.set.get(k).unwrap();
            assert_eq!(b.down().unwrap().kind(), kind);
            assert_eq!(
                b.alpha(),
                Tensor::from(a.alpha()).to_kind(kind).double_value(&[])
            );
            let want_down = a.down().unwrap().to_kind(kind);
            let want_up = a.up().unwrap().to_kind(kind);
            // bit-exact: equal after casting the reference to the saved dtype.
            assert!(
                b.down().unwrap().equal(&want_down),
                "{k} down differs in {kind:?}"
            );
            assert!(
                b.up().unwrap().equal(&want_up),
                "{k} up differs in {kind:?}"
            );
        }
    }
}

fn write(path: &std::path::Path, tensors: Vec<(&str, Tensor)>) {
    let t: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    let bytes = lora_core::io::serialize(&t, &BTreeMap::new()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn f32s(shape: &[i64]) -> Tensor {
    Tensor::ones(shape, (Kind::Float, Device::Cpu))
}

#[test]
fn bad_files_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    let name = "lora_unet_input_blocks_4_1_proj_in";

    write(
        &p,
        vec![(&format!("{name}.lora_down.weight"), f32s(&[4, 8]))],
    );
    let e = load_lora(&p, UnknownKeys::Reject).unwrap_err().to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains(name) && e.contains("no lora_up"),
        "{e}"
    );

    write(
        &p,
        vec![
            (&format!("{name}.lora_down.weight"), f32s(&[4, 8])),
            (&format!("{name}.lora_up.weight"), f32s(&[8, 2])),
        ],
    );
    let e = load_lora(&p, UnknownKeys::Reject).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("rank mismatch"), "{e}");

    write(
        &p,
        vec![
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                f32s(&[4, 4, 3, 3]),
            ),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                f32s(&[4]),
            ),
        ],
    );
    let err = load_lora(&p, UnknownKeys::Reject).unwrap_err();
    assert!(matches!(err, LoraError::NotALora { .. }));
    let e = err.to_string();
    assert!(
        e.contains("not a LoRA")
            && e.contains("checkpoint")
            && e.contains("model.diffusion_model."),
        "{e}"
    );

    write(
        &p,
        vec![
            (&format!("{name}.lora_down.weight"), f32s(&[4, 8])),
            (&format!("{name}.lora_up.weight"), f32s(&[8, 4])),
            (&format!("{name}.lora_mid.weight"), f32s(&[4, 4])),
            ("lora_unet_bogus_module.lora_down.weight", f32s(&[4, 8])),
        ],
    );
    let e = load_lora(&p, UnknownKeys::Reject).unwrap_err().to_string();
    assert!(
        e.contains("2 key(s)") && e.contains("lora_mid") && e.contains("bogus"),
        "{e}"
    );
    let lenient = load_lora(&p, UnknownKeys::Report).unwrap();
    assert_eq!(lenient.unknown_keys.len(), 2);
    assert_eq!(lenient.set.len(), 1);

    let nan = f32s(&[8, 4]);
    let _ = nan.get(0).get(0).fill_(f64::NAN);
    write(
        &p,
        vec![
            (&format!("{name}.lora_down.weight"), f32s(&[4, 8])),
            (&format!("{name}.lora_up.weight"), nan),
        ],
    );
    let l = load_lora(&p, UnknownKeys::Reject).unwrap();
    assert_eq!(l.warnings.len(), 1);
    assert!(
        l.warnings[0].contains("NaN") && l.warnings[0].contains("lora_up"),
        "{:?}",
        l.warnings
    );

    let good = std::fs::read(fixture("kohya.safetensors")).unwrap();
    std::fs::write(&p, &good[..good.len() / 2]).unwrap();
    let e = load_lora(&p, UnknownKeys::Reject).unwrap_err().to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains("truncated"),
        "{e}"
    );

    let e = load_lora(dir.path().join("missing.safetensors"), UnknownKeys::Reject)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");

    write(&p, vec![("some.random.tensor", f32s(&[2]))]);
    let e = load_lora(&p, UnknownKeys::Reject).unwrap_err().to_string();
    assert!(
        e.contains("no LoRA tensors") && e.contains("some.random.tensor"),
        "{e}"
    );
}
