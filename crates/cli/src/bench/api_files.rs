//! `hearth-bench api`'s files item: throughput of file transfers through the API (the
//! client's `PUT`/`GET …/files`, SigV4 over the body's hash, the daemon's streaming, the
//! agent channel, the guest's disk), both ways, at each size of `--files-mib`, against the
//! engine's own agent transfer of the same file in the same run (a VM launched from the
//! engine's template, its agent's `write_file`/`read_file` straight from and to a local
//! file, no HTTP API, no hash).
//!
//! The file is incompressible (nothing on the way compresses, but no stage gets an easy
//! ride) and lands on each guest's root disk. An upload's time includes the client's
//! hashing of the file (a SigV4-signed streamed upload needs it first).

use crate::daemon::BenchDaemon;
use crate::report::Row;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

/// Writes `mib` MiB of incompressible bytes to `path`.
fn make_file(path: &Path, mib: usize) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut block = vec![0u8; 1 << 20];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut block)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..mib {
        // Each MiB differs from the others (a counter in its first bytes).
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    (bytes as f64 / 1e6) / secs
}

/// Measures uploads and downloads of files of each size in `sizes_mib` through the API
/// and through the engine's agent; returns the rows (MB/s, one sample each).
pub async fn files(d: &BenchDaemon, sizes_mib: &[usize]) -> anyhow::Result<Vec<Row>> {
    if sizes_mib.is_empty() {
        return Ok(Vec::new());
    }
    let c = &d.client;
    let m = c.call(http::Method::POST, "/2025-09-09/microvms", Some(&json!({ "imageIdentifier": "bench" }))).await?;
    anyhow::ensure!(m["state"] == "RUNNING", "RunMicrovm answered {m}");
    let id = m["microvmId"].as_str().unwrap_or_default().to_owned();
    let snap = crate::api_load::engine_template(d).await?;
    let opts = hearth_vmm::RestoreOptions { run_root: d.vm.run_root.clone(), ..hearth_vmm::RestoreOptions::new() };
    let vm = hearth_vmm::Vm::launch(&snap, &opts).await?;
    let mut rows = Vec::new();
    let dir = d.state.path().join("files-bench");
    std::fs::create_dir_all(&dir)?;
    for &mib in sizes_mib {
        let local = dir.join("up");
        make_file(&local, mib)?;
        let bytes = (mib as u64) << 20;
        let guest = "/bench-file";
        let url = format!("/hearth/v1/microvms/{id}/files?path={guest}");
        eprintln!("files: {mib} MiB up and down, through the API and the engine's agent");

        let t = Instant::now();
        c.put_file(&url, &local).await?;
        let api_up = mbps(bytes, t.elapsed().as_secs_f64());
        let back = dir.join("down");
        let t = Instant::now();
        let n = c.get_to_file(&url, &back).await?;
        let api_down = mbps(bytes, t.elapsed().as_secs_f64());
        anyhow::ensure!(n == bytes, "the API download brought {n} of {bytes} bytes");
        std::fs::remove_file(&back)?;
        c.call(http::Method::POST, &format!("/hearth/v1/microvms/{id}/exec"), Some(&json!({ "command": ["rm", "-f", guest] }))).await?;

        let path = hearth_proto::binpath::BinPath::from(guest);
        let t = Instant::now();
        let file = tokio::fs::File::open(&local).await?;
        vm.agent().write_file(&path, None, tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)).await?;
        let engine_up = mbps(bytes, t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut chunks = vm.agent().read_file(&path, 0, None).await?;
        let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(&back).await?);
        let mut got = 0u64;
        {
            use futures_util::StreamExt;
            use tokio::io::AsyncWriteExt;
            while let Some(c) = chunks.next().await {
                let c = c?;
                got += c.len() as u64;
                out.write_all(&c).await?;
            }
            out.flush().await?;
        }
        let engine_down = mbps(bytes, t.elapsed().as_secs_f64());
        anyhow::ensure!(got == bytes, "the engine's download brought {got} of {bytes} bytes");
        vm.exec(&hearth_proto::exec::ExecRequest::argv(["rm", "-f", guest]), None, 1 << 16).await?;
        std::fs::remove_file(&back)?;
        std::fs::remove_file(&local)?;

        rows.push(Row { name: format!("file upload, {mib} MiB (API: hash + signed streamed PUT)"), samples: vec![api_up], unit: "MB/s" });
        rows.push(Row { name: format!("baseline: engine agent write_file, {mib} MiB"), samples: vec![engine_up], unit: "MB/s" });
        rows.push(Row { name: format!("file download, {mib} MiB (API: GET)"), samples: vec![api_down], unit: "MB/s" });
        rows.push(Row { name: format!("baseline: engine agent read_file, {mib} MiB"), samples: vec![engine_down], unit: "MB/s" });
    }
    vm.kill().await;
    c.call(http::Method::DELETE, &format!("/2025-09-09/microvms/{id}"), None).await?;
    Ok(rows)
}
