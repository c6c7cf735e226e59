//! `hearth images …`: the one family for images. A user builds and manages images through
//! the API (`create`, `ls`, `get`, `rm`: a client of `hearth serve`, like the other client
//! commands); the operator's store on this host, which needs no daemon, sits under
//! `hearth images local …` with the verbs it always had.

use crate::client::{all_pages, enc, print, simple, Conn};
use crate::imagecmd::LocalCmd;
use clap::Subcommand;
use serde_json::{json, Value};

/// `hearth images …`: through the API (create, ls, get, rm), or in the operator's local
/// store on this host (`local …`).
#[derive(Subcommand, Debug)]
pub enum ImagesCmd {
    /// Build an image from a code artifact (CreateMicrovmImage, or UpdateMicrovmImage for
    /// an existing name) and wait for the build.
    Create {
        /// Image name.
        name: String,
        /// Code artifact: a local directory or zip (uploaded to the daemon), an http:// or
        /// https:// zip, a file:// path the operator allows the account, or a
        /// hearth://artifacts/… upload.
        artifact: String,
        /// Managed base image.
        #[arg(long, default_value = "debian-bookworm")]
        base: String,
        /// The app's hooks port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The build's role (`buildRoleArn`): a role of your account. Default: the role
        /// `hearth-build`, created through the daemon's IAM when missing.
        #[arg(long)]
        build_role_arn: Option<String>,
        /// Return at once instead of waiting for the build.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List images.
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show an image and its versions.
    Get {
        /// Image name or ARN.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete an image.
    Rm {
        /// Image name or ARN.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The operator's image store on this host ($HEARTH_HOME/images), without the API:
    /// build from a Dockerfile context, ls, show, rm, run.
    #[command(subcommand)]
    Local(LocalCmd),
}

/// The role builds run with when none is named: `hearth-build` of the caller's account,
/// created through the daemon's IAM (trusting the account) when it does not exist yet.
async fn build_role(c: &hearth_api::client::Client, quiet: bool) -> anyhow::Result<String> {
    use hearth_api::client::{xml_text, ClientError};
    const ROLE: &str = "hearth-build";
    match c.aws_query("iam", "GetRole", &[("RoleName", ROLE)]).await {
        Ok(xml) => return xml_text(&xml, "Arn").ok_or_else(|| anyhow::anyhow!("GetRole answered no Arn")),
        Err(ClientError::Api { code, .. }) if code == "NoSuchEntity" => {}
        Err(e) => return Err(e.into()),
    }
    let me = c.aws_query("sts", "GetCallerIdentity", &[]).await?;
    let account = xml_text(&me, "Account").ok_or_else(|| anyhow::anyhow!("GetCallerIdentity answered no Account"))?;
    let trust = json!({ "Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": { "AWS": format!("arn:aws:iam::{account}:root") }, "Action": "sts:AssumeRole" }] });
    let made = match c
        .aws_query(
            "iam",
            "CreateRole",
            &[("RoleName", ROLE), ("AssumeRolePolicyDocument", &trust.to_string()), ("Description", "builds of `hearth images create`")],
        )
        .await
    {
        Ok(xml) => xml,
        // Made meanwhile by another `hearth images create`.
        Err(ClientError::Api { code, .. }) if code == "EntityAlreadyExists" => c.aws_query("iam", "GetRole", &[("RoleName", ROLE)]).await?,
        Err(e) => return Err(e.into()),
    };
    let arn = xml_text(&made, "Arn").ok_or_else(|| anyhow::anyhow!("CreateRole answered no Arn"))?;
    if !quiet {
        eprintln!("created role {arn} for builds (`aws iam put-role-policy --role-name {ROLE} …` gives it permissions)");
    }
    Ok(arn)
}

/// Runs an images command; returns the exit code.
pub async fn run(cmd: ImagesCmd) -> anyhow::Result<i32> {
    match cmd {
        ImagesCmd::Create { name, artifact, base, port, build_role_arn, no_wait, conn } => {
            let c = conn.client()?;
            let role = match build_role_arn {
                Some(r) => r,
                None => build_role(&c, conn.json).await?,
            };
            let uri = crate::upload::artifact_uri(&c, &artifact, conn.json).await?;
            let base_arn = if base.starts_with("arn:") { base } else { hearth_api::service::managed_arn(&base) };
            let mut body = json!({
                "baseImageArn": base_arn,
                "buildRoleArn": role,
                "codeArtifact": { "uri": uri },
                "hooks": { "port": port },
            });
            let exists = c.call(http::Method::GET, &format!("/2025-09-09/microvm-images/{}", enc(&name)), None).await.is_ok();
            let v = if exists {
                c.call(http::Method::PUT, &format!("/2025-09-09/microvm-images/{}", enc(&name)), Some(&body)).await?
            } else {
                body["name"] = name.clone().into();
                c.call(http::Method::POST, "/2025-09-09/microvm-images", Some(&body)).await?
            };
            let version = v["imageVersion"].as_str().unwrap_or("1").to_owned();
            if no_wait {
                print(&conn, &v, |_| println!("{name}:v{version} building"));
                return Ok(0);
            }
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_message(format!("building {name}:v{version}"));
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            let v = loop {
                let v = c.call(http::Method::GET, &format!("/2025-09-09/microvm-images/{}/versions/{version}", enc(&name)), None).await?;
                if matches!(v["state"].as_str(), Some("SUCCESSFUL" | "FAILED")) {
                    break v;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            };
            bar.finish_and_clear();
            print(&conn, &v, |v| {
                println!("{name}:v{version} {}", v["state"].as_str().unwrap_or(""));
                if let Some(r) = v["stateReason"].as_str() {
                    println!("{r}");
                }
            });
            Ok(if v["state"] == "SUCCESSFUL" { 0 } else { 1 })
        }
        ImagesCmd::Ls { conn } => {
            let items = all_pages(&conn.client()?, "/2025-09-09/microvm-images").await?;
            print(&conn, &Value::Array(items.clone()), |_| {
                println!("{:<24} {:<14} {:<8} FAILED", "NAME", "STATE", "ACTIVE");
                for i in &items {
                    println!(
                        "{:<24} {:<14} {:<8} {}",
                        i["name"].as_str().unwrap_or(""),
                        i["state"].as_str().unwrap_or(""),
                        i["latestActiveImageVersion"].as_str().unwrap_or("-"),
                        i["latestFailedImageVersion"].as_str().unwrap_or("-")
                    );
                }
            });
            Ok(0)
        }
        ImagesCmd::Get { name, conn } => {
            let c = conn.client()?;
            let mut v = c.call(http::Method::GET, &format!("/2025-09-09/microvm-images/{}", enc(&name)), None).await?;
            v["versions"] = Value::Array(all_pages(&c, &format!("/2025-09-09/microvm-images/{}/versions", enc(&name))).await?);
            print(&conn, &v, |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
            Ok(0)
        }
        ImagesCmd::Rm { name, conn } => {
            simple(&conn, http::Method::DELETE, &format!("/2025-09-09/microvm-images/{}", enc(&name)), "deleted").await
        }
        ImagesCmd::Local(cmd) => crate::imagecmd::run(cmd).await,
    }
}
