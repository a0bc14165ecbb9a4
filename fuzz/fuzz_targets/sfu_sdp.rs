//! Fuzzes the SDP a caller hands the SFU. It arrives in Matrix events
//! (`m.call.invite`, `m.call.negotiate`, `m.call.answer`), so anyone who can
//! call the conference bot chooses it: as the offer that opens a session,
//! as a renegotiation offer on a session, and as the answer to the SFU's own
//! offer. Any panic is a bug: bad SDP must be an `SfuError`. The SFU contains
//! a panic in str0m to the one session, but libfuzzer-sys aborts on every
//! panic before it unwinds, so contained ones are found here too, except the
//! str0m panics already known (`KNOWN_STR0M_PANICS`, each with a regression
//! test in `sfu/tests/sim.rs`): those unwind into the SFU's containment so
//! the fuzzer gets past them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sfu::{OwnLines, Participant, RoomId, Sfu, SfuConfig};
use std::net::SocketAddr;
use std::sync::Once;
use std::time::{Duration, Instant};

/// Messages of str0m 0.25 panics found here before, contained by the SFU.
const KNOWN_STR0M_PANICS: [&str; 1] = ["Pt locked multiple times"];

fuzz_target!(|data: &[u8]| {
    static KNOWN: Once = Once::new();
    KNOWN.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !KNOWN_STR0M_PANICS.iter().any(|known| message.contains(known)) {
                abort(info);
            }
        }));
    });
    let Ok(text) = std::str::from_utf8(data) else { return };
    let now = Instant::now();
    let mut sfu = Sfu::new(SfuConfig::new(SocketAddr::from(([192, 0, 2, 1], 5000))));
    let room = RoomId("!room:fuzz".into());
    let caller = Participant {
        user_id: "@caller:fuzz".into(),
        device_id: "CALLER".into(),
    };
    for own_lines in [OwnLines::PublishOnly, OwnLines::BothWays] {
        if let Ok((session, _answer)) = sfu.open_session(now, room.clone(), caller.clone(), text, own_lines) {
            let _ = sfu.accept_offer(now + Duration::from_millis(10), session, text);
            let _ = sfu.create_offer(now + Duration::from_millis(20), session);
            let _ = sfu.accept_answer(now + Duration::from_millis(30), session, text);
            sfu.close_session(now + Duration::from_millis(40), session);
        }
    }
    if let Ok((session, _offer)) = sfu.open_offer(now, room, caller) {
        let _ = sfu.accept_answer(now + Duration::from_millis(10), session, text);
        let _ = sfu.create_offer(now + Duration::from_millis(20), session);
    }
});
