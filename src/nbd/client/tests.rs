//! Host tests of the client's pieces that need no ublk queue.

use super::*;
use std::io::Read;
use std::os::unix::net::UnixStream;

fn conn() -> (Conn, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    let e = Export { size: 1 << 20, flags: proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_DF, structured: true, block_sizes: None };
    (Conn::new(OwnedFd::from(a), &e), b)
}

#[test]
fn leave_says_goodbye_only_when_no_send_is_under_way() {
    // idle: NBD_CMD_DISC, then the end of the stream
    let (mut c, mut peer) = conn();
    c.leave();
    assert_eq!(c.state, State::Draining);
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(got, proto::encode_disconnect());

    // a header batch or WRITE payload half sent: no DISC bytes spliced into
    // it, the stream just ends
    let (mut c, mut peer) = conn();
    c.tx_busy = true;
    c.leave();
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn df_refusal() {
    let (c, _peer) = conn();
    assert!(c.df);
    let req = |read: bool, df: bool, err: i32| Req { read, df, err, ..Default::default() };
    assert!(req(true, true, -libc::EOVERFLOW).df_refused());
    // not sent with DF, not a READ, or another error: the error stands
    assert!(!req(true, false, -libc::EOVERFLOW).df_refused());
    assert!(!req(false, true, -libc::EOVERFLOW).df_refused());
    assert!(!req(true, true, -libc::EIO).df_refused());
    assert!(!req(true, true, 0).df_refused());
}
