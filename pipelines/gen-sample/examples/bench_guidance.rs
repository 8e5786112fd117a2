//! Benchmark (not a test): cost of APG against CFG in sampling, on the CPU.
//!
//! `cargo run --release -p gen-sample --example bench_guidance [-- --skip-sd15 | --only-sd15]`
//!
//! Three measurements, CFG (w 7.5) and APG (paper preset, w 7.5) in the same run:
//! 1. the guidance combine alone on (1, 4, 64, 64) predictions (x0 conversion, projection,
//!    momentum for APG; `u + w (c - u)` for CFG), median over many calls;
//! 2. `tests/fixtures/tiny-sd` at 64×64 pixels (32×32 latents), 10 DPM++ 2M steps: per-step
//!    time (median of the gaps between step events) and end-to-end `generate` time, median of
//!    3 runs, CFG and APG alternating;
//! 3. an SD-1.5-sized UNet (block_out_channels 320/640/1280/1280, 2 layers per block, seeded
//!    random weights) at 64×64 latents, inside the tiny-sd pipeline (so its cross-attention
//!    takes the tiny 32-wide text encoder and the tiny VAE decodes 128×128 pixels), 2 steps.
//!    Per-step time and end-to-end time, one run each (set `SD15_STEPS` to change).
//!
//! Wall and CPU time (user + system of this process) are both printed: on a shared machine
//! the CPU time is the steadier measure.
//!
//! Measured results are kept, dated, in bench/RESULTS.md ("APG against CFG").

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use gen_core::SeededRng;
use gen_diffusion::{
    ApgConfig, Guidance, GuidanceConfig, GuidanceMethod, PredictionType, Predictions, StepInfo,
};
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_models::unet::{UNet2DConditionModel, UNetConfig};
use gen_sample::{generate, Progress, SampleConfig, Sampler};

/// Resident memory of this process in GB (Linux; 0 elsewhere).
fn rss_gb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1e6
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn apg() -> GuidanceConfig {
    GuidanceConfig {
        method: GuidanceMethod::Apg(ApgConfig::paper(7.5)),
        rescale_phi: 0.0,
        interval: None,
    }
}

/// CPU seconds (user + system) used by this process so far (Linux; 0 elsewhere). On a shared
/// machine this is steadier than wall time.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the command name (which ends with ')'): utime and stime are the 12th and 13th
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Wall and CPU seconds: median per step and end to end, of one `generate` call.
#[derive(Debug, Clone, Copy)]
struct Timing {
    step_wall: f64,
    step_cpu: f64,
    total_wall: f64,
    total_cpu: f64,
}

fn timed_generate(pipe: &SdPipeline, cfg: &SampleConfig) -> Result<Timing> {
    let mut stamps = Vec::new();
    let (t0, c0) = (Instant::now(), cpu_seconds());
    generate(pipe, cfg, &mut |e| {
        if matches!(e, Progress::Step { .. } | Progress::Start { .. }) {
            stamps.push((Instant::now(), cpu_seconds()));
        }
    })?;
    let (total_wall, total_cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    let mut wall: Vec<f64> = stamps.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64()).collect();
    let mut cpu: Vec<f64> = stamps.windows(2).map(|w| w[1].1 - w[0].1).collect();
    Ok(Timing { step_wall: median(&mut wall), step_cpu: median(&mut cpu), total_wall, total_cpu })
}

fn report(rows: &[(&str, Timing)], unit: f64, unit_name: &str) {
    for (name, t) in rows {
        println!(
            "  {name}: {:.2} {unit_name}/step wall ({:.2} CPU), generate {:.2} s wall ({:.2} s CPU)",
            t.step_wall * unit,
            t.step_cpu * unit,
            t.total_wall,
            t.total_cpu
        );
    }
    let (a, c) = (&rows[1].1, &rows[0].1);
    println!(
        "  APG/CFG: per step {:.3} wall, {:.3} CPU; end to end {:.3} wall, {:.3} CPU",
        a.step_wall / c.step_wall,
        a.step_cpu / c.step_cpu,
        a.total_wall / c.total_wall,
        a.total_cpu / c.total_cpu
    );
}

fn combine_time(g: &GuidanceConfig, reps: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(3);
    let x_t = rng.randn((1, 4, 64, 64), DType::F32, &dev)?;
    let mut guidance = g.build()?;
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        let preds = Predictions {
            cond: rng.randn((1, 4, 64, 64), DType::F32, &dev)?,
            uncond: Some(rng.randn((1, 4, 64, 64), DType::F32, &dev)?),
            x_t: x_t.clone(),
            alpha_cumprod: vec![0.5],
            prediction_type: PredictionType::Epsilon,
        };
        let step = StepInfo { step: Some((i % 20, 20)), timestep: 500.0, sigma: 1.0 };
        let t0 = Instant::now();
        let out = guidance.combine(&preds, &step)?;
        // the sampling loop converts the result to model-output space
        let _ = preds.to_space(&out.value, out.space, gen_diffusion::Space::ModelOutput)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(&mut times))
}

