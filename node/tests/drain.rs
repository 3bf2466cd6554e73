//! Stopping a node the way Kubernetes does (SIGTERM, then SIGKILL after the
//! grace period), with real processes: `/readyz` turns 503 at once while
//! requests are still served, the listener closes after the shutdown
//! delay, idle and half-sent connections do not hold the drain up, a
//! request in flight finishes (or is cut at the drain deadline), and the
//! process exits in time. Then a rolling restart of a disk cluster under
//! load: failures only for the restarting shard's keys, nothing lost.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cavi_node::testkit::process::{NodeProc, free_port, start};
use cavi_node::testkit::workload::{Endpoints, LETTERS, Workload};
use cavi_node::testkit::{Client, seed};
use reqwest::StatusCode;

/// A config file of `(addr, start, end)` shards, ids in order.
fn write_config(dir: &Path, shards: &[(&str, &str, Option<&str>)]) -> PathBuf {
    let mut text = String::from("shards:\n");
    for (id, (addr, start, end)) in shards.iter().enumerate() {
        text.push_str(&format!(
            "  - {{id: {id}, addr: \"{addr}\", range_start: \"{start}\"{}}}\n",
            end.map(|e| format!(", range_end: \"{e}\""))
                .unwrap_or_default()
        ));
    }
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A keep-alive connection that sent one request and got its answer.
fn idle_connection(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_node_is_unready_while_serving_then_closes_idle_clients_and_exits_by_the_deadline()
 {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = write_config(dir.path(), &[(&addr, "", None)]);
    let mut node = start(
        &[
            "0",
            config.to_str().unwrap(),
            "--shutdown-delay",
            "1s",
            // Idle clients are closed at once; one that stopped halfway
            // through its headers is cut at this deadline.
            "--drain-timeout",
            "3s",
        ],
        &[],
    );
    let url = format!("http://{addr}");
    node.ready(&url).await;
    let c = Client::new();
    assert_eq!(
        c.put(&url, "apple", "red").await.status,
        StatusCode::NO_CONTENT
    );
    let mut idle: Vec<TcpStream> = (0..3).map(|_| idle_connection(&addr)).collect();
    let mut half_sent = TcpStream::connect(&addr).unwrap();
    half_sent
        .write_all(b"GET /kv/apple HTTP/1.1\r\nHo")
        .unwrap();

    let t0 = Instant::now();
    node.signal("TERM");
    // Unready as soon as the signal is handled, and still serving reads
    // and writes.
    let mut unready_and_serving = 0;
    let mut flipped = false;
    let closed_at = loop {
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let readyz = match fresh.get(format!("{url}/readyz")).send().await {
            Ok(r) => r,
            Err(_) => break t0.elapsed(),
        };
        // The signal arrives asynchronously: a probe sent right after it
        // may still be answered as ready, but not for long, and never
        // again once the node has said it is not.
        if !flipped && readyz.status() == StatusCode::OK {
            assert!(
                t0.elapsed() < Duration::from_millis(500),
                "still ready 500 ms after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        flipped = true;
        assert_eq!(
            readyz.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "ready again after having said it is not"
        );
        let reason: serde_json::Value =
            serde_json::from_slice(&readyz.bytes().await.unwrap()).unwrap();
        assert!(
            reason["error"].as_str().unwrap().contains("shutting down"),
            "{reason}"
        );
        let got = fresh.get(format!("{url}/kv/apple")).send().await;
        if let Ok(got) = got {
            assert_eq!(got.status(), StatusCode::OK);
            assert_eq!(got.text().await.unwrap(), "\"red\"");
            unready_and_serving += 1;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the listener never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        unready_and_serving >= 5,
        "served while unready {unready_and_serving} times"
    );
    assert!(
        closed_at >= Duration::from_millis(900),
        "closed after {closed_at:?}, before the shutdown delay"
    );
    // Idle keep-alive connections are closed with the listener.
    for s in &mut idle {
        assert!(
            closed_by_server(s, Duration::from_millis(500)),
            "an idle connection stayed open"
        );
    }
    let idle_closed = t0.elapsed();
    let (ok, stderr) = tokio::task::spawn_blocking(move || node.finish())
        .await
        .unwrap();
    let exited = t0.elapsed();
    assert!(ok, "{stderr}");
    assert!(closed_by_server(&mut half_sent, Duration::from_millis(100)));
    assert!(stderr.contains("drain deadline passed"), "{stderr}");
    assert!(
        exited < Duration::from_millis(1000 + 3000 + 1500),
        "exited after {exited:?}: shutdown delay 1s + drain deadline 3s"
    );
    println!(
        "listener closed after {closed_at:?}, idle connections closed by {idle_closed:?}, exit after {exited:?}, {unready_and_serving} reads served while unready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_in_flight_at_the_drain_deadline_is_cut_and_the_node_exits() {
    let dir = tempfile::tempdir().unwrap();
    // Shard 1 accepts connections and never answers.
    let hung = StdListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    let (accepted_tx, accepted_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept() {
            held.push(socket);
            let _ = accepted_tx.send(());
        }
    });
    let addr = format!("127.0.0.1:{}", free_port());
    let config = write_config(
        dir.path(),
        &[(&addr, "a", Some("m")), (&hung_addr, "n", Some("z"))],
    );
    let mut node = start(
        &[
            "0",
            config.to_str().unwrap(),
            "--shutdown-delay",
            "300ms",
            "--drain-timeout",
            "1s",
            "--peer-timeout",
            "60s",
            "--request-timeout",
            "60s",
        ],
        &[],
    );
    let url = format!("http://{addr}");
    node.ready(&url).await;
    let c = Client::new();
    let in_flight = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { c.try_get(&url, "zebra").await }
    });
    tokio::task::spawn_blocking(move || accepted_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the node forwards to the hung peer");
    let t0 = Instant::now();
    node.signal("TERM");
    let answer = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight request ends with the drain")
        .unwrap();
    assert!(
        answer.is_err(),
        "cut, not answered as if complete: {answer:?}"
    );
    let (ok, stderr) = tokio::task::spawn_blocking(move || node.finish())
        .await
        .unwrap();
    let exited = t0.elapsed();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("drain deadline passed"), "{stderr}");
    assert!(
        exited < Duration::from_millis(300 + 1000 + 1500),
        "exited {exited:?} after SIGTERM: shutdown delay 300ms + drain 1s"
    );
    println!("exit {exited:?} after SIGTERM with a request hung in flight");
}

/// The letters of the key space shard `i` of [`rolling_layout`] owns.
fn letters_of(i: usize) -> &'static str {
    ["abcdefgh", "ijklmnopq", "rstuvwxyz"][i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_only_the_restarting_shards_keys_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|id| {
            let data = dir.path().join(format!("n{id}"));
            std::fs::create_dir_all(&data).unwrap();
            let mut n = NodeProc::new(id, &config, &data, true);
            n.arg("--shutdown-delay")
                .arg("1s")
                .arg("--drain-timeout")
                .arg("5s");
            n
        })
        .collect();
    write_config(
        dir.path(),
        &[
            (&nodes[0].addr, "a", Some("h")),
            (&nodes[1].addr, "i", Some("q")),
            (&nodes[2].addr, "r", None),
        ],
    );
    for n in &mut nodes {
        n.start().await;
    }
    let urls: Vec<String> = nodes.iter().map(NodeProc::url).collect();
    let endpoints = Endpoints::new(urls.clone());
    let load = Workload::start_on(
        endpoints.clone(),
        12,
        seed("CAVI_ROLLING_SEED"),
        Duration::from_millis(100),
    );
    load.wait_for(1500).await;

    let client = Client::new();
    for (i, node) in nodes.iter_mut().enumerate() {
        let before = load.failed_keys();
        node.signal("TERM");
        // What the endpoints controller does: the pod leaves the endpoints
        // once its readiness probe fails; it still serves meanwhile.
        loop {
            let ready = client
                .http
                .get(format!("{}/readyz", urls[i]))
                .send()
                .await
                .unwrap();
            if ready.status() == StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        endpoints.remove(&urls[i]);
        node.wait_exit().await;
        node.start().await;
        endpoints.add(&urls[i]);
        load.wait_for(1500).await;
        let after = load.failed_keys();
        for (letter, n) in &after {
            let new = n - before.get(letter).copied().unwrap_or(0);
            assert!(
                new == 0 || letters_of(i).contains(*letter),
                "{new} requests for {letter:?} keys failed while shard {i} ({}) restarted",
                letters_of(i)
            );
        }
        println!(
            "restart of shard {i}: {} failed requests, all for its keys",
            after.values().sum::<u64>() - before.values().sum::<u64>()
        );
    }
    let ledger = load.stop().await;
    let wrong = ledger.check_all(&client, &urls).await;
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(ledger.violations.is_empty(), "{:#?}", ledger.violations);
    let (failures, total) = (ledger.failures(), ledger.total());
    println!(
        "rolling restart of 3 disk shards under load: {total} requests, {failures} failed ({:.3}%): {:?}",
        failures as f64 * 100.0 / total as f64,
        ledger.failed
    );
    // A peer going away is a 503 with Retry-After, never a 502.
    assert!(
        ledger.failed.keys().all(|why| why.starts_with("503")),
        "{:?}",
        ledger.failed
    );
    assert!(
        failures * 100 < total,
        "{failures} of {total} failed: {:?}",
        ledger.samples
    );
    assert_eq!(
        LETTERS.len(),
        letters_of(0).len() + letters_of(1).len() + letters_of(2).len()
    );
}
