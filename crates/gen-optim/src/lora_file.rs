//! LoRA files: save and load the kohya and diffusers/PEFT safetensors formats, and apply a file
//! to a model's [`Linear`] layers (as adapters or merged into the weights).
//!
//! Formats (key of one module `M`, its path as diffusers names it, e.g.
//! `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`):
//! - **kohya** (sd-scripts; what A1111 and ComfyUI read natively):
//!   `lora_unet_<M with '.'→'_'>.lora_down.weight` (A `(r, in)`), `….lora_up.weight` (B `(out, r)`),
//!   `….alpha` (0-d); the text encoder uses `lora_te_` (`lora_te1_`/`lora_te2_` for SDXL's two).
//!   A missing `.alpha` means alpha = r.
//! - **PEFT** (diffusers ≥ 0.22 `save_lora_weights`): `unet.M.lora_A.weight`,
//!   `unet.M.lora_B.weight`, `text_encoder.M.…`. No alpha is stored in the tensors: readers
//!   assume alpha = r unless the `lora_adapter_metadata` header entry (a JSON object with
//!   `unet.r`, `unet.lora_alpha`, `unet.alpha_pattern`, …, as diffusers 0.42 writes and reads it)
//!   says otherwise. We write either B pre-multiplied by alpha/r ([`PeftAlpha::Bake`], the
//!   default: every reader gets the same model) or that metadata ([`PeftAlpha::Metadata`]).
//! - **PEFT legacy** (diffusers < 0.22): `unet.M.lora.down.weight` / `unet.M.lora.up.weight`.
//!   Read also: `….lora_linear_layer.down.weight` (text encoders) and the attention-processor form
//!   `unet.….attn1.processor.to_q_lora.down.weight`. Files that diffusers' training scripts write
//!   mix these with `lora_A`/`lora_B` (see `PEFT_SUFFIXES`); a file is labelled
//!   [`LoraFormat::Peft`] when it has any `lora_A` key.
//!
//! The format is detected on load. Kohya keys are ambiguous (`to_out_0` could be `to.out.0` or
//! `to_out.0`): they are resolved by sending every layer name of the model through the same
//! `'.'→'_'` map. Every file we write also records `gen.lora.*` metadata (format, ranks, alphas)
//! and kohya's `ss_network_dim` / `ss_network_alpha`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result, ResultExt};
use gen_ops::nn::Linear;

use super::{LoraSet, LoraWeights, KNOWN_PREFIXES};

/// A LoRA file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Peft,
    PeftLegacy,
}

impl LoraFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "peft",
            LoraFormat::PeftLegacy => "peft-legacy",
        }
    }
}

/// How a PEFT file carries alpha.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PeftAlpha {
    /// Store `B · alpha/r` so that alpha = r holds for every reader.
    #[default]
    Bake,
    /// Store B as is and write diffusers' `lora_adapter_metadata` (`r`, `lora_alpha`, patterns).
    Metadata,
}

/// Options of [`save_lora`].
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSaveOptions {
    pub format: LoraFormat,
    pub peft_alpha: PeftAlpha,
    /// Dtype of the stored A and B (alpha is always f32).
    pub dtype: DType,
}

impl Default for LoraSaveOptions {
    fn default() -> Self {
        Self { format: LoraFormat::Kohya, peft_alpha: PeftAlpha::Bake, dtype: DType::F32 }
    }
}

/// The kohya key prefix of a component.
pub fn kohya_prefix(component: &str) -> Result<&'static str> {
    match component {
        "unet" => Ok("lora_unet_"),
        "text_encoder" => Ok("lora_te_"),
        "text_encoder_2" => Ok("lora_te2_"),
        other => Err(Error::invalid("LoRA component", format!("{other:?} has no kohya prefix"))),
    }
}

