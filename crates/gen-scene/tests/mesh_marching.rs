//! Marching cubes on analytic fields (sphere, torus, two spheres) checked against geometry:
//! vertices on the true surface, closed oriented 2-manifold, Euler characteristic, outward
//! normals, area; splat density against the formula evaluated here; meshing a Gaussian.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use gen_scene::export::SplatArrays;
use gen_scene::mesh::{
    extract_mesh, marching_cubes, DensityField, Grid, MeshConfig, SplatDensity, SplatDensityConfig,
    TriMesh,
};
use gen_scene::Splats;

struct Sphere {
    c: [f64; 3],
    r: f64,
}

impl DensityField for Sphere {
    fn density(&self, p: [f64; 3]) -> f64 {
        let d =
            ((p[0] - self.c[0]).powi(2) + (p[1] - self.c[1]).powi(2) + (p[2] - self.c[2]).powi(2))
                .sqrt();
        self.r - d
    }
}

struct Torus {
    big: f64,
    small: f64,
}

impl DensityField for Torus {
    fn density(&self, p: [f64; 3]) -> f64 {
        let q = (p[0] * p[0] + p[1] * p[1]).sqrt() - self.big;
        self.small - (q * q + p[2] * p[2]).sqrt()
    }
}

struct Union(Sphere, Sphere);

impl DensityField for Union {
    fn density(&self, p: [f64; 3]) -> f64 {
        self.0.density(p).max(self.1.density(p))
    }
}

/// Checks that `m` is a closed, consistently oriented 2-manifold and returns V - E + F.
fn closed_euler(m: &TriMesh) -> i64 {
    let mut directed: HashMap<(u32, u32), usize> = HashMap::new();
    for t in &m.indices {
        assert!(t[0] != t[1] && t[1] != t[2] && t[0] != t[2], "repeated index in {t:?}");
        for e in 0..3 {
            *directed.entry((t[e], t[(e + 1) % 3])).or_default() += 1;
        }
    }
    for (&(a, b), &n) in &directed {
        assert_eq!(n, 1, "directed edge ({a},{b}) used {n} times (inconsistent orientation)");
        assert_eq!(directed.get(&(b, a)), Some(&1), "edge ({a},{b}) is a boundary edge");
    }
    let e = directed.len() / 2;
    m.positions.len() as i64 - e as i64 + m.indices.len() as i64
}

fn mesh_of(field: &dyn DensityField, grid: Grid) -> TriMesh {
    let values = field.sample_grid(&grid).unwrap();
    marching_cubes(&values, &grid, 0.0).unwrap()
}

#[test]
fn sphere_is_closed_round_and_faces_outward() {
    let (c, r) = ([0.1, -0.05, 0.03], 0.7);
    let grid = Grid::cube(-1.0, 1.0, 33);
    let m = mesh_of(&Sphere { c, r }, grid);
    assert!(m.indices.len() > 500);
    assert_eq!(closed_euler(&m), 2);
    let h = grid.step()[0];
    for (p, n) in m.positions.iter().zip(&m.normals) {
        let d = [p[0] as f64 - c[0], p[1] as f64 - c[1], p[2] as f64 - c[2]];
        let len = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
        // A linear interpolation of the exact distance along an edge is exact to O(h²/r).
        assert!((len - r).abs() < 0.1 * h, "vertex at radius {len}");
        let cos = (d[0] * n[0] as f64 + d[1] * n[1] as f64 + d[2] * n[2] as f64) / len;
        assert!(cos > 0.98, "normal not radial: cos {cos}");
    }
    // Every triangle winds counter-clockwise seen from outside.
    for t in &m.indices {
        let p = |i: u32| m.positions[i as usize].map(|v| v as f64);
        let (a, b, cc) = (p(t[0]), p(t[1]), p(t[2]));
        let u = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
        let v = [cc[0] - a[0], cc[1] - a[1], cc[2] - a[2]];
        let n = [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]];
        let out = [a[0] - c[0], a[1] - c[1], a[2] - c[2]];
        assert!(n[0] * out[0] + n[1] * out[1] + n[2] * out[2] >= 0.0, "inward triangle {t:?}");
    }
    let area = m.area();
    let want = 4.0 * std::f64::consts::PI * r * r;
    assert!((area / want - 1.0).abs() < 0.02, "area {area} vs {want}");
}

