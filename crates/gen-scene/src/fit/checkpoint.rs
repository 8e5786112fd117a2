//! The checkpoint entries every fitter shares: optimizer state, step and seed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use gen_core::{Error, Result};
use gen_optim::{AdamW, Optim};

use crate::density::{load_optimizer_state_map, optimizer_state_map};

const CKPT_STEP: &str = "meta.step";
const CKPT_SEED: &str = "meta.seed";

/// The checkpoint's name in a fit's output folder.
pub(crate) const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The entries every fitting checkpoint holds: the optimizer state (`optim.*`), the step and
/// the seed (read back by [`CheckpointFile`]).
pub(crate) fn checkpoint_map(
    opt: &Optim<AdamW>,
    step: u64,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for (k, t) in optimizer_state_map(opt)? {
        map.insert(format!("optim.{k}"), t);
    }
    let dev = Device::Cpu;
    map.insert(CKPT_STEP.into(), Tensor::new(step as i64, &dev)?);
    map.insert(CKPT_SEED.into(), Tensor::new(seed as i64, &dev)?);
    Ok(map)
}

/// A fitting checkpoint read back: its tensors, checked against the run's seed, and its step.
/// Shared by the splat and field trainers (`seed`, `step` and `optim.*` keys).
pub(crate) struct CheckpointFile {
    pub(crate) file: String,
    map: HashMap<String, Tensor>,
    pub(crate) step: u64,
}

impl CheckpointFile {
    /// Reads `path` and checks that it was written with `seed`.
    pub(crate) fn read(path: &Path, seed: u64) -> Result<Self> {
        let file = path.display().to_string();
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::msg(format!("reading checkpoint {file}: {e}")))?;
        let mut ck = Self { file, map, step: 0 };
        let saved = ck.get(CKPT_SEED)?.to_scalar::<i64>()? as u64;
        if saved != seed {
            return Err(Error::invalid(
                "resume seed",
                format!("{} was written with seed {saved}, the config has {seed}", ck.file),
            ));
        }
        let step = ck.get(CKPT_STEP)?.to_scalar::<i64>()?;
        ck.step = u64::try_from(step)
            .map_err(|_| Error::invalid("checkpoint step", format!("{}: {step}", ck.file)))?;
        Ok(ck)
    }

    /// The tensor under `key`; an error naming the file and key when absent.
    pub(crate) fn get(&self, key: &str) -> Result<Tensor> {
        self.map
            .get(key)
            .cloned()
            .ok_or_else(|| Error::MissingTensor { file: self.file.clone(), key: key.to_string() })
    }

    /// Loads the `optim.*` tensors into `opt`.
    pub(crate) fn load_optimizer(&self, opt: &mut Optim<AdamW>) -> Result<()> {
        let optim: HashMap<String, Tensor> = self
            .map
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("optim.").map(|k| (k.to_string(), v.clone())))
            .collect();
        load_optimizer_state_map(opt, &optim)
            .map_err(|e| Error::msg(format!("{}: optimizer state: {e}", self.file)))
    }
}
