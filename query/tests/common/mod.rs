//! A query service over seeded read models in a fresh ClickHouse database.

#![allow(dead_code)]

use std::net::SocketAddr;

use backbone::config::{ClickHouseSettings, Config, QuerySettings};
use backbone::shutdown::Shutdown;
use query::seed::Seed;
use shopstream_tests::TestDatabase;

/// 2026-11-29T14:00:00Z: whole hours, in the past.
pub const START: u32 = 1_795_960_800;

/// Three hours of data for 5 categories and 20 rooms, over 2 partitions.
pub const SMALL: Seed = Seed {
    start: START,
    minutes: 180,
    categories: 5,
    rooms: 20,
    partitions: 2,
    orders: 50,
    flushes: 1,
};

#[derive(Debug)]
pub struct Service {
    pub base: String,
    pub database: TestDatabase,
    pub shutdown: Shutdown,
    pub http: reqwest::Client,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn config(clickhouse_url: &str, database: &str) -> Config {
    Config {
        clickhouse: ClickHouseSettings {
            url: clickhouse_url.to_owned(),
            database: database.to_owned(),
            ..ClickHouseSettings::default()
        },
        query: QuerySettings {
            listen_address: "127.0.0.1:0".into(),
            ..QuerySettings::default()
        },
        ..Config::default()
    }
}

/// Starts the service in-process on `config`; returns its base URL.
pub async fn serve(config: Config) -> (String, Shutdown) {
    let shutdown = Shutdown::new();
    let (bound, address) = tokio::sync::oneshot::channel::<SocketAddr>();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        query::run(&config, stop, move |a| {
            let _ = bound.send(a);
        })
        .await
        .expect("the query service runs");
    });
    let address = address.await.expect("the service binds");
    (format!("http://{address}"), shutdown)
}

/// A fresh database with `seed` written, and the service over it.
pub async fn seeded(seed: Seed) -> Service {
    seeded_with(seed, |_| ()).await
}

/// As [`seeded`], with the service's settings changed by `change`.
pub async fn seeded_with(seed: Seed, change: impl FnOnce(&mut QuerySettings)) -> Service {
    let clickhouse = shopstream_tests::clickhouse().await;
    let database = clickhouse.database().await.expect("test database");
    let mut config = config(clickhouse.url(), &database.name);
    change(&mut config.query);
    seed.write(&config.clickhouse, |_| ())
        .await
        .expect("seeding the read models");
    let (base, shutdown) = serve(config).await;
    Service {
        base,
        database,
        shutdown,
        http: reqwest::Client::new(),
    }
}

/// (`name`, `count`) of each entry of the answer's `list`.
pub fn named_counts(
    answer: &serde_json::Value,
    list: &str,
    name: &str,
    count: &str,
) -> Vec<(String, i64)> {
    answer[list]
        .as_array()
        .expect("a list")
        .iter()
        .map(|entry| {
            (
                entry[name].as_str().expect("a name").to_owned(),
                entry[count].as_i64().expect("a count"),
            )
        })
        .collect()
}

/// (room, messages, distinct chatters) of a busiest rooms answer.
pub fn rooms(answer: &serde_json::Value) -> Vec<(String, i64, i64)> {
    named_two_counts(answer, "rooms", "room_id", "messages", "unique_chatters")
}

/// (query, zero results, searches) of a top zero-result searches answer.
pub fn zero_result_queries(answer: &serde_json::Value) -> Vec<(String, i64, i64)> {
    named_two_counts(answer, "queries", "query", "zero_results", "searches")
}

/// (`name`, `first`, `second`) of each entry of the answer's `list`.
fn named_two_counts(
    answer: &serde_json::Value,
    list: &str,
    name: &str,
    first: &str,
    second: &str,
) -> Vec<(String, i64, i64)> {
    named_counts(answer, list, name, first)
        .into_iter()
        .zip(named_counts(answer, list, name, second))
        .map(|((name, first), (_, second))| (name, first, second))
        .collect()
}

/// (status, headers, body) of a GET.
pub async fn get(http: &reqwest::Client, url: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let response = http.get(url).send().await.expect("the service answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.expect("a body"))
}

impl Service {
    pub async fn get(&self, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
        get(&self.http, &format!("{}{path}", self.base)).await
    }

    /// The JSON of a GET that must succeed.
    pub async fn json(&self, path: &str) -> serde_json::Value {
        let (status, _, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }
}
