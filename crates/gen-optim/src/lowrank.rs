//! Low-rank optimizers: GaLore (Zhao et al. 2024, jiaweizzhao/GaLore) and FRUGAL (Zmushko et
//! al. 2025), over the projectors of [`crate::projector`].
//!
//! Both see a parameter with two or more dimensions as an m×n matrix (`(d0, rest)`, so a conv
//! weight `(out, in, kh, kw)` becomes `out × in·kh·kw`); parameters with fewer dimensions get
//! plain AdamW with the group's settings. The projector is rebuilt at steps 1, T+1, 2T+1, ...
//! (T = `update_gap`) from the gradient of that step, and is part of the saved state
//! (`proj_q`: dense basis, or `proj_idx`: u32 indices).
//!
//! GaLore's reference builds on transformers' AdamW (`denom = sqrt(v) + eps`, step
//! `lr sqrt(1-β2^t)/(1-β1^t)`, weight decay after the step); [`GaLoreConfig::adam_form`]
//! chooses between that ([`AdamForm::Transformers`], the default, matched against
//! `galore_torch.GaLoreAdamW` in `tests/parity.rs`) and the PyTorch form of [`crate::AdamW`]
//! ([`AdamForm::Torch`]). FRUGAL uses the PyTorch form.

use candle_core::Tensor;
use gen_core::{Error, Result, SeededRng};

use crate::adamw::{adam_direction, adam_moments, check_betas, check_lr, check_nonneg, AdamForm};
use crate::optimizer::{GroupConfig, ParamCtx, ParamState, UpdateRule};
use crate::projector::{make_projector, Basis, DctCache, ProjectionKind, Projector, Side};

const SLOT_Q: &str = "proj_q";
const SLOT_IDX: &str = "proj_idx";

/// The (m, n) matrix view of a parameter, or `None` for fewer than two dimensions.
fn matrix_dims(t: &Tensor) -> Option<(usize, usize)> {
    let d = t.dims();
    if d.len() < 2 {
        return None;
    }
    Some((d[0], d[1..].iter().product()))
}

/// The projector held in `state`, if any, for the m×n gradient `g2`.
fn stored_projector(
    state: &ParamState,
    kind: ProjectionKind,
    g2: &Tensor,
    dct: &mut DctCache,
) -> Result<Option<Projector>> {
    let (m, n) = g2.dims2()?;
    let side = Side::for_shape(m, n);
    let d = side.dim(m, n);
    let basis = match kind {
        ProjectionKind::Svd | ProjectionKind::RandomOrthogonal => match state.get(SLOT_Q) {
            Some(q) => Basis::Dense(q.clone()),
            None => return Ok(None),
        },
        ProjectionKind::RandomColumns => match state.get(SLOT_IDX) {
            Some(i) => Basis::Columns { indices: i.clone(), dim: d },
            None => return Ok(None),
        },
        ProjectionKind::Dct => match state.get(SLOT_IDX) {
            Some(i) => Basis::DctColumns {
                indices: i.clone(),
                basis: dct.get(d, g2.dtype(), g2.device())?,
            },
            None => return Ok(None),
        },
    };
    Ok(Some(Projector { side, basis }))
}

fn store_projector(state: &mut ParamState, p: &Projector) {
    state.slots.remove(SLOT_Q);
    state.slots.remove(SLOT_IDX);
    match &p.basis {
        Basis::Dense(q) => state.set(SLOT_Q, q.clone()),
        Basis::Columns { indices, .. } | Basis::DctColumns { indices, .. } => {
            state.set(SLOT_IDX, indices.clone())
        }
    }
}

/// The seeded generator of projection number `refresh` of parameter `index`: the same
/// projections on every run and after a resume, without saving generator state.
fn projection_rng(seed: u64, index: usize, refresh: u64) -> SeededRng {
    SeededRng::fork(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), refresh)
}

