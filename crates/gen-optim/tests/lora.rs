//! LoRA adapters and files on small stand-alone `Linear` layers (no model crate): forward
//! algebra, init, merge/unmerge, detach, dropout, FD gradients, training, file round trips in every
//! format, and bad input. Parity with diffusers/PEFT on the tiny SD UNet and text encoder is in
//! `tests/tests/lora_parity.rs` (gen-tests crate).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, Var};
use gen_core::SeededRng;
use gen_ops::nn::{Linear, LinearAdapter};
use gen_optim::lora::*;
use gen_optim::{AdamW, AdamWConfig, Optim, Optimizer, ParamGroup};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gen-optim-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A little two-layer "model": `blk.attn.to_q` (6→5) then `blk.attn.to_out.0` (5→4), plus an
/// untargeted `blk.ff` (4→4).
fn model(dtype: DType, seed: u64) -> Result<Vec<Linear>> {
    let mut rng = SeededRng::new(seed);
    let mut lin = |name: &str, i: usize, o: usize| -> Result<Linear> {
        let w = rng.randn((o, i), dtype, &Device::Cpu)?;
        let b = rng.randn(o, dtype, &Device::Cpu)?;
        Ok(Linear::from_weights(name, w, Some(b)))
    };
    Ok(vec![lin("blk.attn.to_q", 6, 5)?, lin("blk.attn.to_out.0", 5, 4)?, lin("blk.ff", 4, 4)?])
}

fn run(m: &[Linear], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for l in m {
        h = l.forward(&h)?.tanh()?;
    }
    Ok(h)
}