/// Writes the adapters of `sets` (one per component; their current A, B and alpha — not the
/// multiplier) to `path`, atomically.
pub fn save_lora(sets: &[&LoraSet], path: impl AsRef<Path>, opts: &LoraSaveOptions) -> Result<()> {
    let path = path.as_ref();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut meta: HashMap<String, String> = HashMap::new();
    let mut peft_meta = serde_json::Map::new();
    let mut seen = std::collections::HashSet::new();
    let (mut ranks, mut alphas) = (Vec::new(), Vec::new());
    for set in sets {
        if !seen.insert(set.prefix().to_string()) {
            return Err(Error::invalid(
                "LoRA sets",
                format!("component {:?} given twice", set.prefix()),
            ));
        }
        let comp = set.prefix();
        let mut first: Option<(usize, f64)> = None;
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for e in set.entries() {
            let ad = &e.adapter;
            let (r, alpha) = (ad.rank(), ad.alpha());
            ranks.push(r);
            alphas.push(alpha);
            let a = ad.a().as_tensor().detach().to_device(&Device::Cpu)?;
            let b = ad.b().as_tensor().detach().to_device(&Device::Cpu)?;
            let name = e.linear.name();
            match opts.format {
                LoraFormat::Kohya => {
                    let base = format!("{}{}", kohya_prefix(comp)?, name.replace('.', "_"));
                    tensors.insert(format!("{base}.lora_down.weight"), a.to_dtype(opts.dtype)?);
                    tensors.insert(format!("{base}.lora_up.weight"), b.to_dtype(opts.dtype)?);
                    tensors
                        .insert(format!("{base}.alpha"), Tensor::new(alpha as f32, &Device::Cpu)?);
                }
                LoraFormat::Peft | LoraFormat::PeftLegacy => {
                    let b = match opts.peft_alpha {
                        PeftAlpha::Bake if alpha != r as f64 => {
                            (b.to_dtype(DType::F64)? * (alpha / r as f64))?
                        }
                        _ => b,
                    };
                    let (dk, uk) = if opts.format == LoraFormat::Peft {
                        ("lora_A.weight", "lora_B.weight")
                    } else {
                        ("lora.down.weight", "lora.up.weight")
                    };
                    tensors.insert(format!("{comp}.{name}.{dk}"), a.to_dtype(opts.dtype)?);
                    tensors.insert(format!("{comp}.{name}.{uk}"), b.to_dtype(opts.dtype)?);
                    match first {
                        None => first = Some((r, alpha)),
                        Some((r0, a0)) => {
                            if r != r0 {
                                rank_pattern.insert(peft_target(comp, name), r.into());
                            }
                            if alpha != a0 {
                                alpha_pattern.insert(peft_target(comp, name), alpha.into());
                            }
                        }
                    }
                }
            }
        }
        if opts.format != LoraFormat::Kohya && opts.peft_alpha == PeftAlpha::Metadata {
            if let Some((r0, a0)) = first {
                let targets: Vec<serde_json::Value> =
                    set.names().iter().map(|n| peft_target(comp, n).into()).collect();
                peft_meta.insert(format!("{comp}.r"), r0.into());
                peft_meta.insert(format!("{comp}.lora_alpha"), a0.into());
                peft_meta.insert(format!("{comp}.target_modules"), targets.into());
                peft_meta.insert(format!("{comp}.rank_pattern"), rank_pattern.into());
                peft_meta.insert(format!("{comp}.alpha_pattern"), alpha_pattern.into());
            }
        }
    }
    if tensors.is_empty() {
        return Err(Error::invalid(
            "LoRA save",
            format!("{}: no adapters to write", path.display()),
        ));
    }
    meta.insert("format".into(), "pt".into());
    meta.insert("gen.lora.format".into(), opts.format.as_str().into());
    meta.insert(
        "gen.lora.components".into(),
        sets.iter().map(|s| s.prefix()).collect::<Vec<_>>().join(","),
    );
    meta.insert("gen.lora.ranks".into(), summarise(&ranks));
    meta.insert("gen.lora.alphas".into(), summarise(&alphas));
    if opts.format != LoraFormat::Kohya {
        let baked = opts.peft_alpha == PeftAlpha::Bake;
        meta.insert("gen.lora.alpha_baked_into_B".into(), baked.to_string());
        if !baked {
            meta.insert(
                "lora_adapter_metadata".into(),
                serde_json::to_string(&peft_meta).expect("json"),
            );
        }
    }
    if let (Some(r), Some(a)) = (ranks.first(), alphas.first()) {
        meta.insert("ss_network_module".into(), "networks.lora".into());
        meta.insert("ss_network_dim".into(), r.to_string());
        meta.insert("ss_network_alpha".into(), a.to_string());
    }
    let raws = tensors
        .iter()
        .map(|(k, v)| Ok((k.as_str(), RawTensor::from_tensor(v)?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(raws, Some(meta))
        .map_err(|e| Error::msg(format!("{}: serialising LoRA: {e}", path.display())))?;
    gen_core::write_atomic(path, &bytes)
}

/// A layer name as a PEFT `target_modules` entry (matched as a suffix). Text encoders drop the
/// leading `text_model.`, which transformers ≥ 5 no longer has in its module names, so that the
/// entry matches both layouts.
fn peft_target(component: &str, name: &str) -> String {
    match name.strip_prefix("text_model.") {
        Some(rest) if component.starts_with("text_encoder") => rest.to_string(),
        _ => name.to_string(),
    }
}

/// A tensor's little-endian bytes, for the `safetensors` crate (whose version differs from
/// candle's, so candle's own `View` impl cannot be used).
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawTensor {
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
        let (dtype, data): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                flat.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            DType::F64 => (
                safetensors::Dtype::F64,
                flat.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                flat.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                flat.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            other => {
                return Err(Error::invalid(
                    "LoRA save dtype",
                    format!("{other:?} (use f32, f16, bf16 or f64)"),
                ))
            }
        };
        Ok(Self { dtype, shape: t.dims().to_vec(), data })
    }
}

impl safetensors::View for RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A candle tensor from a safetensors view (f32, f64, f16, bf16; integer scalars — diffusers'
/// `convert_state_dict_to_kohya` stores alpha as an int64 0-d tensor — become f64).
fn load_view(
    v: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    use safetensors::Dtype as D;
    let int_scalar = |b: &[u8]| -> Option<f64> {
        Some(match (v.dtype(), b.len()) {
            (D::I64, 8) => i64::from_le_bytes(b.try_into().ok()?) as f64,
            (D::U64, 8) => u64::from_le_bytes(b.try_into().ok()?) as f64,
            (D::I32, 4) => i32::from_le_bytes(b.try_into().ok()?) as f64,
            (D::U32, 4) => u32::from_le_bytes(b.try_into().ok()?) as f64,
            (D::I16, 2) => i16::from_le_bytes(b.try_into().ok()?) as f64,
            (D::U16, 2) => u16::from_le_bytes(b.try_into().ok()?) as f64,
            (D::I8, 1) => b[0] as i8 as f64,
            (D::U8, 1) => b[0] as f64,
            _ => return None,
        })
    };
    if v.shape().iter().product::<usize>() == 1 {
        if let Some(x) = int_scalar(v.data()) {
            return Tensor::new(x, device)?.reshape(v.shape());
        }
    }
    let dtype = match v.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => candle_core::bail!("unsupported dtype {other:?} (LoRA weights must be float; integers only as a scalar alpha)"),
    };
    Tensor::from_raw_buffer(v.data(), dtype, v.shape(), device)
}

/// Refuses a float tensor with a NaN or infinite element (the error names the file, the
/// tensor and the element): applied, it would turn every output of the model into NaN.
fn check_finite(path: &Path, name: &str, v: &safetensors::tensor::TensorView<'_>) -> Result<()> {
    use gen_core::finite::{first_nonfinite_bits, FloatBits};
    use safetensors::Dtype as D;
    let bits = match v.dtype() {
        D::F16 => FloatBits::F16,
        D::BF16 => FloatBits::BF16,
        D::F32 => FloatBits::F32,
        D::F64 => FloatBits::F64,
        _ => return Ok(()),
    };
    match first_nonfinite_bits(v.data(), bits) {
        None => Ok(()),
        Some(i) => Err(file_err(
            path,
            format!(
                "tensor `{name}`: element {i} is not finite (NaN or infinite); the file is corrupt"
            ),
        )),
    }
}

/// Distinct values, comma-separated, in first-seen order.
fn summarise<T: PartialEq + ToString + Copy>(v: &[T]) -> String {
    let mut d: Vec<T> = Vec::new();
    for x in v {
        if !d.contains(x) {
            d.push(*x);
        }
    }
    d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// One module of a LoRA file.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// `unet`, `text_encoder` or `text_encoder_2`.
    pub component: String,
    /// The module as the file names it: a dotted path (PEFT) or the underscored kohya name
    /// without its `lora_unet_` prefix.
    pub module: String,
    /// The file key of A (for error messages).
    pub down_key: String,
    /// The file key of B.
    pub up_key: String,
    pub weights: LoraWeights,
}

/// A parsed LoRA file.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    pub modules: Vec<LoraModule>,
    /// Conv-layer modules (4-D A and B), as (component, A key): read but not applicable to
    /// `Linear` layers; [`apply_lora`] treats them like unknown modules.
    pub conv: Vec<(String, String)>,
    /// The safetensors header metadata.
    pub metadata: HashMap<String, String>,
}

impl LoraFile {
    /// The components present, in [`KNOWN_PREFIXES`] order.
    pub fn components(&self) -> Vec<&'static str> {
        KNOWN_PREFIXES.iter().copied().filter(|c| self.has_component(c)).collect()
    }
    pub fn has_component(&self, c: &str) -> bool {
        self.modules.iter().any(|m| m.component == c) || self.conv.iter().any(|(comp, _)| comp == c)
    }
}

