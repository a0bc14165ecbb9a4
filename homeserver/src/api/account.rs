//! Discovery, registration, login, profile, filters, account data.

use crate::error::{ApiResult, MatrixError};
use crate::extract::{Auth, ClientAddr, JsonBody, PathParams, QueryParams, check_login_rate, token_hash};
use crate::ids;
use crate::store::{NewEvent, Session, Store, UserRecord};
use crate::{Homeserver, Stats, now_ms};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// Spec versions we serve. matrix-js-sdk refuses servers listing none of v1.1 … v1.13.
const VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
    "v1.11", "v1.12", "v1.13", "v1.14", "v1.15",
];
const MAX_PASSWORD_BYTES: usize = 512;
const MAX_DISPLAY_NAME_BYTES: usize = 256;

pub async fn versions() -> Json<Value> {
    Json(json!({ "versions": VERSIONS, "unstable_features": {} }))
}

pub async fn well_known(State(hs): State<Arc<Homeserver>>) -> Json<Value> {
    Json(json!({ "m.homeserver": { "base_url": hs.config.public_base_url } }))
}

pub async fn login_flows() -> Json<Value> {
    Json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

pub async fn capabilities() -> Json<Value> {
    Json(json!({ "capabilities": {
        "m.change_password": { "enabled": false },
        "m.room_versions": { "default": "10", "available": { "10": "stable" } },
        "m.set_displayname": { "enabled": true },
        "m.set_avatar_url": { "enabled": true },
        "m.3pid_changes": { "enabled": false },
    }}))
}

/// A valid, empty push ruleset: no notifications are computed by this server.
pub async fn push_rules(_auth: Auth) -> Json<Value> {
    Json(json!({ "global": { "override": [], "content": [], "room": [], "sender": [], "underride": [] } }))
}

#[derive(Deserialize)]
pub struct RegisterQuery {
    kind: Option<String>,
}

#[derive(Deserialize)]
pub struct RegisterRequest {
    username: Option<String>,
    password: Option<String>,
    auth: Option<AuthData>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
}

#[derive(Deserialize)]
pub struct AuthData {
    #[serde(rename = "type")]
    kind: Option<String>,
    session: Option<String>,
}

fn hash_password(password: String) -> ApiResult<String> {
    let salt = SaltString::encode_b64(&ids::random_bytes::<16>())
        .map_err(|_| MatrixError::unknown("Could not create a salt"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|_| MatrixError::unknown("Could not hash the password"))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

fn check_password(password: &str) -> ApiResult<()> {
    if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
        return Err(MatrixError::invalid_param(format!(
            "Passwords must be 1 to {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

fn check_device_id(device_id: &Option<String>) -> ApiResult<()> {
    match device_id {
        Some(id) if !ids::is_valid_opaque_id(id) => Err(MatrixError::invalid_param("Invalid device_id")),
        _ => Ok(()),
    }
}

fn check_display_name(name: &Option<String>) -> ApiResult<()> {
    match name {
        Some(name) if name.len() > MAX_DISPLAY_NAME_BYTES => Err(MatrixError::invalid_param(format!(
            "Display names are limited to {MAX_DISPLAY_NAME_BYTES} bytes"
        ))),
        _ => Ok(()),
    }
}

/// Starts a session for `user_id` and returns the login response body.
async fn new_session(
    hs: &Arc<Homeserver>,
    user_id: String,
    device_id: Option<String>,
    display_name: Option<String>,
) -> ApiResult<Value> {
    let device_id = device_id.unwrap_or_else(ids::new_device_id);
    let access_token = ids::new_access_token();
    let hash = token_hash(&access_token);
    let session = Session {
        user_id: user_id.clone(),
        device_id: device_id.clone(),
    };
    hs.with_store(move |store| Ok(store.create_session(&session, &hash, display_name.as_deref())?))
        .await?;
    Ok(json!({
        "user_id": user_id,
        "access_token": access_token,
        "device_id": device_id,
        "home_server": hs.config.server_name,
        "well_known": { "m.homeserver": { "base_url": hs.config.public_base_url } },
    }))
}

pub async fn register(
    State(hs): State<Arc<Homeserver>>,
    addr: ClientAddr,
    QueryParams(query): QueryParams<RegisterQuery>,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> ApiResult<Response> {
    check_login_rate(&hs, addr)?;
    if query.kind.as_deref() == Some("guest") {
        return Err(MatrixError::new(
            StatusCode::FORBIDDEN,
            "M_GUEST_ACCESS_FORBIDDEN",
            "Guest access is disabled",
        ));
    }
    if !hs.config.registration_enabled {
        return Err(MatrixError::forbidden("Registration is disabled"));
    }
    let localpart = match req.username {
        Some(name) => name,
        None => ids::random_string(b"abcdefghijklmnopqrstuvwxyz0123456789", 12),
    };
    ids::validate_new_localpart(&localpart, &hs.config.server_name)?;
    if let Some(password) = &req.password {
        check_password(password)?;
    }
    check_device_id(&req.device_id)?;
    check_display_name(&req.initial_device_display_name)?;
    let user_id = hs.user_id(&localpart);
    let lookup = user_id.clone();
    if hs.with_store(move |store| Ok(store.user(&lookup)?)).await?.is_some() {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_USER_IN_USE",
            "User ID already taken.",
        ));
    }

    // User-interactive authentication: one stage, m.login.dummy.
    let auth_ok = req
        .auth
        .as_ref()
        .is_some_and(|auth| auth.kind.as_deref() == Some("m.login.dummy"));
    if !auth_ok {
        let session = req
            .auth
            .and_then(|a| a.session)
            .unwrap_or_else(|| ids::random_string(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", 24));
        let body = json!({ "flows": [{ "stages": ["m.login.dummy"] }], "params": {}, "session": session });
        return Ok((StatusCode::UNAUTHORIZED, Json(body)).into_response());
    }

    let password_hash = match req.password {
        Some(password) => Some(
            tokio::task::spawn_blocking(move || hash_password(password))
                .await
                .map_err(|_| MatrixError::unknown("Password hashing failed"))??,
        ),
        None => None,
    };
    let record = UserRecord {
        user_id: user_id.clone(),
        password_hash,
        displayname: Some(localpart),
        avatar_url: None,
    };
    if !hs.with_store(move |store| Ok(store.create_user(&record)?)).await? {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_USER_IN_USE",
            "User ID already taken.",
        ));
    }
    Stats::inc(&hs.stats.registrations);
    tracing::info!("registered a new user");
    if req.inhibit_login {
        return Ok(Json(json!({ "user_id": user_id, "home_server": hs.config.server_name })).into_response());
    }
    let body = new_session(&hs, user_id, req.device_id, req.initial_device_display_name).await?;
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
pub struct AvailableQuery {
    username: String,
}

pub async fn register_available(
    State(hs): State<Arc<Homeserver>>,
    addr: ClientAddr,
    QueryParams(query): QueryParams<AvailableQuery>,
) -> ApiResult<Json<Value>> {
    check_login_rate(&hs, addr)?;
    ids::validate_new_localpart(&query.username, &hs.config.server_name)?;
    let user_id = hs.user_id(&query.username);
    if hs.with_store(move |store| Ok(store.user(&user_id)?)).await?.is_some() {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_USER_IN_USE",
            "User ID already taken.",
        ));
    }
    Ok(Json(json!({ "available": true })))
}

#[derive(Deserialize)]
pub struct LoginRequest {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Identifier>,
    /// The legacy (pre-r0.4) top-level user field.
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

#[derive(Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

pub async fn login(
    State(hs): State<Arc<Homeserver>>,
    addr: ClientAddr,
    JsonBody(req): JsonBody<LoginRequest>,
) -> ApiResult<Json<Value>> {
    check_login_rate(&hs, addr)?;
    if req.kind != "m.login.password" {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "Unknown login type",
        ));
    }
    let user = match (&req.identifier, &req.user) {
        (Some(identifier), _) if identifier.kind != "m.id.user" => {
            return Err(MatrixError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                "Unknown identifier type",
            ));
        }
        (Some(Identifier { user: Some(user), .. }), _) | (None, Some(user)) => user.clone(),
        _ => return Err(MatrixError::missing_param("No user given")),
    };
    let password = req
        .password
        .ok_or_else(|| MatrixError::missing_param("No password given"))?;
    check_device_id(&req.device_id)?;
    check_display_name(&req.initial_device_display_name)?;
    let invalid = || MatrixError::forbidden("Invalid username or password");
    let user_id = ids::local_user_id(&user, &hs.config.server_name).ok_or_else(invalid)?;
    let lookup = user_id.clone();
    let record = hs.with_store(move |store| Ok(store.user(&lookup)?)).await?;
    let hash = record.and_then(|r| r.password_hash);
    let verified = tokio::task::spawn_blocking(move || match hash {
        Some(hash) => verify_password(&password, &hash),
        None => false,
    })
    .await
    .unwrap_or(false);
    if !verified {
        return Err(invalid());
    }
    Stats::inc(&hs.stats.logins);
    Ok(Json(
        new_session(&hs, user_id, req.device_id, req.initial_device_display_name).await?,
    ))
}

pub async fn logout(State(hs): State<Arc<Homeserver>>, auth: Auth) -> ApiResult<Json<Value>> {
    hs.with_store(move |store| Ok(store.delete_session(&auth.token_hash)?))
        .await?;
    Ok(Json(json!({})))
}

pub async fn logout_all(State(hs): State<Arc<Homeserver>>, auth: Auth) -> ApiResult<Json<Value>> {
    hs.with_store(move |store| Ok(store.delete_all_sessions(&auth.session.user_id)?))
        .await?;
    Ok(Json(json!({})))
}

pub async fn whoami(auth: Auth) -> Json<Value> {
    Json(json!({ "user_id": auth.session.user_id, "device_id": auth.session.device_id, "is_guest": false }))
}

fn require_self(auth: &Auth, user_id: &str) -> ApiResult<()> {
    if auth.user_id() == user_id {
        Ok(())
    } else {
        Err(MatrixError::forbidden("You may only act for yourself"))
    }
}

pub async fn create_filter(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams(user_id): PathParams<String>,
    JsonBody(filter): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    require_self(&auth, &user_id)?;
    if !filter.is_object() {
        return Err(MatrixError::bad_json("A filter is a JSON object"));
    }
    super::sync::Filter::parse(&filter)?;
    let text = filter.to_string();
    let id = hs
        .with_store(move |store| Ok(store.create_filter(&user_id, &text)?))
        .await?;
    Ok(Json(json!({ "filter_id": id })))
}

pub async fn get_filter(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((user_id, filter_id)): PathParams<(String, String)>,
) -> ApiResult<Response> {
    require_self(&auth, &user_id)?;
    let filter = hs
        .with_store(move |store| Ok(store.filter(&user_id, &filter_id)?))
        .await?;
    let filter = filter.ok_or_else(|| MatrixError::not_found("No such filter"))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], filter).into_response())
}

