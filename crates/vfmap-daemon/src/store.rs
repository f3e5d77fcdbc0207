//! Durable state in SQLite (WAL, `synchronous = FULL`).
//!
//! One writer thread owns the connection. Callers send [`Mutation`]s and await the commit;
//! mutations that arrive together share one transaction (group commit), each in its own
//! savepoint so one failing mutation does not take the others down. The writer times each
//! batch's commit (`vfmap_store_commit_duration_seconds`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};
use tokio::sync::oneshot;
use vfmap_core::program::Programming;
use vfmap_core::protocol::GuestPath;
use vfmap_core::quarantine::Quarantine;
use vfmap_core::{
    AssignState, Assignment, Bdf, Change, DriverName, FunctionName, GlobalIndex, HoldState,
    KubeletHold, LocalIndex, PodContainer, VmName, VmSpec,
};

use crate::metrics::Metrics;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or migrating the database failed.
    #[error("cannot open the state database {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A query or commit failed.
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored row cannot be read back.
    #[error("state database holds a bad row in {table}: {detail}")]
    BadRow {
        /// The table.
        table: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The transaction of a batch failed to commit (shared by every change in the batch).
    #[error("state database commit failed: {0}")]
    Commit(String),
    /// The writer thread is gone (the daemon is shutting down or it panicked).
    #[error("the state writer has stopped")]
    WriterGone,
}

/// Facts about an assignment that the pool does not need but the API shows (the VM view's
/// `guest_path`, `guest_bdf`, `bound_driver` and `stored_value_error`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detail {
    /// Where the device sits in the guest: root port devfn, then devfn behind it.
    pub guest_path: Option<GuestPath>,
    /// The guest's address of the device, as the agent reported it.
    pub guest_bdf: Option<Bdf>,
    /// The driver the agent reports bound (the row's `guest_driver` is the one wanted).
    pub guest_driver: Option<DriverName>,
    /// A stored value that could not be read back (the database was edited or damaged); the
    /// value is left out above, and said here instead of silently dropped.
    pub unreadable: Option<String>,
}

/// A failed attach, kept for the API (the VM view's `failures`): the API's own type, stored
/// as a row.
pub use vfmap_api::Failure;

/// One durable change.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// A pool change.
    Pool(Change),
    /// New guest-side facts for an assignment.
    Detail(GlobalIndex, Detail),
    /// A failed attach.
    Failure(Failure),
}

/// Everything loaded at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Location → global index, as persisted.
    pub indexes: Vec<(GlobalIndex, Bdf)>,
    /// VMs.
    pub vms: Vec<VmSpec>,
    /// Assignments (with their details).
    pub assignments: Vec<(Assignment, Detail)>,
    /// The kubelet's holds.
    pub kubelet: Vec<KubeletHold>,
    /// Quarantined VFs.
    pub quarantine: Vec<Quarantine>,
    /// VFs re-programmed at run time, with the function they carry now.
    pub functions: Vec<(GlobalIndex, Bdf, FunctionName)>,
    /// Re-programmings a crash interrupted.
    pub programming: Vec<Programming>,
    /// Recent failures, oldest first.
    pub failures: Vec<Failure>,
}

type Job = (Vec<Mutation>, oneshot::Sender<Result<(), StoreError>>);

/// Handle to the writer thread.
#[derive(Debug, Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
}

mod schema;
#[cfg(test)]
use schema::SCHEMA;
pub use schema::{SCHEMA_VERSION, open_connection};

pub(crate) fn bad_row(table: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::BadRow {
        table,
        detail: detail.into(),
    }
}

impl Store {
    /// Opens the database at `path`, gives every location in `locations` a stable global index
    /// (kept from earlier runs, new ones after the highest), loads the state, and starts the
    /// writer thread. Its commits are measured in a registry of its own: see
    /// [`Store::open_with_metrics`].
    pub fn open(path: &Path, locations: &[Bdf]) -> Result<(Store, Loaded), StoreError> {
        Store::open_with_metrics(path, locations, Arc::default())
    }

