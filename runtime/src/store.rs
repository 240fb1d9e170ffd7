//! Persistent records in SQLite (`<state_dir>/arrakis.db`): sandboxes, the
//! qcow2 disk layers they and their snapshots stand on, and snapshots.
//!
//! SQLite gives atomic, durable updates and safe sharing between the manager
//! processes that use one state directory: WAL journal, `synchronous=FULL`,
//! a busy timeout for writers that collide, and every change in one
//! transaction. The schema is versioned with `PRAGMA user_version`;
//! [`MIGRATIONS`] lists the steps from each version to the next. The store
//! records facts; deciding transitions is [`crate::sandbox`]'s job.
//! Calls are short and synchronous; the connection sits behind a std mutex
//! that is never held across an `.await`.
//!
//! # Disk layers
//! Every disk is a chain of qcow2 files over a read-only base image. A
//! sandbox writes to its top layer (`sandboxes.disk_layer`); a snapshot
//! freezes that layer (`snapshots.layer`) and the sandbox continues on a new
//! layer above it; a restore starts a new sandbox on a new layer above the
//! snapshot's. Each layer row names its `parent` (the file it is backed by;
//! `NULL`: the base image). Instead of counters, a reachability rule decides
//! what to keep: a layer is live while a sandbox or a snapshot names it, or
//! it is the parent of a live layer. Every change that drops a reference
//! runs the collection ([`collect_garbage`]) in the same transaction and
//! returns the ids of the layers it removed, whose files the caller then
//! deletes. A crash between the commit and the unlink leaves files without
//! rows, which reconciliation removes. Rows are always written before their
//! files are created, so a file without a row is never one being made.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, Transaction};

mod net;

use crate::accel::AccelKind;
use crate::network::{SandboxNet, SnapshotNet};
use crate::sandbox::SandboxState;
use crate::vmm::StateFormat;

/// `MIGRATIONS[n]` upgrades a database from `user_version` n to n + 1.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE sandboxes (
        name        TEXT PRIMARY KEY NOT NULL,
        id          TEXT NOT NULL UNIQUE,
        vcpus       INTEGER NOT NULL,
        memory_mb   INTEGER NOT NULL,
        image       TEXT NOT NULL,
        image_path  TEXT NOT NULL,
        state       TEXT NOT NULL,
        pid         INTEGER,
        accel       TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        boot_count  INTEGER NOT NULL DEFAULT 0
    ) STRICT;",
    // v2: environment, disk layers, snapshots. Sandboxes from v1 keep
    // `disk_layer` NULL: their overlay is still in the sandbox directory
    // and moves into `layers/` on their next start.
    "ALTER TABLE sandboxes ADD COLUMN env TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE layers (
        id          TEXT PRIMARY KEY NOT NULL,
        parent      TEXT REFERENCES layers(id),
        created_at  INTEGER NOT NULL
    ) STRICT;
    ALTER TABLE sandboxes ADD COLUMN disk_layer TEXT REFERENCES layers(id);
    CREATE TABLE snapshots (
        id          TEXT PRIMARY KEY NOT NULL,
        dir         TEXT NOT NULL UNIQUE,
        state       TEXT NOT NULL,
        sandbox     TEXT NOT NULL,
        sandbox_id  TEXT NOT NULL,
        vcpus       INTEGER NOT NULL,
        memory_mb   INTEGER NOT NULL,
        image       TEXT NOT NULL,
        image_path  TEXT NOT NULL,
        env         TEXT NOT NULL,
        accel       TEXT NOT NULL,
        layer       TEXT NOT NULL REFERENCES layers(id),
        next_layer  TEXT REFERENCES layers(id),
        created_at  INTEGER NOT NULL
    ) STRICT;",
    // v3: lineage. The snapshot a sandbox was restored, forked or rolled
    // back from, and the one its snapshots' sandbox came from (free text:
    // the snapshot may since be deleted).
    "ALTER TABLE sandboxes ADD COLUMN from_snapshot TEXT;
    ALTER TABLE snapshots ADD COLUMN parent_snapshot TEXT;",
    // v4: how the device state was saved (older snapshots: a migration
    // stream), and golden snapshots for warm starts, one per key.
    "ALTER TABLE snapshots ADD COLUMN state_format TEXT NOT NULL DEFAULT 'migration';
    ALTER TABLE snapshots ADD COLUMN golden_key TEXT;
    CREATE UNIQUE INDEX snapshots_golden_key ON snapshots(golden_key)
        WHERE golden_key IS NOT NULL;
    CREATE TABLE file_digests (
        path        TEXT PRIMARY KEY NOT NULL,
        stamp       TEXT NOT NULL,
        sha256      TEXT NOT NULL
    ) STRICT;",
    // v5: networking. A sandbox's NIC and a snapshot's (JSON; NULL: none,
    // as every earlier sandbox and snapshot), and the leases that keep
    // addresses and host ports unique across processes.
    "ALTER TABLE sandboxes ADD COLUMN network TEXT;
    ALTER TABLE snapshots ADD COLUMN network TEXT;
    CREATE TABLE addresses (
        address     INTEGER PRIMARY KEY NOT NULL,
        sandbox_id  TEXT NOT NULL
    ) STRICT;
    CREATE TABLE forwards (
        host_port   INTEGER PRIMARY KEY NOT NULL,
        sandbox_id  TEXT NOT NULL,
        guest_port  INTEGER NOT NULL,
        description TEXT NOT NULL
    ) STRICT;
    CREATE INDEX forwards_sandbox ON forwards(sandbox_id);",
];

/// Every layer that is live (see the module documentation).
const LIVE_LAYERS: &str = "WITH RECURSIVE live(id) AS (
        SELECT id FROM (
            SELECT disk_layer AS id FROM sandboxes
            UNION SELECT layer FROM snapshots
            UNION SELECT next_layer FROM snapshots
        ) WHERE id IS NOT NULL
        UNION
        SELECT layers.parent FROM layers JOIN live ON layers.id = live.id
        WHERE layers.parent IS NOT NULL
    )";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the state database {path} has schema version {found}; this build knows up to {known}"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("state database query failed while trying to {op}")]
    Query {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("a sandbox named {name:?} already exists")]
    Duplicate { name: String },
    #[error("no sandbox named {name:?}")]
    Missing { name: String },
    #[error("{max} sandboxes exist, the configured maximum")]
    Quota { max: u32 },
    #[error("a snapshot with id {id:?} already exists")]
    DuplicateSnapshot { id: String },
    #[error("no snapshot with id {id:?}")]
    MissingSnapshot { id: String },
    #[error("no free address left in {subnet}")]
    AddressesExhausted { subnet: crate::network::Ipv4Net },
    #[error("host port {port} is already in use")]
    PortTaken { port: u16 },
    #[error("no free host port left in {range}")]
    PortsExhausted { range: crate::network::PortRange },
    #[error(
        "at most {max} forwards per sandbox; it has {existing} and {adding} more were asked for"
    )]
    TooManyForwards {
        max: usize,
        existing: usize,
        adding: usize,
    },
    #[error("record of sandbox {name:?} has an invalid {field}: {value:?}")]
    Corrupt {
        name: String,
        field: &'static str,
        value: String,
    },
}

