//! The HTTP/JSON API, served on a unix socket. Its bodies are `vfmap-api`'s types; its document
//! (OpenAPI 3.1) is generated from them and from the `#[utoipa::path]` of each handler here
//! ([`openapi`]), served at `GET /v1/openapi.json` and committed as `docs/openapi.json`.
//!
//! Requests are parsed into typed values first (unknown fields are errors); every error, the
//! router's own included (unknown path, method not allowed, undecodable path, body too large or
//! not JSON), is the [`ErrorBody`] envelope `{"error": {"code", "message", ...}}` with the one
//! status of its [`ErrorCode`]. `scripts/schema-fuzz` checks all of it against the document.
//!
//! `GET /metrics` is the one answer that is not JSON: the Prometheus text format
//! ([`crate::metrics`]); [`metrics_router`] serves it alone on the optional TCP listener.
//!
//! The API answers while the daemon is still starting ([`crate::readiness`]): health says the
//! phase, and every handler that needs the pool takes it through the [`Ready`] extractor, which
//! waits for it (bounded, `Prefer: wait=N`) or answers 503 `starting` with `Retry-After`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use vfmap_api::{
    AttachRequest, Attached, ClearQuarantine, Cleared, Detached, ErrorBody, ErrorCode, Health,
    HealthStatus, Inventory, NewVm, ProgramRequest, Programmed, QuarantineList, Removed, Vm,
    VmList,
};
use vfmap_core::{FunctionName, GlobalIndex, LocalIndex, PoolError, Request, VmName};

use crate::effects::{ChannelError, HypervisorError};
use crate::engine::{Engine, EngineError, ReleaseError, StepError};
use crate::readiness::{MAX_WAIT, NotReady, RETRY_AFTER_SECS, Readiness, StartupPhase};
use openapi::{
    BadPath, BadRequest, MethodNotAllowed, NotFound, OpenApiDocument, PayloadTooLarge,
    SideEffectFailed, StateError, TimedOut, Unavailable, UnsupportedMediaType,
};

pub mod openapi;

/// The attach body under its earlier name.
pub type AttachBody = AttachRequest;

/// An API error: a stable code (which decides the status), a message, and the extra fields
/// some codes carry.
#[derive(Debug)]
pub struct ApiError {
    body: ErrorBody,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            body: ErrorBody::new(code, message),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    /// The error's stable code.
    pub fn code(&self) -> ErrorCode {
        self.body.error.code
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        status_of_code(self.code())
    }
}

/// The HTTP status of an error code.
pub fn status_of_code(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The one place engine errors become stable codes (and so HTTP statuses).
pub fn status_of(error: &EngineError) -> ErrorCode {
    match error {
        EngineError::Pool(e) => match e {
            PoolError::UnknownVm(_) => ErrorCode::UnknownVm,
            PoolError::UnknownFunction(_) => ErrorCode::UnknownFunction,
            PoolError::NoSuchLocalIndex { .. } => ErrorCode::UnknownLocalIndex,
            PoolError::NoFreeVf { .. } => ErrorCode::NoFreeVf,
            PoolError::NoFreeSlot { .. } => ErrorCode::NoFreeSlot,
            PoolError::VmExists(_) => ErrorCode::VmExists,
            PoolError::Busy { .. } => ErrorCode::Busy,
            PoolError::VmHoldsVfs { .. } => ErrorCode::VmHoldsVfs,
            PoolError::InvalidVm(_) | PoolError::InvalidRequest(_) => ErrorCode::BadRequest,
            PoolError::BadTransition { .. }
            | PoolError::NotAssigned(_)
            | PoolError::Taken { .. } => ErrorCode::Conflict,
            PoolError::NotQuarantined(_) => ErrorCode::NotQuarantined,
            PoolError::NotProgramming(_) | PoolError::FunctionConflict { .. } => {
                ErrorCode::Conflict
            }
            PoolError::UnknownVf(_) => ErrorCode::UnknownVf,
        },
        EngineError::StillDirty { .. } => ErrorCode::StillDirty,
        EngineError::NotProgrammable { .. } => ErrorCode::NotProgrammable,
        EngineError::ProgramFailed { .. } => ErrorCode::ProgramFailed,
        // The step that failed first decides; the message lists every VF.
        EngineError::AttachFailed { failures, .. } => failures
            .first()
            .map_or(ErrorCode::AttachFailed, |f| step_code(&f.error)),
        EngineError::DetachFailed { error, .. } => match error {
            ReleaseError::Unplug(e) => hypervisor_code(e),
            ReleaseError::Free(e) => status_of(e),
        },
        EngineError::Register { error, .. } => hypervisor_code(error),
        EngineError::Store(_) => ErrorCode::StateError,
        EngineError::Degraded => ErrorCode::Degraded,
    }
}

fn step_code(error: &StepError) -> ErrorCode {
    match error {
        StepError::Host(_) => ErrorCode::HostBindFailed,
        StepError::Hypervisor(e) => hypervisor_code(e),
        StepError::Channel(ChannelError::Timeout(_)) => ErrorCode::AgentTimeout,
        StepError::Channel(_) => ErrorCode::AgentUnreachable,
        StepError::Agent(_) => ErrorCode::AgentFailed,
        StepError::State(e) => status_of(e),
        StepError::NoDrivers
        | StepError::NoSlot
        | StepError::Sibling
        | StepError::Restarted
        | StepError::Lost => ErrorCode::AttachFailed,
    }
}

fn hypervisor_code(error: &HypervisorError) -> ErrorCode {
    match error {
        HypervisorError::NotRunning { .. } | HypervisorError::DomainInactive { .. } => {
            ErrorCode::VmNotRunning
        }
        HypervisorError::UnknownDomain { .. } => ErrorCode::UnknownDomain,
        HypervisorError::NotPrepared(_) => ErrorCode::VmNotPrepared,
        HypervisorError::SlotUnknown { .. } => ErrorCode::SlotUnknown,
        HypervisorError::SlotOccupied { .. } => ErrorCode::SlotOccupied,
        HypervisorError::Timeout(_) => ErrorCode::HypervisorTimeout,
        HypervisorError::Unreachable { .. }
        | HypervisorError::Refused { .. }
        | HypervisorError::Protocol(_)
        | HypervisorError::Unsupported(_) => ErrorCode::HypervisorFailed,
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        let mut api = ApiError::new(status_of(&error), error.to_string());
        match &error {
            EngineError::Pool(PoolError::NoFreeVf { free, .. }) => {
                api.body.error.free = Some(*free as u64);
            }
            EngineError::Pool(PoolError::NoFreeSlot { free, .. }) => {
                api.body.error.free_slots = Some(*free as u64);
            }
            _ => {}
        }
        api
    }
}

/// The largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body is larger than {BODY_LIMIT} bytes"),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "the body must be JSON, sent with `Content-Type: application/json`",
            ),
            // Syntax errors (400) and bodies of the wrong shape (axum's 422) alike.
            _ => ApiError::bad_request(format!("malformed body: {}", rejection.body_text())),
        }
    }
}

