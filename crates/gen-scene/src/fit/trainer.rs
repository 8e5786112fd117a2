//! [`Trainer`]: photometric fitting of splats to posed images on the loss-agnostic
//! [`SplatOptimizer`] with [`AdaptiveDensity`], plus its checkpoints.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use gen_core::{pick_device, Error, Result, SeededRng};

use super::checkpoint::{checkpoint_map, CheckpointFile, RunIdentity};
use super::config::{init_splats, FitConfig};
use super::eval::psnr;
use super::optimizer::SplatOptimizer;
use super::run::{FitLoop, Schedule};
use super::ssim::Ssim;
use super::view::{validate_training_views, PosedImage};
use crate::camera::Camera;
use crate::density::{AdaptiveDensity, DensityReport, DensityStrategy};
use crate::splat::{RenderConfig, RenderOutput, Splats};

/// What one training step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    /// Steps completed (1 after the first).
    pub step: u64,
    pub view: usize,
    pub loss: f64,
    pub l1: f64,
    pub ssim: f64,
    /// PSNR of this step's render against its view (dB).
    pub psnr: f64,
    /// Gaussians after the step (and after density control).
    pub gaussians: usize,
    pub density: Option<DensityReport>,
    pub opacity_reset: bool,
}

/// The photometric fitting state; see the module docs of [`super`].
pub struct Trainer {
    cfg: FitConfig,
    views: Vec<PosedImage>,
    ssims: HashMap<(usize, usize), Ssim>,
    optim: SplatOptimizer<AdaptiveDensity>,
    identity: RunIdentity,
}

impl Trainer {
    /// A trainer at step 0 with splats from [`init_splats`].
    pub fn new(cfg: FitConfig, views: Vec<PosedImage>) -> Result<Self> {
        let device = pick_device(cfg.device)?;
        let splats = init_splats(&cfg, DType::F32, &device)?;
        Self::with_splats(cfg, views, &splats)
    }

