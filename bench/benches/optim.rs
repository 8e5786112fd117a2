//! Low-rank optimizer benchmarks (gen-optim):
//!
//! 1. **Projection time**: SVD (faer thin SVD, GaLore's projector) vs DCT selection (matmul by
//!    the cached DCT-II basis, column L1 norms, argsort) on SD-1.5 attention / MLP weight shapes,
//!    ranks 32 and 128, on a seeded Gaussian "gradient" (f32). The DCT basis is built once per
//!    size and cached (its build time is printed separately).
//! 2. **State memory** on SD 1.5's UNet parameter shapes (859.5 M parameters): AdamW vs GaLore
//!    (rank 128) and FRUGAL (density 0.25), each with a dense basis and with DCT selection.
//!    The shapes come from building `UNet2DConditionModel` on a recording `VarBuilder` backend
//!    (no weights allocated); then one parameter at a time gets a real `Var`, a gradient and
//!    one optimizer step, and the optimizer's own `total_state_bytes` is summed (DCT bases are
//!    shared per size, counted once per size). The dense-basis rows use the random-orthogonal
//!    projector as a stand-in for SVD: it stores exactly the same `proj_q` (d×r) and moments,
//!    and avoids hundreds of large SVDs. 1-D parameters get AdamW state in the low-rank rules.
//! 3. **Training**: the tiny UNet (1.49 M parameters, `gen_bench::tiny_unet_config`) trained
//!    for the same number of steps on a fixed synthetic denoising task (16 low-frequency 4×16×16
//!    latents, each with its own random 8×64 condition; ε-prediction MSE with SD's
//!    scaled-linear noise schedule; batch 4), same initial weights and same data order for
//!    every optimizer. Reports the eval loss on a fixed batch (all 16 latents, fixed noise and
//!    timesteps) before and after, the mean training loss of the last 10 steps, state bytes
//!    and wall time. lr 1e-3 for every rule (not tuned per rule); GaLore rank 16 (a quarter of
//!    the widest projected side, 64), scale 1; FRUGAL density 0.25, signSGD residual; both
//!    re-project every 50 steps.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench -p gen-bench --bench optim`. Environment:
//! `GEN_BENCH_OPTIM_PARTS` (default `proj,state,train`), `GEN_BENCH_OPTIM_STEPS` (default 100),
//! `GEN_BENCH_REPS` (projection timings, default 3).
//!
//! The numpy peer for the projection times is `scripts/bench_lowrank_numpy.py` (run it in the
//! same session for a ratio).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use gen_bench::{randomize, sd15_unet_config, time_it, tiny_unet_config};
use gen_core::SeededRng;
use gen_models::unet::{UNet2DConditionModel, UNetConfig};
use gen_optim::{
    make_projector, AdamW, AdamWConfig, DctCache, Frugal, FrugalConfig, GaLore, GaLoreConfig,
    NamedVar, Optim, Optimizer, ParamGroup, ProjectionKind, Side, SignSgd, SignSgdConfig,
};

// ---------------------------------------------------------------------------------------------
// 1. Projection time

fn bench_projection(reps: usize) -> Result<()> {
    println!(
        "## SVD vs DCT-selection projector time (f32, {} rayon threads)\n",
        rayon::current_num_threads()
    );
    // (m, n, what): SD 1.5 weights (out, in).
    let shapes: [(usize, usize, &str); 6] = [
        (320, 320, "attn q/k/v/out, block 0"),
        (640, 640, "attn, block 1"),
        (1280, 1280, "attn, blocks 2-3"),
        (320, 1280, "ff.net.2, block 0"),
        (1280, 5120, "ff.net.2, block 2"),
        (2560, 320, "ff.net.0.proj, block 0"),
    ];
    let mut rng = SeededRng::new(7);
    println!("| shape | projected side d | rank | SVD (ms) | DCT select (ms) | SVD/DCT | DCT basis build, once per d (ms) |");
    println!("|---|---|---|---|---|---|---|");
    for (m, n, what) in shapes {
        let g = rng.randn((m, n), DType::F32, &Device::Cpu)?;
        let d = Side::for_shape(m, n).dim(m, n);
        let mut dct = DctCache::default();
        let t0 = Instant::now();
        dct.get(d, DType::F32, &Device::Cpu)?;
        let build_ms = t0.elapsed().as_secs_f64() * 1e3;
        for r in [32usize, 128] {
            let mut prng = SeededRng::new(0);
            let svd = time_it(0, reps, || {
                make_projector(ProjectionKind::Svd, &g, r, &mut prng, &mut dct)?;
                Ok(())
            })?;
            let dctt = time_it(1, reps.max(5), || {
                make_projector(ProjectionKind::Dct, &g, r, &mut prng, &mut dct)?;
                Ok(())
            })?;
            println!(
                "| {m}×{n} ({what}) | {d} | {r} | {:.1} | {:.2} | {:.1}× | {build_ms:.1} |",
                svd.median_ms,
                dctt.median_ms,
                svd.median_ms / dctt.median_ms
            );
        }
    }
    println!(
        "\n(numpy anchor, f32, 2 cores: 320² 13.9 vs 0.76 ms = 18×; 1280² 499 vs 49 ms = 10×)\n"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. State memory on SD 1.5 shapes

/// A `VarBuilder` backend that records the name and shape of every requested weight and hands
/// out a broadcast zero (no memory per weight).
/// Names and shapes of the weights requested so far.
type Recorded = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

struct ShapeRecorder(Recorded);

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.lock().expect("recorder lock").push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("shape recorder: `{name}` requested without a shape")))
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

