//! Prediction types and pure conversions between them.
//!
//! Variance-preserving notation: with `a = alphas_cumprod[t]` (one value per sample),
//! `x_t = sqrt(a) * x0 + sqrt(1 - a) * eps`, `v = sqrt(a) * eps - sqrt(1 - a) * x0`, so
//! `x0 = (x_t - sqrt(1-a) * eps) / sqrt(a) = sqrt(a) * x_t - sqrt(1-a) * v` and
//! `eps = (x_t - sqrt(a) * x0) / sqrt(1-a) = sqrt(1-a) * x_t + sqrt(a) * v`.
//!
//! For sigma-parameterised schedulers (Euler, DPM-Solver) the model sees the *scaled* input
//! `x_t / sqrt(sigma^2 + 1)`, which is the VP sample with `a = 1 / (1 + sigma^2)`; the
//! conversions apply to that scaled input (see [`crate::Scheduler::model_alpha_cumprod`]).
//!
//! All functions take tensors of shape (B, ...) and `alpha_cumprod` with B entries.

use candle_core::Tensor;
use gen_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// What a denoising model predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise `eps`.
    Epsilon,
    /// The velocity `v = sqrt(a) eps - sqrt(1-a) x0` (Salimans & Ho 2022).
    VPrediction,
    /// The clean sample `x0`.
    Sample,
}

impl PredictionType {
    pub const NAMES: [&'static str; 3] = ["epsilon", "v_prediction", "sample"];
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "epsilon" => Some(Self::Epsilon),
            "v_prediction" => Some(Self::VPrediction),
            "sample" | "original_sample" => Some(Self::Sample),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
        }
    }
}

/// Per-sample scalar `values` as a tensor of shape (B, 1, 1, ...) matching `like`'s rank,
/// dtype and device, ready for `broadcast_mul`.
pub fn per_sample(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let b = like.dim(0)?;
    if values.len() != b {
        return Err(Error::invalid(
            "per-sample coefficients",
            format!(
                "{} values for a batch of {} (tensor shape {:?})",
                values.len(),
                b,
                like.dims()
            ),
        ));
    }
    let mut shape = vec![1usize; like.rank()];
    shape[0] = b;
    Ok(Tensor::from_vec(values.to_vec(), shape, like.device())?.to_dtype(like.dtype())?)
}

/// `p * x + q * y` with per-sample coefficients `p`, `q` (length B).
fn lin2(x: &Tensor, p: &[f64], y: &Tensor, q: &[f64]) -> Result<Tensor> {
    if x.dims() != y.dims() {
        return Err(Error::invalid(
            "prediction conversion",
            format!("shapes {:?} and {:?} differ", x.dims(), y.dims()),
        ));
    }
    // Coefficients in f64 when the data is f64, else in the data's dtype.
    let px = x.broadcast_mul(&per_sample(p, x)?)?;
    let qy = y.broadcast_mul(&per_sample(q, y)?)?;
    Ok((px + qy)?)
}

fn check_alpha(alpha_cumprod: &[f64]) -> Result<()> {
    for &a in alpha_cumprod {
        if !(0.0..=1.0).contains(&a) {
            return Err(Error::invalid("alpha_cumprod", format!("{a} is outside [0, 1]")));
        }
    }
    Ok(())
}

/// Clean-sample estimate x0 from a model prediction `pred` of kind `kind` at noisy input `x_t`.
pub fn to_x0(
    pred: &Tensor,
    x_t: &Tensor,
    alpha_cumprod: &[f64],
    kind: PredictionType,
) -> Result<Tensor> {
    check_alpha(alpha_cumprod)?;
    let sa: Vec<f64> = alpha_cumprod.iter().map(|a| a.sqrt()).collect();
    let sb: Vec<f64> = alpha_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect();
    match kind {
        PredictionType::Sample => Ok(pred.clone()),
        // x0 = x_t / sqrt(a) - sqrt(1-a)/sqrt(a) * eps
        PredictionType::Epsilon => {
            if sa.contains(&0.0) {
                return Err(Error::invalid("to_x0", "alpha_cumprod = 0 (zero terminal SNR): x0 is undefined for an epsilon prediction"));
            }
            let p: Vec<f64> = sa.iter().map(|s| 1.0 / s).collect();
            let q: Vec<f64> = sa.iter().zip(&sb).map(|(s, b)| -b / s).collect();
            lin2(x_t, &p, pred, &q)
        }
        // x0 = sqrt(a) x_t - sqrt(1-a) v
        PredictionType::VPrediction => {
            let q: Vec<f64> = sb.iter().map(|b| -b).collect();
            lin2(x_t, &sa, pred, &q)
        }
    }
}

