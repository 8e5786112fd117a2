//! Low-rank projections of a 2-D gradient `G` (m×n), used by GaLore and FRUGAL.
//!
//! Following GaLore (`galore_projector.py`), the short side is projected: for `m >= n` the
//! basis `Q` is n×r and `R = G Q` (m×r), `G ≈ R Qᵀ` ([`Side::Right`]); otherwise `Q` is m×r,
//! `R = Qᵀ G` (r×n), `G ≈ Q R` ([`Side::Left`]). `Q` always has orthonormal columns.
//!
//! Kinds ([`ProjectionKind`]):
//! - `Svd`: the top-r singular vectors of `G` (faer thin SVD on the CPU, f64 for f64 gradients,
//!   f32 otherwise), each signed
//!   so that its largest-magnitude entry is positive.
//! - `Dct`: columns of the orthonormal DCT-II basis of the side's size (built once per size and
//!   kept in a [`DctCache`]), chosen as the r columns with the largest L1 norm of `G Q` (`Qᵀ G`
//!   rows on the left side). Only matmul, abs, sum, argsort and index_select — candle ops that
//!   stay on the device; only the indices are stored (SVD-free DCT, IST-DASLab). The columns
//!   are the DCT-II basis vectors, i.e. `G Q` is the DCT-II of `G`'s rows, as in the
//!   reference's `sim_type='makhoul'` (its default `'matmul'` multiplies by the transposed
//!   matrix, whose columns are DCT-III vectors). Matched against the reference in
//!   `tests/parity.rs`.
//! - `RandomOrthogonal`: a seeded Gaussian matrix orthonormalised (Gram-Schmidt, f64).
//! - `RandomColumns`: r distinct coordinates chosen at random (seeded); `Q` is a column
//!   selection of the identity and only the indices are stored.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result, SeededRng};

/// Which basis a projector uses. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectionKind {
    Svd,
    Dct,
    RandomOrthogonal,
    RandomColumns,
}

/// Which side of `G` is projected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// `m >= n`: `R = G Q`, Q is n×r.
    Right,
    /// `m < n`: `R = Qᵀ G`, Q is m×r.
    Left,
}

impl Side {
    /// GaLore's rule: project the shorter dimension.
    pub fn for_shape(m: usize, n: usize) -> Side {
        if m >= n {
            Side::Right
        } else {
            Side::Left
        }
    }
    /// The size of the projected dimension of an m×n matrix.
    pub fn dim(self, m: usize, n: usize) -> usize {
        match self {
            Side::Right => n,
            Side::Left => m,
        }
    }
}

/// The basis of a projector.
#[derive(Clone, Debug)]
pub enum Basis {
    /// `Q` itself (d×r, orthonormal columns).
    Dense(Tensor),
    /// Indices (u32, length r) of the kept coordinates: `Q = I[:, idx]` with I of size `dim`.
    Columns { indices: Tensor, dim: usize },
    /// Indices (u32, length r) of kept columns of the shared DCT-II basis `D` (d×d): `Q = D[:, idx]`.
    DctColumns { indices: Tensor, basis: Tensor },
}

/// A projector for m×n matrices.
#[derive(Clone, Debug)]
pub struct Projector {
    pub side: Side,
    pub basis: Basis,
}

impl Projector {
    /// Rank r of the projection.
    pub fn rank(&self) -> usize {
        match &self.basis {
            Basis::Dense(q) => q.dims()[1],
            Basis::Columns { indices, .. } | Basis::DctColumns { indices, .. } => indices.dims()[0],
        }
    }

