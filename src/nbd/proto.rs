//! The NBD wire format (the protocol of NetworkBlockDevice/nbd, `doc/proto.md`):
//! the fixed-newstyle handshake with option haggling, transmission requests,
//! simple replies and structured reply chunks. Pure: the handshake runs on
//! any `Read + Write`, replies are decoded from byte slices, and every value
//! the server sends is checked before it is used (magic, lengths, offsets
//! inside the request, chunk types), so a malformed server makes an error,
//! never an allocation or a read out of bounds.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::time::Instant;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// handshake flags (server) and client flags
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// options
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// option reply types
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;

// NBD_OPT_GO info types
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// transmission flags
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// commands and command flags
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// "Don't fragment": the READ's reply is one data chunk (servers then skip
/// looking for holes, which costs them a block-status query per read).
pub const CMD_FLAG_DF: u16 = 1 << 2;

// structured reply chunks
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
/// Chunk types with this bit are errors; the body of every error type,
/// known or not, starts with the error (u32) and a message (u16 length).
pub const REPLY_FLAG_ERROR_TYPE: u16 = 1 << 15;

/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_LEN: usize = 20;
/// Every reply starts with at least this many bytes of header, and no
/// payload byte comes before this many bytes from the start of a reply in
/// structured mode (the OFFSET_DATA header plus its offset): a receive of up
/// to this many bytes from a reply's start never takes payload.
pub const STRUCTURED_SAFE_LEN: usize = CHUNK_LEN + 8;
/// Largest option reply or error chunk body we accept (longer: a protocol error).
pub const MAX_OPT_REPLY: u32 = 64 << 10;
pub const MAX_ERROR_BODY: u32 = 4096 + 6 + 8;
/// NBD_REP_INFO replies to one NBD_OPT_GO beyond which the server is
/// considered broken: we ask for one information type, and proto.md has
/// five; without a bound a server could keep the handshake going forever.
pub const MAX_INFO_REPLIES: usize = 32;

/// An export as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Export {
    pub size: u64,
    /// Transmission flags (`TFLAG_*`); 0 when the server did not set HAS_FLAGS.
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// NBD_INFO_BLOCK_SIZE, when the server sent it: minimum, preferred, maximum.
    pub block_sizes: Option<(u32, u32, u32)>,
}

