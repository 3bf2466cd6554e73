//! Leader election under network partitions: two candidates share one
//! in-memory Lease (with the API server's optimistic locking), and the
//! test cuts one candidate off at a time, either before its requests reach
//! the server or after (its writes land, the answers are lost). Time is
//! virtual, so the lease's 15 s and the renew deadline's 10 s run in
//! milliseconds and the order of events is exact. The property: at no
//! instant do two candidates both believe they lead, and leadership does
//! move to the reachable candidate.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cavi_operator::leader::{LeaderElector, LeaseTiming};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::client::Body;
use serde_json::json;
use tokio::time::Instant;
use tower_test::mock::{self, Handle, SendResponse};

/// How a candidate is cut off from the API server.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// Connected.
    None,
    /// Its requests never arrive.
    Requests,
    /// Its requests are carried out, the answers never come back.
    Answers,
}

/// The one Lease the API server holds, with its resource version.
#[derive(Default)]
struct LeaseStore {
    lease: Option<Lease>,
    version: u64,
}

fn status(code: StatusCode, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": reason, "reason": reason, "code": code.as_u16()});
    respond(code, &body)
}

fn respond(code: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

impl LeaseStore {
    /// Carries out one request the way the API server does: GET, POST
    /// (409 if it exists), PUT (409 unless the resource version matches).
    fn answer(&mut self, method: &Method, body: &[u8]) -> Response<Body> {
        match *method {
            Method::GET => match &self.lease {
                Some(lease) => respond(StatusCode::OK, lease),
                None => status(StatusCode::NOT_FOUND, "NotFound"),
            },
            Method::POST if self.lease.is_some() => status(StatusCode::CONFLICT, "AlreadyExists"),
            Method::POST | Method::PUT => {
                let mut lease: Lease = serde_json::from_slice(body).unwrap();
                let current = self.version.to_string();
                if *method == Method::PUT
                    && lease.metadata.resource_version.as_deref() != Some(current.as_str())
                {
                    return status(StatusCode::CONFLICT, "Conflict");
                }
                self.version += 1;
                lease.metadata.resource_version = Some(self.version.to_string());
                self.lease = Some(lease.clone());
                let code = if *method == Method::POST {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                respond(code, &lease)
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
        }
    }
}

/// One candidate's connection to the shared API server.
async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    store: Arc<Mutex<LeaseStore>>,
    cut: Arc<Mutex<Cut>>,
) {
    // Requests a cut left unanswered: kept so they hang, not fail fast.
    let mut unanswered: Vec<SendResponse<Response<Body>>> = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let body = body.collect_bytes().await.unwrap();
        let mode = *cut.lock().unwrap();
        if mode == Cut::Requests {
            unanswered.push(send);
            continue;
        }
        let answer = store.lock().unwrap().answer(&parts.method, &body);
        if mode == Cut::Answers {
            unanswered.push(send);
        } else {
            send.send_response(answer);
        }
    }
}

/// When a candidate began and stopped leading.
#[derive(Debug, Clone)]
struct Term {
    who: &'static str,
    from: Instant,
    until: Option<Instant>,
}

struct Candidate {
    cut: Arc<Mutex<Cut>>,
}

/// Starts a candidate that, like `cavi-operator run`, leads from
/// `acquire` until `hold` returns, then stands again.
fn candidate(
    who: &'static str,
    store: &Arc<Mutex<LeaseStore>>,
    terms: &Arc<Mutex<Vec<Term>>>,
) -> Candidate {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let cut = Arc::new(Mutex::new(Cut::None));
    tokio::spawn(serve(handle, store.clone(), cut.clone()));
    let client = kube::Client::new(service, "ops");
    let elector = LeaderElector::new(
        Api::namespaced(client, "ops"),
        "cavi-operator",
        who,
        LeaseTiming::default(),
    );
    let terms = terms.clone();
    tokio::spawn(async move {
        loop {
            elector.acquire().await;
            let index = {
                let mut terms = terms.lock().unwrap();
                terms.push(Term {
                    who,
                    from: Instant::now(),
                    until: None,
                });
                terms.len() - 1
            };
            elector.hold().await;
            terms.lock().unwrap()[index].until = Some(Instant::now());
        }
    });
    Candidate { cut }
}

impl Candidate {
    fn set(&self, cut: Cut) {
        *self.cut.lock().unwrap() = cut;
    }
}

fn leader_now(terms: &Arc<Mutex<Vec<Term>>>) -> Option<&'static str> {
    let terms = terms.lock().unwrap();
    let open: Vec<&Term> = terms.iter().filter(|t| t.until.is_none()).collect();
    assert!(open.len() <= 1, "two leaders at once: {open:?}");
    open.first().map(|t| t.who)
}