/// Noise estimate eps from a model prediction. Undefined where `a = 1` for `sample` predictions.
pub fn to_eps(
    pred: &Tensor,
    x_t: &Tensor,
    alpha_cumprod: &[f64],
    kind: PredictionType,
) -> Result<Tensor> {
    check_alpha(alpha_cumprod)?;
    let sa: Vec<f64> = alpha_cumprod.iter().map(|a| a.sqrt()).collect();
    let sb: Vec<f64> = alpha_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect();
    match kind {
        PredictionType::Epsilon => Ok(pred.clone()),
        // eps = (x_t - sqrt(a) x0) / sqrt(1-a)
        PredictionType::Sample => {
            if sb.contains(&0.0) {
                return Err(Error::invalid(
                    "to_eps",
                    "alpha_cumprod = 1: eps is undefined for a sample prediction",
                ));
            }
            let p: Vec<f64> = sb.iter().map(|b| 1.0 / b).collect();
            let q: Vec<f64> = sa.iter().zip(&sb).map(|(s, b)| -s / b).collect();
            lin2(x_t, &p, pred, &q)
        }
        // eps = sqrt(1-a) x_t + sqrt(a) v
        PredictionType::VPrediction => lin2(x_t, &sb, pred, &sa),
    }
}

/// Velocity v from a model prediction.
pub fn to_v(
    pred: &Tensor,
    x_t: &Tensor,
    alpha_cumprod: &[f64],
    kind: PredictionType,
) -> Result<Tensor> {
    match kind {
        PredictionType::VPrediction => Ok(pred.clone()),
        _ => {
            let x0 = to_x0(pred, x_t, alpha_cumprod, kind)?;
            let eps = to_eps(pred, x_t, alpha_cumprod, kind)?;
            let sa: Vec<f64> = alpha_cumprod.iter().map(|a| a.sqrt()).collect();
            let nb: Vec<f64> = alpha_cumprod.iter().map(|a| -(1.0 - a).sqrt()).collect();
            lin2(&eps, &sa, &x0, &nb)
        }
    }
}

/// Converts a prediction of kind `from` into kind `to`.
pub fn convert(
    pred: &Tensor,
    x_t: &Tensor,
    alpha_cumprod: &[f64],
    from: PredictionType,
    to: PredictionType,
) -> Result<Tensor> {
    if from == to {
        return Ok(pred.clone());
    }
    match to {
        PredictionType::Sample => to_x0(pred, x_t, alpha_cumprod, from),
        PredictionType::Epsilon => to_eps(pred, x_t, alpha_cumprod, from),
        PredictionType::VPrediction => to_v(pred, x_t, alpha_cumprod, from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vals(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn conversions_round_trip_and_match_definitions() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[0.3f64, -1.2], [2.0, 0.5]], &dev).unwrap();
        let eps = Tensor::new(&[[1.1f64, 0.4], [-0.7, 0.2]], &dev).unwrap();
        let a = [0.81f64, 0.36];
        // x_t = sqrt(a) x0 + sqrt(1-a) eps, by hand: sample 0: 0.9*x0 + sqrt(0.19)*eps
        let s19 = 0.19f64.sqrt();
        let xt = Tensor::new(
            &[
                [0.9 * 0.3 + s19 * 1.1, 0.9 * -1.2 + s19 * 0.4],
                [0.6 * 2.0 + 0.8 * -0.7, 0.6 * 0.5 + 0.8 * 0.2],
            ],
            &dev,
        )
        .unwrap();
        let v_hand = [
            0.9 * 1.1 - s19 * 0.3,
            0.9 * 0.4 - s19 * -1.2,
            0.6 * -0.7 - 0.8 * 2.0,
            0.6 * 0.2 - 0.8 * 0.5,
        ];
        let v = to_v(&eps, &xt, &a, PredictionType::Epsilon).unwrap();
        for (g, e) in vals(&v).iter().zip(v_hand) {
            assert!((g - e).abs() < 1e-12);
        }
        for kind in [PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample] {
            let pred = convert(&x0, &xt, &a, PredictionType::Sample, kind).unwrap();
            let back_x0 = to_x0(&pred, &xt, &a, kind).unwrap();
            let back_eps = to_eps(&pred, &xt, &a, kind).unwrap();
            for (g, e) in vals(&back_x0).iter().zip(vals(&x0)) {
                assert!((g - e).abs() < 1e-12, "{kind:?}");
            }
            for (g, e) in vals(&back_eps).iter().zip(vals(&eps)) {
                assert!((g - e).abs() < 1e-12, "{kind:?}");
            }
        }
        assert!(to_x0(&eps, &xt, &[0.5], PredictionType::Epsilon).is_err());
        assert!(to_x0(&eps, &xt, &[0.0, 0.5], PredictionType::Epsilon).is_err());
        assert!(to_x0(&eps, &xt, &[1.5, 0.5], PredictionType::Epsilon).is_err());
        // zero terminal SNR: x0 = -v is fine
        let x0 = to_x0(&eps, &xt, &[0.0, 0.5], PredictionType::VPrediction).unwrap();
        assert_eq!(vals(&x0)[0], -1.1);
    }
}
