//! A serialisable description of a guidance setup (for run configs and CLI flags), built into
//! the composed components: method, then optional CFG-rescale, then optional interval.

use gen_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{Apg, ApgConfig, Cfg, Guidance, Interval, IntervalRange, NoGuidance, Rescale};

/// The guidance method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum GuidanceMethod {
    /// Conditional prediction only.
    None,
    /// Classifier-free guidance `u + w (c - u)`.
    Cfg { scale: f64 },
    /// Adaptive projected guidance.
    Apg(ApgConfig),
}

/// Method + CFG-rescale + interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuidanceConfig {
    #[serde(flatten)]
    pub method: GuidanceMethod,
    /// CFG-rescale phi (0 = off), applied in model-output space after the method.
    #[serde(default)]
    pub rescale_phi: f64,
    /// Apply guidance only inside this range (conditional prediction elsewhere).
    #[serde(default)]
    pub interval: Option<IntervalRange>,
}

impl GuidanceConfig {
    /// Plain CFG with scale `w`.
    pub fn cfg(scale: f64) -> Self {
        Self { method: GuidanceMethod::Cfg { scale }, rescale_phi: 0.0, interval: None }
    }

    /// Builds the composed guidance.
    pub fn build(&self) -> Result<Box<dyn Guidance>> {
        let mut g: Box<dyn Guidance> = match &self.method {
            GuidanceMethod::None => Box::new(NoGuidance),
            GuidanceMethod::Cfg { scale } => Box::new(Cfg::new(*scale)?),
            GuidanceMethod::Apg(c) => Box::new(Apg::new(c.clone())?),
        };
        if self.rescale_phi != 0.0 {
            if self.method == GuidanceMethod::None {
                return Err(Error::invalid(
                    "guidance rescale_phi",
                    "rescale needs a guidance method",
                ));
            }
            g = Box::new(Rescale::new(g, self.rescale_phi)?);
        }
        if let Some(range) = self.interval {
            g = Box::new(Interval::new(g, range)?);
        }
        Ok(g)
    }
}
