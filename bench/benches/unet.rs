//! UNet speed: gen-models vs candle-transformers (same weights) vs diffusers (PyTorch, CPU).
//!
//! Run (release build; nothing else heavy at the same time):
//!
//! ```text
//! /work/venv/bin/python scripts/bench_diffusers_unet.py     # writes target/bench/diffusers_unet.json
//! cargo bench -p gen-bench --bench unet                      # prints the table, with diffusers ratios
//! ```
//!
//! Environment:
//! - `GEN_BENCH_REPS` timed repetitions for the tiny UNet (default 5; SD 1.5 uses `GEN_BENCH_SD15_REPS`, default 2);
//!   each measurement is the median after one untimed warm-up call.
//! - `GEN_BENCH_TINY=0` / `GEN_BENCH_PRIOR=0` skip the tiny UNet / the embedded prior's UNet;
//! - `GEN_BENCH_SD15=0` skips the SD-1.5-sized UNet; `GEN_BENCH_SD15_BACKWARD=1` also times its
//!   forward + backward (no AdamW; needs well over 10 GB of memory; off by default);
//!   `GEN_BENCH_SD15_WARMUP` untimed calls before (default 1); `GEN_BENCH_SD15_ATTN_CHUNK` the
//!   attention query chunk of the forward + backward (default 1024; without chunking the
//!   attention probabilities kept for the backward pass alone need several GB).
//! - `GEN_BENCH_DIFFUSERS_JSON` overrides the path of the diffusers results.
//!
//! Configurations (same in the Python script):
//! - tiny: block_out_channels (32, 64, 64), 1 layer per block, 1.49 M parameters, batch 32,
//!   4×16×16 latents, 77 condition tokens of width 64;
//! - prior: the UNet of the embedded model (`gen train --preset real`: (32, 64, 64), attention
//!   at 8×8 and 4×4 only, 4 heads), batch 32, 4×16×16 latents, 16 tokens of width 64 — one
//!   training step of `gen train`;
//! - sd15: Stable Diffusion 1.5's UNet (860 M parameters), batch 1, 4×64×64 latents, 77×768
//!   condition.
//!
//! All f32 on CPU, timestep 500 for every sample (candle-transformers takes one timestep per
//! batch). Training step = forward + MSE loss + backward (+ AdamW update, gen-optim's `AdamW`).
//! candle-transformers is timed for the forward only: its backward drops or corrupts gradients
//! (the parity tests in `tests/` show where), so its time would not measure the same work.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::unet_2d;
use gen_bench::{
    candle_unet_config, detached_weights, num_params, prior_unet_config, randomize,
    sd15_unet_config, time_it, tiny_unet_config, Timing,
};
use gen_models::unet::{UNet2DConditionModel, UNetConfig};
use gen_optim::{AdamW, AdamWConfig, NamedVar, Optim, Optimizer, ParamGroup};

struct Case {
    name: &'static str,
    cfg: UNetConfig,
    batch: usize,
    hw: usize,
    tokens: usize,
    reps: usize,
    /// Untimed calls before the timed ones.
    warmup: usize,
    backward: bool,
    /// Also time forward + backward + AdamW (needs memory for the optimizer state).
    adamw: bool,
    /// Attention query chunk for the forward + backward timings (`None`: unchunked).
    train_attention_chunk: Option<usize>,
}

#[derive(Default)]
struct Row {
    name: String,
    params: usize,
    ours_fwd: Option<Timing>,
    candle_fwd: Option<Timing>,
    ours_fwd_bwd: Option<Timing>,
    ours_step: Option<Timing>,
    agreement: f64,
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    Ok(d / s)
}

