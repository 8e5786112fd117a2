//! An explicit seeded random generator. The same seed gives the same numbers on every run
//! and machine (ChaCha8), independent of candle's device RNG.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// Seeded generator for noise tensors and random choices.
#[derive(Debug, Clone)]
pub struct SeededRng {
    inner: ChaCha8Rng,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self { inner: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// A generator for stream `stream` of this seed (e.g. one per sample of a batch).
    pub fn fork(seed: u64, stream: u64) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(stream);
        Self { inner }
    }

    /// Standard normal tensor of `shape`, generated on the CPU in f32, then moved to `device`
    /// and cast to `dtype` — so the values do not depend on the device.
    pub fn randn(
        &mut self,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.inner)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
    }

    /// Uniform [lo, hi) tensor of `shape`.
    pub fn rand_uniform(
        &mut self,
        shape: impl Into<Shape>,
        lo: f32,
        hi: f32,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let v: Vec<f32> = (0..n).map(|_| self.inner.random_range(lo..hi)).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
    }

    /// One standard normal sample.
    pub fn normal(&mut self) -> f32 {
        StandardNormal.sample(&mut self.inner)
    }

    /// Uniform f32 in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.inner.random::<f32>()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        self.inner.random_range(0..n)
    }

    /// Access to the underlying `rand` generator.
    pub fn inner(&mut self) -> &mut ChaCha8Rng {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn same_seed_same_tensor() {
        let a = SeededRng::new(7).randn((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = SeededRng::new(7).randn((2, 3), DType::F32, &Device::Cpu).unwrap();
        let c = SeededRng::new(8).randn((2, 3), DType::F32, &Device::Cpu).unwrap();
        let (a, b, c) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