#[test]
fn torus_and_two_spheres_have_the_right_topology() {
    let t = mesh_of(&Torus { big: 0.6, small: 0.25 }, Grid::cube(-1.0, 1.0, 41));
    assert_eq!(closed_euler(&t), 0);
    let two = Union(Sphere { c: [-0.5, 0.0, 0.0], r: 0.3 }, Sphere { c: [0.5, 0.0, 0.0], r: 0.3 });
    let m =
        mesh_of(&two, Grid { min: [-1.0, -0.5, -0.5], max: [1.0, 0.5, 0.5], dims: [41, 21, 21] });
    assert_eq!(closed_euler(&m), 4);
    // No surface: empty mesh, not an error.
    let none = mesh_of(&Sphere { c: [5.0, 5.0, 5.0], r: 0.1 }, Grid::cube(-1.0, 1.0, 9));
    assert!(none.indices.is_empty() && none.positions.is_empty());
}

#[test]
fn bad_grids_are_errors() {
    assert!(marching_cubes(&[0.0; 8], &Grid::cube(0.0, 1.0, 2), 0.5).is_ok());
    let e = marching_cubes(&[0.0; 7], &Grid::cube(0.0, 1.0, 2), 0.5).unwrap_err().to_string();
    assert!(e.contains("7 values"), "{e}");
    assert!(marching_cubes(&[0.0; 1], &Grid::cube(0.0, 1.0, 1), 0.5).is_err());
    assert!(marching_cubes(&[0.0; 8], &Grid::cube(1.0, 0.0, 2), 0.5).is_err());
    let cfg = MeshConfig { grid: Grid::cube(-1.0, 1.0, 5), threshold: f64::NAN };
    assert!(extract_mesh(&Sphere { c: [0.0; 3], r: 0.5 }, &cfg).is_err());
}

/// (mean, scales, quaternion (w, x, y, z), opacity).
type Gauss = ([f64; 3], [f64; 3], [f64; 4], f64);

/// Three Gaussians with known parameters; density recomputed here from the definition.
fn three() -> (Splats, Vec<Gauss>) {
    let g: Vec<Gauss> = vec![
        ([0.0, 0.0, 0.0], [0.2, 0.1, 0.05], [0.9, 0.1, -0.3, 0.2], 0.8),
        ([0.15, 0.05, 0.0], [0.08, 0.08, 0.08], [1.0, 0.0, 0.0, 0.0], 0.6),
        ([-0.1, 0.2, 0.1], [0.05, 0.15, 0.1], [0.3, 0.5, 0.1, -0.7], 0.95),
    ];
    let dev = Device::Cpu;
    let f = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &dev).unwrap();
    let splats = Splats {
        means: f(g.iter().flat_map(|x| x.0.map(|v| v as f32)).collect(), &[3, 3]),
        log_scales: f(g.iter().flat_map(|x| x.1.map(|v| (v as f32).ln())).collect(), &[3, 3]),
        quats: f(g.iter().flat_map(|x| x.2.map(|v| v as f32)).collect(), &[3, 4]),
        opacity_logits: f(g.iter().map(|x| (x.3 / (1.0 - x.3)).ln() as f32).collect(), &[3]),
        sh: f(vec![0.5, -0.5, 1.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0], &[3, 1, 3]),
    };
    (splats, g)
}

