//! The per-device state file (`<state_dir>/<id>.state`): what `ublk list`
//! shows beyond what the kernel knows (target, its arguments). Plain
//! `key=value` lines, written atomically (temporary file + rename).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub const DEFAULT_STATE_DIR: &str = "/run/ublk";

/// Where state files go unless a device's configuration says otherwise:
/// `$UBLK_STATE_DIR` when set (and not empty), else [`DEFAULT_STATE_DIR`]
/// for root; other users (unprivileged devices) get `$XDG_RUNTIME_DIR/ublk`,
/// else `/tmp/ublk-<uid>`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("UBLK_STATE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            if uid == 0 {
                return PathBuf::from(DEFAULT_STATE_DIR);
            }
            match std::env::var_os("XDG_RUNTIME_DIR") {
                Some(d) if !d.is_empty() => PathBuf::from(d).join("ublk"),
                _ => PathBuf::from(format!("/tmp/ublk-{uid}")),
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateFile {
    pub entries: Vec<(String, String)>,
}

impl StateFile {
    pub fn path(dir: &Path, dev_id: u32) -> PathBuf {
        dir.join(format!("{dev_id}.state"))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value,
            None => self.entries.push((key.to_string(), value)),
        }
    }

    pub fn parse(text: &str) -> StateFile {
        let entries = text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.trim().to_string(), unescape(v))).collect();
        StateFile { entries }
    }

    pub fn render(&self) -> String {
        self.entries.iter().map(|(k, v)| format!("{k}={}\n", escape(v))).collect()
    }

    pub fn load(dir: &Path, dev_id: u32) -> Result<StateFile> {
        let p = Self::path(dir, dev_id);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::from_io(e, format!("cannot read {}", p.display())))?;
        Ok(Self::parse(&text))
    }

    /// Writes the file atomically: a temporary file in the same directory,
    /// flushed to disk, renamed over the old one. A crash leaves either the
    /// old or the new file, never a torn one.
    pub fn store(&self, dir: &Path, dev_id: u32) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        ensure_dir(dir)?;
        let p = Self::path(dir, dev_id);
        let tmp = dir.join(format!(".{dev_id}.state.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            // a leftover of an earlier process with this pid goes; a new file,
            // never a symlink followed
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::from_io(e, format!("cannot write {}", tmp.display())));
        }
        std::fs::rename(&tmp, &p).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::from_io(e, format!("cannot rename to {}", p.display()))
        })
    }

    pub fn remove(dir: &Path, dev_id: u32) {
        let _ = std::fs::remove_file(Self::path(dir, dev_id));
    }

    /// Moves the state file of `dev_id` out of the way (to a name of this
    /// process's) and gives where, if there was one.
    pub fn set_aside(dir: &Path, dev_id: u32) -> Option<PathBuf> {
        let a = dir.join(format!(".{dev_id}.state.del.{}", std::process::id()));
        std::fs::rename(Self::path(dir, dev_id), &a).ok().map(|()| a)
    }

    /// After `set_aside`: `restore` puts the file back unless the device has
    /// one again meanwhile (a recovery wrote it); else removes it.
    pub fn put_back(dir: &Path, dev_id: u32, aside: &Path, restore: bool) {
        if restore {
            // (a hard link fails rather than replace a newer file)
            let _ = std::fs::hard_link(aside, Self::path(dir, dev_id));
        }
        let _ = std::fs::remove_file(aside);
    }
}

