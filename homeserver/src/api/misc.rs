//! `sendToDevice` and `/voip/turnServer`.

use crate::error::{ApiResult, MatrixError};
use crate::extract::{Auth, JsonBody, PathParams};
use crate::ids;
use crate::store::NewToDevice;
use crate::{Homeserver, Stats};
use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Most messages one `sendToDevice` request may fan out to.
const MAX_TO_DEVICE_TARGETS: usize = 1000;

#[derive(Deserialize)]
pub struct SendToDeviceRequest {
    messages: BTreeMap<String, Map<String, Value>>,
}

/// `PUT /sendToDevice/{type}/{txnId}`: `{messages: {user: {device | "*": content}}}`.
/// Messages to unknown users or devices are dropped, as the spec allows; a
/// repeated transaction id stores nothing twice.
pub async fn send_to_device(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((kind, txn_id)): PathParams<(String, String)>,
    JsonBody(req): JsonBody<SendToDeviceRequest>,
) -> ApiResult<Json<Value>> {
    if !ids::is_valid_opaque_id(&kind) || !ids::is_valid_opaque_id(&txn_id) {
        return Err(MatrixError::invalid_param("Invalid event type or transaction id"));
    }
    let mut wanted = Vec::new();
    for (user_id, devices) in req.messages {
        if !ids::is_valid_id(&user_id, '@') {
            return Err(MatrixError::invalid_param(format!("Invalid user id '{user_id}'")));
        }
        for (device_id, content) in devices {
            if !content.is_object() {
                return Err(MatrixError::bad_json("To-device contents must be objects"));
            }
            let content = content.to_string();
            if content.len() > super::MAX_EVENT_BYTES {
                return Err(MatrixError::too_large(
                    "To-device messages are limited to 65536 bytes each",
                ));
            }
            wanted.push((user_id.clone(), device_id, content));
        }
    }
    let sender = auth.session;
    let sent = hs
        .with_store(move |store| {
            let mut messages = Vec::new();
            let mut devices_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (user_id, device_id, content) in wanted {
                if !devices_of.contains_key(&user_id) {
                    devices_of.insert(user_id.clone(), store.devices(&user_id)?);
                }
                let known = &devices_of[&user_id];
                let targets: Vec<&String> = if device_id == "*" {
                    known.iter().collect()
                } else {
                    known.iter().filter(|d| **d == device_id).collect()
                };
                for device in targets {
                    messages.push(NewToDevice {
                        user_id: user_id.clone(),
                        device_id: device.clone(),
                        content: content.clone(),
                    });
                }
                if messages.len() > MAX_TO_DEVICE_TARGETS {
                    return Err(MatrixError::too_large(format!(
                        "At most {MAX_TO_DEVICE_TARGETS} devices per request"
                    )));
                }
            }
            let count = messages.len();
            let fresh = store.put_to_device(&sender, &txn_id, &kind, messages)?;
            Ok(if fresh { count } else { 0 })
        })
        .await?;
    hs.stats
        .to_device_sent
        .fetch_add(sent as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(Json(json!({})))
}

/// `GET /voip/turnServer`: TURN REST credentials for the configured URIs, or
/// `{}` when no TURN server is configured (as Synapse answers).
pub async fn turn_server(State(hs): State<Arc<Homeserver>>, auth: Auth) -> Json<Value> {
    let config = &hs.config;
    if config.turn_uris.is_empty() {
        return Json(json!({}));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ttl = config.turn_ttl.as_secs();
    let creds = config.turn_secret.mint(auth.user_id(), now, ttl);
    Stats::inc(&hs.stats.turn_credentials);
    Json(json!({ "username": creds.username, "password": creds.password, "uris": config.turn_uris, "ttl": ttl }))
}

/// No bridges: no third-party protocols.
pub async fn no_third_party_protocols(_auth: Auth) -> Json<Value> {
    Json(json!({}))
}

/// No server-side key backup: `M_NOT_FOUND`, which clients read as "no backup yet".
pub async fn no_key_backup(_auth: Auth) -> MatrixError {
    MatrixError::not_found("No current backup version")
}
