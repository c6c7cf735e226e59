//! `hearth accounts`: what the operator allows each tenant account (on the local database;
//! the daemon may be running and sees changes at once).

use anyhow::Context;
use hearth_api::store::{AccountSettings, Store};
use std::path::PathBuf;

/// Options of `hearth accounts`.
#[derive(clap::Subcommand, Debug)]
pub enum AccountsCmd {
    /// Show an account's settings.
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
    if json {
        println!("{}", serde_json::json!({ "account": account, "settings": s }));
    } else {
        let root = s.artifact_root.as_ref().map_or_else(|| "none (file:// artifacts refused)".to_owned(), |p| p.display().to_string());
        println!("account        {account}\nartifact root  {root}");
    }
}

/// Runs a `hearth accounts` command.
pub fn run(cmd: AccountsCmd) -> anyhow::Result<()> {
    match cmd {
        AccountsCmd::Show { account, state_dir, json } => {
            let store = open(state_dir, &account)?;
            print(&account, &store.account_settings(&account)?, json);
        }
        AccountsCmd::Set { account, artifact_root, no_artifact_root, state_dir } => {
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
            store.set_account_settings(&account, &s)?;
            print(&account, &s, false);
        }
    }
    Ok(())
}
