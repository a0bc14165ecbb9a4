//! The callee state machines, table-driven in virtual time.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use switchboard_signalling::call::{Action, CallState, EndReason, Incoming, Signalling};
use switchboard_signalling::events::{CallEvent, HangupReason, SdpStreamMetadata, Version};

const BOT: &str = "@conference:hs";
const BOT_PARTY: &str = "BOTDEVICE";
const ALICE: &str = "@alice:hs";
const ROOM: &str = "!room:hs";

fn event(kind: &str, content: Value) -> CallEvent {
    CallEvent::parse(kind, &content).expect("a valid call event")
}

fn incoming(sender: &str, kind: &str, content: Value) -> Incoming {
    Incoming {
        room_id: ROOM.into(),
        sender: sender.into(),
        age_ms: Some(100),
        event: event(kind, content),
    }
}

fn invite(call_id: &str, extra: Value) -> Incoming {
    let mut content = json!({"version": "1", "call_id": call_id, "party_id": "ALICEPC", "lifetime": 60000,
        "offer": {"type": "offer", "sdp": "v=0 offer"}, "sdp_stream_metadata": {"a": {"purpose": "m.usermedia"}}});
    for (k, v) in extra.as_object().expect("object") {
        content[k] = v.clone();
    }
    incoming(ALICE, "m.call.invite", content)
}

fn from_alice(kind: &str, call_id: &str, extra: Value) -> Incoming {
    let mut content = json!({"version": "1", "call_id": call_id, "party_id": "ALICEPC"});
    for (k, v) in extra.as_object().expect("object") {
        content[k] = v.clone();
    }
    incoming(ALICE, kind, content)
}

fn actions(s: &mut Signalling) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn sent_types(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { event, .. } => Some(event.event_type()),
            _ => None,
        })
        .collect()
}

fn metadata() -> SdpStreamMetadata {
    serde_json::from_value(json!({"sb1-bob": {"purpose": "m.usermedia", "user_id": "@bob:hs"}})).expect("metadata")
}

/// A call taken and answered.
fn answered(call_id: &str) -> (Signalling, Instant) {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.handle_event(now, invite(call_id, json!({})));
    actions(&mut s);
    s.handle_media_answer(now, call_id, "v=0 answer".into(), metadata());
    actions(&mut s);
    (s, now)
}

#[test]
fn invite_answer_connect_hangup() {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.handle_event(now, invite("c1", json!({"invitee": BOT})));
    let first = actions(&mut s);
    assert!(
        matches!(&first[..], [Action::OpenMedia { call_id, offer, metadata: Some(_), .. }] if call_id == "c1" && offer == "v=0 offer")
    );
    assert_eq!(s.state("c1"), Some(CallState::AwaitingMedia));

    s.handle_media_answer(now, "c1", "v=0 answer".into(), metadata());
    let sent = actions(&mut s);
    assert_eq!(sent_types(&sent), vec!["m.call.answer", "m.call.candidates"]);
    let Action::Send { room_id, event: answer } = &sent[0] else {
        panic!("send")
    };
    assert_eq!(room_id, ROOM);
    let content = answer.to_content();
    assert_eq!(
        (content["party_id"].as_str(), content["version"].as_str()),
        (Some(BOT_PARTY), Some("1"))
    );
    assert_eq!(content["answer"]["type"], "answer");
    assert_eq!(content["sdp_stream_metadata"]["sb1-bob"]["user_id"], "@bob:hs");
    let Action::Send { event: candidates, .. } = &sent[1] else {
        panic!("send")
    };
    assert_eq!(
        candidates.to_content()["candidates"],
        json!([{"candidate": ""}]),
        "end of candidates"
    );

    s.handle_event(
        now,
        from_alice("m.call.select_answer", "c1", json!({"selected_party_id": BOT_PARTY})),
    );
    s.handle_event(
        now,
        from_alice(
            "m.call.candidates",
            "c1",
            json!({"candidates": [{"candidate": "candidate:1 1 udp 1 192.0.2.1 1 typ host", "sdpMid": "0"}]}),
        ),
    );
    assert!(
        actions(&mut s).is_empty(),
        "our own selection and trickled candidates need nothing"
    );
    s.handle_media_connected(now, "c1");
    assert_eq!(s.state("c1"), Some(CallState::Connected));

    s.handle_event(now, from_alice("m.call.hangup", "c1", json!({"reason": "user_hangup"})));
    assert_eq!(actions(&mut s), vec![Action::CloseMedia { call_id: "c1".into() }]);
    assert_eq!(
        s.poll_ended(),
        Some(("c1".into(), EndReason::Hangup(HangupReason::UserHangup)))
    );
    // Late events for the ended call are ignored, and its call_id cannot be reused.
    s.handle_event(
        now,
        from_alice("m.call.candidates", "c1", json!({"candidates": [{"candidate": ""}]})),
    );
    s.handle_event(now, invite("c1", json!({})));
    assert!(actions(&mut s).is_empty());
    assert!(s.is_ended("c1"));
}

