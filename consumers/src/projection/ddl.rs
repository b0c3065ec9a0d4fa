//! The read-model DDL as versioned, idempotent migrations. Every statement is
//! `IF NOT EXISTS` and a column is added only where the table lacks it, so a
//! migration cut short by a crash is simply run again; `schema_migrations`
//! records what is done. The SQL works from ClickHouse
//! 18.16 (no TTL, LowCardinality, DateTime64 or Map) to current releases.

use backbone::sql::quote_identifier;

/// Where and how the tables are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Quoted database name.
    database: String,
    /// Unquoted database name, for ZooKeeper paths.
    database_name: String,
    /// Quoted cluster name, for `ON CLUSTER` and Replicated engines.
    cluster: Option<String>,
}

impl Target {
    pub fn new(database: &str, cluster: Option<&str>) -> Result<Self, String> {
        Ok(Self {
            database: quote_identifier(database)?,
            database_name: database.to_owned(),
            cluster: cluster.map(quote_identifier).transpose()?,
        })
    }

    /// `db`.`table`, for a table name from this module.
    pub fn table(&self, table: &str) -> String {
        format!("{}.`{table}`", self.database)
    }

    /// Whether the tables live on a cluster (Replicated engines).
    pub fn clustered(&self) -> bool {
        self.cluster.is_some()
    }

    pub fn on_cluster(&self) -> String {
        self.cluster
            .as_ref()
            .map_or_else(String::new, |c| format!(" ON CLUSTER {c}"))
    }

    /// `engine` (e.g. `ReplacingMergeTree(version)`), replicated on a cluster.
    pub fn engine(&self, table: &str, engine: &str) -> String {
        if self.cluster.is_none() {
            return engine.to_owned();
        }
        let (name, args) = engine.split_once('(').unwrap_or((engine, ")"));
        let path = format!(
            "'/clickhouse/tables/{{shard}}/{}/{table}', '{{replica}}'",
            self.database_name
        );
        let args = args.trim_end_matches(')');
        if args.is_empty() {
            format!("Replicated{name}({path})")
        } else {
            format!("Replicated{name}({path}, {args})")
        }
    }

    pub fn create_database(&self) -> String {
        format!(
            "CREATE DATABASE IF NOT EXISTS {}{}",
            self.database,
            self.on_cluster()
        )
    }

    /// Its unquoted name, as `system` tables name it.
    pub fn database_name(&self) -> &str {
        &self.database_name
    }

    /// `ALTER TABLE ... ADD COLUMN` of `column`; not idempotent (18.16 has no
    /// `IF NOT EXISTS` there): run only where `system.columns` lacks it.
    pub fn add_column(&self, column: &AddedColumn) -> String {
        format!(
            "ALTER TABLE {}{} ADD COLUMN {} {}",
            self.table(column.table),
            self.on_cluster(),
            column.name,
            column.definition
        )
    }

    pub fn create_table(&self, table: &str, columns: &str, engine: &str, order_by: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {}{} ({columns}) ENGINE = {} ORDER BY {order_by}",
            self.table(table),
            self.on_cluster(),
            self.engine(table, engine)
        )
    }

    /// The table recording one component's applied migrations.
    pub fn create_migrations_table(&self, table: &str) -> String {
        self.create_table(
            table,
            "version UInt32, name String, applied_at DateTime",
            "ReplacingMergeTree()",
            "version",
        )
    }
}

/// The projections' migrations table; other components keep their own.
pub const MIGRATIONS_TABLE: &str = "schema_migrations";

/// The Kafka position stored with every event row: replays are recognised by
/// it (see `sink`), and it is the table's sorting key, so looking it up is cheap.
const POSITION_COLUMNS: &str =
    "kafka_topic String, kafka_partition Int32, kafka_offset Int64, ingested_at DateTime";
const POSITION_KEY: &str = "(kafka_topic, kafka_partition, kafka_offset)";

/// One migration: a version, a name, its statements and then the columns
/// it adds to tables that exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: Vec<String>,
    /// Each added where the table lacks it, so the migration can run again.
    pub columns: Vec<AddedColumn>,
}

/// A column a migration adds to a table it created before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedColumn {
    pub table: &'static str,
    pub name: String,
    /// Its type and any `DEFAULT`/`MATERIALIZED` expression.
    pub definition: String,
}

