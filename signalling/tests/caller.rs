//! The caller state machine and glare, table-driven in virtual time.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use switchboard_signalling::call::{Action, CallState, EndReason, INVITE_LIFETIME, Incoming, Signalling};
use switchboard_signalling::events::{CallEvent, HangupReason, SdpStreamMetadata};

const BOT: &str = "@conference:hs";
const BOT_PARTY: &str = "BOTDEVICE";
const ALICE: &str = "@alice:hs";
const ROOM: &str = "!dm:hs";

fn incoming(sender: &str, kind: &str, content: Value) -> Incoming {
    Incoming {
        room_id: ROOM.into(),
        sender: sender.into(),
        age_ms: Some(100),
        event: CallEvent::parse(kind, &content).expect("a valid call event"),
    }
}

/// An event from one of alice's devices.
fn from(party: &str, kind: &str, call_id: &str, extra: Value) -> Incoming {
    let mut content = json!({"version": "1", "call_id": call_id, "party_id": party});
    for (k, v) in extra.as_object().expect("object") {
        content[k] = v.clone();
    }
    incoming(ALICE, kind, content)
}

fn answer(party: &str, call_id: &str) -> Incoming {
    from(
        party,
        "m.call.answer",
        call_id,
        json!({"answer": {"type": "answer", "sdp": format!("v=0 answer from {party}")}}),
    )
}

fn actions(s: &mut Signalling) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// The events sent, as (type, content).
fn sent(actions: &[Action]) -> Vec<(&'static str, Value)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { event, .. } => Some((event.event_type(), event.to_content())),
            _ => None,
        })
        .collect()
}

fn types(actions: &[Action]) -> Vec<&'static str> {
    sent(actions).into_iter().map(|(t, _)| t).collect()
}

/// A call from the bot to alice, invite sent.
fn ringing(call_id: &str) -> (Signalling, Instant) {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.place_call(now, call_id, ROOM, ALICE);
    actions(&mut s);
    s.handle_media_offer(now, call_id, "v=0 our offer".into(), SdpStreamMetadata::new());
    actions(&mut s);
    (s, now)
}

#[test]
fn place_answer_select_hangup() {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.place_call(now, "b1", ROOM, ALICE);
    assert_eq!(
        actions(&mut s),
        vec![Action::CreateOffer {
            call_id: "b1".into(),
            room_id: ROOM.into(),
            callee: ALICE.into()
        }]
    );
    assert_eq!(s.state("b1"), Some(CallState::Preparing));

    s.handle_media_offer(now, "b1", "v=0 our offer".into(), SdpStreamMetadata::new());
    let out = actions(&mut s);
    let events = sent(&out);
    assert_eq!(types(&out), vec!["m.call.invite", "m.call.candidates"]);
    let invite = &events[0].1;
    assert_eq!(invite["invitee"], ALICE);
    assert_eq!(invite["party_id"], BOT_PARTY);
    assert_eq!(invite["version"], "1");
    assert_eq!(invite["lifetime"], INVITE_LIFETIME.as_millis() as u64);
    assert_eq!(invite["offer"]["type"], "offer");
    assert_eq!(events[1].1["candidates"], json!([{"candidate": ""}]));
    assert_eq!(s.state("b1"), Some(CallState::InviteSent));

    // The echo of our own invite changes nothing.
    let mut echo = invite.clone();
    echo["call_id"] = "b1".into();
    s.handle_event(now, incoming(BOT, "m.call.invite", echo));
    assert!(actions(&mut s).is_empty());

    // Alice's laptop answers first: taken and selected; her phone's answer is ignored.
    s.handle_event(now, answer("LAPTOP", "b1"));
    let out = actions(&mut s);
    assert!(
        matches!(&out[0], Action::PeerAnswer { call_id, callee_party: Some(p), renegotiates: true, answer, .. }
        if call_id == "b1" && p == "LAPTOP" && answer == "v=0 answer from LAPTOP")
    );
    let events = sent(&out);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "m.call.select_answer");
    assert_eq!(events[0].1["selected_party_id"], "LAPTOP");
    s.handle_event(now, answer("PHONE", "b1"));
    assert!(actions(&mut s).is_empty(), "a later answer is ignored");
    assert_eq!(s.state("b1"), Some(CallState::Answered));

    // Only the selected device may hang up.
    s.handle_event(now, from("PHONE", "m.call.hangup", "b1", json!({})));
    assert!(actions(&mut s).is_empty());
    s.handle_media_connected(now, "b1");
    assert_eq!(s.state("b1"), Some(CallState::Connected));
    s.handle_event(
        now,
        from("LAPTOP", "m.call.hangup", "b1", json!({"reason": "user_hangup"})),
    );
    assert_eq!(actions(&mut s), vec![Action::CloseMedia { call_id: "b1".into() }]);
    assert_eq!(
        s.poll_ended(),
        Some(("b1".into(), EndReason::Hangup(HangupReason::UserHangup)))
    );
}