#[test]
fn invites_that_are_not_taken() {
    let cases: Vec<(&str, Incoming)> = vec![
        (
            "addressed to someone else",
            invite("c", json!({"invitee": "@carol:hs"})),
        ),
        (
            "expired: age beyond lifetime",
            Incoming {
                age_ms: Some(61_000),
                ..invite("c", json!({}))
            },
        ),
        (
            "our own echo",
            incoming(
                BOT,
                "m.call.invite",
                json!({"version": "1", "call_id": "c", "party_id": BOT_PARTY,
            "lifetime": 60000, "offer": {"type": "offer", "sdp": "x"}}),
            ),
        ),
        (
            "from ourselves on another device",
            incoming(
                BOT,
                "m.call.invite",
                json!({"version": "1", "call_id": "c",
            "party_id": "OTHER", "lifetime": 60000, "offer": {"type": "offer", "sdp": "x"}}),
            ),
        ),
    ];
    for (why, event) in cases {
        let mut s = Signalling::new(BOT, BOT_PARTY);
        s.handle_event(Instant::now(), event);
        assert!(actions(&mut s).is_empty(), "{why}");
    }
}

#[test]
fn events_that_do_not_come_from_the_caller_are_ignored() {
    let cases: Vec<(&str, Incoming)> = vec![
        (
            "hangup from another party of the caller",
            incoming(
                ALICE,
                "m.call.hangup",
                json!({"version": "1", "call_id": "c", "party_id": "ALICEPHONE"}),
            ),
        ),
        (
            "hangup from another user",
            incoming(
                "@mallory:hs",
                "m.call.hangup",
                json!({"version": "1", "call_id": "c", "party_id": "ALICEPC"}),
            ),
        ),
        (
            "hangup in another room",
            Incoming {
                room_id: "!other:hs".into(),
                ..from_alice("m.call.hangup", "c", json!({}))
            },
        ),
        (
            "select_answer from another user",
            incoming(
                "@mallory:hs",
                "m.call.select_answer",
                json!({"version": "1", "call_id": "c", "party_id": "ALICEPC", "selected_party_id": "X"}),
            ),
        ),
        (
            "hangup for an unknown call",
            from_alice("m.call.hangup", "unknown", json!({})),
        ),
        (
            "negotiate answer with no offer of ours",
            from_alice(
                "m.call.negotiate",
                "c",
                json!({"description": {"type": "answer", "sdp": "x"}}),
            ),
        ),
        (
            "metadata from someone else",
            incoming(
                "@mallory:hs",
                "m.call.sdp_stream_metadata_changed",
                json!({"version": "1", "call_id": "c", "party_id": "ALICEPC", "sdp_stream_metadata": {}}),
            ),
        ),
    ];
    for (why, event) in cases {
        let (mut s, now) = answered("c");
        s.handle_event(now, event);
        assert!(actions(&mut s).is_empty(), "{why}");
        assert_eq!(s.state("c"), Some(CallState::Answered), "{why}");
    }
}

#[test]
fn a_batch_that_also_ends_the_call_never_rings() {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.handle_batch(
        now,
        vec![invite("c", json!({})), from_alice("m.call.hangup", "c", json!({}))],
    );
    assert!(actions(&mut s).is_empty());
    assert!(s.is_ended("c"));
    // An invite alone in its batch rings.
    s.handle_batch(now, vec![invite("d", json!({}))]);
    assert!(matches!(&actions(&mut s)[..], [Action::OpenMedia { .. }]));
}

#[test]
fn answered_elsewhere_ends_silently() {
    let (mut s, now) = answered("c");
    s.handle_event(
        now,
        from_alice("m.call.select_answer", "c", json!({"selected_party_id": "BOTPHONE"})),
    );
    assert_eq!(actions(&mut s), vec![Action::CloseMedia { call_id: "c".into() }]);
    assert_eq!(s.poll_ended(), Some(("c".into(), EndReason::AnsweredElsewhere)));

    let (mut s, now) = answered("d");
    s.handle_event(
        now,
        incoming(
            BOT,
            "m.call.answer",
            json!({"version": "1", "call_id": "d", "party_id": "BOTPHONE",
        "answer": {"type": "answer", "sdp": "x"}}),
        ),
    );
    assert_eq!(actions(&mut s), vec![Action::CloseMedia { call_id: "d".into() }]);
}

