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
