//! Regression test for glommio 0.9 bug #670: when the first readable
//! DmaFile a process opens on a device is empty or sparse at offset 0,
//! glommio's polled-I/O probe succeeds wrongly, caches "pollable" for the
//! whole device, and every later read fails with EOPNOTSUPP.
//!
//! `provider::open_direct` must avoid it. This file holds a single test on
//! purpose: the probe result is cached per process, so the open below must
//! be the first DmaFile open of the process.

use std::fs::File;

use glommio::LocalExecutorBuilder;
use hast_datapath::provider;

#[test]
fn first_open_of_a_sparse_file_still_reads_and_writes() {
    let dir =
        tempfile::tempdir_in(std::env::var("HAST_TEST_DIR").unwrap_or_else(|_| "/tmp".into()))
            .expect("tempdir");
    let path = dir.path().join("sparse.img");
    File::create(&path)
        .and_then(|f| f.set_len(8 << 20))
        .expect("sparse file");
    assert!(!provider::data_at_zero(&path), "offset 0 is a hole");
    LocalExecutorBuilder::default()
        .spawn(move || async move {
            let file = provider::open_direct(&path).await.expect("open_direct");
            assert!(provider::has_o_direct(std::os::fd::AsRawFd::as_raw_fd(&file)).unwrap());
            let r = file
                .read_at_aligned(0, 4096)
                .await
                .expect("read of a hole at 0");
            assert_eq!(r.len(), 4096);
            assert!(r.iter().all(|&b| b == 0));
            let mut buf = file.alloc_dma_buffer(4096);
            buf.as_bytes_mut().fill(0x5a);
            file.write_at(buf, 1 << 20).await.expect("write");
            let r = file
                .read_at_aligned(1 << 20, 4096)
                .await
                .expect("read back");
            assert!(r.iter().all(|&b| b == 0x5a));
            // A second file on the same device also reads fine.
            let other = path.with_file_name("other.img");
            std::fs::write(&other, vec![7u8; 8192]).unwrap();
            let f2 = provider::open_direct(&other).await.expect("second open");
            let r = f2
                .read_at_aligned(4096, 4096)
                .await
                .expect("read second file");
            assert!(r.iter().all(|&b| b == 7));
        })
        .expect("executor")
        .join()
        .expect("join");
}
