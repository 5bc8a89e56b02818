//! Host tests of the NBD wire format: handshakes against scripted servers,
//! and malformed replies.

use super::*;
use std::io::{Read, Write};
use std::time::Duration;

/// A scripted peer: what the server sends, and what the client wrote.
/// `trickle`: each read waits this long and returns one byte.
struct Mock {
    input: std::io::Cursor<Vec<u8>>,
    out: Vec<u8>,
    trickle: Option<Duration>,
}

impl Read for Mock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self.trickle {
            Some(d) if !b.is_empty() => {
                std::thread::sleep(d);
                self.input.read(&mut b[..1])
            }
            _ => self.input.read(b),
        }
    }
}
impl Write for Mock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.out.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn greeting(hflags: u16) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&hflags.to_be_bytes());
    v
}

fn opt_reply(opt: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

fn run(script: Vec<u8>, export: &str) -> (crate::Result<Export>, Vec<u8>) {
    let mut m = Mock { input: std::io::Cursor::new(script), out: Vec::new(), trickle: None };
    let r = handshake(&mut m, export, Instant::now() + Duration::from_secs(60));
    (r, m.out)
}

/// A complete, correct handshake script (structured, GO) with `infos`
/// NBD_INFO_DESCRIPTION replies before the export's.
fn good_script(infos: usize) -> Vec<u8> {
    let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    for _ in 0..infos {
        s.extend(opt_reply(OPT_GO, REP_INFO, &[0, 2, b'x']));
    }
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_export(1 << 20, TFLAG_HAS_FLAGS)));
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    s
}

#[test]
fn handshake_deadline() {
    // a server that sends a byte every 5 ms: each read is quick, the whole
    // handshake is not (about 130 reads); the deadline ends it
    let mut m = Mock { input: std::io::Cursor::new(good_script(0)), out: Vec::new(), trickle: Some(Duration::from_millis(5)) };
    let t0 = Instant::now();
    let e = handshake(&mut m, "", t0 + Duration::from_millis(100)).unwrap_err();
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
    assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
    // the same bytes at once are fine
    assert_eq!(run(good_script(0), "").0.unwrap().size, 1 << 20);
    // a deadline already past: not a single read
    let mut m = Mock { input: std::io::Cursor::new(good_script(0)), out: Vec::new(), trickle: None };
    assert_eq!(handshake(&mut m, "", Instant::now()).unwrap_err().errno(), libc::ETIMEDOUT);
    assert_eq!(m.input.position(), 0);
}

#[test]
fn handshake_info_replies_are_bounded() {
    assert_eq!(run(good_script(MAX_INFO_REPLIES - 1), "").0.unwrap().size, 1 << 20);
    let e = run(good_script(MAX_INFO_REPLIES), "").0.unwrap_err();
    assert_eq!(e.errno(), libc::EPROTO);
    assert!(e.message().contains("NBD_REP_INFO"), "{e}");
}

