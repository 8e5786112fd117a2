//! The composite references (the non-CPU fallback path) and the `nn` modules, checked by
//! finite differences.

mod common;

use std::sync::Arc;

use anyhow::Result;
use candle_core::{Module, Tensor};
use common::{assert_fd, randn, rel_err};
use gen_core::SeededRng;
use gen_ops::nn::{GroupNorm, LayerNorm, Linear, LinearAdapter};
use gen_ops::{composite, AttentionConfig};

#[test]
fn composite_ops_fd() -> Result<()> {
    let mut rng = SeededRng::new(21);
    let x = randn(&mut rng, &[2, 5])?;
    assert_fd(
        "composite softmax",
        &|t: &[Tensor]| composite::softmax_last_dim(&t[0]),
        std::slice::from_ref(&x),
        1e-6,
    )?;
    let (w, b) = (randn(&mut rng, &[5])?, randn(&mut rng, &[5])?);
    let ln = |t: &[Tensor]| composite::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5);
    assert_fd("composite layer_norm", &ln, &[x, w, b], 1e-6)?;
    let xg = randn(&mut rng, &[2, 4, 2, 3])?;
    let (w, b) = (randn(&mut rng, &[4])?, randn(&mut rng, &[4])?);
    let gn = |t: &[Tensor]| composite::group_norm(&t[0], 2, Some(&t[1]), Some(&t[2]), 1e-5);
    assert_fd("composite group_norm", &gn, &[xg.clone(), w, b], 1e-6)?;
    assert_fd(
        "composite upsample",
        &|t: &[Tensor]| composite::upsample_nearest(&t[0], 2),
        &[xg],
        1e-6,
    )?;
    let qkv = [
        randn(&mut rng, &[1, 1, 5, 3])?,
        randn(&mut rng, &[1, 1, 5, 3])?,
        randn(&mut rng, &[1, 1, 5, 2])?,
    ];
    for cfg in [
        AttentionConfig { chunk_size: Some(2), ..Default::default() },
        AttentionConfig { chunk_size: Some(2), causal: true, ..Default::default() },
    ] {
        let f = move |t: &[Tensor]| composite::attention(&t[0], &t[1], &t[2], &cfg);
        assert_fd(&format!("composite attention {cfg:?}"), &f, &qkv, 1e-6)?;
        let fused = gen_ops::attention(&qkv[0], &qkv[1], &qkv[2], &cfg)?;
        assert!(rel_err(&f(&qkv)?, &fused)? < 1e-14);
    }
    Ok(())
}

/// A LoRA-style adapter `x Aᵀ Bᵀ · s` for the test.
#[derive(Debug)]
struct LowRank {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LinearAdapter for LowRank {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.a.t()?)?.broadcast_matmul(&self.b.t()?)? * self.scale
    }
}

#[test]
fn nn_modules_fd() -> Result<()> {
    let mut rng = SeededRng::new(22);
    // Linear with bias and an adapter: gradients to x, W, bias, A, B.
    let inputs = [
        randn(&mut rng, &[2, 3, 4])?,
        randn(&mut rng, &[5, 4])?,
        randn(&mut rng, &[5])?,
        randn(&mut rng, &[2, 4])?,
        randn(&mut rng, &[5, 2])?,
    ];
    let f = |t: &[Tensor]| -> candle_core::Result<Tensor> {
        let lin = Linear::from_weights("lin", t[1].clone(), Some(t[2].clone()));
        lin.add_adapter(Arc::new(LowRank { a: t[3].clone(), b: t[4].clone(), scale: 0.5 }));
        lin.forward(&t[0])
    };
    assert_fd("Linear + adapter (x, W, bias, A, B)", &f, &inputs, 1e-6)?;
    let ln = |t: &[Tensor]| {
        LayerNorm { weight: Some(t[1].clone()), bias: Some(t[2].clone()), eps: 1e-5 }.forward(&t[0])
    };
    assert_fd(
        "nn::LayerNorm",
        &ln,
        &[randn(&mut rng, &[3, 4])?, randn(&mut rng, &[4])?, randn(&mut rng, &[4])?],
        1e-6,
    )?;
    let gn = |t: &[Tensor]| {
        GroupNorm { num_groups: 3, weight: t[1].clone(), bias: t[2].clone(), eps: 1e-5 }
            .forward(&t[0])
    };
    assert_fd(
        "nn::GroupNorm",
        &gn,
        &[randn(&mut rng, &[2, 6, 2, 2])?, randn(&mut rng, &[6])?, randn(&mut rng, &[6])?],
        1e-6,
    )?;
    Ok(())
}
