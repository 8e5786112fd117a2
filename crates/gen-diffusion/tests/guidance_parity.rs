//! Parity with diffusers 0.42.1 guiders (`AdaptiveProjectedGuidance`, `ClassifierFreeGuidance`,
//! with `guidance_rescale` and `start`/`stop`) over several steps of one trajectory, on
//! fixtures from `scripts/fixtures_guidance.py`. Our components: `Apg` with the diffusers
//! formulations in model-output space, wrapped in `Rescale` and `Interval` as configured.

use std::path::Path;

use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use gen_diffusion::{
    Apg, ApgConfig, ApgFormulation, Cfg, Guidance, Interval, IntervalRange, PredictionType,
    Predictions, Rescale, Space, StepInfo,
};
use serde_json::Value;

fn floats(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .ok_or_else(|| anyhow!("not an array"))?
        .iter()
        .map(|x| x.as_f64().ok_or_else(|| anyhow!("not a number")))
        .collect()
}

fn build(case: &Value) -> Result<Box<dyn Guidance>> {
    let kw = &case["kwargs"];
    let f = |k: &str, d: f64| kw.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let scale = f("guidance_scale", 7.5);
    let mut g: Box<dyn Guidance> = match case["guider"].as_str().unwrap() {
        "AdaptiveProjectedGuidance" => Box::new(Apg::new(ApgConfig {
            scale,
            eta: f("eta", 1.0),
            norm_threshold: f("adaptive_projected_guidance_rescale", 15.0),
            momentum: f("adaptive_projected_guidance_momentum", 0.0),
            formulation: if kw
                .get("use_original_formulation")
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
            {
                ApgFormulation::CondPlusW
            } else {
                ApgFormulation::Diffusers
            },
            space: Space::ModelOutput,
        })?),
        "ClassifierFreeGuidance" => Box::new(Cfg::new(scale)?),
        other => return Err(anyhow!("unknown guider {other}")),
    };
    let phi = f("guidance_rescale", 0.0);
    if phi > 0.0 {
        g = Box::new(Rescale::new(g, phi)?);
    }
    if kw.get("start").is_some() || kw.get("stop").is_some() {
        g = Box::new(Interval::new(
            g,
            IntervalRange::StepFraction { start: f("start", 0.0), stop: f("stop", 1.0) },
        )?);
    }
    Ok(g)
}

#[test]
fn guiders_match_diffusers_over_trajectories() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guidance.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    assert_eq!(doc["diffusers"], "0.42.1");
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = floats(&case["shape"])?.into_iter().map(|x| x as usize).collect();
        let n = case["num_steps"].as_u64().unwrap() as usize;
        let mut g = build(case)?;
        g.reset();
        let mut worst = 0.0f64;
        let mut guided_steps = 0;
        for st in case["steps"].as_array().unwrap() {
            let k = st["step"].as_u64().unwrap() as usize;
            let t = st["timestep"].as_f64().unwrap();
            let info = StepInfo { step: Some((k, n)), timestep: t, sigma: 10.0 - k as f64 };
            let mk = |key: &str| -> Result<Tensor> {
                let d: Vec<f32> = floats(&st[key])?.into_iter().map(|x| x as f32).collect();
                Ok(Tensor::from_vec(d, shape.as_slice(), &Device::Cpu)?)
            };
            let (c, u, want) = (mk("cond")?, mk("uncond")?, floats(&st["out"])?);
            let branches = g.branches(&info);
            let uses_uncond = branches.contains(&gen_diffusion::Branch::Uncond);
            guided_steps += uses_uncond as usize;
            let preds = Predictions {
                cond: c.clone(),
                uncond: if uses_uncond { Some(u) } else { None },
                x_t: c.zeros_like()?,
                alpha_cumprod: vec![0.5; shape[0]],
                prediction_type: PredictionType::Epsilon,
            };
            let out = g.combine(&preds, &info)?;
            assert_eq!(out.space, Space::ModelOutput);
            let got: Vec<f64> =
                out.value.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let err = got.iter().zip(&want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / scale;
            assert!(err < 1e-5, "{name} step {k}: relative error {err:e}");
            worst = worst.max(err);
        }
        assert!(guided_steps > 0, "{name}: guidance never applied");
        println!("{name:36} max relative error {worst:9.2e} ({guided_steps}/{n} guided steps)");
    }
    Ok(())
}
