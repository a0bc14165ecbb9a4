//! The companion homeserver over real HTTP: every endpoint, its authorization
//! rules and its answers to bad input.

mod common;

use common::{Client, TestServer, bodies, enc, types};
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn discovery_cors_and_unknown_endpoints() {
    let server = TestServer::start().await;
    let client = server.client();

    let (status, versions) = client.get("/_matrix/client/versions").await;
    assert_eq!(status, 200);
    let list: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for v in ["v1.1", "v1.5", "v1.13"] {
        assert!(list.contains(&v), "{v} missing from {list:?}");
    }

    let (status, wk) = client.get("/.well-known/matrix/client").await;
    assert_eq!(status, 200);
    assert!(wk["m.homeserver"]["base_url"].as_str().unwrap().starts_with("http://"));

    let (status, flows) = client.get("/login").await;
    assert_eq!(
        (status, flows["flows"][0]["type"].as_str()),
        (200, Some("m.login.password"))
    );

    let (status, body) = client.get("/_matrix/client/v3/no/such/endpoint").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_UNRECOGNIZED")));
    let (status, body) = client.get("/totally/elsewhere").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_UNRECOGNIZED")));
    let (status, body) = client.raw(Method::DELETE, "/createRoom", None).await;
    assert_eq!((status, body["errcode"].as_str()), (405, Some("M_UNRECOGNIZED")));

    // CORS: a browser preflight on any route, and the header on normal answers.
    let http = reqwest::Client::new();
    for path in [
        "/_matrix/client/v3/sync",
        "/_matrix/client/v3/rooms/!x:y/send/m.call.invite/1",
        "/nope",
    ] {
        let resp = http
            .request(Method::OPTIONS, format!("{}{path}", server.base))
            .header("origin", "http://example.com")
            .header("access-control-request-method", "PUT")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "preflight {path}");
        assert_eq!(resp.headers()["access-control-allow-origin"], "*");
        let allowed = resp.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase();
        assert!(allowed.contains("authorization"), "{allowed}");
    }
    let resp = http
        .request(Method::OPTIONS, format!("{}/_matrix/client/v3/login", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "bare OPTIONS");
    let resp = http
        .get(format!("{}/_matrix/client/versions", server.base))
        .header("origin", "http://example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    let resp = http
        .get(format!("{}/_matrix/client/v3/nope", server.base))
        .header("origin", "http://a.b")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "*",
        "errors carry CORS too"
    );

    let alice = server.user("alice").await;
    let (status, body) = alice.get("/room_keys/version").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, body) = alice.get("/thirdparty/protocols").await;
    assert_eq!((status, body), (200, json!({})));

    let (status, health) = client.get("/healthz").await;
    assert_eq!((status, health.as_str()), (200, Some("ok\n")));
}

