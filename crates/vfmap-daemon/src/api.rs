//! The HTTP/JSON API (see `docs/openapi.yaml`), served on a unix socket.
//!
//! Requests are parsed into typed values first (unknown fields are errors); every error is
//! `{"error": {"code", "message", ...}}` with a status from [`status_of`].

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use vfmap_core::{Bdf, PoolError, Request, VmName, VmSpec};

use crate::engine::{Engine, EngineError};

/// An API error: a status, a stable code, a message, and optional extra fields.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<(&'static str, Value)>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
            extra: None,
        }
    }
}

/// The one place engine errors become HTTP statuses and stable codes.
pub fn status_of(error: &EngineError) -> (StatusCode, &'static str) {
    match error {
        EngineError::Pool(e) => match e {
            PoolError::UnknownVm(_) => (StatusCode::NOT_FOUND, "unknown_vm"),
            PoolError::UnknownFunction(_) => (StatusCode::NOT_FOUND, "unknown_function"),
            PoolError::NoSuchLocalIndex { .. } => (StatusCode::NOT_FOUND, "unknown_local_index"),
            PoolError::NoFreeVf { .. } => (StatusCode::CONFLICT, "no_free_vf"),
            PoolError::NoFreeSlot { .. } => (StatusCode::CONFLICT, "no_free_slot"),
            PoolError::VmExists(_) => (StatusCode::CONFLICT, "vm_exists"),
            PoolError::Busy { .. } => (StatusCode::CONFLICT, "busy"),
            PoolError::VmHoldsVfs { .. } => (StatusCode::CONFLICT, "vm_holds_vfs"),
            PoolError::InvalidVm(_) | PoolError::InvalidRequest(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            PoolError::BadTransition { .. } | PoolError::NotAssigned(_) => {
                (StatusCode::CONFLICT, "conflict")
            }
        },
        EngineError::AttachFailed { .. } => (StatusCode::BAD_GATEWAY, "attach_failed"),
        EngineError::DetachFailed { .. } => (StatusCode::BAD_GATEWAY, "detach_failed"),
        EngineError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "state_error"),
        EngineError::Degraded => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        let (status, code) = status_of(&error);
        let extra = match &error {
            EngineError::Pool(PoolError::NoFreeVf { free, .. }) => Some(("free", json!(free))),
            EngineError::Pool(PoolError::NoFreeSlot { free, .. }) => {
                Some(("free_slots", json!(free)))
            }
            _ => None,
        };
        ApiError {
            status,
            code,
            message: error.to_string(),
            extra,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        ApiError::bad_request(format!("malformed body: {}", rejection.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some((key, value)) = self.extra {
            error[key] = value;
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

/// `POST /v1/vms/{name}/attach` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachBody {
    /// The function, e.g. `crypto`.
    pub function: String,
    /// How many VFs (default 1).
    #[serde(default = "one")]
    pub count: u32,
    /// Only VFs on this NUMA node.
    #[serde(default)]
    pub numa_node: Option<i32>,
    /// Only VFs of this PF.
    #[serde(default)]
    pub pf: Option<Bdf>,
}

fn one() -> u32 {
    1
}

/// Parses an attach into a request value (no side effects; tested without sockets).
pub fn parse_attach(vm: &str, body: AttachBody) -> Result<Request, ApiError> {
    let vm = VmName::new(vm).map_err(ApiError::bad_request)?;
    if body.function.is_empty() || body.function.len() > 64 {
        return Err(ApiError::bad_request("`function` must be 1-64 characters"));
    }
    Ok(Request {
        vm,
        function: body.function,
        count: body.count,
        numa_node: body.numa_node,
        pf: body.pf,
    })
}

type Shared = State<Arc<Engine>>;

async fn health(State(engine): Shared) -> Response {
    let invariants = engine.check();
    let ok = !engine.is_degraded() && invariants.is_ok();
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
        "invariants": invariants.err(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn inventory(State(engine): Shared) -> Response {
    let body = engine.inventory_json();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn list_vms(State(engine): Shared) -> Response {
    Json(json!({ "vms": engine.vm_views() })).into_response()
}

async fn add_vm(
    State(engine): Shared,
    body: Result<Json<VmSpec>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(spec) = body?;
    let view = engine.add_vm(spec).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn get_vm(State(engine): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(engine.vm_view(&name)?).into_response())
}

async fn remove_vm(State(engine): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    let released = engine.remove_vm(&name).await?;
    Ok(Json(json!({ "removed": name, "released": released })).into_response())
}

async fn attach(
    State(engine): Shared,
    Path(name): Path<String>,
    body: Result<Json<AttachBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let request = parse_attach(&name, body)?;
    let rows = engine.attach(request).await?;
    Ok(Json(json!({ "vm": name, "attached": rows })).into_response())
}

async fn detach(
    State(engine): Shared,
    Path((name, local)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let local_index: u32 = local
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{local:?} is not a local index")))?;
    engine.detach(&name, local_index).await?;
    Ok(Json(json!({ "vm": name, "detached": local_index })).into_response())
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such endpoint; see docs/openapi.yaml".into(),
        extra: None,
    }
}

/// The API's routes.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/inventory", get(inventory))
        .route("/v1/vms", get(list_vms).post(add_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(remove_vm))
        .route("/v1/vms/{name}/attach", post(attach))
        .route("/v1/vms/{name}/devices/{local_index}", delete(detach))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_a_status_and_code() {
        let cases = [
            (
                EngineError::Pool(PoolError::UnknownVm("x".into())),
                404,
                "unknown_vm",
            ),
            (
                EngineError::Pool(PoolError::UnknownFunction("x".into())),
                404,
                "unknown_function",
            ),
            (
                EngineError::Pool(PoolError::NoFreeVf {
                    function: "x".into(),
                    wanted: 2,
                    free: 1,
                    filter: String::new(),
                }),
                409,
                "no_free_vf",
            ),
            (
                EngineError::Pool(PoolError::InvalidRequest("x".into())),
                400,
                "bad_request",
            ),
            (
                EngineError::Pool(PoolError::VmExists("x".into())),
                409,
                "vm_exists",
            ),
            (
                EngineError::AttachFailed {
                    vm: "v".into(),
                    function: "f".into(),
                    reason: "r".into(),
                },
                502,
                "attach_failed",
            ),
            (EngineError::Degraded, 503, "degraded"),
        ];
        for (error, status, code) in cases {
            assert_eq!(
                status_of(&error),
                (StatusCode::from_u16(status).unwrap(), code),
                "{error}"
            );
        }
    }

    #[test]
    fn no_free_vf_reports_how_many_are_free() {
        let error = ApiError::from(EngineError::Pool(PoolError::NoFreeVf {
            function: "crypto".into(),
            wanted: 3,
            free: 1,
            filter: String::new(),
        }));
        assert_eq!(error.extra, Some(("free", json!(1))));
    }

    #[test]
    fn attach_bodies_parse_strictly() {
        let body: AttachBody = serde_json::from_str(r#"{"function":"crypto"}"#).unwrap();
        assert_eq!(parse_attach("web", body).unwrap().count, 1);
        assert!(serde_json::from_str::<AttachBody>(r#"{"function":"crypto","colour":1}"#).is_err());
        assert!(serde_json::from_str::<AttachBody>(r#"{"function":"crypto","pf":"x"}"#).is_err());
        assert!(serde_json::from_str::<AttachBody>(r#"{"function":"crypto","count":-1}"#).is_err());
        let body: AttachBody = serde_json::from_str(r#"{"function":""}"#).unwrap();
        assert!(parse_attach("web", body).is_err());
        let body: AttachBody = serde_json::from_str(r#"{"function":"crypto"}"#).unwrap();
        assert!(parse_attach("../etc", body).is_err());
    }
}