/// Every migration in order. Never edit one that has shipped: add the next.
pub fn migrations(target: &Target) -> Vec<Migration> {
    let events = |table: &str, columns: &str| {
        // No PARTITION BY: one insert is then one part, so it is atomic.
        target.create_table(
            table,
            &format!("{columns}, {POSITION_COLUMNS}"),
            "ReplacingMergeTree()",
            POSITION_KEY,
        )
    };
    vec![
        Migration {
            version: 1,
            name: "event tables",
            statements: vec![
                events(
                    "user_events",
                    "event_id String, occurred_at DateTime, occurred_at_ms Int64, kind String, \
                     user_id String, session_id String, country String, platform String, \
                     page Nullable(String)",
                ),
                events(
                    "order_events",
                    "event_id String, occurred_at DateTime, occurred_at_ms Int64, status String, \
                     order_id String, user_id String, session_id Nullable(String), \
                     item_skus Array(String), item_categories Array(String), \
                     item_quantities Array(Int32), item_unit_prices_minor Array(Int64), \
                     currency String, total_minor Int64",
                ),
                events(
                    "chat_messages",
                    "event_id String, occurred_at DateTime, occurred_at_ms Int64, room_id String, \
                     user_id String, text String, flagged UInt8",
                ),
                events(
                    "search_queries",
                    "event_id String, occurred_at DateTime, occurred_at_ms Int64, user_id String, \
                     session_id String, query String, filter_keys Array(String), \
                     filter_values Array(String), results_count Int32, \
                     clicked_sku Nullable(String), latency_ms Int32",
                ),
            ],
            columns: Vec::new(),
        },
        Migration {
            version: 2,
            name: "order status",
            statements: vec![
                // The row with the highest version wins: event time, then the
                // lifecycle rank, so late and repeated events change nothing.
                target.create_table(
                    "order_status",
                    "order_id String, user_id String, status String, currency String, \
                     total_minor Int64, items_count UInt32, updated_at DateTime, \
                     updated_at_ms Int64, version UInt64",
                    "ReplacingMergeTree(version)",
                    "order_id",
                ),
                format!(
                    "CREATE VIEW IF NOT EXISTS {}{} AS SELECT * FROM {} FINAL",
                    target.table("order_status_current"),
                    target.on_cluster(),
                    target.table("order_status")
                ),
            ],
            columns: Vec::new(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_server_ddl_is_plain() {
        let target = Target::new("shop", None).unwrap();
        assert_eq!(
            target.create_database(),
            "CREATE DATABASE IF NOT EXISTS `shop`"
        );
        let all = migrations(&target);
        assert_eq!(
            all.iter().map(|m| m.version).collect::<Vec<_>>(),
            [1, 2],
            "versions ascend"
        );
        let orders = &all[0].statements[1];
        assert!(
            orders
                .starts_with("CREATE TABLE IF NOT EXISTS `shop`.`order_events` (event_id String,"),
            "{orders}"
        );
        assert!(orders.ends_with("ENGINE = ReplacingMergeTree() ORDER BY (kafka_topic, kafka_partition, kafka_offset)"), "{orders}");
        assert!(!orders.contains("PARTITION BY"));
        assert!(all[1].statements[0]
            .ends_with("ENGINE = ReplacingMergeTree(version) ORDER BY order_id"));
    }

    #[test]
    fn cluster_ddl_runs_on_cluster_with_replicated_engines() {
        let target = Target::new("shop", Some("prod")).unwrap();
        assert_eq!(
            target.create_database(),
            "CREATE DATABASE IF NOT EXISTS `shop` ON CLUSTER `prod`"
        );
        let all = migrations(&target);
        assert!(all[0].statements[0]
            .starts_with("CREATE TABLE IF NOT EXISTS `shop`.`user_events` ON CLUSTER `prod` ("));
        assert!(all[0].statements[0].ends_with(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/shop/user_events', '{replica}') ORDER BY (kafka_topic, kafka_partition, kafka_offset)"
        ));
        assert!(all[1].statements[0].contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/shop/order_status', '{replica}', version) ORDER BY order_id"
        ));
        assert!(all[1].statements[1].starts_with(
            "CREATE VIEW IF NOT EXISTS `shop`.`order_status_current` ON CLUSTER `prod` AS SELECT"
        ));
        assert!(target.create_migrations_table(MIGRATIONS_TABLE).contains("ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/shop/schema_migrations', '{replica}')"));
        // An added column: on the cluster; looked for by the database's own
        // name.
        let column = AddedColumn {
            table: "order_status",
            name: "note".into(),
            definition: "String DEFAULT ''".into(),
        };
        assert_eq!(
            target.add_column(&column),
            "ALTER TABLE `shop`.`order_status` ON CLUSTER `prod` ADD COLUMN note String DEFAULT ''"
        );
        assert_eq!(target.database_name(), "shop");
    }

    #[test]
    fn hostile_names_are_refused() {
        assert!(Target::new("x; DROP DATABASE y", None).is_err());
        assert!(Target::new("shop", Some("c`--")).is_err());
    }
}
