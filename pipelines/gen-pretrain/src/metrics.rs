//! Measurements on the world's TEST split, for the model card:
//! - [`vae_psnr`]: reconstruction PSNR (dB, images in [0, 1]) through the posterior mean;
//! - [`evaluator_accuracy`]: per-head accuracy of the evaluator on real test renders;
//! - [`generation_accuracy`]: the evaluator's shape / hue / colour (hue and tone) agreement with
//!   the prompts of generated images (DDIM, classifier-free guidance).

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use gen_core::{Result, SeededRng};
use gen_diffusion::{sample, start_from_noise, Cfg, Conditions, Denoiser, PredictionType, SchedulerConfig, SchedulerKind};
use gen_models::clip::TextForwardOptions;
use gen_models::pipeline::SdPipeline;
use gen_models::unet::UNet2DConditionModel;
use gen_models::vae::AutoencoderKL;
use gen_world::Split;

use crate::data::{Labels, WorldData};
use crate::evaluator::Evaluator;

/// Mean PSNR (dB) of `n` test images reconstructed through the posterior mean.
pub fn vae_psnr(vae: &AutoencoderKL, data: &mut WorldData, n: usize) -> Result<f64> {
    let mut total = 0.0;
    let idx: Vec<u64> = (0..n as u64).collect();
    for chunk in idx.chunks(16) {
        let b = data.batch(Split::Test, chunk)?;
        let x = ((&b.images * 2.0)? - 1.0)?;
        let rec = vae.decode(&vae.encode(&x)?.mode())?;
        let rec01 = ((rec + 1.0)? * 0.5)?.clamp(0f32, 1f32)?;
        let mse = (rec01 - &b.images)?.sqr()?.flatten_from(1)?.mean(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        total += mse.iter().map(|m| 10.0 * (1.0 / m.max(1e-12)).log10()).sum::<f64>();
    }
    Ok(total / n as f64)
}

/// Per-head accuracy of the evaluator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct HeadAccuracy {
    pub n: usize,
    pub shape: f64,
    pub hue: f64,
    pub tone: f64,
    /// Hue and tone both right.
    pub colour: f64,
    pub view: f64,
    pub background: f64,
}

fn accumulate(acc: &mut HeadAccuracy, p: &crate::evaluator::Prediction, l: &Labels) {
    acc.n += 1;
    acc.shape += (p.shape == l.shape) as u8 as f64;
    acc.hue += (p.hue == l.hue) as u8 as f64;
    acc.tone += (p.tone == l.tone) as u8 as f64;
    acc.colour += (p.hue == l.hue && p.tone == l.tone) as u8 as f64;
    acc.view += (p.view == l.view) as u8 as f64;
    acc.background += (p.background == l.background) as u8 as f64;
}

fn finish(mut a: HeadAccuracy) -> HeadAccuracy {
    let n = a.n.max(1) as f64;
    a.shape /= n;
    a.hue /= n;
    a.tone /= n;
    a.colour /= n;
    a.view /= n;
    a.background /= n;
    a
}

/// Accuracy of the evaluator on test samples `0..n`.
pub fn evaluator_accuracy(eval: &Evaluator, data: &mut WorldData, n: usize) -> Result<HeadAccuracy> {
    let mut acc = HeadAccuracy::default();
    let idx: Vec<u64> = (0..n as u64).collect();
    for chunk in idx.chunks(32) {
        let b = data.batch(Split::Test, chunk)?;
        for (p, l) in eval.predict(&b.images)?.iter().zip(&b.labels) {
            accumulate(&mut acc, p, l);
        }
    }
    Ok(finish(acc))
}

/// The UNet as a [`Denoiser`] over `(B, L, D)` text conditions (branches batched).
pub struct UnetDenoiser<'a> {
    pub unet: &'a UNet2DConditionModel,
}

