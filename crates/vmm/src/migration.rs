//! QEMU migration: the one way Hearth saves a VM's state to a file and loads it back.
//!
//! A save and a load take the same steps on a QMP session: set the capabilities and
//! parameters of the snapshot's layout ([`capabilities`], [`parameters`]), start the
//! migration (`migrate` to a `file:` URI, or `migrate-incoming` into a QEMU started with
//! `-incoming defer`), then poll `query-migrate` until QEMU reports it completed
//! ([`wait`]). Two layouts exist:
//!
//! - templates keep RAM in a file of their own, shared with QEMU; `x-ignore-shared` leaves
//!   it out of the stream, so the state file is device state only;
//! - suspended VMs and forks carry RAM in the state file in `mapped-ram` layout (every
//!   page at a fixed offset, zero pages skipped), written and read by several threads.
//!
//! The VM is stopped when it is saved, so after a load it stays paused until `cont`.

use crate::qmp::{Qmp, QmpError};
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// Longest a save may take before it is cancelled.
const SAVE_DEADLINE: Duration = Duration::from_secs(600);
/// Limit for each QMP command of a save (a load runs under its caller's deadline).
const SAVE_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two `query-migrate` polls while saving.
const SAVE_POLL: Duration = Duration::from_millis(2);
/// Pause between two `query-migrate` polls while loading (a template loads in
/// milliseconds: the poll is most of the wait).
const LOAD_POLL: Duration = Duration::from_millis(1);
/// Threads QEMU uses to write or read RAM of a `mapped-ram` image.
const MULTIFD_CHANNELS: u8 = 4;

/// A failed save or load.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MigrationError {
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU reported the migration failed or was cancelled.
    #[error("QEMU could not {op} the state: {reason}")]
    Failed {
        /// `save` or `load`.
        op: &'static str,
        /// QEMU's `error-desc`.
        reason: String,
    },
    /// The save ran past its deadline and was cancelled.
    #[error("saving took longer than {0:?}; cancelled")]
    Deadline(Duration),
}

/// Migration capabilities for templates (`x-ignore-shared`: RAM stays in its file) or
/// suspend images (`mapped-ram`: RAM pages at fixed offsets, zero pages skipped).
pub(crate) fn capabilities(mapped_ram: bool) -> serde_json::Value {
    json!({ "capabilities": [
        { "capability": "x-ignore-shared", "state": !mapped_ram },
        { "capability": "mapped-ram", "state": mapped_ram },
        // With mapped-ram every page has a fixed place in the file, so several threads
        // can write (and read back) RAM at once.
        { "capability": "multifd", "state": mapped_ram },
    ]})
}

/// Migration parameters matching [`capabilities`].
pub(crate) fn parameters(mapped_ram: bool) -> serde_json::Value {
    let mut p = json!({ "max-bandwidth": 64u64 << 30 });
    if mapped_ram {
        p["multifd-channels"] = json!(MULTIFD_CHANNELS);
    }
    p
}

fn file_uri(file: &Path) -> serde_json::Value {
    json!({ "uri": format!("file:{}", file.display()) })
}

async fn run(
    qmp: &mut Qmp,
    command: &str,
    args: Option<serde_json::Value>,
    limit: Option<Duration>,
) -> Result<serde_json::Value, QmpError> {
    match limit {
        Some(limit) => qmp.execute_timeout(command, args, limit).await,
        None => qmp.execute(command, args).await,
    }
}

/// Sets the layout's capabilities and parameters.
async fn configure(qmp: &mut Qmp, mapped_ram: bool, limit: Option<Duration>) -> Result<(), QmpError> {
    run(qmp, "migrate-set-capabilities", Some(capabilities(mapped_ram)), limit).await?;
    run(qmp, "migrate-set-parameters", Some(parameters(mapped_ram)), limit).await?;
    Ok(())
}

