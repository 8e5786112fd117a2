//! Seeded mutation tests of what the splat tools read: `.ply` import, `transforms.json` and
//! fit checkpoints. Every mutated file must give a clean error or a valid result — no panic,
//! no abort.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use gen_core::fuzz::run_cases;
use gen_core::SeededRng;
use gen_scene::export::ply::{read_ply, write_ply};
use gen_scene::fit::dataset::load_transforms;
use gen_scene::fit::{FitConfig, InitConfig, InitRegion, PosedImage, Trainer};
use gen_scene::splat::{render, RandomSplatsConfig, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

const BG: [f64; 3] = [1.0, 1.0, 1.0];

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-scene-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> gen_core::Error + '_ {
    move |e| gen_core::Error::io(path, e)
}

fn splats(count: usize, sh_degree: usize, seed: u64) -> Result<Splats> {
    Ok(Splats::random(
        &RandomSplatsConfig {
            count,
            sh_degree,
            extent: 0.6,
            log_scale_range: (-1.8, -1.2),
            logit_range: (1.0, 3.0),
            sh_std: 0.8,
        },
        &mut SeededRng::new(seed),
        DType::F32,
        &Device::Cpu,
    )?)
}

#[test]
fn fuzz_ply_import() -> Result<()> {
    let d = tmp("ply");
    let f = d.join("splats.ply");
    write_ply(&splats(6, 1, 3)?, &f)?;
    let base = std::fs::read(&f)?;
    let (ok, err) = run_cases("ply", &base, 300, |b| -> gen_core::Result<()> {
        std::fs::write(&f, b).map_err(io(&f))?;
        read_ply(&f, &Device::Cpu)?.validate()
    });
    assert!(err > 50 && ok > 0, "{ok} valid, {err} errors");
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

/// A header declaring a huge vertex count (or a huge list count) is an error before any
/// allocation of that size.
#[test]
fn ply_huge_declared_counts_are_errors() -> Result<()> {
    let d = tmp("ply-huge");
    let f = d.join("splats.ply");
    write_ply(&splats(3, 0, 3)?, &f)?;
    let base = std::fs::read(&f)?;
    let text = String::from_utf8_lossy(&base).into_owned();
    let line = text.lines().find(|l| l.starts_with("element vertex")).unwrap().to_string();
    for n in ["4294967296", "18446744073709551615", "1000000000000", "-3"] {
        let mut b = base.clone();
        let at = b.windows(line.len()).position(|w| w == line.as_bytes()).unwrap();
        b.splice(at..at + line.len(), format!("element vertex {n}").into_bytes());
        std::fs::write(&f, &b)?;
        assert!(read_ply(&f, &Device::Cpu).is_err(), "vertex count {n} accepted");
    }
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

#[test]
fn fuzz_transforms_json() -> Result<()> {
    let d = tmp("transforms");
    for i in 0..2 {
        let img = image::RgbaImage::from_fn(6, 4, |x, y| {
            image::Rgba([40 * x as u8, 50 * y as u8, 90, 255])
        });
        img.save(d.join(format!("r_{i}.png")))?;
    }
    let json = r#"{"camera_angle_x": 0.69, "frames": [
        {"file_path": "./r_0", "transform_matrix": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]},
        {"file_path": "r_1.png", "fl_x": 5.5, "cx": 3, "cy": 2, "w": 6, "h": 4,
         "transform_matrix": [[0, 0, 1, 4], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]}]}"#;
    let f = d.join("transforms.json");
    std::fs::write(&f, json)?;
    assert_eq!(load_transforms(&d, BG)?.len(), 2, "the unmutated file loads");
    let (ok, err) =
        run_cases("transforms.json", json.as_bytes(), 300, |b| -> gen_core::Result<()> {
            std::fs::write(&f, b).map_err(io(&f))?;
            load_transforms(&d, BG).map(|_| ())
        });
    assert!(err > 50 && ok > 0, "{ok} valid, {err} errors");
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

/// Three 10×10 views of a random scene.
fn views() -> Result<Vec<PosedImage>> {
    let target = splats(8, 0, 77)?;
    let k = Intrinsics::from_fov_y(0.9, 10, 10)?;
    let mut out = Vec::new();
    for i in 0..3 {
        let a = i as f64 / 3.0 * std::f64::consts::TAU;
        let eye = DVec3::new(3.5 * a.cos(), 3.5 * a.sin(), 1.0);
        let cam = Camera::look_at(k, eye, DVec3::ZERO, DVec3::Z)?;
        let r = render(&target, &cam, &RenderConfig { background: BG })?;
        out.push(PosedImage { camera: cam, rgb: r.rgb, mask: Some(r.alpha) });
    }
    Ok(out)
}

#[test]
fn fuzz_fit_checkpoints() -> Result<()> {
    let v = views()?;
    let cfg = FitConfig {
        steps: 12,
        background: BG,
        init: InitConfig {
            count: 10,
            region: InitRegion::Box { min: [-0.8; 3], max: [0.8; 3] },
            scale: 0.1,
            opacity: 0.1,
        },
        seed: 5,
        ..Default::default()
    };
    let mut t = Trainer::new(cfg.clone(), v.clone())?;
    for _ in 0..3 {
        t.step()?;
    }
    let d = tmp("fit-checkpoint");
    let f = d.join("ckpt.safetensors");
    t.save_checkpoint(&f)?;
    let base = std::fs::read(&f)?;
    let (ok, err) = run_cases("fit checkpoint", &base, 200, |b| -> gen_core::Result<()> {
        std::fs::write(&f, b).map_err(io(&f))?;
        let mut r = Trainer::resume(cfg.clone(), v.clone(), &f)?;
        r.step()?;
        Ok(())
    });
    assert!(err > 50 && ok > 0, "{ok} valid, {err} errors");
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

/// A NaN in an imported `.ply` is an error naming the file, the vertex and the property.
#[test]
fn nan_in_a_ply_is_refused() -> Result<()> {
    let d = tmp("nan-ply");
    let f = d.join("s.ply");
    write_ply(&splats(6, 0, 3)?, &f)?;
    let mut b = std::fs::read(&f)?;
    let end = b.windows(11).position(|w| w == b"end_header\n").unwrap() + 11;
    b[end..end + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&f, &b)?;
    let e = read_ply(&f, &Device::Cpu).expect_err("NaN refused").to_string();
    assert!(
        e.contains(&f.display().to_string()) && e.contains("vertex 0") && e.contains("`x`"),
        "{e}"
    );
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

/// A NaN in a fit checkpoint is refused on resume, naming the file and the tensor.
#[test]
fn nan_in_a_fit_checkpoint_is_refused() -> Result<()> {
    let d = tmp("nan-fit");
    let v = views()?;
    let cfg = FitConfig { steps: 12, background: BG, seed: 5, ..Default::default() };
    let ck = d.join("ck.safetensors");
    Trainer::new(cfg.clone(), v.clone())?.save_checkpoint(&ck)?;
    let mut m = candle_core::safetensors::load(&ck, &Device::Cpu)?;
    let means = m["splat.means"].clone();
    let mut x = means.flatten_all()?.to_vec1::<f32>()?;
    x[0] = f32::NAN;
    m.insert("splat.means".into(), candle_core::Tensor::from_vec(x, means.dims(), &Device::Cpu)?);
    candle_core::safetensors::save(&m, &ck)?;
    let e = Trainer::resume(cfg, v, &ck).err().expect("NaN refused").to_string();
    assert!(e.contains(&ck.display().to_string()) && e.contains("splat.means"), "{e}");
    std::fs::remove_dir_all(&d)?;
    Ok(())
}
