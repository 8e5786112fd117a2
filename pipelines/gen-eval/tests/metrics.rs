//! The model-card metrics ([`gen_eval::metrics`]) on a model trained with the tiny preset and
//! exported (values of an untrained tiny model are only range-checked), and the Fréchet
//! distance by hand.

use candle_core::{DType, Device};
use gen_eval::metrics::{evaluator_accuracy, generation_accuracy, vae_psnr, GenerationSettings};
use gen_models::evaluator::Evaluator;
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_pretrain::data::WorldData;
use gen_pretrain::{PretrainConfig, RunControl, Stage, Trainer};

#[test]
fn metrics_on_a_tiny_trained_model() -> anyhow::Result<()> {
    let out = std::env::temp_dir().join(format!("gen-eval-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cfg = PretrainConfig::tiny();
    let mut trainer = Trainer::new(cfg.clone(), &out, &Device::Cpu)?;
    trainer.run(&Stage::ALL, &RunControl::default(), &mut |_| {})?;
    let dest = out.join("export");
    gen_pretrain::export::export(&out, &dest, DType::F32)?;
    let pipe = SdPipeline::load(&ModelSource::Local(dest.clone()), &LoadOptions::default())?;

    let eval = Evaluator::load(&dest.join("evaluator"), &Device::Cpu)?;
    let mut data = WorldData::new(cfg.image_size, cfg.supersample, cfg.pool_size, &Device::Cpu)?;
    let psnr = vae_psnr(&pipe.vae, &mut data, 4)?;
    assert!(psnr.is_finite() && psnr > 5.0, "{psnr}");
    let acc = evaluator_accuracy(&eval, &mut data, 8)?;
    assert_eq!(acc.n, 8);
    let settings =
        GenerationSettings { prompts: 2, steps: 2, guidance_scale: 3.0, seed: 1, batch: 2 };
    let (gacc, report, imgs) = generation_accuracy(&pipe, &eval, &mut data, &settings)?;
    assert_eq!(gacc.n, 2);
    assert!(
        report.tiny_fid.is_finite() && (0.0..=1.0).contains(&report.clipped_fraction),
        "{report:?}"
    );
    assert!(report.saturation_real > 0.0 && report.saturation_real <= 1.0, "{report:?}");
    assert_eq!(imgs.dims(), &[2, 3, 16, 16]);
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

#[test]
fn frechet_distance_by_hand() -> anyhow::Result<()> {
    use gen_eval::metrics::frechet_distance;
    // 1-D: a = {0, 2} (mean 1, variance 2), b = {1, 5} (mean 3, variance 8):
    // (1 - 3)² + 2 + 8 - 2 sqrt(2 * 8) = 6
    let fd = frechet_distance(&[vec![0.0], vec![2.0]], &[vec![1.0], vec![5.0]])?;
    assert!((fd - 6.0).abs() < 1e-9, "{fd}");
    // identical sets: 0; a shifted copy: the squared shift
    let a: Vec<Vec<f64>> =
        (0..6).map(|i| vec![i as f64, (i * i) as f64 * 0.5, (i % 3) as f64]).collect();
    assert!(frechet_distance(&a, &a)?.abs() < 1e-9);
    let b: Vec<Vec<f64>> = a.iter().map(|r| vec![r[0] + 1.0, r[1], r[2] - 2.0]).collect();
    assert!((frechet_distance(&a, &b)? - 5.0).abs() < 1e-9);
    assert!(frechet_distance(&a[..1], &b).is_err());
    Ok(())
}
