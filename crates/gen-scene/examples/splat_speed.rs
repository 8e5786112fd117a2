//! Speed of the CPU splat rasterizer: forward and forward+backward for random scenes.
//!
//! `cargo run --release -p gen-scene --example splat_speed [-- --threads T --n N --res R --reps K]`

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Var};
use gen_core::SeededRng;
use gen_scene::splat::{render, RandomSplatsConfig, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

/// `(min, median)` of the timings: on a shared machine the minimum is the better estimate.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[v.len() / 2])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n: usize =
            args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--threads needs a number"))?.parse()?;
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:>7} {:>5} {:>22} {:>22} {:>8}",
        "N", "res", "fwd ms (min/median)", "fwd+bwd ms (min/med)", "visible"
    );
    let arg = |name: &str| -> Result<Option<usize>> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                args.get(i + 1).ok_or_else(|| anyhow::anyhow!("{name} needs a number"))?.parse()?,
            )),
            None => Ok(None),
        }
    };
    let counts = arg("--n")?.map(|n| vec![n]).unwrap_or(vec![1_000, 10_000]);
    let sizes = arg("--res")?.map(|r| vec![r]).unwrap_or(vec![64, 256]);
    let reps_arg = arg("--reps")?;
    for &n in &counts {
        for &res in &sizes {
            let cfg = RandomSplatsConfig {
                count: n,
                sh_degree: 3,
                extent: 1.0,
                log_scale_range: (-4.0, -2.5),
                logit_range: (-1.0, 2.0),
                sh_std: 0.3,
            };
            let s = Splats::random(&cfg, &mut SeededRng::new(0), DType::F32, &Device::Cpu)?;
            let k = Intrinsics::from_fov_y(0.8, res, res)?;
            let cam = Camera::look_at(
                k,
                DVec3::new(1.0, -1.5, -3.5),
                DVec3::ZERO,
                DVec3::new(0.0, -1.0, 0.0),
            )?;
            let rc = RenderConfig { background: [1.0; 3] };
            let vars = [
                Var::from_tensor(&s.means)?,
                Var::from_tensor(&s.log_scales)?,
                Var::from_tensor(&s.quats)?,
                Var::from_tensor(&s.opacity_logits)?,
                Var::from_tensor(&s.sh)?,
            ];
            let sp = Splats {
                means: vars[0].as_tensor().clone(),
                log_scales: vars[1].as_tensor().clone(),
                quats: vars[2].as_tensor().clone(),
                opacity_logits: vars[3].as_tensor().clone(),
                sh: vars[4].as_tensor().clone(),
            };
            let reps = reps_arg.unwrap_or(if n * res * res > 100_000_000 { 5 } else { 11 });
            let (mut tf, mut tb) = (Vec::new(), Vec::new());
            let mut visible = 0.0;
            for _ in 0..reps {
                let t0 = Instant::now();
                let out = render(&s, &cam, &rc)?;
                let _ = out.rgb.sum_all()?.to_scalar::<f32>()?;
                tf.push(t0.elapsed().as_secs_f64() * 1e3);
                visible =
                    out.radii()?.gt(0.0)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
                let t0 = Instant::now();
                let out = render(&sp, &cam, &rc)?;
                let loss =
                    ((out.rgb.sqr()?.sum_all()? + out.alpha.sum_all()?)? + out.depth.sum_all()?)?;
                let tb0 = Instant::now();
                let g = loss.backward()?;
                if std::env::var("SPLAT_SPEED_VERBOSE").is_ok() {
                    eprintln!("  backward alone {:.2} ms", tb0.elapsed().as_secs_f64() * 1e3);
                }
                let _ = g.get(&vars[0]).map(|t| t.sum_all().and_then(|s| s.to_scalar::<f32>()));
                tb.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            let ((f0, f1), (b0, b1)) = (stats(tf), stats(tb));
            println!(
                "{n:>7} {:>5} {:>22} {:>22} {:>8}",
                format!("{res}²"),
                format!("{f0:.2} / {f1:.2}"),
                format!("{b0:.2} / {b1:.2}"),
                visible
            );
        }
    }
    Ok(())
}
