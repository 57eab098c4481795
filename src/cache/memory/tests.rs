//! Unit tests of the memory tier (no mount).

use super::*;
use object_store::path::Path as OPath;
use std::os::unix::fs::FileExt;
use std::time::SystemTime;

fn obj(size: u64) -> ObjectVersion {
    obj_named("f", size)
}

fn obj_named(key: &str, size: u64) -> ObjectVersion {
    ObjectVersion::new(key.into(), OPath::from(key), Some("e".into()), None, size, SystemTime::UNIX_EPOCH)
}

#[test]
fn whole_crc64_is_combined_from_chunks_and_dropped_objects_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(Metrics::new());
    for alg in [crc_fast::CrcAlgorithm::Crc64Nvme, crc_fast::CrcAlgorithm::Crc64Xz] {
        let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 16 * 4096, m.clone()).unwrap().with_crc64(Some(alg)));
        let o = obj(3 * 4096 + 77);
        let data: Vec<u8> = (0..o.size).map(|i| (i * 7 % 253) as u8).collect();
        for i in [2u64, 0, 3] {
            let r = chunk_range(i, o.size, 4096);
            tier.insert(&o, i, &data[r.start as usize..r.end as usize], Tier::peer).unwrap();
        }
        assert_eq!(tier.whole_crc64(&o), None, "not whole yet");
        let r = chunk_range(1, o.size, 4096);
        tier.insert(&o, 1, &data[r.start as usize..r.end as usize], Tier::origin).unwrap();
        assert_eq!(tier.whole_crc64(&o), Some((crc_fast::checksum(alg, &data), true)));
        assert_eq!(tier.drop_object(&o), o.size);
        assert!(!tier.contains(&o, 0) && !tier.contains(&o, 3));
        assert_eq!(tier.used(), 0);
    }
}

#[test]
fn insert_read_evict_budget() {
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(Metrics::new());
    let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 3 * 4096, m.clone()).unwrap());
    let o = obj(5 * 4096 + 10);
    let data: Vec<u8> = (0..o.size).map(|i| (i % 251) as u8).collect();
    for i in 0..6u64 {
        let r = chunk_range(i, o.size, 4096);
        assert!(tier.insert(&o, i, &data[r.start as usize..r.end as usize], Tier::origin).unwrap());
        assert!(tier.used() <= tier.capacity());
    }
    // The first chunks were evicted; the last three are present.
    assert!(!tier.contains(&o, 0) && !tier.contains(&o, 2));
    assert!(tier.contains(&o, 3) && tier.contains(&o, 5));
    assert_eq!(tier.read(&o, 0, 0..10), None);
    let (b, filler) = tier.read(&o, 5, 2..10).unwrap();
    assert_eq!((&b[..], filler), (&data[5 * 4096 + 2..5 * 4096 + 10], Tier::origin));
    assert_eq!(&tier.read(&o, 4, 0..4096).unwrap().0[..], &data[4 * 4096..5 * 4096]);
    assert_eq!(tier.read(&o, 5, 2..11), None, "past the end of the chunk");
    assert_eq!(m.evictions.get(), 3);
    // The punched range really holds no pages.
    let blocks = std::fs::metadata(tier.file_path(&o)).map(|md| std::os::unix::fs::MetadataExt::blocks(&md)).unwrap();
    assert!(blocks * 512 <= 3 * 4096 + 4096, "blocks {blocks}");
    assert_eq!(tier.crc(&o, 4), Some(crc32c::crc32c(&data[4 * 4096..5 * 4096])));
    assert!(tier.insert(&o, 0, &data[..10], Tier::origin).is_err(), "wrong length is refused");
}

#[test]
fn the_journal_stays_small_and_recovery_reclaims_what_it_does_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let o = obj(4 * 4096);
    {
        let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 2 * 4096, Arc::new(Metrics::new())).unwrap());
        // Thousands of fills and evictions of four chunks.
        for round in 0..2000u64 {
            let i = round % 4;
            tier.insert(&o, i, &[i as u8; 4096], Tier::origin).unwrap();
        }
        let journal = std::fs::metadata(tier.journal_path(&o)).unwrap().len();
        assert!(journal < 4096, "the journal grew to {journal} bytes");
        // A crash: chunk 0's pages written but never journaled, a temporary journal left.
        assert!(!tier.contains(&o, 0));
        tier.files.lock().unwrap()[&o.id].file.write_all_at(&[9u8; 4096], 0).unwrap();
        std::fs::write(dir.path().join(format!("{}.journal.tmp", o.id)), "torn").unwrap();
    }
    let tier = MemoryTier::new(dir.path(), 4096, 2 * 4096, Arc::new(Metrics::new())).unwrap();
    let r = tier.recover(&[Arc::new(o.clone())]).unwrap();
    assert_eq!(r.chunks, 2);
    assert!(!dir.path().join(format!("{}.journal.tmp", o.id)).exists());
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(tier.file_path(&o)).unwrap());
    assert!(blocks * 512 <= 2 * 4096, "unjournaled pages were kept: {blocks} blocks");
    assert_eq!(tier.read(&o, 3, 0..4096).map(|(b, _)| b.to_vec()), Some(vec![3u8; 4096]));
}

