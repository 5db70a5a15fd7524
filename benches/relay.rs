//! Micro-benchmarks of the relay hot path: message framing and the proxy's own error messages.
//!
//! Run with `cargo bench --bench relay`; `cargo bench --bench relay -- --test` runs every
//! benchmark once as a smoke test.
//!
//! The closures passed to `Framer::scan` mirror what the relay does in each direction:
//! backend -> client reads the body of ReadyForQuery only (for the transaction status) and
//! counts transactions; client -> backend inspects tags only and stops before Terminate.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pglifeguard::protocol::{put_error, Framer, Severity, Step};

/// One wire message: tag, big-endian length (including itself), body.
fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// RowDescription with one int4 column, as for `SELECT abalance FROM pgbench_accounts ...`.
fn row_description(name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1i16.to_be_bytes()); // field count
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(&16_397i32.to_be_bytes()); // table OID
    b.extend_from_slice(&3i16.to_be_bytes()); // column number
    b.extend_from_slice(&23i32.to_be_bytes()); // int4
    b.extend_from_slice(&4i16.to_be_bytes()); // type size
    b.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
    b.extend_from_slice(&0i16.to_be_bytes()); // text format
    b
}

/// DataRow with a single column holding `value`.
fn data_row(value: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(value.len() as i32).to_be_bytes());
    b.extend_from_slice(value);
    b
}

/// The backend's reply to one pgbench select-only transaction (simple protocol).
fn select_only_response() -> Vec<u8> {
    let mut v = Vec::new();
    msg(&mut v, b'T', &row_description("abalance"));
    msg(&mut v, b'D', &data_row(b"-2817"));
    msg(&mut v, b'C', b"SELECT 1\0");
    msg(&mut v, b'Z', b"I");
    v
}

/// A result set of `rows` DataRows whose whole message is `row_len` bytes each.
fn many_rows_response(rows: usize, row_len: usize) -> Vec<u8> {
    let value = vec![b'x'; row_len - 5 - 2 - 4];
    let row = data_row(&value);
    assert_eq!(row.len() + 5, row_len);
    let mut v = Vec::with_capacity(rows * row_len + 64);
    msg(&mut v, b'T', &row_description("payload"));
    for _ in 0..rows {
        msg(&mut v, b'D', &row);
    }
    msg(&mut v, b'C', format!("SELECT {rows}\0").as_bytes());
    msg(&mut v, b'Z', b"I");
    v
}

/// Backend -> client direction, as in the relay: only ReadyForQuery's body is read.
/// Returns (bytes forwardable, transactions completed).
#[inline]
fn scan_backend(framer: &mut Framer, buf: &[u8]) -> (usize, u64) {
    let mut transactions = 0u64;
    let mut status = b'I';
    let scan = framer
        .scan(
            buf,
            u32::MAX,
            |t| t == b'Z',
            |tag, body| {
                if tag == b'Z' {
                    status = body.first().copied().unwrap_or(b'I');
                    transactions += (status == b'I') as u64;
                }
                Step::Forward
            },
        )
        .expect("valid stream");
    (scan.forward, transactions)
}

/// Client -> backend direction, as in the relay: tags only, stop before Terminate.
#[inline]
fn scan_frontend(framer: &mut Framer, buf: &[u8], max_len: u32) -> usize {
    let mut requests = 0u32;
    let scan = framer
        .scan(
            buf,
            max_len,
            |_| false,
            |tag, _| match tag {
                b'X' => Step::StopBefore,
                b'Q' | b'S' | b'F' => {
                    requests += 1;
                    Step::Forward
                }
                _ => Step::Forward,
            },
        )
        .expect("valid stream");
    black_box(requests);
    scan.forward
}

