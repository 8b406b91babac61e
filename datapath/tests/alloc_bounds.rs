//! No input from an unauthenticated peer makes the decoders allocate more
//! than their bounds: a counting global allocator records the largest
//! single allocation while hostile bytes go through the pre-session's
//! reader (introductions claiming up to 4 GiB, random headers) and the
//! authenticated record stream (record lengths up to 4 GiB, garbage).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use hast_datapath::peer::auth::StreamKeys;
use hast_datapath::peer::presession::{read_introduction, Chan, Deadline, MAX_INTRO_LEN};
use hast_datapath::peer::proto::{Header, Kind};
use hast_datapath::peer::seal::{Sealed, MAX_RECORD, OVERHEAD};
use rand::{Rng, SeedableRng};

struct Counting;

thread_local! {
    /// Allocations of this thread are counted.
    static WATCHED: Cell<bool> = const { Cell::new(false) };
    /// The largest allocation of this thread while watched (per thread,
    /// so tests running in parallel do not see each other's).
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    if WATCHED.with(Cell::get) {
        LARGEST.with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping only touches two const-initialised thread-local cells
// (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's layout contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        note(new);
        // SAFETY: as for `alloc`, forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest allocation `f` makes on this thread.
fn largest_in<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHED.with(|w| w.set(true));
    let out = f();
    WATCHED.with(|w| w.set(false));
    (out, LARGEST.with(Cell::get))
}

/// What the listener's handshake thread does with `bytes` from a peer.
fn introduction_of(bytes: Vec<u8>) -> (Result<(), String>, usize) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (sock, _) = l.accept().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = c.write_all(&bytes);
        let _ = c.shutdown(std::net::Shutdown::Write);
        c
    });
    let out = largest_in(|| {
        let mut chan = Chan::new(Deadline::new(
            &sock,
            Instant::now() + Duration::from_secs(5),
        ));
        read_introduction(&mut chan).map(|_| ())
    });
    drop(feeder.join().unwrap());
    out
}

#[test]
fn introductions_never_allocate_beyond_their_bound() {
    let bound = MAX_INTRO_LEN + 64 * 1024;
    // Hellos claiming payloads from just over the bound to 16 MiB (the
    // largest a Hello header may claim), with nothing behind them.
    for claim in [MAX_INTRO_LEN as u32 + 1, 1 << 20, (16 << 20) - 1, 16 << 20] {
        let mut h = Header::request(Kind::Hello, 0, 0, 0, 0);
        h.payload_len = claim;
        let (r, largest) = introduction_of(h.encode().to_vec());
        assert!(r.is_err(), "claim {claim}");
        assert!(largest <= bound, "claim {claim}: allocated {largest} bytes");
    }
    // Random headers (valid CRC or not) and random tails.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5ec);
    for _ in 0..200 {
        let n = rng.gen_range(0..400);
        let mut bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        if rng.gen_bool(0.5) {
            let kind =
                [Kind::Hello, Kind::Write, Kind::Proof, Kind::ReadReply][rng.gen_range(0..4)];
            let mut h = Header::request(kind, 0, rng.gen(), 0, 0);
            h.payload_len = rng.gen_range(0..(32 << 20));
            let mut v = h.encode().to_vec();
            v.append(&mut bytes);
            bytes = v;
        }
        let (_, largest) = introduction_of(bytes);
        assert!(largest <= bound, "allocated {largest} bytes");
    }
}

#[test]
fn the_record_stream_never_allocates_beyond_a_record() {
    let keys = StreamKeys {
        send: [1; 32],
        recv: [2; 32],
    };
    let bound = 2 * (MAX_RECORD + OVERHEAD) + 64 * 1024;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5ea1);
    let mut inputs: Vec<Vec<u8>> = [u32::MAX, (MAX_RECORD + 1) as u32, MAX_RECORD as u32, 1]
        .iter()
        .map(|len| {
            let mut v = len.to_le_bytes().to_vec();
            v.extend((0..4096).map(|_| rng.gen::<u8>()));
            v
        })
        .collect();
    for _ in 0..100 {
        let n = rng.gen_range(0..5000);
        inputs.push((0..n).map(|_| rng.gen()).collect());
    }
    for input in inputs {
        let (r, largest) = largest_in(|| {
            let mut s = Sealed::new(futures_lite::io::Cursor::new(input), &keys);
            let mut out = vec![0u8; 64 * 1024];
            futures_lite::future::block_on(s.read(&mut out))
        });
        assert!(!matches!(r, Ok(n) if n > 0), "garbage was accepted");
        assert!(largest <= bound, "allocated {largest} bytes");
    }
}

#[test]
fn the_counter_sees_allocations() {
    let (v, n) = largest_in(|| vec![7u8; 123_456]);
    assert_eq!(v.len(), 123_456);
    assert!(n >= 123_456, "{n}");
}
