//! Protocol edge cases, driven by a hand-written client speaking raw bytes.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use common::*;
use vma_nbd::proto::*;
use vma_nbd::BlockSize;

const SIZE: usize = 1 << 20;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

fn rw_export() -> std::sync::Arc<vma_nbd::MemExport> {
    mem(pattern(SIZE, 1), false)
}

fn read_simple(c: &mut Client, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    c.request(CMD_READ, 0, handle, offset, len);
    let (err, h) = c.simple_reply();
    assert_eq!((err, h), (0, handle));
    c.read_n(len as usize)
}

#[test]
fn unknown_export_gets_err_unknown() {
    let (_d, sock, _h) = start(vec![("disk", rw_export())]);
    let mut c = Client::connect(&sock);
    for opt in [OPT_INFO, OPT_GO] {
        let (infos, fin) = c.info(opt, "nope", &[INFO_BLOCK_SIZE]);
        assert!(infos.is_empty());
        assert_eq!(fin.kind, REP_ERR_UNKNOWN);
    }
    // The session goes on.
    let (size, _) = c.go("disk", false, false);
    assert_eq!(size, SIZE as u64);
    c.disconnect();
}

#[test]
fn list_exports() {
    let (_d, sock, _h) = start(vec![("b-disk", rw_export()), ("a-disk", rw_export())]);
    let mut c = Client::connect(&sock);
    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply();
        assert_eq!(r.option, OPT_LIST);
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_SERVER);
        let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["a-disk", "b-disk"]);
    // With data: invalid.
    c.option(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    assert!(c.is_closed());
}

#[test]
fn unknown_and_unsupported_options() {
    let (_d, sock, _h) = start(vec![("disk", rw_export())]);
    let mut c = Client::connect(&sock);
    for (opt, data) in [
        (4242u32, &b"some data"[..]),
        (OPT_STARTTLS, &[][..]),
        (OPT_EXTENDED_HEADERS, &[][..]),
    ] {
        c.option(opt, data);
        let r = c.opt_reply();
        assert_eq!((r.option, r.kind), (opt, REP_ERR_UNSUP));
    }
    // Oversized option: refused without being buffered, connection usable.
    c.option(777, &vec![0u8; 100 * 1024]);
    assert_eq!(c.opt_reply().kind, REP_ERR_TOO_BIG);
    // Malformed GO data.
    c.option(OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    c.go("disk", false, false);
    assert_eq!(read_simple(&mut c, 1, 0, 16), pattern(SIZE, 1)[..16]);
    c.disconnect();
}

#[test]
fn info_replies() {
    let block = BlockSize {
        min: 512,
        preferred: 4096,
        max: 1 << 20,
    };
    let e = mem_with(pattern(SIZE, 2), true, false, block);
    let (_d, sock, _h) = start(vec![("disk", e)]);
    let mut c = Client::connect(&sock);
    let (infos, fin) = c.info(OPT_INFO, "disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
    assert_eq!(fin.kind, REP_ACK);
    let find = |t: u16| {
        infos
            .iter()
            .find(|r| r.data[..2] == t.to_be_bytes())
            .unwrap()
    };
    assert_eq!(&find(INFO_NAME).data[2..], b"disk");
    let bs = &find(INFO_BLOCK_SIZE).data;
    let v = |i: usize| u32::from_be_bytes(bs[2 + 4 * i..6 + 4 * i].try_into().unwrap());
    assert_eq!((v(0), v(1), v(2)), (512, 4096, 1 << 20));
    let ex = &find(INFO_EXPORT).data;
    let flags = u16::from_be_bytes([ex[10], ex[11]]);
    assert_ne!(flags & FLAG_HAS_FLAGS, 0);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    assert_ne!(flags & FLAG_SEND_FLUSH, 0);
    assert_eq!(flags & FLAG_SEND_WRITE_ZEROES, 0);
    assert_eq!(flags & FLAG_SEND_DF, 0);
    // After INFO, GO still works; with structured replies DF is advertised.
    let (_, flags) = c.go("disk", true, false);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    // Unaligned read: EINVAL (structured error chunk).
    c.request(CMD_READ, 0, 5, 100, 512);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.handle), (REPLY_TYPE_ERROR, 5));
    assert_eq!(
        u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
        EINVAL
    );
    c.disconnect();
}

