//! Atomic file writes: write to a temporary name beside the target, then rename, so a failed
//! or interrupted run never leaves a half-written output. [`StagedFiles`] does the same for a
//! group of outputs (all or none). Temporary names are `.{name}.{pid}.tmp`; one left by a
//! killed run (its process is gone) is removed when the same target is written again.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically (temporary file in the same folder, fsync, rename).
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes).map_err(|e| Error::io(f.tmp_path(), e))?;
    f.commit()
}

/// A file written under a temporary name and renamed into place by [`AtomicFile::commit`].
/// Dropped without `commit`, the temporary file is removed and the target is untouched.
pub struct AtomicFile {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let target = path.as_ref().to_path_buf();
        let name = target
            .file_name()
            .ok_or_else(|| {
                Error::invalid("output path", format!("{} has no file name", target.display()))
            })?
            .to_string_lossy()
            .to_string();
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        remove_stale_temps(&dir, &name);
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self { target, tmp, file: Some(file) })
    }

    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes, syncs and renames the temporary file onto the target.
    pub fn commit(mut self) -> Result<()> {
        self.sync()?;
        self.rename()
    }

    /// Syncs the data to disk; the file stays under its temporary name.
    fn sync(&mut self) -> Result<()> {
        let file = self.file.as_ref().expect("file present until commit");
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))
    }

    /// Renames the temporary file onto the target (after [`Self::sync`]).
    fn rename(&mut self) -> Result<()> {
        let file = self.file.take().expect("file present until commit");
        drop(file);
        std::fs::rename(&self.tmp, &self.target).map_err(|e| {
            let _ = std::fs::remove_file(&self.tmp);
            Error::io(&self.target, e)
        })
    }
}

/// Several output files written under temporary names and renamed into place together by
/// [`StagedFiles::commit`]: a run that fails before or during the commit leaves none of them
/// (targets renamed before a failing rename are removed again). Dropped without a commit, the
/// temporary files are removed.
#[derive(Default)]
pub struct StagedFiles {
    files: Vec<AtomicFile>,
}

impl StagedFiles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `bytes` for `path` under a temporary name and syncs it.
    pub fn add(&mut self, path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
        let mut f = AtomicFile::create(path)?;
        f.write_all(bytes).map_err(|e| Error::io(f.tmp_path(), e))?;
        f.sync()?;
        self.files.push(f);
        Ok(())
    }

    /// Renames every staged file onto its target. A target that is a folder is refused before
    /// anything is renamed.
    pub fn commit(mut self) -> Result<()> {
        if let Some(f) = self.files.iter().find(|f| f.target.is_dir()) {
            return Err(Error::invalid(
                "output path",
                format!("{} is a folder, not a file", f.target.display()),
            ));
        }
        let mut done: Vec<PathBuf> = Vec::with_capacity(self.files.len());
        for mut f in std::mem::take(&mut self.files) {
            let target = f.target.clone();
            if let Err(e) = f.rename() {
                for t in &done {
                    let _ = std::fs::remove_file(t);
                }
                return Err(e);
            }
            done.push(target);
        }
        Ok(())
    }
}

/// Removes `.{name}.{pid}.tmp` files in `dir` whose process no longer runs (left by a killed
/// run). Files of running processes, and anything that does not parse, are left alone.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.strip_suffix(".tmp").and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether process `pid` exists (signal 0 probes without sending anything).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists but belongs to someone else.
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("file present until commit").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("file present until commit").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn dropped_file_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("gen-core-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("out.bin");
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.write_all(b"half").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        write_atomic(&target, b"whole").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gen-core-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn staged_files_land_together_or_not_at_all() {
        let dir = scratch("staged");
        let mut s = StagedFiles::new();
        s.add(dir.join("a.png"), b"a").unwrap();
        s.add(dir.join("b.png"), b"b").unwrap();
        assert_eq!(names(&dir).len(), 2, "only temporary files before the commit");
        assert!(!dir.join("a.png").exists());
        s.commit().unwrap();
        assert_eq!(names(&dir), ["a.png", "b.png"]);

        // A target that is a folder: nothing is renamed, no temporary file stays.
        let dir = scratch("staged-dir");
        std::fs::create_dir(dir.join("grid.png")).unwrap();
        let mut s = StagedFiles::new();
        s.add(dir.join("image-000.png"), b"x").unwrap();
        s.add(dir.join("grid.png"), b"g").unwrap();
        let err = s.commit().unwrap_err().to_string();
        assert!(err.contains("grid.png") && err.contains("folder"), "{err}");
        assert_eq!(names(&dir), ["grid.png"]);

        // Dropped without a commit: nothing stays.
        let dir = scratch("staged-drop");
        {
            let mut s = StagedFiles::new();
            s.add(dir.join("a.png"), b"a").unwrap();
        }
        assert!(names(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temporary_files_of_dead_processes_are_removed() {
        let dir = scratch("stale");
        // A process id that cannot be running (above Linux's pid_max limit of 2^22).
        let dead = dir.join(".out.png.99999999.tmp");
        // Process 1 (init) always runs.
        let alive = dir.join(".out.png.1.tmp");
        std::fs::write(&dead, b"half").unwrap();
        std::fs::write(&alive, b"init's").unwrap();
        std::fs::write(dir.join(".other.png.99999999.tmp"), b"other target").unwrap();
        write_atomic(dir.join("out.png"), b"whole").unwrap();
        assert!(!dead.exists(), "the dead run's temporary file stays");
        assert!(alive.exists(), "a running process's temporary file was removed");
        assert_eq!(names(&dir), [".other.png.99999999.tmp", ".out.png.1.tmp", "out.png"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
