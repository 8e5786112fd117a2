//! Scheduler configuration, read from a diffusers `scheduler/scheduler_config.json`.
//!
//! Field names are diffusers' own. Fields this crate does not model are ignored when they hold
//! their diffusers default and rejected (naming the field) otherwise, so a config never silently
//! means something else here than in diffusers.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use gen_core::{Error, Result};

use crate::prediction::PredictionType;
use crate::schedule::{BetaSchedule, TimestepSpacing};
use crate::scheduler::Scheduler;
use crate::schedulers::{
    DdimScheduler, DdpmScheduler, DpmSolverMultistepScheduler, EulerAncestralScheduler,
    EulerScheduler,
};

/// The schedulers this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Ddim,
    Ddpm,
    Euler,
    EulerAncestral,
    /// DPM-Solver++ multistep (order 2 by default: "DPM++ 2M"; "Karras" with `use_karras_sigmas`).
    DpmSolverMultistep,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] =
        [Self::Ddim, Self::Ddpm, Self::Euler, Self::EulerAncestral, Self::DpmSolverMultistep];

    /// diffusers' class name (`_class_name`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// Short name (CLI flags, run configs).
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Ddpm => "ddpm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::DpmSolverMultistep => "dpmpp_2m",
        }
    }

    /// Parses a diffusers class name or a short name.
    pub fn parse(name: &str) -> Result<Self> {
        for k in Self::ALL {
            if name == k.class_name() || name.eq_ignore_ascii_case(k.short_name()) {
                return Ok(k);
            }
        }
        let known: Vec<String> =
            Self::ALL.iter().map(|k| format!("{} ({})", k.class_name(), k.short_name())).collect();
        Err(Error::invalid(
            "scheduler",
            format!("unknown scheduler `{name}`; known: {}", known.join(", ")),
        ))
    }

    /// Default timestep spacing of this scheduler in diffusers.
    pub fn default_spacing(self) -> TimestepSpacing {
        match self {
            Self::Ddim | Self::Ddpm => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        }
    }
}

/// DDPM posterior variance choice (diffusers' `variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// `beta~_t = (1 - a_prev) / (1 - a_t) * beta_t` (clamped at 1e-20).
    FixedSmall,
    /// Same variance, computed through exp(0.5 log(var)) as diffusers does.
    FixedSmallLog,
    /// `beta_t`.
    FixedLarge,
}

impl VarianceType {
    pub const NAMES: [&'static str; 3] = ["fixed_small", "fixed_small_log", "fixed_large"];
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fixed_small" => Some(Self::FixedSmall),
            "fixed_small_log" => Some(Self::FixedSmallLog),
            "fixed_large" => Some(Self::FixedLarge),
            _ => None,
        }
    }
}

/// Last sigma of the sigma-based schedulers (diffusers' `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// Scheduler configuration with diffusers' field names. Per-scheduler defaults (spacing,
/// clipping) stay `None` here and are resolved by the scheduler that is built.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerConfig {
    /// diffusers' `_class_name` as written in the file (may name a scheduler this crate lacks,
    /// e.g. `PNDMScheduler` in Stable Diffusion 1.5; [`SchedulerConfig::build_as`] still works then).
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas instead of a schedule.
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// `None`: the scheduler's diffusers default (leading for DDIM/DDPM, linspace otherwise).
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    /// DDIM: final "previous" alpha product is 1 (else `alphas_cumprod[0]`).
    pub set_alpha_to_one: bool,
    /// DDIM/DDPM: clamp predicted x0 to `[-clip_sample_range, clip_sample_range]`. `None`: true (diffusers default).
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// Euler / DPM-Solver: Karras sigmas (rho = 7).
    pub use_karras_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// DDPM variance. `None`: fixed_small.
    pub variance_type: Option<VarianceType>,
    pub rescale_betas_zero_snr: bool,
    pub final_sigmas_type: FinalSigmas,
    /// DPM-Solver: order (1 or 2 supported).
    pub solver_order: usize,
    /// DPM-Solver: `true` = heun, `false` = midpoint (diffusers' `solver_type`).
    #[serde(rename = "solver_type", serialize_with = "ser_solver_type")]
    pub solver_type_heun: bool,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
    /// DDIM eta (not a diffusers config field: diffusers passes it to `step`). 0 = deterministic.
    pub eta: f64,
}

fn ser_solver_type<S: serde::Serializer>(
    heun: &bool,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(if *heun { "heun" } else { "midpoint" })
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: None,
            clip_sample_range: 1.0,
            use_karras_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            variance_type: None,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmas::Zero,
            solver_order: 2,
            solver_type_heun: false,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            eta: 0.0,
        }
    }
}

