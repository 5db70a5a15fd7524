//! Durable Raft log storage (vote + log) and the in-memory state machine with a
//! persisted snapshot.
//!
//! Files in `state_dir`:
//! * `vote.json`      — the current vote; replaced atomically (tmp + fsync + rename + dir fsync)
//!   before `save_vote` returns, so a restarted node never votes twice in one term.
//! * `raft-log.jsonl` — append-only JSON lines (one [`LogLine`] each); fsync'ed before the
//!   append is acknowledged. Truncation and purge rewrite the whole file atomically.
//! * `committed.json` — last known committed log id (an optimization only; not fsync'ed).
//! * `snapshot.json`  — the last state-machine snapshot (meta + serialized [`SharedState`]).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::error::WatchdogError;
use super::types::{SharedState, TypeConfig};

type StorageResult<T> = Result<T, StorageError<u64>>;

const VOTE_FILE: &str = "vote.json";
const LOG_FILE: &str = "raft-log.jsonl";
const COMMITTED_FILE: &str = "committed.json";
const SNAPSHOT_FILE: &str = "snapshot.json";

/// One line of the log file.
#[derive(Debug, Serialize, Deserialize)]
enum LogLine {
    /// Everything up to and including this log id has been purged.
    Purged(LogId<u64>),
    /// A log entry.
    Entry(Entry<TypeConfig>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data
    // itself (plain maps) is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sto_err(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError<u64> {
    StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

/// fsync a directory so that a rename inside it is durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically replace `path` with `data`: write a temp file, optionally fsync it,
/// rename over the target and (if `durable`) fsync the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path.file_name().and_then(|s| s.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{file_name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(format!(
            "blocking storage task failed: {e}"
        ))),
    }
}

// ---------------------------------------------------------------------------
// Log store
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct LogMem {
    last_purged: Option<LogId<u64>>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
}

#[derive(Debug)]
struct LogInner {
    dir: PathBuf,
    mem: Mutex<LogMem>,
    /// Append handle to `raft-log.jsonl`. Replaced after a rewrite.
    file: Mutex<File>,
}

