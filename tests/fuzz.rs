//! Fuzzing of everything that parses outside input: the four clouds' metadata answers, config
//! files and flags, S3 listing pages, and peer messages (decoded, and served by a real peer
//! server). No input may panic; every rejection is one clear line.
//!
//! `CACHEFS_FUZZ_CASES=1000000 cargo test --release --test fuzz` runs a million cases per target
//! (the default is a few thousand, for every test run).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use cachefs::cache::{MemoryTier, ReaderOptions};
use cachefs::metrics::Metrics;
use cachefs::origin::Origin;
use cachefs::peer::proto::*;
use cachefs::preempt::{aliyun, aws, azure, gcp};

fn runner() -> TestRunner {
    let cases = std::env::var("CACHEFS_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(4000);
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

fn one_line(e: impl std::fmt::Display) -> Result<(), TestCaseError> {
    let s = e.to_string();
    prop_assert!(!s.is_empty() && !s.contains('\n'), "not one clear line: {s:?}");
    Ok(())
}

/// A body that is sometimes arbitrary text, sometimes close to what the service sends.
fn body(near: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), proptest::sample::select(near).prop_flat_map(|shape| proptest::string::string_regex(shape).unwrap()),]
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![Just(200u16), Just(404u16), Just(401u16), Just(500u16), any::<u16>()]
}

