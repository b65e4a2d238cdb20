//! Every table that routes is the route table: the cargo-lambda router in the root
//! manifest must name exactly the methods, paths and functions of `ROUTES`.

use std::collections::BTreeSet;

#[test]
fn the_cargo_lambda_router_is_the_route_table() {
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"),
    )
    .unwrap();
    let manifest: toml::Table = toml::from_str(&manifest).unwrap();
    let router = manifest["workspace"]["metadata"]["lambda"]["watch"]["router"]
        .as_table()
        .expect("[workspace.metadata.lambda.watch.router]");
    let mut entries = BTreeSet::new();
    for (path, routes) in router {
        for route in routes.as_array().expect("one array of routes per path") {
            entries.insert((
                route["method"].as_str().unwrap().to_owned(),
                path.clone(),
                route["function"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let table: BTreeSet<_> = tally_api::ROUTES
        .iter()
        .map(|r| {
            (
                r.method.to_owned(),
                r.path.to_owned(),
                r.function.to_owned(),
            )
        })
        .collect();
    assert_eq!(entries, table);
}