#[test]
fn reconnected_export_checks() {
    let bs = |min: u32, max: u32| Some((min, 4096.max(min), max));
    let all = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    let first = Export { size: 1 << 30, flags: all, structured: true, block_sizes: bs(512, 32 << 20) };
    let ok = |e: Export| e.check_serves(&first, 4096, 1 << 20);
    ok(first).unwrap();
    // more is fine: larger, new flags, no block sizes at all, not structured
    ok(Export { size: 2 << 30, flags: all | TFLAG_SEND_DF | TFLAG_CAN_MULTI_CONN, structured: false, block_sizes: None }).unwrap();
    // a minimum up to the device's logical block size, a maximum down to its largest request
    ok(Export { block_sizes: bs(4096, 1 << 20), ..first }).unwrap();
    let refused = |e: Export, what: &str| {
        let err = ok(e).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert!(err.message().contains(what), "{err} (want {what})");
    };
    refused(Export { size: (1 << 30) - 512, ..first }, "shrank");
    refused(Export { flags: all | TFLAG_READ_ONLY, ..first }, "read-only");
    for (f, name) in [(TFLAG_SEND_FLUSH, "FLUSH"), (TFLAG_SEND_FUA, "FUA"), (TFLAG_SEND_TRIM, "TRIM"), (TFLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES")] {
        refused(Export { flags: all & !f, ..first }, &format!("NBD_FLAG_SEND_{name} "));
    }
    // flags lost with HAS_FLAGS: all of them are gone
    refused(Export { flags: 0, ..first }, "FLUSH");
    refused(Export { block_sizes: bs(8192, 32 << 20), ..first }, "minimum block size 8192");
    refused(Export { block_sizes: bs(512, 65536), ..first }, "maximum payload 65536");
    // a device that never sent those commands does not need them
    let bare = Export { flags: TFLAG_HAS_FLAGS, ..first };
    Export { flags: 0, ..first }.check_serves(&bare, 512, 4096).unwrap();
    // a read-only device may reconnect to a read-only export
    let ro = Export { flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY, ..first };
    ro.check_serves(&ro, 512, 4096).unwrap();
}

#[test]
fn handshake_go_structured() {
    let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_export(1 << 30, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA)));
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, 32 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    s.extend(opt_reply(OPT_GO, REP_INFO, &bs));
    s.extend(opt_reply(OPT_GO, REP_INFO, &[0, 2, b'x'])); // NBD_INFO_DESCRIPTION: ignored
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    let (r, out) = run(s, "disk");
    let e = r.unwrap();
    assert_eq!(e.size, 1 << 30);
    assert!(e.structured && e.has(TFLAG_SEND_FLUSH) && e.has(TFLAG_SEND_FUA) && !e.has(TFLAG_READ_ONLY));
    assert_eq!(e.block_sizes, Some((1, 4096, 32 << 20)));
    // client flags, then STRUCTURED_REPLY, then GO with the name
    assert_eq!(&out[0..4], &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    assert_eq!(&out[4..20], &encode_option(OPT_STRUCTURED_REPLY, &[])[..]);
    assert_eq!(&out[20..28], &IHAVEOPT.to_be_bytes());
    assert_eq!(&out[28..32], &OPT_GO.to_be_bytes());
    assert_eq!(&out[36..40], &4u32.to_be_bytes());
    assert_eq!(&out[40..44], b"disk");
}

#[test]
fn handshake_without_structured_and_go() {
    // no structured replies, no NBD_OPT_GO: falls back to EXPORT_NAME (with the 124 zeroes)
    let mut s = greeting(FLAG_FIXED_NEWSTYLE);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    s.extend(opt_reply(OPT_GO, REP_ERR_UNSUP, b"no go"));
    s.extend_from_slice(&(4096u64 * 10).to_be_bytes());
    s.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
    s.extend_from_slice(&[0u8; 124]);
    let (r, out) = run(s, "");
    let e = r.unwrap();
    assert_eq!((e.size, e.structured, e.has(TFLAG_READ_ONLY)), (40960, false, true));
    assert_eq!(&out[0..4], &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    // the last thing sent is EXPORT_NAME with an empty name
    assert_eq!(&out[out.len() - 16..], &encode_option(OPT_EXPORT_NAME, &[])[..]);
}

#[test]
fn handshake_flags_without_has_flags_are_ignored() {
    let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_export(512, TFLAG_READ_ONLY)));
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    assert_eq!(run(s, "x").0.unwrap().flags, 0);
}

#[test]
fn handshake_errors() {
    let errno = |s: Vec<u8>| run(s, "nope").0.unwrap_err().errno();
    // not an NBD server at all
    assert_eq!(errno(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()), libc::EPROTO);
    // oldstyle
    let mut s = NBDMAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    assert_eq!(errno(s), libc::EOPNOTSUPP);
    // newstyle but not fixed
    assert_eq!(errno(greeting(0)), libc::EOPNOTSUPP);
    // closes during the greeting
    assert_eq!(errno(NBDMAGIC.to_be_bytes().to_vec()), libc::ECONNRESET);
    // export not found
    let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_ERR_UNKNOWN, b"export 'nope' not present"));
    let e = run(s.clone(), "nope").0.unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    assert!(e.message().contains("nope"), "{e}");
    // TLS required
    let mut s2 = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s2.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, &[]));
    s2.extend(opt_reply(OPT_GO, REP_ERR_TLS_REQD, &[]));
    assert_eq!(errno(s2), libc::EOPNOTSUPP);
    // bad option reply magic
    let mut s3 = greeting(FLAG_FIXED_NEWSTYLE);
    s3.extend_from_slice(&[0xffu8; 20]);
    assert_eq!(errno(s3), libc::EPROTO);
    // reply to another option
    let mut s4 = greeting(FLAG_FIXED_NEWSTYLE);
    s4.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    assert_eq!(errno(s4), libc::EPROTO);
    // oversized option reply: refused before any allocation
    let mut s5 = greeting(FLAG_FIXED_NEWSTYLE);
    let mut r = opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    s5.extend(r);
    assert_eq!(errno(s5), libc::EPROTO);
    // GO acknowledged without the export information
    let mut s6 = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s6.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s6.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    assert_eq!(errno(s6), libc::EPROTO);
    // NBD_INFO_EXPORT of the wrong size
    let mut s7 = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s7.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s7.extend(opt_reply(OPT_GO, REP_INFO, &info_export(1, 1)[..8]));
    assert_eq!(errno(s7), libc::EPROTO);
    // EXPORT_NAME fallback, server closes: no such export
    let mut s8 = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s8.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    s8.extend(opt_reply(OPT_GO, REP_ERR_UNSUP, &[]));
    assert_eq!(errno(s8), libc::ENOENT);
    // nonsense block sizes
    let mut s9 = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s9.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s9.extend(opt_reply(OPT_GO, REP_INFO, &info_export(1 << 20, 1)));
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [3u32, 4096, 1] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    s9.extend(opt_reply(OPT_GO, REP_INFO, &bs));
    s9.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    assert_eq!(errno(s9), libc::EPROTO);
    // a too long export name is refused locally
    assert_eq!(run(Vec::new(), &"x".repeat(5000)).0.unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn request_encoding() {
    let mut b = [0u8; REQUEST_LEN];
    encode_request(&mut b, CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 4096, 65536);
    assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&b[4..8], &[0, 1, 0, 1]);
    assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&b[16..24], &4096u64.to_be_bytes());
    assert_eq!(&b[24..28], &65536u32.to_be_bytes());
    assert_eq!(&encode_disconnect()[6..8], &CMD_DISC.to_be_bytes());
}

