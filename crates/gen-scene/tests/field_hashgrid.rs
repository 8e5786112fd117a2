//! Hash-grid encoding: the fused op against a slow reference built from differentiable candle
//! ops (values and gradients), central finite differences in f64, determinism across thread
//! counts, exact interpolation on a dense level, and shape errors.

// Index loops mirror pixel and coordinate indices.
#![allow(clippy::needless_range_loop)]

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_scene::field::hashgrid::{encode, HashGridConfig};

fn cfg() -> HashGridConfig {
    HashGridConfig::tiny()
}

/// Row of corner `(i, j, k)` at level `l`, written independently of the library: dense rows
/// `i + s j + s² k` while `(N+1)³ ≤ T`, else the instant-ngp hash reduced modulo 2^32 then T.
fn ref_row(c: &HashGridConfig, l: usize, i: u64, j: u64, k: u64) -> u64 {
    let n = c.resolution(l) as u64;
    let t = 1u64 << c.log2_table_size;
    let local = if (n + 1).pow(3) <= t {
        i + (n + 1) * j + (n + 1) * (n + 1) * k
    } else {
        let h = (i.wrapping_mul(1) ^ j.wrapping_mul(2_654_435_761) ^ k.wrapping_mul(805_459_861))
            % (1u64 << 32);
        h % t
    };
    l as u64 * t + local
}

/// Slow reference: gathers corner rows with `index_select` and builds trilinear weights from
/// differentiable ops on the points. Points must lie strictly inside `(0, 1)³`.
fn reference(points: &Tensor, table: &Tensor, c: &HashGridConfig) -> Result<Tensor> {
    let pv = points.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let n = pv.len();
    let mut levels = Vec::new();
    for l in 0..c.levels {
        let res = c.resolution(l);
        let cells: Vec<[u64; 3]> = pv
            .iter()
            .map(|p| {
                std::array::from_fn(|a| ((p[a] * res as f64).floor() as u64).min(res as u64 - 1))
            })
            .collect();
        let base = Tensor::from_vec(
            cells.iter().flat_map(|c| c.map(|v| v as f64)).collect::<Vec<_>>(),
            (n, 3),
            points.device(),
        )?
        .to_dtype(points.dtype())?;
        let frac = ((points * res as f64)? - base)?;
        let mut acc: Option<Tensor> = None;
        for corner in 0..8usize {
            let mut w: Option<Tensor> = None;
            for a in 0..3 {
                let fa = frac.narrow(1, a, 1)?;
                let term = if (corner >> a) & 1 == 1 { fa } else { (1.0 - fa)? };
                w = Some(match w {
                    None => term,
                    Some(w) => (w * term)?,
                });
            }
            let rows: Vec<u32> = cells
                .iter()
                .map(|c3| {
                    let b = |a: usize| c3[a] + ((corner >> a) & 1) as u64;
                    ref_row(c, l, b(0), b(1), b(2)) as u32
                })
                .collect();
            let idx = Tensor::from_vec(rows, n, points.device())?;
            let g = table.index_select(&idx, 0)?.broadcast_mul(&w.unwrap())?;
            acc = Some(match acc {
                None => g,
                Some(a) => (a + g)?,
            });
        }
        levels.push(acc.unwrap());
    }
    Ok(Tensor::cat(&levels, 1)?)
}

