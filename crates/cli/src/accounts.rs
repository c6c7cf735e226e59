//! `hearth accounts`: what the operator allows each tenant account (on the local database;
//! the daemon may be running and sees changes at once): `file://` artifacts, quotas and
//! request rates.

use anyhow::Context;
use hearth_api::store::{AccountSettings, Store};
use std::path::PathBuf;

/// Options of `hearth accounts`.
#[derive(clap::Subcommand, Debug)]
pub enum AccountsCmd {
    /// Show an account's settings: file:// root, request rate, and every quota with its value.
    Show {
        /// The account (12 digits; `hearth keys ls` lists them).
        account: String,
        /// The API's state directory.
        #[arg(long, env = "HEARTH_API_STATE")]
        state_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change an account's settings.
    Set {
        /// The account (12 digits; `hearth keys ls` lists them).
        account: String,
        /// Let the account name `file://` code artifacts beneath DIR (regular files and
        /// directories only, opened without following links). Without it, and by
        /// default, every `file://` artifact is refused: tenants upload their context
        /// with `hearth images create` instead.
        #[arg(long, value_name = "DIR", conflicts_with = "no_artifact_root")]
        artifact_root: Option<PathBuf>,
        /// Refuse `file://` code artifacts again.
        #[arg(long)]
        no_artifact_root: bool,
        /// Set a quota, NAME=VALUE (`NAME=default` drops the override); repeatable. NAME is
        /// one of microvms, vcpus, memory-mib, builds, images, image-versions,
        /// snapshot-gib, artifact-bytes (`hearth accounts show` lists them with their
        /// defaults). A running daemon applies it to the next call.
        #[arg(long, value_name = "NAME=VALUE", value_parser = hearth_api::quota::parse_setting)]
        quota: Vec<(hearth_api::quota::Quota, Option<u64>)>,
        /// The account's request rate, CALLS_PER_SECOND[/BURST] (0: unlimited), instead of
        /// the daemon's `--rate-limit`; applied within seconds.
        #[arg(long, value_name = "RATE[/BURST]", value_parser = hearth_api::ratelimit::Rate::parse, conflicts_with = "default_rate_limit")]
        rate_limit: Option<hearth_api::ratelimit::Rate>,
        /// Use the daemon's `--rate-limit` for this account again.
        #[arg(long)]
        default_rate_limit: bool,
        /// The API's state directory.
        #[arg(long, env = "HEARTH_API_STATE")]
        state_dir: Option<PathBuf>,
    },
}

fn open(state_dir: Option<PathBuf>, account: &str) -> anyhow::Result<Store> {
    let dir = state_dir.unwrap_or_else(|| hearth_vmm::home::hearth_home().join("api"));
    let db = dir.join("hearth.db");
    anyhow::ensure!(db.is_file(), "no API state at {} (start `hearth serve` once, or pass --state-dir)", dir.display());
    let store = Store::open(&db)?;
    anyhow::ensure!(account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()), "the account must be 12 digits");
    anyhow::ensure!(store.keys()?.iter().any(|k| k.account == account), "no account {account} (hearth keys ls)");
    Ok(store)
}

fn print(account: &str, s: &AccountSettings, json: bool) {
    use hearth_api::quota::{limit, Quota};
    if json {
        let quotas: serde_json::Map<String, serde_json::Value> =
            Quota::ALL.iter().map(|q| (q.name().to_owned(), limit(&s.quotas, *q).into())).collect();
        let rate = s.rate_limit.map(|r| serde_json::to_value(r).unwrap_or_default());
        println!("{}", serde_json::json!({ "account": account, "settings": s, "quotas": quotas, "rateLimit": rate }));
        return;
    }
    let root = s.artifact_root.as_ref().map_or_else(|| "none (file:// artifacts refused)".to_owned(), |p| p.display().to_string());
    let rate = s.rate_limit.map_or_else(|| "the daemon's --rate-limit".to_owned(), |r| r.to_string());
    println!("account        {account}\nartifact root  {root}\nrate limit     {rate}\nquotas");
    for q in Quota::ALL {
        let set = if s.quotas.contains_key(&q) { "set" } else { "default" };
        println!("  {:<15} {:>14}  {set:<8} {}", q.name(), limit(&s.quotas, q), q.describe());
    }
}

/// Runs a `hearth accounts` command.
pub fn run(cmd: AccountsCmd) -> anyhow::Result<()> {
    match cmd {
        AccountsCmd::Show { account, state_dir, json } => {
            let store = open(state_dir, &account)?;
            print(&account, &store.account_settings(&account)?, json);
        }
        AccountsCmd::Set { account, artifact_root, no_artifact_root, quota, rate_limit, default_rate_limit, state_dir } => {
            let store = open(state_dir, &account)?;
            let mut s = store.account_settings(&account)?;
            if let Some(root) = artifact_root {
                // Kept canonical: the daemon opens it as it is, links and all resolved now,
                // by the operator, once.
                let root = std::fs::canonicalize(&root).with_context(|| format!("--artifact-root {}", root.display()))?;
                anyhow::ensure!(root.is_dir(), "--artifact-root {} is not a directory", root.display());
                s.artifact_root = Some(root);
            }
            if no_artifact_root {
                s.artifact_root = None;
            }
            for (q, v) in quota {
                match v {
                    Some(n) => s.quotas.insert(q, n),
                    None => s.quotas.remove(&q),
                };
            }
            if rate_limit.is_some() || default_rate_limit {
                s.rate_limit = rate_limit;
            }
            store.set_account_settings(&account, &s)?;
            print(&account, &s, false);
        }
    }
    Ok(())
}
