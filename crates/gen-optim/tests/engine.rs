//! The shared engine: clipping, NaN/Inf guard, missing gradients, state save/load, state
//! bytes, bad input, signSGD and half-precision parameters.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_optim::*;

fn var(v: &[f64], shape: &[usize]) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)?)?)
}

fn vals(v: &Var) -> Result<Vec<f64>> {
    Ok(v.as_tensor().to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn tmp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gen-optim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn clipping_scales_like_torch_and_reports_pre_clip_norm() -> Result<()> {
    // SGD without momentum: the update is exactly -lr * clipped gradient.
    let w = var(&[0.0, 0.0], &[2])?;
    let mut opt = Optim::new(
        Sgd,
        vec![ParamGroup::new(
            vec![NamedVar::new("w", w.clone())],
            SgdConfig { lr: 1.0, ..Default::default() },
        )],
    )?
    .with_options(StepOptions { max_grad_norm: Some(1.0), skip_nonfinite: true });
    let mut g = GradStore::default();
    g.insert(w.as_tensor(), Tensor::new(&[3.0f64, 4.0], &Device::Cpu)?);
    let r = opt.step(&g)?;
    assert!((r.grad_norm - 5.0).abs() < 1e-12, "{r:?}");
    assert!(r.clipped && !r.skipped && r.updated == 1);
    let coef = 1.0 / (5.0 + 1e-6);
    let v = vals(&w)?;
    assert!((v[0] + 3.0 * coef).abs() < 1e-12 && (v[1] + 4.0 * coef).abs() < 1e-12, "{v:?}");
    // Below the threshold nothing is scaled.
    let mut g = GradStore::default();
    g.insert(w.as_tensor(), Tensor::new(&[0.3f64, 0.4], &Device::Cpu)?);
    let r = opt.step(&g)?;
    assert!(!r.clipped && (r.grad_norm - 0.5).abs() < 1e-12);
    let v2 = vals(&w)?;
    assert!((v2[0] - (v[0] - 0.3)).abs() < 1e-12 && (v2[1] - (v[1] - 0.4)).abs() < 1e-12);
    Ok(())
}

#[test]
fn nonfinite_gradient_skips_the_step() -> Result<()> {
    let a = var(&[1.0, 2.0], &[2])?;
    let b = var(&[3.0], &[1])?;
    let params = vec![NamedVar::new("a", a.clone()), NamedVar::new("b", b.clone())];
    let mut opt = Optim::new(AdamW, vec![ParamGroup::new(params, AdamWConfig::default())])?;
    let mut g = GradStore::default();
    g.insert(a.as_tensor(), Tensor::new(&[f64::NAN, 1.0], &Device::Cpu)?);
    g.insert(b.as_tensor(), Tensor::new(&[1.0f64], &Device::Cpu)?);
    let r = opt.step(&g)?;
    assert!(r.skipped && r.nonfinite && r.updated == 0 && r.grad_norm.is_nan(), "{r:?}");
    assert_eq!(vals(&a)?, vec![1.0, 2.0]);
    assert_eq!(vals(&b)?, vec![3.0]);
    assert_eq!(opt.step_count(), 0);
    assert_eq!(opt.state_bytes(), vec![0]);
    let mut g = GradStore::default();
    g.insert(b.as_tensor(), Tensor::new(&[f64::INFINITY], &Device::Cpu)?);
    assert!(opt.step(&g)?.skipped);
    Ok(())
}

#[test]
fn vars_without_gradient_are_untouched_and_keep_no_state() -> Result<()> {
    // A real backward pass: `unused` is not in the graph and gets no gradient.
    let used = var(&[1.0, -2.0, 0.5], &[3])?;
    let unused = var(&[7.0], &[1])?;
    let params = vec![NamedVar::new("used", used.clone()), NamedVar::new("unused", unused.clone())];
    let mut opt = Optim::new(
        AdamW,
        vec![ParamGroup::new(
            params,
            AdamWConfig { lr: 0.1, weight_decay: 0.1, ..Default::default() },
        )],
    )?;
    let mut losses = vec![];
    for _ in 0..20 {
        let loss = used.as_tensor().sqr()?.sum_all()?;
        losses.push(loss.to_scalar::<f64>()?);
        let r = opt.step(&loss.backward()?)?;
        assert_eq!((r.updated, r.without_grad), (1, 1));
    }
    assert!(losses[19] < 0.5 * losses[0], "loss did not decrease: {losses:?}");
    assert_eq!(vals(&unused)?, vec![7.0], "weight decay must not touch a var without gradient");
    assert!(opt.param_state("unused").unwrap().slots.is_empty());
    assert_eq!(opt.param_state("used").unwrap().step, 20);
    Ok(())
}

fn adamw_over(w: &Var, b: &Var) -> Result<Optim<AdamW>> {
    let groups = vec![
        ParamGroup::new(
            vec![NamedVar::new("layer.w", w.clone())],
            AdamWConfig { lr: 1e-2, ..Default::default() },
        ),
        ParamGroup::new(
            vec![NamedVar::new("layer.b", b.clone())],
            AdamWConfig { lr: 5e-3, weight_decay: 0.0, ..Default::default() },
        ),
    ];
    Ok(Optim::new(AdamW, groups)?)
}

fn make_adamw(seed: u64) -> Result<(Vec<Var>, Optim<AdamW>)> {
    let mut rng = SeededRng::new(seed);
    let w = Var::from_tensor(&rng.randn((4, 3), DType::F32, &Device::Cpu)?)?;
    let b = Var::from_tensor(&rng.randn(3, DType::F32, &Device::Cpu)?)?;
    let opt = adamw_over(&w, &b)?;
    Ok((vec![w, b], opt))
}

fn grads_for(vars: &[Var], step: u64) -> Result<GradStore> {
    let mut rng = SeededRng::fork(99, step);
    let mut g = GradStore::default();
    for v in vars {
        g.insert(v.as_tensor(), rng.randn(v.shape(), DType::F32, &Device::Cpu)?);
    }
    Ok(g)
}

#[test]
fn save_and_load_state_resumes_exactly() -> Result<()> {
    let (va, mut a) = make_adamw(1)?;
    for s in 0..6 {
        a.step(&grads_for(&va, s)?)?;
    }
    let (vb, mut b) = make_adamw(1)?;
    for s in 0..3 {
        b.step(&grads_for(&vb, s)?)?;
    }
    let path = tmp_path("adamw_state.safetensors");
    b.save_state(&path)?;
    // A fresh optimizer over copies of the current parameter values.
    let vc: Vec<Var> = vb
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
        .collect::<candle_core::Result<_>>()?;
    let mut c = adamw_over(&vc[0], &vc[1])?;
    c.load_state(&path)?;
    assert_eq!(c.step_count(), 3);
    assert_eq!(c.state_bytes(), b.state_bytes());
    for s in 3..6 {
        c.step(&grads_for(&vc, s)?)?;
    }
    for (x, y) in va.iter().zip(&vc) {
        assert_eq!(vals(x)?, vals(y)?, "resumed run differs from the continuous one");
    }
    // Without loading, the moments restart and the result differs: the check can fail.
    let vd: Vec<Var> = vb
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
        .collect::<candle_core::Result<_>>()?;
    let mut d = adamw_over(&vd[0], &vd[1])?;
    for s in 3..6 {
        d.step(&grads_for(&vd, s)?)?;
    }
    assert_ne!(vals(&va[0])?, vals(&vd[0])?);
    std::fs::remove_file(&path)?;
    Ok(())
}

#[test]
fn load_state_rejects_foreign_files() -> Result<()> {
    let (va, mut a) = make_adamw(2)?;
    a.step(&grads_for(&va, 0)?)?;
    let path = tmp_path("adamw_state_foreign.safetensors");
    a.save_state(&path)?;
    let other = var(&[1.0], &[1])?;
    let mut o = Optim::new(
        AdamW,
        vec![ParamGroup::new(vec![NamedVar::new("other", other)], AdamWConfig::default())],
    )?;
    let err = o.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("other.__step__") && err.contains("adamw_state_foreign"), "{err}");
    // Same names, other shapes: the error names the slot and both shapes.
    let w = Var::from_tensor(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?)?;
    let b = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu)?)?;
    let mut o2 = adamw_over(&w, &b)?;
    let err = o2.load_state(&path).unwrap_err().to_string();
    assert!(
        err.contains("layer.w.exp_avg") && err.contains("[2, 2]") && err.contains("[4, 3]"),
        "{err}"
    );
    let err = o.load_state(&tmp_path("missing.safetensors")).unwrap_err().to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
    std::fs::remove_file(&path)?;
    Ok(())
}

