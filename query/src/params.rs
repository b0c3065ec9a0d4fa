//! Query parameters: parsed strictly (an unknown or repeated parameter is an
//! error naming it), with defaults and caps, before any of them nears SQL.

use std::time::UNIX_EPOCH;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Range when `from` is not given: the hour before `to`.
const DEFAULT_RANGE_S: u32 = 3_600;
/// Longest range at minute granularity: two days is 2,880 windows per key.
const MAX_MINUTE_RANGE_S: u32 = 2 * 86_400;
/// Longest range at hour granularity, and of ranges that are not series.
const MAX_RANGE_S: u32 = 400 * 86_400;
/// Rows in a top-N answer unless `limit` says otherwise, and at most.
pub const DEFAULT_LIMIT: u32 = 10;
pub const MAX_LIMIT: u32 = 100;
/// Longest order id looked up; order ids are UUIDs.
pub const MAX_ORDER_ID_LEN: usize = 128;
/// Longest category, currency, country or platform filter.
const MAX_FILTER_LEN: usize = 256;

/// Parses the query string into `T`, refusing unknown and repeated
/// parameters and naming the parameter a bad value was given for.
pub fn parse<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    let query = query.unwrap_or("");
    let deserializer =
        serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let parameter = error.path().to_string();
        let inner = error.into_inner().to_string();
        // serde names unknown and repeated parameters itself; a bad value's
        // message does not say which parameter held it.
        if parameter == "." {
            ApiError::bad_request(None, format!("bad query string: {inner}"))
        } else {
            ApiError::bad_request(Some(&parameter), format!("{parameter}: {inner}"))
        }
    })
}

/// The window length of a series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    #[default]
    Minute,
    Hour,
}

impl Granularity {
    /// The window start, in epoch seconds, of a partials row.
    pub fn bucket(self) -> &'static str {
        match self {
            Self::Minute => "toUInt32(window_start)",
            Self::Hour => "toUInt32(toStartOfHour(window_start))",
        }
    }

    /// `from` and `to` as given, checked against this granularity's longest
    /// range.
    pub fn range(self, from: Option<&str>, to: Option<&str>) -> Result<TimeRange, ApiError> {
        let max_s = match self {
            Self::Minute => MAX_MINUTE_RANGE_S,
            Self::Hour => MAX_RANGE_S,
        };
        TimeRange::parse(from, to, max_s)
    }
}

/// A half-open range of window starts, `[from, to)`, in epoch seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub from: u32,
    pub to: u32,
}

impl TimeRange {
    /// Validates `from` and `to` as given (epoch seconds or RFC 3339; `to`
    /// defaults to now, `from` to an hour before `to`) against `max_s`.
    pub fn parse(from: Option<&str>, to: Option<&str>, max_s: u32) -> Result<Self, ApiError> {
        let to = match to {
            Some(text) => instant("to", text)?,
            None => pipelines::hours::epoch_seconds(),
        };
        let from = match from {
            Some(text) => instant("from", text)?,
            None => to.saturating_sub(DEFAULT_RANGE_S),
        };
        if from >= to {
            return Err(ApiError::bad_request(
                Some("from"),
                format!("from ({from}) must be before to ({to}): the range is empty or reversed"),
            ));
        }
        if to - from > max_s {
            return Err(ApiError::bad_request(
                Some("from"),
                format!(
                    "the range is {} s long; at most {max_s} s ({} days) here",
                    to - from,
                    max_s / 86_400
                ),
            ));
        }
        Ok(Self { from, to })
    }
}

/// Latest time accepted: 2100-01-01, well inside ClickHouse's DateTime
/// (which ends in 2106) with room for whole-hour arithmetic.
const LATEST_S: u32 = 4_102_444_800;

