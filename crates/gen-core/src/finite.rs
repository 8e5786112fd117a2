//! Finding NaN and infinite values in weights, checkpoints and training state, so that a
//! corrupt file or a diverged run is an error naming the tensor instead of a silently wrong
//! (e.g. all-black) result.

use candle_core::{DType, Tensor};

use crate::Result;

/// A float encoding whose raw little-endian bytes [`first_nonfinite_bits`] can scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatBits {
    F16,
    BF16,
    F32,
    F64,
}

impl FloatBits {
    /// The encoding of a candle float dtype; `None` for integer dtypes.
    pub fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::BF16),
            DType::F32 => Some(Self::F32),
            DType::F64 => Some(Self::F64),
            _ => None,
        }
    }
}

/// The index of the first NaN or infinite element of raw little-endian `bytes` (a value is
/// non-finite exactly when all its exponent bits are set); `None` when all are finite. A
/// trailing partial element is ignored.
pub fn first_nonfinite_bits(bytes: &[u8], bits: FloatBits) -> Option<usize> {
    fn scan<const N: usize>(bytes: &[u8], exp: u64) -> Option<usize> {
        bytes.chunks_exact(N).position(|c| {
            let mut b = [0u8; 8];
            b[..N].copy_from_slice(c);
            u64::from_le_bytes(b) & exp == exp
        })
    }
    match bits {
        FloatBits::F16 => scan::<2>(bytes, 0x7C00),
        FloatBits::BF16 => scan::<2>(bytes, 0x7F80),
        FloatBits::F32 => scan::<4>(bytes, 0x7F80_0000),
        FloatBits::F64 => scan::<8>(bytes, 0x7FF0_0000_0000_0000),
    }
}

/// The first NaN or infinite element of a float tensor: `(flat index, value)`; `None` when
/// all are finite or the tensor is not a float tensor.
pub fn first_nonfinite(t: &Tensor) -> Result<Option<(usize, f64)>> {
    if FloatBits::of(t.dtype()).is_none() {
        return Ok(None);
    }
    let flat = t.flatten_all()?;
    let found = if t.dtype() == DType::F64 {
        flat.to_vec1::<f64>()?.into_iter().enumerate().find(|(_, x)| !x.is_finite())
    } else {
        // f16 and bf16 widen exactly to f32
        flat.to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .enumerate()
            .find(|(_, x)| !x.is_finite())
            .map(|(i, x)| (i, x as f64))
    };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_nan_and_inf_in_every_encoding() {
        let vals = [1.0f32, -0.0, 65504.0, f32::MIN_POSITIVE, f32::NAN, f32::INFINITY];
        for (bits, bytes) in [
            (FloatBits::F32, vals.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()),
            (
                FloatBits::F64,
                vals.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect::<Vec<u8>>(),
            ),
            (
                FloatBits::F16,
                vals.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            ),
            (
                FloatBits::BF16,
                vals.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            ),
        ] {
            assert_eq!(first_nonfinite_bits(&bytes, bits), Some(4), "{bits:?}");
            let n = bytes.len() / vals.len();
            assert_eq!(first_nonfinite_bits(&bytes[..4 * n], bits), None, "{bits:?}");
            assert_eq!(first_nonfinite_bits(&bytes[5 * n..], bits), Some(0), "{bits:?}: inf");
        }
        // the largest finite values are finite
        assert_eq!(first_nonfinite_bits(&f32::MAX.to_le_bytes(), FloatBits::F32), None);
        assert_eq!(first_nonfinite_bits(&half::f16::MAX.to_le_bytes(), FloatBits::F16), None);
    }

    #[test]
    fn finds_the_first_nonfinite_tensor_element() -> Result<()> {
        let t = Tensor::new(&[[1f32, 2.0], [f32::NEG_INFINITY, f32::NAN]], &Device::Cpu)?;
        assert_eq!(first_nonfinite(&t)?, Some((2, f64::NEG_INFINITY)));
        assert_eq!(first_nonfinite(&t.to_dtype(DType::F16)?)?.map(|x| x.0), Some(2));
        assert_eq!(first_nonfinite(&t.narrow(0, 0, 1)?)?, None);
        let i = Tensor::new(&[1u32, 2], &Device::Cpu)?;
        assert_eq!(first_nonfinite(&i)?, None);
        Ok(())
    }
}
