//! The endpoint table the router is built from, and the OpenAPI document
//! generated from the same table and from the very types the handlers parse
//! and answer with, so the two cannot drift apart.

use axum::routing::{get, MethodRouter};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::error::ErrorBody;
use crate::params::{NoParams, RangeParams, RevenueParams, SeriesParams, TopParams, UsersParams};
use crate::store::OrderStatus;
use crate::{api, App};

pub const PREFIX: &str = "/api/v1";

/// One `GET` endpoint of the API.
pub struct Endpoint {
    /// Under [`PREFIX`], with `{name}` path parameters (axum's syntax and
    /// OpenAPI's).
    pub path: &'static str,
    pub operation_id: &'static str,
    pub summary: &'static str,
    pub handler: fn() -> MethodRouter<App>,
    pub query: fn(&mut SchemaGenerator) -> Value,
    pub answer: fn(&mut SchemaGenerator) -> Value,
    /// (name, description) of path parameters, all strings.
    pub path_params: &'static [(&'static str, &'static str)],
    /// Whether the endpoint answers 404 for an id it does not know.
    pub may_not_find: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path)
    }
}

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Value {
    let mut value = generator.root_schema_for::<T>().to_value();
    if let Some(object) = value.as_object_mut() {
        object.remove("$schema");
    }
    value
}

pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        path: "/revenue",
        operation_id: "revenue",
        summary: "Orders and revenue by category over time, per minute or hour.",
        handler: || get(api::revenue),
        query: schema::<RevenueParams>,
        answer: schema::<api::Revenue>,
        path_params: &[],
        may_not_find: false,
    },
    Endpoint {
        path: "/funnel",
        operation_id: "funnel",
        summary: "The order funnel over a range, with stage-to-stage conversion rates.",
        handler: || get(api::funnel),
        query: schema::<RangeParams>,
        answer: schema::<api::Funnel>,
        path_params: &[],
        may_not_find: false,
    },
    Endpoint {
        path: "/orders/{order_id}",
        operation_id: "order",
        summary: "One order's current status, from the order-status projection.",
        handler: || get(api::order),
        query: schema::<NoParams>,
        answer: schema::<OrderStatus>,
        path_params: &[("order_id", "The order's id (1 to 128 bytes).")],
        may_not_find: true,
    },
    Endpoint {
        path: "/active-users",
        operation_id: "active_users",
        summary: "Distinct active users, sign-ups and sessions per minute or hour.",
        handler: || get(api::active_users),
        query: schema::<UsersParams>,
        answer: schema::<api::ActiveUsers>,
        path_params: &[],
        may_not_find: false,
    },
    Endpoint {
        path: "/chat-rooms/busiest",
        operation_id: "busiest_rooms",
        summary: "The chat rooms with the most messages over a range.",
        handler: || get(api::busiest_rooms),
        query: schema::<TopParams>,
        answer: schema::<api::BusiestRooms>,
        path_params: &[],
        may_not_find: false,
    },
    Endpoint {
        path: "/searches/top",
        operation_id: "top_searches",
        summary: "The most searched queries over a range.",
        handler: || get(api::top_searches),
        query: schema::<TopParams>,
        answer: schema::<api::TopSearches>,
        path_params: &[],
        may_not_find: false,
    },
    Endpoint {
        path: "/searches/zero-results/top",
        operation_id: "top_zero_result_searches",
        summary: "The queries that most often found nothing over a range, with how often they were searched.",
        handler: || get(api::top_zero_result_searches),
        query: schema::<TopParams>,
        answer: schema::<api::TopZeroResultSearches>,
        path_params: &[],
        may_not_find: false,
    },
    Endpoint {
        path: "/searches",
        operation_id: "searches",
        summary: "Searches, zero-result searches and latency per minute or hour.",
        handler: || get(api::searches),
        query: schema::<SeriesParams>,
        answer: schema::<api::Searches>,
        path_params: &[],
        may_not_find: false,
    },
];

/// Query parameters from a params struct's schema: one per property,
/// optional unless the schema requires it, nullability dropped (a query
/// string has no null).
fn query_parameters(params: &Value) -> Vec<Value> {
    let required: Vec<&str> = params["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = params["properties"].as_object() else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, property)| {
            let mut property = property.clone();
            let description = property
                .as_object_mut()
                .and_then(|p| p.remove("description"))
                .unwrap_or(Value::Null);
            if let Some(types) = property.get_mut("type").and_then(Value::as_array_mut) {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let single = types[0].clone();
                    property["type"] = single;
                }
            }
            json!({
                "name": name,
                "in": "query",
                "required": required.contains(&name.as_str()),
                "description": description,
                "schema": property,
            })
        })
        .collect()
}

fn error_response(generator: &mut SchemaGenerator, description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema::<ErrorBody>(generator)}},
    })
}

/// The OpenAPI 3.1 document of [`ENDPOINTS`]; with `auth`, every
/// operation needs a bearer token
/// (`query.auth.tokens_file`) and may answer 401.
pub fn document(auth: bool) -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let mut paths = Map::new();
    for endpoint in ENDPOINTS {
        let mut parameters: Vec<Value> = endpoint
            .path_params
            .iter()
            .map(|(name, description)| {
                json!({
                    "name": name,
                    "in": "path",
                    "required": true,
                    "description": description,
                    "schema": {"type": "string", "minLength": 1, "maxLength": crate::params::MAX_ORDER_ID_LEN},
                })
            })
            .collect();
        parameters.extend(query_parameters(&(endpoint.query)(&mut generator)));
        let mut responses = json!({
            "200": {
                "description": "The answer. Cache-Control says how long it may be reused; send its ETag back in If-None-Match for a bodiless 304 when nothing changed.",
                "headers": {
                    "ETag": {"schema": {"type": "string"}},
                    "Cache-Control": {"schema": {"type": "string"}},
                },
                "content": {"application/json": {"schema": (endpoint.answer)(&mut generator)}},
            },
            "304": {"description": "Not modified: the ETag in If-None-Match is current."},
            "400": error_response(&mut generator, "A parameter is unknown, repeated, malformed or out of bounds; `parameter` names it."),
            "503": error_response(&mut generator, "ClickHouse is unreachable, timed out or refused the query."),
        });
        if endpoint.may_not_find {
            responses["404"] = error_response(&mut generator, "No such order.");
        }
        if auth {
            responses["401"] = error_response(
                &mut generator,
                "No bearer token, or not one of the service's (`WWW-Authenticate: Bearer`).",
            );
        }
        paths.insert(
            format!("{PREFIX}{}", endpoint.path),
            json!({"get": {
                "operationId": endpoint.operation_id,
                "summary": endpoint.summary,
                "parameters": parameters,
                "responses": responses,
            }}),
        );
    }
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "shopstream query API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The CQRS read models of shopstream: revenue, the order funnel, order status, active users, chat rooms and searches. Times are epoch seconds or RFC 3339; ranges are [from, to).",
        },
        "paths": paths,
    });
    if auth {
        document["components"] = json!({"securitySchemes": {"bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token from the service's query.auth.tokens_file.",
        }}});
        document["security"] = json!([{"bearer": []}]);
    }
    document
}
