//! All-or-nothing output directories: everything is written into a hidden sibling of the target,
//! synced, and renamed onto the target only when complete. Dropping a `Staging` without committing
//! removes the partial output, so an error leaves nothing behind; a SIGKILL leaves only a hidden
//! sibling, which the next run for the same target removes (and says so). A run holds an exclusive
//! `flock` on its staging directory for as long as it lives (the kernel drops it when the process
//! ends, however it ends), and leftovers are removed only once their lock can be taken: process IDs
//! would not do, as runs in different PID namespaces (containers sharing a volume) see each other's
//! IDs as dead or as someone else's.
//!
//! Every writer (apply, prune, recover, sweep) goes through [`check_output`] before it writes: the
//! output must not be, contain or lie inside the input however the paths are spelled, and an
//! existing output is replaced only when it is an earlier output of structprune (it holds
//! [`MARKER`], which every committed output gets) or an empty directory.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

const TEMP_TAG: &str = ".structprune-tmp-";
const OLD_TAG: &str = ".structprune-old-";
/// Written into every output directory; `--overwrite` replaces only directories that hold it.
pub const MARKER: &str = ".structprune-output";
const MARKER_TEXT: &str = concat!(
    "Written by structprune ",
    env!("CARGO_PKG_VERSION"),
    ". structprune --overwrite replaces only directories holding this file (or empty ones).\n"
);

