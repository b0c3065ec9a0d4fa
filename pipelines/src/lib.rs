//! shopstream-analytics: event-time windowed aggregates into ClickHouse read
//! models. The job arrives with its own issue; this crate holds the
//! workspace's place for it.
