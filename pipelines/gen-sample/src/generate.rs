//! Text-to-image and image-to-image generation.

use candle_core::Tensor;
use gen_core::{Error, Result, SeededRng};
use gen_diffusion::{sample, Conditions, NoiseSource, Scheduler, SchedulerConfig};
use gen_models::{PromptOptions, SdPipeline};
use image::RgbImage;

use crate::config::{InitImage, SampleConfig, Sampler};

/// What [`generate`] reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Something the user should know that does not stop the run (a truncated prompt, words
    /// the tokenizer does not know, a resized init image).
    Warning(String),
    /// Sent once before the first step: `total_steps` = batches × steps per batch.
    Start { num_batches: usize, steps_per_batch: usize, total_steps: usize },
    /// After each denoising step; `done` counts steps over all batches.
    Step { batch: usize, step: usize, done: usize, total_steps: usize },
    /// After each batch is decoded; `images_done` of `num_images`.
    Decoded { images_done: usize, num_images: usize },
}

/// The scheduler config of `pipe` adjusted for `cfg.sampler` (Karras sigmas, DDIM eta).
pub fn scheduler_config(pipe: &SdPipeline, cfg: &SampleConfig) -> Result<SchedulerConfig> {
    let mut sc = pipe.scheduler_config()?;
    sc.use_karras_sigmas = cfg.sampler.karras();
    sc.eta = if cfg.sampler == Sampler::Ddim { cfg.ddim_eta } else { 0.0 };
    Ok(sc)
}

/// The scheduler for `cfg`, built from the pipeline's `scheduler_config.json`.
pub fn build_scheduler(pipe: &SdPipeline, cfg: &SampleConfig) -> Result<Box<dyn Scheduler>> {
    scheduler_config(pipe, cfg)?.build_as(cfg.sampler.kind())
}

/// Warnings about a prompt: words a word-level tokenizer does not know (listing the known
/// ones) and truncation to the text encoder's context.
pub fn prompt_warnings(pipe: &SdPipeline, prompt: &str, what: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let unknown = pipe.tokenizer.unknown_words(prompt)?;
    if !unknown.is_empty() {
        let known = pipe.tokenizer.known_words();
        const SHOWN: usize = 80;
        let mut list = known.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
        if known.len() > SHOWN {
            list.push_str(&format!(", … ({} more)", known.len() - SHOWN));
        }
        out.push(format!(
            "{what} {prompt:?}: the tokenizer does not know {} (they become the unknown token); known words: {list}",
            unknown.iter().map(|w| format!("{w:?}")).collect::<Vec<_>>().join(", ")
        ));
    }
    let max_len = pipe.max_text_len();
    let enc = pipe.tokenizer.encode(prompt, max_len)?;
    if enc.truncated {
        let room = max_len
            - pipe.tokenizer.bos_id().is_some() as usize
            - pipe.tokenizer.eos_id().is_some() as usize;
        out.push(format!(
            "{what} {prompt:?} has {} tokens but the text encoder takes {max_len} ({room} without start/end tokens); the last {} tokens were dropped",
            enc.num_tokens,
            enc.num_tokens - room
        ));
    }
    Ok(out)
}

