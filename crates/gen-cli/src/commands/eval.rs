//! `gen eval images` and `gen eval guidance`: prompt accuracy, tiny-FID, saturation excess,
//! clipped pixels and speed of the model on the shapes world's test split (the gen-eval
//! pipeline), for one guidance setting or a CFG-vs-APG sweep over scales.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use gen_core::{write_atomic, DeviceChoice};
use gen_eval::session::{
    csv_header, csv_row, guidance_label, guidance_method, guidance_panels, parse_csv, parse_scales,
    same_settings, samples_grid, settings_columns, sweep_configs, ApgOverrides, EvalConfig,
    EvalOutput, EvalReport, EvalSession, PromptForm, RUN_COLUMNS,
};
use gen_sample::Sampler;
use indicatif::{ProgressBar, ProgressStyle};

use super::flags::{
    at_least_one, parse_device, parse_sampler, whole_u64, ApgFlags, IntervalFlag, ScaleFlag,
};

const METRICS_HELP: &str = "\
Metrics (evaluator = the classifier in MODEL/evaluator, never trained on generated images):
  shape / colour (hue and tone) / background / view accuracy: evaluator labels of the generated
    images vs the prompt; 'real' = the same on the true renders of the prompts (the ceiling).
  tiny-FID: Fréchet distance of evaluator features, generated vs as many real test renders;
    the real-vs-real baseline is the same distance between two disjoint real sets of that size.
    Small sets bias it upwards: compare only runs with the same --prompts × --per-prompt.
  saturation excess: mean HSV saturation of object pixels, generated minus real renders of the
    same prompts (object = farther than 0.12 from the caption's background colour, or from
    the background the evaluator sees when --prompt-form drops it).
  clipped fraction: channel values at 0 or 255.   s/image: generation time per image.
Prompts are captions of the world's TEST split picked by --seed; image i uses prompt i mod
--prompts and noise stream i of --seed (as `gen image`), so runs that differ only in guidance
see the same prompts and noise; --prompt-form shortens them (scored on what they still name).
APG starts from the paper preset (eta 0, r 15, momentum -0.5, x0 space); without
--norm-threshold, r is scaled to the model's latent size as in `gen image`: r·sqrt(D / 65536),
D = C·H·W of one latent (r 15 on SDXL's 4×128×128 latents is 1.875 on the tiny model's
4×16×16).";

const IMAGES_HELP: &str = "\
Writes OUT/report.json (settings, prompts, every metric), OUT/metrics.csv (one row) and
OUT/samples.png (the generated images, one row per prompt when --per-prompt > 1).

Examples:
  gen eval images --out out/eval-cfg
  gen eval images --apg --guidance-scale 10 --eta 0.3 --norm-threshold 2 --out out/eval-apg
  gen eval images --model out/tiny-model --prompts 2 --per-prompt 1 --steps 4 --out out/smoke
  # the short prompts users write (\"a red cube\"), scored on shape and colour
  gen eval images --prompt-form short --prompts 100 --per-prompt 2 --out out/eval-short";

const GUIDANCE_HELP: &str = "\
Runs `gen eval images` for every method × scale with the same prompts and seeds, appending one
row per run to OUT/guidance.csv (every metric); rows already there with the same settings are
reused, so an interrupted sweep resumes where it stopped. Then draws OUT/guidance.png (accuracy,
tiny-FID, saturation excess and clipped fraction vs scale, one line per guidance variant) and
prints the table. Chart and table show every row of OUT/guidance.csv with this run's model,
prompts, sampler, steps and seed, so sweeps of further variants into the same OUT add lines to
one chart.

Examples:
  gen eval guidance --out out/guidance
  gen eval guidance --method cfg,apg --scales 1,3,5,7.5,10,15,20 --norm-threshold 2 --out out/guidance-r2
  gen eval guidance --method apg --scales 5,10,20,30 --eta 0.5 --prompts 64 --out out/apg-eta05
  # one more line in the same chart: APG in the last half of the steps only
  gen eval guidance --method apg --norm-threshold 2 --guidance-interval 0.5,1 --out out/guidance-r2";