fn setup(dtype: DType, n: usize, seed: u64) -> Result<(Var, Var, Tensor)> {
    let c = cfg();
    let mut rng = SeededRng::new(seed);
    let dev = Device::Cpu;
    // Larger table values than the usual 1e-4 so that all terms matter.
    let table = Var::from_tensor(&rng.rand_uniform(c.table_shape(), -1.0, 1.0, dtype, &dev)?)?;
    let points = Var::from_tensor(&rng.rand_uniform((n, 3), 0.02, 0.98, dtype, &dev)?)?;
    let weights = rng.randn((n, c.out_dim()), dtype, &dev)?;
    Ok((points, table, weights))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[test]
fn config_has_dense_and_hashed_levels() {
    let c = cfg();
    assert_eq!(c.resolution(0), 2);
    assert_eq!(c.resolution(c.levels - 1), 16);
    assert!(
        c.is_dense(0) && c.is_dense(1),
        "coarse levels must be dense: {:?}",
        (0..4).map(|l| c.resolution(l)).collect::<Vec<_>>()
    );
    assert!(!c.is_dense(c.levels - 1));
    let ngp = HashGridConfig::instant_ngp();
    assert!((ngp.growth() - ((2048f64 / 16.0).ln() / 15.0).exp()).abs() < 1e-12);
    assert_eq!(ngp.resolution(15), 2048);
}

#[test]
fn values_and_gradients_match_reference() -> Result<()> {
    let c = cfg();
    let (points, table, weights) = setup(DType::F64, 200, 1)?;
    let out = encode(points.as_tensor(), table.as_tensor(), &c)?;
    let refo = reference(points.as_tensor(), table.as_tensor(), &c)?;
    assert_eq!(out.dims(), &[200, c.out_dim()]);
    let dv = max_abs_diff(&out, &refo)?;
    assert!(dv < 1e-12, "values differ by {dv:e}");

    let g1 = (out * &weights)?.sum_all()?.backward()?;
    let g2 = (refo * &weights)?.sum_all()?.backward()?;
    let dt = max_abs_diff(g1.get(&table).unwrap(), g2.get(&table).unwrap())?;
    let dp = max_abs_diff(g1.get(&points).unwrap(), g2.get(&points).unwrap())?;
    let scale = g2.get(&points).unwrap().abs()?.max_all()?.to_scalar::<f64>()?;
    println!("reference parity: values {dv:.2e}, table grad {dt:.2e}, point grad {dp:.2e} (scale {scale:.2})");
    assert!(dt < 1e-12, "table gradients differ by {dt:e}");
    assert!(dp < 1e-9 * scale.max(1.0), "point gradients differ by {dp:e}");
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let c = cfg();
    let (points, table, weights) = setup(DType::F64, 40, 2)?;
    let loss = |p: &Tensor, t: &Tensor| -> Result<f64> {
        Ok((encode(p, t, &c)? * &weights)?.sum_all()?.to_scalar::<f64>()?)
    };
    let grads =
        (encode(points.as_tensor(), table.as_tensor(), &c)? * &weights)?.sum_all()?.backward()?;
    let gt = grads.get(&table).unwrap().flatten_all()?.to_vec1::<f64>()?;
    let gp = grads.get(&points).unwrap().flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    let fd = |var: &Var, i: usize| -> Result<f64> {
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let shape = var.shape().clone();
        let run = |d: f64| -> Result<f64> {
            let mut v = base.clone();
            v[i] += d;
            var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu)?)?;
            loss(points.as_tensor(), table.as_tensor())
        };
        let r = (run(eps)? - run(-eps)?) / (2.0 * eps);
        var.set(&Tensor::from_vec(base, shape, &Device::Cpu)?)?;
        Ok(r)
    };
    // Table entries: the 12 with the largest gradient plus 4 untouched ones (gradient 0).
    let mut order: Vec<usize> = (0..gt.len()).collect();
    order.sort_by(|&a, &b| gt[b].abs().total_cmp(&gt[a].abs()));
    let zeros: Vec<usize> = (0..gt.len()).filter(|&i| gt[i] == 0.0).take(4).collect();
    let mut worst_t = 0f64;
    for &i in order.iter().take(12).chain(zeros.iter()) {
        let f = fd(&table, i)?;
        let err = (f - gt[i]).abs() / (1.0 + gt[i].abs());
        worst_t = worst_t.max(err);
        assert!(err < 1e-7, "table[{i}]: analytic {} vs FD {f}", gt[i]);
    }
    let mut worst_p = 0f64;
    for i in 0..30 {
        let f = fd(&points, i)?;
        let err = (f - gp[i]).abs() / (1.0 + gp[i].abs());
        worst_p = worst_p.max(err);
        assert!(err < 1e-6, "point coordinate {i}: analytic {} vs FD {f}", gp[i]);
    }
    println!("FD relative error: table {worst_t:.2e}, points {worst_p:.2e}");
    Ok(())
}

#[test]
fn backward_is_independent_of_thread_count() -> Result<()> {
    let c = cfg();
    let (points, table, weights) = setup(DType::F32, 3000, 3)?;
    let run = |threads: usize| -> Result<(Vec<f32>, Vec<f32>)> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        pool.install(|| {
            let g = (encode(points.as_tensor(), table.as_tensor(), &c)? * &weights)?
                .sum_all()?
                .backward()?;
            Ok((
                g.get(&table).unwrap().flatten_all()?.to_vec1::<f32>()?,
                g.get(&points).unwrap().flatten_all()?.to_vec1::<f32>()?,
            ))
        })
    };
    let (a, b) = (run(1)?, run(3)?);
    assert!(a.0 == b.0 && a.1 == b.1, "gradients depend on the thread count");
    Ok(())
}

