//! Safetensors loading: dtype conversion, errors naming file and key, weight-file discovery,
//! config field errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gen_models::clip::ClipTextConfig;
use gen_models::loading::{
    find_weight_files, weights_vb, JsonConfig, SafetensorsWeights, WeightVariant,
};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-models-loading-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_weights(path: &Path) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let base = Tensor::new(&[[0.5f32, -1.25, 2.0], [3.0, 0.125, -4.5]], &dev)?;
    let mut m: HashMap<String, Tensor> = HashMap::new();
    m.insert("a.f32".into(), base.clone());
    m.insert("a.f16".into(), base.to_dtype(DType::F16)?);
    m.insert("a.bf16".into(), base.to_dtype(DType::BF16)?);
    m.insert("ids".into(), Tensor::new(&[1i64, 2, 3], &dev)?);
    candle_core::safetensors::save(&m, path)?;
    Ok(())
}

#[test]
fn loads_float_dtypes_to_requested_dtype() -> anyhow::Result<()> {
    let d = tmp("dtypes");
    let f = d.join("model.safetensors");
    write_weights(&f)?;
    let want = vec![0.5f64, -1.25, 2.0, 3.0, 0.125, -4.5];
    for dtype in [DType::F32, DType::F64, DType::F16] {
        let vb = weights_vb(std::slice::from_ref(&f), dtype, &Device::Cpu)?;
        for key in ["a.f32", "a.f16", "a.bf16"] {
            let t = vb.get((2, 3), key)?;
            assert_eq!(t.dtype(), dtype);
            let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            assert_eq!(v, want, "{key} as {dtype:?}");
        }
    }
    Ok(())
}

#[test]
fn errors_name_file_and_key() -> anyhow::Result<()> {
    let d = tmp("errors");
    let f = d.join("model.safetensors");
    write_weights(&f)?;
    let fname = f.display().to_string();
    let vb = weights_vb(std::slice::from_ref(&f), DType::F32, &Device::Cpu)?;
    let e = vb.get((3, 2), "a.f32").unwrap_err().to_string();
    assert!(
        e.contains(&fname) && e.contains("a.f32") && e.contains("[3, 2]") && e.contains("[2, 3]"),
        "{e}"
    );
    let e = vb.get(4, "nope.weight").unwrap_err().to_string();
    assert!(e.contains(&fname) && e.contains("nope.weight") && e.contains("missing"), "{e}");
    let e = vb.get(3, "ids").unwrap_err().to_string();
    assert!(e.contains(&fname) && e.contains("ids") && e.contains("I64"), "{e}");
    // errors through a model constructor keep the message
    let cfg = ClipTextConfig { num_hidden_layers: 1, ..ClipTextConfig::sd15() };
    let e = gen_models::clip::ClipTextTransformer::new(vb, &cfg).unwrap_err().to_string();
    assert!(
        e.contains(&fname) && e.contains("text_model.embeddings.token_embedding.weight"),
        "{e}"
    );
    Ok(())
}

#[test]
fn corrupt_and_truncated_files_are_rejected() -> anyhow::Result<()> {
    let d = tmp("corrupt");
    let good = d.join("good.safetensors");
    write_weights(&good)?;
    let bytes = std::fs::read(&good)?;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short.safetensors", bytes[..5].to_vec(), "8-byte"),
        ("truncated.safetensors", bytes[..bytes.len() - 7].to_vec(), "truncated"),
        (
            "hugeheader.safetensors",
            {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            "header length",
        ),
        (
            "badjson.safetensors",
            {
                let mut b = bytes.clone();
                b[8] = b'#';
                b
            },
            "JSON",
        ),
    ];
    for (name, data, expect) in cases {
        let p = d.join(name);
        std::fs::write(&p, data)?;
        let e = SafetensorsWeights::open(std::slice::from_ref(&p)).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains(expect), "{name}: {e}");
    }
    let e = SafetensorsWeights::open(&[d.join("absent.safetensors")]).unwrap_err().to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
    // the same key in two files
    let e = SafetensorsWeights::open(&[good.clone(), good.clone()]).unwrap_err().to_string();
    assert!(e.contains("is in both") && e.contains("good.safetensors"), "{e}");
    Ok(())
}