#[tokio::test]
async fn registration_rules() {
    let server = TestServer::start().await;
    let mut alice = server.client();
    let body = alice.register("alice", "pw1").await;
    assert_eq!(body["user_id"], "@alice:localhost");
    assert!(body["device_id"].as_str().is_some_and(|d| !d.is_empty()));

    let anon = server.client();
    let (status, body) = anon
        .post(
            "/register",
            json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_USER_IN_USE")));
    let (status, body) = anon.get("/register/available?username=alice").await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_USER_IN_USE")));
    let (status, body) = anon.get("/register/available?username=bob").await;
    assert_eq!((status, body["available"].as_bool()), (200, Some(true)));

    for bad in ["Alice", "al ice", "_bot", "a:b", "é"] {
        let (status, body) = anon
            .post(
                "/register",
                json!({"username": bad, "password": "x", "auth": {"type": "m.login.dummy"}}),
            )
            .await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (400, Some("M_INVALID_USERNAME")),
            "{bad}"
        );
    }
    let (status, body) = anon.post("/register?kind=guest", json!({})).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_GUEST_ACCESS_FORBIDDEN"))
    );

    // UIA: the first answer lists the dummy stage and a session.
    let (status, body) = anon
        .post("/register", json!({"username": "carol", "password": "x"}))
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["flows"][0]["stages"][0], "m.login.dummy");
    assert!(body["session"].is_string());

    // No username: the server picks one.
    let (status, body) = anon
        .post("/register", json!({"password": "x", "auth": {"type": "m.login.dummy"}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["user_id"].as_str().unwrap().ends_with(":localhost"));

    // inhibit_login gives no token.
    let (status, body) = anon
        .post(
            "/register",
            json!({"username": "dave", "password": "x", "inhibit_login": true, "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(body.get("access_token").is_none());

    let closed = TestServer::start_with(|c| c.registration.enabled = false).await;
    let (status, body) = closed
        .client()
        .post(
            "/register",
            json!({"username": "x", "password": "x", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
}

#[tokio::test]
async fn login_logout_whoami_and_tokens() {
    let server = TestServer::start().await;
    let first = server.user("alice").await;

    let mut by_identifier = server.client();
    let (status, body) = by_identifier
        .post(
            "/login",
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "correct horse"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    by_identifier.adopt(&body);
    assert_eq!(body["user_id"], "@alice:localhost");
    assert_ne!(by_identifier.device_id, first.device_id, "a new device");

    // The legacy top-level `user`, with a full user id and a chosen device id.
    let mut legacy = server.client();
    let (status, body) = legacy
        .post("/login", json!({"type": "m.login.password", "user": "@alice:localhost", "password": "correct horse", "device_id": "MYPHONE"}))
        .await;
    assert_eq!(status, 200, "{body}");
    legacy.adopt(&body);
    assert_eq!(legacy.device_id, "MYPHONE");

    for wrong in [
        json!({"type": "m.login.password", "user": "alice", "password": "nope"}),
        json!({"type": "m.login.password", "user": "nobody", "password": "x"}),
    ] {
        let (status, body) = server.client().post("/login", wrong).await;
        assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    }
    let (status, body) = server
        .client()
        .post("/login", json!({"type": "m.login.token", "token": "x"}))
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_UNKNOWN")));

    let (status, me) = by_identifier.get("/account/whoami").await;
    assert_eq!(status, 200);
    assert_eq!(me["user_id"], "@alice:localhost");
    assert_eq!(me["device_id"].as_str(), Some(by_identifier.device_id.as_str()));

    // access_token as a query parameter works too.
    let (status, _) = server
        .client()
        .get(&format!(
            "/account/whoami?access_token={}",
            by_identifier.token.clone().unwrap()
        ))
        .await;
    assert_eq!(status, 200);

    let (status, body) = server.client().get("/account/whoami").await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
    let mut bogus = server.client();
    bogus.token = Some("sbt_not_a_token".into());
    let (status, body) = bogus.get("/account/whoami").await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));

    let (status, _) = by_identifier.post("/logout", json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = by_identifier.get("/account/whoami").await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")));
    let (status, _) = first.get("/account/whoami").await;
    assert_eq!(status, 200, "other devices stay logged in");

    let (status, _) = legacy.post("/logout/all", json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = first.get("/account/whoami").await;
    assert_eq!(status, 401, "logout/all ends every session");
}

#[tokio::test]
async fn capabilities_push_rules_filters_profile_account_data() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;

    let (status, caps) = alice.get("/capabilities").await;
    assert_eq!(status, 200);
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "10");

    let (status, rules) = alice.get("/pushrules/").await;
    assert_eq!(status, 200);
    for kind in ["override", "content", "room", "sender", "underride"] {
        assert!(rules["global"][kind].as_array().is_some(), "{kind}");
    }

    let filter = json!({"room": {"timeline": {"limit": 5, "types": ["m.call.*"]}}});
    let (status, created) = alice.post("/user/@alice:localhost/filter", filter.clone()).await;
    assert_eq!(status, 200);
    let id = created["filter_id"].as_str().unwrap().to_string();
    let (status, got) = alice.get(&format!("/user/@alice:localhost/filter/{id}")).await;
    assert_eq!((status, &got), (200, &filter));
    let (status, body) = bob.get(&format!("/user/@alice:localhost/filter/{id}")).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, body) = alice.get("/user/@alice:localhost/filter/999").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, body) = alice
        .post(
            "/user/@alice:localhost/filter",
            json!({"room": {"timeline": {"limit": "x"}}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")));

    // Profile: set a display name; it shows in profile and in the member event of joined rooms.
    let room = alice.create_room(json!({})).await;
    let (status, _) = alice
        .put(
            "/profile/@alice:localhost/displayname",
            json!({"displayname": "Alice A."}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, profile) = bob.get("/profile/@alice:localhost").await;
    assert_eq!((status, profile["displayname"].as_str()), (200, Some("Alice A.")));
    let (status, name) = bob.get("/profile/@alice:localhost/displayname").await;
    assert_eq!((status, name["displayname"].as_str()), (200, Some("Alice A.")));
    let (_, member) = alice
        .get(&format!(
            "/rooms/{}/state/m.room.member/{}",
            enc(&room),
            enc("@alice:localhost")
        ))
        .await;
    assert_eq!(member["displayname"], "Alice A.");
    let (status, body) = bob
        .put(
            "/profile/@alice:localhost/displayname",
            json!({"displayname": "hijack"}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, body) = bob.get("/profile/@nobody:localhost").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));

    // Account data: m.direct, global and per room.
    let direct = json!({"@bob:localhost": [room.clone()]});
    let (status, _) = alice
        .put("/user/@alice:localhost/account_data/m.direct", direct.clone())
        .await;
    assert_eq!(status, 200);
    let (status, got) = alice.get("/user/@alice:localhost/account_data/m.direct").await;
    assert_eq!((status, &got), (200, &direct));
    let (status, body) = alice.get("/user/@alice:localhost/account_data/m.nothing").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, body) = bob.get("/user/@alice:localhost/account_data/m.direct").await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let path = format!("/user/@alice:localhost/rooms/{}/account_data/m.tag", enc(&room));
    let (status, _) = alice.put(&path, json!({"tags": {"u.work": {}}})).await;
    assert_eq!(status, 200);
    let (_, got) = alice.get(&path).await;
    assert_eq!(got["tags"]["u.work"], json!({}));

    let sync = alice.sync("").await;
    let global = &sync["account_data"]["events"];
    assert!(types(global).contains(&"m.direct".to_string()), "{global}");
    let room_data = &sync["rooms"]["join"][&room]["account_data"]["events"];
    assert_eq!(types(room_data), vec!["m.tag"]);
}

#[tokio::test]
async fn create_room_presets_and_initial_state() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;

    let room = alice
        .create_room(json!({
            "preset": "trusted_private_chat",
            "name": "Calls",
            "topic": "where we talk",
            "invite": ["@bob:localhost"],
            "is_direct": true,
            "initial_state": [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}},
                              {"type": "org.example.thing", "state_key": "k", "content": {"x": 1}}],
            "creation_content": {"m.federate": false}
        }))
        .await;
    let (status, state) = alice.get(&format!("/rooms/{}/state", enc(&room))).await;
    assert_eq!(status, 200);
    let kinds = types(&state);
    for kind in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
        "m.room.topic",
        "m.room.encryption",
        "org.example.thing",
    ] {
        assert!(kinds.contains(&kind.to_string()), "{kind} missing: {kinds:?}");
    }
    let get = |kind: &str| {
        state
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == kind)
            .unwrap()
            .clone()
    };
    assert_eq!(get("m.room.create")["content"]["room_version"], "10");
    assert_eq!(get("m.room.create")["content"]["m.federate"], false);
    assert_eq!(get("m.room.join_rules")["content"]["join_rule"], "invite");
    assert_eq!(
        get("m.room.power_levels")["content"]["users"]["@bob:localhost"],
        100,
        "trusted_private_chat"
    );
    let invite = state
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["state_key"] == "@bob:localhost")
        .unwrap();
    assert_eq!(invite["content"]["membership"], "invite");
    assert_eq!(invite["content"]["is_direct"], true);

    // Bob sees the invite with invite_state, joins, and the room is in joined_rooms.
    let sync = bob.sync("").await;
    let invite_state = &sync["rooms"]["invite"][&room]["invite_state"]["events"];
    let kinds = types(invite_state);
    assert!(
        kinds.contains(&"m.room.name".to_string()) && kinds.contains(&"m.room.member".to_string()),
        "{kinds:?}"
    );
    let (status, joined) = bob.join(&room).await;
    assert_eq!((status, joined["room_id"].as_str()), (200, Some(room.as_str())));
    let (_, rooms) = bob.get("/joined_rooms").await;
    assert_eq!(rooms["joined_rooms"], json!([room]));

    let public = alice.create_room(json!({"visibility": "public"})).await;
    let (_, rule) = alice
        .get(&format!("/rooms/{}/state/m.room.join_rules/", enc(&public)))
        .await;
    assert_eq!(rule["join_rule"], "public");
    let (_, rule) = alice
        .get(&format!("/rooms/{}/state/m.room.join_rules", enc(&public)))
        .await;
    assert_eq!(rule["join_rule"], "public", "no trailing slash works too");

    for (bad, code) in [
        (json!({"room_version": "1"}), "M_UNSUPPORTED_ROOM_VERSION"),
        (json!({"preset": "nonsense"}), "M_INVALID_PARAM"),
        (json!({"invite": ["not-a-user"]}), "M_INVALID_PARAM"),
        (json!({"invite": ["@nobody:localhost"]}), "M_NOT_FOUND"),
        (json!({"invite": ["@x:elsewhere.org"]}), "M_FORBIDDEN"),
        (
            json!({"initial_state": [{"type": "m.room.member", "state_key": "@x:localhost", "content": {}}]}),
            "M_INVALID_PARAM",
        ),
        (json!({"name": 5}), "M_BAD_JSON"),
    ] {
        let (status, body) = alice.post("/createRoom", bad.clone()).await;
        assert!(status >= 400, "{bad}");
        assert_eq!(body["errcode"].as_str(), Some(code), "{bad}: {body}");
    }
    let (_, rooms) = alice.get("/joined_rooms").await;
    assert_eq!(
        rooms["joined_rooms"].as_array().unwrap().len(),
        2,
        "failed createRooms leave nothing behind"
    );
}

