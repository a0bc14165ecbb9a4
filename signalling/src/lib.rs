//! The Matrix call signalling core (sans-IO): the `m.call.*` state machines of
//! call protocol v1 and the conference bot's policy.
//!
//! Empty until the signalling issue lands; the crate exists so the workspace
//! has its final shape. Nothing here pretends to work yet.