impl Export {
    pub fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    /// Whether this export (of a later connection) can serve a device made
    /// from `first`, whose logical block size is `lbs` and whose largest
    /// request is `max_io` bytes: the device keeps what it learned at the
    /// first handshake, so a connection to a smaller export, a read-only
    /// one, one without a command the device sends (FLUSH, FUA, TRIM,
    /// WRITE_ZEROES offered at first) or with block-size constraints its
    /// requests break is refused (EIO) rather than used.
    pub fn check_serves(&self, first: &Export, lbs: u32, max_io: u32) -> Result<()> {
        let changed = |what: String| Err(Error::new(libc::EIO, format!("the NBD export changed since the first handshake: {what}")));
        if self.size < first.size {
            return changed(format!("its size shrank from {} to {} bytes", first.size, self.size));
        }
        if self.has(TFLAG_READ_ONLY) && !first.has(TFLAG_READ_ONLY) {
            return changed("it became read-only".into());
        }
        let needed = [(TFLAG_SEND_FLUSH, "FLUSH"), (TFLAG_SEND_FUA, "FUA"), (TFLAG_SEND_TRIM, "TRIM"), (TFLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES")];
        for (f, name) in needed {
            if first.has(f) && !self.has(f) {
                return changed(format!("it no longer offers NBD_FLAG_SEND_{name} (flags {:#x} -> {:#x})", first.flags, self.flags));
            }
        }
        if let Some((min, _, max)) = self.block_sizes {
            if min > lbs {
                return changed(format!("its minimum block size {min} is larger than the device's logical block size {lbs}"));
            }
            if max < max_io {
                return changed(format!("its maximum payload {max} is smaller than the device's largest request ({max_io} bytes)"));
            }
        }
        Ok(())
    }
}

/// A protocol violation by the server (EPROTO).
pub fn violation(msg: impl Into<String>) -> Error {
    Error::new(libc::EPROTO, format!("NBD protocol violation: {}", msg.into()))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The handshake's deadline passed (ETIMEDOUT).
fn late(what: &str) -> Error {
    Error::new(libc::ETIMEDOUT, format!("NBD handshake: the deadline passed before {what} came through"))
}

/// Reads all of `buf`, checking the handshake's deadline before each read:
/// a per-read timeout alone would not bound a server that trickles a byte
/// at a time.
fn read_exact<S: Read>(s: &mut S, mut buf: &mut [u8], what: &str, deadline: Instant) -> Result<()> {
    while !buf.is_empty() {
        if Instant::now() >= deadline {
            return Err(late(what));
        }
        match s.read(buf) {
            Ok(0) => return Err(Error::new(libc::ECONNRESET, format!("NBD handshake: the server closed the connection while we waited for {what}"))),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(e, format!("NBD handshake: reading {what}"))),
        }
    }
    Ok(())
}

fn write_all<S: Write>(s: &mut S, mut buf: &[u8], what: &str, deadline: Instant) -> Result<()> {
    while !buf.is_empty() {
        if Instant::now() >= deadline {
            return Err(late(what));
        }
        match s.write(buf) {
            Ok(0) => return Err(Error::new(libc::EPIPE, format!("NBD handshake: sending {what}"))),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(e, format!("NBD handshake: sending {what}"))),
        }
    }
    Ok(())
}

/// Bytes of an option request.
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// One option reply: its type and (bounded) data.
fn read_opt_reply<S: Read>(s: &mut S, opt: u32, deadline: Instant) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    read_exact(s, &mut h, "an option reply", deadline)?;
    if be64(&h[0..8]) != OPT_REPLY_MAGIC {
        return Err(violation(format!("bad option reply magic {:#x}", be64(&h[0..8]))));
    }
    if be32(&h[8..12]) != opt {
        return Err(violation(format!("reply to option {} while option {opt} was asked", be32(&h[8..12]))));
    }
    let (typ, len) = (be32(&h[12..16]), be32(&h[16..20]));
    if len > MAX_OPT_REPLY {
        return Err(violation(format!("option reply of {len} bytes (limit {MAX_OPT_REPLY})")));
    }
    let mut data = vec![0u8; len as usize];
    read_exact(s, &mut data, "option reply data", deadline)?;
    Ok((typ, data))
}

/// The text of an error reply, made printable.
fn reply_text(data: &[u8]) -> String {
    let t: String = String::from_utf8_lossy(data).chars().filter(|c| !c.is_control()).take(200).collect();
    if t.is_empty() {
        String::new()
    } else {
        format!(": \"{t}\"")
    }
}

fn opt_error(opt: &str, typ: u32, data: &[u8], export: &str) -> Error {
    let text = reply_text(data);
    match typ {
        REP_ERR_UNKNOWN => Error::new(libc::ENOENT, format!("the NBD server has no export named '{export}'{text}")),
        REP_ERR_POLICY => Error::new(libc::EACCES, format!("the NBD server refused {opt} by policy{text}")),
        REP_ERR_TLS_REQD => Error::new(libc::EOPNOTSUPP, format!("the NBD server requires TLS, which this client does not speak{text}")),
        REP_ERR_SHUTDOWN => Error::new(libc::ESHUTDOWN, format!("the NBD server is shutting down{text}")),
        REP_ERR_INVALID => Error::new(libc::EINVAL, format!("the NBD server found {opt} invalid{text}")),
        t if t & REP_ERR_BIT != 0 => Error::new(libc::EIO, format!("the NBD server refused {opt} (error {:#x}){text}", t)),
        t => violation(format!("unexpected reply type {t} to {opt}")),
    }
}