#[test]
fn an_invite_not_answered_in_its_lifetime_expires() {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.handle_event(
        now,
        Incoming {
            age_ms: Some(59_000),
            ..invite("c", json!({}))
        },
    );
    actions(&mut s);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_millis(1000)));
    s.handle_timeout(now + Duration::from_millis(999));
    assert_eq!(s.state("c"), Some(CallState::AwaitingMedia));
    s.handle_timeout(now + Duration::from_millis(1000));
    assert_eq!(actions(&mut s), vec![Action::CloseMedia { call_id: "c".into() }]);
    s.handle_media_answer(now + Duration::from_secs(2), "c", "late".into(), metadata());
    assert!(actions(&mut s).is_empty(), "a late media answer sends nothing");
}

#[test]
fn version_0_callers() {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    let v0 = incoming(
        ALICE,
        "m.call.invite",
        json!({"version": 0, "call_id": "c", "lifetime": 60000,
        "offer": {"type": "offer", "sdp": "v=0"}}),
    );
    s.handle_event(now, v0);
    actions(&mut s);
    s.handle_media_answer(now, "c", "v=0 answer".into(), metadata());
    let sent = actions(&mut s);
    let Action::Send { event, .. } = &sent[0] else {
        panic!("send")
    };
    let content = event.to_content();
    assert_eq!(content["version"], 0);
    assert!(content.get("party_id").is_none() && content.get("sdp_stream_metadata").is_none());
    assert!(
        !s.renegotiate(now, "c", "offer".into(), metadata()),
        "v0 cannot renegotiate"
    );
    // Our own v0 answer comes back through sync without a party id: it is our
    // echo, not another device of ours answering.
    s.handle_event(now, incoming(BOT, "m.call.answer", content.clone()));
    assert_eq!(
        s.state("c"),
        Some(CallState::Answered),
        "our echo does not end the call"
    );
    // A v0 hangup has no party and no reason.
    s.handle_event(
        now,
        incoming(ALICE, "m.call.hangup", json!({"version": 0, "call_id": "c"})),
    );
    assert_eq!(
        s.poll_ended(),
        Some(("c".into(), EndReason::Hangup(HangupReason::UserHangup)))
    );

    // A v0 call that cannot get media is hung up (v0 has no reject)...
    s.handle_event(
        now,
        incoming(
            ALICE,
            "m.call.invite",
            json!({"version": 0, "call_id": "d", "lifetime": 60000,
        "offer": {"type": "offer", "sdp": "v=0"}}),
        ),
    );
    actions(&mut s);
    s.handle_media_failed(now, "d");
    assert_eq!(sent_types(&actions(&mut s)), vec!["m.call.hangup"]);
    // ...a v1 one is rejected.
    s.handle_event(now, invite("e", json!({})));
    actions(&mut s);
    s.handle_media_failed(now, "e");
    let sent = actions(&mut s);
    assert_eq!(sent_types(&sent), vec!["m.call.reject"]);
    assert!(matches!(sent.last(), Some(Action::CloseMedia { .. })));
}

