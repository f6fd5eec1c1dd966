//! Tests of rows packed in blocks.

use super::*;

fn row(key: &str, at: i64) -> (String, i64, StoredBytes) {
    (key.to_owned(), at, StoredBytes::from(vec![at as u8; 100]))
}

fn write(store: &Store, blocks: &[Block]) {
    let mut batch = Batch::default();
    for block in blocks {
        batch.insert(block_key("p", 0, block.seq).as_bytes(), block.bytes.clone());
        let head = postcard::to_allocvec(&block.head).unwrap();
        batch.insert(head_key("p", 0, block.seq).as_bytes(), head);
    }
    store.apply(batch).unwrap();
}

/// A store holding `rows` packed: (its directory, the store, the blocks
/// written, the next sequence number).
fn stored(rows: Vec<(String, i64, StoredBytes)>) -> (tempfile::TempDir, Store, usize, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    let mut next = 0;
    let blocks = pack(rows, &mut next);
    write(&store, &blocks);
    (dir, store, blocks.len(), next)
}

/// Row `key` of stored block `seq`, if it holds it.
fn row_of(store: &Store, seq: u64, key: &str) -> Option<StoredBytes> {
    let bytes = store.block_bytes("p", 0, seq).unwrap()?;
    find_in_block(("p", 0, seq), &bytes, key).unwrap()
}

/// Every copy of `key` the index leads to, newest first.
fn found(index: &BlockIndex, store: &Store, key: &str) -> Vec<StoredBytes> {
    (index.candidates(key).into_iter())
        .filter_map(|seq| row_of(store, seq, key))
        .collect()
}

#[test]
fn rows_are_found_in_their_block_and_survive_a_reload() {
    let rows: Vec<_> = (0..1000).map(|i| row(&format!("pay-{i}"), i)).collect();
    let (_dir, store, blocks, next) = stored(rows);
    assert!(blocks > 2, "{blocks} blocks");
    assert_eq!(next, blocks as u64);
    let mut keys = 0;
    let index = BlockIndex::load(&store, "p", 0, false, |_| keys += 1).unwrap();
    assert_eq!((keys, index.len().1, index.next_seq), (1000, 1000, next));
    for i in [0, 1, 499, 999] {
        let key = format!("pay-{i}");
        let copies = found(&index, &store, &key);
        assert_eq!(copies, vec![StoredBytes::from(vec![i as u8; 100])], "{key}");
    }
    assert!(found(&index, &store, "pay-1000").is_empty());
    assert_eq!(store.block_rows("p").unwrap().len(), 1000);
}

#[test]
fn retention_deletes_whole_blocks_and_trims_the_one_across_the_cut() {
    let rows: Vec<_> = (0..1000).map(|i| row(&format!("pay-{i:04}"), i)).collect();
    let (_dir, store, _, _) = stored(rows);
    let mut index = BlockIndex::load(&store, "p", 0, false, |_| {}).unwrap();
    let mut batch = Batch::default();
    let mut dropped = 0;
    for seq in index.to_forget(500) {
        let (gone, head) = store.forget_settled(&mut batch, "p", 0, seq, 500).unwrap();
        dropped += gone.len();
        index.forget(seq, &gone, head.as_ref());
    }
    store.apply(batch).unwrap();
    assert_eq!(dropped, 500);
    let left = store.block_rows("p").unwrap();
    assert_eq!(left.len(), 500);
    assert_eq!(left.keys().next().map(String::as_str), Some("pay-0500"));
    let reloaded = BlockIndex::load(&store, "p", 0, false, |_| {}).unwrap();
    assert_eq!(reloaded.len(), index.len());
    assert!(index.to_forget(500).is_empty());
    // The forgotten are no candidates any more; the kept still are.
    assert!(index.candidates("pay-0499").is_empty());
    assert_eq!(index.buckets.iter().map(Vec::len).sum::<usize>(), 500);
    for key in ["pay-0500", "pay-0999"] {
        assert_eq!(found(&index, &store, key).len(), 1, "{key}");
    }
}

