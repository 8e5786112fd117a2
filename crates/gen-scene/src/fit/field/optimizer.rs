//! The loss-agnostic field optimiser: [`FieldOptimizer`] holds a [`CamField`]'s parameters, one
//! AdamW group over all of them (instant-ngp's betas (0.9, 0.99), ε 1e-15; the rate decays
//! log-linearly) and an [`OccupancyGrid`] re-marked on a schedule. Each
//! [`FieldOptimizer::step`] hands the field to any objective (a photometric loss on a ray
//! batch, or a gradient on a rendered image through [`crate::fit::image_gradient_loss`] and
//! [`super::render_field_image_grad`]), back-propagates and steps.

use std::collections::HashMap;
use std::sync::MutexGuard;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use gen_core::{Error, Result, SeededRng};
use gen_optim::{AdamW, AdamWConfig, NamedVar, Optim, Optimizer, ParamGroup};

use super::render::Detached;
use crate::field::{CamField, FieldConfig, OccupancyGrid};
use crate::fit::log_linear;
use crate::fit::optimizer::{check_finite, check_loss};

/// Prefix of the field's parameter names (checkpoint keys `field.<name>`).
pub(crate) const PREFIX: &str = "field";

/// Schedule of a [`FieldOptimizer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FieldOptimConfig {
    /// Rate at the first step, decaying log-linearly to `lr_final` at step `steps`.
    pub lr: f64,
    pub lr_final: f64,
    pub steps: u64,
    /// Cells per axis of the occupancy grid.
    pub occupancy_res: usize,
    /// Re-mark the occupancy grid every this many steps (0: never).
    pub occupancy_every: u64,
    /// Density above which a cell counts as occupied.
    pub occupancy_threshold: f64,
}

/// What one [`FieldOptimizer::step`] did.
#[derive(Debug, Clone)]
pub struct FieldOptimStep<T> {
    /// Steps completed (1 after the first).
    pub step: u64,
    pub loss: f64,
    /// Occupied fraction when the occupancy grid was re-marked after this step.
    pub occupancy: Option<f64>,
    /// What the objective returned besides the loss.
    pub aux: T,
}

/// A neural field under optimisation (see the module docs).
pub struct FieldOptimizer {
    cfg: FieldOptimConfig,
    varmap: VarMap,
    field: CamField,
    opt: Optim<AdamW>,
    occupancy: OccupancyGrid,
    step: u64,
}

impl FieldOptimizer {
    /// A freshly initialised `field` on `device` (drawn with `rng`), at step 0.
    pub fn new(
        field: FieldConfig,
        cfg: FieldOptimConfig,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let occupancy = OccupancyGrid::full(field.bounds, cfg.occupancy_res)?;
        let field = CamField::new(field, &varmap, PREFIX, rng, DType::F32, device)?;
        let params = named_vars(&varmap)?;
        let opt = Optim::new(
            AdamW,
            vec![ParamGroup::new(
                params,
                AdamWConfig { lr: cfg.lr_at(0), betas: (0.9, 0.99), eps: 1e-15, weight_decay: 0.0 },
            )],
        )?;
        Ok(Self { cfg, varmap, field, opt, occupancy, step: 0 })
    }

    /// The field (shares the optimiser's parameters).
    pub fn field(&self) -> &CamField {
        &self.field
    }

    pub fn occupancy(&self) -> &OccupancyGrid {
        &self.occupancy
    }

    pub(crate) fn occupancy_mut(&mut self) -> &mut OccupancyGrid {
        &mut self.occupancy
    }

    pub fn optimizer(&self) -> &Optim<AdamW> {
        &self.opt
    }

    pub(crate) fn optimizer_mut(&mut self) -> &mut Optim<AdamW> {
        &mut self.opt
    }

    /// Steps completed.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The parameters by name, locked.
    pub(crate) fn vars(&self) -> Result<MutexGuard<'_, HashMap<String, Var>>> {
        lock_vars(&self.varmap)
    }

    /// Continues at step `step` (after restoring parameters and optimizer state).
    pub(crate) fn set_step(&mut self, step: u64) -> Result<()> {
        self.step = step;
        self.opt.set_group_lr(0, self.cfg.lr_at(step))?;
        Ok(())
    }

    /// One step: `objective(field, occupancy) = (loss, aux)` with a scalar `loss`,
    /// back-propagated into the field's parameters; then the optimizer step and, on schedule,
    /// the occupancy update.
    pub fn step<T>(
        &mut self,
        objective: impl FnOnce(&CamField, &OccupancyGrid) -> Result<(Tensor, T)>,
    ) -> Result<FieldOptimStep<T>> {
        let (loss, aux) = objective(&self.field, &self.occupancy)?;
        if loss.elem_count() != 1 {
            return Err(Error::invalid(
                "field objective",
                format!("loss of shape {:?}", loss.dims()),
            ));
        }
        let loss_value = loss.to_dtype(DType::F32)?.reshape(())?.to_scalar::<f32>()? as f64;
        check_loss(self.step + 1, loss_value)?;
        let grads = loss.backward()?;
        self.opt.set_group_lr(0, self.cfg.lr_at(self.step))?;
        self.opt.step(&grads)?;
        self.step += 1;
        for v in named_vars(&self.varmap)? {
            check_finite(self.step, &format!("field parameter `{}`", v.name), &v.var)?;
        }
        // `checked_rem` is `None` for an interval of 0 (never re-mark).
        let occupancy = if self.step.checked_rem(self.cfg.occupancy_every) == Some(0) {
            Some(self.occupancy.update(&Detached(&self.field), self.cfg.occupancy_threshold)?)
        } else {
            None
        };
        Ok(FieldOptimStep { step: self.step, loss: loss_value, occupancy, aux })
    }
}

impl FieldOptimConfig {
    /// The learning rate before 0-based step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        log_linear(self.lr, self.lr_final, step, self.steps)
    }
}

/// Every variable of `varmap` as a named parameter, sorted by name (a stable order).
fn named_vars(varmap: &VarMap) -> Result<Vec<NamedVar>> {
    let mut v: Vec<(String, Var)> =
        lock_vars(varmap)?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v.into_iter().map(|(k, v)| NamedVar::new(k, v)).collect())
}

/// The variables of `varmap`, locked.
fn lock_vars(varmap: &VarMap) -> Result<MutexGuard<'_, HashMap<String, Var>>> {
    varmap.data().lock().map_err(|_| Error::invalid("field varmap", "lock poisoned"))
}
