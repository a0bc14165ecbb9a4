//! The HTTP front: the homeserver's routes plus `/healthz`, `/metrics` and the
//! web demo (`/demo/`, embedded files from the `web-demo` crate).

use crate::drivers::media::ShardSet;
use crate::drivers::turn::TurnHandle;
use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use homeserver::Homeserver;
use std::sync::Arc;
use std::time::Instant;

/// The HTTP front; without a homeserver (bot mode) only the operational endpoints.
pub fn router(
    hs: Option<Arc<Homeserver>>,
    media: Option<ShardSet>,
    turn: Option<Arc<TurnHandle>>,
    started: Instant,
) -> Router {
    let metrics_hs = hs.clone();
    let ops = Router::new().route("/healthz", get(|| async { "ok\n" })).route(
        "/metrics",
        get(move || {
            let (hs, media, turn) = (metrics_hs.clone(), media.clone(), turn.clone());
            async move {
                let shards = match &media {
                    Some(media) => media.stats().await,
                    None => Vec::new(),
                };
                let turn = turn.map(|t| t.stats());
                let body = crate::metrics::render(started, hs.as_deref(), &shards, turn.as_ref());
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
            }
        }),
    );
    match hs {
        Some(hs) => ops.merge(web_demo_routes()).merge(homeserver::router(hs)),
        None => ops,
    }
}

/// The web demo at `/demo/` (and `/` leads there).
fn web_demo_routes() -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to(web_demo::MOUNT) }))
        .route("/demo", get(|| async { Redirect::to(web_demo::MOUNT) }))
        .route("/demo/", get(|| async { demo_file("") }))
        .route(
            "/demo/{file}",
            get(|Path(file): Path<String>| async move { demo_file(&file) }),
        )
}

fn demo_file(name: &str) -> Response {
    match web_demo::asset(name) {
        Some(asset) => (
            [
                (header::CONTENT_TYPE, asset.content_type),
                // Small files, and a new binary may bring new ones: always revalidate.
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            asset.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file in the web demo\n").into_response(),
    }
}
