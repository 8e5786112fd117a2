//! 2-D convolution as a CPU custom op: im2col + GEMM forward, and a GEMM backward for both the
//! input (col2im of `Wᵀ·g`) and the kernel (`Σ_b g_b · col_bᵀ`).
//!
//! candle 0.11.1's CPU conv2d backward goes through its transposed convolution, a scalar loop
//! of one dot product per output pixel, which made it the dominant cost of training the UNet and
//! the VAE. This op handles `groups = 1`, `dilation = 1`, any stride and zero padding, in f32
//! and f64; [`crate::ops::conv2d`] falls back to candle for anything else.
//!
//! Layouts: `x` `(B, C, H, W)`, kernel `(O, C, kh, kw)`, output `(B, O, Ho, Wo)`, all
//! contiguous row-major. Work is split over the batch (one GEMM per sample, single-threaded)
//! when the batch can feed every thread; otherwise the GEMMs themselves run multi-threaded.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvGeom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeom {
    fn ho(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }
    fn wo(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }
    /// Rows of the im2col matrix.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Columns of the im2col matrix (output pixels per sample).
    fn n(&self) -> usize {
        self.ho() * self.wo()
    }
    /// A 1×1, stride-1, unpadded convolution: the input sample already is its im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
    /// Split over the batch when it can keep every thread busy.
    fn batch_parallel(&self) -> bool {
        self.b >= rayon::current_num_threads()
    }
    fn inner_par(&self) -> Parallelism {
        if self.batch_parallel() {
            Parallelism::None
        } else {
            Parallelism::Rayon(0)
        }
    }
}

/// Float types the op computes in.
pub(crate) trait ConvFloat: Copy + Send + Sync + 'static + std::ops::AddAssign {
    const ONE: Self;
    const ZERO: Self;
}
impl ConvFloat for f32 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}
impl ConvFloat for f64 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}

/// `col (K, N)` ← patches of one sample `x (C, H, W)`.
fn im2col<T: ConvFloat>(g: &ConvGeom, x: &[T], col: &mut [T]) {
    let (ho, wo, n) = (g.ho(), g.wo(), g.n());
    let (s, p) = (g.stride, g.padding);
    for c in 0..g.c {
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &mut col[((c * g.kh + i) * g.kw + j) * n..][..n];
                for oy in 0..ho {
                    let y = (oy * s + i) as isize - p as isize;
                    let dst = &mut row[oy * wo..(oy + 1) * wo];
                    if y < 0 || y >= g.h as isize {
                        dst.fill(T::ZERO);
                        continue;
                    }
                    let src = &xc[y as usize * g.w..(y as usize + 1) * g.w];
                    // output columns whose input column `ox·s + j − p` lies inside the row
                    let lo = (p.saturating_sub(j)).div_ceil(s).min(wo);
                    let hi =
                        if g.w + p > j { ((g.w + p - j - 1) / s + 1).min(wo) } else { 0 }.max(lo);
                    dst[..lo].fill(T::ZERO);
                    dst[hi..].fill(T::ZERO);
                    if s == 1 {
                        let x0 = lo + j - p;
                        dst[lo..hi].copy_from_slice(&src[x0..x0 + (hi - lo)]);
                    } else {
                        for (ox, d) in dst[lo..hi].iter_mut().enumerate() {
                            *d = src[(lo + ox) * s + j - p];
                        }
                    }
                }
            }
        }
    }
}

