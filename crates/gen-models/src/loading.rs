//! Weight and config loading with errors that name the file and the key.
//!
//! - [`SafetensorsWeights`]: one or more `.safetensors` files, headers validated when opened
//!   (truncated file, corrupt header, data offsets past the end of the file), tensors memory-mapped.
//!   It is a [`SimpleBackend`], so a [`VarBuilder`] over it reports a missing tensor, a wrong shape
//!   (expected vs found) or an unsupported dtype with the file and the key.
//! - [`weights_vb`]: that `VarBuilder`, converting f16/bf16/f32/f64 weights to the requested dtype.
//!   The CPU backend has no bf16 matmul: use f32 (the default compute dtype) on CPU.
//! - [`find_weight_files`]: the weight files of a diffusers component folder.
//! - [`JsonConfig`]: reading `config.json` fields with defaults and errors naming file and key.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use gen_core::{Error, Result};

/// What a safetensors header says about one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The safetensors dtype string: `F32`, `F16`, `BF16`, `I64`, …
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// The candle dtype for float weights; `None` for anything this crate does not load.
    pub fn float_dtype(&self) -> Option<DType> {
        match self.dtype.as_str() {
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "F32" => Some(DType::F32),
            "F64" => Some(DType::F64),
            _ => None,
        }
    }
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// Reads and validates the header of a safetensors file: the 8-byte length, the JSON, every
/// tensor's dtype, shape and data offsets against the file size.
pub fn read_safetensors_header(path: &Path) -> Result<HashMap<String, TensorInfo>> {
    use std::io::Read;
    let bad = |msg: String| {
        Error::msg(format!("{}: not a valid safetensors file: {msg}", path.display()))
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(bad(format!("{file_len} bytes, shorter than the 8-byte header length")));
    }
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len8);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(format!(
            "header length {n} exceeds the file size {file_len} (truncated or corrupt)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = file_len - 8 - n;
    let mut out = HashMap::new();
    for (key, v) in obj {
        if key == "__metadata__" {
            continue;
        }
        let field =
            |name: &str| v.get(name).ok_or_else(|| bad(format!("tensor `{key}` has no `{name}`")));
        let dtype = field("dtype")?
            .as_str()
            .ok_or_else(|| bad(format!("tensor `{key}`: dtype is not a string")))?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|a| {
                a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad(format!("tensor `{key}`: shape is not a list of integers")))?;
        let offs: Vec<u64> = field("data_offsets")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad(format!("tensor `{key}`: data_offsets is not two integers")))?;
        if offs[1] < offs[0] || offs[1] > data_len {
            return Err(bad(format!(
                "tensor `{key}`: data {}..{} lies outside the {data_len} data bytes (truncated file?)",
                offs[0], offs[1]
            )));
        }
        if let Some(sz) = dtype_size(dtype) {
            // checked: a corrupt header may declare a shape whose size overflows
            let want = shape
                .iter()
                .try_fold(sz as u64, |acc, &d| acc.checked_mul(d as u64))
                .filter(|w| *w == offs[1] - offs[0]);
            if want.is_none() {
                return Err(bad(format!(
                    "tensor `{key}`: {dtype} {shape:?} does not fit the {} bytes its offsets give",
                    offs[1] - offs[0]
                )));
            }
        }
        out.insert(key.clone(), TensorInfo { dtype: dtype.to_string(), shape });
    }
    Ok(out)
}

/// Memory-mapped safetensors files that remember which file holds which key, and which keys
/// a model has read (see [`SafetensorsWeights::unused_keys`]). Clones share the files and the
/// record of used keys.
#[derive(Clone)]
pub struct SafetensorsWeights {
    inner: Arc<WeightsInner>,
}

struct WeightsInner {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// key → (file index, header info)
    index: HashMap<String, (usize, TensorInfo)>,
    used: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for SafetensorsWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<_> = self.inner.files.iter().map(|(p, _)| p).collect();
        f.debug_struct("SafetensorsWeights")
            .field("files", &files)
            .field("tensors", &self.inner.index.len())
            .finish()
    }
}

