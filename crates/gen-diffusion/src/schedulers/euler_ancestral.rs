//! Euler ancestral sampler (k-diffusion `sample_euler_ancestral`): an Euler step down to
//! `sigma_down`, then fresh noise of scale `sigma_up`, with
//! `sigma_up = sqrt(s_next^2 (s^2 - s_next^2) / s^2)`, `sigma_down = sqrt(s_next^2 - sigma_up^2)`.

use candle_core::Tensor;
use gen_core::{Error, Result};

use crate::config::{FinalSigmas, SchedulerConfig, SchedulerKind};
use crate::prediction::per_sample;
use crate::scheduler::{
    check_same_shape, need_noise, Scheduler, SchedulerState, StepOutput, TrainSchedule,
};

use super::euler::{sigma_x0, SigmaState};

/// Euler ancestral scheduler (stochastic: every step draws noise, as in diffusers).
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    cfg: SchedulerConfig,
    train: TrainSchedule,
    state: SigmaState,
}

impl EulerAncestralScheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        if cfg.use_karras_sigmas {
            return Err(Error::invalid(
                "scheduler config field `use_karras_sigmas`",
                "EulerAncestralDiscreteScheduler has no Karras sigmas in diffusers",
            ));
        }
        let train = TrainSchedule::new(&cfg, true)?;
        let state = SigmaState::empty(cfg.spacing_for(SchedulerKind::EulerAncestral));
        Ok(Self { cfg, train, state })
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
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
            SchedulerKind::EulerAncestral,
            &self.train,
            n,
            false,
            FinalSigmas::Zero,
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
        true
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
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_same_shape(model_output, sample, "Euler ancestral model output")?;
        let z = need_noise(noise, sample, "Euler ancestral step")?;
        let i = self.state.step_index_for(t)?;
        let (s, s_next) = (self.state.sigmas[i], self.state.sigmas[i + 1]);
        let x0 = sigma_x0(self.cfg.prediction_type, model_output, sample, s)?;
        let sigma_up = (s_next * s_next * (s * s - s_next * s_next) / (s * s)).sqrt();
        let sigma_down = (s_next * s_next - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - s;
        let prev = (sample + ((sample - &x0)? * (dt / s))?)?;
        let prev = (prev + (z * sigma_up)?)?;
        self.state.step_index = Some(i + 1);
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        check_same_shape(noise, x0, "noise")?;
        let s = self.state.add_noise_sigmas(timesteps)?;
        Ok((x0 + noise.broadcast_mul(&per_sample(&s, noise)?)?)?)
    }
}
