//! Optimizer core of the `gen` toolkit: one engine ([`Optim`]) with parameter groups, global
//! gradient-norm clipping, a NaN/Inf guard and checkpointable state, driving update rules
//! ([`AdamW`], [`AdamP`], [`Sgdp`], [`Sgd`], [`SignSgd`], and the low-rank [`GaLore`] and
//! [`Frugal`] over SVD, DCT, random-orthogonal and random-column projectors), plus
//! learning-rate schedules and an exponential moving average of the weights ([`Ema`]).
//!
//! AdamW, SGD, AdamP, SGDP and GaLore match their reference implementations (PyTorch,
//! clovaai/AdamP, galore-torch) on recorded gradients; see `tests/parity.rs` and
//! `scripts/fixtures_optim.py`. FRUGAL and the DCT projector have no packaged reference; they
//! are tested by their defining properties (`tests/lowrank.rs`).
//!
//! [`lora`]: LoRA adapters for `gen_ops::nn::Linear` layers and the kohya / diffusers-PEFT LoRA
//! file formats (parity with diffusers in `tests/tests/lora_parity.rs`, `scripts/fixtures_lora.py`).

pub mod adamp;
pub mod adamw;
pub mod ema;
pub mod lora;
pub mod lowrank;
pub mod optimizer;
pub mod projector;
pub mod schedule;
pub mod sgd;

pub use adamp::{scale_invariant_projection, AdamP, AdamPConfig, Projected, Sgdp, SgdpConfig};
pub use adamw::{AdamForm, AdamW, AdamWConfig};
pub use ema::Ema;
pub use lowrank::{Frugal, FrugalConfig, GaLore, GaLoreConfig, StateFree};
pub use optimizer::{
    clip_grad_norm, global_grad_norm, save_safetensors_atomic, GroupConfig, NamedVar, Optim,
    Optimizer, ParamCtx, ParamGroup, ParamState, StepOptions, StepReport, UpdateRule,
};
pub use projector::{dct2_basis, make_projector, Basis, DctCache, ProjectionKind, Projector, Side};
pub use schedule::{
    apply_schedule, median_filter, Constant, Cosine, LinearDecay, LinearWarmup, LrSchedule, Refined,
};
pub use sgd::{Sgd, SgdConfig, SignSgd, SignSgdConfig};
