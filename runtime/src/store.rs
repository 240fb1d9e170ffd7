//! Persistent sandbox records in SQLite (`<state_dir>/arrakis.db`).
//!
//! SQLite gives atomic, durable updates and safe sharing between the manager
//! processes that use one state directory: WAL journal, `synchronous=FULL`,
//! a busy timeout for writers that collide, and every change in one
//! transaction. The schema is versioned with `PRAGMA user_version`;
//! [`MIGRATIONS`] lists the steps from each version to the next. The store
//! records facts; deciding transitions is [`crate::sandbox`]'s job.
//! Calls are short and synchronous; the connection sits behind a std mutex
//! that is never held across an `.await`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};

use crate::accel::AccelKind;
use crate::sandbox::SandboxState;

/// `MIGRATIONS[n]` upgrades a database from `user_version` n to n + 1.
const MIGRATIONS: &[&str] = &["CREATE TABLE sandboxes (
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
    ) STRICT;"];

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
    /// The base image file the overlay was created on (symlinks resolved).
    pub image_path: PathBuf,
    pub state: SandboxState,
    /// QEMU's pid while one is expected to run.
    pub pid: Option<u32>,
    pub accel: AccelKind,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub boot_count: u32,
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

    /// Adds a new record; `Duplicate` if the name is taken.
    pub fn insert(&self, record: &SandboxRecord) -> Result<(), StoreError> {
        let conn = self.conn();
        let result = conn.execute(
            "INSERT INTO sandboxes (name, id, vcpus, memory_mb, image, image_path, state, pid,
                                    accel, created_at, boot_count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
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

    /// Removes the record of `name` with id `id`; absent records are fine.
    pub fn delete(&self, name: &str, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "DELETE FROM sandboxes WHERE name = ?1 AND id = ?2",
                [name, id],
            )
            .map_err(query_err("delete a sandbox"))?;
        Ok(())
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
        Ok(SandboxRecord {
            state,
            accel,
            created_at: self.created_at.max(0) as u64,
            image_path: PathBuf::from(self.image_path),
            name: self.name,
            id: self.id,
            vcpus: self.vcpus,
            memory_mb: self.memory_mb,
            image: self.image,
            pid: self.pid,
            boot_count: self.boot_count,
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
        }
    }

    const ID_A: &str = "00000000000000aa";
    const ID_B: &str = "00000000000000bb";

    #[test]
    fn round_trip_and_updates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("a.db")).unwrap();
        store.insert(&record("b", ID_B)).unwrap();
        store.insert(&record("a", ID_A)).unwrap();
        assert_eq!(store.get("a").unwrap(), Some(record("a", ID_A)));
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
        store.insert(&record("a", ID_A)).unwrap();
        let err = store.insert(&record("a", ID_B)).unwrap_err();
        assert!(
            matches!(err, StoreError::Duplicate { ref name } if name == "a"),
            "{err}"
        );
        assert!(store.insert(&record("c", ID_A)).is_err());
    }

    #[test]
    fn survives_reopen_and_shares_between_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let one = Store::open(&path).unwrap();
        let two = Store::open(&path).unwrap();
        one.insert(&record("a", ID_A)).unwrap();
        assert_eq!(two.get("a").unwrap(), Some(record("a", ID_A)));
        drop((one, two));
        let again = Store::open(&path).unwrap();
        assert_eq!(again.list().unwrap().len(), 1);
    }

    #[test]
    fn refuses_a_newer_schema_and_reports_corrupt_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let store = Store::open(&path).unwrap();
        store.insert(&record("a", ID_A)).unwrap();
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
            .pragma_update(None, "user_version", 99)
            .unwrap();
        drop(store);
        let err = Store::open(&path).err().expect("newer schema refused");
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
    }
}
