//! Attention: finite differences of the unchunked and the chunked (fused, memory-bounded)
//! paths, their agreement in values and gradients, and the causal mask.

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor};
use common::{analytic_grads, assert_fd, randn, rel_err};
use gen_core::SeededRng;
use gen_ops::{attention, AttentionConfig};

fn qkv(
    seed: u64,
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
) -> Result<[Tensor; 3]> {
    let mut rng = SeededRng::new(seed);
    Ok([
        randn(&mut rng, &[b, h, lq, d])?,
        randn(&mut rng, &[b, h, lk, d])?,
        randn(&mut rng, &[b, h, lk, dv])?,
    ])
}

fn with(cfg: AttentionConfig) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> {
    move |t: &[Tensor]| attention(&t[0], &t[1], &t[2], &cfg)
}

#[test]
fn attention_fd_unchunked_and_chunked() -> Result<()> {
    let inputs = qkv(1, 1, 2, 5, 4, 3, 2)?;
    let plain = AttentionConfig::default();
    assert_fd("attention (unchunked)", &with(plain), &inputs, 1e-6)?;
    let chunked = AttentionConfig { chunk_size: Some(2), ..plain };
    assert_fd("attention (chunked, fused)", &with(chunked), &inputs, 1e-6)?;
    let scaled = AttentionConfig { chunk_size: Some(3), scale: Some(0.3), ..plain };
    assert_fd("attention (chunked, scale 0.3)", &with(scaled), &inputs, 1e-6)?;
    Ok(())
}

#[test]
fn attention_fd_causal() -> Result<()> {
    let inputs = qkv(2, 1, 2, 5, 5, 3, 3)?;
    let causal = AttentionConfig { causal: true, ..Default::default() };
    assert_fd("attention (causal)", &with(causal), &inputs, 1e-6)?;
    let chunked = AttentionConfig { causal: true, chunk_size: Some(2), ..Default::default() };
    assert_fd("attention (causal, chunked)", &with(chunked), &inputs, 1e-6)?;
    Ok(())
}

