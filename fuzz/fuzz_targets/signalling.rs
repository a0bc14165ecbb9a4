//! Fuzzes the conference bot's call signalling with what Matrix users in its
//! rooms send it: `m.call.*` event contents (any JSON) from three senders in
//! two rooms, in any order, with or without `unsigned.age`, interleaved with
//! the media side's replies (success or failure) and time passing. The input
//! is split into events at 0xFF bytes; an event's first byte picks its type,
//! sender, room and age, the rest is its content. Any panic is a bug: a bad
//! or unexpected event is ignored or answered as call protocol v1 says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signalling::call::{Action, Incoming, Signalling};
use signalling::events::{CallEvent, HangupReason, SdpStreamMetadata};
use std::time::{Duration, Instant};

const TYPES: [&str; 9] = [
    "m.call.invite",
    "m.call.candidates",
    "m.call.answer",
    "m.call.select_answer",
    "m.call.reject",
    "m.call.negotiate",
    "m.call.sdp_stream_metadata_changed",
    "org.matrix.call.sdp_stream_metadata_changed",
    "m.call.hangup",
];
const SENDERS: [&str; 3] = ["@alice:fuzz", "@bob:fuzz", "@conference:fuzz"];

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut bot = Signalling::new("@conference:fuzz", "BOTPARTY");
    bot.place_call(start, "ourcall", "!room0:fuzz", "@alice:fuzz");
    for (i, chunk) in data.split(|b| *b == 0xFF).enumerate().take(64) {
        let now = start + Duration::from_millis(i as u64 * 700);
        let Some((&selector, json)) = chunk.split_first() else { continue };
        if let Ok(content) = serde_json::from_slice::<serde_json::Value>(json)
            && let Ok(event) = CallEvent::parse(TYPES[usize::from(selector) % TYPES.len()], &content)
        {
            bot.handle_event(
                now,
                Incoming {
                    room_id: format!("!room{}:fuzz", selector >> 7),
                    sender: SENDERS[usize::from(selector >> 4) % SENDERS.len()].into(),
                    age_ms: (selector & 0x08 != 0).then_some(u64::from(selector) * 1_000),
                    event,
                },
            );
        }
        // The media side does what it is asked, or fails, as the byte says.
        let fail = selector & 0x04 != 0;
        let mut budget = 256;
        while let Some(action) = bot.poll_action() {
            budget -= 1;
            if budget == 0 {
                break;
            }
            let none = SdpStreamMetadata::default;
            match action {
                Action::OpenMedia { call_id, .. } if fail => bot.handle_media_failed(now, &call_id),
                Action::OpenMedia { call_id, .. } => {
                    bot.handle_media_answer(now, &call_id, "v=0\r\n".into(), none());
                    bot.handle_media_connected(now, &call_id);
                    let _ = bot.renegotiate(now, &call_id, "v=0\r\n".into(), none());
                }
                Action::CreateOffer { call_id, .. } if fail => bot.handle_media_failed(now, &call_id),
                Action::CreateOffer { call_id, .. } => bot.handle_media_offer(now, &call_id, "v=0\r\n".into(), none()),
                Action::MediaOffer { call_id, .. } => {
                    bot.handle_media_renegotiated(now, &call_id, "v=0\r\n".into(), none());
                }
                Action::PeerAnswer { call_id, .. } | Action::MediaAnswer { call_id, .. } if fail => {
                    bot.hangup(now, &call_id, HangupReason::IceFailed);
                }
                Action::PeerAnswer { call_id, .. } | Action::MediaAnswer { call_id, .. } => {
                    bot.handle_media_connected(now, &call_id);
                    let _ = bot.send_metadata(now, &call_id, none());
                }
                Action::CloseMedia { call_id } => bot.handle_media_closed(now, &call_id),
                Action::PeerMetadata { .. } | Action::Send { .. } => {}
            }
        }
        while bot.poll_ended().is_some() {}
        if selector & 0x02 != 0 {
            bot.handle_member_left(now, "!room0:fuzz", SENDERS[usize::from(selector) % SENDERS.len()]);
        }
        bot.handle_timeout(now);
    }
});