/// Stable Diffusion 1.x/2.x training schedule (scaled_linear 0.00085..0.012, steps_offset 1,
/// set_alpha_to_one false, no clipping), the one most checkpoints ship.
impl SchedulerConfig {
    pub fn stable_diffusion(kind: SchedulerKind) -> Self {
        Self {
            class_name: Some(kind.class_name().into()),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: Some(false),
            ..Default::default()
        }
    }

    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the JSON text of a scheduler config; `file` names it in errors.
    pub fn from_json_str(text: &str, file: impl AsRef<Path>) -> Result<Self> {
        let file = file.as_ref().to_path_buf();
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            file: file.clone(),
            key: "<json>".into(),
            msg: e.to_string(),
        })?;
        Self::from_json_value(&value, &file)
    }

    /// Parses an already-decoded JSON object.
    pub fn from_json_value(value: &Value, file: &Path) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| Error::Config {
            file: file.to_path_buf(),
            key: "<root>".into(),
            msg: "expected a JSON object".into(),
        })?;
        Reader { file: file.to_path_buf(), map }.read()
    }

    /// The scheduler named by `_class_name`; an error lists the known ones.
    pub fn kind(&self) -> Result<SchedulerKind> {
        match &self.class_name {
            Some(name) => SchedulerKind::parse(name),
            None => {
                let known: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.class_name()).collect();
                Err(Error::invalid(
                    "scheduler",
                    format!(
                        "the config names no scheduler (`_class_name`); known: {}",
                        known.join(", ")
                    ),
                ))
            }
        }
    }

    /// Builds the scheduler named by `_class_name`.
    pub fn build(&self) -> Result<Box<dyn Scheduler>> {
        self.build_as(self.kind()?)
    }

    /// Builds scheduler `kind` from this config (like diffusers' `XScheduler.from_config`).
    pub fn build_as(&self, kind: SchedulerKind) -> Result<Box<dyn Scheduler>> {
        let mut cfg = self.clone();
        cfg.class_name = Some(kind.class_name().into());
        Ok(match kind {
            SchedulerKind::Ddim => Box::new(DdimScheduler::new(cfg)?),
            SchedulerKind::Ddpm => Box::new(DdpmScheduler::new(cfg)?),
            SchedulerKind::Euler => Box::new(EulerScheduler::new(cfg)?),
            SchedulerKind::EulerAncestral => Box::new(EulerAncestralScheduler::new(cfg)?),
            SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistepScheduler::new(cfg)?),
        })
    }

    /// The spacing in effect for `kind`.
    pub fn spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(kind.default_spacing())
    }

    /// Checks value ranges; `what` names the source in errors.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::invalid(format!("scheduler config field `{key}`"), msg))
        };
        if self.num_train_timesteps < 2 {
            return bad("num_train_timesteps", format!("{} (need >= 2)", self.num_train_timesteps));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return bad(
                    "trained_betas",
                    format!(
                        "{} values for num_train_timesteps {}",
                        b.len(),
                        self.num_train_timesteps
                    ),
                );
            }
            if b.iter().any(|&x| !(x > 0.0 && x < 1.0)) {
                return bad("trained_betas", "values must lie in (0, 1)".into());
            }
        } else if !(self.beta_start > 0.0
            && self.beta_end > 0.0
            && self.beta_start < 1.0
            && self.beta_end < 1.0)
        {
            return bad(
                "beta_start/beta_end",
                format!("{} / {} must lie in (0, 1)", self.beta_start, self.beta_end),
            );
        }
        if !(self.solver_order == 1 || self.solver_order == 2) {
            return bad("solver_order", format!("{} (supported: 1, 2)", self.solver_order));
        }
        if self.eta.is_nan() || self.eta < 0.0 {
            return bad("eta", format!("{} (must be >= 0)", self.eta));
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for SchedulerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_json_value(&v, Path::new("<scheduler config>")).map_err(serde::de::Error::custom)
    }
}

