//! DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models"), data-prediction form, orders 1 and 2 ("DPM++ 2M"), with
//! optional Karras sigmas ("DPM++ 2M Karras"). With `alpha = 1/sqrt(1+s^2)`, `sigma = s alpha`,
//! `lambda = ln(alpha/sigma)`, `h = lambda_next - lambda`:
//! first order `x' = sigma'/sigma x - alpha' (e^-h - 1) D0`;
//! second order (midpoint) adds `- 0.5 alpha' (e^-h - 1) D1`, `D1 = (D0 - D_prev) h / h_prev`.
//! The final step falls back to first order as diffusers' `lower_order_final` rules say
//! (always when the final sigma is zero; for fewer than 15 steps with `lower_order_final`).

use candle_core::Tensor;
use gen_core::{Error, Result};

use crate::config::{FinalSigmas, SchedulerConfig, SchedulerKind};
use crate::prediction::PredictionType;
use crate::schedule::{self, BetaSchedule, TimestepSpacing};
use crate::scheduler::{
    axpby, check_same_shape, check_steps, not_set, Scheduler, SchedulerState, StepOutput,
    TrainSchedule,
};

use super::euler::SigmaState;

/// DPM-Solver++ multistep scheduler.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    cfg: SchedulerConfig,
    train: TrainSchedule,
    state: SigmaState,
    /// Data predictions of the previous steps (oldest first), `solver_order` slots.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        let train = TrainSchedule::new(&cfg, true)?;
        let state = SigmaState::empty(cfg.spacing_for(SchedulerKind::DpmSolverMultistep));
        let order = cfg.solver_order;
        Ok(Self { cfg, train, state, model_outputs: vec![None; order], lower_order_nums: 0 })
    }

    fn build_state(&self, n: usize) -> Result<SigmaState> {
        let cfg = &self.cfg;
        let nt = cfg.num_train_timesteps;
        check_steps(n, nt)?;
        let ac = &self.train.alphas_cumprod;
        // lambda_t decreases with t; count the entries of the flipped (increasing) array below the clip.
        let clipped_idx = ac
            .iter()
            .map(|&a| {
                let a = a as f32;
                (a.sqrt().ln() - (1.0f32 - a).sqrt().ln()) as f64
            })
            .filter(|&l| l < cfg.lambda_min_clipped)
            .count();
        let last = nt - clipped_idx;
        let spacing = cfg.spacing_for(SchedulerKind::DpmSolverMultistep);
        let mut ts: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => {
                let v = schedule::linspace_f64(0.0, last as f64 - 1.0, n + 1);
                v.into_iter().rev().take(n).map(schedule::round_half_even).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
            }
            TimestepSpacing::Trailing => schedule::trailing(last as f64, nt, n),
        };
        let base = schedule::sigmas_from_alphas_cumprod(ac);
        let log_sigmas: Vec<f64> = base.iter().map(|&s| (s as f32).ln() as f64).collect();
        let mut sig: Vec<f64>;
        if cfg.use_karras_sigmas {
            let lo = cfg.sigma_min.unwrap_or(base[0]);
            let hi = cfg.sigma_max.unwrap_or(base[base.len() - 1]);
            sig = schedule::karras_sigmas(lo, hi, n);
            ts = sig.iter().map(|&s| schedule::sigma_to_t(s, &log_sigmas)).collect();
            if cfg.beta_schedule != BetaSchedule::SquaredcosCapV2 {
                ts = ts.into_iter().map(schedule::round_half_even).collect();
            }
        } else {
            sig = ts.iter().map(|&t| schedule::interp_index(t, &base)).collect();
        }
        // diffusers casts the timesteps to int64 (truncation).
        let ts: Vec<f64> = ts.into_iter().map(|t| t.trunc()).collect();
        let final_sigma = match cfg.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => {
                let a = ac[0] as f32;
                ((1.0 - a) / a).sqrt() as f64
            }
        };
        sig.push(final_sigma);
        Ok(SigmaState {
            timesteps: ts,
            sigmas: sig.into_iter().map(|s| s as f32 as f64).collect(),
            step_index: None,
            begin_index: None,
            spacing,
        })
    }

    /// Step position; diffusers falls back to the last step for an unknown timestep.
    fn index(&self, t: f64) -> Result<usize> {
        if self.state.timesteps.is_empty() {
            return Err(not_set());
        }
        if self.state.step_index.is_none()
            && self.state.begin_index.is_none()
            && !self.state.timesteps.contains(&t)
        {
            return Ok(self.state.timesteps.len() - 1);
        }
        self.state.index(t)
    }
}

