//! The OpenAPI document is generated from the code, committed, and kept in step with the
//! route table. Regenerate the committed copy with `make openapi`.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi.json")
}

#[test]
fn the_committed_openapi_document_is_current() {
    let generated = tally_api::openapi::document();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(committed_path(), &generated).unwrap();
    }
    let committed = std::fs::read_to_string(committed_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.json is out of date with the code: run `make openapi` and commit it"
    );
}

#[test]
fn the_openapi_document_has_exactly_the_routes_of_the_route_table() {
    let doc = tally_api::openapi::value();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = tally_api::ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    assert_eq!(documented, routed);
}

#[test]
fn every_problem_type_is_listed_in_the_document() {
    let doc = tally_api::openapi::value();
    let listed = doc["components"]["schemas"]["ProblemBody"]["properties"]["type"]["enum"]
        .as_array()
        .expect("ProblemBody.type lists its values")
        .len();
    assert_eq!(listed, tally_api::PROBLEM_KINDS.len());
}
