//! A neural radiance field with Coordinate-Aware Modulation (CAM).
//!
//! For a world point `x` inside the field's box, with `u ∈ [0, 1]³` its normalised position:
//! 1. `g = hashgrid(u)`: the multiresolution hash-grid features, `L·F` channels
//!    ([`super::hashgrid`]).
//! 2. `m = g Mᵀ + m₀`: one learned linear map from **all** grid channels to a scale and a shift
//!    for every hidden channel of every modulated layer, `(K · 2H)` values; for layer `k`,
//!    `γ_k(x) = 1 + m[k·2H .. k·2H+H]` and `β_k(x) = m[k·2H+H .. (k+1)·2H]`. The grid features
//!    feed only γ and β (CAM injects the grid into the intermediate features instead of the
//!    MLP input); at initialisation the table is ~1e-4 so `γ ≈ 1`, `β ≈ 0`.
//! 3. The MLP input is the coordinate `2u − 1`; each of the `K` hidden layers computes
//!    `h ← relu(γ_k(x) · norm(W_k h + b_k) + β_k(x))` where `norm` is layer normalisation
//!    without affine parameters ([`gen_ops::layer_norm`], CAM's feature normalisation).
//! 4. Heads: density `σ = act(w_σ·h + b_σ + density_bias)` with `act` softplus (default) or
//!    truncated exp ([`DensityActivation`]); colour `c = sigmoid(W_c h + b_c)` (no view
//!    dependence: the field is meant for objects lit uniformly).
//!
//! Parameters are candle `Var`s inserted into a [`VarMap`] under `<prefix>.<name>`:
//! `grid.table (L·T, F)`, `mod.weight (K·2H, L·F)`, `mod.bias (K·2H)`,
//! `layer{k}.weight (H, in)`, `layer{k}.bias (H)`, `density.weight (1, H)`, `density.bias (1)`,
//! `color.weight (3, H)`, `color.bias (3)`. Initialisation uses an explicit [`SeededRng`].

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use gen_core::{Error, Result, SeededRng};

use super::hashgrid::{self, HashGridConfig};
use super::volume::{Aabb, RadianceField};
use crate::mesh::{DensityField, Grid};

/// How the raw density output becomes `σ ≥ 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DensityActivation {
    /// `softplus(x) = ln(1 + eˣ)`: smooth, gradient at most 1 (default).
    Softplus,
    /// `exp(x)` whose backward uses `exp(min(x, 15))` (torch-ngp's `trunc_exp`): the forward
    /// value is exact, the gradient cannot explode.
    TruncExp,
}

/// Configuration of a [`CamField`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FieldConfig {
    pub grid: HashGridConfig,
    /// Hidden width `H`.
    pub hidden: usize,
    /// Number of modulated hidden layers `K` (≥ 1).
    pub layers: usize,
    pub density_activation: DensityActivation,
    /// Added to the raw density before the activation (negative: start mostly empty).
    pub density_bias: f64,
    /// Axis-aligned box the field lives in (world units); the grid spans it.
    pub bounds: Aabb,
    /// Epsilon of the feature normalisation.
    pub norm_eps: f64,
}

impl FieldConfig {
    /// A field for single objects in `[-1, 1]³` on a CPU: [`HashGridConfig::small`], 2 × 32.
    pub fn small() -> Self {
        Self {
            grid: HashGridConfig::small(),
            hidden: 32,
            layers: 2,
            density_activation: DensityActivation::Softplus,
            density_bias: -1.0,
            bounds: Aabb::cube(1.0),
            norm_eps: 1e-5,
        }
    }

    /// instant-ngp-sized grid with a 2 × 64 MLP (GPU scale).
    pub fn base() -> Self {
        Self { grid: HashGridConfig::instant_ngp(), hidden: 64, ..Self::small() }
    }

    /// Tiny sizes for tests: [`HashGridConfig::tiny`], 2 × 8.
    pub fn tiny() -> Self {
        Self { grid: HashGridConfig::tiny(), hidden: 8, ..Self::small() }
    }

    /// Checks the grid, the widths and the box.
    pub fn validate(&self) -> Result<()> {
        self.grid.validate()?;
        if self.hidden == 0 || self.layers == 0 {
            return Err(Error::invalid(
                "field config",
                format!("hidden {} and layers {} must be positive", self.hidden, self.layers),
            ));
        }
        if !(self.norm_eps > 0.0 && self.density_bias.is_finite()) {
            return Err(Error::invalid(
                "field config",
                format!(
                    "norm_eps {} must be > 0, density_bias {} finite",
                    self.norm_eps, self.density_bias
                ),
            ));
        }
        self.bounds.validate()
    }
}

