//! Parity with the reference optimizers (torch.optim.AdamW, torch.optim.SGD, adamp.AdamP,
//! adamp.SGDP, galore_torch.GaLoreAdamW with its SVD projector) on recorded gradients. Fixtures: `scripts/fixtures_optim.py`.

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use gen_optim::*;

const FIXTURE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/optim_parity.safetensors");

struct Case {
    t: HashMap<String, Tensor>,
    name: String,
}

impl Case {
    fn load(name: &str) -> Result<Self> {
        let t = candle_core::safetensors::load(FIXTURE, &Device::Cpu)?;
        let prefix = format!("{name}/");
        let t: HashMap<String, Tensor> = t
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v)))
            .collect();
        anyhow::ensure!(!t.is_empty(), "no fixture tensors for case {name}");
        Ok(Self { t, name: name.to_string() })
    }
    fn get(&self, key: &str) -> Option<&Tensor> {
        self.t.get(key)
    }
    fn req(&self, key: &str) -> Result<&Tensor> {
        self.get(key).ok_or_else(|| anyhow!("{}: missing fixture tensor {key}", self.name))
    }
    fn f(&self, key: &str) -> Result<f64> {
        Ok(self.req(key)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }
    fn i(&self, key: &str) -> Result<i64> {
        Ok(self.req(key)?.to_scalar::<i64>()?)
    }
    fn hp(&self, g: usize, k: &str) -> Result<f64> {
        self.f(&format!("group{g}/{k}"))
    }
    fn param_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .t
            .keys()
            .filter_map(|k| {
                k.strip_prefix("param/").and_then(|k| k.strip_suffix("/init")).map(str::to_string)
            })
            .collect();
        v.sort();
        v
    }
    fn n_groups(&self) -> usize {
        (0..).take_while(|g| self.get(&format!("group{g}/lr")).is_some()).count()
    }
    /// Parameter groups (as `Var`s initialised from the fixture) with configs made by `cfg`.
    fn groups<C: Clone>(&self, cfg: impl Fn(usize) -> Result<C>) -> Result<Vec<ParamGroup<C>>> {
        let mut groups: Vec<ParamGroup<C>> = (0..self.n_groups())
            .map(|g| Ok(ParamGroup::new(vec![], cfg(g)?)))
            .collect::<Result<_>>()?;
        for n in self.param_names() {
            let g = self.i(&format!("param/{n}/group"))? as usize;
            let var = Var::from_tensor(&self.req(&format!("param/{n}/init"))?.copy()?)?;
            groups[g].params.push(NamedVar::new(n, var));
        }
        Ok(groups)
    }
    fn steps(&self) -> Result<usize> {
        Ok(self.i("meta/steps")? as usize)
    }
    fn grads(&self, vars: &[NamedVar], k: usize) -> GradStore {
        let mut gs = GradStore::default();
        for p in vars {
            if let Some(g) = self.get(&format!("param/{}/grad{k}", p.name)) {
                gs.insert(p.var.as_tensor(), g.clone());
            }
        }
        gs
    }
}

/// Relative error of a tensor: `max |a - b| / max |b|` (elementwise relative error blows up on
/// the few elements that land near zero, where f32 rounding of the update dominates).
fn max_rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    anyhow::ensure!(a.len() == b.len(), "length {} vs {}", a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, y| m.max(y.abs()));
    let diff = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    Ok(diff / scale.max(1e-30))
}

/// Runs the case through `opt`, checking every parameter after every step; returns the max
/// relative error.
fn replay<O: Optimizer>(case: &Case, opt: &mut O, vars: &[NamedVar], tol: f64) -> Result<f64> {
    let mut worst: f64 = 0.0;
    for k in 0..case.steps()? {
        let report = opt.step(&case.grads(vars, k))?;
        let norm_ref = case.f(&format!("norm{k}"))?;
        anyhow::ensure!(
            (report.grad_norm - norm_ref).abs() <= 1e-6 * norm_ref,
            "{}: step {k}: grad norm {} vs {norm_ref}",
            case.name,
            report.grad_norm
        );
        anyhow::ensure!(!report.skipped && !report.nonfinite);
        for p in vars {
            let want = case.req(&format!("param/{}/after{k}", p.name))?;
            let err = max_rel_err(p.var.as_tensor(), want)?;
            worst = worst.max(err);
            anyhow::ensure!(
                err <= tol,
                "{}: step {k}: `{}` relative error {err:e} > {tol:e}",
                case.name,
                p.name
            );
        }
    }
    println!("{}: max relative error {worst:e}", case.name);
    Ok(worst)
}

