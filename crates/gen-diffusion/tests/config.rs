//! Scheduler configs as diffusers writes them: parsing, per-scheduler defaults, clear errors
//! naming the file and field, round trips.

use anyhow::Result;
use candle_core::{DType, Device};
use gen_core::SeededRng;
use gen_diffusion::{
    BetaSchedule, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing,
};

/// Stable Diffusion 1.5's scheduler/scheduler_config.json (a PNDM config).
const SD15: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

const SD21: &str = r#"{
  "_class_name": "DDIMScheduler",
  "_diffusers_version": "0.8.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "v_prediction",
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null
}"#;

fn tmp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("gen-diffusion-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn stable_diffusion_configs_parse() -> Result<()> {
    let c = SchedulerConfig::from_json_str(SD15, "sd15/scheduler_config.json")?;
    assert_eq!(c.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(
        (c.beta_schedule, c.steps_offset, c.set_alpha_to_one, c.clip_sample),
        (BetaSchedule::ScaledLinear, 1, false, Some(false))
    );
    assert_eq!(c.prediction_type, PredictionType::Epsilon);
    // PNDM is not implemented: the error lists what is
    let err = c.build().err().unwrap().to_string();
    for k in SchedulerKind::ALL {
        assert!(err.contains(k.class_name()), "{err}");
    }
    assert!(err.contains("PNDMScheduler"), "{err}");
    // ... but any known scheduler can be built from it, with that scheduler's defaults
    let mut ddim = c.build_as(SchedulerKind::Ddim)?;
    ddim.set_timesteps(10, None)?;
    assert_eq!(ddim.timesteps()[0], 901.0); // leading + steps_offset
    let mut euler = c.build_as(SchedulerKind::Euler)?;
    euler.set_timesteps(10, None)?;
    assert_eq!(euler.timesteps()[0], 999.0); // linspace is Euler's default
    assert_eq!(c.spacing_for(SchedulerKind::Euler), TimestepSpacing::Linspace);

    let v = SchedulerConfig::from_json_str(SD21, "sd21/scheduler_config.json")?;
    let s = v.build()?;
    assert_eq!(s.kind(), SchedulerKind::Ddim);
    assert_eq!(s.prediction_type(), PredictionType::VPrediction);
    Ok(())
}

#[test]
fn errors_name_the_file_and_field() -> Result<()> {
    let p = tmp_file("bad_type.json", r#"{"_class_name": "DDIMScheduler", "beta_start": "abc"}"#);
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("bad_type.json") && e.contains("beta_start") && e.contains("number"), "{e}");

    let p = tmp_file("bad_pred.json", r#"{"prediction_type": "flow"}"#);
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad_pred.json")
            && e.contains("prediction_type")
            && e.contains("epsilon, v_prediction, sample"),
        "{e}"
    );

    let p = tmp_file("bad_schedule.json", r#"{"beta_schedule": "sigmoid"}"#);
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("beta_schedule") && e.contains("squaredcos_cap_v2"), "{e}");

    let p = tmp_file("thresh.json", r#"{"thresholding": true}"#);
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("thresh.json") && e.contains("thresholding"), "{e}");
    // the diffusers default of an unmodelled field is fine
    let p =
        tmp_file("thresh_off.json", r#"{"thresholding": false, "algorithm_type": "dpmsolver++"}"#);
    SchedulerConfig::from_file(&p)?;

    let p = tmp_file(
        "algo.json",
        r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#,
    );
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("algorithm_type") && e.contains("sde-dpmsolver++"), "{e}");

    let p = tmp_file("betas.json", r#"{"trained_betas": [0.1, 0.2], "num_train_timesteps": 10}"#);
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("betas.json") && e.contains("trained_betas"), "{e}");

    let p = tmp_file("order.json", r#"{"solver_order": 3}"#);
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("solver_order"), "{e}");

    let p = tmp_file("broken.json", r#"{"beta_start": 0.1"#);
    let e = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("broken.json"), "{e}");

    let missing = std::env::temp_dir().join("gen-diffusion-no-such-dir/scheduler_config.json");
    let e = SchedulerConfig::from_file(&missing).unwrap_err().to_string();
    assert!(e.contains("gen-diffusion-no-such-dir"), "{e}");

    let e = SchedulerKind::parse("LMSDiscreteScheduler").unwrap_err().to_string();
    assert!(
        e.contains("LMSDiscreteScheduler") && e.contains("DDIMScheduler") && e.contains("dpmpp_2m"),
        "{e}"
    );
    assert_eq!(SchedulerKind::parse("euler_a")?, SchedulerKind::EulerAncestral);
    assert_eq!(
        SchedulerKind::parse("DPMSolverMultistepScheduler")?,
        SchedulerKind::DpmSolverMultistep
    );
    Ok(())
}

#[test]
fn config_round_trips_through_json_and_serde() -> Result<()> {
    let mut c = SchedulerConfig::stable_diffusion(SchedulerKind::DpmSolverMultistep);
    c.use_karras_sigmas = true;
    c.solver_type_heun = true;
    c.timestep_spacing = Some(TimestepSpacing::Trailing);
    c.prediction_type = PredictionType::VPrediction;
    c.eta = 0.25;
    let text = serde_json::to_string(&c)?;
    assert!(
        text.contains(r#""solver_type":"heun""#)
            && text.contains(r#""_class_name":"DPMSolverMultistepScheduler""#),
        "{text}"
    );
    let back = SchedulerConfig::from_json_str(&text, "roundtrip")?;
    assert_eq!(back, c);
    let via_serde: SchedulerConfig = serde_json::from_str(&text)?;
    assert_eq!(via_serde, c);
    Ok(())
}

#[test]
fn boxed_clone_keeps_multistep_state() -> Result<()> {
    let mut s = SchedulerConfig::stable_diffusion(SchedulerKind::DpmSolverMultistep).build()?;
    s.set_timesteps(8, None)?;
    let mut rng = SeededRng::new(2);
    let mut x = rng.randn((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
    let ts = s.timesteps().to_vec();
    for &t in &ts[..3] {
        let m = rng.randn((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
        x = s.step(&m, t, &x, &mut rng)?.prev_sample;
    }
    let mut c = s.boxed_clone();
    let m = rng.randn((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
    let a = s.step(&m, ts[3], &x, &mut rng)?.prev_sample.flatten_all()?.to_vec1::<f32>()?;
    let b = c.step(&m, ts[3], &x, &mut rng)?.prev_sample.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    // stepping past the end is an error, not a panic
    let mut d = SchedulerConfig::stable_diffusion(SchedulerKind::Euler).build()?;
    d.set_timesteps(2, None)?;
    let ts = d.timesteps().to_vec();
    for &t in &ts {
        x = d.step(&m, t, &x, &mut rng)?.prev_sample;
    }
    assert!(d.step(&m, ts[1], &x, &mut rng).is_err());
    Ok(())
}
