"""A check scripts/schema-fuzz adds to schemathesis's own (loaded through SCHEMATHESIS_HOOKS).

schemathesis skips its conformance checks on the requests it sends only to probe the server's
shape, such as a method the document does not list; this check looks at every response of the
run, those included: an error is always the document's envelope, as JSON, and a 405 says which
methods the path has.
"""

import json

import jsonschema_rs
import schemathesis

_validators = {}


def _error_validator(case):
    """The document's `Error` schema, its references resolved in the document."""
    raw = case.operation.schema.raw_schema
    key = id(raw)
    if key not in _validators:
        schema = {"$ref": "#/components/schemas/Error", "components": raw["components"]}
        _validators[key] = jsonschema_rs.validator_for(schema)
    return _validators[key]


def _header(response, name):
    """A header's values joined (schemathesis keeps them lowercased, as lists)."""
    return ", ".join(response.headers.get(name, []))


@schemathesis.check
def error_envelope(ctx, response, case):
    if response.status_code < 400:
        return None
    what = f"{response.request.method} {response.request.url} answered {response.status_code}"
    content_type = _header(response, "content-type") or ""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise AssertionError(
            f"{what} with Content-Type {content_type!r}, not the JSON error envelope:"
            f" {response.content[:200]!r}"
        )
    if response.status_code == 405 and not _header(response, "allow"):
        raise AssertionError(f"{what} without an `Allow` header")
    if response.request.method == "HEAD":
        return None  # the headers are a GET's; HTTP gives a HEAD answer no body
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise AssertionError(f"{what} with a body that is not JSON ({exc}): {response.content[:200]!r}")
    errors = [str(e) for e in _error_validator(case).iter_errors(body)]
    if errors:
        raise AssertionError(f"{what} with a body that is not the `Error` schema: {errors}; {body}")
    return None