/// Epoch seconds, or an RFC 3339 time such as `2026-11-30T12:00:00Z`.
fn instant(parameter: &str, text: &str) -> Result<u32, ApiError> {
    let bad = |why: &str| {
        ApiError::bad_request(
            Some(parameter),
            format!(
                "{parameter}: {text:?} {why}; give epoch seconds or an RFC 3339 time such as 2026-11-30T12:00:00Z"
            ),
        )
    };
    let seconds = match text.parse::<i64>() {
        Ok(seconds) => seconds,
        Err(_) => {
            let time = humantime::parse_rfc3339_weak(text).map_err(|_| bad("is not a time"))?;
            let since = time
                .duration_since(UNIX_EPOCH)
                .map_err(|_| bad("is out of range (1970 to 2100)"))?;
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        }
    };
    u32::try_from(seconds)
        .ok()
        .filter(|s| *s <= LATEST_S)
        .ok_or_else(|| bad("is out of range (1970 to 2100)"))
}

/// A filter value: bound as a parameter, but bounded in length too.
pub fn filter(parameter: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.len() > MAX_FILTER_LEN => Err(ApiError::bad_request(
            Some(parameter),
            format!(
                "{parameter}: at most {MAX_FILTER_LEN} bytes, got {}",
                v.len()
            ),
        )),
        other => Ok(other),
    }
}

/// `limit`, defaulted and capped.
pub fn limit(value: Option<u32>) -> Result<u32, ApiError> {
    match value.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::bad_request(
            Some("limit"),
            "limit: must be at least 1".into(),
        )),
        n if n > MAX_LIMIT => Err(ApiError::bad_request(
            Some("limit"),
            format!("limit: at most {MAX_LIMIT}, got {n}"),
        )),
        n => Ok(n),
    }
}

/// `from` and `to` of a series.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SeriesParams {
    /// Start of the range (inclusive): epoch seconds or RFC 3339. Default: an hour before `to`.
    pub from: Option<String>,
    /// End of the range (exclusive): epoch seconds or RFC 3339. Default: now.
    pub to: Option<String>,
    /// `minute` (ranges up to 2 days) or `hour` (up to 400 days). Default: minute.
    #[serde(default)]
    pub granularity: Granularity,
}

impl SeriesParams {
    pub fn range(&self) -> Result<TimeRange, ApiError> {
        self.granularity
            .range(self.from.as_deref(), self.to.as_deref())
    }
}

/// `GET /api/v1/revenue`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevenueParams {
    /// Start of the range (inclusive): epoch seconds or RFC 3339. Default: an hour before `to`.
    pub from: Option<String>,
    /// End of the range (exclusive): epoch seconds or RFC 3339. Default: now.
    pub to: Option<String>,
    /// `minute` (ranges up to 2 days) or `hour` (up to 400 days). Default: minute.
    #[serde(default)]
    pub granularity: Granularity,
    /// Only this category.
    pub category: Option<String>,
    /// Only this currency (ISO 4217, such as EUR).
    pub currency: Option<String>,
    /// `category` (a point per window, category and currency) or `none`
    /// (a point per window and currency, all categories added up). Default: category.
    #[serde(default)]
    pub group_by: RevenueGrouping,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevenueGrouping {
    #[default]
    Category,
    None,
}

/// `GET /api/v1/active-users`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsersParams {
    /// Start of the range (inclusive): epoch seconds or RFC 3339. Default: an hour before `to`.
    pub from: Option<String>,
    /// End of the range (exclusive): epoch seconds or RFC 3339. Default: now.
    pub to: Option<String>,
    /// `minute` (ranges up to 2 days) or `hour` (up to 400 days). Default: minute.
    #[serde(default)]
    pub granularity: Granularity,
    /// Only users seen in this country (ISO 3166 code, such as DE).
    pub country: Option<String>,
    /// Only users on this platform (web, ios, android).
    pub platform: Option<String>,
}

/// A range and no series: the funnel.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RangeParams {
    /// Start of the range (inclusive): epoch seconds or RFC 3339. Default: an hour before `to`.
    pub from: Option<String>,
    /// End of the range (exclusive): epoch seconds or RFC 3339. Default: now.
    pub to: Option<String>,
}

