//! DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), eq. 12 and 16:
//! `x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z`, `s = eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev))`.

use candle_core::Tensor;
use gen_core::Result;

use crate::config::{SchedulerConfig, SchedulerKind};
use crate::schedule;
use crate::scheduler::{
    axpby, check_same_shape, check_steps, int_timestep, need_noise, not_set, strength_start,
    Scheduler, StepOutput, TrainSchedule,
};

/// DDIM scheduler. Options: `eta` (0 = deterministic), `clip_sample`, `set_alpha_to_one`,
/// `steps_offset`, `timestep_spacing`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    cfg: SchedulerConfig,
    train: TrainSchedule,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    begin: usize,
    num_inference_steps: usize,
}

impl DdimScheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        let train = TrainSchedule::new(&cfg, false)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { train.alphas_cumprod[0] };
        Ok(Self {
            cfg,
            train,
            final_alpha_cumprod,
            timesteps: vec![],
            begin: 0,
            num_inference_steps: 0,
        })
    }

    fn prev_alpha(&self, t: usize) -> f64 {
        let prev = t as i64 - (self.cfg.num_train_timesteps / self.num_inference_steps) as i64;
        if prev >= 0 {
            self.train.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }
    fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    fn boxed_clone(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
    fn set_timesteps(&mut self, n: usize, strength: Option<f64>) -> Result<()> {
        check_steps(n, self.cfg.num_train_timesteps)?;
        let spacing = self.cfg.spacing_for(SchedulerKind::Ddim);
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
        self.num_inference_steps = n;
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
        if let Some(&last) = self.timesteps.last() {
            s.push(sig(self.prev_alpha(last as usize)));
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
    fn needs_noise(&self, _t: f64) -> bool {
        self.cfg.eta > 0.0
    }
    fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        if self.num_inference_steps == 0 {
            return Err(not_set());
        }
        check_same_shape(model_output, sample, "DDIM model output")?;
        let ti = int_timestep(t, self.cfg.num_train_timesteps)?;
        let a_t = self.train.alphas_cumprod[ti];
        let a_prev = self.prev_alpha(ti);
        // eps comes from the unclipped prediction, as in diffusers.
        let (mut x0, eps) = super::vp_x0_eps(self.cfg.prediction_type, model_output, sample, a_t)?;
        if self.cfg.clip_sample.unwrap_or(true) {
            let r = self.cfg.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
        let std = self.cfg.eta * variance.sqrt();
        let mut prev = axpby(a_prev.sqrt(), &x0, (1.0 - a_prev - std * std).max(0.0).sqrt(), &eps)?;
        if self.cfg.eta > 0.0 {
            let z = need_noise(noise, sample, "DDIM step (eta > 0)")?;
            prev = (prev + (z * std)?)?;
        }
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        let a: Vec<f64> = timesteps.iter().map(|&t| self.train.at(t)).collect::<Result<_>>()?;
        super::vp_add_noise(x0, noise, &a)
    }
}
