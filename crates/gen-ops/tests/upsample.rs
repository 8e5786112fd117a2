//! Nearest upsampling: forward parity with candle, finite differences when the input has other
//! consumers (where candle's own backward overwrites the gradient), and the candle defect.

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use common::{assert_fd, randn, rel_err};
use gen_core::SeededRng;

#[test]
fn forward_matches_candle_and_composite() -> Result<()> {
    let x = randn(&mut SeededRng::new(1), &[2, 3, 4, 5])?;
    for s in [1, 2, 3] {
        let y = gen_ops::upsample_nearest(&x, s)?;
        assert_eq!(y.dims(), &[2, 3, 4 * s, 5 * s]);
        assert_eq!(rel_err(&y, &x.upsample_nearest2d(4 * s, 5 * s)?)?, 0.0);
        assert_eq!(rel_err(&y, &gen_ops::composite::upsample_nearest(&x, s)?)?, 0.0);
    }
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let y = gen_ops::upsample_nearest(&x.to_dtype(dt)?, 2)?;
        assert_eq!(y.dtype(), dt);
        assert!(rel_err(&y, &x.upsample_nearest2d(8, 10)?)? < 1e-2);
    }
    // Non-contiguous input.
    let xt = x.transpose(2, 3)?;
    assert_eq!(rel_err(&gen_ops::upsample_nearest(&xt, 2)?, &xt.upsample_nearest2d(10, 8)?)?, 0.0);
    Ok(())
}

#[test]
fn fd_with_other_consumers() -> Result<()> {
    let mut rng = SeededRng::new(2);
    let x = randn(&mut rng, &[1, 2, 3, 2])?;
    let other = randn(&mut rng, &[1, 2, 6, 4])?;
    // y = up(x) ⊙ other + up(x²) + x-dependent term through a second path.
    let f = move |t: &[Tensor]| -> candle_core::Result<Tensor> {
        let x = &t[0];
        let a = (gen_ops::upsample_nearest(x, 2)? * &other)?;
        let b = gen_ops::upsample_nearest(&x.sqr()?, 2)?;
        let c = gen_ops::upsample_nearest(&x.sin()?, 2)?;
        (a + b)? + c
    };
    assert_fd("upsample_nearest (3 consumers)", &f, std::slice::from_ref(&x), 1e-6)?;
    let g = move |t: &[Tensor]| -> candle_core::Result<Tensor> {
        let x = &t[0];
        let up = gen_ops::upsample_nearest(x, 3)?;
        // x also used directly: sum of x broadcast to the upsampled shape.
        up.broadcast_add(&x.sum_keepdim(3)?.sum_keepdim(2)?)
    };
    assert_fd("upsample_nearest (+ direct use)", &g, &[x], 1e-6)?;
    Ok(())
}

/// Documents candle 0.11.1's defect (see module doc of `gen_ops::ops::upsample_nearest`):
/// with a second consumer of `x`, `upsample_nearest2d`'s backward overwrites the gradient the
/// other consumer contributed. If a future candle fixes it, this test tells us.
#[test]
fn candle_upsample_backward_drops_other_gradients() -> Result<()> {
    let x = Var::from_tensor(&randn(&mut SeededRng::new(3), &[1, 1, 2, 2])?)?;
    let ours = (gen_ops::upsample_nearest(&x, 2)?.sum_all()? + x.sum_all()?)?.backward()?;
    let theirs = (x.upsample_nearest2d(4, 4)?.sum_all()? + x.sum_all()?)?.backward()?;
    // d/dx = 4 (four copies) + 1 (direct use).
    let five = (x.ones_like()? * 5.0)?;
    assert_eq!(rel_err(ours.get(&x).unwrap(), &five)?, 0.0);
    assert!(
        rel_err(theirs.get(&x).unwrap(), &five)? > 0.1,
        "candle's upsample backward now accumulates"
    );
    Ok(())
}
