//! Rooms: creation, membership, state, messages, pagination.
//!
//! Every write is one closure run under the store's single owner: read what the
//! rules need, check, append. Nothing interleaves between the check and the write.

use super::{MAX_EVENT_BYTES, client_event, parse_token, token};
use crate::error::{ApiResult, MatrixError};
use crate::extract::{Auth, JsonBody, PathParams, QueryParams};
use crate::ids;
use crate::rules::{PowerLevels, check_power_levels_change, default_power_levels};
use crate::store::{Event, Membership, NewEvent, Session, Store, StreamPos, TxnKey};
use crate::{Homeserver, Stats, now_ms};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::sync::Arc;

const ROOM_VERSION: &str = "10";
const MAX_PAGINATION_LIMIT: usize = 1000;

fn new_event(room_id: &str, sender: &str, kind: &str, state_key: Option<&str>, content: Value) -> NewEvent {
    NewEvent {
        event_id: ids::new_event_id(),
        room_id: room_id.to_string(),
        sender: sender.to_string(),
        kind: kind.to_string(),
        state_key: state_key.map(str::to_string),
        content: content.to_string(),
        origin_server_ts: now_ms(),
        txn: None,
    }
}

fn check_room_id(room_id: &str) -> ApiResult<()> {
    if ids::is_valid_id(room_id, '!') {
        Ok(())
    } else if room_id.starts_with('#') {
        Err(MatrixError::not_found(
            "Room aliases are not supported by this server; join by room id",
        ))
    } else {
        Err(MatrixError::invalid_param("Invalid room id"))
    }
}

fn check_content_size(content: &str) -> ApiResult<()> {
    if content.len() > MAX_EVENT_BYTES {
        Err(MatrixError::too_large("Events are limited to 65536 bytes"))
    } else {
        Ok(())
    }
}

fn power_levels(store: &dyn Store, room_id: &str) -> ApiResult<PowerLevels> {
    Ok(match store.state_event(room_id, "m.room.power_levels", "")? {
        Some(event) => PowerLevels::from_content(&serde_json::from_str(event.content.get()).unwrap_or(Value::Null)),
        None => PowerLevels::default(),
    })
}

fn content_field(event: &Event, field: &str) -> Option<String> {
    let content: Value = serde_json::from_str(event.content.get()).ok()?;
    content.get(field)?.as_str().map(str::to_string)
}

fn membership_of(store: &dyn Store, room_id: &str, user_id: &str) -> ApiResult<Option<Membership>> {
    Ok(store.membership(room_id, user_id)?.map(|m| m.membership))
}

fn require_joined(store: &dyn Store, room_id: &str, user_id: &str) -> ApiResult<()> {
    match membership_of(store, room_id, user_id)? {
        Some(Membership::Join) => Ok(()),
        _ => Err(MatrixError::forbidden(format!("You are not joined to {room_id}"))),
    }
}

/// The highest position a user may read in a room: everything while joined,
/// up to their departure after leaving; nothing if they never were a member.
fn visible_upto(store: &dyn Store, room_id: &str, user_id: &str) -> ApiResult<StreamPos> {
    match store.membership(room_id, user_id)? {
        Some(m) if m.membership == Membership::Join => Ok(store.current_pos()),
        Some(m) if matches!(m.membership, Membership::Leave | Membership::Ban) => {
            // Members who left keep read access up to their departure; an invite
            // that was rejected (invite -> leave) never granted any.
            let departure = store.state_event(room_id, "m.room.member", user_id)?;
            let was_joined = departure
                .and_then(|e| e.prev_content)
                .and_then(|prev| serde_json::from_str::<Value>(prev.get()).ok())
                .is_some_and(|prev| prev.get("membership").and_then(Value::as_str) == Some("join"));
            if was_joined {
                Ok(m.pos)
            } else {
                Err(MatrixError::forbidden("You were never joined to this room"))
            }
        }
        _ => Err(MatrixError::forbidden(format!("You are not joined to {room_id}"))),
    }
}