/// What is recorded about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    pub name: String,
    /// Random hex; names the sandbox directory and lock file.
    pub id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub image: String,
    /// The base image at the bottom of the disk chain (symlinks resolved).
    pub image_path: PathBuf,
    pub state: SandboxState,
    /// QEMU's pid while one is expected to run.
    pub pid: Option<u32>,
    pub accel: AccelKind,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub boot_count: u32,
    /// Environment for every exec (stored, not applied, by the runtime).
    pub env: BTreeMap<String, String>,
    /// The writable top layer of the disk; `None` for sandboxes created
    /// before layers existed (their disk is the sandbox directory's
    /// `overlay.qcow2` until their next start).
    pub disk_layer: Option<String>,
    /// The snapshot this sandbox was last restored, forked or rolled back
    /// from (which may since be deleted); `None` for a cold-created one.
    pub from_snapshot: Option<String>,
    /// Its NIC; `None` until one is attached, and for sandboxes from
    /// before networking.
    pub network: Option<SandboxNet>,
}

/// A layer row to insert along with the record that references it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLayer {
    pub id: String,
    /// The layer it is backed by; `None`: the base image.
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Being taken; the taker holds the snapshot's lock.
    Creating,
    Ready,
}

impl SnapshotState {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
        }
    }

    fn parse(s: &str) -> Option<SnapshotState> {
        match s {
            "creating" => Some(SnapshotState::Creating),
            "ready" => Some(SnapshotState::Ready),
            _ => None,
        }
    }
}

/// What is recorded about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The caller's id (free text, unique).
    pub id: String,
    /// Internal id naming the snapshot's directory and lock file.
    pub dir: String,
    pub state: SnapshotState,
    /// Name and id of the sandbox it was taken of.
    pub sandbox: String,
    pub sandbox_id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub image: String,
    pub image_path: PathBuf,
    pub env: BTreeMap<String, String>,
    /// Restores must run under the same accelerator.
    pub accel: AccelKind,
    /// The frozen disk layer.
    pub layer: String,
    /// While `Creating`: the layer the sandbox moves to when its disk is
    /// frozen, until that move is recorded.
    pub next_layer: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The `from_snapshot` of the sandbox when it was taken.
    pub parent_snapshot: Option<String>,
    /// How `state.bin` was written.
    pub state_format: StateFormat,
    /// Set on the golden snapshots warm starts fork from (hidden from
    /// users): what they were booted from, see `manager::golden`.
    pub golden_key: Option<String>,
    /// The NIC the VM had (a restore recreates it), `None` if it had none.
    pub network: Option<SnapshotNet>,
}

pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        Ok(Store {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the guard cannot leave SQLite half-written
        // (transactions roll back), so a poisoned lock is safe to reuse.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `body` in one write transaction (taken at once, so concurrent
    /// writers in other processes queue on SQLite's lock).
    fn write<T>(
        &self,
        op: &'static str,
        body: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(query_err(op))?;
        let value = body(&tx)?;
        tx.commit().map_err(query_err(op))?;
        Ok(value)
    }

    /// Adds a new record, and `layer` (its top layer) with it. Refused with
    /// `Duplicate` if the name is taken and with `Quota` when `max_sandboxes`
    /// (0: unlimited) records exist: the count and the insert are one
    /// transaction, so concurrent creates in any number of processes never
    /// overshoot.
    pub fn insert(
        &self,
        record: &SandboxRecord,
        layer: Option<&NewLayer>,
        max_sandboxes: u32,
    ) -> Result<(), StoreError> {
        self.write("insert a sandbox", |tx| {
            insert_sandbox(tx, record, layer, max_sandboxes)
        })
    }

    /// [`Store::insert`] for a sandbox restored from snapshot `snapshot`,
    /// whose new top layer stands on the snapshot's layer. `MissingSnapshot`
    /// if the snapshot is gone or not ready.
    pub fn insert_restored(
        &self,
        record: &SandboxRecord,
        layer: &NewLayer,
        snapshot: &str,
        max_sandboxes: u32,
    ) -> Result<(), StoreError> {
        self.write("insert a restored sandbox", |tx| {
            check_layer_on_snapshot(tx, layer, snapshot)?;
            insert_sandbox(tx, record, Some(layer), max_sandboxes)
        })
    }

    /// Moves the sandbox `name` with id `id` onto `layer`, a new layer on
    /// snapshot `snapshot`'s frozen one, for a rollback: records the new
    /// top layer, the lineage, `state` and no pid, and returns the layers
    /// that became unreachable (its old ones, unless a snapshot or another
    /// sandbox stands on them). `MissingSnapshot` if the snapshot is gone.
    pub fn rollback_disk(
        &self,
        name: &str,
        id: &str,
        layer: &NewLayer,
        snapshot: &str,
        state: SandboxState,
    ) -> Result<Vec<String>, StoreError> {
        self.write("roll a sandbox back", |tx| {
            check_layer_on_snapshot(tx, layer, snapshot)?;
            insert_layer(tx, &layer.id, layer.parent.as_deref())?;
            let changed = tx
                .execute(
                    "UPDATE sandboxes SET disk_layer = ?3, from_snapshot = ?4, state = ?5,
                                          pid = NULL
                     WHERE name = ?1 AND id = ?2",
                    params![name, id, layer.id, snapshot, state.as_str()],
                )
                .map_err(query_err("roll a sandbox back"))?;
            if changed == 0 {
                return Err(StoreError::Missing {
                    name: name.to_string(),
                });
            }
            collect_garbage(tx)
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT * FROM sandboxes WHERE name = ?1")
            .map_err(query_err("read a sandbox"))?;
        let row = stmt
            .query_row([name], RawRecord::from_row)
            .optional()
            .map_err(query_err("read a sandbox"))?;
        row.map(RawRecord::into_record).transpose()
    }

    /// Every record, ordered by name.
    pub fn list(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT * FROM sandboxes ORDER BY name")
            .map_err(query_err("list sandboxes"))?;
        let rows = stmt
            .query_map([], RawRecord::from_row)
            .map_err(query_err("list sandboxes"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(query_err("list sandboxes"))?;
        rows.into_iter().map(RawRecord::into_record).collect()
    }

    /// Records a new state and pid for the sandbox `name` with id `id`.
    pub fn set_state(
        &self,
        name: &str,
        id: &str,
        state: SandboxState,
        pid: Option<u32>,
    ) -> Result<(), StoreError> {
        self.update(
            name,
            "UPDATE sandboxes SET state = ?3, pid = ?4 WHERE name = ?1 AND id = ?2",
            params![name, id, state.as_str(), pid],
        )
    }

    /// Records a boot: the new pid, and one more boot counted.
    pub fn record_boot(
        &self,
        name: &str,
        id: &str,
        state: SandboxState,
        pid: u32,
    ) -> Result<(), StoreError> {
        self.update(
            name,
            "UPDATE sandboxes SET state = ?3, pid = ?4, boot_count = boot_count + 1
             WHERE name = ?1 AND id = ?2",
            params![name, id, state.as_str(), pid],
        )
    }

    /// Gives a sandbox that has no layer yet (made before layers existed)
    /// the root layer `layer`, inserted here.
    pub fn adopt_layer(&self, name: &str, id: &str, layer: &str) -> Result<(), StoreError> {
        self.write("record a sandbox's disk layer", |tx| {
            insert_layer(tx, layer, None)?;
            let changed = tx
                .execute(
                    "UPDATE sandboxes SET disk_layer = ?3
                     WHERE name = ?1 AND id = ?2 AND disk_layer IS NULL",
                    params![name, id, layer],
                )
                .map_err(query_err("record a sandbox's disk layer"))?;
            if changed == 0 {
                return Err(StoreError::Missing {
                    name: name.to_string(),
                });
            }
            Ok(())
        })
    }

    /// Removes the record of `name` with id `id` (absent records are fine)
    /// and returns the layers that became unreachable, now deleted rows
    /// whose files the caller removes.
    pub fn delete(&self, name: &str, id: &str) -> Result<Vec<String>, StoreError> {
        self.write("delete a sandbox", |tx| {
            let deleted = tx
                .execute(
                    "DELETE FROM sandboxes WHERE name = ?1 AND id = ?2",
                    [name, id],
                )
                .map_err(query_err("delete a sandbox"))?;
            if deleted > 0 {
                net::release_all(tx, id)?;
            }
            collect_garbage(tx)
        })
    }

    /// Records a snapshot being taken (`Creating`, with `next_layer`
    /// inserted as a child of `layer`). The sandbox must still be on
    /// `layer`. `DuplicateSnapshot` if the id is taken.
    pub fn begin_snapshot(&self, snap: &SnapshotRecord) -> Result<(), StoreError> {
        self.write("record a new snapshot", |tx| {
            let on_layer: Option<String> = tx
                .query_row(
                    "SELECT disk_layer FROM sandboxes WHERE name = ?1 AND id = ?2",
                    [&snap.sandbox, &snap.sandbox_id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(query_err("record a new snapshot"))?
                .flatten();
            if on_layer.as_deref() != Some(snap.layer.as_str()) {
                return Err(StoreError::Missing {
                    name: snap.sandbox.clone(),
                });
            }
            if get_snapshot(tx, &snap.id)?.is_some() {
                return Err(StoreError::DuplicateSnapshot {
                    id: snap.id.clone(),
                });
            }
            if let Some(next) = &snap.next_layer {
                insert_layer(tx, next, Some(&snap.layer))?;
            }
            insert_snapshot_row(tx, snap, "record a new snapshot")
        })
    }

    /// Records that the sandbox of snapshot `id` moved to the snapshot's
    /// `next_layer` (its disk was frozen).
    pub fn switch_disk(&self, id: &str) -> Result<(), StoreError> {
        self.write("record a frozen disk", |tx| {
            let snap = get_snapshot(tx, id)?
                .ok_or_else(|| StoreError::MissingSnapshot { id: id.to_string() })?;
            let Some(next) = snap.next_layer else {
                return Ok(());
            };
            let changed = tx
                .execute(
                    "UPDATE sandboxes SET disk_layer = ?3 WHERE name = ?1 AND id = ?2",
                    params![snap.sandbox, snap.sandbox_id, next],
                )
                .map_err(query_err("record a frozen disk"))?;
            if changed == 0 {
                return Err(StoreError::Missing { name: snap.sandbox });
            }
            tx.execute("UPDATE snapshots SET next_layer = NULL WHERE id = ?1", [id])
                .map_err(query_err("record a frozen disk"))?;
            Ok(())
        })
    }

    /// Marks snapshot `id` complete.
    pub fn finish_snapshot(&self, id: &str) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .execute(
                "UPDATE snapshots SET state = 'ready', next_layer = NULL WHERE id = ?1",
                [id],
            )
            .map_err(query_err("complete a snapshot"))?;
        if changed == 0 {
            return Err(StoreError::MissingSnapshot { id: id.to_string() });
        }
        Ok(())
    }

    pub fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query_err("read a snapshot"))?;
        get_snapshot(&tx, id)
    }

    /// The digest recorded for `path` if it was taken of the version of
    /// the file identified by `stamp`.
    pub fn file_digest(&self, path: &Path, stamp: &str) -> Result<Option<String>, StoreError> {
        let conn = self.conn();
        conn.query_row(
            "SELECT sha256 FROM file_digests WHERE path = ?1 AND stamp = ?2",
            params![path.to_string_lossy(), stamp],
            |row| row.get(0),
        )
        .optional()
        .map_err(query_err("read a file digest"))
    }

    pub fn record_file_digest(
        &self,
        path: &Path,
        stamp: &str,
        sha256: &str,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR REPLACE INTO file_digests (path, stamp, sha256) VALUES (?1, ?2, ?3)",
            params![path.to_string_lossy(), stamp, sha256],
        )
        .map(drop)
        .map_err(query_err("record a file digest"))
    }

    /// The ready golden snapshot with `key`, if any.
    pub fn golden_snapshot(&self, key: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let raw = conn
            .query_row(
                "SELECT * FROM snapshots WHERE golden_key = ?1 AND state = 'ready'",
                params![key],
                RawSnapshot::from_row,
            )
            .optional()
            .map_err(query_err("find a golden snapshot"))?;
        raw.map(RawSnapshot::into_record).transpose()
    }

    /// Every snapshot (also those being taken, and golden ones), oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT * FROM snapshots ORDER BY created_at, id")
            .map_err(query_err("list snapshots"))?;
        let rows = stmt
            .query_map([], RawSnapshot::from_row)
            .map_err(query_err("list snapshots"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(query_err("list snapshots"))?;
        rows.into_iter().map(RawSnapshot::into_record).collect()
    }

    /// Removes snapshot `id` if its directory id is still `dir` (a deleted
    /// and re-taken id is a different snapshot); returns the layers that
    /// became unreachable. `MissingSnapshot` if there is no such snapshot.
    pub fn delete_snapshot(&self, id: &str, dir: &str) -> Result<Vec<String>, StoreError> {
        self.write("delete a snapshot", |tx| {
            let changed = tx
                .execute(
                    "DELETE FROM snapshots WHERE id = ?1 AND dir = ?2",
                    [id, dir],
                )
                .map_err(query_err("delete a snapshot"))?;
            if changed == 0 {
                return Err(StoreError::MissingSnapshot { id: id.to_string() });
            }
            collect_garbage(tx)
        })
    }

    /// Ids of every layer row.
    pub fn layer_ids(&self) -> Result<HashSet<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT id FROM layers")
            .map_err(query_err("list layers"))?;
        let ids = stmt
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(query_err("list layers"))?
            .collect::<Result<HashSet<_>, _>>()
            .map_err(query_err("list layers"))?;
        Ok(ids)
    }

    /// The parent of every layer (`None`: the base image).
    pub fn layer_parents(&self) -> Result<BTreeMap<String, Option<String>>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT id, parent FROM layers")
            .map_err(query_err("list layers"))?;
        let rows = stmt
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(query_err("list layers"))?
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(query_err("list layers"))?;
        Ok(rows)
    }

    /// Runs the layer collection on its own; returns what it removed.
    pub fn collect_garbage(&self) -> Result<Vec<String>, StoreError> {
        self.write("collect unreferenced layers", collect_garbage)
    }

    /// The raw connection, for tests that plant odd rows.
    #[cfg(test)]
    pub(crate) fn conn_for_tests(&self) -> MutexGuard<'_, Connection> {
        self.conn()
    }

    fn update(
        &self,
        name: &str,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .execute(sql, params)
            .map_err(query_err("update a sandbox"))?;
        if changed == 0 {
            return Err(StoreError::Missing {
                name: name.to_string(),
            });
        }
        Ok(())
    }
}

fn query_err(op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// Inserts the row of `snap`; a taken id is `DuplicateSnapshot`.
fn insert_snapshot_row(
    tx: &Transaction<'_>,
    snap: &SnapshotRecord,
    op: &'static str,
) -> Result<(), StoreError> {
    let result = tx.execute(
        "INSERT INTO snapshots (id, dir, state, sandbox, sandbox_id, vcpus, memory_mb,
                                image, image_path, env, accel, layer, next_layer,
                                created_at, parent_snapshot, state_format, golden_key,
                                network)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                 ?16, ?17, ?18)",
        params![
            snap.id,
            snap.dir,
            snap.state.as_str(),
            snap.sandbox,
            snap.sandbox_id,
            snap.vcpus,
            snap.memory_mb,
            snap.image,
            snap.image_path.to_string_lossy(),
            env_to_json(&snap.env),
            snap.accel.as_str(),
            snap.layer,
            snap.next_layer,
            i64::try_from(snap.created_at).unwrap_or(i64::MAX),
            snap.parent_snapshot,
            snap.state_format.as_str(),
            snap.golden_key,
            snap.network.as_ref().map(to_json),
        ],
    );
    match result {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            Err(StoreError::DuplicateSnapshot {
                id: snap.id.clone(),
            })
        }
        Err(source) => Err(StoreError::Query { op, source }),
    }
}

