//! `train.optimizer` + `[train.optimizer_args]` → an [`Optimizer`]: the
//! one place that knows each optimizer's keyword arguments (named as the
//! reference packages and kohya's `--optimizer_args` name them), their
//! defaults and their checks.

use super::adafactor::{Adafactor, AdafactorConfig};
use super::prodigy::{Prodigy, ProdigyConfig};
use super::{AdamW, Groups, Lion, Optimizer};
use std::collections::BTreeMap;
use tch::Tensor;

/// A parsed optimizer choice with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerArgs {
    /// `adamw` / `adamw8bit`: β, ε.
    AdamW {
        /// 8-bit moments.
        eightbit: bool,
        /// β₁, β₂.
        betas: (f64, f64),
        /// ε.
        eps: f64,
    },
    /// `lion` / `lion8bit`: β.
    Lion {
        /// 8-bit momentum.
        eightbit: bool,
        /// β₁, β₂.
        betas: (f64, f64),
    },
    /// `prodigy`.
    Prodigy(ProdigyConfig),
    /// `adafactor`.
    Adafactor(AdafactorConfig),
}

/// `(key, message)`: the `optimizer_args` key at fault and why.
pub type ArgError = (String, String);

/// The weight decay an optimizer uses when `train.weight_decay` is unset:
/// its package's default (torch `AdamW` and bitsandbytes' `AdamW8bit`
/// 0.01; lion-pytorch, bitsandbytes' `Lion8bit`, prodigyopt and
/// transformers' `Adafactor` 0), as kohya passes none unless asked.
///
/// ```
/// use lora_sdxl::train::optim::default_weight_decay;
/// assert_eq!(default_weight_decay("adamw"), 0.01);
/// assert_eq!(default_weight_decay("prodigy"), 0.0);
/// ```
pub fn default_weight_decay(optimizer: &str) -> f64 {
    match optimizer {
        "adamw" | "adamw8bit" => 0.01,
        _ => 0.0,
    }
}

/// The keys each optimizer takes (besides `train.weight_decay`, which all use).
fn known(name: &str) -> &'static [&'static str] {
    match name {
        "adamw" | "adamw8bit" => &["betas", "eps"],
        "lion" | "lion8bit" => &["betas"],
        "prodigy" => &[
            "betas",
            "beta3",
            "eps",
            "decouple",
            "use_bias_correction",
            "safeguard_warmup",
            "d0",
            "d_coef",
            "growth_rate",
            "slice_p",
        ],
        "adafactor" => &[
            "eps",
            "clip_threshold",
            "decay_rate",
            "beta1",
            "scale_parameter",
            "relative_step",
            "warmup_init",
        ],
        _ => &[],
    }
}

struct Reader<'a>(&'a BTreeMap<String, toml::Value>);

impl Reader<'_> {
    fn num(&self, key: &str, default: f64, ok: fn(f64) -> bool) -> Result<f64, ArgError> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
                Some(x) if ok(x) => Ok(x),
                Some(x) => Err((key.into(), format!("{x} is out of range"))),
                None => Err((key.into(), format!("must be a number, got {v}"))),
            },
        }
    }
    fn opt_num(&self, key: &str, ok: fn(f64) -> bool) -> Result<Option<f64>, ArgError> {
        self.0.get(key).map(|_| self.num(key, 0.0, ok)).transpose()
    }
    fn flag(&self, key: &str, default: bool) -> Result<bool, ArgError> {
        match self.0.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(v) => Err((key.into(), format!("must be true or false, got {v}"))),
        }
    }
    fn pair(
        &self,
        key: &str,
        default: (f64, f64),
        ok: fn(f64) -> bool,
    ) -> Result<(f64, f64), ArgError> {
        let Some(v) = self.0.get(key) else {
            return Ok(default);
        };
        let nums: Option<Vec<f64>> = v.as_array().map(|a| {
            a.iter()
                .filter_map(|e| e.as_float().or_else(|| e.as_integer().map(|i| i as f64)))
                .collect()
        });
        match nums.as_deref() {
            Some([a, b]) if ok(*a) && ok(*b) => Ok((*a, *b)),
            Some([_, _]) => Err((key.into(), "values out of range".into())),
            _ => Err((
                key.into(),
                format!("must be two numbers, e.g. [0.9, 0.999], got {v}"),
            )),
        }
    }
}

