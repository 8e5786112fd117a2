//! Seeded mutation tests of LoRA files in every format (kohya, PEFT with baked alpha, PEFT with
//! `lora_adapter_metadata`): every mutated file is read and, when it reads, applied to a small
//! model — a clean error or a valid result, never a panic or an abort. Also: a file holding a
//! NaN is refused naming the file and the tensor.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gen_core::fuzz::Mutator;
use gen_core::SeededRng;
use gen_ops::nn::Linear;
use gen_optim::lora::*;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gen-optim-fuzz-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// `blk.attn.to_q` (6→5) and `blk.attn.to_out.0` (5→4).
fn model() -> Result<Vec<Linear>> {
    let mut rng = SeededRng::new(3);
    let mut lin = |name: &str, i: usize, o: usize| -> Result<Linear> {
        let w = rng.randn((o, i), DType::F32, &Device::Cpu)?;
        Ok(Linear::from_weights(name, w, None))
    };
    Ok(vec![lin("blk.attn.to_q", 6, 5)?, lin("blk.attn.to_out.0", 5, 4)?])
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 3.0,
        dropout: 0.0,
        init: LoraInit::Kaiming,
        target_modules: vec!["to_q".into(), "to_out.0".into()],
    }
}

#[test]
fn fuzz_lora_files() -> Result<()> {
    let m = model()?;
    let set = attach_lora(&m, "unet", &lora_cfg(), &mut SeededRng::new(4))?;
    let formats = [
        ("kohya", LoraSaveOptions { format: LoraFormat::Kohya, ..Default::default() }),
        ("peft", LoraSaveOptions { format: LoraFormat::Peft, ..Default::default() }),
        (
            "peft-metadata",
            LoraSaveOptions {
                format: LoraFormat::Peft,
                peft_alpha: PeftAlpha::Metadata,
                dtype: DType::F16,
            },
        ),
    ];
    let mut files = Vec::new();
    for (name, opts) in &formats {
        let path = tmp(&format!("{name}.safetensors"));
        save_lora(&[&set], &path, opts)?;
        files.push((name, std::fs::read(&path)?));
    }
    set.detach();
    let path = tmp("mutated.safetensors");
    for (name, base) in files {
        let (mut ok, mut err, mut panics) = (0, 0, Vec::new());
        for seed in 0..300 {
            let (bytes, kinds) = Mutator::new(seed).mutate(&base);
            let case = || -> gen_core::Result<()> {
                std::fs::write(&path, &bytes).map_err(|e| gen_core::Error::io(&path, e))?;
                let file = read_lora_file(&path, &Device::Cpu)?;
                let applied = apply_lora(&file, "unet", &m, &ApplyOptions::default())?;
                applied.set.detach();
                Ok(())
            };
            match catch_unwind(AssertUnwindSafe(case)) {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => {
                    let e = e.to_string();
                    assert!(e.contains("mutated.safetensors") || e.contains("LoRA"), "{e}");
                    err += 1;
                }
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    panics.push(format!("case {seed} {kinds:?}: {msg}"));
                }
            }
        }
        assert!(panics.is_empty(), "{name}: {} panics:\n{}", panics.len(), panics.join("\n"));
        assert!(err > 100, "{name}: {err} errors");
        eprintln!("{name}: 300 cases, {ok} valid, {err} clean errors");
    }
    Ok(())
}

#[test]
fn nan_in_a_lora_file_is_refused() -> Result<()> {
    let m = model()?;
    let set = attach_lora(&m, "unet", &lora_cfg(), &mut SeededRng::new(4))?;
    let path = tmp("nan.safetensors");
    save_lora(&[&set], &path, &LoraSaveOptions::default())?;
    set.detach();
    let mut map = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let key = "lora_unet_blk_attn_to_q.lora_up.weight";
    let mut v = map[key].flatten_all()?.to_vec1::<f32>()?;
    v[4] = f32::NAN;
    map.insert(key.into(), Tensor::from_vec(v, map[key].dims(), &Device::Cpu)?);
    candle_core::safetensors::save(&map, &path)?;
    let e = read_lora_file(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains(key) && e.contains("element 4"),
        "{e}"
    );
    Ok(())
}