fn insert_layer(tx: &Transaction<'_>, id: &str, parent: Option<&str>) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO layers (id, parent, created_at) VALUES (?1, ?2, ?3)",
        params![id, parent, now_secs() as i64],
    )
    .map_err(query_err("insert a disk layer"))?;
    Ok(())
}

fn insert_sandbox(
    tx: &Transaction<'_>,
    record: &SandboxRecord,
    layer: Option<&NewLayer>,
    max_sandboxes: u32,
) -> Result<(), StoreError> {
    if max_sandboxes > 0 {
        let count: i64 = tx
            .query_row("SELECT count(*) FROM sandboxes", [], |row| row.get(0))
            .map_err(query_err("count sandboxes"))?;
        if count >= i64::from(max_sandboxes) {
            return Err(StoreError::Quota { max: max_sandboxes });
        }
    }
    if let Some(layer) = layer {
        insert_layer(tx, &layer.id, layer.parent.as_deref())?;
    }
    let result = tx.execute(
        "INSERT INTO sandboxes (name, id, vcpus, memory_mb, image, image_path, state, pid,
                                accel, created_at, boot_count, env, disk_layer, from_snapshot,
                                network)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            record.name,
            record.id,
            record.vcpus,
            record.memory_mb,
            record.image,
            record.image_path.to_string_lossy(),
            record.state.as_str(),
            record.pid,
            record.accel.as_str(),
            record.created_at as i64,
            record.boot_count,
            env_to_json(&record.env),
            record.disk_layer,
            record.from_snapshot,
            record.network.as_ref().map(to_json),
        ],
    );
    match result {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            Err(StoreError::Duplicate {
                name: record.name.clone(),
            })
        }
        Err(source) => Err(StoreError::Query {
            op: "insert a sandbox",
            source,
        }),
    }
}

/// `MissingSnapshot` unless `snapshot` is ready and `layer` stands on its
/// frozen layer.
fn check_layer_on_snapshot(
    tx: &Transaction<'_>,
    layer: &NewLayer,
    snapshot: &str,
) -> Result<(), StoreError> {
    let missing = || StoreError::MissingSnapshot {
        id: snapshot.to_string(),
    };
    let snap = get_snapshot(tx, snapshot)?
        .filter(|s| s.state == SnapshotState::Ready)
        .ok_or_else(missing)?;
    if layer.parent.as_deref() != Some(snap.layer.as_str()) {
        return Err(missing());
    }
    Ok(())
}

fn get_snapshot(tx: &Transaction<'_>, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
    let row = tx
        .query_row(
            "SELECT * FROM snapshots WHERE id = ?1",
            [id],
            RawSnapshot::from_row,
        )
        .optional()
        .map_err(query_err("read a snapshot"))?;
    row.map(RawSnapshot::into_record).transpose()
}

