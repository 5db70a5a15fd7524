//! Where the PostgreSQL programs are installed, and the OS user the servers run as.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use super::{io_err, lock, ClusterError, Result};

/// Returns the full path of a PostgreSQL program (`postgres`, `initdb`, `psql`, ...).
///
/// The directory is taken from the `PG_BIN` environment variable if set,
/// otherwise from `pg_config --bindir` if that directory contains `postgres`,
/// otherwise the highest-versioned `/usr/lib/postgresql/*/bin` that contains
/// `postgres`. The error explains how to install PostgreSQL or set `PG_BIN`.
pub fn pg_bin(tool: &str) -> Result<PathBuf> {
    let dir = pg_bin_dir()?;
    let path = dir.join(tool);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ClusterError::BinariesNotFound(format!(
            "`{tool}` is not in {}",
            dir.display()
        )))
    }
}

fn pg_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
        // An explicit setting is never second-guessed, so a wrong PG_BIN is reported instead of silently bypassed.
        let dir = PathBuf::from(dir);
        if dir.join("postgres").is_file() {
            return Ok(dir);
        }
        return Err(ClusterError::BinariesNotFound(format!(
            "PG_BIN={} does not contain `postgres`",
            dir.display()
        )));
    }
    // Probing spawns pg_config, and psql is looked up for every query, so remember the answer.
    static DETECTED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = lock(&DETECTED);
    if let Some(dir) = cached.as_ref() {
        return Ok(dir.clone());
    }
    let dir = detect_bin_dir().ok_or_else(|| {
        ClusterError::BinariesNotFound(
            "neither `pg_config --bindir` nor /usr/lib/postgresql/*/bin contains `postgres`".into(),
        )
    })?;
    *cached = Some(dir.clone());
    Ok(dir)
}

fn detect_bin_dir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("postgres").is_file() {
                return Some(dir);
            }
        }
    }
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    for entry in fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let bin = entry.path().join("bin");
        if !bin.join("postgres").is_file() {
            continue;
        }
        // "9.6" < "10" < "15": compare numerically component by component.
        let version: Vec<u64> = entry
            .file_name()
            .to_string_lossy()
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, dir)| dir)
}

// The OS user the servers run as.

#[derive(Debug, Clone)]
struct ServerUser {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// The user server-side programs must run as: `None` means "as ourselves".
fn server_user() -> Result<Option<&'static ServerUser>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    static USER: OnceLock<Option<ServerUser>> = OnceLock::new();
    match USER.get_or_init(|| lookup_user("postgres")) {
        Some(u) => Ok(Some(u)),
        None => Err(ClusterError::NoPostgresUser),
    }
}

fn lookup_user(name: &str) -> Option<ServerUser> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; an all-zero value is valid and is overwritten by getpwnam_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // The reentrant variant because tests look users up from many threads at once.
    // SAFETY: every pointer refers to live, correctly sized storage owned by this frame.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    let home = if pwd.pw_dir.is_null() {
        PathBuf::from("/")
    } else {
        // SAFETY: getpwnam_r succeeded, so pw_dir points to a NUL-terminated string inside `buf`.
        PathBuf::from(OsStr::from_bytes(
            unsafe { CStr::from_ptr(pwd.pw_dir) }.to_bytes(),
        ))
    };
    Some(ServerUser {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home,
    })
}

/// Makes `cmd` run as the server user when we are root.
pub(super) fn as_server_user(cmd: &mut Command) -> Result<()> {
    if let Some(u) = server_user()? {
        cmd.uid(u.uid).gid(u.gid).env("HOME", &u.home);
    }
    // The caller's cwd may be unreadable for the server user, which makes initdb and postgres complain.
    cmd.current_dir("/");
    // Keeps server messages in English, so the log can be searched for known errors.
    cmd.env("LC_ALL", "C");
    Ok(())
}

pub(super) fn server_command(tool: &str) -> Result<Command> {
    let mut cmd = Command::new(pg_bin(tool)?);
    as_server_user(&mut cmd)?;
    Ok(cmd)
}

/// When we are root, the server user must be able to reach the temporary directory;
/// otherwise initdb fails with a confusing permission error deep inside a template path.
pub(super) fn check_temp_dir_accessible() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(u) = server_user()? else {
        return Ok(());
    };
    let tmp = std::env::temp_dir();
    for dir in tmp.ancestors() {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let reachable = mode & 0o001 != 0
            || (meta.uid() == u.uid && mode & 0o100 != 0)
            || (meta.gid() == u.gid && mode & 0o010 != 0);
        if !reachable {
            return Err(ClusterError::Invalid(format!(
                "the temporary directory {} is not accessible to the `postgres` user ({} is mode {:o}); \
                 set TMPDIR to a world-accessible directory such as /tmp",
                tmp.display(),
                dir.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Gives a directory or file we created to the server user (no-op unless root).
pub(super) fn chown_to_server_user(path: &Path) -> Result<()> {
    let Some(u) = server_user()? else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
        .map_err(io_err(format!("chown {} to postgres", path.display())))
}
