//! Conference bot benchmark: how fast the bot answers a call, and how soon
//! media can flow.
//!
//! Starts the release `switchboard` all-in-one (bot on), one caller in a room
//! with the bot, then places calls one after another with a real str0m offer:
//! - **answer round trip**: invite sent → `m.call.answer` seen in the caller's `/sync`;
//! - **baseline** (same run, same caller): a plain message sent → seen in `/sync`;
//! - the difference is the bot's part (invite seen → answer sent, incl. the SFU
//!   opening a session);
//! - **connected**: invite sent → ICE + DTLS-SRTP up at the caller.

use crate::homeserver::{Client, enc, start_server};
use crate::proc_stat;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, RtcConfig};
use tokio::net::UdpSocket;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Calls to place, one after another.
    #[arg(long, default_value_t = 40)]
    calls: usize,
}

struct Caller {
    api: Client,
    since: String,
}

impl Caller {
    /// Waits (bounded) for a timeline event in `room` matching `want`; returns it.
    async fn wait_for(&mut self, room: &str, want: impl Fn(&Value) -> bool) -> Result<Value> {
        for _ in 0..20 {
            let path = format!("/sync?since={}&timeout=2000", self.since);
            let body = self.api.call(reqwest::Method::GET, &path, None).await?;
            self.since = body["next_batch"].as_str().context("next_batch")?.to_string();
            let events = body["rooms"]["join"][room]["timeline"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if let Some(event) = events.into_iter().find(|e| want(e)) {
                return Ok(event);
            }
        }
        bail!("the awaited event never came")
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        self.api.call(method, path, body).await
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[allow(clippy::print_stdout)]
pub async fn run(args: Args) -> Result<()> {
    let mut server = start_server(&["--set", "media.shards=1"]).await?;
    let pid = server.child.id().context("pid")?;
    let http = reqwest::Client::new();
    let mut caller = Caller {
        api: Client::register(&http, &server.base, "caller").await?,
        since: String::new(),
    };
    let bot = "@conference:localhost";
    let room = caller
        .call(reqwest::Method::POST, "/createRoom", Some(json!({"invite": [bot]})))
        .await?;
    let room = room["room_id"].as_str().context("room_id")?.to_string();
    caller.since = caller.call(reqwest::Method::GET, "/sync?timeout=0", None).await?["next_batch"]
        .as_str()
        .context("next_batch")?
        .to_string();
    // The bot joins on its own (maybe before our first sync): ask the room.
    let members = format!("/rooms/{}/joined_members", enc(&room));
    for attempt in 0.. {
        if caller.call(reqwest::Method::GET, &members, None).await?["joined"]
            .get(bot)
            .is_some()
        {
            break;
        }
        if attempt == 100 {
            bail!("the bot did not join");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (mut answers, mut baselines, mut connects) = (Vec::new(), Vec::new(), Vec::new());
    let cpu_before = proc_stat::cpu_time(pid).unwrap_or_default();
    for i in 0..args.calls {
        // Baseline: a message's round trip through the homeserver.
        let started = Instant::now();
        let path = format!("/rooms/{}/send/m.room.message/b{i}", enc(&room));
        caller
            .call(
                reqwest::Method::PUT,
                &path,
                Some(json!({"msgtype": "m.text", "body": format!("ping {i}")})),
            )
            .await?;
        let body = format!("ping {i}");
        caller
            .wait_for(&room, |e| e["content"]["body"] == body.as_str())
            .await?;
        baselines.push(started.elapsed());

        // A call with a real offer.
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let local = socket.local_addr()?;
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| anyhow::anyhow!("{e}"))?);
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendRecv, Some("cam".into()), None, None);
        api.add_media(MediaKind::Video, Direction::SendRecv, Some("cam".into()), None, None);
        let (offer, pending) = api.apply().context("offer")?;
        let call_id = format!("bench{i}");
        let invite = json!({"version": "1", "call_id": call_id, "party_id": caller.api.device_id, "lifetime": 60000,
            "invitee": bot, "offer": {"type": "offer", "sdp": offer.to_sdp_string()},
            "sdp_stream_metadata": {"cam": {"purpose": "m.usermedia"}}});
        let started = Instant::now();
        let path = format!("/rooms/{}/send/m.call.invite/i{i}", enc(&room));
        caller.call(reqwest::Method::PUT, &path, Some(invite)).await?;
        let answer = caller
            .wait_for(&room, |e| {
                e["type"] == "m.call.answer" && e["content"]["call_id"] == call_id.as_str()
            })
            .await?;
        answers.push(started.elapsed());
        let sdp = answer["content"]["answer"]["sdp"].as_str().context("answer sdp")?;
        rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(sdp)?)?;
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(10);
        'connect: while Instant::now() < deadline {
            let timeout = loop {
                match rtc.poll_output()? {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        socket.send_to(&t.contents, t.destination).await?;
                    }
                    Output::Event(Event::Connected) => {
                        connects.push(started.elapsed());
                        break 'connect;
                    }
                    Output::Event(_) => {}
                }
            };
            tokio::select! {
                received = socket.recv_from(&mut buf) => {
                    let (len, source) = received?;
                    rtc.handle_input(Input::Receive(Instant::now(), Receive::new(Protocol::Udp, source, local, &buf[..len])?))?;
                }
                () = tokio::time::sleep_until(timeout.min(deadline).into()) => rtc.handle_input(Input::Timeout(Instant::now()))?,
            }
        }
        let hangup =
            json!({"version": "1", "call_id": call_id, "party_id": caller.api.device_id, "reason": "user_hangup"});
        let path = format!("/rooms/{}/send/m.call.hangup/h{i}", enc(&room));
        caller.call(reqwest::Method::PUT, &path, Some(hangup)).await?;
    }
    let cpu = proc_stat::cpu_time(pid).unwrap_or_default().saturating_sub(cpu_before);
    for list in [&mut answers, &mut baselines, &mut connects] {
        list.sort();
    }
    let mut bot_part: Vec<Duration> = answers
        .iter()
        .zip(&baselines)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    bot_part.sort();
    println!(
        "bot: {} calls; answer round trip p50 {:.1} ms p99 {:.1} ms; baseline message round trip p50 {:.1} ms p99 {:.1} ms",
        answers.len(),
        percentile(&answers, 0.5),
        percentile(&answers, 0.99),
        percentile(&baselines, 0.5),
        percentile(&baselines, 0.99)
    );
    println!(
        "bot: bot's part (answer minus baseline, incl. opening the SFU session) p50 {:.1} ms p99 {:.1} ms (goal p50 < 20 ms)",
        percentile(&bot_part, 0.5),
        percentile(&bot_part, 0.99)
    );
    println!(
        "bot: place -> ICE+DTLS connected p50 {:.1} ms p99 {:.1} ms ({} of {} connected); server CPU {:.2} s",
        percentile(&connects, 0.5),
        percentile(&connects, 0.99),
        connects.len(),
        answers.len(),
        cpu.as_secs_f64()
    );
    server.child.kill().await.ok();
    Ok(())
}