#[test]
fn renegotiation_both_ways() {
    let (mut s, now) = answered("c");
    s.handle_media_connected(now, "c");
    // Ours: offer out, the caller's answer goes to the media session.
    assert!(s.renegotiate(now, "c", "v=0 sfu offer".into(), metadata()));
    let sent = actions(&mut s);
    let Action::Send { event, .. } = &sent[0] else {
        panic!("send")
    };
    let content = event.to_content();
    assert_eq!(
        (content["description"]["type"].as_str(), content["lifetime"].as_u64()),
        (Some("offer"), Some(10_000))
    );
    assert_eq!(content["sdp_stream_metadata"]["sb1-bob"]["purpose"], "m.usermedia");
    s.handle_event(
        now,
        from_alice(
            "m.call.negotiate",
            "c",
            json!({"description": {"type": "answer", "sdp": "v=0 ans"}}),
        ),
    );
    assert_eq!(
        actions(&mut s),
        vec![Action::MediaAnswer {
            call_id: "c".into(),
            answer: "v=0 ans".into()
        }]
    );
    // A second answer for the same offer is ignored.
    s.handle_event(
        now,
        from_alice(
            "m.call.negotiate",
            "c",
            json!({"description": {"type": "answer", "sdp": "again"}}),
        ),
    );
    assert!(actions(&mut s).is_empty());

    // Theirs (e.g. an ICE restart): their offer to the media session, our answer back.
    s.handle_event(
        now,
        from_alice(
            "m.call.negotiate",
            "c",
            json!({"description": {"type": "offer", "sdp": "v=0 restart"}}),
        ),
    );
    assert_eq!(
        actions(&mut s),
        vec![Action::MediaOffer {
            call_id: "c".into(),
            offer: "v=0 restart".into()
        }]
    );
    s.handle_media_renegotiated(now, "c", "v=0 our answer".into(), metadata());
    let sent = actions(&mut s);
    let Action::Send { event, .. } = &sent[0] else {
        panic!("send")
    };
    assert_eq!(event.to_content()["description"]["type"], "answer");

    // An offer that adds a stream (a screen share) says what it is: that
    // comes before the offer goes to the media session.
    let shared = json!({"cam": {"purpose": "m.usermedia"}, "screen": {"purpose": "m.screenshare"}});
    s.handle_event(
        now,
        from_alice(
            "m.call.negotiate",
            "c",
            json!({"description": {"type": "offer", "sdp": "v=0 share"}, "sdp_stream_metadata": shared}),
        ),
    );
    let got = actions(&mut s);
    let [
        Action::PeerMetadata {
            call_id,
            metadata: told,
        },
        Action::MediaOffer { offer, .. },
    ] = got.as_slice()
    else {
        panic!("metadata, then the offer: {got:?}")
    };
    assert_eq!((call_id.as_str(), offer.as_str()), ("c", "v=0 share"));
    assert_eq!(told["screen"].purpose, "m.screenshare");
    s.handle_media_renegotiated(now, "c", "v=0 our answer".into(), metadata());
    actions(&mut s);

    // Glare: the caller's offer arrives while ours waits: we are polite, theirs wins.
    assert!(s.renegotiate(now, "c", "ours".into(), metadata()));
    actions(&mut s);
    s.handle_event(
        now,
        from_alice(
            "m.call.negotiate",
            "c",
            json!({"description": {"type": "offer", "sdp": "theirs"}}),
        ),
    );
    assert_eq!(
        actions(&mut s),
        vec![Action::MediaOffer {
            call_id: "c".into(),
            offer: "theirs".into()
        }]
    );

    // Metadata changes are relayed.
    s.handle_event(
        now,
        from_alice(
            "m.call.sdp_stream_metadata_changed",
            "c",
            json!({"sdp_stream_metadata": {"a": {"purpose": "m.usermedia", "audio_muted": true}}}),
        ),
    );
    let relayed = actions(&mut s);
    assert!(matches!(&relayed[..], [Action::PeerMetadata { metadata, .. }] if metadata["a"].audio_muted));
}

#[test]
fn media_loss_hangs_up_with_the_right_reason() {
    let (mut s, now) = answered("c");
    s.handle_media_closed(now, "c");
    let sent = actions(&mut s);
    let Action::Send { event, .. } = &sent[0] else {
        panic!("send")
    };
    assert_eq!(event.to_content()["reason"], "ice_failed", "never connected");

    let (mut s, now) = answered("d");
    s.handle_media_connected(now, "d");
    s.handle_media_closed(now, "d");
    let sent = actions(&mut s);
    let Action::Send { event, .. } = &sent[0] else {
        panic!("send")
    };
    assert_eq!(event.to_content()["reason"], "ice_timeout", "lost after connecting");
}

#[test]
fn leaving_the_room_or_hanging_up_locally_ends_the_call() {
    let (mut s, now) = answered("c");
    s.handle_member_left(now, ROOM, "@bob:hs");
    assert!(actions(&mut s).is_empty(), "someone else left");
    s.handle_member_left(now, ROOM, ALICE);
    assert_eq!(actions(&mut s), vec![Action::CloseMedia { call_id: "c".into() }]);
    assert_eq!(s.poll_ended(), Some(("c".into(), EndReason::PeerLeft)));

    let (mut s, now) = answered("d");
    s.hangup(now, "d", HangupReason::UserHangup);
    let sent = actions(&mut s);
    assert_eq!(sent_types(&sent), vec!["m.call.hangup"]);
    let Action::Send { event, .. } = &sent[0] else {
        panic!("send")
    };
    assert_eq!(event.header().version, Version::V1);
    assert_eq!(event.to_content()["reason"], "user_hangup");
}

#[test]
fn an_absurd_lifetime_is_capped() {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.handle_event(now, invite("c", json!({"lifetime": u64::MAX})));
    assert!(matches!(&actions(&mut s)[..], [Action::OpenMedia { .. }]));
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(3600)));
}