#[test]
fn a_reject_is_selected_and_ends_the_call() {
    let (mut s, now) = ringing("b1");
    // Someone else's reject means nothing.
    s.handle_event(
        now,
        incoming(
            "@mallory:hs",
            "m.call.reject",
            json!({"version": "1", "call_id": "b1", "party_id": "X"}),
        ),
    );
    assert!(actions(&mut s).is_empty());
    s.handle_event(now, from("PHONE", "m.call.reject", "b1", json!({})));
    let out = actions(&mut s);
    let events = sent(&out);
    assert_eq!(events[0].0, "m.call.select_answer");
    assert_eq!(events[0].1["selected_party_id"], "PHONE");
    assert!(matches!(out.last(), Some(Action::CloseMedia { .. })));
    assert_eq!(s.poll_ended(), Some(("b1".into(), EndReason::Rejected)));
    // An answer after the reject is too late.
    s.handle_event(now, answer("LAPTOP", "b1"));
    assert!(actions(&mut s).is_empty());
}

#[test]
fn an_unanswered_invite_times_out() {
    let (mut s, now) = ringing("b1");
    assert_eq!(s.poll_timeout(), Some(now + INVITE_LIFETIME));
    s.handle_timeout(now + INVITE_LIFETIME - Duration::from_millis(1));
    assert!(actions(&mut s).is_empty());
    s.handle_timeout(now + INVITE_LIFETIME);
    let out = actions(&mut s);
    let events = sent(&out);
    assert_eq!(events[0].0, "m.call.hangup");
    assert_eq!(events[0].1["reason"], "invite_timeout");
    assert_eq!(s.poll_ended(), Some(("b1".into(), EndReason::InviteExpired)));
}

#[test]
fn a_version_0_callee_is_not_selected_and_cannot_renegotiate() {
    let (mut s, now) = ringing("b1");
    let v0 = json!({"version": 0, "call_id": "b1", "answer": {"type": "answer", "sdp": "v=0 old"}});
    s.handle_event(now, incoming(ALICE, "m.call.answer", v0));
    let out = actions(&mut s);
    assert!(matches!(
        &out[..],
        [Action::PeerAnswer {
            callee_party: None,
            renegotiates: false,
            ..
        }]
    ));
    assert!(!s.renegotiate(now, "b1", "offer".into(), SdpStreamMetadata::new()));
    // A v0 hangup (no party, no reason) ends it.
    s.handle_event(
        now,
        incoming(ALICE, "m.call.hangup", json!({"version": 0, "call_id": "b1"})),
    );
    assert_eq!(actions(&mut s), vec![Action::CloseMedia { call_id: "b1".into() }]);
}

#[test]
fn as_caller_the_bot_is_impolite() {
    let (mut s, now) = ringing("b1");
    s.handle_event(now, answer("LAPTOP", "b1"));
    actions(&mut s);
    assert!(s.renegotiate(now, "b1", "v=0 ours".into(), SdpStreamMetadata::new()));
    actions(&mut s);
    // Alice's colliding offer is ignored while ours is out...
    let offer = json!({"description": {"type": "offer", "sdp": "v=0 hers"}, "lifetime": 10000});
    s.handle_event(now, from("LAPTOP", "m.call.negotiate", "b1", offer.clone()));
    assert!(
        actions(&mut s).is_empty(),
        "the impolite side ignores a colliding offer"
    );
    // ...her answer to ours is applied, and then her offers are taken.
    let reply = json!({"description": {"type": "answer", "sdp": "v=0 her answer"}});
    s.handle_event(now, from("LAPTOP", "m.call.negotiate", "b1", reply));
    assert_eq!(
        actions(&mut s),
        vec![Action::MediaAnswer {
            call_id: "b1".into(),
            answer: "v=0 her answer".into()
        }]
    );
    s.handle_event(now, from("LAPTOP", "m.call.negotiate", "b1", offer));
    assert_eq!(
        actions(&mut s),
        vec![Action::MediaOffer {
            call_id: "b1".into(),
            offer: "v=0 hers".into()
        }]
    );
}

