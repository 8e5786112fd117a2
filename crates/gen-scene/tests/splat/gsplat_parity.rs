//! Parity with gsplat 1.5.3's pure-PyTorch implementation (projection, SH colour) and with the
//! 3DGS compositing rules in PyTorch: values and autodiff gradients, float64. Fixtures from
//! `scripts/fixtures_splat.py`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use gen_scene::splat::{render, sh_colors, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::{DMat3, DVec3};

const FIXTURE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/splat_gsplat.safetensors");

struct Fx(HashMap<String, Tensor>);

impl Fx {
    fn load() -> Result<Self> {
        Ok(Self(
            candle_core::safetensors::load(FIXTURE, &Device::Cpu)
                .with_context(|| format!("loading {FIXTURE}"))?,
        ))
    }
    fn get(&self, k: &str) -> Result<Tensor> {
        self.0.get(k).cloned().with_context(|| format!("{FIXTURE}: missing tensor `{k}`"))
    }
    fn camera(&self, case: &str) -> Result<Camera> {
        let k = self.get(&format!("{case}/camera/K"))?.to_vec1::<f64>()?;
        let size = self.get(&format!("{case}/camera/size"))?.to_vec1::<f64>()?;
        let r = self.get(&format!("{case}/camera/R"))?.to_vec2::<f64>()?;
        let t = self.get(&format!("{case}/camera/T"))?.to_vec1::<f64>()?;
        let intr = Intrinsics {
            fx: k[0],
            fy: k[1],
            cx: k[2],
            cy: k[3],
            width: size[0] as usize,
            height: size[1] as usize,
        };
        let rot = DMat3::from_cols_array_2d(&[
            [r[0][0], r[1][0], r[2][0]],
            [r[0][1], r[1][1], r[2][1]],
            [r[0][2], r[1][2], r[2][2]],
        ]);
        Ok(Camera::new(intr, rot, DVec3::new(t[0], t[1], t[2]))?)
    }
    fn vars(&self, case: &str) -> Result<[Var; 5]> {
        let g = |n: &str| -> Result<Var> {
            Ok(Var::from_tensor(&self.get(&format!("{case}/in/{n}"))?)?)
        };
        Ok([g("means")?, g("log_scales")?, g("quats")?, g("logits")?, g("sh")?])
    }
}

const NAMES: [&str; 5] = ["means", "log_scales", "quats", "logits", "sh"];

fn splats(v: &[Var; 5]) -> Splats {
    Splats {
        means: v[0].as_tensor().clone(),
        log_scales: v[1].as_tensor().clone(),
        quats: v[2].as_tensor().clone(),
        opacity_logits: v[3].as_tensor().clone(),
        sh: v[4].as_tensor().clone(),
    }
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// max |a - b| / (1 + max |b|)
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(max_abs(&(a - b)?)? / (1.0 + max_abs(b)?))
}

