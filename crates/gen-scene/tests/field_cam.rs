//! CAM field: density activations, finite-difference gradients of a full volume render w.r.t.
//! grid and MLP parameters (f64), a short fit to renders of a coloured ball, and meshing.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use gen_core::SeededRng;
use gen_scene::field::cam::{softplus, trunc_exp};
use gen_scene::field::{
    render_volume, Aabb, CamField, DensityActivation, FieldConfig, HashGridConfig, RadianceField,
    VolumeConfig,
};
use gen_scene::mesh::{extract_mesh, DensityField, Grid, MeshConfig};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

fn camera(w: usize, h: usize, eye: [f64; 3]) -> Result<Camera> {
    let k = Intrinsics::from_fov_y(0.9, w, h)?;
    Ok(Camera::look_at(k, DVec3::from(eye), DVec3::ZERO, DVec3::Y)?)
}

#[test]
fn activations_values_and_gradients() -> Result<()> {
    let x = Var::new(&[-30.0f64, -1.0, 0.0, 2.0, 20.0], &Device::Cpu)?;
    let sp = softplus(x.as_tensor())?;
    let te = trunc_exp(x.as_tensor())?;
    let xs = x.as_tensor().to_vec1::<f64>()?;
    for (i, (a, b)) in sp.to_vec1::<f64>()?.iter().zip(te.to_vec1::<f64>()?).enumerate() {
        let v = xs[i];
        assert!((a - (1.0 + v.exp()).ln()).abs() < 1e-12);
        assert!((b - v.exp()).abs() <= 1e-12 * v.exp());
    }
    let gs = sp.sum_all()?.backward()?.get(&x).unwrap().to_vec1::<f64>()?;
    let gt = te.sum_all()?.backward()?.get(&x).unwrap().to_vec1::<f64>()?;
    for i in 0..5 {
        let v = xs[i];
        assert!((gs[i] - 1.0 / (1.0 + (-v).exp())).abs() < 1e-12, "softplus' at {v}");
        assert!(
            (gt[i] - v.min(15.0).exp()).abs() <= 1e-12 * v.exp(),
            "trunc_exp' at {v}: {}",
            gt[i]
        );
    }
    Ok(())
}

fn tiny_field(act: DensityActivation, seed: u64) -> Result<(CamField, VarMap)> {
    let vm = VarMap::new();
    let mut cfg = FieldConfig::tiny();
    cfg.density_activation = act;
    cfg.density_bias = 0.5;
    cfg.bounds = Aabb::cube(0.5);
    let f = CamField::new(cfg, &vm, "field", &mut SeededRng::new(seed), DType::F64, &Device::Cpu)?;
    // Make the grid matter: the default table (±1e-4) gives almost no modulation.
    let t = SeededRng::new(seed + 1).rand_uniform(
        cfg.grid.table_shape(),
        -0.5,
        0.5,
        DType::F64,
        &Device::Cpu,
    )?;
    f.table().set(&t)?;
    Ok((f, vm))
}

#[test]
fn varmap_layout() -> Result<()> {
    let (f, vm) = tiny_field(DensityActivation::Softplus, 1)?;
    let data = vm.data().lock().unwrap();
    let c = f.cfg;
    let h = c.hidden;
    let want: Vec<(String, Vec<usize>)> = vec![
        ("field.grid.table".into(), vec![c.grid.levels * c.grid.table_size(), c.grid.features]),
        ("field.mod.weight".into(), vec![2 * 2 * h, c.grid.out_dim()]),
        ("field.mod.bias".into(), vec![4 * h]),
        ("field.layer0.weight".into(), vec![h, 3]),
        ("field.layer1.weight".into(), vec![h, h]),
        ("field.density.weight".into(), vec![1, h]),
        ("field.color.weight".into(), vec![3, h]),
        ("field.color.bias".into(), vec![3]),
    ];
    for (k, shape) in want {
        assert_eq!(data.get(&k).map(|v| v.dims().to_vec()), Some(shape), "{k}");
    }
    assert_eq!(data.len(), f.vars().len());
    drop(data);
    // A second field under the same prefix is refused.
    let e = CamField::new(f.cfg, &vm, "field", &mut SeededRng::new(2), DType::F64, &Device::Cpu)
        .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    Ok(())
}