#[test]
fn export_name_option() {
    let (_d, sock, _h) = start(vec![("disk", rw_export())]);
    // With NO_ZEROES: 8 + 2 bytes.
    let mut c = Client::connect(&sock);
    c.option(OPT_EXPORT_NAME, b"disk");
    let r = c.read_n(10);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE as u64);
    let flags = u16::from_be_bytes([r[8], r[9]]);
    assert_ne!(flags & FLAG_SEND_WRITE_ZEROES, 0);
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        read_simple(&mut c, 9, 4096, 512),
        pattern(SIZE, 1)[4096..4608]
    );
    c.disconnect();

    // Without NO_ZEROES: 124 zero bytes follow.
    let mut c = Client::connect_flags(&sock, FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"disk");
    let r = c.read_n(134);
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(read_simple(&mut c, 1, 0, 8), pattern(SIZE, 1)[..8]);
    c.disconnect();

    // Unknown export: the only possible answer is closing the connection.
    let mut c = Client::connect(&sock);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
}

#[test]
fn unknown_client_flags_close() {
    let (_d, sock, _h) = start(vec![("disk", rw_export())]);
    let mut c = Client::connect_flags(&sock, 0x80);
    assert!(c.is_closed());
}

#[test]
fn bounds_and_zero_length() {
    let e = rw_export();
    let (_d, sock, _h) = start(vec![("disk", e.clone())]);
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);

    // Read past the end: EINVAL, no payload.
    c.request(CMD_READ, 0, 1, SIZE as u64 - 512, 1024);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    c.request(CMD_READ, 0, 2, u64::MAX - 10, 512);
    assert_eq!(c.simple_reply(), (EINVAL, 2));

    // Write past the end: ENOSPC, payload consumed.
    c.request(CMD_WRITE, 0, 3, SIZE as u64 - 512, 1024);
    c.send(&[0xee; 1024]);
    assert_eq!(c.simple_reply(), (ENOSPC, 3));
    c.request(CMD_WRITE_ZEROES, 0, 4, SIZE as u64, 512);
    assert_eq!(c.simple_reply(), (ENOSPC, 4));

    // Zero-length read and write, also exactly at the end.
    c.request(CMD_READ, 0, 5, 0, 0);
    assert_eq!(c.simple_reply(), (0, 5));
    c.request(CMD_WRITE, 0, 6, SIZE as u64, 0);
    assert_eq!(c.simple_reply(), (0, 6));

    // The connection is still in sync and the data untouched.
    assert_eq!(e.snapshot(), pattern(SIZE, 1));
    c.request(CMD_WRITE, 0, 7, 512, 4);
    c.send(b"abcd");
    assert_eq!(c.simple_reply(), (0, 7));
    assert_eq!(
        read_simple(&mut c, 8, 510, 8),
        [
            &pattern(SIZE, 1)[510..512],
            b"abcd",
            &pattern(SIZE, 1)[516..518]
        ]
        .concat()
    );

    // Unknown command and bad flags: EINVAL.
    c.request(42, 0, 9, 0, 0);
    assert_eq!(c.simple_reply(), (EINVAL, 9));
    c.request(CMD_READ, 0x100, 10, 0, 512);
    assert_eq!(c.simple_reply(), (EINVAL, 10));
    c.request(CMD_READ, CMD_FLAG_DF, 11, 0, 512);
    assert_eq!(c.simple_reply(), (EINVAL, 11));
    // Block status without a negotiated context: EINVAL.
    c.request(CMD_BLOCK_STATUS, 0, 12, 0, 512);
    assert_eq!(c.simple_reply(), (EINVAL, 12));
    // Trim (not advertised): validated no-op.
    c.request(CMD_TRIM, 0, 13, 0, 4096);
    assert_eq!(c.simple_reply(), (0, 13));
    c.request(CMD_TRIM, 0, 14, SIZE as u64, 4096);
    assert_eq!(c.simple_reply(), (EINVAL, 14));
    assert_eq!(read_simple(&mut c, 15, 0, 8), pattern(SIZE, 1)[..8]);
    c.disconnect();
}

