//! Our UNet as a [`Denoiser`]: the branches the guidance asks for in one batched forward pass.

use candle_core::{DType, Tensor};
use gen_core::{Error, Result};
use gen_diffusion::{Denoiser, PredictionType};
use gen_models::unet::UNet2DConditionModel;

/// A text-conditioned UNet seen by the sampling loop. The condition of a branch is the text
/// encoder's hidden states, `(B, L, cross_attention_dim)`.
pub struct UNetDenoiser<'a> {
    pub unet: &'a UNet2DConditionModel,
    /// What the UNet was trained to predict (the scheduler config's `prediction_type`).
    pub prediction_type: PredictionType,
    /// Run one forward pass per sample (with its K branches) instead of one over the whole
    /// batch. On the CPU the last bits of candle's matmul depend on the number of rows, so
    /// this is what makes a sample's result independent of the batch it is in.
    pub per_sample: bool,
}

impl Denoiser for UNetDenoiser<'_> {
    type Cond = Tensor;

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// `x`: (B, C, H, W); `timesteps`: B values; `conds`: K tensors (B, L, D). The K branches
    /// run as one forward pass over a (K·B, C, H, W) batch (or B passes over (K, C, H, W) with
    /// `per_sample`); returns K tensors (B, C, H, W).
    fn predict(&self, x: &Tensor, timesteps: &[f64], conds: &[&Tensor]) -> Result<Vec<Tensor>> {
        let b = x.dim(0)?;
        if timesteps.len() != b {
            return Err(Error::invalid(
                "UNet denoiser",
                format!("{} timesteps for a batch of {b}", timesteps.len()),
            ));
        }
        if !self.per_sample || b == 1 {
            return self.predict_batched(x, timesteps, conds);
        }
        let mut per_branch: Vec<Vec<Tensor>> = vec![Vec::with_capacity(b); conds.len()];
        for j in 0..b {
            let cj =
                conds.iter().map(|c| c.narrow(0, j, 1)).collect::<candle_core::Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = cj.iter().collect();
            let outs = self.predict_batched(&x.narrow(0, j, 1)?, &timesteps[j..j + 1], &refs)?;
            for (k, o) in outs.into_iter().enumerate() {
                per_branch[k].push(o);
            }
        }
        per_branch.iter().map(|v| Ok(Tensor::cat(v, 0)?)).collect()
    }
}

impl UNetDenoiser<'_> {
    fn predict_batched(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        conds: &[&Tensor],
    ) -> Result<Vec<Tensor>> {
        let b = x.dim(0)?;
        let k = conds.len();
        if k == 0 {
            return Err(Error::invalid("UNet denoiser", "no branch to evaluate"));
        }
        if timesteps.len() != b {
            return Err(Error::invalid(
                "UNet denoiser",
                format!("{} timesteps for a batch of {b}", timesteps.len()),
            ));
        }
        for c in conds {
            if c.dim(0)? != b {
                return Err(Error::invalid(
                    "UNet denoiser condition",
                    format!("shape {:?} for a batch of {b}", c.dims()),
                ));
            }
        }
        let ts: Vec<f32> = (0..k).flat_map(|_| timesteps.iter().map(|&t| t as f32)).collect();
        let t = Tensor::from_vec(ts, k * b, x.device())?.to_dtype(DType::F32)?;
        let (xs, ctx) = if k == 1 {
            (x.clone(), conds[0].clone())
        } else {
            (Tensor::cat(&vec![x; k], 0)?, Tensor::cat(conds, 0)?)
        };
        let out = self.unet.forward(&xs, &t, &ctx)?;
        (0..k).map(|j| Ok(out.narrow(0, j * b, b)?)).collect()
    }
}
