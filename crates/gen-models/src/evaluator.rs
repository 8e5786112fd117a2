//! The evaluator: a small CNN that classifies a world image's shape, hue, tone, view and
//! background. Trained on the world with its own weights (`evaluator/` beside the pipeline;
//! gen-pretrain trains it), used only to measure generated images — never as a reward.
//!
//! It lives with the models: it is a model like the SD components (an architecture built from
//! a `config.json`, safetensors weights loaded and checked by [`crate::loading`], documented
//! tensor shapes), and it knows nothing of the world beyond what its config says — the head
//! sizes and class names ([`EvaluatorClasses`], filled from gen-world's label sets by the
//! trainer). So the trainer (gen-pretrain) and the evaluation pipeline (gen-eval) both reach
//! it here without depending on each other.
//!
//! Architecture: for each entry of `channels`, a 3×3 stride-2 convolution, group norm and SiLU;
//! then the spatial mean and one linear layer giving the concatenated logits of the five heads.
//! Keys: `convs.{i}.weight|bias`, `norms.{i}.weight|bias`, `head.weight|bias`.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use gen_core::{Error, Result, ResultExt};

use crate::loading::SafetensorsWeights;

/// Class names of the five heads, in index order (the trainer fills them from gen-world's
/// `ALL` arrays); their counts are the head sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvaluatorClasses {
    pub shape: Vec<String>,
    pub hue: Vec<String>,
    pub tone: Vec<String>,
    pub view: Vec<String>,
    pub background: Vec<String>,
}

/// `evaluator/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluatorConfig {
    pub image_size: usize,
    pub channels: Vec<usize>,
    pub norm_groups: usize,
    /// Head sizes in logit order: shape, hue, tone, view, background.
    pub num_shapes: usize,
    pub num_hues: usize,
    pub num_tones: usize,
    pub num_views: usize,
    pub num_backgrounds: usize,
    /// Class names per head, in index order ([`EvaluatorClasses`]).
    pub labels: serde_json::Value,
}

impl EvaluatorConfig {
    pub fn new(
        image_size: usize,
        channels: Vec<usize>,
        norm_groups: usize,
        classes: &EvaluatorClasses,
    ) -> Self {
        Self {
            image_size,
            channels,
            norm_groups,
            num_shapes: classes.shape.len(),
            num_hues: classes.hue.len(),
            num_tones: classes.tone.len(),
            num_views: classes.view.len(),
            num_backgrounds: classes.background.len(),
            labels: serde_json::json!({
                "shape": classes.shape,
                "hue": classes.hue,
                "tone": classes.tone,
                "view": classes.view,
                "background": classes.background,
            }),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let err = |e: serde_json::Error| Error::Config {
            file: path.to_path_buf(),
            key: "(file)".into(),
            msg: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(err)?;
        let known = crate::loading::struct_fields::<Self>();
        if let Some(k) =
            value.as_object().and_then(|o| o.keys().find(|k| !known.contains(&k.as_str())))
        {
            return Err(gen_core::suggest::unknown_key(path, k, known.iter().copied()));
        }
        let cfg: Self = serde_json::from_value(value).map_err(err)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks what the network and the label names need: a positive image size, non-empty
    /// channels that are multiples of a positive `norm_groups`, at least one class per head,
    /// and (where `labels` lists a head's names) one name per class. Errors name `file`.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::Config { file: file.to_path_buf(), key: key.into(), msg })
        };
        if self.image_size == 0 {
            return bad("image_size", "must be positive".into());
        }
        if self.norm_groups == 0 {
            return bad("norm_groups", "must be positive".into());
        }
        if self.channels.is_empty()
            || self.channels.iter().any(|c| *c == 0 || c % self.norm_groups != 0)
        {
            return bad(
                "channels",
                format!(
                    "{:?} must be non-empty positive multiples of norm_groups {}",
                    self.channels, self.norm_groups
                ),
            );
        }
        let heads = ["shape", "hue", "tone", "view", "background"];
        for (name, (_, n)) in heads.iter().zip(self.heads()) {
            if n == 0 {
                return bad(
                    &format!("num_{name}s"),
                    "must be positive (a head needs classes)".into(),
                );
            }
            match self.labels.get(name) {
                None => {}
                Some(serde_json::Value::Array(a)) if a.len() == n => {}
                Some(v) => {
                    return bad(
                        &format!("labels.{name}"),
                        format!("expected a list of {n} class names, found {v}"),
                    )
                }
            }
        }
        Ok(())
    }

    /// Total number of logits.
    pub fn num_logits(&self) -> usize {
        self.num_shapes + self.num_hues + self.num_tones + self.num_views + self.num_backgrounds
    }

    /// `(offset, size)` of each head in the logits: shape, hue, tone, view, background.
    pub fn heads(&self) -> [(usize, usize); 5] {
        let sizes =
            [self.num_shapes, self.num_hues, self.num_tones, self.num_views, self.num_backgrounds];
        let mut out = [(0, 0); 5];
        let mut o = 0;
        for (i, s) in sizes.iter().enumerate() {
            out[i] = (o, *s);
            o += s;
        }
        out
    }
}

/// The evaluator network.
#[derive(Debug, Clone)]
pub struct Evaluator {
    cfg: EvaluatorConfig,
    convs: Vec<(Tensor, Tensor)>,
    norms: Vec<(Tensor, Tensor)>,
    head_w: Tensor,
    head_b: Tensor,
}

/// Predicted classes of one image (indices into the heads' classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    pub shape: usize,
    pub hue: usize,
    pub tone: usize,
    pub view: usize,
    pub background: usize,
}