#[test]
fn a_chunk_being_streamed_is_not_punched_or_refilled() {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 2 * 4096, Arc::new(Metrics::new())).unwrap());
    let o = obj(4 * 4096);
    tier.insert(&o, 0, &[1u8; 4096], Tier::origin).unwrap();
    // A peer stream holds chunk 0's bytes (a view of the mapping, no copy).
    let (streaming, crc) = tier.map_chunk(&o, 0).unwrap();
    for i in 1..4u64 {
        tier.insert(&o, i, &[i as u8 + 1; 4096], Tier::origin).unwrap();
    }
    assert!(tier.contains(&o, 0), "a chunk being streamed was evicted");
    assert!(streaming.iter().all(|b| *b == 1) && crc == crc32c::crc32c(&[1u8; 4096]));
    assert!(tier.used() <= tier.capacity());
    drop(streaming);
    tier.insert(&o, 1, &[2u8; 4096], Tier::origin).unwrap();
    tier.insert(&o, 2, &[3u8; 4096], Tier::origin).unwrap();
    assert!(!tier.contains(&o, 0), "once the stream is done the chunk can go");
}

#[test]
fn one_tier_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = MemoryTier::new(dir.path(), 4096, 4096, Arc::new(Metrics::new())).unwrap();
    let e = MemoryTier::new(dir.path(), 4096, 4096, Arc::new(Metrics::new())).err().expect("a second tier on one directory");
    assert!(e.to_string().contains(&format!("in use by another cachefs agent (pid {})", std::process::id())), "{e}");
    drop(first);
    MemoryTier::new(dir.path(), 4096, 4096, Arc::new(Metrics::new())).expect("free again once the first is gone");
}

#[test]
fn pinned_files_do_not_wipe_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 4 * 4096, Arc::new(Metrics::new())).unwrap());
    let (a, b, c) = (obj_named("a", 3 * 4096 + 2048), obj_named("b", 1024), obj_named("c", 4096));
    for i in 0..4u64 {
        let r = chunk_range(i, a.size, 4096);
        assert!(tier.insert(&a, i, &vec![1u8; (r.end - r.start) as usize], Tier::origin).unwrap());
    }
    assert!(tier.insert(&b, 0, &[2u8; 1024], Tier::origin).unwrap());
    assert!(tier.pin_if_complete(&a));
    // Room for c needs 3072 bytes: evicting all of b (1024) would not make it.
    assert!(!tier.insert(&c, 0, &[3u8; 4096], Tier::origin).unwrap());
    assert!(tier.contains(&b, 0), "b was evicted for nothing");
    assert_eq!(tier.used(), a.size + b.size);
    // Unpinned, a's oldest chunk makes room.
    tier.unpin(&a);
    assert!(tier.insert(&c, 0, &[3u8; 4096], Tier::origin).unwrap());
    assert!(!tier.contains(&a, 0) && tier.contains(&b, 0) && tier.contains(&c, 0));
}

#[test]
fn chunk_larger_than_budget_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 1000, Arc::new(Metrics::new())).unwrap());
    let o = obj(4096);
    assert!(!tier.insert(&o, 0, &[1u8; 4096], Tier::origin).unwrap());
    assert_eq!(tier.used(), 0);
}

/// A handed-off chunk evicts only chunks used less recently than it was, and keeps that age.
#[test]
fn a_colder_fill_evicts_only_colder_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 2 * 4096, Arc::new(Metrics::new())).unwrap());
    let o = obj(4 * 4096);
    let data = vec![7u8; 4096];
    assert!(tier.insert(&o, 0, &data, Tier::origin).unwrap());
    std::thread::sleep(Duration::from_millis(30));
    assert!(tier.insert(&o, 1, &data, Tier::origin).unwrap());
    // Used 10 ms ago elsewhere: colder than chunk 1, hotter than chunk 0.
    let fill = tier.begin_fill_colder(&o, 2, Duration::from_millis(10)).unwrap();
    assert!(fill.is_some(), "chunk 0 (used ~30 ms ago) is colder and should make room");
    let mut fill = fill.unwrap();
    fill.write(&data).unwrap();
    let crc = fill.crc();
    fill.commit(crc, Tier::peer).unwrap();
    assert!(!tier.contains(&o, 0) && tier.contains(&o, 1) && tier.contains(&o, 2));
    // An hour idle: colder than everything here, so nothing is evicted for it.
    assert!(tier.begin_fill_colder(&o, 3, Duration::from_secs(3600)).unwrap().is_none());
    assert!(tier.contains(&o, 1) && tier.contains(&o, 2));
    // Most recent first, and the handed-off chunk kept its age (older than chunk 1's).
    let held: Vec<u64> = tier.held().iter().map(|(k, _, _)| k.index).collect();
    assert_eq!(held, vec![2, 1]);
    let ages: Vec<Duration> = tier.held().iter().map(|(_, _, idle)| *idle).collect();
    assert!(ages[0] >= Duration::from_millis(10));
}

