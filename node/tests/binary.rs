//! The `kvstore-api` binary as users and Kubernetes start it: the seed's
//! commands, `all`, `from-hostname`, DNS-name addresses, config errors and
//! graceful shutdown on SIGTERM.
#![allow(clippy::unwrap_used)]

use cavi_node::testkit as common;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Client;
use reqwest::StatusCode;

use common::process::{free_port, start};

fn write_config(dir: &Path, addrs: [&str; 2]) -> PathBuf {
    let path = dir.join("config.yaml");
    let text = format!(
        "shards:\n  - id: 0\n    addr: {}\n    range_start: \"a\"\n    range_end: \"m\"\n  - id: 1\n    addr: {}\n    range_start: \"n\"\n    range_end: \"z\"\n",
        addrs[0], addrs[1]
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn the_seed_commands_start_a_two_node_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (p0, p1) = (free_port(), free_port());
    let (a0, a1) = (format!("127.0.0.1:{p0}"), format!("127.0.0.1:{p1}"));
    let cfg = write_config(dir.path(), [&a0, &a1]);
    let cfg = cfg.to_str().unwrap();
    let mut n0 = start(&["0", cfg], &[]);
    let mut n1 = start(&["1", cfg], &[]);
    let (u0, u1) = (format!("http://{a0}"), format!("http://{a1}"));
    n0.ready(&u0).await;
    n1.ready(&u1).await;
    let c = Client::new();
    assert_eq!(
        c.put(&u1, "foo", "bar").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(c.get(&u0, "foo").await.body, "bar");
    assert_eq!(c.put(&u0, "zoo", "z").await.status, StatusCode::NO_CONTENT);
    assert_eq!(c.search(&u0, "prefix=").await.keys(), ["foo", "zoo"]);
}

#[tokio::test]
async fn all_serves_every_shard_from_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (a0, a1) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let cfg = write_config(dir.path(), [&a0, &a1]);
    let mut all = start(&["all", cfg.to_str().unwrap()], &[]);
    let (u0, u1) = (format!("http://{a0}"), format!("http://{a1}"));
    all.ready(&u0).await;
    all.ready(&u1).await;
    let c = Client::new();
    assert_eq!(c.put(&u0, "nut", "n").await.status, StatusCode::NO_CONTENT);
    assert_eq!(c.get(&u1, "nut").await.body, "n");
    // Huge pages are off for the process (see `cli::avoid_huge_pages`).
    let status = std::fs::read_to_string(format!("/proc/{}/status", all.id())).unwrap();
    if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
    all.signal("TERM");
    let (ok, stderr) = all.finish();
    assert!(ok, "exit after SIGTERM should be clean: {stderr}");
}

#[tokio::test]
async fn pods_take_their_shard_from_the_hostname_and_bind_all_interfaces() {
    let dir = tempfile::tempdir().unwrap();
    let (p0, p1) = (free_port(), free_port());
    // DNS names, as the operator writes them; `localhost` resolves here.
    let cfg = write_config(
        dir.path(),
        [&format!("localhost:{p0}"), &format!("localhost:{p1}")],
    );
    let cfg = cfg.to_str().unwrap();
    let mut n1 = start(&["from-hostname", cfg], &[("HOSTNAME", "demo-1")]);
    let u1 = format!("http://127.0.0.1:{p1}");
    n1.ready(&u1).await;
    let c = Client::new();
    let view = c.send(c.http.get(format!("{u1}/cluster"))).await;
    assert_eq!(view.body["shard_id"], 1);
    assert_eq!(view.body["shards"][1]["addr"], format!("localhost:{p1}"));

    // The same through the env var form of the arguments.
    let mut n0 = start(
        &[],
        &[
            ("CAVI_SHARD", "from-hostname"),
            ("CAVI_CONFIG", cfg),
            ("HOSTNAME", "demo-0"),
        ],
    );
    let u0 = format!("http://127.0.0.1:{p0}");
    n0.ready(&u0).await;
    assert_eq!(
        c.put(&u0, "zebra", "z").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(c.get(&u1, "zebra").await.body, "z");
}

#[tokio::test]
async fn listen_flag_overrides_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ["127.0.0.1:1", "127.0.0.1:2"]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut n = start(&["0", cfg.to_str().unwrap(), "--listen", &listen], &[]);
    n.ready(&format!("http://{listen}")).await;
}

#[test]
fn bad_configs_and_arguments_exit_with_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let overlap = dir.path().join("overlap.yaml");
    std::fs::write(
        &overlap,
        "shards:\n  - {id: 0, addr: '127.0.0.1:1', range_start: a, range_end: m}\n  - {id: 1, addr: '127.0.0.1:2', range_start: k, range_end: z}\n",
    )
    .unwrap();
    let overlap = overlap.to_str().unwrap();
    // Addresses that are not HOST:PORT a peer can dial.
    let bad_addr = |name: &str, addr: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!("shards:\n  - {{id: 0, addr: '{addr}', range_start: a, range_end: m}}\n  - {{id: 1, addr: '127.0.0.1:2', range_start: n}}\n"),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    };
    let url = bad_addr("url.yaml", "http://127.0.0.1:3906");
    let path = bad_addr("path.yaml", "127.0.0.1:3906/kv");
    let any_v4 = bad_addr("any4.yaml", "0.0.0.0:3906");
    let any_v6 = bad_addr("any6.yaml", "[::]:3906");
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 9] = [
        (
            &["0", &url],
            &[],
            "shard 0: address \"http://127.0.0.1:3906\" is not HOST:PORT",
        ),
        (
            &["1", &path],
            &[],
            "shard 0: address \"127.0.0.1:3906/kv\" is not HOST:PORT",
        ),
        (&["0", &any_v4], &[], "cannot be dialled by peers"),
        (&["0", &any_v6], &[], "cannot be dialled by peers"),
        (&["0", overlap], &[], "shards 0"),
        (
            &["0", "/nonexistent/config.yaml"],
            &[],
            "cannot read config file",
        ),
        (
            &["7", "../config.yaml"],
            &[],
            "shard 7 is not in the config",
        ),
        (
            &["from-hostname", "../config.yaml"],
            &[("HOSTNAME", "laptop")],
            "does not end in -<ordinal>",
        ),
        (&["first", "../config.yaml"], &[], "not a shard id"),
    ];
    for (args, env, needle) in cases {
        let mut p = start(args, env);
        let (ok, stderr) = p.finish();
        assert!(!ok, "{args:?} should fail");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    // Shard 1 is a socket that accepts and never answers.
    let hung = StdListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let (accepted_tx, accepted_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept() {
            held.push(socket);
            let _ = accepted_tx.send(());
        }
    });
    let a0 = format!("127.0.0.1:{}", free_port());
    let cfg = write_config(dir.path(), [&a0, &hung_addr.to_string()]);
    let mut n0 = start(
        &["0", cfg.to_str().unwrap(), "--peer-timeout", "1500ms"],
        &[],
    );
    let u0 = format!("http://{a0}");
    n0.ready(&u0).await;

    let c = Client::new();
    let in_flight = tokio::spawn({
        let (c, u0) = (c.clone(), u0.clone());
        async move { c.get(&u0, "zebra").await }
    });
    // The request is in flight once the node has connected to the peer.
    tokio::task::spawn_blocking(move || accepted_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the node forwards to the hung peer");
    n0.signal("TERM");
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{answer:?}");
    assert_eq!(answer.code(), "peer_timeout");
    let (ok, stderr) = n0.finish();
    assert!(ok, "clean exit after draining: {stderr}");
    // And nothing listens any more.
    assert!(c.http.get(format!("{u0}/healthz")).send().await.is_err());
}