#[test]
fn aws_answers_never_panic() {
    let near = &[
        r#"\{"action":"(stop|terminate|hibernate|[a-z]{0,6})","time":"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{0,8}Z?"\}"#,
        r#"\{"noticeTime":"[0-9T:Z\-\.]{0,30}"\}"#,
        r#"\{"action":[0-9\[\]\{\}"]{0,10}\}"#,
    ];
    runner()
        .run(&(status(), body(near), any::<bool>()), |(st, b, rebalance)| {
            let r = if rebalance { aws::interpret_rebalance(st, &b) } else { aws::interpret_action(st, &b) };
            if let Err(e) = r {
                one_line(e)?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn azure_answers_never_panic() {
    let near = &[
        r#"\{"DocumentIncarnation":[0-9]{1,3},"Events":\[\{"EventId":"[a-f0-9\-]{0,12}","EventType":"(Preempt|Terminate|Reboot|Freeze|[A-Za-z]{0,6})","ResourceType":"VirtualMachine","Resources":\["(vm0|vm1|)"\],"EventStatus":"(Scheduled|Started)","NotBefore":"[A-Za-z0-9 ,:]{0,32}"\}\]\}"#,
        r#"\{"Events":[\[\]\{\}0-9",:a-z]{0,24}"#,
    ];
    runner()
        .run(&(status(), body(near), "(vm0|vm1|[a-z]{0,3})"), |(st, b, vm)| {
            if let Err(e) = azure::interpret(st, &b, &vm) {
                one_line(e)?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn aliyun_and_gcp_answers_never_panic() {
    let near = &[r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z?", r"[0-9TZ:\- ]{0,25}"];
    runner()
        .run(&(status(), body(near), any::<Option<String>>(), any::<Option<String>>()), |(st, b, p, m)| {
            if let Err(e) = aliyun::interpret(st, &b) {
                one_line(e)?;
            }
            let _ = gcp::interpret(p.as_deref(), m.as_deref());
            Ok(())
        })
        .unwrap();
}

#[test]
fn config_files_and_flags_never_panic() {
    let near = &[
        r#"(cache[-_]size|chunk[-_]size|read[-_]timeout|admin|listen|peers|catalog[-_]ttl|source) = ("[0-9a-zA-Z:./]{0,12}"|[0-9\-]{0,22}|\[[0-9",]{0,8}\]|true)"#,
        r#"\[(preempt|peer)\]\n[a-z_]{0,12} = [0-9"a-z]{0,8}"#,
    ];
    runner()
        .run(&body(near), |text| {
            if let Err(e) = cachefs::config::parse_file_config(&text, "/etc/cachefs/config.toml") {
                one_line(cachefs::error::report(&e))?;
            }
            Ok(())
        })
        .unwrap();
    let flag = || prop_oneof![Just(None), any::<String>().prop_map(Some), "[0-9]{0,20}(|[KMGTP]i?B?|k|%)".prop_map(Some)];
    runner()
        .run(&(flag(), flag(), flag(), flag(), flag()), |(cache, chunk, timeout, admin, listen)| {
            let args = cachefs::config::Settings {
                source: Some("/tmp".into()),
                mountpoint: Some("/tmp/x-cachefs-fuzz".into()),
                cache_size: cache,
                chunk_size: chunk,
                read_timeout: timeout.and_then(|t| t.parse().ok()),
                admin,
                listen,
                ..Default::default()
            };
            if let Err(e) = cachefs::config::resolve_mount(args) {
                one_line(e)?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn peer_messages_decode_or_fail_cleanly() {
    use prost::Message;
    runner()
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |b| {
            let _ = ReadChunkRequest::decode(b.as_slice());
            let _ = ChunkData::decode(b.as_slice());
            let _ = RawChunkHeader::decode(b.as_slice());
            let _ = HelloResponse::decode(b.as_slice());
            let _ = HelloRequest::decode(b.as_slice());
            let _ = InventoryResponse::decode(b.as_slice());
            let _ = InventoryRequest::decode(b.as_slice());
            Ok(())
        })
        .unwrap();
}

/// Any request a peer can send is answered with chunk bytes of exactly the named version or a
/// status: never a panic, never bytes for a request that names no version this agent has.
#[test]
fn peer_requests_get_an_answer_or_a_status() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chunk: u64 = 4096;
    let server = rt.block_on(async {
        let store = Arc::new(InMemory::new());
        store.put(&Path::from("m/a.bin"), Bytes::from(vec![5u8; 10_000]).into()).await.unwrap();
        store.put(&Path::from("m/d/b.bin"), Bytes::from(vec![6u8; 3]).into()).await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let origin = Arc::new(Origin::new(store, Path::from("m"), 4, metrics.clone()));
        let memory = Arc::new(MemoryTier::new(dir.path(), chunk, 1 << 20, metrics.clone()).unwrap());
        let storage = cachefs::agent::Storage::from_parts(origin, memory).await.unwrap();
        let opts = ReaderOptions { chunk_size: chunk, read_timeout: Duration::from_secs(5), readahead_budget: 4 * chunk };
        let reader = storage.reader(None, None, opts, &metrics, &Default::default(), &Default::default());
        let catalog = storage.catalog.clone();
        let compat = cachefs::peer::membership::Compat { chunk_size: chunk, source: "mem".into() };
        let membership = Arc::new(cachefs::peer::Membership::new("me".into(), compat, &Default::default(), metrics.clone()).unwrap());
        let versions: Vec<ObjectRef> = catalog.files().iter().map(|o| cachefs::peer::object_ref(o)).collect();
        let s = cachefs::peer::PeerServer {
            catalog,
            reader,
            metrics,
            membership,
            node_id: "me".into(),
            source: "mem".into(),
            draining: Default::default(),
            active: Default::default(),
            raw_data: false,
            handoff: None,
            streams: Default::default(),
            fills: Default::default(),
            tracking: None,
            gossip: None,
        };
        (s, versions)
    });
    let (server, versions) = server;
    let key = prop_oneof![Just("a.bin".to_string()), Just("d/b.bin".to_string()), "(\\.\\./|/|\\./|d//)?[a-z./]{0,8}", any::<String>()];
    let object = (key, prop_oneof![Just(None), any::<String>().prop_map(Some)], any::<u64>(), any::<bool>()).prop_map(
        move |(k, etag, size, exact)| match versions.iter().find(|v| v.key == k) {
            Some(v) if exact => v.clone(),
            _ => ObjectRef { key: k, etag: etag.unwrap_or_default(), version: String::new(), size: size % 20_000 },
        },
    );
    let req = (proptest::option::of(object), prop_oneof![Just(chunk), any::<u64>()], prop_oneof![0u64..4, any::<u64>()], any::<bool>());
    runner()
        .run(&req, |(object, chunk_size, index, allow_fill)| {
            let named = object.clone();
            let r = ReadChunkRequest { object, index, chunk_size, allow_fill, protocol: cachefs::peer::PROTOCOL };
            match rt.block_on(server.chunk(r)) {
                Ok((bytes, crc, _guard, _)) => {
                    let o = named.expect("bytes for no object");
                    let want = if o.key == "a.bin" { 5u8 } else { 6u8 };
                    prop_assert!(bytes.iter().all(|b| *b == want) && !bytes.is_empty());
                    prop_assert_eq!(crc, crc32c::crc32c(&bytes));
                }
                Err(status) => one_line(status.message())?,
            }
            Ok(())
        })
        .unwrap();
}

/// A ListObjectsV2 answer from the origin: objects with valid paths, skipped keys, or one line.
#[test]
fn s3_listing_pages_parse_or_fail_cleanly() {
    use cachefs::origin::s3list::read_page;
    let near: &'static [&'static str] = &[
        "<ListBucketResult>(<IsTruncated>(true|false|x)</IsTruncated>)?(<NextContinuationToken>[a-z]{0,4}</NextContinuationToken>)?(<EncodingType>url</EncodingType>)?(<Contents><Key>[a-z%0-9/.+]{0,12}</Key><LastModified>2024-0[1-9]-01T00:00:00(\\.000)?Z</LastModified>(<ETag>&quot;[a-f0-9]{0,4}&quot;</ETag>)?<Size>-?[0-9]{1,21}</Size></Contents>){0,3}</ListBucketResult>",
        "<\\?xml version=\"1.0\"\\?><ListBucketResult( xmlns=\"[a-z:/.]{0,10}\")?><Contents>(<Key>[^<]{0,8}</Key>)?(<Size>[0-9]{0,4}</Size>)?</Contents>(</ListBucketResult>)?",
    ];
    runner()
        .run(&prop_oneof![body(near).prop_map(String::into_bytes), proptest::collection::vec(any::<u8>(), 0..256)], |b| {
            match read_page(&b) {
                Ok(page) => {
                    for o in &page.listing.objects {
                        prop_assert!(Path::parse(o.location.as_ref()).is_ok());
                    }
                    prop_assert!(page.next.as_ref().is_none_or(|t| !t.is_empty()));
                }
                Err(e) => one_line(e)?,
            }
            Ok(())
        })
        .unwrap();
}
