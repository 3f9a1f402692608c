//! kohya `ss_*` and SAI `modelspec.*` metadata, written the way kohya's
//! sd-scripts writes it (every value a string, Python spellings: `True`,
//! `None`, `7e-05`, `16.0`, `(1024, 1024)`), so A1111/Forge/ComfyUI show it.

use serde_json::json;
use std::collections::BTreeMap;

/// Prediction type of the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prediction {
    /// ε-prediction (SDXL base, Illustrious, Pony).
    #[default]
    Epsilon,
    /// v-prediction (NoobAI-XL v-pred and similar).
    V,
}

impl Prediction {
    /// The names a job file or a diffusers scheduler config gives them.
    pub const NAMES: &'static [&'static str] = &["epsilon", "v_prediction"];

    /// Its name in a job file or a scheduler config (`prediction_type`).
    ///
    /// ```
    /// use lora_core::Prediction;
    /// assert_eq!(Prediction::parse("v_prediction").map(Prediction::name), Some("v_prediction"));
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::V => "v_prediction",
        }
    }

    /// From its name (`None` for a name not in [`Prediction::NAMES`]).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "epsilon" => Some(Self::Epsilon),
            "v_prediction" => Some(Self::V),
            _ => None,
        }
    }
}

/// What a LoRA file says about how it was trained. Fields map one-to-one to
/// kohya's keys; `extra` carries any further `ss_*` key verbatim.
#[derive(Debug, Clone, Default)]
pub struct TrainingMetadata {
    /// `ss_output_name` / `modelspec.title` (A1111 uses it as the alias).
    pub output_name: String,
    /// Linear rank (`ss_network_dim`).
    pub network_dim: i64,
    /// Linear alpha (`ss_network_alpha`).
    pub network_alpha: f64,
    /// Conv rank for 3x3 convs (LoCon), in `ss_network_args`.
    pub conv_dim: Option<i64>,
    /// Conv alpha, in `ss_network_args`.
    pub conv_alpha: Option<f64>,
    /// `ss_network_dropout`.
    pub network_dropout: Option<f64>,
    /// rank_dropout network arg.
    pub rank_dropout: Option<f64>,
    /// module_dropout network arg.
    pub module_dropout: Option<f64>,
    /// `ss_network_module` (`None`: kohya's `networks.lora`; LyCORIS files:
    /// `lycoris.kohya`).
    pub network_module: Option<String>,
    /// Further `ss_network_args` entries as kohya writes them (block-wise
    /// `block_dims`, `down_lr_weight`, …), each value a string.
    pub network_args: Vec<(String, String)>,
    /// Global step at save time (`ss_steps`).
    pub steps: u64,
    /// Epoch at save time (`ss_epoch`).
    pub epoch: u64,
    /// `ss_max_train_steps`.
    pub max_train_steps: Option<u64>,
    /// `ss_learning_rate` (and `ss_unet_lr`).
    pub learning_rate: f64,
    /// `ss_text_encoder_lr`.
    pub text_encoder_lr: Option<f64>,
    /// Training resolution (w, h) → `ss_resolution` and `modelspec.resolution`.
    pub resolution: (u32, u32),
    /// `ss_tag_frequency`: dataset folder → tag → images containing it.
    pub tag_frequency: BTreeMap<String, BTreeMap<String, u64>>,
    /// `ss_bucket_info` JSON (`{"buckets": {...}, "mean_img_ar_error": f}`).
    pub bucket_info: Option<serde_json::Value>,
    /// `ss_seed`.
    pub seed: u64,
    /// `ss_training_started_at` (unix seconds).
    pub training_started_at: f64,
    /// `ss_training_finished_at` (unix seconds), `None` for mid-run saves.
    pub training_finished_at: Option<f64>,
    /// `ss_sd_model_name` (basename of the base checkpoint).
    pub sd_model_name: Option<String>,
    /// `modelspec.prediction_type`.
    pub prediction: Prediction,
    /// `modelspec.trigger_phrase`.
    pub trigger_phrase: Option<String>,
    /// `modelspec.title` override (defaults to `output_name`).
    pub title: Option<String>,
    /// Further `ss_*` (or other) keys, written verbatim.
    pub extra: BTreeMap<String, String>,
}

/// Python `repr(float)`: `1.0`, `7e-05`, `0.0001`, `16.0`, `1e+16`.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{x:e}"); // shortest round-trip, e.g. "7e-5", "1.5e0"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Python `str(bool)`.
pub fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.to_string()
}

/// Python `str(Optional[float])`.
pub fn py_opt_float(x: Option<f64>) -> String {
    x.map(py_float).unwrap_or_else(|| "None".into())
}

