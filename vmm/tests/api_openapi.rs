//! `docs/api.yaml` and the server's route table describe the same routes.

use std::collections::BTreeSet;

use vmm::api::ROUTES;

const HTTP_METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

fn spec() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.yaml");
    let text = std::fs::read_to_string(path).expect("docs/api.yaml is readable");
    serde_yaml_ng::from_str(&text).expect("docs/api.yaml is valid YAML")
}

fn documented_routes(spec: &serde_json::Value) -> BTreeSet<(String, String)> {
    let paths = spec["paths"].as_object().expect("a paths map");
    let mut routes = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item map");
        for method in item.keys().filter(|k| HTTP_METHODS.contains(&k.as_str())) {
            routes.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    routes
}

#[test]
fn openapi_file_and_route_table_list_the_same_routes() {
    let documented = documented_routes(&spec());
    let served: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but missing from docs/api.yaml: {undocumented:?}; \
         in docs/api.yaml but not served: {unserved:?}"
    );
}

#[test]
fn openapi_file_is_version_3_and_every_operation_documents_400() {
    let spec = spec();
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "openapi: {}",
        spec["openapi"]
    );
    for (method, path) in documented_routes(&spec) {
        let op = &spec["paths"][&path][method.to_ascii_lowercase()];
        assert!(
            op["responses"].get("400").is_some(),
            "{method} {path} does not document its 400 response"
        );
        if path.contains("{id}") {
            assert!(
                op["responses"].get("404").is_some(),
                "{method} {path} does not document its 404 response"
            );
        }
    }
}
