//! A real mount through a real S3 server (SeaweedFS on 127.0.0.1), objects uploaded by the test.

mod common;

use common::weed::{s3_options, Weed};
use common::*;

/// Two SeaweedFS `mini` servers starting at once in one process get in each other's way (the
/// second never listens): the tests here take turns.
static ONE_WEED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_weed() -> std::sync::MutexGuard<'static, ()> {
    ONE_WEED.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // the guard serialises SeaweedFS tests on purpose
async fn mount_through_seaweedfs_s3() {
    if !fuse_available("mount_through_seaweedfs_s3") {
        return;
    }
    let _turn = one_weed();
    let Some(weed) = Weed::start("models") else { return };
    let big = random_bytes((40 << 20) + 4321, 51);
    let small = random_bytes((1 << 20) + 3, 52);
    let tmp = tempfile::tempdir().unwrap();
    write_safetensors(&tmp.path().join("m.safetensors"), 53);
    let st = std::fs::read(tmp.path().join("m.safetensors")).unwrap();
    weed.put("llama/big.bin", big.clone()).await;
    weed.put("llama/sub/small.bin", small.clone()).await;
    weed.put("llama/model.safetensors", st.clone()).await;
    weed.put("other/outside.bin", b"not under the prefix".to_vec()).await;

    let mut args: Vec<String> = vec!["--chunk-size".into(), "2MiB".into()];
    for (k, v) in s3_options(weed.s3_port) {
        args.push("--source-option".into());
        args.push(format!("{k}={v}"));
    }
    let a = tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        Agent::start("s3://models/llama", &argv)
    })
    .await
    .unwrap();

    let check = |rel: &str, want: &[u8]| {
        let got = std::fs::read(a.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}; log:\n{}", a.log_text()));
        assert_eq!(got.len(), want.len(), "{rel}");
        assert!(got == want, "{rel}: bytes differ");
    };
    check("big.bin", &big);
    check("sub/small.bin", &small);
    check("model.safetensors", &st);
    let mut names: Vec<String> = std::fs::read_dir(&a.mountpoint).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["big.bin", "model.safetensors", "sub"]);
    let origin = a.metric("cachefs_origin_bytes_total");
    assert!(origin >= big.len() as f64);
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    check("big.bin", &big);
    assert_eq!(a.metric("cachefs_origin_bytes_total"), origin, "second read must come from memory");

    // A bucket that does not exist: one clear line, non-zero exit.
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["mount", "--source", "s3://no-such-bucket/x", "--mountpoint"]).arg(tmp.path().join("m2"));
    cmd.args(["--cache-dir"]).arg(tmp.path().join("c2")).args(["--cache-size", "16MiB", "--admin", "127.0.0.1:0"]);
    for (k, v) in s3_options(weed.s3_port) {
        cmd.arg("--source-option").arg(format!("{k}={v}"));
    }
    let out = cmd.env("RUST_LOG", "off").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.starts_with("cachefs: error: cannot list the source s3://no-such-bucket/x"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A mistyped prefix: an empty mount, with a warning naming the bucket and the prefix.
    let opts: Vec<String> =
        s3_options(weed.s3_port).into_iter().flat_map(|(k, v)| ["--source-option".to_string(), format!("{k}={v}")]).collect();
    let empty = tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = opts.iter().map(|s| s.as_str()).collect();
        Agent::start("s3://models/nothing-here", &argv)
    })
    .await
    .unwrap();
    let log = empty.log_text();
    assert!(
        log.contains("WARN") && log.contains("the source lists no files") && log.contains("bucket=models prefix=nothing-here"),
        "{log}"
    );
    drop(empty);

    // Nothing of the server is left in /tmp once it stops (its unix sockets, its logs).
    let sockets = weed.sockets();
    assert!(!sockets.is_empty(), "weed made no sockets in /tmp (are they elsewhere now?)");
    drop(weed);
    let left: Vec<_> = sockets.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left in /tmp: {left:?}");
}

/// Two agents on SeaweedFS, the object uploaded with a CRC64NVME checksum: the file B assembles
/// from A is checked against the checksum SeaweedFS publishes, and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // the guard serialises SeaweedFS tests on purpose
async fn file_from_a_peer_is_verified_against_seaweedfs_checksum() {
    if !fuse_available("file_from_a_peer_is_verified_against_seaweedfs_checksum") {
        return;
    }
    let _turn = one_weed();
    let Some(weed) = Weed::start("models") else { return };
    let data = random_bytes((10 << 20) + 99, 54);
    weed.put_to(weed.checksum_store(), "llama/v.bin", data.clone()).await;
    let (a_addr, b_addr) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let args = |listen: &str, peer: &str| {
        let mut v: Vec<String> = ["--chunk-size", "1MiB", "--listen", listen, "--peers", peer].map(String::from).to_vec();
        for (k, val) in s3_options(weed.s3_port) {
            v.push("--source-option".into());
            v.push(format!("{k}={val}"));
        }
        v
    };
    let (a_args, b_args) = (args(&a_addr, &b_addr), args(&b_addr, &a_addr));
    let (a, b, got_a, got_b) = tokio::task::spawn_blocking(move || {
        let a = Agent::start("s3://models/llama", &a_args.iter().map(String::as_str).collect::<Vec<_>>());
        let got_a = std::fs::read(a.path("v.bin")).unwrap();
        let b = Agent::start("s3://models/llama", &b_args.iter().map(String::as_str).collect::<Vec<_>>());
        let got_b = std::fs::read(b.path("v.bin")).unwrap();
        (a, b, got_a, got_b)
    })
    .await
    .unwrap();
    assert!(got_a == data && got_b == data);
    assert!(b.metric("cachefs_read_bytes_total{tier=\"peer\"}") > 0.0, "B read nothing from A; log:\n{}", b.log_text());
    let check = || {
        let st: serde_json::Value = serde_json::from_str(&http_get(b.admin, "/status").unwrap().1).unwrap();
        st["verification"]["files"].as_array().and_then(|f| f.iter().find(|f| f["key"] == "v.bin").cloned())
    };
    let ok =
        poll_until(std::time::Duration::from_secs(10), || check().is_some_and(|f| f["check"] != "pending" && f["check"] != "checking"));
    assert!(ok, "{:?}", check());
    assert_eq!(check().unwrap()["check"], "verified", "{:?}\n{}", check(), b.log_text());
    assert_eq!(b.metric("cachefs_verify_failures_total"), 0.0);
    drop(a);
}
