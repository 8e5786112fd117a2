//! LoRA adapters for [`gen_ops::nn::Linear`] layers: `W' = W + (alpha / r) · B A`.
//!
//! - A `(r, in)` is initialised Gaussian (`N(0, 1/r²)`, PEFT's `init_lora_weights="gaussian"`) or
//!   Kaiming-uniform (`U(-1/√in, 1/√in)`, PEFT's default, i.e. `kaiming_uniform_(a=√5)`);
//!   B `(out, r)` starts at zero, so a fresh adapter leaves the model unchanged.
//! - [`attach_lora`] picks the target layers of a model by name ([`LoraConfig::target_modules`]),
//!   creates one [`LoraAdapter`] per layer and attaches it; the returned [`LoraSet`] holds the
//!   adapters and their `Var`s (the only parameters to hand to the optimizer — the base weights are
//!   plain tensors and get no gradient).
//! - [`LoraSet::merge`] folds the adapters into the base weights (for fast inference) and
//!   [`LoraSet::unmerge`] restores exactly the original weights; [`LoraSet::detach`] removes the
//!   adapters.
//!
//! The model-facing glue is generic over `Linear` handles, which every model exposes through
//! `linears()` (the UNet, the CLIP encoders, the VAE); this crate does not depend on the models.
//! LoRA files (kohya and diffusers/PEFT formats) are in [`mod@file`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use gen_core::{Error, Result, ResultExt, SeededRng};
use gen_ops::nn::{Linear, LinearAdapter};

use crate::optimizer::NamedVar;

#[path = "lora_file.rs"]
pub mod file;
pub use file::{
    apply_lora, apply_lora_file, apply_lora_file_to_parts, kohya_prefix, parse_lora_arg,
    read_lora_file, save_lora, AppliedLora, ApplyMode, ApplyOptions, LoraFile, LoraFormat,
    LoraModule, LoraSaveOptions, PeftAlpha, UnknownKeys,
};

/// How the down projection A is initialised (B always starts at zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// `A ~ N(0, (1/r)²)` (PEFT `init_lora_weights="gaussian"`).
    Gaussian,
    /// `A ~ U(-1/√in, 1/√in)`: PyTorch's `kaiming_uniform_(a=√5)`, PEFT's default.
    #[default]
    Kaiming,
}

/// Settings of a LoRA attachment.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (≥ 1).
    pub rank: usize,
    /// Scale numerator: the update is `(alpha / r) · B A`. Finite and > 0.
    pub alpha: f64,
    /// Dropout probability on the adapter's input, in `[0, 1)`; applied only in training mode.
    pub dropout: f64,
    /// Initialisation of A.
    pub init: LoraInit,
    /// Which layers get an adapter. A pattern without `*`/`?` matches a layer whose name equals it
    /// or ends with `.` + pattern (`"to_q"`, `"to_out.0"`, `"attn2.to_k"`); a pattern with `*`
    /// (any run of characters, dots included) or `?` (one character) must match the whole name
    /// (`"down_blocks.*.attn1.to_q"`).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// Rank 4, alpha 4, no dropout, Kaiming init, on the attention projections
    /// `to_q, to_k, to_v, to_out.0` (AlignProp's setting).
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            dropout: 0.0,
            init: LoraInit::Kaiming,
            target_modules: ["to_q", "to_k", "to_v", "to_out.0"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

impl LoraConfig {
    /// Checks rank, alpha, dropout and the patterns; the error names the field and value.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid("LoRA rank", "0 (must be at least 1)"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::invalid(
                "LoRA alpha",
                format!("{} (must be finite and > 0)", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(
                "LoRA dropout",
                format!("{} (must be in [0, 1))", self.dropout),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(Error::invalid("LoRA target_modules", "empty list"));
        }
        if let Some(p) = self.target_modules.iter().find(|p| p.trim().is_empty()) {
            return Err(Error::invalid("LoRA target_modules", format!("empty pattern {p:?}")));
        }
        Ok(())
    }

    /// Whether the layer called `name` is a target.
    pub fn is_target(&self, name: &str) -> bool {
        self.target_modules.iter().any(|p| pattern_matches(p, name))
    }
}

/// Rank from a signed value (a CLI flag or a config file), rejecting 0 and negatives.
pub fn rank_from_i64(rank: i64) -> Result<usize> {
    if rank <= 0 {
        return Err(Error::invalid("LoRA rank", format!("{rank} (must be at least 1)")));
    }
    Ok(rank as usize)
}

/// See [`LoraConfig::target_modules`].
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    if pattern.contains('*') || pattern.contains('?') {
        glob_match(pattern.as_bytes(), name.as_bytes())
    } else {
        name == pattern
            || (name.len() > pattern.len()
                && name.ends_with(pattern)
                && name.as_bytes()[name.len() - pattern.len() - 1] == b'.')
    }
}