fn cfg(rank: usize, alpha: f64) -> LoraConfig {
    LoraConfig {
        rank,
        alpha,
        dropout: 0.0,
        init: LoraInit::Kaiming,
        target_modules: vec!["to_q".into(), "to_out.0".into()],
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// Gives every B random values so the adapters do something.
fn randomise_b(set: &LoraSet, seed: u64) -> Result<()> {
    let mut rng = SeededRng::new(seed);
    for e in set.entries() {
        let b = e.adapter.b();
        b.set(&rng.randn(b.shape(), b.dtype(), &Device::Cpu)?)?;
    }
    Ok(())
}

#[test]
fn fresh_adapter_is_identity_and_delta_matches_formula() -> Result<()> {
    let m = model(DType::F32, 1)?;
    let x = SeededRng::new(2).randn((3, 6), DType::F32, &Device::Cpu)?;
    let before = run(&m, &x)?;
    let set = attach_lora(&m, "unet", &cfg(3, 6.0), &mut SeededRng::new(3))?;
    assert_eq!(set.names(), vec!["blk.attn.to_q", "blk.attn.to_out.0"]);
    assert_eq!(set.vars().len(), 4);
    assert_eq!(set.vars()[0].name, "unet.blk.attn.to_q.lora_A");
    assert_eq!(max_abs(&run(&m, &x)?, &before)?, 0.0, "B = 0 must leave the model unchanged");
    randomise_b(&set, 4)?;
    // Layer output with the adapter = x Wᵀ + b + (alpha/r) x Aᵀ Bᵀ (alpha/r = 2).
    let l = &m[0];
    let e = &set.entries()[0];
    let (a, b) = (e.adapter.a().as_tensor(), e.adapter.b().as_tensor());
    let expect = ((x.matmul(&l.weight().t()?)?.broadcast_add(l.bias().unwrap()))?
        + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * 2.0)?)?;
    let got = l.forward(&x)?;
    assert!(max_abs(&got, &expect)? < 1e-5, "{}", max_abs(&got, &expect)?);
    // The multiplier scales the delta linearly.
    set.set_multiplier(0.5);
    let base = candle_nn::Linear::new(l.weight(), l.bias().cloned()).forward(&x)?;
    let d_half = (l.forward(&x)? - &base)?;
    let d_full = (expect - &base)?;
    assert!(max_abs(&(d_half * 2.0)?, &d_full)? < 1e-5);
    Ok(())
}

#[test]
fn init_is_seeded_and_has_the_right_scale() -> Result<()> {
    // Wide layer for statistics.
    let w = Tensor::zeros((8, 400), DType::F32, &Device::Cpu)?;
    let lin = vec![Linear::from_weights("x.to_q", w, None)];
    let mut c = cfg(16, 16.0);
    let a1 = attach_lora(&lin, "unet", &c, &mut SeededRng::new(9))?.entries()[0]
        .adapter
        .a()
        .as_tensor()
        .clone();
    lin[0].clear_adapters();
    let a2 = attach_lora(&lin, "unet", &c, &mut SeededRng::new(9))?.entries()[0]
        .adapter
        .a()
        .as_tensor()
        .clone();
    lin[0].clear_adapters();
    assert_eq!(max_abs(&a1, &a2)?, 0.0, "same seed, same A");
    let bound = 1.0 / 400f64.sqrt();
    let amax = a1.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    assert!(amax <= bound && amax > 0.9 * bound, "kaiming bound {bound}, max {amax}");
    c.init = LoraInit::Gaussian;
    let set = attach_lora(&lin, "unet", &c, &mut SeededRng::new(9))?;
    let a = set.entries()[0]
        .adapter
        .a()
        .as_tensor()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let std = (a.iter().map(|v| v * v).sum::<f64>() / a.len() as f64).sqrt();
    assert!(
        (std - 1.0 / 16.0).abs() < 0.05 / 16.0 * 4.0,
        "gaussian std {std}, expected {}",
        1.0 / 16.0
    );
    let b = set.entries()[0].adapter.b().as_tensor();
    assert_eq!(b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?, 0.0, "B starts at zero");
    Ok(())
}

#[test]
fn merge_matches_adapter_and_unmerge_restores_exactly() -> Result<()> {
    let m = model(DType::F32, 5)?;
    let x = SeededRng::new(6).randn((4, 6), DType::F32, &Device::Cpu)?;
    let base = run(&m, &x)?;
    let w0: Vec<Vec<f32>> =
        m.iter().map(|l| l.weight().flatten_all().unwrap().to_vec1().unwrap()).collect();
    let set = attach_lora(&m, "unet", &cfg(2, 4.0), &mut SeededRng::new(7))?;
    randomise_b(&set, 8)?;
    set.set_multiplier(0.7);
    let adapted = run(&m, &x)?;
    assert!(max_abs(&adapted, &base)? > 1e-2);
    set.merge(0.7)?;
    assert!(set.entries().iter().all(|e| e.is_merged() && !e.is_attached()));
    let merged = run(&m, &x)?;
    let err = max_abs(&merged, &adapted)?;
    assert!(err < 1e-5, "merged vs adapter {err}");
    assert!(set.merge(1.0).is_err(), "double merge must fail");
    set.unmerge()?;
    let w1: Vec<Vec<f32>> =
        m.iter().map(|l| l.weight().flatten_all().unwrap().to_vec1().unwrap()).collect();
    assert_eq!(w0, w1, "unmerge restores the original weights bit for bit");
    assert!(set.entries().iter().all(|e| e.is_attached()));
    assert!(max_abs(&run(&m, &x)?, &adapted)? < 1e-6);
    assert!(set.unmerge().is_err(), "unmerge without merge must fail");
    Ok(())
}

#[derive(Debug)]
struct Plus1;
impl LinearAdapter for Plus1 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (d0, _) = x.dims2()?;
        Tensor::ones((d0, 5), x.dtype(), x.device())
    }
}

#[test]
fn detach_removes_only_this_sets_adapters() -> Result<()> {
    let m = model(DType::F32, 10)?;
    m[0].add_adapter(Arc::new(Plus1));
    let set = attach_lora(&m, "unet", &cfg(2, 2.0), &mut SeededRng::new(1))?;
    assert_eq!(m[0].adapters().len(), 2);
    set.detach();
    assert_eq!(m[0].adapters().len(), 1);
    assert_eq!(m[1].adapters().len(), 0);
    set.reattach();
    assert_eq!(m[0].adapters().len(), 2);
    Ok(())
}

