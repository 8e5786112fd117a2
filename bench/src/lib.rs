//! Helpers for the benchmarks in `bench/benches/` (run with `cargo bench -p gen-bench`).
//!
//! Benchmarks are measurements, not tests: they print tables and never fail on a number.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use candle_transformers::models::stable_diffusion::unet_2d;
use gen_models::unet::UNetConfig;

/// The tiny prior's UNet (~1.5 M parameters): block_out_channels (32, 64, 64), one layer per
/// block, 8 heads, 64-wide text conditioning, 4 latent channels.
pub fn tiny_unet_config() -> Result<UNetConfig> {
    Ok(UNetConfig::from_json(
        &serde_json::json!({
            "in_channels": 4, "out_channels": 4, "sample_size": 16,
            "block_out_channels": [32, 64, 64], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 32
        }),
        "tiny UNet bench config",
    )?)
}

/// The UNet of the embedded prior (`gen train`'s real preset, exactly as trained and shipped).
pub fn prior_unet_config() -> Result<UNetConfig> {
    let cfg = gen_pretrain::PretrainConfig::real();
    Ok(UNetConfig::from_json(
        &gen_pretrain::stages::unet_config_json(&cfg),
        "gen-pretrain real preset unet.config",
    )?)
}

/// Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 `unet/config.json`, 860 M
/// parameters).
pub fn sd15_unet_config() -> Result<UNetConfig> {
    Ok(UNetConfig::from_json(
        &serde_json::json!({
            "in_channels": 4, "out_channels": 4, "sample_size": 64,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32
        }),
        "SD 1.5 UNet bench config",
    )?)
}

/// The same architecture as a candle-transformers `UNet2DConditionModelConfig`.
pub fn candle_unet_config(cfg: &UNetConfig) -> Result<unet_2d::UNet2DConditionModelConfig> {
    let n = cfg.block_out_channels.len();
    let heads = cfg.num_attention_heads.clone().unwrap_or_else(|| cfg.attention_head_dim.clone());
    let heads = heads.expand(n).context("attention heads per block")?;
    let layers = cfg.layers_per_block.expand(n).context("layers_per_block")?;
    ensure!(
        layers.iter().all(|&l| l == layers[0]),
        "candle-transformers needs one layers_per_block"
    );
    let blocks = (0..n)
        .map(|i| unet_2d::BlockConfig {
            out_channels: cfg.block_out_channels[i],
            use_cross_attn: (cfg.down_block_types[i] == "CrossAttnDownBlock2D").then_some(1),
            attention_head_dim: heads[i],
        })
        .collect();
    Ok(unet_2d::UNet2DConditionModelConfig {
        center_input_sample: cfg.center_input_sample,
        flip_sin_to_cos: cfg.flip_sin_to_cos,
        freq_shift: cfg.freq_shift,
        blocks,
        layers_per_block: layers[0],
        downsample_padding: cfg.downsample_padding,
        mid_block_scale_factor: 1.0,
        norm_num_groups: cfg.norm_num_groups.context("norm_num_groups")?,
        norm_eps: cfg.norm_eps,
        cross_attention_dim: cfg.cross_attention_dim,
        sliced_attention_size: None,
        use_linear_projection: cfg.use_linear_projection,
    })
}

/// Overwrites every variable of `varmap` with seeded random values (the rule of
/// `scripts/make_tiny_sd.py`): weights with ≥ 2 dims N(0, 1/fan_in), other `*weight`
/// (normalisation scales) 1 + 0.1 N(0, 1), the rest 0.1 N(0, 1).
pub fn randomize(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = gen_core::SeededRng::new(seed);
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let r = rng.randn(dims.as_slice(), DType::F32, &Device::Cpu)?;
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            (r / (fan_in as f64).sqrt())?
        } else if name.ends_with("weight") {
            ((r * 0.1)? + 1.0)?
        } else {
            (r * 0.1)?
        };
        var.set(&t)?;
    }
    Ok(())
}

/// Detached tensors sharing storage with the variables of `varmap` (for inference models that
/// must not record a gradient graph).
pub fn detached_weights(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
}

/// Number of parameters held by `varmap`.
pub fn num_params(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

/// Timing summary in milliseconds: wall clock, and CPU time of the whole process (all threads;
/// steadier than wall time on a shared machine, NaN where `/proc/self/stat` is unavailable).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub cpu_median_ms: f64,
    pub reps: usize,
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} ms (min {:.1}, n={}; cpu {:.1} ms)",
            self.median_ms, self.min_ms, self.reps, self.cpu_median_ms
        )
    }
}

/// User + system CPU time of this process in seconds, from `/proc/self/stat` (Linux; clock
/// ticks of 1/100 s, the Linux default).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after the parenthesised command name; utime and stime are fields 14 and 15
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Runs `f` `warmup` times untimed, then `reps` times, and returns the median and minimum.
pub fn time_it(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    ensure!(reps > 0, "reps must be > 0");
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(reps);
    let mut cpu_ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let c0 = process_cpu_seconds();
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu_ms.push(match (c0, process_cpu_seconds()) {
            (Some(a), Some(b)) => (b - a) * 1e3,
            _ => f64::NAN,
        });
    }
    Ok(Timing {
        median_ms: median(&mut ms),
        min_ms: ms.iter().cloned().fold(f64::INFINITY, f64::min),
        cpu_median_ms: median(&mut cpu_ms),
        reps,
    })
}

/// Median of `v` (mean of the two middle values for an even count). Sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_advances() {
        // Spin until this process has used 50 ms of CPU (the machine may be shared, so wall time
        // says little); a counter that never moved would time out.
        let a = process_cpu_seconds().expect("/proc/self/stat");
        let t0 = Instant::now();
        let mut x = 0u64;
        let mut b = a;
        while b - a < 0.05 && t0.elapsed().as_secs() < 20 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            b = process_cpu_seconds().expect("/proc/self/stat");
        }
        std::hint::black_box(x);
        assert!(
            b - a >= 0.05,
            "cpu time advanced by {} s in {:.1} s",
            b - a,
            t0.elapsed().as_secs_f64()
        );
    }

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn tiny_config_has_about_1_5m_params() -> Result<()> {
        let cfg = tiny_unet_config()?;
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        gen_models::unet::UNet2DConditionModel::new(vb, &cfg)?;
        let n = num_params(&varmap);
        // diffusers counts 1,489,028 parameters for this configuration.
        assert_eq!(n, 1_489_028);
        Ok(())
    }
}
