//! `GET /api/job-fields`: the New Job form's fields. Which keys the form
//! shows, and their labels, are chosen here; each one's default, choices,
//! range and help come from the trainer's own field table and defaults
//! (`lora_sdxl::train::job::fields`), so the page copies none of them.

use axum::Json;
use lora_sdxl::train::job::fields::{Rule, FIELDS};
use lora_sdxl::train::job::JobDefaults;
use serde_json::{json, Value};

/// One field of the form: its key, its label, and for an alpha the rank it
/// follows (alpha = rank, the walkthrough's and AI Toolkit's convention,
/// unless the user sets it).
struct FormField {
    key: &'static str,
    label: &'static str,
    follows: Option<&'static str>,
}

const fn field(key: &'static str, label: &'static str) -> FormField {
    FormField {
        key,
        label,
        follows: None,
    }
}

/// The walkthrough's table, in the form's order.
const FORM: &[FormField] = &[
    field("job.trigger_word", "Trigger word"),
    field("network.linear", "Linear rank"),
    FormField {
        key: "network.linear_alpha",
        label: "Linear alpha",
        follows: Some("network.linear"),
    },
    field("network.conv", "Conv rank"),
    FormField {
        key: "network.conv_alpha",
        label: "Conv alpha",
        follows: Some("network.conv"),
    },
    field("save.save_every", "Save every (steps)"),
    field("save.max_step_saves_to_keep", "Keep (checkpoints)"),
    field("train.batch_size", "Batch size"),
    field("train.gradient_accumulation", "Gradient accumulation"),
    field("train.steps", "Steps"),
    field("train.lr", "Learning rate"),
    field("datasets.resolution", "Resolutions"),
    field("sample.disable", "Sampling off"),
    field("job.device", "Device"),
    field("train.dtype", "Precision of the base model"),
];

/// `job.device` is checked by hand (`cuda:N` too); the form offers these
/// (`""`: CUDA when available).
const DEVICES: &[&str] = &["", "cuda", "cpu"];

/// `GET /api/job-fields`: `[{key, label, kind, default, choices, range,
/// help, follows}]`; `kind` is `text`, `int`, `float`, `ints`, `bool` or
/// `select`.
pub async fn list() -> Json<Value> {
    Json(Value::Array(form_fields()))
}

fn form_fields() -> Vec<Value> {
    let defaults = JobDefaults::new();
    FORM.iter()
        .filter_map(|f| {
            let spec = FIELDS.iter().find(|x| x.path() == f.key)?;
            let default = defaults.get(spec.section, spec.key);
            let choices: Option<Vec<&str>> = match spec.rule {
                Rule::OneOf(names) => Some(names.to_vec()),
                _ if f.key == "job.device" => Some(DEVICES.to_vec()),
                _ => None,
            };
            let kind = match (&choices, default) {
                (Some(_), _) => "select",
                (None, Some(toml::Value::Boolean(_))) => "bool",
                (None, Some(toml::Value::Integer(_))) => "int",
                (None, Some(toml::Value::Float(_))) => "float",
                (None, Some(toml::Value::Array(_))) => "ints",
                _ => "text",
            };
            let default = match default {
                Some(v) => serde_json::to_value(v).unwrap_or(Value::Null),
                None => json!(""),
            };
            Some(json!({
                "key": f.key, "label": f.label, "kind": kind, "default": default,
                "choices": choices, "range": spec.rule.describe(), "help": spec.help,
                "follows": f.follows,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_comes_from_the_trainers_table() {
        let fields = form_fields();
        assert_eq!(fields.len(), FORM.len(), "every form key is a job key");
        let get = |k: &str| fields.iter().find(|f| f["key"] == k).unwrap().clone();
        // defaults are the trainer's (issue 27: a copy lived in jobs.js)
        let d = lora_sdxl::JobConfig::default();
        assert_eq!(get("network.linear")["default"], d.network.linear);
        assert_eq!(get("train.lr")["default"], d.train.lr);
        assert_eq!(get("train.lr")["kind"], "float");
        assert_eq!(get("datasets.resolution")["default"], json!([512, 768]));
        assert_eq!(get("sample.disable")["kind"], "bool");
        // choices are the plan's lists
        let dtype = get("train.dtype");
        assert_eq!(dtype["kind"], "select");
        assert_eq!(
            dtype["choices"],
            json!(lora_sdxl::train::plan::TrainDtype::NAMES)
        );
        // the alphas are on the form and follow their ranks
        let alpha = get("network.linear_alpha");
        assert_eq!(alpha["follows"], "network.linear");
        assert_eq!(alpha["default"], d.network.linear_alpha);
        assert_eq!(get("network.conv_alpha")["follows"], "network.conv");
        assert!(get("train.steps")["range"]
            .as_str()
            .unwrap()
            .starts_with('≥'));
    }
}
