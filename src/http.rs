//! The HTTP front: the homeserver's routes plus `/healthz` and `/metrics`.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use homeserver::Homeserver;
use std::sync::Arc;
use std::time::Instant;

pub fn router(hs: Arc<Homeserver>, started: Instant) -> Router {
    let metrics_hs = Arc::clone(&hs);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let body = crate::metrics::render(started, &metrics_hs);
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response() }
            }),
        )
        .merge(homeserver::router(hs))
}
