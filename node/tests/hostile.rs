//! The node under hostile load and faults, with real processes: searches
//! over huge values, floods of idle and half-sent connections, a tiny
//! open-file limit, a full disk (a real size-limited tmpfs), a write
//! flood against a slow disk, and exact counts across a SIGKILL. Each test
//! prints the numbers it measured; `bench/hostile.sh` runs them on a
//! release build and sets the numbers beside their targets. The timing
//! assertions here are bounds no healthy node comes near.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cavi_node::testkit::process::{NodeProc, Proc, free_port, node_binary, start};
use cavi_node::testkit::{Client, metric_value};
use reqwest::StatusCode;

/// A one-shard config on a fresh port; its address.
fn one_shard(dir: &Path) -> (PathBuf, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    (one_shard_at(dir, &addr), addr)
}

/// A one-shard config for a node at `addr`.
fn one_shard_at(dir: &Path, addr: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!("shards:\n  - {{id: 0, addr: \"{addr}\", range_start: \"\"}}\n"),
    )
    .unwrap();
    path
}

/// A disk node (data in `data`, log in `dir`) serving a one-shard config.
fn disk_node(dir: &Path, data: &Path) -> NodeProc {
    let config = dir.join("config.yaml");
    let mut node = NodeProc::new(0, &config, dir, false);
    one_shard_at(dir, &node.addr);
    node.arg("--data-dir").arg(data.to_str().unwrap());
    node
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Samples the peak RSS of `pid` until `stop` is set.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_searches_over_huge_values_stay_bounded_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (config, addr) = one_shard(dir.path());
    let mut node = start(&["0", config.to_str().unwrap()], &[]);
    let url = format!("http://{addr}");
    node.ready(&url).await;
    let pid = node.0.id();
    let c = Client::new();
    for i in 0..100 {
        let value = format!("{i:02}").repeat(MIB / 2);
        let put = c.put(&url, &format!("big{i:03}"), &value).await;
        assert_eq!(put.status, StatusCode::NO_CONTENT, "{put:?}");
    }
    let full = c
        .http
        .get(format!("{url}/search?prefix="))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status(), StatusCode::OK);
    let expected = full.bytes().await.unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&expected).unwrap();
    assert_eq!(entries.len(), 100);
    drop(entries);
    let before = rss(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = watch_rss(pid, stop.clone());
    // The probe is a plain thread with its own socket, so the test's own
    // busy runtime cannot delay it.
    let probing = Arc::new(AtomicBool::new(true));
    let probe = std::thread::spawn({
        let (addr, probing) = (addr.clone(), probing.clone());
        move || {
            let mut took = Vec::new();
            while probing.load(Ordering::Relaxed) {
                let t = Instant::now();
                let mut s = TcpStream::connect(&addr).unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut answer = Vec::new();
                std::io::Read::read_to_end(&mut s, &mut answer).unwrap();
                assert!(answer.starts_with(b"HTTP/1.1 200"));
                took.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(10));
            }
            took
        }
    });
    let started = Instant::now();
    let searches: Vec<_> = (0..8)
        .map(|_| {
            let (url, expected) = (url.clone(), expected.len());
            tokio::spawn(async move {
                let mut r = reqwest::get(format!("{url}/search?prefix=")).await.unwrap();
                let status = r.status();
                let (mut len, mut last) = (0usize, 0u8);
                while let Some(chunk) = r.chunk().await.expect("a complete transfer") {
                    len += chunk.len();
                    last = chunk.last().copied().unwrap_or(last);
                }
                assert_eq!(status, StatusCode::OK);
                assert_eq!(
                    (len, last),
                    (expected, b']'),
                    "the whole answer, every time"
                );
            })
        })
        .collect();
    for s in searches {
        s.await.unwrap();
    }
    let elapsed = started.elapsed();
    probing.store(false, Ordering::Relaxed);
    let mut took = probe.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let peak = peak.join().unwrap();
    took.sort();
    let growth = peak.saturating_sub(before);
    println!(
        "8 concurrent searches of 100 x 1 MiB in {elapsed:?}: RSS {} MiB before, peak +{} MiB; /healthz p50 {:?} p99 {:?} max {:?} over {} probes",
        before / MIB as u64,
        growth / MIB as u64,
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took.last().unwrap(),
        took.len()
    );
    assert!(
        growth < 200 * MIB as u64,
        "RSS grew {} MiB",
        growth / MIB as u64
    );
    assert!(
        percentile(&took, 0.99) < Duration::from_millis(500),
        "/healthz starved"
    );
}