#[derive(Debug)]
pub struct Staging {
    temp: PathBuf,
    /// The open staging directory, holding its `flock` (`None` on a file system without `flock`,
    /// where no run removes another's leftovers either).
    _lock: Option<File>,
    /// The resolved target (see [`resolve`]).
    target: PathBuf,
    /// The target as the caller spelled it, for messages.
    shown: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl Staging {
    /// Prepares a staging directory for `output` after [`check_output`] (against `input` when the
    /// output is derived from a checkpoint directory), removing leftovers of dead earlier runs.
    pub fn create(output: &Path, input: Option<&Path>, overwrite: bool) -> Result<Staging> {
        let target = check_output(input, output, overwrite)?;
        let (parent, name) = split(&target, output)?;
        fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
        remove_stale_siblings(&parent, &name);
        let (temp, lock) = create_locked(&parent, &name)?;
        Ok(Staging { temp, _lock: lock, target, shown: output.to_owned(), overwrite, committed: false })
    }

    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Marks and syncs the staged directory and moves it onto the target.
    pub fn commit(mut self) -> Result<()> {
        let marker = self.temp.join(MARKER);
        File::create(&marker)
            .and_then(|mut f| std::io::Write::write_all(&mut f, MARKER_TEXT.as_bytes()).and_then(|_| f.sync_all()))
            .map_err(Error::io(&marker))?;
        sync_dir(&self.temp)?;
        let parent = self.temp.parent().expect("staging dirs have a parent").to_owned();
        // Checked again: the target may have appeared, or been filled, while the output was written.
        check_replaceable(&self.target, &self.shown, self.overwrite)?;
        let existing = self.target.symlink_metadata().is_ok();
        // The output being replaced is locked too, so that while it waits for removal under a
        // staging-like name no other run takes it for a leftover (check_replaceable: a directory).
        let _old_lock = if existing { lock_dir(&self.target).ok().flatten() } else { None };
        if existing && exchange(&self.temp, &self.target).is_ok() {
            // The staging path now holds the old output: the swap itself was the atomic step.
            self.committed = true;
            fs::remove_dir_all(&self.temp).map_err(Error::io(&self.temp))?;
            return sync_dir(&parent);
        }
        let name = self.target.file_name().expect("resolved targets have a name").to_string_lossy().into_owned();
        let old = parent.join(format!(".{name}{OLD_TAG}{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        if existing {
            fs::rename(&self.target, &old).map_err(Error::io(&self.target))?;
        }
        fs::rename(&self.temp, &self.target).map_err(Error::io(&self.target))?;
        self.committed = true;
        if existing {
            fs::remove_dir_all(&old).map_err(Error::io(&old))?;
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

/// The rules every writer applies to its output path before writing anything: `output` must not
/// be `input`, lie inside it or contain it (compared by device and inode, so `..`, missing
/// directories, symbolic links and bind mounts cannot hide an overlap), and an existing `output`
/// is refused without `overwrite` and, with it, unless it can be replaced ([`check_replaceable`]).
/// Returns the resolved output path, which is where the writer then writes.
pub fn check_output(input: Option<&Path>, output: &Path, overwrite: bool) -> Result<PathBuf> {
    let target = resolve(output)?;
    if let Some(input) = input {
        check_separate(input, output, &target)?;
    }
    check_replaceable(&target, output, overwrite)?;
    Ok(target)
}

/// `path` made absolute, the way the kernel resolves it once its missing directories exist: an
/// existing component is resolved physically (a symbolic link to its target, so a later `..` goes
/// to the target's parent), a missing one is a directory still to be made (so `missing/..`
/// cancels). The last component is not followed when it is a link: the link is the output.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let absolute = if path.is_absolute() { path.to_owned() } else { std::env::current_dir().map_err(Error::io(path))?.join(path) };
    let components: Vec<Component<'_>> = absolute.components().collect();
    let mut resolved = PathBuf::from("/");
    for (i, component) in components.iter().enumerate() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => {
                let next = resolved.join(name);
                let last = i + 1 == components.len();
                resolved = match next.symlink_metadata() {
                    Ok(meta) if meta.file_type().is_symlink() && !last => next.canonicalize().map_err(Error::io(&next))?,
                    Ok(_) => next,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => next,
                    Err(err) => return Err(Error::io(&next)(err)),
                };
            }
        }
    }
    Ok(resolved)
}

/// Refuses an output that is the input, lies inside it or contains it.
fn check_separate(input: &Path, output: &Path, target: &Path) -> Result<()> {
    let input_meta = fs::metadata(input).map_err(Error::io(input))?;
    let input_id = (input_meta.dev(), input_meta.ino());
    let real_input = input.canonicalize().map_err(Error::io(input))?;
    let same_as = |path: &Path, id: (u64, u64)| fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id);
    let refuse = |relation: &str| Error::Output {
        path: output.to_owned(),
        reason: format!(
            "the output ({}) {relation} the input checkpoint {}: writing it would modify or delete \
             the input; choose an output directory outside the model directory",
            target.display(),
            real_input.display()
        ),
    };
    if same_as(target, input_id) {
        return Err(refuse("is"));
    }
    if target.ancestors().skip(1).any(|dir| same_as(dir, input_id)) {
        return Err(refuse("lies inside"));
    }
    if let Ok(meta) = fs::metadata(target) {
        if real_input.ancestors().any(|dir| same_as(dir, (meta.dev(), meta.ino()))) {
            return Err(refuse("contains"));
        }
    }
    Ok(())
}

/// An existing `target` (shown to the user as `shown`) may be replaced only with `overwrite`, and
/// only when it is a directory structprune wrote (it holds [`MARKER`]) or an empty directory:
/// anything else may hold the user's files.
pub fn check_replaceable(target: &Path, shown: &Path, overwrite: bool) -> Result<()> {
    let meta = match target.symlink_metadata() {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(Error::io(target)(err)),
    };
    if !overwrite {
        return Err(Error::OutputExists { path: shown.to_owned() });
    }
    let refuse = |what: String| Error::Output {
        path: shown.to_owned(),
        reason: format!(
            "{what}, so --overwrite does not replace it: it replaces only an earlier structprune output \
             (a directory holding {MARKER}) or an empty directory. Move it away or choose another output path"
        ),
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(refuse("exists and is not a directory".into()));
    }
    if target.join(MARKER).symlink_metadata().is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let entries: Vec<_> = fs::read_dir(target)
        .map_err(Error::io(target))?
        .take(2)
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .map_err(Error::io(target))?;
    match entries.as_slice() {
        [] => Ok(()),
        [first, rest @ ..] => Err(refuse(format!(
            "is a directory that structprune did not write (no {MARKER} in it; it holds '{first}'{})",
            if rest.is_empty() { "" } else { " and more" }
        ))),
    }
}

/// A resolved target's parent directory and name.
fn split(target: &Path, shown: &Path) -> Result<(PathBuf, String)> {
    match (target.parent(), target.file_name()) {
        (Some(parent), Some(name)) => Ok((parent.to_owned(), name.to_string_lossy().into_owned())),
        _ => Err(Error::Output { path: shown.to_owned(), reason: "the output path names no directory".into() }),
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

/// Tells staging directories of one process apart (and, with the process ID, runs apart).
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates `.NAME.structprune-tmp-PID-N` in `parent` and locks it. A name that exists already (a
/// run with the same process ID in another PID namespace) is skipped, and so is a directory that
/// another run's cleanup locked, or removed, between its creation and the lock.
fn create_locked(parent: &Path, name: &str) -> Result<(PathBuf, Option<File>)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = parent.join(format!(".{name}{TEMP_TAG}{}-{unique}", std::process::id()));
        match fs::create_dir(&temp) {
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && attempts < 1000 => continue,
            Err(err) => return Err(Error::io(&temp)(err)),
            Ok(()) => {}
        }
        match lock_dir(&temp) {
            Ok(Some(lock)) if is_at(&lock, &temp) => return Ok((temp, Some(lock))),
            // No flock here: no run removes another's directory on this file system either.
            Err(_) => return Ok((temp, None)),
            Ok(_) if attempts < 1000 => continue,
            Ok(_) => {
                return Err(Error::Output {
                    path: temp,
                    reason: "could not lock a staging directory: other runs keep taking them for leftovers".into(),
                })
            }
        }
    }
}

/// Takes an exclusive `flock` on directory `dir` without waiting: `Some(file)` holds it until
/// dropped, `None` means another open file (another run) holds it. An error means it cannot be
/// told: `dir` is gone or not a directory (a link is not followed), or the file system has no
/// `flock`.
fn lock_dir(dir: &Path) -> std::io::Result<Option<File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(dir)?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Whether the open directory `file` is still the one at `path` (not removed or replaced since it
/// was opened).
fn is_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), path.symlink_metadata()) {
        (Ok(open), Ok(there)) => (open.dev(), open.ino()) == (there.dev(), there.ino()),
        _ => false,
    }
}