fn run_case(case: &Case) -> Result<Row> {
    let dev = Device::Cpu;
    let cfg = &case.cfg;
    eprintln!("== {}: building random weights", case.name);
    let varmap = VarMap::new();
    UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), cfg)?;
    randomize(&varmap, 1)?;
    let mut row =
        Row { name: case.name.to_string(), params: num_params(&varmap), ..Default::default() };

    let mut rng = gen_core::SeededRng::new(2);
    let x = rng.randn((case.batch, cfg.in_channels, case.hw, case.hw), DType::F32, &dev)?;
    let ehs = rng.randn((case.batch, case.tokens, cfg.cross_attention_dim), DType::F32, &dev)?;
    let target = rng.randn((case.batch, cfg.out_channels, case.hw, case.hw), DType::F32, &dev)?;
    let t = 500f32;
    let ts = Tensor::full(t, case.batch, &dev)?;

    // Inference models read detached tensors that share storage with the VarMap.
    let ours_out = {
        let ours = UNet2DConditionModel::new(
            VarBuilder::from_tensors(detached_weights(&varmap), DType::F32, &dev),
            cfg,
        )?;
        eprintln!("== {}: gen-models forward", case.name);
        row.ours_fwd = Some(time_it(case.warmup, case.reps, || {
            ours.forward(&x, &ts, &ehs).map(|_| ()).map_err(Into::into)
        })?);
        ours.forward(&x, &ts, &ehs)?
    };
    {
        let theirs = unet_2d::UNet2DConditionModel::new(
            VarBuilder::from_tensors(detached_weights(&varmap), DType::F32, &dev),
            cfg.in_channels,
            cfg.out_channels,
            false,
            candle_unet_config(cfg)?,
        )?;
        eprintln!("== {}: candle-transformers forward", case.name);
        row.candle_fwd = Some(time_it(case.warmup, case.reps, || {
            theirs.forward(&x, t as f64, &ehs).map(|_| ()).map_err(Into::into)
        })?);
        row.agreement = rel_err(&ours_out, &theirs.forward(&x, t as f64, &ehs)?)?;
    }

    if case.backward {
        let mut model =
            UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), cfg)?;
        // Training at SD resolution keeps the attention probabilities of every layer for the
        // backward pass unless queries are chunked (the fused op recomputes them per chunk).
        model.set_attention_chunk_size(case.train_attention_chunk);
        let loss = || -> Result<Tensor> {
            Ok((model.forward(&x, &ts, &ehs)? - &target)?.sqr()?.mean_all()?)
        };
        eprintln!("== {}: gen-models forward + backward", case.name);
        row.ours_fwd_bwd = Some(time_it(case.warmup, case.reps, || {
            loss()?.backward().map(|_| ()).map_err(Into::into)
        })?);
        let params: Vec<NamedVar> = {
            let data = varmap.data().lock().expect("varmap lock");
            let mut v: Vec<NamedVar> =
                data.iter().map(|(k, var)| NamedVar::new(k.clone(), var.clone())).collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        if !case.adamw {
            return Ok(row);
        }
        let mut opt = Optim::new(
            AdamW,
            vec![ParamGroup::new(params, AdamWConfig { lr: 1e-4, ..Default::default() })],
        )?;
        eprintln!("== {}: gen-models forward + backward + AdamW", case.name);
        row.ours_step = Some(time_it(case.warmup, case.reps, || {
            let grads = loss()?.backward()?;
            opt.step(&grads)?;
            Ok(())
        })?);
    }
    Ok(row)
}

fn diffusers_results() -> Option<serde_json::Value> {
    let path = std::env::var("GEN_BENCH_DIFFUSERS_JSON").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/diffusers_unet.json")
    });
    let text = std::fs::read_to_string(&path).ok()?;
    eprintln!("diffusers results: {}", path.display());
    serde_json::from_str(&text).ok()
}