/// Deletes every layer row that is not live; returns their ids.
fn collect_garbage(tx: &Transaction<'_>) -> Result<Vec<String>, StoreError> {
    let dead: Vec<String> = {
        let mut stmt = tx
            .prepare_cached(&format!(
                "{LIVE_LAYERS} SELECT id FROM layers WHERE id NOT IN (SELECT id FROM live)"
            ))
            .map_err(query_err("find unreferenced layers"))?;
        let ids = stmt
            .query_map([], |row| row.get(0))
            .map_err(query_err("find unreferenced layers"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(query_err("find unreferenced layers"))?;
        ids
    };
    if !dead.is_empty() {
        tx.execute(
            &format!("{LIVE_LAYERS} DELETE FROM layers WHERE id NOT IN (SELECT id FROM live)"),
            [],
        )
        .map_err(query_err("delete unreferenced layers"))?;
    }
    Ok(dead)
}

fn env_to_json(env: &BTreeMap<String, String>) -> String {
    serde_json::to_string(env).unwrap_or_else(|_| "{}".to_string())
}

/// JSON of a value whose serialization cannot fail (plain data).
fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(query_err("start the schema migration"))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(query_err("read the schema version"))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for step in &MIGRATIONS[version.max(0) as usize..] {
        tx.execute_batch(step)
            .map_err(query_err("migrate the schema"))?;
    }
    tx.pragma_update(None, "user_version", known)
        .map_err(query_err("write the schema version"))?;
    tx.commit()
        .map_err(query_err("commit the schema migration"))
}

/// A row as stored, before its text fields are checked.
struct RawRecord {
    name: String,
    id: String,
    vcpus: u32,
    memory_mb: u32,
    image: String,
    image_path: String,
    state: String,
    pid: Option<u32>,
    accel: String,
    created_at: i64,
    boot_count: u32,
    env: String,
    disk_layer: Option<String>,
    from_snapshot: Option<String>,
    network: Option<String>,
}

impl RawRecord {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<RawRecord> {
        Ok(RawRecord {
            name: row.get("name")?,
            id: row.get("id")?,
            vcpus: row.get("vcpus")?,
            memory_mb: row.get("memory_mb")?,
            image: row.get("image")?,
            image_path: row.get("image_path")?,
            state: row.get("state")?,
            pid: row.get("pid")?,
            accel: row.get("accel")?,
            created_at: row.get("created_at")?,
            boot_count: row.get("boot_count")?,
            env: row.get("env")?,
            disk_layer: row.get("disk_layer")?,
            from_snapshot: row.get("from_snapshot")?,
            network: row.get("network")?,
        })
    }

    fn into_record(self) -> Result<SandboxRecord, StoreError> {
        let corrupt = |field, value: &str| StoreError::Corrupt {
            name: self.name.clone(),
            field,
            value: value.to_string(),
        };
        let state = self
            .state
            .parse()
            .map_err(|_| corrupt("state", &self.state))?;
        let accel = AccelKind::parse(&self.accel).ok_or_else(|| corrupt("accel", &self.accel))?;
        if !crate::layout::is_sandbox_id(&self.id) {
            return Err(corrupt("id", &self.id));
        }
        if let Some(layer) = self
            .disk_layer
            .as_deref()
            .filter(|l| !crate::layout::is_sandbox_id(l))
        {
            return Err(corrupt("disk_layer", layer));
        }
        let env = serde_json::from_str(&self.env).map_err(|_| corrupt("env", &self.env))?;
        let network = self
            .network
            .as_deref()
            .map(|text| serde_json::from_str(text).map_err(|_| corrupt("network", text)))
            .transpose()?;
        Ok(SandboxRecord {
            network,
            state,
            accel,
            env,
            created_at: self.created_at.max(0) as u64,
            image_path: PathBuf::from(self.image_path),
            name: self.name,
            id: self.id,
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            image: self.image,
            pid: self.pid,
            boot_count: self.boot_count,
            disk_layer: self.disk_layer,
            from_snapshot: self.from_snapshot,
        })
    }
}

/// A snapshot row as stored.
struct RawSnapshot {
    id: String,
    dir: String,
    state: String,
    sandbox: String,
    sandbox_id: String,
    vcpus: u32,
    memory_mb: u32,
    image: String,
    image_path: String,
    env: String,
    accel: String,
    layer: String,
    next_layer: Option<String>,
    created_at: i64,
    parent_snapshot: Option<String>,
    state_format: String,
    golden_key: Option<String>,
    network: Option<String>,
}

impl RawSnapshot {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<RawSnapshot> {
        Ok(RawSnapshot {
            id: row.get("id")?,
            dir: row.get("dir")?,
            state: row.get("state")?,
            sandbox: row.get("sandbox")?,
            sandbox_id: row.get("sandbox_id")?,
            vcpus: row.get("vcpus")?,
            memory_mb: row.get("memory_mb")?,
            image: row.get("image")?,
            image_path: row.get("image_path")?,
            env: row.get("env")?,
            accel: row.get("accel")?,
            layer: row.get("layer")?,
            next_layer: row.get("next_layer")?,
            created_at: row.get("created_at")?,
            parent_snapshot: row.get("parent_snapshot")?,
            state_format: row.get("state_format")?,
            golden_key: row.get("golden_key")?,
            network: row.get("network")?,
        })
    }

    fn into_record(self) -> Result<SnapshotRecord, StoreError> {
        let corrupt = |field, value: &str| StoreError::Corrupt {
            name: format!("snapshot {}", self.id),
            field,
            value: value.to_string(),
        };
        let state =
            SnapshotState::parse(&self.state).ok_or_else(|| corrupt("state", &self.state))?;
        let accel = AccelKind::parse(&self.accel).ok_or_else(|| corrupt("accel", &self.accel))?;
        let state_format = StateFormat::parse(&self.state_format)
            .ok_or_else(|| corrupt("state_format", &self.state_format))?;
        for (field, value) in [
            ("dir", Some(&self.dir)),
            ("layer", Some(&self.layer)),
            ("next_layer", self.next_layer.as_ref()),
        ] {
            if let Some(value) = value.filter(|v| !crate::layout::is_sandbox_id(v)) {
                return Err(corrupt(field, value));
            }
        }
        let env = serde_json::from_str(&self.env).map_err(|_| corrupt("env", &self.env))?;
        let network = self
            .network
            .as_deref()
            .map(|text| serde_json::from_str(text).map_err(|_| corrupt("network", text)))
            .transpose()?;
        Ok(SnapshotRecord {
            network,
            state,
            accel,
            env,
            image_path: PathBuf::from(self.image_path),
            created_at: self.created_at.max(0) as u64,
            id: self.id,
            dir: self.dir,
            sandbox: self.sandbox,
            sandbox_id: self.sandbox_id,
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            image: self.image,
            layer: self.layer,
            next_layer: self.next_layer,
            parent_snapshot: self.parent_snapshot,
            state_format,
            golden_key: self.golden_key,
        })
    }
}

/// Snapshots that come from elsewhere (checkpoints).
impl Store {
    /// Records imported snapshot `snap` (normally `Creating`) with its own
    /// layer `snap.layer`, inserted with no parent: its disk stands alone.
    /// Nothing else may name that layer yet. `DuplicateSnapshot` if the id
    /// is taken.
    pub fn import_snapshot(&self, snap: &SnapshotRecord) -> Result<(), StoreError> {
        const OP: &str = "record an imported snapshot";
        self.write(OP, |tx| {
            if get_snapshot(tx, &snap.id)?.is_some() {
                return Err(StoreError::DuplicateSnapshot {
                    id: snap.id.clone(),
                });
            }
            insert_layer(tx, &snap.layer, None)?;
            insert_snapshot_row(tx, snap, OP)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, id: &str) -> SandboxRecord {
        SandboxRecord {
            name: name.into(),
            id: id.into(),
            vcpus: 2,
            memory_mb: 512,
            image: "default".into(),
            image_path: PathBuf::from("/images/debian/rootfs.ext4"),
            state: SandboxState::Creating,
            pid: None,
            accel: AccelKind::Tcg,
            created_at: 1_700_000_000,
            boot_count: 0,
            env: BTreeMap::new(),
            disk_layer: None,
            from_snapshot: None,
            network: None,
        }
    }

    /// A record on a new root layer `layer`.
    fn on_layer(name: &str, id: &str, layer: &str) -> (SandboxRecord, NewLayer) {
        let mut record = record(name, id);
        record.disk_layer = Some(layer.into());
        let layer = NewLayer {
            id: layer.into(),
            parent: None,
        };
        (record, layer)
    }

    fn snapshot(id: &str, dir: &str, of: &SandboxRecord, next: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            dir: dir.into(),
            state: SnapshotState::Creating,
            sandbox: of.name.clone(),
            sandbox_id: of.id.clone(),
            vcpus: of.vcpus,
            memory_mb: of.memory_mb,
            image: of.image.clone(),
            image_path: of.image_path.clone(),
            env: of.env.clone(),
            accel: of.accel,
            layer: of.disk_layer.clone().unwrap(),
            next_layer: Some(next.into()),
            created_at: 1_700_000_001,
            parent_snapshot: None,
            state_format: StateFormat::Devices,
            golden_key: None,
            network: None,
        }
    }

    const ID_A: &str = "00000000000000aa";
    const ID_B: &str = "00000000000000bb";
    const ID_C: &str = "00000000000000cc";

    fn layer(n: u8) -> String {
        format!("{n:016x}")
    }

    fn sorted(mut ids: Vec<String>) -> Vec<String> {
        ids.sort();
        ids
    }

    fn layer_set(store: &Store) -> Vec<String> {
        let mut ids: Vec<String> = store.layer_ids().unwrap().into_iter().collect();
        ids.sort();
        ids
    }

    fn net_of(address: std::net::Ipv4Addr) -> crate::network::SandboxNet {
        crate::network::SandboxNet {
            mode: crate::network::NetMode::User,
            address: crate::network::Ipv4Net {
                addr: address,
                prefix: 29,
            },
            gateway: "10.9.0.1".parse().unwrap(),
            nameserver: "10.9.0.2".parse().unwrap(),
            mac: crate::network::Mac::for_address(address).to_string(),
            tap: None,
            egress: crate::network::EgressPolicy::DenyAll,
            attached: None,
        }
    }

    /// Addresses and host ports are leased once, all or nothing, and come
    /// back when their sandbox's record goes.
    #[test]
    fn network_leases_are_unique_and_released_with_the_record() {
        use crate::network::{ForwardRequest, PortRange};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let subnet: crate::network::Ipv4Net = "10.9.0.0/29".parse().unwrap();
        let mut addresses = Vec::new();
        for n in 1..=5u8 {
            let record = record(&format!("s{n}"), &format!("{n:016x}"));
            store.insert(&record, None, 0).unwrap();
            match store.attach_network(&record.name, &record.id, subnet, 3, net_of) {
                Ok(net) => addresses.push(net.address.addr.to_string()),
                Err(StoreError::AddressesExhausted { .. }) => addresses.push("none".into()),
                Err(other) => panic!("{other}"),
            }
        }
        // A /29 has hosts .1-.6; sandboxes start at .3.
        assert_eq!(
            addresses,
            ["10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6", "none"]
        );
        let got = store.get("s2").unwrap().unwrap().network.unwrap();
        assert_eq!(got, net_of("10.9.0.4".parse().unwrap()));

        let range = PortRange {
            first: 50000,
            last: 50002,
        };
        let ask = |host_port, guest_port| ForwardRequest {
            host_port,
            guest_port,
            description: String::new(),
        };
        let id1 = format!("{:016x}", 1);
        let id2 = format!("{:016x}", 2);
        let busy_50000 = |port| port != 50000;
        let got = store
            .add_forwards(
                &id1,
                &[ask(None, 80), ask(None, 81)],
                range,
                50000,
                8,
                busy_50000,
            )
            .unwrap();
        let ports: Vec<u16> = got.iter().map(|f| f.host_port).collect();
        assert_eq!(ports, [50001, 50002], "50000 is busy on the host");
        let err = store
            .add_forwards(&id2, &[ask(Some(50001), 80)], range, 50000, 8, |_| true)
            .unwrap_err();
        assert!(
            matches!(err, StoreError::PortTaken { port: 50001 }),
            "{err}"
        );
        let err = store
            .add_forwards(&id2, &[ask(None, 80)], range, 50002, 8, busy_50000)
            .unwrap_err();
        assert!(matches!(err, StoreError::PortsExhausted { .. }), "{err}");
        let err = store
            .add_forwards(&id1, &[ask(None, 82)], range, 50000, 2, |_| true)
            .unwrap_err();
        assert!(matches!(err, StoreError::TooManyForwards { .. }), "{err}");
        // All or nothing: the first of two was not kept.
        let err = store
            .add_forwards(
                &id2,
                &[ask(Some(50000), 1), ask(Some(50001), 2)],
                range,
                50000,
                8,
                |_| true,
            )
            .unwrap_err();
        assert!(
            matches!(err, StoreError::PortTaken { port: 50001 }),
            "{err}"
        );
        assert!(store.forwards(&id2).unwrap().is_empty());

        store.delete("s1", &id1).unwrap();
        assert!(store.all_forwards().unwrap().is_empty());
        let record = record("s6", &format!("{:016x}", 6));
        store.insert(&record, None, 0).unwrap();
        let net = store
            .attach_network(&record.name, &record.id, subnet, 3, net_of)
            .unwrap();
        assert_eq!(
            net.address.addr.to_string(),
            "10.9.0.3",
            "s1's address is free again"
        );
        let got = store
            .add_forwards(&record.id, &[ask(None, 80)], range, 50002, 8, |p| {
                p != 50002
            })
            .unwrap();
        assert_eq!(got[0].host_port, 50000, "wraps around from the start");
        let removed = store
            .remove_forwards(&record.id, Some(&[50000, 50001]))
            .unwrap();
        assert_eq!(removed.len(), 1, "only its own forward");

        // A search that wraps around still gives ports in the requests' order, which is the
        // order forwards are listed in (by host port).
        let got = store
            .add_forwards(
                &record.id,
                &[ask(None, 1), ask(None, 2), ask(None, 3)],
                range,
                50002,
                8,
                |_| true,
            )
            .unwrap();
        let ports: Vec<u16> = got.iter().map(|f| f.host_port).collect();
        assert_eq!(ports, [50000, 50001, 50002]);
        let listed: Vec<u16> = store
            .forwards(&record.id)
            .unwrap()
            .iter()
            .map(|f| f.guest_port)
            .collect();
        assert_eq!(listed, [1, 2, 3]);
    }

    #[test]
    fn round_trip_and_updates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        store.insert(&record("b", ID_B), None, 0).unwrap();
        let mut a = record("a", ID_A);
        a.env = [("K".to_string(), "v w".to_string())].into();
        store.insert(&a, None, 0).unwrap();
        assert_eq!(store.get("a").unwrap(), Some(a.clone()));
        assert_eq!(store.get("nope").unwrap(), None);

        store
            .record_boot("a", ID_A, SandboxState::Running, 4242)
            .unwrap();
        store
            .set_state("b", ID_B, SandboxState::Crashed, None)
            .unwrap();
        let all = store.list().unwrap();
        assert_eq!(
            all.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            (all[0].state, all[0].pid, all[0].boot_count),
            (SandboxState::Running, Some(4242), 1)
        );
        assert_eq!(all[0].env, a.env);
        assert_eq!((all[1].state, all[1].pid), (SandboxState::Crashed, None));

        // Updates are keyed by name *and* id: a stale id changes nothing.
        let err = store
            .set_state("a", ID_B, SandboxState::Stopped, None)
            .unwrap_err();
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");
        store.delete("a", ID_A).unwrap();
        store.delete("a", ID_A).unwrap();
        assert_eq!(store.get("a").unwrap(), None);
    }

    #[test]
    fn names_and_ids_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        store.insert(&record("a", ID_A), None, 0).unwrap();
        let err = store.insert(&record("a", ID_B), None, 0).unwrap_err();
        assert!(
            matches!(err, StoreError::Duplicate { ref name } if name == "a"),
            "{err}"
        );
        assert!(store.insert(&record("c", ID_A), None, 0).is_err());
        // A refused insert leaves no layer behind.
        let (dup, l) = on_layer("a", ID_C, &layer(1));
        assert!(store.insert(&dup, Some(&l), 0).is_err());
        assert!(store.layer_ids().unwrap().is_empty());
    }

    #[test]
    fn the_quota_counts_every_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        store.insert(&record("a", ID_A), None, 2).unwrap();
        let mut b = record("b", ID_B);
        b.state = SandboxState::Stopped;
        store.insert(&b, None, 2).unwrap();
        let (c, l) = on_layer("c", ID_C, &layer(1));
        let err = store.insert(&c, Some(&l), 2).unwrap_err();
        assert!(matches!(err, StoreError::Quota { max: 2 }), "{err}");
        assert!(store.layer_ids().unwrap().is_empty());
        store.insert(&c, Some(&l), 0).unwrap();
        store.delete("a", ID_A).unwrap();
        store.delete("c", ID_C).unwrap();
        store.insert(&c, Some(&l), 2).unwrap();
    }

    /// The quota holds when several processes (here: connections, each in
    /// its own thread) insert at once.
    #[test]
    fn the_quota_holds_under_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        Store::open(&path).unwrap();
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let store = Store::open(&path).unwrap();
                    let name = format!("s{i}");
                    store.insert(&record(&name, &layer(i)), None, 3).is_ok()
                })
            })
            .collect();
        let made = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(made, 3);
        assert_eq!(Store::open(&path).unwrap().list().unwrap().len(), 3);
    }

    /// Layers shared by sandboxes and snapshots go only when nothing
    /// reaches them any more.
    #[test]
    fn layers_live_while_reachable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        // Sandbox a on layer 1; a snapshot freezes 1, a moves to 2.
        let (a, l1) = on_layer("a", ID_A, &layer(1));
        store.insert(&a, Some(&l1), 0).unwrap();
        let snap = snapshot("s 1", &layer(0xf1), &a, &layer(2));
        store.begin_snapshot(&snap).unwrap();
        let err = store.begin_snapshot(&snap).unwrap_err();
        assert!(matches!(err, StoreError::DuplicateSnapshot { .. }), "{err}");
        store.switch_disk("s 1").unwrap();
        store.finish_snapshot("s 1").unwrap();
        let a_now = store.get("a").unwrap().unwrap();
        assert_eq!(a_now.disk_layer, Some(layer(2)));
        let got = store.get_snapshot("s 1").unwrap().unwrap();
        assert_eq!(
            (got.state, got.layer.as_str(), got.next_layer),
            (SnapshotState::Ready, layer(1).as_str(), None)
        );
        // b is restored from the snapshot: layer 3 on layer 1.
        let mut b = record("b", ID_B);
        b.disk_layer = Some(layer(3));
        let l3 = NewLayer {
            id: layer(3),
            parent: Some(layer(1)),
        };
        store.insert_restored(&b, &l3, "s 1", 0).unwrap();
        assert_eq!(layer_set(&store), [layer(1), layer(2), layer(3)]);

        // Deleting the snapshot keeps layer 1: a and b stand on it.
        assert!(store
            .delete_snapshot("s 1", &layer(0xf1))
            .unwrap()
            .is_empty());
        // A restore from a deleted snapshot is refused.
        let mut c = record("c", ID_C);
        c.disk_layer = Some(layer(4));
        let l4 = NewLayer {
            id: layer(4),
            parent: Some(layer(1)),
        };
        let err = store.insert_restored(&c, &l4, "s 1", 0).unwrap_err();
        assert!(matches!(err, StoreError::MissingSnapshot { .. }), "{err}");
        // Destroying a frees only its own top layer.
        assert_eq!(store.delete("a", ID_A).unwrap(), [layer(2)]);
        // Destroying b frees its layer and, now unreachable, layer 1.
        assert_eq!(
            sorted(store.delete("b", ID_B).unwrap()),
            [layer(1), layer(3)]
        );
        assert!(store.layer_ids().unwrap().is_empty());
        // The id can be taken again once deleted.
        let (a, l5) = on_layer("a", ID_A, &layer(5));
        store.insert(&a, Some(&l5), 0).unwrap();
        store
            .begin_snapshot(&snapshot("s 1", &layer(0xf2), &a, &layer(6)))
            .unwrap();
    }

    /// A snapshot abandoned before the disk was frozen gives back the
    /// layer it reserved; one abandoned after keeps the sandbox's new layer.
    #[test]
    fn abandoned_snapshots_leave_consistent_layers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        let (a, l1) = on_layer("a", ID_A, &layer(1));
        store.insert(&a, Some(&l1), 0).unwrap();
        let before = snapshot("early", &layer(0xf1), &a, &layer(2));
        store.begin_snapshot(&before).unwrap();
        assert_eq!(
            store.delete_snapshot("early", &layer(0xf1)).unwrap(),
            [layer(2)]
        );
        assert_eq!(layer_set(&store), [layer(1)]);

        let after = snapshot("late", &layer(0xf2), &a, &layer(3));
        store.begin_snapshot(&after).unwrap();
        store.switch_disk("late").unwrap();
        assert!(store
            .delete_snapshot("late", &layer(0xf2))
            .unwrap()
            .is_empty());
        assert_eq!(layer_set(&store), [layer(1), layer(3)]);
        assert_eq!(store.layer_parents().unwrap()[&layer(3)], Some(layer(1)));
        // A snapshot of a sandbox that moved on is refused.
        let stale = snapshot("stale", &layer(0xf3), &a, &layer(4));
        let err = store.begin_snapshot(&stale).unwrap_err();
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");
        // Deleting by a stale directory id deletes nothing.
        let err = store.delete_snapshot("late", &layer(0xf2)).unwrap_err();
        assert!(matches!(err, StoreError::MissingSnapshot { .. }), "{err}");
    }

    #[test]
    fn survives_reopen_and_shares_between_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let one = Store::open(&path).unwrap();
        let two = Store::open(&path).unwrap();
        one.insert(&record("a", ID_A), None, 0).unwrap();
        assert_eq!(two.get("a").unwrap(), Some(record("a", ID_A)));
        drop((one, two));
        let again = Store::open(&path).unwrap();
        assert_eq!(again.list().unwrap().len(), 1);
    }

    /// A database written by the first schema opens, keeps its rows and
    /// gains the new columns with their defaults.
    #[test]
    fn migrates_a_version_1_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO sandboxes VALUES ('old', ?1, 1, 256, 'default', '/i/r.ext4',
                                               'running', 77, 'tcg', 5, 1)",
                [ID_A],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let old = store.get("old").unwrap().unwrap();
        assert_eq!(
            (old.state, old.pid, old.env.len(), old.disk_layer),
            (SandboxState::Running, Some(77), 0, None)
        );
        let version: i64 = store
            .conn()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        store.adopt_layer("old", ID_A, &layer(1)).unwrap();
        assert_eq!(
            store.get("old").unwrap().unwrap().disk_layer,
            Some(layer(1))
        );
        // Adopting twice is refused; nothing is collected while in use.
        assert!(store.adopt_layer("old", ID_A, &layer(2)).is_err());
        assert!(store.collect_garbage().unwrap().is_empty());
        drop(store);
        // Reopening migrates nothing more.
        Store::open(&path).unwrap();
    }

    /// A version 2 database gains the lineage columns, empty.
    #[test]
    fn migrates_a_version_2_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO sandboxes (name, id, vcpus, memory_mb, image, image_path, state,
                                        accel, created_at)
                 VALUES ('old', ?1, 1, 256, 'default', '/i/r.ext4', 'stopped', 'tcg', 5)",
                [ID_A],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get("old").unwrap().unwrap().from_snapshot, None);
        let (mut b, l) = on_layer("b", ID_B, &layer(1));
        b.from_snapshot = Some("s".into());
        store.insert(&b, Some(&l), 0).unwrap();
        assert_eq!(store.get("b").unwrap().unwrap(), b);
    }

    /// Snapshots from before v4 keep loading as migration streams; golden
    /// snapshots are found by key, one per key.
    #[test]
    fn migrates_a_version_3_database_and_keys_golden_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let (a, l1) = on_layer("a", ID_A, &layer(1));
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for step in &MIGRATIONS[..3] {
                tx.execute_batch(step).unwrap();
            }
            tx.pragma_update(None, "user_version", 3).unwrap();
            tx.commit().unwrap();
        }
        {
            let store = Store::open(&path).unwrap();
            store.insert(&a, Some(&l1), 0).unwrap();
            let snap = snapshot("old", &layer(0xf1), &a, &layer(2));
            store.begin_snapshot(&snap).unwrap();
            store.switch_disk("old").unwrap();
            store.finish_snapshot("old").unwrap();
            // Pretend it predates v4.
            store
                .conn_for_tests()
                .execute_batch("UPDATE snapshots SET state_format = 'migration'")
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let old = store.get_snapshot("old").unwrap().unwrap();
        assert_eq!(old.state_format, StateFormat::Migration);
        assert_eq!(store.golden_snapshot("k").unwrap(), None);

        let mut golden = snapshot("golden", &layer(0xf2), &a, &layer(3));
        golden.layer = layer(2);
        golden.golden_key = Some("k".into());
        store.begin_snapshot(&golden).unwrap();
        // Not ready yet: not found.
        assert_eq!(store.golden_snapshot("k").unwrap(), None);
        store.switch_disk("golden").unwrap();
        store.finish_snapshot("golden").unwrap();
        let found = store.golden_snapshot("k").unwrap().unwrap();
        assert_eq!(
            (found.id.as_str(), found.state_format),
            ("golden", StateFormat::Devices)
        );
        let mut twin = snapshot("twin", &layer(0xf3), &a, &layer(4));
        twin.layer = layer(3);
        twin.golden_key = Some("k".into());
        assert!(matches!(
            store.begin_snapshot(&twin),
            Err(StoreError::DuplicateSnapshot { .. })
        ));
    }

    /// A rollback moves the sandbox onto a new layer on the snapshot's and
    /// frees the layers only it used.
    #[test]
    fn rollback_swaps_the_disk_and_collects_the_old_layers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        let (a, l1) = on_layer("a", ID_A, &layer(1));
        store.insert(&a, Some(&l1), 0).unwrap();
        let mut snap = snapshot("s", &layer(0xf1), &a, &layer(2));
        snap.parent_snapshot = Some("older".into());
        store.begin_snapshot(&snap).unwrap();
        store.switch_disk("s").unwrap();
        store.finish_snapshot("s").unwrap();
        assert_eq!(
            store.get_snapshot("s").unwrap().unwrap().parent_snapshot,
            Some("older".into())
        );
        let l3 = NewLayer {
            id: layer(3),
            parent: Some(layer(1)),
        };
        let dead = store
            .rollback_disk("a", ID_A, &l3, "s", SandboxState::Starting)
            .unwrap();
        assert_eq!(dead, [layer(2)]);
        let now = store.get("a").unwrap().unwrap();
        assert_eq!(
            (now.disk_layer, now.from_snapshot, now.state, now.pid),
            (
                Some(layer(3)),
                Some("s".into()),
                SandboxState::Starting,
                None
            )
        );
        // A layer not on the snapshot's is refused.
        let bad = NewLayer {
            id: layer(4),
            parent: Some(layer(3)),
        };
        let err = store
            .rollback_disk("a", ID_A, &bad, "s", SandboxState::Starting)
            .unwrap_err();
        assert!(matches!(err, StoreError::MissingSnapshot { .. }), "{err}");
        assert_eq!(layer_set(&store), [layer(1), layer(3)]);
    }

    #[test]
    fn refuses_a_newer_schema_and_reports_corrupt_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let store = Store::open(&path).unwrap();
        store.insert(&record("a", ID_A), None, 0).unwrap();
        store
            .conn()
            .execute("UPDATE sandboxes SET state = 'weird'", [])
            .unwrap();
        let err = store.get("a").unwrap_err();
        assert!(
            err.to_string().contains("invalid state: \"weird\""),
            "{err}"
        );
        store
            .conn()
            .execute("UPDATE sandboxes SET state = 'stopped', env = 'nope'", [])
            .unwrap();
        let err = store.get("a").unwrap_err();
        assert!(err.to_string().contains("invalid env"), "{err}");
        store
            .conn()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        drop(store);
        let err = Store::open(&path).err().expect("newer schema refused");
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn imported_snapshots_stand_on_their_own_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        let (gone, _) = on_layer("gone", ID_A, &layer(1));
        let mut snap = snapshot("imported", ID_B, &gone, "unused");
        snap.next_layer = None;
        snap.sandbox_id = ID_C.into();
        store.import_snapshot(&snap).unwrap();
        assert_eq!(store.layer_parents().unwrap(), [(layer(1), None)].into());
        assert_eq!(store.get_snapshot("imported").unwrap(), Some(snap.clone()));
        assert!(matches!(
            store.import_snapshot(&snap),
            Err(StoreError::DuplicateSnapshot { .. })
        ));
        store.finish_snapshot("imported").unwrap();
        assert_eq!(
            store.get_snapshot("imported").unwrap().unwrap().state,
            SnapshotState::Ready
        );
        // Restores stand on it like on any snapshot's layer.
        let (clone, _) = on_layer("clone", ID_A, &layer(2));
        let on_snapshot = NewLayer {
            id: layer(2),
            parent: Some(layer(1)),
        };
        store
            .insert_restored(&clone, &on_snapshot, "imported", 0)
            .unwrap();
        assert!(store.delete_snapshot("imported", ID_B).unwrap().is_empty());
        assert_eq!(
            sorted(store.delete("clone", ID_A).unwrap()),
            [layer(1), layer(2)]
        );
        assert!(layer_set(&store).is_empty());
    }
}
