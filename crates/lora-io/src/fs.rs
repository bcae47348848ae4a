//! Crash-safe file output: nothing appears at the final path until the output is complete,
//! and no temporary file survives a crash unnoticed.
//!
//! A [`PendingFile`] is, where the filesystem allows it (Linux, `O_TMPFILE`: ext4, xfs,
//! btrfs, tmpfs), an anonymous inode in the target directory: a crash at any point, a
//! SIGKILL or a full quota included, leaves nothing behind, because the kernel frees an
//! inode no name points to. Committing syncs the data, gives the inode a temporary name
//! (`linkat`), renames that over the final path and syncs the directory, so the rename
//! itself survives a power loss. Elsewhere it is a named temporary file,
//! `.lora-tmp-<pid>-<n>.<final name>` beside the output: [`PendingFile::create`] first
//! removes such files whose process is gone, so the next run in that directory cleans up
//! after a crashed one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// The prefix of every temporary name (so that a later run recognises them).
const TEMP_PREFIX: &str = ".lora-tmp-";

/// Temporary names taken by this process, for unique names within it.
static SEQUENCE: AtomicUsize = AtomicUsize::new(0);

/// How the pending bytes are held until the commit.
#[derive(Debug)]
enum Backing {
    /// An `O_TMPFILE` inode: no name until the commit.
    Anonymous,
    /// A named temporary file beside the output, removed unless committed.
    Named(PathBuf),
}

/// An output file being written: invisible at its final path until [`PendingFile::commit`];
/// dropped uncommitted (an error, a panic), it leaves nothing.
#[derive(Debug)]
pub struct PendingFile {
    file: File,
    target: PathBuf,
    backing: Backing,
}

impl PendingFile {
    /// Starts an output for `path` (its directory must exist), removing stale temporary
    /// files of crashed runs there first.
    pub fn create(path: &Path) -> Result<Self> {
        Self::create_with(path, true)
    }

    /// The same, always with a named temporary file that keeps `path`'s extension (for
    /// writers that pick their format by the file name, such as image encoders).
    pub fn create_named(path: &Path) -> Result<Self> {
        Self::create_with(path, false)
    }

    fn create_with(path: &Path, anonymous: bool) -> Result<Self> {
        let dir = parent_dir(path);
        remove_stale_temps(&dir);
        if anonymous && let Some(file) = anonymous_file(&dir) {
            return Ok(Self {
                file,
                target: path.to_path_buf(),
                backing: Backing::Anonymous,
            });
        }
        let tmp = temp_name(path);
        let file = File::create(&tmp).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file,
            target: path.to_path_buf(),
            backing: Backing::Named(tmp),
        })
    }

    /// The open file, for writing.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// A path that opens this same file, for writers that insist on opening a path
    /// themselves: `/proc/self/fd/<fd>` for an anonymous inode (reopening it truncates
    /// and writes the same inode), else the temporary name.
    pub fn path(&self) -> PathBuf {
        match &self.backing {
            Backing::Anonymous => proc_fd_path(&self.file),
            Backing::Named(tmp) => tmp.clone(),
        }
    }

    /// Makes the output visible: syncs its data, puts it at the final path in one rename
    /// (replacing what was there) and syncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let target = self.target.clone();
        let io = |e| Error::io(&target, e);
        self.file.flush().map_err(io)?;
        self.file.sync_all().map_err(io)?;
        let named = match &self.backing {
            Backing::Named(tmp) => tmp.clone(),
            Backing::Anonymous => {
                let tmp = temp_name(&target);
                link_anonymous(&self.file, &tmp).map_err(io)?;
                // From here a crash leaves a recognisable name; this drop removes it.
                self.backing = Backing::Named(tmp.clone());
                tmp
            }
        };
        std::fs::rename(&named, &target).map_err(io)?;
        // Renamed: nothing left to remove.
        self.backing = Backing::Anonymous;
        sync_dir(&parent_dir(&target));
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if let Backing::Named(tmp) = &self.backing {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// An output directory being written (a training checkpoint): its files go into a
/// temporary directory beside it (`.lora-tmp-<pid>-<n>.<name>`, removed by the next run
/// when its process is gone), renamed into place by [`PendingDir::commit`] when complete.
#[derive(Debug)]
pub struct PendingDir {
    tmp: Option<PathBuf>,
    target: PathBuf,
}

impl PendingDir {
    /// Starts `path` (its parent must exist), removing stale temporaries there first.
    pub fn create(path: &Path) -> Result<Self> {
        remove_stale_temps(&parent_dir(path));
        let tmp = temp_name(path);
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self {
            tmp: Some(tmp),
            target: path.to_path_buf(),
        })
    }

    /// Where to write the directory's files until the commit.
    pub fn path(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.target)
    }

    /// Puts the directory at its final path, replacing an older one of that name, and
    /// syncs the parent directory. Its files must have been written crash-safely (synced).
    pub fn commit(mut self) -> Result<()> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        let io = |e| Error::io(&self.target, e);
        if self.target.is_dir() {
            std::fs::remove_dir_all(&self.target).map_err(io)?;
        }
        let renamed = std::fs::rename(&tmp, &self.target);
        if renamed.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        renamed.map_err(io)?;
        sync_dir(&parent_dir(&self.target));
        Ok(())
    }
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
}

/// The directory `path` is written in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `.lora-tmp-<pid>-<n>.<name>` beside `path`: unique within the process, and the final
/// name last so that its extension is kept.
fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!("{TEMP_PREFIX}{}-{n}.{name}", std::process::id()))
}