#[test]
fn dropout_only_in_training_and_seeded() -> Result<()> {
    let outs = |seed: u64| -> Result<(Tensor, Tensor, Tensor)> {
        let m = model(DType::F32, 11)?;
        let mut c = cfg(2, 2.0);
        c.dropout = 0.5;
        let set = attach_lora(&m, "unet", &c, &mut SeededRng::new(seed))?;
        randomise_b(&set, 3)?;
        let x = SeededRng::new(2).randn((8, 6), DType::F32, &Device::Cpu)?;
        let eval = m[0].forward(&x)?;
        set.set_training(true);
        let t1 = m[0].forward(&x)?;
        set.set_training(false);
        let eval2 = m[0].forward(&x)?;
        assert_eq!(max_abs(&eval, &eval2)?, 0.0, "no dropout outside training");
        Ok((eval, t1, x))
    };
    let (eval, t1, _) = outs(4)?;
    let (_, t1b, _) = outs(4)?;
    let (_, t1c, _) = outs(5)?;
    assert!(max_abs(&t1, &eval)? > 1e-3, "training mode applies dropout");
    assert_eq!(max_abs(&t1, &t1b)?, 0.0, "same seed, same masks");
    assert!(max_abs(&t1, &t1c)? > 0.0);
    // Bad dropout values.
    let m = model(DType::F32, 11)?;
    for d in [1.0, -0.1, f64::NAN] {
        let mut c = cfg(2, 2.0);
        c.dropout = d;
        let e = attach_lora(&m, "unet", &c, &mut SeededRng::new(1)).unwrap_err().to_string();
        assert!(e.contains("dropout"), "{e}");
    }
    Ok(())
}

#[test]
fn bad_configs_are_rejected() -> Result<()> {
    let m = model(DType::F32, 1)?;
    let e = attach_lora(&m, "unet", &cfg(0, 1.0), &mut SeededRng::new(1)).unwrap_err().to_string();
    assert!(e.contains("rank") && e.contains('0'), "{e}");
    assert!(rank_from_i64(-3).unwrap_err().to_string().contains("-3"));
    assert_eq!(rank_from_i64(4)?, 4);
    let e = attach_lora(&m, "unet", &cfg(2, f64::INFINITY), &mut SeededRng::new(1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("alpha"), "{e}");
    let mut c = cfg(2, 2.0);
    c.target_modules = vec!["to_nothing".into()];
    let e = attach_lora(&m, "unet", &c, &mut SeededRng::new(1)).unwrap_err().to_string();
    assert!(e.contains("to_nothing") && e.contains("blk.attn.to_q"), "{e}");
    let e = attach_lora(&m, "vae_decoder", &cfg(2, 2.0), &mut SeededRng::new(1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vae_decoder"), "{e}");
    Ok(())
}

/// Central-difference check of dL/dA and dL/dB on every entry, f64.
#[test]
fn fd_gradients_of_a_and_b() -> Result<()> {
    let m = model(DType::F64, 21)?;
    let mut c = cfg(3, 5.0);
    c.target_modules.push("ff".into());
    let set = attach_lora(&m, "unet", &c, &mut SeededRng::new(22))?;
    randomise_b(&set, 23)?;
    let x = SeededRng::new(24).randn((5, 6), DType::F64, &Device::Cpu)?;
    let wout = SeededRng::new(25).randn((5, 4), DType::F64, &Device::Cpu)?;
    let loss = || -> Result<Tensor> { Ok((run(&m, &x)? * &wout)?.sum_all()?) };
    let grads = loss()?.backward()?;
    // The base weights are plain tensors: no gradient is tracked for them.
    for l in &m {
        assert!(grads.get(&l.weight()).is_none());
    }
    let mut worst: f64 = 0.0;
    let h = 1e-6;
    for nv in set.vars() {
        let v: &Var = &nv.var;
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", nv.name))
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let mut gmax: f64 = 0.0;
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += h;
            v.set(&Tensor::from_vec(p.clone(), v.shape(), &Device::Cpu)?)?;
            let lp = loss()?.to_scalar::<f64>()?;
            p[i] -= 2.0 * h;
            v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu)?)?;
            let lm = loss()?.to_scalar::<f64>()?;
            v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu)?)?;
            let fd = (lp - lm) / (2.0 * h);
            worst = worst.max((fd - g[i]).abs());
            gmax = gmax.max(g[i].abs());
        }
        assert!(gmax > 1e-3, "{}: gradient is (nearly) zero", nv.name);
    }
    println!("LoRA FD max abs error {worst:.2e}");
    assert!(worst < 1e-6, "FD error {worst}");
    Ok(())
}