/// A send to a peer maps a chunk and streams from the mapping; dropping the object meanwhile
/// (a failed check, a version gone) must not punch the pages under it: the peer would get
/// zeros with the old crc32c and blame an honest sender. The hole comes once the view goes,
/// and the chunk is not refilled before that.
#[test]
fn a_dropped_object_keeps_the_bytes_of_a_send_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 16 * 4096, Arc::new(Metrics::new())).unwrap());
    let o = obj(2 * 4096);
    let data: Vec<u8> = (0..o.size).map(|i| (i * 13 % 251) as u8 | 1).collect();
    tier.insert(&o, 0, &data[..4096], Tier::origin).unwrap();
    tier.insert(&o, 1, &data[4096..], Tier::origin).unwrap();
    let (sending, crc) = tier.map_chunk(&o, 0).unwrap();
    assert_eq!(tier.drop_object(&o), o.size);
    assert!(!tier.contains(&o, 0) && !tier.contains(&o, 1), "a dropped chunk is still present");
    assert_eq!(&sending[..], &data[..4096], "the bytes of a send in flight were punched");
    assert_eq!(crc32c::crc32c(&sending), crc);
    assert!(tier.begin_fill(&o, 0).unwrap().is_none(), "a fill started before the hole under the send");
    let blocks = || std::fs::metadata(tier.file_path(&o)).map(|md| std::os::unix::fs::MetadataExt::blocks(&md)).unwrap();
    assert!(blocks() >= 8, "the sent chunk's pages are gone");
    drop(sending);
    assert_eq!(blocks(), 0, "the dropped chunk was not punched when its last view went");
    assert!(tier.begin_fill(&o, 0).unwrap().is_some(), "the chunk cannot be filled again");
}

/// A chunk checked by its digest takes no crc32c as it lands: only the right digest commits it
/// (and then records the sender's crc32c), a plain commit refuses it; every stored chunk's
/// digest is what `digests` answers, and a warm restart recomputes it.
#[test]
fn chunks_checked_by_digest_commit_only_with_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(Metrics::new());
    let o = obj(2 * 4096);
    let data: Vec<u8> = (0..o.size).map(|i| (i * 11 % 251) as u8).collect();
    let (c0, c1) = (&data[..4096], &data[4096..]);
    let want = *blake3::hash(c0).as_bytes();
    {
        let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 16 * 4096, m.clone()).unwrap());
        let mut f = tier.begin_fill(&o, 0).unwrap().unwrap();
        assert!(f.check_by_digest());
        f.write(c0).unwrap();
        assert_eq!(f.crc(), 0, "no crc32c taken");
        assert!(f.commit_vouched([9; 32], crc32c::crc32c(c0), Tier::peer).is_err());
        let mut f = tier.begin_fill(&o, 0).unwrap().unwrap();
        f.check_by_digest();
        f.write(c0).unwrap();
        assert_eq!(&f.commit_vouched(want, crc32c::crc32c(c0), Tier::peer).unwrap()[..], c0);
        assert_eq!(tier.crc(&o, 0), Some(crc32c::crc32c(c0)));
        let mut f = tier.begin_fill(&o, 1).unwrap().unwrap();
        f.check_by_digest();
        f.write(c1).unwrap();
        assert!(f.commit(crc32c::crc32c(c1), Tier::peer).is_err(), "a chunk checked by digest needs its digest");
        assert_eq!(&tier.digests(&o)[..32], &want);
        assert_eq!(&tier.digests(&o)[32..], &[0; 32]);
    }
    let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 16 * 4096, m).unwrap());
    tier.recover(&[Arc::new(o.clone())]).unwrap();
    assert_eq!(&tier.digests(&o)[..32], &want, "recomputed on a warm restart");
}

/// A chunk stored without a digest check takes no BLAKE3 as it lands; its digest is taken
/// from the stored bytes when first asked for, and kept.
#[test]
fn digests_of_plain_chunks_are_taken_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 16 * 4096, Arc::new(Metrics::new())).unwrap());
    let o = obj(4096 + 100);
    let data: Vec<u8> = (0..o.size).map(|i| (i * 13 % 251) as u8).collect();
    for (i, part) in [&data[..4096], &data[4096..]].into_iter().enumerate() {
        let mut f = tier.begin_fill(&o, i as u64).unwrap().unwrap();
        f.write(part).unwrap();
        assert_eq!(f.digest(), None, "no BLAKE3 taken on the receive path");
        f.commit(crc32c::crc32c(part), Tier::origin).unwrap();
    }
    let want: Vec<u8> = [&data[..4096], &data[4096..]].iter().flat_map(|p| *blake3::hash(p).as_bytes()).collect();
    assert_eq!(tier.digests(&o), want);
    assert_eq!(tier.digests(&o), want, "kept once taken");
}
