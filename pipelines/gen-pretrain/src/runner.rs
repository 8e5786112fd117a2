//! The optimisation loop every stage shares: AdamW (gen-optim) with warm-up + cosine schedule,
//! progress events, a metrics CSV, a loss-curve PNG, atomic checkpoints and exact resume.
//!
//! # Determinism and resume
//! Step `s` (0-based) draws all its randomness from `SeededRng::fork(stage_seed, s)`, so the
//! generator state at any step is the step number itself; the learning rate is a pure function
//! of the step; objectives keep no state that depends on what ran before (see [`Objective`]).
//! A checkpoint holds the parameters, the AdamW state and the step. Resuming from the
//! checkpoint at any step `k` and running to `n` gives bit-identical parameters, optimizer
//! state and logged losses to an uninterrupted run to `n` (tested in `tests/pretrain.rs` for
//! every stage at several steps).
//!
//! # Non-finite values
//! A step whose loss or gradient norm is not finite is skipped (no update);
//! [`MAX_BAD_STEPS_IN_A_ROW`] in a row stop the stage with an error naming the steps. Loaded
//! checkpoint files and the parameters written to a checkpoint must be finite (an error names
//! the file or step and the tensor).
//!
//! # Checkpoint layout (in the stage folder)
//! `ckpt-<step>/model.safetensors`, `ckpt-<step>/optimizer.safetensors`, `ckpt-<step>/state.json`,
//! with a moving average of the weights `ckpt-<step>/ema.safetensors` when the stage keeps one
//! (`StageConfig::ema_decay`), and `latest.json` naming the newest complete checkpoint.
//! `latest.json` is replaced atomically only after the checkpoint's files are written, and older
//! checkpoints are deleted only after that, so a kill at any moment leaves a loadable checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use gen_core::{write_atomic, Error, Result, SeededRng};
use gen_optim::{AdamW, Ema, LrSchedule, NamedVar, Optim, Optimizer, ParamGroup, StepOptions};
use serde::{Deserialize, Serialize};

use crate::config::StageConfig;
use crate::params::{check_file_finite, check_finite, load_vars, save_vars, tensors};
use gen_core::chart::write_loss_curve;

/// The loss of one step and named scalar parts for the metrics CSV.
pub struct StepLoss {
    /// Scalar loss to minimise.
    pub loss: Tensor,
    /// Named components (logged; not differentiated).
    pub parts: Vec<(String, f64)>,
}

/// One stage's objective: the loss of step `step` using randomness from `rng` only. It must be
/// a function of the step, the parameters and `rng` alone: a cache it keeps must give the same
/// bits whatever steps this process ran before (a resumed run starts with empty caches).
pub trait Objective {
    /// Names of the parts [`StepLoss::parts`] returns, in order (the CSV columns).
    fn part_names(&self) -> Vec<String>;
    fn loss(&mut self, step: u64, rng: &mut SeededRng) -> Result<StepLoss>;
}

/// Progress of a training run.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    /// A stage begins (at `start_step`, > 0 when resumed).
    StageStart { stage: String, start_step: u64, total_steps: u64, params: usize },
    /// After each optimizer step.
    Step {
        stage: String,
        step: u64,
        total_steps: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        seconds: f64,
    },
    /// A checkpoint was written.
    Checkpoint { stage: String, step: u64, path: PathBuf },
    /// The stage ran to its last step (or stopped at `stop_after`). `optimizer_state_bytes`:
    /// bytes of optimizer state per parameter group (gen-optim's accounting).
    StageEnd { stage: String, step: u64, seconds: f64, optimizer_state_bytes: Vec<usize> },
    /// Anything else worth telling (scaling factor, measured metrics).
    Note { stage: String, message: String },
}