/// Seeded random weights, scaled by 1/sqrt(fan_in) (norm weights around 1).
fn randomize(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = SeededRng::new(seed);
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let r = rng.randn(dims.as_slice(), DType::F32, &Device::Cpu)?;
        let t = if dims.len() >= 2 {
            (r / (dims[1..].iter().product::<usize>() as f64).sqrt())?
        } else if name.ends_with("weight") {
            ((r * 0.1)? + 1.0)?
        } else {
            (r * 0.1)?
        };
        var.set(&t)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let skip_sd15 = std::env::args().any(|a| a == "--skip-sd15");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd");
    let pipe = SdPipeline::load(&ModelSource::Local(fixture), &LoadOptions::default())?;

    let cfg_g = GuidanceConfig::cfg(7.5);
    if std::env::args().any(|a| a == "--only-sd15") {
        return sd15(&pipe, cfg_g);
    }
    let (c_cfg, c_apg) = (combine_time(&cfg_g, 200)?, combine_time(&apg(), 200)?);
    println!(
        "guidance combine on 1x4x64x64: CFG {:.3} ms, APG {:.3} ms, APG/CFG {:.2}",
        c_cfg * 1e3,
        c_apg * 1e3,
        c_apg / c_cfg
    );

    let base = SampleConfig::new("a red cube on a blue floor")
        .size(64, 64)
        .steps(10)
        .seed(1)
        .sampler(Sampler::DpmPp2m);
    let methods =
        [("CFG", base.clone().guidance(cfg_g.clone())), ("APG", base.clone().guidance(apg()))];
    timed_generate(&pipe, &methods[0].1)?; // warm-up
                                           // CFG and APG runs alternate, so a change of machine load hits both alike.
    let mut samples: Vec<Vec<Timing>> = vec![Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (m, (_, cfg)) in methods.iter().enumerate() {
            samples[m].push(timed_generate(&pipe, cfg)?);
        }
    }
    let med =
        |v: &[Timing], f: fn(&Timing) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    let rows: Vec<(&str, Timing)> = methods
        .iter()
        .zip(&samples)
        .map(|((n, _), v)| {
            let t = Timing {
                step_wall: med(v, |t| t.step_wall),
                step_cpu: med(v, |t| t.step_cpu),
                total_wall: med(v, |t| t.total_wall),
                total_cpu: med(v, |t| t.total_cpu),
            };
            (*n, t)
        })
        .collect();
    println!("tiny-sd 64x64 px, 10 steps dpm++2m, median of 3:");
    report(&rows, 1e3, "ms");

    if skip_sd15 {
        return Ok(());
    }
    sd15(&pipe, cfg_g)
}

fn sd15(pipe: &SdPipeline, cfg_g: GuidanceConfig) -> Result<()> {
    let steps: usize = std::env::var("SD15_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let ucfg = UNetConfig::from_json(
        &serde_json::json!({
            "in_channels": 4, "out_channels": 4, "sample_size": 64,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": pipe.text_config.hidden_size, "attention_head_dim": 8, "norm_num_groups": 32
        }),
        "SD-1.5-sized bench UNet",
    )?;
    let varmap = VarMap::new();
    let t0 = Instant::now();
    UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &ucfg)?;
    randomize(&varmap, 0)?;
    // Inference reads detached copies of the variables (same storage): a model built on the
    // `Var`s themselves would record every activation for backprop and keep them all alive.
    let weights: std::collections::HashMap<String, candle_core::Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let unet = UNet2DConditionModel::new(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &ucfg,
    )?;
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    println!(
        "SD-1.5-sized UNet: {:.0} M parameters, built in {:.1} s, RSS {:.1} GB",
        params as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        rss_gb()
    );
    let mut big = pipe.clone();
    big.unet = unet;
    // Queries in chunks of 1024 rows: the 4096×4096 attention logits of the first block
    // would otherwise take ~1 GB per tensor.
    big.unet.set_attention_chunk_size(Some(1024));
    big.unet_config = ucfg;
    let base = SampleConfig::new("a red cube on a blue floor")
        .size(128, 128)
        .steps(steps)
        .seed(1)
        .sampler(Sampler::DpmPp2m);
    let mut rows = Vec::new();
    for (name, g) in [("CFG", cfg_g), ("APG", apg())] {
        let t = timed_generate(&big, &base.clone().guidance(g))?;
        println!("  {name} done, RSS {:.1} GB", rss_gb());
        rows.push((name, t));
    }
    println!("SD-1.5-sized UNet, 64x64 latents (tiny VAE, 128x128 px), {steps} steps dpm++2m, one run each:");
    report(&rows, 1.0, "s");
    Ok(())
}