impl RangeParams {
    pub fn range(&self) -> Result<TimeRange, ApiError> {
        TimeRange::parse(self.from.as_deref(), self.to.as_deref(), MAX_RANGE_S)
    }
}

/// A range and a top-N.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopParams {
    /// Start of the range (inclusive): epoch seconds or RFC 3339. Default: an hour before `to`.
    pub from: Option<String>,
    /// End of the range (exclusive): epoch seconds or RFC 3339. Default: now.
    pub to: Option<String>,
    /// Rows to return, 1 to 100. Default: 10.
    #[schemars(range(min = 1, max = 100))]
    pub limit: Option<u32>,
}

impl TopParams {
    /// The range and the limit.
    pub fn resolve(&self) -> Result<(TimeRange, u32), ApiError> {
        let range = TimeRange::parse(self.from.as_deref(), self.to.as_deref(), MAX_RANGE_S)?;
        Ok((range, limit(self.limit)?))
    }
}

/// No parameters.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(error: ApiError) -> String {
        error.message
    }

    #[test]
    fn times_parse_as_epoch_seconds_or_rfc_3339() {
        let range = TimeRange::parse(
            Some("1795990000"),
            Some("2026-11-30T00:00:00Z"),
            MAX_RANGE_S,
        )
        .expect("valid");
        assert_eq!(range.from, 1_795_990_000);
        assert_eq!(range.to, 1_795_996_800);
        let defaulted = TimeRange::parse(None, Some("1795996800"), MAX_RANGE_S).expect("valid");
        assert_eq!(defaulted.from, 1_795_996_800 - 3_600);
    }

    #[test]
    fn bad_ranges_are_refused_with_the_reason() {
        let reversed =
            TimeRange::parse(Some("200"), Some("100"), MAX_RANGE_S).expect_err("reversed");
        assert!(message(reversed).contains("empty or reversed"));
        let garbage = TimeRange::parse(Some("yesterday"), None, MAX_RANGE_S).expect_err("garbage");
        assert!(message(garbage).contains("from: \"yesterday\" is not a time"));
        let long =
            TimeRange::parse(Some("0"), Some("1000000"), MAX_MINUTE_RANGE_S).expect_err("long");
        assert!(message(long).contains("at most 172800 s (2 days)"));
        let negative = TimeRange::parse(Some("-5"), None, MAX_RANGE_S).expect_err("negative");
        assert!(message(negative).contains("out of range"));
        let late =
            TimeRange::parse(None, Some("2106-01-01T00:00:00Z"), MAX_RANGE_S).expect_err("late");
        assert!(message(late).contains("out of range (1970 to 2100)"));
    }

    #[test]
    fn unknown_repeated_and_mistyped_parameters_are_named() {
        let unknown = parse::<TopParams>(Some("form=1")).expect_err("unknown");
        assert!(
            unknown.message.contains("unknown field `form`"),
            "{}",
            unknown.message
        );
        assert!(unknown.message.contains("`from`"), "{}", unknown.message);
        let repeated = parse::<TopParams>(Some("limit=1&limit=2")).expect_err("repeated");
        assert!(
            repeated.message.contains("duplicate field `limit`"),
            "{}",
            repeated.message
        );
        let mistyped = parse::<TopParams>(Some("limit=ten")).expect_err("mistyped");
        assert_eq!(mistyped.parameter.as_deref(), Some("limit"));
        let variant = parse::<SeriesParams>(Some("granularity=day")).expect_err("variant");
        assert!(variant.message.contains("`minute`"), "{}", variant.message);
        assert_eq!(
            limit(Some(101)).expect_err("cap").message,
            "limit: at most 100, got 101"
        );
        assert_eq!(limit(None).expect("default"), DEFAULT_LIMIT);
    }
}