fn file_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::msg(format!("LoRA file {}: {msg}", path.display()))
}

/// Reads a kohya or PEFT LoRA file (format auto-detected), loading tensors onto `device`.
pub fn read_lora_file(path: impl AsRef<Path>, device: &Device) -> Result<LoraFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        file_err(path, format!("not a readable safetensors file ({e}); truncated or corrupt?"))
    })?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| file_err(path, e))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, view) in st.tensors() {
        check_finite(path, &name, &view)?;
        let t = load_view(&view, device)
            .ctx(format!("LoRA file {}: tensor `{name}`", path.display()))?;
        tensors.insert(name, t);
    }
    if tensors.is_empty() {
        return Err(file_err(path, "holds no tensors"));
    }
    let is_kohya = |k: &str| {
        k.starts_with("lora_unet_")
            || k.starts_with("lora_te_")
            || k.starts_with("lora_te1_")
            || k.starts_with("lora_te2_")
    };
    let kohya = tensors.keys().filter(|k| is_kohya(k)).count();
    let format = if kohya == tensors.len() {
        LoraFormat::Kohya
    } else if kohya > 0 {
        let other: Vec<&String> = tensors.keys().filter(|k| !is_kohya(k)).take(3).collect();
        return Err(file_err(path, format!("mixes kohya keys with others ({other:?})")));
    } else if tensors.keys().any(|k| k.ends_with(".lora_A.weight")) {
        LoraFormat::Peft
    } else if tensors.keys().any(|k| PEFT_SUFFIXES.iter().any(|(ds, _)| k.ends_with(ds))) {
        LoraFormat::PeftLegacy
    } else {
        let some: Vec<&String> = tensors.keys().take(4).collect();
        return Err(file_err(path, format!("no LoRA keys of a known format (kohya `lora_unet_….lora_down.weight`, PEFT `unet.….lora_A.weight`); found e.g. {some:?}")));
    };
    let (modules, conv) = match format {
        LoraFormat::Kohya => parse_kohya(path, tensors)?,
        _ => parse_peft(path, tensors, &metadata)?,
    };
    Ok(LoraFile { path: path.to_path_buf(), format, modules, conv, metadata })
}

