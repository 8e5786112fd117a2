//! `gen fit`: fits Gaussian splats (or a neural field) to posed images — renders of a world
//! object (gen-world) or a transforms.json folder — and reports held-out PSNR and silhouette
//! IoU. The logic lives in `gen_scene::fit`; this file parses the flags into the library's
//! configs and calls it, [`views`] builds the views, [`report`] shows progress and writes the
//! metrics.

mod report;
mod views;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use gen_scene::density::DensityConfig;
use gen_scene::fit::field::{
    evaluate_field, field_preset, fit_field, FieldExportSet, FieldFitConfig, FieldFitEvent,
    FieldOutputs, PhotometricLoss,
};
use gen_scene::fit::{
    evaluate, fit, ExportSet, FitConfig, FitEvent, FitOutputs, InitConfig, InitRegion,
    LearningRates,
};

use super::flags::{at_least_one, finite, non_negative, whole_u64};
use report::{write_heldout_sheet, Progress, Summary};
use views::{data_views, world_views, Views};

const EXAMPLES: &str = "\
Writes OUT/config.json (every fit setting), OUT/previews/step_*.png (first training view:
target | render), OUT/checkpoint.safetensors (splats, optimizer state, step; --resume continues
from it exactly), the exports chosen with --export (OUT/splats.ply, OUT/splats.glb,
OUT/mesh.glb, OUT/turntable.gif + .png), OUT/heldout.png (held-out targets above renders) and
OUT/metrics.json (held-out PSNR and silhouette IoU, wall and CPU time). All writes are atomic.

