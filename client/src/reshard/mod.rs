//! Online resharding, the client's side: the [`plan`] (pure: which ranges
//! move where) and the [`driver`] (one step at a time against the live
//! cluster), shared by `cavi reshard` and the operator. The node's side of
//! a move is `cavi_node::moves`.

pub mod driver;
pub mod plan;

use std::time::{Duration, Instant};

use cavi_node::config::ClusterConfig;

pub use driver::{DriveError, Driver, Progress, Report};

use crate::Client;

/// Steps failing in a row (a node restarting, a fence that timed out)
/// before a driven reshard gives up; running it again picks up from there.
const MAX_FAILED_STEPS: u32 = 5;
/// The first wait after a failed step; it doubles with each failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Drives the cluster behind `entry` to exactly `target`, reporting
/// progress as sentences; returns the epoch at which every node serves it.
/// The move lock is given back whatever happens.
pub async fn drive(
    entry: &Client,
    target: &ClusterConfig,
    driver: &Driver,
    poll: Duration,
    mut report: impl FnMut(&str),
) -> Result<u64, DriveError> {
    let result = drive_steps(entry, target, driver, poll, &mut report).await;
    driver.release(entry, target).await;
    result
}

async fn drive_steps(
    entry: &Client,
    target: &ClusterConfig,
    driver: &Driver,
    poll: Duration,
    report: &mut impl FnMut(&str),
) -> Result<u64, DriveError> {
    let mut failures = 0;
    let mut last = String::new();
    let mut last_at = Instant::now();
    loop {
        match driver.step(entry, target).await {
            Ok(Report::Done { epoch }) => return Ok(epoch),
            Ok(Report::Working(progress)) => {
                failures = 0;
                // Progress of one copy is reported about once a second.
                let same_kind = progress.summary.split(':').next() == last.split(':').next();
                if progress.summary != last
                    && (!same_kind || last_at.elapsed() >= Duration::from_secs(1))
                {
                    report(&progress.summary);
                    last.clone_from(&progress.summary);
                    last_at = Instant::now();
                }
                if !progress.changed {
                    tokio::time::sleep(poll).await;
                }
            }
            Err(e) if e.is_transient() && failures < MAX_FAILED_STEPS => {
                failures += 1;
                report(&format!("{e}; trying again"));
                tokio::time::sleep(FIRST_BACKOFF * 2u32.pow(failures)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
