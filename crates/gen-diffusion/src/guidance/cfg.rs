//! Classifier-free guidance (Ho & Salimans 2022): `D = u + w (c - u)`; `w = 1` is no guidance.
//! Linear in the prediction, so the space does not matter; it combines raw model outputs.

use gen_core::Result;

use super::{check_scale, cond_only, Branch, Guidance, Guided, Predictions, Space, StepInfo};

/// Classifier-free guidance with scale `w`.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub scale: f64,
}

impl Cfg {
    pub fn new(scale: f64) -> Result<Self> {
        check_scale("CFG scale", scale)?;
        Ok(Self { scale })
    }
}

impl Guidance for Cfg {
    fn name(&self) -> String {
        format!("cfg(w={})", self.scale)
    }
    fn branches(&self, _: &StepInfo) -> Vec<Branch> {
        if self.scale == 1.0 {
            vec![Branch::Cond]
        } else {
            vec![Branch::Cond, Branch::Uncond]
        }
    }
    fn combine(&mut self, preds: &Predictions, _: &StepInfo) -> Result<Guided> {
        let Some(u) = &preds.uncond else { return Ok(cond_only(preds)) };
        let c = &preds.cond;
        // u + w (c - u)
        let value = (u + ((c - u)? * self.scale)?)?;
        Ok(Guided { value, space: Space::ModelOutput })
    }
}
