//! The few edits we make to SDP text around str0m.
//!
//! str0m writes and reads our SDP; these functions only read an offer's codec
//! preference and adjust directions and msid labels where str0m's defaults do
//! not suit browsers. They work on the text as sections (the session part,
//! then one per `m=` line) and keep every line ending as it was.

use crate::Participant;

/// `sdp` rewritten section by section: `edit` gets each section's lines
/// (with their endings) and appends what replaces them to the output.
fn edit_sections(sdp: &str, mut edit: impl FnMut(&[&str], &mut String)) -> String {
    let lines: Vec<&str> = sdp.split_inclusive('\n').collect();
    let mut out = String::with_capacity(sdp.len() + 64);
    let mut start = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("m=") && i > start {
            edit(&lines[start..i], &mut out);
            start = i;
        }
    }
    edit(&lines[start..], &mut out);
    out
}

/// A section's `a=mid`, if it is an m-section that has one.
fn mid_of<'a>(section: &[&'a str]) -> Option<&'a str> {
    if !section.first().is_some_and(|l| l.starts_with("m=")) {
        return None;
    }
    section.iter().find_map(|l| l.trim_end().strip_prefix("a=mid:"))
}

/// `offer` with its two-way m-lines made send-only (`a=sendrecv` →
/// `a=sendonly`; one without a direction attribute, two-way by default, gets
/// `a=sendonly`) and its receive-only ones inactive (we send nothing there:
/// str0m would answer `sendonly`, a track without packets), except those
/// whose mid `keep` names: our answer then says `recvonly` and `inactive`.
pub(crate) fn publish_only(offer: &str, keep: impl Fn(&str) -> bool) -> String {
    const DIRECTIONS: [&str; 4] = ["a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"];
    edit_sections(offer, |section, out| {
        let media = section.first().is_some_and(|l| l.starts_with("m="));
        let rewrite = media && !mid_of(section).is_some_and(&keep);
        let directed = section.iter().any(|l| DIRECTIONS.contains(&l.trim_end()));
        for (i, line) in section.iter().enumerate() {
            let swapped = [("a=sendrecv", "a=sendonly"), ("a=recvonly", "a=inactive")]
                .into_iter()
                .find_map(|(from, to)| line.strip_prefix(from).map(|end| (to, end)));
            match swapped {
                Some((to, end)) if rewrite && end.trim().is_empty() => {
                    out.push_str(to);
                    out.push_str(end);
                }
                _ => out.push_str(line),
            }
            if rewrite && !directed && i == 0 {
                let end = &line[line.trim_end().len()..];
                out.push_str("a=sendonly");
                out.push_str(if end.is_empty() { "\r\n" } else { end });
            }
        }
    })
}

/// `sdp` (ours) with `stream` as the msid of its two-way m-lines: str0m
/// repeats the offerer's own msid there, and a browser would then receive a
/// stream with the id of the one it sends (matrix-js-sdk drops it as a feed
/// it already has). Tracks become `<stream>-<mid>`. M-lines `forwarded`
/// names keep their label: they carry someone else's stream (the peer made
/// one of them two-way by reusing it for a track of its own).
pub(crate) fn own_msid(sdp: &str, stream: &str, forwarded: impl Fn(&str) -> bool) -> String {
    edit_sections(sdp, |section, out| {
        let two_way = section.iter().any(|l| l.trim_end() == "a=sendrecv");
        match mid_of(section).filter(|mid| two_way && !forwarded(mid)) {
            Some(mid) => write_msid(section, out, stream, &format!("{stream}-{mid}")),
            None => section.iter().for_each(|line| out.push_str(line)),
        }
    })
}

/// `sdp` (ours) with the msid `label` gives for an m-line's mid: an m-line of
/// ours taken over for another track keeps str0m's first label otherwise.
pub(crate) fn relabel<'a>(sdp: &str, label: impl Fn(&str) -> Option<(&'a str, &'a str)>) -> String {
    edit_sections(sdp, |section, out| match mid_of(section).and_then(&label) {
        Some((stream, track)) => write_msid(section, out, stream, track),
        None => section.iter().for_each(|line| out.push_str(line)),
    })
}

/// A section with its `a=msid:` and `a=ssrc:… msid:` lines saying `stream track`.
fn write_msid(section: &[&str], out: &mut String, stream: &str, track: &str) {
    for line in section {
        let body = line.trim_end();
        let end = &line[body.len()..];
        let ssrc = body
            .strip_prefix("a=ssrc:")
            .and_then(|rest| rest.split_once(" msid:"))
            .map(|(ssrc, _)| ssrc);
        if body.starts_with("a=msid:") {
            out.push_str(&format!("a=msid:{stream} {track}{end}"));
        } else if let Some(ssrc) = ssrc {
            out.push_str(&format!("a=ssrc:{ssrc} msid:{stream} {track}{end}"));
        } else {
            out.push_str(line);
        }
    }
}

/// The msid stream id (RFC 8830) the m-section with `mid` names, from
/// `a=msid:` or, in older SDP, `a=ssrc:… msid:`.
pub(crate) fn stream_of(sdp: &str, mid: &str) -> Option<String> {
    let mut found = None;
    edit_sections(sdp, |section, _| {
        if found.is_none() && mid_of(section) == Some(mid) {
            found = section.iter().find_map(|line| {
                let body = line.trim_end();
                let msid = body.strip_prefix("a=msid:").or_else(|| {
                    body.strip_prefix("a=ssrc:")
                        .and_then(|r| r.split_once(" msid:"))
                        .map(|(_, m)| m)
                })?;
                let stream = msid.split_whitespace().next()?;
                (stream != "-").then(|| stream.to_string())
            });
        }
    });
    found
}