/// Runs virtual time forward in small steps, checking there is never more
/// than one leader; returns the leader at the end.
async fn run_for(terms: &Arc<Mutex<Vec<Term>>>, how_long: Duration) -> Option<&'static str> {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        leader_now(terms);
    }
    leader_now(terms)
}

/// No two terms overlap, measured on the one (virtual) clock.
fn assert_no_overlap(terms: &[Term]) {
    let mut terms = terms.to_vec();
    terms.sort_by_key(|t| t.from);
    for pair in terms.windows(2) {
        let until = pair[0].until.expect("only the last term may be open");
        assert!(
            until <= pair[1].from,
            "{} led until {:?} but {} began at {:?}",
            pair[0].who,
            until,
            pair[1].who,
            pair[1].from
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_cut_off_leader_steps_down_before_anyone_else_takes_over() {
    let store = Arc::new(Mutex::new(LeaseStore::default()));
    let terms = Arc::new(Mutex::new(Vec::new()));
    let a = candidate("op-a", &store, &terms);
    assert_eq!(run_for(&terms, Duration::from_secs(1)).await, Some("op-a"));
    let b = candidate("op-b", &store, &terms);
    assert_eq!(
        run_for(&terms, Duration::from_secs(60)).await,
        Some("op-a"),
        "a renewing leader keeps the lease"
    );

    // A's requests stop arriving: A gives up at its renew deadline, B
    // takes over once the record has been still for a lease duration.
    let cut_at = Instant::now();
    a.set(Cut::Requests);
    assert_eq!(run_for(&terms, Duration::from_secs(30)).await, Some("op-b"));
    let handover = {
        let terms = terms.lock().unwrap();
        let (old, new) = (&terms[0], &terms[1]);
        let stepped_down = old.until.unwrap();
        assert!(
            stepped_down - cut_at <= Duration::from_secs(10),
            "A led {:?} after the cut",
            stepped_down - cut_at
        );
        assert!(
            new.from - cut_at <= Duration::from_secs(15 + 3 + 2),
            "B waited {:?}",
            new.from - cut_at
        );
        new.from - stepped_down
    };
    assert!(
        handover >= Duration::from_secs(3),
        "the gap between terms was only {handover:?}"
    );

    // Healed, A stands again but does not take a renewed lease.
    a.set(Cut::None);
    assert_eq!(run_for(&terms, Duration::from_secs(60)).await, Some("op-b"));

    // B's requests land but its answers are lost: it cannot know it
    // renewed, so it steps down; A waits out the record B last wrote.
    b.set(Cut::Answers);
    assert_eq!(run_for(&terms, Duration::from_secs(40)).await, Some("op-a"));
    b.set(Cut::None);
    assert_eq!(run_for(&terms, Duration::from_secs(60)).await, Some("op-a"));

    // A flapping link on the leader: cut and healed every few seconds.
    for i in 0..20 {
        a.set(if i % 2 == 0 { Cut::Requests } else { Cut::None });
        run_for(&terms, Duration::from_secs(3 + (i % 5))).await;
    }
    a.set(Cut::None);
    b.set(Cut::None);
    assert!(
        run_for(&terms, Duration::from_secs(60)).await.is_some(),
        "someone leads once healed"
    );

    let terms = terms.lock().unwrap().clone();
    assert!(terms.len() >= 3, "{terms:#?}");
    assert_no_overlap(&terms);
}
