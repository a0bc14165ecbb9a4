//! `/sync` over real HTTP: initial and incremental, long-polling, filters,
//! invites and leaves, transaction ids and to-device delivery.

mod common;

use common::{TestServer, bodies, enc, types};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Waits (bounded) until the server reports `n` long-polling syncs, so an
/// event sent next is known to wake a waiting request rather than race it.
async fn wait_until_syncing(server: &TestServer, n: usize) {
    let metrics = server.client();
    let line = format!("switchboard_sync_waiting {n}");
    for _ in 0..500 {
        let (_, text) = metrics.get("/metrics").await;
        if text.as_str().expect("metrics are text").lines().any(|l| l == line) {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("no long-polling sync showed up");
}

fn joined<'a>(sync: &'a Value, room: &str) -> &'a Value {
    &sync["rooms"]["join"][room]
}

#[tokio::test]
async fn initial_and_incremental_sync() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice
        .create_room(json!({"name": "R", "invite": ["@bob:localhost"]}))
        .await;
    bob.join(&room).await;
    let sent = alice.send_text(&room, "t1", "first").await;

    let initial = alice.sync("").await;
    let next = initial["next_batch"].as_str().unwrap().to_string();
    let room_sync = joined(&initial, &room);
    let all_types: Vec<String> = types(&room_sync["state"]["events"])
        .into_iter()
        .chain(types(&room_sync["timeline"]["events"]))
        .collect();
    for kind in ["m.room.create", "m.room.power_levels", "m.room.name", "m.room.member"] {
        assert!(all_types.contains(&kind.to_string()), "{kind} in {all_types:?}");
    }
    assert_eq!(
        bodies(&room_sync["timeline"]["events"]).last().map(String::as_str),
        Some("first")
    );
    let ev = room_sync["timeline"]["events"].as_array().unwrap().last().unwrap();
    assert_eq!(ev["event_id"].as_str(), Some(sent.as_str()));
    assert_eq!(
        ev["unsigned"]["transaction_id"], "t1",
        "the sender's device sees its txn id"
    );
    assert!(ev["unsigned"]["age"].as_u64().is_some());
    let bob_view = bob.sync("").await;
    let ev = joined(&bob_view, &room)["timeline"]["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(ev["unsigned"].get("transaction_id").is_none(), "others do not");

    // Nothing new: an immediate empty answer with timeout=0, no rooms listed.
    let empty = alice.sync(&format!("?since={next}&timeout=0")).await;
    assert!(empty["rooms"]["join"].as_object().unwrap().is_empty(), "{empty}");
    assert_eq!(empty["next_batch"].as_str(), Some(next.as_str()));

    bob.send_text(&room, "b1", "second").await;
    let inc = alice.sync(&format!("?since={next}&timeout=0")).await;
    let timeline = &joined(&inc, &room)["timeline"];
    assert_eq!(bodies(&timeline["events"]), vec!["second"]);
    assert_eq!(timeline["limited"], false);
    assert!(joined(&inc, &room)["state"]["events"].as_array().unwrap().is_empty());

    // full_state resends the state along with the news.
    let full = alice.sync(&format!("?since={next}&full_state=true")).await;
    assert!(types(&joined(&full, &room)["state"]["events"]).contains(&"m.room.create".to_string()));
}