#[tokio::test]
async fn membership_rules() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let carol = server.user("carol").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;

    let (status, body) = bob.join(&room).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "invite-only"
    );
    let (status, body) = bob.invite(&room, "@carol:localhost").await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "non-members cannot invite"
    );
    let (status, body) = bob.send(&room, "m.room.message", "t1", json!({"body": "hi"})).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "non-members cannot send"
    );
    let (status, body) = bob.get(&format!("/rooms/{}/messages?dir=b", enc(&room))).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "non-members cannot read"
    );
    let (status, _) = bob.get(&format!("/rooms/{}/state", enc(&room))).await;
    assert_eq!(status, 403);

    assert_eq!(alice.invite(&room, "@bob:localhost").await.0, 200);
    let (status, body) = alice.invite(&room, "@nobody:localhost").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    assert_eq!(bob.join(&room).await.0, 200);
    assert_eq!(bob.join(&room).await.0, 200, "joining twice is harmless");
    let (status, body) = alice.invite(&room, "@bob:localhost").await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "already joined"
    );

    // Via /join/{roomId} too.
    assert_eq!(bob.invite(&room, "@carol:localhost").await.0, 200);
    let (status, _) = carol.post(&format!("/join/{}", enc(&room)), json!({})).await;
    assert_eq!(status, 200);

    let (status, members) = alice.get(&format!("/rooms/{}/members", enc(&room))).await;
    assert_eq!(status, 200);
    assert_eq!(members["chunk"].as_array().unwrap().len(), 3);
    let (_, joined) = alice.get(&format!("/rooms/{}/joined_members", enc(&room))).await;
    assert_eq!(joined["joined"].as_object().unwrap().len(), 3);

    let (status, _) = carol.leave(&room).await;
    assert_eq!(status, 200);
    let (status, body) = carol.send(&room, "m.room.message", "t2", json!({"body": "gone"})).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, _) = carol.leave(&room).await;
    assert_eq!(status, 403, "cannot leave twice");
    let (_, members) = alice
        .get(&format!("/rooms/{}/members?membership=join", enc(&room)))
        .await;
    assert_eq!(members["chunk"].as_array().unwrap().len(), 2);

    // Carol can still read history up to her departure, and not after it.
    alice.send_text(&room, "after", "said after carol left").await;
    let (status, history) = carol
        .get(&format!("/rooms/{}/messages?dir=b&limit=50", enc(&room)))
        .await;
    assert_eq!(status, 200);
    assert!(!bodies(&history["chunk"]).contains(&"said after carol left".to_string()));

    // Rejecting an invite is a leave from "invite".
    let room2 = alice.create_room(json!({"invite": ["@carol:localhost"]})).await;
    assert_eq!(carol.leave(&room2).await.0, 200);
    let (status, _) = carol.get(&format!("/rooms/{}/messages?dir=b", enc(&room2))).await;
    assert_eq!(status, 403, "a rejected invite never gave read access");
    assert_eq!(
        carol.post(&format!("/rooms/{}/forget", enc(&room2)), json!({})).await.0,
        200
    );

    let (status, body) = alice.join("!unknown:localhost").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, body) = alice.join("#alias:localhost").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, body) = alice.join("garbage").await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));

    // Public rooms need no invite.
    let public = alice.create_room(json!({"preset": "public_chat"})).await;
    assert_eq!(carol.join(&public).await.0, 200);
}

