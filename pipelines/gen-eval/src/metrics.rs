//! Measurements on the world's TEST split, for the model card:
//! - [`vae_psnr`]: reconstruction PSNR (dB, images in [0, 1]) through the posterior mean;
//! - [`evaluator_accuracy`]: per-head accuracy of the evaluator on real test renders;
//! - [`generation_accuracy`]: the evaluator's shape / hue / colour (hue and tone) agreement with
//!   the prompts of generated images (DDIM, classifier-free guidance);
//! - [`frechet_distance`] of evaluator features ("tiny-FID", generated vs real test images),
//!   object saturation vs the real renders of the same captions and the clipped-pixel fraction
//!   ([`GenerationReport`], with gen-world's metrics: [`gen_world::metrics`]).
//!
//! `gen eval` (the full report with CFG/APG, baselines and timing) is in [`crate::session`].

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use gen_core::{Result, SeededRng};
use gen_diffusion::{sample, start_from_noise, Cfg, NoiseSource, SchedulerKind};
use gen_models::{AutoencoderKL, PromptOptions, SdPipeline};
use gen_world::metrics::{clipped_fraction, set_saturation, ClipThresholds, ImageU8, ObjectSelect};
use gen_world::Split;

use gen_models::evaluator::{Evaluator, Prediction};
use gen_pretrain::data::{Labels, WorldData};