#[test]
fn adamw_on_lora_vars_reduces_loss_and_leaves_base_alone() -> Result<()> {
    let m = model(DType::F64, 31)?;
    let w0: Vec<Vec<f64>> =
        m.iter().map(|l| l.weight().flatten_all().unwrap().to_vec1().unwrap()).collect();
    let set = attach_lora(&m, "unet", &cfg(2, 2.0), &mut SeededRng::new(32))?;
    let x = SeededRng::new(33).randn((16, 6), DType::F64, &Device::Cpu)?;
    let target = SeededRng::new(34).randn((16, 4), DType::F64, &Device::Cpu)?.tanh()?;
    let loss = || -> Result<Tensor> { Ok((run(&m, &x)? - &target)?.sqr()?.mean_all()?) };
    let mut opt = Optim::new(
        AdamW,
        vec![ParamGroup::new(
            set.vars(),
            AdamWConfig { lr: 2e-2, weight_decay: 0.0, ..Default::default() },
        )],
    )?;
    let l0 = loss()?.to_scalar::<f64>()?;
    for _ in 0..30 {
        let g = loss()?.backward()?;
        opt.step(&g)?;
    }
    let l1 = loss()?.to_scalar::<f64>()?;
    println!("LoRA AdamW loss {l0:.4} -> {l1:.4}");
    assert!(l1 < 0.8 * l0, "loss {l0} -> {l1}");
    let w1: Vec<Vec<f64>> =
        m.iter().map(|l| l.weight().flatten_all().unwrap().to_vec1().unwrap()).collect();
    assert_eq!(w0, w1);
    Ok(())
}

fn roundtrip(opts: &LoraSaveOptions, name: &str, expect: LoraFormat, tol: f64) -> Result<()> {
    let m = model(DType::F32, 41)?;
    let x = SeededRng::new(42).randn((3, 6), DType::F32, &Device::Cpu)?;
    let set = attach_lora(&m, "unet", &cfg(2, 3.0), &mut SeededRng::new(43))?;
    randomise_b(&set, 44)?;
    let want = run(&m, &x)?;
    let path = tmp(name);
    save_lora(&[&set], &path, opts)?;
    set.detach();
    let file = read_lora_file(&path, &Device::Cpu)?;
    assert_eq!(file.format, expect);
    assert_eq!(file.components(), vec!["unet"]);
    assert_eq!(file.metadata.get("gen.lora.format").map(String::as_str), Some(expect.as_str()));
    let applied = apply_lora(&file, "unet", &m, &ApplyOptions::default())?;
    assert!(applied.skipped.is_empty());
    let err = max_abs(&run(&m, &x)?, &want)?;
    assert!(err < tol, "{name}: adapter from file differs by {err}");
    applied.set.detach();
    let merged = apply_lora(
        &file,
        "unet",
        &m,
        &ApplyOptions { mode: ApplyMode::Merge, ..Default::default() },
    )?;
    let err = max_abs(&run(&m, &x)?, &want)?;
    assert!(err < tol, "{name}: merged from file differs by {err}");
    merged.set.unmerge()?;
    merged.set.detach();
    Ok(())
}

