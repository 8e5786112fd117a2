//! Learning-rate schedules. Steps count from 0: `lr(0)` is the rate of the first update.
//!
//! Linear decay and the refinement schedule follow Defazio et al., "When, Why and How Much?
//! Adaptive Learning Rate Scheduling by Refinement" (2023): linear decay `lr (1 - t/T)` matches
//! or beats cosine; refinement builds a schedule from a previous run's gradient norms.
//!
//! A schedule is a pure function of the step, so resuming from a checkpoint only needs the step
//! count ([`crate::Optimizer::step_count`]).

use gen_core::{Error, Result};

/// A learning rate for every step.
pub trait LrSchedule {
    /// The learning rate of update `step` (0-based).
    fn lr(&self, step: u64) -> f64;
}

/// Sets each group's learning rate to `base_lrs[g] * schedule.lr(step)`, for a schedule built
/// with `lr = 1.0` (a multiplier), so groups with different base rates follow one shape.
pub fn apply_schedule(
    opt: &mut dyn crate::Optimizer,
    base_lrs: &[f64],
    schedule: &dyn LrSchedule,
    step: u64,
) -> Result<()> {
    let n = opt.lrs().len();
    if base_lrs.len() != n {
        return Err(Error::invalid(
            "base_lrs",
            format!("{} rates for {n} parameter groups", base_lrs.len()),
        ));
    }
    let f = schedule.lr(step);
    for (g, base) in base_lrs.iter().enumerate() {
        opt.set_group_lr(g, base * f)?;
    }
    Ok(())
}

/// Linear warm-up factor: `(step + 1) / warmup` for the first `warmup` steps, then 1.
/// (The first update already gets a non-zero rate.)
fn warmup_factor(step: u64, warmup: u64) -> f64 {
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        1.0
    }
}

/// The same rate at every step.
#[derive(Clone, Debug, PartialEq)]
pub struct Constant {
    pub lr: f64,
}

impl LrSchedule for Constant {
    fn lr(&self, _step: u64) -> f64 {
        self.lr
    }
}

/// Linear warm-up over `warmup` steps, then constant `lr`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearWarmup {
    pub lr: f64,
    pub warmup: u64,
}

impl LrSchedule for LinearWarmup {
    fn lr(&self, step: u64) -> f64 {
        self.lr * warmup_factor(step, self.warmup)
    }
}

/// Linear warm-up, then linear decay from `lr` at step `warmup` to `final_lr` at step
/// `total_steps`: `lr_t = final + (lr - final) (1 - (t - warmup)/(total - warmup))`.
/// With `warmup = 0` and `final_lr = 0` this is Defazio et al.'s `lr (1 - t/T)`.
/// Steps past `total_steps` keep `final_lr`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearDecay {
    pub lr: f64,
    pub warmup: u64,
    pub total_steps: u64,
    pub final_lr: f64,
}

impl LinearDecay {
    pub fn new(lr: f64, warmup: u64, total_steps: u64, final_lr: f64) -> Result<Self> {
        check_span(warmup, total_steps)?;
        Ok(Self { lr, warmup, total_steps, final_lr })
    }
}

fn check_span(warmup: u64, total_steps: u64) -> Result<()> {
    if total_steps == 0 || warmup >= total_steps {
        return Err(Error::invalid(
            "schedule",
            format!("warmup {warmup} must be below total_steps {total_steps} (> 0)"),
        ));
    }
    Ok(())
}

/// Progress in [0, 1] of the decay phase.
fn decay_progress(step: u64, warmup: u64, total: u64) -> f64 {
    if step <= warmup {
        return 0.0;
    }
    ((step - warmup) as f64 / (total - warmup) as f64).min(1.0)
}

impl LrSchedule for LinearDecay {
    fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * warmup_factor(step, self.warmup);
        }
        let s = decay_progress(step, self.warmup, self.total_steps);
        self.final_lr + (self.lr - self.final_lr) * (1.0 - s)
    }
}

