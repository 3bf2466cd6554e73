//! Real `kvstore-api` processes for tests of the binary.

use std::io::Read;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
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

/// A loopback port for a server the test starts, that nothing listens on.
///
/// Not one `bind(0)` hands out: those come from the kernel's ephemeral
/// range, where every outgoing connection takes its local port from, so
/// between the pick and the server's bind a connection of a test running
/// alongside can take it, and the server fails with "Address already in
/// use". Ports below that range are held only by listeners. Each process
/// picks in its own slice of them, by its pid, so that tests the runner
/// starts together do not pick the same port either.
pub fn free_port() -> u16 {
    const LOWEST: u32 = 10_000;
    const SLICE: u32 = 64;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let slices = ephemeral_low().saturating_sub(LOWEST) / SLICE;
    if slices > 0 {
        let base = LOWEST + std::process::id() % slices * SLICE;
        for _ in 0..SLICE {
            let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % SLICE;
            let port = u16::try_from(port).expect("below the ephemeral range");
            if StdListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range_all_different_and_free() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!(u32::from(port) < low, "{port} is in the ephemeral range");
            StdListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
