//! Exponential moving average of parameters ("EMA weights", as diffusers' `EMAModel`): after
//! each optimizer step `ema ← d·ema + (1 − d)·θ` with the warm-up decay
//! `d = min(decay, (1 + n) / (10 + n))`, `n` = updates made so far, so an average started from
//! random or early weights forgets them quickly. The average is what a diffusion model is
//! usually sampled with: it smooths the last steps' noise without lowering the learning rate.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use gen_core::{Error, Result, ResultExt};

use crate::optimizer::{save_safetensors_atomic, NamedVar};

/// A moving average of a set of parameters, in their dtype and on their device.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    updates: u64,
    /// One average per parameter, same names and order.
    average: Vec<NamedVar>,
}

impl Ema {
    /// Starts the average at the current values of `params` (`decay` in [0, 1)).
    pub fn new(params: &[NamedVar], decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::invalid("EMA decay", format!("{decay} (must be in [0, 1))")));
        }
        let average = params
            .iter()
            .map(|p| {
                Ok(NamedVar::new(
                    p.name.clone(),
                    Var::from_tensor(&p.var.as_tensor().detach().copy()?)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { decay, updates: 0, average })
    }

    /// The decay the next update will use: `min(decay, (1 + n) / (10 + n))`.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// Updates made so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Moves the average toward `params` (the same list, in the same order, as at creation).
    pub fn update(&mut self, params: &[NamedVar]) -> Result<()> {
        if params.len() != self.average.len() {
            return Err(Error::msg(format!(
                "EMA update: {} parameters, the average has {}",
                params.len(),
                self.average.len()
            )));
        }
        let d = self.current_decay();
        for (a, p) in self.average.iter().zip(params) {
            if a.name != p.name {
                return Err(Error::msg(format!(
                    "EMA update: parameter `{}` where `{}` was expected",
                    p.name, a.name
                )));
            }
            let next = (a.var.as_tensor().affine(d, 0.0)?
                + p.var.as_tensor().detach().affine(1.0 - d, 0.0)?)?;
            a.var.set(&next).ctx(format!("EMA update of `{}`", a.name))?;
        }
        self.updates += 1;
        Ok(())
    }

    /// The averaged parameters (names as given at creation).
    pub fn average(&self) -> &[NamedVar] {
        &self.average
    }

    /// The average as name → tensor.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.average.iter().map(|v| (v.name.clone(), v.var.as_tensor().detach())).collect()
    }

    /// Saves the averaged parameters (only they, under their names: the file is a weights file)
    /// to a safetensors file, atomically. The update count is the caller's to keep.
    pub fn save(&self, path: &Path) -> Result<()> {
        save_safetensors_atomic(&self.tensors(), path)
    }

    /// Loads what [`Ema::save`] wrote into this average, which had made `updates` updates:
    /// every parameter must be there with its shape; errors name the file and key.
    pub fn load(&mut self, path: &Path, updates: u64) -> Result<()> {
        let file = path.display().to_string();
        let map = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .ctx(format!("reading {file}"))?;
        for a in &self.average {
            let t = map
                .get(&a.name)
                .ok_or_else(|| Error::MissingTensor { file: file.clone(), key: a.name.clone() })?;
            if t.dims() != a.var.dims() {
                return Err(Error::Shape {
                    file: file.clone(),
                    key: a.name.clone(),
                    expected: a.var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            a.var
                .set(&t.to_dtype(a.var.dtype())?.to_device(a.var.device())?)
                .ctx(format!("{file}: setting `{}`", a.name))?;
        }
        self.updates = updates;
        if let Some(extra) = map.keys().find(|k| !self.average.iter().any(|a| &a.name == *k)) {
            return Err(Error::msg(format!(
                "{file}: tensor `{extra}` belongs to no averaged parameter"
            )));
        }
        Ok(())
    }
}
