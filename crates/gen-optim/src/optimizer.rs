//! The optimizer engine shared by every update rule: parameter groups, global gradient-norm
//! clipping, a NaN/Inf guard, per-parameter state and its save/load for checkpoint-resume.
//!
//! An update rule ([`UpdateRule`]) only says how one parameter changes given its gradient and
//! its state; [`Optim`] does the rest and implements the [`Optimizer`] trait every trainer uses.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use gen_optim::{AdamW, AdamWConfig, NamedVar, Optim, Optimizer, ParamGroup, StepOptions};
//!
//! let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu)?)?;
//! let group = ParamGroup::new(vec![NamedVar::new("w", w.clone())], AdamWConfig { lr: 0.1, ..Default::default() });
//! let mut opt = Optim::new(AdamW, vec![group])?.with_options(StepOptions { max_grad_norm: Some(1.0), ..Default::default() });
//! let loss = w.as_tensor().sqr()?.sum_all()?;
//! let report = opt.step(&loss.backward()?)?;
//! assert!(report.clipped && !report.skipped);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::{Error, Result, ResultExt};

/// A trainable tensor with the name under which its optimizer state is saved.
#[derive(Clone, Debug)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
}

impl NamedVar {
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        Self { name: name.into(), var }
    }
}

/// Parameters that share one set of hyper-parameters.
#[derive(Clone, Debug)]
pub struct ParamGroup<C> {
    pub params: Vec<NamedVar>,
    pub config: C,
}

impl<C> ParamGroup<C> {
    pub fn new(params: Vec<NamedVar>, config: C) -> Self {
        Self { params, config }
    }
}

/// The hyper-parameters of one group. Every rule's config has a learning rate.
pub trait GroupConfig: Clone + std::fmt::Debug {
    fn lr(&self) -> f64;
    fn set_lr(&mut self, lr: f64);
    /// Checks the values; the error names the field and value.
    fn validate(&self) -> Result<()>;
}

/// Options of the step common to every rule.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOptions {
    /// Global gradient-norm clipping (PyTorch `clip_grad_norm_`: gradients are scaled by
    /// `max_norm / (norm + 1e-6)` when that is below 1). `None`: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Skip the whole step (parameters and state untouched) when the global gradient norm is
    /// NaN or infinite. When false the step proceeds and the report still flags it.
    pub skip_nonfinite: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self { max_grad_norm: None, skip_nonfinite: true }
    }
}

/// What one call of [`Optimizer::step`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of all gradients before clipping (NaN/Inf when a gradient is not finite).
    pub grad_norm: f64,
    /// True when clipping scaled the gradients.
    pub clipped: bool,
    /// True when the step was skipped because the gradient norm was not finite.
    pub skipped: bool,
    /// True when the gradient norm was NaN or infinite.
    pub nonfinite: bool,
    /// Number of parameters updated (those that had a gradient).
    pub updated: usize,
    /// Number of parameters without a gradient (left untouched).
    pub without_grad: usize,
}

/// The interface trainers use, whatever the rule.
pub trait Optimizer {
    /// One update of every parameter that has a gradient in `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<StepReport>;
    /// Sets the learning rate of every group.
    fn set_lr(&mut self, lr: f64);
    /// Sets the learning rate of group `group`.
    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()>;
    /// Learning rate of each group.
    fn lrs(&self) -> Vec<f64>;
    /// Number of steps taken (skipped steps do not count).
    fn step_count(&self) -> u64;
    /// Writes the optimizer state (step counts and moments) to a safetensors file, atomically.
    fn save_state(&self, path: &Path) -> Result<()>;
    /// Reads state written by [`Optimizer::save_state`] for the same parameters.
    fn load_state(&mut self, path: &Path) -> Result<()>;
    /// Bytes of optimizer state held for each group.
    fn state_bytes(&self) -> Vec<usize>;
    /// Bytes of state shared by all groups (e.g. the DCT bases of low-rank projectors).
    fn shared_state_bytes(&self) -> usize {
        0
    }
}

/// Optimizer state of one parameter: its own step count and named tensors ("exp_avg", ...).
#[derive(Clone, Debug, Default)]
pub struct ParamState {
    /// Updates applied to this parameter so far.
    pub step: u64,
    pub slots: BTreeMap<String, Tensor>,
}

