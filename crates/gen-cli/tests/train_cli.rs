//! `gen train` end to end on the tiny preset: a background run (stderr not a terminal) logs
//! plain lines, and a second invocation resumes instead of starting over.

use std::process::Command;

#[test]
fn train_logs_plain_lines_without_a_terminal_and_resumes() {
    let out = std::env::temp_dir().join(format!("gen-train-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--preset",
            "tiny",
            "--stages",
            "evaluator",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_gen")).args(&args).output().expect("gen runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let first = run(&["--stop-after", "20"]);
    assert!(first.contains("from step 0 of 30"), "{first}");
    assert!(first.contains("evaluator: checkpoint at step 20"), "{first}");
    assert!(!first.contains("checkpoint at step 30"), "stopped early: {first}");
    let second = run(&[]);
    assert!(second.contains("from step 20 of 30"), "resumed: {second}");
    assert!(second.contains("evaluator 30/30 loss"), "{second}");
    let _ = std::fs::remove_dir_all(&out);
}

/// Batch sizes, pool sizes and image sizes that cannot fit in memory are refused from the
/// estimate before the run folder is created; the message names the config and the values.
#[test]
fn oversized_training_configs_fail_before_the_run_starts() {
    let dir = std::env::temp_dir().join(format!("gen-train-cli-big-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let mut pool = gen_pretrain::PretrainConfig::tiny();
    pool.pool_size = 10_000_000_000;
    // The image size with the stage shapes that must agree with it (checked before the
    // estimate): the VAE's sample size and the UNet's (half of it in the tiny preset).
    let mut size = serde_json::to_value(gen_pretrain::PretrainConfig::tiny()).unwrap();
    size["image_size"] = 100_000.into();
    size["clip"]["vision_config"]["image_size"] = 100_000.into();
    size["vae"]["config"]["sample_size"] = 100_000.into();
    size["unet"]["config"]["sample_size"] = 50_000.into();
    let mut batch = gen_pretrain::PretrainConfig::tiny();
    batch.pool_size = 10_000_000;
    batch.unet.train.batch_size = 10_000_000;
    let json = |c: &gen_pretrain::PretrainConfig| serde_json::to_value(c).unwrap();
    for (name, cfg, needle) in [
        ("pool", json(&pool), "pool_size 10000000000"),
        ("size", size, "image_size 100000"),
        ("batch", json(&batch), "unet.train.batch_size 10000000"),
    ] {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, cfg.to_string()).unwrap();
        let t0 = std::time::Instant::now();
        let o = Command::new(env!("CARGO_BIN_EXE_gen"))
            .args(["train", "--config", path.to_str().unwrap(), "--out", run.to_str().unwrap()])
            .output()
            .expect("gen runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains("--config") && err.contains(needle), "{name}: {err}");
        assert!(err.contains("needs about") && err.contains("estimate:"), "{name}: {err}");
        assert!(t0.elapsed().as_secs() < 60, "{name}");
        assert!(!run.exists(), "{name}: the run folder was created");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_gen"))
        .args(["train", "--preset", "tiny", "--stop-after", "-1", "--out", run.to_str().unwrap()])
        .output()
        .expect("gen runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--stop-after") && err.contains(">= 0"), "{err}");
    assert!(!run.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