    /// [`Store::open`], with the writer's commit durations going to `metrics`.
    pub fn open_with_metrics(
        path: &Path,
        locations: &[Bdf],
        metrics: Arc<Metrics>,
    ) -> Result<(Store, Loaded), StoreError> {
        let mut conn = open_connection(path)?;
        let loaded = load(&mut conn, locations)?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("vfmap-store".into())
            .spawn(move || writer(conn, inbox, &metrics))
            .map_err(|e| bad_row("(thread)", e.to_string()))?;
        Ok((Store { jobs }, loaded))
    }

    /// Queues mutations in order and returns the receiver of their commit. Call while holding
    /// the lock that ordered them, await after releasing it.
    pub fn submit(&self, mutations: Vec<Mutation>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, receiver) = oneshot::channel();
        // If the writer is gone, `done` is dropped and the receiver reports it.
        let _ = self.jobs.send((mutations, done));
        receiver
    }

    /// Submits and waits for the commit.
    pub async fn write(&self, mutations: Vec<Mutation>) -> Result<(), StoreError> {
        self.submit(mutations)
            .await
            .map_err(|_| StoreError::WriterGone)?
    }
}

/// The stored numbering: global index → location, for every VF ever numbered.
fn read_known(conn: &Connection) -> Result<Vec<(GlobalIndex, Bdf)>, StoreError> {
    let mut known = Vec::new();
    let mut stmt = conn.prepare("SELECT global_index, location FROM vfs ORDER BY global_index")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (gi, location) = row?;
        let gi = u32::try_from(gi)
            .map(GlobalIndex::new)
            .map_err(|_| bad_row("vfs", format!("index {gi}")))?;
        let location = location
            .parse()
            .map_err(|e| bad_row("vfs", format!("{e}")))?;
        known.push((gi, location));
    }
    Ok(known)
}

/// The stored numbering of the database at `path`, read-only (the offline inventory uses
/// it; a running daemon may hold the database meanwhile).
pub fn read_numbering(path: &Path) -> Result<Vec<(GlobalIndex, Bdf)>, StoreError> {
    let open = || {
        rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    };
    let conn = open().map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    read_known(&conn)
}

fn load(conn: &mut Connection, locations: &[Bdf]) -> Result<Loaded, StoreError> {
    let tx = conn.transaction()?;
    let mut known = read_known(&tx)?;
    // The one numbering (shared with the offline inventory): new VFs after the highest.
    let (_, added) = vfmap_core::index::number(locations, &known);
    {
        let mut insert = tx.prepare("INSERT INTO vfs (global_index, location) VALUES (?1, ?2)")?;
        for (gi, location) in &added {
            insert.execute(params![gi.get(), location.to_string()])?;
        }
    }
    known.extend(added);
    let mut vms = Vec::new();
    {
        let mut stmt = tx.prepare("SELECT name, spec FROM vms ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (name, spec) = row?;
            let spec: VmSpec =
                serde_json::from_str(&spec).map_err(|e| bad_row("vms", format!("{name}: {e}")))?;
            vms.push(spec);
        }
    }
    let mut assignments = Vec::new();
    {
        let mut stmt = tx.prepare(
            "SELECT global_index, location, vm, local_index, function, state, guest_path, guest_bdf, guest_driver
             FROM assignments WHERE consumer = 'vm' ORDER BY global_index",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let gi: i64 = r.get(0)?;
            let text = |i: usize| -> Result<String, StoreError> { Ok(r.get::<_, String>(i)?) };
            let bad = |what: String| bad_row("assignments", format!("VF {gi}: {what}"));
            let assignment = Assignment {
                global_index: u32::try_from(gi)
                    .map(GlobalIndex::new)
                    .map_err(|_| bad("index".into()))?,
                location: text(1)?.parse().map_err(|e| bad(format!("{e}")))?,
                vm: VmName::new(&text(2)?).map_err(bad)?,
                local_index: u32::try_from(r.get::<_, i64>(3)?)
                    .map(LocalIndex::new)
                    .map_err(|_| bad("local index".into()))?,
                function: FunctionName::new(&text(4)?).map_err(bad)?,
                state: AssignState::parse(&text(5)?).ok_or_else(|| bad("state".into()))?,
            };
            let detail = read_detail(
                gi,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
            );
            assignments.push((assignment, detail));
        }
    }
    let mut failures = Vec::new();
    {
        let mut stmt = tx.prepare(
            "SELECT vm, local_index, function, global_index, reason, at FROM failures ORDER BY id DESC LIMIT 200",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Failure {
                vm: r.get(0)?,
                local_index: LocalIndex::new(r.get(1)?),
                function: r.get(2)?,
                global_index: GlobalIndex::new(r.get(3)?),
                reason: r.get(4)?,
                at: r.get::<_, i64>(5)?.max(0) as u64,
            })
        })?;
        for row in rows {
            failures.push(row?);
        }
        failures.reverse();
    }
    let kubelet = load_kubelet(&tx)?;
    let quarantine = load_quarantine(&tx)?;
    let (functions, programming) = load_functions(&tx)?;
    tx.commit()?;
    Ok(Loaded {
        indexes: known,
        vms,
        assignments,
        kubelet,
        quarantine,
        functions,
        programming,
        failures,
    })
}

