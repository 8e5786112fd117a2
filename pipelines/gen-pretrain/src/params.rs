//! Trainable parameters: deterministic initialisation of a `VarMap` built by a model
//! constructor (candle's `VarBuilder::get` creates zeros), name-sorted access (a `VarMap` is a
//! hash map: its iteration order is not stable) and safetensors save/load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use gen_core::{Error, Result, ResultExt, SeededRng};
use gen_optim::NamedVar;

/// The variables of `vm`, sorted by name.
pub fn sorted_vars(vm: &VarMap) -> Vec<NamedVar> {
    let data = vm.data().lock().expect("varmap lock");
    let mut v: Vec<NamedVar> =
        data.iter().map(|(k, var)| NamedVar::new(k.clone(), var.clone())).collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Number of scalar parameters.
pub fn count_params(vm: &VarMap) -> usize {
    sorted_vars(vm).iter().map(|v| v.var.elem_count()).sum()
}

/// Initialises every variable in name order from `seed`:
/// - 1-D `*.weight` (norm gains) → 1, 1-D `*.bias` and other 1-D tensors → 0 except CLIP's
///   `class_embedding` (normal, std 0.02);
/// - `logit_scale` → ln(1/0.07) (CLIP's initial temperature);
/// - embeddings (`*embedding*`, 2-D) → normal, std 0.02;
/// - other weights (linear, conv) → normal with std `1/sqrt(fan_in)`, fan_in = product of all
///   dimensions but the first;
/// - weights whose name ends in one of `zero_suffixes` → 0 (e.g. an output convolution).
pub fn init_params(vm: &VarMap, seed: u64, zero_suffixes: &[&str]) -> Result<()> {
    let mut rng = SeededRng::new(seed);
    for nv in sorted_vars(vm) {
        let dims = nv.var.dims().to_vec();
        let dev = nv.var.device().clone();
        let name = nv.name.as_str();
        let t = if zero_suffixes.iter().any(|s| name.ends_with(s)) {
            Tensor::zeros(dims.as_slice(), DType::F32, &dev)?
        } else if name == "logit_scale" {
            Tensor::full((1.0f32 / 0.07).ln(), dims.as_slice(), &dev)?
        } else if name.ends_with("class_embedding")
            || (name.contains("embedding") && dims.len() >= 2)
        {
            (rng.randn(dims.as_slice(), DType::F32, &dev)? * 0.02)?
        } else if dims.len() <= 1 {
            let v = if name.ends_with(".weight") { 1.0f32 } else { 0.0 };
            Tensor::full(v, dims.as_slice(), &dev)?
        } else {
            let fan_in: usize = dims[1..].iter().product();
            (rng.randn(dims.as_slice(), DType::F32, &dev)? * (1.0 / (fan_in as f64).sqrt()))?
        };
        nv.var.set(&t.to_dtype(nv.var.dtype())?).ctx(format!("initialising `{name}`"))?;
    }
    Ok(())
}

/// The variables' current values, by name (on the CPU).
pub fn tensors(vars: &[NamedVar]) -> Result<HashMap<String, Tensor>> {
    let mut m = HashMap::new();
    for v in vars {
        m.insert(v.name.clone(), v.var.as_tensor().detach().to_device(&Device::Cpu)?);
    }
    Ok(m)
}

/// Saves the variables to a safetensors file, atomically.
pub fn save_vars(vars: &[NamedVar], path: &Path) -> Result<()> {
    gen_optim::save_safetensors_atomic(&tensors(vars)?, path)
}

/// Loads every variable from a safetensors file written by [`save_vars`]: a missing tensor, a
/// shape mismatch or an extra tensor is an error naming the file and the key.
pub fn load_vars(vars: &[NamedVar], path: &Path) -> Result<()> {
    let file = path.display().to_string();
    let map = candle_core::safetensors::load(path, &Device::Cpu).ctx(format!("reading {file}"))?;
    check_finite(&file, &map)?;
    for v in vars {
        let t = map
            .get(&v.name)
            .ok_or_else(|| Error::MissingTensor { file: file.clone(), key: v.name.clone() })?;
        if t.dims() != v.var.dims() {
            return Err(Error::Shape {
                file: file.clone(),
                key: v.name.clone(),
                expected: v.var.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        v.var
            .set(&t.to_dtype(v.var.dtype())?.to_device(v.var.device())?)
            .ctx(format!("{file}: setting `{}`", v.name))?;
    }
    if let Some(extra) = map.keys().find(|k| !vars.iter().any(|v| &v.name == *k)) {
        return Err(Error::msg(format!(
            "{file}: tensor `{extra}` belongs to no parameter of this model"
        )));
    }
    Ok(())
}

/// Refuses tensors with a NaN or infinite element (in name order, so the error is the same
/// every time); `what` names them in the error (a file, or a training step).
pub fn check_finite(what: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for k in names {
        if let Some((i, x)) = gen_core::finite::first_nonfinite(&tensors[k])? {
            return Err(Error::msg(format!(
                "{what}: tensor `{k}`: element {i} is {x} (must be finite)"
            )));
        }
    }
    Ok(())
}

/// Refuses a safetensors file (a checkpoint's optimizer state or weight average) holding a
/// NaN or infinite value; the error names the file and the tensor.
pub fn check_file_finite(path: &Path) -> Result<()> {
    let file = path.display().to_string();
    let map = candle_core::safetensors::load(path, &Device::Cpu).ctx(format!("reading {file}"))?;
    check_finite(&file, &map)
}

/// Bitwise equality of two sets of variables (same names, shapes and f32 bits).
pub fn bitwise_equal(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> Result<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for (k, ta) in a {
        let Some(tb) = b.get(k) else { return Ok(false) };
        if ta.dims() != tb.dims() {
            return Ok(false);
        }
        let va: Vec<u32> = ta
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let vb: Vec<u32> = tb
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect();
        if va != vb {
            return Ok(false);
        }
    }
    Ok(true)
}
