//! Drivers: the sockets, threads and timers around the sans-IO cores.

pub mod matrix;
pub mod media;
pub mod turn;