/// How a parameter's projector is built.
#[derive(Clone, Copy, Debug)]
struct ProjectionSpec {
    kind: ProjectionKind,
    rank: usize,
    update_gap: u64,
    seed: u64,
}

/// Returns the projector for this step (rebuilt on steps 1, T+1, ...) and whether it is new.
fn projector_for_step(
    state: &mut ParamState,
    spec: ProjectionSpec,
    ctx: ParamCtx<'_>,
    g2: &Tensor,
    dct: &mut DctCache,
) -> Result<(Projector, bool)> {
    let t = state.step;
    let refresh = (t - 1) / spec.update_gap;
    let period_start = refresh * spec.update_gap + 1;
    if t != period_start {
        if let Some(p) = stored_projector(state, spec.kind, g2, dct)? {
            return Ok((p, false));
        }
    }
    let mut rng = projection_rng(spec.seed, ctx.index, refresh);
    let p = make_projector(spec.kind, g2, spec.rank, &mut rng, dct)
        .map_err(|e| Error::msg(format!("`{}`: {e}", ctx.name)))?;
    store_projector(state, &p);
    Ok((p, true))
}

/// Low-rank state: moments share one shape whose projected side has the parameter's length
/// (full Adam for parameters with fewer than two dimensions).
fn check_low_rank_state(
    param: &candle_core::Var,
    state: &ParamState,
) -> std::result::Result<(), (String, Vec<usize>)> {
    let Some((m, n)) = matrix_dims(param) else {
        return match state.slots.iter().find(|(_, t)| t.dims() != param.dims()) {
            Some((k, t)) => Err((k.clone(), t.dims().to_vec())),
            None => Ok(()),
        };
    };
    for key in ["exp_avg", "exp_avg_sq"] {
        if let Some(t) = state.get(key) {
            let ok = match (Side::for_shape(m, n), t.dims()) {
                (Side::Right, [a, _]) => *a == m,
                (Side::Left, [_, b]) => *b == n,
                _ => false,
            };
            if !ok {
                return Err((key.to_string(), t.dims().to_vec()));
            }
        }
    }
    Ok(())
}

fn check_gap(gap: u64) -> Result<()> {
    if gap == 0 {
        return Err(Error::invalid("update_gap", "0 (must be >= 1)"));
    }
    Ok(())
}

/// Applies an Adam update `lr * factor * upd` and decoupled weight decay in the order of `form`.
fn apply_adam(
    param: &Tensor,
    upd: &Tensor,
    lr: f64,
    factor: f64,
    wd: f64,
    form: AdamForm,
) -> Result<Tensor> {
    let upd = upd.reshape(param.shape())?.affine(lr * factor, 0.0)?;
    Ok(match form {
        AdamForm::Torch => {
            let p = if wd != 0.0 { param.affine(1.0 - lr * wd, 0.0)? } else { param.clone() };
            (p - upd)?
        }
        AdamForm::Transformers => {
            let p = (param - upd)?;
            if wd > 0.0 {
                p.affine(1.0 - lr * wd, 0.0)?
            } else {
                p
            }
        }
    })
}

/// Plain AdamW step, the fallback for parameters with fewer than two dimensions.
fn adamw_step(
    state: &mut ParamState,
    param: &Tensor,
    grad: &Tensor,
    h: AdamHyper,
) -> Result<Tensor> {
    let (dir, factor) = adam_direction(state, grad, h.betas, h.eps, state.step, h.form)?;
    apply_adam(param, &dir, h.lr, factor, h.weight_decay, h.form)
}

/// The Adam settings of a group.
#[derive(Clone, Copy, Debug)]
struct AdamHyper {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    form: AdamForm,
}

