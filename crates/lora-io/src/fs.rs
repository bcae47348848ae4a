//! Crash-safe file output: never leave a half-written file under the final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A temporary path next to `path` (same directory, so the rename is atomic), keeping the
/// extension so that tools choosing a format by extension still work.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!(".{}.{}.tmp.{name}", name, std::process::id());
    path.with_file_name(tmp)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over
/// `path`. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path_for(path);
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Runs `write` on a temporary path beside `path`, then renames the result over `path`;
/// for writers that insist on opening the file themselves (image encoders).
pub fn with_atomic_path<F, E>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> std::result::Result<(), E>,
    E: std::fmt::Display,
{
    let tmp = temp_path_for(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("lora-fs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let target = dir.join("out.bin");
        let r = with_atomic_path(&target, |_| Err::<(), _>("encoder failed"));
        assert!(r.is_err());
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0), 0);
        write_atomic(&target, b"ok").ok();
        assert_eq!(std::fs::read(&target).ok().as_deref(), Some(&b"ok"[..]));
        std::fs::remove_dir_all(&dir).ok();
    }
}
