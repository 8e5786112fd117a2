//! The Stable Diffusion adapter: what the model-agnostic sampling of `gen-diffusion` needs
//! from an [`SdPipeline`]. The UNet as the one [`Denoiser`] ([`UNetDenoiser`]), prompt
//! encoding into the conditional / unconditional branches (with `clip_skip`), and the VAE
//! latent encode / decode with the pipeline's `scaling_factor` and `shift_factor`.
//!
//! Every sampler, metric and test that runs the UNet in a diffusion loop goes through this
//! file, so the prediction type always comes from the model's `scheduler_config.json`.

use candle_core::{DType, Tensor};
use gen_core::{Error, Result};
use gen_diffusion::{Conditions, Denoiser, PredictionType, SchedulerConfig};

use crate::clip::TextForwardOptions;
use crate::pipeline::SdPipeline;
use crate::unet::UNet2DConditionModel;

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

/// How [`SdPipeline::encode_text`] turns prompts into UNet conditions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptOptions {
    /// 0 = the text encoder's last hidden state; `k` = the state `k` layers before it
    /// (diffusers' `clip_skip`, final layer norm applied).
    pub clip_skip: usize,
    /// One text-encoder call per prompt, so that a prompt's embedding does not depend on the
    /// other prompts of the batch (CPU matmul bits depend on the row count); otherwise one
    /// batched call.
    pub one_call_per_prompt: bool,
}

impl SdPipeline {
    /// The pipeline's `scheduler/scheduler_config.json`, parsed.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        SchedulerConfig::from_json_value(&self.scheduler_config, &self.files.scheduler_config)
    }

    /// The UNet as a [`Denoiser`], predicting what `scheduler_config.json` says it was
    /// trained for. `per_sample`: see [`UNetDenoiser::per_sample`].
    pub fn denoiser(&self, per_sample: bool) -> Result<UNetDenoiser<'_>> {
        Ok(UNetDenoiser {
            unet: &self.unet,
            prediction_type: self.scheduler_config()?.prediction_type,
            per_sample,
        })
    }

    /// Text conditions `(B, L, D)` of `prompts` in the pipeline's dtype (B = `prompts.len()`).
    pub fn encode_text(&self, prompts: &[&str], opts: &PromptOptions) -> Result<Tensor> {
        if prompts.is_empty() {
            return Err(Error::invalid("encode_text", "no prompt to encode"));
        }
        let fwd = TextForwardOptions { clip_skip: opts.clip_skip, ..Default::default() };
        let one = |ps: &[&str]| -> Result<Tensor> {
            Ok(self.encode_prompts(ps, &fwd)?.0.to_dtype(self.dtype)?)
        };
        if opts.one_call_per_prompt && prompts.len() > 1 {
            let parts = prompts.iter().map(|p| one(&[p])).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        } else {
            one(prompts)
        }
    }

    /// The conditional (`prompts`) and unconditional (`negative` for every sample) branch
    /// conditions, each `(B, L, D)`.
    pub fn encode_conditions(
        &self,
        prompts: &[&str],
        negative: &str,
        opts: &PromptOptions,
    ) -> Result<Conditions<Tensor>> {
        let cond = self.encode_text(prompts, opts)?;
        let b = prompts.len();
        let uncond = if opts.one_call_per_prompt {
            self.encode_text(&[negative], opts)?.repeat((b, 1, 1))?
        } else {
            self.encode_text(&vec![negative; b], opts)?
        };
        Ok(Conditions { cond, uncond: Some(uncond) })
    }

    /// Latent shape `(C, H / f, W / f)` of a `width`×`height` image (f: the VAE's downscale).
    pub fn latent_shape(&self, width: usize, height: usize) -> (usize, usize, usize) {
        let f = self.vae.downscale_factor();
        (self.vae_config.latent_channels, height / f, width / f)
    }

    /// VAE latents of images `(B, 3, H, W)` in [-1, 1], scaled for the UNet:
    /// `(mean - shift_factor) * scaling_factor`. The mean of the latent distribution is used
    /// (diffusers samples it), so the result is deterministic and strength 0 gives the VAE
    /// round trip. Returns `(B, C, H / f, W / f)`.
    pub fn encode_latents(&self, image: &Tensor) -> Result<Tensor> {
        let vc = &self.vae_config;
        let mean = self.vae.encode(image)?.mode();
        let shifted = match vc.shift_factor {
            Some(s) => (mean - s)?,
            None => mean,
        };
        Ok((shifted * vc.scaling_factor)?)
    }

    /// Images in [-1, 1] `(B, 3, H, W)` from UNet latents `(B, C, h, w)`:
    /// `decode(latents / scaling_factor + shift_factor)`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let vc = &self.vae_config;
        let z = (latents / vc.scaling_factor)?;
        let z = match vc.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        };
        self.vae.decode(&z)
    }
}
