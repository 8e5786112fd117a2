//! `gen image`: text-to-image and image-to-image with CFG or APG guidance.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use gen_core::DeviceChoice;
use gen_diffusion::{ApgConfig, GuidanceConfig, GuidanceMethod};
use gen_models::pipeline::{HubOptions, ModelSource, SdPipeline};
use gen_sample::{
    generate, plan_outputs, save_outputs, InitImage, Precision, Progress, SampleConfig, Sampler,
};
use indicatif::{ProgressBar, ProgressStyle};

use super::flags::{
    at_least_one, non_negative, parse_device, parse_sampler, parse_size, unit_interval, whole_u64,
    ApgFlags, IntervalFlag, ScaleFlag,
};

const AFTER_HELP: &str = "\
Outputs: --out X.png with one image writes X.png; with --num-images N > 1 it writes the grid
X.png and the images X-000.png, X-001.png, …; --out FOLDER writes FOLDER/image-000.png, …,
FOLDER/grid.png (N > 1) and FOLDER/config.json (the full settings). Every PNG carries the
prompt, seed and full settings in text chunks (`prompt`, `seed`, `parameters`, …). Files are
written only after every image is generated, each atomically: a failed run writes nothing.

Model: --model PATH|ORG/NAME[@REV]; default: $GEN_MODEL, else weights/tiny-shapes of this
checkout (next to the executable or the source tree).

Determinism: image i draws its noise from random stream i of --seed, so the same command gives
the same bytes on the CPU, whatever --batch-size is.

Memory: --size, --num-images, --batch-size and the init image's size (read from its header)
are checked against an estimate of the memory they need, from the model's configs, before
anything is allocated; a request above the available memory (MemAvailable on Linux) or 1 TiB
is refused with the estimate.

Guidance: scale w with D = u + w (c - u); w = 1 is no guidance, w < 0 steers away from the
prompt. --apg switches CFG to adaptive projected guidance (Sadat et al. 2024) with the preset's
eta / norm threshold / momentum unless given. The presets' norm thresholds r were tuned for
SDXL's 4×128×128 latents; without --norm-threshold, r is scaled to the model's latent size:
r·sqrt(D / 65536), D = C·H·W of one latent (the embedded model's 4×16×16 latents: 15 →
1.875). The r used is printed on stderr and saved with the outputs.

The embedded model (weights/tiny-shapes) knows the words of its world's captions, \"a|an
[light|dark] HUE SHAPE on a|an BACKGROUND background, VIEW view\"; the background and view
clauses may be left out (it then picks them). Full captions follow the prompt most closely
(its model card has the accuracy of each form).

Examples:
  gen image \"a red cube, front view\"
  gen image \"a red cube on a grey background, front view\" --steps 20 --seed 7 --out cube.png
  gen image \"a red cube on a white background, side view\" --apg --guidance-scale 10 --eta 0.3 --num-images 4 --out runs/apg
  gen image \"a green sphere on a blue background, back view\" --scheduler euler-a --guidance-rescale 0.7 --guidance-interval 0.2,0.8
  gen image \"a red cube on a grey background, front view\" --lora style.safetensors:0.8 --lora detail.safetensors
  gen image \"a yellow cone on a grey background, front view\" --init-image cube.png --strength 0.6 --out cone.png
  gen image \"an astronaut\" --model stabilityai/stable-diffusion-2-1-base --offline --size 512x512";

