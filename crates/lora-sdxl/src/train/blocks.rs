//! Block-wise ranks and learning rates, as kohya's `networks/lora.py`
//! defines them for SDXL: 23 block indices — 0 `time_embed`/`label_emb`
//! (no LoRA), 1–9 `input_blocks.0–8`, 10–12 `middle_block.0–2`, 13–21
//! `output_blocks.0–8`, 22 `out` (no LoRA).
//!
//! - `network.block_dims` / `block_alphas` (23 values) give the rank and
//!   alpha of each block's Linear and 1x1-conv modules, `conv_block_dims` /
//!   `conv_block_alphas` those of its 3x3 convs; a rank of 0 leaves the
//!   block without LoRA.
//! - `train.down_lr_weight` / `up_lr_weight` (9 values, or a preset:
//!   `cosine`, `sine`, `linear`, `reverse_linear`, `zeros`, each with an
//!   optional `+base`) and `mid_lr_weight` (3 values) multiply the UNet's
//!   learning rate per block; a shorter list is filled with 1 (as kohya
//!   does), a weight at or below `block_lr_zero_threshold` is 0 and its
//!   block gets no LoRA at all.
//!
//! Text-encoder modules are not in any block: they keep `network.linear`.

/// The job file's `down_lr_weight` / `up_lr_weight` (defined with the job
/// file's other types; resolved here).
pub use super::job::BlockWeights;
use super::job::{NetworkSection, TrainSection};

/// Block indices of SDXL's UNet.
pub const BLOCKS: usize = 23;
const SIDE: usize = 9;
const MID: usize = 3;

/// kohya's block index of a UNet module path (LDM layout, e.g.
/// `input_blocks.4.1.proj_in`), `None` outside the blocks.
pub fn block_index(path: &str) -> Option<usize> {
    let mut parts = path.split('.');
    let (first, n) = (
        parts.next()?,
        parts.next().and_then(|s| s.parse::<usize>().ok()),
    );
    Some(match (first, n) {
        ("time_embed" | "label_emb", _) => 0,
        ("input_blocks", Some(i)) if i < SIDE => 1 + i,
        ("middle_block", Some(i)) if i < MID => 10 + i,
        ("output_blocks", Some(i)) if i < SIDE => 13 + i,
        ("out", _) => 22,
        _ => return None,
    })
}

impl BlockWeights {
    /// The 9 weights (kohya's `get_list` for presets); `Err` names what is
    /// wrong.
    fn resolve(&self) -> Result<Vec<f64>, String> {
        let n = SIDE as f64 - 1.0;
        match self {
            Self::List(v) if v.len() > SIDE => Err(format!(
                "has {} values; SDXL has {SIDE} blocks on each side",
                v.len()
            )),
            Self::List(v) => Ok(v.clone()),
            // kohya's network_args form, "1,1,0.5" (an empty entry is 0)
            Self::Preset(s) if s.contains(',') => s
                .split(',')
                .map(|x| match x.trim() {
                    "" => Ok(0.0),
                    x => x
                        .parse::<f64>()
                        .map_err(|_| format!("`{x}` is not a number")),
                })
                .collect::<Result<Vec<_>, _>>()
                .and_then(|v| Self::List(v).resolve()),
            Self::Preset(s) => {
                let (name, base) = match s.split_once('+') {
                    Some((name, b)) => (
                        name,
                        b.trim()
                            .parse::<f64>()
                            .map_err(|_| format!("`{s}`: `{b}` after + is not a number"))?,
                    ),
                    None => (s.as_str(), 0.0),
                };
                let ramp = |i: usize| i as f64 / n;
                let sine = |i: usize| (std::f64::consts::PI * ramp(i) / 2.0).sin();
                let w: Vec<f64> = match name.trim() {
                    "cosine" => (0..SIDE).rev().map(sine).collect(),
                    "sine" => (0..SIDE).map(sine).collect(),
                    "linear" => (0..SIDE).map(ramp).collect(),
                    "reverse_linear" => (0..SIDE).rev().map(ramp).collect(),
                    "zeros" => vec![0.0; SIDE],
                    other => {
                        return Err(format!(
                            "`{other}` is not a preset: cosine, sine, linear, reverse_linear or zeros (optionally +base), or give {SIDE} numbers"
                        ))
                    }
                };
                Ok(w.into_iter().map(|x| x + base).collect())
            }
        }
    }
}