/// [`Path`], whose rejections (a segment that does not percent-decode to UTF-8, or that does not
/// parse) are the API's `bad_request` envelope instead of axum's plain-text answer.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "bad path: {}",
                rejection.body_text()
            ))),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let starting = self.code() == ErrorCode::Starting;
        let mut response = (self.status(), Json(self.body)).into_response();
        if starting {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_SECS),
            );
        }
        response
    }
}

impl From<NotReady> for ApiError {
    fn from(not_ready: NotReady) -> ApiError {
        // A start-up that failed will not come up: that is no time to tell anyone to retry.
        let code = if not_ready.reason.is_some() {
            ErrorCode::Degraded
        } else {
            ErrorCode::Starting
        };
        ApiError::new(code, not_ready.to_string())
    }
}

/// The engine, for handlers that need the pool: during start-up it waits for it, at most
/// [`MAX_WAIT`] or the request's `Prefer: wait=N` if shorter, else answers 503 `starting`.
pub struct Ready(pub Arc<Engine>);

impl FromRequestParts<Readiness> for Ready {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        readiness: &Readiness,
    ) -> Result<Self, ApiError> {
        if let Some(engine) = readiness.engine() {
            return Ok(Ready(engine));
        }
        let asked = crate::readiness::preferred_wait(
            parts
                .headers
                .get_all("prefer")
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        let limit = asked.map_or(MAX_WAIT, |w| w.min(MAX_WAIT));
        Ok(Ready(readiness.wait(limit).await?))
    }
}

/// Parses an attach into a request value (no side effects; tested without sockets).
pub fn parse_attach(vm: &str, body: AttachRequest) -> Result<Request, ApiError> {
    let vm = VmName::new(vm).map_err(ApiError::bad_request)?;
    // A name no profile could define is a bad request, not an unknown function.
    FunctionName::new(&body.function)
        .map_err(|e| ApiError::bad_request(format!("`function`: {e}")))?;
    Ok(Request {
        vm,
        function: body.function,
        count: body.count,
        numa_node: body.numa_node,
        pf: body.pf,
    })
}

/// A VM named in a path, for GET and DELETE: a name no VM could have is not registered either
/// (`unknown_vm`, as for any other name not registered).
fn registered_name(name: String) -> Result<VmName, ApiError> {
    VmName::new(&name).map_err(|_| EngineError::Pool(PoolError::UnknownVm(name)).into())
}

/// Liveness, start-up phase and invariants
///
/// Answers at once, from the moment the socket is bound: while the daemon is starting, the
/// status is "starting" (still 200: it is alive and answering) and `phase` says where the
/// start-up is; requests that need the pool wait for it meanwhile.
#[utoipa::path(
    get,
    path = "/v1/health",
    responses(
        (status = 200, description = "Healthy (status ok, phase ready), or alive and starting (status starting, with the phase)", body = Health),
        (status = 405, response = MethodNotAllowed),
        (status = 503, body = Health, description = "Degraded: a state commit failed (restart the daemon), a pool invariant is broken, or the start-up failed (phase `failed`; the daemon is exiting)"),
    )
)]
async fn health(State(readiness): State<Readiness>) -> Response {
    let version = env!("CARGO_PKG_VERSION").to_owned();
    let Some(engine) = readiness.engine() else {
        let phase = readiness.phase();
        let (status, health) = match phase {
            StartupPhase::Failed => (StatusCode::SERVICE_UNAVAILABLE, HealthStatus::Degraded),
            _ => (StatusCode::OK, HealthStatus::Starting),
        };
        let body = Health {
            status: health,
            version,
            invariants: None,
            phase,
        };
        return (status, Json(body)).into_response();
    };
    let invariants = engine.check();
    let ok = !engine.is_degraded() && invariants.is_ok();
    let body = Health {
        status: if ok {
            HealthStatus::Ok
        } else {
            HealthStatus::Degraded
        },
        version,
        invariants: invariants.err(),
        phase: StartupPhase::Ready,
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Functions with counts, and every VF with its allocation
#[utoipa::path(
    get,
    path = "/v1/inventory",
    responses(
        (status = 200, description = "The inventory", body = Inventory),
        (status = 405, response = MethodNotAllowed),
        (status = 503, response = Unavailable),
    )
)]
async fn inventory(Ready(engine): Ready) -> Response {
    // `Inventory`, written straight from the pool.
    let body = engine.inventory_json();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Every VM with its correspondence table
#[utoipa::path(
    get,
    path = "/v1/vms",
    responses(
        (status = 200, description = "VMs", body = VmList),
        (status = 405, response = MethodNotAllowed),
        (status = 503, response = Unavailable),
    )
)]
async fn list_vms(Ready(engine): Ready) -> Json<VmList> {
    Json(VmList {
        vms: engine.vm_views(),
        kubelet: engine.kubelet_views(),
    })
}