#[test]
fn state_bytes_per_group() -> Result<()> {
    let (va, mut a) = make_adamw(3)?;
    assert_eq!(a.state_bytes(), vec![0, 0]);
    a.step(&grads_for(&va, 0)?)?;
    // Two f32 moments per element.
    assert_eq!(a.state_bytes(), vec![2 * 12 * 4, 2 * 3 * 4]);
    let w = var(&[1.0; 6], &[2, 3])?;
    let mut s = Optim::new(
        SignSgd,
        vec![ParamGroup::new(vec![NamedVar::new("w", w.clone())], SignSgdConfig::default())],
    )?;
    let mut g = GradStore::default();
    g.insert(w.as_tensor(), Tensor::ones((2, 3), DType::F64, &Device::Cpu)?);
    s.step(&g)?;
    assert_eq!(s.state_bytes(), vec![0], "signSGD without momentum keeps no state");
    Ok(())
}

#[test]
fn bad_configs_and_names_are_rejected() -> Result<()> {
    let w = var(&[1.0], &[1])?;
    let nv = || vec![NamedVar::new("w", w.clone())];
    let e = Optim::new(
        AdamW,
        vec![ParamGroup::new(nv(), AdamWConfig { lr: -1.0, ..Default::default() })],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("lr") && e.contains("-1"), "{e}");
    let e = Optim::new(
        AdamW,
        vec![ParamGroup::new(nv(), AdamWConfig { betas: (1.0, 0.9), ..Default::default() })],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("betas.0"), "{e}");
    let e = Optim::new(
        Sgd,
        vec![ParamGroup::new(nv(), SgdConfig { nesterov: true, ..Default::default() })],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("nesterov"), "{e}");
    let e = Optim::new(
        Sgdp,
        vec![ParamGroup::new(nv(), SgdpConfig { momentum: 1.0, ..Default::default() })],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("momentum"), "{e}");
    let e = Optim::new(
        AdamW,
        vec![
            ParamGroup::new(nv(), AdamWConfig::default()),
            ParamGroup::new(nv(), AdamWConfig::default()),
        ],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("`w` appears twice"), "{e}");
    // A gradient of the wrong shape names the parameter.
    let mut opt = Optim::new(AdamW, vec![ParamGroup::new(nv(), AdamWConfig::default())])?;
    let mut g = GradStore::default();
    g.insert(w.as_tensor(), Tensor::zeros(2, DType::F64, &Device::Cpu)?);
    let e = opt.step(&g).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("[1]") && e.contains("[2]"), "{e}");
    // set_lr reaches every group; a bad group index is an error.
    let mut opt = Optim::new(AdamW, vec![ParamGroup::new(nv(), AdamWConfig::default())])?;
    opt.set_lr(0.5);
    assert_eq!(opt.lrs(), vec![0.5]);
    assert!(opt.set_group_lr(3, 0.1).is_err());
    Ok(())
}

