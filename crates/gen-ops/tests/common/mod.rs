//! Shared test helpers: seeded random tensors and central finite-difference gradient checks.
#![allow(dead_code)]

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;

/// Standard normal f64 tensor on the CPU from a seeded generator.
pub fn randn(rng: &mut SeededRng, shape: &[usize]) -> Result<Tensor> {
    Ok(rng.randn(shape, DType::F64, &Device::Cpu)?)
}

/// Largest `|a - b|` divided by the largest `|b|` (a relative error in the max norm).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(a.dims() == b.dims(), "shape {:?} vs {:?}", a.dims(), b.dims());
    let a: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    ensure!(diff.is_finite(), "non-finite difference");
    Ok(if scale == 0.0 { diff } else { diff / scale })
}

/// The scalar `Σ f(inputs) ⊙ r`.
fn loss(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    r: &Tensor,
) -> Result<Tensor> {
    let y = f(inputs)?;
    ensure!(y.dims() == r.dims(), "output shape changed: {:?} vs {:?}", y.dims(), r.dims());
    Ok((y.to_dtype(DType::F64)? * r)?.sum_all()?)
}

/// Analytic gradients of `L = Σ f(inputs) ⊙ r` (with a fixed random `r`) for every input, via
/// candle's backward. Fails if any input gets no gradient.
pub fn analytic_grads(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    seed: u64,
) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<candle_core::Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let r = randn(&mut SeededRng::new(seed), y.dims())?;
    let l = (y.to_dtype(DType::F64)? * r)?.sum_all()?;
    let grads = l.backward()?;
    vars.iter()
        .enumerate()
        .map(|(i, v)| {
            grads.get(v).cloned().ok_or_else(|| anyhow::anyhow!("input {i} received no gradient"))
        })
        .collect()
}

/// Checks candle's gradients of `L = Σ f(inputs) ⊙ r` against central finite differences with
/// step `eps` for every element of every input (f64). Returns the relative error per input.
pub fn fd_errors(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    eps: f64,
) -> Result<Vec<f64>> {
    let seed = 1234;
    let analytic = analytic_grads(f, inputs, seed)?;
    let y = f(inputs)?;
    let r = randn(&mut SeededRng::new(seed), y.dims())?;
    let mut errs = Vec::new();
    for (i, x) in inputs.iter().enumerate() {
        let base: Vec<f64> = x.flatten_all()?.to_vec1()?;
        let mut num = vec![0.0; base.len()];
        for j in 0..base.len() {
            let eval = |d: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += d;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, x.dims(), x.device())?;
                Ok(loss(f, &xs, &r)?.to_scalar::<f64>()?)
            };
            num[j] = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
        }
        let num = Tensor::from_vec(num, x.dims(), x.device())?;
        errs.push(rel_err(&analytic[i], &num)?);
    }
    Ok(errs)
}

/// Runs [`fd_errors`], prints the errors under `name` and asserts each is below `tol`.
pub fn assert_fd(
    name: &str,
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    tol: f64,
) -> Result<f64> {
    let errs = fd_errors(f, inputs, 1e-6)?;
    let max = errs.iter().cloned().fold(0.0, f64::max);
    let shown: Vec<String> = errs.iter().map(|e| format!("{e:.2e}")).collect();
    println!("FD {name}: relative errors per input [{}] (max {max:.2e})", shown.join(", "));
    for (i, e) in errs.iter().enumerate() {
        ensure!(*e < tol, "{name}: FD relative error {e:.3e} of input {i} exceeds {tol:.1e}");
    }
    Ok(max)
}

/// Values and gradients of `fast` and `reference` agree to `tol` (relative, max norm).
pub fn assert_parity(
    name: &str,
    fast: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    tol: f64,
) -> Result<()> {
    let e = rel_err(&fast(inputs)?, &reference(inputs)?)?;
    println!("parity {name}: values {e:.2e}");
    ensure!(e < tol, "{name}: values differ by {e:.3e}");
    let ga = analytic_grads(fast, inputs, 99)?;
    let gb = analytic_grads(reference, inputs, 99)?;
    for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
        let e = rel_err(a, b)?;
        println!("parity {name}: gradient of input {i} {e:.2e}");
        ensure!(e < tol, "{name}: gradients of input {i} differ by {e:.3e}");
    }
    Ok(())
}
