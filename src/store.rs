//! The only module that knows SQL: the connection pool, migrations, the
//! fetcher's bulk upserts, the validator's leased selection and result writes,
//! and the state manager's loads. Rows of `proxies` are never deleted.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;

use crate::config::DatabaseConfig;
use crate::proxy::{ActiveProxy, Anonymity, Protocol, ProxyKey};
use crate::validator::check::HttpsFailure;
use crate::validator::judge_answer::DeadReason;

const SCHEMA: &str = include_str!("../schema.sql");
/// Serializes migrations of concurrent instances (an arbitrary constant).
const MIGRATION_LOCK: i64 = 0x7072_6f78_7970_6f6f; // "proxypoo"
/// Rows per upsert statement: large enough to amortise the round trip, small
/// enough to keep one statement's memory and lock time bounded.
pub const UPSERT_BATCH: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad database url {url}: {message}")]
    Url { url: String, message: String },
    #[error("database unavailable: {0}")]
    Unavailable(#[from] r2d2::Error),
    #[error("database error: {0}")]
    Query(#[from] postgres::Error),
}

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// A bounded pool of PostgreSQL connections.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// What an upsert of one list did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpsertCounts {
    /// Rows created: proxies never seen before.
    pub new: u64,
    /// Rows written in all (new and re-listed).
    pub upserted: u64,
}

/// Which proxies a validation cycle checks (the documented selection: never validated, active and stale, or re-listed after the retry delay).
#[derive(Clone, Copy, Debug)]
pub struct DuePolicy {
    pub revalidate_after: Duration,
    pub retry_inactive_after: Option<Duration>,
    /// How long a claimed batch stays reserved for the instance that claimed it.
    pub lease: Duration,
}

/// A proxy claimed for checking.
#[derive(Clone, Debug)]
pub struct DueProxy {
    pub id: i64,
    pub key: ProxyKey,
}

/// One check's findings, as written back.
#[derive(Clone, Debug)]
pub struct CheckRecord {
    pub id: i64,
    pub alive: bool,
    pub latency_ms: Option<u32>,
    pub anonymity: Option<Anonymity>,
    pub supports_https: Option<bool>,
    /// Whether an https check ran (then `supports_https` and
    /// `https_failure` are its finding, and `https_checked_at` moves).
    pub https_checked: bool,
    pub https_failure: Option<HttpsFailure>,
    pub country: Option<String>,
    pub exit_ip: Option<IpAddr>,
    pub dead_reason: Option<DeadReason>,
    pub evidence: Option<String>,
}

/// What a cycle's selection sees at its start.
#[derive(Clone, Copy, Debug)]
pub struct DueCount {
    pub due: i64,
    /// The database's clock at the count: the cycle claims only rows last
    /// validated before it, so that no proxy is checked twice in a cycle.
    pub at: DateTime<Utc>,
}

/// How many of a list's proxies work now and ever did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListYield {
    pub list: String,
    pub listed: i64,
    pub active_now: i64,
    pub ever_active: i64,
}

impl Store {
    /// Builds the pool without connecting: the first use connects, so a
    /// database that is down at start-up is retried by the caller.
    pub fn connect(config: &DatabaseConfig) -> Result<Store, StoreError> {
        let mut pg_config: postgres::Config =
            config
                .url
                .expose()
                .parse()
                .map_err(|err: postgres::Error| StoreError::Url {
                    url: config.url.to_string(),
                    message: err.to_string(),
                })?;
        pg_config.connect_timeout(config.checkout_timeout);
        pg_config.keepalives(true);
        pg_config.keepalives_idle(Duration::from_secs(30));
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("proxy-pool");
        }
        let manager = PostgresConnectionManager::new(pg_config, NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(config.pool_size)
            .min_idle(Some(0))
            .connection_timeout(config.checkout_timeout)
            .test_on_check_out(false)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(manager);
        Ok(Store { pool })
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>, StoreError> {
        Ok(self.pool.get()?)
    }

    /// Applies schema.sql in one transaction under an advisory lock, so two
    /// instances starting together do not race.
    pub fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        // ALTER TABLE takes the table's exclusive lock even when it changes
        // nothing: waiting behind a long query (a fleet's yields scan, a
        // report) would queue every other instance's work behind this
        // migration. Give up instead; `serve` retries with backoff.
        tx.batch_execute("SET LOCAL lock_timeout = '10s'")?;
        // "already exists, skipping" notices are the normal case here.
        tx.batch_execute("SET LOCAL client_min_messages = warning")?;
        tx.batch_execute(SCHEMA)?;
        tx.commit()?;
        Ok(())
    }

