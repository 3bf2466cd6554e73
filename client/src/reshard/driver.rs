//! The driver: one step at a time towards a desired layout, re-reading the
//! cluster before each, like a reconciler. `cavi reshard` calls [`step`]
//! in a loop; the operator calls it once per reconcile. Neither keeps
//! state between steps: what is in progress is read back from the nodes,
//! so a driver that was killed is simply run again.
//!
//! [`step`]: Driver::step

use std::collections::BTreeMap;
use std::time::Duration;

use cavi_node::config::ClusterConfig;
use cavi_node::moves::{MoveSpec, MoveStatus, Phase, Role};
use cavi_node::shard_map::ShardMap;
use cavi_node::wire::ClusterView;

use cavi_node::crash::crash_point;

use super::plan::{self, PlanError, PlannedMove};
use crate::{Client, ClientError};

/// A move commits once its copy is done and fewer tapped writes than this
/// wait for the target: the fence then only has a short tail to send.
const COMMIT_LAG: u64 = 10_000;

/// What a step did, or that there is nothing left to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Every node serves the desired layout at this epoch.
    Done { epoch: u64 },
    /// Work under way; a person (or a status) reads `summary`.
    Working(Progress),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// One sentence: what this step did or waits for.
    pub summary: String,
    /// The epoch of the newest map any node holds.
    pub epoch: u64,
    /// The move under way, as its source reports it.
    pub moving: Option<MoveStatus>,
    /// Moves still to start after the one under way.
    pub moves_left: usize,
    /// Whether this step changed anything (a move started, committed,
    /// aborted, a map published), as opposed to waiting.
    pub changed: bool,
}

/// Why a step could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriveError {
    /// The desired layout cannot be reached: nothing was moved.
    #[error("{0}")]
    Refused(String),
    /// Another driver holds the move lock.
    #[error("{0}")]
    Locked(String),
    /// A step failed; running it again finishes or rolls it back.
    #[error("{0}")]
    Failed(String),
}

impl DriveError {
    /// Whether trying again soon may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, DriveError::Failed(_))
    }
}

/// One driver of one cluster.
#[derive(Debug, Clone)]
pub struct Driver {
    /// Who holds the move lock: `cavi@host/pid`, `cavi-operator`.
    pub owner: String,
    /// How long the lock holds without a renewal (each step renews it).
    pub lock_ttl: Duration,
}

/// What one node told the driver.
struct Member {
    id: u32,
    addr: String,
    client: Client,
    view: Result<ClusterView, ClientError>,
}

fn failed(what: &str, e: &ClientError) -> DriveError {
    DriveError::Failed(format!("{what}: {e}"))
}

fn move_name(m: &PlannedMove) -> String {
    format!("{} from shard {} to shard {}", m.range, m.from, m.to)
}

fn status_name(s: &MoveStatus) -> String {
    let range = cavi_node::keyspace::KeyRange::new(s.range_start.clone(), s.range_end.clone());
    format!("{range} from shard {} to shard {}", s.source, s.target)
}

impl Driver {
    pub fn new(owner: impl Into<String>, lock_ttl: Duration) -> Self {
        Self {
            owner: owner.into(),
            lock_ttl,
        }
    }

    /// Asks every node of the live map and of the desired layout how it is.
    async fn observe(
        &self,
        entry: &Client,
        target: &ClusterConfig,
    ) -> Result<Vec<Member>, DriveError> {
        let live = entry.cluster().await.map_err(|e| {
            failed(
                &format!("cannot read the shard map from {}", entry.endpoint()),
                &e,
            )
        })?;
        let mut addrs: BTreeMap<u32, String> =
            live.shards.iter().map(|s| (s.id, s.addr.clone())).collect();
        for s in &target.shards {
            addrs.entry(s.id).or_insert_with(|| s.addr.clone());
        }
        let asks = addrs.into_iter().map(|(id, addr)| {
            let client = entry.for_addr(&addr, entry.timeout());
            async move {
                let view = client.cluster().await;
                Member {
                    id,
                    addr,
                    client,
                    view,
                }
            }
        });
        Ok(futures::future::join_all(asks).await)
    }

