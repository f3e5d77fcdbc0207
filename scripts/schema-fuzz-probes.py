"""Deterministic probes scripts/schema-fuzz sends before the fuzzer: first, that the daemon
serves the document being fuzzed against (GET /v1/openapi.json is docs/openapi.json); then what
a schema-driven fuzzer does not generate: path segments that do not percent-decode to UTF-8,
methods a path does not have, bodies that are not JSON or too large, unknown paths.

    python3 schema-fuzz-probes.py OPENAPI_JSON API_SOCKET

Each answer must be the status the probe expects, documented for the operation, with the
document's `Error` envelope as JSON (and `Allow` on a 405); the VMs and inventory must be the
same afterwards (no error changes any state). Raw HTTP/1.1 on the unix socket, so the bytes of
the path and the headers are exactly the probe's. Exits 1 if any probe failed.
"""

import json
import socket
import sys

import jsonschema_rs

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
# Segments that are not UTF-8 once percent-decoded: a lone byte, a broken sequence, a surrogate.
UNDECODABLE = ["%FF", "%C3%28", "%ED%A0%80"]
# Values for the path parameters when they are not the probe's subject: a VM the script made.
GOOD = {"name": "web", "local_index": "0", "global_index": "999"}


def send(sock_path, method, path, headers=(), body=b""):
    head = [f"{method} {path} HTTP/1.1", "Host: vfmap", "Connection: close"]
    head += list(headers)
    head.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(sock_path)
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (413) before the whole body was read
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return status, fields, body


def main():
    doc_path, sock_path = sys.argv[1], sys.argv[2]
    with open(doc_path) as f:
        doc = json.load(f)
    error_schema = jsonschema_rs.validator_for(
        {"$ref": "#/components/schemas/Error", "components": doc["components"]}
    )
    schemas = doc["components"]["schemas"]
    examples = {
        "/v1/vms": schemas["NewVm"]["examples"][0],
        "/v1/vms/{name}/attach": schemas["AttachRequest"]["examples"][0],
    }
    passed, failed = 0, []

    status, fields, raw = send(sock_path, "GET", "/v1/openapi.json")
    try:
        served = json.loads(raw)
    except ValueError:
        served = None
    if status != 200 or served != doc:
        failed.append(
            f"GET /v1/openapi.json answered {status} with a document that is not {doc_path};"
            " regenerate it with `VFMAP_BLESS=1 cargo test -p vfmap-daemon openapi`"
        )
    else:
        passed += 1

    def probe(label, method, path, want_status, want_code, documented, headers=(), body=b"", allow=None):
        nonlocal passed
        status, fields, raw = send(sock_path, method, path, headers, body)
        problems = []
        if status != want_status:
            problems.append(f"status {status}, want {want_status}")
        if str(status) not in documented:
            problems.append(f"status {status} is not documented for it ({', '.join(documented)})")
        content_type = fields.get("content-type", "")
        if content_type.split(";")[0].strip() != "application/json":
            problems.append(f"Content-Type {content_type!r}")
        try:
            value = json.loads(raw)
            errors = [str(e) for e in error_schema.iter_errors(value)]
            if errors:
                problems.append(f"not the Error schema: {errors}")
            elif value["error"]["code"] != want_code:
                problems.append(f"code {value['error']['code']!r}, want {want_code!r}")
        except ValueError:
            problems.append("the body is not JSON")
        if allow is not None:
            got = {m.strip() for m in fields.get("allow", "").split(",") if m.strip()}
            if got != allow:
                problems.append(f"Allow {fields.get('allow')!r}, want {','.join(sorted(allow))}")
        if problems:
            failed.append(f"{label}: {method} {path}: {'; '.join(problems)}: {raw[:300]!r}")
        else:
            passed += 1

    def fill(template, **values):
        path = template
        for name, good in GOOD.items():
            path = path.replace("{" + name + "}", values.get(name, good))
        return path

    def snapshot():
        return [send(sock_path, "GET", p)[2] for p in ("/v1/vms", "/v1/inventory")]

    before = snapshot()
    for template, item in doc["paths"].items():
        ops = {m.upper(): op for m, op in item.items() if m.upper() in METHODS}
        want_allow = set(ops) | ({"HEAD"} if "GET" in ops else set())
        every = set.intersection(*(set(op["responses"]) for op in ops.values()))
        for method in METHODS:
            if method not in ops:
                probe("method not allowed", method, fill(template), 405, "method_not_allowed", every,
                      allow=want_allow)
        for method, op in ops.items():
            documented = list(op["responses"])
            body = json.dumps(examples.get(template, {})).encode()
            json_body = ("Content-Type: application/json",)
            for name in GOOD:
                if "{" + name + "}" not in template:
                    continue
                for bad in UNDECODABLE:
                    path = fill(template, **{name: bad})
                    extra = (json_body, body) if "requestBody" in op else ((), b"")
                    probe(f"undecodable {name}", method, path, 400, "bad_request", documented, *extra)
            if "requestBody" not in op:
                continue
            path = fill(template)
            probe("no Content-Type", method, path, 415, "unsupported_media_type", documented, (), body)
            text = ("Content-Type: text/plain",)
            probe("text body", method, path, 415, "unsupported_media_type", documented, text, body)
            huge = b'{"x":"' + b"a" * 70000 + b'"}'
            probe("body over 64 KiB", method, path, 413, "payload_too_large", documented, json_body, huge)
            probe("malformed JSON", method, path, 400, "bad_request", documented, json_body, b"{")
            probe("not an object", method, path, 400, "bad_request", documented, json_body, b"[]")
    for path in ("/v1/nothing", "/v1/vms/web/extra", "/", "/v1/vms/"):
        probe("unknown path", "GET", path, 404, "not_found", ["404"])
    if snapshot() != before:
        failed.append("the probes changed the VMs or the inventory")
    for line in failed:
        print(f"FAILED {line}")
    print(f"probes: {passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