fn beta(x: f64) -> bool {
    (0.0..1.0).contains(&x)
}
fn positive(x: f64) -> bool {
    x > 0.0
}

impl OptimizerArgs {
    /// The names `train.optimizer` takes.
    pub const NAMES: &'static [&'static str] = &[
        "adamw",
        "adamw8bit",
        "lion",
        "lion8bit",
        "prodigy",
        "adafactor",
    ];

    /// Its `train.optimizer` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AdamW {
                eightbit: false, ..
            } => "adamw",
            Self::AdamW { eightbit: true, .. } => "adamw8bit",
            Self::Lion {
                eightbit: false, ..
            } => "lion",
            Self::Lion { eightbit: true, .. } => "lion8bit",
            Self::Prodigy(_) => "prodigy",
            Self::Adafactor(_) => "adafactor",
        }
    }

    /// Parses `train.optimizer = name` with its `optimizer_args`;
    /// `weight_decay` is `train.weight_decay`.
    pub fn parse(
        name: &str,
        args: &BTreeMap<String, toml::Value>,
        weight_decay: f64,
    ) -> Result<Self, ArgError> {
        let keys = known(name);
        if let Some(k) = args.keys().find(|k| !keys.contains(&k.as_str())) {
            let msg = if k == "weight_decay" {
                "set train.weight_decay instead (every optimizer uses it)".to_string()
            } else if keys.is_empty() {
                format!("`{name}` takes no optimizer_args")
            } else {
                format!("`{name}` takes: {}", keys.join(", "))
            };
            return Err((k.clone(), msg));
        }
        let r = Reader(args);
        Ok(match name {
            "adamw" | "adamw8bit" => Self::AdamW {
                eightbit: name == "adamw8bit",
                betas: r.pair("betas", (0.9, 0.999), beta)?,
                eps: r.num("eps", 1e-8, positive)?,
            },
            "lion" | "lion8bit" => Self::Lion {
                eightbit: name == "lion8bit",
                betas: r.pair("betas", (0.9, 0.99), beta)?,
            },
            "prodigy" => Self::Prodigy(ProdigyConfig {
                betas: r.pair("betas", (0.9, 0.999), beta)?,
                beta3: r.opt_num("beta3", beta)?,
                eps: r.num("eps", 1e-8, positive)?,
                weight_decay,
                decouple: r.flag("decouple", true)?,
                use_bias_correction: r.flag("use_bias_correction", false)?,
                safeguard_warmup: r.flag("safeguard_warmup", false)?,
                d0: r.num("d0", 1e-6, positive)?,
                d_coef: r.num("d_coef", 1.0, positive)?,
                growth_rate: r.num("growth_rate", f64::INFINITY, |x| x >= 1.0)?,
                slice_p: r.num("slice_p", 1.0, |x| x >= 1.0 && x.fract() == 0.0)? as i64,
            }),
            "adafactor" => {
                let relative_step = r.flag("relative_step", true)?;
                let warmup_init = r.flag("warmup_init", false)?;
                if warmup_init && !relative_step {
                    return Err(("warmup_init".into(), "needs relative_step = true".into()));
                }
                Self::Adafactor(AdafactorConfig {
                    eps: r.pair("eps", (1e-30, 1e-3), positive)?,
                    clip_threshold: r.num("clip_threshold", 1.0, positive)?,
                    decay_rate: r.num("decay_rate", -0.8, |x| x < 0.0)?,
                    beta1: r.opt_num("beta1", beta)?,
                    weight_decay,
                    scale_parameter: r.flag("scale_parameter", true)?,
                    relative_step,
                    warmup_init,
                })
            }
            other => {
                let names = Self::NAMES.join(", ");
                return Err((String::new(), format!("`{other}` is not one of: {names}")));
            }
        })
    }

    /// What the user should know about this choice (for the run's notes).
    pub fn note(&self) -> Option<String> {
        match self {
            Self::Adafactor(c) if c.relative_step => Some(
                "adafactor with relative_step = true (its default): the step size is min(1e-2, 1/√t) × the weights' RMS, so train.lr and train.lr_scheduler have no effect; set optimizer_args relative_step = false and scale_parameter = false to use train.lr (kohya's SDXL recipe)".into(),
            ),
            _ => None,
        }
    }

    /// The optimizer over named groups (`("unet", params)`, `("te", params)`).
    pub fn build(
        &self,
        weight_decay: f64,
        groups: Vec<(String, Vec<Tensor>)>,
    ) -> Box<dyn Optimizer> {
        match self {
            Self::AdamW {
                eightbit,
                betas,
                eps,
            } => {
                let make = if *eightbit {
                    AdamW::new_8bit
                } else {
                    AdamW::new
                };
                let g = groups
                    .into_iter()
                    .map(|(n, p)| (n, make(p, betas.0, betas.1, *eps, weight_decay)))
                    .collect();
                Box::new(Groups::new("adam", g))
            }
            Self::Lion { eightbit, betas } => {
                let make = if *eightbit { Lion::new_8bit } else { Lion::new };
                let g = groups
                    .into_iter()
                    .map(|(n, p)| (n, make(p, betas.0, betas.1, weight_decay)))
                    .collect();
                Box::new(Groups::new("lion", g))
            }
            Self::Adafactor(cfg) => {
                let g = groups
                    .into_iter()
                    .map(|(n, p)| (n, Adafactor::new(p, cfg.clone())))
                    .collect();
                Box::new(Groups::new("adafactor", g))
            }
            Self::Prodigy(cfg) => Box::new(Prodigy::new(
                groups.into_iter().map(|(_, p)| p).collect(),
                cfg.clone(),
            )),
        }
    }

    /// `ss_optimizer` as kohya writes it: `class(key=value,…)` with
    /// Python-style values.
    pub fn describe(&self, weight_decay: f64) -> String {
        let f = lora_core::metadata::py_float;
        let b = lora_core::metadata::py_bool;
        let pair = |p: (f64, f64)| format!("({}, {})", f(p.0), f(p.1));
        let wd = f(weight_decay);
        match self {
            Self::AdamW { eightbit, betas, eps } => format!(
                "lorakit.optim.{}(weight_decay={wd},betas={},eps={})",
                if *eightbit { "AdamW8bit" } else { "AdamW" },
                pair(*betas),
                f(*eps)
            ),
            Self::Lion { eightbit, betas } => format!(
                "lorakit.optim.{}(weight_decay={wd},betas={})",
                if *eightbit { "Lion8bit" } else { "Lion" },
                pair(*betas)
            ),
            Self::Prodigy(c) => format!(
                "lorakit.optim.Prodigy(weight_decay={wd},betas={},beta3={},eps={},decouple={},use_bias_correction={},safeguard_warmup={},d0={},d_coef={},growth_rate={},slice_p={})",
                pair(c.betas),
                c.beta3.map_or("None".into(), f),
                f(c.eps),
                b(c.decouple),
                b(c.use_bias_correction),
                b(c.safeguard_warmup),
                f(c.d0),
                f(c.d_coef),
                if c.growth_rate.is_infinite() { "inf".into() } else { f(c.growth_rate) },
                c.slice_p
            ),
            Self::Adafactor(c) => format!(
                "lorakit.optim.Adafactor(weight_decay={wd},eps={},clip_threshold={},decay_rate={},beta1={},scale_parameter={},relative_step={},warmup_init={})",
                pair(c.eps),
                f(c.clip_threshold),
                f(c.decay_rate),
                c.beta1.map_or("None".into(), f),
                b(c.scale_parameter),
                b(c.relative_step),
                b(c.warmup_init)
            ),
        }
    }
}
