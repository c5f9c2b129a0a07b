//! The REST API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket PATH`).
//!
//! [`server`] owns the socket and the HTTP connections; [`routes`] turns each request into an
//! [`crate::action::Action`] for an [`crate::action::ActionHandler`] and the reply into a
//! response. `docs/api.md` is the user's guide and `docs/api.yaml` the OpenAPI description.

pub mod routes;
pub mod server;

pub use routes::{ApiResponse, Route, RouteKind, ROUTES};
pub use server::{ApiError, ApiServer, MAX_BODY_BYTES, MAX_CONNECTIONS};