impl ParamState {
    /// The slot `name`, created as zeros like `like` on first use.
    pub fn slot_or_zeros(&mut self, name: &str, like: &Tensor) -> Result<Tensor> {
        if let Some(t) = self.slots.get(name) {
            return Ok(t.clone());
        }
        let t = like.zeros_like()?;
        self.slots.insert(name.to_string(), t.clone());
        Ok(t)
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.slots.get(name)
    }
    pub fn set(&mut self, name: &str, t: Tensor) {
        self.slots.insert(name.to_string(), t);
    }
    pub fn bytes(&self) -> usize {
        self.slots.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }
}

/// Where a parameter sits, for rules that need it (seeded projections, error messages).
#[derive(Clone, Copy, Debug)]
pub struct ParamCtx<'a> {
    pub name: &'a str,
    pub group: usize,
    /// Index over all parameters of the optimizer, in group order.
    pub index: usize,
}

/// How one parameter changes. `param` and `grad` come in the compute dtype (f32 for half
/// precision parameters, the parameter's own dtype otherwise); state slots should use it too.
pub trait UpdateRule {
    type Config: GroupConfig;
    /// Short name used in error messages ("adamw", "sgd", ...).
    fn name(&self) -> &'static str;
    /// Returns the new value of the parameter. It must be a freshly computed tensor (not
    /// `param` itself). `state.step` has already been incremented for this update.
    fn update(
        &mut self,
        ctx: ParamCtx<'_>,
        cfg: &Self::Config,
        state: &mut ParamState,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor>;
    /// Checks state read from a file against its parameter; the error names the slot and
    /// both shapes. By default every slot has the parameter's shape (true of element-wise
    /// rules); rules with other state shapes override it.
    fn check_state(
        &self,
        param: &Var,
        state: &ParamState,
    ) -> std::result::Result<(), (String, Vec<usize>)> {
        for (k, t) in &state.slots {
            if t.dims() != param.dims() {
                return Err((k.clone(), t.dims().to_vec()));
            }
        }
        Ok(())
    }
    /// Extra bytes the rule holds outside per-parameter state (shared bases, caches).
    fn shared_bytes(&self) -> usize {
        0
    }
}

/// The optimizer: an update rule applied to parameter groups. See the module docs.
pub struct Optim<R: UpdateRule> {
    rule: R,
    groups: Vec<ParamGroup<R::Config>>,
    states: Vec<Vec<ParamState>>,
    options: StepOptions,
    steps: u64,
}

/// Key under which the optimizer's global step count is saved.
const GLOBAL_STEP_KEY: &str = "__optimizer_step__";

fn compute_dtype(dt: DType) -> DType {
    match dt {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

impl<R: UpdateRule> Optim<R> {
    /// Checks every group's config and that parameter names are unique.
    pub fn new(rule: R, groups: Vec<ParamGroup<R::Config>>) -> Result<Self> {
        let mut seen = HashSet::new();
        for (gi, g) in groups.iter().enumerate() {
            g.config
                .validate()
                .map_err(|e| Error::msg(format!("{} group {gi}: {e}", rule.name())))?;
            for p in &g.params {
                if p.name.is_empty() || p.name.contains("__optimizer") {
                    return Err(Error::invalid(
                        "parameter name",
                        format!("`{}` (group {gi}) is empty or reserved", p.name),
                    ));
                }
                if !seen.insert(p.name.clone()) {
                    return Err(Error::invalid(
                        "parameter name",
                        format!("`{}` appears twice", p.name),
                    ));
                }
                if !p.var.dtype().is_float() {
                    return Err(Error::invalid(
                        "parameter dtype",
                        format!("`{}` has dtype {:?}", p.name, p.var.dtype()),
                    ));
                }
            }
        }
        let states = groups.iter().map(|g| vec![ParamState::default(); g.params.len()]).collect();
        Ok(Self { rule, groups, states, options: StepOptions::default(), steps: 0 })
    }

    pub fn with_options(mut self, options: StepOptions) -> Self {
        self.options = options;
        self
    }

    pub fn options(&self) -> &StepOptions {
        &self.options
    }

    pub fn rule(&self) -> &R {
        &self.rule
    }

    pub fn groups(&self) -> &[ParamGroup<R::Config>] {
        &self.groups
    }

    /// Mutable access to a group's config (e.g. to change weight decay). Checked at the next step.
    pub fn config_mut(&mut self, group: usize) -> Result<&mut R::Config> {
        let n = self.groups.len();
        self.groups
            .get_mut(group)
            .map(|g| &mut g.config)
            .ok_or_else(|| Error::invalid("group", format!("{group} (optimizer has {n})")))
    }

    /// The state of parameter `name`, if it has one.
    pub fn param_state(&self, name: &str) -> Option<&ParamState> {
        for (g, s) in self.groups.iter().zip(&self.states) {
            for (p, st) in g.params.iter().zip(s) {
                if p.name == name {
                    return Some(st);
                }
            }
        }
        None
    }
}

/// Global L2 norm of `grads` as f64 (accumulated in f64, f32 on Metal). One device sync.
pub fn global_grad_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let acc = if grads[0].device().is_metal() { DType::F32 } else { DType::F64 };
    let mut parts = Vec::with_capacity(grads.len());
    for g in grads {
        parts.push(g.to_dtype(acc)?.sqr()?.sum_all()?);
    }
    let total = Tensor::stack(&parts, 0)?.sum_all()?.sqrt()?;
    let v = match acc {
        DType::F64 => total.to_scalar::<f64>()?,
        _ => total.to_scalar::<f32>()? as f64,
    };
    Ok(v)
}

impl<R: UpdateRule> Optimizer for Optim<R> {
    fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        for (gi, g) in self.groups.iter().enumerate() {
            g.config
                .validate()
                .map_err(|e| Error::msg(format!("{} group {gi}: {e}", self.rule.name())))?;
        }
        // Gather the gradients that exist, in the compute dtype.
        let mut present: Vec<(usize, usize, Tensor)> = Vec::new();
        let mut without_grad = 0;
        for (gi, g) in self.groups.iter().enumerate() {
            for (pi, p) in g.params.iter().enumerate() {
                match grads.get(p.var.as_tensor()) {
                    Some(gr) => {
                        if gr.dims() != p.var.dims() {
                            return Err(Error::Shape {
                                file: "gradient store".into(),
                                key: p.name.clone(),
                                expected: p.var.dims().to_vec(),
                                found: gr.dims().to_vec(),
                            });
                        }
                        let gr = gr.detach().to_dtype(compute_dtype(p.var.dtype()))?;
                        present.push((gi, pi, gr));
                    }
                    None => without_grad += 1,
                }
            }
        }
        let all: Vec<Tensor> = present.iter().map(|(_, _, g)| g.clone()).collect();
        let grad_norm = global_grad_norm(&all)?;
        let nonfinite = !grad_norm.is_finite();
        let mut report = StepReport {
            grad_norm,
            clipped: false,
            skipped: false,
            nonfinite,
            updated: 0,
            without_grad,
        };
        if nonfinite && self.options.skip_nonfinite {
            report.skipped = true;
            return Ok(report);
        }
        let mut coef = 1.0;
        if let Some(max_norm) = self.options.max_grad_norm {
            let c = max_norm / (grad_norm + 1e-6);
            if c < 1.0 {
                coef = c;
                report.clipped = true;
            }
        }
        let mut flat_index = vec![0usize; self.groups.len()];
        for gi in 1..self.groups.len() {
            flat_index[gi] = flat_index[gi - 1] + self.groups[gi - 1].params.len();
        }
        for (gi, pi, grad) in present {
            let grad = if report.clipped { grad.affine(coef, 0.0)? } else { grad };
            let group = &self.groups[gi];
            let p = &group.params[pi];
            let state = &mut self.states[gi][pi];
            let param = p.var.as_tensor().detach().to_dtype(compute_dtype(p.var.dtype()))?;
            state.step += 1;
            let ctx = ParamCtx { name: &p.name, group: gi, index: flat_index[gi] + pi };
            let new = self.rule.update(ctx, &group.config, state, &param, &grad).map_err(|e| {
                Error::msg(format!(
                    "{} group {gi}: parameter `{}` {:?}: {e}",
                    self.rule.name(),
                    p.name,
                    p.var.dims()
                ))
            })?;
            let new = new.to_dtype(p.var.dtype())?;
            p.var.set(&new).ctx(format!("{}: updating `{}`", self.rule.name(), p.name))?;
            report.updated += 1;
        }
        self.steps += 1;
        Ok(report)
    }

    fn set_lr(&mut self, lr: f64) {
        for g in &mut self.groups {
            g.config.set_lr(lr);
        }
    }

    fn set_group_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.config_mut(group)?.set_lr(lr);
        Ok(())
    }

