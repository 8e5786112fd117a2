//! LoRA files applied to a loaded pipeline before sampling (`gen image --lora FILE[:SCALE]`).

use std::path::PathBuf;

use gen_core::{Error, Result};
use gen_models::pipeline::SdPipeline;
use gen_optim::lora::{apply_lora_file_to_parts, parse_lora_arg, ApplyMode, ApplyOptions};
use serde::{Deserialize, Serialize};

/// One LoRA file (kohya or diffusers/PEFT format) and its multiplier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    /// Multiplier on `(alpha/r) · B A`; 1 applies the file as trained.
    pub scale: f64,
}

impl LoraSpec {
    /// Parses `FILE` or `FILE:SCALE`.
    pub fn parse(arg: &str) -> Result<Self> {
        let (path, scale) = parse_lora_arg(arg)?;
        Ok(Self { path, scale })
    }
}

/// Merges each LoRA file into the pipeline's UNet and text encoder, in order. The layers are
/// shared handles, so the pipeline needs no rebuilding. Errors name the file and key.
pub fn apply_loras(pipe: &SdPipeline, loras: &[LoraSpec]) -> Result<()> {
    for l in loras {
        let parts = [("unet", pipe.unet.linears()), ("text_encoder", pipe.text_encoder.linears())];
        let opts = ApplyOptions { scale: l.scale, mode: ApplyMode::Merge, ..Default::default() };
        apply_lora_file_to_parts(&l.path, &parts, &opts)
            .map_err(|e| Error::msg(format!("LoRA {}: {e}", l.path.display())))?;
    }
    Ok(())
}