type LoadedFunctions = (Vec<(GlobalIndex, Bdf, FunctionName)>, Vec<Programming>);

/// The re-programmed VFs' functions, and the re-programmings under way.
fn load_functions(conn: &Connection) -> Result<LoadedFunctions, StoreError> {
    let index = |table: &'static str, gi: i64| {
        u32::try_from(gi)
            .map(GlobalIndex::new)
            .map_err(|_| bad_row(table, format!("VF {gi}: index")))
    };
    let parse = |table: &'static str, gi: i64, what: &str, text: String| {
        FunctionName::new(&text).map_err(|e| bad_row(table, format!("VF {gi}: {what}: {e}")))
    };
    let location = |table: &'static str, gi: i64, text: String| {
        text.parse::<Bdf>()
            .map_err(|e| bad_row(table, format!("VF {gi}: {e}")))
    };
    let mut functions = Vec::new();
    let mut stmt = conn
        .prepare("SELECT global_index, location, function FROM functions ORDER BY global_index")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let gi: i64 = r.get(0)?;
        functions.push((
            index("functions", gi)?,
            location("functions", gi, r.get(1)?)?,
            parse("functions", gi, "function", r.get(2)?)?,
        ));
    }
    let mut programming = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT global_index, location, from_function, to_function FROM programming ORDER BY global_index",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let gi: i64 = r.get(0)?;
        programming.push(Programming {
            global_index: index("programming", gi)?,
            location: location("programming", gi, r.get(1)?)?,
            from: parse("programming", gi, "from_function", r.get(2)?)?,
            to: parse("programming", gi, "to_function", r.get(3)?)?,
        });
    }
    Ok((functions, programming))
}

/// The quarantined VFs.
fn load_quarantine(conn: &Connection) -> Result<Vec<Quarantine>, StoreError> {
    let mut all = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT global_index, location, reason, since FROM quarantine ORDER BY global_index",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let gi: i64 = r.get(0)?;
        let bad = |what: String| bad_row("quarantine", format!("VF {gi}: {what}"));
        all.push(Quarantine {
            global_index: u32::try_from(gi)
                .map(GlobalIndex::new)
                .map_err(|_| bad("index".into()))?,
            location: r
                .get::<_, String>(1)?
                .parse()
                .map_err(|e| bad(format!("{e}")))?,
            reason: r.get(2)?,
            since: r.get::<_, i64>(3)?.max(0) as u64,
        });
    }
    Ok(all)
}