fn scalar(path: &Path, key: &str, t: &Tensor) -> Result<f64> {
    if t.elem_count() != 1 {
        return Err(file_err(
            path,
            format!("`{key}` should be a scalar, has shape {:?}", t.dims()),
        ));
    }
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
    if !v.is_finite() || v <= 0.0 {
        return Err(file_err(path, format!("`{key}` = {v} (alpha must be finite and > 0)")));
    }
    Ok(v)
}

/// `Ok(None)` for a conv LoRA (4-D A and B: kohya's LoCon, or SD 1.x `proj_in`/`proj_out`
/// 1×1 convs), which no `Linear` can take.
fn make_weights(
    path: &Path,
    down_key: &str,
    up_key: &str,
    down: Tensor,
    up: Tensor,
    alpha: Option<f64>,
) -> Result<Option<LoraWeights>> {
    if down.rank() == 4 && up.rank() == 4 {
        return Ok(None);
    }
    let (r, _) = down.dims2().map_err(|_| {
        file_err(path, format!("`{down_key}` has shape {:?}; expected (rank, in)", down.dims()))
    })?;
    let (_, r2) = up.dims2().map_err(|_| {
        file_err(path, format!("`{up_key}` has shape {:?}; expected (out, rank)", up.dims()))
    })?;
    if r == 0 {
        return Err(file_err(path, format!("`{down_key}` has rank 0")));
    }
    if r != r2 {
        return Err(Error::Shape {
            file: path.display().to_string(),
            key: up_key.to_string(),
            expected: vec![up.dims()[0], r],
            found: up.dims().to_vec(),
        });
    }
    Ok(Some(LoraWeights { down, up, alpha: alpha.unwrap_or(r as f64) }))
}