/// Hyper-parameters of a GaLore group. Defaults are GaLore's reference (rank 128, T = 200,
/// scale 0.25, SVD, transformers-form Adam with eps 1e-6, no weight decay).
#[derive(Clone, Debug, PartialEq)]
pub struct GaLoreConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Rank r (capped at the projected dimension).
    pub rank: usize,
    /// Steps between re-projections (T).
    pub update_gap: u64,
    /// Multiplies the projected-back update.
    pub scale: f64,
    pub kind: ProjectionKind,
    /// Seed of the random projections.
    pub seed: u64,
    /// Where eps, bias correction and weight decay enter (see the module docs).
    pub adam_form: AdamForm,
}

impl Default for GaLoreConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-6,
            weight_decay: 0.0,
            rank: 128,
            update_gap: 200,
            scale: 0.25,
            kind: ProjectionKind::Svd,
            seed: 0,
            adam_form: AdamForm::Transformers,
        }
    }
}

impl GroupConfig for GaLoreConfig {
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        check_betas(self.betas)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("scale", self.scale)?;
        check_gap(self.update_gap)?;
        if self.rank == 0 {
            return Err(Error::invalid("rank", "0 (must be >= 1)"));
        }
        Ok(())
    }
}

/// GaLore-Adam: Adam on `R = project(G)`, moments kept (not reset) when the projector changes,
/// update `scale * project_back(m̂ / (sqrt(v̂) + eps))`.
#[derive(Debug, Default)]
pub struct GaLore {
    dct: DctCache,
}

impl UpdateRule for GaLore {
    type Config = GaLoreConfig;
    fn name(&self) -> &'static str {
        "galore"
    }
    fn check_state(
        &self,
        param: &candle_core::Var,
        state: &ParamState,
    ) -> std::result::Result<(), (String, Vec<usize>)> {
        check_low_rank_state(param, state)
    }
    fn update(
        &mut self,
        ctx: ParamCtx<'_>,
        cfg: &GaLoreConfig,
        state: &mut ParamState,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let Some((m, n)) = matrix_dims(param) else {
            let h = AdamHyper {
                lr: cfg.lr,
                betas: cfg.betas,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
                form: cfg.adam_form,
            };
            return adamw_step(state, param, grad, h);
        };
        let g2 = grad.reshape((m, n))?;
        let rank = cfg.rank.min(Side::for_shape(m, n).dim(m, n));
        let (proj, _) = projector_for_step(
            state,
            ProjectionSpec { kind: cfg.kind, rank, update_gap: cfg.update_gap, seed: cfg.seed },
            ctx,
            &g2,
            &mut self.dct,
        )?;
        let r = proj.project(&g2)?;
        let (dir, factor) =
            adam_direction(state, &r, cfg.betas, cfg.eps, state.step, cfg.adam_form)?;
        let upd = proj.project_back(&dir, m, n)?;
        apply_adam(param, &upd, cfg.lr, factor * cfg.scale, cfg.weight_decay, cfg.adam_form)
    }
    fn shared_bytes(&self) -> usize {
        self.dct.bytes()
    }
}

/// What FRUGAL does with the part of the gradient outside the projected subspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateFree {
    /// `-lr * scale * sign(g_free)` (signSGD, the paper's default).
    SignSgd,
    /// `-lr * scale * g_free` (plain SGD).
    Sgd,
    /// Dropped (only the state-full subspace is trained).
    None,
}

/// Hyper-parameters of a FRUGAL group. Defaults are the paper's (density 0.25, T = 200,
/// signSGD residual with lr scale 1.0 for pre-training; use 0.1 for fine-tuning); the SVD
/// projection and PyTorch AdamW betas/eps are our choice.
#[derive(Clone, Debug, PartialEq)]
pub struct FrugalConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Fraction rho of the projected dimension d kept state-full: as in the reference,
    /// r = round(rho d) with ties to even (`round(2.5) = 2`), or r = floor(rho d) for
    /// [`ProjectionKind::RandomColumns`]; unlike the reference, at least 1.
    pub density: f64,
    pub update_gap: u64,
    pub kind: ProjectionKind,
    pub state_free: StateFree,
    /// Learning-rate multiplier of the state-free update.
    pub state_free_lr_scale: f64,
    pub seed: u64,
}

