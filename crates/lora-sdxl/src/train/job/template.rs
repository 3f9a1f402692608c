//! The commented job file `lorakit init` writes: every key of
//! [`super::fields::FIELDS`] with its default (from the sections' `Default`
//! impls) or, for keys without one, its example commented out, and its help
//! and allowed values beside it.

use super::fields::{FIELDS, SECTIONS};
use super::JobConfig;

/// Values the template sets instead of the defaults: what `lorakit init` was
/// told, or placeholders that say what to put there.
struct Filled {
    name: String,
    trigger: Option<String>,
    model: String,
    dataset: String,
    id: Option<String>,
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Filled {
    /// The template's value of `section.key` (`None`: use the default).
    fn value(&self, section: &str, key: &str) -> Option<String> {
        Some(match (section, key) {
            ("job", "name") => quote(&self.name),
            ("job", "trigger_word") => quote(self.trigger.as_deref()?),
            ("job", "id") => quote(self.id.as_deref()?),
            ("model", "name_or_path") => quote(&self.model),
            ("datasets", "folder_path") => quote(&self.dataset),
            ("sample", "prompts") => "[\"[trigger], 1girl, standing, outdoors\"]".into(),
            _ => return None,
        })
    }
}

impl JobConfig {
    /// A commented job file with the defaults of a first character LoRA
    /// (linear 16, conv 8, save every 100 keeping 30, batch 2 × accumulation 2,
    /// 3000 steps, lr 7e-5, resolutions 512 and 768, sampling off), and
    /// `job.id` when given (see [`JobConfig::new_id`]).
    ///
    /// ```
    /// use lora_sdxl::JobConfig;
    /// let id = JobConfig::new_id();
    /// let text = JobConfig::template(Some("sdxl.safetensors"), Some("data"), Some("myakumyaku-san"), Some(&id));
    /// let job = JobConfig::parse("job.toml".as_ref(), &text).unwrap();
    /// assert_eq!(job.network.linear, 16);
    /// assert_eq!(job.job.trigger_word.as_deref(), Some("myakumyaku-san"));
    /// assert_eq!(job.job.id, Some(id));
    /// ```
    pub fn template(
        model: Option<&str>,
        dataset: Option<&str>,
        trigger: Option<&str>,
        id: Option<&str>,
    ) -> String {
        let filled = Filled {
            name: trigger
                .map(|t| {
                    t.replace(
                        |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                        "_",
                    )
                })
                .unwrap_or_else(|| "my_lora".into()),
            trigger: trigger.map(str::to_string),
            model: model
                .unwrap_or("path/to/sdxl_checkpoint.safetensors")
                .to_string(),
            dataset: dataset.unwrap_or("path/to/dataset").to_string(),
            id: id.map(str::to_string),
        };
        let defaults = JobDefaults::new();
        let mut out = String::from(
            "# lorakit job file. Run with: lorakit train job.toml\n\
             # Names follow AI Toolkit, so settings carry over. Unknown keys are errors.\n",
        );
        for (section, about) in SECTIONS {
            let header = if *section == "datasets" {
                "[[datasets]]".to_string()
            } else {
                format!("[{section}]")
            };
            out.push('\n');
            out.push_str(&line(&header, about));
            for field in FIELDS.iter().filter(|f| f.section == *section) {
                let default = defaults.get(section, field.key).map(|v| v.to_string());
                let text = match filled.value(section, field.key).or(default) {
                    Some(v) => format!("{} = {v}", field.key),
                    None => format!("# {} = {}", field.key, field.example.unwrap_or("\"\"")),
                };
                let help = match field.rule.describe() {
                    Some(r) if !field.help.contains(&r) => format!("{}; {r}", field.help),
                    _ => field.help.to_string(),
                };
                out.push_str(&line(&text, &help));
            }
        }
        out
    }
}

/// Every key's default as TOML, from the sections' `Default` impls (what
/// the template writes and the UI's form shows).
pub struct JobDefaults(toml::Value);

impl JobDefaults {
    /// The defaults of a job with one `[[datasets]]` table.
    pub fn new() -> Self {
        let mut defaults = toml::Value::try_from(JobConfig::default())
            .expect("the default job serialises to TOML");
        if let Some(t) = defaults.as_table_mut() {
            let one = toml::Value::try_from(super::DatasetSection::default())
                .expect("the default dataset serialises to TOML");
            t.insert("datasets".into(), toml::Value::Array(vec![one]));
        }
        Self(defaults)
    }

    /// The default of `section.key` (the `[[datasets]]` table's for
    /// `datasets`); `None` for a key without one (an `Option` left unset).
    pub fn get(&self, section: &str, key: &str) -> Option<&toml::Value> {
        let table = match self.0.get(section) {
            Some(toml::Value::Array(a)) => a.first(),
            other => other,
        };
        table.and_then(|t| t.get(key))
    }
}

impl Default for JobDefaults {
    fn default() -> Self {
        Self::new()
    }
}

impl JobConfig {
    /// A fresh `job.id`: 16 random hexadecimal digits. `lorakit init` and
    /// `lorakit ui` give each job they create one, so a run's saved state
    /// is never resumed by another job that reuses its folder.
    pub fn new_id() -> String {
        format!("{:016x}", rand::random::<u64>())
    }
}

/// `text` with `# comment` aligned at column 32.
fn line(text: &str, comment: &str) -> String {
    if comment.is_empty() {
        format!("{text}\n")
    } else {
        format!("{text:<31} # {comment}\n")
    }
}