#[test]
fn file_roundtrips_in_every_format() -> Result<()> {
    roundtrip(
        &LoraSaveOptions { format: LoraFormat::Kohya, ..Default::default() },
        "k.safetensors",
        LoraFormat::Kohya,
        1e-5,
    )?;
    roundtrip(
        &LoraSaveOptions {
            format: LoraFormat::Peft,
            peft_alpha: PeftAlpha::Bake,
            ..Default::default()
        },
        "pb.safetensors",
        LoraFormat::Peft,
        1e-5,
    )?;
    roundtrip(
        &LoraSaveOptions {
            format: LoraFormat::Peft,
            peft_alpha: PeftAlpha::Metadata,
            ..Default::default()
        },
        "pm.safetensors",
        LoraFormat::Peft,
        1e-5,
    )?;
    roundtrip(
        &LoraSaveOptions { format: LoraFormat::PeftLegacy, ..Default::default() },
        "pl.safetensors",
        LoraFormat::PeftLegacy,
        1e-5,
    )?;
    roundtrip(
        &LoraSaveOptions { format: LoraFormat::Kohya, dtype: DType::F16, ..Default::default() },
        "k16.safetensors",
        LoraFormat::Kohya,
        1e-2,
    )?;
    Ok(())
}

#[test]
fn kohya_keys_and_alpha_are_written_as_documented() -> Result<()> {
    let m = model(DType::F32, 51)?;
    let set = attach_lora(&m, "text_encoder", &cfg(2, 3.0), &mut SeededRng::new(1))?;
    let path = tmp("keys.safetensors");
    save_lora(&[&set], &path, &LoraSaveOptions::default())?;
    let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "lora_te_blk_attn_to_out_0.alpha",
            "lora_te_blk_attn_to_out_0.lora_down.weight",
            "lora_te_blk_attn_to_out_0.lora_up.weight",
            "lora_te_blk_attn_to_q.alpha",
            "lora_te_blk_attn_to_q.lora_down.weight",
            "lora_te_blk_attn_to_q.lora_up.weight",
        ]
    );
    let alpha = &t["lora_te_blk_attn_to_q.alpha"];
    assert_eq!(alpha.dims(), &[] as &[usize]);
    assert_eq!(alpha.to_scalar::<f32>()?, 3.0);
    assert_eq!(t["lora_te_blk_attn_to_q.lora_down.weight"].dims(), &[2, 6]);
    assert_eq!(t["lora_te_blk_attn_to_q.lora_up.weight"].dims(), &[5, 2]);
    Ok(())
}

fn write_raw(name: &str, tensors: Vec<(&str, Tensor)>) -> Result<PathBuf> {
    let path = tmp(name);
    let map: std::collections::HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    candle_core::safetensors::save(&map, &path)?;
    Ok(path)
}

