//! The output-folder run shared by the splat and field fitters, and the splat fit's driver
//! [`fit`]: config JSON, previews, checkpoints, exports and progress events.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use gen_core::{write_atomic, Error, Result};
use gen_optim::{AdamW, Optim, Optimizer};

use super::checkpoint::CHECKPOINT_FILE;
use super::export::{export, ExportSet};
use super::{FitConfig, PosedImage, StepInfo, Trainer};

/// Output options of [`fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct FitOutputs {
    pub dir: PathBuf,
    /// Continue from `dir/checkpoint.safetensors` when it exists.
    pub resume: bool,
    pub exports: ExportSet,
    /// World up direction for the turntable.
    pub up: [f64; 3],
    /// Mesh grid resolution along the longest axis.
    pub mesh_resolution: usize,
    /// Iso-level of the splat density for the mesh (DreamGaussian: 1).
    pub mesh_threshold: f64,
}

impl FitOutputs {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            resume: false,
            exports: ExportSet::default(),
            up: [0.0, 0.0, 1.0],
            mesh_resolution: 64,
            mesh_threshold: 1.0,
        }
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join(CHECKPOINT_FILE)
    }
}

/// Progress of [`fit`].
#[derive(Debug, Clone, PartialEq)]
pub enum FitEvent {
    Started {
        step: u64,
        steps: u64,
        gaussians: usize,
        resumed: bool,
    },
    Step(StepInfo),
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    Preview {
        step: u64,
        path: PathBuf,
    },
    Exported {
        path: PathBuf,
    },
    Finished {
        step: u64,
        gaussians: usize,
        /// Bytes of optimizer state (gen-optim's accounting, all parameter groups).
        optimizer_state_bytes: usize,
    },
}

/// `(H, W, 3)` [0, 1] tensor → 8-bit image.
pub fn to_rgb8(rgb: &Tensor) -> Result<image::RgbImage> {
    let (h, w, _) = rgb.dims3()?;
    let v = rgb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let raw = v.iter().map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, raw)
        .ok_or_else(|| Error::msg("image buffer size mismatch"))
}

fn write_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    write_atomic(path, &crate::turntable::png_bytes(img)?)
}

/// Runs a whole fit into `out.dir`: `config.json`, `previews/step_NNNNNN.png` (first view:
/// target | render), `checkpoint.safetensors` every `checkpoint_every` steps and at the end,
/// `splats.safetensors`-free final exports per [`ExportSet`]. Returns the final trainer.
pub fn fit(
    cfg: FitConfig,
    views: Vec<PosedImage>,
    out: &FitOutputs,
    on_event: &mut dyn FnMut(&FitEvent),
) -> Result<Trainer> {
    cfg.validate()?;
    let trainer = run_fit::<Trainer>(&cfg, views, &out.dir, out.resume, &mut |e| {
        on_event(&match e {
            RunEvent::Started { trainer, resumed } => FitEvent::Started {
                step: trainer.step_count(),
                steps: cfg.steps,
                gaussians: trainer.splats().len(),
                resumed,
            },
            RunEvent::Step(info) => FitEvent::Step(info),
            RunEvent::Preview { step, path } => FitEvent::Preview { step, path },
            RunEvent::Checkpoint { step, path } => FitEvent::Checkpoint { step, path },
        })
    })?;
    let splats = trainer.splats();
    for path in export(&splats, out, cfg.background)? {
        on_event(&FitEvent::Exported { path });
    }
    on_event(&FitEvent::Finished {
        step: trainer.step_count(),
        gaussians: splats.len(),
        optimizer_state_bytes: trainer.optimizer_state_bytes(),
    });
    Ok(trainer)
}

/// Bytes of optimizer state (gen-optim's accounting, all parameter groups).
pub(crate) fn optimizer_state_bytes(opt: &Optim<AdamW>) -> usize {
    opt.state_bytes().iter().sum::<usize>() + opt.shared_state_bytes()
}

/// What [`run_fit`] needs of a trainer (the splat [`Trainer`] and the [`field::FieldTrainer`]).
pub(crate) trait FitLoop: Sized {
    type Config;
    /// What one step reports.
    type Step;
    /// A new trainer (`ckpt` `None`) or one resumed from the checkpoint `ckpt`.
    fn open(cfg: &Self::Config, views: Vec<PosedImage>, ckpt: Option<&Path>) -> Result<Self>;
    fn schedule(cfg: &Self::Config) -> Schedule;
    /// Steps completed.
    fn steps_done(&self) -> u64;
    /// One optimisation step, and the step count after it.
    fn train_step(&mut self) -> Result<(u64, Self::Step)>;
    /// The first training view and the `(H, W, 3)` f32 render of its camera.
    fn preview(&self) -> Result<(&PosedImage, Tensor)>;
    fn write_checkpoint(&self, path: &Path) -> Result<()>;
}

/// What a fit writes besides its checkpoints (see [`FitLoop::schedule`]).
pub(crate) struct Schedule {
    /// Written to `config.json`.
    pub(crate) config: serde_json::Value,
    /// Steps of the whole fit.
    pub(crate) steps: u64,
    /// Preview every this many steps (0: never).
    pub(crate) preview_every: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub(crate) checkpoint_every: u64,
}

/// Progress of [`run_fit`] (the callers map it onto their public event types).
pub(crate) enum RunEvent<'a, T: FitLoop> {
    Started { trainer: &'a T, resumed: bool },
    Step(T::Step),
    Preview { step: u64, path: PathBuf },
    Checkpoint { step: u64, path: PathBuf },
}

/// The output-folder run shared by [`fit`] and [`field::fit_field`]: creates `dir`, opens the
/// trainer (resumed from `dir/checkpoint.safetensors` when `resume` and it exists), writes
/// `config.json`, steps to the end with previews (`previews/step_NNNNNN.png`: first view,
/// target | render) and checkpoints on the config's schedule, and writes the final checkpoint.
pub(crate) fn run_fit<T: FitLoop>(
    cfg: &T::Config,
    views: Vec<PosedImage>,
    dir: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(RunEvent<'_, T>),
) -> Result<T> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let ckpt = &dir.join(CHECKPOINT_FILE);
    let resumed = resume && ckpt.is_file();
    let mut trainer = T::open(cfg, views, resumed.then_some(ckpt.as_path()))?;
    let run = T::schedule(cfg);
    let text = serde_json::to_string_pretty(&run.config)
        .map_err(|e| Error::msg(format!("config JSON: {e}")))?;
    write_atomic(dir.join("config.json"), text.as_bytes())?;
    on_event(RunEvent::Started { trainer: &trainer, resumed });
    while trainer.steps_done() < run.steps {
        let (step, info) = trainer.train_step()?;
        on_event(RunEvent::Step(info));
        if run.preview_every > 0 && step % run.preview_every == 0 {
            let path = dir.join("previews").join(format!("step_{step:06}.png"));
            let (v, rgb) = trainer.preview()?;
            let pair = Tensor::cat(&[&v.rgb.to_dtype(DType::F32)?, &rgb], 1)?;
            write_png(&to_rgb8(&pair)?, &path)?;
            on_event(RunEvent::Preview { step, path });
        }
        if run.checkpoint_every > 0 && step % run.checkpoint_every == 0 {
            trainer.write_checkpoint(ckpt)?;
            on_event(RunEvent::Checkpoint { step, path: ckpt.to_path_buf() });
        }
    }
    trainer.write_checkpoint(ckpt)?;
    on_event(RunEvent::Checkpoint { step: trainer.steps_done(), path: ckpt.to_path_buf() });
    Ok(trainer)
}
