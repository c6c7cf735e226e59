//! `hearth base …`: the root filesystems VMs start from.

use clap::Subcommand;
use hearth_image::base::Base;
use std::path::PathBuf;

/// Base image commands.
#[derive(Subcommand, Debug)]
pub enum BaseCmd {
    /// List managed base images (built or not) and imported ones.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build a managed base image: minimal (alias busybox), debian-bookworm, python or
    /// nodejs (the last two are otherwise built on their first use).
    Build {
        /// The base.
        name: Base,
    },
    /// Import a `docker save` archive or an OCI image layout tar as a root filesystem
    /// (layers applied in order, whiteouts honoured); use it with `--rootfs PATH`.
    Import {
        /// The archive.
        archive: PathBuf,
        /// Name of the imported image (letters, digits, `-`, `_`, `.`).
        #[arg(long)]
        name: String,
    },
}

fn imported_path(name: &str) -> PathBuf {
    hearth_vmm::home::hearth_home().join("rootfs").join(format!("imported-{name}.ext4"))
}

/// Runs a base command.
pub async fn run(cmd: BaseCmd) -> anyhow::Result<i32> {
    let home = hearth_vmm::home::hearth_home();
    match cmd {
        BaseCmd::Ls { json } => {
            let mut rows = Vec::new();
            for base in Base::ALL {
                let p = base.path(&home);
                rows.push((base.name().to_owned(), "managed", p.is_file().then_some(p)));
            }
            for e in std::fs::read_dir(home.join("rootfs")).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(name) = n.strip_prefix("imported-").and_then(|n| n.strip_suffix(".ext4")) {
                    rows.push((name.to_owned(), "imported", Some(e.path())));
                }
            }
            if json {
                let v: Vec<_> =
                    rows.iter().map(|(n, k, p)| serde_json::json!({ "name": n, "kind": k, "path": p, "built": p.is_some() })).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<20} {:<9} PATH", "NAME", "KIND");
                for (n, k, p) in rows {
                    let p = p.map_or_else(|| "(not built: hearth base build NAME)".to_owned(), |p| p.display().to_string());
                    println!("{n:<20} {k:<9} {p}");
                }
            }
            Ok(0)
        }
        BaseCmd::Build { name } => {
            let h = home.clone();
            let path = tokio::task::spawn_blocking(move || name.ensure(&h, &|m| eprintln!("{m}"))).await??;
            println!("{}", path.display());
            Ok(0)
        }
        BaseCmd::Import { archive, name } => {
            anyhow::ensure!(
                !name.is_empty()
                    && name.len() <= 64
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    && !name.starts_with('.'),
                "image name {name:?} must be 1-64 letters, digits, '-', '_' or '.'"
            );
            let out = imported_path(&name);
            anyhow::ensure!(!out.exists(), "an imported image named {name} exists already ({})", out.display());
            let o = out.clone();
            tokio::task::spawn_blocking(move || hearth_image::oci::import(&archive, &o, 1024)).await??;
            println!("{}", out.display());
            Ok(0)
        }
    }
}
