//! `lorakit`: the command-line front end of the lorakit libraries.

mod autocaption;
mod console;
mod data;
mod demo;
mod folder;
mod launch;
mod lora;
mod model;
mod sample;
mod train;
mod ui;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "lorakit",
    about = "Train, inspect and apply SDXL LoRAs (kohya-compatible files)"
)]
struct Cli {
    /// More log output (repeat for even more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A local web UI: datasets and captions, jobs and their queue, live
    /// progress, checkpoints and step comparison; on http://127.0.0.1:8675
    /// by default.
    Ui(ui::UiArgs),
    /// Work with LoRA files.
    Lora {
        #[command(subcommand)]
        command: lora::LoraCommand,
    },
    /// Train a LoRA from a job file (see `lorakit init`).
    Train {
        /// The job file.
        job: PathBuf,
        /// Continue from the run's saved state (also extends a finished run
        /// when train.steps was raised).
        #[arg(long)]
        resume: bool,
        /// Data-parallel: start this many ranks on this machine (one per
        /// GPU, or CPU processes), each training a slice of every batch of
        /// train.batch_size × N (torchrun's variables select a rank instead).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        nproc: u16,
    },
    /// Generate images with a model and LoRAs at strengths; PNGs carry their
    /// parameters (A1111 `parameters` text chunk).
    Sample(sample::SampleArgs),
    /// Compare LoRA checkpoints: one labelled grid of prompts × checkpoints
    /// (by step) or strengths, every other parameter fixed.
    Grid(sample::GridArgs),
    /// Write a commented job file with defaults for a first character LoRA.
    Init {
        /// Where to write it.
        #[arg(long, default_value = "job.toml")]
        out: PathBuf,
        /// The SDXL checkpoint (.safetensors) or diffusers folder.
        #[arg(long)]
        model: Option<String>,
        /// The dataset folder.
        #[arg(long)]
        dataset: Option<String>,
        /// The trigger word (also the run name).
        #[arg(long)]
        trigger: Option<String>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Work with base model checkpoints.
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// Check a dataset folder: every problem by file, then a summary.
    /// Exit status: 0 usable, 1 some files unusable, 2 nothing trainable.
    Dataset {
        #[command(subcommand)]
        command: data::DatasetCommand,
    },
    /// Edit or count the captions of a dataset folder in bulk.
    Caption {
        #[command(subcommand)]
        command: data::CaptionCommand,
    },
    /// Run the built-in demo (no downloads needed) and print where its output is.
    Demo {
        /// Output folder.
        #[arg(long, default_value = "output/demo")]
        out: PathBuf,
    },
}

fn version_string() -> String {
    format!(
        "{} ({})",
        env!("CARGO_PKG_VERSION"),
        lora_sdxl::device::DeviceInfo::query().summary()
    )
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = if quiet {
        "error"
    } else {
        match verbose {
            0 => "warn,lorakit=info,lora_core=info,lora_sdxl=info,lora_data=info",
            1 => "info",
            _ => "debug",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORAKIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // colour codes only when stderr is a terminal (never in log files or pipes)
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .without_time()
        .try_init();
}

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Refuses to write `out` over one of the command's `inputs` (each with the
/// name the message uses) and, without `--force`, over any existing file.
fn check_output(
    out: &std::path::Path,
    inputs: &[(&std::path::Path, &str)],
    force: bool,
) -> AnyResult {
    for (input, what) in inputs {
        if let (Ok(a), Ok(b)) = (out.canonicalize(), input.canonicalize()) {
            if a == b {
                return Err(format!(
                    "{}: the output would replace the {what}; pass another --out",
                    out.display()
                )
                .into());
            }
        }
    }
    if out.exists() && !force {
        return Err(format!("{} exists; pass --force to replace it", out.display()).into());
    }
    Ok(())
}

/// What `lorakit init` tells the user to do next: only the paths it was not given.
fn init_message(out: &std::path::Path, model: bool, dataset: bool) -> String {
    let todo: Vec<&str> = [
        (!model).then_some("model.name_or_path"),
        (!dataset).then_some("datasets.folder_path"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let next = format!("run `lorakit train {}`", out.display());
    if todo.is_empty() {
        format!("wrote {}: review it, then {next}", out.display())
    } else {
        format!(
            "wrote {}: edit {}, then {next}",
            out.display(),
            todo.join(" and ")
        )
    }
}

fn run(cli: Cli) -> AnyResult<ExitCode> {
    match cli.command {
        Command::Lora { command } => lora::run(command),
        Command::Train { job, resume, nproc } => {
            train::run(&job, resume, cli.quiet, usize::from(nproc))
        }
        Command::Init {
            out,
            model,
            dataset,
            trigger,
            force,
        } => {
            check_output(&out, &[], force)?;
            let id = lora_sdxl::JobConfig::new_id();
            let text = lora_sdxl::JobConfig::template(
                model.as_deref(),
                dataset.as_deref(),
                trigger.as_deref(),
                Some(&id),
            );
            lora_core::io::write_atomic(&out, text.as_bytes())?;
            println!("{}", init_message(&out, model.is_some(), dataset.is_some()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { command } => model::run(command),
        Command::Sample(a) => sample::sample(a, cli.quiet),
        Command::Grid(a) => sample::grid(a, cli.quiet),
        Command::Dataset { command } => data::dataset(command),
        Command::Caption { command } => data::caption(command, cli.quiet),
        Command::Ui(a) => ui::run(a),
        Command::Demo { out } => demo::run(&out).map(|()| ExitCode::SUCCESS),
    }
}

fn main() -> ExitCode {
    let version: &'static str = Box::leak(version_string().into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let (Command::Ui(a), Some(m)) = (&mut cli.command, matches.subcommand_matches("ui")) {
        if let Err(e) = a.pair_endpoints(m) {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    init_logging(cli.verbose, cli.quiet);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // lorakit's errors already carry their cause in one line.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
