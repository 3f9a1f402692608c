//! `lorakit model inspect` and `lorakit model merge`.

use crate::AnyResult;
use clap::Subcommand;
use lora_sdxl::{detect, Checkpoint};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Detect the architecture and configuration of a single-file checkpoint,
    /// count parameters per component, and read every tensor to prove the
    /// file complete.
    Inspect {
        /// The checkpoint (.safetensors).
        file: PathBuf,
        /// Skip reading every tensor (header only).
        #[arg(long)]
        quick: bool,
    },
    /// Bake LoRAs into a checkpoint (kohya's sdxl_merge_lora): writes a new
    /// single-file checkpoint with W + strength·ΔW for every adapted module.
    Merge {
        /// The base checkpoint (single-file .safetensors).
        #[arg(long)]
        model: PathBuf,
        /// A LoRA, `FILE` or `FILE:STRENGTH` (default 1); repeat for several.
        #[arg(long = "lora", required = true)]
        loras: Vec<String>,
        /// The checkpoint to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(cmd: ModelCommand) -> AnyResult<ExitCode> {
    let (file, quick) = match cmd {
        ModelCommand::Inspect { file, quick } => (file, quick),
        ModelCommand::Merge {
            model,
            loras,
            out,
            force,
        } => return merge(&model, &loras, &out, force),
    };
    let ck = Checkpoint::open(&file)?;
    let d = detect(&ck)?;
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let config = &d.config;
    println!(
        "file:        {} ({:.2} GB, {} tensors)",
        file.display(),
        size as f64 / 1e9,
        ck.infos().len()
    );
    println!("model:       SDXL family");
    println!(
        "prediction:  {}{}",
        match d.prediction {
            lora_core::Prediction::Epsilon => "epsilon",
            lora_core::Prediction::V => "v_prediction (v_pred key)",
        },
        if d.zero_terminal_snr {
            ", zero terminal SNR (ztsnr key)"
        } else {
            ""
        }
    );
    let u = &config.unet;
    println!(
        "unet:        channels {} × {:?}, transformer depth {:?} (middle {}), context {}, adm {}, {} params",
        u.model_channels,
        u.channel_mult,
        u.transformer_depth,
        u.transformer_depth_middle,
        u.context_dim,
        u.adm_in_channels,
        group(d.parameters[0].1)
    );
    for ((name, cfg), (_, n)) in [("te1 (CLIP-L)", &config.te1), ("te2 (bigG)", &config.te2)]
        .iter()
        .zip(&d.parameters[1..])
    {
        println!(
            "{name:<12} width {}, {} layers, {} heads, mlp {}, vocab {}{}, {} params",
            cfg.hidden,
            cfg.layers,
            cfg.heads,
            cfg.intermediate,
            cfg.vocab_size,
            cfg.projection_dim
                .map(|p| format!(", projection {p}"))
                .unwrap_or_default(),
            group(*n)
        );
    }
    println!(
        "vae:         channels {} × {:?}, {} resnets/level, latent {}, {} params",
        config.vae.base_channels,
        config.vae.channel_mult,
        config.vae.num_res_blocks,
        config.vae.latent_channels,
        group(d.vae_parameters)
    );
    let dt: Vec<String> = d.dtypes.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
    println!("dtypes:      {}", dt.join(", "));
    if !d.extra_keys.is_empty() {
        let first: Vec<&str> = d.extra_keys.iter().take(5).map(String::as_str).collect();
        println!(
            "extra keys:  {} ({}{})",
            d.extra_keys.len(),
            first.join(", "),
            if d.extra_keys.len() > 5 { ", …" } else { "" }
        );
    }
    if !quick {
        let t0 = Instant::now();
        let mut bytes = 0u64;
        for (k, info) in ck.infos() {
            let t = ck.load(k, info.kind, tch::Device::Cpu)?;
            bytes += (t.numel() * info.kind.elt_size_in_bytes()) as u64;
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "read:        all {} tensors ({:.2} GB) in {:.1} s; peak RSS {}",
            ck.infos().len(),
            bytes as f64 / 1e9,
            secs,
            peak_rss_mb()
                .map(|m| format!("{m:.0} MB"))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn merge(model: &Path, loras: &[String], out: &Path, force: bool) -> AnyResult<ExitCode> {
    crate::check_output(out, &[(model, "base model")], force)?;
    let uses = loras
        .iter()
        .map(|a| crate::sample::parse_lora(a))
        .collect::<AnyResult<Vec<_>>>()?;
    let mut sets = Vec::new();
    for u in &uses {
        let l = lora_core::load_lora(&u.path, lora_core::UnknownKeys::Reject)?;
        sets.push((l.set, u.strength));
    }
    let refs: Vec<(&lora_core::LoraSet, f64)> = sets.iter().map(|(s, w)| (s, *w)).collect();
    let list = uses
        .iter()
        .map(|u| format!("{}:{}", u.name(), u.strength))
        .collect::<Vec<_>>()
        .join(", ");
    let meta = [("lorakit.merged_loras".to_string(), list.clone())].into();
    let t = Instant::now();
    let r = lora_sdxl::merge_into_checkpoint(model, &refs, out, meta)?;
    println!(
        "merged {} LoRA modules ({list}) into {} of {} tensors; wrote {} ({:.2} GB) in {:.1} s",
        r.modules,
        r.merged_tensors,
        r.tensors,
        out.display(),
        r.bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