/// Linear modules, and (component, A key) of conv modules.
type Parsed = (Vec<LoraModule>, Vec<(String, String)>);

fn parse_kohya(path: &Path, mut tensors: HashMap<String, Tensor>) -> Result<Parsed> {
    let mut bases: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_down.weight").map(str::to_string))
        .collect();
    bases.sort();
    let (mut modules, mut conv) = (Vec::new(), Vec::new());
    for base in bases {
        let (dk, uk, ak) = (
            format!("{base}.lora_down.weight"),
            format!("{base}.lora_up.weight"),
            format!("{base}.alpha"),
        );
        let down = tensors.remove(&dk).expect("listed");
        let up = tensors.remove(&uk).ok_or_else(|| Error::MissingTensor {
            file: path.display().to_string(),
            key: uk.clone(),
        })?;
        let alpha = match tensors.remove(&ak) {
            Some(t) => Some(scalar(path, &ak, &t)?),
            None => None,
        };
        let (component, module) = if let Some(m) = base.strip_prefix("lora_unet_") {
            ("unet", m)
        } else if let Some(m) =
            base.strip_prefix("lora_te_").or_else(|| base.strip_prefix("lora_te1_"))
        {
            ("text_encoder", m)
        } else if let Some(m) = base.strip_prefix("lora_te2_") {
            ("text_encoder_2", m)
        } else {
            unreachable!("kohya keys checked")
        };
        match make_weights(path, &dk, &uk, down, up, alpha)? {
            Some(weights) => modules.push(LoraModule {
                component: component.into(),
                module: module.into(),
                down_key: dk,
                up_key: uk,
                weights,
            }),
            None => conv.push((component.to_string(), dk)),
        }
    }
    if !tensors.is_empty() {
        let mut left: Vec<&String> = tensors.keys().collect();
        left.sort();
        return Err(file_err(path, format!("{} keys that are not LoRA down/up/alpha (unsupported variant: DoRA, LoHa, LoKr?), e.g. {:?}", left.len(), &left[..left.len().min(4)])));
    }
    Ok((modules, conv))
}

/// Per-component alpha settings from diffusers' `lora_adapter_metadata`.
#[derive(Default, Debug)]
struct PeftMeta {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
}