impl Denoiser for UnetDenoiser<'_> {
    type Cond = Tensor;

    fn prediction_type(&self) -> PredictionType {
        PredictionType::Epsilon
    }

    fn predict(&self, x: &Tensor, timesteps: &[f64], conds: &[&Tensor]) -> Result<Vec<Tensor>> {
        let k = conds.len();
        let b = x.dim(0)?;
        let xs = Tensor::cat(&vec![x.clone(); k], 0)?;
        let ctx = Tensor::cat(&conds.iter().map(|c| (*c).clone()).collect::<Vec<_>>(), 0)?;
        let ts: Vec<f32> = (0..k).flat_map(|_| timesteps.iter().map(|&t| t as f32)).collect();
        let t = Tensor::from_vec(ts, b * k, x.device())?;
        let out = self.unet.forward(&xs, &t, &ctx)?;
        (0..k).map(|i| Ok(out.narrow(0, i * b, b)?)).collect()
    }
}

/// Settings of [`generation_accuracy`].
#[derive(Debug, Clone, Serialize)]
pub struct GenerationSettings {
    /// Number of prompts (the captions of test samples `0..n`).
    pub prompts: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    pub batch: usize,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self { prompts: 48, steps: 30, guidance_scale: 7.5, seed: 0, batch: 16 }
    }
}

/// Generates one image per test caption with the pipeline (DDIM from `scheduler/`, CFG) and
/// scores it with the evaluator against the caption's shape, hue and tone. Returns the
/// accuracies and the generated images `(N, 3, H, W)` in [0, 1].
pub fn generation_accuracy(pipe: &SdPipeline, eval: &Evaluator, data: &mut WorldData, s: &GenerationSettings) -> Result<(HeadAccuracy, Tensor)> {
    let sc = SchedulerConfig::from_json_value(&pipe.scheduler_config, &pipe.files.scheduler_config)?;
    let mut acc = HeadAccuracy::default();
    let mut images = Vec::new();
    let idx: Vec<u64> = (0..s.prompts as u64).collect();
    let den = UnetDenoiser { unet: &pipe.unet };
    let scaling = pipe.vae_config.scaling_factor;
    let f = 1usize << (pipe.vae_config.block_out_channels.len() - 1);
    let side = data.world().config().image_size as usize / f;
    let dev: Device = pipe.device.clone();
    for (ci, chunk) in idx.chunks(s.batch.max(1)).enumerate() {
        let b = data.batch(Split::Test, chunk)?;
        let prompts: Vec<&str> = b.captions.iter().map(String::as_str).collect();
        let (cond, _) = pipe.encode_prompts(&prompts, &TextForwardOptions::default())?;
        let empty = vec![""; prompts.len()];
        let (uncond, _) = pipe.encode_prompts(&empty, &TextForwardOptions::default())?;
        let mut sched = sc.build_as(SchedulerKind::Ddim)?;
        sched.set_timesteps(s.steps, None)?;
        let mut rng = SeededRng::fork(s.seed, ci as u64);
        let noise = rng.randn((prompts.len(), pipe.unet_config.in_channels, side, side), DType::F32, &dev)?;
        let x = start_from_noise(sched.as_ref(), &noise)?;
        let mut g = Cfg::new(s.guidance_scale)?;
        let lat = sample(&den, sched.as_mut(), &mut g, &x, &Conditions { cond, uncond: Some(uncond) }, &mut rng, &mut |_| {})?;
        let img = pipe.vae.decode(&(lat / scaling)?)?;
        let img = ((img + 1.0)? * 0.5)?.clamp(0f32, 1f32)?;
        for (p, l) in eval.predict(&img)?.iter().zip(&b.labels) {
            accumulate(&mut acc, p, l);
        }
        images.push(img);
    }
    Ok((finish(acc), Tensor::cat(&images, 0)?))
}

/// A grid PNG of `(N, 3, H, W)` images in [0, 1], `cols` per row.
pub fn image_grid(images: &Tensor, cols: usize) -> Result<image::RgbImage> {
    let (n, _, h, w) = images.dims4()?;
    let cols = cols.max(1);
    let rows = n.div_ceil(cols);
    let data = images.permute((0, 2, 3, 1))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut img = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for k in 0..n {
        let (r, c) = (k / cols, k % cols);
        for y in 0..h {
            for x in 0..w {
                let o = ((k * h + y) * w + x) * 3;
                let px = [0, 1, 2].map(|i| (data[o + i] * 255.0).round().clamp(0.0, 255.0) as u8);
                img.put_pixel((c * w + x) as u32, (r * h + y) as u32, image::Rgb(px));
            }
        }
    }
    Ok(img)
}
