//! The HTTP front: the homeserver's routes plus `/healthz` and `/metrics`.

use crate::drivers::media::ShardSet;
use crate::drivers::turn::TurnHandle;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
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
        Some(hs) => ops.merge(homeserver::router(hs)),
        None => ops,
    }
}
