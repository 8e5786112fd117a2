//! Parity with diffusers 0.42.1 schedulers on fixtures from `scripts/fixtures_schedulers.py`:
//! timesteps, sigmas, alphas_cumprod, init sigma, add_noise, and whole trajectories on fixed
//! model outputs (stochastic steps use the noise diffusers drew).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use gen_diffusion::{Scheduler, SchedulerConfig};
use serde_json::Value;

const TOL: f64 = 1e-5;

fn floats(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .ok_or_else(|| anyhow!("not an array: {v}"))?
        .iter()
        .map(|x| x.as_f64().ok_or_else(|| anyhow!("not a number")))
        .collect()
}

fn tensor(v: &Value, shape: &[usize]) -> Result<Tensor> {
    let d: Vec<f32> = floats(v)?.into_iter().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(d, shape, &Device::Cpu)?)
}

/// max |a - b| / max(max |b|, 1e-6)
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn tvals(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
}

struct Report {
    name: String,
    schedule: f64,
    add_noise: f64,
    steps: f64,
}

fn run_case(case: &Value) -> Result<Report> {
    let name = case["name"].as_str().unwrap().to_string();
    let mut cfg = SchedulerConfig::from_json_value(&case["config"], Path::new(&name))?;
    cfg.eta = case["eta"].as_f64().unwrap();
    let n = case["num_inference_steps"].as_u64().unwrap() as usize;
    let strength = case["strength"].as_f64();
    let shape: Vec<usize> = floats(&case["shape"])?.into_iter().map(|x| x as usize).collect();
    let mut s: Box<dyn Scheduler> = cfg.build()?;
    s.set_timesteps(n, strength)?;

    // Schedule.
    let ts = floats(&case["timesteps"])?;
    // Integer timesteps must match exactly; fractional ones (Karras Euler) within f32 rounding
    // (numpy's float32 log differs from libm's by an ulp here and there).
    anyhow::ensure!(
        s.timesteps().len() == ts.len(),
        "{name}: {} timesteps vs diffusers {}",
        s.timesteps().len(),
        ts.len()
    );
    let ts_err = s
        .timesteps()
        .iter()
        .zip(&ts)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs() / b.abs().max(1.0)));
    let ts_ok = if ts.iter().all(|t| t.fract() == 0.0) { ts_err == 0.0 } else { ts_err < 1e-6 };
    anyhow::ensure!(ts_ok, "{name}: timesteps {:?} vs diffusers {:?}", s.timesteps(), ts);
    let ts: Vec<f64> = s.timesteps().to_vec();
    let ac = floats(&case["alphas_cumprod"])?;
    let mut schedule_err = rel_err(s.alphas_cumprod(), &ac).max(ts_err);
    let a_rel = s
        .alphas_cumprod()
        .iter()
        .zip(&ac)
        .fold(0.0f64, |m, (x, y)| m.max(((x - y) / y.max(1e-30)).abs()));
    anyhow::ensure!(a_rel < TOL, "{name}: alphas_cumprod elementwise relative error {a_rel:e}");
    if !case["sigmas"].is_null() {
        let sig_all = floats(&case["sigmas"])?;
        let begin = sig_all.len() - s.sigmas().len();
        let e = s
            .sigmas()
            .iter()
            .zip(&sig_all[begin..])
            .fold(0.0f64, |m, (x, y)| m.max(((x - y) / y.max(1e-12)).abs()));
        schedule_err = schedule_err.max(e);
    }
    let ins = case["init_noise_sigma"].as_f64().unwrap();
    schedule_err = schedule_err.max((s.init_noise_sigma() - ins).abs() / ins);
    anyhow::ensure!(schedule_err < TOL, "{name}: schedule error {schedule_err:e}");

    // add_noise on a fresh scheduler.
    let mut probe = cfg.build()?;
    probe.set_timesteps(n, None)?;
    let x0 = tensor(&case["x0"], &shape)?;
    let noise0 = tensor(&case["noise0"], &shape)?;
    // The script probes the timesteps at positions 1 and n/2 (ours, equal up to f32 rounding).
    let pt = probe.timesteps().to_vec();
    let an_ts = vec![pt[1], pt[pt.len() / 2]];
    let an_ref = floats(&case["add_noise_timesteps"])?;
    anyhow::ensure!(
        an_ts.iter().zip(&an_ref).all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1.0)),
        "{name}: add_noise timesteps"
    );
    let noisy = probe.add_noise(&x0, &noise0, &an_ts)?;
    let add_noise_err = rel_err(&tvals(&noisy)?, &floats(&case["add_noise"])?);
    anyhow::ensure!(add_noise_err < TOL, "{name}: add_noise error {add_noise_err:e}");

    // Trajectory, fed with our own samples.
    let mut x = match strength {
        Some(_) => s.add_noise(&x0, &noise0, &vec![ts[0]; shape[0]])?,
        None => (&noise0 * s.init_noise_sigma())?,
    };
    let mut steps_err = rel_err(&tvals(&x)?, &floats(&case["start"])?);
    for (k, st) in case["steps"].as_array().unwrap().iter().enumerate() {
        let t = ts[k];
        let x_in = s.scale_model_input(&x, t)?;
        steps_err = steps_err.max(rel_err(&tvals(&x_in)?, &floats(&st["model_input"])?));
        let mo = tensor(&st["model_output"], &shape)?;
        let noise = if st["noise"].is_null() { None } else { Some(tensor(&st["noise"], &shape)?) };
        anyhow::ensure!(
            noise.is_some() == s.needs_noise(t),
            "{name} step {k}: needs_noise disagrees with diffusers"
        );
        let out = s
            .step_with_noise(&mo, t, &x, noise.as_ref())
            .with_context(|| format!("{name} step {k}"))?;
        let e = rel_err(&tvals(&out.prev_sample)?, &floats(&st["prev_sample"])?);
        let mut e2 = 0.0;
        if !st["pred_original_sample"].is_null() {
            e2 = rel_err(&tvals(&out.pred_original_sample)?, &floats(&st["pred_original_sample"])?);
        }
        anyhow::ensure!(
            e < TOL && e2 < TOL,
            "{name} step {k} (t={t}): prev_sample error {e:e}, pred_original_sample error {e2:e}"
        );
        steps_err = steps_err.max(e).max(e2);
        x = out.prev_sample;
    }
    Ok(Report { name, schedule: schedule_err, add_noise: add_noise_err, steps: steps_err })
}

#[test]
fn schedulers_match_diffusers() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(doc["diffusers"], "0.42.1");
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = vec![];
    for case in cases {
        match run_case(case) {
            Ok(r) => println!(
                "{:40} schedule {:9.2e}  add_noise {:9.2e}  steps {:9.2e}",
                r.name, r.schedule, r.add_noise, r.steps
            ),
            Err(e) => failures.push(format!("{}: {e:#}", case["name"])),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
