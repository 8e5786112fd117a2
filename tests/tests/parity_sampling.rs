//! End-to-end parity of the assembled sampling (text encoder, scheduler, guidance, the one
//! sampling loop `gen_diffusion::sample`, VAE) with diffusers, on `tests/fixtures/tiny-sd` and
//! `weights/tiny-shapes`.
//!
//! References: `tests/fixtures/sampling/`, written by `scripts/fixtures_sampling.py` (pinned
//! diffusers 0.42.1 / transformers 5.24.0 / torch 2.9.1, CPU, f32): whole runs of
//! `StableDiffusionPipeline.__call__` and `StableDiffusionImg2ImgPipeline.__call__` (CFG), and
//! of `__call__`'s denoising loop with `diffusers.guiders.AdaptiveProjectedGuidance` (APG), with
//! DDIM (eta 0), Euler ancestral and DPM++ 2M. The initial latents and every step noise the run
//! drew are recorded; here they are handed to our loop through [`NoiseSource::Given`].
//!
//! Each case is built the way `gen image` builds it: `SampleConfig` → `resolve`,
//! `build_scheduler` (the pipeline's `scheduler_config.json` as the sampler asks), the
//! config's guidance (`GuidanceConfig::build`), prompt conditions with one text-encoder call
//! per prompt, the per-sample UNet denoiser, `start_from_noise` or `add_noise` on the VAE
//! latent of the init image, `sample`, `decode_latents`. diffusers' APG is our `Apg` with the
//! diffusers formulation in model-output space (r used as given).
//!
//! The measure is the relative max error `max|ours - ref| / max|ref|` of the latents after
//! every step, the final latents and the decoded image. Bound: [`TOL`] (f32 evaluation of
//! five or six UNet steps). Run with `--nocapture` to see the measured errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use gen_diffusion::{
    sample, start_from_noise, ApgConfig, ApgFormulation, NoiseSource, PredictionType, Space,
};
use gen_models::pipeline::HubOptions;
use gen_models::{LoadOptions, ModelSource, PromptOptions, SdPipeline};
use gen_sample::{build_scheduler, SampleConfig, Sampler};
use serde::Deserialize;

/// Relative bound on every compared tensor.
const TOL: f64 = 5e-5;

#[derive(Debug, Deserialize)]
struct Fixtures {
    versions: HashMap<String, String>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Guidance {
    method: String,
    scale: f64,
    #[serde(default)]
    eta: f64,
    #[serde(default)]
    momentum: f64,
    #[serde(default)]
    norm_threshold: f64,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    pipeline: String,
    width: usize,
    height: usize,
    sampler: String,
    steps: usize,
    guidance: Guidance,
    prompts: Vec<String>,
    negative_prompt: String,
    strength: Option<f64>,
    init_image: Option<String>,
    timesteps: Vec<f64>,
    num_step_noise: usize,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("sampling")
}

/// `max|a - b| / max|b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(a.dims() == b.dims(), "shape {:?} vs reference {:?}", a.dims(), b.dims());
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-12))
}

fn config(case: &Case) -> Result<SampleConfig> {
    let mut cfg = SampleConfig::default()
        .sampler(Sampler::parse(&case.sampler)?)
        .steps(case.steps)
        .size(case.width, case.height)
        .num_images(case.prompts.len())
        .batch_size(case.prompts.len())
        .negative_prompt(case.negative_prompt.clone());
    cfg.prompts = case.prompts.clone();
    let g = &case.guidance;
    cfg = match g.method.as_str() {
        "cfg" => cfg.cfg(g.scale),
        "apg" => cfg.apg(ApgConfig {
            scale: g.scale,
            eta: g.eta,
            norm_threshold: g.norm_threshold,
            momentum: g.momentum,
            formulation: ApgFormulation::Diffusers,
            space: Space::ModelOutput,
        }),
        other => return Err(anyhow!("{}: unknown guidance method {other}", case.name)),
    };
    if let (Some(s), Some(img)) = (case.strength, &case.init_image) {
        cfg = cfg.init_image(fixtures().join(img), s);
    }
    Ok(cfg)
}