#[test]
fn render_gradients_match_finite_differences() -> Result<()> {
    for act in [DensityActivation::Softplus, DensityActivation::TruncExp] {
        let (field, _vm) = tiny_field(act, 3)?;
        let cam = camera(6, 5, [0.6, 0.5, -1.4])?;
        let mut cfg = VolumeConfig::new(10, Aabb::cube(0.5));
        cfg.background = [0.2, 0.4, 0.6];
        let mut rng = SeededRng::new(9);
        let w_rgb = rng.randn((5, 6, 3), DType::F64, &Device::Cpu)?;
        let w_op = rng.randn((5, 6), DType::F64, &Device::Cpu)?;
        let w_d = rng.randn((5, 6), DType::F64, &Device::Cpu)?;
        let loss = |f: &CamField| -> Result<Tensor> {
            let out = render_volume(f, &cam, &cfg, None, Some(&mut SeededRng::new(4)))?;
            let l = ((out.rgb * &w_rgb)?.sum_all()? + (out.opacity * &w_op)?.sum_all()?)?;
            Ok((l + (out.depth * &w_d)?.sum_all()?)?)
        };
        let grads = loss(&field)?.backward()?;
        let vars = field.vars();
        let names = [
            "table",
            "mod.weight",
            "mod.bias",
            "layer0.weight",
            "layer0.bias",
            "layer1.weight",
            "layer1.bias",
            "density.weight",
            "density.bias",
            "color.weight",
            "color.bias",
        ];
        let eps = 1e-6;
        let mut worst = 0f64;
        for (var, name) in vars.iter().zip(names) {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()?
                .to_vec1::<f64>()?;
            let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
            // The three largest-gradient entries of every parameter.
            let mut order: Vec<usize> = (0..g.len()).collect();
            order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            assert!(g[order[0]].abs() > 1e-6, "{name}: gradient is zero");
            for &i in order.iter().take(3) {
                let at = |d: f64| -> Result<f64> {
                    let mut v = base.clone();
                    v[i] += d;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
                    Ok(loss(&field)?.to_scalar::<f64>()?)
                };
                let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
                let err = (fd - g[i]).abs() / (1e-3 + fd.abs().max(g[i].abs()));
                worst = worst.max(err);
                assert!(err < 1e-5, "{act:?} {name}[{i}]: analytic {} vs FD {fd}", g[i]);
            }
        }
        println!("{act:?}: worst FD relative error over 33 parameter entries {worst:.2e}");
    }
    Ok(())
}

/// Target: a coloured ball of radius 0.3 (σ = 15 inside, 0 outside).
struct Ball;