World objects are rendered by gen-world: --views training cameras on an orbit (azimuth steps
of 360/views, elevations cycling -5/10/25/40/55 degrees, the world's range) and --holdout
cameras in between (other azimuths, elevations 5/30/50).

Examples:
  gen fit --world \"a red cube\" --out out/fit-cube
  gen fit --shape torus --colour \"light blue\" --background grey --views 36 --holdout 12 --size 64 --out out/torus
  gen fit --world \"a green cone\" --steps 3000 --export ply,glb,mesh,turntable --out out/cone
  gen fit --data data/lego --steps 5000 --bg 1,1,1 --out out/lego
  gen fit --world \"a red cube\" --representation field --steps 1500 --export mesh,turntable --out out/cube-field

--representation field fits a hash-grid neural field (box of half-side 1.25 x the init radius)
with random ray batches; its checkpoint holds the field parameters, optimizer state,
occupancy grid and step, and its exports are mesh.glb + mesh.obj and the turntable.
  gen fit --world \"a red cube\" --out out/fit-cube --resume";

/// Fit Gaussian splats to posed images (a world object or a transforms.json folder).
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct FitArgs {
    /// A world object as a caption: "a [light|dark] COLOUR SHAPE [on a BACKGROUND background]".
    #[arg(long, conflicts_with_all = ["data", "shape"])]
    pub world: Option<String>,
    /// World shape (sphere, cube, cylinder, cone, torus) instead of --world.
    #[arg(long, conflicts_with = "data")]
    pub shape: Option<String>,
    /// World colour with --shape, e.g. "red" or "dark green".
    #[arg(long, requires = "shape")]
    pub colour: Option<String>,
    /// World background with --shape: grey, white, black, blue.
    #[arg(long, requires = "shape")]
    pub background: Option<String>,
    /// A folder with transforms.json (Blender / nerfstudio convention).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Training views rendered from the world.
    #[arg(long, default_value_t = 36, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub views: u32,
    /// Held-out views (world: other cameras; --data: frames taken out of training, evenly spaced).
    #[arg(long, default_value_t = 12, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub holdout: u32,
    /// World image size in pixels.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(8..=1024))]
    pub size: u32,
    /// Optimisation steps (one view per step).
    #[arg(long, default_value_t = 1500, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Seed of every random choice (initialisation, view order, splits).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole_u64)]
    pub seed: u64,
    /// Continue from OUT/checkpoint.safetensors when it exists.
    #[arg(long)]
    pub resume: bool,
    /// What to fit: Gaussian splats or a neural field (hash-grid CAM field, volume rendered).
    #[arg(long, default_value = "splats", value_parser = ["splats", "field"])]
    pub representation: String,
    /// Exports at the end: comma list of ply, glb, mesh, turntable (or all, none); a field
    /// exports mesh (mesh.glb + mesh.obj) and turntable. Default: ply,glb for splats, mesh for
    /// a field.
    #[arg(long)]
    pub export: Option<String>,
    /// Field size preset (--representation field): tiny, small, base.
    #[arg(long, default_value = "small", value_parser = ["tiny", "small", "base"])]
    pub field_preset: String,
    /// Samples per ray (--representation field).
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = at_least_one)]
    pub samples_per_ray: usize,
    /// Random pixels (rays) per step from all training views (--representation field).
    #[arg(long, default_value_t = 1024, allow_negative_numbers = true, value_parser = at_least_one)]
    pub rays: usize,
    /// Initial learning rate of the field (decays log-linearly to a tenth).
    #[arg(long, default_value_t = 1e-2, allow_negative_numbers = true, value_parser = non_negative)]
    pub field_lr: f64,
    /// Re-mark the field's occupancy grid every N steps (0: never skip empty space).
    #[arg(long, default_value_t = 16, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub occupancy_every: u64,
    /// Initial Gaussians (random in a ball).
    #[arg(long, default_value_t = 1000, allow_negative_numbers = true, value_parser = at_least_one)]
    pub gaussians: usize,
    /// Radius of the initial ball (world objects have radius about 1; default 1 for the world,
    /// a third of the mean camera distance for --data).
    #[arg(long, allow_negative_numbers = true, value_parser = finite)]
    pub init_radius: Option<f64>,
    /// SH degree of the colour (0..=3).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(0..=3))]
    pub sh_degree: u64,
    /// Weight of the alpha-vs-mask L1 term (views with masks only; 0 = off).
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true, value_parser = non_negative)]
    pub mask_weight: f64,
    /// Densification gradient threshold (mean view-space gradient norm, NDC units). 3DGS uses
    /// 2e-4 on 800 px images; gradients are larger on small images, 1e-3 suits 64 px.
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true, value_parser = non_negative)]
    pub grad_threshold: f64,
    /// Iso-level for --export mesh: of the splat density (default 1, as DreamGaussian) or of
    /// the field's σ (default 10 per world unit).
    #[arg(long, allow_negative_numbers = true, value_parser = finite)]
    pub mesh_threshold: Option<f64>,
    /// Upper bound on the number of Gaussians (at least 1).
    #[arg(long, default_value_t = 10_000, allow_negative_numbers = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_gaussians: u64,
    /// Background colour for --data as R,G,B in [0, 1] (world: its own background).
    #[arg(long, default_value = "1,1,1")]
    pub bg: String,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 500, allow_negative_numbers = true, value_parser = whole_u64)]
    pub checkpoint_every: u64,
    /// Preview image every N steps (0: never).
    #[arg(long, default_value_t = 250, allow_negative_numbers = true, value_parser = whole_u64)]
    pub preview_every: u64,
}

/// Bytes per view pixel: RGB + mask of the target and of a render, f32, with room for the loss
/// buffers (SSIM windows, gradients) — 4 channels × 4 bytes × 4 copies.
const BYTES_PER_VIEW_PIXEL: f64 = 64.0;
/// Bytes per Gaussian: at most 59 parameters (SH degree 3) with their gradient and two AdamW
/// moments (236 floats), the projected 2-D splat and the density statistics (about 40 floats),
/// and tile-intersection entries — rounded up to 2 KiB.
const BYTES_PER_GAUSSIAN: f64 = 2048.0;
/// Bytes per ray sample of a field batch: the hash-grid features (at most 16 levels × 2), the
/// MLP activations (64 wide) and their gradients, with candle's temporaries — rounded up to
/// 8 KiB.
const BYTES_PER_FIELD_SAMPLE: f64 = 8192.0;

