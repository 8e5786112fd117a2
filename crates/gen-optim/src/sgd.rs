//! SGD with momentum, dampening and Nesterov (PyTorch `torch.optim.SGD` semantics: weight decay
//! is added to the gradient, the momentum buffer starts as the first gradient), and signSGD
//! (optionally with momentum, "signum"), whose update `-lr * sign(.)` needs no state without it.

use candle_core::Tensor;
use gen_core::{Error, Result};

use crate::adamw::{check_lr, check_nonneg};
use crate::optimizer::{GroupConfig, ParamCtx, ParamState, UpdateRule};

/// Hyper-parameters of an SGD group. Defaults are PyTorch's except `lr` (required there).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    /// L2 penalty added to the gradient (`g += wd * p`), as PyTorch does.
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self { lr: 1e-2, momentum: 0.0, dampening: 0.0, weight_decay: 0.0, nesterov: false }
    }
}

impl GroupConfig for SgdConfig {
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        check_nonneg("momentum", self.momentum)?;
        check_nonneg("dampening", self.dampening)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid(
                "nesterov",
                format!(
                    "needs momentum > 0 and dampening = 0 (momentum {}, dampening {})",
                    self.momentum, self.dampening
                ),
            ));
        }
        Ok(())
    }
}

/// The SGD update rule; use it through [`crate::Optim`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Sgd;

impl UpdateRule for Sgd {
    type Config = SgdConfig;
    fn name(&self) -> &'static str {
        "sgd"
    }
    fn update(
        &mut self,
        _ctx: ParamCtx<'_>,
        cfg: &SgdConfig,
        state: &mut ParamState,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let mut g = grad.clone();
        if cfg.weight_decay != 0.0 {
            g = (g + param.affine(cfg.weight_decay, 0.0)?)?;
        }
        if cfg.momentum != 0.0 {
            let buf = match state.get("momentum_buffer") {
                None => g.copy()?,
                Some(b) => (b.affine(cfg.momentum, 0.0)? + g.affine(1.0 - cfg.dampening, 0.0)?)?,
            };
            state.set("momentum_buffer", buf.clone());
            g = if cfg.nesterov { (g + buf.affine(cfg.momentum, 0.0)?)? } else { buf };
        }
        Ok((param - g.affine(cfg.lr, 0.0)?)?)
    }
}

/// Hyper-parameters of a signSGD group.
#[derive(Clone, Debug, PartialEq)]
pub struct SignSgdConfig {
    pub lr: f64,
    /// Decoupled weight decay: `p -= lr * wd * p` before the sign step.
    pub weight_decay: f64,
    /// 0: plain signSGD (no state). > 0: signum, `m = β m + (1-β) g`, step `-lr * sign(m)`.
    pub momentum: f64,
}

impl Default for SignSgdConfig {
    fn default() -> Self {
        Self { lr: 1e-4, weight_decay: 0.0, momentum: 0.0 }
    }
}

impl GroupConfig for SignSgdConfig {
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::invalid(
                "momentum",
                format!("{} (must be in [0, 1))", self.momentum),
            ));
        }
        Ok(())
    }
}

/// The signSGD update rule; use it through [`crate::Optim`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SignSgd;

impl UpdateRule for SignSgd {
    type Config = SignSgdConfig;
    fn name(&self) -> &'static str {
        "signsgd"
    }
    fn update(
        &mut self,
        _ctx: ParamCtx<'_>,
        cfg: &SignSgdConfig,
        state: &mut ParamState,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let p = if cfg.weight_decay != 0.0 {
            param.affine(1.0 - cfg.lr * cfg.weight_decay, 0.0)?
        } else {
            param.clone()
        };
        let dir = if cfg.momentum > 0.0 {
            let m = state.slot_or_zeros("exp_avg", grad)?;
            let m = (m.affine(cfg.momentum, 0.0)? + grad.affine(1.0 - cfg.momentum, 0.0)?)?;
            state.set("exp_avg", m.clone());
            m.sign()?
        } else {
            grad.sign()?
        };
        Ok((p - dir.affine(cfg.lr, 0.0)?)?)
    }
}
