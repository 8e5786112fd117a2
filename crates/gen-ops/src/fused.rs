//! Fused CPU kernels for the ops of [`crate::ops`], as candle custom ops with analytic backward
//! passes.
//!
//! Each op is applied with `apply_op1/2/3`, so candle records it in the graph and calls its
//! `bwd`. The kernels take contiguous f32 or f64 inputs (the public functions make inputs
//! contiguous and route f16/bf16 through f32); statistics are accumulated in f64. Work is split
//! over rows with rayon, and every reduction across rows (weight and bias gradients) sums
//! fixed-size blocks in a fixed order, so results do not depend on the number of threads.
//!
//! The backward kernels are custom ops themselves, applied with `apply_op*` but without a `bwd`:
//! differentiating a gradient a second time fails loudly instead of silently giving zero.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use rayon::prelude::*;

/// Rows per block in the deterministic cross-row reductions.
const BLOCK_ROWS: usize = 64;

/// The float types the kernels are written for (f32 and f64).
pub(crate) trait Real: WithDType {
    fn exp_(self) -> Self;
    fn max_(self, other: Self) -> Self;
}

impl Real for f32 {
    fn exp_(self) -> Self {
        self.exp()
    }
    fn max_(self, other: Self) -> Self {
        self.max(other)
    }
}

impl Real for f64 {
    fn exp_(self) -> Self {
        self.exp()
    }
    fn max_(self, other: Self) -> Self {
        self.max(other)
    }
}

/// The contiguous slice of `s` that `l` describes.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: the kernel needs a contiguous input, got strides {:?}", l.stride()),
    }
}

/// Minimum rows per rayon task so that each task has at least ~4k elements.
fn min_rows(row_len: usize) -> usize {
    (4096 / row_len.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension.

/// `y = softmax(x)` over the last dimension. Backward: `dx = y ⊙ (g − Σ g⊙y)`.
pub(crate) struct SoftmaxLastDim;

fn softmax_fwd<T: Real>(x: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(min_rows(n)).for_each(|(o, xr)| {
        let max = xr.iter().fold(xr[0], |m, &v| m.max_(v));
        let mut sum = 0f64;
        for (oi, &xi) in o.iter_mut().zip(xr) {
            let e = (xi - max).exp_();
            *oi = e;
            sum += e.to_f64();
        }
        let inv = T::from_f64(1.0 / sum);
        for oi in o.iter_mut() {
            *oi *= inv;
        }
    });
    out
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "gen-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(softmax_fwd(slice::<f32>(s, l, self.name())?, n)),
            CpuStorage::F64(_) => CpuStorage::F64(softmax_fwd(slice::<f64>(s, l, self.name())?, n)),
            _ => bail!("{}: unsupported dtype {:?}", self.name(), s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_bwd(y, g)?))
    }
}

/// `dx = y ⊙ (g − Σ_last g⊙y)`; fused on the CPU, composite elsewhere.
pub(crate) fn softmax_bwd(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    if y.device().is_cpu() {
        y.contiguous()?.apply_op2(&g.contiguous()?, SoftmaxBwd)
    } else {
        let dot = (g * y)?.sum_keepdim(candle_core::D::Minus1)?;
        g.broadcast_sub(&dot)? * y
    }
}

struct SoftmaxBwd;

