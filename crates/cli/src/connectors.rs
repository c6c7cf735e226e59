//! `hearth connectors`: the operator's named egress connectors (on the local database; a
//! running daemon applies a change to the microvms naming it on its next policy pass).
//! Every account sees them, as `arn:aws-hearth:lambda:hh-local-1:hearth:egress-connector:NAME`.

use anyhow::Context;
use hearth_api::store::{Store, OPERATOR};
use std::path::PathBuf;

/// Options of `hearth connectors`.
#[derive(clap::Subcommand, Debug)]
pub enum ConnectorsCmd {
    /// Create or replace an operator connector.
    Set {
        /// Its name (1-64 letters, digits, '-' or '_').
        name: String,
        /// A destination, CIDR[:PORT[-PORT]][/tcp|/udp]; repeatable. The host's ceiling
        /// (`hearth serve --egress-allow-private`) still cuts closed ranges.
        #[arg(long = "allow-cidr", value_name = "RULE")]
        allow_cidrs: Vec<String>,
        /// A domain, `example.com` or `*.example.org`; repeatable. Names on the list
        /// resolve and are reached on TCP 80/443 when the TLS SNI or HTTP Host matches.
        #[arg(long = "allow-domain", value_name = "NAME")]
        allow_domains: Vec<String>,
        /// The API's state directory.
        #[arg(long, env = "HEARTH_API_STATE")]
        state_dir: Option<PathBuf>,
    },
    /// List every connector: the operator's and each account's.
    Ls {
        /// The API's state directory.
        #[arg(long, env = "HEARTH_API_STATE")]
        state_dir: Option<PathBuf>,
    },
    /// Delete an operator connector (microvms naming it lose what it allowed).
    Rm {
        /// Its name.
        name: String,
        /// The API's state directory.
        #[arg(long, env = "HEARTH_API_STATE")]
        state_dir: Option<PathBuf>,
    },
}

fn open(state_dir: Option<PathBuf>) -> anyhow::Result<Store> {
    let dir = state_dir.unwrap_or_else(|| hearth_vmm::home::hearth_home().join("api"));
    let db = dir.join("hearth.db");
    anyhow::ensure!(db.is_file(), "no API state at {} (start `hearth serve` once, or pass --state-dir)", dir.display());
    Ok(Store::open(&db)?)
}

/// Runs `hearth connectors`.
pub fn run(cmd: ConnectorsCmd) -> anyhow::Result<()> {
    match cmd {
        ConnectorsCmd::Set { name, allow_cidrs, allow_domains, state_dir } => {
            let store = open(state_dir)?;
            let body = serde_json::json!({ "allowCidrs": allow_cidrs, "allowDomains": allow_domains });
            let mut c = hearth_api::service::connector_from(OPERATOR, &name, &body, None).map_err(|e| anyhow::anyhow!("{}", e.message))?;
            if let Some(old) = store.connector(OPERATOR, &name)? {
                c.created_at = old.created_at;
            } else {
                anyhow::ensure!(
                    store.connectors(Some(OPERATOR))?.len() < hearth_api::service::MAX_CONNECTORS,
                    "the operator has {} connectors, the most there may be; delete one first",
                    hearth_api::service::MAX_CONNECTORS
                );
            }
            store.put_connector(&c).context("store the connector")?;
            println!("{}", hearth_api::service::connector_arn(OPERATOR, &name));
        }
        ConnectorsCmd::Ls { state_dir } => {
            for c in open(state_dir)?.connectors(None)? {
                println!("{}", hearth_api::service::connector_json(&c));
            }
        }
        ConnectorsCmd::Rm { name, state_dir } => {
            anyhow::ensure!(open(state_dir)?.delete_connector(OPERATOR, &name)?, "no operator connector {name} (hearth connectors ls)");
        }
    }
    Ok(())
}