    /// A cheap round trip, for /health.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn()?.simple_query("SELECT 1")?;
        Ok(())
    }

    /// Every active proxy, for the state manager's start-up load and sync.
    pub fn load_active(&self) -> Result<Vec<ActiveProxy>, StoreError> {
        let mut conn = self.conn()?;
        let rows = conn.query(
            "SELECT id, protocol, ip, port, username, password, latency_ms, anonymity,
                    country, supports_https, last_validated_at, anonymity_evidence, exit_ip
             FROM proxies WHERE is_active",
            &[],
        )?;
        let mut proxies = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(key) = key_from_row(&row, 1) else {
                continue;
            };
            let latency: Option<i32> = row.get(6);
            let anonymity: Option<String> = row.get(7);
            proxies.push(ActiveProxy {
                exit_ip: row.get(12),
                id: row.get(0),
                key,
                latency_ms: latency.and_then(|l| u32::try_from(l).ok()),
                anonymity: anonymity.as_deref().and_then(Anonymity::parse),
                country: row.get(8),
                supports_https: row.get(9),
                last_validated_at: row.get::<_, Option<DateTime<Utc>>>(10),
                anonymity_evidence: row.get::<_, Option<&str>>(11).map(Arc::from),
            });
        }
        Ok(proxies)
    }

    /// Inserts or refreshes the proxies a list gave, one statement per batch:
    /// `last_seen_at` moves, validation results stay, nothing is deleted, and
    /// the list is recorded as a giver of each proxy. A list of several
    /// batches runs them on two connections when the pool has one to spare
    /// (a backend is CPU bound: two use two cores).
    pub fn upsert_listed(
        &self,
        source: &str,
        proxies: &[ProxyKey],
    ) -> Result<UpsertCounts, StoreError> {
        use std::sync::atomic::{AtomicUsize, Ordering};

        type Conn = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

        /// One batch: COPY into a temporary table (the cheapest way in), then
        /// one INSERT ... ON CONFLICT statement, in a transaction of its own
        /// so that row locks are held only for one batch.
        fn upsert_batch(
            conn: &mut Conn,
            source: &str,
            list_id: i32,
            batch: &[&ProxyKey],
        ) -> Result<UpsertCounts, StoreError> {
            let mut tx = conn.transaction()?;
            tx.batch_execute(
                "CREATE TEMPORARY TABLE listed (
                     protocol text, ip inet, port int4, username text, password text
                 ) ON COMMIT DROP",
            )?;
            let sink = tx.copy_in(
                "COPY listed (protocol, ip, port, username, password) FROM STDIN BINARY",
            )?;
            let mut writer = BinaryCopyInWriter::new(
                sink,
                &[Type::TEXT, Type::INET, Type::INT4, Type::TEXT, Type::TEXT],
            );
            for key in batch {
                writer.write(&[
                    &key.protocol.as_str(),
                    &key.ip,
                    &i32::from(key.port),
                    &key.username.as_deref(),
                    &key.password.as_deref(),
                ])?;
            }
            writer.finish()?;
            // A proxy created by this statement records this list as its
            // first, in its own row: no link row. Only a proxy first given by
            // another list (or stored before first_list_id) needs one, with
            // the conflict check. Re-listings touch no indexed column, so
            // with the table's fillfactor they are HOT updates.
            let row = tx.query_one(
                "WITH upserted AS (
                     INSERT INTO proxies AS p (protocol, ip, port, username, password, first_list_id)
                     SELECT protocol, ip, port, username, password, $2 FROM listed
                     ON CONFLICT (protocol, ip, port, (coalesce(username, ''))) DO UPDATE
                         SET last_seen_at = now(), password = EXCLUDED.password
                     RETURNING p.id, (p.xmax = 0) AS inserted, p.first_list_id
                 ), linked AS (
                     INSERT INTO proxy_sources (source, proxy_id)
                     SELECT $1, id FROM upserted
                     WHERE NOT inserted AND first_list_id IS DISTINCT FROM $2
                     ON CONFLICT (source, proxy_id) DO NOTHING
                 )
                 SELECT count(*) FILTER (WHERE inserted), count(*) FROM upserted",
                &[&source, &list_id],
            )?;
            tx.commit()?;
            Ok(UpsertCounts {
                new: row.get::<_, i64>(0) as u64,
                upserted: row.get::<_, i64>(1) as u64,
            })
        }

        let mut counts = UpsertCounts::default();
        if proxies.is_empty() {
            return Ok(counts);
        }
        let mut first = self.conn()?;
        let list_id = list_id(&mut first, source)?;
        // In identity order: index pages are visited in sequence rather than
        // at random, and every writer locks rows in the same order, so two
        // lists naming the same proxies cannot deadlock (nor can this list's
        // own batches, which are disjoint). A row may be touched once per
        // statement: keys that differ only by password are folded (the
        // stable sort keeps the first listed).
        let mut keys: Vec<&ProxyKey> = proxies.iter().collect();
        keys.sort_by(|a, b| identity(a).cmp(&identity(b)));
        keys.dedup_by(|a, b| identity(a) == identity(b));
        let batches: Vec<&[&ProxyKey]> = keys.chunks(UPSERT_BATCH).collect();
        // A second connection only if one comes at once: a busy pool means
        // other work needs it more than this list does.
        let second = if batches.len() > 1 && self.pool.max_size() >= 2 {
            self.pool
                .get_timeout(self.pool.connection_timeout().min(Duration::from_secs(1)))
                .ok()
        } else {
            None
        };
        let next = AtomicUsize::new(0);
        let run = |conn: &mut Conn| -> Result<UpsertCounts, StoreError> {
            let mut done = UpsertCounts::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(batch) = batches.get(index) else {
                    return Ok(done);
                };
                match upsert_batch(conn, source, list_id, batch) {
                    Ok(batch_counts) => {
                        done.new += batch_counts.new;
                        done.upserted += batch_counts.upserted;
                    }
                    Err(err) => {
                        // The other connection stops after its batch.
                        next.store(batches.len(), Ordering::Relaxed);
                        return Err(err);
                    }
                }
            }
        };
        let results = std::thread::scope(|scope| {
            let helper = second.map(|mut conn| scope.spawn(move || run(&mut conn)));
            let mine = run(&mut first);
            let theirs = helper.map(|handle| match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            });
            [Some(mine), theirs]
        });
        for result in results.into_iter().flatten() {
            let done = result?;
            counts.new += done.new;
            counts.upserted += done.upserted;
        }
        Ok(counts)
    }

    /// How many proxies the selection would give now (for progress
    /// reports), and the database's clock, where a cycle starts.
    pub fn count_due(&self, policy: &DuePolicy) -> Result<DueCount, StoreError> {
        let mut conn = self.conn()?;
        let (revalidate, retry) = policy_seconds(policy);
        let row = conn.query_one(
            &format!("SELECT count(*), now() FROM proxies WHERE {DUE_PREDICATE}"),
            &[&revalidate, &retry],
        )?;
        Ok(DueCount {
            due: row.get(0),
            at: row.get(1),
        })
    }

    /// Claims up to `limit` due proxies with an id above `after` that no
    /// instance holds a lease on and that were not validated since
    /// `cycle_start`, in id order, and leases them for `policy.lease`. A
    /// cycle passes the highest id it claimed last (keyset paging), so each
    /// claim starts where the previous one ended instead of rescanning the
    /// rows already checked. A check writes `last_validated_at = now()`,
    /// after the cycle's start, so no proxy is checked twice in a cycle even
    /// when it is due again before the cycle ends (`revalidate_after`
    /// shorter than the cycle). Concurrent instances skip each other's
    /// locked rows; a batch claimed by an instance that died is due again
    /// when its lease ends.
    pub fn claim_due(
        &self,
        policy: &DuePolicy,
        cycle_start: DateTime<Utc>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<DueProxy>, StoreError> {
        let mut conn = self.conn()?;
        let (revalidate, retry) = policy_seconds(policy);
        let lease = policy.lease.as_secs_f64();
        let rows = conn.query(
            &format!(
                "UPDATE proxies SET lease_until = now() + $3::float8 * interval '1 second'
                 WHERE id IN (
                     SELECT id FROM proxies
                     WHERE ({DUE_PREDICATE}) AND (lease_until IS NULL OR lease_until < now())
                         AND (last_validated_at IS NULL OR last_validated_at < $6)
                         AND id > $5
                     ORDER BY id LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 RETURNING id, protocol, ip, port, username, password"
            ),
            &[&revalidate, &retry, &lease, &limit, &after, &cycle_start],
        )?;
        let mut due: Vec<DueProxy> = rows
            .iter()
            .filter_map(|row| {
                Some(DueProxy {
                    id: row.get(0),
                    key: key_from_row(row, 1)?,
                })
            })
            .collect();
        due.sort_by_key(|d| d.id);
        Ok(due)
    }

    /// Writes a batch of check results in one statement and releases their
    /// leases. A dead proxy keeps the latency and anonymity of its last
    /// successful check; counts of checks and alive checks keep its history.
    pub fn write_results(&self, results: &[CheckRecord]) -> Result<(), StoreError> {
        if results.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = results.iter().map(|r| r.id).collect();
        let alive: Vec<bool> = results.iter().map(|r| r.alive).collect();
        let latency: Vec<Option<i32>> = results
            .iter()
            .map(|r| r.latency_ms.map(|l| l.min(i32::MAX as u32) as i32))
            .collect();
        let anonymity: Vec<Option<&str>> = results
            .iter()
            .map(|r| r.anonymity.map(|a| a.as_str()))
            .collect();
        let https: Vec<Option<bool>> = results.iter().map(|r| r.supports_https).collect();
        let https_checked: Vec<bool> = results.iter().map(|r| r.https_checked).collect();
        let https_failure: Vec<Option<String>> = results
            .iter()
            .map(|r| r.https_failure.as_ref().map(|f| f.to_string()))
            .collect();
        let country: Vec<Option<&str>> = results.iter().map(|r| r.country.as_deref()).collect();
        let exit_ip: Vec<Option<IpAddr>> = results.iter().map(|r| r.exit_ip).collect();
        let reason: Vec<Option<&str>> = results
            .iter()
            .map(|r| r.dead_reason.as_ref().map(|d| d.as_str()))
            .collect();
        let evidence: Vec<Option<&str>> = results.iter().map(|r| r.evidence.as_deref()).collect();
        let mut conn = self.conn()?;
        conn.execute(
            "UPDATE proxies AS p SET
                 is_active = r.alive,
                 latency_ms = CASE WHEN r.alive THEN r.latency_ms ELSE p.latency_ms END,
                 anonymity = CASE WHEN r.alive THEN r.anonymity ELSE p.anonymity END,
                 supports_https = CASE WHEN r.https_checked THEN r.supports_https
                                       ELSE p.supports_https END,
                 https_failure = CASE WHEN r.https_checked THEN r.https_failure
                                      ELSE p.https_failure END,
                 https_checked_at = CASE WHEN r.https_checked THEN now()
                                         ELSE p.https_checked_at END,
                 country = CASE WHEN r.alive THEN r.country ELSE p.country END,
                 exit_ip = CASE WHEN r.alive THEN r.exit_ip ELSE p.exit_ip END,
                 anonymity_evidence = CASE WHEN r.alive THEN r.evidence ELSE p.anonymity_evidence END,
                 last_dead_reason = r.dead_reason,
                 last_validated_at = now(),
                 check_count = p.check_count + 1,
                 alive_count = p.alive_count + r.alive::int,
                 lease_until = NULL
             FROM unnest($1::int8[], $2::bool[], $3::int4[], $4::text[], $5::bool[],
                         $6::text[], $7::inet[], $8::text[], $9::text[], $10::bool[],
                         $11::text[])
                 AS r(id, alive, latency_ms, anonymity, supports_https, country, exit_ip,
                      dead_reason, evidence, https_checked, https_failure)
             WHERE p.id = r.id",
            &[
                &ids,
                &alive,
                &latency,
                &anonymity,
                &https,
                &country,
                &exit_ip,
                &reason,
                &evidence,
                &https_checked,
                &https_failure,
            ],
        )?;
        Ok(())
    }

    /// Each list's yield: proxies it listed, how many are active now, and how
    /// many were ever found alive.
    pub fn list_yields(&self) -> Result<Vec<ListYield>, StoreError> {
        self.yields_of(None)
    }

    /// One list's yield (zeros for a list that gave nothing yet), read at
    /// once: a fetch's summary line must not wait for the next refresh.
    pub fn list_yield(&self, source: &str) -> Result<ListYield, StoreError> {
        let found = self.yields_of(Some(source))?.pop();
        Ok(found.unwrap_or_else(|| ListYield {
            list: source.to_string(),
            listed: 0,
            active_now: 0,
            ever_active: 0,
        }))
    }

    /// The yields of every list, or of `only` that one.
    fn yields_of(&self, only: Option<&str>) -> Result<Vec<ListYield>, StoreError> {
        let mut conn = self.conn()?;
        let rows = conn.query(
            // proxy_lists, without its join of proxies to itself.
            "SELECT source, sum(listed)::int8, sum(active)::int8, sum(ever)::int8 FROM (
                 SELECT l.name AS source, count(*) AS listed,
                        count(*) FILTER (WHERE p.is_active) AS active,
                        count(*) FILTER (WHERE p.alive_count > 0) AS ever
                 FROM proxies p JOIN lists l ON l.id = p.first_list_id
                 WHERE $1::text IS NULL OR l.name = $1
                 GROUP BY l.name
                 UNION ALL
                 SELECT s.source, count(*), count(*) FILTER (WHERE p.is_active),
                        count(*) FILTER (WHERE p.alive_count > 0)
                 FROM proxy_sources s JOIN proxies p ON p.id = s.proxy_id
                     LEFT JOIN lists f ON f.id = p.first_list_id
                 WHERE f.name IS DISTINCT FROM s.source AND ($1::text IS NULL OR s.source = $1)
                 GROUP BY s.source
             ) y GROUP BY source ORDER BY source",
            &[&only],
        )?;
        Ok(rows
            .iter()
            .map(|row| ListYield {
                list: row.get(0),
                listed: row.get(1),
                active_now: row.get(2),
                ever_active: row.get(3),
            })
            .collect())
    }

    /// Takes the fetch of `source` for this interval if no instance has
    /// fetched it within `interval` (minus a small slack for clock jitter).
    /// Returns false when another instance already did.
    pub fn claim_fetch(
        &self,
        source: &str,
        interval: Duration,
        instance: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let slack = (interval.as_secs_f64() * 0.1).min(5.0);
        let seconds = (interval.as_secs_f64() - slack).max(0.0);
        let rows = conn.execute(
            "INSERT INTO fetch_leases AS l (source, fetched_at, fetched_by)
             VALUES ($1, now(), $3)
             ON CONFLICT (source) DO UPDATE SET fetched_at = now(), fetched_by = $3
             WHERE l.fetched_at <= now() - $2::float8 * interval '1 second'",
            &[&source, &seconds, &instance],
        )?;
        Ok(rows == 1)
    }

    /// Gives back this instance's claim on a list's fetch after a failure.
    pub fn release_fetch(&self, source: &str, instance: &str) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        conn.execute(
            "UPDATE fetch_leases SET fetched_at = '-infinity'
             WHERE source = $1 AND fetched_by = $2",
            &[&source, &instance],
        )?;
        Ok(())
    }

    /// Which instance last fetched `source`, and when (None: never, or its
    /// claim was given back after a failure).
    pub fn fetch_lease(&self, source: &str) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
        let mut conn = self.conn()?;
        let row = conn.query_opt(
            "SELECT fetched_by, fetched_at FROM fetch_leases
             WHERE source = $1 AND fetched_at > '-infinity'",
            &[&source],
        )?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }
}