/// (alpha_t, sigma_t, lambda_t) of a VE sigma.
fn alpha_sigma_lambda(s: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    let sigma = s * alpha;
    (alpha, sigma, alpha.ln() - sigma.ln())
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
    }
    fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    fn boxed_clone(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
    fn set_timesteps(&mut self, n: usize, strength: Option<f64>) -> Result<()> {
        self.state = self.build_state(n)?;
        self.state.set_strength(strength)?;
        self.model_outputs = vec![None; self.cfg.solver_order];
        self.lower_order_nums = 0;
        Ok(())
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
        1.0
    }
    fn scale_model_input(&self, x: &Tensor, _t: f64) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn model_alpha_cumprod(&self, t: f64) -> Result<f64> {
        let s = self.state.sigmas[self.index(t)?];
        Ok(1.0 / (1.0 + s * s))
    }
    fn needs_noise(&self, _t: f64) -> bool {
        false
    }
    fn state(&self) -> SchedulerState {
        SchedulerState {
            step_index: self.state.step_index,
            history: self.model_outputs.clone(),
            lower_order_nums: self.lower_order_nums,
        }
    }
    fn set_state(&mut self, state: SchedulerState) -> Result<()> {
        let order = self.cfg.solver_order;
        // An empty history is the state before the first step.
        let history = if state.history.is_empty() { vec![None; order] } else { state.history };
        if history.len() != order || state.lower_order_nums > order {
            return Err(Error::invalid(
                "DPM-Solver state",
                format!(
                    "{} history slots and {} lower-order steps for solver order {order}",
                    history.len(),
                    state.lower_order_nums
                ),
            ));
        }
        self.state.set_step_index(state.step_index)?;
        self.model_outputs = history;
        self.lower_order_nums = state.lower_order_nums;
        Ok(())
    }
    fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        check_same_shape(model_output, sample, "DPM-Solver model output")?;
        let i = match self.state.step_index {
            None => self.index(t)?,
            Some(_) => self.state.step_index_for(t)?,
        };
        let len = self.state.timesteps.len();
        self.state.step_index = Some(i);
        let lower_order_final = i == len - 1
            && (self.cfg.euler_at_final
                || (self.cfg.lower_order_final && len < 15)
                || self.cfg.final_sigmas_type == FinalSigmas::Zero);

        // Data prediction x0 at this step.
        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.state.sigmas[i]);
        let x0 = match self.cfg.prediction_type {
            PredictionType::Epsilon => {
                axpby(1.0 / alpha_s0, sample, -sigma_s0 / alpha_s0, model_output)?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => axpby(alpha_s0, sample, -sigma_s0, model_output)?,
        };
        let order = self.cfg.solver_order;
        self.model_outputs.rotate_left(1);
        self.model_outputs[order - 1] = Some(x0.clone());

        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.state.sigmas[i + 1]);
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0;
        let ratio = if sigma_t == 0.0 { 0.0 } else { sigma_t / sigma_s0 };
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            axpby(ratio, sample, -alpha_t * em1, &x0)?
        } else {
            let m1 = self.model_outputs[order - 2]
                .as_ref()
                .ok_or_else(|| Error::msg("DPM-Solver: missing previous output"))?;
            let (_, _, lambda_s1) = alpha_sigma_lambda(self.state.sigmas[i - 1]);
            let h0 = lambda_s0 - lambda_s1;
            let r0 = h0 / h;
            let d1 = ((&x0 - m1)? * (1.0 / r0))?;
            let base = axpby(ratio, sample, -alpha_t * em1, &x0)?;
            let c1 = if self.cfg.solver_type_heun {
                alpha_t * (em1 / h + 1.0)
            } else {
                -0.5 * alpha_t * em1
            };
            (base + (d1 * c1)?)?
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.state.step_index = Some(i + 1);
        Ok(StepOutput { prev_sample: prev, pred_original_sample: x0 })
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        let s = self.state.add_noise_sigmas(timesteps)?;
        let a: Vec<f64> = s.iter().map(|s| 1.0 / (1.0 + s * s)).collect();
        super::vp_add_noise(x0, noise, &a)
    }
}
