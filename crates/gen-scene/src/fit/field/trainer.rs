//! [`FieldTrainer`]: photometric fitting of a neural field to posed images with random ray
//! batches on the loss-agnostic [`FieldOptimizer`], plus its checkpoints.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use gen_core::{pick_device, Error, Result, SeededRng};

use super::optimizer::FieldOptimizer;
use super::render::{render_field_image, render_rays};
use super::{FieldFitConfig, PhotometricLoss};
use crate::camera::Camera;
use crate::field::volume::Ray;
use crate::field::{CamField, OccupancyGrid};
use crate::fit::{
    checkpoint_map, psnr, validate_training_views, CheckpointFile, FitLoop, PosedImage,
    RunIdentity, Schedule,
};

/// What one field training step did.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldStepInfo {
    /// Steps completed (1 after the first).
    pub step: u64,
    pub loss: f64,
    /// The photometric term (MSE or L1).
    pub photometric: f64,
    /// The opacity-vs-mask MSE (0 when off or no ray had a mask).
    pub mask_loss: f64,
    /// PSNR of the batch's colours (dB).
    pub psnr: f64,
    pub samples_evaluated: usize,
    pub samples_total: usize,
    /// Occupied fraction when the occupancy grid was re-marked after this step.
    pub occupancy: Option<f64>,
}

/// Pixels of one training view as flat f32 vectors.
struct ViewPixels {
    rgb: Vec<f32>,
    mask: Option<Vec<f32>>,
}

/// The field fitting state; see the module docs of [`super`].
pub struct FieldTrainer {
    cfg: FieldFitConfig,
    views: Vec<PosedImage>,
    pixels: Vec<ViewPixels>,
    optim: FieldOptimizer,
    device: Device,
    identity: RunIdentity,
}

const CKPT_OCC: &str = "occupancy";

impl FieldTrainer {
    /// A trainer at step 0 with a freshly initialised field (generator stream 0 of the seed).
    pub fn new(cfg: FieldFitConfig, views: Vec<PosedImage>) -> Result<Self> {
        cfg.validate()?;
        validate_training_views(&views)?;
        let mut pixels = Vec::with_capacity(views.len());
        for v in &views {
            pixels.push(ViewPixels {
                rgb: v.rgb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                mask: match &v.mask {
                    Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                    None => None,
                },
            });
        }
        let device = pick_device(cfg.device)?;
        let identity = RunIdentity::new(cfg.to_json(), &views)?;
        let mut rng = SeededRng::fork(cfg.seed, 0);
        let optim = FieldOptimizer::new(cfg.field, cfg.optim_config(), &mut rng, &device)?;
        Ok(Self { cfg, views, pixels, optim, device, identity })
    }

    pub fn config(&self) -> &FieldFitConfig {
        &self.cfg
    }

    /// The field (shares the trainer's parameters).
    pub fn field(&self) -> &CamField {
        self.optim.field()
    }

    /// The loss-agnostic optimiser under this trainer.
    pub fn optimizer(&self) -> &FieldOptimizer {
        &self.optim
    }

    pub fn occupancy(&self) -> &OccupancyGrid {
        self.optim.occupancy()
    }

    pub fn views(&self) -> &[PosedImage] {
        &self.views
    }

    /// Steps completed.
    pub fn step_count(&self) -> u64 {
        self.optim.step_count()
    }

    pub fn is_done(&self) -> bool {
        self.step_count() >= self.cfg.steps
    }

    /// One optimisation step on a random ray batch (see the module docs).
    pub fn step(&mut self) -> Result<FieldStepInfo> {
        let mut rng = SeededRng::fork(self.cfg.seed, 1 + self.step_count());
        let nr = self.cfg.rays_per_batch;
        let mut rays = Vec::with_capacity(nr);
        let mut target = Vec::with_capacity(nr * 3);
        let (mut mask_t, mut mask_w) = (Vec::with_capacity(nr), Vec::with_capacity(nr));
        for _ in 0..nr {
            let vi = rng.below(self.views.len());
            let cam = &self.views[vi].camera;
            let p = rng.below(cam.width() * cam.height());
            let (i, j) = (p / cam.width(), p % cam.width());
            rays.push(Ray::through_pixel(cam, i, j));
            let px = &self.pixels[vi];
            target.extend_from_slice(&px.rgb[3 * p..3 * p + 3]);
            match &px.mask {
                Some(m) => {
                    mask_t.push(m[p]);
                    mask_w.push(1f32);
                }
                None => {
                    mask_t.push(0f32);
                    mask_w.push(0f32);
                }
            }
        }
        let vcfg = self.cfg.volume_config();
        let (loss_kind, mask_weight) = (self.cfg.loss, self.cfg.mask_weight);
        let dev = self.device.clone();
        let s = self.optim.step(|field, occupancy| {
            let out = render_rays(field, &rays, &vcfg, Some(occupancy), Some(&mut rng))?;
            let target = Tensor::from_vec(target, (nr, 3), &dev)?;
            let diff = (&out.rgb - &target)?;
            let mse = diff.sqr()?.mean_all()?;
            let photometric = match loss_kind {
                PhotometricLoss::Mse => mse.clone(),
                PhotometricLoss::L1 => diff.abs()?.mean_all()?,
            };
            let masked: f32 = mask_w.iter().sum();
            let mut loss = photometric.clone();
            let mut mask_loss = 0.0;
            if mask_weight > 0.0 && masked > 0.0 {
                let mt = Tensor::from_vec(mask_t, nr, &dev)?;
                let mw = Tensor::from_vec(mask_w, nr, &dev)?;
                let ml = ((&out.opacity - mt)?.sqr()? * mw)?
                    .sum_all()?
                    .affine(1.0 / masked as f64, 0.0)?;
                mask_loss = ml.to_scalar::<f32>()? as f64;
                loss = (loss + (ml * mask_weight)?)?;
            }
            Ok((loss, (mse, photometric, mask_loss, out.samples_evaluated, out.samples_total)))
        })?;
        let (mse, photometric, mask_loss, samples_evaluated, samples_total) = s.aux;
        Ok(FieldStepInfo {
            step: s.step,
            loss: s.loss,
            photometric: photometric.to_scalar::<f32>()? as f64,
            mask_loss,
            psnr: psnr(mse.to_scalar::<f32>()? as f64),
            samples_evaluated,
            samples_total,
            occupancy: s.occupancy,
        })
    }