/// Register a running VM
///
/// A `qmp` VM is only validated and recorded: its sockets are first used by an attach, so a
/// VM whose QEMU is not running registers fine and its attaches answer 502. A `libvirt`
/// domain is read from libvirt first (its live XML): its free hot-pluggable root ports become
/// the slots and its agent channel's socket is recorded; an unknown domain (404
/// `unknown_domain`), a domain not running (502 `vm_not_running`), one without a free root
/// port or the channel (409 `vm_not_prepared`), or an unreachable libvirtd (502
/// `hypervisor_failed`) registers nothing.
#[utoipa::path(
    post,
    path = "/v1/vms",
    request_body = NewVm,
    responses(
        (status = 201, description = "Registered", body = Vm),
        (status = 400, response = BadRequest),
        (status = 405, response = MethodNotAllowed),
        (status = 404, description = "`unknown_domain`", body = ErrorBody),
        (status = 409, description = "`vm_exists`, `vm_not_prepared`", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 500, response = StateError),
        (status = 502, description = "`vm_not_running`, `hypervisor_failed`", body = ErrorBody),
        (status = 503, response = Unavailable),
        (status = 504, description = "`hypervisor_timeout`", body = ErrorBody),
    )
)]
async fn add_vm(
    Ready(engine): Ready,
    body: Result<Json<NewVm>, JsonRejection>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let Json(request) = body?;
    request.check().map_err(ApiError::bad_request)?;
    let view = engine.add_vm(request).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// One VM with its correspondence table (local index → function) and recent failures
#[utoipa::path(
    get,
    path = "/v1/vms/{name}",
    params(("name" = VmName, Path, description = "The VM's name; any name not registered, well formed or not, is a 404", example = "web")),
    responses(
        (status = 200, description = "The VM", body = Vm),
        (status = 400, response = BadPath),
        (status = 404, response = NotFound),
        (status = 405, response = MethodNotAllowed),
        (status = 503, response = Unavailable),
    )
)]
async fn get_vm(
    Ready(engine): Ready,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(engine.vm_view(&name)?))
}

/// Release everything the VM holds, then forget it
#[utoipa::path(
    delete,
    path = "/v1/vms/{name}",
    params(("name" = VmName, Path, description = "The VM's name; any name not registered, well formed or not, is a 404", example = "old")),
    responses(
        (status = 200, description = "Removed", body = Removed),
        (status = 400, response = BadPath),
        (status = 404, response = NotFound),
        (status = 405, response = MethodNotAllowed),
        (status = 409, description = "`busy` (an attach or detach is in flight), `vm_holds_vfs` or `conflict`", body = ErrorBody),
        (status = 500, response = StateError),
        (status = 502, response = SideEffectFailed),
        (status = 503, response = Unavailable),
        (status = 504, response = TimedOut),
    )
)]
async fn remove_vm(
    Ready(engine): Ready,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Removed>, ApiError> {
    let removed = registered_name(name)?;
    let released = engine.remove_vm(removed.as_str()).await?;
    Ok(Json(Removed {
        removed,
        released: u32::try_from(released).unwrap_or(u32::MAX),
    }))
}

/// Service request: give the VM `count` VFs of `function`
///
/// All or nothing. Each VF goes reserved → host_bound → plugged → sent → ready; the call
/// returns when every VF is ready (the agent bound the function's driver) or, on any failure,
/// after rolling every step back.
#[utoipa::path(
    post,
    path = "/v1/vms/{name}/attach",
    params(("name" = VmName, Path, description = "The VM's name; a malformed one is a 400", example = "web")),
    request_body = AttachRequest,
    responses(
        (status = 200, description = "Every VF is ready", body = Attached),
        (status = 400, response = BadRequest),
        (status = 404, description = "`unknown_vm` or `unknown_function` (no VF carries it)", body = ErrorBody),
        (status = 405, response = MethodNotAllowed),
        (status = 409, description = "`no_free_vf` (with `free`), `no_free_slot` (with `free_slots`), `busy` or `conflict`", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 500, description = "`state_error` (the change could not be committed; the daemon is degraded from now on) or `host_bind_failed` (binding the VF to its host driver failed; rolled back)", body = ErrorBody),
        (status = 502, response = SideEffectFailed),
        (status = 503, response = Unavailable),
        (status = 504, response = TimedOut),
    )
)]
async fn attach(
    Ready(engine): Ready,
    path: Result<ApiPath<String>, ApiError>,
    body: Result<Json<AttachRequest>, JsonRejection>,
) -> Result<Json<Attached>, ApiError> {
    let answer: Result<Json<Attached>, ApiError> = async {
        let ApiPath(name) = path?;
        let Json(body) = body?;
        let request = parse_attach(&name, body)?;
        let vm = request.vm.clone();
        let attached = engine.attach(request).await?;
        Ok(Json(Attached { vm, attached }))
    }
    .await;
    // Every attach answered with an error counts, by the code the client gets.
    if let Err(error) = &answer {
        engine.metrics().attach_failed(error.code());
    }
    answer
}