/// The kubelet's holds (`consumer = 'kubelet'` rows).
fn load_kubelet(conn: &Connection) -> Result<Vec<KubeletHold>, StoreError> {
    let mut holds = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT global_index, location, function, state, owner, allocated_at
         FROM assignments WHERE consumer = 'kubelet' ORDER BY global_index",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let gi: i64 = r.get(0)?;
        let bad = |what: String| bad_row("assignments", format!("VF {gi} (kubelet): {what}"));
        let owner = match r.get::<_, Option<String>>(4)? {
            Some(text) => Some(
                serde_json::from_str::<PodContainer>(&text)
                    .map_err(|e| bad(format!("owner: {e}")))
                    .and_then(|o| {
                        PodContainer::new(&o.namespace, &o.pod, &o.container).map_err(bad)
                    })?,
            ),
            None => None,
        };
        holds.push(KubeletHold {
            global_index: u32::try_from(gi)
                .map(GlobalIndex::new)
                .map_err(|_| bad("index".into()))?,
            location: r
                .get::<_, String>(1)?
                .parse()
                .map_err(|e| bad(format!("{e}")))?,
            function: FunctionName::new(&r.get::<_, String>(2)?).map_err(bad)?,
            state: HoldState::parse(&r.get::<_, String>(3)?).ok_or_else(|| bad("state".into()))?,
            owner,
            allocated_at_ms: r.get::<_, Option<i64>>(5)?.unwrap_or(0).max(0) as u64,
        });
    }
    Ok(holds)
}