#[test]
fn bad_files_give_clear_errors() -> Result<()> {
    let m = model(DType::F32, 61)?;
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let opts = ApplyOptions::default();
    // Wrong input width for to_q (6 expected).
    let p = write_raw(
        "shape.safetensors",
        vec![
            ("unet.blk.attn.to_q.lora_A.weight", z(&[2, 7])),
            ("unet.blk.attn.to_q.lora_B.weight", z(&[5, 2])),
        ],
    )?;
    let e = apply_lora_file(&m, "unet", &p, &opts).unwrap_err().to_string();
    assert!(
        e.contains("unet.blk.attn.to_q.lora_A.weight")
            && e.contains("[2, 6]")
            && e.contains("[2, 7]"),
        "{e}"
    );
    // Wrong output height (kohya).
    let p = write_raw(
        "shape2.safetensors",
        vec![
            ("lora_unet_blk_attn_to_q.lora_down.weight", z(&[2, 6])),
            ("lora_unet_blk_attn_to_q.lora_up.weight", z(&[9, 2])),
        ],
    )?;
    let e = apply_lora_file(&m, "unet", &p, &opts).unwrap_err().to_string();
    assert!(
        e.contains("lora_unet_blk_attn_to_q.lora_up.weight")
            && e.contains("[5, 2]")
            && e.contains("[9, 2]"),
        "{e}"
    );
    // Rank mismatch between A and B.
    let p = write_raw(
        "rank.safetensors",
        vec![
            ("lora_unet_blk_attn_to_q.lora_down.weight", z(&[2, 6])),
            ("lora_unet_blk_attn_to_q.lora_up.weight", z(&[5, 3])),
        ],
    )?;
    let e = apply_lora_file(&m, "unet", &p, &opts).unwrap_err().to_string();
    assert!(e.contains("lora_up.weight") && e.contains("[5, 3]"), "{e}");
    // Unknown module: error by default, skipped on request.
    let p = write_raw(
        "unknown.safetensors",
        vec![
            ("lora_unet_blk_attn_to_q.lora_down.weight", z(&[2, 6])),
            ("lora_unet_blk_attn_to_q.lora_up.weight", z(&[5, 2])),
            ("lora_unet_blk_attn_to_zz.lora_down.weight", z(&[2, 6])),
            ("lora_unet_blk_attn_to_zz.lora_up.weight", z(&[5, 2])),
        ],
    )?;
    let e = apply_lora_file(&m, "unet", &p, &opts).unwrap_err().to_string();
    assert!(
        e.contains("lora_unet_blk_attn_to_zz.lora_down.weight") && e.contains("match no layer"),
        "{e}"
    );
    let ok = apply_lora_file(
        &m,
        "unet",
        &p,
        &ApplyOptions { unknown: UnknownKeys::Skip, ..Default::default() },
    )?;
    assert_eq!(ok.skipped, vec!["lora_unet_blk_attn_to_zz.lora_down.weight".to_string()]);
    assert_eq!(ok.set.len(), 1);
    ok.set.detach();
    // Component absent from the file.
    let e = apply_lora_file(&m, "text_encoder", &p, &opts).unwrap_err().to_string();
    assert!(e.contains("no text_encoder LoRA"), "{e}");
    // Missing up weight.
    let p = write_raw(
        "noup.safetensors",
        vec![("lora_unet_blk_attn_to_q.lora_down.weight", z(&[2, 6]))],
    )?;
    let e = read_lora_file(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("lora_unet_blk_attn_to_q.lora_up.weight"), "{e}");
    // Rank 0.
    let p = write_raw(
        "rank0.safetensors",
        vec![
            ("lora_unet_blk_attn_to_q.lora_down.weight", z(&[0, 6])),
            ("lora_unet_blk_attn_to_q.lora_up.weight", z(&[5, 0])),
        ],
    )?;
    let e = read_lora_file(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("rank 0"), "{e}");
    // Bad alpha.
    let p = write_raw(
        "alpha.safetensors",
        vec![
            ("lora_unet_blk_attn_to_q.lora_down.weight", z(&[2, 6])),
            ("lora_unet_blk_attn_to_q.lora_up.weight", z(&[5, 2])),
            ("lora_unet_blk_attn_to_q.alpha", Tensor::new(-1f32, &Device::Cpu)?),
        ],
    )?;
    let e = read_lora_file(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("lora_unet_blk_attn_to_q.alpha") && e.contains("-1"), "{e}");
    // Conv LoRA (4-D, e.g. SD 1.x proj_in 1×1 convs): an error naming it, or skipped on request.
    let p = write_raw(
        "conv.safetensors",
        vec![
            ("lora_unet_blk_proj_in.lora_down.weight", z(&[2, 6, 1, 1])),
            ("lora_unet_blk_proj_in.lora_up.weight", z(&[5, 2, 1, 1])),
            ("lora_unet_blk_attn_to_q.lora_down.weight", z(&[2, 6])),
            ("lora_unet_blk_attn_to_q.lora_up.weight", z(&[5, 2])),
        ],
    )?;
    let e = apply_lora_file(&m, "unet", &p, &opts).unwrap_err().to_string();
    assert!(
        e.contains("conv LoRA is not supported")
            && e.contains("lora_unet_blk_proj_in.lora_down.weight"),
        "{e}"
    );
    let ok = apply_lora_file(
        &m,
        "unet",
        &p,
        &ApplyOptions { unknown: UnknownKeys::Skip, ..Default::default() },
    )?;
    assert_eq!(ok.skipped, vec!["lora_unet_blk_proj_in.lora_down.weight".to_string()]);
    assert_eq!(ok.set.names(), vec!["blk.attn.to_q"]);
    ok.set.detach();
    // Other ranks are errors.
    let p = write_raw(
        "rank3.safetensors",
        vec![
            ("lora_unet_blk_attn_to_q.lora_down.weight", z(&[2, 6, 1])),
            ("lora_unet_blk_attn_to_q.lora_up.weight", z(&[5, 2])),
        ],
    )?;
    let e = read_lora_file(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("lora_unet_blk_attn_to_q.lora_down.weight") && e.contains("[2, 6, 1]"),
        "{e}"
    );
    // Not a LoRA file.
    let p = write_raw("model.safetensors", vec![("blk.attn.to_q.weight", z(&[5, 6]))])?;
    let e = read_lora_file(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("no LoRA keys"), "{e}");
    // Unsupported extra keys (DoRA).
    let p = write_raw(
        "dora.safetensors",
        vec![
            ("lora_unet_blk_attn_to_q.lora_down.weight", z(&[2, 6])),
            ("lora_unet_blk_attn_to_q.lora_up.weight", z(&[5, 2])),
            ("lora_unet_blk_attn_to_q.dora_scale", z(&[1, 6])),
        ],
    )?;
    let e = read_lora_file(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("dora_scale"), "{e}");
    // Truncated file.
    let set = attach_lora(&m, "unet", &cfg(2, 2.0), &mut SeededRng::new(1))?;
    let good = tmp("good.safetensors");
    save_lora(&[&set], &good, &LoraSaveOptions::default())?;
    set.detach();
    let bytes = std::fs::read(&good)?;
    let bad = tmp("truncated.safetensors");
    std::fs::write(&bad, &bytes[..bytes.len() - 10])?;
    let e = read_lora_file(&bad, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("truncated.safetensors") && e.contains("truncated or corrupt"), "{e}");
    std::fs::write(&bad, &bytes[..5])?;
    assert!(read_lora_file(&bad, &Device::Cpu).is_err());
    // Missing file.
    let e = read_lora_file(tmp("nope.safetensors"), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
    Ok(())
}

#[test]
fn kohya_names_resolve_through_the_model_and_ambiguity_is_an_error() -> Result<()> {
    let z = |o: usize, i: usize| Tensor::zeros((o, i), DType::F32, &Device::Cpu).unwrap();
    // `a.b_c` and `a_b.c` both become `a_b_c`.
    let m = vec![
        Linear::from_weights("a.b_c", z(3, 3), None),
        Linear::from_weights("a_b.c", z(3, 3), None),
        Linear::from_weights("d.e_f.g", z(3, 3), None),
    ];
    let p = write_raw(
        "amb.safetensors",
        vec![
            ("lora_unet_d_e_f_g.lora_down.weight", z(1, 3)),
            ("lora_unet_d_e_f_g.lora_up.weight", z(3, 1)),
        ],
    )?;
    let ok = apply_lora_file(&m, "unet", &p, &ApplyOptions::default())?;
    assert_eq!(ok.set.names(), vec!["d.e_f.g"]);
    ok.set.detach();
    let p = write_raw(
        "amb2.safetensors",
        vec![
            ("lora_unet_a_b_c.lora_down.weight", z(1, 3)),
            ("lora_unet_a_b_c.lora_up.weight", z(3, 1)),
        ],
    )?;
    let e = apply_lora_file(&m, "unet", &p, &ApplyOptions::default()).unwrap_err().to_string();
    assert!(e.contains("ambiguous") && e.contains("a.b_c") && e.contains("a_b.c"), "{e}");
    Ok(())
}

#[test]
fn save_is_atomic_and_rejects_empty_sets() -> Result<()> {
    let m = model(DType::F32, 71)?;
    let set = attach_lora(&m, "unet", &cfg(2, 2.0), &mut SeededRng::new(1))?;
    let dir = tmp("atomic");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("out.safetensors");
    save_lora(&[&set], &path, &LoraSaveOptions::default())?;
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["out.safetensors"], "no temporary file left behind");
    let e = save_lora(&[&set, &set], &path, &LoraSaveOptions::default()).unwrap_err().to_string();
    assert!(e.contains("twice"), "{e}");
    Ok(())
}