/// Removes staging leftovers of `name` (`.NAME.structprune-tmp-…`, `.NAME.structprune-old-…`)
/// whose lock is free, so whose run has ended, whatever its process ID means here; says so on
/// stderr (the user may wonder where disk space went, or came back from). A directory that cannot
/// be locked (held by a live run, or on a file system without `flock`) is left alone.
fn remove_stale_siblings(parent: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    let prefix = format!(".{name}");
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else { continue };
        if !(rest.starts_with(TEMP_TAG) || rest.starts_with(OLD_TAG)) {
            continue;
        }
        let path = entry.path();
        let Ok(Some(lock)) = lock_dir(&path) else { continue };
        if is_at(&lock, &path) && fs::remove_dir_all(&path).is_ok() {
            eprintln!("structprune: removed {}, left behind by an interrupted run (no process holds its lock)", path.display());
        }
        drop(lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_moves_and_drop_cleans() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let staging = Staging::create(&target, None, false).unwrap();
        fs::write(staging.path().join("f"), b"x").unwrap();
        let temp = staging.path().to_owned();
        drop(staging);
        assert!(!temp.exists());
        assert!(!target.exists());

        let staging = Staging::create(&target, None, false).unwrap();
        fs::write(staging.path().join("f"), b"y").unwrap();
        staging.commit().unwrap();
        assert_eq!(fs::read(target.join("f")).unwrap(), b"y");
        assert!(target.join(MARKER).is_file());
        assert!(matches!(Staging::create(&target, None, false), Err(Error::OutputExists { .. })));

        let staging = Staging::create(&target, None, true).unwrap();
        fs::write(staging.path().join("g"), b"z").unwrap();
        staging.commit().unwrap();
        assert!(!target.join("f").exists());
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1, "only the target remains");
    }

    #[test]
    fn only_leftovers_whose_lock_is_free_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let leftover = |tail: &str| {
            let path = root.path().join(format!(".out{tail}"));
            fs::create_dir(&path).unwrap();
            fs::write(path.join("model.safetensors"), b"partial").unwrap();
            path
        };
        // Process IDs say nothing: this process is alive, yet its unlocked directories are leftovers
        // (a run in another PID namespace may have had this ID); a locked one belongs to a live run
        // whatever ID it is named after.
        let dead = leftover(&format!("{TEMP_TAG}4000000000-0"));
        let unlocked_live_id = leftover(&format!("{TEMP_TAG}{}-99", std::process::id()));
        let old = leftover(&format!("{OLD_TAG}1-0"));
        let held = leftover(&format!("{TEMP_TAG}4000000001-0"));
        let held_old = leftover(&format!("{OLD_TAG}4000000001-1"));
        let other = leftover(".structprune-tmp"); // no tag separator after it: not ours to touch
        let (lock, lock_old) = (lock_dir(&held).unwrap().unwrap(), lock_dir(&held_old).unwrap().unwrap());
        assert!(lock_dir(&held).unwrap().is_none(), "a second open file cannot take the lock");
        let staging = Staging::create(&root.path().join("out"), None, false).unwrap();
        for gone in [&dead, &unlocked_live_id, &old] {
            assert!(!gone.exists(), "{}", gone.display());
        }
        assert!(held.join("model.safetensors").exists() && held_old.exists() && other.exists());
        assert!(lock_dir(staging.path()).unwrap().is_none(), "a run holds its own staging directory's lock");
        // A second run for the same target leaves the first one's live directory alone.
        let second = Staging::create(&root.path().join("out"), None, false).unwrap();
        assert!(staging.path().exists() && second.path().exists());
        drop((lock, lock_old));
        drop(second);
        let third = Staging::create(&root.path().join("out"), None, false).unwrap();
        assert!(!held.exists() && !held_old.exists(), "released locks: leftovers");
        assert!(staging.path().exists());
        drop((staging, third));
    }

    #[test]
    fn names_taken_by_other_runs_are_skipped() {
        let root = tempfile::tempdir().unwrap();
        // A name already taken (by a run in another PID namespace with this process ID) is skipped.
        let next = COUNTER.load(Ordering::Relaxed);
        for n in next..next + 3 {
            fs::create_dir(root.path().join(format!(".out{TEMP_TAG}{}-{n}", std::process::id()))).unwrap();
        }
        let (temp, lock) = create_locked(root.path(), "out").unwrap();
        assert!(lock.is_some_and(|l| is_at(&l, &temp)));
        assert!(temp.file_name().unwrap().to_string_lossy().starts_with(&format!(".out{TEMP_TAG}")));
    }

    #[test]
    fn resolve_follows_links_and_cancels_missing_directories() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().canonicalize().unwrap();
        fs::create_dir_all(root.join("real/deep")).unwrap();
        std::os::unix::fs::symlink(root.join("real/deep"), root.join("link")).unwrap();
        assert_eq!(resolve(&root.join("missing/../model")).unwrap(), root.join("model"));
        assert_eq!(resolve(&root.join("a/b/../../model")).unwrap(), root.join("model"));
        // `link/..` is the parent of the link's target, as the kernel sees it.
        assert_eq!(resolve(&root.join("link/../x")).unwrap(), root.join("real/x"));
        // The last component is the output itself, link or not.
        assert_eq!(resolve(&root.join("link")).unwrap(), root.join("link"));
        assert_eq!(resolve(&root.join("real/./deep/")).unwrap(), root.join("real/deep"));
    }

    #[test]
    fn outputs_overlapping_the_input_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let model = root.join("model");
        fs::create_dir_all(model.join("sub")).unwrap();
        std::os::unix::fs::symlink(&model, root.join("alias")).unwrap();
        for output in ["newdir/../model", "a/b/../../model", "model/sub", "model/new", "alias", "alias/x", "."] {
            let err = check_output(Some(&model), &root.join(output), true).unwrap_err();
            assert!(matches!(err, Error::Output { .. }), "{output}: {err}");
            assert!(err.to_string().contains("outside the model directory"), "{output}: {err}");
        }
        assert!(check_output(Some(&model), &root.join("elsewhere"), true).is_ok());
        assert!(check_output(Some(&model), &root.join("newdir/../other"), true).is_ok());
    }

    #[test]
    fn overwrite_replaces_only_earlier_outputs_and_empty_directories() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let user = root.join("user");
        fs::create_dir(&user).unwrap();
        fs::write(user.join("notes.txt"), b"mine").unwrap();
        let file = root.join("file");
        fs::write(&file, b"mine").unwrap();
        let empty = root.join("empty");
        fs::create_dir(&empty).unwrap();
        for (path, expected) in [(&user, "did not write"), (&file, "not a directory")] {
            let err = check_output(None, path, true).unwrap_err().to_string();
            assert!(err.contains(expected) && err.contains(MARKER), "{err}");
        }
        assert!(check_output(None, &empty, true).is_ok());
        fs::write(user.join(MARKER), b"").unwrap();
        assert!(check_output(None, &user, true).is_ok());
        assert!(matches!(check_output(None, &user, false), Err(Error::OutputExists { .. })));
    }
}