/// The per-block ranks, alphas and rate weights of a job (`None` from
/// [`BlockPlan::new`] when it sets none of them: plain ranks everywhere).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPlan {
    /// Rank of each block's Linear and 1x1-conv modules.
    pub dims: [i64; BLOCKS],
    /// Their alphas.
    pub alphas: [f64; BLOCKS],
    /// Rank of each block's 3x3 convs (0 without LoCon).
    pub conv_dims: [i64; BLOCKS],
    /// Their alphas.
    pub conv_alphas: [f64; BLOCKS],
    /// Learning-rate weight of each block, when any is set.
    pub lr_weights: Option<[f64; BLOCKS]>,
}

/// A field and what is wrong with it.
pub type FieldError = (&'static str, String);

fn array<T: Copy>(v: &[T], field: &'static str) -> Result<[T; BLOCKS], FieldError> {
    v.try_into().map_err(|_| {
        (
            field,
            format!(
                "needs {BLOCKS} values (0 time/label embedding, 1-9 input_blocks, 10-12 middle_block, 13-21 output_blocks, 22 out), got {}",
                v.len()
            ),
        )
    })
}

impl BlockPlan {
    /// The job's block plan, or `None` when it uses no block-wise setting.
    pub fn new(network: &NetworkSection, train: &TrainSection) -> Result<Option<Self>, FieldError> {
        let lr_weights = lr_weights(train)?;
        if network.block_dims.is_none() && lr_weights.is_none() {
            for (set, field) in [
                (network.block_alphas.is_some(), "network.block_alphas"),
                (network.conv_block_dims.is_some(), "network.conv_block_dims"),
                (
                    network.conv_block_alphas.is_some(),
                    "network.conv_block_alphas",
                ),
            ] {
                if set {
                    return Err((field, "is used only with network.block_dims or a block learning-rate weight (kohya's rule): set block_dims too".into()));
                }
            }
            return Ok(None);
        }
        let dims = match &network.block_dims {
            Some(v) => array(v, "network.block_dims")?,
            None => [network.linear; BLOCKS],
        };
        let alphas = match &network.block_alphas {
            Some(v) => array(v, "network.block_alphas")?,
            None => [network.linear_alpha; BLOCKS],
        };
        let conv_dims = match &network.conv_block_dims {
            Some(v) => array(v, "network.conv_block_dims")?,
            None => [network.conv; BLOCKS],
        };
        let conv_alphas = match &network.conv_block_alphas {
            Some(v) if network.conv_block_dims.is_some() => array(v, "network.conv_block_alphas")?,
            Some(_) => {
                return Err((
                    "network.conv_block_alphas",
                    "needs network.conv_block_dims".into(),
                ))
            }
            None => [network.conv_alpha; BLOCKS],
        };
        let mut plan = Self {
            dims,
            alphas,
            conv_dims,
            conv_alphas,
            lr_weights,
        };
        // kohya's remove_block_dims_and_alphas: no rate, no module
        if let Some(w) = lr_weights {
            for (i, _) in w.iter().enumerate().filter(|(_, w)| **w == 0.0) {
                plan.dims[i] = 0;
                plan.conv_dims[i] = 0;
            }
        }
        Ok(Some(plan))
    }

    /// What kohya would warn about: lists shorter than their blocks (the
    /// rest is filled with 1).
    pub fn notes(train: &TrainSection) -> Vec<String> {
        let short = |field: &str, len: Option<usize>, want: usize| {
            len.filter(|&l| l < want).map(|l| {
                format!("train.{field} has {l} of {want} values: the other blocks keep weight 1")
            })
        };
        let list = |w: &Option<BlockWeights>| match w {
            Some(BlockWeights::List(v)) => Some(v.len()),
            _ => None,
        };
        [
            short("down_lr_weight", list(&train.down_lr_weight), SIDE),
            short(
                "mid_lr_weight",
                train.mid_lr_weight.as_ref().map(Vec::len),
                MID,
            ),
            short("up_lr_weight", list(&train.up_lr_weight), SIDE),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Rank and alpha of the UNet module at `path` (`conv3x3`: a 3x3 conv);
    /// rank 0: no LoRA there.
    pub fn rank(&self, path: &str, conv3x3: bool) -> (i64, f64) {
        let Some(b) = block_index(path) else {
            return (0, 0.0);
        };
        if conv3x3 {
            (self.conv_dims[b], self.conv_alphas[b])
        } else {
            (self.dims[b], self.alphas[b])
        }
    }

    /// Learning-rate weight of the UNet module at `path` (1 without weights).
    pub fn lr_weight(&self, path: &str) -> f64 {
        match (self.lr_weights, block_index(path)) {
            (Some(w), Some(b)) => w[b],
            _ => 1.0,
        }
    }

    /// The settings as kohya's `ss_network_args` holds them (comma-separated
    /// strings).
    pub fn network_args(network: &NetworkSection, train: &TrainSection) -> Vec<(String, String)> {
        let join = |v: &[String]| v.join(",");
        let ints = |v: &[i64]| join(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        let floats = |v: &[f64]| {
            join(
                &v.iter()
                    .map(|x| lora_core::metadata::py_float(*x))
                    .collect::<Vec<_>>(),
            )
        };
        let weights = |w: &BlockWeights| match w {
            BlockWeights::List(v) => floats(v),
            BlockWeights::Preset(s) => s.clone(),
        };
        let mut out = Vec::new();
        let mut put = |k: &str, v: Option<String>| out.extend(v.map(|v| (k.to_string(), v)));
        put("block_dims", network.block_dims.as_deref().map(ints));
        put("block_alphas", network.block_alphas.as_deref().map(floats));
        put(
            "conv_block_dims",
            network.conv_block_dims.as_deref().map(ints),
        );
        put(
            "conv_block_alphas",
            network.conv_block_alphas.as_deref().map(floats),
        );
        put("down_lr_weight", train.down_lr_weight.as_ref().map(weights));
        put("mid_lr_weight", train.mid_lr_weight.as_deref().map(floats));
        put("up_lr_weight", train.up_lr_weight.as_ref().map(weights));
        let any = train.down_lr_weight.is_some()
            || train.mid_lr_weight.is_some()
            || train.up_lr_weight.is_some();
        put(
            "block_lr_zero_threshold",
            (any && train.block_lr_zero_threshold != 0.0)
                .then(|| lora_core::metadata::py_float(train.block_lr_zero_threshold)),
        );
        out
    }
}

/// kohya's `get_block_lr_weight` for SDXL: 23 weights (1 for the embedding
/// and `out` ends), `None` when no weight is set.
fn lr_weights(train: &TrainSection) -> Result<Option<[f64; BLOCKS]>, FieldError> {
    if train.down_lr_weight.is_none()
        && train.mid_lr_weight.is_none()
        && train.up_lr_weight.is_none()
    {
        return Ok(None);
    }
    let z = train.block_lr_zero_threshold;
    // a given list is filled with 1, then cut at the threshold; an unset
    // side stays 1 (kohya)
    let clip =
        |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| if x > z { x } else { 0.0 }).collect() };
    let side = |w: &Option<BlockWeights>, field| -> Result<Vec<f64>, FieldError> {
        Ok(match w {
            Some(w) => {
                let mut v = w.resolve().map_err(|m| (field, m))?;
                v.resize(SIDE, 1.0);
                clip(v)
            }
            None => vec![1.0; SIDE],
        })
    };
    let down = side(&train.down_lr_weight, "train.down_lr_weight")?;
    let up = side(&train.up_lr_weight, "train.up_lr_weight")?;
    let mid = match &train.mid_lr_weight {
        Some(m) if m.len() > MID => {
            return Err((
                "train.mid_lr_weight",
                format!(
                    "has {} values; SDXL's middle block has {MID} parts",
                    m.len()
                ),
            ))
        }
        Some(m) => {
            let mut m = m.clone();
            m.resize(MID, 1.0);
            clip(m)
        }
        None => vec![1.0; MID],
    };
    let mut w = [1.0; BLOCKS];
    for (slot, x) in w[1..BLOCKS - 1]
        .iter_mut()
        .zip(down.iter().chain(&mid).chain(&up))
    {
        *slot = *x;
    }
    Ok(Some(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_indices_follow_kohya() {
        for (path, want) in [
            ("input_blocks.1.0.in_layers.2", Some(2)),
            ("input_blocks.8.1.transformer_blocks.9.attn2.to_k", Some(9)),
            ("middle_block.1.proj_out", Some(11)),
            ("middle_block.2.out_layers.3", Some(12)),
            ("output_blocks.0.1.proj_in", Some(13)),
            ("output_blocks.8.0.skip_connection", Some(21)),
            ("time_embed.0", Some(0)),
            ("out.2", Some(22)),
            ("text_model.encoder.layers.0.mlp.fc1", None),
        ] {
            assert_eq!(block_index(path), want, "{path}");
        }
    }
}
