//! Gaussian-splat rasterizer speed: gen-scene's `splat::render` (CPU, rayon) vs a CPU PyTorch
//! peer (gsplat 1.5.3's pure-PyTorch projection and tile binning + per-tile compositing in
//! PyTorch, autograd backward), on the same Gaussians and camera.
//!
//! Run (release; the Python peer first, it writes the scenes this benchmark renders):
//!
//! ```text
//! /work/venv/bin/python scripts/bench_splat_torch.py   # target/bench/splat_{scenes.safetensors,torch.json}
//! RAYON_NUM_THREADS=2 cargo bench -p gen-bench --bench splat
//! # single-thread comparison (the one in bench/RESULTS.md):
//! /work/venv/bin/python scripts/bench_splat_torch.py --threads 1
//! RAYON_NUM_THREADS=1 cargo bench -p gen-bench --bench splat
//! ```
//!
//! Without the scene file the benchmark generates its own scenes (`Splats::random`, same
//! ranges) and prints no ratios. Environment: `GEN_BENCH_REPS` timed runs per case (default 5,
//! fewer when one run takes over 5 s), `GEN_BENCH_SPLAT_DIR` the folder of the two files
//! (default `target/bench`), `GEN_BENCH_SPLAT_COUNTS` / `GEN_BENCH_SPLAT_SIZES` comma lists
//! (default 1000,10000,100000 and 64,128,256,512), `GEN_BENCH_SPLAT_LIMIT_S` (default 30):
//! a case whose forward + backward takes longer (CPU time) causes the same skips as in the Python
//! script.
//! Our timings also go to `splat_ours.json` in that folder.
//! Each case reports median wall time and median process CPU time (`/proc/self/task/*/schedstat`);
//! the Python script records both too, and the table gives both ratios.
//!
//! Forward: `render` on plain tensors (no graph). Forward + backward: `render` on `SplatVars`,
//! loss = sum(w · rgb) with a fixed random w, `backward()` to all five parameter tensors.
//! f32, SH degree 0, black background, camera R = I, T = (0, 0, 4), fov_y 0.8 rad, square
//! images.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use gen_bench::median;
use gen_core::SeededRng;
use gen_scene::camera::{Camera, Intrinsics};
use gen_scene::splat::{render, RandomSplatsConfig, RenderConfig, SplatVars, Splats};
use glam::{DMat3, DVec3};

const FOV_Y: f64 = 0.8;
const CAM_Z: f64 = 4.0;

fn env_list(name: &str, default: &[usize]) -> Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse::<usize>().with_context(|| format!("{name}={s}")))
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

/// CPU time of this process so far (all threads), in seconds, from the scheduler's per-thread
/// run-time counters (`/proc/self/task/*/schedstat`, nanoseconds); 0 where they are missing.
/// On a loaded machine it moves far less than wall time.
fn cpu_time_s() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ns as f64 * 1e-9
}

/// Median wall and median CPU time in seconds over up to `reps` runs (stopping early after a
/// run over 5 s).
fn time_runs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let mut ts = Vec::new();
    let mut cs = Vec::new();
    for _ in 0..reps {
        let c0 = cpu_time_s();
        let t0 = Instant::now();
        f()?;
        ts.push(t0.elapsed().as_secs_f64());
        cs.push(cpu_time_s() - c0);
        if ts[ts.len() - 1] > 5.0 {
            break;
        }
    }
    Ok((median(&mut ts), median(&mut cs)))
}

fn camera(size: usize) -> Result<Camera> {
    let k = Intrinsics::from_fov_y(FOV_Y, size, size)?;
    Ok(Camera::new(k, DMat3::IDENTITY, DVec3::new(0.0, 0.0, CAM_Z))?)
}

struct TorchRow {
    fwd: Option<f64>,
    fwd_bwd: Option<f64>,
    fwd_cpu: Option<f64>,
    fwd_bwd_cpu: Option<f64>,
    note: String,
}

/// Our timings of one case: (wall s, CPU s) medians, `None` when skipped.
struct Row {
    n: usize,
    size: usize,
    fwd: Option<(f64, f64)>,
    fwd_bwd: Option<(f64, f64)>,
}

