//! The SFU under test, in its own process: media shards (the same
//! `ShardSet` the all-in-one binary runs) plus a control connection that
//! speaks the signalling side's API as JSON lines, so the load generator
//! needs no Matrix and its CPU time is not counted as the SFU's.
//!
//! Requests `{"id", "op", …}` get `{"id", …}` answers; events come as
//! `{"event": "negotiation_needed", "shard", "session"}`.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sfu::{OwnLines, Participant, RoomId, SessionId, SfuEvent};
use switchboard::drivers::media::ShardSet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

#[allow(clippy::print_stdout)]
pub async fn serve(shards: usize) -> Result<()> {
    let (set, mut events) = ShardSet::spawn("127.0.0.1:0".parse()?, None, shards)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("control {}", listener.local_addr()?);
    let (stream, _) = listener.accept().await?;
    let (read, mut write) = stream.into_split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(mut line) = out_rx.recv().await {
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let event_out = out.clone();
    tokio::spawn(async move {
        while let Some((shard, event)) = events.recv().await {
            if let SfuEvent::NegotiationNeeded(session) = event {
                let _ = event_out
                    .send(json!({"event": "negotiation_needed", "shard": shard, "session": session.0}).to_string());
            }
        }
    });
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let request: Value = serde_json::from_str(&line).context("a JSON request")?;
        let (set, out) = (set.clone(), out.clone());
        tokio::spawn(async move {
            let id = request["id"].clone();
            let mut answer = match execute(&set, &request).await {
                Ok(value) => value,
                Err(e) => json!({"error": e.to_string()}),
            };
            answer["id"] = id;
            let _ = out.send(answer.to_string());
        });
    }
    Ok(())
}

async fn execute(set: &ShardSet, request: &Value) -> Result<Value> {
    let text = |key: &str| {
        request[key]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("missing {key}"))
    };
    let shard = || {
        let index = request["shard"].as_u64().context("missing shard")? as usize;
        set.shard(index).context("no such shard")
    };
    let session = || request["session"].as_u64().map(SessionId).context("missing session");
    match request["op"].as_str().unwrap_or("") {
        "open" => {
            let room = RoomId(text("room")?);
            let (index, handle) = set.shard_for(&room);
            let participant = Participant {
                user_id: text("user")?,
                device_id: "LOAD".into(),
            };
            let (session, answer) = handle
                .open_session(room, participant, text("offer")?, OwnLines::PublishOnly)
                .await?;
            Ok(json!({"shard": index, "session": session.0, "answer": answer}))
        }
        "create_offer" => {
            let offer = shard()?.create_offer(session()?).await?;
            Ok(json!({"offer": offer.map(|o| o.sdp)}))
        }
        "accept_answer" => {
            shard()?.accept_answer(session()?, text("answer")?).await?;
            Ok(json!({"ok": true}))
        }
        "close" => {
            shard()?.close_session(session()?).await?;
            Ok(json!({"ok": true}))
        }
        "stats" => {
            let all = set.stats().await;
            let sum = |f: fn(&sfu::ShardStats) -> u64| all.iter().map(f).sum::<u64>();
            let mut delay = sfu::DelayHistogram::default();
            for shard in &all {
                delay.merge(&shard.forwarding_delay);
            }
            Ok(json!({
                "sessions": sum(|s| s.sessions),
                "subscriptions": sum(|s| s.subscriptions),
                "packets_forwarded": sum(|s| s.packets_forwarded),
                "datagrams_out": sum(|s| s.datagrams_out),
                "datagrams_in": sum(|s| s.datagrams_in),
                "session_timeouts": sum(|s| s.session_timeouts),
                "forwarding_delay": delay.counts(),
            }))
        }
        other => anyhow::bail!("unknown op '{other}'"),
    }
}