    fn lrs(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.config.lr()).collect()
    }

    fn step_count(&self) -> u64 {
        self.steps
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        map.insert(GLOBAL_STEP_KEY.to_string(), Tensor::new(self.steps as i64, &Device::Cpu)?);
        for (g, s) in self.groups.iter().zip(&self.states) {
            for (p, st) in g.params.iter().zip(s) {
                map.insert(
                    format!("{}.__step__", p.name),
                    Tensor::new(st.step as i64, &Device::Cpu)?,
                );
                for (k, t) in &st.slots {
                    map.insert(format!("{}.{k}", p.name), t.to_device(&Device::Cpu)?);
                }
            }
        }
        save_safetensors_atomic(&map, path)
    }

    fn load_state(&mut self, path: &Path) -> Result<()> {
        let file = path.display().to_string();
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .ctx(format!("reading optimizer state {file}"))?;
        let scalar = |key: &str| -> Result<u64> {
            let t = map
                .get(key)
                .ok_or_else(|| Error::MissingTensor { file: file.clone(), key: key.to_string() })?;
            let v = t
                .to_dtype(DType::I64)
                .and_then(|t| t.to_scalar::<i64>())
                .ctx(format!("{file}: `{key}` is not a scalar"))?;
            u64::try_from(v)
                .map_err(|_| Error::invalid("step count", format!("{file}: `{key}` = {v}")))
        };
        let steps = scalar(GLOBAL_STEP_KEY)?;
        let mut known: HashSet<String> = HashSet::new();
        known.insert(GLOBAL_STEP_KEY.to_string());
        let mut new_states = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let mut gs = Vec::with_capacity(g.params.len());
            for p in &g.params {
                let step_key = format!("{}.__step__", p.name);
                let step = scalar(&step_key)?;
                known.insert(step_key);
                let prefix = format!("{}.", p.name);
                let mut slots = BTreeMap::new();
                for (k, t) in &map {
                    if let Some(slot) = k.strip_prefix(&prefix) {
                        if slot == "__step__" || slot.contains('.') {
                            continue;
                        }
                        known.insert(k.clone());
                        slots.insert(slot.to_string(), t.to_device(p.var.device())?);
                    }
                }
                let st = ParamState { step, slots };
                if let Err((slot, found)) = self.rule.check_state(&p.var, &st) {
                    return Err(Error::Shape {
                        file: file.clone(),
                        key: format!("{}.{slot}", p.name),
                        expected: p.var.dims().to_vec(),
                        found,
                    });
                }
                gs.push(st);
            }
            new_states.push(gs);
        }
        if let Some(extra) = map.keys().find(|k| !known.contains(*k)) {
            return Err(Error::msg(format!(
                "{file}: tensor `{extra}` belongs to no parameter of this optimizer"
            )));
        }
        self.states = new_states;
        self.steps = steps;
        Ok(())
    }

    fn state_bytes(&self) -> Vec<usize> {
        self.states.iter().map(|s| s.iter().map(ParamState::bytes).sum()).collect()
    }

    fn shared_state_bytes(&self) -> usize {
        self.rule.shared_bytes()
    }
}