/// The due selection; $1 = revalidate_after seconds, $2 = retry seconds (0: never).
/// The casts matter: without them `$2 > 0` makes PostgreSQL infer an integer
/// parameter, and the f64 seconds no longer bind.
const DUE_PREDICATE: &str = "last_validated_at IS NULL
    OR (is_active AND last_validated_at < now() - $1::float8 * interval '1 second')
    OR ($2::float8 > 0 AND NOT is_active AND last_seen_at > last_validated_at
        AND last_validated_at < now() - $2::float8 * interval '1 second')";

fn policy_seconds(policy: &DuePolicy) -> (f64, f64) {
    (
        policy.revalidate_after.as_secs_f64(),
        policy
            .retry_inactive_after
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    )
}

/// The number of list `name` in `lists`, registered on its first use.
fn list_id(conn: &mut postgres::Client, name: &str) -> Result<i32, StoreError> {
    // A select first: an insert that conflicts would spend a sequence value
    // at every fetch. When two instances register one list at once, one
    // insert wins and the other finds its row in a second statement.
    let row = conn.query_opt(
        "WITH found AS (SELECT id FROM lists WHERE name = $1),
         added AS (
             INSERT INTO lists (name) SELECT $1 WHERE NOT EXISTS (SELECT 1 FROM found)
             ON CONFLICT (name) DO NOTHING
             RETURNING id
         )
         SELECT id FROM found UNION ALL SELECT id FROM added",
        &[&name],
    )?;
    let row = match row {
        Some(row) => row,
        None => conn.query_one("SELECT id FROM lists WHERE name = $1", &[&name])?,
    };
    Ok(row.get(0))
}

/// A proxy's identity in the table (its unique index): the password is not part of it.
fn identity(key: &ProxyKey) -> (Protocol, IpAddr, u16, Option<&str>) {
    (key.protocol, key.ip, key.port, key.username.as_deref())
}

/// Reads (protocol, ip, port, username, password) starting at column `first`.
fn key_from_row(row: &postgres::Row, first: usize) -> Option<ProxyKey> {
    let protocol: String = row.get(first);
    let port: i32 = row.get(first + 2);
    Some(ProxyKey {
        protocol: Protocol::from_scheme(&protocol)?,
        ip: row.get(first + 1),
        port: u16::try_from(port).ok()?,
        username: row.get(first + 3),
        password: row.get(first + 4),
    })
}
