//! shopstream-analytics: event-time windowed aggregates into ClickHouse read
//! models. `aggregate` holds the windows and partials, `job` the consumer
//! loop, `store` and `ddl` the ClickHouse side, `report` the human view.

pub mod aggregate;
pub mod ddl;
pub mod hours;
pub mod job;
pub mod report;
pub mod store;