#[tokio::test]
async fn state_and_power_levels() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({"invite": ["@bob:localhost"]})).await;
    assert_eq!(bob.join(&room).await.0, 200);
    let state = |kind: &str, key: &str| format!("/rooms/{}/state/{kind}/{}", enc(&room), enc(key));

    let (status, body) = alice.put(&state("m.room.name", ""), json!({"name": "Renamed"})).await;
    assert_eq!(status, 200);
    assert!(body["event_id"].as_str().unwrap().starts_with('$'));
    let (status, name) = bob.get(&format!("/rooms/{}/state/m.room.name", enc(&room))).await;
    assert_eq!((status, name["name"].as_str()), (200, Some("Renamed")));
    let (status, full) = bob
        .get(&format!("/rooms/{}/state/m.room.name?format=event", enc(&room)))
        .await;
    assert_eq!((status, full["type"].as_str()), (200, Some("m.room.name")));

    let (status, body) = bob.put(&state("m.room.name", ""), json!({"name": "Bob's"})).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "state needs power level 50"
    );
    let (status, _) = bob.put(&state("org.example.custom", "k"), json!({"v": 1})).await;
    assert_eq!(status, 403, "state_default is 50");
    let (status, body) = bob.get(&state("org.example.missing", "k")).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));

    // Power levels: bob cannot raise himself; alice can grant, but only up to her own.
    let (_, mut levels) = alice.get(&state("m.room.power_levels", "")).await;
    levels["users"]["@bob:localhost"] = json!(100);
    let (status, _) = bob.put(&state("m.room.power_levels", ""), levels.clone()).await;
    assert_eq!(status, 403);
    levels["users"]["@bob:localhost"] = json!(50);
    let (status, body) = alice.put(&state("m.room.power_levels", ""), levels.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = bob.put(&state("m.room.name", ""), json!({"name": "Bob's"})).await;
    assert_eq!(status, 200, "bob has 50 now");
    levels["users"]["@alice:localhost"] = json!(0);
    let (status, _) = bob.put(&state("m.room.power_levels", ""), levels).await;
    assert_eq!(status, 403, "bob cannot demote alice");

    let (status, _) = alice.put(&state("m.room.create", ""), json!({"creator": "x"})).await;
    assert_eq!(status, 403);
    let (status, _) = alice
        .put(
            &state("m.room.member", "@bob:localhost"),
            json!({"membership": "leave"}),
        )
        .await;
    assert_eq!(status, 403, "membership goes through the membership endpoints");
    let (status, _) = bob
        .put(
            &state("m.room.member", "@bob:localhost"),
            json!({"membership": "join", "displayname": "B"}),
        )
        .await;
    assert_eq!(status, 200, "own profile in the room");

    let (status, body) = alice
        .put(&state("m.room.topic", ""), json!(["not", "an", "object"]))
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")));
}