    /// Takes (or renews) the move lock on every node that answers, in id
    /// order; gives back what it took when one refuses.
    async fn lock(&self, members: &[&Member]) -> Result<(), DriveError> {
        let mut taken = Vec::new();
        for m in members {
            match m.client.lock(&self.owner, self.lock_ttl).await {
                Ok(_) => taken.push(*m),
                Err(ClientError::Server {
                    status: 409,
                    sentence,
                    ..
                }) => {
                    for t in taken {
                        let _ = t.client.unlock(&self.owner).await;
                    }
                    return Err(DriveError::Locked(format!(
                        "another reshard is under way on shard {}: {sentence}; if that driver was stopped, run again once the lock expires",
                        m.id
                    )));
                }
                Err(e) => {
                    return Err(failed(
                        &format!("cannot take the move lock on shard {}", m.id),
                        &e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Gives the move lock back on every node of `target` and of the live
    /// map that answers.
    pub async fn release(&self, entry: &Client, target: &ClusterConfig) {
        if let Ok(members) = self.observe(entry, target).await {
            for m in members.iter().filter(|m| m.view.is_ok()) {
                let _ = m.client.unlock(&self.owner).await;
            }
        }
    }

    /// Takes one step towards `target`: publishes the newest map to nodes
    /// behind, then finishes, commits or aborts the move under way, or
    /// starts the next, or publishes the final layout.
    pub async fn step(&self, entry: &Client, target: &ClusterConfig) -> Result<Report, DriveError> {
        target
            .validate()
            .map_err(|e| DriveError::Refused(format!("the layout is not valid: {e}")))?;
        let members = self.observe(entry, target).await?;

        // Every shard of the layout must answer, as itself.
        for s in &target.shards {
            let Some(m) = members.iter().find(|m| m.id == s.id) else {
                continue;
            };
            match &m.view {
                Err(e) => {
                    return Err(DriveError::Refused(format!(
                        "shard {} at {} does not answer ({e}); start it first (a shard the config does not list: kvstore-api {} <config> --listen {})",
                        s.id, s.addr, s.id, s.addr
                    )));
                }
                Ok(view) if view.shard_id != s.id => {
                    return Err(DriveError::Refused(format!(
                        "the layout puts shard {} at {}, but that address serves shard {}",
                        s.id, s.addr, view.shard_id
                    )));
                }
                Ok(_) => {}
            }
        }
        let answering: Vec<&Member> = members.iter().filter(|m| m.view.is_ok()).collect();
        let views: Vec<(&Member, &ClusterView)> = answering
            .iter()
            .filter_map(|m| m.view.as_ref().ok().map(|v| (*m, v)))
            .collect();
        let truth = views
            .iter()
            .max_by_key(|(_, v)| v.epoch)
            .map(|(_, v)| ShardMap {
                epoch: v.epoch,
                shards: v.shards.clone(),
            })
            .ok_or_else(|| DriveError::Failed("no shard answers".into()))?;
        // The plan is checked before anything changes hands.
        let planned = plan::plan(&truth, target).map_err(|e| match e {
            PlanError::Invalid(_) | PlanError::Orphaned { .. } => {
                DriveError::Refused(e.to_string())
            }
        })?;

        self.lock(&answering).await?;

        // Moves under way, as their sources report them.
        let sources: Vec<(&Member, &MoveStatus)> = views
            .iter()
            .flat_map(|(m, v)| v.moves.iter().map(move |s| (*m, s)))
            .filter(|(_, s)| s.role == Role::Source && !s.phase.is_final())
            .collect();

        // Nodes behind the newest map learn it (421s would too, later); a
        // source in the middle of a move switches maps through its commit.
        let mut changed = false;
        for (m, v) in &views {
            if v.epoch < truth.epoch && !sources.iter().any(|(s, _)| s.id == m.id) {
                m.client.publish(&truth).await.map_err(|e| {
                    failed(
                        &format!("shard {} refused map epoch {}", m.id, truth.epoch),
                        &e,
                    )
                })?;
                changed = true;
            }
        }

        let working = |summary: String, moving: Option<MoveStatus>, changed: bool| {
            Ok(Report::Working(Progress {
                summary,
                epoch: truth.epoch,
                moving,
                moves_left: planned.moves.len(),
                changed,
            }))
        };

        // A move under way: finish it, or give it up if it is not part of
        // the plan any more.
        if let Some((source, status)) = sources.first() {
            return self
                .follow(source, status, &members, &planned.moves, &truth)
                .await
                .and_then(|(summary, changed)| working(summary, Some((*status).clone()), changed));
        }
        // A target still receiving for a move its source does not know:
        // a start that never happened, or a source that restarted.
        let orphan = views.iter().find_map(|(m, v)| {
            v.moves
                .iter()
                .find(|s| s.role == Role::Target && s.phase == Phase::Receiving)
                .map(|s| (m, s))
        });
        if let Some((m, s)) = orphan {
            m.client.abort_incoming(&s.id).await.map_err(|e| {
                failed(&format!("cannot abort move {} on shard {}", s.id, m.id), &e)
            })?;
            return working(
                format!("dropped the unfinished move {} on shard {}", s.id, m.id),
                None,
                true,
            );
        }

        if let Some(next) = planned.moves.first() {
            return self
                .start(next, &members, &truth, target)
                .await
                .map(|summary| {
                    Report::Working(Progress {
                        summary,
                        epoch: truth.epoch,
                        moving: None,
                        moves_left: planned.moves.len() - 1,
                        changed: true,
                    })
                });
        }

        if plan::is_done(&truth, target) {
            if changed {
                return working(
                    format!("every shard learns map epoch {}", truth.epoch),
                    None,
                    true,
                );
            }
            return Ok(Report::Done { epoch: truth.epoch });
        }
        // Only key space nobody owned (or addresses) still differ.
        let last = plan::final_map(&truth, target);
        for (m, _) in &views {
            m.client.publish(&last).await.map_err(|e| {
                failed(
                    &format!("shard {} refused the final map epoch {}", m.id, last.epoch),
                    &e,
                )
            })?;
        }
        working(
            format!("published the layout as map epoch {}", last.epoch),
            None,
            true,
        )
    }

    /// Takes the move under way one step: commits it once it caught up,
    /// waits for its clean-up, or aborts it when the plan no longer has it.
    async fn follow(
        &self,
        source: &Member,
        status: &MoveStatus,
        members: &[Member],
        planned: &[PlannedMove],
        truth: &ShardMap,
    ) -> Result<(String, bool), DriveError> {
        let name = status_name(status);
        let wanted = planned.iter().any(|m| {
            m.from == status.source
                && m.to == status.target
                && m.range.start == status.range_start
                && m.range.end == status.range_end
        }) && status.epoch == truth.epoch + 1;
        match status.phase {
            Phase::Copying if !wanted => {
                source
                    .client
                    .abort_outgoing(&status.id)
                    .await
                    .map_err(|e| failed(&format!("cannot abort move {}", status.id), &e))?;
                if let Some(t) = members.iter().find(|m| m.id == status.target) {
                    let _ = t.client.abort_incoming(&status.id).await;
                }
                Ok((
                    format!("aborted the move of {name}: the layout no longer asks for it"),
                    true,
                ))
            }
            Phase::Copying if !(status.copy_done && status.lag <= COMMIT_LAG) => {
                // Renews the move's watchdog on the source.
                let now = source
                    .client
                    .outgoing(&status.id)
                    .await
                    .map_err(|e| failed(&format!("cannot follow move {}", status.id), &e))?;
                Ok((
                    format!(
                        "moving {name}: copied {} keys ({}){}",
                        now.keys_copied,
                        bytes(now.bytes_copied),
                        if now.copy_done {
                            format!(", catching up with {} writes", now.lag)
                        } else {
                            String::new()
                        }
                    ),
                    false,
                ))
            }
            Phase::Copying | Phase::Fenced => {
                crash_point("driver-before-commit");
                let done = source.client.commit_move(&status.id).await.map_err(|e| {
                    failed(
                        &format!("the commit of move {} ({name}) failed", status.id),
                        &e,
                    )
                })?;
                crash_point("driver-after-commit");
                Ok((
                    format!(
                        "committed {name} at map epoch {} ({} keys, {})",
                        done.epoch,
                        done.keys_copied,
                        bytes(done.bytes_copied)
                    ),
                    true,
                ))
            }
            _ => Ok((format!("cleaning up after moving {name}"), false)),
        }
    }

    /// Starts `next`: the target prepares, then the source starts.
    async fn start(
        &self,
        next: &PlannedMove,
        members: &[Member],
        truth: &ShardMap,
        target: &ClusterConfig,
    ) -> Result<String, DriveError> {
        let node = |id: u32| {
            members
                .iter()
                .find(|m| m.id == id)
                .filter(|m| m.view.is_ok())
                .ok_or_else(|| {
                    let addr = members
                        .iter()
                        .find(|m| m.id == id)
                        .map(|m| m.addr.as_str())
                        .unwrap_or("?");
                    DriveError::Failed(format!(
                        "shard {id} at {addr} does not answer; it takes part in the next move"
                    ))
                })
        };
        let (source, dest) = (node(next.from)?, node(next.to)?);
        let spec = MoveSpec {
            id: move_id(truth.epoch + 1, next),
            range_start: next.range.start.clone(),
            range_end: next.range.end.clone(),
            source: next.from,
            target: next.to,
            base_epoch: truth.epoch,
            map: plan::map_with_move(truth, target, next),
        };
        dest.client.prepare(&spec).await.map_err(|e| {
            failed(
                &format!("shard {} will not take {}", next.to, next.range),
                &e,
            )
        })?;
        crash_point("driver-after-prepare");
        if let Err(e) = source.client.start_move(&spec).await {
            let _ = dest.client.abort_incoming(&spec.id).await;
            return Err(failed(
                &format!("shard {} will not give {} away", next.from, next.range),
                &e,
            ));
        }
        crash_point("driver-after-start");
        Ok(format!(
            "started moving {} (move {})",
            move_name(next),
            spec.id
        ))
    }
}

/// `m<epoch>-<from>to<to>-<nonce>`: the epoch it commits, and a nonce so a
/// retried attempt is a different move.
fn move_id(epoch: u64, m: &PlannedMove) -> String {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0);
    format!("m{epoch}-{}to{}-{:08x}", m.from, m.to, nonce)
}

/// `1.5 MB`, `312 kB`, `12 B`.
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.0} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}
