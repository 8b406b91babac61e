//! Micro-benchmarks of the pure code on the request path.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use hast_datapath::activemap::ActiveMap;
use hast_datapath::metadata::Metadata;
use hast_datapath::nbd::proto::{validate, Command, ExportLimits, Request};

fn activemap(c: &mut Criterion) {
    let mut g = c.benchmark_group("activemap");
    g.throughput(Throughput::Elements(1));
    // 1 TiB in 2 MiB extents, keepdirty 64: writes to a hot extent take the
    // fast path (no metadata write).
    let mut map = ActiveMap::new(1 << 40, 2 << 20, 64, 512);
    let _ = map.write_start(0, 4096);
    while let Some(b) = map.take_persist() {
        map.persisted(&b);
    }
    map.write_complete(0, 4096);
    g.bench_function("write_start+complete (keepdirty hit)", |b| {
        b.iter(|| {
            let need = map.write_start(black_box(8192), 4096);
            debug_assert!(need.is_none());
            map.write_complete(8192, 4096);
        })
    });
    // Random extents within the keepdirty window.
    let mut i = 0u64;
    g.bench_function("write_start+complete (64 hot extents)", |b| {
        b.iter(|| {
            i = (i + 37) % 64;
            let off = i * (2 << 20);
            if let Some(_seq) = map.write_start(black_box(off), 4096) {
                while let Some(b) = map.take_persist() {
                    map.persisted(&b);
                }
            }
            map.write_complete(off, 4096);
        })
    });
    g.finish();
}

fn nbd(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd");
    g.throughput(Throughput::Elements(1));
    let req = Request {
        command: Command::Write,
        flags: 0,
        handle: 42,
        offset: 1 << 30,
        length: 4096,
    };
    let bytes = req.to_bytes();
    let limits = ExportLimits {
        size: 1 << 40,
        max_payload: 32 << 20,
        read_only: false,
    };
    g.bench_function("parse+validate request", |b| {
        b.iter(|| {
            let r = Request::parse(black_box(&bytes)).unwrap();
            validate(&r, &limits).unwrap()
        })
    });
    g.finish();
}

fn metadata(c: &mut Criterion) {
    let md = Metadata::new("disk1", 1 << 40, 2 << 20, 64, 512).unwrap();
    let block = md.encode();
    c.bench_function("metadata encode+decode", |b| {
        b.iter(|| {
            let blk = black_box(&md).encode();
            Metadata::decode(&blk[..], 1 << 40).unwrap()
        })
    });
    drop(block);
}

criterion_group!(benches, activemap, nbd, metadata);
criterion_main!(benches);
