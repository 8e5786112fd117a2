//! The moving average of the weights: the update rule with its warm-up decay, by hand; saving
//! and loading; bad files and decays refused.

use candle_core::{Device, Tensor, Var};
use gen_optim::{Ema, NamedVar};

fn var(name: &str, v: &[f32]) -> NamedVar {
    NamedVar::new(name, Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap())
}

fn values(v: &NamedVar) -> Vec<f32> {
    v.var.as_tensor().to_vec1::<f32>().unwrap()
}

#[test]
fn update_follows_the_warm_up_decay_by_hand() -> anyhow::Result<()> {
    let p = vec![var("a", &[1.0, 2.0]), var("b", &[-4.0])];
    let mut ema = Ema::new(&p, 0.5)?;
    // n = 0: min(0.5, 1/10) = 0.1
    assert!((ema.current_decay() - 0.1).abs() < 1e-15);
    p[0].var.set(&Tensor::new(&[3.0f32, 0.0], &Device::Cpu)?)?;
    p[1].var.set(&Tensor::new(&[6.0f32], &Device::Cpu)?)?;
    ema.update(&p)?;
    // 0.1·old + 0.9·new
    let a = values(&ema.average()[0]);
    let b = values(&ema.average()[1]);
    assert!((a[0] - 2.8).abs() < 1e-6 && (a[1] - 0.2).abs() < 1e-6, "{a:?}");
    assert!((b[0] - 5.0).abs() < 1e-6, "{b:?}");
    // n = 1: 2/11; n = 8: 9/18 = 0.5; n = 9 and later: capped at 0.5
    assert!((ema.current_decay() - 2.0 / 11.0).abs() < 1e-15);
    for _ in 0..7 {
        ema.update(&p)?;
    }
    assert_eq!(ema.updates(), 8);
    assert!((ema.current_decay() - 0.5).abs() < 1e-15);
    ema.update(&p)?;
    assert!((ema.current_decay() - 0.5).abs() < 1e-15);
    // the average never moved the parameters themselves
    assert_eq!(values(&p[0]), vec![3.0, 0.0]);
    Ok(())
}

#[test]
fn average_converges_to_constant_weights_and_lags_moving_ones() -> anyhow::Result<()> {
    let p = vec![var("w", &[0.0])];
    let mut ema = Ema::new(&p, 0.9)?;
    // a ramp w_t = t: the average lags behind by about d / (1 − d) = 9 steps once warmed up
    for t in 1..=200 {
        p[0].var.set(&Tensor::new(&[t as f32], &Device::Cpu)?)?;
        ema.update(&p)?;
    }
    let lag = 200.0 - values(&ema.average()[0])[0];
    assert!((lag - 9.0).abs() < 0.01, "lag {lag}");
    // constant weights: the average reaches them
    for _ in 0..300 {
        ema.update(&p)?;
    }
    assert!((values(&ema.average()[0])[0] - 200.0).abs() < 1e-3);
    Ok(())
}

#[test]
fn save_load_round_trip_and_bad_files() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("gen-optim-ema-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = vec![var("a", &[1.0, 2.0]), var("b", &[3.0])];
    let mut ema = Ema::new(&p, 0.99)?;
    p[0].var.set(&Tensor::new(&[5.0f32, 5.0], &Device::Cpu)?)?;
    ema.update(&p)?;
    ema.update(&p)?;
    let path = dir.join("ema.safetensors");
    ema.save(&path)?;
    // the file holds the parameters only, under their names (a weights file)
    let saved = candle_core::safetensors::load(&path, &Device::Cpu)?;
    assert_eq!(saved.len(), 2);
    let mut back = Ema::new(&p, 0.99)?;
    back.load(&path, ema.updates())?;
    assert_eq!(back.updates(), 2);
    assert_eq!(values(&back.average()[0]), values(&ema.average()[0]));
    assert_eq!(values(&back.average()[1]), values(&ema.average()[1]));
    // then both continue identically
    ema.update(&p)?;
    back.update(&p)?;
    assert_eq!(values(&back.average()[0]), values(&ema.average()[0]));
    // a parameter missing from the file / a wrong shape / an extra tensor
    let more = vec![var("a", &[1.0, 2.0]), var("b", &[3.0]), var("c", &[0.0])];
    let e = Ema::new(&more, 0.9)?.load(&path, 0).unwrap_err().to_string();
    assert!(e.contains("`c`") || e.contains("c"), "{e}");
    assert!(e.contains("ema.safetensors"), "{e}");
    let wrong = vec![var("a", &[1.0, 2.0, 3.0]), var("b", &[3.0])];
    let e = Ema::new(&wrong, 0.9)?.load(&path, 0).unwrap_err().to_string();
    assert!(e.contains("a") && e.contains("ema.safetensors"), "{e}");
    let fewer = vec![var("a", &[1.0, 2.0])];
    let e = Ema::new(&fewer, 0.9)?.load(&path, 0).unwrap_err().to_string();
    assert!(e.contains("`b`"), "{e}");
    // a truncated file
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    assert!(Ema::new(&p, 0.9)?.load(&path, 0).is_err());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bad_decay_and_mismatched_parameters_are_refused() -> anyhow::Result<()> {
    let p = vec![var("a", &[1.0])];
    for d in [1.0, 1.5, -0.1, f64::NAN] {
        let e = Ema::new(&p, d).unwrap_err().to_string();
        assert!(e.contains("EMA decay"), "{e}");
    }
    let mut ema = Ema::new(&p, 0.9)?;
    let e = ema.update(&[var("a", &[1.0]), var("b", &[1.0])]).unwrap_err().to_string();
    assert!(e.contains("2 parameters"), "{e}");
    let e = ema.update(&[var("z", &[1.0])]).unwrap_err().to_string();
    assert!(e.contains("`z`"), "{e}");
    Ok(())
}
