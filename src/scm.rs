//! Datagrams with fds (`SCM_RIGHTS`) on unix sockets, as the fd holder (`crate::fdholder`)
//! and the zygote link (`crate::zygote`) exchange them: one message per `sendmsg`, fds
//! received close-on-exec, `EINTR` retried, `SIGPIPE` never raised.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// One received datagram.
#[derive(Debug)]
pub enum Datagram {
    /// A message: its length (`None` if it or its fds were truncated) and its fds.
    Message(Option<usize>, Vec<OwnedFd>),
    /// The peer closed the connection (nothing, and no fds, received).
    End,
}

/// Receives one datagram into `buf`, with room for at least `max_fds` fds (the control
/// buffer is padded for alignment, so a few more may fit); fds beyond the room are closed
/// by the kernel and the message reported truncated.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: RecvFlags,
    max_fds: usize,
) -> Result<Datagram, Errno> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(max_fds))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            flags | RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(Datagram::End);
    }
    let truncated = msg
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
    Ok(Datagram::Message((!truncated).then_some(msg.bytes), fds))
}

/// Sends `bytes` as one datagram carrying `fds` (duplicates: the caller keeps its own).
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), Errno> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Errno::INVAL);
    }
    loop {
        match rustix::net::sendmsg(
            socket,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_message_and_its_fds_arrive_together_and_the_end_is_told() {
        let (a, b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        let (r, _w) = rustix::pipe::pipe().expect("pipe");
        send_with_fds(a.as_fd(), b"hello", &[r.as_fd(), r.as_fd()]).expect("send");
        let mut buf = [0u8; 16];
        match recv_with_fds(b.as_fd(), &mut buf, RecvFlags::empty(), 2).expect("recv") {
            Datagram::Message(Some(5), fds) => {
                assert_eq!(&buf[..5], b"hello");
                assert_eq!(fds.len(), 2);
                let flags = rustix::io::fcntl_getfd(&fds[0]).expect("getfd");
                assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
            }
            other => panic!("{other:?}"),
        }
        // More fds than room (room for one holds a few: the buffer is padded for alignment):
        // truncated, said so.
        send_with_fds(a.as_fd(), b"x", &[r.as_fd(); 8]).expect("send");
        assert!(matches!(
            recv_with_fds(b.as_fd(), &mut buf, RecvFlags::empty(), 1).expect("recv"),
            Datagram::Message(None, _)
        ));
        drop(a);
        assert!(matches!(
            recv_with_fds(b.as_fd(), &mut buf, RecvFlags::empty(), 1).expect("recv"),
            Datagram::End
        ));
    }
}