/// Measure the model on the shapes world's test prompts.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Generate images for test prompts with one guidance setting and measure them.
    #[command(after_help = format!("{IMAGES_HELP}\n\n{METRICS_HELP}"))]
    Images(ImagesArgs),
    /// Sweep guidance methods × scales (CFG vs APG) with the same prompts and seeds.
    #[command(after_help = format!("{GUIDANCE_HELP}\n\n{METRICS_HELP}"))]
    Guidance(GuidanceArgs),
    /// The model's parts on real test images: VAE reconstruction PSNR and evaluator accuracy.
    #[command(after_help = MODEL_HELP)]
    Model(ModelArgs),
}

const MODEL_HELP: &str = "Examples:
  gen eval model
  gen eval model --model weights/tiny-shapes --images 512 --out eval/model

Renders the first N images of the world's test split (same renderer settings as training:
3×3 supersampling) and reports the VAE's reconstruction PSNR through the posterior mean (dB,
images in [0, 1]) and the evaluator's per-head accuracy (shape, hue, tone, colour = hue and
tone, view word, background).";

/// The model and evaluator folders (every subcommand).
#[derive(Debug, Args)]
pub struct ModelPaths {
    /// Model: a diffusers folder with an evaluator/ folder. Default: $GEN_MODEL, else
    /// weights/tiny-shapes of this checkout (as `gen image`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Evaluator folder (config.json, model.safetensors); default MODEL/evaluator.
    #[arg(long)]
    pub evaluator: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub paths: ModelPaths,
    /// Test images (at least 1).
    #[arg(long, default_value_t = 256, allow_negative_numbers = true, value_parser = at_least_one)]
    pub images: usize,
    /// Also write OUT/model.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options shared by both subcommands.
#[derive(Debug, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub paths: ModelPaths,
    /// Number of test prompts (at least 1).
    #[arg(long, default_value_t = 32, allow_negative_numbers = true, value_parser = at_least_one)]
    pub prompts: usize,
    /// Images per prompt (at least 1).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = at_least_one)]
    pub per_prompt: usize,
    /// Number of denoising steps (at least 1).
    #[arg(long, default_value_t = 30, allow_negative_numbers = true, value_parser = at_least_one)]
    pub steps: usize,
    /// Sampler: ddim, ddpm, euler, euler-a, dpm++2m, dpm++2m-karras.
    #[arg(long, default_value = "dpm++2m", value_parser = parse_sampler)]
    pub scheduler: Sampler,
    #[command(flatten)]
    pub apg: ApgFlags,
    #[command(flatten)]
    pub interval: IntervalFlag,
    /// Prompts: the test captions in full, or without their background and/or view clause:
    /// full, no-background, no-view, short ("a red cube").
    #[arg(long, default_value = "full", value_parser = parse_prompt_form)]
    pub prompt_form: PromptForm,
    /// Seed of the prompts and of every image's noise (a whole number >= 0).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole_u64)]
    pub seed: u64,
    /// Images denoised together (at least 1; does not change the images).
    #[arg(long, default_value_t = 8, alias = "batch", allow_negative_numbers = true, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Device: auto, cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ImagesArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Guidance method: cfg or apg.
    #[arg(long, default_value = "cfg")]
    pub guidance: String,
    /// Use APG (the same as --guidance apg; as in `gen image`).
    #[arg(long, conflicts_with = "guidance")]
    pub apg: bool,
    #[command(flatten)]
    pub scale: ScaleFlag,
}

#[derive(Debug, Args)]
pub struct GuidanceArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Guidance methods, comma-separated: cfg, apg.
    #[arg(long, default_value = "cfg,apg")]
    pub method: String,
    /// Guidance scales, comma-separated (each a finite number; 1 = no guidance).
    #[arg(long, default_value = "1,3,5,7.5,10,15,20", allow_hyphen_values = true)]
    pub scales: String,
}

