//! Gradient checkpointing: parameter and input gradients through K calls equal full
//! backpropagation, and finite differences.

mod common;

use anyhow::Result;
use candle_core::{Tensor, Var};
use common::{assert_fd, randn, rel_err};
use gen_core::SeededRng;
use gen_ops::checkpoint::Chain;

struct Params {
    w: Var,
    b: Var,
    /// Used only by call 1.
    extra: Var,
}

/// A small nonlinear step with parameters that mixes in the step index and uses a fused op:
/// `f(k, x) = layer_norm(tanh(x W + (k+1) b)) + 0.5 x [+ extra, k = 1]`.
fn step(p: &Params, k: usize, x: &Tensor) -> candle_core::Result<Tensor> {
    let h =
        x.matmul(p.w.as_tensor())?.broadcast_add(&(p.b.as_tensor() * (k as f64 + 1.0))?)?.tanh()?;
    let y = (gen_ops::layer_norm(&h, None, None, 1e-5)? + (x * 0.5)?)?;
    if k == 1 {
        y.broadcast_add(p.extra.as_tensor())
    } else {
        Ok(y)
    }
}

fn setup() -> Result<(Params, Tensor, Tensor)> {
    let mut rng = SeededRng::new(11);
    let p = Params {
        w: Var::from_tensor(&(randn(&mut rng, &[4, 4])? * 0.7)?)?,
        b: Var::from_tensor(&randn(&mut rng, &[4])?)?,
        extra: Var::from_tensor(&randn(&mut rng, &[4])?)?,
    };
    let x0 = randn(&mut rng, &[3, 4])?;
    let target = randn(&mut rng, &[3, 4])?;
    Ok((p, x0, target))
}

fn loss(y: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    (y - target)?.sqr()?.sum_all()
}

#[test]
fn checkpointed_equals_full_backprop() -> Result<()> {
    let (p, x0, target) = setup()?;
    let x0v = Var::from_tensor(&x0)?;
    // Full backprop through K = 3 calls.
    let mut x = x0v.as_tensor().clone();
    for k in 0..3 {
        x = step(&p, k, &x)?;
    }
    let full = loss(&x, &target)?.backward()?;
    // Checkpointed.
    let f = |k: usize, x: &Tensor| step(&p, k, x);
    let chain = Chain::forward(&x0, 3, f)?;
    assert_eq!(chain.inputs().len(), 3);
    assert!(rel_err(chain.output(), &x)? < 1e-15);
    let ck = chain.backward_loss(|y| loss(y, &target), f)?;
    for (name, v) in [("w", &p.w), ("b", &p.b), ("extra", &p.extra)] {
        let a = ck
            .grads
            .get(v)
            .ok_or_else(|| anyhow::anyhow!("no checkpointed gradient for {name}"))?;
        let e = rel_err(a, full.get(v).unwrap())?;
        println!("checkpoint vs full backprop, {name}: {e:.2e}");
        assert!(e < 1e-12, "{name}: {e:e}");
    }
    let e = rel_err(&ck.input_grad, full.get(&x0v).unwrap())?;
    println!("checkpoint vs full backprop, x0: {e:.2e}");
    assert!(e < 1e-12, "x0: {e:e}");
    // With an explicit seed, same result.
    let seed = ((chain.output() - &target)? * 2.0)?;
    let ck2 = chain.backward(&seed, f)?;
    assert!(rel_err(ck2.grads.get(&p.w).unwrap(), full.get(&p.w).unwrap())? < 1e-12);
    Ok(())
}

#[test]
fn checkpointed_gradients_match_finite_differences() -> Result<()> {
    let (p, x0, target) = setup()?;
    let f = |k: usize, x: &Tensor| step(&p, k, x);
    let chain = Chain::forward(&x0, 3, f)?;
    let ck = chain.backward_loss(|y| loss(y, &target), f)?;
    // FD of the loss with respect to b through the plain (uncheckpointed) chain.
    let g = |t: &[Tensor]| -> candle_core::Result<Tensor> {
        let q = Params { w: p.w.clone(), b: Var::from_tensor(&t[0])?, extra: p.extra.clone() };
        let mut x = x0.clone();
        for k in 0..3 {
            x = step(&q, k, &x)?;
        }
        loss(&x, &target)
    };
    // assert_fd uses L = r·g with a random scalar r; compare the checkpointed gradient as well.
    assert_fd("3-call chain, d loss / d b", &g, &[p.b.as_tensor().clone()], 1e-6)?;
    let eps = 1e-6;
    let b0: Vec<f64> = p.b.as_tensor().to_vec1()?;
    let ckb: Vec<f64> = ck.grads.get(&p.b).unwrap().to_vec1()?;
    let mut worst: f64 = 0.0;
    let scale = ckb.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for j in 0..b0.len() {
        let eval = |d: f64| -> Result<f64> {
            let mut v = b0.clone();
            v[j] += d;
            Ok(g(&[Tensor::new(v.as_slice(), &candle_core::Device::Cpu)?])?.to_scalar::<f64>()?)
        };
        let num = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
        worst = worst.max((num - ckb[j]).abs() / scale);
    }
    println!("FD checkpointed d loss / d b: {worst:.2e}");
    assert!(worst < 1e-6, "{worst:e}");
    Ok(())
}

#[test]
fn seed_shape_is_checked() -> Result<()> {
    let (p, x0, _) = setup()?;
    let f = |k: usize, x: &Tensor| step(&p, k, x);
    let chain = Chain::forward(&x0, 2, f)?;
    let err = chain
        .backward(&Tensor::zeros(5, candle_core::DType::F64, &candle_core::Device::Cpu)?, f)
        .unwrap_err();
    assert!(err.to_string().contains("seed shape"), "{err}");
    Ok(())
}