/// Removes the temporary files in `dir` whose process no longer runs (a crashed run's).
/// Best effort: an unreadable directory or a file removed meanwhile is not an error.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            let path = entry.path();
            let _ = match path.is_dir() {
                true => std::fs::remove_dir_all(&path),
                false => std::fs::remove_file(&path),
            };
        }
    }
}

/// Whether process `pid` exists (on Linux: `/proc/<pid>`). Where that cannot be told,
/// assume it does: a temporary file is never removed from under a running writer.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

#[cfg(target_os = "linux")]
fn anonymous_file(dir: &Path) -> Option<File> {
    use rustix::fs::{Mode, OFlags, open};
    let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
    let fd = open(dir, flags, Mode::from_raw_mode(0o644)).ok()?;
    let file = File::from(fd);
    // Commit and `path()` go through /proc; without it, use a named file.
    proc_fd_path(&file).exists().then_some(file)
}

#[cfg(not(target_os = "linux"))]
fn anonymous_file(_dir: &Path) -> Option<File> {
    None
}

#[cfg(unix)]
fn proc_fd_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(not(unix))]
fn proc_fd_path(_file: &File) -> PathBuf {
    PathBuf::new()
}

/// Gives the anonymous inode behind `file` the name `to`.
#[cfg(target_os = "linux")]
fn link_anonymous(file: &File, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, CWD, linkat};
    linkat(CWD, proc_fd_path(file), CWD, to, AtFlags::SYMLINK_FOLLOW)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn link_anonymous(_file: &File, _to: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other("anonymous files exist on Linux only"))
}

/// Syncs a directory's entries (best effort: not every platform opens directories).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` crash-safely (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut out = PendingFile::create(path)?;
    out.file()
        .write_all(bytes)
        .map_err(|e| Error::io(path, e))?;
    out.commit()
}

/// Runs `write` on a temporary path beside `path` that ends in `path`'s file name, then
/// commits it; for writers that open the file themselves and choose their format by its
/// name (image encoders). A named temporary file, so a crash during `write` leaves one that
/// the next run removes.
pub fn with_atomic_path<F, E>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> std::result::Result<(), E>,
    E: std::fmt::Display,
{
    let out = PendingFile::create_named(path)?;
    write(&out.path()).map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    out.commit()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let r = with_atomic_path(&target, |_| Err::<(), _>("encoder failed"));
        assert!(r.unwrap_err().to_string().contains("encoder failed"));
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        let mut dropped = PendingFile::create(&target).unwrap();
        dropped.file().write_all(b"partial").unwrap();
        drop(dropped);
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        write_atomic(&target, b"ok").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"ok");
        assert_eq!(names(dir.path()), ["out.bin"]);
    }

    #[test]
    fn nothing_is_visible_before_the_commit_and_the_commit_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model.safetensors");
        std::fs::write(&target, b"old").unwrap();
        let mut out = PendingFile::create(&target).unwrap();
        out.file().write_all(b"new contents").unwrap();
        // Where O_TMPFILE works (Linux filesystems), not even a temporary name exists.
        if cfg!(target_os = "linux") && matches!(out.backing, Backing::Anonymous) {
            assert_eq!(names(dir.path()), ["model.safetensors"]);
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        // A writer opening `path()` itself reaches the same file.
        std::fs::write(out.path(), b"rewritten").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"rewritten");
        assert_eq!(names(dir.path()), ["model.safetensors"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0o644 & 0o077 & !umask_bits(), "mode {mode:o}");
        }
    }

    /// The group/other bits the process umask removes (read back by creating a file).
    #[cfg(unix)]
    fn umask_bits() -> u32 {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("probe");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        0o666 & !mode & 0o077
    }

    #[test]
    fn a_crashed_runs_temporary_file_is_removed_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        // A process id that cannot be running (above Linux's pid_max of 2^22).
        let stale = dir.path().join(format!("{TEMP_PREFIX}4294967-0.out.bin"));
        let live = dir.path().join(format!(
            "{TEMP_PREFIX}{}-999999.out.bin",
            std::process::id()
        ));
        let other = dir.path().join(".hidden-but-not-ours");
        for p in [&stale, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        write_atomic(&dir.path().join("out.bin"), b"ok").unwrap();
        assert!(!stale.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn pending_directories_appear_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("checkpoint-2");
        let pending = PendingDir::create(&target).unwrap();
        write_atomic(&pending.path().join("a.json"), b"{}").unwrap();
        assert!(!target.exists());
        drop(pending);
        assert!(names(dir.path()).is_empty());
        let pending = PendingDir::create(&target).unwrap();
        write_atomic(&pending.path().join("a.json"), b"{}").unwrap();
        pending.commit().unwrap();
        assert_eq!(names(dir.path()), ["checkpoint-2"]);
        assert_eq!(names(&target), ["a.json"]);
        // A crashed run's temporary directory goes with the next write there.
        let stale = dir
            .path()
            .join(format!("{TEMP_PREFIX}4294967-3.checkpoint-4"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("x"), b"partial").unwrap();
        PendingDir::create(&dir.path().join("checkpoint-4")).unwrap();
        assert_eq!(names(dir.path()), ["checkpoint-2"]);
    }

    #[test]
    fn named_pending_files_keep_the_extension() {
        let dir = tempfile::tempdir().unwrap();
        let out = PendingFile::create_named(&dir.path().join("loss.png")).unwrap();
        let p = out.path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(TEMP_PREFIX) && name.ends_with(".loss.png"),
            "{name}"
        );
        drop(out);
        assert!(names(dir.path()).is_empty());
    }
}