    /// Renders `camera` without gradients: `(rgb (H, W, 3), opacity (H, W))`.
    pub fn render(&self, camera: &Camera) -> Result<(Tensor, Tensor)> {
        render_field_image(self.field(), camera, &self.cfg.volume_config(), Some(self.occupancy()))
    }

    /// Writes the parameters, optimizer state, occupancy flags, step and seed to one
    /// safetensors file, atomically.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut map = checkpoint_map(
            self.optim.optimizer(),
            self.step_count(),
            self.cfg.seed,
            &self.identity,
        )?;
        for (k, v) in self.optim.vars()?.iter() {
            map.insert(k.clone(), v.as_tensor().detach().to_device(&Device::Cpu)?);
        }
        let occupied = &self.occupancy().occupied;
        let occ: Vec<u8> = occupied.iter().map(|&b| b as u8).collect();
        map.insert(CKPT_OCC.into(), Tensor::from_vec(occ, occupied.len(), &Device::Cpu)?);
        gen_optim::save_safetensors_atomic(&map, path.as_ref())
    }

    /// A trainer continuing from a checkpoint written by [`FieldTrainer::save_checkpoint`] with
    /// the same configuration and views (the seed and every parameter shape must match).
    pub fn resume(
        cfg: FieldFitConfig,
        views: Vec<PosedImage>,
        path: impl AsRef<Path>,
    ) -> Result<Self> {
        let identity = RunIdentity::new(cfg.to_json(), &views)?;
        let ck = CheckpointFile::read(path.as_ref(), cfg.seed, &identity, cfg.steps)?;
        let (file, step) = (ck.file.clone(), ck.step);
        let get = |k: &str| ck.get(k);
        let mut t = Self::new(cfg, views)?;
        for (k, v) in t.optim.vars()?.iter() {
            let saved = get(k)?;
            if saved.dims() != v.dims() {
                return Err(Error::invalid(
                    format!("checkpoint {file} `{k}`"),
                    format!("shape {:?}, the configured field has {:?}", saved.dims(), v.dims()),
                ));
            }
            v.set(&saved.to_dtype(DType::F32)?.to_device(&t.device)?)?;
        }
        ck.load_optimizer(t.optim.optimizer_mut())?;
        let occ = get(CKPT_OCC)?.to_dtype(DType::U8)?.to_vec1::<u8>()?;
        let grid = t.optim.occupancy_mut();
        if occ.len() != grid.occupied.len() {
            return Err(Error::invalid(
                format!("checkpoint {file} `{CKPT_OCC}`"),
                format!("{} cells, the config's grid has {}", occ.len(), grid.occupied.len()),
            ));
        }
        grid.occupied = occ.iter().map(|&b| b != 0).collect();
        t.optim.set_step(step)?;
        Ok(t)
    }
}

impl FitLoop for FieldTrainer {
    type Config = FieldFitConfig;
    type Step = FieldStepInfo;
    fn open(cfg: &FieldFitConfig, views: Vec<PosedImage>, ckpt: Option<&Path>) -> Result<Self> {
        match ckpt {
            Some(p) => Self::resume(cfg.clone(), views, p),
            None => Self::new(cfg.clone(), views),
        }
    }
    fn schedule(cfg: &FieldFitConfig) -> Schedule {
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
    fn train_step(&mut self) -> Result<(u64, FieldStepInfo)> {
        let info = self.step()?;
        Ok((info.step, info))
    }
    fn preview(&self) -> Result<(&PosedImage, Tensor)> {
        let v = &self.views[0];
        Ok((v, self.render(&v.camera)?.0))
    }
    fn write_checkpoint(&self, path: &Path) -> Result<()> {
        self.save_checkpoint(path)
    }
}
