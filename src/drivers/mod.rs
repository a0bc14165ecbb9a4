//! Drivers: the sockets, threads and timers around the sans-IO cores.

pub mod matrix;
pub mod media;
pub mod turn;
pub mod udp;

/// Kernel socket buffers asked for (capped by `net.core.*mem_max`): room for
/// bursts while the thread is busy or descheduled, instead of drops.
const SOCKET_BUFFER: usize = 4 << 20;

/// Asks for [`SOCKET_BUFFER`]-sized receive and send buffers (best effort).
fn bigger_buffers(socket: &impl std::os::fd::AsFd) {
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
}