impl SafetensorsWeights {
    /// Opens and validates the files. A key present in two files is an error naming both.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::msg("no safetensors weight files given"));
        }
        let mut files = Vec::new();
        let mut index: HashMap<String, (usize, TensorInfo)> = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let header = read_safetensors_header(p)?;
            // SAFETY: memory-mapping a file; it must not be modified while the weights live,
            // which is the usual contract of model weight files.
            let mm = unsafe { MmapedSafetensors::new(p) }.map_err(|e| {
                Error::msg(format!("{}: cannot open as safetensors: {e}", p.display()))
            })?;
            for (k, info) in header {
                if let Some((j, _)) = index.get(&k) {
                    return Err(Error::msg(format!(
                        "tensor `{k}` is in both {} and {}",
                        paths[*j].display(),
                        p.display()
                    )));
                }
                index.insert(k, (i, info));
            }
            files.push((p.clone(), mm));
        }
        Ok(Self {
            inner: Arc::new(WeightsInner { files, index, used: Mutex::new(HashSet::new()) }),
        })
    }

    /// A `VarBuilder` reading from these files (a handle: `self` keeps seeing the used keys).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Keys of the files that nothing has loaded yet, sorted: after building a model, the
    /// checkpoint tensors the model does not use.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.inner.used.lock().expect("used-keys lock");
        let mut k: Vec<String> =
            self.inner.index.keys().filter(|k| !used.contains(*k)).cloned().collect();
        k.sort();
        k
    }

    /// The files, in the order given.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.inner.files.iter().map(|(p, _)| p.clone()).collect()
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.inner.index.keys().cloned().collect();
        k.sort();
        k
    }

    /// Whether the files hold `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.inner.index.contains_key(key)
    }

    /// Header info of `key`.
    pub fn info(&self, key: &str) -> Option<&TensorInfo> {
        self.inner.index.get(key).map(|(_, i)| i)
    }

    /// The file holding `key`.
    pub fn file_of(&self, key: &str) -> Option<&Path> {
        self.inner.index.get(key).map(|(i, _)| self.inner.files[*i].0.as_path())
    }

    fn files_label(&self) -> String {
        self.inner.files.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Loads `key` converted to `dtype`, checking the shape when `expected` is given.
    pub fn load(
        &self,
        key: &str,
        expected: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some((i, info)) = self.inner.index.get(key) else {
            return Err(Error::MissingTensor { file: self.files_label(), key: key.to_string() });
        };
        let (path, mm) = &self.inner.files[*i];
        let file = path.display().to_string();
        self.inner.used.lock().expect("used-keys lock").insert(key.to_string());
        if let Some(exp) = expected {
            if exp != info.shape.as_slice() {
                return Err(Error::Shape {
                    file,
                    key: key.to_string(),
                    expected: exp.to_vec(),
                    found: info.shape.clone(),
                });
            }
        }
        if info.float_dtype().is_none() {
            return Err(Error::msg(format!(
                "{file}: tensor `{key}`: unsupported dtype {} (weights must be F16, BF16, F32 or F64)",
                info.dtype
            )));
        }
        let view = mm.get(key).map_err(|e| Error::msg(format!("{file}: tensor `{key}`: {e}")))?;
        check_finite_bytes(&file, key, &info.dtype, view.data())?;
        let t =
            mm.load(key, device).map_err(|e| Error::msg(format!("{file}: tensor `{key}`: {e}")))?;
        t.to_dtype(dtype).map_err(|e| {
            Error::msg(format!("{file}: tensor `{key}`: converting to {dtype:?}: {e}"))
        })
    }
}

