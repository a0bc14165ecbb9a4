//! The `switchboard` binary's library: configuration, wiring and I/O around the
//! protocol crates. `main.rs` is a thin CLI over [`app::start`].

pub mod app;
pub mod bot;
pub mod config;
pub mod drivers;
pub mod http;
pub mod metrics;
pub mod secrets;
pub mod tls;
