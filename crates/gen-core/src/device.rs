//! Device choice: CPU, CUDA or Metal.

use candle_core::Device;

use crate::{Error, Result};

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA or Metal when compiled in and available, CPU otherwise.
    #[default]
    Auto,
    Cpu,
    /// CUDA device with the given ordinal.
    Cuda(usize),
    Metal(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        let ordinal = |rest: &str| -> Result<usize> {
            if rest.is_empty() {
                return Ok(0);
            }
            rest.trim_start_matches(':')
                .parse()
                .map_err(|_| Error::invalid("device", format!("bad ordinal in `{s}`")))
        };
        match s.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            _ if s.starts_with("cuda") => Ok(DeviceChoice::Cuda(ordinal(&s[4..])?)),
            _ if s.starts_with("metal") => Ok(DeviceChoice::Metal(ordinal(&s[5..])?)),
            _ => Err(Error::invalid(
                "device",
                format!("`{s}` (expected auto, cpu, cuda[:N] or metal[:N])"),
            )),
        }
    }
}

/// Opens the chosen device; `Auto` falls back to the CPU.
pub fn pick_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(i) => {
            Device::new_cuda(i).map_err(|e| Error::msg(format!("cannot open cuda:{i}: {e}")))
        }
        DeviceChoice::Metal(i) => {
            Device::new_metal(i).map_err(|e| Error::msg(format!("cannot open metal:{i}: {e}")))
        }
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda:1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(1));
        assert_eq!("metal".parse::<DeviceChoice>().unwrap(), DeviceChoice::Metal(0));
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }
}