#[test]
fn write_zeroes_fua_and_flush() {
    let e = rw_export();
    let (_d, sock, _h) = start(vec![("disk", e.clone())]);
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 1, 8192, 8192);
    assert_eq!(c.simple_reply(), (0, 1));
    assert!(e.snapshot()[8192..16384].iter().all(|&b| b == 0));
    assert_eq!(e.snapshot()[16384], pattern(SIZE, 1)[16384]);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 2, 0, 3);
    c.send(b"xyz");
    assert_eq!(c.simple_reply(), (0, 2));
    assert_eq!(e.flushes(), 1);
    c.request(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(c.simple_reply(), (0, 3));
    assert_eq!(e.flushes(), 2);
    // Fast zero is not advertised: EINVAL.
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 4, 0, 512);
    assert_eq!(c.simple_reply(), (EINVAL, 4));
    c.disconnect();
    assert_eq!(&e.snapshot()[..3], b"xyz");
}

#[test]
fn read_only_refuses_writes_and_stays_usable() {
    let e = mem(pattern(SIZE, 3), true);
    let (_d, sock, _h) = start(vec![("ro", e.clone())]);
    for structured in [false, true] {
        let mut c = Client::connect(&sock);
        let (_, flags) = c.go("ro", structured, false);
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
        c.request(CMD_WRITE, 0, 1, 0, 4096);
        c.send(&[0xaa; 4096]);
        c.request(CMD_WRITE_ZEROES, 0, 2, 0, 4096);
        c.request(CMD_TRIM, 0, 3, 0, 4096);
        for h in 1..=3 {
            if structured {
                let ch = c.chunk();
                assert_eq!(
                    (ch.kind, ch.handle, ch.flags),
                    (REPLY_TYPE_ERROR, h, REPLY_FLAG_DONE)
                );
                assert_eq!(
                    u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
                    EPERM
                );
                let mlen = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
                assert_eq!(ch.payload.len(), 6 + mlen);
            } else {
                assert_eq!(c.simple_reply(), (EPERM, h));
            }
        }
        // Still usable.
        c.request(CMD_READ, 0, 4, 0, 4096);
        if structured {
            let ch = c.chunk();
            assert_eq!(ch.kind, REPLY_TYPE_OFFSET_DATA);
            assert_eq!(&ch.payload[8..], &pattern(SIZE, 3)[..4096]);
        } else {
            assert_eq!(c.simple_reply(), (0, 4));
            assert_eq!(c.read_n(4096), pattern(SIZE, 3)[..4096]);
        }
        c.disconnect();
    }
    assert_eq!(e.snapshot(), pattern(SIZE, 3));
}

#[test]
fn over_max_length_requests() {
    let block = BlockSize {
        min: 1,
        preferred: 4096,
        max: 64 * 1024,
    };
    let e = mem_with(pattern(SIZE, 4), false, false, block);
    let (_d, sock, _h) = start(vec![("disk", e.clone())]);
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    c.request(CMD_READ, 0, 1, 0, 128 * 1024);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    // Over the export's maximum but below 32 MiB: payload skipped, EINVAL.
    c.request(CMD_WRITE, 0, 2, 0, 128 * 1024);
    c.send(&vec![0x77; 128 * 1024]);
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    assert_eq!(read_simple(&mut c, 3, 0, 1024), pattern(SIZE, 4)[..1024]);
    // Write zeroes is not bound by the maximum (no payload).
    c.request(CMD_WRITE_ZEROES, 0, 4, 0, 256 * 1024);
    assert_eq!(c.simple_reply(), (0, 4));
    // A write announcing more than 32 MiB: the connection is dropped.
    c.request(CMD_WRITE, 0, 5, 0, 64 << 20);
    assert!(c.is_closed());
    // The server still serves new clients.
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    assert!(read_simple(&mut c, 1, 0, 1024).iter().all(|&b| b == 0));
    c.disconnect();
}