#[tokio::test]
async fn send_is_idempotent_and_messages_paginate() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;

    let first = alice.send_text(&room, "txn-1", "hello").await;
    let again = alice.send_text(&room, "txn-1", "hello (retry)").await;
    assert_eq!(first, again, "same transaction id, same event");
    let mut other_device = server.client();
    let (_, login) = other_device
        .post(
            "/login",
            json!({"type": "m.login.password", "user": "alice", "password": "correct horse"}),
        )
        .await;
    other_device.adopt(&login);
    let other = other_device.send_text(&room, "txn-1", "other device").await;
    assert_ne!(first, other, "transaction ids are per device");

    let (status, event) = alice.get(&format!("/rooms/{}/event/{}", enc(&room), enc(&first))).await;
    assert_eq!((status, event["content"]["body"].as_str()), (200, Some("hello")));
    assert_eq!(event["unsigned"]["transaction_id"], "txn-1");
    let (status, event) = other_device
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&first)))
        .await;
    assert_eq!(status, 200);
    assert!(
        event["unsigned"].get("transaction_id").is_none(),
        "only the sending device sees its txn id"
    );
    let (status, _) = alice.get(&format!("/rooms/{}/event/$nope", enc(&room))).await;
    assert_eq!(status, 404);

    for i in 0..25 {
        alice.send_text(&room, &format!("n{i}"), &format!("m{i}")).await;
    }
    // Walk backwards in pages of 10 and collect everything.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..10 {
        let query = match &from {
            Some(token) => format!("?dir=b&limit=10&from={token}"),
            None => "?dir=b&limit=10".to_string(),
        };
        let (status, page) = alice.get(&format!("/rooms/{}/messages{query}", enc(&room))).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(bodies(&page["chunk"]));
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_string()),
            None => break,
        }
    }
    let expected_recent: Vec<String> = (0..25).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(&seen[..25], &expected_recent[..], "newest first, no gaps or repeats");
    assert!(seen.contains(&"hello".to_string()));

    // Forwards from the start, with a type filter.
    let (status, page) = alice
        .get(&format!(
            "/rooms/{}/messages?dir=f&limit=3&filter={}",
            enc(&room),
            enc(r#"{"types":["m.room.message"]}"#)
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(bodies(&page["chunk"]), vec!["hello", "other device", "m0"]);
    let (_, next) = alice
        .get(&format!(
            "/rooms/{}/messages?dir=f&limit=2&from={}&filter={}",
            enc(&room),
            page["end"].as_str().unwrap(),
            enc(r#"{"types":["m.room.message"]}"#)
        ))
        .await;
    assert_eq!(bodies(&next["chunk"]), vec!["m1", "m2"]);

    for (query, code) in [
        ("?dir=x", "M_INVALID_PARAM"),
        ("?dir=b&from=garbage", "M_INVALID_PARAM"),
        ("?dir=b&limit=-1", "M_INVALID_PARAM"),
    ] {
        let (status, body) = alice.get(&format!("/rooms/{}/messages{query}", enc(&room))).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some(code)), "{query}");
    }
}

#[tokio::test]
async fn turn_server_credentials() {
    let server = TestServer::start_with(|c| {
        c.turn.uris = vec![
            "turn:turn.example.org:3478?transport=udp".into(),
            "turn:turn.example.org:3478?transport=tcp".into(),
        ];
        c.turn.static_auth_secret = "n0t-a-real-secret".into();
        c.turn.credential_ttl_secs = 3600;
    })
    .await;
    let alice = server.user("alice").await;
    let (status, body) = alice.get("/voip/turnServer").await;
    assert_eq!(status, 200);
    assert_eq!(body["ttl"], 3600);
    assert_eq!(body["uris"].as_array().unwrap().len(), 2);
    let username = body["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "@alice:localhost");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(
        expiry >= now + 3590 && expiry <= now + 3610,
        "expiry {expiry} vs now {now}"
    );
    // The relay side, with the same secret, accepts exactly this password.
    let secret = turn_config::SharedSecret::new("n0t-a-real-secret");
    assert_eq!(
        secret.password_if_valid(username, now).unwrap(),
        body["password"].as_str().unwrap()
    );

    let (status, body) = server.client().get("/voip/turnServer").await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));

    // No TURN configured: an empty object, as Synapse answers.
    let bare = TestServer::start().await;
    let bob = bare.user("bob").await;
    let (status, body) = bob.get("/voip/turnServer").await;
    assert_eq!((status, body), (200, json!({})));
    // The generated secret is kept in the data directory.
    let secret = std::fs::read_to_string(bare.data_dir.path().join("turn_secret")).unwrap();
    assert!(secret.len() >= 32);
}