/// Whole-string glob: `*` any run (dots included), `?` one character.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// State shared by the adapters of one [`LoraSet`]: training mode and the dropout generator.
#[derive(Debug)]
struct Shared {
    training: AtomicBool,
    rng: Mutex<SeededRng>,
}

/// One LoRA adapter: `delta(x) = multiplier · (alpha / r) · dropout(x) Aᵀ Bᵀ`.
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    a: Var,
    b: Var,
    alpha: f64,
    dropout: f64,
    /// f64 bits of the user multiplier (the `:SCALE` of `--lora FILE:SCALE`).
    multiplier: AtomicU64,
    shared: Arc<Shared>,
}

impl LoraAdapter {
    /// The layer name this adapter belongs to.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// A `(r, in)` (`lora_down` / `lora_A`).
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// B `(out, r)` (`lora_up` / `lora_B`).
    pub fn b(&self) -> &Var {
        &self.b
    }
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    pub fn dropout(&self) -> f64 {
        self.dropout
    }
    /// The user multiplier (1 unless set).
    pub fn multiplier(&self) -> f64 {
        f64::from_bits(self.multiplier.load(Ordering::Relaxed))
    }
    pub fn set_multiplier(&self, m: f64) {
        self.multiplier.store(m.to_bits(), Ordering::Relaxed)
    }
    /// The total factor on `B A`: `multiplier · alpha / r`.
    pub fn scale(&self) -> f64 {
        self.multiplier() * self.alpha / self.rank() as f64
    }

    /// `scale · B A` `(out, in)` in `dtype`, computed in f32 (f64 when `dtype` is f64).
    pub fn delta_weight(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let work = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let a = self.a.as_tensor().detach().to_dtype(work)?;
        let b = self.b.as_tensor().detach().to_dtype(work)?;
        (b.matmul(&a)? * self.scale())?.to_dtype(dtype)
    }
}

impl LinearAdapter for LoraAdapter {
    /// `x`: `(..., in)` → `(..., out)`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let a = self.a.as_tensor().to_dtype(dt)?;
        let b = self.b.as_tensor().to_dtype(dt)?;
        let x = if self.dropout > 0.0 && self.shared.training.load(Ordering::Relaxed) {
            let keep = 1.0 - self.dropout;
            let u = {
                let mut rng = self.shared.rng.lock().expect("lora rng lock");
                rng.rand_uniform(x.shape(), 0.0, 1.0, DType::F32, x.device()).map_err(|e| {
                    candle_core::Error::Msg(format!("{}: dropout mask: {e}", self.name))
                })?
            };
            let mask = (u.lt(keep as f32)?.to_dtype(dt)? / keep)?;
            (x * mask)?
        } else {
            x.clone()
        };
        let h = x.broadcast_matmul(&a.t()?)?;
        let y = h.broadcast_matmul(&b.t()?)?;
        y * self.scale()
    }
}

/// One adapted layer of a [`LoraSet`].
#[derive(Debug)]
pub struct LoraEntry {
    /// The layer (a handle shared with the model).
    pub linear: Linear,
    pub adapter: Arc<LoraAdapter>,
    /// The weight before [`LoraSet::merge`], kept to restore it exactly.
    original: Mutex<Option<Tensor>>,
}

impl LoraEntry {
    /// Whether the adapter is currently attached to the layer.
    pub fn is_attached(&self) -> bool {
        let me: Arc<dyn LinearAdapter> = self.adapter.clone();
        self.linear.adapters().iter().any(|a| Arc::ptr_eq(a, &me))
    }
    /// Whether the adapter is merged into the weight.
    pub fn is_merged(&self) -> bool {
        self.original.lock().expect("lora lock").is_some()
    }
}

/// The adapters attached to one model component (`unet`, `text_encoder`, …).
#[derive(Debug)]
pub struct LoraSet {
    prefix: String,
    entries: Vec<LoraEntry>,
    shared: Arc<Shared>,
}

/// Component prefixes known to the file formats (see [`mod@file`]).
pub const KNOWN_PREFIXES: [&str; 3] = ["unet", "text_encoder", "text_encoder_2"];

fn check_prefix(prefix: &str) -> Result<()> {
    if !KNOWN_PREFIXES.contains(&prefix) {
        return Err(Error::invalid(
            "LoRA component prefix",
            format!("{prefix:?} (expected one of {KNOWN_PREFIXES:?})"),
        ));
    }
    Ok(())
}

