//! Writes sample exports for external validation (`scripts/validate_exports.sh`):
//! a coloured ball of Gaussian splats as `.ply` (SH degree 0 and 3) and `.glb`
//! (`KHR_gaussian_splatting`), its marching-cubes mesh as `.glb` and `.obj`, and a turntable
//! GIF + contact sheet.
//!
//! `cargo run -p gen-scene --example export_sample -- OUT_DIR [GRID_RES]`
//! `cargo run -p gen-scene --example export_sample -- --import FILE.ply` prints the splats read
//! from `FILE.ply` as JSON (used to check the importer on files written by `plyfile`).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use gen_core::SeededRng;
use gen_scene::export::glb::{splats_to_glb, SplatGlbConfig};
use gen_scene::export::ply::{read_ply, write_ply};
use gen_scene::export::{SplatArrays, SH_C0};
use gen_scene::mesh::{
    extract_mesh, write_mesh, Grid, MeshConfig, SplatDensity, SplatDensityConfig,
};
use gen_scene::turntable::{write_turntable, TurntableConfig};
use gen_scene::Splats;

/// `n` Gaussians uniformly inside a ball of radius 0.5, coloured by position.
fn ball(n: usize, sh_degree: usize, rng: &mut SeededRng) -> Result<Splats> {
    let k = (sh_degree + 1) * (sh_degree + 1);
    let (mut means, mut sh) = (Vec::new(), Vec::new());
    while means.len() < 3 * n {
        let p = [rng.uniform() - 0.5, rng.uniform() - 0.5, rng.uniform() - 0.5];
        if p.iter().map(|v| v * v).sum::<f32>() > 0.25 {
            continue;
        }
        means.extend_from_slice(&p);
        // DC colour from the position; small random higher-order terms.
        for v in p {
            sh.push(((v + 0.5).clamp(0.0, 1.0) - 0.5) / SH_C0);
        }
        for _ in 1..k {
            for _ in 0..3 {
                sh.push(0.05 * rng.normal());
            }
        }
    }
    let dev = Device::Cpu;
    let log_scales: Vec<f32> = (0..3 * n).map(|_| (0.04 + 0.02 * rng.uniform()).ln()).collect();
    let quats: Vec<f32> = (0..4 * n).map(|_| rng.normal()).collect();
    let logits: Vec<f32> = (0..n).map(|_| 1.5 + rng.uniform()).collect();
    Ok(Splats {
        means: Tensor::from_vec(means, (n, 3), &dev)?,
        log_scales: Tensor::from_vec(log_scales, (n, 3), &dev)?,
        quats: Tensor::from_vec(quats, (n, 4), &dev)?,
        opacity_logits: Tensor::from_vec(logits, n, &dev)?,
        sh: Tensor::from_vec(sh, (n, k, 3), &dev)?.to_dtype(DType::F32)?,
    })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("--import") {
        // Reads a .ply with the library's importer and prints its values as JSON.
        let path = std::env::args().nth(2).context("usage: export_sample --import FILE.ply")?;
        let a = SplatArrays::from_splats(&read_ply(&path, &Device::Cpu)?)?;
        let json = serde_json::json!({
            "means": a.means, "log_scales": a.log_scales, "quats": a.quats,
            "opacity_logits": a.opacity_logits, "sh": a.sh, "sh_degree": a.sh_degree,
        });
        println!("{json}");
        return Ok(());
    }
    let out =
        std::path::PathBuf::from(args.next().context("usage: export_sample OUT_DIR [GRID_RES]")?);
    let res: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(96);
    std::fs::create_dir_all(&out)?;
    let mut rng = SeededRng::new(2024);
    let s0 = ball(3000, 0, &mut rng)?;
    let s3 = ball(500, 3, &mut rng)?;

    write_ply(&s0, out.join("splats_d0.ply"))?;
    write_ply(&s3, out.join("splats_d3.ply"))?;
    splats_to_glb(&s0, out.join("splats_d0.glb"), &SplatGlbConfig::default())?;
    splats_to_glb(&s3, out.join("splats_d3.glb"), &SplatGlbConfig::default())?;

    let t = Instant::now();
    let field = SplatDensity::new(&s0, SplatDensityConfig::default())?;
    let (lo, hi) = field.bounds().context("no Gaussian is opaque enough to mesh")?;
    let grid = Grid::around(lo, hi, res, 0.02)?;
    let values = gen_scene::mesh::DensityField::sample_grid(&field, &grid)?;
    let t_density = t.elapsed();
    let t = Instant::now();
    let mesh = extract_mesh(&field, &MeshConfig { grid, threshold: 1.0 })?;
    let t_mesh = t.elapsed();
    write_mesh(&mesh, out.join("mesh.glb"))?;
    write_mesh(&mesh, out.join("mesh.obj"))?;
    println!(
        "density on a {:?} grid of {} Gaussians: {:.3} s (max {:.2}); extract_mesh (density + marching cubes + colours): {:.3} s; {} vertices, {} triangles, area {:.3}",
        grid.dims,
        field.len(),
        t_density.as_secs_f64(),
        values.iter().copied().fold(0f32, f32::max),
        t_mesh.as_secs_f64(),
        mesh.positions.len(),
        mesh.indices.len(),
        mesh.area()
    );

    let t = Instant::now();
    let cfg = TurntableConfig { frames: 12, width: 96, height: 96, ..Default::default() };
    write_turntable(&s0, &cfg, out.join("turntable.gif"), out.join("turntable.png"))?;
    println!("turntable: {} frames of 96x96 in {:.3} s", cfg.frames, t.elapsed().as_secs_f64());
    println!("wrote {}", out.display());
    Ok(())
}
