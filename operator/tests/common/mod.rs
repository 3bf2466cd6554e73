//! A mocked API server for tests: each request the code under test makes is
//! taken in order, asserted, and answered by the test.
#![allow(dead_code, clippy::unwrap_used)]

pub mod world;

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

/// A client whose every request lands in the returned [`ApiServer`].
pub fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer(handle))
}

/// One request the reconciler made, with its body read.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub send: SendResponse<Response<Body>>,
}

impl Call {
    pub fn assert(&self, method: Method, path: &str) {
        assert_eq!(
            (&self.method, self.path.as_str()),
            (&method, path),
            "unexpected request {} {}?{}",
            self.method,
            self.path,
            self.query
        );
    }

    /// Asserts a server-side apply under the operator's field manager.
    pub fn assert_apply(&self, path: &str) {
        self.assert(Method::PATCH, path);
        assert!(
            self.query.contains("fieldManager=cavi-operator"),
            "{}",
            self.query
        );
        assert!(self.query.contains("force=true"), "{}", self.query);
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
    }

    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn respond(self, status: StatusCode, body: &impl Serialize) {
        self.send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        );
    }

    pub fn ok(self, body: &impl Serialize) {
        self.respond(StatusCode::OK, body);
    }

    pub fn not_found(self) {
        let what = self.path.rsplit('/').next().unwrap_or_default().to_owned();
        self.respond(
            StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("\"{what}\" not found"), "reason": "NotFound", "code": 404}),
        );
    }

    /// Answers an apply the way the API server does: the applied object,
    /// with server-set fields.
    pub fn echo_applied(self) {
        let mut obj: Value = self.json();
        obj["metadata"]["resourceVersion"] = json!("100");
        obj["metadata"]["uid"] = json!("child-uid");
        self.ok(&obj);
    }
}

pub struct ApiServer(pub Handle<Request<Body>, Response<Body>>);

impl ApiServer {
    pub async fn next(&mut self) -> Call {
        let (request, send) = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .expect("the reconciler made no further request")
            .expect("the client was dropped before the expected request");
        let (parts, body) = request.into_parts();
        Call {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: body.collect_bytes().await.unwrap().to_vec(),
            send,
        }
    }

    /// After the reconcile is over and its context dropped: nothing more.
    pub async fn assert_done(mut self) {
        let next = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .expect("the mock client was never dropped");
        if let Some((request, _)) = next {
            panic!(
                "unexpected extra request: {} {}",
                request.method(),
                request.uri()
            );
        }
    }
}