/// Creates adapters for the layers among `linears` that `cfg` targets and attaches them.
///
/// `prefix` names the component (`"unet"`, `"text_encoder"`, `"text_encoder_2"`): it is the key
/// prefix in files and in the optimizer names of the Vars. A and B are f32 `Var`s on the device of
/// each base weight (f64 for f64 weights); A is drawn from `rng` in layer order (same seed → same adapters), B is zero.
/// Dropout masks are drawn from a generator forked from `rng`. Errors when no layer matches.
pub fn attach_lora(
    linears: &[Linear],
    prefix: &str,
    cfg: &LoraConfig,
    rng: &mut SeededRng,
) -> Result<LoraSet> {
    cfg.validate()?;
    check_prefix(prefix)?;
    let dropout_seed = rng.below(usize::MAX) as u64;
    let shared = Arc::new(Shared {
        training: AtomicBool::new(false),
        rng: Mutex::new(SeededRng::new(dropout_seed)),
    });
    let mut entries = Vec::new();
    for lin in linears.iter().filter(|l| cfg.is_target(l.name())) {
        let w = lin.weight();
        let (out_dim, in_dim) = w.dims2().ctx(format!("LoRA target {}", lin.name()))?;
        let dev = w.device().clone();
        let r = cfg.rank;
        let vdt = work_dtype(w.dtype());
        let a = match cfg.init {
            LoraInit::Gaussian => (rng.randn((r, in_dim), DType::F32, &dev)? * (1.0 / r as f64))?,
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_dim as f32).sqrt();
                rng.rand_uniform((r, in_dim), -bound, bound, DType::F32, &dev)?
            }
        }
        .to_dtype(vdt)?;
        let b = Tensor::zeros((out_dim, r), vdt, &dev)?;
        let adapter = new_adapter(lin.name(), a, b, cfg.alpha, cfg.dropout, &shared)?;
        lin.add_adapter(adapter.clone());
        entries.push(LoraEntry { linear: lin.clone(), adapter, original: Mutex::new(None) });
    }
    if entries.is_empty() {
        let sample: Vec<&str> = linears.iter().take(6).map(|l| l.name()).collect();
        return Err(Error::invalid(
            "LoRA target_modules",
            format!(
                "{:?} match none of the {} {prefix} layers (e.g. {sample:?})",
                cfg.target_modules,
                linears.len()
            ),
        ));
    }
    Ok(LoraSet { prefix: prefix.to_string(), entries, shared })
}

fn new_adapter(
    name: &str,
    a: Tensor,
    b: Tensor,
    alpha: f64,
    dropout: f64,
    shared: &Arc<Shared>,
) -> Result<Arc<LoraAdapter>> {
    Ok(Arc::new(LoraAdapter {
        name: name.to_string(),
        a: Var::from_tensor(&a)?,
        b: Var::from_tensor(&b)?,
        alpha,
        dropout,
        multiplier: AtomicU64::new(1f64.to_bits()),
        shared: shared.clone(),
    }))
}

/// One adapter's tensors, as read from a file or built by hand.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    /// A `(r, in)`.
    pub down: Tensor,
    /// B `(out, r)`.
    pub up: Tensor,
    /// `alpha` (the scale is `alpha / r`).
    pub alpha: f64,
}

impl LoraSet {
    /// A set from given weights, attached to `linears` (the caller has matched and shape-checked
    /// them; see [`file::apply_lora`]). The Vars are f32 (f64 for f64 layers) copies on each layer's device.
    pub fn from_weights(
        prefix: &str,
        pairs: Vec<(Linear, LoraWeights)>,
        multiplier: f64,
    ) -> Result<Self> {
        check_prefix(prefix)?;
        let shared = Arc::new(Shared {
            training: AtomicBool::new(false),
            rng: Mutex::new(SeededRng::new(0)),
        });
        let mut entries = Vec::with_capacity(pairs.len());
        for (lin, w) in pairs {
            let base = lin.weight();
            let (dev, vdt) = (base.device().clone(), work_dtype(base.dtype()));
            let a = w.down.to_dtype(vdt)?.to_device(&dev)?;
            let b = w.up.to_dtype(vdt)?.to_device(&dev)?;
            let adapter = new_adapter(lin.name(), a, b, w.alpha, 0.0, &shared)?;
            adapter.set_multiplier(multiplier);
            lin.add_adapter(adapter.clone());
            entries.push(LoraEntry { linear: lin, adapter, original: Mutex::new(None) });
        }
        Ok(Self { prefix: prefix.to_string(), entries, shared })
    }

