//! The `gen dataset` command end to end: files written, exit codes and messages of bad input.

use std::process::Command;

fn gen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gen")).args(args).output().expect("gen binary runs")
}

#[test]
fn dataset_writes_images_metadata_and_contact_sheet() {
    let dir = std::env::temp_dir().join(format!("gen-cli-dataset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = gen(&[
        "dataset",
        "--split",
        "validation",
        "--count",
        "3",
        "--start",
        "5",
        "--size",
        "16",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = std::fs::read_to_string(dir.join("metadata.jsonl")).unwrap();
    assert_eq!(meta.lines().count(), 3);
    assert!(meta.lines().next().unwrap().contains("\"index\":5"));
    for name in [
        "images/validation_00000005.png",
        "masks/validation_00000007.png",
        "contact_sheet.png",
        "world.json",
    ] {
        assert!(dir.join(name).is_file(), "{name} missing");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("ms per render"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_fail_with_clear_messages() {
    let out = gen(&["dataset", "--split", "dev", "--count", "3", "--out", "/tmp/unused-gen-cli"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("train, validation, test"));
    let out = gen(&["dataset", "--split", "test", "--count", "0", "--out", "/tmp/unused-gen-cli"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--count"));
    let file = std::env::temp_dir().join(format!("gen-cli-notadir-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let out = gen(&["dataset", "--split", "test", "--count", "1", "--out", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a folder") && err.contains(file.to_str().unwrap()), "{err}");
    std::fs::remove_file(&file).unwrap();
    assert!(!std::path::Path::new("/tmp/unused-gen-cli").exists());
}

#[test]
fn help_shows_examples() {
    let out = gen(&["dataset", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Examples:") && text.contains("gen dataset --split test --count 64"),
        "{text}"
    );
}

/// A count that cannot fit in memory is refused from the estimate before anything is rendered
/// or written; negative numbers are range errors naming the flag.
#[test]
fn oversized_and_negative_values_fail_before_writing() {
    let dir = std::env::temp_dir().join(format!("gen-cli-dataset-big-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let t0 = std::time::Instant::now();
    let out = gen(&["dataset", "--split", "train", "--count", "100000000000", "--out", d]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--count 100000000000 --size 64") && err.contains("needs about"), "{err}");
    assert!(err.contains("estimate:"), "{err}");
    assert!(t0.elapsed().as_secs() < 60);
    for (args, needle) in [
        (["--count", "-5"], "at least 1"),
        (["--start", "-1"], "must be >= 0"),
        (["--size", "-16"], "--size"),
    ] {
        let mut a = vec!["dataset", "--split", "test", "--out", d];
        if args[0] != "--count" {
            a.extend(["--count", "2"]);
        }
        a.extend(args);
        let out = gen(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(args[0]) && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
    }
    assert!(!dir.exists(), "{} was created", dir.display());
}