/// Rotation matrix of the (w, x, y, z) quaternion `q` (normalised here).
fn rotation(q: &[f64; 4]) -> [[f64; 3]; 3] {
    let n = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]).sqrt();
    let (w, x, y, z) = (q[0] / n, q[1] / n, q[2] / n, q[3] / n);
    [
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
        [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
        [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
    ]
}

/// `Σ o exp(-½ xᵀ Σ⁻¹ x)` with `Σ⁻¹ = R S⁻² Rᵀ` built from the (w, x, y, z) quaternion.
fn reference_density(g: &[Gauss], p: [f64; 3]) -> f64 {
    g.iter()
        .map(|(m, s, q, o)| {
            let r = rotation(q);
            let d = [p[0] - m[0], p[1] - m[1], p[2] - m[2]];
            // Local coordinates Rᵀ d, scaled.
            let mut m2 = 0.0;
            for a in 0..3 {
                let l = (r[0][a] * d[0] + r[1][a] * d[1] + r[2][a] * d[2]) / s[a];
                m2 += l * l;
            }
            o * (-0.5 * m2).exp()
        })
        .sum()
}

#[test]
fn splat_density_matches_the_definition() {
    let (splats, g) = three();
    // A cut-off far out so the reference (no cut-off) applies everywhere.
    let cfg = SplatDensityConfig { cutoff_sigmas: 12.0, min_opacity: 0.0, block: 4 };
    let field = SplatDensity::new(&splats, cfg).unwrap();
    let grid = Grid { min: [-0.5, -0.4, -0.3], max: [0.5, 0.6, 0.4], dims: [11, 9, 7] };
    let sampled = field.sample_grid(&grid).unwrap();
    let mut worst = 0f64;
    for k in 0..7 {
        for j in 0..9 {
            for i in 0..11 {
                let p = grid.point(i, j, k);
                let want = reference_density(&g, p);
                worst = worst.max((sampled[grid.index(i, j, k)] as f64 - want).abs());
                worst = worst.max((field.density(p) - want).abs());
            }
        }
    }
    assert!(worst < 1e-5, "max density error {worst}");
    // With the 3σ cut-off, the error is bounded by Σ o·exp(-4.5).
    let cut =
        SplatDensity::new(&splats, SplatDensityConfig { block: 3, ..Default::default() }).unwrap();
    let s3 = cut.sample_grid(&grid).unwrap();
    let bound = 2.35 * (-4.5f64).exp();
    for (a, b) in s3.iter().zip(&sampled) {
        assert!((*a as f64 - *b as f64).abs() <= bound + 1e-6);
    }
}

#[test]
fn meshing_one_gaussian_gives_its_iso_sphere_in_its_colour() {
    let dev = Device::Cpu;
    let (sigma, opacity, thr) = (0.2f64, 0.9f64, 0.3f64);
    let arrays = SplatArrays {
        means: vec![[0.05, 0.0, -0.05]],
        log_scales: vec![[sigma.ln() as f32; 3]],
        quats: vec![[1.0, 0.0, 0.0, 0.0]],
        opacity_logits: vec![(opacity / (1.0 - opacity)).ln() as f32],
        sh: vec![1.0, -1.0, 0.0],
        sh_degree: 0,
    };
    let splats = arrays.to_splats(&dev).unwrap();
    let field = SplatDensity::new(&splats, SplatDensityConfig::default()).unwrap();
    let grid = Grid::cube(-0.7, 0.7, 36);
    let m = extract_mesh(&field, &MeshConfig { grid, threshold: thr }).unwrap();
    assert_eq!(closed_euler(&m), 2);
    // o exp(-r²/2σ²) = thr  ⇒  r = σ sqrt(2 ln(o/thr)).
    let r = sigma * (2.0 * (opacity / thr).ln()).sqrt();
    let h = grid.step()[0];
    for p in &m.positions {
        let d =
            ((p[0] as f64 - 0.05).powi(2) + (p[1] as f64).powi(2) + (p[2] as f64 + 0.05).powi(2))
                .sqrt();
        assert!((d - r).abs() < 0.25 * h, "vertex at {d}, iso radius {r}");
    }
    let want = [0.5 + 0.282_094_8f32, 0.5 - 0.282_094_8, 0.5];
    for c in &m.colors {
        for ch in 0..3 {
            assert!((c[ch] - want[ch]).abs() < 1e-5, "{c:?}");
        }
    }
    m.validate().unwrap();
}

#[test]
fn grid_around_the_splats_holds_the_whole_object() {
    let (splats, g) = three();
    let field = SplatDensity::new(&splats, SplatDensityConfig::default()).unwrap();
    let (lo, hi) = field.bounds().unwrap();
    // Exact 3σ box: half extent along axis a is 3 sqrt(Σ_aa), Σ_aa = Σ_j R_aj² s_j².
    let (mut want_lo, mut want_hi) = ([f64::MAX; 3], [f64::MIN; 3]);
    for (m, s, q, _) in &g {
        let r = rotation(q);
        for a in 0..3 {
            let var: f64 = (0..3).map(|j| (r[a][j] * s[j]).powi(2)).sum();
            want_lo[a] = want_lo[a].min(m[a] - 3.0 * var.sqrt());
            want_hi[a] = want_hi[a].max(m[a] + 3.0 * var.sqrt());
        }
    }
    for a in 0..3 {
        assert!((lo[a] - want_lo[a]).abs() < 1e-5, "{lo:?} vs {want_lo:?}");
        assert!((hi[a] - want_hi[a]).abs() < 1e-5, "{hi:?} vs {want_hi:?}");
    }
    let grid = Grid::around(lo, hi, 40, 0.05).unwrap();
    let step = grid.step();
    for a in 0..3 {
        assert!((step[a] - step[0]).abs() < 1e-12, "cells are not cubic: {step:?}");
        assert!(grid.min[a] < lo[a] && grid.max[a] > hi[a]);
    }
    assert_eq!(grid.dims.iter().max(), Some(&40));
    // Density is (nearly) zero on the border, so the mesh is closed.
    let m = extract_mesh(&field, &MeshConfig { grid, threshold: 0.3 }).unwrap();
    assert!(!m.indices.is_empty());
    assert_eq!(closed_euler(&m) % 2, 0);
    assert!(Grid::around(lo, lo, 10, 0.1).is_err());
}
