//! TURN for Switchboard: the TURN REST credential scheme shared by the
//! homeserver and the relay, and the sans-IO relay core.
//!
//! - [`rest`]: the time-limited username/password pairs that `/voip/turnServer`
//!   hands to clients and that a TURN server configured with the same shared
//!   secret accepts (coturn's `use-auth-secret` + `static-auth-secret`,
//!   Synapse's `turn_shared_secret`).
//! - [`stun`]: a zero-copy STUN/ChannelData codec (RFC 8489, RFC 8656).
//! - [`policy`]: which peers may be relayed to (CVE-2020-26262 defaults).
//! - [`relay`]: the relay core (RFC 8656): inputs `handle_*(now, …)`, outputs
//!   `poll_transmit`, `poll_command`, `poll_timeout`. The driver with the
//!   sockets lives in the `switchboard` binary (`src/drivers/turn.rs`).

pub mod policy;
pub mod relay;
pub mod rest;
pub mod stun;

pub use relay::{ClientAddr, ClientOutcome, Command, Relay, RelayConfig, RelayStats, Transport};
pub use rest::{CredentialError, Credentials, SharedSecret};