/// Options of one [`run_stage`] call.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Stop after this many completed steps, writing a checkpoint there (as if killed right
    /// after it, whatever `checkpoint_every` is); the schedule still spans `StageConfig::steps`.
    pub stop_after: Option<u64>,
}

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Completed optimizer steps.
    pub step: u64,
    pub total_steps: u64,
    /// The stage seed; the generator of step `s` is `SeededRng::fork(seed, s)`.
    pub seed: u64,
    pub rng: String,
    /// Mean loss of the last logged steps.
    pub recent_loss: f64,
    /// Seconds spent training so far (all sessions).
    pub seconds: f64,
    /// Updates of the moving average of the weights (`ema.safetensors`), when the stage keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_updates: Option<u64>,
    /// Steps in a row up to this one whose loss or gradients were not finite (skipped; see
    /// [`MAX_BAD_STEPS_IN_A_ROW`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bad_steps_in_a_row: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A step whose loss or gradient norm is not finite is skipped (no update, no moving-average
/// update); this many in a row stop the stage with an error naming the steps.
pub const MAX_BAD_STEPS_IN_A_ROW: u64 = 5;

/// The moving average's file in a checkpoint folder.
const EMA_FILE: &str = "ema.safetensors";

/// What [`run_stage`] returns.
#[derive(Debug, Clone)]
pub struct StageOutcome {
    pub step: u64,
    pub finished: bool,
    pub seconds: f64,
    /// Losses of the steps run in this call.
    pub losses: Vec<f64>,
}

/// The latest complete checkpoint of a stage folder: `(folder, state)`.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<(PathBuf, CheckpointState)>> {
    let latest = dir.join("latest.json");
    if !latest.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&latest).map_err(|e| Error::io(&latest, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        file: latest.clone(),
        key: "(file)".into(),
        msg: e.to_string(),
    })?;
    let name = v.get("checkpoint").and_then(|c| c.as_str()).ok_or_else(|| Error::Config {
        file: latest.clone(),
        key: "checkpoint".into(),
        msg: "missing or not a string".into(),
    })?;
    let ck = dir.join(name);
    let sp = ck.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let st: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::Config {
        file: sp.clone(),
        key: "(file)".into(),
        msg: e.to_string(),
    })?;
    Ok(Some((ck, st)))
}

/// The weights a stage produced, from its latest checkpoint: the moving average of the weights
/// when the stage keeps one, else the trained parameters.
pub fn latest_weights(dir: &Path) -> Result<PathBuf> {
    match latest_checkpoint(dir)? {
        Some((ck, st)) if st.ema_updates.is_some() => Ok(ck.join(EMA_FILE)),
        Some((ck, _)) => Ok(ck.join("model.safetensors")),
        None => Err(Error::MissingFile {
            path: dir.join("latest.json"),
            hint: "the stage has no checkpoint yet: train it first".into(),
        }),
    }
}

struct Csv {
    path: PathBuf,
    header: String,
    rows: Vec<String>,
}

impl Csv {
    /// Opens the CSV keeping only rows with step <= `upto` (rows a killed run logged after its
    /// last checkpoint are dropped, so a resumed run does not duplicate them).
    fn open(path: PathBuf, header: String, upto: u64) -> Result<Self> {
        let mut rows = Vec::new();
        if path.exists() && upto > 0 {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            for line in text.lines().skip(1) {
                let step: u64 =
                    line.split(',').next().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
                if step <= upto {
                    rows.push(line.to_string());
                }
            }
        }
        Ok(Self { path, header, rows })
    }

    fn flush(&self) -> Result<()> {
        let mut s = self.header.clone();
        s.push('\n');
        for r in &self.rows {
            s.push_str(r);
            s.push('\n');
        }
        write_atomic(&self.path, s.as_bytes())
    }

