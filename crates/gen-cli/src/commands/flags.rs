//! Flags shared by several subcommands, defined once so that their names, value ranges and help
//! cannot drift apart: `gen image` and `gen eval` flatten the same guidance structs. The names
//! are `gen image`'s; older `gen eval` spellings stay as hidden aliases.

use anyhow::bail;
use clap::Args;
use gen_core::DeviceChoice;
use gen_diffusion::{ApgConfig, IntervalRange};
use gen_sample::Sampler;

/// The guidance scale (`gen image`, `gen eval images`).
#[derive(Debug, Clone, Args)]
pub struct ScaleFlag {
    /// Guidance scale w in D = u + w (c - u): 1 = no guidance, 0 = the unconditional
    /// prediction, negative steers away from the prompt; any finite number.
    #[arg(long, default_value_t = 7.5, alias = "scale", allow_negative_numbers = true, value_parser = finite)]
    pub guidance_scale: f64,
}

/// APG options over the preset's (`gen image --apg`, `gen eval` APG runs).
#[derive(Debug, Clone, Default, Args)]
pub struct ApgFlags {
    /// APG: weight of the update's component parallel to the conditional prediction (any
    /// finite number; paper preset: 0).
    #[arg(long, alias = "apg-eta", allow_negative_numbers = true, value_parser = finite)]
    pub eta: Option<f64>,
    /// APG: norm threshold r of the update (>= 0; 0 disables the rescaling). Default: the
    /// preset's r (tuned for SDXL's 4×128×128 latents) times sqrt(D / 65536), D = C·H·W of one
    /// latent.
    #[arg(long, alias = "apg-r", allow_negative_numbers = true, value_parser = non_negative)]
    pub norm_threshold: Option<f64>,
    /// APG: momentum beta (|beta| < 1, negative in the paper preset: -0.5; 0 disables).
    #[arg(long, alias = "apg-momentum", allow_negative_numbers = true, value_parser = momentum)]
    pub momentum: Option<f64>,
}

impl ApgFlags {
    /// The flags given, by their names.
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("--eta", self.eta.is_some()),
            ("--norm-threshold", self.norm_threshold.is_some()),
            ("--momentum", self.momentum.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, g)| g.then_some(n))
        .collect()
    }

    /// Errors when an APG flag is given but no APG run uses it; `how` says how to ask for APG.
    pub fn check_used(&self, apg_runs: bool, how: &str) -> anyhow::Result<()> {
        let given = self.given();
        if !apg_runs && !given.is_empty() {
            bail!("{} only apply to APG; {how} or drop them", given.join(", "));
        }
        Ok(())
    }

    /// `preset` with the given options replacing its own.
    pub fn apply(&self, mut preset: ApgConfig) -> ApgConfig {
        if let Some(e) = self.eta {
            preset.eta = e;
        }
        if let Some(r) = self.norm_threshold {
            preset.norm_threshold = r;
        }
        if let Some(m) = self.momentum {
            preset.momentum = m;
        }
        preset
    }
}

/// The guidance interval (`gen image`, `gen eval`).
#[derive(Debug, Clone, Args)]
pub struct IntervalFlag {
    /// Guide only in this interval: `a,b` = fractions of the steps (step floor(a·n) up to
    /// floor(b·n)), `sigma:lo,hi` = noise levels in (lo, hi], `t:lo,hi` = timesteps in [lo, hi].
    #[arg(long, value_parser = parse_interval)]
    pub guidance_interval: Option<IntervalRange>,
}

/// A finite number (negative allowed).
pub fn finite(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{s} is not finite"));
    }
    Ok(v)
}

/// A finite number >= 0.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v < 0.0 {
        return Err(format!("{v} is negative (must be >= 0)"));
    }
    Ok(v)
}

/// A number in [0, 1] (a fraction or a strength).
pub fn unit_interval(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is outside [0, 1]"));
    }
    Ok(v)
}

/// A momentum beta with |beta| < 1.
pub fn momentum(s: &str) -> Result<f64, String> {
    let v = finite(s)?;
    if v.abs() >= 1.0 {
        return Err(format!("{v} is outside (-1, 1)"));
    }
    Ok(v)
}

/// A whole number >= 1 (a count or a size); a negative number or 0 is a range error.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let v: i128 = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if v < 1 {
        return Err(format!("{v} is out of range (must be at least 1)"));
    }
    usize::try_from(v).map_err(|_| format!("{v} is too large"))
}

/// A whole number >= 0 (a seed or an index).
pub fn whole_u64(s: &str) -> Result<u64, String> {
    let v: i128 = s.trim().parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if v < 0 {
        return Err(format!("{v} is negative (must be >= 0)"));
    }
    u64::try_from(v).map_err(|_| format!("{v} is too large (at most {})", u64::MAX))
}

/// `WxH` or one number for a square, each side at least 1 pixel.
pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let num = |p: &str| {
        let v: i128 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not WxH (e.g. 512x512) or a single number"))?;
        if v < 1 {
            return Err(format!("`{s}`: {v} pixels is out of range (each side at least 1)"));
        }
        usize::try_from(v).map_err(|_| format!("`{s}`: {v} pixels is too large"))
    };
    match s.split_once(['x', 'X', '×']) {
        Some((w, h)) => Ok((num(w)?, num(h)?)),
        None => {
            let n = num(s)?;
            Ok((n, n))
        }
    }
}

pub fn parse_interval(s: &str) -> Result<IntervalRange, String> {
    IntervalRange::parse(s).map_err(|e| e.to_string())
}

pub fn parse_sampler(s: &str) -> Result<Sampler, String> {
    Sampler::parse(s).map_err(|e| e.to_string())
}

pub fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse::<DeviceChoice>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_intervals() {
        assert_eq!(parse_size("64x32").unwrap(), (64, 32));
        assert_eq!(parse_size("48").unwrap(), (48, 48));
        assert!(parse_size("64x").is_err());
        assert!(parse_size("-64").unwrap_err().contains("out of range"));
        assert!(parse_size("0x64").unwrap_err().contains("out of range"));
        assert_eq!(
            parse_interval("0.2,0.8").unwrap(),
            IntervalRange::StepFraction { start: 0.2, stop: 0.8 }
        );
        assert_eq!(
            parse_interval("sigma:0.28,5.42").unwrap(),
            IntervalRange::Sigma { lo: 0.28, hi: 5.42 }
        );
        assert_eq!(
            parse_interval("t:100,900").unwrap(),
            IntervalRange::Timestep { lo: 100.0, hi: 900.0 }
        );
        assert!(parse_interval("0.8,0.2").is_err());
        assert!(parse_interval("x:1,2").is_err());
    }

    #[test]
    fn number_ranges() {
        assert_eq!(finite("-1.5").unwrap(), -1.5);
        assert!(finite("inf").is_err() && finite("abc").is_err());
        assert_eq!(non_negative("0").unwrap(), 0.0);
        assert!(non_negative("-6").unwrap_err().contains("must be >= 0"));
        assert_eq!(momentum("-0.5").unwrap(), -0.5);
        assert!(momentum("1").unwrap_err().contains("outside (-1, 1)"));
        assert_eq!(unit_interval("1").unwrap(), 1.0);
        assert!(unit_interval("-0.1").unwrap_err().contains("outside [0, 1]"));
        assert_eq!(at_least_one("3").unwrap(), 3);
        assert!(at_least_one("-6").unwrap_err().contains("at least 1"));
        assert!(at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(whole_u64("-1").unwrap_err().contains("negative"));
    }
}