fn torch_row(doc: &Option<serde_json::Value>, n: usize, size: usize) -> Option<TorchRow> {
    let rows = doc.as_ref()?.get("results")?.as_array()?;
    let r = rows.iter().find(|r| {
        r["count"].as_u64() == Some(n as u64) && r["size"].as_u64() == Some(size as u64)
    })?;
    let st = &r["stages"];
    let note = if let Some(s) = r["skipped"].as_str() {
        format!("skipped: {s}")
    } else {
        format!(
            "proj {:.0} / bin {:.0} / comp {:.0} ms{}",
            st["project"].as_f64().unwrap_or(f64::NAN) * 1e3,
            st["bin"].as_f64().unwrap_or(f64::NAN) * 1e3,
            st["composite"].as_f64().unwrap_or(f64::NAN) * 1e3,
            r["note"].as_str().map(|s| format!("; {s}")).unwrap_or_default()
        )
    };
    Some(TorchRow {
        fwd: r["fwd_s"].as_f64(),
        fwd_bwd: r["fwd_bwd_s"].as_f64(),
        fwd_cpu: r["fwd_cpu_s"].as_f64(),
        fwd_bwd_cpu: r["fwd_bwd_cpu_s"].as_f64(),
        note,
    })
}

fn main() -> Result<()> {
    gen_core::tune_allocator();
    let dir =
        PathBuf::from(std::env::var("GEN_BENCH_SPLAT_DIR").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench").to_string()
        }));
    let reps: usize =
        std::env::var("GEN_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let limit: f64 =
        std::env::var("GEN_BENCH_SPLAT_LIMIT_S").ok().and_then(|s| s.parse().ok()).unwrap_or(30.0);
    let counts = env_list("GEN_BENCH_SPLAT_COUNTS", &[1000, 10000, 100000])?;
    let sizes = env_list("GEN_BENCH_SPLAT_SIZES", &[64, 128, 256, 512])?;
    let scene_path = dir.join("splat_scenes.safetensors");
    let scenes = if scene_path.exists() {
        Some(
            candle_core::safetensors::load(&scene_path, &Device::Cpu)
                .with_context(|| format!("reading {}", scene_path.display()))?,
        )
    } else {
        println!("{} not found: random scenes, no PyTorch ratios (run scripts/bench_splat_torch.py first)", scene_path.display());
        None
    };
    let json_path = dir.join("splat_torch.json");
    let torch: Option<serde_json::Value> = match std::fs::read_to_string(&json_path) {
        Ok(s) if scenes.is_some() => Some(
            serde_json::from_str(&s).with_context(|| format!("parsing {}", json_path.display()))?,
        ),
        _ => None,
    };
    if let Some(doc) = &torch {
        println!("PyTorch peer: {} (threads {})", doc["versions"], doc["threads"]);
    }
    println!(
        "rayon threads: {}; {}",
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| format!("load average {}", s.trim()))
            .unwrap_or_default()
    );
    let mut rows = Vec::new();
    let mut too_slow: Vec<(usize, usize)> = Vec::new(); // (size, count) over the limit
    for &n in &counts {
        let splats = match &scenes {
            Some(map) => {
                let get = |k: &str| -> Result<Tensor> {
                    let key = format!("n{n}/{k}");
                    map.get(&key)
                        .cloned()
                        .with_context(|| format!("{}: no tensor `{key}`", scene_path.display()))
                };
                Splats {
                    means: get("means")?,
                    log_scales: get("log_scales")?,
                    quats: get("quats")?,
                    opacity_logits: get("opacity_logits")?,
                    sh: get("sh")?,
                }
            }
            None => {
                let cfg = RandomSplatsConfig { count: n, ..Default::default() };
                Splats::random(&cfg, &mut SeededRng::new(n as u64), DType::F32, &Device::Cpu)?
            }
        };
        splats.validate()?;
        for &size in &sizes {
            if too_slow.iter().any(|&(s, c)| size >= s && n >= c) {
                rows.push(Row { n, size, fwd: None, fwd_bwd: None });
                continue;
            }
            let cam = camera(size)?;
            let cfg = RenderConfig::default();
            let vars = SplatVars::new(&splats)?;
            let w = SeededRng::new((n + size) as u64).rand_uniform(
                (size, size, 3),
                0.0,
                1.0,
                DType::F32,
                &Device::Cpu,
            )?;
            let mut alpha_mean = 0.0;
            let mut fwd_bwd = || -> Result<()> {
                let out = render(&vars.splats(), &cam, &cfg)?;
                let grads = (out.rgb * &w)?.sum_all()?.backward()?;
                anyhow::ensure!(
                    grads.get(vars.means.as_tensor()).is_some(),
                    "no gradient for the means"
                );
                Ok(())
            };
            let c0 = cpu_time_s();
            let t0 = Instant::now();
            fwd_bwd()?; // warm-up, and the limit check
            let first = (t0.elapsed().as_secs_f64(), cpu_time_s() - c0);
            let (fwd, fb) = if first.1 > limit {
                too_slow.push((size, n));
                let c0 = cpu_time_s();
                let t0 = Instant::now();
                render(&splats, &cam, &cfg)?;
                ((t0.elapsed().as_secs_f64(), cpu_time_s() - c0), first)
            } else {
                let fb = time_runs(reps, &mut fwd_bwd)?;
                let fwd = time_runs(reps, || {
                    let out = render(&splats, &cam, &cfg)?;
                    alpha_mean = out.alpha.mean_all()?.to_scalar::<f32>()? as f64;
                    Ok(())
                })?;
                (fwd, fb)
            };
            println!(
                "n={n:6} {size:3}²: fwd {:9.2} ms (CPU {:.2})  fwd+bwd {:9.2} ms (CPU {:.2})  (mean alpha {alpha_mean:.3})",
                fwd.0 * 1e3,
                fwd.1 * 1e3,
                fb.0 * 1e3,
                fb.1 * 1e3
            );
            rows.push(Row { n, size, fwd: Some(fwd), fwd_bwd: Some(fb) });
        }
    }
    let json_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "count": r.n, "size": r.size,
                "fwd_s": r.fwd.map(|x| x.0), "fwd_cpu_s": r.fwd.map(|x| x.1),
                "fwd_bwd_s": r.fwd_bwd.map(|x| x.0), "fwd_bwd_cpu_s": r.fwd_bwd.map(|x| x.1),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "generator": "bench/benches/splat.rs",
        "rayon_threads": rayon::current_num_threads(),
        "loadavg": std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).ok(),
        "results": json_rows,
    });
    let ours_path = dir.join("splat_ours.json");
    std::fs::create_dir_all(&dir)?;
    gen_core::write_atomic(&ours_path, serde_json::to_string_pretty(&doc)?.as_bytes())
        .with_context(|| format!("writing {}", ours_path.display()))?;
    println!("wrote {}", ours_path.display());
    println!();
    println!("Wall time (ms) and torch/ours ratios; CPU-time ratios (process CPU, less disturbed by load) in the last two columns.");
    println!("| Gaussians | image | ours fwd | ours fwd+bwd | torch fwd | torch fwd+bwd | wall ratio fwd | wall ratio fwd+bwd | CPU ratio fwd | CPU ratio fwd+bwd | torch stages (fwd+bwd run) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let ms = |v: Option<f64>| v.map(|x| format!("{:.1}", x * 1e3)).unwrap_or_else(|| "—".into());
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.1}×", a / b),
        _ => "—".into(),
    };
    for r in rows {
        let t = torch_row(&torch, r.n, r.size);
        let t = t.unwrap_or(TorchRow {
            fwd: None,
            fwd_bwd: None,
            fwd_cpu: None,
            fwd_bwd_cpu: None,
            note: "not run".into(),
        });
        let wall = |v: Option<(f64, f64)>| v.map(|x| x.0);
        let cpu = |v: Option<(f64, f64)>| v.map(|x| x.1);
        println!(
            "| {} | {}² | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.n,
            r.size,
            ms(wall(r.fwd)),
            ms(wall(r.fwd_bwd)),
            ms(t.fwd),
            ms(t.fwd_bwd),
            ratio(t.fwd, wall(r.fwd)),
            ratio(t.fwd_bwd, wall(r.fwd_bwd)),
            ratio(t.fwd_cpu, cpu(r.fwd)),
            ratio(t.fwd_bwd_cpu, cpu(r.fwd_bwd)),
            t.note
        );
    }
    Ok(())
}