#[test]
fn diffusers_legacy_key_styles_resolve() -> Result<()> {
    // Attention-processor keys and `lora_linear_layer` keys (older diffusers files).
    let m = model(DType::F32, 81)?;
    let mut rng = SeededRng::new(82);
    let mut r = |s: &[usize]| rng.randn(s, DType::F32, &Device::Cpu).unwrap();
    let p = write_raw(
        "legacy.safetensors",
        vec![
            ("unet.blk.attn.processor.to_q_lora.down.weight", r(&[2, 6])),
            ("unet.blk.attn.processor.to_q_lora.up.weight", r(&[5, 2])),
            ("unet.blk.attn.processor.to_out_lora.down.weight", r(&[2, 5])),
            ("unet.blk.attn.processor.to_out_lora.up.weight", r(&[4, 2])),
            ("unet.blk.ff.lora_linear_layer.down.weight", r(&[2, 4])),
            ("unet.blk.ff.lora_linear_layer.up.weight", r(&[4, 2])),
        ],
    )?;
    let f = read_lora_file(&p, &Device::Cpu)?;
    assert_eq!(f.format, LoraFormat::PeftLegacy);
    let ok = apply_lora(&f, "unet", &m, &ApplyOptions::default())?;
    let mut names = ok.set.names();
    names.sort();
    assert_eq!(names, vec!["blk.attn.to_out.0", "blk.attn.to_q", "blk.ff"]);
    // alpha defaults to r: the delta is exactly B A x.
    let x = SeededRng::new(83).randn((2, 4), DType::F32, &Device::Cpu)?;
    let e = ok.set.entries().iter().find(|e| e.linear.name() == "blk.ff").unwrap();
    let want =
        x.matmul(&e.adapter.a().as_tensor().t()?)?.matmul(&e.adapter.b().as_tensor().t()?)?;
    assert!(max_abs(&e.adapter.forward(&x)?, &want)? < 1e-6);
    Ok(())
}