/// Release the VF at a local index (agent unbinds, unplug, reset, rebind host driver, free)
#[utoipa::path(
    delete,
    path = "/v1/vms/{name}/devices/{local_index}",
    params(
        ("name" = VmName, Path, description = "The VM's name; any name not registered, well formed or not, is a 404", example = "web"),
        ("local_index" = LocalIndex, Path, description = "Decimal digits only; a slot position, so below the VM's slot count (at most 256)", example = 0),
    ),
    responses(
        (status = 200, description = "Released", body = Detached),
        (status = 400, description = "`bad_request`: the local index is not 0-255 in decimal digits, or a segment does not decode", body = ErrorBody),
        (status = 404, description = "`unknown_vm` or `unknown_local_index` (nothing is attached there)", body = ErrorBody),
        (status = 405, response = MethodNotAllowed),
        (status = 409, description = "`busy`: an attach or detach of it is still in flight; `conflict`", body = ErrorBody),
        (status = 500, response = StateError),
        (status = 502, response = SideEffectFailed),
        (status = 503, response = Unavailable),
        (status = 504, response = TimedOut),
    )
)]
async fn detach(
    Ready(engine): Ready,
    ApiPath((name, local)): ApiPath<(String, String)>,
) -> Result<Json<Detached>, ApiError> {
    let local_index = parse_local_index(&local)?;
    let vm = registered_name(name)?;
    engine.detach(vm.as_str(), local_index).await?;
    Ok(Json(Detached {
        vm,
        detached: local_index,
    }))
}

/// The VFs out of the pool after a failed scrub
///
/// A released VF whose config space was not back in the reset state after its reset, or
/// whose card's wipe (`scrub` hook) failed, is kept out of the pool with the reason until an
/// operator clears it.
#[utoipa::path(
    get,
    path = "/v1/quarantine",
    responses(
        (status = 200, description = "The quarantined VFs", body = QuarantineList),
        (status = 405, response = MethodNotAllowed),
        (status = 503, response = Unavailable),
    )
)]
async fn list_quarantine(Ready(engine): Ready) -> Json<QuarantineList> {
    Json(QuarantineList {
        vfs: engine.quarantined(),
    })
}

/// Return a quarantined VF to the pool
///
/// The VF is reset and scrubbed again first (config space check, the card's wipe); when that
/// fails it stays quarantined (`still_dirty`, the message says what was found). `force`
/// skips the scrub.
#[utoipa::path(
    post,
    path = "/v1/quarantine/{global_index}/clear",
    params(
        ("global_index" = GlobalIndex, Path, description = "The VF's global index, decimal digits", example = 3),
    ),
    request_body = ClearQuarantine,
    responses(
        (status = 200, description = "The VF is free again", body = Cleared),
        (status = 400, response = BadRequest),
        (status = 404, description = "`not_quarantined`: no quarantined VF has that global index", body = ErrorBody),
        (status = 405, response = MethodNotAllowed),
        (status = 409, description = "`still_dirty`: the scrub failed again; the VF stays quarantined. `conflict`: another clear of it runs now", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 500, response = StateError),
        (status = 503, response = Unavailable),
    )
)]
async fn clear_quarantine(
    Ready(engine): Ready,
    ApiPath(index): ApiPath<String>,
    body: Result<Json<ClearQuarantine>, JsonRejection>,
) -> Result<Json<Cleared>, ApiError> {
    let global_index = parse_global_index(&index)?;
    let Json(body) = body?;
    Ok(Json(
        engine.clear_quarantine(global_index, body.force).await?,
    ))
}

/// Re-program a free VF into another function
///
/// Runs the VF's card's `program` hook (docs/hooks.md); the profile must allow the VF's
/// function to become this one (`programmable_to`). The VF is out of the pool while the hook
/// runs; when the hook fails, it is quarantined. A VF held by a VM, the kubelet or quarantine
/// is refused (`conflict`).
#[utoipa::path(
    post,
    path = "/v1/vfs/{global_index}/program",
    params(
        ("global_index" = GlobalIndex, Path, description = "The VF's global index, decimal digits", example = 3),
    ),
    request_body = ProgramRequest,
    responses(
        (status = 200, description = "The VF carries the new function", body = Programmed),
        (status = 400, response = BadRequest),
        (status = 404, description = "`unknown_vf` (no VF has that global index), `unknown_function`", body = ErrorBody),
        (status = 405, response = MethodNotAllowed),
        (status = 409, description = "`not_programmable`: the profile does not allow it; `conflict`: the VF is held, carries no function or already this one", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 500, response = StateError),
        (status = 502, description = "`program_failed`: the card's hook failed; the VF is quarantined", body = ErrorBody),
        (status = 503, response = Unavailable),
    )
)]
async fn program_vf(
    Ready(engine): Ready,
    ApiPath(index): ApiPath<String>,
    body: Result<Json<ProgramRequest>, JsonRejection>,
) -> Result<Json<Programmed>, ApiError> {
    let global_index = parse_global_index(&index)?;
    let Json(body) = body?;
    Ok(Json(engine.program(global_index, &body.function).await?))
}

/// A global index in a path: decimal digits only.
fn parse_global_index(text: &str) -> Result<GlobalIndex, ApiError> {
    match text.parse::<u32>() {
        Ok(n) if text.bytes().all(|b| b.is_ascii_digit()) => Ok(GlobalIndex::new(n)),
        _ => Err(ApiError::bad_request(format!(
            "{text:?} is not a global index (decimal digits, 0-4294967295)"
        ))),
    }
}

/// This document
///
/// The API's OpenAPI 3.1 document, generated from the daemon's code; the same as
/// `docs/openapi.json` in the source tree.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    responses(
        (status = 200, description = "The document", body = OpenApiDocument),
        (status = 405, response = MethodNotAllowed),
    )
)]
async fn openapi_document() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi::json(),
    )
        .into_response()
}

