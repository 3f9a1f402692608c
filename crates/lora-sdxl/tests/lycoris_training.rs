//! `network.type = "loha" | "lokr"` in real runs: the LoRA trains (its
//! validation loss falls), the file holds LyCORIS' keys and metadata for the
//! same modules a LoRA run trains, a resumed run equals a straight one, and
//! settings LyCORIS types do not have are refused.

mod common;
use lora_sdxl::train::{train, TrainOptions};

fn names(lora: &[(String, tch::Tensor)]) -> std::collections::BTreeSet<String> {
    lora.iter()
        .map(|(k, _)| k.split('.').next().unwrap().to_string())
        .collect()
}

#[test]
fn loha_and_lokr_train_save_as_lycoris_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, data) = common::tiny_model_and_dataset(root, 4);
    let job = |name: &str, kind: &str| {
        let (mut c, path) = common::small_cpu_job(root, &model, &data, name);
        c.network.r#type = kind.into();
        if kind == "lokr" {
            c.network.factor = 4;
        }
        c.train.steps = 8;
        c.save.save_every = 4;
        c.validation.images = Some(2);
        (c, path)
    };
    let (c, path) = job("lora", "lora");
    let lora = train(&c, &path, &common::quiet()).unwrap();
    let lora_modules = names(&common::sorted_tensors(lora.last_lora.as_ref().unwrap()));
    for kind in ["loha", "lokr", "dora"] {
        let (mut c, path) = job(kind, kind);
        if kind == "dora" {
            c.network.r#type = "lora".into();
            c.network.dora = true;
        }
        let r = train(&c, &path, &common::quiet()).unwrap();
        let v: Vec<f64> = r.val_losses.iter().map(|(_, v)| *v).collect();
        assert!(
            v[v.len() - 1] < v[0] * 0.99,
            "{kind}: validation loss did not fall: {v:?}"
        );
        let file = r.last_lora.clone().unwrap();
        let loaded = lora_core::load_lora(&file, lora_core::UnknownKeys::Reject).unwrap();
        assert_eq!(loaded.format, lora_core::LoraFormat::Lycoris, "{kind}");
        assert_eq!(loaded.metadata["ss_network_module"], "lycoris.kohya");
        let args: serde_json::Value =
            serde_json::from_str(&loaded.metadata["ss_network_args"]).unwrap();
        let tensors = common::sorted_tensors(&file);
        assert_eq!(
            names(&tensors),
            lora_modules,
            "{kind}: the same modules as a LoRA run"
        );
        let (algo, first, zero_init) = match kind {
            "loha" => ("loha", ".hada_w1_a", ".hada_w2_a"),
            "lokr" => ("lokr", ".lokr_w1", ".lokr_w2_b"),
            _ => ("lora", ".lora_down.weight", ".lora_up.weight"),
        };
        assert_eq!(args["algo"], algo);
        assert!(tensors.iter().any(|(k, _)| k.ends_with(first)), "{kind}");
        // something was learned: a factor that starts at zero moved
        assert!(tensors
            .iter()
            .any(|(k, t)| k.ends_with(zero_init) && t.abs().max().double_value(&[]) > 0.0));
        if kind == "dora" {
            assert_eq!(args["dora_wd"], "True");
            assert_eq!(args["wd_on_output"], "False");
            let mut n = 0;
            for (k, t) in tensors.iter().filter(|(k, _)| k.ends_with(".dora_scale")) {
                let s = t.size();
                assert!(
                    s[0] == 1 && s.len() >= 2,
                    "{k}: {s:?} is not the input-axis form"
                );
                n += 1;
            }
            assert_eq!(n, lora_modules.len(), "a magnitude per module");
        } else {
            assert!(
                !tensors
                    .iter()
                    .any(|(k, _)| k.contains("lora_down") || k.contains("dora")),
                "{kind}"
            );
        }
    }

    // lokr: 4 steps, then --resume to 8, equals the straight run
    let (mut c, path) = job("lokr_resumed", "lokr");
    c.train.steps = 4;
    train(&c, &path, &common::quiet()).unwrap();
    c.train.steps = 8;
    let resumed = TrainOptions {
        resume: true,
        ..common::quiet()
    };
    let r = train(&c, &path, &resumed).unwrap();
    let a = common::sorted_tensors(r.last_lora.as_ref().unwrap());
    let b = common::sorted_tensors(&root.join("out/lokr/lokr.safetensors"));
    assert!(
        a.iter()
            .zip(&b)
            .all(|((ka, x), (kb, y))| ka == kb && x.equal(y)),
        "a resumed lokr run differs from the straight one"
    );

    // refused: what LyCORIS types do not have, LoKr settings elsewhere
    let refuse = |edit: &dyn Fn(&mut lora_sdxl::JobConfig), field: &str| {
        let (mut c, path) = job("bad", "loha");
        edit(&mut c);
        let e = c.validate(&path).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    };
    refuse(&|c| c.network.dropout = 0.1, "network.dropout");
    refuse(
        &|c| c.train.loraplus_lr_ratio = Some(4.0),
        "train.loraplus_lr_ratio",
    );
    refuse(&|c| c.network.factor = 8, "network.factor");
    refuse(
        &|c| {
            c.network.r#type = "locon".into();
            c.network.conv = 0;
        },
        "network.conv",
    );
}

