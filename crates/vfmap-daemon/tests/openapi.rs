//! The API document: the committed `docs/openapi.json` is the one the code generates (and
//! serves at `GET /v1/openapi.json`), and it documents every error code the daemon answers.
//!
//! After changing an API type or a handler's declaration, regenerate the file with
//! `VFMAP_BLESS=1 cargo test -p vfmap-daemon openapi` and commit it.

use std::path::PathBuf;

use serde_json::Value;
use vfmap_api::ErrorCode;
use vfmap_daemon::api::openapi;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

#[test]
fn openapi_document_is_committed() {
    let generated = openapi::json();
    let path = committed_path();
    if std::env::var_os("VFMAP_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, generated).expect("write docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed == generated {
        return;
    }
    let first = committed
        .lines()
        .zip(generated.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
    panic!(
        "docs/openapi.json is not the document the code generates (first difference at line \
         {}: committed {:?}, generated {:?}).\nRegenerate it with \
         `VFMAP_BLESS=1 cargo test -p vfmap-daemon openapi` and commit it.",
        first + 1,
        committed.lines().nth(first).unwrap_or("<end of file>"),
        generated.lines().nth(first).unwrap_or("<end of file>"),
    );
}

/// The code names in backticks in `text`, e.g. `unknown_vm`.
fn mentioned<'a>(text: &'a str, codes: &[&'a str]) -> Vec<&'a str> {
    codes
        .iter()
        .copied()
        .filter(|code| text.contains(&format!("`{code}`")))
        .collect()
}

#[test]
fn openapi_documents_every_error_code_under_its_status() {
    let doc: Value = serde_json::from_str(openapi::json()).unwrap();
    let names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();

    // The schema lists exactly the codes, and the envelope uses it.
    let listed: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode is an enum schema")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, names);
    assert_eq!(
        doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["$ref"],
        "#/components/schemas/ErrorCode"
    );

    // Every operation's answers, shared ones resolved: each code an answer names is of that
    // answer's status, and each code is named by some answer (or, for answers outside any
    // operation, by the document's description with its status).
    let mut documented: Vec<&str> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                let response = match response["$ref"].as_str() {
                    Some(reference) => {
                        let name = reference.rsplit('/').next().unwrap();
                        &doc["components"]["responses"][name]
                    }
                    None => response,
                };
                let description = response["description"].as_str().unwrap_or_default();
                for code in mentioned(description, &names) {
                    let want = ErrorCode::ALL
                        .iter()
                        .find(|c| c.as_str() == code)
                        .unwrap()
                        .status();
                    assert_eq!(
                        status,
                        &want.to_string(),
                        "{method} {path}: `{code}` is documented under {status}, its status is \
                         {want}"
                    );
                    if status.starts_with('4') || status.starts_with('5') {
                        let schema = &response["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(schema, "#/components/schemas/Error", "{method} {path}");
                    }
                    documented.push(code);
                }
            }
        }
    }
    let description = doc["info"]["description"].as_str().unwrap();
    for code in ErrorCode::ALL {
        let in_description = description.contains(&format!("{} `{code}`", code.status()));
        assert!(
            documented.contains(&code.as_str()) || in_description,
            "`{code}` is not documented as any operation's answer, nor with its status in the \
             document's description"
        );
    }
}