    /// The component prefix (`unet`, `text_encoder`, …).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn entries(&self) -> &[LoraEntry] {
        &self.entries
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// The adapted layer names, in order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.linear.name().to_string()).collect()
    }

    /// The trainable Vars, named `<prefix>.<layer>.lora_A` / `.lora_B` (for [`crate::Optim`]).
    pub fn vars(&self) -> Vec<NamedVar> {
        self.entries
            .iter()
            .flat_map(|e| {
                let n = format!("{}.{}", self.prefix, e.linear.name());
                [
                    NamedVar::new(format!("{n}.lora_A"), e.adapter.a.clone()),
                    NamedVar::new(format!("{n}.lora_B"), e.adapter.b.clone()),
                ]
            })
            .collect()
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.entries.iter().map(|e| e.adapter.a.elem_count() + e.adapter.b.elem_count()).sum()
    }

    /// Training mode turns dropout on (it is off by default and during inference).
    pub fn set_training(&self, on: bool) {
        self.shared.training.store(on, Ordering::Relaxed)
    }
    pub fn is_training(&self) -> bool {
        self.shared.training.load(Ordering::Relaxed)
    }

    /// Reseeds the dropout generator.
    pub fn reseed_dropout(&self, seed: u64) {
        *self.shared.rng.lock().expect("lora rng lock") = SeededRng::new(seed);
    }

    /// Sets the user multiplier of every adapter (effective factor `multiplier · alpha / r`).
    pub fn set_multiplier(&self, m: f64) {
        self.entries.iter().for_each(|e| e.adapter.set_multiplier(m))
    }

    /// Folds the adapters into the base weights: `W ← W + scale · (alpha/r) · B A` (computed in
    /// f32, or f64 for f64 weights, then cast to the weight's dtype) and detaches them, so the
    /// model runs at base speed. `scale` replaces the adapters' multipliers. Keeps the original
    /// weights for [`LoraSet::unmerge`]. Errors if already merged. Several sets merged into the
    /// same layers must be unmerged in reverse order (each restores the weight it found).
    pub fn merge(&self, scale: f64) -> Result<()> {
        if let Some(e) = self.entries.iter().find(|e| e.is_merged()) {
            return Err(Error::msg(format!(
                "LoRA {}: {} is already merged",
                self.prefix,
                e.linear.name()
            )));
        }
        for e in &self.entries {
            e.adapter.set_multiplier(scale);
            let w = e.linear.weight();
            let merged = (w.to_dtype(work_dtype(w.dtype()))?
                + e.adapter.delta_weight(work_dtype(w.dtype()))?)?
            .to_dtype(w.dtype())?;
            e.linear.set_weight(merged).ctx(format!("merging LoRA into {}", e.linear.name()))?;
            *e.original.lock().expect("lora lock") = Some(w);
            self.detach_entry(e);
        }
        Ok(())
    }

    /// Restores the weights saved by [`LoraSet::merge`] (bit-exact) and re-attaches the adapters.
    /// Errors if not merged.
    pub fn unmerge(&self) -> Result<()> {
        if let Some(e) = self.entries.iter().find(|e| !e.is_merged()) {
            return Err(Error::msg(format!(
                "LoRA {}: {} is not merged",
                self.prefix,
                e.linear.name()
            )));
        }
        for e in &self.entries {
            let w = e.original.lock().expect("lora lock").take().expect("checked merged");
            e.linear.set_weight(w).ctx(format!("unmerging LoRA from {}", e.linear.name()))?;
            e.linear.add_adapter(e.adapter.clone());
        }
        Ok(())
    }

    /// Removes this set's adapters from their layers (other adapters stay). Merged weights stay
    /// merged: call [`LoraSet::unmerge`] first to restore the base model.
    pub fn detach(&self) {
        self.entries.iter().for_each(|e| self.detach_entry(e))
    }

    fn detach_entry(&self, e: &LoraEntry) {
        let me: Arc<dyn LinearAdapter> = e.adapter.clone();
        let keep: Vec<_> =
            e.linear.adapters().into_iter().filter(|a| !Arc::ptr_eq(a, &me)).collect();
        e.linear.clear_adapters();
        keep.into_iter().for_each(|a| e.linear.add_adapter(a));
    }

    /// Re-attaches detached adapters (no-op for those attached or merged).
    pub fn reattach(&self) {
        for e in &self.entries {
            if !e.is_attached() && !e.is_merged() {
                e.linear.add_adapter(e.adapter.clone());
            }
        }
    }

    /// The device of the first adapter (CPU when empty).
    pub fn device(&self) -> Device {
        self.entries.first().map(|e| e.adapter.a.device().clone()).unwrap_or(Device::Cpu)
    }
}

fn work_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("to_q", "a.b.attn1.to_q"));
        assert!(pattern_matches("to_q", "to_q"));
        assert!(!pattern_matches("to_q", "a.b.xto_q"));
        assert!(pattern_matches("to_out.0", "a.attn2.to_out.0"));
        assert!(!pattern_matches("to_out.0", "a.attn2.to_out.01"));
        assert!(pattern_matches("down_blocks.*.to_k", "down_blocks.0.attentions.1.to_k"));
        assert!(!pattern_matches("down_blocks.*.to_k", "up_blocks.0.attentions.1.to_k"));
        assert!(pattern_matches("*attn?.to_v", "x.attn2.to_v"));
        assert!(!pattern_matches("*attn?.to_v", "x.attn.to_v"));
    }
}