/// Linear warm-up, then cosine from `lr` at step `warmup` to `final_lr` at `total_steps`:
/// `final + (lr - final) (1 + cos(pi s)) / 2`, `s = (t - warmup)/(total - warmup)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cosine {
    pub lr: f64,
    pub warmup: u64,
    pub total_steps: u64,
    pub final_lr: f64,
}

impl Cosine {
    pub fn new(lr: f64, warmup: u64, total_steps: u64, final_lr: f64) -> Result<Self> {
        check_span(warmup, total_steps)?;
        Ok(Self { lr, warmup, total_steps, final_lr })
    }
}

impl LrSchedule for Cosine {
    fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * warmup_factor(step, self.warmup);
        }
        let s = decay_progress(step, self.warmup, self.total_steps);
        self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + (std::f64::consts::PI * s).cos())
    }
}

/// The refinement schedule of Defazio et al. (their Algorithm for SGD-like methods), built from
/// the per-step gradient norms of a previous run of the same length:
///
/// 1. median-filter the norms with a centred window of `median_window` steps (truncated at
///    the ends),
/// 2. `w_t = ĝ_t^-2`,
/// 3. `lr_t ∝ w_t Σ_{s>t} w_s`, scaled so that the largest value equals `lr`.
///
/// Warm-up and a fast final annealing (the last step gets 0) emerge from the norms. Steps
/// past the end keep the last value.
#[derive(Clone, Debug, PartialEq)]
pub struct Refined {
    lrs: Vec<f64>,
}

impl Refined {
    /// `grad_norms[t]`: the global gradient norm at step t of the previous run (e.g.
    /// [`crate::StepReport::grad_norm`]). `median_window` >= 1 (1: no filtering). The window
    /// is our parameter, not fixed by the paper; a tenth of the run is a reasonable start.
    pub fn from_grad_norms(lr: f64, grad_norms: &[f64], median_window: usize) -> Result<Self> {
        if grad_norms.len() < 2 {
            return Err(Error::invalid(
                "refinement schedule",
                format!("needs at least 2 gradient norms, got {}", grad_norms.len()),
            ));
        }
        if median_window == 0 {
            return Err(Error::invalid("median_window", "0 (must be >= 1)"));
        }
        if let Some((i, g)) =
            grad_norms.iter().enumerate().find(|(_, g)| !(g.is_finite() && **g > 0.0))
        {
            return Err(Error::invalid(
                "gradient norm",
                format!("step {i}: {g} (must be finite and > 0)"),
            ));
        }
        let smooth = median_filter(grad_norms, median_window);
        let w: Vec<f64> = smooth.iter().map(|g| 1.0 / (g * g)).collect();
        let n = w.len();
        let mut raw = vec![0.0; n];
        let mut tail = 0.0; // Σ_{s>t} w_s
        for t in (0..n).rev() {
            raw[t] = w[t] * tail;
            tail += w[t];
        }
        let max = raw.iter().cloned().fold(0.0, f64::max);
        let lrs = raw.iter().map(|r| lr * r / max).collect();
        Ok(Self { lrs })
    }

    /// The whole schedule, one rate per step of the previous run.
    pub fn rates(&self) -> &[f64] {
        &self.lrs
    }
}

impl LrSchedule for Refined {
    fn lr(&self, step: u64) -> f64 {
        let i = (step as usize).min(self.lrs.len() - 1);
        self.lrs[i]
    }
}

