//! A steady mix of writes, deletes and reads from many clients, with a
//! ledger of what each acknowledged: the load under which resharding and
//! rollouts are tested. Each worker owns its keys, so the ledger knows the
//! one value a read must return (or, after a write that failed, the few it
//! may return).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use reqwest::StatusCode;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Client, Rng};

/// What a key may hold now: its last acknowledged state, plus the states
/// of writes whose answer was an error (they may or may not have landed).
#[derive(Debug, Clone, Default)]
pub struct KeyState {
    pub acked: Option<String>,
    pub uncertain: Vec<Option<String>>,
}

impl KeyState {
    fn allows(&self, found: Option<&str>) -> bool {
        found == self.acked.as_deref() || self.uncertain.iter().any(|u| u.as_deref() == found)
    }
}

/// What the workload did and saw.
#[derive(Debug, Default)]
pub struct Ledger {
    pub keys: HashMap<String, KeyState>,
    /// Requests sent and answered with success (or a 404 that was right).
    pub ok: u64,
    /// Failed requests, by status or transport error.
    pub failed: BTreeMap<String, u64>,
    /// Failed requests by the first letter of their key.
    pub failed_keys: BTreeMap<char, u64>,
    /// The first few failures in full, for the test's output.
    pub samples: Vec<String>,
    /// Reads that broke the rules: a 404 for a key holding a value, or a
    /// value nobody wrote last.
    pub violations: Vec<String>,
}

impl Ledger {
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    pub fn total(&self) -> u64 {
        self.ok + self.failures()
    }

    /// Reads every key through each of `urls` and checks it against what
    /// was acknowledged; returns the disagreements.
    pub async fn check_all(&self, client: &Client, urls: &[String]) -> Vec<String> {
        let mut wrong = Vec::new();
        for (key, state) in &self.keys {
            for url in urls {
                let got = client.get(url, key).await;
                let found = match got.status {
                    StatusCode::OK => got.body.as_str().map(str::to_owned),
                    StatusCode::NOT_FOUND => None,
                    other => {
                        wrong.push(format!("GET {key:?} via {url}: {other} {:?}", got.body));
                        continue;
                    }
                };
                if !state.allows(found.as_deref()) {
                    wrong.push(format!(
                        "{key:?} via {url}: found {found:?}, acknowledged {:?} (uncertain {:?})",
                        state.acked, state.uncertain
                    ));
                }
            }
        }
        wrong
    }
}

/// The nodes clients send to, changeable while they run: what a load
/// balancer's endpoint list is to the clients behind it.
#[derive(Debug, Clone, Default)]
pub struct Endpoints(Arc<RwLock<Vec<String>>>);

impl Endpoints {
    pub fn new(urls: Vec<String>) -> Self {
        Self(Arc::new(RwLock::new(urls)))
    }

    /// Takes `url` out (a node turned unready).
    pub fn remove(&self, url: &str) {
        self.0.write().unwrap().retain(|u| u != url);
    }

    /// Puts `url` back (a node ready again).
    pub fn add(&self, url: &str) {
        let mut urls = self.0.write().unwrap();
        if !urls.iter().any(|u| u == url) {
            urls.push(url.to_owned());
        }
    }

    fn pick(&self, rng: &mut Rng) -> Option<String> {
        let urls = self.0.read().unwrap();
        (!urls.is_empty()).then(|| urls[rng.below(urls.len() as u64) as usize].clone())
    }
}

/// A running workload.
pub struct Workload {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    ledger: Arc<Mutex<Ledger>>,
}

/// The first letters keys are spread over.
pub const LETTERS: &str = "abcdefghijklmnopqrstuvwxyz";

impl Workload {
    /// `workers` clients, each sending to a random one of `urls` (so keys
    /// are forwarded too), over keys `<letter><worker>-<n>`.
    pub fn start(urls: Vec<String>, workers: usize, seed: u64) -> Self {
        Self::start_on(Endpoints::new(urls), workers, seed, Duration::ZERO)
    }