// ---- createRoom -------------------------------------------------------------

#[derive(Deserialize)]
pub struct CreateRoomRequest {
    visibility: Option<String>,
    name: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    invite: Vec<String>,
    room_version: Option<String>,
    creation_content: Option<Map<String, Value>>,
    #[serde(default)]
    initial_state: Vec<InitialState>,
    preset: Option<String>,
    #[serde(default)]
    is_direct: bool,
    power_level_content_override: Option<Map<String, Value>>,
    room_alias_name: Option<String>,
}

#[derive(Deserialize)]
pub struct InitialState {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    state_key: String,
    content: Value,
}

pub async fn create_room(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    JsonBody(req): JsonBody<CreateRoomRequest>,
) -> ApiResult<Json<Value>> {
    if req.room_alias_name.is_some() {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNRECOGNIZED",
            "Room aliases are not supported by this server",
        ));
    }
    if let Some(version) = &req.room_version
        && version != ROOM_VERSION
    {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNSUPPORTED_ROOM_VERSION",
            format!("Only room version {ROOM_VERSION} is supported"),
        ));
    }
    let preset: &'static str = match req.preset.as_deref() {
        Some("private_chat") => "private_chat",
        Some("public_chat") => "public_chat",
        Some("trusted_private_chat") => "trusted_private_chat",
        Some(other) => return Err(MatrixError::invalid_param(format!("Unknown preset '{other}'"))),
        None if req.visibility.as_deref() == Some("public") => "public_chat",
        None => "private_chat",
    };
    let server_name = hs.config.server_name.clone();
    for invitee in &req.invite {
        if !ids::is_valid_id(invitee, '@') {
            return Err(MatrixError::invalid_param(format!("Invalid user id '{invitee}'")));
        }
        if ids::server_of(invitee) != Some(server_name.as_str()) {
            return Err(MatrixError::forbidden(
                "Federation is not supported: only local users can be invited",
            ));
        }
    }
    for state in &req.initial_state {
        if !state.content.is_object() {
            return Err(MatrixError::bad_json("initial_state contents must be objects"));
        }
        if matches!(state.kind.as_str(), "m.room.create" | "m.room.member") {
            return Err(MatrixError::invalid_param(format!(
                "{} cannot be in initial_state",
                state.kind
            )));
        }
    }
    let creator = auth.session.user_id.clone();
    let room_id = ids::new_room_id(&server_name);
    let result_room = room_id.clone();
    let events = hs
        .with_store(move |store| {
            let profile = store.user(&creator)?;
            let mut events = Vec::new();
            let mut push = |kind: &str, state_key: Option<&str>, content: Value| -> ApiResult<()> {
                let event = new_event(&room_id, &creator, kind, state_key, content);
                check_content_size(&event.content)?;
                events.push(event);
                Ok(())
            };
            let mut create = req.creation_content.unwrap_or_default();
            create.insert("creator".into(), creator.clone().into());
            create.insert("room_version".into(), ROOM_VERSION.into());
            push("m.room.create", Some(""), Value::Object(create))?;
            push(
                "m.room.member",
                Some(&creator),
                member_content("join", profile.as_ref(), false),
            )?;
            let admins = if preset == "trusted_private_chat" {
                req.invite.clone()
            } else {
                Vec::new()
            };
            let mut levels = default_power_levels(&creator, &admins);
            if let (Some(levels), Some(overrides)) = (levels.as_object_mut(), req.power_level_content_override) {
                levels.extend(overrides);
            }
            push("m.room.power_levels", Some(""), levels)?;
            let join_rule = if preset == "public_chat" { "public" } else { "invite" };
            push("m.room.join_rules", Some(""), json!({ "join_rule": join_rule }))?;
            push(
                "m.room.history_visibility",
                Some(""),
                json!({ "history_visibility": "shared" }),
            )?;
            if preset != "public_chat" {
                push("m.room.guest_access", Some(""), json!({ "guest_access": "can_join" }))?;
            }
            for state in req.initial_state {
                push(&state.kind, Some(&state.state_key), state.content)?;
            }
            if let Some(name) = req.name {
                push("m.room.name", Some(""), json!({ "name": name }))?;
            }
            if let Some(topic) = req.topic {
                push("m.room.topic", Some(""), json!({ "topic": topic }))?;
            }
            for invitee in &req.invite {
                let target = store
                    .user(invitee)?
                    .ok_or_else(|| MatrixError::not_found(format!("Unknown user {invitee}")))?;
                let mut content = member_content("invite", Some(&target), req.is_direct);
                if req.is_direct {
                    content["is_direct"] = true.into();
                }
                events.push(new_event(&room_id, &creator, "m.room.member", Some(invitee), content));
            }
            Ok(store.append(events)?.len())
        })
        .await?;
    Stats::inc(&hs.stats.events_sent);
    tracing::debug!(events, "room created");
    Ok(Json(json!({ "room_id": result_room })))
}