/// Generate images from a prompt (text-to-image) or from an image and a prompt (image-to-image).
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub struct ImageArgs {
    /// The prompt. Several prompts: image i uses prompt i mod count (and --num-images defaults
    /// to the number of prompts).
    #[arg(required = true, num_args = 1..)]
    pub prompt: Vec<String>,
    /// Prompt of the unconditional branch (what to steer away from).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[command(flatten)]
    pub scale: ScaleFlag,
    /// Use adaptive projected guidance (APG) instead of CFG.
    #[arg(long)]
    pub apg: bool,
    /// APG preset: paper (eta 0, r 15, momentum -0.5, x0 space), diffusers (eta 1, r 15, no
    /// momentum, model-output space, u + w·update) or comfy (eta 1, r 5, x0 space, c + w·update).
    #[arg(long, default_value = "paper", requires = "apg", value_parser = ["paper", "diffusers", "comfy"])]
    pub apg_preset: String,
    #[command(flatten)]
    pub apg_flags: ApgFlags,
    /// CFG-rescale phi in [0, 1] (0 = off; 0.7 in Lin et al. 2023).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = unit_interval)]
    pub guidance_rescale: f64,
    #[command(flatten)]
    pub interval: IntervalFlag,
    /// Sampler: ddim, ddpm, euler, euler-a, dpm++2m, dpm++2m-karras.
    #[arg(long, default_value = "dpm++2m", value_parser = parse_sampler)]
    pub scheduler: Sampler,
    /// DDIM eta (>= 0; 0 = deterministic DDIM); only with --scheduler ddim.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = non_negative)]
    pub ddim_eta: f64,
    /// Number of denoising steps (at least 1).
    #[arg(long, default_value_t = 30, allow_negative_numbers = true, value_parser = at_least_one)]
    pub steps: usize,
    /// Random seed (a whole number >= 0).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole_u64)]
    pub seed: u64,
    /// Image size WxH in pixels (or one number for a square); a multiple of the model's factor
    /// (8·8 = 64 for Stable Diffusion). Default: the model's native size, or the init image's.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_size)]
    pub size: Option<(usize, usize)>,
    /// Number of images (at least 1).
    #[arg(long, allow_negative_numbers = true, value_parser = at_least_one)]
    pub num_images: Option<usize>,
    /// Images denoised together (at least 1; does not change the images).
    #[arg(long, default_value_t = 1, alias = "batch", allow_negative_numbers = true, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Model: a diffusers folder or a hub repo id ORG/NAME[@REVISION].
    #[arg(long)]
    pub model: Option<String>,
    /// Read hub models from the local cache only.
    #[arg(long)]
    pub offline: bool,
    /// Compute precision: f32, f16 or bf16 (the CPU runs f32 fastest).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: Precision,
    /// Device: auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// Image-to-image: start from this image (PNG or JPEG), resized to --size if given.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Image-to-image: how much to change the init image, in [0, 1] (0 = the VAE round trip,
    /// 1 = from the most noised latent); 0.8 when not given.
    #[arg(long, requires = "init_image", allow_negative_numbers = true, value_parser = unit_interval)]
    pub strength: Option<f64>,
    /// LoRA file (kohya or diffusers/PEFT .safetensors) merged into the UNet and text encoder,
    /// as FILE or FILE:SCALE (scale 1 when omitted); repeatable.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    pub lora: Vec<gen_sample::LoraSpec>,
    /// Output: a .png file or a folder (see below).
    #[arg(long, default_value = "gen-image.png")]
    pub out: PathBuf,
}