#[tokio::test]
async fn limited_timeline_and_prev_batch() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let base = alice.sync("").await["next_batch"].as_str().unwrap().to_string();
    for i in 0..15 {
        alice.send_text(&room, &format!("t{i}"), &format!("m{i}")).await;
    }
    alice
        .put(
            &format!("/rooms/{}/state/m.room.topic/", enc(&room)),
            json!({"topic": "gap state"}),
        )
        .await;
    for i in 15..20 {
        alice.send_text(&room, &format!("t{i}"), &format!("m{i}")).await;
    }
    let filter = enc(r#"{"room":{"timeline":{"limit":5}}}"#);
    let inc = alice.sync(&format!("?since={base}&filter={filter}")).await;
    let timeline = &joined(&inc, &room)["timeline"];
    assert_eq!(timeline["limited"], true);
    assert_eq!(bodies(&timeline["events"]), vec!["m15", "m16", "m17", "m18", "m19"]);
    // The state change in the gap is in `state`.
    assert_eq!(types(&joined(&inc, &room)["state"]["events"]), vec!["m.room.topic"]);
    // prev_batch continues backwards without a gap.
    let prev = timeline["prev_batch"].as_str().unwrap();
    let (status, page) = alice
        .get(&format!("/rooms/{}/messages?dir=b&limit=3&from={prev}", enc(&room)))
        .await;
    assert_eq!(status, 200);
    assert_eq!(types(&page["chunk"])[0], "m.room.topic");
    assert_eq!(bodies(&page["chunk"]), vec!["m14", "m13"]);

    // The same filter by id, with types.
    let (_, created) = alice
        .post(
            "/user/@alice:localhost/filter",
            json!({"room": {"timeline": {"limit": 2, "not_types": ["m.room.topic"]}}}),
        )
        .await;
    let id = created["filter_id"].as_str().unwrap();
    let initial = alice.sync(&format!("?filter={id}")).await;
    assert_eq!(
        bodies(&joined(&initial, &room)["timeline"]["events"]),
        vec!["m18", "m19"]
    );
    let only_other = alice
        .sync(&format!(
            "?filter={}",
            enc(r#"{"room":{"rooms":["!other:localhost"]}}"#)
        ))
        .await;
    assert!(only_other["rooms"]["join"].as_object().unwrap().is_empty());
}

#[tokio::test]
async fn invites_joins_and_leaves_appear_once() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let since = bob.sync("").await["next_batch"].as_str().unwrap().to_string();
    let room = alice.create_room(json!({"name": "Invite me"})).await;
    alice.invite(&room, "@bob:localhost").await;

    let inc = bob.sync(&format!("?since={since}&timeout=0")).await;
    let invite_state = &inc["rooms"]["invite"][&room]["invite_state"]["events"];
    assert!(types(invite_state).contains(&"m.room.name".to_string()), "{inc}");
    let since = inc["next_batch"].as_str().unwrap().to_string();
    let again = bob.sync(&format!("?since={since}&timeout=0")).await;
    assert!(
        again["rooms"]["invite"].as_object().unwrap().is_empty(),
        "invites are reported once"
    );

    bob.join(&room).await;
    alice.send_text(&room, "hi", "welcome").await;
    let inc = bob.sync(&format!("?since={since}&timeout=0")).await;
    let room_sync = joined(&inc, &room);
    let seen: Vec<String> = types(&room_sync["state"]["events"])
        .into_iter()
        .chain(types(&room_sync["timeline"]["events"]))
        .collect();
    assert!(
        seen.contains(&"m.room.create".to_string()),
        "a new join gets the room's state: {seen:?}"
    );
    assert!(bodies(&room_sync["timeline"]["events"]).contains(&"welcome".to_string()));
    let since = inc["next_batch"].as_str().unwrap().to_string();

    bob.leave(&room).await;
    alice.send_text(&room, "bye", "after bob left").await;
    let inc = bob.sync(&format!("?since={since}&timeout=0")).await;
    let left = &inc["rooms"]["leave"][&room];
    let timeline = &left["timeline"]["events"];
    let last = timeline.as_array().unwrap().last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["content"]["membership"].as_str()),
        (Some("m.room.member"), Some("leave"))
    );
    assert!(
        !bodies(timeline).contains(&"after bob left".to_string()),
        "nothing after the departure"
    );
    assert!(inc["rooms"]["join"].as_object().unwrap().get(&room).is_none());
}

#[tokio::test]
async fn long_poll_wakes_on_new_event() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({"invite": ["@bob:localhost"]})).await;
    bob.join(&room).await;
    let since = bob.sync("").await["next_batch"].as_str().unwrap().to_string();

    let waiter = {
        let bob = bob.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let body = bob.sync(&format!("?since={since}&timeout=30000")).await;
            (started.elapsed(), body)
        })
    };
    // Wait until the server reports the sync as waiting, then send.
    wait_until_syncing(&server, 1).await;
    alice.send_text(&room, "wake", "wake up").await;
    let (elapsed, body) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("sync returned")
        .unwrap();
    assert_eq!(bodies(&joined(&body, &room)["timeline"]["events"]), vec!["wake up"]);
    assert!(
        elapsed < Duration::from_secs(10),
        "woken by the event, not by the 30 s timeout ({elapsed:?})"
    );

    // A timeout with nothing new returns empty after about the timeout.
    let since = body["next_batch"].as_str().unwrap().to_string();
    let started = Instant::now();
    let body = bob.sync(&format!("?since={since}&timeout=300")).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(body["rooms"]["join"].as_object().unwrap().is_empty());
}

