//! Euler sampler in the sigma (variance-exploding) parameterisation (Karras et al. 2022,
//! Algorithm 2 without churn): `x_next = x + (x - x0) / sigma * (sigma_next - sigma)`.
//! The sample lives at scale `x = x0 + sigma eps`; the model sees `x / sqrt(sigma^2 + 1)`.

use candle_core::Tensor;
use gen_core::{Error, Result};

use crate::config::{FinalSigmas, SchedulerConfig, SchedulerKind};
use crate::prediction::{per_sample, PredictionType};
use crate::schedule::{self, TimestepSpacing};
use crate::scheduler::{
    axpby, check_same_shape, check_steps, index_for_timestep, not_set, strength_start, Scheduler,
    SchedulerState, StepOutput, TrainSchedule,
};

/// Sigma schedule and step position shared by Euler and Euler ancestral.
#[derive(Debug, Clone)]
pub(crate) struct SigmaState {
    pub timesteps: Vec<f64>,
    /// n + 1 values (last is the final sigma).
    pub sigmas: Vec<f64>,
    pub step_index: Option<usize>,
    pub begin_index: Option<usize>,
    pub spacing: TimestepSpacing,
}

impl SigmaState {
    pub fn empty(spacing: TimestepSpacing) -> Self {
        Self { timesteps: vec![], sigmas: vec![], step_index: None, begin_index: None, spacing }
    }

    /// Euler-family schedule (diffusers `EulerDiscreteScheduler.set_timesteps`).
    pub fn build(
        cfg: &SchedulerConfig,
        kind: SchedulerKind,
        train: &TrainSchedule,
        n: usize,
        karras: bool,
        final_sigmas: FinalSigmas,
    ) -> Result<Self> {
        let nt = cfg.num_train_timesteps;
        check_steps(n, nt)?;
        let spacing = cfg.spacing_for(kind);
        let mut ts = schedule::float_timesteps(spacing, nt, n, cfg.steps_offset);
        let base = schedule::sigmas_from_alphas_cumprod(&train.alphas_cumprod);
        let log_sigmas: Vec<f64> = base.iter().map(|&s| (s as f32).ln() as f64).collect();
        let mut sig: Vec<f64> = ts.iter().map(|&t| schedule::interp_index(t, &base)).collect();
        if karras {
            let lo = cfg.sigma_min.unwrap_or(sig[sig.len() - 1]);
            let hi = cfg.sigma_max.unwrap_or(sig[0]);
            sig = schedule::karras_sigmas(lo, hi, n);
            ts = sig.iter().map(|&s| schedule::sigma_to_t(s, &log_sigmas)).collect();
        }
        let last = match final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => {
                let a = train.alphas_cumprod[0] as f32;
                ((1.0 - a) / a).sqrt() as f64
            }
        };
        sig.push(last);
        Ok(Self {
            timesteps: ts.into_iter().map(|t| t as f32 as f64).collect(),
            sigmas: sig.into_iter().map(|s| s as f32 as f64).collect(),
            step_index: None,
            begin_index: None,
            spacing,
        })
    }

    /// Restores the running step position (checked against the schedule).
    pub fn set_step_index(&mut self, i: Option<usize>) -> Result<()> {
        if let Some(i) = i {
            if i > self.timesteps.len() {
                return Err(Error::invalid(
                    "scheduler state",
                    format!("step index {i} beyond the {} steps", self.timesteps.len()),
                ));
            }
        }
        self.step_index = i;
        Ok(())
    }

    pub fn set_strength(&mut self, strength: Option<f64>) -> Result<()> {
        if strength.is_some() {
            self.begin_index = Some(strength_start(self.timesteps.len(), strength)?);
        }
        Ok(())
    }

    pub fn visible_timesteps(&self) -> &[f64] {
        &self.timesteps[self.begin_index.unwrap_or(0).min(self.timesteps.len())..]
    }

    pub fn visible_sigmas(&self) -> Vec<f64> {
        self.sigmas[self.begin_index.unwrap_or(0).min(self.sigmas.len())..].to_vec()
    }

    /// Index of the step at `t`: the running index while `t` is its timestep, the begin
    /// index (image-to-image) before the first step, else the position of `t`.
    pub fn index(&self, t: f64) -> Result<usize> {
        if self.timesteps.is_empty() {
            return Err(not_set());
        }
        match (self.step_index, self.begin_index) {
            (Some(i), _) if self.timesteps.get(i) == Some(&t) => Ok(i),
            (None, Some(b)) => Ok(b),
            _ => index_for_timestep(t, &self.timesteps),
        }
    }

    /// Position of the step at `t` when stepping: once a trajectory is under way, `t` must be
    /// the next timestep (the sigma-based schedulers keep a running position, as diffusers).
    pub fn step_index_for(&mut self, t: f64) -> Result<usize> {
        let i = match self.step_index {
            Some(i) if self.timesteps.get(i) == Some(&t) => i,
            Some(i) if i >= self.timesteps.len() => {
                return Err(Error::invalid(
                    "scheduler step",
                    format!(
                        "all {} steps are done; call set_timesteps again",
                        self.timesteps.len()
                    ),
                ))
            }
            Some(i) => {
                return Err(Error::invalid(
                    "scheduler step",
                    format!("expected timestep {} (step {i}), got {t}", self.timesteps[i]),
                ))
            }
            None => self.index(t)?,
        };
        self.step_index = Some(i);
        Ok(i)
    }

    pub fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().cloned().fold(0.0f64, f64::max);
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    pub fn scale_model_input(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let s = self.sigmas[self.index(t)?];
        Ok((x * (1.0 / (s * s + 1.0).sqrt()))?)
    }

    pub fn model_alpha_cumprod(&self, t: f64) -> Result<f64> {
        let s = self.sigmas[self.index(t)?];
        Ok(1.0 / (1.0 + s * s))
    }

    /// diffusers' `add_noise` of the sigma schedulers: the sigma per sample.
    pub fn add_noise_sigmas(&self, timesteps: &[f64]) -> Result<Vec<f64>> {
        if self.timesteps.is_empty() {
            return Err(not_set());
        }
        timesteps
            .iter()
            .map(|&t| {
                let i = match (self.begin_index, self.step_index) {
                    (None, _) => index_for_timestep(t, &self.timesteps)?,
                    (Some(_), Some(s)) => s,
                    (Some(b), None) => b,
                };
                Ok(self.sigmas[i])
            })
            .collect()
    }
}