impl RadianceField for Ball {
    fn query(&self, points: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let p = points.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mut s = Vec::with_capacity(p.len());
        let mut c = Vec::with_capacity(3 * p.len());
        for q in &p {
            let r2 = q.iter().map(|v| v * v).sum::<f64>();
            s.push(if r2 < 0.09 { 15.0f32 } else { 0.0 });
            c.extend([(0.5 + q[0]) as f32, (0.5 + q[1]) as f32, 0.8]);
        }
        let n = s.len();
        Ok((Tensor::from_vec(s, n, &Device::Cpu)?, Tensor::from_vec(c, (n, 3), &Device::Cpu)?))
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

#[test]
fn fitting_renders_of_a_ball_reduces_the_loss() -> Result<()> {
    let bounds = Aabb::cube(0.5);
    let cams: Vec<Camera> = [[0.0, 0.3, -1.6], [1.5, 0.2, 0.4], [-0.8, -0.9, 1.1]]
        .iter()
        .map(|e| camera(14, 14, *e))
        .collect::<Result<_>>()?;
    let cfg = VolumeConfig::new(20, bounds);
    let targets: Vec<(Tensor, Tensor)> = cams
        .iter()
        .map(|c| {
            let o = render_volume(&Ball, c, &cfg, None, None)?;
            Ok((o.rgb, o.opacity))
        })
        .collect::<Result<_>>()?;
    let vm = VarMap::new();
    let fcfg = FieldConfig {
        grid: HashGridConfig {
            levels: 6,
            features: 2,
            log2_table_size: 12,
            base_resolution: 4,
            max_resolution: 48,
        },
        hidden: 16,
        bounds,
        ..FieldConfig::small()
    };
    let field =
        CamField::new(fcfg, &vm, "field", &mut SeededRng::new(7), DType::F32, &Device::Cpu)?;
    let mut opt = AdamW::new(
        field.vars(),
        ParamsAdamW { lr: 0.03, weight_decay: 0.0, ..Default::default() },
    )?;
    let mut losses = Vec::new();
    let mut jitter = SeededRng::new(11);
    let t0 = std::time::Instant::now();
    for _ in 0..40 {
        let mut total: Option<Tensor> = None;
        for (cam, (rgb, op)) in cams.iter().zip(&targets) {
            let out = render_volume(&field, cam, &cfg, None, Some(&mut jitter))?;
            let l =
                ((out.rgb - rgb)?.sqr()?.mean_all()? + (out.opacity - op)?.sqr()?.mean_all()?)?;
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
        }
        let total = total.unwrap();
        losses.push(total.to_scalar::<f32>()?);
        opt.backward_step(&total)?;
    }
    let first = losses[0];
    let last = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    println!("fit: loss {first:.4} -> {last:.4} in 40 steps ({:.2} s)", t0.elapsed().as_secs_f64());
    assert!(last < 0.25 * first, "loss {first} -> {last}: {losses:?}");

    // The fitted field meshes through DensityField; sample_grid agrees with density().
    let grid = Grid::cube(-0.5, 0.5, 17);
    let vals = field.sample_grid(&grid)?;
    for (i, j, k) in [(0, 0, 0), (8, 8, 8), (3, 12, 5), (16, 2, 9)] {
        let d = field.density(grid.point(i, j, k));
        assert!(
            (vals[grid.index(i, j, k)] as f64 - d).abs() < 1e-4 * (1.0 + d.abs()),
            "({i},{j},{k})"
        );
    }
    let centre = vals[grid.index(8, 8, 8)];
    let corner = vals[grid.index(0, 0, 0)];
    assert!(centre > 5.0 * corner.max(0.1), "centre density {centre} vs corner {corner}");
    let mesh = extract_mesh(&field, &MeshConfig { grid, threshold: (centre as f64) * 0.3 })?;
    assert!(!mesh.indices.is_empty());
    mesh.validate()?;
    let mean_r = mesh
        .positions
        .iter()
        .map(|p| p.iter().map(|v| (v * v) as f64).sum::<f64>().sqrt())
        .sum::<f64>()
        / mesh.positions.len() as f64;
    println!(
        "mesh: {} triangles, mean vertex radius {mean_r:.3} (ball radius 0.3)",
        mesh.indices.len()
    );
    assert!(mean_r > 0.15 && mean_r < 0.45, "mean vertex radius {mean_r}");
    Ok(())
}

#[test]
fn density_gradient_matches_finite_differences() -> Result<()> {
    let (field, _vm) = tiny_field(DensityActivation::Softplus, 5)?;
    let mut rng = SeededRng::new(8);
    let pts = rng.rand_uniform((6, 3), -0.45, 0.45, DType::F64, &Device::Cpu)?;
    let (sigma, grad) = field.density_gradient(&pts)?;
    let (s2, _) = field.forward(&pts)?;
    assert_eq!(sigma.to_vec1::<f64>()?, s2.to_vec1::<f64>()?);
    let g = grad.to_vec2::<f64>()?;
    let p = pts.to_vec2::<f64>()?;
    let eps = 1e-6;
    let mut worst = 0f64;
    for i in 0..6 {
        for a in 0..3 {
            let at = |d: f64| -> Result<f64> {
                let mut q = p[i].clone();
                q[a] += d;
                Ok(field.density([q[0], q[1], q[2]]))
            };
            let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
            let err = (fd - g[i][a]).abs() / (1e-3 + fd.abs());
            worst = worst.max(err);
            assert!(err < 1e-5, "point {i} axis {a}: analytic {} vs FD {fd}", g[i][a]);
        }
    }
    assert!(g.iter().flatten().any(|v| v.abs() > 1e-3), "gradient is trivially zero");
    println!("density gradient: worst FD relative error {worst:.2e}");
    Ok(())
}