struct Reader<'a> {
    file: PathBuf,
    map: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config { file: self.file.clone(), key: key.into(), msg: msg.into() }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }
    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }
    fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }
    fn choice<T>(
        &self,
        key: &str,
        names: &[&str],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => parse(s).map(Some).ok_or_else(|| {
                self.err(key, format!("unsupported value `{s}`; supported: {}", names.join(", ")))
            }),
        }
    }
    /// A field we do not model: accepted only when absent or equal to diffusers' default.
    fn unmodelled(&self, key: &str, is_default: impl Fn(&Value) -> bool, why: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if !is_default(v) => {
                Err(self.err(key, format!("value {v} is not supported ({why})")))
            }
            _ => Ok(()),
        }
    }

    fn read(&self) -> Result<SchedulerConfig> {
        let d = SchedulerConfig::default();
        let class_name = self.str("_class_name")?.map(str::to_string);
        let trained_betas = match self.get("trained_betas") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_f64().ok_or_else(|| {
                            self.err("trained_betas", format!("entry {i} is not a number: {v}"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(v) => {
                return Err(
                    self.err("trained_betas", format!("expected an array of numbers, found {v}"))
                )
            }
        };
        let final_sigmas_type =
            self.choice("final_sigmas_type", &["zero", "sigma_min"], |s| match s {
                "zero" => Some(FinalSigmas::Zero),
                "sigma_min" => Some(FinalSigmas::SigmaMin),
                _ => None,
            })?;
        let solver_type_heun = self.choice("solver_type", &["midpoint", "heun"], |s| match s {
            "midpoint" => Some(false),
            "heun" => Some(true),
            _ => None,
        })?;
        let is_false = |v: &Value| v.as_bool() == Some(false);
        self.unmodelled("thresholding", is_false, "dynamic thresholding is not implemented")?;
        self.unmodelled("use_exponential_sigmas", is_false, "only Karras sigmas are implemented")?;
        self.unmodelled("use_beta_sigmas", is_false, "only Karras sigmas are implemented")?;
        self.unmodelled("use_lu_lambdas", is_false, "only Karras sigmas are implemented")?;
        self.unmodelled("use_flow_sigmas", is_false, "flow-matching sigmas are not implemented")?;
        self.unmodelled(
            "algorithm_type",
            |v| v.as_str() == Some("dpmsolver++"),
            "only dpmsolver++ is implemented",
        )?;
        self.unmodelled(
            "interpolation_type",
            |v| v.as_str() == Some("linear"),
            "only linear sigma interpolation is implemented",
        )?;
        self.unmodelled(
            "timestep_type",
            |v| v.as_str() == Some("discrete"),
            "only discrete timesteps are implemented",
        )?;
        let cfg = SchedulerConfig {
            class_name,
            num_train_timesteps: self
                .usize("num_train_timesteps")?
                .unwrap_or(d.num_train_timesteps),
            beta_start: self.f64("beta_start")?.unwrap_or(d.beta_start),
            beta_end: self.f64("beta_end")?.unwrap_or(d.beta_end),
            beta_schedule: self
                .choice("beta_schedule", &BetaSchedule::NAMES, BetaSchedule::parse)?
                .unwrap_or(d.beta_schedule),
            trained_betas,
            prediction_type: self
                .choice("prediction_type", &PredictionType::NAMES, PredictionType::parse)?
                .unwrap_or(d.prediction_type),
            timestep_spacing: self.choice(
                "timestep_spacing",
                &TimestepSpacing::NAMES,
                TimestepSpacing::parse,
            )?,
            steps_offset: self.usize("steps_offset")?.unwrap_or(d.steps_offset),
            set_alpha_to_one: self.bool("set_alpha_to_one")?.unwrap_or(d.set_alpha_to_one),
            clip_sample: self.bool("clip_sample")?,
            clip_sample_range: self.f64("clip_sample_range")?.unwrap_or(d.clip_sample_range),
            use_karras_sigmas: self.bool("use_karras_sigmas")?.unwrap_or(d.use_karras_sigmas),
            sigma_min: self.f64("sigma_min")?,
            sigma_max: self.f64("sigma_max")?,
            variance_type: self.choice(
                "variance_type",
                &VarianceType::NAMES,
                VarianceType::parse,
            )?,
            rescale_betas_zero_snr: self
                .bool("rescale_betas_zero_snr")?
                .unwrap_or(d.rescale_betas_zero_snr),
            final_sigmas_type: final_sigmas_type.unwrap_or(d.final_sigmas_type),
            solver_order: self.usize("solver_order")?.unwrap_or(d.solver_order),
            solver_type_heun: solver_type_heun.unwrap_or(d.solver_type_heun),
            lower_order_final: self.bool("lower_order_final")?.unwrap_or(d.lower_order_final),
            euler_at_final: self.bool("euler_at_final")?.unwrap_or(d.euler_at_final),
            lambda_min_clipped: self.f64("lambda_min_clipped")?.unwrap_or(d.lambda_min_clipped),
            eta: self.f64("eta")?.unwrap_or(d.eta),
        };
        cfg.validate().map_err(|e| self.err("<values>", e.to_string()))?;
        Ok(cfg)
    }
}
