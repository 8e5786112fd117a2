//! Finite-difference checks of the candle activations and layers the models use: gelu (tanh
//! approximation), gelu_erf, silu, quick_gelu, conv2d with padding and stride, and
//! `candle_nn::Embedding` / `index_select` with repeated ids.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, Var};
use common::{assert_fd, assert_parity, randn, rel_err};
use gen_core::SeededRng;

fn x(seed: u64) -> Result<Tensor> {
    Ok((randn(&mut SeededRng::new(seed), &[4, 6])? * 2.0)?)
}

/// candle's `gelu` backward hard-codes its constants to 6 significant digits (0.797885,
/// 0.0356774, 0.0535161, 0.398942), so in f64 it is slightly off (measured ~2e-7 relative);
/// irrelevant in f32. Same for gelu_erf (0.398942).
#[test]
fn gelu_tanh() -> Result<()> {
    assert_fd("gelu (tanh)", &|t: &[Tensor]| t[0].gelu(), &[x(1)?], 1e-6)?;
    Ok(())
}

#[test]
fn gelu_erf() -> Result<()> {
    assert_fd("gelu_erf", &|t: &[Tensor]| t[0].gelu_erf(), &[x(2)?], 1e-6)?;
    Ok(())
}

#[test]
fn silu() -> Result<()> {
    assert_fd("silu", &|t: &[Tensor]| t[0].silu(), &[x(3)?], 1e-6)?;
    Ok(())
}

#[test]
fn quick_gelu() -> Result<()> {
    let x = x(4)?;
    assert_fd(
        "quick_gelu (gen_ops)",
        &|t: &[Tensor]| gen_ops::quick_gelu(&t[0]),
        std::slice::from_ref(&x),
        1e-6,
    )?;
    // Values: x·σ(1.702x), written out independently.
    let v: Vec<f64> = x.flatten_all()?.to_vec1()?;
    let expected: Vec<f64> = v.iter().map(|a| a / (1.0 + (-1.702 * a).exp())).collect();
    let y: Vec<f64> = gen_ops::quick_gelu(&x)?.flatten_all()?.to_vec1()?;
    for (a, b) in y.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-14);
    }
    // candle-nn has no QuickGelu activation; candle-transformers' CLIP writes it as
    // `x * candle_nn::ops::sigmoid(1.702 x)`, whose sigmoid custom op has a backward:
    let f = |t: &[Tensor]| &t[0] * candle_nn::ops::sigmoid(&(&t[0] * 1.702)?)?;
    assert_fd("x * candle_nn::ops::sigmoid(1.702 x)", &f, &[x], 1e-6)?;
    Ok(())
}

/// candle's conv2d backward is correct when `(H + 2p − k) mod s == (W + 2p − k) mod s` (it
/// derives the transposed convolution's output padding from the height only).
#[test]
fn candle_conv2d_padding_and_stride() -> Result<()> {
    let mut rng = SeededRng::new(5);
    let k = randn(&mut rng, &[4, 3, 3, 3])?;
    let bias = randn(&mut rng, &[4])?;
    for (shape, padding, stride) in [
        ([2, 3, 5, 6], 1, 1),
        ([2, 3, 5, 5], 1, 2),
        ([1, 3, 4, 4], 1, 2),
        ([1, 3, 6, 6], 0, 2),
        ([1, 3, 8, 5], 2, 3),
        ([1, 3, 5, 7], 0, 2),
    ] {
        let inp = randn(&mut rng, &shape)?;
        let f = move |t: &[Tensor]| -> candle_core::Result<Tensor> {
            t[0].conv2d(&t[1], padding, stride, 1, 1)?.broadcast_add(&t[2].reshape((1, 4, 1, 1))?)
        };
        assert_fd(
            &format!("candle conv2d {shape:?} padding {padding} stride {stride}"),
            &f,
            &[inp, k.clone(), bias.clone()],
            1e-6,
        )?;
    }
    // A 1×1 convolution (the UNet's shortcuts).
    let k1 = randn(&mut rng, &[2, 3, 1, 1])?;
    let inp = randn(&mut rng, &[2, 3, 3, 4])?;
    assert_fd(
        "candle conv2d 1x1",
        &|t: &[Tensor]| t[0].conv2d(&t[1], 0, 1, 1, 1),
        &[inp, k1],
        1e-6,
    )?;
    Ok(())
}

