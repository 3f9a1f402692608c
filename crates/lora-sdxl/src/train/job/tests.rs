use super::*;
use std::path::Path;

#[test]
fn template_parses_to_the_documented_defaults() {
    let t = JobConfig::template(
        Some("m.safetensors"),
        Some("data"),
        Some("myakumyaku-san"),
        None,
    );
    let c = JobConfig::parse(Path::new("job.toml"), &t).unwrap();
    assert_eq!(c.job.name, "myakumyaku-san");
    assert_eq!(c.job.trigger_word.as_deref(), Some("myakumyaku-san"));
    assert_eq!(
        (
            c.network.linear,
            c.network.linear_alpha,
            c.network.conv,
            c.network.conv_alpha
        ),
        (16, 16.0, 8, 8.0)
    );
    assert_eq!(
        (c.save.save_every, c.save.max_step_saves_to_keep),
        (100, 30)
    );
    assert_eq!(
        (
            c.train.batch_size,
            c.train.gradient_accumulation,
            c.train.steps
        ),
        (2, 2, 3000)
    );
    assert_eq!(c.train.lr, 7e-5);
    assert_eq!(c.datasets[0].resolution, vec![512, 768]);
    assert!(c.sample.disable);
    // the template's values equal the serde defaults
    assert_eq!(c.network, NetworkSection::default());
    assert_eq!(c.save, SaveSection::default());
    assert_eq!(c.train, TrainSection::default());
}

#[test]
fn unknown_keys_name_the_closest_valid_one() {
    let e = JobConfig::parse(Path::new("job.toml"), "[train]\nlearning_rate = 1e-4\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("job.toml") && e.contains("train.learning_rate") && e.contains("unknown key"),
        "{e}"
    );
    let e = JobConfig::parse(Path::new("job.toml"), "[train]\nstpes = 10\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `steps`"), "{e}");
    let e = JobConfig::parse(Path::new("job.toml"), "[[datasets]]\nfolder = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("datasets[0].folder") && e.contains("folder_path"),
        "{e}"
    );
    let e = JobConfig::parse(Path::new("job.toml"), "[netwrok]\nlinear = 4\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `network`"), "{e}");
    let e = JobConfig::parse(Path::new("job.toml"), "[train]\nsteps = \"many\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("job.toml") && e.contains("steps"), "{e}");
    let e = JobConfig::parse(Path::new("job.toml"), "[train\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("syntax"), "{e}");
}

#[test]
fn values_are_validated_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    std::fs::write(&model, b"x").unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let base = JobConfig::template(model.to_str(), data.to_str(), Some("trig"), None);
    let job = dir.path().join("job.toml");
    let check = |edit: &dyn Fn(&mut JobConfig)| {
        let mut c = JobConfig::parse(&job, &base).unwrap();
        edit(&mut c);
        c.validate(&job).err().map(|e| e.to_string())
    };
    assert_eq!(check(&|_| {}), None);
    type Edit = Box<dyn Fn(&mut JobConfig)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|c| c.train.lr = -1e-4), "train.lr"),
        (
            Box::new(|c| c.model.name_or_path = "/nope.safetensors".into()),
            "model.name_or_path",
        ),
        (
            Box::new(|c| c.datasets[0].resolution = vec![500]),
            "datasets[0].resolution",
        ),
        (Box::new(|c| c.datasets.clear()), "datasets"),
        (
            Box::new(|c| c.datasets[0].folder_path = "/no/such/dir".into()),
            "datasets[0].folder_path",
        ),
        (Box::new(|c| c.network.linear = 0), "network.linear"),
        (
            Box::new(|c| c.train.optimizer = "sgd".into()),
            "train.optimizer",
        ),
        (
            Box::new(|c| c.train.min_timestep = 1000),
            "train.min_timestep",
        ),
        (
            Box::new(|c| c.job.device = Some("gpu".into())),
            "job.device",
        ),
        (
            Box::new(|c| {
                c.sample.disable = false;
                c.sample.prompts.clear();
            }),
            "sample.prompts",
        ),
        (Box::new(|c| c.save.dtype = "int8".into()), "save.dtype"),
        (Box::new(|c| c.train.dtype = "fp16".into()), "underflow"),
        (
            Box::new(|c| {
                c.train.cache_text_embeddings = true;
                c.train.train_text_encoder = true;
            }),
            "train.cache_text_embeddings",
        ),
        (
            Box::new(|c| {
                c.train.cache_text_embeddings = true;
                c.datasets[0].caption_dropout_rate = 0.1;
            }),
            "datasets[0].caption_dropout_rate",
        ),
    ];
    for (edit, field) in cases {
        let e = check(&*edit).unwrap_or_else(|| panic!("{field}: expected an error"));
        assert!(e.contains(field) && e.contains("job.toml"), "{field}: {e}");
    }
    // issue 28: settings accepted without effect are refused, and accepted
    // where they act
    let alone = check(&|c| c.train.text_encoder_lr = Some(1e-5)).unwrap();
    assert!(
        alone.contains("train.text_encoder_lr") && alone.contains("train_text_encoder = false")
    );
    let acting = |c: &mut JobConfig| {
        c.train.text_encoder_lr = Some(1e-5);
        c.train.train_text_encoder = true;
    };
    assert_eq!(check(&acting), None);
    // adafactor's relative step ignores every rate but a block weight of 0
    let relative = |c: &mut JobConfig| c.train.optimizer = "adafactor".into();
    let fixed = |c: &mut JobConfig| {
        c.train.optimizer = "adafactor".into();
        let off = [("relative_step", false), ("scale_parameter", false)];
        c.train.optimizer_args = off
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
    };
    type Setting = (fn(&mut JobConfig), &'static str);
    let rates: [Setting; 3] = [
        (
            |c| c.train.loraplus_lr_ratio = Some(16.0),
            "train.loraplus_lr_ratio",
        ),
        (
            |c| {
                c.train.train_text_encoder = true;
                c.train.text_encoder_lr = Some(1e-5);
            },
            "train.text_encoder_lr",
        ),
        (
            |c| c.train.mid_lr_weight = Some(vec![1.0, 0.5, 1.0]),
            "train.down_lr_weight",
        ),
    ];
    for (set, field) in rates {
        let e = check(&|c| {
            relative(c);
            set(c);
        })
        .unwrap_or_else(|| panic!("{field}: accepted with relative_step"));
        assert!(
            e.contains(field) && e.contains("relative_step = false"),
            "{e}"
        );
        assert_eq!(
            check(&|c| {
                fixed(c);
                set(c);
            }),
            None,
            "{field} acts without relative_step"
        );
    }
    assert_eq!(
        check(&|c| {
            relative(c);
            c.train.mid_lr_weight = Some(vec![1.0, 0.0, 1.0]);
        }),
        None,
        "a weight of 0 removes the block's LoRA: it acts"
    );
    let alone = check(&|c| c.train.lr_scheduler_num_cycles = 3).unwrap();
    assert!(alone.contains("train.lr_scheduler_num_cycles"), "{alone}");
    let acting = |c: &mut JobConfig| {
        c.train.lr_scheduler_num_cycles = 3;
        c.train.lr_scheduler = "cosine_with_restarts".into();
    };
    assert_eq!(check(&acting), None);
    let alone = check(&|c| c.train.block_lr_zero_threshold = 0.5).unwrap();
    assert!(alone.contains("train.block_lr_zero_threshold"), "{alone}");
    let acting = |c: &mut JobConfig| {
        c.train.block_lr_zero_threshold = 0.5;
        c.train.mid_lr_weight = Some(vec![1.0, 0.4, 1.0]);
    };
    assert_eq!(check(&acting), None);
}

