//! `hearth-bench build`: an image build from scratch against a rebuild after a one-file
//! code change (the layer cache's goal: the rebuild costs at most 20 % of the full build).
//!
//! The app is the test suite's: a Python HTTP server on debian-bookworm with a package
//! installed by `apt-get` in a RUN step (so the builder's network is part of the figure).
//! Each round gets fresh cache keys (a unique ARG), so its first build really runs every
//! step.

use crate::report::{self, ms, Row};
use crate::vmargs::VmArgs;
use clap::Args;
use hearth_image::base::Base;
use hearth_image::build::{self, BuildRequest};
use std::time::{Duration, Instant};

/// Options of `hearth-bench build`.
#[derive(Args, Debug)]
pub struct BenchBuildArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Rounds (each: one full build, one rebuild).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
}

const APP: &str = r#"import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"VERSION"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", 8080), H).serve_forever()
"#;

/// Runs the benchmark.
pub async fn run(args: BenchBuildArgs) -> anyhow::Result<()> {
    let home = hearth_vmm::home::hearth_home();
    let mut a = args.vm.clone();
    a.rootfs = "debian-bookworm".into();
    let (mut full, mut rebuild, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let tmp = tempfile::tempdir()?;
        let ctx = tmp.path().join("ctx");
        std::fs::create_dir(&ctx)?;
        let nonce = format!("{}-{round}", std::process::id());
        std::fs::write(
            ctx.join("Dockerfile"),
            format!(
                "FROM debian:bookworm\nARG NONCE={nonce}\nRUN apt-get update && apt-get install -y --no-install-recommends python3 jq\n\
                 WORKDIR /app\nCOPY app.py /app/\nCMD [\"python3\", \"/app/app.py\"]\n"
            ),
        )?;
        std::fs::write(ctx.join("app.py"), APP.replace("VERSION", "v1"))?;
        let req = BuildRequest {
            context: ctx.clone(),
            base: Base::DebianBookworm,
            env: Default::default(),
            hooks_port: 8080,
            ready_hook: true,
            ready_timeout: Duration::from_secs(120),
            validate: false,
            validate_timeout: Duration::from_secs(120),
            network: args.vm.net.egress(crate::vmargs::EgressMode::Internet)?,
            cache: Some(hearth_image::layers::LayerCache::new(&home)),
            images: std::sync::Arc::new(hearth_image::build::NoImages),
            disk_gib: None,
            cache_scope: None,
        };
        eprintln!("round {}: full build", round + 1);
        let t = Instant::now();
        build::build(&req, a.config()?, &home, &tmp.path().join("v1"), &mut |_| {}).await?;
        let f = ms(t.elapsed());
        std::fs::write(ctx.join("app.py"), APP.replace("VERSION", "v2"))?;
        eprintln!("round {}: rebuild after a code change", round + 1);
        let t = Instant::now();
        build::build(&req, a.config()?, &home, &tmp.path().join("v2"), &mut |_| {}).await?;
        let r = ms(t.elapsed());
        full.push(f);
        rebuild.push(r);
        ratio.push(100.0 * r / f);
    }
    report::print(
        vec![
            Row { name: "full build (apt-get install, COPY, app start, snapshot)".into(), samples: full, unit: "ms" },
            Row { name: "rebuild after a one-file code change".into(), samples: rebuild, unit: "ms" },
            Row { name: "rebuild / full build".into(), samples: ratio, unit: "%" },
        ],
        args.json,
        serde_json::json!({ "accel": hearth_vmm::accel::resolve(args.vm.accel).to_string() }),
    );
    Ok(())
}