/// Refuses sizes and counts whose memory estimate does not fit this machine, before any view is
/// rendered or loaded (the estimate is conservative; see the constants above).
fn check_memory(args: &FitArgs) -> anyhow::Result<()> {
    let (views, holdout, size) = (args.views as f64, args.holdout as f64, args.size as f64);
    let images = (views + holdout) * size * size * BYTES_PER_VIEW_PIXEL;
    let (what, model, detail) = if args.representation == "field" {
        let samples = args.rays as f64 * args.samples_per_ray as f64;
        (
            format!(
                "--views {} --size {} --rays {} --samples-per-ray {}",
                args.views, args.size, args.rays, args.samples_per_ray
            ),
            samples * BYTES_PER_FIELD_SAMPLE,
            "ray samples of one batch",
        )
    } else {
        let count = (args.gaussians as f64).max(args.max_gaussians as f64);
        (
            format!(
                "--views {} --size {} --gaussians {} --max-gaussians {}",
                args.views, args.size, args.gaussians, args.max_gaussians
            ),
            count * BYTES_PER_GAUSSIAN,
            "Gaussians with their optimizer state",
        )
    };
    gen_core::memory::check_fits_here(
        &what,
        images + model,
        &format!(
            "estimate: {} for the views, {} for the {detail}",
            gen_core::memory::format_bytes(images),
            gen_core::memory::format_bytes(model)
        ),
    )?;
    Ok(())
}

pub fn run(args: FitArgs) -> anyhow::Result<()> {
    check_memory(&args)?;
    let field = args.representation == "field";
    let export_list =
        args.export.clone().unwrap_or_else(|| if field { "mesh" } else { "ply,glb" }.to_string());
    let field_exports = if field { Some(FieldExportSet::parse(&export_list)?) } else { None };
    let exports = if field { ExportSet::default() } else { ExportSet::parse(&export_list)? };
    let views = match (&args.data, args.world.is_some() || args.shape.is_some()) {
        (Some(d), false) => {
            data_views(&args, d).with_context(|| format!("loading {}", d.display()))?
        }
        (None, true) => world_views(&args)?,
        _ => bail!("give exactly one of --world \"a red cube\", --shape SHAPE or --data DIR"),
    };
    if let Some(e) = field_exports {
        return run_field(&args, views, e);
    }
    let cfg = FitConfig {
        steps: args.steps,
        lr: LearningRates::default(),
        sh_degree: args.sh_degree as usize,
        mask_weight: args.mask_weight,
        density: DensityConfig {
            densify_from: (args.steps / 10).max(1),
            densify_until: args.steps * 6 / 10,
            interval: (args.steps / 20).max(1),
            grad_threshold: args.grad_threshold,
            opacity_reset_interval: 0,
            max_gaussians: usize::try_from(args.max_gaussians)?,
            ..Default::default()
        },
        background: views.background,
        init: InitConfig {
            count: args.gaussians,
            region: InitRegion::Sphere { center: [0.0; 3], radius: views.init_radius },
            scale: 0.05 * views.init_radius,
            opacity: 0.1,
        },
        extent: None,
        checkpoint_every: args.checkpoint_every,
        preview_every: args.preview_every,
        seed: args.seed,
        ..Default::default()
    };
    let mut out = FitOutputs::new(&args.out);
    out.resume = args.resume;
    out.exports = exports;
    out.mesh_threshold = args.mesh_threshold.unwrap_or(1.0);
    println!(
        "fitting {} from {} views ({} held out), {} steps, seed {}",
        views.label,
        views.train.len(),
        views.heldout.len(),
        args.steps,
        args.seed
    );
    let mut progress = Progress::start(args.steps);
    let trainer = fit(cfg.clone(), views.train, &out, &mut |e| match e {
        FitEvent::Started { step, .. } => progress.bar.set_position(*step),
        FitEvent::Step(s) => {
            let p = progress.step(s.step, s.psnr);
            progress.bar.set_message(format!(
                "loss {:.4} PSNR {:.2} dB, {} Gaussians",
                s.loss, p, s.gaussians
            ));
        }
        FitEvent::Exported { path } => progress.exported(path),
        FitEvent::Finished { optimizer_state_bytes, .. } => {
            progress.optimizer(*optimizer_state_bytes)
        }
        _ => {}
    })
    .with_context(|| format!("fitting into {}", args.out.display()))?;
    let times = progress.finish();
    let splats = trainer.splats();
    let summary = Summary::new(trainer.step_count(), times, &views.heldout, |h| {
        evaluate(&splats, h, views.background)
    })?;
    let render_cfg = gen_scene::RenderConfig { background: views.background };
    write_heldout_sheet(&args.out, &views.heldout, &|v| {
        Ok(gen_scene::splat::render(&splats, &v.camera, &render_cfg)?.rgb)
    })?;
    let head =
        [("steps", trainer.step_count().to_string()), ("gaussians", splats.len().to_string())];
    summary.write_metrics(&args.out, &head, &[])?;
    summary.print(&args.out, &format!(", {} Gaussians", splats.len()));
    Ok(())
}

