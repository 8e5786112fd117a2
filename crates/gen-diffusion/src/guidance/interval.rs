//! Guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval
//! Improves Sample and Distribution Quality in Diffusion Models"): guide only inside a range
//! of steps or noise levels; elsewhere use the conditional prediction (one model call).

use gen_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{cond_only, Branch, Guidance, GuidanceState, Guided, Predictions, StepInfo};

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
            return Err(Error::invalid(
                format!("guidance interval ({what})"),
                format!("[{a}, {b}] is empty or not ordered"),
            ));
        }
        Ok(())
    }

    /// Parses `a,b` (fractions of the steps, 0 <= a <= b <= 1; also `steps:a,b`),
    /// `sigma:lo,hi` (noise levels in (lo, hi]) or `t:lo,hi` (timesteps in [lo, hi]). The
    /// error quotes the text and says what was expected.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |msg: String| Error::invalid("guidance interval", msg);
        let (kind, rest) = match s.split_once(':') {
            Some((k, r)) => (k.trim(), r),
            None => ("steps", s),
        };
        let (a, b) = rest
            .split_once(',')
            .ok_or_else(|| bad(format!("`{s}`: expected a,b (or sigma:lo,hi, t:lo,hi)")))?;
        let num = |p: &str| {
            p.trim()
                .parse::<f64>()
                .map_err(|_| bad(format!("`{}` in `{s}` is not a number", p.trim())))
        };
        let (a, b) = (num(a)?, num(b)?);
        let range = match kind {
            "steps" => {
                if !(0.0..=1.0).contains(&a) || !(0.0..=1.0).contains(&b) {
                    return Err(bad(format!("`{s}`: step fractions need 0 <= a <= b <= 1")));
                }
                Self::StepFraction { start: a, stop: b }
            }
            "sigma" => Self::Sigma { lo: a, hi: b },
            "t" => Self::Timestep { lo: a, hi: b },
            _ => return Err(bad(format!("`{s}`: unknown interval kind `{kind}` (step fractions a,b, sigma:lo,hi or t:lo,hi)"))),
        };
        range
            .validate()
            .map_err(|_| bad(format!("`{s}`: the range is empty or not ordered (need a <= b)")))?;
        Ok(range)
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

/// The form [`IntervalRange::parse`] reads: `steps:a,b`, `sigma:lo,hi` or `t:lo,hi`.
impl std::fmt::Display for IntervalRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::StepFraction { start, stop } => write!(f, "steps:{start},{stop}"),
            Self::Sigma { lo, hi } => write!(f, "sigma:{lo},{hi}"),
            Self::Timestep { lo, hi } => write!(f, "t:{lo},{hi}"),
        }
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
    fn state(&self) -> GuidanceState {
        self.inner.state()
    }
    fn set_state(&mut self, state: GuidanceState) {
        self.inner.set_state(state)
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
}