#[test]
fn signsgd_steps_by_sign() -> Result<()> {
    let w = var(&[1.0, 1.0, 1.0], &[3])?;
    let cfg = SignSgdConfig { lr: 0.1, weight_decay: 0.5, momentum: 0.0 };
    let mut opt =
        Optim::new(SignSgd, vec![ParamGroup::new(vec![NamedVar::new("w", w.clone())], cfg)])?;
    let mut g = GradStore::default();
    g.insert(w.as_tensor(), Tensor::new(&[2.5f64, -1e-3, 0.0], &Device::Cpu)?);
    opt.step(&g)?;
    // p = p (1 - 0.1*0.5) - 0.1 sign(g)
    let want = [0.95 - 0.1, 0.95 + 0.1, 0.95];
    for (x, y) in vals(&w)?.iter().zip(want) {
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }
    // Signum: the sign of the running mean, not of the latest gradient.
    let w = var(&[0.0], &[1])?;
    let cfg = SignSgdConfig { lr: 1.0, weight_decay: 0.0, momentum: 0.9 };
    let mut opt =
        Optim::new(SignSgd, vec![ParamGroup::new(vec![NamedVar::new("w", w.clone())], cfg)])?;
    for gv in [1.0f64, -0.5] {
        let mut g = GradStore::default();
        g.insert(w.as_tensor(), Tensor::new(&[gv], &Device::Cpu)?);
        opt.step(&g)?;
    }
    // m1 = 0.1, m2 = 0.09 - 0.05 = 0.04 > 0: two steps of -1.
    assert_eq!(vals(&w)?, vec![-2.0]);
    Ok(())
}