/// Durable vote + log storage. Cloning shares the same underlying store (the clone is
/// used as the log reader by replication tasks).
#[derive(Debug, Clone)]
pub(crate) struct LogStore {
    inner: Arc<LogInner>,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn encode_log(mem: &LogMem) -> Result<Vec<u8>, serde_json::Error> {
    let mut buf = Vec::new();
    if let Some(p) = mem.last_purged {
        serde_json::to_writer(&mut buf, &LogLine::Purged(p))?;
        buf.push(b'\n');
    }
    for e in mem.entries.values() {
        // Serialize a borrowed view to avoid cloning the entry.
        serde_json::to_writer(&mut buf, &LogLineRef::Entry(e))?;
        buf.push(b'\n');
    }
    Ok(buf)
}

/// Borrowing twin of [`LogLine`] for serialization (same wire format).
#[derive(Serialize)]
enum LogLineRef<'a> {
    #[allow(dead_code)]
    Purged(&'a LogId<u64>),
    Entry(&'a Entry<TypeConfig>),
}

impl LogStore {
    /// Opens (or creates) the log store in `dir`, loading the vote and the log.
    pub(crate) fn open(dir: &Path) -> Result<Self, WatchdogError> {
        std::fs::create_dir_all(dir).map_err(|e| WatchdogError::io(dir, e))?;
        let mut mem = LogMem::default();

        let vote_path = dir.join(VOTE_FILE);
        match std::fs::read(&vote_path) {
            Ok(bytes) => {
                let v: Vote<u64> =
                    serde_json::from_slice(&bytes).map_err(|e| WatchdogError::Corrupt {
                        path: vote_path.clone(),
                        detail: e.to_string(),
                    })?;
                mem.vote = Some(v);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WatchdogError::io(vote_path, e)),
        }

        let committed_path = dir.join(COMMITTED_FILE);
        if let Ok(bytes) = std::fs::read(&committed_path) {
            // Advisory only: ignore an unreadable file.
            mem.committed = serde_json::from_slice(&bytes).ok().flatten();
        }

        let log_path = dir.join(LOG_FILE);
        let mut needs_rewrite = false;
        match std::fs::read(&log_path) {
            Ok(bytes) => {
                let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
                let n = lines.len();
                for (i, line) in lines.into_iter().enumerate() {
                    if line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    match serde_json::from_slice::<LogLine>(line) {
                        Ok(LogLine::Purged(p)) => {
                            mem.last_purged = Some(p);
                            mem.entries = mem.entries.split_off(&(p.index + 1));
                        }
                        Ok(LogLine::Entry(e)) => {
                            // An entry at an existing index replaces the suffix from there.
                            let idx = e.log_id.index;
                            mem.entries.split_off(&idx);
                            mem.entries.insert(idx, e);
                        }
                        Err(err) if i + 1 == n => {
                            // Torn final line from a crash during append: it was never
                            // acknowledged, so dropping it is safe.
                            tracing::warn!(path = %log_path.display(), error = %err, "dropping torn last line of raft log");
                            needs_rewrite = true;
                        }
                        Err(err) => {
                            return Err(WatchdogError::Corrupt {
                                path: log_path.clone(),
                                detail: format!("line {}: {err}", i + 1),
                            })
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WatchdogError::io(log_path, e)),
        }
        if needs_rewrite {
            let data = encode_log(&mem).map_err(|e| WatchdogError::Corrupt {
                path: log_path.clone(),
                detail: e.to_string(),
            })?;
            write_atomic(&log_path, &data, true).map_err(|e| WatchdogError::io(&log_path, e))?;
        }
        let file = open_append(&log_path).map_err(|e| WatchdogError::io(&log_path, e))?;
        Ok(LogStore {
            inner: Arc::new(LogInner {
                dir: dir.to_path_buf(),
                mem: Mutex::new(mem),
                file: Mutex::new(file),
            }),
        })
    }

    /// Rewrites the whole log file from memory (after truncate / purge).
    async fn rewrite(&self) -> StorageResult<()> {
        let data = {
            let mem = lock(&self.inner.mem);
            encode_log(&mem).map_err(|e| sto_err(ErrorSubject::Logs, ErrorVerb::Write, e))?
        };
        let inner = self.inner.clone();
        blocking(move || {
            let path = inner.dir.join(LOG_FILE);
            // Hold the file lock across the swap so no append interleaves.
            let mut file = lock(&inner.file);
            write_atomic(&path, &data, true)?;
            *file = open_append(&path)?;
            Ok(())
        })
        .await
        .map_err(|e| sto_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let mem = lock(&self.inner.mem);
        Ok(mem.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let mem = lock(&self.inner.mem);
        let last = mem
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(mem.last_purged);
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        let data = serde_json::to_vec(vote)
            .map_err(|e| sto_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        let path = self.inner.dir.join(VOTE_FILE);
        blocking(move || write_atomic(&path, &data, true))
            .await
            .map_err(|e| sto_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        lock(&self.inner.mem).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        Ok(lock(&self.inner.mem).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        lock(&self.inner.mem).committed = committed;
        let data = serde_json::to_vec(&committed)
            .map_err(|e| sto_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let path = self.inner.dir.join(COMMITTED_FILE);
        // Not fsync'ed: losing it only means re-learning the commit index from the leader.
        blocking(move || write_atomic(&path, &data, false))
            .await
            .map_err(|e| sto_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        Ok(lock(&self.inner.mem).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut buf = Vec::new();
        {
            let mut mem = lock(&self.inner.mem);
            for e in entries {
                serde_json::to_writer(&mut buf, &LogLineRef::Entry(&e))
                    .map_err(|err| sto_err(ErrorSubject::Log(e.log_id), ErrorVerb::Write, err))?;
                buf.push(b'\n');
                mem.entries.insert(e.log_id.index, e);
            }
        }
        let inner = self.inner.clone();
        let res = blocking(move || {
            let mut f = lock(&inner.file);
            f.write_all(&buf)?;
            f.sync_data()
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = sto_err(ErrorSubject::Logs, ErrorVerb::Write, &e);
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        {
            let mut mem = lock(&self.inner.mem);
            mem.entries.split_off(&log_id.index);
        }
        self.rewrite().await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        {
            let mut mem = lock(&self.inner.mem);
            mem.last_purged = Some(log_id);
            mem.entries = mem.entries.split_off(&(log_id.index + 1));
        }
        self.rewrite().await
    }
}

// ---------------------------------------------------------------------------
// State machine
// ---------------------------------------------------------------------------

/// Persisted snapshot: metadata plus the serialized [`SharedState`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

#[derive(Debug)]
struct SmData {
    last_applied: Option<LogId<u64>>,
    last_membership: StoredMembership<u64, BasicNode>,
    state: SharedState,
    snapshot: Option<StoredSnapshot>,
    snapshot_seq: u64,
}

#[derive(Debug)]
struct SmInner {
    dir: PathBuf,
    data: Mutex<SmData>,
    state_tx: watch::Sender<SharedState>,
}

/// The state machine: [`SharedState`] in memory, snapshot persisted to `snapshot.json`.
/// On restart it starts from the snapshot and openraft re-applies the remaining log.
#[derive(Debug, Clone)]
pub(crate) struct StateMachineStore {
    inner: Arc<SmInner>,
}

impl StateMachineStore {
    /// Opens the state machine, loading the last snapshot if there is one.
    pub(crate) fn open(dir: &Path) -> Result<(Self, watch::Receiver<SharedState>), WatchdogError> {
        let path = dir.join(SNAPSHOT_FILE);
        let mut data = SmData {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state: SharedState::default(),
            snapshot: None,
            snapshot_seq: 0,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let corrupt = |detail: String| WatchdogError::Corrupt {
                    path: path.clone(),
                    detail,
                };
                let snap: StoredSnapshot =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let state: SharedState =
                    serde_json::from_slice(&snap.data).map_err(|e| corrupt(e.to_string()))?;
                data.last_applied = snap.meta.last_log_id;
                data.last_membership = snap.meta.last_membership.clone();
                data.state = state;
                data.snapshot = Some(snap);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WatchdogError::io(path, e)),
        }
        let (state_tx, state_rx) = watch::channel(data.state.clone());
        Ok((
            StateMachineStore {
                inner: Arc::new(SmInner {
                    dir: dir.to_path_buf(),
                    data: Mutex::new(data),
                    state_tx,
                }),
            },
            state_rx,
        ))
    }

    #[allow(clippy::result_large_err)] // error type is dictated by openraft
    fn persist_snapshot(&self, snap: &StoredSnapshot) -> StorageResult<()> {
        let sig = Some(snap.meta.signature());
        let bytes = serde_json::to_vec(snap)
            .map_err(|e| sto_err(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Write, e))?;
        write_atomic(&self.inner.dir.join(SNAPSHOT_FILE), &bytes, true)
            .map_err(|e| sto_err(ErrorSubject::Snapshot(sig), ErrorVerb::Write, e))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let snap = {
            let mut d = lock(&self.inner.data);
            d.snapshot_seq += 1;
            let data = serde_json::to_vec(&d.state)
                .map_err(|e| sto_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            let snapshot_id = match d.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, d.snapshot_seq),
                None => format!("--{}", d.snapshot_seq),
            };
            StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: d.last_applied,
                    last_membership: d.last_membership.clone(),
                    snapshot_id,
                },
                data,
            }
        };
        self.persist_snapshot(&snap)?;
        lock(&self.inner.data).snapshot = Some(snap.clone());
        Ok(Snapshot {
            meta: snap.meta,
            snapshot: Box::new(Cursor::new(snap.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>)> {
        let d = lock(&self.inner.data);
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<SharedState>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let snapshot_of_state = {
            let mut d = lock(&self.inner.data);
            for e in entries {
                d.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(cmd) => d.state.apply(&cmd),
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(e.log_id), m);
                    }
                }
                out.push(d.state.clone());
            }
            d.state.clone()
        };
        self.inner.state_tx.send_if_modified(|cur| {
            if *cur != snapshot_of_state {
                *cur = snapshot_of_state;
                true
            } else {
                false
            }
        });
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let state: SharedState = serde_json::from_slice(&data).map_err(|e| {
            sto_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.persist_snapshot(&snap)?;
        {
            let mut d = lock(&self.inner.data);
            d.last_applied = meta.last_log_id;
            d.last_membership = meta.last_membership.clone();
            d.state = state.clone();
            d.snapshot = Some(snap);
        }
        self.inner.state_tx.send_replace(state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let d = lock(&self.inner.data);
        Ok(d.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