fn parse_lora(s: &str) -> Result<gen_sample::LoraSpec, String> {
    gen_sample::LoraSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_dtype(s: &str) -> Result<Precision, String> {
    Precision::parse(s).map_err(|e| e.to_string())
}

/// Shows a sampling event on a step progress bar (warnings above it).
pub(crate) fn show_progress(bar: &ProgressBar, ev: &Progress) {
    match ev {
        Progress::Warning(w) => crate::progress::say(bar, format!("warning: {w}")),
        Progress::Start { total_steps, .. } => bar.set_length(*total_steps as u64),
        Progress::Step { done, .. } => bar.set_position(*done as u64),
        Progress::Decoded { images_done, num_images } => {
            bar.set_message(format!("{images_done}/{num_images} images"))
        }
    }
}

/// The default model folder: `$GEN_MODEL`, else `weights/tiny-shapes` found next to the
/// executable (or an ancestor of its folder), else in the source tree gen was built from.
/// Returns the candidates looked at when none exists.
pub(crate) fn default_model() -> Result<String, Vec<PathBuf>> {
    if let Ok(m) = std::env::var("GEN_MODEL") {
        if !m.is_empty() {
            return Ok(m);
        }
    }
    let rel = Path::new("weights").join("tiny-shapes");
    let mut looked = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/gen → the checkout is three levels up; an installed copy may sit beside it.
        for dir in exe.ancestors().skip(1).take(3) {
            looked.push(dir.join(&rel));
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let src = src.canonicalize().unwrap_or(src);
    if !looked.contains(&src.join(&rel)) {
        looked.push(src.join(&rel));
    }
    match looked.iter().find(|p| p.join("model_index.json").is_file()) {
        Some(p) => Ok(p.display().to_string()),
        None => Err(looked),
    }
}

/// The sampling config from the flags (without loading anything).
fn config_from_args(a: &ImageArgs, model: &str) -> anyhow::Result<SampleConfig> {
    a.apg_flags.check_used(a.apg, "add --apg")?;
    let w = a.scale.guidance_scale;
    let method = if a.apg {
        let preset = match a.apg_preset.as_str() {
            "diffusers" => ApgConfig::diffusers(w),
            "comfy" => ApgConfig::comfy(w),
            _ => ApgConfig::paper(w),
        };
        GuidanceMethod::Apg(a.apg_flags.apply(preset))
    } else {
        GuidanceMethod::Cfg { scale: w }
    };
    let num_images = a.num_images.unwrap_or(a.prompt.len());
    let cfg = SampleConfig {
        prompts: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        guidance: GuidanceConfig {
            method,
            rescale_phi: a.guidance_rescale,
            interval: a.interval.guidance_interval,
        },
        sampler: a.scheduler,
        steps: a.steps,
        seed: a.seed,
        width: a.size.map(|s| s.0),
        height: a.size.map(|s| s.1),
        num_images,
        batch_size: a.batch_size,
        batch_invariant: true,
        dtype: a.dtype,
        ddim_eta: a.ddim_eta,
        init_image: a
            .init_image
            .as_ref()
            .map(|p| InitImage { path: p.clone(), strength: a.strength.unwrap_or(0.8) }),
        model: Some(model.to_string()),
        loras: a.lora.clone(),
        apg_scale_norm_threshold: a.apg && a.apg_flags.norm_threshold.is_none(),
    };
    if let Some(l) = cfg.loras.iter().find(|l| !l.path.is_file()) {
        bail!("--lora {}: no such file", l.path.display());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Refuses a size × count whose memory estimate ([`gen_sample::memory_estimate`]) exceeds what
/// the machine has; the error names the flags that set it.
fn check_memory(a: &ImageArgs, pipe: &SdPipeline, cfg: &SampleConfig) -> anyhow::Result<()> {
    let (w, h) = cfg.resolved_size()?;
    let est = cfg.memory_estimate(pipe)?;
    let size = match (&a.size, &a.init_image) {
        (None, Some(p)) => format!("--init-image {} ({w}x{h} pixels)", p.display()),
        (None, None) => format!("the model's native size {w}x{h}"),
        (Some(_), _) => format!("--size {w}x{h}"),
    };
    let what =
        format!("{size} with --num-images {} --batch-size {}", cfg.num_images, cfg.batch_size);
    let detail = format!(
        "estimate: {} for one UNet step or VAE pass + {} held for the images",
        gen_core::memory::format_bytes(est.working),
        gen_core::memory::format_bytes(est.held)
    );
    Ok(gen_core::memory::check_fits_here(&what, est.total(), &detail)?)
}

pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => match default_model() {
            Ok(m) => m,
            Err(looked) => bail!(
                "no model given and the default model weights/tiny-shapes was not found (looked in {}); pass --model PATH|ORG/NAME or set GEN_MODEL",
                looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        },
    };
    // Everything that can be checked without the model first.
    let cfg = config_from_args(&args, &model)?;
    // The output path's form (one image or several) before loading; all paths after the
    // memory check, since --num-images may be absurd.
    plan_outputs(&args.out, cfg.num_images.min(2))?;
    if let Some(ii) = &cfg.init_image {
        ii.dimensions()?;
    }

    let source = ModelSource::parse(&model)?;
    let device = gen_core::pick_device(args.device)?;
    cfg.dtype.check_device(&device)?;
    let hub = HubOptions { offline: args.offline, ..Default::default() };
    let pipe = SdPipeline::load(&source, &cfg.load_options(device, hub))
        .with_context(|| format!("loading model {model}"))?;
    gen_sample::apply_loras(&pipe, &cfg.loras).context("applying --lora")?;
    let scaled_r = cfg.apg_scale_norm_threshold;
    let cfg = cfg.resolve(&pipe)?;
    let (w, h) = cfg.resolved_size()?;
    check_memory(&args, &pipe, &cfg)?;
    let plan = plan_outputs(&args.out, cfg.num_images)?;
    if let GuidanceMethod::Apg(apg) = &cfg.guidance.method {
        let (c, lh, lw) = pipe.latent_shape(w, h);
        let how = if scaled_r {
            format!(
                "the {} preset's r scaled to {c}×{lh}×{lw} latents by sqrt(D / 65536); set it with --norm-threshold",
                args.apg_preset
            )
        } else {
            "--norm-threshold".to_string()
        };
        eprintln!("APG norm threshold r = {} ({how})", apg.norm_threshold);
    }
    eprintln!(
        "{} image(s) {w}x{h}, {} {} steps, guidance {}, seed {}, model {model}",
        cfg.num_images,
        cfg.sampler,
        cfg.steps,
        cfg.guidance.build()?.name(),
        cfg.seed
    );

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps ({elapsed}, eta {eta}) {msg}")
            .expect("valid template"),
    );
    let started = std::time::Instant::now();
    let images = generate(&pipe, &cfg, &mut |ev| show_progress(&bar, ev))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let saved = save_outputs(&args.out, &images, &cfg)
        .with_context(|| format!("writing outputs to {}", args.out.display()))?;
    debug_assert_eq!(saved, plan);
    println!("generated {} image(s) in {secs:.2} s", images.len());
    for p in &saved.images {
        println!("image: {}", p.display());
    }
    if let Some(g) = &saved.grid {
        println!("grid: {}", g.display());
    }
    if let Some(c) = &saved.config {
        println!("config: {}", c.display());
    }
    Ok(())
}
