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
        std::fs::create_dir_all(dir).map_err(|e| Error::from_io(e, format!("cannot create {}", dir.display())))?;
        let p = Self::path(dir, dev_id);
        let tmp = dir.join(format!(".{dev_id}.state.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
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