/// Polls `query-migrate` every `poll` until the migration completed, failed, or (when
/// given) ran longer than `deadline` (then it is cancelled).
async fn wait(
    qmp: &mut Qmp,
    op: &'static str,
    poll: Duration,
    deadline: Option<Duration>,
    limit: Option<Duration>,
) -> Result<(), MigrationError> {
    let started = Instant::now();
    loop {
        if let Some(deadline) = deadline.filter(|d| started.elapsed() > *d) {
            let _ = run(qmp, "migrate_cancel", None, limit).await;
            return Err(MigrationError::Deadline(deadline));
        }
        let r = run(qmp, "query-migrate", None, limit).await?;
        match r.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let reason = r.get("error-desc").and_then(|s| s.as_str()).unwrap_or("unknown error").to_owned();
                return Err(MigrationError::Failed { op, reason });
            }
            _ => tokio::time::sleep(poll).await,
        }
    }
}

/// Saves the stopped VM's state into `file` and waits for it (at most [`SAVE_DEADLINE`];
/// then the migration is cancelled).
pub(crate) async fn save(qmp: &mut Qmp, file: &Path, mapped_ram: bool) -> Result<(), MigrationError> {
    let limit = Some(SAVE_COMMAND_TIMEOUT);
    configure(qmp, mapped_ram, limit).await?;
    run(qmp, "migrate", Some(file_uri(file)), limit).await?;
    wait(qmp, "save", SAVE_POLL, Some(SAVE_DEADLINE), limit).await
}

/// Loads `state` into a QEMU started with `-incoming defer`, waits until it is loaded and
/// lets the VM run.
pub(crate) async fn load(qmp: &mut Qmp, state: &Path, mapped_ram: bool) -> Result<(), MigrationError> {
    configure(qmp, mapped_ram, None).await?;
    run(qmp, "migrate-incoming", Some(file_uri(state)), None).await?;
    wait(qmp, "load", LOAD_POLL, None, None).await?;
    // The VM was stopped when it was saved, so it stays paused after loading.
    run(qmp, "cont", None, None).await?;
    tracing::debug!(state = %state.display(), "snapshot loaded, VM running");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_layouts_set_opposite_capabilities() {
        let state = |c: &serde_json::Value, name: &str| {
            c["capabilities"].as_array().unwrap().iter().find(|x| x["capability"] == name).unwrap()["state"].as_bool().unwrap()
        };
        let (template, mapped) = (capabilities(false), capabilities(true));
        assert!(state(&template, "x-ignore-shared") && !state(&template, "mapped-ram") && !state(&template, "multifd"));
        assert!(!state(&mapped, "x-ignore-shared") && state(&mapped, "mapped-ram") && state(&mapped, "multifd"));
        assert!(parameters(false).get("multifd-channels").is_none());
        assert_eq!(parameters(true)["multifd-channels"], MULTIFD_CHANNELS);
    }

    #[tokio::test]
    async fn a_load_polls_until_completed_then_runs_the_vm() {
        let (_d, p) = crate::qmp::tests::fake_qemu(&[
            "{\"return\": {}, \"id\": 1}\n",
            "{\"return\": {}, \"id\": 2}\n",
            "{\"return\": {}, \"id\": 3}\n",
            "{\"return\": {}, \"id\": 4}\n",
            "{\"return\": {\"status\": \"active\"}, \"id\": 5}\n",
            "{\"return\": {\"status\": \"completed\"}, \"id\": 6}\n",
            "{\"return\": {}, \"id\": 7}\n",
        ])
        .await;
        let mut q = Qmp::connect(&p).await.unwrap();
        load(&mut q, Path::new("/state"), true).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_save_reports_qemus_reason() {
        let (_d, p) = crate::qmp::tests::fake_qemu(&[
            "{\"return\": {}, \"id\": 1}\n",
            "{\"return\": {}, \"id\": 2}\n",
            "{\"return\": {}, \"id\": 3}\n",
            "{\"return\": {}, \"id\": 4}\n",
            "{\"return\": {\"status\": \"failed\", \"error-desc\": \"No space left on device\"}, \"id\": 5}\n",
        ])
        .await;
        let mut q = Qmp::connect(&p).await.unwrap();
        let e = save(&mut q, Path::new("/state"), true).await.unwrap_err();
        assert_eq!(e.to_string(), "QEMU could not save the state: No space left on device");
    }
}
