//! Speed of the CPU splat rasterizer: forward and forward+backward for random scenes.
//!
//! `cargo run --release -p gen-scene --example splat_speed [-- --threads N]`

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Var};
use gen_core::SeededRng;
use gen_scene::splat::{render, RandomSplatsConfig, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n: usize = args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--threads needs a number"))?.parse()?;
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    println!("threads: {}", rayon::current_num_threads());
    println!("{:>7} {:>5} {:>10} {:>14} {:>12}", "N", "res", "fwd ms", "fwd+bwd ms", "visible");
    for &n in &[1_000usize, 10_000] {
        for &res in &[64usize, 256] {
            let cfg = RandomSplatsConfig { count: n, sh_degree: 3, extent: 1.0, log_scale_range: (-4.0, -2.5), logit_range: (-1.0, 2.0), sh_std: 0.3 };
            let s = Splats::random(&cfg, &mut SeededRng::new(0), DType::F32, &Device::Cpu)?;
            let k = Intrinsics::from_fov_y(0.8, res, res)?;
            let cam = Camera::look_at(k, DVec3::new(1.0, -1.5, -3.5), DVec3::ZERO, DVec3::new(0.0, -1.0, 0.0))?;
            let rc = RenderConfig { background: [1.0; 3] };
            let vars = [Var::from_tensor(&s.means)?, Var::from_tensor(&s.log_scales)?, Var::from_tensor(&s.quats)?, Var::from_tensor(&s.opacity_logits)?, Var::from_tensor(&s.sh)?];
            let sp = Splats {
                means: vars[0].as_tensor().clone(),
                log_scales: vars[1].as_tensor().clone(),
                quats: vars[2].as_tensor().clone(),
                opacity_logits: vars[3].as_tensor().clone(),
                sh: vars[4].as_tensor().clone(),
            };
            let reps = if n * res * res > 100_000_000 { 5 } else { 11 };
            let (mut tf, mut tb) = (Vec::new(), Vec::new());
            let mut visible = 0.0;
            for _ in 0..reps {
                let t0 = Instant::now();
                let out = render(&s, &cam, &rc)?;
                let _ = out.rgb.sum_all()?.to_scalar::<f32>()?;
                tf.push(t0.elapsed().as_secs_f64() * 1e3);
                visible = out.radii()?.gt(0.0)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
                let t0 = Instant::now();
                let out = render(&sp, &cam, &rc)?;
                let loss = ((out.rgb.sqr()?.sum_all()? + out.alpha.sum_all()?)? + out.depth.sum_all()?)?;
                let tb0 = Instant::now();
                let g = loss.backward()?;
                if std::env::var("SPLAT_SPEED_VERBOSE").is_ok() {
                    eprintln!("  backward alone {:.2} ms", tb0.elapsed().as_secs_f64() * 1e3);
                }
                let _ = g.get(&vars[0]).map(|t| t.sum_all().and_then(|s| s.to_scalar::<f32>()));
                tb.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            println!("{n:>7} {:>5} {:>10.2} {:>14.2} {:>12}", format!("{res}²"), median(tf), median(tb), visible);
        }
    }
    Ok(())
}