    /// `(step, loss)` of every row.
    fn curve(&self) -> Vec<(u64, f64)> {
        self.rows
            .iter()
            .filter_map(|r| {
                let mut it = r.split(',');
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .collect()
    }
}

fn write_checkpoint(
    dir: &Path,
    vars: &[NamedVar],
    opt: &dyn Optimizer,
    ema: Option<&Ema>,
    state: &CheckpointState,
) -> Result<PathBuf> {
    let name = format!("ckpt-{:08}", state.step);
    let ck = dir.join(&name);
    std::fs::create_dir_all(&ck).map_err(|e| Error::io(&ck, e))?;
    save_vars(vars, &ck.join("model.safetensors"))?;
    opt.save_state(&ck.join("optimizer.safetensors"))?;
    if let Some(ema) = ema {
        ema.save(&ck.join(EMA_FILE))?;
    }
    let st = serde_json::to_string_pretty(state)
        .map_err(|e| Error::msg(format!("serialising checkpoint state: {e}")))?;
    write_atomic(ck.join("state.json"), st.as_bytes())?;
    write_atomic(
        dir.join("latest.json"),
        serde_json::json!({ "checkpoint": name, "step": state.step }).to_string().as_bytes(),
    )?;
    // Older checkpoints go only once the new one is complete and named in latest.json.
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("ckpt-") && n != name {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(ck)
}

/// What a stage is called, where it writes, and how it trains.
#[derive(Debug, Clone, Copy)]
pub struct StageSpec<'a> {
    /// Name in events and checkpoints.
    pub name: &'a str,
    /// The stage folder (checkpoints, metrics, loss curve).
    pub dir: &'a Path,
    pub cfg: &'a StageConfig,
    /// Seed of the per-step generators.
    pub seed: u64,
}

/// Runs (or resumes) one stage: AdamW over `vars` minimising `objective`.
pub fn run_stage(
    spec: StageSpec<'_>,
    vars: &[NamedVar],
    objective: &mut dyn Objective,
    control: &RunControl,
    events: &mut dyn FnMut(&TrainEvent),
) -> Result<StageOutcome> {
    let StageSpec { name: stage, dir, cfg, seed } = spec;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let group = ParamGroup::new(vars.to_vec(), cfg.adamw());
    let mut opt = Optim::new(AdamW, vec![group])?
        .with_options(StepOptions { max_grad_norm: cfg.max_grad_norm, skip_nonfinite: true });
    let schedule = cfg.schedule()?;
    let (mut step, mut seconds_before, mut bad_in_a_row) = (0u64, 0.0, 0u64);
    // the saved moving average to continue: (file, updates)
    let mut saved_ema = None;
    if let Some((ck, st)) = latest_checkpoint(dir)? {
        if st.seed != seed {
            return Err(Error::msg(format!(
                "{}: checkpoint of a different run (seed {}; this run: seed {seed}); use another output folder",
                ck.display(),
                st.seed,
            )));
        }
        if st.step > cfg.steps {
            return Err(Error::msg(format!(
                "{}: the stage already ran {} steps, more than the {} now configured",
                ck.display(),
                st.step,
                cfg.steps
            )));
        }
        if st.total_steps != cfg.steps {
            // A changed step count continues the run on the new total's learning-rate schedule.
            events(&TrainEvent::Note {
                stage: stage.into(),
                message: format!(
                    "resuming at step {} with {} steps in total (was {}); the learning-rate schedule now spans {} steps",
                    st.step, cfg.steps, st.total_steps, cfg.steps
                ),
            });
        }
        load_vars(vars, &ck.join("model.safetensors"))?;
        check_file_finite(&ck.join("optimizer.safetensors"))?;
        opt.load_state(&ck.join("optimizer.safetensors"))?;
        if st.ema_updates.is_some() {
            check_file_finite(&ck.join(EMA_FILE))?;
        }
        step = st.step;
        bad_in_a_row = st.bad_steps_in_a_row;
        seconds_before = st.seconds;
        saved_ema = st.ema_updates.map(|n| (ck.join(EMA_FILE), n));
    }
    let mut ema = if cfg.ema_decay > 0.0 {
        let mut ema = Ema::new(vars, cfg.ema_decay)?;
        match saved_ema {
            Some((file, updates)) => ema.load(&file, updates)?,
            None if step > 0 => events(&TrainEvent::Note {
                stage: stage.into(),
                message: format!("a moving average of the weights (decay {}) starts at step {step} from the current weights", cfg.ema_decay),
            }),
            None => {}
        }
        Some(ema)
    } else {
        None
    };
    let params: usize = vars.iter().map(|v| v.var.elem_count()).sum();
    events(&TrainEvent::StageStart {
        stage: stage.into(),
        start_step: step,
        total_steps: cfg.steps,
        params,
    });
    let mut header = "step,loss".to_string();
    for p in objective.part_names() {
        header.push(',');
        header.push_str(&p);
    }
    header.push_str(",lr,grad_norm,seconds");
    let mut csv = Csv::open(dir.join("metrics.csv"), header, step)?;
    let start = Instant::now();
    let end = control.stop_after.map(|s| s.min(cfg.steps)).unwrap_or(cfg.steps);
    let mut losses = Vec::new();
    while step < end {
        let t0 = Instant::now();
        let mut rng = SeededRng::fork(seed, step);
        let out = objective.loss(step, &mut rng)?;
        let loss = out.loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64;
        let grads = out.loss.backward()?;
        let lr = schedule.lr(step);
        opt.set_lr(lr);
        let report = opt.step(&grads)?;
        step += 1;
        if report.skipped || !loss.is_finite() {
            bad_in_a_row += 1;
            events(&TrainEvent::Note {
                stage: stage.into(),
                message: format!(
                    "step {step}: loss {loss}, gradient norm {}: not finite, step skipped ({bad_in_a_row} in a row)",
                    report.grad_norm
                ),
            });
            if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW {
                return Err(Error::msg(format!(
                    "{stage}: step {step}: the loss or gradients were not finite in {bad_in_a_row} steps in a row (steps {}..={step}); stopped (the checkpoint in {} is kept: lower the learning rate or resume from it)",
                    step + 1 - bad_in_a_row,
                    dir.display()
                )));
            }
        } else {
            bad_in_a_row = 0;
            if let Some(ema) = ema.as_mut() {
                ema.update(vars)?;
            }
        }
        losses.push(loss);
        let secs = t0.elapsed().as_secs_f64();
        let mut row = format!("{step},{loss:.6}");
        for (_, v) in &out.parts {
            row.push_str(&format!(",{v:.6}"));
        }
        row.push_str(&format!(",{lr:.3e},{:.4},{secs:.3}", report.grad_norm));
        csv.rows.push(row);
        events(&TrainEvent::Step {
            stage: stage.into(),
            step,
            total_steps: cfg.steps,
            loss,
            lr,
            grad_norm: report.grad_norm,
            seconds: secs,
        });
        if step % cfg.checkpoint_every == 0 || step == end {
            let recent: Vec<f64> =
                losses.iter().rev().take(cfg.checkpoint_every as usize).copied().collect();
            let state = CheckpointState {
                step,
                total_steps: cfg.steps,
                seed,
                rng: "per step: SeededRng::fork(seed, step) (ChaCha8); no other generator state"
                    .into(),
                recent_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
                seconds: seconds_before + start.elapsed().as_secs_f64(),
                ema_updates: ema.as_ref().map(|e| e.updates()),
                bad_steps_in_a_row: bad_in_a_row,
            };
            // a checkpoint never holds non-finite weights
            check_finite(&format!("{stage}: step {step}: parameters"), &tensors(vars)?)?;
            // metrics first: a resumed run truncates rows past the checkpoint anyway
            csv.flush()?;
            write_loss_curve(&dir.join("loss.png"), stage, &csv.curve())?;
            let ck = write_checkpoint(dir, vars, &opt, ema.as_ref(), &state)?;
            events(&TrainEvent::Checkpoint { stage: stage.into(), step, path: ck });
        }
    }
    csv.flush()?;
    write_loss_curve(&dir.join("loss.png"), stage, &csv.curve())?;
    let seconds = seconds_before + start.elapsed().as_secs_f64();
    events(&TrainEvent::StageEnd {
        stage: stage.into(),
        step,
        seconds,
        optimizer_state_bytes: opt.state_bytes(),
    });
    Ok(StageOutcome { step, finished: step >= cfg.steps, seconds, losses })
}
