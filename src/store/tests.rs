//! Key encodings and scans of the state store.
use super::*;

#[test]
fn timer_keys_order_by_due_time_including_negative() {
    let a = timer_key(-5, "a", "u", "j", None);
    let b = timer_key(0, "a", "u", "j", None);
    let c = timer_key(1_700_000_000_000, "a", "u", "j", Some("k"));
    assert!(a < b && b < c);
    let t = decode_timer_key(&c).unwrap();
    assert_eq!(t.due, 1_700_000_000_000);
    assert_eq!(t.key.as_deref(), Some("k"));
    assert_eq!(t.user_id, "u");
}

#[test]
fn short_or_foreign_keys_in_the_sessions_table_are_skipped_not_a_panic() {
    // A changelog record with a short key is applied as it is; every later scan must live.
    let dir = tempfile::tempdir().unwrap();
    let store = rocks::RocksStore::open(dir.path(), false).unwrap();
    let mut batch = Batch::default();
    batch.put(Table::Sessions, b"abc".to_vec(), b"{}".to_vec());
    batch.put(Table::Sessions, vec![0; 9], b"not json".to_vec());
    store.write(&batch).unwrap();
    let state = State::new(store).unwrap();
    let mut n = 0;
    state
        .all_sessions(&mut |_, _| {
            n += 1;
            true
        })
        .unwrap();
    state
        .all_histories(&mut |_, _, _| {
            n += 1;
            true
        })
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(state.timer_count(), 0);
}

#[test]
fn session_keys_share_the_user_prefix() {
    let p = user_prefix("app", "42");
    assert!(session_key("app", "42", "j", None).starts_with(&p));
    assert!(session_key("app", "42", "j", Some("1001")).starts_with(&p));
    assert!(!session_key("app", "421", "j", None).starts_with(&p));
    assert!(!session_key("app2", "42", "j", None).starts_with(&p));
}

#[test]
fn sealed_generations_reach_the_store_only_when_committed_in_order() {
    let mut state = State::new(memory::MemStore::new()).unwrap();
    state.stage_meta("k", b"1".to_vec());
    state.seal(1);
    state.stage_meta("k", b"2".to_vec());
    state.stage_meta("j", b"2".to_vec());
    state.seal(2);
    state.stage_meta("j", b"3".to_vec());
    // Reads see the newest; the store has nothing yet.
    assert_eq!(state.get_meta("k").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(state.get_meta("j").unwrap().as_deref(), Some(&b"3"[..]));
    assert_eq!(state.store().get(Table::Meta, b"k").unwrap(), None);
    assert_eq!(state.sealed_ops(2), Some(2));
    assert_eq!(state.sealed_writes(1).count(), 1);
    // Out of order is refused; in order, each with the metadata known at that moment.
    assert!(state.commit_sealed(2, &[]).is_err());
    assert!(state.commit_sealed(1, &[("pos", b"a".to_vec())]).unwrap());
    assert_eq!(
        state.store().get(Table::Meta, b"k").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        state.store().get(Table::Meta, b"pos").unwrap().as_deref(),
        Some(&b"a"[..])
    );
    assert_eq!(
        state.meta_with_prefix("").unwrap().len(),
        3,
        "scans merge the generations over the store"
    );
    // Discard drops the sealed generation and the open one; the store keeps generation 1.
    state.discard().unwrap();
    assert_eq!(state.sealed(), 0);
    assert!(
        !state.commit_sealed(2, &[]).unwrap(),
        "nothing sealed as 2 any more"
    );
    assert_eq!(state.get_meta("k").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(state.get_meta("j").unwrap(), None);
}