fn bench_framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("framer");

    let small = select_only_response();
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("select_only_response", |b| {
        b.iter(|| {
            let mut f = Framer::new();
            let (fwd, tx) = scan_backend(&mut f, black_box(&small));
            debug_assert_eq!((fwd, tx), (small.len(), 1));
            black_box((fwd, tx))
        })
    });

    let rows = many_rows_response(1000, 100);
    g.throughput(Throughput::Bytes(rows.len() as u64));
    g.bench_function("1000_rows_x_100B", |b| {
        b.iter(|| {
            let mut f = Framer::new();
            let (fwd, tx) = scan_backend(&mut f, black_box(&rows));
            debug_assert_eq!((fwd, tx), (rows.len(), 1));
            black_box((fwd, tx))
        })
    });

    // The same result set arriving in 16 KiB reads (the relay's read size), headers split
    // across read boundaries: the unforwarded tail of each read is carried into the next.
    g.bench_function("1000_rows_x_100B_in_16KiB_reads", |b| {
        let mut carry: Vec<u8> = Vec::with_capacity(32 * 1024);
        b.iter(|| {
            let mut f = Framer::new();
            let mut total = 0usize;
            carry.clear();
            for chunk in black_box(&rows).chunks(16 * 1024) {
                carry.extend_from_slice(chunk);
                let (fwd, _) = scan_backend(&mut f, &carry);
                total += fwd;
                carry.drain(..fwd);
            }
            debug_assert_eq!(total, rows.len());
            black_box(total)
        })
    });

    // One 1 MiB CopyData message from the client (COPY FROM STDIN), seen in 64 KiB reads:
    // the header is parsed once, the rest of the body is skipped without being examined.
    const COPY_LEN: usize = 1 << 20;
    const READ: usize = 64 * 1024;
    let mut copy = Vec::with_capacity(COPY_LEN + 16);
    msg(&mut copy, b'd', &vec![b'a'; COPY_LEN]);
    msg(&mut copy, b'c', b"");
    g.throughput(Throughput::Bytes(copy.len() as u64));
    g.bench_function("copydata_1MiB_in_64KiB_reads", |b| {
        b.iter(|| {
            let mut f = Framer::new();
            let mut total = 0usize;
            for chunk in black_box(&copy).chunks(READ) {
                total += scan_frontend(&mut f, chunk, 1 << 30);
            }
            debug_assert_eq!(total, copy.len());
            black_box(total)
        })
    });

    g.finish();
}

fn bench_put_error(c: &mut Criterion) {
    let mut g = c.benchmark_group("put_error");
    g.bench_function("error_53300", |b| {
        b.iter_batched_ref(
            || BytesMut::with_capacity(256),
            |buf| {
                put_error(
                    buf,
                    Severity::Error,
                    black_box("53300"),
                    black_box("no backend connection available within checkout_timeout"),
                );
                black_box(buf.len())
            },
            BatchSize::SmallInput,
        )
    });
    // Reusing one buffer, as a connection's write buffer is reused.
    g.bench_function("error_53300_reused_buffer", |b| {
        let mut buf = BytesMut::with_capacity(256);
        b.iter(|| {
            buf.clear();
            put_error(
                &mut buf,
                Severity::Error,
                black_box("53300"),
                black_box("no backend connection available within checkout_timeout"),
            );
            black_box(buf.len())
        })
    });
    g.finish();
}

/// Sanity checks run once before timing, so a broken fixture fails loudly in `--test` mode too.
fn check_fixtures() {
    let small = select_only_response();
    assert_eq!(scan_backend(&mut Framer::new(), &small), (small.len(), 1));

    let rows = many_rows_response(1000, 100);
    assert_eq!(scan_backend(&mut Framer::new(), &rows), (rows.len(), 1));

    let mut copy = Vec::new();
    msg(&mut copy, b'd', &vec![0u8; 1 << 20]);
    let mut f = Framer::new();
    let total: usize = copy
        .chunks(64 * 1024)
        .map(|c| scan_frontend(&mut f, c, 1 << 30))
        .sum();
    assert_eq!(total, copy.len());
    assert!(f.at_boundary());

    let mut buf = BytesMut::new();
    put_error(&mut buf, Severity::Error, "53300", "x");
    assert_eq!(buf[0], b'E');
    assert_eq!(
        u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize,
        buf.len() - 1
    );
}

fn benches(c: &mut Criterion) {
    check_fixtures();
    bench_framing(c);
    bench_put_error(c);
}

criterion_group!(relay, benches);
criterion_main!(relay);