#[test]
fn a_call_that_cannot_get_media_or_whose_callee_leaves_ends() {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.place_call(now, "b1", ROOM, ALICE);
    actions(&mut s);
    s.handle_media_failed(now, "b1");
    assert_eq!(
        actions(&mut s),
        vec![Action::CloseMedia { call_id: "b1".into() }],
        "nothing was sent, nothing to take back"
    );
    let (mut s, now) = ringing("b2");
    s.handle_member_left(now, ROOM, ALICE);
    assert_eq!(actions(&mut s), vec![Action::CloseMedia { call_id: "b2".into() }]);
    assert_eq!(s.poll_ended(), Some(("b2".into(), EndReason::PeerLeft)));
}

fn alices_invite(call_id: &str) -> Incoming {
    from(
        "LAPTOP",
        "m.call.invite",
        call_id,
        json!({"lifetime": 60000, "offer": {"type": "offer", "sdp": "v=0 her offer"}}),
    )
}

#[test]
fn glare_while_preparing_takes_their_call() {
    let now = Instant::now();
    let mut s = Signalling::new(BOT, BOT_PARTY);
    s.place_call(now, "m-ours", ROOM, ALICE);
    actions(&mut s);
    s.handle_event(now, alices_invite("z-theirs"));
    let out = actions(&mut s);
    assert!(types(&out).is_empty(), "nothing of ours was sent, nothing to hang up");
    assert_eq!(
        out[0],
        Action::CloseMedia {
            call_id: "m-ours".into()
        }
    );
    assert!(matches!(&out[1], Action::OpenMedia { call_id, .. } if call_id == "z-theirs"));
    assert_eq!(s.poll_ended(), Some(("m-ours".into(), EndReason::Replaced)));
    // Our offer arriving late sends nothing.
    s.handle_media_offer(now, "m-ours", "v=0".into(), SdpStreamMetadata::new());
    assert!(actions(&mut s).is_empty());
}

#[test]
fn glare_the_smaller_call_id_survives() {
    // Theirs is smaller: ours is hung up as replaced and theirs answered.
    let (mut s, now) = ringing("m-ours");
    s.handle_event(now, alices_invite("a-theirs"));
    let out = actions(&mut s);
    let events = sent(&out);
    assert_eq!(events[0].0, "m.call.hangup");
    assert_eq!(
        (events[0].1["call_id"].as_str(), events[0].1["reason"].as_str()),
        (Some("m-ours"), Some("replaced"))
    );
    assert!(out.contains(&Action::CloseMedia {
        call_id: "m-ours".into()
    }));
    assert!(matches!(out.last(), Some(Action::OpenMedia { call_id, .. }) if call_id == "a-theirs"));

    // Ours is smaller: theirs is hung up as replaced and ours goes on.
    let (mut s, now) = ringing("m-ours");
    s.handle_event(now, alices_invite("z-theirs"));
    let out = actions(&mut s);
    let events = sent(&out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        (events[0].1["call_id"].as_str(), events[0].1["reason"].as_str()),
        (Some("z-theirs"), Some("replaced"))
    );
    assert_eq!(s.state("m-ours"), Some(CallState::InviteSent));
    assert!(s.is_ended("z-theirs"));
    // Alice gives way and answers ours.
    s.handle_event(now, answer("LAPTOP", "m-ours"));
    assert!(matches!(actions(&mut s).first(), Some(Action::PeerAnswer { .. })));
}

#[test]
fn an_invite_from_someone_else_is_not_glare() {
    let (mut s, now) = ringing("m-ours");
    let mut bob = alices_invite("a-bob");
    bob.sender = "@bob:hs".into();
    s.handle_event(now, bob);
    let out = actions(&mut s);
    assert!(matches!(&out[..], [Action::OpenMedia { call_id, .. }] if call_id == "a-bob"));
    assert_eq!(s.state("m-ours"), Some(CallState::InviteSent));
}