/// `YYYY-MM-DDTHH:MM:SS` for unix seconds (UTC; kohya writes local time in the same shape).
pub fn iso8601(unix_seconds: f64) -> String {
    let secs = unix_seconds.max(0.0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Current unix time in seconds.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl TrainingMetadata {
    /// All metadata keys as kohya writes them (without the `sshs_*` hashes,
    /// which are added when the file is serialised).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put(
            "ss_network_module",
            self.network_module
                .clone()
                .unwrap_or_else(|| "networks.lora".into()),
        );
        put("ss_network_dim", self.network_dim.to_string());
        put("ss_network_alpha", py_float(self.network_alpha));
        put("ss_network_dropout", py_opt_float(self.network_dropout));
        let mut args = serde_json::Map::new();
        if let Some(c) = self.conv_dim {
            args.insert("conv_dim".into(), json!(c.to_string()));
            args.insert(
                "conv_alpha".into(),
                json!(py_float(self.conv_alpha.unwrap_or(c as f64))),
            );
        }
        if let Some(p) = self.rank_dropout {
            args.insert("rank_dropout".into(), json!(py_float(p)));
        }
        if let Some(p) = self.module_dropout {
            args.insert("module_dropout".into(), json!(py_float(p)));
        }
        // kohya writes `"dropout": null` when unused; lorakit writes only
        // what was used (no nulls for tools that parse the args as strings)
        if let Some(p) = self.network_dropout {
            args.insert("dropout".into(), json!(p));
        }
        for (k, v) in &self.network_args {
            args.insert(k.clone(), json!(v));
        }
        put(
            "ss_network_args",
            serde_json::Value::Object(args).to_string(),
        );
        put("ss_v2", py_bool(false));
        put("ss_base_model_version", "sdxl_base_v1-0".into());
        put("ss_output_name", self.output_name.clone());
        put("ss_steps", self.steps.to_string());
        put("ss_epoch", self.epoch.to_string());
        if let Some(s) = self.max_train_steps {
            put("ss_max_train_steps", s.to_string());
        }
        put("ss_learning_rate", py_float(self.learning_rate));
        put("ss_unet_lr", py_float(self.learning_rate));
        put("ss_text_encoder_lr", py_opt_float(self.text_encoder_lr));
        let (w, h) = self.resolution;
        put("ss_resolution", format!("({w}, {h})"));
        put(
            "ss_tag_frequency",
            serde_json::to_string(&self.tag_frequency).expect("maps of strings serialise"),
        );
        if let Some(b) = &self.bucket_info {
            put("ss_bucket_info", b.to_string());
        }
        put("ss_seed", self.seed.to_string());
        put("ss_training_started_at", py_float(self.training_started_at));
        put(
            "ss_training_finished_at",
            py_opt_float(self.training_finished_at),
        );
        if let Some(n) = &self.sd_model_name {
            put("ss_sd_model_name", n.clone());
        }
        put(
            "ss_session_id",
            (self.seed as u32 ^ 0x5bd1_e995).to_string(),
        );
        // modelspec (SAI model spec 1.0.1)
        put("modelspec.sai_model_spec", "1.0.1".into());
        put(
            "modelspec.architecture",
            "stable-diffusion-xl-v1-base/lora".into(),
        );
        put(
            "modelspec.implementation",
            "https://github.com/Stability-AI/generative-models".into(),
        );
        put(
            "modelspec.title",
            self.title
                .clone()
                .unwrap_or_else(|| self.output_name.clone()),
        );
        put(
            "modelspec.date",
            iso8601(self.training_finished_at.unwrap_or_else(now_unix)),
        );
        put("modelspec.resolution", format!("{w}x{h}"));
        put(
            "modelspec.prediction_type",
            match self.prediction {
                Prediction::Epsilon => "epsilon",
                Prediction::V => "v",
            }
            .into(),
        );
        if let Some(t) = &self.trigger_phrase {
            put("modelspec.trigger_phrase", t.clone());
        }
        put(
            "modelspec.implementation_version",
            format!("lorakit/{}", env!("CARGO_PKG_VERSION")),
        );
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_spellings() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(16.0), "16.0");
        assert_eq!(py_float(7e-5), "7e-05");
        assert_eq!(py_float(1e-4), "0.0001");
        assert_eq!(py_float(0.5), "0.5");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(1234.5678), "1234.5678");
        assert_eq!(py_float(1.7e9), "1700000000.0");
        assert_eq!(py_opt_float(None), "None");
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso8601(1_771_229_249.5), "2026-02-16T08:07:29");
    }

    #[test]
    fn kohya_fields_present() {
        let md = TrainingMetadata {
            output_name: "myaku".into(),
            network_dim: 16,
            network_alpha: 16.0,
            conv_dim: Some(8),
            conv_alpha: Some(4.0),
            resolution: (768, 768),
            learning_rate: 7e-5,
            trigger_phrase: Some("myakumyaku-san".into()),
            ..Default::default()
        };
        let m = md.to_map();
        assert_eq!(m["ss_network_module"], "networks.lora");
        assert_eq!(m["ss_network_dim"], "16");
        assert_eq!(m["ss_network_alpha"], "16.0");
        assert_eq!(m["ss_v2"], "False");
        assert_eq!(m["ss_base_model_version"], "sdxl_base_v1-0");
        assert_eq!(m["ss_learning_rate"], "7e-05");
        assert_eq!(m["ss_resolution"], "(768, 768)");
        assert_eq!(
            m["modelspec.architecture"],
            "stable-diffusion-xl-v1-base/lora"
        );
        assert_eq!(m["modelspec.resolution"], "768x768");
        assert_eq!(m["modelspec.trigger_phrase"], "myakumyaku-san");
        let args: serde_json::Value = serde_json::from_str(&m["ss_network_args"]).unwrap();
        assert_eq!(args["conv_dim"], "8");
        assert_eq!(args["conv_alpha"], "4.0");
        assert!(args.get("dropout").is_none());
        assert!(
            !m["ss_network_args"].contains("null"),
            "{}",
            m["ss_network_args"]
        );
    }
}