/// Prometheus metrics
///
/// The daemon's metrics in the Prometheus text format, version 0.0.4 (`Content-Type:
/// text/plain; version=0.0.4; charset=utf-8`): VFs by function and state, attach and detach
/// durations, attach failures by error code, each VM's agent link, state commit durations,
/// recovery decisions and the start time. README.md lists them. Also served alone on
/// `metrics_listen` (TCP) when the config sets it.
#[utoipa::path(
    get,
    path = "/metrics",
    responses(
        (status = 200, description = "The metrics (Prometheus text format 0.0.4)", body = String, content_type = "text/plain"),
        (status = 405, response = MethodNotAllowed),
        (status = 503, response = Unavailable),
    )
)]
async fn metrics(Ready(engine): Ready) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        engine.metrics_text(),
    )
        .into_response()
}

/// A local index as the path gives it: decimal digits only (no sign, no spaces), and a slot
/// position (a VM has at most 256 slots).
pub fn parse_local_index(text: &str) -> Result<LocalIndex, ApiError> {
    match text.parse::<LocalIndex>() {
        Ok(index) if index.slot() < vfmap_core::protocol::MAX_ENTRIES => Ok(index),
        _ => Err(ApiError::bad_request(format!(
            "{text:?} is not a local index (0-255)"
        ))),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; see GET /v1/openapi.json",
    )
}

/// A known path with a method it does not have; axum adds the `Allow` header.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!(
            "{method} is not allowed on {}; the `Allow` header lists what is",
            uri.path()
        ),
    )
}

/// The API's routes, over an engine that is up.
pub fn router(engine: Arc<Engine>) -> Router {
    router_with(Readiness::ready(engine))
}

/// The API's routes, answering from the start of the daemon's start-up.
pub fn router_with(readiness: Readiness) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/inventory", get(inventory))
        .route("/v1/vms", get(list_vms).post(add_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(remove_vm))
        .route("/v1/vms/{name}/attach", post(attach))
        .route("/v1/vms/{name}/devices/{local_index}", delete(detach))
        .route("/v1/quarantine", get(list_quarantine))
        .route(
            "/v1/quarantine/{global_index}/clear",
            post(clear_quarantine),
        )
        .route("/v1/vfs/{global_index}/program", post(program_vf))
        .route("/v1/openapi.json", get(openapi_document))
        .route("/metrics", get(metrics))
        // After the routes: it applies to the routes registered before it.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(readiness)
}

async fn only_metrics() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "this listener serves only GET /metrics; the API is on the daemon's unix socket",
    )
}