fn unet_shapes(cfg: &UNetConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let rec = Arc::new(Mutex::new(Vec::new()));
    let vb =
        VarBuilder::from_backend(Box::new(ShapeRecorder(rec.clone())), DType::F32, Device::Cpu);
    UNet2DConditionModel::new(vb, cfg).context("building the SD 1.5 UNet on the shape recorder")?;
    let mut v = rec.lock().expect("recorder lock").clone();
    v.sort();
    v.dedup();
    Ok(v)
}

/// One optimizer step on a single parameter of `dims` (gradient: a fixed pattern; state sizes
/// do not depend on values); returns (per-parameter state bytes, shared bytes, projected d).
fn one_param_state(kind: &str, dims: &[usize]) -> Result<(usize, usize)> {
    let var = Var::zeros(dims, DType::F32, &Device::Cpu)?;
    let n = dims.iter().product::<usize>();
    let pattern = Tensor::arange(0u32, n as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .affine(1e-3, 0.0)?
        .sin()?
        .reshape(dims)?;
    let grads = (var.as_tensor() * &pattern)?.sum_all()?.backward()?;
    let params = vec![NamedVar::new("w", var.clone())];
    let galore = |k| GaLoreConfig { rank: 128, kind: k, ..Default::default() };
    let frugal = |k| FrugalConfig { density: 0.25, kind: k, ..Default::default() };
    let mut opt: Box<dyn Optimizer> = match kind {
        "adamw" => {
            Box::new(Optim::new(AdamW, vec![ParamGroup::new(params, AdamWConfig::default())])?)
        }
        "galore-dense" => Box::new(Optim::new(
            GaLore::default(),
            vec![ParamGroup::new(params, galore(ProjectionKind::RandomOrthogonal))],
        )?),
        "galore-dct" => Box::new(Optim::new(
            GaLore::default(),
            vec![ParamGroup::new(params, galore(ProjectionKind::Dct))],
        )?),
        "frugal-dense" => Box::new(Optim::new(
            Frugal::default(),
            vec![ParamGroup::new(params, frugal(ProjectionKind::RandomOrthogonal))],
        )?),
        "frugal-dct" => Box::new(Optim::new(
            Frugal::default(),
            vec![ParamGroup::new(params, frugal(ProjectionKind::Dct))],
        )?),
        other => anyhow::bail!("unknown optimizer {other}"),
    };
    opt.step(&grads)?;
    Ok((opt.state_bytes().iter().sum(), opt.shared_state_bytes()))
}

fn bench_state() -> Result<()> {
    let shapes = unet_shapes(&sd15_unet_config()?)?;
    let total: usize = shapes.iter().map(|(_, d)| d.iter().product::<usize>()).sum();
    println!(
        "## Optimizer state on SD 1.5 UNet shapes ({} tensors, {total} parameters)\n",
        shapes.len()
    );
    let kinds = [
        ("adamw", "AdamW"),
        ("galore-dense", "GaLore r=128, dense basis (SVD-equivalent bytes)"),
        ("galore-dct", "GaLore r=128, DCT selection"),
        ("frugal-dense", "FRUGAL ρ=0.25, dense basis (SVD-equivalent bytes)"),
        ("frugal-dct", "FRUGAL ρ=0.25, DCT selection"),
    ];
    let mut rows = Vec::new();
    for (key, label) in kinds {
        let t0 = Instant::now();
        let mut per_param = 0usize;
        // Shared DCT bases, one per projected size d.
        let mut shared: BTreeMap<usize, usize> = BTreeMap::new();
        for (name, dims) in &shapes {
            let (p, s) =
                one_param_state(key, dims).with_context(|| format!("{key}: `{name}` {dims:?}"))?;
            per_param += p;
            if s > 0 && dims.len() >= 2 {
                let (m, n) = (dims[0], dims[1..].iter().product::<usize>());
                let d = Side::for_shape(m, n).dim(m, n);
                let e = shared.entry(d).or_insert(0);
                *e = (*e).max(s);
            }
        }
        let shared_total: usize = shared.values().sum();
        eprintln!("  {label}: {:.1} s", t0.elapsed().as_secs_f64());
        rows.push((label, per_param, shared_total));
    }
    let adamw = (rows[0].1 + rows[0].2) as f64;
    println!("| optimizer | per-parameter state (bytes) | shared DCT bases (bytes) | total (bytes) | total (GiB) | fraction of AdamW |");
    println!("|---|---|---|---|---|---|");
    for (label, p, s) in &rows {
        let t = p + s;
        println!(
            "| {label} | {p} | {s} | {t} | {:.3} | {:.3} |",
            t as f64 / (1u64 << 30) as f64,
            t as f64 / adamw
        );
    }
    println!(
        "\n(parameters themselves: {total} × 4 B = {:.3} GiB)\n",
        (total * 4) as f64 / (1u64 << 30) as f64
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Training the tiny UNet

/// SD's scaled-linear schedule: ᾱ_t for t in 0..1000.
fn alphas_cumprod() -> Vec<f64> {
    let (b0, b1) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut acc = 1.0;
    (0..1000)
        .map(|i| {
            let b = b0 + (b1 - b0) * i as f64 / 999.0;
            acc *= 1.0 - b * b;
            acc
        })
        .collect()
}

struct Task {
    x0: Tensor,   // (16, 4, 16, 16)
    cond: Tensor, // (16, 8, 64)
    ac: Vec<f64>,
}

impl Task {
    fn new() -> Result<Self> {
        let mut rng = SeededRng::new(2026);
        let low = rng.randn((16, 4, 4, 4), DType::F32, &Device::Cpu)?;
        let x0 = low.upsample_nearest2d(16, 16)?;
        let cond = rng.randn((16, 8, 64), DType::F32, &Device::Cpu)?;
        Ok(Self { x0, cond, ac: alphas_cumprod() })
    }

    /// Denoising MSE on samples `idx` with noise and timesteps from `rng`.
    fn loss(
        &self,
        unet: &UNet2DConditionModel,
        idx: &[u32],
        rng: &mut SeededRng,
    ) -> Result<Tensor> {
        let b = idx.len();
        let it = Tensor::new(idx, &Device::Cpu)?;
        let x0 = self.x0.index_select(&it, 0)?;
        let cond = self.cond.index_select(&it, 0)?;
        let eps = rng.randn(x0.shape(), DType::F32, &Device::Cpu)?;
        let ts: Vec<usize> = (0..b).map(|_| rng.below(1000)).collect();
        let sa: Vec<f32> = ts.iter().map(|&t| self.ac[t].sqrt() as f32).collect();
        let s1a: Vec<f32> = ts.iter().map(|&t| (1.0 - self.ac[t]).sqrt() as f32).collect();
        let sa = Tensor::from_vec(sa, (b, 1, 1, 1), &Device::Cpu)?;
        let s1a = Tensor::from_vec(s1a, (b, 1, 1, 1), &Device::Cpu)?;
        let noisy = (x0.broadcast_mul(&sa)? + eps.broadcast_mul(&s1a)?)?;
        let tt =
            Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, &Device::Cpu)?;
        let pred = unet.forward(&noisy, &tt, &cond)?;
        Ok((pred - eps)?.sqr()?.mean_all()?)
    }

    fn eval(&self, unet: &UNet2DConditionModel) -> Result<f64> {
        let idx: Vec<u32> = (0..16).collect();
        Ok(self.loss(unet, &idx, &mut SeededRng::new(99))?.to_scalar::<f32>()? as f64)
    }
}

fn make_opt(kind: &str, params: Vec<NamedVar>) -> Result<Box<dyn Optimizer>> {
    let lr = 1e-3;
    let galore = |k| GaLoreConfig {
        lr,
        rank: 16,
        update_gap: 50,
        scale: 1.0,
        kind: k,
        ..Default::default()
    };
    let frugal =
        |k| FrugalConfig { lr, density: 0.25, update_gap: 50, kind: k, ..Default::default() };
    Ok(match kind {
        "AdamW" => Box::new(Optim::new(
            AdamW,
            vec![ParamGroup::new(params, AdamWConfig { lr, ..Default::default() })],
        )?),
        "GaLore (SVD)" => Box::new(Optim::new(
            GaLore::default(),
            vec![ParamGroup::new(params, galore(ProjectionKind::Svd))],
        )?),
        "GaLore (DCT)" => Box::new(Optim::new(
            GaLore::default(),
            vec![ParamGroup::new(params, galore(ProjectionKind::Dct))],
        )?),
        "FRUGAL (SVD)" => Box::new(Optim::new(
            Frugal::default(),
            vec![ParamGroup::new(params, frugal(ProjectionKind::Svd))],
        )?),
        "FRUGAL (DCT)" => Box::new(Optim::new(
            Frugal::default(),
            vec![ParamGroup::new(params, frugal(ProjectionKind::Dct))],
        )?),
        "signSGD" => Box::new(Optim::new(
            SignSgd,
            vec![ParamGroup::new(params, SignSgdConfig { lr, ..Default::default() })],
        )?),
        other => anyhow::bail!("unknown optimizer {other}"),
    })
}

fn bench_train(steps: usize) -> Result<()> {
    let cfg = tiny_unet_config()?;
    let task = Task::new()?;
    let kinds =
        ["AdamW", "GaLore (SVD)", "GaLore (DCT)", "FRUGAL (SVD)", "FRUGAL (DCT)", "signSGD"];
    println!("## Tiny UNet denoising, {steps} steps, batch 4, lr 1e-3 (same init, data and noise for all)\n");
    let mut rows = Vec::new();
    for kind in kinds {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let unet = UNet2DConditionModel::new(vb, &cfg)?;
        randomize(&varmap, 1)?;
        let mut params: Vec<NamedVar> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| NamedVar::new(k.clone(), v.clone()))
            .collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
        let mut opt = make_opt(kind, params)?;
        let before = task.eval(&unet)?;
        let mut rng = SeededRng::new(5);
        let mut last = Vec::new();
        let t0 = Instant::now();
        for step in 0..steps {
            let idx: Vec<u32> = (0..4).map(|_| rng.below(16) as u32).collect();
            let loss = task.loss(&unet, &idx, &mut rng)?;
            let grads = loss.backward()?;
            opt.step(&grads)?;
            if step + 10 >= steps {
                last.push(loss.to_scalar::<f32>()? as f64);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = task.eval(&unet)?;
        let bytes: usize = opt.state_bytes().iter().sum::<usize>() + opt.shared_state_bytes();
        let train = last.iter().sum::<f64>() / last.len().max(1) as f64;
        eprintln!("  {kind}: eval {before:.4} → {after:.4}, {secs:.1} s");
        rows.push((kind, before, after, train, bytes, n_params, secs));
    }
    let adamw_bytes = rows[0].4 as f64;
    let adamw_secs = rows[0].6;
    println!("| optimizer | eval loss before | eval loss after | train loss (last 10) | state bytes | state / AdamW | time (s) | time / AdamW |");
    println!("|---|---|---|---|---|---|---|---|");
    for (kind, before, after, train, bytes, _, secs) in &rows {
        println!(
            "| {kind} | {before:.4} | {after:.4} | {train:.4} | {bytes} | {:.3} | {secs:.1} | {:.2} |",
            *bytes as f64 / adamw_bytes,
            secs / adamw_secs
        );
    }
    println!("\n({} parameters, {} bytes of f32 weights)\n", rows[0].5, rows[0].5 * 4);
    Ok(())
}

fn main() -> Result<()> {
    gen_core::tune_allocator();
    let parts =
        std::env::var("GEN_BENCH_OPTIM_PARTS").unwrap_or_else(|_| "proj,state,train".into());
    let reps: usize =
        std::env::var("GEN_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let steps: usize =
        std::env::var("GEN_BENCH_OPTIM_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {}\n", l.trim());
    }
    for part in parts.split(',') {
        match part.trim() {
            "proj" => bench_projection(reps)?,
            "state" => bench_state()?,
            "train" => bench_train(steps)?,
            other => {
                anyhow::bail!("GEN_BENCH_OPTIM_PARTS: unknown part `{other}` (proj, state, train)")
            }
        }
    }
    Ok(())
}
