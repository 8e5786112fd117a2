//! Projectors (orthonormality, round trips, what SVD and DCT select), GaLore and FRUGAL
//! against full Adam where they must agree, and optimizer-state bytes against AdamW.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_optim::*;

const KINDS: [ProjectionKind; 4] = [
    ProjectionKind::Svd,
    ProjectionKind::Dct,
    ProjectionKind::RandomOrthogonal,
    ProjectionKind::RandomColumns,
];

fn randn(rng: &mut SeededRng, shape: (usize, usize)) -> Result<Tensor> {
    Ok(rng.randn(shape, DType::F32, &Device::Cpu)?.to_dtype(DType::F64)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn frob(a: &Tensor) -> Result<f64> {
    Ok(a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?)
}

#[test]
fn dct_basis_is_orthonormal() -> Result<()> {
    for d in [1, 2, 5, 16, 33] {
        let q = dct2_basis(d, DType::F64, &Device::Cpu)?;
        let err = max_abs_diff(&q.t()?.matmul(&q)?, &Tensor::eye(d, DType::F64, &Device::Cpu)?)?;
        assert!(err < 1e-12, "d={d}: |QᵀQ - I| = {err}");
        // Column 0 is the constant vector 1/sqrt(d).
        let c0 = q.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f64>()?;
        assert!(c0.iter().all(|v| (v - 1.0 / (d as f64).sqrt()).abs() < 1e-12));
    }
    Ok(())
}

#[test]
fn projectors_are_orthonormal_and_round_trip() -> Result<()> {
    let mut rng = SeededRng::new(5);
    let mut dct = DctCache::default();
    for (m, n) in [(12, 7), (6, 10)] {
        let g = randn(&mut rng, (m, n))?;
        let d = m.min(n);
        for kind in KINDS {
            // Rank r < d: Q has orthonormal columns and projecting twice changes nothing.
            let p = make_projector(kind, &g, 3, &mut rng, &mut dct)?;
            assert_eq!(p.side, if m >= n { Side::Right } else { Side::Left });
            let q = p.dense(DType::F64)?;
            assert_eq!(q.dims(), &[d, 3]);
            let err =
                max_abs_diff(&q.t()?.matmul(&q)?, &Tensor::eye(3, DType::F64, &Device::Cpu)?)?;
            assert!(err < 1e-10, "{kind:?} {m}×{n}: |QᵀQ - I| = {err}");
            let r = p.project(&g)?;
            let back = p.project_back(&r, m, n)?;
            assert_eq!(back.dims(), &[m, n]);
            let again = p.project(&back)?;
            assert!(max_abs_diff(&again, &r)? < 1e-10, "{kind:?}: P(Pᵀ(P g)) != P g");
            // A rank-3 projection loses energy on a random matrix.
            assert!(frob(&back)? < frob(&g)? * 0.99);
            // Full rank: the round trip is the identity.
            let p = make_projector(kind, &g, d, &mut rng, &mut dct)?;
            let back = p.project_back(&p.project(&g)?, m, n)?;
            let err = max_abs_diff(&back, &g)?;
            assert!(err < 1e-10, "{kind:?} {m}×{n} full rank round trip error {err}");
        }
    }
    assert!(make_projector(ProjectionKind::Svd, &randn(&mut rng, (4, 3))?, 4, &mut rng, &mut dct)
        .is_err());
    Ok(())
}

#[test]
fn svd_projector_recovers_a_low_rank_matrix() -> Result<()> {
    let mut rng = SeededRng::new(6);
    let mut dct = DctCache::default();
    // G = A B has rank 2.
    let g = randn(&mut rng, (10, 2))?.matmul(&randn(&mut rng, (2, 8))?)?;
    let p = make_projector(ProjectionKind::Svd, &g, 2, &mut rng, &mut dct)?;
    let err = max_abs_diff(&p.project_back(&p.project(&g)?, 10, 8)?, &g)?;
    assert!(err < 1e-10, "rank-2 reconstruction error {err}");
    let p1 = make_projector(ProjectionKind::Svd, &g, 1, &mut rng, &mut dct)?;
    let err1 = max_abs_diff(&p1.project_back(&p1.project(&g)?, 10, 8)?, &g)?;
    assert!(err1 > 1e-3, "a rank-1 projection cannot reconstruct a rank-2 matrix ({err1})");
    // A random basis of the same rank keeps much less of it.
    let pr = make_projector(ProjectionKind::RandomOrthogonal, &g, 2, &mut rng, &mut dct)?;
    assert!(frob(&pr.project(&g)?)? < 0.9 * frob(&g)?);
    Ok(())
}

#[test]
fn dct_selects_the_columns_the_gradient_lives_in() -> Result<()> {
    let mut rng = SeededRng::new(7);
    let mut dct = DctCache::default();
    let n = 16;
    let basis = dct2_basis(n, DType::F64, &Device::Cpu)?;
    let keep = Tensor::new(&[2u32, 9, 13], &Device::Cpu)?;
    // G = M D[:, keep]ᵀ (20×16): its rows lie in the span of three DCT columns.
    let g = randn(&mut rng, (20, 3))?.matmul(&basis.index_select(&keep, 1)?.t()?)?;
    let p = make_projector(ProjectionKind::Dct, &g, 3, &mut rng, &mut dct)?;
    let Basis::DctColumns { indices, .. } = &p.basis else {
        panic!("DCT projector must store indices")
    };
    let mut got = indices.to_vec1::<u32>()?;
    got.sort_unstable();
    assert_eq!(got, vec![2, 9, 13]);
    assert_eq!(indices.dtype(), DType::U32);
    let err = max_abs_diff(&p.project_back(&p.project(&g)?, 20, n)?, &g)?;
    assert!(err < 1e-10, "{err}");
    // The basis is built once per size.
    let _ =
        make_projector(ProjectionKind::Dct, &randn(&mut rng, (30, 16))?, 3, &mut rng, &mut dct)?;
    assert_eq!(dct.bytes(), 16 * 16 * 8);
    Ok(())
}

fn grads(vars: &[&Var], seed: u64, step: u64) -> Result<GradStore> {
    let mut rng = SeededRng::fork(seed, step);
    let mut g = GradStore::default();
    for v in vars {
        g.insert(
            v.as_tensor(),
            rng.randn(v.shape(), DType::F32, &Device::Cpu)?.to_dtype(v.dtype())?,
        );
    }
    Ok(g)
}

fn init(seed: u64, shape: &[usize]) -> Result<Var> {
    Ok(Var::from_tensor(
        &SeededRng::new(seed).randn(shape, DType::F32, &Device::Cpu)?.to_dtype(DType::F64)?,
    )?)
}

#[test]
fn full_rank_coordinate_galore_is_adam_up_to_the_scale() -> Result<()> {
    // With a full-rank coordinate projector, Adam in the projected space is Adam on the full
    // matrix; GaLore's `scale` multiplies the update, i.e. the learning rate (without weight
    // decay). (A full-rank rotation such as SVD or DCT changes Adam's per-coordinate
    // normalisation, so only the coordinate projector gives equality.)
    let (lr, scale) = (1e-2, 0.25);
    let wa = init(1, &[6, 4])?;
    let wg = init(1, &[6, 4])?;
    let mut adam = Optim::new(
        AdamW,
        vec![ParamGroup::new(
            vec![NamedVar::new("w", wa.clone())],
            AdamWConfig { lr: lr * scale, weight_decay: 0.0, ..Default::default() },
        )],
    )?;
    let cfg = GaLoreConfig {
        lr,
        scale,
        rank: 4,
        update_gap: 2,
        kind: ProjectionKind::RandomColumns,
        eps: 1e-8,
        adam_form: AdamForm::Torch,
        ..Default::default()
    };
    let mut galore = Optim::new(
        GaLore::default(),
        vec![ParamGroup::new(vec![NamedVar::new("w", wg.clone())], cfg)],
    )?;
    for s in 0..6 {
        adam.step(&grads(&[&wa], 3, s)?)?;
        galore.step(&grads(&[&wg], 3, s)?)?;
    }
    let err = max_abs_diff(wa.as_tensor(), wg.as_tensor())?;
    assert!(err < 1e-12, "GaLore vs Adam: {err}");
    Ok(())
}

#[test]
fn galore_with_svd_reduces_a_least_squares_loss_and_resumes_exactly() -> Result<()> {
    // min |W X - Y|² with a rank-8 projection of a 16×12 weight.
    let mut rng = SeededRng::new(11);
    let x = randn(&mut rng, (12, 32))?;
    let y = randn(&mut rng, (16, 12))?.matmul(&x)?; // realisable: the loss can reach 0
    let make = |w: &Var| -> Result<Optim<GaLore>> {
        let cfg = GaLoreConfig {
            lr: 0.1,
            rank: 8,
            update_gap: 3,
            scale: 1.0,
            kind: ProjectionKind::Svd,
            ..Default::default()
        };
        Ok(Optim::new(
            GaLore::default(),
            vec![ParamGroup::new(vec![NamedVar::new("w", w.clone())], cfg)],
        )?)
    };
    let loss =
        |w: &Var| -> Result<Tensor> { Ok(w.as_tensor().matmul(&x)?.sub(&y)?.sqr()?.mean_all()?) };
    let w = Var::from_tensor(&Tensor::zeros((16, 12), DType::F64, &Device::Cpu)?)?;
    let mut opt = make(&w)?;
    let l0 = loss(&w)?.to_scalar::<f64>()?;
    let path =
        std::env::temp_dir().join(format!("gen-optim-galore-{}.safetensors", std::process::id()));
    let mut saved_w = None;
    for s in 0..15 {
        if s == 4 {
            opt.save_state(&path)?;
            saved_w = Some(w.as_tensor().copy()?);
        }
        opt.step(&loss(&w)?.backward()?)?;
    }
    let l1 = loss(&w)?.to_scalar::<f64>()?;
    assert!(l1 < 0.3 * l0, "loss {l0} -> {l1}");
    println!("GaLore rank 8 of 12, 15 steps: loss {l0:.4} -> {l1:.4}");
    // Resume from step 4 (inside a projection period: the saved projector must be used).
    let w2 = Var::from_tensor(&saved_w.unwrap())?;
    let mut opt2 = make(&w2)?;
    opt2.load_state(&path)?;
    assert!(opt2.param_state("w").unwrap().get("proj_q").is_some());
    for _ in 4..15 {
        opt2.step(&loss(&w2)?.backward()?)?;
    }
    assert_eq!(max_abs_diff(w.as_tensor(), w2.as_tensor())?, 0.0);
    std::fs::remove_file(&path)?;
    Ok(())
}

#[test]
fn frugal_full_density_is_adam_and_residual_gets_sign_steps() -> Result<()> {
    // Density 1 with a coordinate projector: nothing is state-free, FRUGAL is Adam (until the
    // first reset at T + 1).
    let lr = 1e-2;
    let wa = init(2, &[5, 8])?;
    let wf = init(2, &[5, 8])?;
    let mut adam = Optim::new(
        AdamW,
        vec![ParamGroup::new(
            vec![NamedVar::new("w", wa.clone())],
            AdamWConfig { lr, weight_decay: 0.0, ..Default::default() },
        )],
    )?;
    let cfg = FrugalConfig {
        lr,
        density: 1.0,
        update_gap: 100,
        kind: ProjectionKind::RandomColumns,
        ..Default::default()
    };
    let mut frugal = Optim::new(
        Frugal::default(),
        vec![ParamGroup::new(vec![NamedVar::new("w", wf.clone())], cfg)],
    )?;
    for s in 0..4 {
        adam.step(&grads(&[&wa], 4, s)?)?;
        frugal.step(&grads(&[&wf], 4, s)?)?;
    }
    assert!(max_abs_diff(wa.as_tensor(), wf.as_tensor())? < 1e-12);

    // Density 0.4 of 5 rows (the short side): 2 rows state-full, the others move by exactly
    // lr * scale * sign(g).
    let w = init(3, &[5, 8])?;
    let cfg = FrugalConfig {
        lr,
        density: 0.4,
        update_gap: 2,
        kind: ProjectionKind::RandomColumns,
        state_free_lr_scale: 0.1,
        ..Default::default()
    };
    let mut opt = Optim::new(
        Frugal::default(),
        vec![ParamGroup::new(vec![NamedVar::new("w", w.clone())], cfg)],
    )?;
    let before = w.as_tensor().copy()?;
    let g = grads(&[&w], 5, 0)?;
    let gt = g.get(w.as_tensor()).unwrap().clone();
    opt.step(&g)?;
    let idx = opt.param_state("w").unwrap().get("proj_idx").unwrap().to_vec1::<u32>()?;
    assert_eq!(idx.len(), 2);
    let delta = (w.as_tensor() - &before)?;
    for row in 0..5u32 {
        let d = delta.get(row as usize)?;
        let gr = gt.get(row as usize)?;
        if idx.contains(&row) {
            // First Adam step: -lr * m̂/(sqrt(v̂)+eps) = -lr * g/(|g| + eps).
            let want = (gr.abs()? + 1e-8)?.recip()?.mul(&gr)?.affine(-lr, 0.0)?;
            assert!(max_abs_diff(&d, &want)? < 1e-12);
        } else {
            let want = gr.sign()?.affine(-lr * 0.1, 0.0)?;
            assert!(max_abs_diff(&d, &want)? < 1e-15, "state-free row {row}");
        }
    }
    // Step 2 keeps the projector and the moments; step 3 re-projects and resets them.
    opt.step(&grads(&[&w], 5, 1)?)?;
    let g3 = grads(&[&w], 5, 2)?;
    let g3t = g3.get(w.as_tensor()).unwrap().clone();
    opt.step(&g3)?;
    let st = opt.param_state("w").unwrap();
    let idx3 = st.get("proj_idx").unwrap();
    let m = st.get("exp_avg").unwrap();
    // Reset moments: exp_avg = (1 - β1) * R of this step only.
    let want = g3t.index_select(idx3, 0)?.affine(0.1, 0.0)?;
    assert!(max_abs_diff(m, &want)? < 1e-12, "moments were not reset on re-projection");
    Ok(())
}

#[test]
fn galore_keeps_moments_across_reprojection() -> Result<()> {
    let w = init(4, &[6, 6])?;
    let cfg = GaLoreConfig {
        lr: 1e-2,
        rank: 2,
        update_gap: 1,
        kind: ProjectionKind::RandomColumns,
        ..Default::default()
    };
    let mut opt = Optim::new(
        GaLore::default(),
        vec![ParamGroup::new(vec![NamedVar::new("w", w.clone())], cfg)],
    )?;
    let g1 = grads(&[&w], 9, 0)?;
    let r1 = {
        opt.step(&g1)?;
        let st = opt.param_state("w").unwrap();
        g1.get(w.as_tensor()).unwrap().index_select(st.get("proj_idx").unwrap(), 1)?
    };
    let g2 = grads(&[&w], 9, 1)?;
    opt.step(&g2)?;
    let st = opt.param_state("w").unwrap();
    let r2 = g2.get(w.as_tensor()).unwrap().index_select(st.get("proj_idx").unwrap(), 1)?;
    // m2 = β1 (1-β1) R1 + (1-β1) R2, whatever the new projector.
    let want = (r1.affine(0.9 * 0.1, 0.0)? + r2.affine(0.1, 0.0)?)?;
    assert!(max_abs_diff(st.get("exp_avg").unwrap(), &want)? < 1e-12);
    Ok(())
}

#[test]
fn low_rank_state_bytes_against_adamw() -> Result<()> {
    // A 64×32 f32 weight and a 32 bias.
    let make = || -> Result<(Var, Var)> {
        let mut rng = SeededRng::new(8);
        Ok((
            Var::from_tensor(&rng.randn((64, 32), DType::F32, &Device::Cpu)?)?,
            Var::from_tensor(&rng.randn(32, DType::F32, &Device::Cpu)?)?,
        ))
    };
    let params =
        |w: &Var, b: &Var| vec![NamedVar::new("w", w.clone()), NamedVar::new("b", b.clone())];
    let (w, b) = make()?;
    let mut adam =
        Optim::new(AdamW, vec![ParamGroup::new(params(&w, &b), AdamWConfig::default())])?;
    adam.step(&grads(&[&w, &b], 1, 0)?)?;
    let adam_bytes = adam.total_state_bytes();
    assert_eq!(adam_bytes, 2 * 4 * (64 * 32 + 32));
    let r = 8;
    for kind in KINDS {
        let (w, b) = make()?;
        let cfg = GaLoreConfig { rank: r, kind, ..Default::default() };
        let mut g = Optim::new(GaLore::default(), vec![ParamGroup::new(params(&w, &b), cfg)])?;
        g.step(&grads(&[&w, &b], 1, 0)?)?;
        // Moments of R (64×r), the projector (32×r dense or r u32 indices), full Adam on the bias.
        let proj = match kind {
            ProjectionKind::Svd | ProjectionKind::RandomOrthogonal => 4 * 32 * r,
            _ => 4 * r,
        };
        let shared = if kind == ProjectionKind::Dct { 4 * 32 * 32 } else { 0 };
        let want = 2 * 4 * 64 * r + proj + 2 * 4 * 32 + shared;
        assert_eq!(g.total_state_bytes(), want, "{kind:?}");
        println!(
            "GaLore {kind:?} r={r}: {} bytes = {:.3} of AdamW",
            want,
            want as f64 / adam_bytes as f64
        );
        // Per-parameter state is under a third of AdamW's; the DCT basis is shared by every
        // layer with this size (here it is the only one, so it weighs more).
        assert!(want - shared < adam_bytes / 3 && want < adam_bytes);
    }
    let (w, b) = make()?;
    let cfg = FrugalConfig { density: 0.25, kind: ProjectionKind::Dct, ..Default::default() };
    let mut f = Optim::new(Frugal::default(), vec![ParamGroup::new(params(&w, &b), cfg)])?;
    f.step(&grads(&[&w, &b], 1, 0)?)?;
    assert_eq!(f.total_state_bytes(), 2 * 4 * 64 * 8 + 4 * 8 + 2 * 4 * 32 + 4 * 32 * 32);
    Ok(())
}

#[test]
fn conv_weights_are_viewed_as_matrices() -> Result<()> {
    let w = Var::from_tensor(&SeededRng::new(2).randn((8, 3, 3, 3), DType::F32, &Device::Cpu)?)?;
    let cfg = GaLoreConfig { rank: 4, kind: ProjectionKind::Svd, ..Default::default() };
    let mut opt = Optim::new(
        GaLore::default(),
        vec![ParamGroup::new(vec![NamedVar::new("conv", w.clone())], cfg)],
    )?;
    opt.step(&grads(&[&w], 2, 0)?)?;
    // 8 × 27 matrix: the short side (8 rows) is projected, Q is 8×4 and R is 4×27.
    let st = opt.param_state("conv").unwrap();
    assert_eq!(st.get("proj_q").unwrap().dims(), &[8, 4]);
    assert_eq!(st.get("exp_avg").unwrap().dims(), &[4, 27]);
    assert_eq!(w.dims(), &[8, 3, 3, 3]);
    Ok(())
}