fn all_vars<C>(groups: &[ParamGroup<C>]) -> Vec<NamedVar> {
    groups.iter().flat_map(|g| g.params.iter().cloned()).collect()
}

fn tol_for(case: &Case) -> Result<f64> {
    let first = case.param_names()[0].clone();
    Ok(match case.req(&format!("param/{first}/init"))?.dtype() {
        DType::F64 => 1e-12,
        _ => 1e-6,
    })
}

fn adamw_case(name: &str) -> Result<f64> {
    let case = Case::load(name)?;
    let groups = case.groups(|g| {
        Ok(AdamWConfig {
            lr: case.hp(g, "lr")?,
            betas: (case.hp(g, "beta1")?, case.hp(g, "beta2")?),
            eps: case.hp(g, "eps")?,
            weight_decay: case.hp(g, "weight_decay")?,
        })
    })?;
    let vars = all_vars(&groups);
    let clip = case.f("meta/max_grad_norm")?;
    let mut opt = Optim::new(AdamW, groups)?.with_options(StepOptions {
        max_grad_norm: (clip > 0.0).then_some(clip),
        ..Default::default()
    });
    replay(&case, &mut opt, &vars, tol_for(&case)?)
}

fn sgd_case(name: &str) -> Result<f64> {
    let case = Case::load(name)?;
    let groups = case.groups(|g| {
        Ok(SgdConfig {
            lr: case.hp(g, "lr")?,
            momentum: case.hp(g, "momentum")?,
            dampening: case.hp(g, "dampening")?,
            weight_decay: case.hp(g, "weight_decay")?,
            nesterov: case.hp(g, "nesterov")? != 0.0,
        })
    })?;
    let vars = all_vars(&groups);
    let mut opt = Optim::new(Sgd, groups)?;
    replay(&case, &mut opt, &vars, tol_for(&case)?)
}

/// Checks that our scale-invariance test picks the same view as adamp's on every recorded step.
fn check_projection_kinds(case: &Case, eps: f64, delta: f64) -> Result<()> {
    let mut seen = [0usize; 3];
    for n in case.param_names() {
        let mut before = case.req(&format!("param/{n}/init"))?.clone();
        for k in 0..case.steps()? {
            let grad = case.req(&format!("param/{n}/grad{k}"))?;
            let want = case.i(&format!("param/{n}/proj{k}"))?;
            let got = if before.rank() > 1 {
                match scale_invariant_projection(&before, grad, grad, delta, eps)?.1 {
                    None => 0,
                    Some(Projected::Channel) => 1,
                    Some(Projected::Layer) => 2,
                }
            } else {
                0
            };
            anyhow::ensure!(
                got == want,
                "{}: `{n}` step {k}: projection kind {got}, adamp says {want}",
                case.name
            );
            seen[got as usize] += 1;
            before = case.req(&format!("param/{n}/after{k}"))?.clone();
        }
    }
    anyhow::ensure!(
        seen.iter().all(|&c| c > 0),
        "{}: fixture exercises projection kinds {seen:?}",
        case.name
    );
    Ok(())
}

fn adamp_case(name: &str) -> Result<f64> {
    let case = Case::load(name)?;
    let groups = case.groups(|g| {
        Ok(AdamPConfig {
            lr: case.hp(g, "lr")?,
            betas: (case.hp(g, "beta1")?, case.hp(g, "beta2")?),
            eps: case.hp(g, "eps")?,
            weight_decay: case.hp(g, "weight_decay")?,
            delta: case.hp(g, "delta")?,
            wd_ratio: case.hp(g, "wd_ratio")?,
            nesterov: case.hp(g, "nesterov")? != 0.0,
        })
    })?;
    check_projection_kinds(&case, case.hp(0, "eps")?, case.hp(0, "delta")?)?;
    let vars = all_vars(&groups);
    let mut opt = Optim::new(AdamP, groups)?;
    replay(&case, &mut opt, &vars, tol_for(&case)?)
}

fn sgdp_case(name: &str) -> Result<f64> {
    let case = Case::load(name)?;
    let groups = case.groups(|g| {
        Ok(SgdpConfig {
            lr: case.hp(g, "lr")?,
            momentum: case.hp(g, "momentum")?,
            dampening: case.hp(g, "dampening")?,
            weight_decay: case.hp(g, "weight_decay")?,
            nesterov: case.hp(g, "nesterov")? != 0.0,
            eps: case.hp(g, "eps")?,
            delta: case.hp(g, "delta")?,
            wd_ratio: case.hp(g, "wd_ratio")?,
        })
    })?;
    check_projection_kinds(&case, case.hp(0, "eps")?, case.hp(0, "delta")?)?;
    let vars = all_vars(&groups);
    let mut opt = Optim::new(Sgdp, groups)?;
    replay(&case, &mut opt, &vars, tol_for(&case)?)
}