#[test]
fn half_precision_params_keep_f32_state() -> Result<()> {
    let w = Var::from_tensor(&Tensor::new(&[1.0f32, -1.0], &Device::Cpu)?.to_dtype(DType::BF16)?)?;
    let mut opt = Optim::new(
        AdamW,
        vec![ParamGroup::new(
            vec![NamedVar::new("w", w.clone())],
            AdamWConfig { lr: 0.25, weight_decay: 0.0, ..Default::default() },
        )],
    )?;
    let mut g = GradStore::default();
    g.insert(w.as_tensor(), Tensor::new(&[1.0f32, -1.0], &Device::Cpu)?.to_dtype(DType::BF16)?);
    opt.step(&g)?;
    assert_eq!(w.dtype(), DType::BF16);
    assert_eq!(opt.param_state("w").unwrap().get("exp_avg").unwrap().dtype(), DType::F32);
    // First Adam step moves by lr * sign(g) (up to eps): 1 - 0.25, -1 + 0.25, exact in bf16.
    assert_eq!(vals(&w)?, vec![0.75, -0.75]);
    Ok(())
}

#[test]
fn schedule_drives_group_rates() -> Result<()> {
    let (_, mut opt) = make_adamw(4)?;
    let base = opt.lrs();
    assert_eq!(base, vec![1e-2, 5e-3]);
    let sched = LinearDecay::new(1.0, 0, 10, 0.0)?;
    apply_schedule(&mut opt, &base, &sched, 5)?;
    assert_eq!(opt.lrs(), vec![0.5e-2, 2.5e-3]);
    let err = apply_schedule(&mut opt, &[1.0], &sched, 0).unwrap_err().to_string();
    assert!(err.contains("1 rates for 2 parameter groups"), "{err}");
    Ok(())
}

#[test]
fn standalone_clip_matches_the_engine_rule() -> Result<()> {
    let a = var(&[0.0, 0.0], &[2])?;
    let b = var(&[0.0], &[1])?;
    let c = var(&[0.0], &[1])?; // no gradient
    let mut g = GradStore::default();
    g.insert(a.as_tensor(), Tensor::new(&[3.0f64, 0.0], &Device::Cpu)?);
    g.insert(b.as_tensor(), Tensor::new(&[4.0f64], &Device::Cpu)?);
    let norm = clip_grad_norm(&mut g, &[&a, &b, &c], 2.5)?;
    assert!((norm - 5.0).abs() < 1e-12);
    let coef = 2.5 / (5.0 + 1e-6);
    let ga = g.get(a.as_tensor()).unwrap().to_vec1::<f64>()?;
    let gb = g.get(b.as_tensor()).unwrap().to_vec1::<f64>()?;
    assert!(
        (ga[0] - 3.0 * coef).abs() < 1e-12 && ga[1] == 0.0 && (gb[0] - 4.0 * coef).abs() < 1e-12
    );
    assert!(g.get(c.as_tensor()).is_none());
    // Under the threshold: untouched.
    let norm = clip_grad_norm(&mut g, &[&a, &b], 10.0)?;
    assert!((norm - 2.5).abs() < 1e-5);
    assert_eq!(g.get(b.as_tensor()).unwrap().to_vec1::<f64>()?, gb);
    Ok(())
}