/// The defect: with different remainders candle's backward fails (shape error).
#[test]
fn candle_conv2d_backward_fails_on_mismatched_remainders() -> Result<()> {
    let mut rng = SeededRng::new(7);
    let x = Var::from_tensor(&randn(&mut rng, &[1, 2, 5, 6])?)?;
    let k = randn(&mut rng, &[2, 2, 3, 3])?;
    let y = x.conv2d(&k, 1, 2, 1, 1)?;
    assert!(
        y.sum_all()?.backward().is_err(),
        "candle's conv2d backward now handles H, W remainders"
    );
    Ok(())
}

/// `gen_ops::conv2d` handles every geometry, including those candle's backward fails on.
#[test]
fn gen_ops_conv2d_fd() -> Result<()> {
    let mut rng = SeededRng::new(8);
    let k = randn(&mut rng, &[4, 2, 3, 3])?;
    for (shape, padding, stride, dilation) in [
        ([2, 2, 5, 6], 1, 2, 1),
        ([1, 2, 6, 5], 0, 2, 1),
        ([1, 2, 8, 6], 1, 3, 1),
        ([1, 2, 4, 4], 1, 2, 1),
        ([1, 2, 7, 8], 1, 2, 2),
        ([1, 2, 5, 5], 1, 1, 1),
    ] {
        let inp = randn(&mut rng, &shape)?;
        let cfg = candle_nn::Conv2dConfig { padding, stride, dilation, ..Default::default() };
        let f = move |t: &[Tensor]| gen_ops::conv2d(&t[0], &t[1], &cfg);
        // Values equal candle's forward.
        let e = rel_err(
            &f(&[inp.clone(), k.clone()])?,
            &inp.conv2d(&k, padding, stride, dilation, 1)?,
        )?;
        assert!(e < 1e-14, "{shape:?}: forward differs by {e:e}");
        assert_fd(
            &format!("gen_ops::conv2d {shape:?} p{padding} s{stride} d{dilation}"),
            &f,
            &[inp, k.clone()],
            1e-6,
        )?;
    }
    // Grouped convolution.
    let kg = randn(&mut rng, &[4, 1, 3, 3])?;
    let cfg = candle_nn::Conv2dConfig { padding: 1, stride: 2, groups: 2, ..Default::default() };
    let f = move |t: &[Tensor]| gen_ops::conv2d(&t[0], &t[1], &cfg);
    assert_fd("gen_ops::conv2d groups 2", &f, &[randn(&mut rng, &[1, 2, 5, 6])?, kg], 1e-6)?;
    Ok(())
}

