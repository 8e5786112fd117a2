//! Layers built on the ops of this crate, constructed from a `VarBuilder` so that their tensor
//! names match diffusers' checkpoint keys (`vb.pp("to_q")` → `….to_q.weight`).

use std::sync::{Arc, RwLock};

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Something added to a [`Linear`] layer's output: a LoRA adapter, for instance.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// `x`: `(..., in)` → the delta `(..., out)` added to the base output.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

#[derive(Debug, Default)]
struct LinearState {
    weight: Option<Tensor>,
    adapters: Vec<Arc<dyn LinearAdapter>>,
}

/// A LoRA-ready linear layer: `y = x Wᵀ + b + Σ adapter(x)`.
///
/// Clones are handles to the same layer: adapters attached, or a weight replaced (LoRA merge),
/// through one handle are seen by the model that holds another. Adapters can thus be attached
/// and removed without rebuilding the model.
#[derive(Debug, Clone)]
pub struct Linear {
    name: Arc<str>,
    bias: Option<Tensor>,
    state: Arc<RwLock<LinearState>>,
}

impl Linear {
    /// Loads `weight` `(out, in)` and, when `bias`, `bias` `(out)` under `vb`'s prefix.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let b = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self::from_weights(vb.prefix(), weight, b))
    }

    /// A layer from tensors. `weight`: `(out, in)`, `bias`: `(out)`.
    pub fn from_weights(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        let name: String = name.into();
        Self {
            name: name.into(),
            bias,
            state: Arc::new(RwLock::new(LinearState {
                weight: Some(weight),
                adapters: Vec::new(),
            })),
        }
    }

    /// The module path, as diffusers names it (`down_blocks.0.attentions.0.….to_q`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current weight `(out, in)`.
    pub fn weight(&self) -> Tensor {
        self.state.read().expect("linear lock").weight.clone().expect("weight present")
    }

    /// The bias `(out)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input features (the weight's second dimension).
    pub fn in_dim(&self) -> usize {
        self.weight().dims()[1]
    }

    /// Output features (the weight's first dimension).
    pub fn out_dim(&self) -> usize {
        self.weight().dims()[0]
    }

    /// Replaces the weight (e.g. with a merged LoRA weight); the shape must not change.
    pub fn set_weight(&self, w: Tensor) -> Result<()> {
        let mut st = self.state.write().expect("linear lock");
        let old = st.weight.as_ref().expect("weight present");
        if old.dims() != w.dims() {
            candle_core::bail!("{}: new weight shape {:?} != {:?}", self.name, w.dims(), old.dims())
        }
        st.weight = Some(w);
        Ok(())
    }

    /// Attaches an adapter; its output `(..., out)` is added to the layer's.
    pub fn add_adapter(&self, adapter: Arc<dyn LinearAdapter>) {
        self.state.write().expect("linear lock").adapters.push(adapter);
    }

    /// Removes all adapters.
    pub fn clear_adapters(&self) {
        self.state.write().expect("linear lock").adapters.clear();
    }

    /// The attached adapters, in the order they were added.
    pub fn adapters(&self) -> Vec<Arc<dyn LinearAdapter>> {
        self.state.read().expect("linear lock").adapters.clone()
    }
}

impl Module for Linear {
    /// `x`: `(..., in)` → `(..., out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, adapters) = {
            let st = self.state.read().expect("linear lock");
            (st.weight.clone().expect("weight present"), st.adapters.clone())
        };
        // candle 0.11.1 computes a batched matmul of a non-contiguous 3-D input against the
        // broadcast weight wrongly (huggingface/candle#3744); `contiguous` is free otherwise.
        let x = &x.contiguous()?;
        let mut y = candle_nn::Linear::new(w, self.bias.clone()).forward(x)?;
        for a in adapters.iter() {
            y = (y + a.forward(x)?)?;
        }
        Ok(y)
    }
}

/// Layer norm over the last dimension with learned `weight` and `bias` (diffusers `nn.LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `(dim)`; `None` means 1.
    pub weight: Option<Tensor>,
    /// `(dim)`; `None` means 0.
    pub bias: Option<Tensor>,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias`, both `(dim)`, under `vb`'s prefix.
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: Some(vb.get(dim, "weight")?), bias: Some(vb.get(dim, "bias")?), eps })
    }
}

impl Module for LayerNorm {
    /// `x`: `(..., dim)` → same shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

/// Group norm with learned affine parameters (diffusers `nn.GroupNorm`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub num_groups: usize,
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias`, both `(channels)`, under `vb`'s prefix; `num_groups` must
    /// divide `channels`.
    pub fn new(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if channels % num_groups != 0 {
            candle_core::bail!(
                "{}: {num_groups} groups do not divide {channels} channels",
                vb.prefix()
            )
        }
        Ok(Self {
            num_groups,
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            eps,
        })
    }
}

impl Module for GroupNorm {
    /// `x`: `(B, C, ...)` → same shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::group_norm(x, self.num_groups, Some(&self.weight), Some(&self.bias), self.eps)
    }
}
