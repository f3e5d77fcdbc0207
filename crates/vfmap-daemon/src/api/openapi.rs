//! The API's OpenAPI 3.1 document, generated: the paths from the handlers' `#[utoipa::path]`
//! in [`super`], the bodies from `vfmap-api`'s types, the validated values from vfmap-core's
//! `openapi` feature, and the answers several operations share from the types below.
//!
//! Served at `GET /v1/openapi.json` and committed as `docs/openapi.json`; the test
//! `openapi_document_is_committed` (in `tests/openapi.rs`) fails when the two differ, and
//! `VFMAP_BLESS=1 cargo test -p vfmap-daemon openapi` rewrites the file.

use std::borrow::Cow;
use std::sync::LazyLock;

use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{OpenApi, PartialSchema, ToResponse, ToSchema};
use vfmap_api::ErrorBody;

// The handlers, for `paths(...)` (utoipa finds each one's declaration beside it).
use super::{
    __path_add_vm, __path_attach, __path_clear_quarantine, __path_detach, __path_get_vm,
    __path_health, __path_inventory, __path_list_quarantine, __path_list_vms, __path_metrics,
    __path_openapi_document, __path_program_vf, __path_remove_vm,
};

/// What the document says before its paths.
const DESCRIPTION: &str = "\
HTTP/1.1 + JSON on the daemon's unix socket (`socket` in the config, mode 0600), e.g.
`curl --unix-socket /run/vfmap/vfmap.sock http://vfmap/v1/health`.

Responses are JSON, except `GET /metrics` (the Prometheus text format, for scrapers).
Request bodies are JSON (`Content-Type: application/json`, else 415), at most 65,536 bytes
(else 413), and reject unknown fields (400). Every error, on any path and method, is
`{\"error\": {\"code\": \"<stable code>\", \"message\": \"<one line>\", ...}}` (schema `Error`;
`ErrorCode` lists the codes), and no error changes any state. An unknown path is a
404 `not_found`; a known path with a method it does not have is a 405 `method_not_allowed` with
an `Allow` header; a path segment that does not percent-decode to UTF-8 is a 400 `bad_request`.
Each code has one status; the mapping of engine errors to codes is `status_of` in
`crates/vfmap-daemon/src/api.rs`.

Statuses that any change (POST, DELETE) may answer besides its own: 500 `state_error` (the
state could not be committed; the daemon is then degraded) and 503 `degraded` (an earlier
commit failed: restart the daemon).

Start-up: the socket answers from the moment it is bound, before the host is read and the
state recovered. `GET /v1/health` (200, `status: starting` and its `phase`) and
`GET /v1/openapi.json` answer at once. Every other request needs the pool: it waits until the
daemon is ready, at most 10 s or what `Prefer: wait=N` (RFC 7240, seconds) asks if less, and
then gets 503 `starting` with `Retry-After`, having changed nothing. The pool is ready only
after recovery has settled every stored assignment, so no VF is handed out before its state
is known.

This document is generated from the daemon's code (`vfmap-api`'s types and the handlers'
declarations) and served at `GET /v1/openapi.json`. `scripts/schema-fuzz` checks the daemon
against it with a schema-driven fuzzer; a response field or status that is not documented
here fails it.";

/// The document's skeleton; [`document`] is what is served.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vfmap host daemon API",
        version = "1",
        description = DESCRIPTION,
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((url = "http://vfmap/")),
    paths(
        health,
        inventory,
        list_vms,
        add_vm,
        get_vm,
        remove_vm,
        attach,
        detach,
        list_quarantine,
        clear_quarantine,
        program_vf,
        openapi_document,
        metrics,
    ),
    components(
        schemas(vfmap_api::ErrorBody),
        responses(
            BadRequest,
            BadPath,
            NotFound,
            MethodNotAllowed,
            PayloadTooLarge,
            UnsupportedMediaType,
            SideEffectFailed,
            TimedOut,
            StateError,
            Unavailable,
        )
    )
)]
struct ApiDoc;

