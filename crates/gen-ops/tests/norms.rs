//! Fused softmax, layer norm and group norm: finite differences (f64) and parity with the
//! composite references (values and gradients, f64 and f32).

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use common::{assert_fd, assert_parity, randn, rel_err};
use gen_core::SeededRng;
use gen_ops::composite;

const FD_TOL: f64 = 1e-6;

#[test]
fn softmax_fd_and_parity() -> Result<()> {
    let mut rng = SeededRng::new(1);
    let x = (randn(&mut rng, &[3, 4, 7])? * 2.0)?;
    let fast = |t: &[Tensor]| gen_ops::softmax_last_dim(&t[0]);
    let slow = |t: &[Tensor]| composite::softmax_last_dim(&t[0]);
    assert_fd("softmax_last_dim", &fast, std::slice::from_ref(&x), FD_TOL)?;
    assert_parity("softmax f64", &fast, &slow, std::slice::from_ref(&x), 1e-13)?;
    // f32, and a non-contiguous input.
    let x32 = x.to_dtype(DType::F32)?;
    assert_parity("softmax f32", &fast, &slow, std::slice::from_ref(&x32), 1e-6)?;
    let xt = x.transpose(1, 2)?;
    assert!(rel_err(&gen_ops::softmax_last_dim(&xt)?, &composite::softmax_last_dim(&xt)?)? < 1e-13);
    // Large logits do not overflow; rows sum to one.
    let big = (x * 300.0)?;
    let s = gen_ops::softmax_last_dim(&big)?.sum(2)?;
    assert!(rel_err(&s, &s.ones_like()?)? < 1e-12);
    Ok(())
}

#[test]
fn softmax_half_precision_goes_through_f32() -> Result<()> {
    let x = randn(&mut SeededRng::new(2), &[2, 9])?;
    for dt in [DType::F16, DType::BF16] {
        let y = gen_ops::softmax_last_dim(&x.to_dtype(dt)?)?;
        assert_eq!(y.dtype(), dt);
        let e = rel_err(&y, &composite::softmax_last_dim(&x)?)?;
        assert!(e < 1e-2, "{dt:?}: {e}");
    }
    Ok(())
}

#[test]
fn layer_norm_fd_and_parity() -> Result<()> {
    let mut rng = SeededRng::new(3);
    let x = (randn(&mut rng, &[2, 3, 6])? + 0.5)?;
    let w = randn(&mut rng, &[6])?;
    let b = randn(&mut rng, &[6])?;
    let eps = 1e-5;
    let fast = |t: &[Tensor]| gen_ops::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), eps);
    let slow = |t: &[Tensor]| composite::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), eps);
    let inputs = [x.clone(), w.clone(), b.clone()];
    assert_fd("layer_norm (x, weight, bias)", &fast, &inputs, FD_TOL)?;
    assert_parity("layer_norm f64", &fast, &slow, &inputs, 1e-12)?;
    let in32: Vec<Tensor> =
        inputs.iter().map(|t| t.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
    assert_parity("layer_norm f32", &fast, &slow, &in32, 1e-5)?;
    // Without affine parameters, weight only, and on a non-contiguous input.
    let plain = |t: &[Tensor]| gen_ops::layer_norm(&t[0], None, None, eps);
    assert_fd("layer_norm (no affine)", &plain, std::slice::from_ref(&x), FD_TOL)?;
    let wonly = |t: &[Tensor]| gen_ops::layer_norm(&t[0], Some(&t[1]), None, eps);
    let wonly_ref = |t: &[Tensor]| composite::layer_norm(&t[0], Some(&t[1]), None, eps);
    assert_parity("layer_norm weight only", &wonly, &wonly_ref, &[x.clone(), w.clone()], 1e-12)?;
    let xt = randn(&mut rng, &[6, 4])?.t()?;
    assert!(
        rel_err(
            &gen_ops::layer_norm(&xt, Some(&w), Some(&b), eps)?,
            &composite::layer_norm(&xt, Some(&w), Some(&b), eps)?
        )? < 1e-12
    );
    Ok(())
}

#[test]
fn layer_norm_module_gives_gradients_to_its_parameters() -> Result<()> {
    let mut rng = SeededRng::new(4);
    let x = randn(&mut rng, &[5, 8])?;
    let w = Var::from_tensor(&randn(&mut rng, &[8])?)?;
    let b = Var::from_tensor(&randn(&mut rng, &[8])?)?;
    let ln = gen_ops::nn::LayerNorm {
        weight: Some(w.as_tensor().clone()),
        bias: Some(b.as_tensor().clone()),
        eps: 1e-5,
    };
    let y = candle_core::Module::forward(&ln, &x)?;
    let r = randn(&mut rng, &[5, 8])?;
    let g = (y * &r)?.sum_all()?.backward()?;
    // d/db Σ r⊙y = Σ_rows r, exactly.
    assert!(rel_err(g.get(&b).expect("bias gradient"), &r.sum(0)?)? < 1e-12);
    assert!(g.get(&w).is_some());
    Ok(())
}

