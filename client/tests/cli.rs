//! The `cavi` binary against clusters of real nodes on loopback ports.
//! Every check of what got stored goes to the nodes over HTTP, not
//! through `cavi`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cavi_node::testkit::process::NodeProc;
use cavi_node::testkit::{Client, Cluster, Member, SEED, bind, fast_settings, spawn_node};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// What one run of `cavi` did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `cavi` with `args`, extra environment and optional stdin; the
/// caller's `CAVI_*` and proxy variables are removed first.
async fn cavi_env(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cavi"));
    cmd.args(args);
    for var in [
        "CAVI_ENDPOINT",
        "CAVI_TIMEOUT",
        "CAVI_RETRIES",
        "CAVI_NO_ROUTING",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // cavi may exit before reading (a usage error): a closed pipe is fine.
        if let Err(e) = pipe.write_all(input).await {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("cavi finishes within a minute")
        .unwrap();
    let run = Run {
        code: out
            .status
            .code()
            .expect("cavi exits, not killed by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("Error {"),
        "a panic or a debug dump: {run:?}"
    );
    run
}

/// Runs `cavi --endpoint <endpoint> args...`.
async fn cavi(endpoint: &str, args: &[&str]) -> Run {
    let mut all = vec!["--endpoint", endpoint];
    all.extend_from_slice(args);
    cavi_env(&all, &[], None).await
}

fn ok(run: &Run) {
    assert_eq!(run.code, 0, "cavi failed: {run:?}");
}

/// The value the owner shard holds for `key`, asked over HTTP.
async fn stored(c: &Cluster, owner: usize, key: &str) -> Option<String> {
    let got = c.client.get(&c.url(owner), key).await;
    match got.status {
        StatusCode::OK => Some(got.body.as_str().unwrap().to_owned()),
        StatusCode::NOT_FOUND => None,
        other => panic!("GET {key:?} on shard {owner}: {other} {:?}", got.body),
    }
}

/// Every pair of the cluster, asked over HTTP.
async fn everything(c: &Cluster) -> BTreeMap<String, String> {
    let all = c.client.search(&c.url(0), "prefix=").await;
    assert_eq!(all.status, StatusCode::OK);
    all.body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The rows of a table, each split on runs of two or more spaces.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|line| {
            line.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_del_round_trip_through_a_non_owner() {
    let c = Cluster::start(&SEED).await;
    // (key, owner): each is written and read through the other shard.
    for (key, owner) in [
        ("a/b?c d é", 0usize),
        ("m%2F+ñ/../x", 0),
        ("zürich?q=1&r=2 #frag", 1),
    ] {
        let entry = c.url(1 - owner);
        let value = format!("value of {key} — \"quoted\"\nsecond line");
        let put = cavi(&entry, &["put", key, &value]).await;
        ok(&put);
        assert_eq!(put.stdout, "");
        assert_eq!(
            stored(&c, owner, key).await.as_deref(),
            Some(value.as_str())
        );

        let get = cavi(&entry, &["get", key]).await;
        ok(&get);
        assert_eq!(get.stdout, format!("{value}\n"));
        let get = cavi(&entry, &["--output", "json", "get", key]).await;
        ok(&get);
        let json: Value = serde_json::from_str(&get.stdout).unwrap();
        assert_eq!(json, Value::String(value.clone()));

        ok(&cavi(&entry, &["del", key]).await);
        assert_eq!(stored(&c, owner, key).await, None, "{key} deleted");
        // Deleting again still succeeds, as DELETE does.
        ok(&cavi(&entry, &["delete", key]).await);
    }
    // Nothing else was created: no key was split or mangled on the way.
    assert!(everything(&c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_keys_travel_in_the_query_form() {
    let c = Cluster::start(&[("", Some("m")), ("n", None)]).await;
    for key in [".", ".."] {
        ok(&cavi(&c.url(1), &["put", key, &format!("dots {key}")]).await);
        assert_eq!(
            stored(&c, 0, key).await,
            Some(format!("dots {key}")),
            "{key} is stored under itself"
        );
        let get = cavi(&c.url(1), &["get", key]).await;
        ok(&get);
        assert_eq!(get.stdout, format!("dots {key}\n"));
    }
    let keys: Vec<String> = everything(&c).await.into_keys().collect();
    assert_eq!(keys, [".", ".."]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_is_the_servers_sentence_and_exit_1() {
    let c = Cluster::start(&SEED).await;
    let server = c.client.get(&c.url(0), "nope/not here").await;
    assert_eq!(server.status, StatusCode::NOT_FOUND);
    let run = cavi(&c.url(1), &["get", "nope/not here"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr, format!("cavi: {}\n", server.error()));

    // Other refusals too: a key no shard owns.
    let run = cavi(&c.url(0), &["put", "0-outside", "v"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with("cavi: no shard owns key \"0-outside\""),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_prints_a_table_or_json_in_key_order() {
    let c = Cluster::start(&SEED).await;
    for (key, value) in [
        ("banana", "yellow"),
        ("apricot", "orange"),
        ("zucchini", "green"),
        ("apple", "red and round"),
        ("avocado", "green\nsoft"),
    ] {
        assert_eq!(
            c.client.put(&c.url(0), key, value).await.status,
            StatusCode::NO_CONTENT
        );
    }
    let run = cavi(&c.url(1), &["search", "a"]).await;
    ok(&run);
    assert_eq!(
        rows(&run.stdout),
        [
            vec!["KEY", "VALUE"],
            vec!["apple", "red and round"],
            vec!["apricot", "orange"],
            vec!["avocado", "green\\nsoft"],
        ]
    );

    // Every key, from both shards, as JSON.
    let run = cavi(&c.url(1), &["search", "-o", "json"]).await;
    ok(&run);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let keys: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["apple", "apricot", "avocado", "banana", "zucchini"]);
    assert_eq!(json[2]["value"], "green\nsoft");

    let run = cavi(
        &c.url(0),
        &["--output", "json", "search", "ap", "--limit", "1"],
    )
    .await;
    ok(&run);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"key": "apple", "value": "red and round"}])
    );

    // A prefix with query syntax in it travels escaped.
    assert_eq!(
        c.client.put(&c.url(0), "a+b&c=d%/é", "odd").await.status,
        StatusCode::NO_CONTENT
    );
    let run = cavi(&c.url(1), &["search", "a+b&c=d%/", "-o", "json"]).await;
    ok(&run);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"key": "a+b&c=d%/é", "value": "odd"}])
    );

    // No match: the header only.
    let run = cavi(&c.url(0), &["search", "q"]).await;
    ok(&run);
    assert_eq!(rows(&run.stdout), [vec!["KEY", "VALUE"]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shows_ranges_health_and_key_counts() {
    let c = Cluster::start(&SEED).await;
    for key in ["apple", "mango", "zebra"] {
        assert_eq!(
            c.client.put(&c.url(1), key, "v").await.status,
            StatusCode::NO_CONTENT
        );
    }
    let run = cavi(&c.url(1), &["cluster"]).await;
    ok(&run);
    let (a0, a1) = (c.node(0).addr.to_string(), c.node(1).addr.to_string());
    assert_eq!(
        rows(&run.stdout),
        [
            vec!["SHARD", "RANGE", "ADDRESS", "HEALTH", "KEYS", "STORAGE"],
            vec!["0", "a..m*", a0.as_str(), "ready", "2", "memory"],
            vec!["1", "n..z*", a1.as_str(), "ready", "1", "memory"],
            vec!["map epoch 0"],
        ]
    );
    assert_eq!(run.stderr, "");

    let run = cavi(&c.url(0), &["cluster", "-o", "json"]).await;
    ok(&run);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["epoch"], 0);
    assert_eq!(json["moves"], serde_json::json!([]));
    let shards = &json["shards"];
    assert_eq!(shards[0]["id"], 0);
    assert_eq!(shards[0]["range"], "a..m*");
    assert_eq!(shards[0]["health"], "ready");
    assert_eq!(shards[0]["keys"], 2);
    assert_eq!(shards[0]["durable"], false);
    assert_eq!(shards[1]["addr"], a1.as_str());
    assert_eq!(shards[1]["range_end"], "z");
    assert_eq!(shards[1]["keys"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shows_dead_and_hung_shards_as_unreachable() {
    let ranges = [("a", Some("h")), ("i", Some("p")), ("q", None)];
    let c = Cluster::start_with(
        &ranges,
        &[Member::Node, Member::Dead, Member::Hung],
        fast_settings(),
    )
    .await;
    let started = Instant::now();
    let run = cavi(&c.url(0), &["cluster"]).await;
    ok(&run);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a hung shard costs the probe timeout, not more: {:?}",
        started.elapsed()
    );
    let table = rows(&run.stdout);
    assert_eq!(table.len(), 5, "{run:?}");
    assert_eq!(table[4], ["map epoch 0"]);
    assert_eq!(
        table[1][..4],
        ["0", "a..h*", &c.node(0).addr.to_string(), "ready"]
    );
    assert_eq!(table[1][4], "0");
    let dead = &c.config.shards[1].addr;
    let hung = &c.config.shards[2].addr;
    assert_eq!(
        table[2],
        ["1", "i..p*", dead.as_str(), "unreachable", "-", "-"]
    );
    assert_eq!(
        table[3],
        ["2", "q..(highest)", hung.as_str(), "unreachable", "-", "-"]
    );
    assert!(
        run.stderr
            .contains(&format!("shard 1 at {dead}: connection refused")),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("shard 2 at {hung}: no answer within 2s")),
        "{run:?}"
    );
    assert!(run.stderr.contains("cluster-internal"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_stores_every_line_of_a_jsonl_file() {
    let c = Cluster::start(&SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let mut expected = BTreeMap::new();
    let mut text = String::new();
    for i in 0..300 {
        let key = match i % 3 {
            0 => format!("apple/{i:03}"),
            1 => format!("zoo {i:03}?é"),
            _ => format!("kiwi%{i:03}"),
        };
        let value = format!("value \"{i}\", ü\n{i}");
        text.push_str(&serde_json::json!({"key": key, "value": value}).to_string());
        text.push('\n');
        expected.insert(key, value);
    }
    std::fs::write(&path, text).unwrap();

    let run = cavi(&c.url(1), &["load", path.to_str().unwrap()]).await;
    ok(&run);
    assert!(run.stdout.starts_with("loaded 300 keys in "), "{run:?}");
    assert!(run.stdout.contains(" keys/s)"), "{run:?}");
    assert_eq!(everything(&c).await, expected);
    assert_eq!(
        stored(&c, 1, "zoo 001?é").await.as_deref(),
        Some("value \"1\", ü\n1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_stores_a_csv_file_with_quoted_commas() {
    let c = Cluster::start(&SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.csv");
    std::fs::write(
        &path,
        "key,value\napple,\"red, round\"\nzebra,\"say \"\"hi\"\"\"\n\"m/a,ngo\",plain\n",
    )
    .unwrap();
    let run = cavi(&c.url(0), &["-o", "json", "load", path.to_str().unwrap()]).await;
    ok(&run);
    let summary: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(summary["loaded"], 3);
    assert_eq!(summary["complete"], true);
    assert_eq!(
        everything(&c).await,
        BTreeMap::from([
            ("apple".to_owned(), "red, round".to_owned()),
            ("m/a,ngo".to_owned(), "plain".to_owned()),
            ("zebra".to_owned(), "say \"hi\"".to_owned()),
        ])
    );
    assert_eq!(stored(&c, 1, "zebra").await.as_deref(), Some("say \"hi\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_stops_at_a_malformed_line_and_keeps_the_lines_before() {
    let c = Cluster::start(&SEED).await;
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("bad.jsonl");
    std::fs::write(
        &jsonl,
        "{\"key\": \"apple\", \"value\": \"1\"}\n\
         {\"key\": \"zebra\", \"value\": \"2\"}\n\
         {\"key\": \"cherry\", \"value\": \n\
         {\"key\": \"date\", \"value\": \"4\"}\n",
    )
    .unwrap();
    let csv = dir.path().join("bad.csv");
    std::fs::write(&csv, "banana,1\nyak,2\ncherry,3,extra\ndate,4\n").unwrap();

    for (path, first, second) in [(&jsonl, "apple", "zebra"), (&csv, "banana", "yak")] {
        let run = cavi(&c.url(1), &["load", path.to_str().unwrap()]).await;
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.starts_with("cavi: line 3: "), "{run:?}");
        assert!(run.stdout.starts_with("loaded 2 keys in "), "{run:?}");
        assert!(stored(&c, 0, first).await.is_some(), "line 1 of {path:?}");
        assert!(stored(&c, 1, second).await.is_some(), "line 2 of {path:?}");
        assert_eq!(stored(&c, 0, "cherry").await, None);
        assert_eq!(stored(&c, 0, "date").await, None, "nothing after line 3");
    }
    assert_eq!(everything(&c).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_stops_at_a_key_the_server_refuses() {
    let c = Cluster::start(&SEED).await;
    let input = b"apple,1\n0-outside,2\nzebra,3\n";
    let run = cavi_env(
        &[
            "--endpoint",
            &c.url(0),
            "load",
            "-",
            "--format",
            "csv",
            "--concurrency",
            "1",
        ],
        &[],
        Some(input),
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with("cavi: line 2: no shard owns key \"0-outside\""),
        "{run:?}"
    );
    assert!(run.stdout.starts_with("loaded 1 key in "), "{run:?}");
    assert_eq!(stored(&c, 0, "apple").await.as_deref(), Some("1"));
    assert_eq!(stored(&c, 1, "zebra").await, None);
}

/// A durable node answers each connection's PUTs one commit at a time: a
/// load that pipelined 32 PUTs over two connections put at most two writes
/// in a commit. With a connection for each PUT in flight they share them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_into_a_durable_node_shares_its_commits() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let mut node = NodeProc::new(0, &config, dir.path(), true);
    std::fs::write(
        &config,
        format!("shards:\n  - {{ id: 0, addr: \"{}\" }}\n", node.addr),
    )
    .unwrap();
    // A disk that takes 20 ms a commit, whatever the machine.
    node.env("CAVI_DEBUG_COMMIT_DELAY_MS", "20");
    node.start().await;
    let path = dir.path().join("data.csv");
    let keys = 400;
    let text: String = (0..keys)
        .map(|i| format!("key{i:04},value {i}\n"))
        .collect();
    std::fs::write(&path, text).unwrap();

    let run = cavi(&node.url(), &["load", path.to_str().unwrap()]).await;
    ok(&run);
    assert!(run.stdout.starts_with("loaded 400 keys in "), "{run:?}");
    let client = Client::new();
    let metrics = client.metrics(&node.url()).await;
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    assert_eq!(metric("cavi_storage_committed_writes_total"), keys);
    let commits = metric("cavi_storage_commits_total");
    assert!(
        commits < keys / 4,
        "{commits} commits for {keys} writes: the load's PUTs queued behind each other"
    );
    for i in [0, 199, 399] {
        let got = client.get(&node.url(), &format!("key{i:04}")).await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(got.body, Value::from(format!("value {i}")));
    }
    // And `cavi cluster` says where it keeps them.
    let run = cavi(&node.url(), &["cluster"]).await;
    ok(&run);
    assert_eq!(rows(&run.stdout)[1][4..], ["400", "disk"], "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reads_stdin_with_a_format() {
    let c = Cluster::start(&SEED).await;
    let input =
        b"{\"key\": \"kiwi\", \"value\": \"green\"}\n\n{\"key\": \"yam\", \"value\": \"\"}\n";
    let run = cavi_env(
        &["-e", &c.url(0), "load", "-", "--format", "jsonl"],
        &[],
        Some(input),
    )
    .await;
    ok(&run);
    assert!(run.stdout.starts_with("loaded 2 keys"), "{run:?}");
    assert_eq!(stored(&c, 0, "kiwi").await.as_deref(), Some("green"));
    assert_eq!(stored(&c, 1, "yam").await.as_deref(), Some(""));

    let run = cavi_env(&["-e", &c.url(0), "load", "-"], &[], Some(input)).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--format"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_comes_from_cavi_endpoint() {
    let c = Cluster::start(&SEED).await;
    let env = [("CAVI_ENDPOINT", c.url(1))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ok(&cavi_env(&["put", "fig", "purple"], &env, None).await);
    assert_eq!(stored(&c, 0, "fig").await.as_deref(), Some("purple"));
    let run = cavi_env(&["get", "fig"], &env, None).await;
    ok(&run);
    assert_eq!(run.stdout, "purple\n");

    // --endpoint wins over the variable.
    let (listener, dead) = bind().await;
    drop(listener);
    let dead = format!("http://{dead}");
    let run = cavi_env(
        &["--endpoint", &c.url(0), "get", "fig"],
        &[("CAVI_ENDPOINT", &dead)],
        None,
    )
    .await;
    ok(&run);
    assert_eq!(run.stdout, "purple\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_a_sentence_and_exit_3() {
    let (listener, addr) = bind().await;
    drop(listener);
    let endpoint = format!("http://{addr}");
    for args in [
        vec!["get", "k"],
        vec!["put", "k", "v"],
        vec!["search", "k"],
        vec!["cluster"],
    ] {
        let run = cavi(&endpoint, &args).await;
        assert_eq!(run.code, 3, "{args:?}: {run:?}");
        assert_eq!(
            run.stderr,
            format!("cavi: cannot reach {endpoint}: connection refused\n"),
            "{args:?}"
        );
        assert_eq!(run.stdout, "");
    }
    // Usage errors are 2: clap's own and a bad endpoint.
    let run = cavi_env(&["get"], &[], None).await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = cavi_env(&["--endpoint", "https://node:3100", "get", "k"], &[], None).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.starts_with("cavi: the endpoint"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_with_a_dead_shard_fails_unless_partial() {
    let c = Cluster::start_with(&SEED, &[Member::Node, Member::Dead], fast_settings()).await;
    assert_eq!(
        c.client.put(&c.url(0), "apple", "red").await.status,
        StatusCode::NO_CONTENT
    );
    let server = c.client.search(&c.url(0), "prefix=").await;
    assert!(server.status.is_server_error());
    let run = cavi(&c.url(0), &["search"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr, format!("cavi: {}\n", server.error()));
    assert_eq!(run.stdout, "");

    let run = cavi(&c.url(0), &["search", "--partial", "-o", "json"]).await;
    ok(&run);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json, serde_json::json!([{"key": "apple", "value": "red"}]));
    assert!(
        run.stderr
            .contains("partial answer: shard(s) 1 did not answer"),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_shard_is_retried_with_backoff_until_it_answers() {
    let mut c = Cluster::start_with(&SEED, &[Member::Node, Member::Dead], fast_settings()).await;
    // Without retries the 503 is the answer.
    let run = cavi(&c.url(0), &["--retries", "0", "put", "zebra", "1"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("shard 1"), "{run:?}");

    // With the default retries, the shard coming back in time is enough.
    let put = tokio::spawn({
        let url = c.url(0);
        async move { cavi(&url, &["put", "zebra", "2"]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!put.is_finished(), "still retrying");
    let addr = c.config.shards[1].addr.clone();
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    c.nodes[1] = Some(spawn_node(listener, c.config.clone(), 1, fast_settings()));
    let run = put.await.unwrap();
    ok(&run);
    assert_eq!(stored(&c, 1, "zebra").await.as_deref(), Some("2"));
}
