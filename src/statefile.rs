//! The state files mxgate writes itself (the ban file, the screening cache): each
//! written whole, atomically and privately, the one way this module knows.
//!
//! ```text
//!  open <folder>/.<name>.<32 random hex>.tmp  O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600
//!    (taken: another random name; a planted file or symlink is never opened)
//!  fchmod 0600 (whatever the umask) ─► write ─► fsync ─► rename over <name>
//!    (a symlink at <name> is replaced, never followed) ─► fsync the folder
//!  any error: the temporary file is removed, the old file stands
//! ```
//!
//! A crash leaves the old file or the new one, never a mix. [`Failing`] keeps a writer
//! that keeps failing (a full disk) to one error line until it succeeds again.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Every state file's mode: read and written by mxgate's user only (the ban file and the
/// screening cache name peers' addresses).
pub const MODE: u32 = 0o600;

/// Writes `text` to `path` atomically, mode [`MODE`].
pub fn write(path: &Path, text: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for _ in 0..8 {
        let tmp = dir.join(format!(".{name}.{}.tmp", crate::random::hex128()?));
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        match opened {
            Ok(file) => {
                return fill_and_rename(file, &tmp, path, dir, text).inspect_err(|_| {
                    let _ = fs::remove_file(&tmp);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("eight random temporary names were all taken"))
}

fn fill_and_rename(mut file: File, tmp: &Path, path: &Path, dir: &Path, text: &[u8]) -> io::Result<()> {
    file.set_permissions(Permissions::from_mode(MODE))?;
    file.write_all(text)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Whether a state file's writes are failing, so that a run of failures is one error
/// line, and the first success after them one info line.
#[derive(Debug, Default)]
pub struct Failing(bool);

impl Failing {
    /// Logs `outcome` of writing `what` (e.g. "the ban file") at `path`, once per run of
    /// failures; whether it failed.
    pub fn report(&mut self, what: &str, path: &Path, outcome: io::Result<()>, meanwhile: &str) -> bool {
        match outcome {
            Ok(()) => {
                if std::mem::take(&mut self.0) {
                    tracing::info!("{what} {} written again", path.display());
                }
                false
            }
            Err(e) => {
                if !std::mem::replace(&mut self.0, true) {
                    tracing::error!("cannot write {what} {}: {e}; {meanwhile}; retrying", path.display());
                }
                true
            }
        }
    }

    pub fn is_failing(&self) -> bool {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn a_file_is_replaced_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.list");
        fs::write(&path, "old\n").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write(&path, b"new\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(mode(&path), 0o600, "private whatever the old file's mode or the umask");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        let path = dir.path().join("bans.list");
        symlink(&victim, &path).unwrap();
        write(&path, b"bans\n").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n", "the symlink's target is untouched");
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file(), "the symlink itself replaced");
        assert_eq!(fs::read_to_string(&path).unwrap(), "bans\n");
    }

    #[test]
    fn a_planted_temporary_name_is_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        // the old predictable name, planted as a symlink: nothing follows it
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        symlink(&victim, dir.path().join(format!(".cache.tmp-{}", std::process::id()))).unwrap();
        write(&path, b"x\n").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        // a folder where the file should be: the rename fails after the data was written
        let path = dir.path().join("bans.list");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), "x").unwrap();
        assert!(write(&path, b"bans\n").is_err());
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
        assert!(path.join("keep").exists());
        // a folder that is not there: an error, nothing created
        assert!(write(&dir.path().join("missing/bans.list"), b"bans\n").is_err());
    }

    #[test]
    fn failures_are_reported_once_per_run() {
        let mut f = Failing::default();
        let p = Path::new("x");
        assert!(f.report("the ban file", p, Err(io::Error::other("disk full")), "kept in memory"));
        assert!(f.is_failing());
        assert!(f.report("the ban file", p, Err(io::Error::other("disk full")), "kept in memory"));
        assert!(!f.report("the ban file", p, Ok(()), "kept in memory"));
        assert!(!f.is_failing());
    }
}
