//! End-to-end tests of the `lorakit` binary. Every run clears
//! LD_LIBRARY_PATH: the binary must find libtorch through its rpath.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lorakit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LORAKIT_LOG")
        .output()
        .expect("run lorakit")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lora-core/tests/fixtures")
        .join(name)
}

#[test]
fn version_reports_libtorch_and_cuda() {
    let o = lorakit(&["--version"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("libtorch 2.11.0"), "{out}");
    assert!(out.contains("CUDA"), "{out}");
}

#[test]
fn inspect_reads_each_format() {
    for (file, format) in [
        ("kohya.safetensors", "kohya (LDM names)"),
        ("ai_toolkit.safetensors", "AI Toolkit"),
        ("peft.safetensors", "diffusers/PEFT"),
        ("diffusers_legacy.safetensors", "attention-processor"),
    ] {
        let o = lorakit(&["lora", "inspect", fixture(file).to_str().unwrap()]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{file}: {err}");
        assert!(out.contains(format), "{file}: {out}");
        assert!(
            out.contains("unet     13  (linear 8, conv 1x1 1, conv kxk 4)"),
            "{file}: {out}"
        );
        assert!(
            out.contains("te1       3") && out.contains("te2       2"),
            "{out}"
        );
    }
}

fn write_safetensors(path: &Path, keys: &[(&str, &[usize])]) {
    // A minimal hand-written safetensors file of zeros (F32).
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (k, shape) in keys {
        let n: usize = shape.iter().product::<usize>() * 4;
        header.insert(
            k.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(vec![0u8; offset]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_input_is_one_clear_error_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("sd_xl_base_1.0.safetensors");
    write_safetensors(
        &ckpt,
        &[
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                &[4, 4, 3, 3],
            ),
            ("first_stage_model.decoder.conv_in.weight", &[4, 4, 3, 3]),
        ],
    );
    let o = lorakit(&["lora", "inspect", ckpt.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.starts_with("error: ") && err.contains("sd_xl_base_1.0.safetensors"),
        "{err}"
    );
    assert!(
        err.contains("not a LoRA") && err.contains("model.diffusion_model.input_blocks.0.0.weight"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let cut = dir.path().join("cut.safetensors");
    let good = std::fs::read(fixture("kohya.safetensors")).unwrap();
    std::fs::write(&cut, &good[..good.len() - 100]).unwrap();
    let o = lorakit(&["lora", "inspect", cut.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("cut.safetensors") && err.contains("truncated"),
        "{err}"
    );

    let o = lorakit(&[
        "lora",
        "inspect",
        dir.path().join("nope.safetensors").to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("nope.safetensors") && err.contains("No such file"),
        "{err}"
    );

    let o = lorakit(&["lora", "frobnicate"]);
    assert!(!o.status.success());
}

#[test]
fn demo_writes_a_loadable_lora() {
    let dir = tempfile::tempdir().unwrap();
    let o = lorakit(&["demo", "--out", dir.path().to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let file = dir.path().join("demo_lora.safetensors");
    assert!(file.exists(), "{out}");
    assert!(
        out.contains("unet    788") && out.contains("te2     192"),
        "{out}"
    );
    let o = lorakit(&["lora", "inspect", file.to_str().unwrap()]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.contains("F16 ×3156") && out.contains("trigger            myakumyaku-san"),
        "{out}"
    );
    // nothing but the final file (no temp files) is left behind
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}