/// The init image as a `(1, 3, H, W)` tensor in [-1, 1] at `width`×`height` (resized with a
/// Catmull-Rom filter when its size differs, with a warning).
fn load_init_image(
    pipe: &SdPipeline,
    ii: &InitImage,
    width: usize,
    height: usize,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Tensor> {
    let img = image::open(&ii.path)
        .map_err(|e| Error::msg(format!("cannot read init image {}: {e}", ii.path.display())))?
        .to_rgb8();
    let img = if img.dimensions() != (width as u32, height as u32) {
        progress(&Progress::Warning(format!(
            "init image {} is {}×{}; resized to {width}×{height}",
            ii.path.display(),
            img.width(),
            img.height()
        )));
        image::imageops::resize(
            &img,
            width as u32,
            height as u32,
            image::imageops::FilterType::CatmullRom,
        )
    } else {
        img
    };
    Ok(gen_core::imageio::rgb_to_tensor(&img, &pipe.device)?.unsqueeze(0)?.to_dtype(pipe.dtype)?)
}

fn to_images(decoded: &Tensor) -> Result<Vec<RgbImage>> {
    let b = decoded.dim(0)?;
    (0..b).map(|i| gen_core::imageio::tensor_to_rgb(&decoded.get(i)?)).collect()
}

/// Generates `cfg.num_images` images with `pipe`, reporting to `progress`.
///
/// Per batch of images: text embeddings of each image's prompt and of the negative prompt;
/// a start from noise (or from the noised VAE latent of the init image); the scheduler's
/// steps by [`gen_diffusion::sample`], each evaluating the branches the guidance asks for in
/// one batched UNet pass ([`gen_models::UNetDenoiser`]); VAE decode. Image `i` draws all its
/// noise (initial and step noise) from `SeededRng::fork(seed, i)`
/// ([`NoiseSource::PerSample`]), so it is the same whatever the batch size, and the same seed
/// gives the same bytes on the CPU.
pub fn generate(
    pipe: &SdPipeline,
    cfg: &SampleConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<RgbImage>> {
    let cfg = cfg.resolve(pipe)?;
    let (width, height) = cfg.resolved_size()?;
    let (dev, dtype) = (&pipe.device, pipe.dtype);
    let proto = build_scheduler(pipe, &cfg)?;
    let denoiser = pipe.denoiser(cfg.batch_invariant)?;

    // Text: each distinct prompt once, then the negative prompt.
    let mut distinct: Vec<&str> = Vec::new();
    for i in 0..cfg.num_images.min(cfg.prompts.len()) {
        let p = cfg.prompt_for(i);
        if !distinct.contains(&p) {
            distinct.push(p);
        }
    }
    for p in &distinct {
        for w in prompt_warnings(pipe, p, "prompt")? {
            progress(&Progress::Warning(w));
        }
    }
    for w in prompt_warnings(pipe, &cfg.negative_prompt, "negative prompt")? {
        progress(&Progress::Warning(w));
    }
    // One prompt per text-encoder call, so an embedding does not depend on the other prompts.
    let popts = PromptOptions { clip_skip: 0, one_call_per_prompt: true };
    let emb = pipe.encode_text(&distinct, &popts)?;
    let neg = pipe.encode_text(&[cfg.negative_prompt.as_str()], &popts)?;

    let (c, lh, lw) = pipe.latent_shape(width, height);

    // Image-to-image start latents.
    let init = match &cfg.init_image {
        Some(ii) => Some((
            pipe.encode_latents(&load_init_image(pipe, ii, width, height, progress)?)?,
            ii.strength,
        )),
        None => None,
    };
    if let Some((x0, 0.0)) = &init {
        // strength 0: nothing to denoise; the VAE round trip of the init image.
        progress(&Progress::Start { num_batches: 0, steps_per_batch: 0, total_steps: 0 });
        let img = to_images(&pipe.decode_latents(x0)?)?.remove(0);
        progress(&Progress::Decoded { images_done: cfg.num_images, num_images: cfg.num_images });
        return Ok(vec![img; cfg.num_images]);
    }

    let strength = init.as_ref().map(|(_, s)| *s);
    let mut probe = proto.boxed_clone();
    probe.set_timesteps(cfg.steps, strength)?;
    let steps_per_batch = probe.timesteps().len();
    let num_batches = cfg.num_images.div_ceil(cfg.batch_size);
    let total_steps = num_batches * steps_per_batch;
    progress(&Progress::Start { num_batches, steps_per_batch, total_steps });

    let mut images = Vec::with_capacity(cfg.num_images);
    let mut done = 0;
    for batch in 0..num_batches {
        let first = batch * cfg.batch_size;
        let idx: Vec<usize> = (first..(first + cfg.batch_size).min(cfg.num_images)).collect();
        let b = idx.len();
        let mut rngs: Vec<SeededRng> =
            idx.iter().map(|&i| SeededRng::fork(cfg.seed, i as u64)).collect();
        let rows: Vec<u32> = idx
            .iter()
            .map(|&i| distinct.iter().position(|p| *p == cfg.prompt_for(i)).unwrap_or(0) as u32)
            .collect();
        let cond = emb.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        let uncond = neg.repeat((b, 1, 1))?;
        let conds = Conditions { cond, uncond: Some(uncond) };

        let mut scheduler = proto.boxed_clone();
        scheduler.set_timesteps(cfg.steps, strength)?;
        let timesteps = scheduler.timesteps().to_vec();
        let noise = NoiseSource::PerSample(&mut rngs).randn(&[b, c, lh, lw], dtype, dev)?;
        let x = match &init {
            None => (noise * scheduler.init_noise_sigma())?,
            Some((x0, _)) => {
                scheduler.add_noise(&x0.repeat((b, 1, 1, 1))?, &noise, &vec![timesteps[0]; b])?
            }
        };
        let mut guidance = cfg.guidance.build()?;
        let x = sample(
            &denoiser,
            scheduler.as_mut(),
            &mut guidance,
            &x,
            &conds,
            &mut NoiseSource::PerSample(&mut rngs),
            &mut |e| {
                done += 1;
                progress(&Progress::Step { batch, step: e.step, done, total_steps });
            },
        )
        .map_err(|e| Error::msg(format!("batch {batch}: {e}")))?;
        let decode = |z: &Tensor| {
            pipe.decode_latents(z).map_err(|e| Error::msg(format!("decoding batch {batch}: {e}")))
        };
        if cfg.batch_invariant {
            for j in 0..b {
                images.extend(to_images(&decode(&x.narrow(0, j, 1)?)?)?);
            }
        } else {
            images.extend(to_images(&decode(&x)?)?);
        }
        progress(&Progress::Decoded { images_done: images.len(), num_images: cfg.num_images });
    }
    Ok(images)
}

/// The name of the guidance a config builds (for logs).
pub fn guidance_name(cfg: &SampleConfig) -> Result<String> {
    Ok(cfg.guidance.build()?.name())
}

/// Runs [`generate`] and discards progress.
pub fn generate_quiet(pipe: &SdPipeline, cfg: &SampleConfig) -> Result<Vec<RgbImage>> {
    generate(pipe, cfg, &mut |_| {})
}
