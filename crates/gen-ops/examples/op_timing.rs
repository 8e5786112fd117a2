//! Times forward + backward of the fused ops against the composite references (f32, CPU).
//! `cargo run -p gen-ops --release --example op_timing`

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_ops::{composite, AttentionConfig};

type Op<'a> = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + 'a>;

/// Median milliseconds of forward and of forward + backward of `Σ f(x)`.
fn time(f: &Op, x: &Tensor, reps: usize) -> Result<(f64, f64)> {
    let xv = Var::from_tensor(x)?;
    let (mut fw, mut fb) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let y = f(x)?;
        let _ = y.sum_all()?.to_scalar::<f32>()?;
        fw.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let g = f(xv.as_tensor())?.sum_all()?.backward()?;
        let _ = g.get(&xv).expect("gradient").sum_all()?.to_scalar::<f32>()?;
        fb.push(t.elapsed().as_secs_f64() * 1e3);
    }
    fw.sort_by(f64::total_cmp);
    fb.sort_by(f64::total_cmp);
    Ok((fw[reps / 2], fb[reps / 2]))
}

fn main() -> Result<()> {
    let mut rng = SeededRng::new(0);
    let dev = Device::Cpu;
    let reps = 7;
    let logits = rng.randn((16, 256, 256), DType::F32, &dev)?;
    let tokens = rng.randn((2, 256, 320), DType::F32, &dev)?;
    let image = rng.randn((2, 64, 32, 32), DType::F32, &dev)?;
    let w320 = rng.randn(320, DType::F32, &dev)?;
    let w64 = rng.randn(64, DType::F32, &dev)?;
    let q = rng.randn((2, 8, 1024, 40), DType::F32, &dev)?;
    let k = rng.randn((2, 8, 1024, 40), DType::F32, &dev)?;
    let cases: Vec<(&str, Op, Op, &Tensor)> = vec![
        (
            "softmax (16,256,256)",
            Box::new(gen_ops::softmax_last_dim),
            Box::new(composite::softmax_last_dim),
            &logits,
        ),
        (
            "layer_norm (2,256,320)",
            Box::new(|x| gen_ops::layer_norm(x, Some(&w320), Some(&w320), 1e-5)),
            Box::new(|x| composite::layer_norm(x, Some(&w320), Some(&w320), 1e-5)),
            &tokens,
        ),
        (
            "group_norm (2,64,32,32)/32",
            Box::new(|x| gen_ops::group_norm(x, 32, Some(&w64), Some(&w64), 1e-5)),
            Box::new(|x| composite::group_norm(x, 32, Some(&w64), Some(&w64), 1e-5)),
            &image,
        ),
        (
            "upsample x2 (2,64,32,32)",
            Box::new(|x| gen_ops::upsample_nearest(x, 2)),
            Box::new(|x| composite::upsample_nearest(x, 2)),
            &image,
        ),
        (
            "attention (2,8,1024,40): chunk 256 vs none",
            Box::new(|x| {
                gen_ops::attention(
                    x,
                    &k,
                    &k,
                    &AttentionConfig { chunk_size: Some(256), ..Default::default() },
                )
            }),
            Box::new(|x| gen_ops::attention(x, &k, &k, &AttentionConfig::default())),
            &q,
        ),
        (
            "attention (2,8,1024,40): none vs composite",
            Box::new(|x| gen_ops::attention(x, &k, &k, &AttentionConfig::default())),
            Box::new(|x| composite::attention(x, &k, &k, &AttentionConfig::default())),
            &q,
        ),
    ];
    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>12}",
        "op", "fast fwd", "ref fwd", "fast f+b", "ref f+b"
    );
    for (name, fast, slow, x) in cases {
        let (a, b) = time(&fast, x, reps)?;
        let (c, d) = time(&slow, x, reps)?;
        println!("{name:<44} {a:>10.2}ms {c:>10.2}ms {b:>10.2}ms {d:>10.2}ms");
    }
    Ok(())
}