#[tokio::test]
async fn bad_input_gets_matrix_errors() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let send_path = format!("/rooms/{}/send/m.room.message/x1", enc(&room));

    let (status, body) = alice.raw(Method::PUT, &send_path, Some(b"{not json".to_vec())).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_NOT_JSON")));
    let (status, body) = alice.raw(Method::PUT, &send_path, Some(b"[1,2]".to_vec())).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")));
    let (status, body) = alice.raw(Method::PUT, &send_path, Some(vec![0xff, 0xfe, 0x00])).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_NOT_JSON")));
    let (status, body) = alice.post("/login", json!({"type": 5})).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")));

    let big = "x".repeat(70_000);
    let (status, body) = alice.send(&room, "m.room.message", "big", json!({"body": big})).await;
    assert_eq!((status, body["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
    let huge = vec![b' '; 2 << 20];
    let (status, body) = alice.raw(Method::PUT, &send_path, Some(huge)).await;
    assert_eq!((status, body["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
    let (status, body) = alice
        .put(
            &format!("/rooms/{}/state/m.room.topic/", enc(&room)),
            json!({"topic": "y".repeat(70_000)}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (413, Some("M_TOO_LARGE")));

    let (status, body) = alice.get("/sync?since=banana").await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, body) = alice.get("/sync?timeout=soon").await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, body) = alice.get("/sync?filter=%7Bbroken").await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, body) = alice.get("/sync?filter=12345").await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let (status, body) = alice.get("/rooms/not-a-room/messages?dir=b").await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, body) = alice.get("/rooms/!nope:localhost/messages?dir=b").await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let (status, body) = alice
        .put(
            "/sendToDevice/m.test/t1",
            json!({"messages": {"not-a-user": {"D": {}}}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let (status, body) = alice
        .put(
            "/sendToDevice/m.test/t2",
            json!({"messages": {"@alice:localhost": {"D": "text"}}}),
        )
        .await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")));

    // Nothing above disturbed the room: it still has exactly the creation events.
    let (status, page) = alice
        .get(&format!("/rooms/{}/messages?dir=b&limit=100", enc(&room)))
        .await;
    assert_eq!(status, 200);
    assert!(bodies(&page["chunk"]).is_empty(), "{page}");
    alice.send_text(&room, "ok", "still works").await;
}

#[tokio::test]
async fn login_rate_limit() {
    let server = TestServer::start_with(|c| {
        c.rate_limit.login_burst = 3;
        c.rate_limit.login_per_second = 0.5;
    })
    .await;
    let client = server.client();
    let mut limited = None;
    for _ in 0..5 {
        let (status, body) = client
            .post(
                "/login",
                json!({"type": "m.login.password", "user": "x", "password": "y"}),
            )
            .await;
        if status == 429 {
            limited = Some(body);
            break;
        }
        assert_eq!(status, 403);
    }
    let body = limited.expect("the fourth attempt is limited");
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED");
    assert!(
        body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0 && ms <= 2000),
        "{body}"
    );
    let (_, metrics) = client.get("/metrics").await;
    assert!(
        metrics.as_str().unwrap().contains("switchboard_rate_limited_total 1"),
        "{metrics}"
    );

    // The default is generous: 40 registrations in a row pass.
    let roomy = TestServer::start().await;
    for i in 0..40 {
        let (status, body) = roomy
            .client()
            .post(
                "/register",
                json!({"username": format!("u{i}"), "password": "p", "auth": {"type": "m.login.dummy"}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn metrics_endpoint_counts() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    alice.send_text(&room, "1", "x").await;
    let (status, body) = Client::new(&server.base).get("/metrics").await;
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    for line in [
        "switchboard_registrations_total 1",
        "# TYPE switchboard_events_sent_total counter",
        "switchboard_sync_waiting 0",
        "# TYPE switchboard_sfu_forwarding_delay_seconds summary",
        "switchboard_sfu_forwarding_delay_seconds_count{shard=\"0\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
}
