//! The CQRS projections the worker runs into ClickHouse, chosen by name:
//! `events-store` (every event into a table per event type) and
//! `order-status` (the current state of every order). Both are idempotent,
//! so the runtime's at-least-once delivery gives exact query results.

pub mod ddl;
pub mod rows;
pub mod sink;

use std::sync::Arc;
use std::time::Duration;

use backbone::config::ClickHouseSettings;
use backbone::events::AnyEvent;
use backbone::shutdown::Shutdown;

use crate::forward::now_ms;
use crate::handler::{Handler, Outcome, Record};
use crate::metrics::Metrics;
use rows::{ChatRow, EventRow, OrderRow, OrderStatusRow, Position, SearchRow, UserRow};
use sink::{Limits, Pacer, RowResults, Table};

/// A client for `settings`, bound to its database when `database` is set.
/// No schema validation: ClickHouse 18.16 lacks RowBinaryWithNamesAndTypes.
pub fn client(settings: &ClickHouseSettings, database: bool) -> clickhouse::Client {
    let mut client = clickhouse::Client::default()
        .with_url(&settings.url)
        .with_user(&settings.user)
        .with_compression(if settings.compression {
            clickhouse::Compression::Lz4
        } else {
            clickhouse::Compression::None
        })
        .with_validation(false);
    if !settings.password.is_empty() {
        client = client.with_password(settings.password.expose());
    }
    if database {
        client = client.with_database(&settings.database);
    }
    client
}

/// Applies `migrations` not yet recorded in the migrations table `table`;
/// returns the versions it applied.
pub async fn migrate(
    settings: &ClickHouseSettings,
    table: &str,
    migrations: fn(&ddl::Target) -> Vec<ddl::Migration>,
) -> Result<Vec<u32>, clickhouse::error::Error> {
    apply(settings, table, migrations, None)
        .await
        .map_err(|(_, error)| error)
}

/// [`migrate`], running again every migration from version `rerun_from` on,
/// recorded or not. Replicas starting together on a fresh database run the
/// same migrations at once: one can recreate what another's later migration
/// just dropped (or fail because it was dropped), so a process that runs
/// any migration runs every later one too, and one whose statement failed
/// runs again from that migration (every statement is idempotent). On
/// error, the version it was applying.
async fn apply(
    settings: &ClickHouseSettings,
    table: &str,
    migrations: fn(&ddl::Target) -> Vec<ddl::Migration>,
    rerun_from: Option<u32>,
) -> Result<Vec<u32>, (Option<u32>, clickhouse::error::Error)> {
    let target = ddl::Target::new(&settings.database, settings.cluster.as_deref())
        .map_err(|e| (None, clickhouse::error::Error::Custom(e)))?;
    let client = client(settings, false);
    let setup = async {
        client.query(&target.create_database()).execute().await?;
        client
            .query(&target.create_migrations_table(table))
            .execute()
            .await?;
        client
            .query(&format!(
                "SELECT DISTINCT version FROM {}",
                target.table(table)
            ))
            .fetch_all::<u32>()
            .await
    };
    let applied = setup.await.map_err(|e| (None, e))?;
    let mut done = Vec::new();
    let mut running = false;
    for migration in migrations(&target) {
        running |= !applied.contains(&migration.version)
            || rerun_from.is_some_and(|from| migration.version >= from);
        if !running {
            continue;
        }
        let failed = |e| (Some(migration.version), e);
        for statement in &migration.statements {
            client.query(statement).execute().await.map_err(failed)?;
        }
        for column in &migration.columns {
            let present: u64 = client
                .query("SELECT count() FROM system.columns WHERE database = ? AND table = ? AND name = ?")
                .bind(target.database_name())
                .bind(column.table)
                .bind(&column.name)
                .fetch_one()
                .await
                .map_err(failed)?;
            if present == 0 {
                // A replica adding it at the same moment makes this fail:
                // the migration runs again and finds it.
                client
                    .query(&target.add_column(column))
                    .execute()
                    .await
                    .map_err(failed)?;
            }
        }
        if !applied.contains(&migration.version) {
            client
                .query(&format!(
                    "INSERT INTO {} (version, name, applied_at) SELECT ?, ?, now()",
                    target.table(table)
                ))
                .bind(migration.version)
                .bind(migration.name)
                .execute()
                .await
                .map_err(failed)?;
        }
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "ClickHouse migration applied."
        );
        done.push(migration.version);
    }
    Ok(done)
}

