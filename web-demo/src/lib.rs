//! The browser demo (static ES modules embedded into the binary).
//!
//! Empty until the web demo issue lands; the crate exists so the workspace has
//! its final shape. Nothing here pretends to work yet.
