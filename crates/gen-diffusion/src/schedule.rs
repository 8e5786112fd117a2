//! Noise-schedule arithmetic shared by all schedulers: beta schedules, cumulative alphas,
//! timestep spacings, sigma interpolation and Karras sigmas.
//!
//! The numbers follow diffusers 0.42 bit for bit where that is cheap: betas are built in
//! `f32` the way `torch.linspace` builds them (one fused multiply-add per entry), the
//! cumulative product is accumulated in `f64` and stored as `f32` (as torch's CPU `cumprod`
//! does), and the cosine schedule is computed in `f64` (the float formula of Nichol & Dhariwal;
//! candle-transformers' version truncates `i / n` with integer division).

use serde::{Deserialize, Serialize};

/// How betas are laid out over the training timesteps (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (Stable Diffusion).
    ScaledLinear,
    /// Glide cosine schedule, `betas_for_alpha_bar` with max beta 0.999.
    SquaredcosCapV2,
}

impl BetaSchedule {
    pub const NAMES: [&'static str; 3] = ["linear", "scaled_linear", "squaredcos_cap_v2"];
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "linear" => Some(Self::Linear),
            "scaled_linear" => Some(Self::ScaledLinear),
            "squaredcos_cap_v2" => Some(Self::SquaredcosCapV2),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::ScaledLinear => "scaled_linear",
            Self::SquaredcosCapV2 => "squaredcos_cap_v2",
        }
    }
}

/// How inference timesteps are picked from the training range (diffusers' `timestep_spacing`,
/// see table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub const NAMES: [&'static str; 3] = ["leading", "trailing", "linspace"];
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "leading" => Some(Self::Leading),
            "trailing" => Some(Self::Trailing),
            "linspace" => Some(Self::Linspace),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Leading => "leading",
            Self::Trailing => "trailing",
            Self::Linspace => "linspace",
        }
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`, reproduced exactly: the step is computed in
/// f32 and each entry is one fused multiply-add from the nearer end.
pub fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 0 {
        return vec![];
    }
    if n == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - i - 1) as f32, e)
            }
        })
        .collect()
}

/// `numpy.linspace(start, end, n)` in f64.
pub fn linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = end;
            v
        }
    }
}

/// Glide cosine betas: `beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)` with
/// `abar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2`, computed in f64 (float division), stored as f32.
pub fn betas_for_alpha_bar(num_train_timesteps: usize, max_beta: f64) -> Vec<f32> {
    let abar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    let n = num_train_timesteps as f64;
    (0..num_train_timesteps)
        .map(|i| {
            let t1 = i as f64 / n;
            let t2 = (i + 1) as f64 / n;
            (1.0 - abar(t2) / abar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// Betas of a schedule, in f32 as diffusers stores them.
pub fn betas(
    schedule: BetaSchedule,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
) -> Vec<f32> {
    match schedule {
        BetaSchedule::Linear => linspace_f32(beta_start, beta_end, num_train_timesteps),
        BetaSchedule::ScaledLinear => {
            linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(num_train_timesteps, 0.999),
    }
}

/// Cumulative product of `1 - beta`, accumulated in f64 and rounded to f32 per entry
/// (torch's CPU `cumprod` on f32). Returned as f64 holding f32 values.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32 as f64
        })
        .collect()
}

/// Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in f32 like diffusers.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac: Vec<f32> = alphas_cumprod(betas).into_iter().map(|a| a as f32).collect();
    let mut sq: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (sq[0], sq[sq.len() - 1]);
    for v in sq.iter_mut() {
        *v -= st;
        *v *= s0 / (s0 - st);
    }
    let bar: Vec<f32> = sq.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// Integer inference timesteps of DDIM / DDPM (descending).
pub fn discrete_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => linspace_f64(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| round_half_even(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            trailing(num_train as f64, num_train, n).into_iter().map(|t| t as i64).collect()
        }
    }
}

/// `np.round(np.arange(last, 0, -T/n)) - 1`.
pub(crate) fn trailing(last: f64, num_train: usize, n: usize) -> Vec<f64> {
    let ratio = num_train as f64 / n as f64;
    // np.arange(last, 0, -ratio): ceil((0 - last) / -ratio) entries
    let count = (last / ratio).ceil() as usize;
    (0..count).map(|i| round_half_even(last - i as f64 * ratio) - 1.0).collect()
}

/// Float inference timesteps of the sigma-based schedulers (Euler, Euler ancestral), as f32
/// values (diffusers keeps them in f32).
pub fn float_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, T-1, n, dtype=float32): computed in f64, cast to f32.
            linspace_f64(0.0, (num_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => trailing(num_train as f64, num_train, n),
    }
}

/// numpy's round-half-to-even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `sqrt((1 - a) / a)` computed in f32 like diffusers (`alphas_cumprod` is an f32 tensor there).
pub fn sigmas_from_alphas_cumprod(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            ((1.0f32 - a) / a).sqrt() as f64
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub fn interp_index(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x <= 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    if w == 0.0 {
        return fp[i];
    }
    fp[i] + (fp[i + 1] - fp[i]) * w
}

/// Karras et al. (2022) sigmas: `(max^(1/rho) + ramp * (min^(1/rho) - max^(1/rho)))^rho`, rho = 7.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace_f64(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Fractional training timestep whose log-sigma matches `sigma` (diffusers' `_sigma_to_t`):
/// linear interpolation in log-sigma between neighbouring training timesteps.
/// `log_sigmas` is increasing with the timestep.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // last index with log_sigmas[i] <= log_sigma, 0 if none, clipped to n - 2
    let mut low = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_betas_use_float_division() {
        // beta_0 = 1 - abar(1/T)/abar(0); with integer division (candle-transformers) it would be 0.
        let b = betas_for_alpha_bar(1000, 0.999);
        let abar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
        let expect = 1.0 - abar(0.001) / abar(0.0);
        assert!((b[0] as f64 - expect).abs() < 1e-9, "{} vs {}", b[0], expect);
        assert!(b[0] > 0.0);
        assert_eq!(b[999], 0.999);
    }

    #[test]
    fn spacings_match_hand_values() {
        assert_eq!(
            discrete_timesteps(TimestepSpacing::Leading, 1000, 10, 1),
            vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        assert_eq!(
            discrete_timesteps(TimestepSpacing::Trailing, 1000, 10, 0),
            vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(
            discrete_timesteps(TimestepSpacing::Linspace, 1000, 4, 0),
            vec![999, 666, 333, 0]
        );
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(-0.4), -0.0);
    }

    #[test]
    fn sigma_to_t_inverts_interpolation() {
        let ls: Vec<f64> = (0..10).map(|i| (i as f64 * 0.3).exp().ln() - 1.0).collect();
        let t = sigma_to_t((ls[4] * 0.5 + ls[5] * 0.5).exp(), &ls);
        assert!((t - 4.5).abs() < 1e-12);
        assert_eq!(sigma_to_t(1e-20, &ls), 0.0);
        assert_eq!(sigma_to_t(1e20, &ls), 9.0);
    }
}
