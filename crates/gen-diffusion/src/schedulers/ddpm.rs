//! DDPM ancestral sampling (Ho et al. 2020): posterior mean
//! `mu = sqrt(a_prev) beta_t / (1-a_t) x0 + sqrt(alpha_t) (1-a_prev)/(1-a_t) x_t` plus noise with
//! the configured variance (`fixed_small`: `(1-a_prev)/(1-a_t) beta_t`, `fixed_large`: `beta_t`),
//! where `beta_t = 1 - a_t/a_prev` between consecutive inference timesteps.

use candle_core::Tensor;
use gen_core::Result;

use crate::config::{SchedulerConfig, SchedulerKind, VarianceType};
use crate::schedule;
use crate::scheduler::{
    axpby, check_same_shape, check_steps, index_for_timestep, int_timestep, need_noise, not_set,
    strength_start, Scheduler, StepOutput, TrainSchedule,
};

/// DDPM scheduler (stochastic: every step but the one at t = 0 adds noise).
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    cfg: SchedulerConfig,
    train: TrainSchedule,
    timesteps: Vec<f64>,
    begin: usize,
}

impl DdpmScheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        let train = TrainSchedule::new(&cfg, false)?;
        Ok(Self { cfg, train, timesteps: vec![], begin: 0 })
    }

    /// Cumulative alpha at the inference timestep after `t` (1 after the last one).
    fn prev_alpha(&self, t: f64) -> Result<f64> {
        let i = index_for_first(t, &self.timesteps)?;
        Ok(match self.timesteps.get(i + 1) {
            Some(&p) => self.train.alphas_cumprod[p as usize],
            None => 1.0,
        })
    }
}

/// diffusers' `previous_timestep` uses the first match.
fn index_for_first(t: f64, ts: &[f64]) -> Result<usize> {
    match ts.iter().position(|&s| s == t) {
        Some(i) => Ok(i),
        None => index_for_timestep(t, ts),
    }
}

impl Scheduler for DdpmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
    }
    fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    fn boxed_clone(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
    fn set_timesteps(&mut self, n: usize, strength: Option<f64>) -> Result<()> {
        check_steps(n, self.cfg.num_train_timesteps)?;
        let spacing = self.cfg.spacing_for(SchedulerKind::Ddpm);
        self.timesteps = schedule::discrete_timesteps(
            spacing,
            self.cfg.num_train_timesteps,
            n,
            self.cfg.steps_offset,
        )
        .into_iter()
        .map(|t| t as f64)
        .collect();
        for &t in &self.timesteps {
            int_timestep(t, self.cfg.num_train_timesteps)?;
        }
        self.begin = strength_start(n, strength)?;
        Ok(())
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps[self.begin.min(self.timesteps.len())..]
    }
    fn alphas_cumprod(&self) -> &[f64] {
        &self.train.alphas_cumprod
    }
    fn sigmas(&self) -> Vec<f64> {
        let sig = |a: f64| ((1.0 - a) / a).sqrt();
        let mut s: Vec<f64> =
            self.timesteps().iter().map(|&t| sig(self.train.alphas_cumprod[t as usize])).collect();
        if !self.timesteps.is_empty() {
            s.push(0.0);
        }
        s
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, x: &Tensor, _t: f64) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn model_alpha_cumprod(&self, t: f64) -> Result<f64> {
        self.train.at(t)
    }
    fn needs_noise(&self, t: f64) -> bool {
        t > 0.0
    }
    fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        if self.timesteps.is_empty() {
            return Err(not_set());
        }
        check_same_shape(model_output, sample, "DDPM model output")?;
        let ti = int_timestep(t, self.cfg.num_train_timesteps)?;
        let a_t = self.train.alphas_cumprod[ti];
        let a_prev = self.prev_alpha(t)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let (mut x0, _) = super::vp_x0_eps(self.cfg.prediction_type, model_output, sample, a_t)?;
        if self.cfg.clip_sample.unwrap_or(true) {
            let r = self.cfg.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let c_x0 = a_prev.sqrt() * cur_beta / b_t;
        let c_x = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev = axpby(c_x0, &x0, c_x, sample)?;
        if t > 0.0 {
            let var = (b_prev / b_t * cur_beta).max(1e-20);
            let std = match self.cfg.variance_type.unwrap_or(VarianceType::FixedSmall) {
                VarianceType::FixedSmall => var.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * var.ln()).exp(),
                VarianceType::FixedLarge => cur_beta.sqrt(),
            };
            let z = need_noise(noise, sample, "DDPM step")?;
            prev = (prev + (z * std)?)?;
        }
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        let a: Vec<f64> = timesteps.iter().map(|&t| self.train.at(t)).collect::<Result<_>>()?;
        super::vp_add_noise(x0, noise, &a)
    }
}
