//! The database's schema, its version and the migrations from older versions.

use std::path::Path;

use rusqlite::{Connection, params};

use super::{StoreError, bad_row};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vfs (
    global_index INTEGER PRIMARY KEY,
    location     TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL
);
-- One row per held VF: a VM's assignment (consumer 'vm': vm and local_index set) or the
-- kubelet's hold (consumer 'kubelet': owner, a JSON container reference once known, and
-- allocated_at, milliseconds since the epoch). Schema version 2.
CREATE TABLE IF NOT EXISTS assignments (
    global_index INTEGER PRIMARY KEY REFERENCES vfs(global_index),
    location     TEXT NOT NULL,
    consumer     TEXT NOT NULL DEFAULT 'vm' CHECK (consumer IN ('vm', 'kubelet')),
    vm           TEXT REFERENCES vms(name),
    local_index  INTEGER,
    function     TEXT NOT NULL,
    state        TEXT NOT NULL,
    guest_path   TEXT,
    guest_bdf    TEXT,
    guest_driver TEXT,
    owner        TEXT,
    allocated_at INTEGER,
    UNIQUE (vm, local_index),
    CHECK ((consumer = 'vm') = (vm IS NOT NULL AND local_index IS NOT NULL))
);
-- The function of each VF re-programmed at run time (its drivers are the function's, as the
-- profiles define it), and the re-programmings under way. Schema version 3.
CREATE TABLE IF NOT EXISTS functions (
    global_index INTEGER PRIMARY KEY REFERENCES vfs(global_index),
    location     TEXT NOT NULL,
    function     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS programming (
    global_index  INTEGER PRIMARY KEY REFERENCES vfs(global_index),
    location      TEXT NOT NULL,
    from_function TEXT NOT NULL,
    to_function   TEXT NOT NULL
);
-- VFs out of the pool after a failed scrub, until an operator clears them. Schema version 3.
CREATE TABLE IF NOT EXISTS quarantine (
    global_index INTEGER PRIMARY KEY REFERENCES vfs(global_index),
    location     TEXT NOT NULL,
    reason       TEXT NOT NULL,
    since        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    vm           TEXT NOT NULL,
    local_index  INTEGER NOT NULL,
    function     TEXT NOT NULL,
    global_index INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    at           INTEGER NOT NULL
);
";

/// Opens (creating if needed) the database with the pragmas the daemon relies on.
pub fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let open = || -> Result<Connection, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(conn)
    };
    let mut conn = open().map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// The schema version this daemon writes (`PRAGMA user_version`):
/// - 0: VM specs are `{"name", "qmp_socket", "agent_socket", "slots", "numa_node"}`;
/// - 1: VM specs carry a typed backend, `{"name", "backend": {"qmp": {"qmp_socket",
///   "agent_socket"}} | {"libvirt": {…}}, "slots", "numa_node"}`;
/// - 2: `assignments` also holds the kubelet's VFs: a `consumer` column (`vm` | `kubelet`),
///   `vm` and `local_index` only for VMs, `owner` and `allocated_at` for the kubelet;
/// - 3: `quarantine` (VFs whose scrub failed), `functions` and `programming` (VFs
///   re-programmed at run time, and being re-programmed). An older daemon must not open it: it
///   would hand quarantined VFs out and take re-programmed ones for their profile's function.
pub const SCHEMA_VERSION: i64 = 3;

/// Brings a database written by an older daemon up to [`SCHEMA_VERSION`], in one transaction;
/// refuses one written by a newer daemon (it would misread it).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(bad_row(
            "(schema)",
            format!(
                "the state database has schema version {version}, newer than this daemon's {SCHEMA_VERSION}: run the vfmap that wrote it"
            ),
        ));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction()?;
    if version < 1 {
        let rows: Vec<(String, String)> = {
            let mut stmt = tx.prepare("SELECT name, spec FROM vms")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (name, spec) in rows {
            let migrated =
                spec_v0_to_v1(&spec).map_err(|e| bad_row("vms", format!("{name}: {e}")))?;
            tx.execute(
                "UPDATE vms SET spec = ?1 WHERE name = ?2",
                params![migrated, name],
            )?;
        }
    }
    if version < 2 {
        assignments_v1_to_v2(&tx)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Rebuilds a version-1 `assignments` table (every row a VM's, `vm` and `local_index` NOT
/// NULL) in the version-2 shape, its rows as `consumer = 'vm'`. A table that has the
/// `consumer` column already (a database created by this daemon at version 0) is left alone.
fn assignments_v1_to_v2(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let has_consumer: bool = tx.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('assignments') WHERE name = 'consumer'",
        [],
        |r| r.get(0),
    )?;
    if has_consumer {
        return Ok(());
    }
    tx.execute_batch("ALTER TABLE assignments RENAME TO assignments_v1")?;
    // Creates the version-2 `assignments` (every other table exists).
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(
        "INSERT INTO assignments (global_index, location, consumer, vm, local_index, function,
             state, guest_path, guest_bdf, guest_driver)
         SELECT global_index, location, 'vm', vm, local_index, function, state, guest_path,
             guest_bdf, guest_driver FROM assignments_v1;
         DROP TABLE assignments_v1;",
    )?;
    Ok(())
}

/// A version-0 VM spec (QMP only, its sockets at the top level) as version 1.
fn spec_v0_to_v1(spec: &str) -> Result<String, String> {
    let mut value: serde_json::Value = serde_json::from_str(spec).map_err(|e| e.to_string())?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| "not a JSON object".to_owned())?;
    if object.contains_key("backend") {
        return Ok(spec.to_owned());
    }
    let mut qmp = serde_json::Map::new();
    for key in ["qmp_socket", "agent_socket"] {
        let socket = object
            .remove(key)
            .ok_or_else(|| format!("no {key} to migrate"))?;
        qmp.insert(key.to_owned(), socket);
    }
    object.insert("backend".into(), serde_json::json!({ "qmp": qmp }));
    serde_json::to_string(&value).map_err(|e| e.to_string())
}