#[test]
fn the_newest_copy_of_a_row_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    let mut next = 0;
    let first = pack(vec![row("pay-1", 1)], &mut next);
    let second = pack(
        vec![(String::from("pay-1"), 1, StoredBytes::from(&b"new"[..]))],
        &mut next,
    );
    write(&store, &first);
    write(&store, &second);
    let index = BlockIndex::load(&store, "p", 0, false, |_| {}).unwrap();
    assert_eq!(index.candidates("pay-1"), vec![1, 0]);
    let seq = index.candidates("pay-1")[0];
    let found = row_of(&store, seq, "pay-1");
    assert_eq!(found.as_deref(), Some(&b"new"[..]));
    assert_eq!(
        store.block_rows("p").unwrap()["pay-1"],
        StoredBytes::from(&b"new"[..])
    );
}

#[test]
fn dead_copies_are_counted_after_a_start_and_found_for_collection() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    let mut next = 0;
    let kept = |key: &str| (key.to_owned(), 0, StoredBytes::from(&b"v"[..]));
    // Block 0: a b c d; block 1: a b c (newer); block 2: d.
    for keys in [&["a", "b", "c", "d"][..], &["a", "b", "c"], &["d"]] {
        write(
            &store,
            &pack(keys.iter().map(|k| kept(k)).collect(), &mut next),
        );
    }
    let mut index = BlockIndex::load(&store, "p", 0, true, |_| {}).unwrap();
    assert!(
        index.to_collect(10, 10).is_empty(),
        "a start counts every row live"
    );
    assert!(index.to_forget(i64::MAX).is_empty(), "kept for good");
    assert_eq!(dead_copies(&store, "p", 0, 3).unwrap(), vec![(0, 4)]);
    // Only blocks the start found count: block 2's copy of d is not below 2.
    assert_eq!(dead_copies(&store, "p", 0, 2).unwrap(), vec![(0, 3)]);
    for (seq, dead) in dead_copies(&store, "p", 0, index.next_seq).unwrap() {
        index.release(seq, dead);
    }
    assert_eq!(index.to_collect(10, 10), vec![(0, 0)], "block 0 is dead");
    // Releases as checkpoints make them: two of block 1's rows written again.
    index.release(1, 1);
    assert!(!index.to_collect(0, 10).iter().any(|(seq, _)| *seq == 1));
    index.release(1, 1);
    assert_eq!(
        index.to_collect(0, 10),
        vec![(1, 1)],
        "one live row of three"
    );
    assert_eq!(index.to_collect(1, 0), vec![(0, 0)]);
}

// A block is stored compressed and read back plain; stored bytes that are
// not a compressed block are refused as corrupt, not misread.
#[test]
fn blocks_are_stored_compressed() {
    let rows: Vec<_> = (0..15)
        .map(|n| row(&format!("payment-{n:04}"), 7))
        .collect();
    let (_dir, store, blocks, _) = stored(rows);
    assert_eq!(blocks, 1);
    let raw = store.raw_get(&block_key("p", 0, 0)).unwrap().unwrap();
    let plain = store.block_bytes("p", 0, 0).unwrap().unwrap();
    assert!(
        raw.len() * 3 < plain.len(),
        "{} stored for {} plain",
        raw.len(),
        plain.len()
    );
    assert_eq!(block_entries("b/p/000/0", &raw).unwrap().len(), 15);
    assert_eq!(
        row_of(&store, 0, "payment-0003"),
        Some(StoredBytes::from(vec![7u8; 100]))
    );
    let mut batch = Batch::default();
    batch.insert(block_key("p", 0, 0).as_bytes(), plain.to_vec());
    store.apply(batch).unwrap();
    assert!(matches!(
        store.block_bytes("p", 0, 0),
        Err(StoreError::Corrupt { .. })
    ));
}