#[test]
fn dense_level_interpolates_linear_functions_exactly() -> Result<()> {
    // One dense level at resolution 4: store f(i,j,k) = i + 2j + 3k at every corner; trilinear
    // interpolation must return 4·(x + 2y + 3z) exactly.
    let c = HashGridConfig {
        levels: 1,
        features: 1,
        log2_table_size: 7,
        base_resolution: 4,
        max_resolution: 4,
    };
    assert!(c.is_dense(0));
    let mut t = vec![0f64; c.table_size()];
    for k in 0..5 {
        for j in 0..5 {
            for i in 0..5 {
                t[i + 5 * j + 25 * k] = (i + 2 * j + 3 * k) as f64;
            }
        }
    }
    let table = Tensor::from_vec(t, c.table_shape(), &Device::Cpu)?;
    let pts =
        [[0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.77, 0.5, 0.01], [1.5, -0.2, 0.5]];
    let p = Tensor::from_vec(
        pts.iter().flatten().copied().collect::<Vec<f64>>(),
        (5, 3),
        &Device::Cpu,
    )?;
    let out = encode(&p, &table, &c)?.flatten_all()?.to_vec1::<f64>()?;
    for (q, o) in pts.iter().zip(out) {
        let cl = q.map(|v: f64| v.clamp(0.0, 1.0));
        let want = 4.0 * (cl[0] + 2.0 * cl[1] + 3.0 * cl[2]);
        assert!((o - want).abs() < 1e-12, "{q:?}: {o} vs {want}");
    }
    Ok(())
}

#[test]
fn f32_matches_f64() -> Result<()> {
    let c = cfg();
    let (points, table, _) = setup(DType::F64, 100, 4)?;
    let a = encode(points.as_tensor(), table.as_tensor(), &c)?;
    let b = encode(&points.to_dtype(DType::F32)?, &table.to_dtype(DType::F32)?, &c)?
        .to_dtype(DType::F64)?;
    assert!(max_abs_diff(&a, &b)? < 1e-5);
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let c = cfg();
    let dev = Device::Cpu;
    let table = Tensor::zeros(c.table_shape(), DType::F32, &dev)?;
    let e = encode(&Tensor::zeros((4, 2), DType::F32, &dev)?, &table, &c).unwrap_err().to_string();
    assert!(e.contains("(N, 3)"), "{e}");
    let e = encode(
        &Tensor::zeros((4, 3), DType::F32, &dev)?,
        &Tensor::zeros((10, 2), DType::F32, &dev)?,
        &c,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("table has shape"), "{e}");
    let e = encode(&Tensor::zeros((4, 3), DType::F64, &dev)?, &table, &c).unwrap_err().to_string();
    assert!(e.contains("f32 or both f64"), "{e}");
    let bad = HashGridConfig { levels: 0, ..c };
    assert!(bad.validate().is_err());
    Ok(())
}

#[test]
fn clamped_coordinates_have_zero_position_gradient() -> Result<()> {
    let c = cfg();
    let mut rng = SeededRng::new(6);
    let dev = Device::Cpu;
    let table = rng.rand_uniform(c.table_shape(), -1.0, 1.0, DType::F64, &dev)?;
    // x outside [0, 1] on the low and high side; y, z inside.
    let pts = Var::new(&[[-0.3f64, 0.41, 0.77], [1.2, 0.13, 0.52]], &dev)?;
    let w = rng.randn((2, c.out_dim()), DType::F64, &dev)?;
    let g = (encode(pts.as_tensor(), &table, &c)? * &w)?.sum_all()?.backward()?;
    let gp = g.get(&pts).unwrap().to_vec2::<f64>()?;
    assert_eq!(gp[0][0], 0.0);
    assert_eq!(gp[1][0], 0.0);
    assert!(gp[0][1] != 0.0 && gp[1][2] != 0.0);
    // Clamping: the encoding equals the one of the projected point.
    let a = encode(pts.as_tensor(), &table, &c)?;
    let b = encode(&Tensor::new(&[[0.0f64, 0.41, 0.77], [1.0, 0.13, 0.52]], &dev)?, &table, &c)?;
    assert!(max_abs_diff(&a, &b)? == 0.0);
    Ok(())
}
