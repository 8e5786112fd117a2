//! The schedulers, one file each. All follow diffusers 0.42 (`src/diffusers/schedulers/`).

mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod euler_ancestral;

pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerScheduler;
pub use euler_ancestral::EulerAncestralScheduler;

use candle_core::Tensor;
use gen_core::Result;

use crate::prediction::per_sample;

/// `sqrt(a) x0 + sqrt(1-a) noise` with per-sample `a`.
pub(crate) fn vp_add_noise(x0: &Tensor, noise: &Tensor, alphas: &[f64]) -> Result<Tensor> {
    crate::scheduler::check_same_shape(noise, x0, "noise")?;
    let sa: Vec<f64> = alphas.iter().map(|a| a.sqrt()).collect();
    let sb: Vec<f64> = alphas.iter().map(|a| (1.0 - a).sqrt()).collect();
    Ok((x0.broadcast_mul(&per_sample(&sa, x0)?)?
        + noise.broadcast_mul(&per_sample(&sb, noise)?)?)?)
}

/// x0 and eps from a VP model output at cumulative alpha `a` (scalar), in the tensors' dtype.
pub(crate) fn vp_x0_eps(
    kind: crate::PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    a: f64,
) -> Result<(Tensor, Tensor)> {
    use crate::scheduler::axpby;
    use crate::PredictionType::*;
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    Ok(match kind {
        Epsilon => (axpby(1.0 / sa, sample, -sb / sa, model_output)?, model_output.clone()),
        Sample => (model_output.clone(), axpby(1.0 / sb, sample, -sa / sb, model_output)?),
        VPrediction => {
            (axpby(sa, sample, -sb, model_output)?, axpby(sa, model_output, sb, sample)?)
        }
    })
}
