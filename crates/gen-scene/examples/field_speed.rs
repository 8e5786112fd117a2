//! Speed of the CAM neural field + volume renderer on the CPU: forward and forward+backward of
//! a 64×64 image with 64 samples per ray (262 144 field queries), hash grid
//! [`HashGridConfig::small`] (12 levels × 2 features, T = 2^16), MLP 2 × 32, f32.
//! Also times the hash-grid op alone on the same number of points.
//!
//! `cargo run --release -p gen-scene --example field_speed [-- --threads T --reps K]`

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Var};
use candle_nn::VarMap;
use gen_core::SeededRng;
use gen_scene::field::hashgrid::encode;
use gen_scene::field::{render_volume, Aabb, CamField, FieldConfig, HashGridConfig, VolumeConfig};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

/// `(min, median)` in ms: on a shared machine the minimum is the better estimate.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| -> Result<Option<usize>> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                args.get(i + 1).ok_or_else(|| anyhow::anyhow!("{name} needs a number"))?.parse()?,
            )),
            None => Ok(None),
        }
    };
    if let Some(n) = arg("--threads")? {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    let reps = arg("--reps")?.unwrap_or(5);
    println!("threads: {}", rayon::current_num_threads());

    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = FieldConfig::small();
    let field = CamField::new(cfg, &vm, "field", &mut SeededRng::new(0), DType::F32, &dev)?;
    // A non-trivial table so that the density is not uniform.
    field.table().set(&SeededRng::new(1).rand_uniform(
        cfg.grid.table_shape(),
        -1.0,
        1.0,
        DType::F32,
        &dev,
    )?)?;
    let k = Intrinsics::from_fov_y(0.8, 64, 64)?;
    let cam = Camera::look_at(k, DVec3::new(0.3, 0.5, -2.6), DVec3::ZERO, DVec3::Y)?;
    let vcfg = VolumeConfig::new(64, Aabb::cube(1.0));

    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    let mut samples = 0;
    for _ in 0..reps {
        let t = Instant::now();
        let out = render_volume(&field, &cam, &vcfg, None, None)?;
        fwd.push(t.elapsed().as_secs_f64() * 1e3);
        samples = out.samples_evaluated;
        let t = Instant::now();
        let out = render_volume(&field, &cam, &vcfg, None, None)?;
        let loss = (out.rgb.sqr()?.mean_all()? + out.opacity.mean_all()?)?;
        let _grads = loss.backward()?;
        both.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (f0, f1) = stats(fwd);
    let (b0, b1) = stats(both);
    println!("render 64x64 x 64 samples ({samples} field queries): fwd {f0:.1}/{f1:.1} ms, fwd+bwd {b0:.1}/{b1:.1} ms (min/median)");

    let n = 64 * 64 * 64;
    let g = HashGridConfig::small();
    let mut rng = SeededRng::new(2);
    let pts = Var::from_tensor(&rng.rand_uniform((n, 3), 0.0, 1.0, DType::F32, &dev)?)?;
    let table = Var::from_tensor(&g.init_table(&mut rng, DType::F32, &dev)?)?;
    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let _ = encode(pts.as_tensor(), table.as_tensor(), &g)?;
        fwd.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let _ = encode(pts.as_tensor(), table.as_tensor(), &g)?.sum_all()?.backward()?;
        both.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The render case: constant points, gradient to the table only.
    let mut table_only = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let _ = encode(&pts.as_tensor().detach(), table.as_tensor(), &g)?.sum_all()?.backward()?;
        table_only.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (t0, t1) = stats(table_only);
    let (f0, f1) = stats(fwd);
    let (b0, b1) = stats(both);
    println!("hash grid fwd+bwd to the table only: {t0:.1}/{t1:.1} ms");
    println!("hash grid alone, {n} points, {} levels: fwd {f0:.1}/{f1:.1} ms, fwd+bwd {b0:.1}/{b1:.1} ms", g.levels);
    Ok(())
}
