//! The HTTP surface: routes, CORS, error fallbacks and the client event format.

mod account;
mod misc;
mod rooms;
mod sync;

use crate::error::MatrixError;
use crate::store::{Event, Session};
use crate::{Homeserver, Stats};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Serialize;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Instant;
use tower_http::cors::{Any, CorsLayer};

/// Largest request body accepted (to-device batches can be large; events are
/// limited separately to 65,536 bytes).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest event content, per the spec's limit on the whole event.
pub const MAX_EVENT_BYTES: usize = 65_536;

/// The homeserver's routes; merge them into the binary's router.
pub fn router(hs: Arc<Homeserver>) -> Router {
    let client = Router::new()
        // Account.
        .route("/login", get(account::login_flows).post(account::login))
        .route("/logout", post(account::logout))
        .route("/logout/all", post(account::logout_all))
        .route("/register", post(account::register))
        .route("/register/available", get(account::register_available))
        .route("/account/whoami", get(account::whoami))
        .route("/capabilities", get(account::capabilities))
        .route("/pushrules/", get(account::push_rules))
        .route("/pushrules", get(account::push_rules))
        .route("/user/{user_id}/filter", post(account::create_filter))
        .route("/user/{user_id}/filter/{filter_id}", get(account::get_filter))
        .route("/profile/{user_id}", get(account::get_profile))
        .route(
            "/profile/{user_id}/{field}",
            get(account::get_profile_field).put(account::set_profile_field),
        )
        .route(
            "/user/{user_id}/account_data/{kind}",
            get(account::get_account_data).put(account::set_account_data),
        )
        .route(
            "/user/{user_id}/rooms/{room_id}/account_data/{kind}",
            get(account::get_room_account_data).put(account::set_room_account_data),
        )
        // Rooms.
        .route("/createRoom", post(rooms::create_room))
        .route("/joined_rooms", get(rooms::joined_rooms))
        .route("/rooms/{room_id}/invite", post(rooms::invite))
        .route("/rooms/{room_id}/join", post(rooms::join))
        .route("/join/{room_id}", post(rooms::join))
        .route("/rooms/{room_id}/leave", post(rooms::leave))
        .route("/rooms/{room_id}/forget", post(rooms::forget))
        .route("/rooms/{room_id}/members", get(rooms::members))
        .route("/rooms/{room_id}/joined_members", get(rooms::joined_members))
        .route("/rooms/{room_id}/state", get(rooms::all_state))
        .route(
            "/rooms/{room_id}/state/{kind}",
            get(rooms::get_state_empty_key).put(rooms::put_state_empty_key),
        )
        .route(
            "/rooms/{room_id}/state/{kind}/",
            get(rooms::get_state_empty_key).put(rooms::put_state_empty_key),
        )
        .route(
            "/rooms/{room_id}/state/{kind}/{state_key}",
            get(rooms::get_state).put(rooms::put_state),
        )
        .route("/rooms/{room_id}/send/{kind}/{txn_id}", put(rooms::send))
        .route("/rooms/{room_id}/event/{event_id}", get(rooms::get_event))
        .route("/rooms/{room_id}/messages", get(rooms::messages))
        // Sync, to-device, VoIP.
        .route("/sync", get(sync::sync))
        .route("/sendToDevice/{kind}/{txn_id}", put(misc::send_to_device))
        .route("/voip/turnServer", get(misc::turn_server))
        // Element Web asks for these; answer as a server without the features does.
        .route("/thirdparty/protocols", get(misc::no_third_party_protocols))
        .route("/room_keys/version", get(misc::no_key_backup));

    Router::new()
        .route("/_matrix/client/versions", get(account::versions))
        .route("/.well-known/matrix/client", get(account::well_known))
        .nest("/_matrix/client/v3", client.clone())
        .nest("/_matrix/client/r0", client)
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(Arc::clone(&hs), observe))
        .layer(cors())
        .with_state(hs)
}

/// Browser apps are served from other origins: allow any origin (no cookies are used).
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("x-requested-with"),
        ])
}

/// Counts requests, answers bare `OPTIONS` with 200 and logs each request at
/// debug level by path only (query strings may carry access tokens).
async fn observe(State(hs): State<Arc<Homeserver>>, req: Request, next: Next) -> Response {
    Stats::inc(&hs.stats.requests);
    if req.method() == Method::OPTIONS {
        return (StatusCode::OK, axum::Json(serde_json::json!({}))).into_response();
    }
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    response
}

async fn fallback() -> MatrixError {
    MatrixError::unrecognized(StatusCode::NOT_FOUND)
}

async fn method_not_allowed() -> MatrixError {
    MatrixError::unrecognized(StatusCode::METHOD_NOT_ALLOWED)
}

/// An event in the client format
/// (<https://spec.matrix.org/v1.13/client-server-api/#room-event-format>).
#[derive(Serialize)]
struct ClientEvent<'a> {
    content: &'a RawValue,
    event_id: &'a str,
    origin_server_ts: u64,
    room_id: &'a str,
    sender: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_key: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'a str,
    unsigned: Unsigned<'a>,
}

#[derive(Serialize)]
struct Unsigned<'a> {
    age: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    transaction_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_content: Option<&'a RawValue>,
}

/// Serializes a stored event for `viewer`: `unsigned.transaction_id` only for
/// the device that sent it.
pub(crate) fn client_event(event: &Event, viewer: &Session, now_ms: u64) -> Box<RawValue> {
    let transaction_id = event
        .txn
        .as_ref()
        .filter(|txn| event.sender == viewer.user_id && txn.device_id == viewer.device_id)
        .map(|txn| txn.txn_id.as_str());
    let client = ClientEvent {
        content: &event.content,
        event_id: &event.event_id,
        origin_server_ts: event.origin_server_ts,
        room_id: &event.room_id,
        sender: &event.sender,
        state_key: event.state_key.as_deref(),
        kind: &event.kind,
        unsigned: Unsigned {
            age: now_ms.saturating_sub(event.origin_server_ts),
            transaction_id,
            prev_content: event.prev_content.as_deref(),
        },
    };
    // Serializing borrowed strings and already-valid raw JSON cannot fail.
    serde_json::value::to_raw_value(&client).expect("a client event serializes")
}

/// The "stripped state" form used in `invite_state`.
pub(crate) fn stripped_event(event: &Event) -> Box<RawValue> {
    #[derive(Serialize)]
    struct Stripped<'a> {
        content: &'a RawValue,
        sender: &'a str,
        state_key: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
    }
    let stripped = Stripped {
        content: &event.content,
        sender: &event.sender,
        state_key: event.state_key.as_deref().unwrap_or(""),
        kind: &event.kind,
    };
    serde_json::value::to_raw_value(&stripped).expect("a stripped event serializes")
}

/// Pagination and sync tokens: `s{position}`.
pub(crate) fn parse_token(token: &str) -> Result<i64, MatrixError> {
    token
        .strip_prefix('s')
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| MatrixError::invalid_param(format!("Unknown token '{token}'")))
}

pub(crate) fn token(pos: i64) -> String {
    format!("s{pos}")
}