/// The fixed-newstyle handshake up to the transmission phase for `export`:
/// structured replies when the server offers them, NBD_OPT_GO (falling back
/// to NBD_OPT_EXPORT_NAME on servers without it). All of it must be over by
/// `deadline` (ETIMEDOUT otherwise), and the server may send at most
/// MAX_INFO_REPLIES information replies.
pub fn handshake<S: Read + Write>(s: &mut S, export: &str, deadline: Instant) -> Result<Export> {
    if export.len() > 4096 {
        return Err(Error::inval("NBD export name longer than 4096 bytes"));
    }
    let mut h = [0u8; 18];
    read_exact(s, &mut h[..16], "the server greeting", deadline)?;
    if be64(&h[0..8]) != NBDMAGIC {
        return Err(violation(format!("bad greeting magic {:#x} (not an NBD server?)", be64(&h[0..8]))));
    }
    match be64(&h[8..16]) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(Error::new(libc::EOPNOTSUPP, "the NBD server speaks the oldstyle protocol; only fixed newstyle is supported")),
        m => return Err(violation(format!("bad greeting magic {m:#x} after NBDMAGIC"))),
    }
    read_exact(s, &mut h[16..18], "the handshake flags", deadline)?;
    let hflags = be16(&h[16..18]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::new(libc::EOPNOTSUPP, "the NBD server does not support fixed newstyle negotiation"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    write_all(s, &cflags.to_be_bytes(), "the client flags", deadline)?;

    // structured replies, if offered
    write_all(s, &encode_option(OPT_STRUCTURED_REPLY, &[]), "NBD_OPT_STRUCTURED_REPLY", deadline)?;
    let (typ, data) = read_opt_reply(s, OPT_STRUCTURED_REPLY, deadline)?;
    let structured = match typ {
        REP_ACK => true,
        t if t & REP_ERR_BIT != 0 => false,
        _ => return Err(opt_error("NBD_OPT_STRUCTURED_REPLY", typ, &data, export)),
    };

    // NBD_OPT_GO: name, then one info request (block sizes)
    let mut go = Vec::with_capacity(export.len() + 8);
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    write_all(s, &encode_option(OPT_GO, &go), "NBD_OPT_GO", deadline)?;
    let mut exp = Export { structured, ..Default::default() };
    let mut got_export = false;
    let mut infos = 0;
    loop {
        let (typ, data) = read_opt_reply(s, OPT_GO, deadline)?;
        match typ {
            REP_INFO => {
                infos += 1;
                if infos > MAX_INFO_REPLIES {
                    return Err(violation(format!("more than {MAX_INFO_REPLIES} NBD_REP_INFO replies to NBD_OPT_GO")));
                }
                if data.len() < 2 {
                    return Err(violation("NBD_REP_INFO shorter than its type"));
                }
                match be16(&data[0..2]) {
                    INFO_EXPORT => {
                        if data.len() != 12 {
                            return Err(violation(format!("NBD_INFO_EXPORT of {} bytes (want 12)", data.len())));
                        }
                        exp.size = be64(&data[2..10]);
                        exp.flags = be16(&data[10..12]);
                        got_export = true;
                    }
                    INFO_BLOCK_SIZE => {
                        if data.len() != 14 {
                            return Err(violation(format!("NBD_INFO_BLOCK_SIZE of {} bytes (want 14)", data.len())));
                        }
                        exp.block_sizes = Some((be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14])));
                    }
                    _ => {} // other information is optional: ignored
                }
            }
            REP_ACK => {
                if !got_export {
                    return Err(violation("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"));
                }
                return finish_export(exp);
            }
            REP_ERR_UNSUP => return export_name(s, export, structured, no_zeroes, deadline),
            _ => return Err(opt_error("NBD_OPT_GO", typ, &data, export)),
        }
    }
}

/// NBD_OPT_EXPORT_NAME (servers without NBD_OPT_GO): the server answers with
/// the export's size and flags, or closes the connection.
fn export_name<S: Read + Write>(s: &mut S, export: &str, structured: bool, no_zeroes: bool, deadline: Instant) -> Result<Export> {
    write_all(s, &encode_option(OPT_EXPORT_NAME, export.as_bytes()), "NBD_OPT_EXPORT_NAME", deadline)?;
    let mut b = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { 134 };
    read_exact(s, &mut b[..n], "the export's size and flags", deadline).map_err(|e| {
        if e.errno() == libc::ECONNRESET {
            Error::new(libc::ENOENT, format!("the NBD server closed the connection at NBD_OPT_EXPORT_NAME '{export}' (no such export?)"))
        } else {
            e
        }
    })?;
    finish_export(Export { size: be64(&b[0..8]), flags: be16(&b[8..10]), structured, block_sizes: None })
}