#[test]
fn unused_keys_are_reported() -> anyhow::Result<()> {
    let d = tmp("unused");
    let f = d.join("model.safetensors");
    write_weights(&f)?;
    let w = SafetensorsWeights::open(&[f])?;
    assert_eq!(w.keys().len(), 4);
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    vb.get((2, 3), "a.f32")?;
    vb.get((2, 3), "a.bf16")?;
    assert_eq!(w.unused_keys(), vec!["a.f16".to_string(), "ids".to_string()]);
    Ok(())
}

#[test]
fn finds_weight_files() -> anyhow::Result<()> {
    let d = tmp("find");
    let none = WeightVariant::default();
    let fp16 = WeightVariant { variant: Some("fp16".into()) };
    // only a variant: found
    std::fs::write(d.join("diffusion_pytorch_model.fp16.safetensors"), b"x")?;
    std::fs::write(d.join("config.json"), b"{}")?;
    assert_eq!(
        find_weight_files(&d, &none)?,
        vec![d.join("diffusion_pytorch_model.fp16.safetensors")]
    );
    // plain preferred by default, variant when asked
    std::fs::write(d.join("diffusion_pytorch_model.safetensors"), b"x")?;
    assert_eq!(find_weight_files(&d, &none)?, vec![d.join("diffusion_pytorch_model.safetensors")]);
    assert_eq!(
        find_weight_files(&d, &fp16)?,
        vec![d.join("diffusion_pytorch_model.fp16.safetensors")]
    );
    // sharded
    let s = tmp("sharded");
    std::fs::write(s.join("model-00001-of-00002.safetensors"), b"x")?;
    std::fs::write(s.join("model-00002-of-00002.safetensors"), b"x")?;
    std::fs::write(
        s.join("model.safetensors.index.json"),
        br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
    )?;
    assert_eq!(
        find_weight_files(&s, &none)?,
        vec![
            s.join("model-00001-of-00002.safetensors"),
            s.join("model-00002-of-00002.safetensors")
        ]
    );
    // pickle only: the error says safetensors is required and lists the folder
    let p = tmp("pickle");
    std::fs::write(p.join("pytorch_model.bin"), b"x")?;
    std::fs::write(p.join("config.json"), b"{}")?;
    let e = find_weight_files(&p, &none).unwrap_err().to_string();
    assert!(
        e.contains("safetensors is required")
            && e.contains("pytorch_model.bin")
            && e.contains("config.json"),
        "{e}"
    );
    let e = find_weight_files(&tmp("empty"), &none).unwrap_err().to_string();
    assert!(e.contains("(empty)") && !e.contains("required"), "{e}");
    Ok(())
}

#[test]
fn config_errors_name_file_and_key() -> anyhow::Result<()> {
    let d = tmp("config");
    let f = d.join("config.json");
    std::fs::write(&f, r#"{"hidden_size": "large", "num_attention_heads": 4}"#)?;
    let e = ClipTextConfig::from_file(&f).unwrap_err().to_string();
    assert!(
        e.contains(&f.display().to_string()) && e.contains("hidden_size") && e.contains("integer"),
        "{e}"
    );
    std::fs::write(&f, r#"{"hidden_size": 30, "num_attention_heads": 4}"#)?;
    let e = ClipTextConfig::from_file(&f).unwrap_err().to_string();
    assert!(e.contains("num_attention_heads") && e.contains("30"), "{e}");
    std::fs::write(&f, r#"{"hidden_act": "swish"}"#)?;
    let e = ClipTextConfig::from_file(&f).unwrap_err().to_string();
    assert!(e.contains("hidden_act") && e.contains("swish"), "{e}");
    std::fs::write(&f, r#"{"hidden_size": 32,"#)?;
    let e = ClipTextConfig::from_file(&f).unwrap_err().to_string();
    assert!(e.contains("JSON"), "{e}");
    let e = ClipTextConfig::from_file(d.join("nothere.json")).unwrap_err().to_string();
    assert!(e.contains("nothere.json"), "{e}");
    // defaults of transformers for absent fields; a CLIPModel config's text_config is used
    std::fs::write(
        &f,
        r#"{"text_config": {"hidden_size": 64, "num_attention_heads": 4}, "vision_config": {}}"#,
    )?;
    let c = ClipTextConfig::from_file(&f)?;
    assert_eq!(
        (c.hidden_size, c.vocab_size, c.max_position_embeddings, c.eos_token_id),
        (64, 49408, 77, 49407)
    );
    let j = JsonConfig::from_str("x.json", r#"{"a": 1}"#)?;
    assert_eq!(j.usize("b", Some(3))?, 3);
    assert!(j.usize("b", None).unwrap_err().to_string().contains("x.json"));
    Ok(())
}