/// A CAM neural field (see the module docs). Cloning shares the parameters.
#[derive(Debug, Clone)]
pub struct CamField {
    pub cfg: FieldConfig,
    table: Var,
    mod_w: Var,
    mod_b: Var,
    layers: Vec<(Var, Var)>,
    density_w: Var,
    density_b: Var,
    color_w: Var,
    color_b: Var,
    dtype: DType,
    device: Device,
}

impl CamField {
    /// A freshly initialised field whose parameters are inserted into `varmap` under
    /// `<prefix>.<name>` (an existing entry of that name is an error). Linear layers use
    /// `U(±1/√fan_in)`, the table `U(±1e-4)`, biases 0.
    pub fn new(
        cfg: FieldConfig,
        varmap: &VarMap,
        prefix: &str,
        rng: &mut SeededRng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let (h, k, lf) = (cfg.hidden, cfg.layers, cfg.grid.out_dim());
        let mut data =
            varmap.data().lock().map_err(|_| Error::invalid("field varmap", "lock poisoned"))?;
        let mut add = |name: &str, t: Tensor| -> Result<Var> {
            let key = format!("{prefix}.{name}");
            if data.contains_key(&key) {
                return Err(Error::invalid("field varmap", format!("`{key}` already exists")));
            }
            let v = Var::from_tensor(&t)?;
            data.insert(key, v.clone());
            Ok(v)
        };
        let linear = |rng: &mut SeededRng, out: usize, inp: usize| -> Result<Tensor> {
            let a = (1.0 / inp as f64).sqrt() as f32;
            rng.rand_uniform((out, inp), -a, a, dtype, device)
        };
        let zeros = |n: usize| Tensor::zeros(n, dtype, device);
        let table = add("grid.table", cfg.grid.init_table(rng, dtype, device)?)?;
        let mod_w = add("mod.weight", linear(rng, k * 2 * h, lf)?)?;
        let mod_b = add("mod.bias", zeros(k * 2 * h)?)?;
        let mut layers = Vec::with_capacity(k);
        for i in 0..k {
            let inp = if i == 0 { 3 } else { h };
            let w = add(&format!("layer{i}.weight"), linear(rng, h, inp)?)?;
            let b = add(&format!("layer{i}.bias"), zeros(h)?)?;
            layers.push((w, b));
        }
        let density_w = add("density.weight", linear(rng, 1, h)?)?;
        let density_b = add("density.bias", zeros(1)?)?;
        let color_w = add("color.weight", linear(rng, 3, h)?)?;
        let color_b = add("color.bias", zeros(3)?)?;
        Ok(Self {
            cfg,
            table,
            mod_w,
            mod_b,
            layers,
            density_w,
            density_b,
            color_w,
            color_b,
            dtype,
            device: device.clone(),
        })
    }

