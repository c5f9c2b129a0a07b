//! The route table and the translation of one request (method, path, body) into an
//! [`Action`] and of its reply into a response. Nothing here knows the HTTP crate: the server
//! hands over the method, the path and the whole body, and writes back an [`ApiResponse`].
//!
//! [`ROUTES`] is data on purpose: `vmm/tests/api_openapi.rs` compares it with `docs/api.yaml`.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::action::{
    Action, ActionError, ActionHandler, ActionReply, BalloonRequest, ErrorBody, MemoryRequest,
    ShutdownRequest, StateRequest, SwapRequest,
};
use crate::metrics;

/// What a route does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `GET /api/v1/vms`.
    ListVms,
    /// `GET /api/v1/vms/{id}`.
    GetVm,
    /// `PUT /api/v1/vms/{id}/state` with a [`StateRequest`].
    SetState,
    /// `PUT /api/v1/vms/{id}/shutdown` with an empty body or [`ShutdownRequest`].
    Shutdown,
    /// `GET /metrics`.
    Metrics,
    /// `PUT /api/v1/vms/{id}/balloon` with a [`BalloonRequest`].
    SetBalloon,
    /// `GET /api/v1/vms/{id}/balloon`.
    GetBalloon,
    /// `GET /api/v1/vms/{id}/balloon/stats`.
    GetBalloonStats,
    /// `GET /api/v1/vms/{id}/sharing`.
    GetSharing,
    /// `GET /api/v1/host`.
    GetHost,
    /// `PUT /api/v1/vms/{id}/memory` with a [`MemoryRequest`].
    SetMemory,
    /// `GET /api/v1/vms/{id}/memory`.
    GetMemory,
    /// `PUT /api/v1/vms/{id}/swap` with a [`SwapRequest`].
    SetSwap,
    /// `GET /api/v1/vms/{id}/swap`.
    GetSwap,
}

/// One route: a method and a path template, where `{id}` stands for one path segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// `GET` or `PUT`.
    pub method: &'static str,
    /// The path, as written in `docs/api.yaml`.
    pub path: &'static str,
    /// What the route does.
    pub kind: RouteKind,
}

/// Every route the server serves.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/api/v1/vms",
        kind: RouteKind::ListVms,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms/{id}",
        kind: RouteKind::GetVm,
    },
    Route {
        method: "PUT",
        path: "/api/v1/vms/{id}/state",
        kind: RouteKind::SetState,
    },
    Route {
        method: "PUT",
        path: "/api/v1/vms/{id}/shutdown",
        kind: RouteKind::Shutdown,
    },
    Route {
        method: "GET",
        path: "/metrics",
        kind: RouteKind::Metrics,
    },
    Route {
        method: "PUT",
        path: "/api/v1/vms/{id}/balloon",
        kind: RouteKind::SetBalloon,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms/{id}/balloon",
        kind: RouteKind::GetBalloon,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms/{id}/balloon/stats",
        kind: RouteKind::GetBalloonStats,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms/{id}/sharing",
        kind: RouteKind::GetSharing,
    },
    Route {
        method: "GET",
        path: "/api/v1/host",
        kind: RouteKind::GetHost,
    },
    Route {
        method: "PUT",
        path: "/api/v1/vms/{id}/memory",
        kind: RouteKind::SetMemory,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms/{id}/memory",
        kind: RouteKind::GetMemory,
    },
    Route {
        method: "PUT",
        path: "/api/v1/vms/{id}/swap",
        kind: RouteKind::SetSwap,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms/{id}/swap",
        kind: RouteKind::GetSwap,
    },
];

/// The longest VM id the API accepts.
pub const MAX_VM_ID_LEN: usize = 64;

/// A response, before the HTTP crate writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`, or `None` with an empty body.
    pub content_type: Option<&'static str>,
    /// The body.
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// A JSON body.
    pub fn json<T: Serialize>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => ApiResponse {
                status,
                content_type: Some("application/json"),
                body,
            },
            Err(e) => Self::error(500, format!("cannot encode the reply: {e}")),
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = ErrorBody {
            error: message.into(),
        };
        ApiResponse {
            status,
            content_type: Some("application/json"),
            // An ErrorBody is a struct with one string field: it always serializes.
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::error(400, message)
    }
}