/// Mean PSNR (dB) of `n` test images reconstructed through the posterior mean.
pub fn vae_psnr(vae: &AutoencoderKL, data: &mut WorldData, n: usize) -> Result<f64> {
    let mut total = 0.0;
    let idx: Vec<u64> = (0..n as u64).collect();
    for chunk in idx.chunks(16) {
        let b = data.batch(Split::Test, chunk)?;
        let x = ((&b.images * 2.0)? - 1.0)?;
        let rec = vae.decode(&vae.encode(&x)?.mode())?;
        let rec01 = ((rec + 1.0)? * 0.5)?.clamp(0f32, 1f32)?;
        let mse = (rec01 - &b.images)?
            .sqr()?
            .flatten_from(1)?
            .mean(1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
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

fn accumulate(acc: &mut HeadAccuracy, p: &Prediction, l: &Labels) {
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
pub fn evaluator_accuracy(
    eval: &Evaluator,
    data: &mut WorldData,
    n: usize,
) -> Result<HeadAccuracy> {
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

/// Everything [`generation_accuracy`] measures besides the accuracies.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationReport {
    /// Fréchet distance of evaluator features, generated vs the real test images of the same
    /// captions ("tiny-FID"; with few images it is biased upwards, compare like with like).
    pub tiny_fid: f64,
    /// Mean HSV saturation of object pixels ([`gen_world::metrics::set_saturation`]): generated
    /// images (`None` if no object pixel was found), and the real test renders of the same
    /// captions. Both segmented the same way: distance to the caption's background colour
    /// ([`ObjectSelect::for_background`]).
    pub saturation_generated: Option<f64>,
    pub saturation_real: f64,
    /// `saturation_generated − saturation_real` ([`gen_world::metrics::saturation_excess`]).
    pub saturation_excess: Option<f64>,
    /// Fraction of 8-bit channel values at 0 or 255 ([`gen_world::metrics::clipped_fraction`]).
    pub clipped_fraction: f64,
}

/// Fréchet distance between Gaussians fitted to two sets of feature rows (each row one sample):
/// [`gen_world::metrics::frechet_distance`] on the rows flattened.
pub fn frechet_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    let d = a.first().map_or(0, Vec::len);
    if a.iter().chain(b).any(|r| r.len() != d) {
        return Err(gen_core::Error::invalid(
            "frechet_distance",
            "feature rows of different widths",
        ));
    }
    gen_world::metrics::frechet_distance(&a.concat(), &b.concat(), d)
}

/// 8-bit images from `(N, 3, H, W)` values in [0, 1] (clamped, `round(255 v)`).
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (n, _, h, w) = images.dims4()?;
    let v = images.permute((0, 2, 3, 1))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..n)
        .map(|k| {
            let raw = v[k * h * w * 3..(k + 1) * h * w * 3]
                .iter()
                .map(|x| (x * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect();
            image::RgbImage::from_raw(w as u32, h as u32, raw).expect("buffer is H*W*3")
        })
        .collect())
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

/// Generates one image per test caption with the pipeline (DDIM from `scheduler/`, CFG) and
/// scores it with the evaluator against the caption's shape, hue and tone. Returns the
/// accuracies, the other measurements and the generated images `(N, 3, H, W)` in [0, 1].
pub fn generation_accuracy(
    pipe: &SdPipeline,
    eval: &Evaluator,
    data: &mut WorldData,
    s: &GenerationSettings,
) -> Result<(HeadAccuracy, GenerationReport, Tensor)> {
    let sc = pipe.scheduler_config()?;
    let mut acc = HeadAccuracy::default();
    let mut images = Vec::new();
    let idx: Vec<u64> = (0..s.prompts as u64).collect();
    let den = pipe.denoiser(false)?;
    let f = 1usize << (pipe.vae_config.block_out_channels.len() - 1);
    let side = data.world().config().image_size as usize / f;
    let dev: Device = pipe.device.clone();
    let (mut gen_feats, mut real_feats) = (Vec::new(), Vec::new());
    let mut backgrounds = Vec::new();
    let mut reals = Vec::new();
    for (ci, chunk) in idx.chunks(s.batch.max(1)).enumerate() {
        let b = data.batch(Split::Test, chunk)?;
        let prompts: Vec<&str> = b.captions.iter().map(String::as_str).collect();
        let conds = pipe.encode_conditions(&prompts, "", &PromptOptions::default())?;
        let mut sched = sc.build_as(SchedulerKind::Ddim)?;
        sched.set_timesteps(s.steps, None)?;
        let mut rng = SeededRng::fork(s.seed, ci as u64);
        let noise =
            rng.randn((prompts.len(), pipe.unet_config.in_channels, side, side), DType::F32, &dev)?;
        let x = start_from_noise(sched.as_ref(), &noise)?;
        let mut g = Cfg::new(s.guidance_scale)?;
        let lat = sample(
            &den,
            sched.as_mut(),
            &mut g,
            &x,
            &conds,
            &mut NoiseSource::Batch(&mut rng),
            &mut |_| {},
        )?;
        let raw = ((pipe.decode_latents(&lat)? + 1.0)? * 0.5)?;
        let img = raw.clamp(0f32, 1f32)?;
        for (p, l) in eval.predict(&img)?.iter().zip(&b.labels) {
            accumulate(&mut acc, p, l);
        }
        gen_feats.extend(rows(&eval.features(&img)?)?);
        real_feats.extend(rows(&eval.features(&b.images)?)?);
        for &i in chunk {
            backgrounds.push(data.sample(Split::Test, i)?.scene.background);
        }
        reals.push(b.images.clone());
        images.push(img);
    }
    let images = Tensor::cat(&images, 0)?;
    let reals = Tensor::cat(&reals, 0)?;
    let gen8 = tensor_to_images(&images)?;
    let real8 = tensor_to_images(&reals)?;
    let (gen_sel, real_sel) =
        (by_background(&gen8, &backgrounds), by_background(&real8, &backgrounds));
    let saturation_generated = set_saturation(&gen_sel)?.mean;
    let saturation_real = set_saturation(&real_sel)?
        .mean
        .ok_or_else(|| gen_core::Error::msg("no object pixels found in the real test renders (world and background colours disagree?)"))?;
    let clipped = clipped_fraction(
        &gen8.iter().map(ImageU8::from_rgb_image).collect::<Vec<_>>(),
        ClipThresholds::EXACT,
    )?;
    let report = GenerationReport {
        tiny_fid: frechet_distance(&gen_feats, &real_feats)?,
        saturation_generated,
        saturation_real,
        saturation_excess: saturation_generated.map(|g| g - saturation_real),
        clipped_fraction: clipped.overall,
    };
    Ok((finish(acc), report, images))
}

/// Each image with the background-distance object selection of its background.
fn by_background<'a>(
    images: &'a [image::RgbImage],
    backgrounds: &[gen_world::Background],
) -> Vec<(ImageU8<'a>, ObjectSelect<'static>)> {
    images
        .iter()
        .zip(backgrounds)
        .map(|(i, b)| (ImageU8::from_rgb_image(i), ObjectSelect::for_background(*b)))
        .collect()
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