fn softmax_bwd_kernel<T: Real>(y: &[T], g: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(g.par_chunks(n)))
        .with_min_len(min_rows(n))
        .for_each(|(o, (yr, gr))| {
            let dot: f64 = yr.iter().zip(gr).map(|(&a, &b)| (a * b).to_f64()).sum();
            let dot = T::from_f64(dot);
            for ((oi, &yi), &gi) in o.iter_mut().zip(yr).zip(gr) {
                *oi = yi * (gi - dot);
            }
        });
    out
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "gen-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = ly.dims().last().copied().unwrap_or(1);
        if ly.shape() != lg.shape() {
            bail!("{}: shapes {:?} and {:?} differ", self.name(), ly.shape(), lg.shape())
        }
        let out = match (sy, sg) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(softmax_bwd_kernel(
                slice::<f32>(sy, ly, self.name())?,
                slice(sg, lg, self.name())?,
                n,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(softmax_bwd_kernel(
                slice::<f64>(sy, ly, self.name())?,
                slice(sg, lg, self.name())?,
                n,
            )),
            _ => bail!("{}: unsupported dtypes {:?}, {:?}", self.name(), sy.dtype(), sg.dtype()),
        };
        Ok((out, ly.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Normalisation shared by layer norm and group norm.
//
// Both normalise contiguous "groups" of `len` elements. Within a group, element `i` belongs to
// channel `i / per_channel` (layer norm: `per_channel = 1`, one channel per element; group norm:
// `per_channel` = spatial size) and is scaled by `w[channel]` and shifted by `b[channel]`.

/// Mean and `1/sqrt(var + eps)` of a group, computed in f64 with two passes.
fn stats<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = x.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Geometry of a normalisation: `x` is a sequence of groups of `len` elements; group `gi` uses
/// the channels starting at `(gi % groups_per_row) * channels_per_group` of `w` and `b`.
struct NormGeometry {
    /// Elements per normalisation group.
    len: usize,
    /// Consecutive elements that share one channel's weight and bias.
    per_channel: usize,
    /// Groups per batch row (group norm: G; layer norm: 1).
    groups_per_row: usize,
}

impl NormGeometry {
    fn channels_per_group(&self) -> usize {
        self.len / self.per_channel
    }
    fn channels(&self) -> usize {
        self.channels_per_group() * self.groups_per_row
    }
}

/// Forward of a normalisation: `y = (x − mean)·rstd·w[c] + b[c]` per group.
fn norm_fwd<T: Real>(x: &[T], w: &[T], b: &[T], geo: &NormGeometry, eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    if geo.len == 0 {
        return out;
    }
    let cpg = geo.channels_per_group();
    out.par_chunks_mut(geo.len)
        .zip(x.par_chunks(geo.len))
        .enumerate()
        .with_min_len(min_rows(geo.len))
        .for_each(|(gi, (o, xg))| {
            let (mean, rstd) = stats(xg, eps);
            let c0 = (gi % geo.groups_per_row) * cpg;
            for (ci, (oc, xc)) in
                o.chunks_mut(geo.per_channel).zip(xg.chunks(geo.per_channel)).enumerate()
            {
                // y = x * a + s with a = rstd·w, s = b − mean·rstd·w.
                let wc = w[c0 + ci].to_f64();
                let a = rstd * wc;
                let s = b[c0 + ci].to_f64() - mean * a;
                let (a, s) = (T::from_f64(a), T::from_f64(s));
                for (oi, &xi) in oc.iter_mut().zip(xc) {
                    *oi = xi * a + s;
                }
            }
        });
    out
}

/// Backward of a normalisation. Returns `[dx (x.len()), dw (channels), db (channels)]`.
fn norm_bwd<T: Real>(x: &[T], w: &[T], g: &[T], geo: &NormGeometry, eps: f64) -> Vec<T> {
    let channels = geo.channels();
    let mut out = vec![T::zero(); x.len() + 2 * channels];
    if geo.len == 0 {
        return out;
    }
    let cpg = geo.channels_per_group();
    // Blocks of whole rows (a row = groups_per_row groups), reduced in a fixed order.
    let row_len = geo.len * geo.groups_per_row;
    let rows_per_block = BLOCK_ROWS.max(min_rows(row_len));
    let (dx, dwb) = out.split_at_mut(x.len());
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(row_len * rows_per_block)
        .zip(x.par_chunks(row_len * rows_per_block).zip(g.par_chunks(row_len * rows_per_block)))
        .map(|(dxb, (xb, gb))| {
            // acc[c] = Σ g·x̂ (dw), acc[channels + c] = Σ g (db) over this block.
            let mut acc = vec![0f64; 2 * channels];
            for (gi, (dxg, (xg, gg))) in
                dxb.chunks_mut(geo.len).zip(xb.chunks(geo.len).zip(gb.chunks(geo.len))).enumerate()
            {
                let (mean, rstd) = stats(xg, eps);
                let c0 = (gi % geo.groups_per_row) * cpg;
                // First pass: group means of gy = g·w and of gy·x̂, and per-channel sums.
                let (mut sum_gy, mut sum_gyx) = (0f64, 0f64);
                for ci in 0..cpg {
                    let c = c0 + ci;
                    let wc = w[c].to_f64();
                    let r = ci * geo.per_channel..(ci + 1) * geo.per_channel;
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    for (&xi, &gi_) in xg[r.clone()].iter().zip(&gg[r]) {
                        let xh = (xi.to_f64() - mean) * rstd;
                        let gv = gi_.to_f64();
                        sg += gv;
                        sgx += gv * xh;
                    }
                    acc[c] += sgx;
                    acc[channels + c] += sg;
                    sum_gy += sg * wc;
                    sum_gyx += sgx * wc;
                }
                let n = geo.len as f64;
                let (m_gy, m_gyx) = (sum_gy / n, sum_gyx / n);
                // dx = rstd·(gy − mean(gy) − x̂·mean(gy·x̂)).
                for ci in 0..cpg {
                    let wc = w[c0 + ci].to_f64();
                    let r = ci * geo.per_channel..(ci + 1) * geo.per_channel;
                    for ((d, &xi), &gi_) in
                        dxg[r.clone()].iter_mut().zip(&xg[r.clone()]).zip(&gg[r])
                    {
                        let xh = (xi.to_f64() - mean) * rstd;
                        *d = T::from_f64(rstd * (gi_.to_f64() * wc - m_gy - xh * m_gyx));
                    }
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; 2 * channels];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    for (o, t) in dwb.iter_mut().zip(total) {
        *o = T::from_f64(t);
    }
    out
}

/// `(x, w, b)` → normalised, scaled and shifted `x` (layer norm or group norm).
pub(crate) struct NormOp {
    pub eps: f64,
    /// Group norm groups, or `None` for layer norm over the last dimension.
    pub groups: Option<usize>,
    pub has_weight: bool,
    pub has_bias: bool,
}

impl NormOp {
    fn geometry(&self, dims: &[usize]) -> Result<NormGeometry> {
        match self.groups {
            None => {
                let n = dims.last().copied().unwrap_or(1);
                Ok(NormGeometry { len: n, per_channel: 1, groups_per_row: 1 })
            }
            Some(g) => {
                if dims.len() < 2 || g == 0 || dims[1] % g != 0 {
                    bail!("group_norm: {g} groups do not divide the channels of shape {dims:?}")
                }
                let spatial: usize = dims[2..].iter().product();
                Ok(NormGeometry {
                    len: dims[1] / g * spatial,
                    per_channel: spatial,
                    groups_per_row: g,
                })
            }
        }
    }

    fn name_str(&self) -> &'static str {
        if self.groups.is_some() {
            "gen-group-norm"
        } else {
            "gen-layer-norm"
        }
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        self.name_str()
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = self.geometry(lx.dims())?;
        let c = if geo.len == 0 { 0 } else { geo.channels() };
        if lw.shape().elem_count() != c || lb.shape().elem_count() != c {
            bail!(
                "{}: weight {:?} / bias {:?} do not match {c} channels of input {:?}",
                self.name(),
                lw.shape(),
                lb.shape(),
                lx.shape()
            )
        }
        let name = self.name();
        let out = match (sx, sw, sb) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(norm_fwd(
                    slice::<f32>(sx, lx, name)?,
                    slice(sw, lw, name)?,
                    slice(sb, lb, name)?,
                    &geo,
                    self.eps,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(norm_fwd(
                    slice::<f64>(sx, lx, name)?,
                    slice(sw, lw, name)?,
                    slice(sb, lb, name)?,
                    &geo,
                    self.eps,
                ))
            }
            _ => bail!(
                "{name}: unsupported dtypes {:?}, {:?}, {:?}",
                sx.dtype(),
                sw.dtype(),
                sb.dtype()
            ),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let geo = self.geometry(x.dims())?;
        let c = if geo.len == 0 { 0 } else { geo.channels() };
        let bwd = NormBwd { eps: self.eps, groups: self.groups };
        let flat = x.contiguous()?.apply_op3(&w.contiguous()?, &g.contiguous()?, bwd)?;
        let n = x.elem_count();
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = flat.narrow(0, n, c)?.reshape(w.shape())?;
        let db = flat.narrow(0, n + c, c)?.reshape(b.shape())?;
        Ok((Some(dx), self.has_weight.then_some(dw), self.has_bias.then_some(db)))
    }
}

/// `(x, w, g)` → flat `[dx, dw, db]` of a [`NormOp`].
struct NormBwd {
    eps: f64,
    groups: Option<usize>,
}

impl CustomOp3 for NormBwd {
    fn name(&self) -> &'static str {
        "gen-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = NormOp { eps: self.eps, groups: self.groups, has_weight: true, has_bias: true };
        let geo = op.geometry(lx.dims())?;
        let c = if geo.len == 0 { 0 } else { geo.channels() };
        if lg.shape() != lx.shape() || lw.shape().elem_count() != c {
            bail!(
                "{}: inconsistent shapes x {:?}, w {:?}, g {:?}",
                self.name(),
                lx.shape(),
                lw.shape(),
                lg.shape()
            )
        }
        let name = self.name();
        let out = match (sx, sw, sg) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(norm_bwd(
                    slice::<f32>(sx, lx, name)?,
                    slice(sw, lw, name)?,
                    slice(sg, lg, name)?,
                    &geo,
                    self.eps,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(norm_bwd(
                    slice::<f64>(sx, lx, name)?,
                    slice(sw, lw, name)?,
                    slice(sg, lg, name)?,
                    &geo,
                    self.eps,
                ))
            }
            _ => bail!(
                "{name}: unsupported dtypes {:?}, {:?}, {:?}",
                sx.dtype(),
                sw.dtype(),
                sg.dtype()
            ),
        };
        let len = lx.shape().elem_count() + 2 * c;
        Ok((out, Shape::from(len)))
    }
}

// ---------------------------------------------------------------------------------------------
// Nearest-neighbour upsampling.

/// `(B, C, H, W)` → `(B, C, sH, sW)`. Backward: sum over each `s × s` block (reshape + sum).
pub(crate) struct UpsampleNearest {
    pub scale: usize,
}

fn upsample_kernel<T: WithDType>(x: &[T], w: usize, s: usize) -> Vec<T> {
    let out_row = w * s;
    let mut out = vec![T::zero(); x.len() * s * s];
    if x.is_empty() {
        return out;
    }
    // One input row of W values → s output rows of sW values.
    out.par_chunks_mut(out_row * s)
        .zip(x.par_chunks(w))
        .with_min_len(min_rows(out_row * s))
        .for_each(|(o, xr)| {
            let (first, rest) = o.split_at_mut(out_row);
            for (j, &v) in xr.iter().enumerate() {
                first[j * s..(j + 1) * s].fill(v);
            }
            for r in rest.chunks_mut(out_row) {
                r.copy_from_slice(first);
            }
        });
    out
}

impl CustomOp1 for UpsampleNearest {
    fn name(&self) -> &'static str {
        "gen-upsample-nearest"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let s = self.scale;
        let name = self.name();
        let out = match st {
            CpuStorage::F32(_) => {
                CpuStorage::F32(upsample_kernel(slice::<f32>(st, l, name)?, w, s))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(upsample_kernel(slice::<f64>(st, l, name)?, w, s))
            }
            CpuStorage::F16(_) => {
                CpuStorage::F16(upsample_kernel(slice::<half::f16>(st, l, name)?, w, s))
            }
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(upsample_kernel(slice::<half::bf16>(st, l, name)?, w, s))
            }
            _ => bail!("{name}: unsupported dtype {:?}", st.dtype()),
        };
        Ok((out, Shape::from((b, c, h * s, w * s))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let s = self.scale;
        if g.device().is_cpu() && matches!(g.dtype(), DType::F32 | DType::F64) {
            return Ok(Some(g.contiguous()?.apply_op1(UpsampleNearestBwd { scale: s })?));
        }
        Ok(Some(g.reshape((b, c, h, s, w, s))?.sum(5)?.sum(3)?))
    }
}

/// Backward of [`UpsampleNearest`]: `(B, C, sH, sW)` → `(B, C, H, W)`, the sum of each block.
struct UpsampleNearestBwd {
    scale: usize,
}

fn upsample_bwd_kernel<T: WithDType>(g: &[T], w: usize, s: usize) -> Vec<T> {
    let mut out = vec![T::zero(); g.len() / (s * s)];
    if out.is_empty() {
        return out;
    }
    let in_row = w * s;
    // s gradient rows of sW values → one row of W block sums, added in a fixed order.
    out.par_chunks_mut(w)
        .zip(g.par_chunks(in_row * s))
        .with_min_len(min_rows(in_row * s))
        .for_each(|(o, gr)| {
            for r in gr.chunks(in_row) {
                for (oj, blk) in o.iter_mut().zip(r.chunks(s)) {
                    for &v in blk {
                        *oj += v;
                    }
                }
            }
        });
    out
}

impl CustomOp1 for UpsampleNearestBwd {
    fn name(&self) -> &'static str {
        "gen-upsample-nearest-bwd"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, hs, ws) = l.shape().dims4()?;
        let s = self.scale;
        if hs % s != 0 || ws % s != 0 {
            bail!("{}: gradient {:?} not divisible by scale {s}", self.name(), l.dims())
        }
        let name = self.name();
        let out = match st {
            CpuStorage::F32(_) => {
                CpuStorage::F32(upsample_bwd_kernel(slice::<f32>(st, l, name)?, ws / s, s))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(upsample_bwd_kernel(slice::<f64>(st, l, name)?, ws / s, s))
            }
            _ => bail!("{name}: unsupported dtype {:?}", st.dtype()),
        };
        Ok((out, Shape::from((b, c, hs / s, ws / s))))
    }
}

/// The dtype the fused kernels compute in for a tensor of `dtype`, or `None` if unsupported.
pub(crate) fn compute_dtype(dtype: DType) -> Option<DType> {
    match dtype {
        DType::F32 | DType::F64 => Some(dtype),
        DType::F16 | DType::BF16 => Some(DType::F32),
        _ => None,
    }
}