fn simple(err: u32, handle: u64) -> Vec<u8> {
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&err.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v
}

fn chunk(flags: u16, typ: u16, handle: u64, length: u32) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

#[test]
fn reply_heads() {
    let s = simple(5, 77);
    assert_eq!(decode_head(&s[..3], false).unwrap(), Head::NeedMore(SIMPLE_LEN));
    assert_eq!(decode_head(&s[..10], true).unwrap(), Head::NeedMore(SIMPLE_LEN));
    assert_eq!(decode_head(&s, false).unwrap(), Head::Simple { error: 5, handle: 77 });
    let c = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 9, 4104);
    assert_eq!(decode_head(&c[..16], true).unwrap(), Head::NeedMore(CHUNK_LEN));
    assert_eq!(decode_head(&c, true).unwrap(), Head::Chunk { flags: 1, typ: 1, handle: 9, length: 4104 });
    // structured chunk when not negotiated, bad magic
    assert_eq!(decode_head(&c, false).unwrap_err().errno(), libc::EPROTO);
    assert_eq!(decode_head(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], true).unwrap_err().errno(), libc::EPROTO);
}

#[test]
fn chunk_bodies() {
    assert_eq!(chunk_body_len(1, REPLY_TYPE_NONE, 0).unwrap(), 0);
    assert!(chunk_body_len(0, REPLY_TYPE_NONE, 0).is_err());
    assert!(chunk_body_len(1, REPLY_TYPE_NONE, 4).is_err());
    assert_eq!(chunk_body_len(0, REPLY_TYPE_OFFSET_DATA, 9).unwrap(), 8);
    assert!(chunk_body_len(0, REPLY_TYPE_OFFSET_DATA, 8).is_err());
    assert_eq!(chunk_body_len(0, REPLY_TYPE_OFFSET_HOLE, 12).unwrap(), 12);
    assert!(chunk_body_len(0, REPLY_TYPE_OFFSET_HOLE, 13).is_err());
    assert_eq!(chunk_body_len(0, REPLY_TYPE_ERROR, 6).unwrap(), 6);
    // oversized error bodies and unknown types are violations, never reads
    assert!(chunk_body_len(0, REPLY_TYPE_ERROR, u32::MAX).is_err());
    assert!(chunk_body_len(0, 5, 100).is_err());
    assert!(chunk_body_len(0, 0x7fff, 0).is_err());
    // an error type we do not know (bit 15): read, if its length is sane
    assert_eq!(chunk_body_len(0, 0x8003, 10).unwrap(), 10);
    assert!(chunk_body_len(0, 0x8003, 5).is_err());
    assert!(chunk_body_len(1, 0xffff, MAX_ERROR_BODY + 1).is_err());

    let off = |o: u64| o.to_be_bytes().to_vec();
    // data inside the request (at 8192, 4096 bytes of a 16K read at 4096)
    assert_eq!(decode_chunk(REPLY_TYPE_OFFSET_DATA, 8 + 4096, &off(8192), true, 4096, 16384).unwrap(), Chunk::Data { buf_off: 4096, len: 4096 });
    // past the end, before the start, overflowing, for a write
    assert!(decode_chunk(REPLY_TYPE_OFFSET_DATA, 8 + 4097, &off(16384), true, 4096, 16384).is_err());
    assert!(decode_chunk(REPLY_TYPE_OFFSET_DATA, 8 + 512, &off(0), true, 4096, 16384).is_err());
    assert!(decode_chunk(REPLY_TYPE_OFFSET_DATA, u32::MAX, &off(u64::MAX - 10), true, 4096, 16384).is_err());
    assert!(decode_chunk(REPLY_TYPE_OFFSET_DATA, 8 + 512, &off(4096), false, 4096, 16384).is_err());
    // short body
    assert!(decode_chunk(REPLY_TYPE_OFFSET_DATA, 8 + 512, &[0; 4], true, 4096, 16384).is_err());
    // holes
    let mut h = off(4096);
    h.extend_from_slice(&16384u32.to_be_bytes());
    assert_eq!(decode_chunk(REPLY_TYPE_OFFSET_HOLE, 12, &h, true, 4096, 16384).unwrap(), Chunk::Hole { buf_off: 0, len: 16384 });
    let mut h2 = off(4096);
    h2.extend_from_slice(&0u32.to_be_bytes());
    assert!(decode_chunk(REPLY_TYPE_OFFSET_HOLE, 12, &h2, true, 4096, 16384).is_err());
    // errors
    let mut e = 28u32.to_be_bytes().to_vec();
    e.extend_from_slice(&2u16.to_be_bytes());
    e.extend_from_slice(b"no");
    assert_eq!(decode_chunk(REPLY_TYPE_ERROR, 8, &e, false, 0, 512).unwrap(), Chunk::Error(libc::ENOSPC));
    assert!(decode_chunk(REPLY_TYPE_ERROR, 9, &[e.clone(), vec![0]].concat(), false, 0, 512).is_err()); // message length mismatch
    let mut e0 = 0u32.to_be_bytes().to_vec();
    e0.extend_from_slice(&0u16.to_be_bytes());
    assert!(decode_chunk(REPLY_TYPE_ERROR, 6, &e0, false, 0, 512).is_err()); // error 0
    let mut eo = 5u32.to_be_bytes().to_vec();
    eo.extend_from_slice(&0u16.to_be_bytes());
    eo.extend_from_slice(&100u64.to_be_bytes());
    assert_eq!(decode_chunk(REPLY_TYPE_ERROR_OFFSET, 14, &eo, true, 0, 512).unwrap(), Chunk::Error(libc::EIO));
    assert!(decode_chunk(REPLY_TYPE_ERROR_OFFSET, 14, &eo, true, 200, 512).is_err()); // offset outside
    assert_eq!(local_errno(12345), libc::EIO);
    // unknown error types: the reply is an error (EIO, whatever the value),
    // with any type-specific bytes after the message
    let mut u = 28u32.to_be_bytes().to_vec();
    u.extend_from_slice(&3u16.to_be_bytes());
    u.extend_from_slice(b"bad");
    u.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(decode_chunk(0x8003, 13, &u, true, 0, 512).unwrap(), Chunk::Error(libc::EIO));
    assert_eq!(decode_chunk(0x8003, 9, &u[..9], false, 0, 512).unwrap(), Chunk::Error(libc::EIO));
    assert_eq!(decode_chunk(0xfff0, 6, &[0, 0, 0, 0, 0, 0], true, 0, 512).unwrap(), Chunk::Error(libc::EIO));
    assert!(decode_chunk(0x8003, 8, &u[..8], true, 0, 512).is_err()); // the message is longer than the chunk
                                                                      // a DF read refused as too long: EOVERFLOW reaches the client
    let mut o = 75u32.to_be_bytes().to_vec();
    o.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(decode_chunk(REPLY_TYPE_ERROR, 6, &o, true, 0, 1 << 20).unwrap(), Chunk::Error(libc::EOVERFLOW));
}

#[test]
fn coverage() {
    let mut c = Coverage::default();
    c.add(0, 4096).unwrap();
    c.add(8192, 4096).unwrap();
    assert!(c.add(4095, 2).is_err());
    c.add(4096, 4096).unwrap();
    assert_eq!(c.bytes, 12288);
    assert!(c.add(0, 1).is_err());
    c.clear();
    c.add(0, 1).unwrap();
}
