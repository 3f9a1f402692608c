//! `lorakit lora …`: inspect and resize LoRA files.

use crate::AnyResult;
use clap::{Args, Subcommand};
use lora_core::resize::{fro_retained_summary, note_resize, resize_set, RankRule, ResizeOptions};
use lora_core::{load_lora, LoraSummary, UnknownKeys};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tch::Kind;

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Show what a LoRA file holds: format, modules, ranks, dtype, metadata.
    /// Reads kohya, AI Toolkit and diffusers/PEFT files.
    Inspect {
        /// The LoRA .safetensors file.
        file: PathBuf,
    },
    /// Reduce a LoRA's rank by truncated SVD (kohya's resize_lora): fixed
    /// ranks or per-module ranks from the singular values. The strength to
    /// use it at stays the same. Writes a kohya file.
    Resize(ResizeArgs),
    /// Extract a LoRA from a fine-tuned checkpoint and its base (kohya's
    /// extract_lora_from_models): ΔW of every adaptable module at the given
    /// rank; the text encoders only when they differ.
    Extract(ExtractArgs),
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The base model (single-file .safetensors or diffusers folder).
    #[arg(long)]
    base: PathBuf,
    /// The fine-tuned model of the same architecture.
    #[arg(long)]
    tuned: PathBuf,
    /// Rank of Linear (and 1x1 conv) modules.
    #[arg(long, default_value_t = 32)]
    rank: i64,
    /// Rank of 3x3 conv modules (LoCon); without it convs are left out, as kohya does.
    #[arg(long)]
    conv_rank: Option<i64>,
    /// Clamp values to ± this quantile (kohya's default; 1 = no clamping).
    #[arg(long, default_value_t = 0.99)]
    clamp_quantile: f64,
    /// Extract the text encoders only when a weight differs by more than this.
    #[arg(long, default_value_t = 0.01)]
    min_diff: f64,
    /// Output file [default: <tuned stem>-lora-r<rank>.safetensors in the current folder].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Dtype of the written tensors: fp16, bf16 or fp32.
    #[arg(long, default_value = "fp16")]
    dtype: String,
    /// Where to compute: cpu, cuda, cuda:N [default: cuda when available].
    #[arg(long)]
    device: Option<String>,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The LoRA to resize (kohya, AI Toolkit or diffusers/PEFT file).
    file: PathBuf,
    /// Maximum rank of Linear (and 1x1 conv) modules.
    #[arg(long)]
    rank: i64,
    /// Maximum rank of 3x3 conv (LoCon) modules [default: --rank].
    #[arg(long)]
    conv_rank: Option<i64>,
    /// Per-module rank: `fixed`, `sv_fro:F` (keep fraction F of the
    /// Frobenius norm), `sv_cumulative:F` (fraction F of Σσ) or
    /// `sv_ratio:R` (σ above σ_max / R); never above --rank / --conv-rank.
    #[arg(long, default_value = "fixed")]
    rule: String,
    /// Output file [default: <input stem>-r<rank>.safetensors beside the input].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Dtype of the written tensors: fp16, bf16 or fp32 [default: the input's].
    #[arg(long)]
    dtype: Option<String>,
    /// Print every module's new rank and retained norm.
    #[arg(long)]
    per_module: bool,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
}

