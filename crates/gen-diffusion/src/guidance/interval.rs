//! Guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval
//! Improves Sample and Distribution Quality in Diffusion Models"): guide only inside a range
//! of steps or noise levels; elsewhere use the conditional prediction (one model call).

use gen_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{cond_only, Branch, Guidance, Guided, Predictions, StepInfo};

/// Where guidance is on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntervalRange {
    /// Fractions of the step count, as diffusers' guiders: on for
    /// `floor(start n) <= step < floor(stop n)`. Needs a step index.
    StepFraction { start: f64, stop: f64 },
    /// Noise levels: on for `lo < sigma <= hi` (the paper's (sigma_lo, sigma_hi]).
    Sigma { lo: f64, hi: f64 },
    /// Model timesteps: on for `lo <= t <= hi`.
    Timestep { lo: f64, hi: f64 },
}

impl IntervalRange {
    fn validate(&self) -> Result<()> {
        let (a, b, what) = match *self {
            Self::StepFraction { start, stop } => (start, stop, "step fraction"),
            Self::Sigma { lo, hi } => (lo, hi, "sigma"),
            Self::Timestep { lo, hi } => (lo, hi, "timestep"),
        };
        if a.is_nan() || b.is_nan() || a > b {
            return Err(Error::invalid(format!("guidance interval ({what})"), format!("[{a}, {b}] is empty or not ordered")));
        }
        Ok(())
    }

    /// Whether guidance is on at `step`.
    pub fn contains(&self, step: &StepInfo) -> Result<bool> {
        Ok(match *self {
            Self::StepFraction { start, stop } => {
                let (i, n) = step
                    .step
                    .ok_or_else(|| Error::invalid("guidance interval", "a step-fraction interval needs the step index (use a sigma or timestep range outside sampling)"))?;
                let (s0, s1) = ((start * n as f64) as usize, (stop * n as f64) as usize);
                s0 <= i && i < s1
            }
            Self::Sigma { lo, hi } => lo < step.sigma && step.sigma <= hi,
            Self::Timestep { lo, hi } => lo <= step.timestep && step.timestep <= hi,
        })
    }
}

/// Applies `inner` only inside `range`.
pub struct Interval<G: Guidance> {
    pub inner: G,
    pub range: IntervalRange,
}

impl<G: Guidance> Interval<G> {
    pub fn new(inner: G, range: IntervalRange) -> Result<Self> {
        range.validate()?;
        Ok(Self { inner, range })
    }
}

impl<G: Guidance> Guidance for Interval<G> {
    fn name(&self) -> String {
        format!("interval({:?}, {})", self.range, self.inner.name())
    }
    fn branches(&self, step: &StepInfo) -> Vec<Branch> {
        // An invalid query (no step index) is reported by `combine`; ask for both then.
        match self.range.contains(step) {
            Ok(false) => vec![Branch::Cond],
            _ => self.inner.branches(step),
        }
    }
    fn combine(&mut self, preds: &Predictions, step: &StepInfo) -> Result<Guided> {
        if self.range.contains(step)? {
            self.inner.combine(preds, step)
        } else {
            Ok(cond_only(preds))
        }
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
}