impl Evaluator {
    pub fn new(vb: VarBuilder, cfg: &EvaluatorConfig) -> Result<Self> {
        let mut convs = Vec::new();
        let mut norms = Vec::new();
        let mut cin = 3;
        for (i, &c) in cfg.channels.iter().enumerate() {
            let w = vb.get((c, cin, 3, 3), &format!("convs.{i}.weight")).ctx("evaluator")?;
            let b = vb.get(c, &format!("convs.{i}.bias")).ctx("evaluator")?;
            convs.push((w, b));
            let g = vb.get(c, &format!("norms.{i}.weight")).ctx("evaluator")?;
            let bb = vb.get(c, &format!("norms.{i}.bias")).ctx("evaluator")?;
            norms.push((g, bb));
            cin = c;
        }
        let head_w = vb.get((cfg.num_logits(), cin), "head.weight").ctx("evaluator")?;
        let head_b = vb.get(cfg.num_logits(), "head.bias").ctx("evaluator")?;
        Ok(Self { cfg: cfg.clone(), convs, norms, head_w, head_b })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = EvaluatorConfig::from_file(&dir.join("config.json"))?;
        let w = SafetensorsWeights::open(&[dir.join("model.safetensors")])?;
        let m = Self::new(w.var_builder(DType::F32, device), &cfg)?;
        let unused = w.unused_keys();
        if !unused.is_empty() {
            return Err(Error::msg(format!(
                "{}: tensors the evaluator does not use: {}",
                dir.display(),
                unused.join(", ")
            )));
        }
        Ok(m)
    }

    pub fn config(&self) -> &EvaluatorConfig {
        &self.cfg
    }

    /// `images`: `(B, 3, S, S)` sRGB in `[0, 1]`, `S = image_size` → logits `(B, num_logits)`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let pooled = self.features(images)?;
        Ok(pooled.matmul(&self.head_w.t()?)?.broadcast_add(&self.head_b)?)
    }

    /// The pooled features before the heads, `(B, channels.last())`: the feature space of the
    /// "tiny-FID" (gen-eval's Fréchet distance).
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = images.dims4().ctx("evaluator input must be (B, 3, H, W)")?;
        if c != 3 || h != self.cfg.image_size || w != self.cfg.image_size {
            return Err(Error::invalid(
                "evaluator input",
                format!(
                    "shape {:?}, expected (B, 3, {s}, {s})",
                    images.dims(),
                    s = self.cfg.image_size
                ),
            ));
        }
        let mut x = ((images * 2.0)? - 1.0)?;
        let conv =
            Conv2dConfig { padding: 1, stride: 2, dilation: 1, groups: 1, cudnn_fwd_algo: None };
        for ((w, b), (g, bb)) in self.convs.iter().zip(&self.norms) {
            x = gen_ops::conv2d_bias(&x, w, Some(b), &conv)?;
            x = gen_ops::group_norm(&x, self.cfg.norm_groups, Some(g), Some(bb), 1e-5)?;
            x = x.silu()?;
        }
        Ok(x.flatten_from(2)?.mean(D::Minus1)?)
    }

    /// The most likely class of each head for each image.
    pub fn predict(&self, images: &Tensor) -> Result<Vec<Prediction>> {
        let logits = self.forward(images)?.to_vec2::<f32>()?;
        let heads = self.cfg.heads();
        let argmax = |row: &[f32], (o, n): (usize, usize)| {
            let mut best = 0;
            for i in 1..n {
                if row[o + i] > row[o + best] {
                    best = i;
                }
            }
            best
        };
        Ok(logits
            .iter()
            .map(|r| Prediction {
                shape: argmax(r, heads[0]),
                hue: argmax(r, heads[1]),
                tone: argmax(r, heads[2]),
                view: argmax(r, heads[3]),
                background: argmax(r, heads[4]),
            })
            .collect())
    }
}

/// Mean cross-entropy of `logits` `(B, K)` against one-hot `targets` `(B, K)`, with the
/// log-sum-exp's maximum detached (its gradient cancels exactly).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    Ok((logp * targets)?.sum(D::Minus1)?.mean_all()?.neg()?)
}