/// Refuses a float tensor with a NaN or infinite element: the error names the file, the
/// tensor, the element and its value.
pub fn check_finite_bytes(file: &str, key: &str, dtype: &str, bytes: &[u8]) -> Result<()> {
    use gen_core::finite::{first_nonfinite_bits, FloatBits};
    let bits = match dtype {
        "F16" => FloatBits::F16,
        "BF16" => FloatBits::BF16,
        "F32" => FloatBits::F32,
        "F64" => FloatBits::F64,
        _ => return Ok(()),
    };
    match first_nonfinite_bits(bytes, bits) {
        None => Ok(()),
        Some(i) => {
            let n = dtype_size(dtype).unwrap_or(1);
            let raw = &bytes[i * n..(i + 1) * n];
            let value = match bits {
                FloatBits::F16 => half::f16::from_le_bytes([raw[0], raw[1]]).to_f64(),
                FloatBits::BF16 => half::bf16::from_le_bytes([raw[0], raw[1]]).to_f64(),
                FloatBits::F32 => f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as f64,
                FloatBits::F64 => {
                    f64::from_le_bytes(raw.try_into().expect("an f64 element has 8 bytes"))
                }
            };
            Err(Error::msg(format!(
                "{file}: tensor `{key}`: element {i} is {value} (weights must be finite; the file is corrupt or came from a diverged run)"
            )))
        }
    }
}

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(s.dims()), dtype, dev).map_err(candle_core::Error::wrap)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev).map_err(candle_core::Error::wrap)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.index.contains_key(name)
    }
}

/// A `VarBuilder` over safetensors files, loading every weight as `dtype` on `device`.
/// Errors from `vb.get(shape, name)` name the file and the key.
pub fn weights_vb(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    Ok(SafetensorsWeights::open(paths)?.var_builder(dtype, device))
}

/// Which weight files of a component folder to prefer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightVariant {
    /// `Some("fp16")`: prefer `*.fp16.safetensors`; `None`: prefer the plain files and fall
    /// back to a variant when only that exists.
    pub variant: Option<String>,
}

const WEIGHT_STEMS: [&str; 2] = ["model", "diffusion_pytorch_model"];

/// Which weight file(s) [`select_weight_names`] picked among a folder's file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSelection {
    /// One `.safetensors` file.
    Single(String),
    /// A sharded checkpoint's `*.safetensors.index.json`.
    Index(String),
    /// No safetensors weights.
    None,
}

/// Picks the weight file among the file names of a component folder (local or on the hub):
/// `model.safetensors`, `diffusion_pytorch_model.safetensors`, their variants
/// (`model.fp16.safetensors`), or a sharded index. The requested variant first; without one,
/// the plain files first, then any variant.
pub fn select_weight_names(names: &[String], variant: &WeightVariant) -> WeightSelection {
    let mut variants: Vec<Option<String>> = Vec::new();
    match &variant.variant {
        Some(v) => {
            variants.push(Some(v.clone()));
            variants.push(None);
        }
        None => {
            variants.push(None);
            for n in names {
                // `model.fp16.safetensors` → variant `fp16`
                for stem in WEIGHT_STEMS {
                    if let Some(rest) = n
                        .strip_prefix(&format!("{stem}."))
                        .and_then(|r| r.strip_suffix(".safetensors"))
                    {
                        if !rest.is_empty()
                            && !rest.contains('.')
                            && !variants.contains(&Some(rest.to_string()))
                        {
                            variants.push(Some(rest.to_string()));
                        }
                    }
                }
            }
        }
    }
    for v in &variants {
        let mid = v.as_ref().map(|v| format!(".{v}")).unwrap_or_default();
        for stem in WEIGHT_STEMS {
            let single = format!("{stem}{mid}.safetensors");
            if names.contains(&single) {
                return WeightSelection::Single(single);
            }
            for idx in [
                format!("{stem}.safetensors{mid}.index.json"),
                format!("{stem}{mid}.safetensors.index.json"),
            ] {
                if names.contains(&idx) {
                    return WeightSelection::Index(idx);
                }
            }
        }
    }
    WeightSelection::None
}