/// The GEMM convolution's batch-parallel and per-sample paths, 1×1 (no im2col) kernels and a
/// non-contiguous input agree with candle's conv2d (values and gradients, where candle's
/// backward is correct), in f64 against finite differences and in f32 against candle.
#[test]
fn gen_ops_conv2d_gemm_paths() -> Result<()> {
    let mut rng = SeededRng::new(9);
    // batch 6 ≥ threads: the batch-parallel path; batch 1: multi-threaded GEMMs.
    for (shape, kshape, padding, stride) in [
        ([6, 3, 6, 6], [5, 3, 3, 3], 1, 1),
        ([1, 3, 6, 6], [5, 3, 3, 3], 1, 1),
        ([6, 3, 5, 5], [4, 3, 1, 1], 0, 1),
        ([1, 3, 5, 5], [4, 3, 1, 1], 0, 1),
        ([6, 3, 7, 7], [4, 3, 3, 3], 0, 2),
        ([3, 2, 4, 4], [2, 2, 1, 1], 1, 1),
    ] {
        let inp = randn(&mut rng, &shape)?;
        let k = randn(&mut rng, &kshape)?;
        let bias = randn(&mut rng, &[kshape[0]])?;
        let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
        let f = move |t: &[Tensor]| gen_ops::conv2d_bias(&t[0], &t[1], Some(&t[2]), &cfg);
        let reference = move |t: &[Tensor]| {
            t[0].conv2d(&t[1], padding, stride, 1, 1)?.broadcast_add(&t[2].reshape((
                1,
                (),
                1,
                1,
            ))?)
        };
        assert_fd(
            &format!("gemm conv2d {shape:?} k{kshape:?} p{padding} s{stride}"),
            &f,
            &[inp.clone(), k.clone(), bias.clone()],
            1e-6,
        )?;
        let (x32, k32, b32) =
            (inp.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
        assert_parity(
            &format!("gemm conv2d f32 {shape:?}"),
            &f,
            &reference,
            &[x32, k32, b32],
            1e-5,
        )?;
    }
    // A transposed (non-contiguous) input gives the result of its contiguous copy.
    let x = randn(&mut rng, &[2, 3, 5, 4])?.transpose(2, 3)?;
    let k = randn(&mut rng, &[4, 3, 3, 3])?;
    let cfg = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
    let e = rel_err(&gen_ops::conv2d(&x, &k, &cfg)?, &x.contiguous()?.conv2d(&k, 1, 1, 1, 1)?)?;
    assert!(e < 1e-14, "non-contiguous input: {e:e}");
    // A channel mismatch is an error naming both shapes, not a panic.
    let bad = gen_ops::conv2d(&randn(&mut rng, &[1, 2, 4, 4])?, &k, &cfg).unwrap_err().to_string();
    assert!(bad.contains("channels"), "{bad}");
    let bad =
        gen_ops::conv2d_bias(&x, &k, Some(&randn(&mut rng, &[3])?), &cfg).unwrap_err().to_string();
    assert!(bad.contains("bias"), "{bad}");
    Ok(())
}

#[test]
fn embedding_with_repeated_ids() -> Result<()> {
    let table = randn(&mut SeededRng::new(6), &[5, 3])?;
    let ids = Tensor::new(&[[0u32, 3, 3], [4, 0, 3]], &Device::Cpu)?;
    let ids2 = ids.clone();
    let f = move |t: &[Tensor]| candle_nn::Embedding::new(t[0].clone(), 3).forward(&ids2);
    assert_fd("embedding (repeated ids)", &f, std::slice::from_ref(&table), 1e-6)?;
    // Exact: the gradient of Σ emb is the count of each id.
    let v = Var::from_tensor(&table)?;
    let g =
        candle_nn::Embedding::new(v.as_tensor().clone(), 3).forward(&ids)?.sum_all()?.backward()?;
    let counts = Tensor::new(&[[2.0f64; 3], [0.0; 3], [0.0; 3], [3.0; 3], [1.0; 3]], &Device::Cpu)?;
    assert_eq!(rel_err(g.get(&v).unwrap(), &counts)?, 0.0);
    let ids_flat = Tensor::new(&[1u32, 1, 2], &Device::Cpu)?;
    assert_fd(
        "index_select dim 1",
        &move |t: &[Tensor]| t[0].index_select(&ids_flat, 1),
        &[table],
        1e-6,
    )?;
    Ok(())
}

/// `nn::Linear` on a transposed (non-contiguous) 3-D input equals the contiguous result
/// (candle 0.11.1's batched matmul gets this wrong: huggingface/candle#3744).
#[test]
fn linear_on_non_contiguous_input_matches_contiguous() {
    use candle_core::{DType, Device, Module, Tensor};
    let dev = Device::Cpu;
    let w = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap();
    let b = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
    let lin = gen_ops::nn::Linear::from_weights("probe", w, Some(b));
    let x = Tensor::arange(0f32, 40.0, &dev)
        .unwrap()
        .reshape((2, 4, 5))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let xt = x.transpose(1, 2).unwrap(); // (2, 5, 4), non-contiguous
    assert!(!xt.is_contiguous());
    let y1 = lin.forward(&xt).unwrap();
    let y2 = lin.forward(&xt.contiguous().unwrap()).unwrap();
    let d = (y1 - y2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(d, 0.0);
}