#[test]
fn projection_matches_gsplat() -> Result<()> {
    let fx = Fx::load()?;
    let cam = fx.camera("proj")?;
    let v = fx.vars("proj")?;
    let out = render(&splats(&v), &cam, &RenderConfig::default())?;
    let p = &out.projection;
    let valid = fx.get("proj/out/valid")?;
    let ours_valid = p.narrow(1, 6, 1)?.squeeze(1)?.gt(0.0)?.to_dtype(DType::F64)?;
    assert_eq!(
        ours_valid.to_vec1::<f64>()?,
        valid.to_vec1::<f64>()?,
        "culling differs from gsplat"
    );
    // The script puts splats 0 and 1 beyond the frustum clamp margin (visible, Jacobian clamped),
    // splat 2 behind the camera and splat 3 far off screen.
    assert_eq!(valid.narrow(0, 0, 4)?.to_vec1::<f64>()?, vec![1.0, 1.0, 0.0, 0.0]);
    let m = valid.unsqueeze(1)?;
    let means2d = p.narrow(1, 0, 2)?.broadcast_mul(&m)?;
    let conics = p.narrow(1, 2, 3)?.broadcast_mul(&m)?;
    let depths = (p.narrow(1, 5, 1)?.squeeze(1)? * &valid)?;
    let want = |k: &str| -> Result<Tensor> {
        Ok(fx.get(&format!("proj/out/{k}"))?.broadcast_mul(&if k == "depths" {
            valid.clone()
        } else {
            m.clone()
        })?)
    };
    for (name, ours, theirs) in [
        ("means2d", &means2d, want("means2d")?),
        ("conics", &conics, want("conics")?),
        ("depths", &depths, want("depths")?),
    ] {
        let e = rel_err(ours, &theirs)?;
        println!("projection {name}: rel err {e:.2e}");
        assert!(e < 1e-12, "{name}: {e}");
    }
    let w = |k: &str| fx.get(&format!("proj/w/{k}"));
    let loss = ((means2d * w("means2d")?)?.sum_all()? + (conics * w("conics")?)?.sum_all()?)?;
    let loss = (loss + (depths * w("depths")?)?.sum_all()?)?;
    let g = loss.backward()?;
    for (i, name) in NAMES.iter().enumerate().take(3) {
        let ours = g.get(&v[i]).with_context(|| format!("no gradient for {name}"))?;
        let theirs = fx.get(&format!("proj/grad/{name}"))?;
        let e = rel_err(ours, &theirs)?;
        println!("projection grad {name}: rel err {e:.2e} (max {:.2e})", max_abs(&theirs)?);
        assert!(e < 1e-10, "grad {name}: {e}");
    }
    Ok(())
}

#[test]
fn sh_colours_match_gsplat() -> Result<()> {
    let fx = Fx::load()?;
    let cam = fx.camera("sh")?;
    let v = fx.vars("sh")?;
    let c = sh_colors(v[0].as_tensor(), v[4].as_tensor(), &cam)?;
    let e = rel_err(&c, &fx.get("sh/out/colors")?)?;
    println!("sh colours: rel err {e:.2e}");
    assert!(e < 1e-13);
    let g = (c * fx.get("sh/w/colors")?)?.sum_all()?.backward()?;
    for (i, name) in [(0usize, "means"), (4, "sh")] {
        let theirs = fx.get(&format!("sh/grad/{name}"))?;
        let e = rel_err(g.get(&v[i]).context("no gradient")?, &theirs)?;
        println!("sh grad {name}: rel err {e:.2e} (max {:.2e})", max_abs(&theirs)?);
        assert!(e < 1e-12);
    }
    Ok(())
}

#[test]
fn render_matches_pytorch_reference() -> Result<()> {
    let fx = Fx::load()?;
    let cam = fx.camera("render")?;
    let v = fx.vars("render")?;
    let bg = fx.get("render/background")?.to_vec1::<f64>()?;
    let out = render(&splats(&v), &cam, &RenderConfig { background: [bg[0], bg[1], bg[2]] })?;
    assert!(out.radii()?.to_vec1::<f64>()?.iter().all(|&r| r > 0.0));
    let mut loss = Tensor::zeros((), DType::F64, &Device::Cpu)?;
    for (name, ours) in [("rgb", &out.rgb), ("alpha", &out.alpha), ("depth", &out.depth)] {
        let e = rel_err(ours, &fx.get(&format!("render/out/{name}"))?)?;
        println!("render {name}: rel err {e:.2e}");
        assert!(e < 1e-12, "{name}: {e}");
        loss = (loss + (ours * fx.get(&format!("render/w/{name}"))?)?.sum_all()?)?;
    }
    let g = loss.backward()?;
    for (i, name) in NAMES.iter().enumerate() {
        let theirs = fx.get(&format!("render/grad/{name}"))?;
        let e = rel_err(g.get(&v[i]).with_context(|| format!("no gradient for {name}"))?, &theirs)?;
        println!("render grad {name}: rel err {e:.2e} (max {:.2e})", max_abs(&theirs)?);
        assert!(max_abs(&theirs)? > 1e-3 && e < 1e-10, "grad {name}: {e}");
    }
    Ok(())
}
