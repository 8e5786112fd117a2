//! Gradient checkpointing through a chain of calls `x_{k+1} = f(k, x_k)`, `k = 0..K`.
//!
//! Full backpropagation through K calls (for instance K denoising steps of a UNet) keeps the
//! activations of all K calls alive. [`Chain::forward`] instead runs the calls on detached
//! tensors and keeps only each call's input `x_k`; [`Chain::backward`] then walks the calls in
//! reverse, re-running call `k` from a `Var` copy of `x_k`, backpropagating
//! `(f(k, x_k) ⊙ seed).sum()` and taking `x_k`'s gradient as the next seed. At any time only
//! one call's activations plus the K saved inputs are alive, at the cost of running every call
//! twice.
//!
//! Parameter gradients of all calls are summed into one [`GradStore`], keyed like candle's own
//! (look them up with `grads.get(&var)`), so the result can be handed to an optimiser as if it
//! came from `loss.backward()`.
//!
//! ```no_run
//! # use candle_core::{Result, Tensor, Var};
//! # fn demo(x0: &Tensor, w: &Var, target: &Tensor) -> Result<()> {
//! use gen_ops::checkpoint::Chain;
//! let step = |_k: usize, x: &Tensor| (x.matmul(w.as_tensor())?).tanh();
//! let chain = Chain::forward(x0, 3, step)?;
//! let grads = chain.backward_loss(|y| (y - target)?.sqr()?.sum_all(), step)?;
//! let dw = grads.grads.get(w);
//! # let _ = dw; Ok(()) }
//! ```
//!
//! `f` must be deterministic (same output when re-run on the same input); a step that samples
//! noise must draw it from a generator re-seeded per `k`, or take it from outside.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// The forward pass of a checkpointed chain: the saved inputs and the final output.
#[derive(Debug, Clone)]
pub struct Chain {
    /// `x_0 … x_{K-1}`, detached.
    inputs: Vec<Tensor>,
    /// `x_K`, detached.
    output: Tensor,
}

/// Gradients of a checkpointed chain.
#[derive(Debug)]
pub struct ChainGrads {
    /// Parameter gradients summed over all calls (and the loss, for [`Chain::backward_loss`]).
    pub grads: GradStore,
    /// Gradient with respect to the chain's input `x_0` (zeros if the output does not depend
    /// on it). Feed it as the seed of whatever produced `x_0`.
    pub input_grad: Tensor,
}

/// Adds every gradient of `from` into `into`.
fn accumulate(into: &mut GradStore, from: GradStore) -> Result<()> {
    into.extend(from)
}

impl Chain {
    /// Runs `steps` calls `x_{k+1} = f(k, x_k)` from `x0` without recording a graph; keeps the
    /// inputs. `x0` and every `x_k`: any shape that `f` accepts.
    pub fn forward<F>(x0: &Tensor, steps: usize, mut f: F) -> Result<Self>
    where
        F: FnMut(usize, &Tensor) -> Result<Tensor>,
    {
        let mut inputs = Vec::with_capacity(steps);
        let mut x = x0.detach();
        for k in 0..steps {
            let y = f(k, &x)?.detach();
            inputs.push(x);
            x = y;
        }
        Ok(Self { inputs, output: x })
    }

    /// The final output `x_K` (detached).
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// The saved inputs `x_0 … x_{K-1}` (detached).
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }

    /// Backpropagates `seed = dL/dx_K` (shape of `x_K`) through the chain, re-running each call
    /// with the same `f` as [`Chain::forward`].
    pub fn backward<F>(&self, seed: &Tensor, mut f: F) -> Result<ChainGrads>
    where
        F: FnMut(usize, &Tensor) -> Result<Tensor>,
    {
        if seed.dims() != self.output.dims() {
            candle_core::bail!(
                "checkpoint: seed shape {:?} != output shape {:?}",
                seed.dims(),
                self.output.dims()
            )
        }
        let mut total = GradStore::default();
        let mut seed = seed.detach();
        for k in (0..self.inputs.len()).rev() {
            let x = Var::from_tensor(&self.inputs[k])?;
            let y = f(k, x.as_tensor())?;
            if y.dims() != seed.dims() {
                candle_core::bail!(
                    "checkpoint: call {k} gave shape {:?}, first run gave {:?}",
                    y.dims(),
                    seed.dims()
                )
            }
            let mut grads = (y * &seed)?.sum_all()?.backward()?;
            seed = match grads.remove(x.as_tensor()) {
                Some(g) => g.detach(),
                None => self.inputs[k].zeros_like()?,
            };
            accumulate(&mut total, grads)?;
        }
        Ok(ChainGrads { grads: total, input_grad: seed })
    }

    /// Backpropagates the scalar `loss(x_K)` through the chain: the seed is `dL/dx_K`, and the
    /// loss's own parameter gradients (if it has parameters) are included.
    pub fn backward_loss<L, F>(&self, loss: L, f: F) -> Result<ChainGrads>
    where
        L: FnOnce(&Tensor) -> Result<Tensor>,
        F: FnMut(usize, &Tensor) -> Result<Tensor>,
    {
        let y = Var::from_tensor(&self.output)?;
        let mut grads = loss(y.as_tensor())?.backward()?;
        let seed = match grads.remove(y.as_tensor()) {
            Some(g) => g,
            None => self.output.zeros_like()?,
        };
        let mut out = self.backward(&seed, f)?;
        accumulate(&mut out.grads, grads)?;
        Ok(out)
    }
}
