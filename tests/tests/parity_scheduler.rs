//! DDIM steps of gen-diffusion against diffusers' `DDIMScheduler`, for epsilon and
//! v-prediction, on the tiny-sd scheduler config (Stable Diffusion 1.5's settings) and the tiny
//! UNet's output as model output.
//!
//! Reference: `tests/fixtures/parity/scheduler_ddim.safetensors` from
//! `scripts/make_parity_fixtures.py` (diffusers 0.42.1, computed in float64, stored as f32).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use gen_diffusion::{PredictionType, Scheduler, SchedulerConfig, SchedulerKind};

/// f32 arithmetic of one step against a float64 reference.
const TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn reference() -> Result<HashMap<String, Tensor>> {
    let path = fixtures().join("parity/scheduler_ddim.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| path.display().to_string())
}

fn get<'a>(refs: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    refs.get(key).with_context(|| format!("fixture key {key} missing"))
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    ensure!(
        ours.dims() == reference.dims(),
        "shape {:?} != reference {:?}",
        ours.dims(),
        reference.dims()
    );
    let a = ours.to_dtype(DType::F64)?;
    let b = reference.to_dtype(DType::F64)?;
    let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale)
}

fn scheduler(prediction_type: PredictionType) -> Result<Box<dyn Scheduler>> {
    let mut cfg =
        SchedulerConfig::from_file(fixtures().join("tiny-sd/scheduler/scheduler_config.json"))?;
    cfg.prediction_type = prediction_type;
    let mut s = cfg.build_as(SchedulerKind::Ddim)?;
    s.set_timesteps(10, None)?;
    Ok(s)
}

#[test]
fn ddim_schedule_matches_diffusers() -> Result<()> {
    let refs = reference()?;
    let s = scheduler(PredictionType::Epsilon)?;
    let want: Vec<f64> = get(&refs, "timesteps")?.to_dtype(DType::F64)?.to_vec1()?;
    assert_eq!(s.timesteps(), want.as_slice());
    let ac: Vec<f64> = get(&refs, "alphas_cumprod")?.to_dtype(DType::F64)?.to_vec1()?;
    ensure!(ac.len() == s.alphas_cumprod().len(), "alphas_cumprod length");
    let max = ac.iter().zip(s.alphas_cumprod()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    ensure!(max < 1e-7, "alphas_cumprod differ by {max:e}");
    Ok(())
}

#[test]
fn ddim_steps_match_diffusers_epsilon_and_v() -> Result<()> {
    let refs = reference()?;
    let sample = get(&refs, "sample")?;
    let model_output = get(&refs, "model_output")?;
    for (name, pt) in
        [("epsilon", PredictionType::Epsilon), ("v_prediction", PredictionType::VPrediction)]
    {
        for t in [901, 501, 1] {
            let mut s = scheduler(pt)?;
            let out = s.step_with_noise(model_output, t as f64, sample, None)?;
            for (field, ours) in [
                ("prev_sample", &out.prev_sample),
                ("pred_original_sample", &out.pred_original_sample),
            ] {
                let e = rel_err(ours, get(&refs, &format!("{name}.t{t}.{field}"))?)?;
                eprintln!("parity ddim {name} t={t} {field}: rel max err {e:.3e}");
                ensure!(
                    e < TOL,
                    "ddim {name} t={t} {field}: relative max error {e:.3e} exceeds {TOL:e}"
                );
            }
        }
    }
    // The two prediction types give different steps (the comparison above is not vacuous).
    let e = rel_err(
        get(&refs, "v_prediction.t501.prev_sample")?,
        get(&refs, "epsilon.t501.prev_sample")?,
    )?;
    ensure!(e > 1e-2, "epsilon and v-prediction steps differ by only {e:e}");
    Ok(())
}