#[test]
fn group_norm_fd_and_parity() -> Result<()> {
    let mut rng = SeededRng::new(5);
    let x = (randn(&mut rng, &[2, 4, 3, 3])? * 1.5)?;
    let w = randn(&mut rng, &[4])?;
    let b = randn(&mut rng, &[4])?;
    let eps = 1e-6;
    let fast = |t: &[Tensor]| gen_ops::group_norm(&t[0], 2, Some(&t[1]), Some(&t[2]), eps);
    let slow = |t: &[Tensor]| composite::group_norm(&t[0], 2, Some(&t[1]), Some(&t[2]), eps);
    let inputs = [x.clone(), w.clone(), b.clone()];
    assert_fd("group_norm (x, weight, bias)", &fast, &inputs, FD_TOL)?;
    assert_parity("group_norm f64", &fast, &slow, &inputs, 1e-12)?;
    let in32: Vec<Tensor> =
        inputs.iter().map(|t| t.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
    assert_parity("group_norm f32", &fast, &slow, &in32, 1e-5)?;
    // One group per channel, a single group, (B, C) and (B, C, L) inputs.
    for (shape, groups) in [(vec![2, 4, 5], 4), (vec![3, 4], 1), (vec![1, 6, 2, 2], 3)] {
        let c = shape[1];
        let inputs = [randn(&mut rng, &shape)?, randn(&mut rng, &[c])?, randn(&mut rng, &[c])?];
        let fast =
            move |t: &[Tensor]| gen_ops::group_norm(&t[0], groups, Some(&t[1]), Some(&t[2]), eps);
        let slow =
            move |t: &[Tensor]| composite::group_norm(&t[0], groups, Some(&t[1]), Some(&t[2]), eps);
        assert_parity(&format!("group_norm {shape:?}/{groups}"), &fast, &slow, &inputs, 1e-12)?;
    }
    let plain = |t: &[Tensor]| gen_ops::group_norm(&t[0], 2, None, None, eps);
    assert_fd("group_norm (no affine)", &plain, std::slice::from_ref(&x), FD_TOL)?;
    Ok(())
}

type GroupNormFn =
    fn(&Tensor, usize, Option<&Tensor>, Option<&Tensor>, f64) -> candle_core::Result<Tensor>;

#[test]
fn group_norm_many_rows_is_deterministic_and_matches_reference() -> Result<()> {
    // More rows than one reduction block, f32: the fused weight/bias gradients sum blocks in
    // a fixed order, so two runs agree bit for bit.
    let mut rng = SeededRng::new(6);
    let x = rng.randn((130, 8, 4, 4), DType::F32, &Device::Cpu)?;
    let w = Var::from_tensor(&rng.randn(8, DType::F32, &Device::Cpu)?)?;
    let b = Var::from_tensor(&rng.randn(8, DType::F32, &Device::Cpu)?)?;
    let r = rng.randn((130, 8, 4, 4), DType::F32, &Device::Cpu)?;
    let run = |f: GroupNormFn| -> Result<(Vec<f32>, Vec<f32>)> {
        let y = f(&x, 4, Some(w.as_tensor()), Some(b.as_tensor()), 1e-5)?;
        let g = (y * &r)?.sum_all()?.backward()?;
        Ok((g.get(&w).unwrap().to_vec1()?, g.get(&b).unwrap().to_vec1()?))
    };
    let a = run(gen_ops::group_norm)?;
    assert_eq!(a, run(gen_ops::group_norm)?);
    let c = run(composite::group_norm)?;
    let e = rel_err(
        &Tensor::new(a.0.as_slice(), &Device::Cpu)?,
        &Tensor::new(c.0.as_slice(), &Device::Cpu)?,
    )?;
    assert!(e < 1e-4, "weight grad vs reference {e}");
    Ok(())
}

#[test]
fn bad_shapes_are_errors() -> Result<()> {
    let x = Tensor::zeros((2, 6, 3), DType::F32, &Device::Cpu)?;
    let err = gen_ops::group_norm(&x, 4, None, None, 1e-5).unwrap_err().to_string();
    assert!(err.contains("4 groups"), "{err}");
    let w = Tensor::ones(5, DType::F32, &Device::Cpu)?;
    let err = gen_ops::layer_norm(&x, Some(&w), None, 1e-5).unwrap_err().to_string();
    assert!(err.contains("weight"), "{err}");
    Ok(())
}

/// Weight and bias of other shapes with the right element count (e.g. `(1, C)`) get gradients
/// of their own shapes.
#[test]
fn parameter_shapes_are_kept() -> Result<()> {
    let mut rng = SeededRng::new(9);
    let x = randn(&mut rng, &[3, 4])?;
    let w = randn(&mut rng, &[4])?;
    let b = randn(&mut rng, &[1, 4])?;
    let fast = |t: &[Tensor]| gen_ops::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5);
    let slow = |t: &[Tensor]| composite::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5);
    assert_parity("layer_norm (C) weight, (1, C) bias", &fast, &slow, &[x, w, b], 1e-12)?;
    Ok(())
}
