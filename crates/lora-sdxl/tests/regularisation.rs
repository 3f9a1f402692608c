//! Regularisation images in real runs: `prior_loss_weight` changes what is
//! trained, the reg images get a validation loss of their own (report,
//! event and `loss.csv`), the epoch counts them as kohya does, and settings
//! without effect are refused.

mod common;
use lora_sdxl::train::job::DatasetSection;
use lora_sdxl::train::{train_with, Event, ObserveFn};

#[derive(Default)]
struct Seen {
    epoch: Option<u64>,
    reg_dataset: Option<(bool, u64)>,
    reg_losses: Vec<f64>,
}

impl Seen {
    fn see(&mut self, e: &Event) {
        match e {
            Event::Started {
                samples_per_epoch,
                datasets,
                ..
            } => {
                self.epoch = Some(*samples_per_epoch);
                self.reg_dataset = datasets.get(1).map(|d| (d.is_reg, d.samples_per_epoch));
            }
            Event::Validation { reg_loss, .. } => self.reg_losses.extend(*reg_loss),
            _ => {}
        }
    }
}

#[test]
fn prior_loss_weight_and_reg_validation() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, data) = common::tiny_model_and_dataset(root, 4);
    let reg_dir = root.join("reg");
    lora_data::synthetic::write_character_dataset(&reg_dir, 3, 256, 256, "other", 9).unwrap();
    let run = |name: &str, edit: &dyn Fn(&mut lora_sdxl::JobConfig)| {
        let (mut c, path) = common::small_cpu_job(root, &model, &data, name);
        c.train.steps = 3;
        c.datasets.push(DatasetSection {
            folder_path: reg_dir.clone(),
            resolution: vec![256],
            is_reg: true,
            ..Default::default()
        });
        edit(&mut c);
        let mut seen = Seen::default();
        let r = train_with(
            &c,
            &path,
            &common::quiet(),
            vec![Box::new(ObserveFn(|e: &Event| seen.see(e)))],
        )
        .unwrap();
        let lora = common::sorted_tensors(r.last_lora.as_ref().unwrap());
        (r, lora, seen)
    };
    let (r1, a, seen) = run("w1", &|_| {});
    let (_, b, _) = run("w02", &|c| c.train.prior_loss_weight = 0.2);
    assert!(
        a.iter().zip(&b).any(|((_, x), (_, y))| !x.equal(y)),
        "prior_loss_weight had no effect"
    );
    // 4 train samples; 3 reg images balanced up to 4 samples (kohya)
    assert_eq!(seen.epoch, Some(8));
    assert_eq!(seen.reg_dataset, Some((true, 4)));
    // a validation loss of their own, before training and at the end
    assert_eq!(r1.reg_val_losses.len(), r1.val_losses.len());
    assert!(r1.reg_val_losses.len() >= 2 && seen.reg_losses.len() == r1.reg_val_losses.len());
    // effect: at the same steps, a loss of other images (not a copy)
    assert!(r1
        .reg_val_losses
        .iter()
        .zip(&r1.val_losses)
        .all(|(r, v)| r.0 == v.0 && r.1 != v.1));
    let csv = std::fs::read_to_string(r1.run_dir.join("loss.csv")).unwrap();
    assert!(
        csv.starts_with("step,loss,lr,val_loss,seconds,val_reg_loss\n"),
        "{csv}"
    );
    let last = csv.lines().last().unwrap();
    assert!(
        last.split(',')
            .nth(5)
            .is_some_and(|v| v.parse::<f64>().is_ok()),
        "{last}"
    );
    let meta = lora_core::io::read_tensors(r1.last_lora.as_ref().unwrap())
        .unwrap()
        .metadata;
    assert_eq!(meta["ss_num_reg_images"], "3");
    assert_eq!(meta["ss_num_train_images"], "4");
    // issue 28: the reg folder's tags are counted as trained, without the
    // trigger; the training folder's with it
    let tags: serde_json::Value = serde_json::from_str(&meta["ss_tag_frequency"]).unwrap();
    assert!(
        tags["1_reg"].is_object() && tags["1_reg"].get("myaku").is_none(),
        "{tags}"
    );
    assert_eq!(tags["1_data"]["myaku"], 4, "{tags}");

    // issue 28: the reg set was measured with the trigger in its captions
    // (training never gives it one), so val_reg_loss followed the trigger.
    // With a trigger word the captions lack and without one: the same reg
    // loss before training, bit for bit (same weights, images, noise,
    // captions); the training images' loss differs (the trigger is
    // inserted into their captions only).
    let (with, _, _) = run("triggered", &|c| {
        c.train.steps = 1;
        c.job.trigger_word = Some("zzkw-san".into());
    });
    let (without, _, _) = run("untriggered", &|c| {
        c.train.steps = 1;
        c.job.trigger_word = None;
    });
    assert_eq!(with.reg_val_losses[0], without.reg_val_losses[0]);
    assert_ne!(with.val_losses[0], without.val_losses[0]);

    // refused: only reg datasets; a prior weight without reg images
    let (mut c, path) = common::small_cpu_job(root, &model, &data, "bad");
    c.train.prior_loss_weight = 0.5;
    let e = c.validate(&path).unwrap_err().to_string();
    assert!(e.contains("train.prior_loss_weight"), "{e}");
    c.train.prior_loss_weight = 1.0;
    c.datasets[0].is_reg = true;
    let e = c.validate(&path).unwrap_err().to_string();
    assert!(e.contains("datasets") && e.contains("is_reg"), "{e}");
}