/// The API's document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    // utoipa closes structs with `deny_unknown_fields` (`additionalProperties: false`) but not
    // the objects of an enum's variants; the daemon refuses unknown fields there too.
    if let Some(components) = doc.components.as_mut() {
        for name in ["NewVmBackend", "VmBackend"] {
            if let Some(schema) = components.schemas.get_mut(name) {
                close_objects(schema);
            }
        }
    }
    doc
}

/// Sets `additionalProperties: false` on every inline object in `schema` (through `oneOf`
/// and object properties; references are left alone).
fn close_objects(schema: &mut RefOr<Schema>) {
    use utoipa::openapi::schema::AdditionalProperties;
    match schema {
        RefOr::T(Schema::OneOf(one_of)) => one_of.items.iter_mut().for_each(close_objects),
        RefOr::T(Schema::Object(object)) => {
            object.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
            object.properties.values_mut().for_each(close_objects);
        }
        _ => {}
    }
}

/// The document as served and committed: pretty JSON with a final newline.
pub fn json() -> &'static str {
    static JSON: LazyLock<String> = LazyLock::new(|| {
        let mut text = document()
            .to_pretty_json()
            .expect("the document serialises");
        text.push('\n');
        text
    });
    &JSON
}

/// `bad_request`: malformed body, unknown field, invalid value, or a path segment that does
/// not decode
#[derive(ToResponse)]
pub struct BadRequest(pub ErrorBody);

/// `bad_request`: a path segment does not percent-decode to UTF-8
#[derive(ToResponse)]
pub struct BadPath(pub ErrorBody);

/// `unknown_vm`
#[derive(ToResponse)]
pub struct NotFound(pub ErrorBody);

/// `method_not_allowed`: the path exists, the method does not; `Allow` lists the methods it has
#[derive(ToResponse)]
#[response(headers(("Allow" = String, description = "The path's methods, e.g. `GET,HEAD,POST`")))]
pub struct MethodNotAllowed(pub ErrorBody);

/// `payload_too_large`: the body is over 65,536 bytes
#[derive(ToResponse)]
pub struct PayloadTooLarge(pub ErrorBody);

/// `unsupported_media_type`: the body is not sent as `application/json`
#[derive(ToResponse)]
pub struct UnsupportedMediaType(pub ErrorBody);

/// The hypervisor or the agent failed: `vm_not_running`, `slot_unknown`, `slot_occupied`,
/// `hypervisor_failed`, `agent_unreachable`, `agent_failed`, or `attach_failed` /
/// `detach_failed` for anything else; an attach was rolled back, a detach can be retried
#[derive(ToResponse)]
pub struct SideEffectFailed(pub ErrorBody);

/// `hypervisor_timeout` (a hung QEMU) or `agent_timeout` (is vfmap-agent running?); an attach
/// was rolled back, or its VF is kept out of the pool while its cleanup is retried
#[derive(ToResponse)]
pub struct TimedOut(pub ErrorBody);

/// `state_error`: the change could not be committed; the daemon is degraded from now on
#[derive(ToResponse)]
pub struct StateError(pub ErrorBody);

/// `starting`: the daemon is starting and its pool was not ready within the request's wait
/// (10 s, or less with `Prefer: wait=N`); retry after `Retry-After`. Or `degraded`: an earlier
/// commit failed, or the start-up failed; restart the daemon
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "With `starting`: seconds to wait before retrying")))]
pub struct Unavailable(pub ErrorBody);

/// The body of `GET /v1/openapi.json`: an OpenAPI 3.1 document (this one).
pub enum OpenApiDocument {}

impl PartialSchema for OpenApiDocument {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("An OpenAPI 3.1 document: this one"))
            .into()
    }
}

impl ToSchema for OpenApiDocument {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("OpenApiDocument")
    }
}