/// Chunked and unchunked agree in values and in all three gradients, for every chunk size,
/// with and without the causal mask.
#[test]
fn chunked_equals_unchunked() -> Result<()> {
    let inputs = qkv(3, 2, 2, 7, 7, 4, 3)?;
    for causal in [false, true] {
        let full = AttentionConfig { causal, ..Default::default() };
        let y_full = with(full)(&inputs)?;
        let g_full = analytic_grads(&with(full), &inputs, 7)?;
        for chunk in [1, 2, 3, 7, 100] {
            let cfg = AttentionConfig { causal, chunk_size: Some(chunk), ..Default::default() };
            let e = rel_err(&with(cfg)(&inputs)?, &y_full)?;
            assert!(e < 1e-14, "causal {causal} chunk {chunk}: values differ by {e:e}");
            for (i, (a, b)) in
                analytic_grads(&with(cfg), &inputs, 7)?.iter().zip(&g_full).enumerate()
            {
                let e = rel_err(a, b)?;
                assert!(e < 1e-13, "causal {causal} chunk {chunk}: gradient {i} differs by {e:e}");
            }
        }
        // f32 as well.
        let in32: Vec<Tensor> =
            inputs.iter().map(|t| t.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
        let cfg = AttentionConfig { causal, chunk_size: Some(3), ..Default::default() };
        let e = rel_err(&with(cfg)(&in32)?, &with(full)(&in32)?)?;
        assert!(e < 1e-6, "f32 values differ by {e:e}");
        for (a, b) in analytic_grads(&with(cfg), &in32, 7)?.iter().zip(&analytic_grads(
            &with(full),
            &in32,
            7,
        )?) {
            assert!(rel_err(a, b)? < 1e-5);
        }
    }
    Ok(())
}

/// The causal mask: query `i` sees keys `0..=i` only, computed here by hand with explicit
/// per-row softmax over the visible keys.
#[test]
#[allow(clippy::needless_range_loop)]
fn causal_matches_explicit_loop() -> Result<()> {
    let [q, k, v] = qkv(4, 1, 1, 4, 4, 2, 3)?;
    let rows = |t: &Tensor| -> Result<Vec<Vec<f64>>> { Ok(t.squeeze(0)?.squeeze(0)?.to_vec2()?) };
    let (qv, kv, vv) = (rows(&q)?, rows(&k)?, rows(&v)?);
    let scale = 1.0 / 2f64.sqrt();
    let mut expected = Vec::new();
    for i in 0..4 {
        let logits: Vec<f64> =
            (0..=i).map(|j| scale * (qv[i][0] * kv[j][0] + qv[i][1] * kv[j][1])).collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for c in 0..3 {
            expected.push((0..=i).map(|j| e[j] / s * vv[j][c]).sum::<f64>());
        }
    }
    let expected = Tensor::from_vec(expected, (1, 1, 4, 3), q.device())?;
    for chunk in [None, Some(1), Some(3)] {
        let y = attention(
            &q,
            &k,
            &v,
            &AttentionConfig { causal: true, chunk_size: chunk, scale: None },
        )?;
        let e = rel_err(&y, &expected)?;
        assert!(e < 1e-14, "chunk {chunk:?}: {e:e}");
    }
    Ok(())
}

#[test]
fn shape_errors_are_reported() -> Result<()> {
    let [q, k, v] = qkv(5, 1, 1, 3, 4, 2, 2)?;
    let bad_v = v.narrow(2, 0, 3)?;
    for cfg in
        [AttentionConfig::default(), AttentionConfig { chunk_size: Some(2), ..Default::default() }]
    {
        let err = attention(&q, &k, &bad_v, &cfg).unwrap_err().to_string();
        assert!(err.contains("incompatible shapes"), "{err}");
    }
    Ok(())
}

#[test]
fn half_precision_inputs() -> Result<()> {
    let inputs = qkv(6, 1, 2, 6, 5, 4, 3)?;
    let reference = with(AttentionConfig::default())(&inputs)?;
    for dt in [DType::F16, DType::BF16] {
        let h: Vec<Tensor> =
            inputs.iter().map(|t| t.to_dtype(dt)).collect::<candle_core::Result<_>>()?;
        for chunk in [None, Some(2)] {
            let y = attention(
                &h[0],
                &h[1],
                &h[2],
                &AttentionConfig { chunk_size: chunk, ..Default::default() },
            )?;
            assert_eq!(y.dtype(), dt);
            let e = rel_err(&y, &reference)?;
            assert!(e < 3e-2, "{dt:?} chunk {chunk:?}: {e}");
        }
    }
    Ok(())
}

/// What the autograd graph keeps alive: with `chunk_size` no node holds logits or
/// probabilities (`Lq × Lk` per head), only `q`, `k`, `v` and the output; without it the
/// probabilities are kept (which this test can see).
#[test]
fn chunked_graph_keeps_no_logits() -> Result<()> {
    let [q, k, v] = qkv(7, 1, 2, 16, 16, 2, 2)?;
    let (q, k, v) = (
        candle_core::Var::from_tensor(&q)?,
        candle_core::Var::from_tensor(&k)?,
        candle_core::Var::from_tensor(&v)?,
    );
    let logits_elems = 2 * 16 * 16;
    let largest = |cfg: AttentionConfig| -> Result<usize> {
        let y = attention(&q, &k, &v, &cfg)?;
        Ok(y.sorted_nodes().iter().map(|t| t.elem_count()).max().unwrap_or(0))
    };
    let chunked =
        largest(AttentionConfig { chunk_size: Some(4), causal: true, ..Default::default() })?;
    assert!(chunked < logits_elems / 4, "chunked graph holds a tensor of {chunked} elements");
    let full = largest(AttentionConfig::default())?;
    assert!(full >= logits_elems, "unchunked graph's largest tensor: {full}");
    Ok(())
}

/// Gradients when only some of `q`, `k`, `v` are variables (cross-attention on a frozen
/// context): the chunked path agrees with the unchunked one.
#[test]
fn chunked_partial_variables() -> Result<()> {
    let [q, k, v] = qkv(8, 1, 2, 6, 4, 3, 2)?;
    for which in 0..3 {
        let vars: Vec<candle_core::Var> = [&q, &k, &v]
            .iter()
            .map(|t| candle_core::Var::from_tensor(t))
            .collect::<candle_core::Result<_>>()?;
        let ins: Vec<Tensor> = [&q, &k, &v]
            .iter()
            .enumerate()
            .map(|(i, t)| if i == which { vars[i].as_tensor().clone() } else { (*t).clone() })
            .collect();
        let grad = |cfg: AttentionConfig| -> Result<Tensor> {
            let g = attention(&ins[0], &ins[1], &ins[2], &cfg)?.sqr()?.sum_all()?.backward()?;
            Ok(g.get(&vars[which]).expect("gradient").clone())
        };
        let e = rel_err(
            &grad(AttentionConfig { chunk_size: Some(4), ..Default::default() })?,
            &grad(AttentionConfig::default())?,
        )?;
        assert!(e < 1e-13, "input {which}: {e:e}");
    }
    Ok(())
}