fn finish_export(mut e: Export) -> Result<Export> {
    if e.flags & TFLAG_HAS_FLAGS == 0 {
        e.flags = 0;
    }
    if let Some((min, pref, max)) = e.block_sizes {
        let ok = min.is_power_of_two() && min <= 65536 && pref.is_power_of_two() && pref >= min.max(512) && max >= pref;
        if !ok {
            return Err(violation(format!("block sizes {min}/{pref}/{max} are inconsistent")));
        }
    }
    Ok(e)
}

/// A transmission request header.
pub fn encode_request(buf: &mut [u8], flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
    buf[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    buf[4..6].copy_from_slice(&flags.to_be_bytes());
    buf[6..8].copy_from_slice(&cmd.to_be_bytes());
    buf[8..16].copy_from_slice(&handle.to_be_bytes());
    buf[16..24].copy_from_slice(&offset.to_be_bytes());
    buf[24..28].copy_from_slice(&len.to_be_bytes());
}

/// The start of a reply, decoded from the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// `n` bytes in total are needed to decode it.
    NeedMore(usize),
    /// A simple reply (16 bytes).
    Simple { error: u32, handle: u64 },
    /// A structured chunk header (20 bytes) whose body is `length` bytes.
    Chunk { flags: u16, typ: u16, handle: u64, length: u32 },
}

/// Decodes the reply header at the start of `b`. Structured chunks are a
/// violation unless `structured` was negotiated.
pub fn decode_head(b: &[u8], structured: bool) -> Result<Head> {
    if b.len() < 4 {
        return Ok(Head::NeedMore(SIMPLE_LEN));
    }
    match be32(&b[0..4]) {
        SIMPLE_REPLY_MAGIC => {
            if b.len() < SIMPLE_LEN {
                return Ok(Head::NeedMore(SIMPLE_LEN));
            }
            Ok(Head::Simple { error: be32(&b[4..8]), handle: be64(&b[8..16]) })
        }
        STRUCTURED_REPLY_MAGIC if structured => {
            if b.len() < CHUNK_LEN {
                return Ok(Head::NeedMore(CHUNK_LEN));
            }
            Ok(Head::Chunk { flags: be16(&b[4..6]), typ: be16(&b[6..8]), handle: be64(&b[8..16]), length: be32(&b[16..20]) })
        }
        STRUCTURED_REPLY_MAGIC => Err(violation("a structured reply chunk although structured replies were not negotiated")),
        m => Err(violation(format!("bad reply magic {m:#010x}"))),
    }
}

/// Body bytes of a chunk that are read into the header buffer (the rest of
/// an OFFSET_DATA chunk is the payload, received into the request buffer).
/// Checks the length against the type.
pub fn chunk_body_len(flags: u16, typ: u16, length: u32) -> Result<usize> {
    match typ {
        REPLY_TYPE_NONE if length == 0 && flags & REPLY_FLAG_DONE != 0 => Ok(0),
        REPLY_TYPE_NONE => Err(violation(format!("NBD_REPLY_TYPE_NONE with length {length} / without the DONE flag"))),
        REPLY_TYPE_OFFSET_DATA if length > 8 => Ok(8),
        REPLY_TYPE_OFFSET_DATA => Err(violation(format!("OFFSET_DATA chunk of length {length} (no data)"))),
        REPLY_TYPE_OFFSET_HOLE if length == 12 => Ok(12),
        REPLY_TYPE_OFFSET_HOLE => Err(violation(format!("OFFSET_HOLE chunk of length {length} (want 12)"))),
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET if (6..=MAX_ERROR_BODY).contains(&length) => Ok(length as usize),
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => Err(violation(format!("error chunk of length {length}"))),
        // an error type we do not know: its body starts as every error's
        t if t & REPLY_FLAG_ERROR_TYPE != 0 && (6..=MAX_ERROR_BODY).contains(&length) => Ok(length as usize),
        t if t & REPLY_FLAG_ERROR_TYPE != 0 => Err(violation(format!("error chunk of unknown type {t:#x} and length {length}"))),
        t => Err(violation(format!("unexpected reply chunk type {t}"))),
    }
}