/// `gen fit --representation field`: fits a CAM neural field with random ray batches.
fn run_field(args: &FitArgs, views: Views, exports: FieldExportSet) -> anyhow::Result<()> {
    let mut fcfg = field_preset(&args.field_preset)?;
    let r = views.init_radius;
    fcfg.bounds = gen_scene::field::Aabb::cube(1.25 * r);
    let cfg = FieldFitConfig {
        field: fcfg,
        steps: args.steps,
        samples_per_ray: args.samples_per_ray,
        rays_per_batch: args.rays,
        lr: args.field_lr,
        lr_final: 0.1 * args.field_lr,
        loss: PhotometricLoss::Mse,
        mask_weight: args.mask_weight,
        background: views.background,
        checkpoint_every: args.checkpoint_every,
        preview_every: args.preview_every,
        seed: args.seed,
        occupancy_every: args.occupancy_every,
        ..Default::default()
    };
    let mut out = FieldOutputs::new(&args.out);
    out.resume = args.resume;
    out.exports = exports;
    if let Some(t) = args.mesh_threshold {
        out.mesh_threshold = t;
    }
    println!(
        "fitting a {} neural field to {} from {} views ({} held out), {} steps of {} rays x {} \
         samples, seed {}",
        args.field_preset,
        views.label,
        views.train.len(),
        views.heldout.len(),
        args.steps,
        args.rays,
        args.samples_per_ray,
        args.seed
    );
    let mut progress = Progress::start(args.steps);
    let trainer = fit_field(cfg.clone(), views.train, &out, &mut |e| match e {
        FieldFitEvent::Started { step, .. } => progress.bar.set_position(*step),
        FieldFitEvent::Step(s) => {
            let p = progress.step(s.step, s.psnr);
            progress.bar.set_message(format!(
                "loss {:.5} PSNR {:.2} dB, {:.0}% of samples evaluated",
                s.loss,
                p,
                100.0 * s.samples_evaluated as f64 / s.samples_total.max(1) as f64
            ));
        }
        FieldFitEvent::Exported { path } => progress.exported(path),
        FieldFitEvent::Finished { optimizer_state_bytes, .. } => {
            progress.optimizer(*optimizer_state_bytes)
        }
        _ => {}
    })
    .with_context(|| format!("fitting into {}", args.out.display()))?;
    let times = progress.finish();
    let vcfg = cfg.volume_config();
    let summary = Summary::new(trainer.step_count(), times, &views.heldout, |h| {
        evaluate_field(trainer.field(), h, &vcfg, Some(trainer.occupancy()))
    })?;
    write_heldout_sheet(&args.out, &views.heldout, &|v| Ok(trainer.render(&v.camera)?.0))?;
    let head =
        [("representation", "\"field\"".to_string()), ("steps", trainer.step_count().to_string())];
    let occupied = format!("{:.4}", trainer.occupancy().occupied_fraction());
    summary.write_metrics(&args.out, &head, &[("occupied_fraction", occupied)])?;
    summary.print(&args.out, "");
    Ok(())
}