/// How often a migration that ClickHouse refused is run again before the
/// process gives up: enough for replicas racing on a fresh database.
const MIGRATION_ATTEMPTS: u32 = 5;

/// [`migrate`], waiting with backoff while ClickHouse is unreachable, until
/// `shutdown`.
pub async fn migrate_when_reachable(
    settings: &ClickHouseSettings,
    table: &str,
    migrations: fn(&ddl::Target) -> Vec<ddl::Migration>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    let (mut rerun_from, mut refused) = (None, 0);
    loop {
        match apply(settings, table, migrations, rerun_from).await {
            Ok(_) => return Ok(()),
            Err((
                _,
                error @ (clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut),
            )) => {
                tracing::warn!(url = %settings.url, %error, retry_in = ?delay, "ClickHouse unreachable; retrying the migrations.");
            }
            Err((Some(version), error)) if refused + 1 < MIGRATION_ATTEMPTS => {
                refused += 1;
                rerun_from = Some(rerun_from.map_or(version, |from: u32| from.min(version)));
                tracing::warn!(%error, version, retry_in = ?delay, "A migration failed (another replica may be migrating too); running it and every later one again.");
            }
            Err((_, error)) => anyhow::bail!(
                "applying the ClickHouse migrations to {} database {}: {error}",
                settings.url,
                settings.database
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => anyhow::bail!("stopped before ClickHouse at {} answered", settings.url),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A projection chosen with `--handler NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    EventsStore,
    OrderStatus,
}

struct EventTables {
    users: Table<UserRow>,
    orders: Table<OrderRow>,
    chat: Table<ChatRow>,
    search: Table<SearchRow>,
}

/// The projections as one handler, sharing the insert pacing.
pub struct Projections {
    events: Option<EventTables>,
    order_status: Option<Table<OrderStatusRow>>,
}

impl std::fmt::Debug for Projections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projections")
            .field("events_store", &self.events.is_some())
            .field("order_status", &self.order_status.is_some())
            .finish()
    }
}

/// What a row is reckoned to weigh for `clickhouse.insert_max_bytes`.
const ROW_BYTES: usize = 256;

impl Projections {
    /// Migrates (see [`migrate_when_reachable`]) and starts a writer per table.
    /// `concurrency` is the runtime's and `metrics` its live counts: when as
    /// many batches wait as could arrive, the tables flush at once.
    pub async fn start(
        settings: &ClickHouseSettings,
        which: &[Projection],
        concurrency: usize,
        metrics: Arc<Metrics>,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Self> {
        migrate_when_reachable(settings, ddl::MIGRATIONS_TABLE, ddl::migrations, shutdown).await?;
        let client = client(settings, true);
        let limits = Limits {
            period: Duration::from_millis(settings.insert_period_ms),
            max_rows: settings.insert_max_rows,
            max_bytes: settings.insert_max_bytes,
            timeout: Duration::from_millis(settings.timeout_ms),
        };
        let pacer = Pacer::new(concurrency, metrics);
        let events = which
            .contains(&Projection::EventsStore)
            .then(|| EventTables {
                users: Table::start(client.clone(), "user_events", true, limits, pacer.clone()),
                orders: Table::start(client.clone(), "order_events", true, limits, pacer.clone()),
                chat: Table::start(client.clone(), "chat_messages", true, limits, pacer.clone()),
                search: Table::start(
                    client.clone(),
                    "search_queries",
                    true,
                    limits,
                    pacer.clone(),
                ),
            });
        let order_status = which
            .contains(&Projection::OrderStatus)
            .then(|| Table::start(client.clone(), "order_status", false, limits, pacer.clone()));
        Ok(Self {
            events,
            order_status,
        })
    }
}

/// Rows for one table with the batch index each came from.
struct Pending<T> {
    indices: Vec<usize>,
    rows: Vec<(Option<Position>, T)>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self {
            indices: Vec::new(),
            rows: Vec::new(),
        }
    }
}

impl<T: clickhouse::RowOwned + clickhouse::RowWrite + serde::Serialize + Send + Sync + 'static>
    Pending<T>
{
    fn push(&mut self, index: usize, position: Option<Position>, row: T) {
        self.indices.push(index);
        self.rows.push((position, row));
    }

    /// Stores the rows and writes each record's outcome.
    async fn store(self, table: &Table<T>) -> Vec<(usize, Outcome)> {
        let bytes = self.rows.len() * ROW_BYTES;
        let results: RowResults = match table.store(self.rows, bytes).await {
            Ok(results) => results,
            Err(stopped) => {
                return self
                    .indices
                    .into_iter()
                    .map(|i| (i, Outcome::retry(stopped.to_string())))
                    .collect()
            }
        };
        self.indices
            .into_iter()
            .zip(results)
            .filter_map(|(i, result)| {
                result.err().map(|malformed| {
                    (
                        i,
                        Outcome::fatal("malformed_row", format!("{}: {malformed}", table.name())),
                    )
                })
            })
            .collect()
    }
}

fn position(record: &Record) -> Position {
    Position {
        kafka_topic: record.topic.to_string(),
        kafka_partition: record.partition,
        kafka_offset: record.offset,
    }
}

impl Handler for Projections {
    fn name(&self) -> &str {
        "projections"
    }

    async fn handle(&self, batch: &[Record]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Done; batch.len()];
        let now = u32::try_from(now_ms() / 1000).unwrap_or(u32::MAX);
        let (mut users, mut orders, mut chat, mut search) = (
            Pending::default(),
            Pending::default(),
            Pending::default(),
            Pending::default(),
        );
        let mut statuses = Pending::default();
        for (i, record) in batch.iter().enumerate() {
            if self.events.is_some() {
                match EventRow::from_record(record, now) {
                    Ok(EventRow::User(row)) => users.push(i, Some(position(record)), row),
                    Ok(EventRow::Order(row)) => orders.push(i, Some(position(record)), row),
                    Ok(EventRow::Chat(row)) => chat.push(i, Some(position(record)), row),
                    Ok(EventRow::Search(row)) => search.push(i, Some(position(record)), row),
                    Err(malformed) => {
                        outcomes[i] = Outcome::fatal("malformed_row", malformed.to_string());
                        continue;
                    }
                }
            }
            if let (Some(_), AnyEvent::Order(order)) = (&self.order_status, &record.event) {
                match OrderStatusRow::from_event(order) {
                    Ok(row) => statuses.push(i, None, row),
                    Err(malformed) => {
                        outcomes[i] = Outcome::fatal("malformed_row", malformed.to_string())
                    }
                }
            }
        }
        let mut refused = Vec::new();
        if let Some(tables) = &self.events {
            let (a, b, c, d) = tokio::join!(
                users.store(&tables.users),
                orders.store(&tables.orders),
                chat.store(&tables.chat),
                search.store(&tables.search)
            );
            refused.extend(a.into_iter().chain(b).chain(c).chain(d));
        }
        if let Some(table) = &self.order_status {
            refused.extend(statuses.store(table).await);
        }
        for (i, outcome) in refused {
            if !matches!(outcomes[i], Outcome::Fatal { .. }) {
                outcomes[i] = outcome;
            }
        }
        outcomes
    }
}
