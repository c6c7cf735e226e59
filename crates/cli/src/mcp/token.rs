//! `hearth mcp token`: mints a bearer token for the daemon's own MCP server (`/mcp` on
//! `hearth serve`'s API) and prints it with ready-to-paste client configurations.

use crate::client::Conn;
use anyhow::Context;
use serde_json::json;

/// Mints a token lasting `minutes` with `conn`'s key; prints it (JSON with `--json`).
pub async fn run(conn: &Conn, minutes: u64) -> anyhow::Result<i32> {
    anyhow::ensure!((1..=1440).contains(&minutes), "--minutes {minutes}: give 1 to 1440");
    let api = conn.client()?;
    let v = api
        .call(http::Method::POST, "/hearth/v1/mcp-tokens", Some(&json!({ "expirationInMinutes": minutes })))
        .await
        .context("mint an MCP token (POST /hearth/v1/mcp-tokens)")?;
    let (token, url) = (v["token"].as_str().unwrap_or_default(), v["url"].as_str().unwrap_or_default());
    anyhow::ensure!(!token.is_empty() && !url.is_empty(), "the daemon's answer has no token or url: {v}");
    let servers =
        json!({ "mcpServers": { "hearth": { "type": "http", "url": url, "headers": { "Authorization": format!("Bearer {token}") } } } });
    if conn.json {
        println!("{}", json!({ "token": token, "url": url, "expiresAt": v["expiresAt"], "config": servers }));
        return Ok(0);
    }
    println!("MCP server  {url}");
    println!("token       {token}");
    println!("expires     in {minutes} minutes (at {} seconds since the epoch)", v["expiresAt"]);
    println!("\nClaude Code:\n  claude mcp add --transport http hearth {url} --header \"Authorization: Bearer {token}\"");
    println!("\nClaude Desktop, Cursor and other clients (mcpServers in their JSON settings):");
    println!("{}", serde_json::to_string_pretty(&servers)?);
    println!("\nThe token acts with your access key on the MCP server only; anyone holding it can, until it expires.");
    Ok(0)
}