#[tokio::test]
async fn to_device_delivery_and_acknowledgement() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut bob_phone = server.client();
    let (_, login) = bob_phone
        .post(
            "/login",
            json!({"type": "m.login.password", "user": "bob", "password": "correct horse", "device_id": "PHONE"}),
        )
        .await;
    bob_phone.adopt(&login);
    let since = bob.sync("").await["next_batch"].as_str().unwrap().to_string();
    let phone_since = bob_phone.sync("").await["next_batch"].as_str().unwrap().to_string();

    let to_one = json!({"messages": {"@bob:localhost": {(bob.device_id.clone()): {"call_id": "c1", "seq": 0}}}});
    assert_eq!(
        alice.put("/sendToDevice/m.call.invite/tx1", to_one.clone()).await.0,
        200
    );
    assert_eq!(
        alice.put("/sendToDevice/m.call.invite/tx1", to_one).await.0,
        200,
        "a retried txn is stored once"
    );
    let to_all = json!({"messages": {"@bob:localhost": {"*": {"call_id": "c2"}}, "@nobody:localhost": {"*": {}}}});
    assert_eq!(alice.put("/sendToDevice/m.call.hangup/tx2", to_all).await.0, 200);

    let first = bob.sync(&format!("?since={since}&timeout=0")).await;
    let events = first["to_device"]["events"].as_array().unwrap().clone();
    assert_eq!(events.len(), 2, "{first}");
    assert_eq!(events[0]["type"], "m.call.invite");
    assert_eq!(events[0]["sender"], "@alice:localhost");
    assert_eq!(events[0]["content"]["call_id"], "c1");
    assert_eq!(events[1]["content"]["call_id"], "c2");

    // Not acknowledged yet (same since): delivered again.
    let retry = bob.sync(&format!("?since={since}&timeout=0")).await;
    assert_eq!(retry["to_device"]["events"].as_array().unwrap().len(), 2);
    // Acknowledged by moving on: gone.
    let next = first["next_batch"].as_str().unwrap();
    let after = bob.sync(&format!("?since={next}&timeout=0")).await;
    assert!(after["to_device"]["events"].as_array().unwrap().is_empty());
    let again = bob.sync(&format!("?since={since}&timeout=0")).await;
    assert!(
        again["to_device"]["events"].as_array().unwrap().is_empty(),
        "deleted once acknowledged"
    );

    // The phone got only the `*` message.
    let phone = bob_phone.sync(&format!("?since={phone_since}&timeout=0")).await;
    let phone_events = phone["to_device"]["events"].as_array().unwrap();
    assert_eq!(phone_events.len(), 1);
    assert_eq!(phone_events[0]["type"], "m.call.hangup");

    // A long-polling sync is woken by a to-device message.
    let since = after["next_batch"].as_str().unwrap().to_string();
    let waiter = {
        let bob = bob.clone();
        tokio::spawn(async move { bob.sync(&format!("?since={since}&timeout=20000")).await })
    };
    wait_until_syncing(&server, 1).await;
    let msg = json!({"messages": {"@bob:localhost": {"*": {"n": 3}}}});
    alice.put("/sendToDevice/m.call.candidates/tx3", msg).await;
    let woken = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken")
        .unwrap();
    assert_eq!(woken["to_device"]["events"][0]["content"]["n"], 3);
}

#[tokio::test]
async fn many_to_device_messages_are_paged_without_loss() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut since = bob.sync("").await["next_batch"].as_str().unwrap().to_string();
    let mut messages = serde_json::Map::new();
    let mut devices = serde_json::Map::new();
    devices.insert("*".into(), json!({"k": 0}));
    messages.insert("@bob:localhost".into(), Value::Object(devices));
    for i in 0..250 {
        let body = json!({"messages": {"@bob:localhost": {(bob.device_id.clone()): {"i": i}}}});
        assert_eq!(alice.put(&format!("/sendToDevice/m.test/p{i}"), body).await.0, 200);
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        let sync = bob.sync(&format!("?since={since}&timeout=0")).await;
        let events = sync["to_device"]["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        got.extend(events.iter().map(|e| e["content"]["i"].as_i64().unwrap()));
        since = sync["next_batch"].as_str().unwrap().to_string();
    }
    assert_eq!(got, (0..250).collect::<Vec<i64>>());
}
