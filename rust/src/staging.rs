//! All-or-nothing output directories: everything is written into a hidden sibling of the target,
//! synced, and renamed onto the target only when complete. Dropping a `Staging` without committing
//! removes the partial output, so an error leaves nothing behind; a SIGKILL leaves only a hidden
//! sibling named after a dead process, which the next run for the same target removes.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

const TEMP_TAG: &str = ".structprune-tmp-";
const OLD_TAG: &str = ".structprune-old-";

#[derive(Debug)]
pub struct Staging {
    temp: PathBuf,
    target: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl Staging {
    /// Prepares a staging directory for `target`. Fails if `target` exists and `overwrite` is false.
    pub fn create(target: &Path, overwrite: bool) -> Result<Staging> {
        let name = target
            .file_name()
            .ok_or_else(|| Error::Output { path: target.to_owned(), reason: "output path has no directory name".into() })?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        if target.symlink_metadata().is_ok() && !overwrite {
            return Err(Error::OutputExists { path: target.to_owned() });
        }
        fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
        remove_stale_siblings(&parent, &name);
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = parent.join(format!(".{name}{TEMP_TAG}{}-{unique}", std::process::id()));
        fs::create_dir(&temp).map_err(Error::io(&temp))?;
        Ok(Staging { temp, target: target.to_owned(), overwrite, committed: false })
    }

    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Syncs the staged directory and moves it onto the target.
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.temp)?;
        let parent = self.temp.parent().expect("staging dirs have a parent").to_owned();
        let existing = self.target.symlink_metadata().is_ok();
        if existing && !self.overwrite {
            return Err(Error::OutputExists { path: self.target.clone() });
        }
        if existing && exchange(&self.temp, &self.target).is_ok() {
            // The staging path now holds the old output: the swap itself was the atomic step.
            self.committed = true;
            let removed = if self.temp.is_dir() { fs::remove_dir_all(&self.temp) } else { fs::remove_file(&self.temp) };
            removed.map_err(Error::io(&self.temp))?;
            return sync_dir(&parent);
        }
        let name = self.target.file_name().expect("checked in create").to_string_lossy().into_owned();
        let old = parent.join(format!(".{name}{OLD_TAG}{}", std::process::id()));
        if existing {
            fs::rename(&self.target, &old).map_err(Error::io(&self.target))?;
        }
        fs::rename(&self.temp, &self.target).map_err(Error::io(&self.target))?;
        self.committed = true;
        if existing {
            let removed = if old.is_dir() { fs::remove_dir_all(&old) } else { fs::remove_file(&old) };
            removed.map_err(Error::io(&old))?;
        }
        sync_dir(&parent)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.temp);
        }
    }
}

/// Atomically swaps two paths (Linux `renameat2(RENAME_EXCHANGE)`), so replacing an existing output
/// never passes through a moment without one.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let to_c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (to_c(a)?, to_c(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere, or on file systems without the exchange, the caller falls back to two renames.
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io(dir))
}

/// Removes staging leftovers of `name` whose owning process no longer runs (Linux only: elsewhere
/// liveness cannot be told without extra dependencies, so leftovers stay).
fn remove_stale_siblings(parent: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(parent) else { return };
    let prefix = format!(".{name}");
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else { continue };
        let Some(tail) = rest.strip_prefix(TEMP_TAG).or_else(|| rest.strip_prefix(OLD_TAG)) else { continue };
        let Some(pid) = tail.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_moves_and_drop_cleans() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let staging = Staging::create(&target, false).unwrap();
        fs::write(staging.path().join("f"), b"x").unwrap();
        let temp = staging.path().to_owned();
        drop(staging);
        assert!(!temp.exists());
        assert!(!target.exists());

        let staging = Staging::create(&target, false).unwrap();
        fs::write(staging.path().join("f"), b"y").unwrap();
        staging.commit().unwrap();
        assert_eq!(fs::read(target.join("f")).unwrap(), b"y");
        assert!(matches!(Staging::create(&target, false), Err(Error::OutputExists { .. })));

        let staging = Staging::create(&target, true).unwrap();
        fs::write(staging.path().join("g"), b"z").unwrap();
        staging.commit().unwrap();
        assert!(!target.join("f").exists());
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1, "only the target remains");
    }

    #[test]
    fn stale_leftovers_of_dead_processes_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join(format!(".out{TEMP_TAG}4000000000-0"));
        let alive = root.path().join(format!(".out{TEMP_TAG}{}-99", std::process::id()));
        fs::create_dir(&dead).unwrap();
        fs::create_dir(&alive).unwrap();
        let staging = Staging::create(&root.path().join("out"), false).unwrap();
        assert!(!dead.exists());
        assert!(alive.exists());
        drop(staging);
    }
}