#[test]
fn the_field_table_lists_every_key_once() {
    use super::fields::{keys_of, FIELDS, SECTIONS};
    // every key a job can hold (Options set so that they serialise)
    let mut c = JobConfig::default();
    c.job.trigger_word = Some("t".into());
    c.job.device = Some("cpu".into());
    c.model.prediction = Some("epsilon".into());
    c.model.zero_terminal_snr = Some(true);
    c.train.text_encoder_lr = Some(1e-4);
    c.train.weight_decay = Some(0.01);
    c.train.min_snr_gamma = Some(5.0);
    c.train.loraplus_lr_ratio = Some(16.0);
    c.train.ema_decay = Some(0.999);
    c.train.ema_power = Some(0.67);
    c.train.vram = Some("24gb".into());
    c.job.id = Some("5e1f0c2a9b7d4e63".into());
    c.train.sigmoid_scale = Some(5.0);
    c.train.diff_output_preservation_class = Some("person".into());
    c.train.down_lr_weight = Some(super::BlockWeights::Preset("sine".into()));
    c.train.mid_lr_weight = Some(vec![1.0; 3]);
    c.train.up_lr_weight = Some(super::BlockWeights::List(vec![1.0; 9]));
    c.network.block_dims = Some(vec![4; 23]);
    c.network.block_alphas = Some(vec![4.0; 23]);
    c.network.conv_block_dims = Some(vec![4; 23]);
    c.network.conv_block_alphas = Some(vec![4.0; 23]);
    c.train.optimizer_args = [("betas".to_string(), toml::Value::from(vec![0.9, 0.999]))].into();
    c.validation = ValidationSection {
        every: Some(1),
        images: Some(1),
        seed: Some(1),
    };
    c.datasets.push(DatasetSection {
        mask_path: Some("masks".into()),
        ..Default::default()
    });
    let v = toml::Value::try_from(&c).unwrap();
    let top: Vec<&str> = v.as_table().unwrap().keys().map(|k| k.as_str()).collect();
    let mut sections: Vec<&str> = SECTIONS.iter().map(|(s, _)| *s).collect();
    sections.sort();
    let mut top_sorted = top.clone();
    top_sorted.sort();
    assert_eq!(top_sorted, sections);
    for s in top {
        let table = match &v[s] {
            toml::Value::Array(a) => a[0].as_table().unwrap().clone(),
            t => t.as_table().unwrap().clone(),
        };
        let mut have: Vec<&str> = table.keys().map(|k| k.as_str()).collect();
        have.sort();
        let mut listed = keys_of(s);
        listed.sort();
        assert_eq!(have, listed, "[{s}]");
    }
    // no key twice
    let mut all: Vec<String> = FIELDS.iter().map(|f| f.path()).collect();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n);
}

#[test]
fn the_template_shows_every_key_with_its_help_and_range() {
    let t = JobConfig::template(None, None, None, None);
    for f in super::fields::FIELDS {
        let line = t
            .lines()
            .find(|l| {
                l.trim_start_matches("# ")
                    .starts_with(&format!("{} = ", f.key))
                    && l.contains(f.help)
            })
            .unwrap_or_else(|| panic!("{} is not in the template:\n{t}", f.path()));
        if let Some(r) = f.rule.describe() {
            assert!(line.contains(&r), "{}: {line}", f.path());
        }
    }
    // a rule's range is what validation enforces and what its message says
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    let mut c = JobConfig::parse(&job, &t).unwrap();
    c.network.linear = 2000;
    c.model.name_or_path = job.clone();
    std::fs::write(&job, "x").unwrap();
    let e = c.validate(&job).unwrap_err().to_string();
    assert!(
        e.contains("network.linear") && e.contains("[1, 1024]"),
        "{e}"
    );
}