fn parse_prompt_form(s: &str) -> Result<PromptForm, String> {
    PromptForm::parse(s).map_err(|e| e.to_string())
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    match args.command {
        EvalCommand::Images(a) => run_images(a),
        EvalCommand::Guidance(a) => run_guidance(a),
        EvalCommand::Model(a) => run_model(a),
    }
}

fn run_model(a: ModelArgs) -> anyhow::Result<()> {
    use gen_eval::metrics::{evaluator_accuracy, vae_psnr};
    use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
    let model = resolve_model(&a.paths.model)?;
    let evaluator = a.paths.evaluator.clone().unwrap_or_else(|| model.join("evaluator"));
    let dev = candle_core::Device::Cpu;
    let pipe = SdPipeline::load(&ModelSource::Local(model.clone()), &LoadOptions::default())
        .with_context(|| format!("loading {}", model.display()))?;
    let eval = gen_models::evaluator::Evaluator::load(&evaluator, &dev)
        .with_context(|| format!("loading the evaluator {}", evaluator.display()))?;
    let size = eval.config().image_size as u32;
    let px = (size as f64).powi(2) * 3.0;
    gen_core::memory::check_fits_here(
        &format!("--images {} at {size}x{size}", a.images),
        a.images as f64 * px * (1.0 + 4.0 + 4.0),
        "estimate: the test renders as 8-bit and f32 images and their reconstructions",
    )?;
    let mut data = gen_pretrain::data::WorldData::new(size, 3, 1, &dev)?;
    let t0 = std::time::Instant::now();
    let psnr = vae_psnr(&pipe.vae, &mut data, a.images)?;
    let acc = evaluator_accuracy(&eval, &mut data, a.images)?;
    println!("model {} on the first {} test images ({size}×{size}):", model.display(), a.images);
    println!("  VAE reconstruction PSNR  {psnr:.2} dB");
    println!(
        "  evaluator accuracy       shape {:.1}%  hue {:.1}%  tone {:.1}%  colour {:.1}%  view {:.1}%  background {:.1}%",
        100.0 * acc.shape,
        100.0 * acc.hue,
        100.0 * acc.tone,
        100.0 * acc.colour,
        100.0 * acc.view,
        100.0 * acc.background
    );
    println!("  ({:.1} s)", t0.elapsed().as_secs_f64());
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let doc = serde_json::json!({"model": model, "images": a.images, "image_size": size, "vae_psnr_db": psnr, "evaluator": acc});
        write_atomic(out.join("model.json"), serde_json::to_string_pretty(&doc)?.as_bytes())?;
        println!("wrote {}", out.join("model.json").display());
    }
    Ok(())
}