#[test]
fn lora_cli_arguments_and_multi_part_apply() -> Result<()> {
    assert_eq!(parse_lora_arg("a/b.safetensors")?, (PathBuf::from("a/b.safetensors"), 1.0));
    assert_eq!(parse_lora_arg("a/b.safetensors:0.5")?, (PathBuf::from("a/b.safetensors"), 0.5));
    assert_eq!(parse_lora_arg("c:/x.safetensors")?, (PathBuf::from("c:/x.safetensors"), 1.0));
    assert!(parse_lora_arg("x:inf").unwrap_err().to_string().contains("not finite"));
    assert!(parse_lora_arg("").is_err());
    assert!(parse_lora_arg(":0.5").is_err());
    // A file with unet and text-encoder parts.
    let unet = model(DType::F32, 91)?;
    let te = model(DType::F32, 92)?;
    let su = attach_lora(&unet, "unet", &cfg(2, 2.0), &mut SeededRng::new(1))?;
    let st = attach_lora(&te, "text_encoder", &cfg(2, 2.0), &mut SeededRng::new(2))?;
    let path = tmp("parts.safetensors");
    save_lora(&[&su, &st], &path, &LoraSaveOptions::default())?;
    su.detach();
    st.detach();
    let applied = apply_lora_file_to_parts(
        &path,
        &[("unet", unet.clone()), ("text_encoder", te.clone())],
        &ApplyOptions { scale: 0.5, ..Default::default() },
    )?;
    assert_eq!(applied.len(), 2);
    assert!(applied.iter().all(|a| a.set.entries().iter().all(|e| e.adapter.multiplier() == 0.5)));
    applied.iter().for_each(|a| a.set.detach());
    let e = apply_lora_file_to_parts(&path, &[("unet", unet)], &ApplyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_encoder"), "{e}");
    Ok(())
}