fn ms(t: Option<Timing>) -> String {
    t.map(|t| format!("{:.1}", t.median_ms)).unwrap_or_else(|| "-".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn main() -> Result<()> {
    gen_core::tune_allocator();
    let reps = env_usize("GEN_BENCH_REPS", 5);
    let mut cases = Vec::new();
    if env_usize("GEN_BENCH_TINY", 1) != 0 {
        cases.push(Case {
            name: "tiny",
            cfg: tiny_unet_config()?,
            batch: 32,
            hw: 16,
            tokens: 77,
            reps,
            warmup: 1,
            backward: true,
            adamw: true,
            train_attention_chunk: None,
        });
    }
    if env_usize("GEN_BENCH_PRIOR", 1) != 0 {
        cases.push(Case {
            name: "prior",
            cfg: prior_unet_config()?,
            batch: 32,
            hw: 16,
            tokens: 16,
            reps,
            warmup: 1,
            backward: true,
            adamw: true,
            train_attention_chunk: None,
        });
    }
    if env_usize("GEN_BENCH_SD15", 1) != 0 {
        cases.push(Case {
            name: "sd15",
            cfg: sd15_unet_config()?,
            batch: 1,
            hw: 64,
            tokens: 77,
            reps: env_usize("GEN_BENCH_SD15_REPS", 2),
            warmup: env_usize("GEN_BENCH_SD15_WARMUP", 1),
            backward: env_usize("GEN_BENCH_SD15_BACKWARD", 0) != 0,
            adamw: false,
            // 1024 of SD 1.5's 4096 queries at 64×64: ≤ 128 MB of logits per layer at a time
            train_attention_chunk: Some(env_usize("GEN_BENCH_SD15_ATTN_CHUNK", 1024)),
        });
    }
    println!("UNet benchmark, f32 CPU, {} threads (candle)", candle_core::utils::get_num_threads());
    let mut rows = Vec::new();
    for case in &cases {
        let row = run_case(case)?;
        println!(
            "{}: {} params, batch {}, {}x{}x{} latents, {} tokens; gen-models vs candle-transformers output rel max diff {:.2e}",
            row.name, row.params, case.batch, case.cfg.in_channels, case.hw, case.hw, case.tokens, row.agreement
        );
        for (what, t) in [
            ("gen fwd", row.ours_fwd),
            ("candle fwd", row.candle_fwd),
            ("gen fwd+bwd", row.ours_fwd_bwd),
            ("gen fwd+bwd+AdamW", row.ours_step),
        ] {
            if let Some(t) = t {
                println!("  {what:<18} {t}");
            }
        }
        rows.push(row);
    }

    let py = diffusers_results();
    let py_ms = |name: &str, key: &str| {
        py.as_ref().and_then(|p| p.get(name)).and_then(|c| c.get(key)).and_then(|v| v.as_f64())
    };
    println!();
    println!("median ms | gen fwd | candle fwd | gen/candle | diffusers fwd | gen/diffusers | gen fwd+bwd | diffusers fwd+bwd | gen/diffusers | gen +AdamW | diffusers +AdamW | gen/diffusers");
    println!("---|---|---|---|---|---|---|---|---|---|---|---");
    for r in &rows {
        let g = |t: Option<Timing>| t.map(|t| t.median_ms);
        let (df, db, ds) = (
            py_ms(&r.name, "fwd_ms"),
            py_ms(&r.name, "fwd_bwd_ms"),
            py_ms(&r.name, "fwd_bwd_adamw_ms"),
        );
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        println!(
            "{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}",
            r.name,
            ms(r.ours_fwd),
            ms(r.candle_fwd),
            ratio(g(r.ours_fwd), g(r.candle_fwd)),
            f(df),
            ratio(g(r.ours_fwd), df),
            ms(r.ours_fwd_bwd),
            f(db),
            ratio(g(r.ours_fwd_bwd), db),
            ms(r.ours_step),
            f(ds),
            ratio(g(r.ours_step), ds),
        );
    }
    println!();
    println!("process CPU time (all threads), median ms | gen fwd | candle fwd | diffusers fwd | gen fwd+bwd | diffusers fwd+bwd | gen +AdamW | diffusers +AdamW");
    println!("---|---|---|---|---|---|---|---");
    for r in &rows {
        let c = |t: Option<Timing>| {
            t.map(|t| format!("{:.0}", t.cpu_median_ms)).unwrap_or_else(|| "-".into())
        };
        let p =
            |k: &str| py_ms(&r.name, k).map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        println!(
            "{} | {} | {} | {} | {} | {} | {} | {}",
            r.name,
            c(r.ours_fwd),
            c(r.candle_fwd),
            p("fwd_cpu_ms"),
            c(r.ours_fwd_bwd),
            p("fwd_bwd_cpu_ms"),
            c(r.ours_step),
            p("fwd_bwd_adamw_cpu_ms")
        );
    }
    if py.is_none() {
        println!(
            "(no diffusers results: run scripts/bench_diffusers_unet.py first for those columns)"
        );
    }
    Ok(())
}