fn peft_meta(path: &Path, metadata: &HashMap<String, String>) -> Result<HashMap<String, PeftMeta>> {
    let mut out: HashMap<String, PeftMeta> = HashMap::new();
    let Some(raw) = metadata.get("lora_adapter_metadata") else { return Ok(out) };
    let v: serde_json::Value = serde_json::from_str(raw)
        .map_err(|e| file_err(path, format!("lora_adapter_metadata is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| file_err(path, "lora_adapter_metadata is not a JSON object"))?;
    for (k, val) in obj {
        let Some((comp, field)) = KNOWN_PREFIXES
            .iter()
            .rev()
            .find_map(|c| k.strip_prefix(&format!("{c}.")).map(|f| (c.to_string(), f)))
        else {
            continue;
        };
        let m = out.entry(comp).or_default();
        match field {
            "lora_alpha" => m.lora_alpha = val.as_f64(),
            "alpha_pattern" => {
                if let Some(p) = val.as_object() {
                    m.alpha_pattern =
                        p.iter().filter_map(|(k, v)| v.as_f64().map(|a| (k.clone(), a))).collect();
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The (A, B) key suffixes of the diffusers/PEFT family. Files written by diffusers' training
/// scripts (`convert_state_dict_to_diffusers`) mix them: UNet attention `…to_q.lora.down.weight`,
/// text-encoder attention `…q_proj.lora_linear_layer.down.weight`, everything else
/// `….lora_A.weight`; the attention-processor format has `…processor.to_q_lora.down.weight`.
const PEFT_SUFFIXES: [(&str, &str); 4] = [
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
];

/// The module path of an attention-processor key base (`….attn1.processor.to_q` →
/// `….attn1.to_q`, `….processor.to_out` → `….to_out.0`).
fn processor_module(base: &str) -> String {
    match base.rsplit_once(".processor.") {
        Some((head, "to_out")) => format!("{head}.to_out.0"),
        Some((head, tail)) => format!("{head}.{tail}"),
        None => base.to_string(),
    }
}

fn parse_peft(
    path: &Path,
    mut tensors: HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<Parsed> {
    let meta = peft_meta(path, metadata)?;
    let mut found: Vec<(String, &str, &str)> = Vec::new();
    for k in tensors.keys() {
        if let Some((ds, us)) = PEFT_SUFFIXES.iter().find(|(ds, _)| k.ends_with(ds)) {
            found.push((k[..k.len() - ds.len()].to_string(), ds, us));
        }
    }
    found.sort();
    let (mut modules, mut conv) = (Vec::new(), Vec::new());
    for (base, ds, us) in found {
        let (dk, uk, ak) = (format!("{base}{ds}"), format!("{base}{us}"), format!("{base}.alpha"));
        let down = tensors.remove(&dk).expect("listed");
        let up = tensors.remove(&uk).ok_or_else(|| Error::MissingTensor {
            file: path.display().to_string(),
            key: uk.clone(),
        })?;
        let Some((component, module)) = KNOWN_PREFIXES.iter().rev().find_map(|c| {
            base.strip_prefix(&format!("{c}.")).map(|m| (c.to_string(), m.to_string()))
        }) else {
            return Err(file_err(path, format!("`{dk}`: unknown component (expected a key starting with one of {KNOWN_PREFIXES:?})")));
        };
        let module = if ds.starts_with('_') { processor_module(&module) } else { module };
        let mut alpha = match tensors.remove(&ak) {
            Some(t) => Some(scalar(path, &ak, &t)?),
            None => None,
        };
        if alpha.is_none() {
            if let Some(m) = meta.get(&component) {
                alpha = m
                    .alpha_pattern
                    .iter()
                    .find(|(p, _)| crate::lora::pattern_matches(p, &module))
                    .map(|(_, a)| *a)
                    .or(m.lora_alpha);
            }
        }
        match make_weights(path, &dk, &uk, down, up, alpha)? {
            Some(weights) => {
                modules.push(LoraModule { component, module, down_key: dk, up_key: uk, weights })
            }
            None => conv.push((component, dk)),
        }
    }
    if !tensors.is_empty() {
        let mut left: Vec<&String> = tensors.keys().collect();
        left.sort();
        return Err(file_err(path, format!("{} keys that are not LoRA A/B/alpha (unsupported variant: DoRA, LoHa, conv?), e.g. {:?}", left.len(), &left[..left.len().min(4)])));
    }
    Ok((modules, conv))
}

/// What to do with file modules that match no layer of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UnknownKeys {
    /// Fail, listing a few of them (default).
    #[default]
    Error,
    /// Skip them; they are listed in [`AppliedLora::skipped`].
    Skip,
}

/// How a file is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ApplyMode {
    /// As adapters (the weights untouched; `scale` can be changed later; trainable).
    #[default]
    Adapter,
    /// Merged into the weights (base speed; [`LoraSet::unmerge`] restores them).
    Merge,
}

/// Options of [`apply_lora`].
#[derive(Clone, Debug, PartialEq)]
pub struct ApplyOptions {
    /// Multiplier on `(alpha/r) · B A` (the `:SCALE` of `--lora FILE:SCALE`).
    pub scale: f64,
    pub mode: ApplyMode,
    pub unknown: UnknownKeys,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self { scale: 1.0, mode: ApplyMode::Adapter, unknown: UnknownKeys::Error }
    }
}

/// The result of [`apply_lora`].
#[derive(Debug)]
pub struct AppliedLora {
    pub set: LoraSet,
    /// A keys of the modules (for this component) that matched no layer or are conv LoRA, when
    /// skipping was asked for.
    pub skipped: Vec<String>,
}

/// Applies the modules of `file` that belong to `component` (`"unet"`, `"text_encoder"`, …) to
/// the layers `linears` of that component. Each module is resolved to a layer name (kohya names
/// through the `'.'→'_'` map of every layer name; for text encoders a leading `text_model.` is
/// ignored on both sides, as transformers ≥ 5 drops it); A must be `(r, in)` and B `(out, r)` for that
/// layer. Errors name the file key, the expected and the found shape. Errors when the file holds
/// nothing for `component` (check [`LoraFile::has_component`] first).
pub fn apply_lora(
    file: &LoraFile,
    component: &str,
    linears: &[Linear],
    opts: &ApplyOptions,
) -> Result<AppliedLora> {
    if !opts.scale.is_finite() {
        return Err(Error::invalid("LoRA scale", opts.scale.to_string()));
    }
    let path = &file.path;
    let mods: Vec<&LoraModule> = file.modules.iter().filter(|m| m.component == component).collect();
    if mods.is_empty() {
        return Err(file_err(
            path,
            format!(
                "has no {component} LoRA for linear layers (components: {:?})",
                file.components()
            ),
        ));
    }
    // Name index: exact for PEFT, '.'→'_' for kohya (with ambiguity detection).
    // Text encoders: files from transformers ≥ 5 name CLIP layers without the `text_model.`
    // level (`text_encoder.encoder.layers.0…`, kohya `lora_te1_encoder_layers_0_…`), older ones
    // and our models with it; both resolve.
    let text = component.starts_with("text_encoder");
    let norm = |s: &str| -> String {
        let s = if file.format == LoraFormat::Kohya { s.replace('.', "_") } else { s.to_string() };
        let strip = if file.format == LoraFormat::Kohya { "text_model_" } else { "text_model." };
        match s.strip_prefix(strip) {
            Some(rest) if text => rest.to_string(),
            _ => s,
        }
    };
    let mut index: HashMap<String, Vec<&Linear>> = HashMap::new();
    for l in linears {
        index.entry(norm(l.name())).or_default().push(l);
    }
    let mut pairs = Vec::new();
    let mut unknown = Vec::new();
    let mut used = std::collections::HashSet::new();
    for m in mods {
        let Some(cands) = index.get(&norm(&m.module)) else {
            unknown.push(m.down_key.clone());
            continue;
        };
        if cands.len() > 1 {
            let names: Vec<&str> = cands.iter().map(|l| l.name()).collect();
            return Err(file_err(
                path,
                format!("`{}` is ambiguous: matches layers {names:?}", m.down_key),
            ));
        }
        let lin = cands[0];
        if !used.insert(lin.name().to_string()) {
            return Err(file_err(path, format!("two modules map to layer {}", lin.name())));
        }
        let (out_dim, in_dim) = (lin.out_dim(), lin.in_dim());
        let r = m.weights.down.dims()[0];
        let shape_err = |key: &str, expected: Vec<usize>, found: &[usize]| Error::Shape {
            file: path.display().to_string(),
            key: key.to_string(),
            expected,
            found: found.to_vec(),
        };
        if m.weights.down.dims()[1] != in_dim {
            return Err(shape_err(&m.down_key, vec![r, in_dim], m.weights.down.dims()));
        }
        if m.weights.up.dims()[0] != out_dim {
            return Err(shape_err(&m.up_key, vec![out_dim, r], m.weights.up.dims()));
        }
        pairs.push((lin.clone(), m.weights.clone()));
    }
    let conv: Vec<String> =
        file.conv.iter().filter(|(c, _)| c == component).map(|(_, k)| k.clone()).collect();
    if !conv.is_empty() && opts.unknown == UnknownKeys::Error {
        return Err(file_err(
            path,
            format!(
                "{} {component} conv-layer LoRA module(s) (e.g. {:?}): conv LoRA is not supported (only linear-layer LoRA applies)",
                conv.len(),
                &conv[..conv.len().min(3)]
            ),
        ));
    }
    unknown.extend(conv);
    if !unknown.is_empty() && opts.unknown == UnknownKeys::Error {
        let sample: Vec<&str> = linears.iter().take(3).map(|l| l.name()).collect();
        return Err(file_err(
            path,
            format!(
                "{} {component} module(s) match no layer of the model, e.g. {:?} (model layers look like {sample:?}; is the file a LoRA for another model?)",
                unknown.len(),
                &unknown[..unknown.len().min(4)]
            ),
        ));
    }
    let set = LoraSet::from_weights(component, pairs, opts.scale)?;
    if opts.mode == ApplyMode::Merge {
        set.merge(opts.scale)?;
    }
    Ok(AppliedLora { set, skipped: unknown })
}

/// Reads `path` and applies its `component` part to `linears` (see [`apply_lora`]).
pub fn apply_lora_file(
    linears: &[Linear],
    component: &str,
    path: impl AsRef<Path>,
    opts: &ApplyOptions,
) -> Result<AppliedLora> {
    let dev = linears.first().map(|l| l.weight().device().clone()).unwrap_or(Device::Cpu);
    let file = read_lora_file(path, &dev)?;
    apply_lora(&file, component, linears, opts)
}

/// Parses a `--lora FILE[:SCALE]` argument: the scale after the last `:` when it parses as a
/// number (default 1), so paths with colons still work (`C:\\x.safetensors` without a scale is
/// taken whole).
pub fn parse_lora_arg(arg: &str) -> Result<(PathBuf, f64)> {
    if arg.trim().is_empty() {
        return Err(Error::invalid("--lora", "empty argument (expected FILE or FILE:SCALE)"));
    }
    if let Some((file, scale)) = arg.rsplit_once(':') {
        if let Ok(s) = scale.trim().parse::<f64>() {
            if !s.is_finite() {
                return Err(Error::invalid("--lora", format!("{arg}: scale {s} is not finite")));
            }
            if file.is_empty() {
                return Err(Error::invalid("--lora", format!("{arg}: no file before the scale")));
            }
            return Ok((PathBuf::from(file), s));
        }
    }
    Ok((PathBuf::from(arg), 1.0))
}

/// Applies every component of the LoRA file at `path` to the matching model part:
/// `parts` = `[("unet", unet.linears()), ("text_encoder", text_encoder.linears())]`. Errors when the
/// file holds a component that `parts` lacks (e.g. an SDXL `text_encoder_2` LoRA on an SD 1.x
/// pipeline), or nothing for any of them.
pub fn apply_lora_file_to_parts(
    path: impl AsRef<Path>,
    parts: &[(&str, Vec<Linear>)],
    opts: &ApplyOptions,
) -> Result<Vec<AppliedLora>> {
    let path = path.as_ref();
    let dev = parts
        .iter()
        .find_map(|(_, l)| l.first())
        .map(|l| l.weight().device().clone())
        .unwrap_or(Device::Cpu);
    let file = read_lora_file(path, &dev)?;
    let comps = file.components();
    if let Some(c) = comps.iter().find(|c| !parts.iter().any(|(p, _)| p == *c)) {
        let have: Vec<&str> = parts.iter().map(|(p, _)| *p).collect();
        return Err(file_err(
            path,
            format!("has a {c} LoRA but the model has no such part (parts: {have:?})"),
        ));
    }
    let mut out = Vec::new();
    for (comp, linears) in parts {
        if file.has_component(comp) {
            out.push(apply_lora(&file, comp, linears, opts)?);
        }
    }
    Ok(out)
}