    /// `Q` as a dense d×r matrix of `dtype`.
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.basis {
            Basis::Dense(q) => q.to_dtype(dtype)?,
            Basis::Columns { indices, dim } => {
                Tensor::eye(*dim, dtype, indices.device())?.index_select(indices, 1)?
            }
            Basis::DctColumns { indices, basis } => {
                basis.to_dtype(dtype)?.index_select(indices, 1)?
            }
        })
    }

    /// `R` from `G` (m×n): m×r on the right side, r×n on the left.
    pub fn project(&self, g: &Tensor) -> Result<Tensor> {
        let dim = match self.side {
            Side::Right => 1,
            Side::Left => 0,
        };
        if let Basis::Columns { indices, .. } = &self.basis {
            return Ok(g.index_select(indices, dim)?.contiguous()?);
        }
        let q = self.dense(g.dtype())?;
        Ok(match self.side {
            Side::Right => g.matmul(&q)?,
            Side::Left => q.t()?.matmul(g)?,
        })
    }

    /// `Q R` or `R Qᵀ`: back to an m×n matrix.
    pub fn project_back(&self, r: &Tensor, m: usize, n: usize) -> Result<Tensor> {
        if let Basis::Columns { indices: idx, .. } = &self.basis {
            let zeros = Tensor::zeros((m, n), r.dtype(), r.device())?;
            let dim = match self.side {
                Side::Right => 1,
                Side::Left => 0,
            };
            return Ok(zeros.index_add(idx, &r.contiguous()?, dim)?);
        }
        let q = self.dense(r.dtype())?;
        Ok(match self.side {
            Side::Right => r.matmul(&q.t()?)?,
            Side::Left => q.matmul(r)?,
        })
    }

    /// Bytes this projector keeps per parameter (the shared DCT basis is not counted).
    pub fn bytes(&self) -> usize {
        let t = match &self.basis {
            Basis::Dense(q) => q,
            Basis::Columns { indices, .. } | Basis::DctColumns { indices, .. } => indices,
        };
        t.elem_count() * t.dtype().size_in_bytes()
    }
}

