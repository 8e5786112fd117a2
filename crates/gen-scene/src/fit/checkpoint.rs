//! The checkpoint entries every fitter shares: optimizer state, step, seed and the run's
//! identity ([`RunIdentity`]: the configuration and a fingerprint of the training data), so
//! that a checkpoint of another object, data set or configuration is refused on resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result};
use gen_optim::{AdamW, Optim};

use super::PosedImage;
use crate::density::{load_optimizer_state_map, optimizer_state_map};

const CKPT_STEP: &str = "meta.step";
const CKPT_SEED: &str = "meta.seed";
const CKPT_IDENTITY: &str = "meta.identity";

/// What a checkpoint must match to be resumed: the run's configuration (as JSON, without the
/// output schedule and the device, which may change between runs) and a fingerprint of the
/// training views (FNV-1a over every image, mask and camera).
#[derive(Debug, Clone, PartialEq)]
pub struct RunIdentity {
    pub config: serde_json::Value,
    pub data: String,
}

/// Config keys that do not change the result: left out of the identity.
const NOT_IDENTITY: [&str; 3] = ["checkpoint_every", "preview_every", "device"];

impl RunIdentity {
    /// The identity of a run with configuration `config` (a JSON object) on `views`.
    pub fn new(config: serde_json::Value, views: &[PosedImage]) -> Result<Self> {
        let mut config = config;
        if let Some(m) = config.as_object_mut() {
            for k in NOT_IDENTITY {
                m.remove(k);
            }
        }
        Ok(Self { config, data: data_fingerprint(views)? })
    }

    fn to_json(&self) -> String {
        serde_json::json!({"config": self.config, "data": self.data}).to_string()
    }

    /// Checks `saved` (as written by [`checkpoint_map`]) against this identity; the error names
    /// the file and the settings that differ.
    fn check(&self, file: &str, saved: &str) -> Result<()> {
        let v: serde_json::Value = serde_json::from_str(saved).map_err(|e| {
            Error::invalid(format!("checkpoint {file} `{CKPT_IDENTITY}`"), e.to_string())
        })?;
        if v["data"] != serde_json::Value::String(self.data.clone()) {
            return Err(Error::invalid(
                "resume",
                format!(
                    "{file} was written for other training data (another object, data set or \
                     view set); refusing to continue it — use another output folder or drop \
                     --resume"
                ),
            ));
        }
        // serde_json's float parsing is not exact: compare the saved config with this one after
        // the same text round trip.
        let now: serde_json::Value = serde_json::from_str(&self.config.to_string())
            .map_err(|e| Error::msg(format!("run identity JSON: {e}")))?;
        let mut diffs = Vec::new();
        json_diff("", &v["config"], &now, &mut diffs);
        if !diffs.is_empty() {
            return Err(Error::invalid(
                "resume",
                format!(
                    "{file} was written with another configuration ({}); refusing to continue \
                     it — use another output folder or drop --resume",
                    diffs.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// The dotted paths where `a` (saved) and `b` (now) differ, as `path: a → b`.
fn json_diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                json_diff(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("`{path}` {a} in the checkpoint, {b} now")),
        _ => {}
    }
}

/// FNV-1a (64 bit) over the views' cameras (intrinsics, rotation, translation as f64 bits),
/// images and masks (as f32 bits), as 16 hex digits.
pub fn data_fingerprint(views: &[PosedImage]) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(&(views.len() as u64).to_le_bytes());
    for v in views {
        let c = &v.camera;
        let k = c.intrinsics;
        for x in [k.fx, k.fy, k.cx, k.cy, k.width as f64, k.height as f64] {
            eat(&x.to_le_bytes());
        }
        for x in c.rotation.to_cols_array().into_iter().chain(c.translation.to_array()) {
            eat(&x.to_le_bytes());
        }
        for t in std::iter::once(&v.rgb).chain(v.mask.as_ref()) {
            eat(&(t.elem_count() as u64).to_le_bytes());
            for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                eat(&x.to_le_bytes());
            }
        }
        eat(&[v.mask.is_some() as u8]);
    }
    Ok(format!("{h:016x}"))
}

/// The checkpoint's name in a fit's output folder.
pub(crate) const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The entries every fitting checkpoint holds: the optimizer state (`optim.*`), the step, the
/// seed and the run's identity (read back by [`CheckpointFile`]).
pub(crate) fn checkpoint_map(
    opt: &Optim<AdamW>,
    step: u64,
    seed: u64,
    identity: &RunIdentity,
) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for (k, t) in optimizer_state_map(opt)? {
        map.insert(format!("optim.{k}"), t);
    }
    let dev = Device::Cpu;
    map.insert(CKPT_STEP.into(), Tensor::new(step as i64, &dev)?);
    map.insert(CKPT_SEED.into(), Tensor::new(seed as i64, &dev)?);
    let id = identity.to_json().into_bytes();
    let n = id.len();
    map.insert(CKPT_IDENTITY.into(), Tensor::from_vec(id, n, &dev)?);
    Ok(map)
}

/// A fitting checkpoint read back: its tensors, checked against the run's seed and identity,
/// and its step. Shared by the splat and field trainers.
pub(crate) struct CheckpointFile {
    pub(crate) file: String,
    map: HashMap<String, Tensor>,
    pub(crate) step: u64,
}

impl CheckpointFile {
    /// Reads `path` and checks that it was written with `seed` by the run `identity` of
    /// `steps` steps (its step must be at most `steps`).
    pub(crate) fn read(path: &Path, seed: u64, identity: &RunIdentity, steps: u64) -> Result<Self> {
        let file = path.display().to_string();
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::msg(format!("reading checkpoint {file}: {e}")))?;
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        for name in names {
            if let Some((i, v)) = gen_core::finite::first_nonfinite(&map[name])? {
                return Err(Error::msg(format!(
                    "checkpoint {file}: tensor `{name}`: element {i} is {v} (not finite)"
                )));
            }
        }
        let mut ck = Self { file, map, step: 0 };
        let saved = ck.get(CKPT_SEED)?.to_scalar::<i64>()? as u64;
        if saved != seed {
            return Err(Error::invalid(
                "resume seed",
                format!("{} was written with seed {saved}, the config has {seed}", ck.file),
            ));
        }
        let saved = match ck.map.get(CKPT_IDENTITY) {
            Some(t) => {
                String::from_utf8(t.to_dtype(DType::U8)?.to_vec1::<u8>()?).map_err(|_| {
                    Error::invalid(format!("checkpoint {} `{CKPT_IDENTITY}`", ck.file), "not UTF-8")
                })?
            }
            None => {
                return Err(Error::invalid(
                    "resume",
                    format!(
                        "{} carries no run identity (written by an older gen), so it cannot be \
                         checked against this run; start afresh without --resume",
                        ck.file
                    ),
                ))
            }
        };
        identity.check(&ck.file, &saved)?;
        let step = ck.get(CKPT_STEP)?.to_scalar::<i64>()?;
        ck.step = match u64::try_from(step) {
            Ok(s) if s <= steps => s,
            _ => {
                return Err(Error::invalid(
                    "checkpoint step",
                    format!("{}: step {step} (this run has {steps} steps)", ck.file),
                ))
            }
        };
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