fn galore_case(name: &str) -> Result<f64> {
    let case = Case::load(name)?;
    let groups = case.groups(|g| {
        let opt = |k: &str, default: f64| {
            if case.get(&format!("group{g}/{k}")).is_some() {
                case.hp(g, k)
            } else {
                Ok(default)
            }
        };
        Ok(GaLoreConfig {
            lr: case.hp(g, "lr")?,
            betas: (case.hp(g, "beta1")?, case.hp(g, "beta2")?),
            eps: case.hp(g, "eps")?,
            weight_decay: case.hp(g, "weight_decay")?,
            rank: opt("rank", 1.0)? as usize,
            update_gap: opt("update_proj_gap", 1.0)? as u64,
            scale: opt("scale", 1.0)?,
            kind: ProjectionKind::Svd,
            seed: 0,
            adam_form: AdamForm::Transformers,
        })
    })?;
    let vars = all_vars(&groups);
    let mut opt = Optim::new(GaLore::default(), groups)?;
    replay(&case, &mut opt, &vars, tol_for(&case)?)
}

#[test]
fn galore_matches_reference() -> Result<()> {
    galore_case("galore").context("galore")?;
    galore_case("galore_reproject").context("galore_reproject")?;
    Ok(())
}

#[test]
fn adamw_matches_torch() -> Result<()> {
    adamw_case("adamw_groups").context("adamw_groups")?;
    adamw_case("adamw_f32_nowd").context("adamw_f32_nowd")?;
    Ok(())
}

#[test]
fn adamw_with_clipping_matches_torch() -> Result<()> {
    adamw_case("adamw_clip")?;
    Ok(())
}

#[test]
fn sgd_matches_torch() -> Result<()> {
    for c in ["sgd_momentum", "sgd_nesterov", "sgd_f32"] {
        sgd_case(c).context(c)?;
    }
    Ok(())
}

#[test]
fn adamp_matches_clovaai() -> Result<()> {
    for c in ["adamp", "adamp_nesterov", "adamp_f32"] {
        adamp_case(c).context(c)?;
    }
    Ok(())
}

#[test]
fn sgdp_matches_clovaai() -> Result<()> {
    for c in ["sgdp", "sgdp_nesterov"] {
        sgdp_case(c).context(c)?;
    }
    Ok(())
}

/// The DCT projector against IST-DASLab's FFTLowRankProjector (sim_type 'makhoul', L1 norm):
/// same orthonormal basis, same selected columns/rows, same projected gradient. The reference
/// builds its DCT matrix in f32 (then casts), hence the 1e-5 tolerance on values.
#[test]
fn dct_projector_matches_ista_daslab() -> Result<()> {
    let case = Case::load("dct")?;
    let mut dct = DctCache::default();
    let mut rng = gen_core::SeededRng::new(0);
    for i in 0..2 {
        let g = case.req(&format!("g{i}"))?;
        let (m, n) = g.dims2()?;
        let d = m.min(n);
        let basis_err = max_rel_err(
            &dct2_basis(d, DType::F64, &Device::Cpu)?,
            case.req(&format!("basis{d}"))?,
        )?;
        anyhow::ensure!(basis_err < 1e-5, "DCT basis {d}: relative error {basis_err:e}");
        let p = make_projector(ProjectionKind::Dct, g, 4, &mut rng, &mut dct)?;
        let Basis::DctColumns { indices, .. } = &p.basis else {
            anyhow::bail!("DCT projector without indices")
        };
        let ours: Vec<u32> = indices.to_vec1()?;
        let mut order: Vec<usize> = (0..ours.len()).collect();
        order.sort_by_key(|&k| ours[k]);
        let sorted: Vec<i64> = order.iter().map(|&k| ours[k] as i64).collect();
        let want: Vec<i64> = case.req(&format!("idx{i}"))?.to_vec1()?;
        anyhow::ensure!(sorted == want, "g{i} ({m}×{n}): selected {sorted:?}, reference {want:?}");
        let r = p.project(g)?;
        let perm = Tensor::new(order.iter().map(|&k| k as u32).collect::<Vec<_>>(), &Device::Cpu)?;
        let r = if m >= n { r.index_select(&perm, 1)? } else { r.index_select(&perm, 0)? };
        let err = max_rel_err(&r, case.req(&format!("r{i}"))?)?;
        anyhow::ensure!(err < 1e-5, "g{i}: projected gradient relative error {err:e}");
        println!(
            "dct g{i} {m}×{n}: indices {sorted:?}, basis err {basis_err:e}, projection err {err:e}"
        );
    }
    Ok(())
}