impl Default for FrugalConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            density: 0.25,
            update_gap: 200,
            kind: ProjectionKind::Svd,
            state_free: StateFree::SignSgd,
            state_free_lr_scale: 1.0,
            seed: 0,
        }
    }
}

impl GroupConfig for FrugalConfig {
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        check_betas(self.betas)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("state_free_lr_scale", self.state_free_lr_scale)?;
        check_gap(self.update_gap)?;
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(Error::invalid("density", format!("{} (must be in (0, 1])", self.density)));
        }
        Ok(())
    }
}

/// The state-full rank of a FRUGAL projection of dimension `d`: the reference rounds
/// `density * d` with Python's `round` (ties to even) in its SVD / random projectors and
/// truncates it (`int`) in its coordinate projector; kept in `1..=d`.
fn frugal_rank(density: f64, d: usize, kind: ProjectionKind) -> usize {
    let exact = density * d as f64;
    let r = match kind {
        ProjectionKind::RandomColumns => exact.floor(),
        _ => exact.round_ties_even(),
    };
    (r as usize).clamp(1, d)
}

/// FRUGAL: `g = P⁻¹(P g) + g_free`; Adam on `P g` (state-full, moments and bias correction
/// reset whenever the projector is rebuilt), a state-free update on `g_free`.
#[derive(Debug, Default)]
pub struct Frugal {
    dct: DctCache,
}

impl UpdateRule for Frugal {
    type Config = FrugalConfig;
    fn name(&self) -> &'static str {
        "frugal"
    }
    fn check_state(
        &self,
        param: &candle_core::Var,
        state: &ParamState,
    ) -> std::result::Result<(), (String, Vec<usize>)> {
        check_low_rank_state(param, state)
    }
    fn update(
        &mut self,
        ctx: ParamCtx<'_>,
        cfg: &FrugalConfig,
        state: &mut ParamState,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let Some((m, n)) = matrix_dims(param) else {
            let h = AdamHyper {
                lr: cfg.lr,
                betas: cfg.betas,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
                form: AdamForm::Torch,
            };
            return adamw_step(state, param, grad, h);
        };
        let g2 = grad.reshape((m, n))?;
        let d = Side::for_shape(m, n).dim(m, n);
        let rank = frugal_rank(cfg.density, d, cfg.kind);
        let (proj, fresh) = projector_for_step(
            state,
            ProjectionSpec { kind: cfg.kind, rank, update_gap: cfg.update_gap, seed: cfg.seed },
            ctx,
            &g2,
            &mut self.dct,
        )?;
        if fresh {
            state.slots.remove("exp_avg");
            state.slots.remove("exp_avg_sq");
        }
        let sub_step = (state.step - 1) % cfg.update_gap + 1;
        let r = proj.project(&g2)?;
        let (mom, denom, inv_bc1) = adam_moments(state, "", &r, cfg.betas, cfg.eps, sub_step)?;
        let mut upd = proj.project_back(&(mom / denom)?, m, n)?.affine(cfg.lr * inv_bc1, 0.0)?;
        let free_scale = cfg.lr * cfg.state_free_lr_scale;
        if cfg.state_free != StateFree::None && free_scale != 0.0 {
            let g_free = (&g2 - proj.project_back(&r, m, n)?)?;
            let free = match cfg.state_free {
                StateFree::SignSgd => g_free.sign()?,
                _ => g_free,
            };
            upd = (upd + free.affine(free_scale, 0.0)?)?;
        }
        let p = if cfg.weight_decay != 0.0 {
            param.affine(1.0 - cfg.lr * cfg.weight_decay, 0.0)?
        } else {
            param.clone()
        };
        Ok((p - upd.reshape(param.shape())?)?)
    }
    fn shared_bytes(&self) -> usize {
        self.dct.bytes()
    }
}