/// Makes `dir` (and its parents) if missing: mode 0755 for root, 0700 for
/// others. Refuses (EPERM) a directory, or a symlink, that belongs to another
/// user, or that others may write to: a user's state directory in /tmp could
/// be made in advance by someone else, who could then edit what `recover`
/// serves, or plant symlinks.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mode = if uid == 0 { 0o755 } else { 0o700 };
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(dir).map_err(|e| Error::from_io(e, format!("cannot create {}", dir.display())))?;
    let m = std::fs::symlink_metadata(dir).map_err(|e| Error::from_io(e, format!("cannot stat {}", dir.display())))?;
    let refuse = |why: String| Err(Error::new(libc::EPERM, format!("refusing the state directory {}: {why}", dir.display())));
    if !m.is_dir() {
        return refuse("not a directory (a symlink?)".into());
    }
    if m.uid() != uid && m.uid() != 0 {
        return refuse(format!("it belongs to uid {}, not {uid}", m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return refuse(format!("others may write to it (mode {:o})", m.mode() & 0o7777));
    }
    Ok(())
}

/// A random 64-bit value, never 0: what names a device among all that ever
/// had its id (kept by the kernel in `ublksrv_flags`, recorded in the state
/// file).
pub fn new_token() -> u64 {
    let mut t = 0u64;
    // SAFETY: writes at most 8 bytes into a local u64.
    let n = unsafe { libc::getrandom(&mut t as *mut u64 as *mut libc::c_void, 8, 0) };
    if n != 8 {
        // no getrandom: time and pid are unique enough between two devices
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        t = now ^ ((std::process::id() as u64) << 40);
    }
    t.max(1)
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r")
}

fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut it = v.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some(o) => out.push(o),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ublk-state-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn state_dir_is_made_private_and_others_are_refused() {
        let base = scratch("dir");
        let d = base.join("a/b");
        ensure_dir(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o022, 0, "mode {mode:o}");
        let mut s = StateFile::default();
        s.set("pid", "1");
        s.store(&d, 3).unwrap();
        assert_eq!(StateFile::load(&d, 3).unwrap(), s);
        // others may write to it
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = s.store(&d, 3).unwrap_err();
        assert_eq!(e.errno(), libc::EPERM);
        assert!(e.to_string().contains("others may write"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        // a symlink in its place
        let link = base.join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert_eq!(ensure_dir(&link).unwrap_err().errno(), libc::EPERM);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn set_aside_and_put_back() {
        let d = scratch("aside");
        ensure_dir(&d).unwrap();
        let mut s = StateFile::default();
        s.set("pid", "1");
        assert!(StateFile::set_aside(&d, 5).is_none(), "no file: nothing set aside");
        s.store(&d, 5).unwrap();
        // deleted: the file goes
        let a = StateFile::set_aside(&d, 5).unwrap();
        assert!(!StateFile::path(&d, 5).exists());
        StateFile::put_back(&d, 5, &a, false);
        assert!(!a.exists() && !StateFile::path(&d, 5).exists());
        // not deleted: it comes back, but never over a newer one
        s.store(&d, 5).unwrap();
        let a = StateFile::set_aside(&d, 5).unwrap();
        StateFile::put_back(&d, 5, &a, true);
        assert_eq!(StateFile::load(&d, 5).unwrap(), s);
        let a = StateFile::set_aside(&d, 5).unwrap();
        let mut newer = s.clone();
        newer.set("pid", "2");
        newer.store(&d, 5).unwrap();
        StateFile::put_back(&d, 5, &a, true);
        assert_eq!(StateFile::load(&d, 5).unwrap(), newer);
        assert!(!a.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn tokens_differ() {
        let (a, b) = (new_token(), new_token());
        assert!(a != 0 && b != 0 && a != b);
    }

    #[test]
    fn round_trip() {
        let mut s = StateFile::default();
        s.set("target", "loop");
        s.set("file", "/tmp/a=b\nc\\d\r");
        s.set("target", "mem");
        let back = StateFile::parse(&s.render());
        assert_eq!(back, s);
        assert_eq!(back.get("target"), Some("mem"));
        assert_eq!(back.get("missing"), None);
    }

    #[test]
    fn store_and_load() {
        let dir = std::env::temp_dir().join(format!("ublk-state-test-{}", std::process::id()));
        let mut s = StateFile::default();
        s.set("pid", "42");
        s.store(&dir, 7).unwrap();
        assert_eq!(StateFile::load(&dir, 7).unwrap(), s);
        StateFile::remove(&dir, 7);
        assert_eq!(StateFile::load(&dir, 7).unwrap_err().errno(), libc::ENOENT);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