    /// As [`Workload::start`], over `endpoints` as they change; a worker
    /// whose request failed waits `backoff` before its next one, as a
    /// client told `Retry-After` would.
    pub fn start_on(endpoints: Endpoints, workers: usize, seed: u64, backoff: Duration) -> Self {
        let (stop, stopped) = watch::channel(false);
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let mut tasks = JoinSet::new();
        for w in 0..workers {
            let (endpoints, ledger, mut stopped) =
                (endpoints.clone(), ledger.clone(), stopped.clone());
            tasks.spawn(async move {
                let client = Client::new();
                let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut seq = 0u64;
                while !*stopped.borrow_and_update() {
                    let letter = LETTERS.as_bytes()[rng.below(26) as usize] as char;
                    let key = format!("{letter}{w:02}-{}", rng.below(40));
                    let Some(url) = endpoints.pick(&mut rng) else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let url = &url;
                    let dice = rng.below(100);
                    seq += 1;
                    let state = ledger
                        .lock()
                        .unwrap()
                        .keys
                        .get(&key)
                        .cloned()
                        .unwrap_or_default();
                    let wrote = |a: &Result<(StatusCode, serde_json::Value), String>| {
                        !matches!(a, Ok((StatusCode::NO_CONTENT, _)))
                    };
                    let failed;
                    if dice < 60 {
                        let value = format!("w{w}-{seq}");
                        let put = client.try_put(url, &key, &value).await;
                        failed = wrote(&put);
                        record(&ledger, &key, letter, put, Some(value));
                    } else if dice < 75 {
                        let del = client.try_delete(url, &key).await;
                        failed = wrote(&del);
                        record(&ledger, &key, letter, del, None);
                    } else {
                        let got = client.try_get(url, &key).await;
                        failed = !matches!(
                            got,
                            Ok((StatusCode::OK | StatusCode::NOT_FOUND, _))
                        );
                        let mut l = ledger.lock().unwrap();
                        match got {
                            Ok((StatusCode::OK, body)) => {
                                let found = body.as_str().map(str::to_owned);
                                if state.allows(found.as_deref()) {
                                    l.ok += 1;
                                } else {
                                    l.violations.push(format!(
                                        "GET {key:?} via {url} found {found:?}, acknowledged {:?} (uncertain {:?})",
                                        state.acked, state.uncertain
                                    ));
                                }
                            }
                            Ok((StatusCode::NOT_FOUND, _)) => {
                                if state.allows(None) {
                                    l.ok += 1;
                                } else {
                                    l.violations.push(format!(
                                        "GET {key:?} via {url} answered 404, but {:?} was acknowledged",
                                        state.acked
                                    ));
                                }
                            }
                            Ok((status, body)) => {
                                *l.failed.entry(format!("{status} {}", body["code"])).or_default() += 1;
                                *l.failed_keys.entry(letter).or_default() += 1;
                                if l.samples.len() < 10 {
                                    l.samples.push(format!("GET {key:?} via {url}: {status} {body}"));
                                }
                            }
                            Err(e) => {
                                *l.failed.entry(e).or_default() += 1;
                                *l.failed_keys.entry(letter).or_default() += 1;
                            }
                        }
                    }
                    if failed && !backoff.is_zero() {
                        tokio::time::sleep(backoff).await;
                    }
                }
            });
        }
        Self {
            stop,
            tasks,
            ledger,
        }
    }

    /// Failed requests so far, by the first letter of their key.
    pub fn failed_keys(&self) -> BTreeMap<char, u64> {
        self.ledger.lock().unwrap().failed_keys.clone()
    }

    /// Failed requests so far.
    pub fn failures(&self) -> u64 {
        self.ledger.lock().unwrap().failures()
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.ledger.lock().unwrap().total()
    }

    /// Waits until at least `n` more requests were answered.
    pub async fn wait_for(&self, n: u64) {
        let target = self.answered() + n;
        while self.answered() < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the workers (each finishes its request) and hands the ledger
    /// over.
    pub async fn stop(mut self) -> Ledger {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        std::mem::take(&mut *self.ledger.lock().unwrap())
    }
}

fn record(
    ledger: &Mutex<Ledger>,
    key: &str,
    letter: char,
    answer: Result<(StatusCode, serde_json::Value), String>,
    wrote: Option<String>,
) {
    let mut l = ledger.lock().unwrap();
    match answer {
        Ok((StatusCode::NO_CONTENT, _)) => {
            l.ok += 1;
            l.keys.insert(
                key.to_owned(),
                KeyState {
                    acked: wrote,
                    uncertain: Vec::new(),
                },
            );
        }
        other => {
            let why = match other {
                Ok((status, body)) => {
                    if l.samples.len() < 10 {
                        l.samples.push(format!("write {key:?}: {status} {body}"));
                    }
                    format!("{status} {}", body["code"])
                }
                Err(e) => e,
            };
            *l.failed.entry(why).or_default() += 1;
            *l.failed_keys.entry(letter).or_default() += 1;
            l.keys
                .entry(key.to_owned())
                .or_default()
                .uncertain
                .push(wrote);
        }
    }
}
