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