/// `dx (C, H, W)` += scatter of `dcol (K, N)` (the adjoint of [`im2col`]); `dx` starts zeroed.
fn col2im<T: ConvFloat>(g: &ConvGeom, dcol: &[T], dx: &mut [T]) {
    let (ho, wo, n) = (g.ho(), g.wo(), g.n());
    let (s, p) = (g.stride, g.padding);
    for c in 0..g.c {
        let dxc = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &dcol[((c * g.kh + i) * g.kw + j) * n..][..n];
                for oy in 0..ho {
                    let y = (oy * s + i) as isize - p as isize;
                    if y < 0 || y >= g.h as isize {
                        continue;
                    }
                    let dst = &mut dxc[y as usize * g.w..(y as usize + 1) * g.w];
                    let lo = (p.saturating_sub(j)).div_ceil(s).min(wo);
                    let hi =
                        if g.w + p > j { ((g.w + p - j - 1) / s + 1).min(wo) } else { 0 }.max(lo);
                    let src = &row[oy * wo + lo..oy * wo + hi];
                    if s == 1 {
                        let x0 = lo + j - p;
                        dst[x0..x0 + src.len()].iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                    } else {
                        for (ox, &v) in src.iter().enumerate() {
                            dst[(lo + ox) * s + j - p] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Row-major `dst (m, n) = [dst +] a (m, k) · b (k, n)`, where `a`/`b` may be read transposed:
/// `a_t` means `a` is stored `(k, m)`, `b_t` means `b` is stored `(n, k)`.
#[allow(clippy::too_many_arguments)]
fn matmul<T: ConvFloat>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    a_t: bool,
    b: &[T],
    b_t: bool,
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_rs, a_cs) = if a_t { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_t { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the slices hold the (m, n), (m, k) and (k, n) matrices at the given strides
    // (checked above in debug builds and by construction in the callers).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// Runs `f(out_b, in_b, scratch)` for every sample `b` (chunks of `out_len` / `in_len`), in
/// parallel over the batch when it can keep every thread busy, with one scratch buffer per
/// worker.
fn per_sample<T: ConvFloat>(
    g: &ConvGeom,
    out: &mut [T],
    out_len: usize,
    inp: &[T],
    in_len: usize,
    f: impl Fn(&mut [T], &[T], &mut Vec<T>) + Sync,
) {
    if g.batch_parallel() {
        out.par_chunks_mut(out_len)
            .zip(inp.par_chunks(in_len))
            .for_each_init(Vec::new, |buf, (o, i)| f(o, i, buf));
    } else {
        let mut buf = Vec::new();
        out.chunks_mut(out_len).zip(inp.chunks(in_len)).for_each(|(o, i)| f(o, i, &mut buf));
    }
}

/// `y (B, O, N) = W (O, K) · im2col(x_b) + bias` for every sample.
fn forward<T: ConvFloat>(g: &ConvGeom, x: &[T], w: &[T], bias: &[T]) -> Vec<T> {
    let (k, n) = (g.k(), g.n());
    let chw = g.c * g.h * g.w;
    let mut y = vec![T::ZERO; g.b * g.o * n];
    let par = g.inner_par();
    let one = |yb: &mut [T], xb: &[T], col: &mut Vec<T>| {
        for (row, &b) in yb.chunks_mut(n).zip(bias) {
            row.fill(b);
        }
        if g.is_pointwise() {
            matmul(g.o, n, k, yb, true, w, false, xb, false, par);
        } else {
            col.resize(k * n, T::ZERO);
            im2col(g, xb, col);
            matmul(g.o, n, k, yb, true, w, false, col, false, par);
        }
    };
    per_sample(g, &mut y, g.o * n, x, chw, one);
    y
}

/// `dx_b = col2im(Wᵀ · g_b)`.
fn grad_input<T: ConvFloat>(g: &ConvGeom, gy: &[T], w: &[T]) -> Vec<T> {
    let (k, n) = (g.k(), g.n());
    let chw = g.c * g.h * g.w;
    let mut dx = vec![T::ZERO; g.b * chw];
    let par = g.inner_par();
    let one = |dxb: &mut [T], gb: &[T], dcol: &mut Vec<T>| {
        if g.is_pointwise() {
            matmul(k, n, g.o, dxb, false, w, true, gb, false, par);
        } else {
            dcol.resize(k * n, T::ZERO);
            matmul(k, n, g.o, dcol, false, w, true, gb, false, par);
            col2im(g, dcol, dxb);
        }
    };
    per_sample(g, &mut dx, chw, gy, g.o * n, one);
    dx
}

/// `dW (O, K) = Σ_b g_b · im2col(x_b)ᵀ`.
fn grad_kernel<T: ConvFloat>(g: &ConvGeom, x: &[T], gy: &[T]) -> Vec<T> {
    let (k, n) = (g.k(), g.n());
    let chw = g.c * g.h * g.w;
    let par = g.inner_par();
    let one = |acc: &mut Vec<T>, col: &mut Vec<T>, xb: &[T], gb: &[T]| {
        if g.is_pointwise() {
            matmul(g.o, k, n, acc, true, gb, false, xb, true, par);
        } else {
            col.resize(k * n, T::ZERO);
            im2col(g, xb, col);
            matmul(g.o, k, n, acc, true, gb, false, col, true, par);
        }
    };
    let zero = || (vec![T::ZERO; g.o * k], Vec::new());
    if g.batch_parallel() {
        x.par_chunks(chw)
            .zip(gy.par_chunks(g.o * n))
            .fold(zero, |(mut acc, mut col), (xb, gb)| {
                one(&mut acc, &mut col, xb, gb);
                (acc, col)
            })
            .map(|(acc, _)| acc)
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, &b)| *a += b);
                a
            })
            .unwrap_or_else(|| vec![T::ZERO; g.o * k])
    } else {
        let (mut acc, mut col) = zero();
        for (xb, gb) in x.chunks(chw).zip(gy.chunks(g.o * n)) {
            one(&mut acc, &mut col, xb, gb);
        }
        acc
    }
}

/// `db (O) = Σ_b Σ_n g[b, o, n]`.
fn grad_bias<T: ConvFloat>(g: &ConvGeom, gy: &[T]) -> Vec<T> {
    let n = g.n();
    let mut db = vec![T::ZERO; g.o];
    for gb in gy.chunks(g.o * n) {
        for (d, row) in db.iter_mut().zip(gb.chunks(n)) {
            for &v in row {
                *d += v;
            }
        }
    }
    db
}

/// The contiguous data of a storage, or an error naming the op.
fn data<'a, T: candle_core::WithDType>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// Which computation a [`ConvOp`] performs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// `(grad_out, kernel)` → gradient of the input.
    GradInput,
    /// `(x, grad_out)` → gradient of the kernel.
    GradKernel,
}

/// The backward computations (see the module docs); `geom` describes the forward convolution.
#[derive(Debug, Clone, Copy)]
struct ConvGradOp {
    geom: ConvGeom,
    mode: Mode,
}

impl CustomOp2 for ConvGradOp {
    fn name(&self) -> &'static str {
        match self.mode {
            Mode::GradInput => "gen-conv2d-grad-input",
            Mode::GradKernel => "gen-conv2d-grad-kernel",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (name, g) = (self.name(), &self.geom);
        let out = match (s1, s2, self.mode) {
            (CpuStorage::F32(a), CpuStorage::F32(b), Mode::GradInput) => {
                CpuStorage::F32(grad_input(g, data(a, l1, name)?, data(b, l2, name)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), Mode::GradInput) => {
                CpuStorage::F64(grad_input(g, data(a, l1, name)?, data(b, l2, name)?))
            }
            (CpuStorage::F32(a), CpuStorage::F32(b), Mode::GradKernel) => {
                CpuStorage::F32(grad_kernel(g, data(a, l1, name)?, data(b, l2, name)?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), Mode::GradKernel) => {
                CpuStorage::F64(grad_kernel(g, data(a, l1, name)?, data(b, l2, name)?))
            }
            _ => bail!(
                "{name}: f32 or f64 inputs of one dtype expected, got {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        let shape = match self.mode {
            Mode::GradInput => Shape::from((g.b, g.c, g.h, g.w)),
            Mode::GradKernel => Shape::from((g.o, g.c, g.kh, g.kw)),
        };
        Ok((out, shape))
    }
}

/// Gradient of the bias: `(B, O, Ho, Wo)` → `(O)`.
#[derive(Debug, Clone, Copy)]
struct ConvGradBias(ConvGeom);

impl CustomOp1 for ConvGradBias {
    fn name(&self) -> &'static str {
        "gen-conv2d-grad-bias"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match s {
            CpuStorage::F32(a) => CpuStorage::F32(grad_bias(&self.0, data(a, l, name)?)),
            CpuStorage::F64(a) => CpuStorage::F64(grad_bias(&self.0, data(a, l, name)?)),
            _ => bail!("{name}: f32 or f64 expected, got {:?}", s.dtype()),
        };
        Ok((out, Shape::from(self.0.o)))
    }
}

/// The forward convolution `(x, kernel, bias)` → output.
#[derive(Debug, Clone, Copy)]
struct ConvOp(ConvGeom);

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "gen-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (name, g) = (self.name(), &self.0);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(
                forward(g, data(x, l1, name)?, data(w, l2, name)?, data(b, l3, name)?),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(
                forward(g, data(x, l1, name)?, data(w, l2, name)?, data(b, l3, name)?),
            ),
            _ => bail!(
                "{name}: f32 or f64 inputs of one dtype expected, got {:?}, {:?} and {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        Ok((out, Shape::from((g.b, g.o, g.ho(), g.wo()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let geom = self.0;
        let dx = grad.apply_op2_no_bwd(w, &ConvGradOp { geom, mode: Mode::GradInput })?;
        let dw = x.apply_op2_no_bwd(&grad, &ConvGradOp { geom, mode: Mode::GradKernel })?;
        let db = grad.apply_op1_no_bwd(&ConvGradBias(geom))?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Whether [`conv2d_gemm`] handles this case (CPU, f32/f64, one group, no dilation).
pub(crate) fn supported(x: &Tensor, kernel: &Tensor, groups: usize, dilation: usize) -> bool {
    x.device().is_cpu()
        && groups == 1
        && dilation == 1
        && x.dtype() == kernel.dtype()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// The im2col + GEMM convolution (see the module docs). `x`: `(B, C, H, W)`, `kernel`:
/// `(O, C, kh, kw)`, `bias`: `(O)` (zeros when `None`) → `(B, O, Ho, Wo)`. Call only when
/// [`supported`].
pub(crate) fn conv2d_gemm(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, kc, kh, kw) = kernel.dims4()?;
    if kc != c {
        bail!("conv2d: input has {c} channels but the kernel {:?} expects {kc}", kernel.dims())
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        bail!("conv2d: kernel {kh}x{kw} larger than padded input {h}x{w} + 2*{padding}")
    }
    let bias = match bias {
        Some(t) if t.elem_count() != o => bail!(
            "conv2d: bias has shape {:?}, expected ({o}) for kernel {:?}",
            t.dims(),
            kernel.dims()
        ),
        Some(t) => t.to_dtype(x.dtype())?.flatten_all()?.contiguous()?,
        None => Tensor::zeros(o, x.dtype(), x.device())?,
    };
    let geom = ConvGeom { b, c, h, w, o, kh, kw, stride: stride.max(1), padding };
    x.contiguous()?.apply_op3(&kernel.contiguous()?, &bias, ConvOp(geom))
}