/// Our msid stream id for what a session gets on m-lines both sides send on
/// (the SFU's offer to a callee, a single-stream caller's own m-lines).
pub(crate) fn session_stream(participant: &Participant) -> String {
    msid_token(&format!("sb-{}", participant.user_id))
}

/// Turns anything into an msid token (RFC 8830: no spaces, at most 64 chars).
pub(crate) fn msid_token(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.+".contains(*c))
        .take(64)
        .collect()
}

/// Whether an offer's first video m-line lists H.264 before VP8.
pub(crate) fn offer_prefers_h264(sdp: &str) -> bool {
    let mut lines = sdp.lines().map(str::trim);
    let Some(m_line) = lines.find(|l| l.starts_with("m=video")) else {
        return false;
    };
    let order: Vec<&str> = m_line.split_whitespace().skip(3).collect();
    let mut codec_of = std::collections::HashMap::new();
    for line in lines.take_while(|l| !l.starts_with("m=")) {
        if let Some(rtpmap) = line.strip_prefix("a=rtpmap:")
            && let Some((pt, codec)) = rtpmap.split_once(' ')
        {
            codec_of.insert(pt, codec.split('/').next().unwrap_or("").to_ascii_uppercase());
        }
    }
    order
        .iter()
        .filter_map(|pt| codec_of.get(pt))
        .find(|codec| *codec == "VP8" || *codec == "H264")
        .is_some_and(|codec| codec == "H264")
}

#[cfg(test)]
mod tests {
    use super::{offer_prefers_h264, own_msid, publish_only, relabel, stream_of};

    #[test]
    fn two_way_m_lines_of_an_answer_name_our_stream() {
        let answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\n\
            a=msid:cam t1\r\na=ssrc:5 cname:x\r\na=ssrc:5 msid:cam t1\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\na=msid:pub t2\r\n";
        assert_eq!(
            own_msid(answer, "sb-x", |_| false),
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\n\
            a=msid:sb-x sb-x-0\r\na=ssrc:5 cname:x\r\na=ssrc:5 msid:sb-x sb-x-0\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\na=msid:pub t2\r\n"
        );
    }

    #[test]
    fn a_forwarded_m_line_keeps_its_stream_and_the_peers_is_found() {
        // The peer reused m-line 1 (ours, forwarding someone's stream) for a
        // track of its own: both sides send there now.
        let offer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\na=msid:cam a\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\na=ssrc:7 msid:screen v\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=recvonly\r\na=msid:- t\r\n";
        assert_eq!(stream_of(offer, "0").as_deref(), Some("cam"));
        assert_eq!(stream_of(offer, "1").as_deref(), Some("screen"));
        assert_eq!(stream_of(offer, "2"), None, "no stream");
        assert_eq!(stream_of(offer, "3"), None, "no such m-line");
        let answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\na=msid:cam a\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\na=msid:sb3-bob v\r\n";
        assert_eq!(
            own_msid(answer, "sb-x", |mid| mid == "1"),
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\na=msid:sb-x sb-x-0\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\na=msid:sb3-bob v\r\n"
        );
    }

    #[test]
    fn an_m_line_taken_over_gets_its_new_label() {
        let offer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:4\r\na=sendonly\r\n\
            a=msid:sb1-old sb1-old-audio\r\na=ssrc:9 cname:c\r\na=ssrc:9 msid:sb1-old sb1-old-audio\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:5\r\na=sendonly\r\na=msid:sb2-cam v\r\n";
        let label = |mid: &str| (mid == "4").then_some(("sb3-new", "sb3-new-audio"));
        assert_eq!(
            relabel(offer, label),
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:4\r\na=sendonly\r\n\
            a=msid:sb3-new sb3-new-audio\r\na=ssrc:9 cname:c\r\na=ssrc:9 msid:sb3-new sb3-new-audio\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:5\r\na=sendonly\r\na=msid:sb2-cam v\r\n"
        );
    }

    #[test]
    fn publish_only_rewrites_two_way_m_lines_but_the_kept_ones() {
        let offer = "v=0\r\na=group:BUNDLE 0 1 2\r\na=sendrecv\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\na=mid:0\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=recvonly\r\n";
        let out = publish_only(offer, |mid| mid == "1");
        assert_eq!(
            out,
            "v=0\r\na=group:BUNDLE 0 1 2\r\na=sendrecv\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendonly\r\na=mid:0\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=inactive\r\n"
        );
        // A receive-only m-line we send on stays so.
        assert_eq!(
            publish_only(offer, |mid| mid == "2"),
            out.replace("a=mid:2\r\na=inactive", "a=mid:2\r\na=recvonly")
                .replace("a=mid:1\r\na=sendrecv", "a=mid:1\r\na=sendonly")
        );
        assert_eq!(publish_only("", |_| false), "");
        // No direction attribute: two-way by default, so made send-only too.
        assert_eq!(
            publish_only("v=0\nm=audio 9 UDP/TLS/RTP/SAVPF 111\na=mid:0\n", |_| false),
            "v=0\nm=audio 9 UDP/TLS/RTP/SAVPF 111\na=sendonly\na=mid:0\n"
        );
    }

    #[test]
    fn codec_preference_of_an_offer() {
        let vp8_first = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96 102\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:102 H264/90000\r\n";
        let h264_first =
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102 96\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:102 h264/90000\r\n";
        assert!(!offer_prefers_h264(vp8_first));
        assert!(offer_prefers_h264(h264_first));
        assert!(!offer_prefers_h264("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"));
        assert!(!offer_prefers_h264(""));
    }
}