/// Centred running median with a window of `window` values, truncated at the ends; for an even
/// count the mean of the two middle values.
pub fn median_filter(x: &[f64], window: usize) -> Vec<f64> {
    let half_lo = (window - 1) / 2;
    let half_hi = window / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(half_lo);
            let hi = (i + half_hi + 1).min(x.len());
            let mut v: Vec<f64> = x[lo..hi].to_vec();
            v.sort_by(|a, b| a.total_cmp(b));
            let k = v.len();
            if k % 2 == 1 {
                v[k / 2]
            } else {
                0.5 * (v[k / 2 - 1] + v[k / 2])
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * (1.0 + b.abs())
    }

    #[test]
    fn warmup_and_constant() {
        let s = LinearWarmup { lr: 1.0, warmup: 4 };
        let got: Vec<f64> = (0..6).map(|t| s.lr(t)).collect();
        assert_eq!(got, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(Constant { lr: 0.3 }.lr(1000), 0.3);
    }

    #[test]
    fn linear_decay_is_defazio_form() {
        let s = LinearDecay::new(2.0, 0, 10, 0.0).unwrap();
        for t in 0..=12 {
            let want = 2.0 * (1.0 - (t as f64 / 10.0).min(1.0));
            assert!(close(s.lr(t), want), "t={t}: {} vs {want}", s.lr(t));
        }
        let s = LinearDecay::new(1.0, 2, 6, 0.2).unwrap();
        let got: Vec<f64> = (0..7).map(|t| s.lr(t)).collect();
        let want = [0.5, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2];
        assert!(got.iter().zip(want).all(|(a, b)| close(*a, b)), "{got:?}");
        assert!(LinearDecay::new(1.0, 10, 10, 0.0).is_err());
    }

    #[test]
    fn cosine_with_warmup_and_final_lr() {
        let s = Cosine::new(1.0, 2, 6, 0.1).unwrap();
        assert!(close(s.lr(0), 0.5) && close(s.lr(1), 1.0) && close(s.lr(2), 1.0));
        // Half-way through the decay: the mean of lr and final_lr.
        assert!(close(s.lr(4), 0.55), "{}", s.lr(4));
        assert!(close(s.lr(6), 0.1) && close(s.lr(100), 0.1));
        // cos(pi/4) point.
        let want = 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos());
        assert!(close(s.lr(3), want));
    }

    #[test]
    fn median_filter_removes_spikes() {
        assert_eq!(median_filter(&[1.0, 100.0, 1.0, 1.0, 1.0], 3), vec![50.5, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(median_filter(&[3.0, 1.0, 2.0], 1), vec![3.0, 1.0, 2.0]);
        assert_eq!(median_filter(&[5.0, 1.0, 9.0, 2.0], 5), vec![5.0, 3.5, 3.5, 2.0]);
    }

    #[test]
    fn refinement_of_constant_norms_is_linear_decay() {
        let s = Refined::from_grad_norms(0.6, &[2.0; 4], 1).unwrap();
        let want = [0.6, 0.4, 0.2, 0.0];
        assert!(s.rates().iter().zip(want).all(|(a, b)| close(*a, b)), "{:?}", s.rates());
        assert_eq!(s.lr(10), 0.0);
    }

    #[test]
    fn refinement_produces_warmup_from_large_early_norms() {
        // w = [1/4, 1, 1, 1]; raw = [3/4, 2, 1, 0]; max 2.
        let s = Refined::from_grad_norms(1.0, &[2.0, 1.0, 1.0, 1.0], 1).unwrap();
        let want = [0.375, 1.0, 0.5, 0.0];
        assert!(s.rates().iter().zip(want).all(|(a, b)| close(*a, b)), "{:?}", s.rates());
        // The median filter ignores a single spike: same schedule as constant norms.
        let spiky = Refined::from_grad_norms(1.0, &[1.0, 1.0, 50.0, 1.0, 1.0, 1.0], 3).unwrap();
        let flat = Refined::from_grad_norms(1.0, &[1.0; 6], 1).unwrap();
        assert!(
            spiky.rates().iter().zip(flat.rates()).all(|(a, b)| close(*a, *b)),
            "{:?}",
            spiky.rates()
        );
        assert!(Refined::from_grad_norms(1.0, &[1.0, f64::NAN], 1).is_err());
        assert!(Refined::from_grad_norms(1.0, &[1.0, 0.0], 1).is_err());
        assert!(Refined::from_grad_norms(1.0, &[1.0], 1).is_err());
    }
}