/// Issue 28: LoKr modules whose two Kronecker factors are both full train
/// at scale 1 whatever the alpha (as in LyCORIS); the run now says which,
/// the file records how many, and their saved alpha is the one they use.
#[test]
fn lokr_names_the_modules_that_ignore_the_alpha() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, data) = common::tiny_model_and_dataset(root, 2);
    // factor 4 on the tiny model's 64-wide layers: w1 4×4, w2 16×16, and
    // w2 is decomposed only below rank 8 (LyCORIS' rule)
    let run = |name: &str, rank: i64| {
        let (mut c, path) = common::small_cpu_job(root, &model, &data, name);
        c.network.r#type = "lokr".into();
        c.network.factor = 4;
        c.network.linear = rank;
        c.network.linear_alpha = 1.0;
        c.network.conv = 0;
        c.train.steps = 1;
        let mut notes = Vec::new();
        let see = |e: &lora_sdxl::train::Event| {
            if let lora_sdxl::train::Event::Started { notes: n, .. } = e {
                notes = n.clone();
            }
        };
        let r = lora_sdxl::train::train_with(
            &c,
            &path,
            &common::quiet(),
            vec![Box::new(lora_sdxl::train::ObserveFn(see))],
        )
        .unwrap();
        let file = r.last_lora.unwrap();
        (notes, lora_core::io::read_tensors(&file).unwrap())
    };
    let (notes, st) = run("full", 8);
    let note = notes
        .iter()
        .find(|n| n.starts_with("LoKr:"))
        .expect("a note");
    assert!(
        note.contains("scale 1") && note.contains("linear_alpha = 1.0"),
        "{note}"
    );
    let full: Vec<&str> = (st.tensors.iter())
        .filter_map(|(k, _)| k.strip_suffix(".lokr_w2"))
        .filter(|m| st.tensors.iter().any(|(k, _)| *k == format!("{m}.lokr_w1")))
        .collect();
    assert!(!full.is_empty());
    assert_eq!(
        st.metadata["lorakit.lokr_scale_1_modules"],
        full.len().to_string()
    );
    let alpha = |m: &str| {
        let key = format!("{m}.alpha");
        let t = &st.tensors.iter().find(|(k, _)| *k == key).unwrap().1;
        t.double_value(&[])
    };
    for m in &full {
        assert_eq!(
            alpha(m),
            8.0,
            "{m}: the saved alpha is the scale it trained at (8 / 8)"
        );
    }
    // decomposed modules keep the job's alpha
    let decomposed = (st.tensors.iter()).find_map(|(k, _)| k.strip_suffix(".lokr_w2_a"));
    if let Some(m) = decomposed {
        assert_eq!(alpha(m), 1.0);
    }
    // below rank 8 every w2 is decomposed: nothing to say
    let (notes, st) = run("decomposed", 4);
    assert!(!notes.iter().any(|n| n.starts_with("LoKr:")), "{notes:?}");
    assert!(!st.metadata.contains_key("lorakit.lokr_scale_1_modules"));
}