pub async fn get_profile(
    State(hs): State<Arc<Homeserver>>,
    PathParams(user_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let user = hs.with_store(move |store| Ok(store.user(&user_id)?)).await?;
    let user = user.ok_or_else(|| MatrixError::not_found("Profile not found"))?;
    let mut body = json!({});
    if let Some(name) = user.displayname {
        body["displayname"] = name.into();
    }
    if let Some(url) = user.avatar_url {
        body["avatar_url"] = url.into();
    }
    Ok(Json(body))
}

fn profile_field(field: &str) -> ApiResult<&'static str> {
    match field {
        "displayname" => Ok("displayname"),
        "avatar_url" => Ok("avatar_url"),
        _ => Err(MatrixError::unrecognized(StatusCode::NOT_FOUND)),
    }
}

pub async fn get_profile_field(
    State(hs): State<Arc<Homeserver>>,
    PathParams((user_id, field)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let field = profile_field(&field)?;
    let user = hs.with_store(move |store| Ok(store.user(&user_id)?)).await?;
    let user = user.ok_or_else(|| MatrixError::not_found("Profile not found"))?;
    let value = if field == "displayname" {
        user.displayname
    } else {
        user.avatar_url
    };
    let value = value.ok_or_else(|| MatrixError::not_found(format!("No {field} set")))?;
    Ok(Json(json!({ field: value })))
}

/// Sets a profile field and, as Synapse does, re-sends the member event in every
/// joined room so other members see the change.
pub async fn set_profile_field(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((user_id, field)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let field = profile_field(&field)?;
    require_self(&auth, &user_id)?;
    let value = match body.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(MatrixError::bad_json(format!("'{field}' must be a string"))),
    };
    if field == "displayname" {
        check_display_name(&value)?;
    } else if value.as_ref().is_some_and(|v| v.len() > 2048) {
        return Err(MatrixError::invalid_param("avatar_url is too long"));
    }
    hs.with_store(move |store| {
        let user = store
            .user(&user_id)?
            .ok_or_else(|| MatrixError::not_found("Profile not found"))?;
        let (displayname, avatar_url) = if field == "displayname" {
            (value, user.avatar_url)
        } else {
            (user.displayname, value)
        };
        store.set_profile(&user_id, displayname.as_deref(), avatar_url.as_deref())?;
        update_member_events(store, &user_id, displayname.as_deref(), avatar_url.as_deref())
    })
    .await?;
    Ok(Json(json!({})))
}

fn update_member_events(
    store: &mut dyn Store,
    user_id: &str,
    displayname: Option<&str>,
    avatar_url: Option<&str>,
) -> ApiResult<()> {
    let mut events = Vec::new();
    for room in store.memberships_of(user_id)? {
        if room.membership != crate::store::Membership::Join {
            continue;
        }
        let mut content = json!({ "membership": "join" });
        if let Some(name) = displayname {
            content["displayname"] = name.into();
        }
        if let Some(url) = avatar_url {
            content["avatar_url"] = url.into();
        }
        events.push(NewEvent {
            event_id: ids::new_event_id(),
            room_id: room.room_id,
            sender: user_id.to_string(),
            kind: "m.room.member".into(),
            state_key: Some(user_id.to_string()),
            content: content.to_string(),
            origin_server_ts: now_ms(),
            txn: None,
        });
    }
    store.append(events)?;
    Ok(())
}

fn check_account_data(kind: &str, content: &Value) -> ApiResult<String> {
    if !ids::is_valid_opaque_id(kind) {
        return Err(MatrixError::invalid_param("Invalid account data type"));
    }
    if !content.is_object() {
        return Err(MatrixError::bad_json("Account data content must be a JSON object"));
    }
    let text = content.to_string();
    if text.len() > super::MAX_EVENT_BYTES {
        return Err(MatrixError::too_large("Account data is limited to 65536 bytes"));
    }
    Ok(text)
}

pub async fn set_account_data(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((user_id, kind)): PathParams<(String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    require_self(&auth, &user_id)?;
    let text = check_account_data(&kind, &content)?;
    hs.with_store(move |store| Ok(store.set_account_data(&user_id, None, &kind, &text)?))
        .await?;
    Ok(Json(json!({})))
}

pub async fn get_account_data(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((user_id, kind)): PathParams<(String, String)>,
) -> ApiResult<Response> {
    require_self(&auth, &user_id)?;
    let content = hs
        .with_store(move |store| Ok(store.account_data(&user_id, None, &kind)?))
        .await?;
    let content = content.ok_or_else(|| MatrixError::not_found("Account data not found"))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        content.get().to_string(),
    )
        .into_response())
}

pub async fn set_room_account_data(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((user_id, room_id, kind)): PathParams<(String, String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    require_self(&auth, &user_id)?;
    let text = check_account_data(&kind, &content)?;
    if !ids::is_valid_id(&room_id, '!') {
        return Err(MatrixError::invalid_param("Invalid room id"));
    }
    hs.with_store(move |store| Ok(store.set_account_data(&user_id, Some(&room_id), &kind, &text)?))
        .await?;
    Ok(Json(json!({})))
}

pub async fn get_room_account_data(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    PathParams((user_id, room_id, kind)): PathParams<(String, String, String)>,
) -> ApiResult<Response> {
    require_self(&auth, &user_id)?;
    let content = hs
        .with_store(move |store| Ok(store.account_data(&user_id, Some(&room_id), &kind)?))
        .await?;
    let content = content.ok_or_else(|| MatrixError::not_found("Account data not found"))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        content.get().to_string(),
    )
        .into_response())
}
