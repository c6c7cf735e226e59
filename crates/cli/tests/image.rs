//! Images built elsewhere: an OCI image layout archive imported as a root filesystem and
//! booted in a real VM.

mod common;

use hearth_proto::exec::ExecRequest;
use hearth_vmm::{Disk, DiskFormat, Vm};

fn header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    h
}

fn layer(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = header(data.len() as u64, *mode, tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_oci_image_boots() {
    let tmp = tempfile::tempdir().unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (installed by the set-up)");
    let l1 = layer(&[
        ("bin/busybox", &busybox, 0o755),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/busybox\n", 0o644),
        ("etc/doomed", b"lower layer\n", 0o644),
    ]);
    let l2 = layer(&[("etc/.wh.doomed", b"", 0o644), ("marker", b"from the upper layer\n", 0o644)]);
    // An OCI image layout, as `skopeo copy … oci-archive:` or `docker save` (25+) write.
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = header(data.len() as u64, 0o644, tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("blobs/sha256/0001", &l1);
    add("blobs/sha256/0002", &l2);
    add("blobs/sha256/00ff", br#"{"layers":[{"digest":"sha256:0001"},{"digest":"sha256:0002"}]}"#);
    add("index.json", br#"{"manifests":[{"digest":"sha256:00ff"}]}"#);
    let archive = tmp.path().join("image.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();

    let rootfs = tmp.path().join("imported.ext4");
    hearth_image::oci::import(&archive, &rootfs, 64).unwrap();

    let mut cfg = common::config(hearth_image::base::Base::Busybox);
    cfg.root = Some(Disk::base(&rootfs, DiskFormat::Raw));
    let vm = Vm::boot(cfg).await.unwrap();
    let out = vm.exec(&ExecRequest::argv(["/bin/busybox", "cat", "/marker"]), None, 1 << 16).await.unwrap();
    assert_eq!(out.stdout_str(), "from the upper layer\n");
    let out = vm.exec(&ExecRequest::argv(["/bin/busybox", "ls", "/etc"]), None, 1 << 16).await.unwrap();
    assert_eq!(out.stdout_str(), "passwd\n", "the whiteout did not hide the lower file");
    vm.shutdown().await;
}
