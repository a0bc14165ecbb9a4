//! Batched UDP input with kernel arrival times.
//!
//! [`Datagrams`] reads up to [`RECV_BATCH`] datagrams per `recvmmsg`, each with
//! the time the kernel received it (`SO_TIMESTAMPNS`), so a driver can tell
//! how long a datagram waited in the socket *and* in its own turn: the delay
//! the forwarder adds, measured from outside the code being measured. The
//! media shards and the benchmark's baseline forwarder both read through it.

use nix::cmsg_space;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, setsockopt,
    sockopt::ReceiveTimestampns,
};
use nix::sys::time::TimeSpec;
use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, SystemTime};

/// Datagrams per `recvmmsg`.
pub const RECV_BATCH: usize = 32;
/// Datagrams per `sendmmsg`.
pub const SEND_BATCH: usize = 32;
/// Largest datagram read (above any MTU WebRTC or TURN uses).
pub const MAX_DATAGRAM: usize = 2048;

/// The receive side of one socket: buffers for one batch and what came in it.
pub struct Datagrams {
    bytes: Vec<u8>,
    headers: MultiHeaders<SockaddrStorage>,
    /// Length, source and kernel arrival time of each datagram of the last batch.
    meta: [(usize, Option<SocketAddr>, SystemTime); RECV_BATCH],
    count: usize,
}

impl std::fmt::Debug for Datagrams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datagrams")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Datagrams {
    /// Asks the kernel to stamp `socket`'s datagrams with their arrival time.
    pub fn new(socket: &impl AsFd) -> std::io::Result<Self> {
        setsockopt(socket, ReceiveTimestampns, &true)?;
        Ok(Self {
            bytes: vec![0; RECV_BATCH * MAX_DATAGRAM],
            headers: MultiHeaders::preallocate(RECV_BATCH, Some(cmsg_space!(TimeSpec))),
            meta: [(0, None, SystemTime::UNIX_EPOCH); RECV_BATCH],
            count: 0,
        })
    }

    /// One non-blocking `recvmmsg`: how many datagrams came (`WouldBlock` if none).
    pub fn receive(&mut self, socket: &impl AsRawFd) -> std::io::Result<usize> {
        let mut chunks = self.bytes.chunks_mut(MAX_DATAGRAM);
        let mut iovs: [[IoSliceMut<'_>; 1]; RECV_BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or(&mut []))]);
        let results = recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(std::io::Error::from)?;
        self.count = 0;
        for message in results {
            let mut arrival = None;
            if let Ok(cmsgs) = message.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmTimestampns(at) = cmsg {
                        arrival = Some(SystemTime::UNIX_EPOCH + Duration::from(at));
                    }
                }
            }
            let source = message.address.and_then(to_socket_addr);
            self.meta[self.count] = (message.bytes, source, arrival.unwrap_or_else(SystemTime::now));
            self.count += 1;
        }
        Ok(self.count)
    }

    /// How many datagrams the last batch holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagram `i` of the last batch: its bytes, source and arrival time
    /// (`None` past the batch, or for one without a source, which UDP never gives).
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr, SystemTime)> {
        let &(len, source, arrival) = self.meta[..self.count].get(i)?;
        Some((&self.bytes[i * MAX_DATAGRAM..i * MAX_DATAGRAM + len], source?, arrival))
    }

    /// The datagrams of the last batch, as [`Datagrams::get`] gives them.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr, SystemTime)> {
        (0..self.count).filter_map(|i| self.get(i))
    }
}

/// Sends `batch` (each item's bytes to its address, as `parts` reads them)
/// with as few `sendmmsg` calls as the kernel allows: a full socket buffer
/// waits for room; a datagram the kernel refuses is skipped and counted.
/// Returns how many were skipped.
pub async fn send_all<'a, T>(
    socket: &tokio::net::UdpSocket,
    headers: &mut MultiHeaders<SockaddrStorage>,
    batch: &'a [T],
    parts: impl Fn(&'a T) -> (&'a [u8], SocketAddr),
) -> u64 {
    let mut skipped = 0;
    let mut at = 0;
    while at < batch.len() {
        let rest = &batch[at..];
        // On the stack: nothing is allocated per batch.
        let iovs: [[IoSlice<'_>; 1]; SEND_BATCH] =
            std::array::from_fn(|i| [IoSlice::new(rest.get(i).map_or(&[][..], |t| parts(t).0))]);
        let addrs: [Option<SockaddrStorage>; SEND_BATCH] =
            std::array::from_fn(|i| rest.get(i).map(|t| SockaddrStorage::from(parts(t).1)));
        let n = rest.len().min(SEND_BATCH);
        let no_control: [ControlMessage<'_>; 0] = [];
        let sent = sendmmsg(
            socket.as_raw_fd(),
            headers,
            iovs[..n].iter(),
            &addrs[..n],
            no_control,
            MsgFlags::MSG_DONTWAIT,
        )
        .map(Iterator::count);
        match sent {
            Ok(0) => {
                skipped += 1;
                at += 1;
            }
            Ok(n) => at += n,
            Err(nix::errno::Errno::EAGAIN) => {
                if socket.writable().await.is_err() {
                    return skipped + (batch.len() - at) as u64;
                }
            }
            Err(e) => {
                // The first datagram failed (an unreachable peer, say): skip it.
                tracing::debug!(error = %e, "UDP send error");
                skipped += 1;
                at += 1;
            }
        }
    }
    skipped
}

/// A `sendmmsg` header set for [`send_all`].
pub fn send_headers() -> MultiHeaders<SockaddrStorage> {
    MultiHeaders::preallocate(SEND_BATCH, None)
}

pub(crate) fn to_socket_addr(addr: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}