#[test]
fn bad_magic_closes_connection() {
    let (_d, sock, _h) = start(vec![("disk", rw_export())]);
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    let mut h = RequestHeader {
        flags: 0,
        command: CMD_READ,
        handle: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    h[0] = 0x99;
    c.send(&h);
    assert!(c.is_closed());
    // Bad option magic during the handshake as well.
    let mut c = Client::connect(&sock);
    c.send(b"IHAVEOPXxxxxxxxx");
    assert!(c.is_closed());
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    assert_eq!(read_simple(&mut c, 1, 0, 4), pattern(SIZE, 1)[..4]);
    c.disconnect();
}

#[test]
fn client_vanishing_mid_request() {
    let e = rw_export();
    let (_d, sock, h) = start(vec![("disk", e.clone())]);
    // Half a request header.
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    c.send(
        &RequestHeader {
            flags: 0,
            command: CMD_READ,
            handle: 1,
            offset: 0,
            length: 512,
        }
        .encode()[..13],
    );
    drop(c);
    // A write with half its payload.
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    c.request(CMD_WRITE, 0, 1, 0, 65536);
    c.send(&[0x55; 30000]);
    drop(c);
    // Half an option, and nothing at all.
    let mut c = Client::connect(&sock);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    drop(UnixStream::connect(&sock).unwrap());

    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    assert_eq!(read_simple(&mut c, 2, 0, 512), pattern(SIZE, 1)[..512]);
    c.disconnect();
    assert!(!h.is_finished());
    assert_eq!(e.writes(), 0);
}

#[test]
fn pipelined_requests() {
    let e = rw_export();
    let (_d, sock, _h) = start(vec![("disk", e.clone())]);
    let data = pattern(SIZE, 1);
    for structured in [false, true] {
        let mut c = Client::connect(&sock);
        c.go("disk", structured, false);
        // Send everything in one go before reading any reply.
        let mut batch = Vec::new();
        for i in 0..32u64 {
            let h = RequestHeader {
                flags: 0,
                command: CMD_READ,
                handle: 1000 + i,
                offset: i * 8192,
                length: 4096,
            };
            batch.extend_from_slice(&h.encode());
        }
        c.s.write_all(&batch).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..32 {
            let (handle, payload) = if structured {
                let ch = c.chunk();
                assert_eq!(ch.kind, REPLY_TYPE_OFFSET_DATA);
                assert_eq!(ch.flags, REPLY_FLAG_DONE);
                let off = u64::from_be_bytes(ch.payload[..8].try_into().unwrap());
                assert_eq!(off, (ch.handle - 1000) * 8192);
                (ch.handle, ch.payload[8..].to_vec())
            } else {
                let (err, handle) = c.simple_reply();
                assert_eq!(err, 0);
                (handle, c.read_n(4096))
            };
            let i = (handle - 1000) as usize;
            assert!(i < 32 && seen.insert(handle), "unexpected handle {handle}");
            assert_eq!(payload, data[i * 8192..i * 8192 + 4096]);
        }
        c.disconnect();
    }
    // Pipelined writes (out-of-order completion allowed), then a flush.
    let mut c = Client::connect(&sock);
    c.go("disk", false, false);
    let mut batch = Vec::new();
    for i in 0..32u64 {
        batch.extend_from_slice(
            &RequestHeader {
                flags: 0,
                command: CMD_WRITE,
                handle: i,
                offset: i * 4096,
                length: 4096,
            }
            .encode(),
        );
        batch.extend_from_slice(&[i as u8; 4096]);
    }
    c.s.write_all(&batch).unwrap();
    let mut handles: Vec<u64> = (0..32)
        .map(|_| c.simple_reply())
        .map(|(e, h)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, (0..32).collect::<Vec<_>>());
    c.request(CMD_FLUSH, 0, 99, 0, 0);
    assert_eq!(c.simple_reply(), (0, 99));
    c.disconnect();
    let snap = e.snapshot();
    for i in 0..32usize {
        assert!(snap[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8));
    }
}

#[test]
fn structured_reads() {
    let mut data = pattern(SIZE, 5);
    data[65536..131072].fill(0);
    let e = mem(data.clone(), false);
    let (_d, sock, _h) = start(vec![("disk", e)]);
    let mut c = Client::connect(&sock);
    c.go("disk", true, false);

    c.request(CMD_READ, CMD_FLAG_DF, 1, 4096, 8192);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.kind, ch.handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(
        u64::from_be_bytes(ch.payload[..8].try_into().unwrap()),
        4096
    );
    assert_eq!(&ch.payload[8..], &data[4096..12288]);

    // All zeroes: a hole chunk.
    c.request(CMD_READ, 0, 2, 65536, 65536);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.kind, ch.handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 2)
    );
    assert_eq!(
        u64::from_be_bytes(ch.payload[..8].try_into().unwrap()),
        65536
    );
    assert_eq!(
        u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()),
        65536
    );

    // Errors and zero-length reads are structured too.
    c.request(CMD_READ, 0, 3, SIZE as u64, 1);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.kind, ch.handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3)
    );
    assert_eq!(
        u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
        EINVAL
    );
    let mlen = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
    assert!(std::str::from_utf8(&ch.payload[6..6 + mlen])
        .unwrap()
        .contains("end"));
    c.request(CMD_READ, 0, 4, 0, 0);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.kind, ch.handle, ch.payload.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 4, 0)
    );
    // Non-read commands may use simple replies.
    c.request(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(c.simple_reply(), (0, 5));
    c.disconnect();
}