    /// A trainer at step 0 starting from `splats` (converted to f32 on the config's device).
    pub fn with_splats(cfg: FitConfig, views: Vec<PosedImage>, splats: &Splats) -> Result<Self> {
        cfg.validate()?;
        validate_training_views(&views)?;
        let device = pick_device(cfg.device)?;
        let identity = RunIdentity::new(cfg.to_json(), &views)?;
        let mut ssims = HashMap::new();
        for v in &views {
            let k = v.camera.intrinsics;
            if let std::collections::hash_map::Entry::Vacant(e) = ssims.entry((k.height, k.width)) {
                e.insert(Ssim::new(k.height, k.width, DType::F32, &device)?);
            }
        }
        let views = views
            .into_iter()
            .map(|v| {
                Ok(PosedImage {
                    camera: v.camera,
                    rgb: v.rgb.to_device(&device)?,
                    mask: v.mask.map(|m| m.to_device(&device)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let extent = cfg.extent.unwrap_or_else(|| cfg.init.region.bounding_ball().1);
        let strategy = AdaptiveDensity::new(cfg.density, extent, cfg.seed, splats.len())?;
        let render = RenderConfig { background: cfg.background };
        let optim = SplatOptimizer::new(splats, cfg.lr, cfg.steps, render, strategy, &device)?;
        Ok(Self { cfg, views, ssims, optim, identity })
    }

    pub fn config(&self) -> &FitConfig {
        &self.cfg
    }

    /// The optimiser (splats, AdamW state, density strategy).
    pub fn optimizer(&self) -> &SplatOptimizer<AdaptiveDensity> {
        &self.optim
    }

    /// Steps completed.
    pub fn step_count(&self) -> u64 {
        self.optim.step_count()
    }

    /// Whether all configured steps are done.
    pub fn is_done(&self) -> bool {
        self.step_count() >= self.cfg.steps
    }

    /// The current splats (detached copies).
    pub fn splats(&self) -> Splats {
        self.optim.splats()
    }

    pub fn render_config(&self) -> RenderConfig {
        self.optim.render_config()
    }

    /// The training view used at 0-based step `step`: a seeded permutation of the views per
    /// epoch.
    pub fn view_at(&self, step: u64) -> usize {
        let n = self.views.len();
        let epoch = step / n as u64;
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = SeededRng::fork(self.cfg.seed, 1 + epoch);
        for i in (1..n).rev() {
            let j = rng.below(i + 1);
            order.swap(i, j);
        }
        order[(step % n as u64) as usize]
    }

    /// One optimisation step on the next view with the loss `(1 − λ) L1 + λ (1 − SSIM)` plus
    /// `mask_weight · L1(alpha, mask)` (plus density control when scheduled).
    pub fn step(&mut self) -> Result<StepInfo> {
        let vi = self.view_at(self.step_count());
        let view = &self.views[vi];
        let k = view.camera.intrinsics;
        let ssim_op = &self.ssims[&(k.height, k.width)];
        let (lam, mask_weight) = (self.cfg.ssim_weight, self.cfg.mask_weight);
        let s = self.optim.step(&view.camera, |out| {
            let diff = (&out.rgb - &view.rgb)?;
            let l1 = diff.abs()?.mean_all()?;
            let ssim = ssim_op.ssim(&out.rgb, &view.rgb)?;
            let mut loss = ((&l1 * (1.0 - lam))? + ssim.affine(-lam, lam)?)?;
            if let (Some(mask), true) = (&view.mask, mask_weight > 0.0) {
                let ml = (&out.alpha - mask)?.abs()?.mean_all()?;
                loss = (loss + (ml * mask_weight)?)?;
            }
            Ok((loss, (diff, l1, ssim)))
        })?;
        let (diff, l1, ssim) = s.aux;
        let mse = diff.detach().sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        Ok(StepInfo {
            step: s.step,
            view: vi,
            loss: s.loss,
            l1: l1.to_scalar::<f32>()? as f64,
            ssim: ssim.to_scalar::<f32>()? as f64,
            psnr: psnr(mse),
            gaussians: s.gaussians,
            density: s.strategy.density,
            opacity_reset: s.strategy.opacity_reset,
        })
    }

    /// Writes splats, optimizer state, density statistics, step and seed to one safetensors
    /// file, atomically.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut map = checkpoint_map(
            self.optim.optimizer(),
            self.step_count(),
            self.cfg.seed,
            &self.identity,
        )?;
        let s = self.splats();
        for (k, t) in [
            ("means", s.means),
            ("log_scales", s.log_scales),
            ("quats", s.quats),
            ("opacity_logits", s.opacity_logits),
            ("sh", s.sh),
        ] {
            map.insert(format!("splat.{k}"), t.to_device(&Device::Cpu)?);
        }
        for (k, t) in self.optim.strategy().state()? {
            map.insert(k, t);
        }
        gen_optim::save_safetensors_atomic(&map, path.as_ref())
    }

    /// A trainer continuing from a checkpoint written by [`Trainer::save_checkpoint`] with the
    /// same configuration and views (the seed must match).
    pub fn resume(cfg: FitConfig, views: Vec<PosedImage>, path: impl AsRef<Path>) -> Result<Self> {
        let identity = RunIdentity::new(cfg.to_json(), &views)?;
        let ck = CheckpointFile::read(path.as_ref(), cfg.seed, &identity, cfg.steps)?;
        let (file, step) = (ck.file.clone(), ck.step);
        let get = |k: &str| ck.get(k);
        let splats = Splats {
            means: get("splat.means")?,
            log_scales: get("splat.log_scales")?,
            quats: get("splat.quats")?,
            opacity_logits: get("splat.opacity_logits")?,
            sh: get("splat.sh")?,
        };
        splats.validate().map_err(|e| Error::msg(format!("{file}: {e}")))?;
        if splats.sh_degree()? != cfg.sh_degree {
            return Err(Error::invalid(
                "resume sh_degree",
                format!("{file} has degree {}, the config {}", splats.sh_degree()?, cfg.sh_degree),
            ));
        }
        let mut t = Self::with_splats(cfg, views, &splats)?;
        ck.load_optimizer(t.optim.optimizer_mut())?;
        t.optim
            .strategy_mut()
            .load_state(splats.len(), &get)
            .map_err(|e| Error::msg(format!("{file}: {e}")))?;
        t.optim.set_step(step)?;
        Ok(t)
    }

    /// Renders view `camera` with the current splats.
    pub fn render(&self, camera: &Camera) -> Result<RenderOutput> {
        self.optim.render(camera)
    }

    /// Bytes of optimizer state (gen-optim's accounting, all parameter groups).
    pub fn optimizer_state_bytes(&self) -> usize {
        super::run::optimizer_state_bytes(self.optim.optimizer())
    }
}

impl FitLoop for Trainer {
    type Config = FitConfig;
    type Step = StepInfo;
    fn open(cfg: &FitConfig, views: Vec<PosedImage>, ckpt: Option<&Path>) -> Result<Self> {
        match ckpt {
            Some(p) => Self::resume(cfg.clone(), views, p),
            None => Self::new(cfg.clone(), views),
        }
    }
    fn schedule(cfg: &FitConfig) -> Schedule {
        Schedule {
            config: cfg.to_json(),
            steps: cfg.steps,
            preview_every: cfg.preview_every,
            checkpoint_every: cfg.checkpoint_every,
        }
    }
    fn steps_done(&self) -> u64 {
        self.step_count()
    }
    fn train_step(&mut self) -> Result<(u64, StepInfo)> {
        let info = self.step()?;
        Ok((info.step, info))
    }
    fn preview(&self) -> Result<(&PosedImage, Tensor)> {
        let v = &self.views[0];
        Ok((v, self.render(&v.camera)?.rgb.to_dtype(DType::F32)?))
    }
    fn write_checkpoint(&self, path: &Path) -> Result<()> {
        self.save_checkpoint(path)
    }
}