/// The metrics listener's routes (`metrics_listen`): `GET /metrics` and nothing else of the
/// API; other paths are a 404 `not_found`, other methods a 405, in the API's envelope.
pub fn metrics_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(only_metrics)
        .with_state(readiness)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn each_failed_step_has_its_own_code() {
        use std::time::Duration;

        use crate::effects::HostError;
        use crate::engine::{AgentError, VfFailure};
        let vf: vfmap_core::Bdf = "0000:01:00.1".parse().unwrap();
        let socket = || "/run/x.qmp".to_owned();
        let attach = |error: StepError| EngineError::AttachFailed {
            vm: "v".into(),
            function: "f".into(),
            failures: vec![VfFailure {
                local_index: LocalIndex::new(0),
                vf,
                error,
                cleanup: None,
            }],
        };
        let detach = |error: ReleaseError| EngineError::DetachFailed {
            vm: "v".into(),
            local_index: LocalIndex::new(0),
            error,
        };
        let timeout = || HypervisorError::Timeout(Duration::from_secs(1));
        let cases = [
            (
                attach(StepError::Host(HostError::Stopped { vf })),
                500,
                "host_bind_failed",
            ),
            (
                attach(StepError::Hypervisor(HypervisorError::NotRunning {
                    socket: socket(),
                    reason: "refused".into(),
                })),
                502,
                "vm_not_running",
            ),
            (
                attach(StepError::Hypervisor(HypervisorError::SlotUnknown {
                    slot: "rp9".into(),
                })),
                502,
                "slot_unknown",
            ),
            (
                attach(StepError::Hypervisor(HypervisorError::SlotOccupied {
                    slot: "rp0".into(),
                    detail: "x".into(),
                })),
                502,
                "slot_occupied",
            ),
            (
                attach(StepError::Hypervisor(HypervisorError::Refused {
                    class: "GenericError".into(),
                    desc: "no".into(),
                })),
                502,
                "hypervisor_failed",
            ),
            (
                attach(StepError::Hypervisor(timeout())),
                504,
                "hypervisor_timeout",
            ),
            (
                attach(StepError::Channel(ChannelError::Timeout(
                    Duration::from_secs(1),
                ))),
                504,
                "agent_timeout",
            ),
            (
                attach(StepError::Channel(ChannelError::Io("broken".into()))),
                502,
                "agent_unreachable",
            ),
            (
                attach(StepError::Agent(AgentError::NoAnswer {
                    local_index: LocalIndex::new(0),
                })),
                502,
                "agent_failed",
            ),
            (
                attach(StepError::State(Box::new(EngineError::Degraded))),
                503,
                "degraded",
            ),
            (attach(StepError::NoDrivers), 502, "attach_failed"),
            (
                detach(ReleaseError::Unplug(timeout())),
                504,
                "hypervisor_timeout",
            ),
            (
                detach(ReleaseError::Free(Box::new(EngineError::Degraded))),
                503,
                "degraded",
            ),
        ];
        for (error, status, code) in cases {
            let got = status_of(&error);
            assert_eq!(
                (status_of_code(got).as_u16(), got.as_str()),
                (status, code),
                "{error}"
            );
        }
    }

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
                    failures: Vec::new(),
                },
                502,
                "attach_failed",
            ),
            (EngineError::Degraded, 503, "degraded"),
        ];
        for (error, status, code) in cases {
            let got = status_of(&error);
            assert_eq!(
                (status_of_code(got), got.as_str()),
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
        assert_eq!(
            serde_json::to_value(&error.body).unwrap(),
            json!({"error": {"code": "no_free_vf", "message": error.body.error.message, "free": 1}})
        );
    }

    #[test]
    fn attach_bodies_parse_strictly() {
        let body: AttachBody = serde_json::from_str(r#"{"function":"crypto"}"#).unwrap();
        assert_eq!(parse_attach("web", body).unwrap().count, 1);
        assert!(serde_json::from_str::<AttachBody>(r#"{"function":"crypto","colour":1}"#).is_err());
        assert!(serde_json::from_str::<AttachBody>(r#"{"function":"crypto","pf":"x"}"#).is_err());
        assert!(serde_json::from_str::<AttachBody>(r#"{"function":"crypto","count":-1}"#).is_err());
        assert!(
            serde_json::from_str::<AttachBody>(r#"{"function":"crypto","count":1.5}"#).is_err()
        );
        // JSON Schema's integers (the document's `integer`): 2.0 is 2.
        let body: AttachBody =
            serde_json::from_str(r#"{"function":"crypto","count":2.0,"numa_node":-1.0}"#).unwrap();
        assert_eq!((body.count, body.numa_node), (2, Some(-1)));
        let body: AttachBody = serde_json::from_str(r#"{"function":""}"#).unwrap();
        assert!(parse_attach("web", body).is_err());
        let body: AttachBody = serde_json::from_str(r#"{"function":"crypto"}"#).unwrap();
        assert!(parse_attach("../etc", body).is_err());
        // Only names a profile could define: the rest is a bad request, not an unknown function.
        for bad in ["Crypto", "-x", "a b", &"a".repeat(65)] {
            let body = AttachBody {
                function: bad.to_owned(),
                count: 1,
                numa_node: None,
                pf: None,
            };
            let error = parse_attach("web", body).unwrap_err();
            assert_eq!(
                (error.status(), error.code()),
                (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
            );
        }
    }

    #[test]
    fn local_indexes_are_plain_decimal_slot_positions() {
        assert_eq!(parse_local_index("0").unwrap(), LocalIndex::new(0));
        assert_eq!(parse_local_index("007").unwrap(), LocalIndex::new(7));
        assert_eq!(parse_local_index("255").unwrap(), LocalIndex::new(255));
        for bad in ["", "+1", "-1", " 1", "1.0", "0x1", "256", "4294967296", "٣"] {
            let error = parse_local_index(bad).unwrap_err();
            assert_eq!(
                (error.status(), error.code()),
                (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
            );
        }
    }
}

/// The router's own answers, through the real router on a unix socket with raw HTTP/1.1: the
/// error envelope must hold where axum would answer on its own (empty 405s, plain-text 400s).
#[cfg(test)]
mod http_tests {
    use std::path::{Path as FsPath, PathBuf};
    use std::time::Duration;

    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vfmap_core::protocol::{Answer, Entry, GuestPath};
    use vfmap_core::{Bdf, DriverName, Profiles, SlotId, Tables, VmSpec};

    use super::*;
    use crate::effects::{
        BoxFuture, ChannelError, GuestChannel, HostVfs, Hypervisor, HypervisorError,
    };
    use crate::engine::Adapters;
    use crate::readiness::Startup;
    use crate::store::Store;

    /// Side effects of a host whose VMs are all stopped (none is reached by these tests).
    struct Offline;

    impl Hypervisor for Offline {
        fn attach<'a>(
            &'a self,
            vm: &'a VmSpec,
            _: &'a SlotId,
            _: &'a str,
            _: Bdf,
        ) -> BoxFuture<'a, Result<GuestPath, HypervisorError>> {
            Box::pin(async move { Err(stopped(vm)) })
        }
        fn detach<'a>(
            &'a self,
            vm: &'a VmSpec,
            _: &'a str,
        ) -> BoxFuture<'a, Result<(), HypervisorError>> {
            Box::pin(async move { Err(stopped(vm)) })
        }
        fn plugged<'a>(
            &'a self,
            vm: &'a VmSpec,
        ) -> BoxFuture<'a, Result<Vec<String>, HypervisorError>> {
            Box::pin(async move { Err(stopped(vm)) })
        }
    }

    fn stopped(vm: &VmSpec) -> HypervisorError {
        HypervisorError::NotRunning {
            socket: vm.name.to_string(),
            reason: "test".into(),
        }
    }

    impl GuestChannel for Offline {
        fn apply<'a>(
            &'a self,
            vm: &'a VmSpec,
            _: Vec<Entry>,
            _: Duration,
        ) -> BoxFuture<'a, Result<Vec<Answer>, ChannelError>> {
            Box::pin(async move {
                Err(ChannelError::Unreachable {
                    socket: vm.backend.agent_socket().to_owned(),
                    reason: "test".into(),
                })
            })
        }
    }

    impl HostVfs for Offline {
        fn bind(&self, vf: Bdf, _: &DriverName) -> Result<(), crate::effects::HostError> {
            Err(crate::effects::HostError::Stopped { vf })
        }
        fn reset(&self, vf: Bdf) -> Result<bool, crate::effects::HostError> {
            Err(crate::effects::HostError::Stopped { vf })
        }
    }

    const PROFILE: &str = r#"
[[card]]
name = "acme"
vendor = "0x1b36"
device = "0x0010"
num_vfs = 2
[[card.function]]
name = "crypto"
vfs = "0-1"
guest_driver = "pci-stub"
"#;

    /// The real router and engine (store in a tempdir) serving a unix socket.
    async fn serve() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path()).await;
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move { axum::serve(listener, router(Arc::new(engine))).await });
        (dir, socket)
    }

    /// The real router serving a unix socket while the daemon is starting: the test hands the
    /// engine over with the returned [`Startup`].
    async fn serve_starting() -> (tempfile::TempDir, PathBuf, Startup) {
        let dir = tempfile::tempdir().unwrap();
        let (startup, readiness) = Startup::begin();
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move { axum::serve(listener, router_with(readiness)).await });
        (dir, socket, startup)
    }

    /// The real engine over a two-VF host, its store in `dir`.
    async fn engine(dir: &FsPath) -> Engine {
        let tree = vfmap_testkit::SysfsTree::new(dir.join("sys"));
        tree.add_pf(&vfmap_testkit::PfSpec::nvme("0000:01:00.0", 2).with_vfs(2));
        let facts = vfmap_sysfs::Sysfs::new(tree.root()).discover().unwrap();
        let tables = Tables::build(&facts, &Profiles::parse(PROFILE, "p.toml").unwrap());
        let locations: Vec<Bdf> = tables.vfs.iter().map(|v| v.location).collect();
        let (store, loaded) = Store::open(&dir.join("state.db"), &locations).unwrap();
        let offline = Arc::new(Offline);
        let adapters = Adapters {
            hypervisor: offline.clone(),
            channel: offline.clone(),
            host: offline,
            agent_deadline: Duration::from_millis(100),
        };
        Engine::new(tables, store, loaded, adapters).await.unwrap()
    }

    struct Answered {
        status: u16,
        /// The header lines, lowercased.
        head: String,
        body: Value,
    }

    /// Sends one raw request (so paths and methods are exactly as written) and reads the answer.
    async fn send(
        socket: &FsPath,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> Answered {
        let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: vfmap\r\nConnection: close\r\n{headers}\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // The server may answer (413) before reading the body; the answer is what matters.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        Answered {
            status: head[9..12].parse().unwrap(),
            head: head.to_ascii_lowercase(),
            body: serde_json::from_str(body).unwrap_or(Value::Null),
        }
    }

    /// The answer is `status` with the JSON error envelope carrying `code`.
    fn assert_envelope(answer: &Answered, status: u16, code: &str) {
        assert_eq!(answer.status, status, "{}\n{}", answer.head, answer.body);
        assert!(
            answer.head.contains("\r\ncontent-type: application/json"),
            "{}",
            answer.head
        );
        assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
        assert!(
            answer.body["error"]["message"].is_string(),
            "{}",
            answer.body
        );
    }

    const VM: &str = r#"{"name":"web","backend":{"qmp":{"qmp_socket":"/run/web.qmp","agent_socket":"/run/web.agent","slots":["rp0"]}}}"#;
    const JSON: &str = "Content-Type: application/json\r\n";

    #[tokio::test]
    async fn while_starting_health_answers_and_the_pool_is_waited_for_or_refused_with_503() {
        let (dir, socket, startup) = serve_starting().await;
        let health = send(&socket, "GET", "/v1/health", "", "").await;
        assert_eq!(health.status, 200, "{}", health.body);
        assert_eq!(
            (&health.body["status"], &health.body["phase"]),
            (&json!("starting"), &json!("preparing_host"))
        );
        let _: Health = serde_json::from_value(health.body).unwrap();
        assert_eq!(
            send(&socket, "GET", "/v1/openapi.json", "", "")
                .await
                .status,
            200
        );
        // Routing answers as ever: an unknown path, a method a path does not have.
        assert_envelope(
            &send(&socket, "GET", "/v1/nope", "", "").await,
            404,
            "not_found",
        );
        assert_envelope(
            &send(&socket, "PUT", "/v1/vms", "", "").await,
            405,
            "method_not_allowed",
        );
        startup.phase(StartupPhase::Recovering);
        // A client that will not wait is told at once, with the phase and when to retry.
        let nowait = "Prefer: wait=0\r\n";
        for (method, path, headers, body) in [
            ("GET", "/v1/inventory", nowait.to_owned(), ""),
            ("GET", "/v1/vms", nowait.to_owned(), ""),
            ("GET", "/metrics", nowait.to_owned(), ""),
            ("POST", "/v1/vms", format!("{JSON}{nowait}"), VM),
            (
                "POST",
                "/v1/vms/web/attach",
                format!("{JSON}{nowait}"),
                r#"{"function":"crypto"}"#,
            ),
            ("DELETE", "/v1/vms/web/devices/0", nowait.to_owned(), ""),
        ] {
            let answer = send(&socket, method, path, &headers, body).await;
            assert_envelope(&answer, 503, "starting");
            assert!(
                answer.head.contains("\r\nretry-after: 1"),
                "{}",
                answer.head
            );
            let message = answer.body["error"]["message"].as_str().unwrap();
            assert!(message.contains("phase recovering"), "{message}");
        }
        // One that waits gets its answer once the pool is up, and it is the real one.
        let waiting = {
            let socket = socket.clone();
            tokio::spawn(async move { send(&socket, "POST", "/v1/vms", JSON, VM).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "answered before the pool was up");
        assert_eq!(
            send(&socket, "GET", "/v1/health", "", "").await.body["phase"],
            "recovering"
        );
        startup.ready(Arc::new(engine(dir.path()).await));
        let registered = waiting.await.unwrap();
        assert_eq!(registered.status, 201, "{}", registered.body);
        // The refused registration changed nothing: only the waited one is there.
        let vms = send(&socket, "GET", "/v1/vms", "", "").await;
        assert_eq!(vms.body["vms"].as_array().unwrap().len(), 1, "{}", vms.body);
        let health = send(&socket, "GET", "/v1/health", "", "").await;
        assert_eq!(
            (health.status, &health.body["status"], &health.body["phase"]),
            (200, &json!("ok"), &json!("ready"))
        );
    }

    #[tokio::test]
    async fn a_failed_start_up_is_degraded_and_waiters_are_answered_at_once() {
        let (_dir, socket, startup) = serve_starting().await;
        let waiting = {
            let socket = socket.clone();
            tokio::spawn(async move { send(&socket, "GET", "/v1/inventory", "", "").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        startup.fail("preparing the host failed");
        let answer = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the waiter was answered at once")
            .unwrap();
        assert_envelope(&answer, 503, "degraded");
        assert!(!answer.head.contains("retry-after"), "{}", answer.head);
        let message = answer.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("preparing the host failed"), "{message}");
        let health = send(&socket, "GET", "/v1/health", "", "").await;
        assert_eq!(
            (health.status, &health.body["status"], &health.body["phase"]),
            (503, &json!("degraded"), &json!("failed"))
        );
    }

    #[tokio::test]
    async fn unsupported_methods_get_405_with_allow_and_the_envelope() {
        let (_dir, socket) = serve().await;
        for (method, path, allow) in [
            ("PUT", "/v1/vms", "allow: get,head,post"),
            ("POST", "/v1/health", "allow: get,head"),
            ("PATCH", "/v1/vms/web", "allow: get,head,delete"),
            ("GET", "/v1/vms/web/attach", "allow: post"),
            ("GET", "/v1/vms/web/devices/0", "allow: delete"),
            ("TRACE", "/v1/inventory", "allow: get,head"),
            ("POST", "/v1/openapi.json", "allow: get,head"),
        ] {
            let answer = send(&socket, method, path, "", "").await;
            assert_envelope(&answer, 405, "method_not_allowed");
            assert!(
                answer.head.contains(allow),
                "{method} {path}: {}",
                answer.head
            );
        }
        // An unknown path is still a 404, whatever the method.
        assert_envelope(
            &send(&socket, "PUT", "/v1/nothing", "", "").await,
            404,
            "not_found",
        );
    }

    #[tokio::test]
    async fn undecodable_or_unparsable_paths_are_bad_requests() {
        let (_dir, socket) = serve().await;
        let created = send(&socket, "POST", "/v1/vms", JSON, VM).await;
        assert_eq!(created.status, 201, "{}", created.body);
        let attach = r#"{"function":"crypto"}"#;
        for (method, path, body) in [
            ("GET", "/v1/vms/%FF", ""),       // not UTF-8 once decoded
            ("DELETE", "/v1/vms/%C3%28", ""), // an invalid UTF-8 sequence
            ("POST", "/v1/vms/%FFweb/attach", attach),
            ("DELETE", "/v1/vms/web/devices/%FF", ""),
            ("DELETE", "/v1/vms/web/devices/+0", ""),
            ("DELETE", "/v1/vms/web/devices/256", ""),
            ("DELETE", "/v1/vms/web/devices/x", ""),
        ] {
            let headers = if body.is_empty() { "" } else { JSON };
            let answer = send(&socket, method, path, headers, body).await;
            assert_envelope(&answer, 400, "bad_request");
        }
        // A well-formed name that is not registered is a 404; the VM is still there.
        assert_envelope(
            &send(&socket, "GET", "/v1/vms/db", "", "").await,
            404,
            "unknown_vm",
        );
        assert_eq!(
            send(&socket, "GET", "/v1/vms/web", "", "").await.status,
            200
        );
    }

    #[tokio::test]
    async fn bodies_not_json_or_too_large_get_their_statuses_and_the_envelope() {
        let (_dir, socket) = serve().await;
        let missing = send(&socket, "POST", "/v1/vms", "", VM).await;
        assert_envelope(&missing, 415, "unsupported_media_type");
        let text = send(
            &socket,
            "POST",
            "/v1/vms",
            "Content-Type: text/plain\r\n",
            VM,
        )
        .await;
        assert_envelope(&text, 415, "unsupported_media_type");
        let huge = format!(r#"{{"name":"{}"}}"#, "a".repeat(BODY_LIMIT));
        let answer = send(&socket, "POST", "/v1/vms/web/attach", JSON, &huge).await;
        assert_envelope(&answer, 413, "payload_too_large");
        assert_envelope(
            &send(&socket, "POST", "/v1/vms", JSON, "{").await,
            400,
            "bad_request",
        );
        let unknown = r#"{"name":"web","colour":1}"#;
        let answer = send(&socket, "POST", "/v1/vms", JSON, unknown).await;
        assert_envelope(&answer, 400, "bad_request");
        // Nothing was registered by any of them.
        assert_eq!(
            send(&socket, "GET", "/v1/vms", "", "").await.body,
            json!({"vms": []})
        );
    }

    #[tokio::test]
    async fn the_generated_document_is_served_and_errors_are_its_envelope() {
        let (_dir, socket) = serve().await;
        let answer = send(&socket, "GET", "/v1/openapi.json", "", "").await;
        assert_eq!(answer.status, 200, "{}", answer.head);
        assert!(answer.head.contains("\r\ncontent-type: application/json"));
        let generated: Value = serde_json::from_str(openapi::json()).unwrap();
        assert_eq!(answer.body, generated);
        assert_eq!(generated["openapi"], "3.1.0");
        // Every error answer reads back as the API's error type.
        let answer = send(&socket, "GET", "/v1/vms/nope", "", "").await;
        let error: ErrorBody = serde_json::from_value(answer.body).unwrap();
        assert_eq!(error.error.code, ErrorCode::UnknownVm);
        assert_eq!(status_of_code(error.error.code).as_u16(), answer.status);
    }
}