/// The safetensors weight files of a diffusers component folder (`text_encoder/`, `unet/`, …).
///
/// Looks for `model.safetensors`, `diffusion_pytorch_model.safetensors`, their variants
/// (`model.fp16.safetensors`) and sharded checkpoints (`*.safetensors.index.json`). When none is
/// found the error lists the folder's files, and says that safetensors is required when only
/// `.bin`/`.ckpt`/`.pt` weights are there.
pub fn find_weight_files(dir: &Path, variant: &WeightVariant) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    match select_weight_names(&names, variant) {
        WeightSelection::Single(n) => return Ok(vec![dir.join(n)]),
        WeightSelection::Index(n) => return sharded_files(&dir.join(n)),
        WeightSelection::None => {}
    }
    let has_pickle = names.iter().any(|n| {
        n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt") || n.ends_with(".pth")
    });
    let listing = if names.is_empty() { "(empty)".to_string() } else { names.join(", ") };
    let hint = if has_pickle {
        "; only PyTorch pickle weights (.bin/.ckpt/.pt) are there: safetensors is required (convert with diffusers' `save_pretrained(..., safe_serialization=True)`)"
    } else {
        ""
    };
    Err(Error::msg(format!(
        "{}: no weight file (looked for model.safetensors, diffusion_pytorch_model.safetensors and their .fp16 variants); the folder holds: {listing}{hint}",
        dir.display()
    )))
}

/// The shard files listed in a `*.safetensors.index.json` (all must exist).
pub fn sharded_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        file: index.to_path_buf(),
        key: "weight_map".into(),
        msg: e.to_string(),
    })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
        file: index.to_path_buf(),
        key: "weight_map".into(),
        msg: "missing or not an object".into(),
    })?;
    let mut files: Vec<String> =
        map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    for p in &paths {
        if !p.exists() {
            return Err(Error::MissingFile {
                path: p.clone(),
                hint: format!("listed in {}", index.display()),
            });
        }
    }
    Ok(paths)
}

/// A parsed JSON config file whose getters name the file and key in their errors.
#[derive(Debug, Clone)]
pub struct JsonConfig {
    pub path: PathBuf,
    pub value: serde_json::Value,
}

impl JsonConfig {
    /// Reads `path`; an unreadable or non-object file is an error naming it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::MissingFile { path: path.to_path_buf(), hint: String::new() }
            }
            _ => Error::io(path, e),
        })?;
        Self::from_str(path, &text)
    }

    /// Parses `text` as if read from `path`.
    pub fn from_str(path: impl AsRef<Path>, text: &str) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Config {
            file: path.clone(),
            key: "(file)".into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        if !value.is_object() {
            return Err(Error::Config {
                file: path,
                key: "(file)".into(),
                msg: "not a JSON object".into(),
            });
        }
        Ok(Self { path, value })
    }

    /// The sub-object `key` (e.g. `text_config` of a `CLIPModel` config) as a config of the same file.
    pub fn sub(&self, key: &str) -> Option<JsonConfig> {
        self.value
            .get(key)
            .filter(|v| v.is_object())
            .map(|v| JsonConfig { path: self.path.clone(), value: v.clone() })
    }

    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config { file: self.path.clone(), key: key.into(), msg: msg.into() }
    }

    fn raw(&self, key: &str) -> Option<&serde_json::Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// A non-negative integer; `default` when absent (`None`: required).
    pub fn usize(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.raw(key) {
            None => default.ok_or_else(|| self.err(key, "missing")),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }

    /// A number; `default` when absent (`None`: required).
    pub fn f64(&self, key: &str, default: Option<f64>) -> Result<f64> {
        match self.raw(key) {
            None => default.ok_or_else(|| self.err(key, "missing")),
            Some(v) => {
                v.as_f64().ok_or_else(|| self.err(key, format!("expected a number, found {v}")))
            }
        }
    }

    /// A string; `default` when absent (`None`: required).
    pub fn string(&self, key: &str, default: Option<&str>) -> Result<String> {
        match self.raw(key) {
            None => default.map(str::to_string).ok_or_else(|| self.err(key, "missing")),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(key, format!("expected a string, found {v}"))),
        }
    }

    /// A boolean; `default` when absent.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    /// An error about `key` of this file (for checks across fields).
    pub fn invalid(&self, key: &str, msg: impl Into<String>) -> Error {
        self.err(key, msg)
    }
}

/// The field names of a serde struct (what `#[derive(Deserialize)]` accepts as keys), e.g. the
/// keys a [`crate::unet::UNetConfig`] reads, for "unknown key" checks.
pub fn struct_fields<T: for<'de> serde::Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};
    /// A deserializer that only records the fields a struct asks for.
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(
            self,
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("fields recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}