/// The orthonormal DCT-II basis as a d×d matrix whose columns are the basis vectors:
/// `Q[i, k] = sqrt(2/d) c_k cos(pi (2i+1) k / (2d))`, `c_0 = 1/sqrt(2)`, `c_k = 1` otherwise.
pub fn dct2_basis(d: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    if d == 0 {
        return Err(Error::invalid("DCT size", "0"));
    }
    let s = (2.0 / d as f64).sqrt();
    let mut v = Vec::with_capacity(d * d);
    for i in 0..d {
        for k in 0..d {
            let c = if k == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
            v.push(
                s * c
                    * (std::f64::consts::PI * (2 * i + 1) as f64 * k as f64 / (2 * d) as f64).cos(),
            );
        }
    }
    Ok(Tensor::from_vec(v, (d, d), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
}

/// DCT-II bases built once per (size, dtype), shared by all parameters of an optimizer.
#[derive(Debug, Default)]
pub struct DctCache {
    bases: HashMap<(usize, DType), Tensor>,
}

impl DctCache {
    pub fn get(&mut self, d: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        if let Some(b) = self.bases.get(&(d, dtype)) {
            if b.device().same_device(device) {
                return Ok(b.clone());
            }
        }
        let b = dct2_basis(d, dtype, device)?;
        self.bases.insert((d, dtype), b.clone());
        Ok(b)
    }
    /// Bytes held by the cached bases.
    pub fn bytes(&self) -> usize {
        self.bases.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }
}

/// Row-major f64 copy of a 2-D tensor.
fn to_f64_rows(g: &Tensor) -> Result<(usize, usize, Vec<f64>)> {
    let (m, n) = g.dims2()?;
    let v = g.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((m, n, v))
}

/// The first `r` singular vectors on `side` of the row-major m×n matrix `v`, computed in `$t`,
/// as d×r row-major f64 values.
macro_rules! top_singular_vectors {
    ($t:ty, $v:expr, $m:expr, $n:expr, $side:expr, $r:expr) => {{
        let (m, n, r) = ($m, $n, $r);
        let a = faer::Mat::<$t>::from_fn(m, n, |i, j| $v[i * n + j] as $t);
        let svd = a
            .thin_svd()
            .map_err(|e| Error::msg(format!("SVD of a {m}×{n} gradient failed: {e:?}")))?;
        let basis = match $side {
            Side::Right => svd.V(),
            Side::Left => svd.U(),
        };
        let d = basis.nrows();
        let mut out = Vec::with_capacity(d * r);
        for i in 0..d {
            for k in 0..r {
                out.push(basis[(i, k)] as f64);
            }
        }
        (d, out)
    }};
}

/// Top-r singular vectors on the projected side of `g` (m×n), as d×r f64 values (row-major).
/// The SVD runs in f64 for f64 gradients and in f32 otherwise (as GaLore's reference does).
fn svd_basis(g: &Tensor, side: Side, r: usize) -> Result<(usize, Vec<f64>)> {
    let (m, n, v) = to_f64_rows(g)?;
    let (d, basis) = if g.dtype() == DType::F64 {
        top_singular_vectors!(f64, v, m, n, side, r)
    } else {
        top_singular_vectors!(f32, v, m, n, side, r)
    };
    // Sign convention: the largest-magnitude entry of each singular vector is positive (the SVD
    // leaves signs arbitrary; they matter when GaLore keeps moments across re-projections).
    let signs: Vec<f64> = (0..r)
        .map(|k| {
            let (mut best, mut val) = (0.0f64, 0.0f64);
            for i in 0..d {
                let x = basis[i * r + k];
                if x.abs() > best {
                    best = x.abs();
                    val = x;
                }
            }
            if val < 0.0 {
                -1.0
            } else {
                1.0
            }
        })
        .collect();
    let mut out = Vec::with_capacity(d * r);
    for i in 0..d {
        for k in 0..r {
            out.push(basis[i * r + k] * signs[k]);
        }
    }
    Ok((d, out))
}

/// A d×r matrix with orthonormal columns from a seeded Gaussian (modified Gram-Schmidt, twice).
fn random_orthogonal(d: usize, r: usize, rng: &mut SeededRng) -> Vec<f64> {
    let mut cols: Vec<Vec<f64>> = Vec::with_capacity(r);
    while cols.len() < r {
        let mut c: Vec<f64> = (0..d).map(|_| rng.normal() as f64).collect();
        for _ in 0..2 {
            for q in &cols {
                let dot: f64 = c.iter().zip(q).map(|(a, b)| a * b).sum();
                c.iter_mut().zip(q).for_each(|(a, b)| *a -= dot * b);
            }
        }
        let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-8 {
            c.iter_mut().for_each(|x| *x /= norm);
            cols.push(c);
        }
    }
    let mut out = vec![0.0; d * r];
    for (k, c) in cols.iter().enumerate() {
        for i in 0..d {
            out[i * r + k] = c[i];
        }
    }
    out
}

/// r distinct indices in [0, d), sorted (partial Fisher-Yates).
fn random_indices(d: usize, r: usize, rng: &mut SeededRng) -> Vec<u32> {
    let mut all: Vec<u32> = (0..d as u32).collect();
    for i in 0..r {
        let j = i + rng.below(d - i);
        all.swap(i, j);
    }
    let mut v = all[..r].to_vec();
    v.sort_unstable();
    v
}

/// Builds a rank-`r` projector of `kind` for the 2-D gradient `g` (m×n). `rng` is used by the
/// random kinds only; `dct` holds the shared DCT bases.
pub fn make_projector(
    kind: ProjectionKind,
    g: &Tensor,
    r: usize,
    rng: &mut SeededRng,
    dct: &mut DctCache,
) -> Result<Projector> {
    let (m, n) = g.dims2()?;
    let side = Side::for_shape(m, n);
    let d = side.dim(m, n);
    if r == 0 || r > d {
        return Err(Error::invalid(
            "projection rank",
            format!("{r} for a {m}×{n} matrix (must be in 1..={d})"),
        ));
    }
    let dev = g.device();
    let dt = g.dtype();
    let basis = match kind {
        ProjectionKind::Svd => {
            let (d, q) = svd_basis(g, side, r)?;
            Basis::Dense(Tensor::from_vec(q, (d, r), &Device::Cpu)?.to_dtype(dt)?.to_device(dev)?)
        }
        ProjectionKind::RandomOrthogonal => Basis::Dense(
            Tensor::from_vec(random_orthogonal(d, r, rng), (d, r), &Device::Cpu)?
                .to_dtype(dt)?
                .to_device(dev)?,
        ),
        ProjectionKind::RandomColumns => {
            Basis::Columns { indices: Tensor::from_vec(random_indices(d, r, rng), r, dev)?, dim: d }
        }
        ProjectionKind::Dct => {
            let basis = dct.get(d, dt, dev)?;
            let scores = match side {
                Side::Right => g.matmul(&basis)?.abs()?.sum(0)?,
                Side::Left => basis.t()?.matmul(g)?.abs()?.sum(1)?,
            };
            let indices = scores.arg_sort_last_dim(false)?.narrow(0, 0, r)?.contiguous()?;
            Basis::DctColumns { indices, basis }
        }
    };
    Ok(Projector { side, basis })
}
