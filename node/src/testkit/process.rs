//! Real `kvstore-api` processes for tests of the binary.

use std::io::Read;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::Client;

/// `target/<profile>/kvstore-api`: the binary of this workspace's build,
/// found next to the running test's `deps/` directory (cargo builds every
/// binary of the workspace before it runs the tests).
pub fn node_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let profile = if deps.ends_with("deps") {
        deps.parent().unwrap()
    } else {
        deps
    };
    profile.join(format!("kvstore-api{}", std::env::consts::EXE_SUFFIX))
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed when the test ends, pass or fail.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(node_binary());
    cmd.args(args)
        .env_remove("HOSTNAME")
        // Quiet: stderr is a pipe read only at exit.
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Proc(cmd.spawn().unwrap())
}

impl Proc {
    /// Polls `/readyz` until 200, failing fast with the node's stderr if
    /// the process exits first.
    pub async fn ready(&mut self, base: &str) {
        let client = Client::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                panic!("node exited with {status}: {}", self.stderr());
            }
            if let Ok(r) = client.http.get(format!("{base}/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            assert!(Instant::now() < deadline, "{base} not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut text);
        }
        text
    }

    /// Waits for exit (bounded) and returns success and stderr.
    pub fn finish(&mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return (status.success(), self.stderr());
            }
            assert!(Instant::now() < deadline, "node did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }
}
