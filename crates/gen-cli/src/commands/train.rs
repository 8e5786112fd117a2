//! `gen train`: trains the embedded tiny Stable Diffusion (CLIP, VAE, UNet) and its evaluator on
//! the shapes world (gen-pretrain), resumable, and optionally exports the diffusers folder.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;
use gen_pretrain::{PretrainConfig, RunControl, Stage, TrainEvent, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

const EXAMPLES: &str = "\
Writes OUT/config.json, OUT/tokenizer/ and one folder per stage (evaluator, clip, vae, unet) with
metrics.csv, loss.png and atomic checkpoints. Running the same command again resumes every stage
from its latest checkpoint and continues bit-identically. --export writes the diffusers pipeline
folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/, clip/, evaluator/).

Examples:
  gen train --preset tiny --out out/tiny-run --export out/tiny-model
  gen train --preset real --out /work/train-run/run
  gen train --out /work/train-run/run --config /work/train-run/run/config.json --stages unet";

/// Train the embedded model and its evaluator on the shapes world.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct TrainArgs {
    /// Run folder (created if missing; an existing run is resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// Preset: tiny (seconds, for tests) or real (the shipped model).
    #[arg(long, default_value = "real")]
    pub preset: String,
    /// A config JSON (as saved in OUT/config.json) instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Stages to run, in order (comma-separated): evaluator, clip, vae, unet.
    #[arg(long, value_delimiter = ',', default_value = "evaluator,clip,vae,unet")]
    pub stages: Vec<String>,
    /// Stop each stage after this many completed steps (resume later with the same command).
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Export the trained pipeline to this folder afterwards.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Weight dtype of the export: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = match &args.config {
        Some(p) => PretrainConfig::load(p)?,
        None => PretrainConfig::preset(&args.preset)?,
    };
    let stages =
        args.stages.iter().map(|s| Stage::parse(s)).collect::<gen_core::Result<Vec<_>>>()?;
    let dtype = match args.dtype.as_str() {
        "f16" => DType::F16,
        "f32" => DType::F32,
        d => anyhow::bail!("--dtype {d}: expected f16 or f32"),
    };
    let mut trainer = Trainer::new(cfg, &args.out, &Device::Cpu)
        .with_context(|| format!("preparing {}", args.out.display()))?;
    // Without a terminal (a background run writing to a log file) the bar is hidden and its
    // `println`s vanish, so events go to stderr as plain lines, with a step line every 30 s.
    let tty = std::io::stderr().is_terminal();
    let log = |line: String| eprintln!("[{}] {line}", utc_clock());
    let mut last_line = Instant::now();
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg} ({elapsed}, eta {eta})")
            .expect("valid template"),
    );
    let say = |line: String| if tty { bar.println(line) } else { log(line) };
    let mut on_event = |e: &TrainEvent| {
        match e {
        TrainEvent::StageStart { stage, start_step, total_steps, params } => {
            bar.reset();
            bar.set_length(*total_steps);
            bar.set_position(*start_step);
            bar.set_prefix(stage.clone());
            say(format!("{stage}: {params} parameters, from step {start_step} of {total_steps}"));
        }
        TrainEvent::Step { stage, step, total_steps, loss, lr, seconds, .. } => {
            bar.set_position(*step);
            bar.set_message(format!("loss {loss:.4}"));
            if !tty && (last_line.elapsed().as_secs() >= 30 || step == total_steps) {
                last_line = Instant::now();
                log(format!("{stage} {step}/{total_steps} loss {loss:.5} lr {lr:.2e} ({seconds:.2} s/step)"));
            }
        }
        TrainEvent::Checkpoint { stage, step, .. } => {
            if !tty {
                log(format!("{stage}: checkpoint at step {step}"));
            }
        }
        TrainEvent::StageEnd { stage, step, seconds, optimizer_state_bytes } => say(format!(
            "{stage}: at step {step}, {seconds:.1} s of training in total; optimizer state {:.2} MB",
            optimizer_state_bytes.iter().sum::<usize>() as f64 / 1e6
        )),
        TrainEvent::Note { stage, message } => say(format!("{stage}: {message}")),
    }
    };
    for s in stages {
        trainer
            .train(s, &RunControl { stop_after: args.stop_after }, &mut on_event)
            .with_context(|| format!("training stage {}", s.name()))?;
    }
    bar.finish_and_clear();
    println!("run folder: {} (metrics.csv and loss.png per stage)", args.out.display());
    if let Some(dest) = &args.export {
        let r = gen_pretrain::export::export(&args.out, dest, dtype)
            .with_context(|| format!("exporting to {}", dest.display()))?;
        let total: u64 = r.files.iter().map(|(_, b)| b).sum();
        println!(
            "exported {} ({:.1} MB of weights, VAE scaling factor {:.5})",
            dest.display(),
            total as f64 / 1e6,
            r.scaling_factor
        );
    }
    Ok(())
}

/// UTC wall-clock time as `HH:MM:SS` (for log lines).
fn utc_clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}