impl<R: UpdateRule> Optim<R> {
    /// State bytes over all groups plus what the rule shares between parameters.
    pub fn total_state_bytes(&self) -> usize {
        self.state_bytes().iter().sum::<usize>() + self.shared_state_bytes()
    }
}

/// PyTorch `clip_grad_norm_` over the gradients of `vars` in `grads` (vars without a gradient
/// are ignored): scales them in place by `max_norm / (norm + 1e-6)` when that is below 1 and
/// returns the norm before clipping. For trainers that clip outside an optimizer; [`Optim`]
/// does the same through [`StepOptions::max_grad_norm`].
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    let present: Vec<(&Var, Tensor)> =
        vars.iter().filter_map(|v| grads.get(v.as_tensor()).map(|g| (*v, g.clone()))).collect();
    let all: Vec<Tensor> = present.iter().map(|(_, g)| g.clone()).collect();
    let norm = global_grad_norm(&all)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (v, g) in present {
            grads.insert(v.as_tensor(), g.affine(coef, 0.0)?);
        }
    }
    Ok(norm)
}

/// Saves `tensors` as safetensors at `path` through a temporary sibling file and a rename.
pub fn save_safetensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| {
            Error::invalid("output path", format!("{} has no file name", path.display()))
        })?
        .to_string_lossy()
        .to_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    if let Err(e) = candle_core::safetensors::save(tensors, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Candle { context: format!("writing {}", path.display()), source: e });
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
