//! The real binary killed and restarted: what was acknowledged is still there.

mod common;

use common::{BinaryServer, Client, enc};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Mutex;

/// Re-points a client (same token) at a restarted server.
fn reconnect(client: &Client, server: &BinaryServer) -> Client {
    let mut again = client.clone();
    again.base = server.base.clone();
    again
}

#[tokio::test]
async fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(dir.path(), &[]).await;
    let mut alice = server.client();
    alice.register("alice", "pw").await;
    let room = alice.create_room(json!({"name": "durable"})).await;

    // Four senders in parallel; the server is killed while they are sending.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..4 {
        let (alice, room, acknowledged, stop) = (alice.clone(), room.clone(), acknowledged.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let url = format!(
                    "{}/_matrix/client/v3/rooms/{}/send/m.room.message/s{s}-{i}",
                    alice.base,
                    enc(&room)
                );
                let sent = alice
                    .http
                    .put(url)
                    .bearer_auth(alice.token.as_ref().unwrap())
                    .json(&json!({"body": i}))
                    .send()
                    .await;
                let Ok(resp) = sent else { break };
                if resp.status() != 200 {
                    break;
                }
                let Ok(body) = resp.json::<serde_json::Value>().await else {
                    break;
                };
                if let Some(id) = body["event_id"].as_str() {
                    acknowledged.lock().await.push(id.to_string());
                }
            }
        }));
    }
    // Kill once a good number of sends were acknowledged, mid-stream.
    for _ in 0..2_000 {
        if acknowledged.lock().await.len() >= 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.child.start_kill().unwrap(); // SIGKILL
    server.child.wait().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap();
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert!(
        acknowledged.len() >= 200,
        "only {} sends acknowledged",
        acknowledged.len()
    );

    let server = BinaryServer::start(dir.path(), &[]).await;
    let alice = reconnect(&alice, &server);
    let (status, _) = alice.get("/account/whoami").await;
    assert_eq!(status, 200, "the access token survived");
    for id in &acknowledged {
        let (status, body) = alice.get(&format!("/rooms/{}/event/{}", enc(&room), enc(id))).await;
        assert_eq!(status, 200, "acknowledged event {id} lost after SIGKILL: {body}");
    }
    // And the room still works.
    alice.send_text(&room, "after-restart", "still here").await;
}

#[tokio::test]
async fn undelivered_to_device_messages_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(dir.path(), &[]).await;
    let mut alice = server.client();
    alice.register("alice", "pw").await;
    let mut bob = server.client();
    bob.register("bob", "pw").await;
    let since = bob.sync("").await["next_batch"].as_str().unwrap().to_string();
    let msg = json!({"messages": {"@bob:localhost": {"*": {"call_id": "c1"}}}});
    assert_eq!(alice.put("/sendToDevice/m.call.invite/t1", msg).await.0, 200);
    let turn_secret = std::fs::read_to_string(dir.path().join("turn_secret")).unwrap();

    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let mut server = BinaryServer::start(dir.path(), &[]).await;
    let bob = reconnect(&bob, &server);
    let first = bob.sync(&format!("?since={since}&timeout=0")).await;
    assert_eq!(first["to_device"]["events"][0]["content"]["call_id"], "c1", "{first}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("turn_secret")).unwrap(),
        turn_secret,
        "secret kept"
    );

    // Delivered but not acknowledged: still there after another restart.
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let mut server = BinaryServer::start(dir.path(), &[]).await;
    let bob = reconnect(&bob, &server);
    let again = bob.sync(&format!("?since={since}&timeout=0")).await;
    assert_eq!(again["to_device"]["events"].as_array().unwrap().len(), 1);
    // Acknowledged: gone, also after a restart.
    let next = again["next_batch"].as_str().unwrap().to_string();
    bob.sync(&format!("?since={next}&timeout=0")).await;
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let server = BinaryServer::start(dir.path(), &[]).await;
    let bob = reconnect(&bob, &server);
    let after = bob.sync(&format!("?since={since}&timeout=0")).await;
    assert!(after["to_device"]["events"].as_array().unwrap().is_empty());
}
