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

    pub fn id(&self) -> u32 {
        self.0.id()
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

/// A node process a test can kill and start again on the same address
/// and data directory; its log goes to a file beside its data.
pub struct NodeProc {
    pub id: u32,
    pub addr: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    /// A node serving `id` of `config` on a fresh loopback port, with its
    /// data under `dir` (`--data-dir` when `disk`), not started yet.
    pub fn new(id: u32, config: &std::path::Path, dir: &std::path::Path, disk: bool) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            id.to_string(),
            config.display().to_string(),
            "--listen".into(),
            addr.clone(),
        ];
        if disk {
            args.extend(["--data-dir".into(), dir.join("data").display().to_string()]);
        }
        Self {
            id,
            addr,
            args,
            env: Vec::new(),
            log: dir.join(format!("node-{id}.log")),
            child: None,
        }
    }

    /// Extra arguments for every start.
    pub fn arg(&mut self, arg: &str) -> &mut Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Forgets the environment variables set with [`NodeProc::env`].
    pub fn clear_env(&mut self) -> &mut Self {
        self.env.clear();
        self
    }

    /// Waits (bounded) for the process to exit by itself.
    pub async fn wait_exit(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.is_running() {
            assert!(Instant::now() < deadline, "node {} did not exit", self.id);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.child = None;
    }

    /// An environment variable for every start.
    pub fn env(&mut self, name: &str, value: &str) -> &mut Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the process (appending to its log) and waits until ready.
    pub async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(node_binary());
        cmd.args(&self.args)
            .env_remove("HOSTNAME")
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let client = Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = self.url();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("node {} exited with {status}: {}", self.id, self.log_text());
            }
            if let Ok(r) = client.http.get(format!("{url}/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready in time: {}",
                self.id,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends signal `name` (`TERM`, `KILL`, ...) to the running process.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("a running node");
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}
