//! `lorakit caption auto`: captions a folder with a vision model behind an
//! OpenAI-compatible endpoint (the work is in `lora_data::autocaption`).

use crate::folder::FolderArgs;
use crate::AnyResult;
use clap::{Args, ValueEnum};
use lora_data::autocaption::{
    auto_caption, AutoCaptionOptions, AutoCaptionReport, CaptionEvent, CaptionStyle, Endpoint,
    EndpointSettings, Outcome,
};
use lora_data::ScanOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Caption style.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Style {
    /// Comma-separated Danbooru-style tags (SDXL, Illustrious, Pony, NoobAI).
    Tags,
    /// One or two plain sentences.
    Natural,
}

#[derive(Args, Debug)]
pub struct AutoArgs {
    #[command(flatten)]
    folder: FolderArgs,
    /// The OpenAI-compatible API base, e.g. http://127.0.0.1:8080/v1
    /// (llama-server), http://127.0.0.1:11434/v1 (Ollama), https://api.openai.com/v1.
    #[arg(long)]
    endpoint: String,
    /// The model name (default: the first model the endpoint lists).
    #[arg(long)]
    model: Option<String>,
    /// The environment variable holding the API key (the key itself is never
    /// taken on the command line).
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,
    /// Put this trigger word first in every caption.
    #[arg(long)]
    trigger: Option<String>,
    /// Tags to take out of every caption (the ones that define the character).
    #[arg(long, value_name = "TAG", num_args = 1.., value_delimiter = ',')]
    remove: Vec<String>,
    /// Describe the character; the model is then asked which tags of each
    /// caption describe the character itself, and those are removed.
    #[arg(long, value_name = "DESCRIPTION")]
    character: Option<String>,
    /// Tags or sentences.
    #[arg(long, value_enum, default_value = "tags")]
    style: Style,
    /// A file with your own instruction for the model (instead of the built-in one).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Longest image side sent, in pixels (images are never enlarged).
    #[arg(long, default_value_t = 1024)]
    max_side: u32,
    /// Images in flight at once (match the server's parallel slots).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Caption only images without a caption (the default).
    #[arg(long, conflicts_with = "overwrite")]
    only_missing: bool,
    /// Replace existing captions too.
    #[arg(long)]
    overwrite: bool,
    /// Ask the model and print the captions, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Retries per image on 429, 5xx, timeouts and connection errors.
    #[arg(long, default_value_t = 3)]
    retries: u32,
}

fn options(args: &AutoArgs) -> AnyResult<AutoCaptionOptions> {
    if !(64..=8192).contains(&args.max_side) {
        return Err(format!("--max-side {}: use 64 to 8192 pixels", args.max_side).into());
    }
    if !(1..=64).contains(&args.concurrency) {
        return Err(format!("--concurrency {}: use 1 to 64", args.concurrency).into());
    }
    let instruction = match &args.prompt_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("--prompt-file {}: {e}", p.display()))?;
            if text.trim().is_empty() {
                return Err(format!("--prompt-file {}: the file is empty", p.display()).into());
            }
            Some(text)
        }
        None => None,
    };
    Ok(AutoCaptionOptions {
        style: match args.style {
            Style::Tags => CaptionStyle::Tags,
            Style::Natural => CaptionStyle::Natural,
        },
        instruction,
        trigger: args.trigger.clone(),
        remove: args.remove.iter().map(|t| t.trim().to_string()).collect(),
        character: args.character.clone(),
        max_side: args.max_side,
        concurrency: args.concurrency,
        overwrite: args.overwrite && !args.only_missing,
        dry_run: args.dry_run,
        scan: ScanOptions {
            verify: false,
            ..args.folder.scan_options()
        },
    })
}

pub fn run(args: AutoArgs, quiet: bool) -> AnyResult<ExitCode> {
    if args.timeout == 0 {
        return Err("--timeout must be at least 1 second".into());
    }
    let opts = options(&args)?;
    let mut endpoint = Endpoint::new(
        &args.endpoint,
        EndpointSettings {
            model: args.model.clone(),
            timeout: Duration::from_secs(args.timeout),
            retries: args.retries,
            backoff: Duration::from_secs(2),
        },
    )?;
    if let Some(var) = &args.api_key_env {
        endpoint = endpoint.with_api_key_env(var)?;
    }
    endpoint.probe()?;
    if args.model.is_none() {
        let m = endpoint.resolve_model()?;
        if !quiet {
            eprintln!("model: {m} (the endpoint's first; choose with --model)");
        }
    }
    let stop = crate::console::stop_on_ctrl_c(
        "stopping: the images in flight finish and are written; press Ctrl-C again to quit now",
        "quit; every caption written so far is complete",
    );
    let bar = crate::console::progress_bar(0, "images", quiet);
    let dry_run = args.dry_run;
    let on_event = |e: CaptionEvent<'_>| {
        let r = match e {
            CaptionEvent::Planned { images, .. } => {
                if let Some(b) = &bar {
                    b.set_length(images as u64);
                }
                return;
            }
            CaptionEvent::Done(r) => r,
        };
        let say = |line: String, stdout: bool| {
            let out = || {
                if stdout {
                    println!("{line}")
                } else {
                    eprintln!("{line}")
                }
            };
            match &bar {
                Some(b) => b.suspend(out),
                None => out(),
            }
        };
        match &r.outcome {
            Outcome::Captioned { caption, .. } if dry_run => {
                say(format!("{}: {caption}", r.rel), true)
            }
            Outcome::Failed(why) => say(format!("failed {}: {why}", r.rel), false),
            _ => {}
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    };
    let report = auto_caption(&args.folder.dir, &endpoint, &opts, &stop, &on_event)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    print_summary(&report);
    if let Some(why) = &report.aborted {
        return Err(format!("stopped: {why}").into());
    }
    Ok(if report.failed() > 0 || report.interrupted {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_summary(r: &AutoCaptionReport) {
    let verb = if r.dry_run {
        "would write"
    } else {
        "captioned"
    };
    let mut parts = vec![format!("{verb} {}", r.captioned())];
    if r.skipped() > 0 {
        parts.push(format!(
            "skipped {} (already captioned; --overwrite replaces them)",
            r.skipped()
        ));
    }
    parts.push(format!("failed {}", r.failed()));
    println!("{}", parts.join(", "));
    for img in &r.images {
        if let Outcome::Failed(why) = &img.outcome {
            println!("  {}: {why}", img.rel);
        }
    }
    if r.not_started() > 0 && r.aborted.is_none() {
        println!(
            "stopped with {} image(s) not captioned; run the same command again to caption them (finished captions are kept)",
            r.not_started()
        );
    }
    if r.dry_run {
        println!("(dry run: nothing written)");
    }
}