    /// All parameters, table first.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.table.clone(), self.mod_w.clone(), self.mod_b.clone()];
        for (w, b) in &self.layers {
            v.push(w.clone());
            v.push(b.clone());
        }
        v.extend([
            self.density_w.clone(),
            self.density_b.clone(),
            self.color_w.clone(),
            self.color_b.clone(),
        ]);
        v
    }

    /// The hash-grid table `(L·T, F)`.
    pub fn table(&self) -> &Var {
        &self.table
    }

    /// Density and colour at world points. `points`: `(M, 3)` → `(σ (M), rgb (M, 3))`.
    pub fn forward(&self, points: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let h = self.cfg.hidden;
        let b = &self.cfg.bounds;
        let lo = Tensor::new(&b.min, &self.device)?.to_dtype(self.dtype)?.unsqueeze(0)?;
        let ext = [b.max[0] - b.min[0], b.max[1] - b.min[1], b.max[2] - b.min[2]];
        let inv =
            Tensor::new(&ext.map(|e| 1.0 / e), &self.device)?.to_dtype(self.dtype)?.unsqueeze(0)?;
        let u = points.broadcast_sub(&lo)?.broadcast_mul(&inv)?;
        let g = hashgrid::encode(&u, self.table.as_tensor(), &self.cfg.grid)?;
        let mut x = ((u * 2.0)? - 1.0)?;
        for (i, (w, bias)) in self.layers.iter().enumerate() {
            let z = x.matmul(&w.t()?)?.broadcast_add(bias)?;
            let n = gen_ops::layer_norm(&z, None, None, self.cfg.norm_eps)?;
            // Narrow the (small) weights rather than one wide product: the backward of a
            // narrow pads to the full size, which is costly for (M, K·2H) activations.
            let proj = |off: usize| -> candle_core::Result<Tensor> {
                g.matmul(&self.mod_w.narrow(0, off, h)?.t()?)?
                    .broadcast_add(&self.mod_b.narrow(0, off, h)?)
            };
            let gamma = (proj(i * 2 * h)? + 1.0)?;
            let beta = proj(i * 2 * h + h)?;
            x = (gamma * n)?.add(&beta)?.relu()?;
        }
        let raw = (x.matmul(&self.density_w.t()?)?.broadcast_add(&self.density_b)?
            + self.cfg.density_bias)?
            .squeeze(D::Minus1)?;
        let sigma = match self.cfg.density_activation {
            DensityActivation::Softplus => softplus(&raw)?,
            DensityActivation::TruncExp => trunc_exp(&raw)?,
        };
        let rgb =
            candle_nn::ops::sigmoid(&x.matmul(&self.color_w.t()?)?.broadcast_add(&self.color_b)?)?;
        Ok((sigma, rgb))
    }

    /// Density and its spatial gradient `∂σ/∂x` at world points (through the hash grid's
    /// analytic position gradient and the MLP). `points`: `(M, 3)` → `(σ (M), ∇σ (M, 3))`.
    /// Normals are `−∇σ / |∇σ|`. The gradient is computed by a backward pass, so it is not itself
    /// differentiable (candle has no double backward): usable for normals and shading, not as
    /// an eikonal loss on the parameters.
    pub fn density_gradient(&self, points: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let x = Var::from_tensor(&points.detach())?;
        let (sigma, _) = self.forward(x.as_tensor())?;
        let grads = sigma.sum_all()?.backward()?;
        let g = match grads.get(&x) {
            Some(g) => g.clone(),
            None => x.as_tensor().zeros_like()?,
        };
        Ok((sigma.detach(), g))
    }

    /// Evaluates (without gradients) at `f64` points, returning `(σ, rgb)` as `f64`/`f32`.
    fn eval_points(&self, pts: &[[f64; 3]]) -> candle_core::Result<(Vec<f64>, Vec<[f32; 3]>)> {
        let flat: Vec<f64> = pts.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (pts.len(), 3), &self.device)?.to_dtype(self.dtype)?;
        let (s, c) = self.forward(&t)?;
        let s = s.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let c = c.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok((s, c.into_iter().map(|v| [v[0], v[1], v[2]]).collect()))
    }
}

/// `softplus(x) = max(x, 0) + ln(1 + e^{-|x|})` (stable for any `x`).
pub fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// `exp(x)` forward with the backward of `exp(min(x, 15))` (torch-ngp's `trunc_exp`), built
/// as `stopgrad(eˣ) + stopgrad(e^{min(x,15)}) · (x − stopgrad(x))`.
pub fn trunc_exp(x: &Tensor) -> candle_core::Result<Tensor> {
    let v = x.detach().exp()?;
    let slope = x.detach().minimum(15.0)?.exp()?;
    v + slope.mul(&(x - x.detach())?)?
}

impl RadianceField for CamField {
    fn query(&self, points: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        self.forward(points)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> Device {
        self.device.clone()
    }
}

impl DensityField for CamField {
    /// `σ(p)`; NaN if the evaluation fails (meshing reports non-finite densities as errors).
    fn density(&self, p: [f64; 3]) -> f64 {
        self.eval_points(&[p]).map(|(s, _)| s[0]).unwrap_or(f64::NAN)
    }

    fn color(&self, p: [f64; 3]) -> [f32; 3] {
        self.eval_points(&[p]).map(|(_, c)| c[0]).unwrap_or([0.0; 3])
    }

    /// Evaluates one z-slab (`nx · ny` points) per tensor call.
    fn sample_grid(&self, grid: &Grid) -> Result<Vec<f32>> {
        grid.validate()?;
        let [nx, ny, nz] = grid.dims;
        let mut out = Vec::with_capacity(grid.len());
        for k in 0..nz {
            let pts: Vec<[f64; 3]> =
                (0..ny).flat_map(|j| (0..nx).map(move |i| grid.point(i, j, k))).collect();
            let (s, _) = self.eval_points(&pts)?;
            out.extend(s.into_iter().map(|v| v as f32));
        }
        Ok(out)
    }
}