/// x0 from an Euler-type model output at `sigma` (`sample` is the unscaled sample `x0 + sigma eps`).
pub(crate) fn sigma_x0(
    kind: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    Ok(match kind {
        PredictionType::Epsilon => axpby(1.0, sample, -sigma, model_output)?,
        PredictionType::VPrediction => axpby(
            -sigma / (sigma * sigma + 1.0).sqrt(),
            model_output,
            1.0 / (sigma * sigma + 1.0),
            sample,
        )?,
        PredictionType::Sample => model_output.clone(),
    })
}

/// Euler discrete scheduler (options: `use_karras_sigmas`, `final_sigmas_type`, spacing).
#[derive(Debug, Clone)]
pub struct EulerScheduler {
    cfg: SchedulerConfig,
    train: TrainSchedule,
    state: SigmaState,
}

impl EulerScheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        let train = TrainSchedule::new(&cfg, true)?;
        let state = SigmaState::empty(cfg.spacing_for(SchedulerKind::Euler));
        Ok(Self { cfg, train, state })
    }
}

impl Scheduler for EulerScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }
    fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    fn boxed_clone(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
    fn set_timesteps(&mut self, n: usize, strength: Option<f64>) -> Result<()> {
        self.state = SigmaState::build(
            &self.cfg,
            SchedulerKind::Euler,
            &self.train,
            n,
            self.cfg.use_karras_sigmas,
            self.cfg.final_sigmas_type,
        )?;
        self.state.set_strength(strength)
    }
    fn timesteps(&self) -> &[f64] {
        self.state.visible_timesteps()
    }
    fn alphas_cumprod(&self) -> &[f64] {
        &self.train.alphas_cumprod
    }
    fn sigmas(&self) -> Vec<f64> {
        self.state.visible_sigmas()
    }
    fn init_noise_sigma(&self) -> f64 {
        self.state.init_noise_sigma()
    }
    fn scale_model_input(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        self.state.scale_model_input(x, t)
    }
    fn model_alpha_cumprod(&self, t: f64) -> Result<f64> {
        self.state.model_alpha_cumprod(t)
    }
    fn needs_noise(&self, _t: f64) -> bool {
        false
    }
    fn state(&self) -> SchedulerState {
        SchedulerState { step_index: self.state.step_index, ..Default::default() }
    }
    fn set_state(&mut self, state: SchedulerState) -> Result<()> {
        self.state.set_step_index(state.step_index)
    }
    fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_same_shape(model_output, sample, "Euler model output")?;
        let i = self.state.step_index_for(t)?;
        let (sigma, next) = (self.state.sigmas[i], self.state.sigmas[i + 1]);
        let x0 = sigma_x0(self.cfg.prediction_type, model_output, sample, sigma)?;
        // x + (x - x0) / sigma * dt
        let dt = next - sigma;
        let prev = (sample + ((sample - &x0)? * (dt / sigma))?)?;
        self.state.step_index = Some(i + 1);
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        check_same_shape(noise, x0, "noise")?;
        let s = self.state.add_noise_sigmas(timesteps)?;
        Ok((x0 + noise.broadcast_mul(&per_sample(&s, noise)?)?)?)
    }
}