/// A connection that sent one request, read the answer, and stays open.
fn keep_alive_idle(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let _ = std::io::Read::read(&mut s, &mut buf).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_connections_do_not_keep_a_fresh_client_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let (config, addr) = one_shard(dir.path());
    let mut node = start(&["0", config.to_str().unwrap()], &[]);
    let url = format!("http://{addr}");
    node.ready(&url).await;
    let c = Client::new();
    assert_eq!(c.put(&url, "k", "v").await.status, StatusCode::NO_CONTENT);

    let mut held: Vec<TcpStream> = Vec::new();
    for i in 0..500 {
        held.push(if i % 2 == 0 {
            keep_alive_idle(&addr)
        } else {
            TcpStream::connect(&addr).unwrap()
        });
    }
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /kv/k HTTP/1.1\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    // The slow ones keep trickling a byte of header now and then.
    let trickle = std::thread::spawn(move || {
        for _ in 0..3 {
            for s in &mut slow {
                let _ = s.write_all(b"a");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        slow
    });
    let mut took = Vec::new();
    for _ in 0..20 {
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let t = Instant::now();
        let r = fresh.get(format!("{url}/kv/k")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.text().await.unwrap(), "\"v\"");
        took.push(t.elapsed());
    }
    let _slow = trickle.join().unwrap();
    took.sort();
    println!(
        "with 500 idle and 200 slow-header connections open: fresh GET p50 {:?} max {:?}",
        percentile(&took, 0.5),
        took.last().unwrap()
    );
    assert!(*took.last().unwrap() < Duration::from_secs(2));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_64_file_descriptors_stays_reachable_under_80_idle_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let (config, addr) = one_shard(dir.path());
    let mut node = Proc(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 64 && exec {} 0 {}",
                node_binary().display(),
                config.display()
            ))
            .env_remove("HOSTNAME")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{addr}");
    node.ready(&url).await;
    let held: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for _ in 0..10 {
        let r = fresh.get(format!("{url}/healthz")).send().await;
        let r = r.expect("reachable with 80 idle sockets and 64 descriptors");
        assert_eq!(r.status(), StatusCode::OK);
    }
    drop(held);
    assert!(node.0.try_wait().unwrap().is_none(), "still running");
}

/// A size-limited tmpfs, unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    /// `None` when mounting is not allowed here (not root).
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_507_then_unready_and_the_node_recovers_when_space_returns() {
    let Some(disk) = SmallDisk::mount("24m") else {
        println!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Ballast to free later, so space comes back.
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![7u8; 8 * MIB]).unwrap();
    let mut node = disk_node(dir.path(), &disk.path().join("data"));
    node.start().await;
    let url = node.url();
    let c = Client::new();
    let mut acked = Vec::new();
    let mut full = None;
    for i in 0..2000 {
        let key = format!("k{i:05}");
        let value = format!("{i:05}").repeat(64 * 1024 / 5);
        let put = c.put(&url, &key, &value).await;
        match put.status {
            StatusCode::NO_CONTENT => acked.push((key, value)),
            _ => {
                full = Some(put);
                break;
            }
        }
    }
    let full = full.expect("the disk fills up");
    assert_eq!(full.status, StatusCode::INSUFFICIENT_STORAGE, "{full:?}");
    assert_eq!(full.code(), "storage_unavailable");
    assert!(!full.error().is_empty());
    let ready = c.send(c.http.get(format!("{url}/readyz"))).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{ready:?}");
    println!(
        "disk full after {} acknowledged 64 KiB writes: {} / readyz {:?}",
        acked.len(),
        full.error(),
        ready.body
    );
    // Acknowledged data is still there: reads may see a 503 for the
    // moment the engine reopens, then the value.
    let (k, v) = &acked[acked.len() / 2];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = c.get(&url, k).await;
        if got.status == StatusCode::OK {
            assert_eq!(got.body, v.as_str());
            break;
        }
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
        assert!(got.headers.get("retry-after").is_some(), "{got:?}");
        assert!(Instant::now() < deadline, "reads never came back: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.send(c.http.get(format!("{url}/readyz"))).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "never ready again: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        c.put(&url, "after", "space").await.status,
        StatusCode::NO_CONTENT
    );
    // Everything acknowledged survives, also across a SIGKILL.
    node.kill();
    node.start().await;
    for (k, v) in &acked {
        assert_eq!(c.get(&url, k).await.body, v.as_str(), "{k}");
    }
    assert_eq!(c.get(&url, "after").await.body, "space");
    node.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_flood_against_a_slow_disk_is_turned_away_with_retry_after_and_memory_stays_flat() {
    if !cfg!(debug_assertions) {
        println!("SKIPPED: the slow-disk injection exists in debug builds only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut node = disk_node(dir.path(), &dir.path().join("data"));
    node.arg("--max-queued-writes")
        .arg("8")
        .arg("--max-queued-bytes")
        .arg("262144")
        .arg("--request-timeout")
        .arg("1s")
        .env("CAVI_DEBUG_COMMIT_DELAY_MS", "200");
    node.start().await;
    let url = node.url();
    let pid = node.pid().unwrap();
    let before = rss(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let peak = watch_rss(pid, stop.clone());
    let (ok, overloaded, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let until = Instant::now() + Duration::from_secs(5);
    let writers: Vec<_> = (0..64)
        .map(|w| {
            let (url, ok, overloaded, other, acked) = (
                url.clone(),
                ok.clone(),
                overloaded.clone(),
                other.clone(),
                acked.clone(),
            );
            tokio::spawn(async move {
                let c = Client::new();
                let mut n = 0;
                while Instant::now() < until {
                    let key = format!("w{w:02}-{n}");
                    let value = format!("{w:02}").repeat(8 * 1024);
                    n += 1;
                    let put = c.put(&url, &key, &value).await;
                    match put.status {
                        StatusCode::NO_CONTENT => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            acked.lock().unwrap().push(key);
                        }
                        StatusCode::SERVICE_UNAVAILABLE if put.code() == "overloaded" => {
                            assert!(put.headers.get("retry-after").is_some(), "{put:?}");
                            overloaded.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            other.fetch_add(1, Ordering::Relaxed);
                            eprintln!("unexpected: {put:?}");
                        }
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let peak = peak.join().unwrap();
    let growth = peak.saturating_sub(before);
    let (ok, overloaded, other) = (
        ok.load(Ordering::Relaxed),
        overloaded.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    println!(
        "64 writers of 16 KiB for 5 s against 200 ms commits, queue of 8 writes: {ok} acknowledged, {overloaded} turned away (503 overloaded, Retry-After), {other} other; RSS {} MiB, peak +{} MiB",
        before / MIB as u64,
        growth / MIB as u64
    );
    assert!(overloaded > 0, "the queue never filled");
    assert_eq!(other, 0);
    assert!(
        growth < 100 * MIB as u64,
        "RSS grew {} MiB",
        growth / MIB as u64
    );
    let c = Client::new();
    let acked = acked.lock().unwrap().clone();
    for key in acked.iter().step_by(7) {
        assert_eq!(c.get(&url, key).await.status, StatusCode::OK, "{key}");
    }
}

/// The node's own key and byte counts.
async fn counts(c: &Client, url: &str) -> (u64, u64) {
    let view = c.send(c.http.get(format!("{url}/cluster"))).await.body;
    (
        view["keys"].as_u64().unwrap(),
        view["bytes"].as_u64().unwrap(),
    )
}

async fn metric(c: &Client, url: &str, name: &str) -> u64 {
    let text = c.metrics(url).await;
    metric_value(&text, name)
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_counts_are_exact_after_deletes_overwrites_and_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = disk_node(dir.path(), &dir.path().join("data"));
    node.start().await;
    let url = node.url();
    let c = Client::new();
    for i in 0..150 {
        assert_eq!(
            c.put(&url, &format!("k{i:03}"), "v").await.status,
            StatusCode::NO_CONTENT
        );
    }
    for i in 0..150 {
        assert_eq!(
            c.delete(&url, &format!("k{i:03}")).await.status,
            StatusCode::NO_CONTENT
        );
    }
    assert_eq!(counts(&c, &url).await, (0, 0), "150 puts then 150 deletes");
    assert_eq!(metric(&c, &url, "cavi_stored_keys").await, 0);
    for i in 0..100 {
        c.put(&url, &format!("k{i:03}"), "first").await;
    }
    for i in 0..50 {
        c.put(&url, &format!("k{i:03}"), "second!").await;
    }
    // 100 keys of 4 bytes; 50 values of 5 bytes and 50 of 7.
    let expected = (100, 100 * 4 + 50 * 5 + 50 * 7);
    assert_eq!(counts(&c, &url).await, expected);
    // Every write went through a group commit, and the metrics say so.
    assert_eq!(
        metric(&c, &url, "cavi_storage_committed_writes_total").await,
        450
    );
    let commits = metric(&c, &url, "cavi_storage_commits_total").await;
    assert!((1..=450).contains(&commits), "{commits} commits");
    node.kill();
    node.start().await;
    assert_eq!(counts(&c, &url).await, expected, "after a SIGKILL");
    assert_eq!(metric(&c, &url, "cavi_stored_keys").await, 100);
    assert_eq!(metric(&c, &url, "cavi_stored_bytes").await, expected.1);
}
