//! shopstream-worker: the consumer-group runtime (batch, retry, dead-letter,
//! commit, drain) and its ClickHouse projections. The runtime arrives with its
//! own issue; this crate holds the workspace's place for it.