/// The guest-side columns, typed. A value that does not parse is logged and named in
/// `unreadable`: the assignment itself still loads (its state is what matters for safety).
fn read_detail(
    gi: i64,
    path: Option<String>,
    bdf: Option<String>,
    driver: Option<String>,
) -> Detail {
    let mut problems = Vec::new();
    let mut column = |name: &str, text: Option<String>, ok: bool| match text {
        Some(text) if !ok => {
            tracing::error!(vf = gi, column = name, value = %text.escape_debug(), "the state database holds an unreadable value");
            problems.push(format!("{name} {text:?} is unreadable"));
        }
        _ => {}
    };
    let guest_path = path.as_deref().and_then(|t| t.parse::<GuestPath>().ok());
    column("guest_path", path, guest_path.is_some());
    let guest_bdf = bdf.as_deref().and_then(|t| t.parse::<Bdf>().ok());
    column("guest_bdf", bdf, guest_bdf.is_some());
    let guest_driver = driver.as_deref().and_then(|t| DriverName::new(t).ok());
    column("guest_driver", driver, guest_driver.is_some());
    Detail {
        guest_path,
        guest_bdf,
        guest_driver,
        unreadable: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

fn writer(mut conn: Connection, inbox: mpsc::Receiver<Job>, metrics: &Metrics) {
    while let Ok(first) = inbox.recv() {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match inbox.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let results = commit_batch(&mut conn, &batch);
        metrics.store_committed(started.elapsed());
        for ((_, done), result) in batch.into_iter().zip(results) {
            let _ = done.send(result);
        }
    }
}

/// One transaction for the batch, a savepoint per job. If the commit itself fails, every
/// job fails.
fn commit_batch(conn: &mut Connection, batch: &[Job]) -> Vec<Result<(), StoreError>> {
    let mut results = Vec::with_capacity(batch.len());
    let outcome = (|| -> Result<(), rusqlite::Error> {
        let mut tx = conn.transaction()?;
        for (mutations, _) in batch {
            let mut sp = tx.savepoint()?;
            let applied = mutations.iter().try_for_each(|m| apply(&sp, m));
            match applied {
                Ok(()) => {
                    sp.commit()?;
                    results.push(Ok(()));
                }
                Err(e) => {
                    sp.rollback()?;
                    results.push(Err(StoreError::Sql(e)));
                }
            }
        }
        tx.commit()
    })();
    match outcome {
        Ok(()) => results,
        Err(e) => batch
            .iter()
            .map(|_| Err(StoreError::Commit(e.to_string())))
            .collect(),
    }
}

/// Seconds since the epoch, for failure records.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn apply(conn: &Connection, mutation: &Mutation) -> Result<(), rusqlite::Error> {
    // Cached statements: the writer runs the same few statements thousands of times.
    let run =
        |sql: &str, values: &[&dyn rusqlite::ToSql]| conn.prepare_cached(sql)?.execute(values);
    // A change that names the row it expects (its state, its holder) must find exactly it.
    let exactly_one = |sql: &str, values: &[&dyn rusqlite::ToSql]| match run(sql, values)? {
        1 => Ok(()),
        _ => Err(rusqlite::Error::QueryReturnedNoRows),
    };
    match mutation {
        Mutation::Pool(Change::AddVm(spec)) => {
            let json = serde_json::to_string(spec)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            run(
                "INSERT INTO vms (name, spec) VALUES (?1, ?2)",
                params![spec.name.as_str(), json],
            )?;
        }
        Mutation::Pool(Change::RemoveVm(name)) => {
            run("DELETE FROM vms WHERE name = ?1", params![name.as_str()])?;
        }
        Mutation::Pool(Change::Reserve(assignments)) => {
            for a in assignments {
                run(
                    "INSERT INTO assignments (global_index, location, vm, local_index, function, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        a.global_index.get(),
                        a.location.to_string(),
                        a.vm.as_str(),
                        a.local_index.get(),
                        a.function.as_str(),
                        a.state.as_str()
                    ],
                )?;
            }
        }
        // State changes and frees name the state and holder they expect: a change planned on
        // a stale view (a second daemon, a lost race) changes nothing and fails.
        Mutation::Pool(Change::SetState {
            global_index,
            from,
            state,
        }) => {
            exactly_one(
                "UPDATE assignments SET state = ?2 WHERE global_index = ?1 AND state = ?3 AND consumer = 'vm'",
                params![global_index.get(), state.as_str(), from.as_str()],
            )?;
        }
        Mutation::Pool(Change::Free {
            global_index,
            vm,
            local_index,
        }) => {
            exactly_one(
                "DELETE FROM assignments WHERE global_index = ?1 AND vm = ?2 AND local_index = ?3",
                params![global_index.get(), vm.as_str(), local_index.get()],
            )?;
        }
        Mutation::Pool(Change::KubeletReserve(holds)) => {
            for h in holds {
                let owner = h
                    .owner
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                run(
                    "INSERT INTO assignments (global_index, location, consumer, function, state, owner, allocated_at)
                     VALUES (?1, ?2, 'kubelet', ?3, ?4, ?5, ?6)",
                    params![
                        h.global_index.get(),
                        h.location.to_string(),
                        h.function.as_str(),
                        h.state.as_str(),
                        owner,
                        i64::try_from(h.allocated_at_ms).unwrap_or(i64::MAX)
                    ],
                )?;
            }
        }
        // Kubelet changes name the holder kind and the state they expect, as VM ones do.
        Mutation::Pool(Change::KubeletOwner {
            global_index,
            owner,
        }) => {
            let owner = serde_json::to_string(owner)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            exactly_one(
                "UPDATE assignments SET owner = ?2 WHERE global_index = ?1 AND consumer = 'kubelet' AND state = 'held'",
                params![global_index.get(), owner],
            )?;
        }
        Mutation::Pool(Change::KubeletReleasing { global_index }) => {
            exactly_one(
                "UPDATE assignments SET state = 'releasing' WHERE global_index = ?1 AND consumer = 'kubelet' AND state = 'held'",
                params![global_index.get()],
            )?;
        }
        Mutation::Pool(Change::KubeletFree { global_index }) => {
            exactly_one(
                "DELETE FROM assignments WHERE global_index = ?1 AND consumer = 'kubelet'",
                params![global_index.get()],
            )?;
        }
        Mutation::Pool(Change::Quarantine(q)) => {
            run(
                "INSERT INTO quarantine (global_index, location, reason, since) VALUES (?1, ?2, ?3, ?4)",
                params![
                    q.global_index.get(),
                    q.location.to_string(),
                    q.reason,
                    i64::try_from(q.since).unwrap_or(i64::MAX)
                ],
            )?;
        }
        Mutation::Pool(Change::ClearQuarantine { global_index }) => {
            exactly_one(
                "DELETE FROM quarantine WHERE global_index = ?1",
                params![global_index.get()],
            )?;
        }
        Mutation::Pool(Change::ProgramStart(p)) => {
            run(
                "INSERT INTO programming (global_index, location, from_function, to_function) VALUES (?1, ?2, ?3, ?4)",
                params![
                    p.global_index.get(),
                    p.location.to_string(),
                    p.from.as_str(),
                    p.to.as_str()
                ],
            )?;
        }
        // The VF carries its new function from now on, across restarts.
        Mutation::Pool(Change::Programmed {
            global_index,
            function,
            ..
        }) => {
            exactly_one(
                "DELETE FROM programming WHERE global_index = ?1",
                params![global_index.get()],
            )?;
            run(
                "INSERT INTO functions (global_index, location, function)
                 SELECT global_index, location, ?2 FROM vfs WHERE global_index = ?1
                 ON CONFLICT (global_index) DO UPDATE SET function = ?2",
                params![global_index.get(), function.as_str()],
            )?;
        }
        // The VF keeps the function it had (and goes to quarantine in the same commit).
        Mutation::Pool(Change::ProgramAbandoned { global_index }) => {
            exactly_one(
                "DELETE FROM programming WHERE global_index = ?1",
                params![global_index.get()],
            )?;
        }
        Mutation::Detail(global_index, d) => {
            run(
                "UPDATE assignments SET guest_path = ?2, guest_bdf = ?3, guest_driver = ?4 WHERE global_index = ?1 AND consumer = 'vm'",
                params![
                    global_index.get(),
                    d.guest_path.map(|p| p.to_string()),
                    d.guest_bdf.map(|b| b.to_string()),
                    d.guest_driver.as_ref().map(DriverName::as_str)
                ],
            )?;
        }
        Mutation::Failure(f) => {
            run(
                "INSERT INTO failures (vm, local_index, function, global_index, reason, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    f.vm,
                    f.local_index.get(),
                    f.function,
                    f.global_index.get(),
                    f.reason,
                    now()
                ],
            )?;
            // Keep the table bounded: a guest failing in a loop must not fill the disk.
            run(
                "DELETE FROM failures WHERE id <= (SELECT MAX(id) FROM failures) - 1000",
                params![],
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod kubelet_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use vfmap_core::SlotId;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    fn vm(name: &str) -> VmSpec {
        VmSpec {
            name: VmName::new(name).unwrap(),
            backend: vfmap_core::VmBackend::Qmp {
                qmp_socket: "/run/q".into(),
                agent_socket: "/run/a".into(),
            },
            slots: vec![SlotId::new("rp0").unwrap(), SlotId::new("rp1").unwrap()],
            numa_node: None,
        }
    }

    fn assignment(gi: u32, location: &str, local_index: u32) -> Assignment {
        Assignment {
            global_index: GlobalIndex::new(gi),
            location: bdf(location),
            vm: VmName::new("web").unwrap(),
            local_index: LocalIndex::new(local_index),
            function: FunctionName::new("crypto").unwrap(),
            state: AssignState::Reserved,
        }
    }

    #[tokio::test]
    async fn a_version_0_database_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        {
            // The schema and a row as a daemon before the typed backend wrote them.
            let conn = Connection::open(&db).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO vms (name, spec) VALUES ('web', ?1)",
                [r#"{"name":"web","qmp_socket":"/run/q","agent_socket":"/run/a","slots":["rp0","rp1"],"numa_node":null}"#],
            )
            .unwrap();
        }
        let (_, loaded) = Store::open(&db, &[]).unwrap();
        assert_eq!(loaded.vms, [vm("web")]);
        let conn = Connection::open(&db).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(conn);
        // Idempotent: a second open changes nothing.
        let (_, again) = Store::open(&db, &[]).unwrap();
        assert_eq!(again.vms, [vm("web")]);
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let error = Store::open(&db, &[]).unwrap_err().to_string();
        assert!(error.contains("newer than this daemon"), "{error}");
    }

    #[tokio::test]
    async fn indexes_are_stable_across_reopen_and_new_vfs_come_after() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let (_, loaded) = Store::open(&db, &[bdf("0000:01:00.2"), bdf("0000:01:00.1")]).unwrap();
        assert_eq!(
            loaded.indexes,
            [
                (GlobalIndex::new(0), bdf("0000:01:00.2")),
                (GlobalIndex::new(1), bdf("0000:01:00.1"))
            ]
        );
        // A rescan that lost one VF and found a new one: old indexes stay, the new one is 2.
        let (_, loaded) = Store::open(&db, &[bdf("0000:01:00.3"), bdf("0000:01:00.1")]).unwrap();
        assert_eq!(
            loaded.indexes,
            [
                (GlobalIndex::new(0), bdf("0000:01:00.2")),
                (GlobalIndex::new(1), bdf("0000:01:00.1")),
                (GlobalIndex::new(2), bdf("0000:01:00.3"))
            ]
        );
    }

    #[tokio::test]
    async fn changes_survive_reopen_and_constraint_violations_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let locations = [bdf("0000:01:00.1"), bdf("0000:01:00.2")];
        let (store, _) = Store::open(&db, &locations).unwrap();
        store
            .write(vec![Mutation::Pool(Change::AddVm(vm("web")))])
            .await
            .unwrap();
        store
            .write(vec![Mutation::Pool(Change::Reserve(vec![assignment(
                0,
                "0000:01:00.1",
                0,
            )]))])
            .await
            .unwrap();
        // Submitted together: the second takes local index 0 again and must fail alone.
        let ok = store.submit(vec![Mutation::Pool(Change::SetState {
            global_index: GlobalIndex::new(0),
            from: AssignState::Reserved,
            state: AssignState::HostBound,
        })]);
        let clash = store.submit(vec![Mutation::Pool(Change::Reserve(vec![assignment(
            1,
            "0000:01:00.2",
            0,
        )]))]);
        assert!(ok.await.unwrap().is_ok());
        assert!(
            clash.await.unwrap().is_err(),
            "UNIQUE(vm, local_index) must hold"
        );
        store
            .write(vec![Mutation::Detail(
                GlobalIndex::new(0),
                Detail {
                    guest_path: Some("03.0/00.0".parse().unwrap()),
                    ..Detail::default()
                },
            )])
            .await
            .unwrap();
        // Writes planned on a stale view change nothing: a state it is not in, another holder.
        let stale = store
            .write(vec![Mutation::Pool(Change::SetState {
                global_index: GlobalIndex::new(0),
                from: AssignState::Reserved,
                state: AssignState::HostBound,
            })])
            .await;
        assert!(stale.is_err(), "a state change from a state it is not in");
        for (vm_name, local_index) in [("db", 0), ("web", 1)] {
            let freed = store
                .write(vec![Mutation::Pool(Change::Free {
                    global_index: GlobalIndex::new(0),
                    vm: VmName::new(vm_name).unwrap(),
                    local_index: LocalIndex::new(local_index),
                })])
                .await;
            assert!(freed.is_err(), "freed from {vm_name} {local_index}");
        }
        drop(store);
        let (_, loaded) = Store::open(&db, &locations).unwrap();
        assert_eq!(loaded.vms, [vm("web")]);
        assert_eq!(loaded.assignments.len(), 1);
        assert_eq!(loaded.assignments[0].0.state, AssignState::HostBound);
        assert_eq!(
            loaded.assignments[0]
                .1
                .guest_path
                .map(|p| p.to_string())
                .as_deref(),
            Some("03.0/00.0")
        );
    }
}
