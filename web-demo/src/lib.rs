//! The browser demo: plain HTML, CSS and ES modules (no bundler), embedded in
//! the binary at build time so the all-in-one `switchboard` serves it from a
//! single file.
//!
//! The app itself lives in `static/`: `matrix.js` (a small Client-Server API
//! client: register/login, `/sync` long-poll, rooms, sends), `call.js` (one
//! call over `RTCPeerConnection`, Matrix call protocol v1 as caller or callee,
//! <https://spec.matrix.org/v1.15/client-server-api/#voice-over-ip>),
//! `stats.js` (the live `getStats()` panel) and `app.js` (the UI). The binary's
//! HTTP front serves [`ASSETS`] under [`MOUNT`]; the app talks to whatever
//! homeserver its login form names (by default the one serving it).

/// Where the demo is served, with a trailing slash (its `index.html`).
pub const MOUNT: &str = "/demo/";

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// The file name below [`MOUNT`] (`""` is `index.html`).
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $file:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../static/", $file)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the demo.
pub const ASSETS: &[Asset] = &[
    asset!("", "index.html", "text/html; charset=utf-8"),
    asset!("index.html", "index.html", "text/html; charset=utf-8"),
    asset!("style.css", "style.css", "text/css; charset=utf-8"),
    asset!("app.js", "app.js", JS),
    asset!("matrix.js", "matrix.js", JS),
    asset!("call.js", "call.js", JS),
    asset!("stats.js", "stats.js", JS),
    asset!("favicon.svg", "favicon.svg", "image/svg+xml"),
];

/// The file served at `MOUNT` + `name`, if any.
pub fn asset(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_loads_the_app_module_and_every_import_is_embedded() {
        let index = std::str::from_utf8(asset("").expect("index").body).expect("utf-8");
        assert!(index.contains(r#"<script type="module" src="app.js">"#));
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            let text = std::str::from_utf8(a.body).expect("utf-8");
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let from = line.rsplit_once("from ").map(|(_, f)| f).unwrap_or(line);
                let target = from.trim_matches(|c| c == '\'' || c == '"' || c == ';' || c == ' ');
                let name = target.trim_start_matches("./");
                assert!(
                    asset(name).is_some(),
                    "{} imports {target}, which is not embedded",
                    a.name
                );
            }
        }
    }

    #[test]
    fn unknown_names_are_not_served() {
        assert!(asset("../Cargo.toml").is_none());
        assert!(asset("nope.js").is_none());
    }
}