fn member_content(membership: &str, profile: Option<&crate::store::UserRecord>, _is_direct: bool) -> Value {
    let mut content = json!({ "membership": membership });
    if let Some(profile) = profile {
        if let Some(name) = &profile.displayname {
            content["displayname"] = name.clone().into();
        }
        if let Some(url) = &profile.avatar_url {
            content["avatar_url"] = url.clone().into();
        }
    }
    content
}

// ---- membership -------------------------------------------------------------

#[derive(Deserialize)]
pub struct InviteRequest {
    user_id: String,
    reason: Option<String>,
}

pub async fn invite(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(req): JsonBody<InviteRequest>,
) -> ApiResult<Json<Value>> {
    check_room_id(&room_id)?;
    if !ids::is_valid_id(&req.user_id, '@') {
        return Err(MatrixError::invalid_param("Invalid user id"));
    }
    if ids::server_of(&req.user_id) != Some(hs.config.server_name.as_str()) {
        return Err(MatrixError::forbidden(
            "Federation is not supported: only local users can be invited",
        ));
    }
    let sender = auth.session.user_id.clone();
    hs.with_store(move |store| {
        require_joined(store, &room_id, &sender)?;
        let levels = power_levels(store, &room_id)?;
        if levels.user_level(&sender) < levels.invite {
            return Err(MatrixError::forbidden("You do not have the power to invite"));
        }
        let target = store
            .user(&req.user_id)?
            .ok_or_else(|| MatrixError::not_found("Unknown user"))?;
        match membership_of(store, &room_id, &req.user_id)? {
            Some(Membership::Join) => {
                return Err(MatrixError::forbidden(format!(
                    "{} is already in the room",
                    req.user_id
                )));
            }
            Some(Membership::Ban) => {
                return Err(MatrixError::forbidden(format!(
                    "{} is banned from the room",
                    req.user_id
                )));
            }
            _ => {}
        }
        let mut content = member_content("invite", Some(&target), false);
        if let Some(reason) = req.reason {
            content["reason"] = reason.into();
        }
        let event = new_event(&room_id, &sender, "m.room.member", Some(&req.user_id), content);
        check_content_size(&event.content)?;
        store.append(vec![event])?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}

pub async fn join(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(room_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    check_room_id(&room_id)?;
    let user_id = auth.session.user_id.clone();
    let joined = room_id.clone();
    hs.with_store(move |store| {
        if store.state_event(&room_id, "m.room.create", "")?.is_none() {
            return Err(MatrixError::not_found("No such room"));
        }
        match membership_of(store, &room_id, &user_id)? {
            Some(Membership::Join) => return Ok(()),
            Some(Membership::Ban) => return Err(MatrixError::forbidden("You are banned from this room")),
            Some(Membership::Invite) => {}
            _ => {
                let join_rule = store
                    .state_event(&room_id, "m.room.join_rules", "")?
                    .and_then(|e| content_field(&e, "join_rule"))
                    .unwrap_or_else(|| "invite".into());
                if join_rule != "public" {
                    return Err(MatrixError::forbidden("You are not invited to this room"));
                }
            }
        }
        let profile = store.user(&user_id)?;
        let event = new_event(
            &room_id,
            &user_id,
            "m.room.member",
            Some(&user_id),
            member_content("join", profile.as_ref(), false),
        );
        store.append(vec![event])?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "room_id": joined })))
}

#[derive(Deserialize, Default)]
pub struct LeaveRequest {
    reason: Option<String>,
}

pub async fn leave(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<LeaveRequest>,
) -> ApiResult<Json<Value>> {
    check_room_id(&room_id)?;
    let reason = body.reason;
    let user_id = auth.session.user_id.clone();
    hs.with_store(move |store| {
        match membership_of(store, &room_id, &user_id)? {
            Some(Membership::Join | Membership::Invite | Membership::Knock) => {}
            _ => return Err(MatrixError::forbidden("You are not in this room")),
        }
        let mut content = json!({ "membership": "leave" });
        if let Some(reason) = reason {
            content["reason"] = reason.into();
        }
        let event = new_event(&room_id, &user_id, "m.room.member", Some(&user_id), content);
        check_content_size(&event.content)?;
        store.append(vec![event])?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}

/// Forgetting is accepted once the user has left; history is kept for the others.
pub async fn forget(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(room_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    check_room_id(&room_id)?;
    let user_id = auth.session.user_id.clone();
    hs.with_store(move |store| match membership_of(store, &room_id, &user_id)? {
        Some(Membership::Join | Membership::Invite) => Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "Leave the room before forgetting it",
        )),
        _ => Ok(()),
    })
    .await?;
    Ok(Json(json!({})))
}

pub async fn joined_rooms(State(hs): State<Arc<Homeserver>>, auth: Auth) -> ApiResult<Json<Value>> {
    let rooms = hs
        .with_store(move |store| {
            Ok(store
                .memberships_of(&auth.session.user_id)?
                .into_iter()
                .filter(|m| m.membership == Membership::Join)
                .map(|m| m.room_id)
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(Json(json!({ "joined_rooms": rooms })))
}

#[derive(Deserialize)]
pub struct MembersQuery {
    membership: Option<String>,
    not_membership: Option<String>,
}

pub async fn members(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<MembersQuery>,
) -> ApiResult<Response> {
    check_room_id(&room_id)?;
    let now = now_ms();
    let chunk = hs
        .with_store(move |store| {
            visible_upto(store, &room_id, &auth.session.user_id)?;
            let members: Vec<Box<RawValue>> = store
                .state(&room_id)?
                .iter()
                .filter(|e| e.kind == "m.room.member")
                .filter(|e| {
                    let membership = content_field(e, "membership").unwrap_or_default();
                    query.membership.as_deref().is_none_or(|m| m == membership)
                        && query.not_membership.as_deref() != Some(membership.as_str())
                })
                .map(|e| client_event(e, &auth.session, now))
                .collect();
            Ok(members)
        })
        .await?;
    Ok(Json(json!({ "chunk": chunk })).into_response())
}

pub async fn joined_members(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(room_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    check_room_id(&room_id)?;
    let joined = hs
        .with_store(move |store| {
            require_joined(store, &room_id, &auth.session.user_id)?;
            let mut joined = Map::new();
            for event in store.state(&room_id)?.iter().filter(|e| e.kind == "m.room.member") {
                if content_field(event, "membership").as_deref() == Some("join") {
                    let mut profile = json!({});
                    if let Some(name) = content_field(event, "displayname") {
                        profile["display_name"] = name.into();
                    }
                    if let Some(url) = content_field(event, "avatar_url") {
                        profile["avatar_url"] = url.into();
                    }
                    joined.insert(event.state_key.clone().unwrap_or_default(), profile);
                }
            }
            Ok(joined)
        })
        .await?;
    Ok(Json(json!({ "joined": joined })))
}

// ---- state ------------------------------------------------------------------

pub async fn all_state(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(room_id): PathParams<String>,
) -> ApiResult<Json<Vec<Box<RawValue>>>> {
    check_room_id(&room_id)?;
    let now = now_ms();
    let events = hs
        .with_store(move |store| {
            visible_upto(store, &room_id, &auth.session.user_id)?;
            Ok(store
                .state(&room_id)?
                .iter()
                .map(|e| client_event(e, &auth.session, now))
                .collect())
        })
        .await?;
    Ok(Json(events))
}

#[derive(Deserialize)]
pub struct StateQuery {
    format: Option<String>,
}

async fn get_state_inner(
    hs: Arc<Homeserver>,
    auth: Auth,
    room_id: String,
    kind: String,
    state_key: String,
    format: Option<String>,
) -> ApiResult<Response> {
    check_room_id(&room_id)?;
    let now = now_ms();
    let body = hs
        .with_store(move |store| {
            visible_upto(store, &room_id, &auth.session.user_id)?;
            let event = store
                .state_event(&room_id, &kind, &state_key)?
                .ok_or_else(|| MatrixError::not_found("Event not found"))?;
            Ok(if format.as_deref() == Some("event") {
                client_event(&event, &auth.session, now).get().to_string()
            } else {
                event.content.get().to_string()
            })
        })
        .await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

pub async fn get_state(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((room_id, kind, state_key)): PathParams<(String, String, String)>,
    QueryParams(query): QueryParams<StateQuery>,
) -> ApiResult<Response> {
    get_state_inner(hs, auth, room_id, kind, state_key, query.format).await
}

pub async fn get_state_empty_key(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((room_id, kind)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<StateQuery>,
) -> ApiResult<Response> {
    get_state_inner(hs, auth, room_id, kind, String::new(), query.format).await
}

pub async fn put_state(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((room_id, kind, state_key)): PathParams<(String, String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let event_id = send_event(&hs, auth.session, room_id, kind, Some(state_key), content, None).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

pub async fn put_state_empty_key(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((room_id, kind)): PathParams<(String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let event_id = send_event(&hs, auth.session, room_id, kind, Some(String::new()), content, None).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

// ---- messages ---------------------------------------------------------------

pub async fn send(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((room_id, kind, txn_id)): PathParams<(String, String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    if !ids::is_valid_opaque_id(&txn_id) {
        return Err(MatrixError::invalid_param("Invalid transaction id"));
    }
    let event_id = send_event(&hs, auth.session, room_id, kind, None, content, Some(txn_id)).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

/// Checks and appends one message or state event; a repeated transaction id
/// returns the event id of the first attempt.
async fn send_event(
    hs: &Arc<Homeserver>,
    sender: Session,
    room_id: String,
    kind: String,
    state_key: Option<String>,
    content: Value,
    txn_id: Option<String>,
) -> ApiResult<String> {
    check_room_id(&room_id)?;
    if kind.is_empty() || kind.len() > 255 || kind.chars().any(char::is_control) {
        return Err(MatrixError::invalid_param("Invalid event type"));
    }
    if state_key.as_ref().is_some_and(|k| k.len() > 255) {
        return Err(MatrixError::invalid_param("State keys are limited to 255 bytes"));
    }
    if !content.is_object() {
        return Err(MatrixError::bad_json("Event content must be a JSON object"));
    }
    let text = content.to_string();
    check_content_size(&text)?;
    let event_id = hs
        .with_store(move |store| {
            if let Some(txn_id) = &txn_id
                && let Some(event_id) = store.txn_event(&sender.user_id, &sender.device_id, txn_id)?
            {
                return Ok(event_id);
            }
            require_joined(store, &room_id, &sender.user_id)?;
            let levels = power_levels(store, &room_id)?;
            let is_state = state_key.is_some();
            if !levels.may_send(&sender.user_id, &kind, is_state) {
                return Err(MatrixError::forbidden(format!(
                    "You do not have the power to send {kind}"
                )));
            }
            match kind.as_str() {
                "m.room.create" if is_state => return Err(MatrixError::forbidden("A room has one create event")),
                "m.room.member" if is_state => {
                    // Only profile updates of one's own join go through here; other
                    // membership changes use the membership endpoints.
                    let own = state_key.as_deref() == Some(sender.user_id.as_str());
                    if !own || content.get("membership").and_then(Value::as_str) != Some("join") {
                        return Err(MatrixError::forbidden(
                            "Use the membership endpoints to change membership",
                        ));
                    }
                }
                "m.room.power_levels" if is_state => {
                    if !content.is_object() {
                        return Err(MatrixError::bad_json("Power levels must be an object"));
                    }
                    let new = PowerLevels::from_content(&content);
                    check_power_levels_change(&levels, &new, &sender.user_id).map_err(MatrixError::forbidden)?;
                }
                _ => {}
            }
            let mut event = new_event(&room_id, &sender.user_id, &kind, state_key.as_deref(), Value::Null);
            event.content = text;
            event.txn = txn_id.map(|txn_id| TxnKey {
                device_id: sender.device_id.clone(),
                txn_id,
            });
            let stored = store.append(vec![event])?;
            Ok(stored.into_iter().next().map(|e| e.event_id).unwrap_or_default())
        })
        .await?;
    Stats::inc(&hs.stats.events_sent);
    Ok(event_id)
}

pub async fn get_event(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
) -> ApiResult<Json<Box<RawValue>>> {
    check_room_id(&room_id)?;
    let now = now_ms();
    let event = hs
        .with_store(move |store| {
            let upto = visible_upto(store, &room_id, &auth.session.user_id)?;
            match store.event(&event_id)? {
                Some(e) if e.room_id == room_id && e.pos <= upto => Ok(client_event(&e, &auth.session, now)),
                _ => Err(MatrixError::not_found("Event not found")),
            }
        })
        .await?;
    Ok(Json(event))
}

#[derive(Deserialize)]
pub struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<usize>,
    filter: Option<String>,
}

pub async fn messages(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<MessagesQuery>,
) -> ApiResult<Json<Value>> {
    check_room_id(&room_id)?;
    let backwards = match query.dir.as_deref() {
        Some("b") => true,
        Some("f") => false,
        _ => return Err(MatrixError::invalid_param("dir must be 'b' or 'f'")),
    };
    let limit = query.limit.unwrap_or(10).clamp(1, MAX_PAGINATION_LIMIT);
    let from = query.from.as_deref().map(parse_token).transpose()?;
    let to = query.to.as_deref().map(parse_token).transpose()?;
    let filter = match &query.filter {
        Some(text) => super::sync::RoomEventFilter::parse_json(text)?,
        None => super::sync::RoomEventFilter::default(),
    };
    let now = now_ms();
    hs.with_store(move |store| {
        let upto = visible_upto(store, &room_id, &auth.session.user_id)?;
        let (events, start, more) = if backwards {
            let start = from.unwrap_or(upto).min(upto);
            let (events, more) =
                super::sync::filtered_events(store, &room_id, to.unwrap_or(0), start, limit, &filter, true)?;
            (events, start, more)
        } else {
            let start = from.unwrap_or(0);
            let end = to.unwrap_or(upto).min(upto);
            let (events, more) = super::sync::filtered_events(store, &room_id, start, end, limit, &filter, false)?;
            (events, start, more)
        };
        let mut body = json!({
            "start": token(start),
            "chunk": events.iter().map(|e| client_event(e, &auth.session, now)).collect::<Vec<_>>(),
        });
        if more && let Some(last) = events.last() {
            body["end"] = token(if backwards { last.pos - 1 } else { last.pos }).into();
        }
        Ok(Json(body))
    })
    .await
}