pub fn run(command: LoraCommand) -> AnyResult<ExitCode> {
    match command {
        LoraCommand::Inspect { file } => {
            let loaded = load_lora(&file, UnknownKeys::Report)?;
            print!("{}", LoraSummary::new(&loaded));
        }
        LoraCommand::Resize(a) => resize(a)?,
        LoraCommand::Extract(a) => extract(a)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `--dtype NAME` as a tensor kind, or an error naming the option.
pub(crate) fn dtype_kind(name: &str) -> AnyResult<Kind> {
    lora_core::io::kind_from_name(name)
        .ok_or_else(|| format!("--dtype: `{name}` is not one of fp16, bf16, fp32").into())
}

/// The dtype most of the file's tensors are stored in (fp32 when unclear).
fn input_kind(dtypes: &BTreeMap<String, usize>) -> Kind {
    match dtypes
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(d, _)| d.as_str())
    {
        Some("F16") => Kind::Half,
        Some("BF16") => Kind::BFloat16,
        _ => Kind::Float,
    }
}

fn default_out(file: &Path, rank: i64, rule: RankRule) -> PathBuf {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lora".into());
    let tag = match rule {
        RankRule::Fixed => format!("r{rank}"),
        _ => format!("dyn{rank}"),
    };
    file.with_file_name(format!("{stem}-{tag}.safetensors"))
}

fn resize(args: ResizeArgs) -> AnyResult {
    let rule = RankRule::parse(&args.rule).map_err(|e| format!("--rule: {e}"))?;
    let opts = ResizeOptions {
        rank: args.rank,
        conv_rank: args.conv_rank.unwrap_or(args.rank),
        rule,
    };
    for (flag, r) in [("--rank", opts.rank), ("--conv-rank", opts.conv_rank)] {
        if r < 1 {
            return Err(format!("{flag} must be at least 1, got {r}").into());
        }
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_out(&args.file, opts.rank, rule));
    crate::check_output(&out, &[(&args.file, "input")], args.force)?;
    let loaded = load_lora(&args.file, UnknownKeys::Reject)?;
    let kind = match args.dtype.as_deref() {
        Some(d) => dtype_kind(d)?,
        None => input_kind(&loaded.dtypes),
    };
    let (set, stats) = resize_set(&loaded.set, &opts)?;
    let mut meta = loaded.metadata.clone();
    meta.remove("sshs_model_hash");
    meta.remove("sshs_legacy_hash");
    note_resize(&mut meta, &opts, &stats);
    let saved = set.save(&out, kind, &meta)?;

    if args.per_module {
        for (key, s) in &stats {
            println!(
                "{:<75} | rank {:>3} → {:<3} | Σσ kept {:>5.1}% | Frobenius kept {:>5.1}%",
                key.kohya_name(),
                s.old_rank,
                s.new_rank,
                100.0 * s.sum_retained.unwrap_or(f64::NAN),
                100.0 * s.fro_retained
            );
        }
    }
    let mut old_ranks: BTreeMap<i64, usize> = BTreeMap::new();
    let mut new_ranks: BTreeMap<i64, usize> = BTreeMap::new();
    for (_, s) in &stats {
        *old_ranks.entry(s.old_rank).or_default() += 1;
        *new_ranks.entry(s.new_rank).or_default() += 1;
    }
    let hist = |h: &BTreeMap<i64, usize>| {
        h.iter()
            .map(|(r, n)| format!("{r} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (mean, std) = fro_retained_summary(&stats);
    let worst = stats
        .iter()
        .min_by(|x, y| x.1.fro_retained.total_cmp(&y.1.fro_retained));
    println!(
        "resized {} modules ({rule}, max rank {}, conv {})",
        stats.len(),
        opts.rank,
        opts.conv_rank
    );
    println!("ranks before: {}", hist(&old_ranks));
    println!("ranks after:  {}", hist(&new_ranks));
    if let Some((key, s)) = worst {
        println!(
            "Frobenius norm of ΔW kept: mean {:.1}% (std {:.3}), lowest {:.1}% ({})",
            100.0 * mean,
            std,
            100.0 * s.fro_retained,
            key.kohya_name()
        );
    }
    println!(
        "wrote {} ({:.1} MB → {:.1} MB, {})",
        out.display(),
        loaded.file_size as f64 / 1e6,
        saved.size as f64 / 1e6,
        lora_core::io::kind_name(kind)
    );
    Ok(())
}

fn extract(args: ExtractArgs) -> AnyResult {
    let kind = dtype_kind(&args.dtype)?;
    let stem = args
        .tuned
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "extracted".into());
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{stem}-lora-r{}.safetensors", args.rank)));
    crate::check_output(
        &out,
        &[(&args.base, "base model"), (&args.tuned, "tuned model")],
        args.force,
    )?;
    if !(args.clamp_quantile > 0.0 && args.clamp_quantile <= 1.0) {
        return Err(format!(
            "--clamp-quantile must be in (0, 1], got {}",
            args.clamp_quantile
        )
        .into());
    }
    let device = lora_sdxl::model::sdxl::resolve_device(args.device.as_deref())
        .map_err(|e| format!("--device: {e}"))?;
    let opts = lora_sdxl::ExtractOptions {
        rank: args.rank,
        conv_rank: args.conv_rank,
        clamp_quantile: Some(args.clamp_quantile),
        min_diff: args.min_diff,
        device,
    };
    let bar = crate::console::progress_bar(0, "modules", false);
    let x = lora_sdxl::extract_lora(&args.base, &args.tuned, &opts, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let title = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| stem.clone());
    let meta = x.metadata(&title, &opts, &args.base, &args.tuned);
    let saved = x.set.save(&out, kind, &meta)?;
    let count = |c: lora_core::Component| x.set.count(c);
    println!(
        "extracted {} modules (UNet {}, CLIP-L {}, bigG {}); {} identical modules left out",
        x.set.len(),
        count(lora_core::Component::Unet),
        count(lora_core::Component::Te1),
        count(lora_core::Component::Te2),
        x.identical
    );
    if x.text_encoders {
        println!(
            "text encoders differ (max |ΔW| {:.3e} > {}): extracted",
            x.text_encoder_max_diff, args.min_diff
        );
    } else {
        println!(
            "text encoders are the same (max |ΔW| {:.3e} ≤ {}): UNet only",
            x.text_encoder_max_diff, args.min_diff
        );
    }
    let (mean, std) = fro_retained_summary(&x.modules);
    println!(
        "Frobenius norm of ΔW kept at rank {}{}: mean {:.1}% (std {:.3})",
        args.rank,
        args.conv_rank
            .map(|c| format!(" / conv {c}"))
            .unwrap_or_default(),
        100.0 * mean,
        std
    );
    println!(
        "wrote {} ({:.1} MB, {}); use it on {} at strength 1 to approximate {}",
        out.display(),
        saved.size as f64 / 1e6,
        lora_core::io::kind_name(kind),
        args.base.display(),
        args.tuned.display()
    );
    Ok(())
}
