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
use serde_json::Value;

use super::flags::whole_u64;

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
    #[arg(long, allow_negative_numbers = true, value_parser = whole_u64)]
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
    let source = match &args.config {
        Some(p) => format!("--config {}", p.display()),
        None => format!("--preset {}", args.preset),
    };
    check_memory(&cfg, &stages, &source)?;
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

/// A number field of a model config JSON (`default` when absent).
fn field(v: &Value, key: &str, default: f64) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// A per-block field: one number or a list (its largest entry), `default` when absent.
fn per_block_max(v: &Value, key: &str, default: f64) -> f64 {
    match v.get(key) {
        Some(Value::Array(a)) => {
            a.iter().filter_map(Value::as_f64).reduce(f64::max).unwrap_or(default)
        }
        Some(x) => x.as_f64().unwrap_or(default),
        None => default,
    }
}

/// Values per input pixel of a conv net with `block_out_channels` halving the resolution per
/// level: at level l (`1/4^l` of the pixels) `c_l · (2·(layers + 1) + 16 + 9)` (the skip
/// activations, one block's temporaries and a 3×3 convolution's 9·c im2col buffer, as in
/// [`gen_sample::memory_estimate`]); plus per attention level (`attention` = the level indices)
/// `2 · heads · L` logits per pixel for `L` tokens at that level.
fn conv_net_per_pixel(
    channels: &[f64],
    layers: f64,
    attention: &[usize],
    heads: f64,
    pixels: f64,
) -> f64 {
    channels
        .iter()
        .enumerate()
        .map(|(l, c)| {
            let scale = 4f64.powi(l as i32);
            let mut v = c * (2.0 * (layers + 1.0) + 16.0 + 9.0) / scale;
            if attention.contains(&l) {
                v += 2.0 * heads * (pixels / scale) / scale;
            }
            v
        })
        .sum()
}

/// Refuses a training config whose memory estimate exceeds what the machine has. The estimate
/// counts the rendered pool (`pool_size` images as 8-bit and f32 RGB and a mask) and the
/// largest working set of one training step of a stage in `stages`: its batch times the
/// forward activations per sample (the conv-net factor of [`conv_net_per_pixel`] at the
/// model's input size, or for CLIP's vision tower `layers · tokens · (12·hidden + 2·heads ·
/// tokens)`) times 3 (kept for the backward pass, their gradients, temporaries).
fn check_memory(cfg: &PretrainConfig, stages: &[Stage], source: &str) -> anyhow::Result<()> {
    let s = cfg.image_size as f64;
    let pixels = s * s;
    let pool = cfg.pool_size as f64 * pixels * (3.0 * (1.0 + 4.0) + 1.0);
    let channels = |v: &Value| -> Vec<f64> {
        v.get("block_out_channels")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let vae_ch = channels(&cfg.vae.config);
    let factor = 2f64.powi(vae_ch.len().saturating_sub(1) as i32);
    let mut worst = (0.0, String::new());
    for st in stages {
        let (batch, per_sample) = match st.name() {
            "vae" => {
                let layers = field(&cfg.vae.config, "layers_per_block", 1.0);
                // encoder and decoder, plus the mid-block attention at the latent size
                let lat = pixels / (factor * factor);
                (
                    cfg.vae.train.batch_size,
                    2.0 * pixels * conv_net_per_pixel(&vae_ch, layers + 1.0, &[], 0.0, pixels)
                        + 2.0 * lat * lat,
                )
            }
            "unet" => {
                let u = &cfg.unet.config;
                let lat = pixels / (factor * factor);
                let attention: Vec<usize> = u
                    .get("down_block_types")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .enumerate()
                            .filter(|(_, t)| t.as_str().is_some_and(|t| t.contains("Attn")))
                            .map(|(i, _)| i)
                            .collect()
                    })
                    .unwrap_or_default();
                let heads = per_block_max(
                    u,
                    "num_attention_heads",
                    per_block_max(u, "attention_head_dim", 8.0),
                );
                let layers = per_block_max(u, "layers_per_block", 2.0);
                (
                    cfg.unet.train.batch_size,
                    lat * conv_net_per_pixel(&channels(u), layers, &attention, heads, lat),
                )
            }
            "evaluator" => {
                let ch: Vec<f64> = cfg.evaluator.channels.iter().map(|&c| c as f64).collect();
                // stride-2 convolutions: level l runs at 1/4^(l+1) of the pixels
                (
                    cfg.evaluator.train.batch_size,
                    pixels / 4.0 * conv_net_per_pixel(&ch, 0.0, &[], 0.0, pixels),
                )
            }
            _ => {
                let v = &cfg.clip.vision_config;
                let patch = field(v, "patch_size", 32.0).max(1.0);
                let tokens = (s / patch).powi(2) + 1.0;
                let hidden = field(v, "hidden_size", 768.0);
                let heads = field(v, "num_attention_heads", 12.0);
                let layers = field(v, "num_hidden_layers", 12.0);
                let text = cfg.max_text_len as f64;
                let t = &cfg.clip.text_config;
                let text_part = field(t, "num_hidden_layers", 12.0)
                    * text
                    * (12.0 * field(t, "hidden_size", 512.0)
                        + 2.0 * field(t, "num_attention_heads", 8.0) * text);
                (
                    cfg.clip.train.batch_size,
                    layers * tokens * (12.0 * hidden + 2.0 * heads * tokens) + text_part,
                )
            }
        };
        let bytes = batch as f64 * per_sample * 4.0 * 3.0;
        if bytes > worst.0 {
            worst = (bytes, format!("{}.train.batch_size {batch}", st.name()));
        }
    }
    let what = format!(
        "{source}: image_size {}, pool_size {}{}",
        cfg.image_size,
        cfg.pool_size,
        if worst.1.is_empty() { String::new() } else { format!(", {}", worst.1) }
    );
    let detail = format!(
        "estimate: {} for the rendered pool + {} for the largest training step",
        gen_core::memory::format_bytes(pool),
        gen_core::memory::format_bytes(worst.0)
    );
    Ok(gen_core::memory::check_fits_here(&what, pool + worst.0, &detail)?)
}

/// UTC wall-clock time as `HH:MM:SS` (for log lines).
fn utc_clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}
