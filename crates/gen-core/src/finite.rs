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

impl FloatBits {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    /// The exponent bits of one element (all set: NaN or infinite).
    fn exponent_mask(self) -> u64 {
        match self {
            Self::F16 => 0x7C00,
            Self::BF16 => 0x7F80,
            Self::F32 => 0x7F80_0000,
            Self::F64 => 0x7FF0_0000_0000_0000,
        }
    }
}

/// The index of the first NaN or infinite element of raw little-endian `bytes` (a value is
/// non-finite exactly when all its exponent bits are set); `None` when all are finite. A
/// trailing partial element is ignored.
///
/// Scans 8 bytes at a time: in each element-sized lane, `(x & mask) + lowest exponent bit`
/// reaches the lane's sign bit exactly when every exponent bit is set (and never carries into
/// the next lane), so a 64-byte block is tested with a few integer operations per word.
pub fn first_nonfinite_bits(bytes: &[u8], bits: FloatBits) -> Option<usize> {
    let size = bits.size();
    let lane_mask = bits.exponent_mask();
    let lane_one = lane_mask & lane_mask.wrapping_neg(); // lowest exponent bit
    let lane_sign = 1u64 << (size * 8 - 1);
    let (mut mask, mut one, mut sign) = (0u64, 0u64, 0u64);
    for lane in 0..8 / size {
        let shift = lane * size * 8;
        mask |= lane_mask << shift;
        one |= lane_one << shift;
        sign |= lane_sign << shift;
    }
    let bytes = &bytes[..bytes.len() / size * size];
    let slow = |block: &[u8], first: usize| -> Option<usize> {
        block
            .chunks_exact(size)
            .position(|c| {
                let mut b = [0u8; 8];
                b[..size].copy_from_slice(c);
                u64::from_le_bytes(b) & lane_mask == lane_mask
            })
            .map(|i| first + i)
    };
    let mut blocks = bytes.chunks_exact(64);
    for (k, block) in (&mut blocks).enumerate() {
        let mut hit = 0u64;
        for w in block.chunks_exact(8) {
            let x = u64::from_le_bytes(w.try_into().expect("8-byte chunk"));
            hit |= ((x & mask) + one) & sign;
        }
        if hit != 0 {
            return slow(block, k * 64 / size);
        }
    }
    let done = bytes.len() - blocks.remainder().len();
    slow(blocks.remainder(), done / size)
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

    /// The 64-byte block scan finds the element wherever it lies (every lane of a word, every
    /// word of a block, the remainder), and the largest finite values never trigger it.
    #[test]
    fn block_scan_finds_every_position() {
        let enc = |bits: FloatBits, x: f64| -> Vec<u8> {
            match bits {
                FloatBits::F16 => half::f16::from_f64(x).to_le_bytes().to_vec(),
                FloatBits::BF16 => half::bf16::from_f64(x).to_le_bytes().to_vec(),
                FloatBits::F32 => (x as f32).to_le_bytes().to_vec(),
                FloatBits::F64 => x.to_le_bytes().to_vec(),
            }
        };
        for bits in [FloatBits::F16, FloatBits::BF16, FloatBits::F32, FloatBits::F64] {
            let max = match bits {
                FloatBits::F16 => 65504.0,
                FloatBits::BF16 => half::bf16::MAX.to_f64(),
                FloatBits::F32 => f32::MAX as f64,
                FloatBits::F64 => f64::MAX,
            };
            let n = 101;
            let finite: Vec<u8> =
                (0..n).flat_map(|i| enc(bits, if i % 2 == 0 { max } else { -max })).collect();
            assert_eq!(first_nonfinite_bits(&finite, bits), None, "{bits:?}");
            for at in [0, 1, 3, 31, 32, 33, 63, 64, 99, 100] {
                for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                    let mut b = finite.clone();
                    let sz = bits.size();
                    b[at * sz..(at + 1) * sz].copy_from_slice(&enc(bits, bad));
                    assert_eq!(first_nonfinite_bits(&b, bits), Some(at), "{bits:?} {bad} at {at}");
                }
            }
        }
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
