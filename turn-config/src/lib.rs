//! TURN configuration shared by the homeserver and the relay.
//!
//! Today this crate holds the TURN REST credential scheme ([`rest`]): the
//! time-limited username/password pairs that `/voip/turnServer` hands to
//! clients and that a TURN server configured with the same shared secret
//! accepts (coturn's `use-auth-secret` + `static-auth-secret`, Synapse's
//! `turn_shared_secret`). The sans-IO relay core joins it with the TURN issue.

pub mod rest;

pub use rest::{CredentialError, Credentials, SharedSecret};