/// The model folder: `model`, else `gen image`'s default.
fn resolve_model(model: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match model {
        Some(m) => Ok(m.clone()),
        None => match super::image::default_model() {
            Ok(m) => Ok(PathBuf::from(m)),
            Err(looked) => bail!(
                "no model given and the default model weights/tiny-shapes was not found (looked in {}); pass --model DIR or set GEN_MODEL",
                looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

impl CommonArgs {
    fn apg(&self) -> ApgOverrides {
        ApgOverrides {
            eta: self.apg.eta,
            norm_threshold: self.apg.norm_threshold,
            momentum: self.apg.momentum,
        }
    }

    /// Errors when an APG option is given but no APG run will use it.
    fn check_apg_used(&self, apg_runs: bool) -> anyhow::Result<()> {
        self.apg.check_used(apg_runs, "add apg to the guidance methods")
    }

    /// Without --norm-threshold, an APG config's r (the paper preset's, tuned for SDXL) scaled
    /// to the model's latents at the evaluation size, as `gen image` does.
    fn scale_apg_r(&self, cfg: &mut EvalConfig, session: &EvalSession) {
        if self.apg.norm_threshold.is_some() {
            return;
        }
        if let gen_diffusion::GuidanceMethod::Apg(apg) = &mut cfg.guidance {
            let size = session.image_size();
            apg.norm_threshold =
                gen_sample::apg_norm_threshold_for(&session.pipe, size, size, apg.norm_threshold);
        }
    }

    /// Refuses counts and sizes whose memory estimate exceeds what the machine has.
    fn check_memory(&self, cfg: &EvalConfig, session: &EvalSession) -> anyhow::Result<()> {
        let size = session.image_size();
        let n = cfg.num_images();
        let sc = cfg.sample_config(vec![String::new()], size);
        let est = sc.memory_estimate(&session.pipe)?;
        // the real test renders (2 per generated image, for tiny-FID) held as 8-bit RGB, and
        // the generated images kept for the samples grid
        let real = (2 * n).max(cfg.prompts) as f64 * (size * size * 3) as f64;
        let what = format!(
            "--prompts {} × --per-prompt {} at {size}x{size} with --batch-size {}",
            cfg.prompts, cfg.per_prompt, cfg.batch
        );
        let detail = format!(
            "estimate: {} for one UNet step or VAE pass + {} held for the images and real renders",
            gen_core::memory::format_bytes(est.working),
            gen_core::memory::format_bytes(est.held + real)
        );
        Ok(gen_core::memory::check_fits_here(&what, est.total() + real, &detail)?)
    }

    /// The model folder: --model, else `gen image`'s default.
    fn model(&self) -> anyhow::Result<PathBuf> {
        resolve_model(&self.paths.model)
    }

    /// The config with CFG 7.5 (callers set the guidance).
    fn base_config(&self, model: PathBuf) -> EvalConfig {
        EvalConfig {
            evaluator: self.paths.evaluator.clone(),
            prompts: self.prompts,
            per_prompt: self.per_prompt,
            steps: self.steps,
            sampler: self.scheduler,
            seed: self.seed,
            batch: self.batch_size,
            interval: self.interval.guidance_interval,
            prompt_form: self.prompt_form,
            ..EvalConfig::new(model)
        }
    }

    fn session(&self, model: &Path) -> anyhow::Result<EvalSession> {
        let device = gen_core::pick_device(self.device)?;
        Ok(EvalSession::load(model, self.paths.evaluator.as_deref(), &device)?)
    }
}

fn bar(prefix: String) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:40} {pos}/{len} steps ({elapsed}, eta {eta}) {msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(prefix);
    bar
}

/// Runs one evaluation with a progress bar.
fn evaluate(
    session: &mut EvalSession,
    cfg: &EvalConfig,
    label: String,
) -> anyhow::Result<EvalOutput> {
    let bar = bar(label);
    let out = session.evaluate(cfg, &mut |ev| super::image::show_progress(&bar, ev))?;
    bar.finish_and_clear();
    Ok(out)
}

fn create_out(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output folder {}", out.display()))
}

fn run_images(a: ImagesArgs) -> anyhow::Result<()> {
    let c = &a.common;
    // Everything that can be checked without the model first.
    let model = c.model()?;
    let mut cfg = EvalConfig {
        guidance: guidance_method(
            if a.apg { "apg" } else { &a.guidance },
            a.scale.guidance_scale,
            &c.apg(),
        )
        .context("--guidance")?,
        ..c.base_config(model.clone())
    };
    c.check_apg_used(matches!(cfg.guidance, gen_diffusion::GuidanceMethod::Apg(_)))?;
    cfg.validate()?;
    let mut session = c.session(&model)?;
    c.scale_apg_r(&mut cfg, &session);
    c.check_memory(&cfg, &session)?;
    create_out(&c.out)?;
    eprintln!(
        "{} {} prompts × {} image(s), {} {} steps, {}, seed {}, model {}",
        cfg.prompts,
        cfg.prompt_form.name(),
        cfg.per_prompt,
        cfg.sampler,
        cfg.steps,
        describe(&cfg),
        cfg.seed,
        model.display()
    );
    let out = evaluate(&mut session, &cfg, describe(&cfg))?;

    write_atomic(c.out.join("report.json"), out.report.to_json()?.as_bytes())?;
    write_atomic(
        c.out.join("metrics.csv"),
        format!("{}\n{}\n", csv_header(), csv_row(&out.report)).as_bytes(),
    )?;
    let grid = samples_grid(&out.images, cfg.prompts, cfg.per_prompt)?;
    gen_sample::save_png(
        &c.out.join("samples.png"),
        &grid,
        &[("prompts".into(), out.report.prompts.join(" | "))],
    )?;
    print_report(&out.report);
    println!("report: {}", c.out.join("report.json").display());
    println!("metrics: {}", c.out.join("metrics.csv").display());
    println!("samples: {}", c.out.join("samples.png").display());
    Ok(())
}

/// "CFG w=7.5" / "APG w=10 eta=0 r=15 beta=-0.5", then " in steps:0.5,1" with an interval.
fn describe(cfg: &EvalConfig) -> String {
    let method = match &cfg.guidance {
        gen_diffusion::GuidanceMethod::Apg(c) => {
            format!("APG w={} eta={} r={} beta={}", c.scale, c.eta, c.norm_threshold, c.momentum)
        }
        gen_diffusion::GuidanceMethod::Cfg { scale } => format!("CFG w={scale}"),
        gen_diffusion::GuidanceMethod::None => "no guidance".into(),
    };
    match cfg.interval {
        Some(i) => format!("{method} in {i}"),
        None => method,
    }
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1}%", 100.0 * x)).unwrap_or_else(|| "-".into())
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

fn print_report(r: &EvalReport) {
    let m = &r.metrics;
    println!("{:<28} {:>10}   reference", "metric", "generated");
    println!(
        "{:<28} {:>10}   real renders {}",
        "shape accuracy",
        pct(m.shape_accuracy),
        pct(m.real_shape_accuracy)
    );
    println!(
        "{:<28} {:>10}   real renders {}",
        "colour accuracy (hue+tone)",
        pct(m.colour_accuracy),
        pct(m.real_colour_accuracy)
    );
    println!("{:<28} {:>10}   hue {}, tone {}", "", "", pct(m.hue_accuracy), pct(m.tone_accuracy));
    println!(
        "{:<28} {:>10}   real renders {}",
        "background accuracy",
        pct(m.background_accuracy),
        pct(m.real_background_accuracy)
    );
    println!("{:<28} {:>10}", "view accuracy (exact word)", pct(m.view_accuracy));
    println!(
        "{:<28} {:>10.3}   real vs real {:.3} ({} vs {} images)",
        "tiny-FID", m.tiny_fid, m.tiny_fid_real_baseline, m.fid_size, m.fid_size
    );
    println!(
        "{:<28} {:>10}   real {}",
        "object saturation",
        num(m.saturation_generated, 3),
        num(m.saturation_real, 3)
    );
    println!(
        "{:<28} {:>10}   {}",
        "saturation excess",
        num(m.saturation_excess, 3),
        if m.images_without_object > 0 {
            format!("{} image(s) without object pixels left out", m.images_without_object)
        } else {
            String::new()
        }
    );
    println!(
        "{:<28} {:>10}   real {}",
        "clipped fraction",
        pct(Some(m.clipped_fraction)),
        pct(Some(m.clipped_fraction_real))
    );
    println!("{:<28} {:>10.3}", "seconds per image", m.seconds_per_image);
}

fn run_guidance(a: GuidanceArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let model = c.model()?;
    let methods: Vec<String> = a
        .method
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    let scales = parse_scales(&a.scales).context("--scales")?;
    let base = c.base_config(model.clone());
    let mut configs =
        sweep_configs(&base, &methods, &scales, &c.apg()).context("--method and --scales")?;
    c.check_apg_used(methods.iter().any(|m| m == "apg"))?;
    for cfg in &configs {
        cfg.validate()?;
    }
    let csv_path = c.out.join("guidance.csv");
    let mut existing = match std::fs::read_to_string(&csv_path) {
        Ok(t) => parse_csv(&t, &csv_path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(gen_core::Error::io(&csv_path, e).into()),
    };
    let mut session = c.session(&model)?;
    for cfg in &mut configs {
        c.scale_apg_r(cfg, &session);
    }
    c.check_memory(&base, &session)?;
    create_out(&c.out)?;
    let size = session.image_size();
    let total = configs.len();
    let mut sweep_rows: Vec<BTreeMap<String, String>> = Vec::new();
    for (k, cfg) in configs.iter().enumerate() {
        let settings = settings_columns(cfg, size);
        if let Some(row) = existing.iter().find(|r| same_settings(r, &settings)) {
            eprintln!(
                "[{}/{total}] {}: already in {} (reused)",
                k + 1,
                describe(cfg),
                csv_path.display()
            );
            sweep_rows.push(row.clone());
            continue;
        }
        let out = evaluate(&mut session, cfg, format!("[{}/{total}] {}", k + 1, describe(cfg)))?;
        let row: BTreeMap<String, String> =
            out.report.columns().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let m = &out.report.metrics;
        eprintln!(
            "[{}/{total}] {}: shape {} colour {} tiny-FID {:.3} saturation excess {} clipped {}",
            k + 1,
            describe(cfg),
            pct(m.shape_accuracy),
            pct(m.colour_accuracy),
            m.tiny_fid,
            num(m.saturation_excess, 3),
            pct(Some(m.clipped_fraction))
        );
        // Append the row (rewriting the whole file atomically).
        let mut text = match std::fs::read_to_string(&csv_path) {
            Ok(t) if !t.trim().is_empty() => t,
            _ => format!("{}\n", csv_header()),
        };
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&csv_row(&out.report));
        text.push('\n');
        write_atomic(&csv_path, text.as_bytes())?;
        existing.push(row.clone());
        sweep_rows.push(row);
    }
    // every row of the file that saw the same prompts and noise: this sweep's and earlier ones'
    let run = settings_columns(&base, size);
    let same_run = |r: &BTreeMap<String, String>| {
        run.iter().filter(|(k, _)| RUN_COLUMNS.contains(k)).all(|(k, v)| r.get(*k) == Some(v))
    };
    let mut rows: Vec<BTreeMap<String, String>> =
        existing.into_iter().filter(|r| same_run(r)).collect();
    for r in sweep_rows {
        if !rows.contains(&r) {
            rows.push(r);
        }
    }
    let title = format!(
        "guidance sweep: {} {} prompts x {}, {} {} steps, seed {}",
        c.prompts,
        c.prompt_form.name(),
        c.per_prompt,
        c.scheduler,
        c.steps,
        c.seed
    );
    let png = c.out.join("guidance.png");
    gen_core::chart::write_panels(&png, &title, &guidance_panels(&rows), 3)?;
    print_sweep(&rows);
    println!("table: {}", csv_path.display());
    println!("chart: {}", png.display());
    Ok(())
}

fn print_sweep(rows: &[BTreeMap<String, String>]) {
    let get = |r: &BTreeMap<String, String>, k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok());
    let width = rows.iter().map(|r| guidance_label(r).len()).max().unwrap_or(0).max(8);
    println!(
        "{:<width$} {:>6} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>8} {:>8} {:>7}",
        "guidance",
        "scale",
        "shape",
        "colour",
        "tone",
        "backgr",
        "tiny-FID",
        "(real)",
        "sat.exc",
        "clipped",
        "s/img"
    );
    for r in rows {
        println!(
            "{:<width$} {:>6} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>8} {:>8} {:>7}",
            guidance_label(r),
            r.get("scale").map(String::as_str).unwrap_or("?"),
            pct(get(r, "shape_accuracy")),
            pct(get(r, "colour_accuracy")),
            pct(get(r, "tone_accuracy")),
            pct(get(r, "background_accuracy")),
            num(get(r, "tiny_fid"), 3),
            num(get(r, "tiny_fid_real_baseline"), 3),
            num(get(r, "saturation_excess"), 3),
            pct(get(r, "clipped_fraction")),
            num(get(r, "seconds_per_image"), 3),
        );
    }
}