/// What a chunk asks of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// `len` bytes of data for the request buffer at `buf_off` follow.
    Data { buf_off: u32, len: u32 },
    /// The range reads as zeroes.
    Hole { buf_off: u32, len: u32 },
    /// The request failed with this (local, positive) errno.
    Error(i32),
    /// Nothing (the final chunk).
    None,
}

/// Decodes a chunk's body (`chunk_body_len` bytes) for a request of
/// `req_len` bytes at `req_off` that is a READ (`read`) or not.
pub fn decode_chunk(typ: u16, length: u32, body: &[u8], read: bool, req_off: u64, req_len: u32) -> Result<Chunk> {
    let need = chunk_body_len(if typ == REPLY_TYPE_NONE { REPLY_FLAG_DONE } else { 0 }, typ, length)?;
    if body.len() < need {
        return Err(violation(format!("chunk body of {} bytes, {need} needed", body.len())));
    }
    let in_req = |off: u64, len: u64| -> Result<u32> {
        let end = off.checked_add(len).ok_or_else(|| violation("chunk range overflows"))?;
        if off < req_off || end > req_off + req_len as u64 || len == 0 {
            return Err(violation(format!("chunk {off}+{len} outside the request {req_off}+{req_len}")));
        }
        Ok((off - req_off) as u32)
    };
    match typ {
        REPLY_TYPE_NONE => Ok(Chunk::None),
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE if !read => Err(violation("a data/hole chunk in the reply to a command that is not a READ")),
        REPLY_TYPE_OFFSET_DATA => {
            let len = length - 8;
            let buf_off = in_req(be64(&body[0..8]), len as u64)?;
            Ok(Chunk::Data { buf_off, len })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let len = be32(&body[8..12]);
            let buf_off = in_req(be64(&body[0..8]), len as u64)?;
            Ok(Chunk::Hole { buf_off, len })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let err = be32(&body[0..4]);
            let msg = be16(&body[4..6]) as u32;
            let want = 6 + msg + if typ == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if want != length {
                return Err(violation(format!("error chunk of length {length} with a {msg}-byte message")));
            }
            if typ == REPLY_TYPE_ERROR_OFFSET {
                in_req(be64(&body[6 + msg as usize..14 + msg as usize]), 1)?;
            }
            if err == 0 {
                return Err(violation("error chunk with error 0"));
            }
            Ok(Chunk::Error(local_errno(err)))
        }
        // proto.md: the client must consider the reply errored (and may go
        // on) when the message fits the length; the type-specific rest and
        // the error value mean nothing to us: EIO
        t if t & REPLY_FLAG_ERROR_TYPE != 0 => {
            let msg = be16(&body[4..6]) as u32;
            if 6 + msg > length {
                return Err(violation(format!("error chunk of unknown type {t:#x}, length {length}, with a {msg}-byte message")));
            }
            Ok(Chunk::Error(libc::EIO))
        }
        t => Err(violation(format!("unexpected reply chunk type {t}"))),
    }
}

/// The local errno of an NBD error value (unknown values are EIO).
pub fn local_errno(e: u32) -> i32 {
    match e {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// Disjoint ranges of a READ request covered by data and hole chunks.
#[derive(Debug, Default, Clone)]
pub struct Coverage {
    ranges: Vec<(u32, u32)>,
    pub bytes: u64,
}

/// Chunks per request beyond which a server is considered broken.
pub const MAX_CHUNKS: usize = 4096;

impl Coverage {
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.bytes = 0;
    }

    /// Records `off..off+len`; a range that overlaps one seen before is a violation.
    pub fn add(&mut self, off: u32, len: u32) -> Result<()> {
        let end = off as u64 + len as u64;
        if self.ranges.iter().any(|&(s, e)| (off as u64) < e as u64 && (s as u64) < end) {
            return Err(violation(format!("read chunk {off}+{len} overlaps an earlier chunk")));
        }
        if self.ranges.len() >= MAX_CHUNKS {
            return Err(violation(format!("more than {MAX_CHUNKS} chunks for one read")));
        }
        self.ranges.push((off, end as u32));
        self.bytes += len as u64;
        Ok(())
    }
}

/// Tells the server we leave (NBD_CMD_DISC); best effort.
pub fn encode_disconnect() -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    encode_request(&mut b, 0, CMD_DISC, 0, 0, 0);
    b
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
