//! The selective forwarding unit core (sans-IO, on str0m).
//!
//! Empty until the SFU issue lands; the crate exists so the workspace has its
//! final shape. Nothing here pretends to work yet.
