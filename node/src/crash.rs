//! Crash points: places in the move protocol where a test of real
//! processes can make a node (or `cavi`) die at once, as `kill -9` would,
//! to prove every phase recovers. `CAVI_CRASH_AT=name[@n][,name[@n]...]`
//! aborts the process on the n-th time (default: the first) it reaches
//! `name`. Only debug builds read the variable: a release binary has no
//! way to be crashed by its environment.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The variable naming the crash points.
pub const CRASH_AT: &str = "CAVI_CRASH_AT";

fn points() -> &'static [(String, AtomicU32)] {
    static POINTS: OnceLock<Vec<(String, AtomicU32)>> = OnceLock::new();
    POINTS.get_or_init(|| {
        if !cfg!(debug_assertions) {
            return Vec::new();
        }
        std::env::var(CRASH_AT)
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (name, n) = p.split_once('@').unwrap_or((p, "1"));
                (name.to_owned(), AtomicU32::new(n.parse().unwrap_or(1)))
            })
            .collect()
    })
}

/// Aborts the process if `name` is a crash point whose turn has come.
pub fn crash_point(name: &str) {
    for (point, left) in points() {
        if point == name && left.fetch_sub(1, Ordering::SeqCst) == 1 {
            eprintln!("crash point {name}: aborting the process");
            std::process::abort();
        }
    }
}