/// The route `method` and `path` select, with the `{id}` segment if the template has one.
///
/// Errors are the messages of a 400: no route has this path, or none has this method for it.
pub fn match_route<'p>(
    method: &str,
    path: &'p str,
) -> Result<(&'static Route, Option<&'p str>), String> {
    let mut allowed = Vec::new();
    for route in ROUTES {
        if let Some(id) = match_template(route.path, path) {
            if route.method == method {
                return Ok((route, id));
            }
            allowed.push(route.method);
        }
    }
    if allowed.is_empty() {
        Err(format!("no route for {path}"))
    } else {
        Err(format!(
            "{method} is not allowed on {path} (allowed: {})",
            allowed.join(", ")
        ))
    }
}

/// `Some(id)` (or `Some(None)` for templates without `{id}`) when `path` fits `template`.
fn match_template<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    let mut want = template.split('/');
    let mut have = path.split('/');
    let mut id = None;
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(id),
            (Some("{id}"), Some(seg)) if !seg.is_empty() => id = Some(seg),
            (Some(w), Some(h)) if w == h => {}
            _ => return None,
        }
    }
}

fn check_vm_id(id: &str) -> Result<(), String> {
    let ok = id.len() <= MAX_VM_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid VM id {id:?}: use up to {MAX_VM_ID_LEN} letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Parses a JSON object body into `T`, refusing trailing data; the error is one line and
/// names the field when serde knows it.
///
/// Every request body is an object: serde's derived structs would also take an array of the
/// field values (`["paused"]`), which no client means.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("invalid body: expected a JSON object".to_owned());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        // "." is the root; "?" is a segment serde_path_to_error could not name.
        if matches!(path.as_str(), "" | "." | "?") {
            format!("invalid body: {}", e.inner())
        } else {
            format!("invalid body: {path}: {}", e.inner())
        }
    })?;
    de.end()
        .map_err(|e| format!("invalid body: trailing data after the JSON value: {e}"))?;
    Ok(value)
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// The action a request asks for.
fn build_action(route: &Route, body: &[u8]) -> Result<Action, String> {
    match route.kind {
        RouteKind::ListVms
        | RouteKind::GetVm
        | RouteKind::Metrics
        | RouteKind::GetBalloon
        | RouteKind::GetBalloonStats
        | RouteKind::GetSharing
        | RouteKind::GetHost
        | RouteKind::GetMemory
        | RouteKind::GetSwap => {
            if !body.is_empty() {
                return Err(format!("{} {} takes no body", route.method, route.path));
            }
            Ok(match route.kind {
                RouteKind::ListVms => Action::ListVms,
                RouteKind::GetVm => Action::GetVm,
                RouteKind::GetBalloon => Action::GetBalloon,
                RouteKind::GetBalloonStats => Action::GetBalloonStats,
                RouteKind::GetSharing => Action::GetSharing,
                RouteKind::GetHost => Action::GetHost,
                RouteKind::GetMemory => Action::GetMemory,
                RouteKind::GetSwap => Action::GetSwap,
                _ => Action::Metrics,
            })
        }
        RouteKind::SetBalloon => {
            if is_blank(body) {
                return Err(r#"missing body: expected {"target_mib": N}"#.to_owned());
            }
            let req: BalloonRequest = parse_body(body)?;
            Ok(Action::SetBalloon(req))
        }
        RouteKind::SetMemory => {
            if is_blank(body) {
                return Err(r#"missing body: expected {"requested_mib": N}"#.to_owned());
            }
            let req: MemoryRequest = parse_body(body)?;
            Ok(Action::SetMemory(req))
        }
        RouteKind::SetSwap => {
            if is_blank(body) {
                return Err(r#"missing body: expected {"target_mib": N}"#.to_owned());
            }
            let req: SwapRequest = parse_body(body)?;
            Ok(Action::SetSwap(req))
        }
        RouteKind::SetState => {
            if is_blank(body) {
                return Err(
                    r#"missing body: expected {"state": "paused"} or {"state": "running"}"#
                        .to_owned(),
                );
            }
            let req: StateRequest = parse_body(body)?;
            Ok(Action::SetState(req.state))
        }
        RouteKind::Shutdown => {
            if !is_blank(body) {
                let ShutdownRequest {} = parse_body(body)?;
            }
            Ok(Action::Shutdown)
        }
    }
}

/// The response for an action's outcome.
pub fn reply_response(result: Result<ActionReply, ActionError>) -> ApiResponse {
    match result {
        Ok(ActionReply::VmList(list)) => ApiResponse::json(200, &list),
        Ok(ActionReply::Vm(info)) => ApiResponse::json(200, &info),
        Ok(ActionReply::Accepted) => ApiResponse {
            status: 204,
            content_type: None,
            body: Vec::new(),
        },
        Ok(ActionReply::Balloon(info)) => ApiResponse::json(200, &info),
        Ok(ActionReply::BalloonStats(stats)) => ApiResponse::json(200, &stats),
        Ok(ActionReply::Json(value)) => ApiResponse::json(200, &value),
        Ok(ActionReply::Memory(status)) => ApiResponse::json(200, &status),
        Ok(ActionReply::Swap { status, accepted }) => {
            ApiResponse::json(if accepted { 202 } else { 200 }, &status)
        }
        Ok(ActionReply::Metrics(text)) => ApiResponse {
            status: 200,
            content_type: Some(metrics::CONTENT_TYPE),
            body: text.into_bytes(),
        },
        Err(e) => ApiResponse::error(e.http_status(), e.to_string()),
    }
}

/// Answers one request: route it, build the [`Action`], run it on `handler`, encode the reply.
pub fn dispatch(method: &str, path: &str, body: &[u8], handler: &dyn ActionHandler) -> ApiResponse {
    let (route, id) = match match_route(method, path) {
        Ok(found) => found,
        Err(message) => return ApiResponse::bad_request(message),
    };
    if let Some(id) = id {
        if let Err(message) = check_vm_id(id) {
            return ApiResponse::bad_request(message);
        }
    }
    let action = match build_action(route, body) {
        Ok(action) => action,
        Err(message) => return ApiResponse::bad_request(message),
    };
    reply_response(handler.handle(id, action))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::fake::FakeHandler;
    use crate::action::{ActionError, RunState, VmInfo, VmState};

    fn error_of(r: &ApiResponse) -> String {
        serde_json::from_slice::<ErrorBody>(&r.body)
            .expect("an error body")
            .error
    }

    #[test]
    fn every_route_matches_its_own_template() {
        for route in ROUTES {
            let path = route.path.replace("{id}", "vm0");
            let (found, id) = match_route(route.method, &path).expect("matches");
            assert_eq!(found, route);
            assert_eq!(id.is_some(), route.path.contains("{id}"));
        }
    }

    #[test]
    fn wrong_method_lists_the_allowed_ones() {
        let e = match_route("DELETE", "/api/v1/vms/vm0").expect_err("no DELETE");
        assert_eq!(e, "DELETE is not allowed on /api/v1/vms/vm0 (allowed: GET)");
    }

    #[test]
    fn empty_id_segment_and_trailing_slash_are_unknown_paths() {
        assert!(match_route("GET", "/api/v1/vms/").is_err());
        assert!(match_route("GET", "/api/v1/vms//state").is_err());
        assert!(match_route("GET", "/api/v1/vms/vm0/").is_err());
    }

    #[test]
    fn set_state_reaches_the_handler_as_an_action() {
        let h = FakeHandler::new(&["vm0"]);
        let r = dispatch(
            "PUT",
            "/api/v1/vms/vm0/state",
            br#"{"state": "paused"}"#,
            &h,
        );
        assert_eq!(r.status, 200);
        let info: VmInfo = serde_json::from_slice(&r.body).expect("VM info");
        assert_eq!(info.state, VmState::Paused);
        assert_eq!(
            h.actions(),
            vec![(Some("vm0".to_owned()), Action::SetState(RunState::Paused))]
        );
    }

    #[test]
    fn memory_and_swap_bodies_reach_the_handler_or_are_refused() {
        let h = FakeHandler::new(&["vm0"]);
        let r = dispatch("PUT", "/api/v1/vms/vm0/swap", br#"{"target_mib": 64}"#, &h);
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let r = dispatch("GET", "/api/v1/vms/vm0/swap", b"", &h);
        assert_eq!(r.status, 200);
        let r = dispatch(
            "PUT",
            "/api/v1/vms/vm0/memory",
            br#"{"requested_mib": 256}"#,
            &h,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        for (path, body, needle) in [
            ("/api/v1/vms/vm0/memory", &b""[..], "requested_mib"),
            (
                "/api/v1/vms/vm0/memory",
                br#"{"requested": 1}"#,
                "unknown field",
            ),
            (
                "/api/v1/vms/vm0/memory",
                br#"{"requested_mib": -1}"#,
                "requested_mib",
            ),
            ("/api/v1/vms/vm0/swap", b" ", "target_mib"),
            (
                "/api/v1/vms/vm0/swap",
                br#"{"target_mib": "64M"}"#,
                "invalid type",
            ),
        ] {
            let r = dispatch("PUT", path, body, &h);
            assert_eq!(r.status, 400, "{path} {:?}", String::from_utf8_lossy(body));
            assert!(error_of(&r).contains(needle), "{}", error_of(&r));
        }
        let acted: Vec<_> = h
            .actions()
            .into_iter()
            .map(|(_, a)| a)
            .filter(|a| matches!(a, Action::SetSwap(_) | Action::SetMemory(_)))
            .collect();
        assert_eq!(
            acted,
            vec![
                Action::SetSwap(SwapRequest { target_mib: 64 }),
                Action::SetMemory(MemoryRequest { requested_mib: 256 })
            ],
            "refused bodies never reach the handler"
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let h = FakeHandler::new(&["vm0"]);
        let r = dispatch("PUT", "/api/v1/vms/vm0/state", br#"{"state": 1}"#, &h);
        assert_eq!(r.status, 400);
        let e = error_of(&r);
        assert!(e.starts_with("invalid body: state: invalid type"), "{e}");
        assert!(h.actions().is_empty());
    }

    #[test]
    fn unknown_field_is_named() {
        let h = FakeHandler::new(&["vm0"]);
        let r = dispatch(
            "PUT",
            "/api/v1/vms/vm0/state",
            br#"{"state": "paused", "force": true}"#,
            &h,
        );
        assert_eq!(r.status, 400);
        assert!(error_of(&r).contains("unknown field `force`"), "{r:?}");
    }

    #[test]
    fn trailing_data_after_the_body_is_refused() {
        let h = FakeHandler::new(&["vm0"]);
        let r = dispatch(
            "PUT",
            "/api/v1/vms/vm0/state",
            br#"{"state": "paused"} {}"#,
            &h,
        );
        assert_eq!(r.status, 400);
        assert!(error_of(&r).contains("trailing data"), "{r:?}");
    }

    #[test]
    fn shutdown_accepts_an_empty_body_or_an_empty_object() {
        for body in [&b""[..], b"{}", b" \n"] {
            let h = FakeHandler::new(&["vm0"]);
            let r = dispatch("PUT", "/api/v1/vms/vm0/shutdown", body, &h);
            assert_eq!(r.status, 204, "{body:?}: {r:?}");
            assert_eq!(
                h.actions(),
                vec![(Some("vm0".to_owned()), Action::Shutdown)]
            );
        }
    }

    #[test]
    fn invalid_vm_id_is_a_bad_request_before_the_handler() {
        let h = FakeHandler::new(&["vm0"]);
        let r = dispatch("GET", "/api/v1/vms/vm%200", b"", &h);
        assert_eq!(r.status, 400);
        assert!(error_of(&r).starts_with("invalid VM id"), "{r:?}");
        let long = format!("/api/v1/vms/{}", "a".repeat(MAX_VM_ID_LEN + 1));
        assert_eq!(dispatch("GET", &long, b"", &h).status, 400);
        assert!(h.actions().is_empty());
    }

    #[test]
    fn get_with_a_body_is_refused() {
        let h = FakeHandler::new(&["vm0"]);
        let r = dispatch("GET", "/api/v1/vms", b"{}", &h);
        assert_eq!(r.status, 400);
        assert_eq!(error_of(&r), "GET /api/v1/vms takes no body");
    }

    #[test]
    fn handler_errors_keep_their_status_and_their_words() {
        let h = FakeHandler::new(&["vm0"]);
        assert_eq!(dispatch("GET", "/api/v1/vms/vm1", b"", &h).status, 404);
        let resume = br#"{"state": "running"}"#;
        for (error, status) in [
            (ActionError::BadRequest("scripted bad request".into()), 400),
            (ActionError::NotFound("vm5".into()), 404),
            (ActionError::Conflict("scripted conflict".into()), 409),
            (ActionError::Internal("scripted failure".into()), 500),
        ] {
            h.answer_next(Err(error.clone()));
            let r = dispatch("PUT", "/api/v1/vms/vm0/state", resume, &h);
            assert_eq!(r.status, status, "{error:?}");
            assert_eq!(error_of(&r), error.to_string());
        }
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let h = FakeHandler::new(&["vm0"]);
        let r = dispatch("GET", "/metrics", b"", &h);
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, Some(metrics::CONTENT_TYPE));
        let text = String::from_utf8(r.body).expect("utf-8");
        assert!(
            text.contains("# TYPE memvisor_vm_exits_total counter"),
            "{text}"
        );
    }
}