#[test]
fn meta_contexts_and_block_status() {
    let mut data = pattern(SIZE, 6);
    data[..2 * HOLE_GRANULE as usize].fill(0);
    data[4 * HOLE_GRANULE as usize..6 * HOLE_GRANULE as usize].fill(0);
    let e = mem_with(data, true, true, BlockSize::default());
    let (_d, sock, _h) = start(vec![("disk", e.clone())]);

    // Meta context options need structured replies.
    let mut c = Client::connect(&sock);
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    // LIST with no query lists base:allocation; unknown namespaces are ignored.
    for queries in [
        &[][..],
        &["base:"][..],
        &["qemu:dirty-bitmap:x", "base:allocation"][..],
    ] {
        c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", queries));
        let r = c.opt_reply();
        assert_eq!(r.kind, REP_META_CONTEXT);
        assert_eq!(&r.data[4..], b"base:allocation");
        assert_eq!(c.opt_reply().kind, REP_ACK);
    }
    c.option(
        OPT_LIST_META_CONTEXT,
        &meta_data("disk", &["x-other:thing"]),
    );
    assert_eq!(c.opt_reply().kind, REP_ACK);
    c.option(OPT_LIST_META_CONTEXT, &meta_data("nope", &[]));
    assert_eq!(c.opt_reply().kind, REP_ERR_UNKNOWN);
    c.option(OPT_SET_META_CONTEXT, &meta_data("disk", &["nonamespace"]));
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    // SET selects base:allocation.
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["qemu:allocation-depth", "base:allocation"]),
    );
    let r = c.opt_reply();
    assert_eq!(r.kind, REP_META_CONTEXT);
    let id = u32::from_be_bytes(r.data[..4].try_into().unwrap());
    assert_eq!(c.opt_reply().kind, REP_ACK);
    let (_, _) = c.go("disk", false, false);

    let g = HOLE_GRANULE as u32;
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 8 * g);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.kind, ch.handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1)
    );
    assert_eq!(u32::from_be_bytes(ch.payload[..4].try_into().unwrap()), id);
    let descs: Vec<(u32, u32)> = ch.payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        descs,
        vec![(2 * g, hz), (2 * g, 0), (2 * g, hz), (2 * g, 0)]
    );
    // REQ_ONE: exactly one descriptor.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, u64::from(g), 4 * g);
    let ch = c.chunk();
    assert_eq!(ch.payload.len(), 12);
    assert_eq!(
        &ch.payload[4..],
        [(g).to_be_bytes(), hz.to_be_bytes()].concat()
    );
    // Past the end, and zero length: EINVAL.
    c.request(CMD_BLOCK_STATUS, 0, 3, SIZE as u64 - 512, 1024);
    assert_eq!(c.chunk().kind, REPLY_TYPE_ERROR);
    c.request(CMD_BLOCK_STATUS, 0, 4, 0, 0);
    assert_eq!(c.chunk().kind, REPLY_TYPE_ERROR);
    c.disconnect();
    assert!(e.block_status_calls() >= 2);
}

#[test]
fn meta_context_for_other_export_does_not_enable_block_status() {
    let (_d, sock, _h) = start(vec![("a", rw_export()), ("b", rw_export())]);
    let mut c = Client::connect(&sock);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    c.option(OPT_SET_META_CONTEXT, &meta_data("a", &["base:allocation"]));
    assert_eq!(c.opt_reply().kind, REP_META_CONTEXT);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    c.go("b", false, false);
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 4096);
    let ch = c.chunk();
    assert_eq!(ch.kind, REPLY_TYPE_ERROR);
    assert_eq!(
        u32::from_be_bytes(ch.payload[..4].try_into().unwrap()),
        EINVAL
    );
    c.disconnect();
}