/// Runs one case with our loop; returns the max relative errors (worst step, final, decoded).
fn run_case(
    case: &Case,
    pipe: &SdPipeline,
    refs: &HashMap<String, Tensor>,
) -> Result<(f64, f64, f64)> {
    let name = &case.name;
    let get = |key: &str| -> Result<Tensor> {
        refs.get(&format!("{name}.{key}"))
            .cloned()
            .with_context(|| format!("{name}: no tensor {key}"))
    };
    let cfg = config(case)?.resolve(pipe)?;
    let mut scheduler = build_scheduler(pipe, &cfg)?;
    scheduler.set_timesteps(cfg.steps, case.strength)?;
    let timesteps = scheduler.timesteps().to_vec();
    ensure!(
        timesteps == case.timesteps,
        "{name}: timesteps {timesteps:?}, diffusers {:?}",
        case.timesteps
    );
    let denoiser = pipe.denoiser(cfg.batch_invariant)?;
    ensure!(denoiser.prediction_type == PredictionType::Epsilon);
    let prompts: Vec<&str> = cfg.prompts.iter().map(String::as_str).collect();
    let popts = PromptOptions { clip_skip: 0, one_call_per_prompt: true };
    let conds = pipe.encode_conditions(&prompts, &cfg.negative_prompt, &popts)?;

    let noise0 = get("noise0")?;
    let b = noise0.dim(0)?;
    let x = match &cfg.init_image {
        None => start_from_noise(scheduler.as_ref(), &noise0)?,
        Some(ii) => {
            let image = gen_core::imageio::load_image(&ii.path, &pipe.device)?.unsqueeze(0)?;
            let x0 = pipe.encode_latents(&image)?;
            scheduler.add_noise(&x0.repeat((b, 1, 1, 1))?, &noise0, &vec![timesteps[0]; b])?
        }
    };
    let step_noise =
        (0..case.num_step_noise).map(|k| get(&format!("step_noise.{k}"))).collect::<Result<_>>()?;
    let mut noise = NoiseSource::Given(step_noise);
    let mut guidance = cfg.guidance.build()?;
    let mut step_errs = Vec::new();
    let mut step_fail = None;
    let out =
        sample(&denoiser, scheduler.as_mut(), &mut guidance, &x, &conds, &mut noise, &mut |e| {
            match get(&format!("latents.{}", e.step)).and_then(|r| rel_err(e.sample, &r)) {
                Ok(err) => step_errs.push(err),
                Err(err) => step_fail = Some(err),
            }
        })?;
    if let Some(err) = step_fail {
        return Err(err);
    }
    if let NoiseSource::Given(left) = &noise {
        ensure!(left.is_empty(), "{name}: {} recorded noise tensors not drawn", left.len());
    }
    ensure!(step_errs.len() == timesteps.len(), "{name}: {} steps compared", step_errs.len());
    let final_err = rel_err(&out, &get("final")?)?;
    let decoded_err = rel_err(&pipe.decode_latents(&out)?, &get("decoded")?)?;
    let steps: Vec<String> = step_errs.iter().map(|e| format!("{e:.1e}")).collect();
    println!(
        "{name:30} final latents {final_err:9.2e}  decoded {decoded_err:9.2e}  per step [{}]",
        steps.join(", ")
    );
    let worst_step = step_errs.iter().cloned().fold(0.0, f64::max);
    Ok((worst_step, final_err, decoded_err))
}

#[test]
fn sampling_matches_diffusers_end_to_end() -> Result<()> {
    let doc: Fixtures =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json"))?)?;
    assert_eq!(doc.versions["diffusers"], "0.42.1");
    assert_eq!(doc.cases.len(), 10);
    let refs =
        candle_core::safetensors::load(fixtures().join("tensors.safetensors"), &Device::Cpu)?;
    let mut pipes: HashMap<String, SdPipeline> = HashMap::new();
    let mut failures = Vec::new();
    let mut seen = (0, 0, 0); // stochastic sampler, APG, img2img cases
    for case in &doc.cases {
        if !pipes.contains_key(&case.pipeline) {
            let opts =
                LoadOptions { dtype: DType::F32, device: Device::Cpu, hub: HubOptions::default() };
            let src = ModelSource::Local(repo().join(&case.pipeline));
            pipes.insert(case.pipeline.clone(), SdPipeline::load(&src, &opts)?);
        }
        seen.0 += (case.num_step_noise > 0) as usize;
        seen.1 += (case.guidance.method == "apg") as usize;
        seen.2 += case.strength.is_some() as usize;
        match run_case(case, &pipes[&case.pipeline], &refs) {
            Ok((s, f, d)) if s < TOL && f < TOL && d < TOL => {}
            Ok(errs) => {
                failures.push(format!("{}: errors (step, final, decoded) {errs:?}", case.name))
            }
            Err(e) => failures.push(format!("{}: {e:#}", case.name)),
        }
    }
    assert!(seen.0 >= 2 && seen.1 >= 2 && seen.2 >= 2, "fixture coverage {seen:?}");
    assert!(failures.is_empty(), "relative bound {TOL:e}:\n{}", failures.join("\n"));
    Ok(())
}
