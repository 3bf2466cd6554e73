//! The public HTTP API as an OpenAPI 3.1 document, generated from the
//! handlers' annotations and the wire types (utoipa), served at
//! `/openapi.json` and committed as `node/openapi.json` (a test keeps the
//! two equal). The `/internal/v1` routes are for peers and the resharding
//! driver and stay out of the contract.

use std::sync::OnceLock;

use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::RefOr;
use utoipa::openapi::path::ParameterIn;

use crate::api::extract::PutValue;
use crate::config::ShardConfig;
use crate::moves::{MoveStatus, Phase, Role};
use crate::store::Entry;
use crate::wire::{ClusterView, ErrorBody, Owner};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "CAVI node",
        description = "One node of a CAVI cluster. Any node answers for every key: it serves \
                       its own ranges and forwards the rest to their owner. Errors are JSON \
                       (`error`: a sentence, `code`: a stable snake_case code); a 503 carries \
                       `Retry-After`. Every answer carries `x-request-id` (the caller's, or a \
                       new one).",
        license(name = "Apache-2.0")
    ),
    paths(
        super::get_key,
        super::put_key,
        super::delete_key,
        super::search,
        super::cluster,
        super::healthz,
        super::readyz,
        super::metrics,
        openapi_json,
    ),
    components(schemas(
        ErrorBody, Owner, Entry, PutValue, ClusterView, ShardConfig, MoveStatus, Phase, Role,
        super::Status, super::KeyName, crate::search::Scope
    )),
    tags(
        (name = "keys", description = "Read, write and delete one key"),
        (name = "search", description = "Keys by prefix, across shards"),
        (name = "operations", description = "Health, readiness, the shard map, metrics")
    )
)]
struct ApiDoc;

/// The document: the generated one, plus the query form of the key
/// operations (`/kv?key=`, for `.` and `..`, which URLs cannot carry as a
/// path segment).
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    if let Some(by_path) = doc.paths.paths.get("/kv/{key}").cloned() {
        let mut by_query = by_path;
        for op in [
            by_query.get.as_mut(),
            by_query.put.as_mut(),
            by_query.delete.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            op.operation_id = op.operation_id.take().map(|id| format!("{id}_by_query"));
            for p in op.parameters.iter_mut().flatten() {
                if let RefOr::T(p) = p
                    && p.name == "key"
                {
                    p.parameter_in = ParameterIn::Query;
                }
            }
        }
        doc.paths.paths.insert("/kv".to_owned(), by_query);
    }
    doc
}

/// The document as served and committed: pretty JSON, one trailing newline.
pub fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut text = document()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        text.push('\n');
        text
    })
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json"))
)]
pub async fn openapi_json() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}
