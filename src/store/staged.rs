//! Staged writes, in generations.
//!
//! Writes go to the open generation. The runtime seals it when it closes a batch and opens the
//! next, so that batch N+1 is processed while batch N's outputs are still being acknowledged;
//! sealed generations are written to the store oldest first, each when the commit pipeline says
//! so ([`super::State::commit_sealed`]), or dropped with everything after them. Every read sees
//! the newest value: the open generation, then the sealed ones newest first, then the store.
//!
//! With nothing sealed (replay, backtest, exactly_once) reads cost what one map costs.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use super::{Put, Table};

type Map = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Staged writes in key order: (key, value; `None` deleted).
pub(super) type Overlay<'a> = Box<dyn Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a>;

pub(super) fn slot(t: Table) -> usize {
    match t {
        Table::Sessions => 0,
        Table::Meta => 1,
        Table::Profiles => 2,
    }
}

/// One generation's writes, table by table.
#[derive(Default)]
pub(super) struct Generation {
    pub(super) id: u64,
    tables: [Map; Table::ALL.len()],
    ops: usize,
}

impl Generation {
    fn writes(&self) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
        Table::ALL.into_iter().flat_map(move |t| {
            self.tables[slot(t)]
                .iter()
                .map(move |(k, v)| (t, k.as_slice(), v.as_deref()))
        })
    }

    /// Moves the writes into `ops`, table by table in key order.
    pub(super) fn drain_into(&mut self, ops: &mut Vec<Put>) {
        for t in Table::ALL {
            for (key, value) in std::mem::take(&mut self.tables[slot(t)]) {
                ops.push(Put {
                    table: t,
                    key,
                    value,
                });
            }
        }
        self.ops = 0;
    }
}

/// The open generation and the sealed ones, oldest first.
#[derive(Default)]
pub(super) struct Staged {
    open: Generation,
    sealed: VecDeque<Generation>,
}

impl Staged {
    pub(super) fn put(&mut self, table: Table, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.open.tables[slot(table)].insert(key, value);
        self.open.ops += 1;
    }

    /// The newest staged value of a key (`Some(None)`: staged as deleted), if any.
    pub(super) fn get(&self, table: Table, key: &[u8]) -> Option<Option<&[u8]>> {
        std::iter::once(&self.open)
            .chain(self.sealed.iter().rev())
            .find_map(|g| g.tables[slot(table)].get(key))
            .map(Option::as_deref)
    }

    /// Writes staged in the open generation.
    pub(super) fn open_ops(&self) -> usize {
        self.open.ops
    }

    pub(super) fn open_writes(&self) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
        self.open.writes()
    }

    /// Seals the open generation as `id` (ids must grow) and opens an empty one.
    pub(super) fn seal(&mut self, id: u64) {
        debug_assert!(self.sealed.back().is_none_or(|g| g.id < id));
        let mut g = std::mem::take(&mut self.open);
        g.id = id;
        self.sealed.push_back(g);
    }

    pub(super) fn sealed_count(&self) -> usize {
        self.sealed.len()
    }

    fn sealed_gen(&self, id: u64) -> Option<&Generation> {
        self.sealed.iter().find(|g| g.id == id)
    }

    /// How many writes generation `id` holds (`None`: no such sealed generation).
    pub(super) fn sealed_ops(&self, id: u64) -> Option<usize> {
        self.sealed_gen(id).map(|g| g.ops)
    }

    pub(super) fn sealed_writes(
        &self,
        id: u64,
    ) -> impl Iterator<Item = (Table, &[u8], Option<&[u8]>)> {
        self.sealed_gen(id).into_iter().flat_map(Generation::writes)
    }

    /// Takes the oldest sealed generation if it is `id`; `Err` with the oldest's id if an older
    /// one is still there (they are written in order).
    pub(super) fn take_oldest(&mut self, id: u64) -> Result<Option<Generation>, u64> {
        match self.sealed.front().map(|g| g.id) {
            Some(oldest) if oldest == id => Ok(self.sealed.pop_front()),
            Some(oldest) if oldest < id => Err(oldest),
            _ => Ok(None),
        }
    }

    /// Takes every generation, oldest first, the open one last (leaving an empty open one).
    pub(super) fn take_all(&mut self) -> impl Iterator<Item = Generation> {
        let open = std::mem::take(&mut self.open);
        std::mem::take(&mut self.sealed)
            .into_iter()
            .chain(std::iter::once(open))
    }

    pub(super) fn clear(&mut self) {
        self.open = Generation::default();
        self.sealed.clear();
    }

    /// Staged writes of `table` from `start` in key order (only keys with `prefix`, if given), the
    /// newest value of each key.
    pub(super) fn overlay<'a>(
        &'a self,
        table: Table,
        start: &'a [u8],
        prefix: Option<&'a [u8]>,
    ) -> Overlay<'a> {
        let in_range = move |k: &[u8]| prefix.is_none_or(|p| k.starts_with(p));
        let range = move |m: &'a Map| {
            m.range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
                .take_while(move |(k, _)| in_range(k))
                .map(|(k, v)| (k.as_slice(), v.as_deref()))
        };
        if self.sealed.is_empty() {
            return Box::new(range(&self.open.tables[slot(table)]));
        }
        let mut merged: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
        for g in self.sealed.iter().chain(std::iter::once(&self.open)) {
            merged.extend(range(&g.tables[slot(table)]));
        }
        Box::new(merged.into_iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &mut Staged, k: &str, v: Option<&str>) {
        s.put(
            Table::Sessions,
            k.as_bytes().to_vec(),
            v.map(|v| v.as_bytes().to_vec()),
        );
    }

    fn overlay(s: &Staged) -> Vec<(String, Option<String>)> {
        s.overlay(Table::Sessions, b"", None)
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    v.map(|v| String::from_utf8_lossy(v).into_owned()),
                )
            })
            .collect()
    }

    #[test]
    fn reads_see_the_newest_generation_first() {
        let mut s = Staged::default();
        put(&mut s, "a", Some("1"));
        put(&mut s, "b", Some("1"));
        s.seal(1);
        put(&mut s, "a", Some("2"));
        s.seal(2);
        put(&mut s, "b", None);
        put(&mut s, "c", Some("3"));
        assert_eq!(s.get(Table::Sessions, b"a"), Some(Some(&b"2"[..])));
        assert_eq!(s.get(Table::Sessions, b"b"), Some(None));
        assert_eq!(s.get(Table::Sessions, b"d"), None);
        assert_eq!(s.get(Table::Meta, b"a"), None);
        assert_eq!(
            overlay(&s),
            vec![
                ("a".into(), Some("2".into())),
                ("b".into(), None),
                ("c".into(), Some("3".into())),
            ]
        );
    }

    #[test]
    fn sealed_generations_are_taken_oldest_first_only() {
        let mut s = Staged::default();
        put(&mut s, "a", Some("1"));
        s.seal(7);
        put(&mut s, "a", Some("2"));
        put(&mut s, "b", Some("2"));
        s.seal(8);
        assert_eq!(s.sealed_ops(7), Some(1));
        assert_eq!(s.sealed_ops(8), Some(2));
        assert_eq!(s.sealed_writes(8).count(), 2);
        assert_eq!(s.take_oldest(8).err(), Some(7));
        let g = s.take_oldest(7).unwrap().unwrap();
        let mut ops = Vec::new();
        let mut g = g;
        g.drain_into(&mut ops);
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].value.as_deref(), Some(&b"1"[..]));
        // Still visible after the older one is gone; an unknown id is nothing to take.
        assert_eq!(s.get(Table::Sessions, b"a"), Some(Some(&b"2"[..])));
        assert!(s.take_oldest(6).unwrap().is_none());
        assert_eq!(s.open_ops(), 0);
        s.clear();
        assert_eq!(s.sealed_count(), 0);
        assert_eq!(s.get(Table::Sessions, b"a"), None);
    }

    #[test]
    fn a_prefix_overlay_keeps_to_its_prefix() {
        let mut s = Staged::default();
        put(&mut s, "u1/a", Some("1"));
        put(&mut s, "u2/a", Some("1"));
        s.seal(1);
        put(&mut s, "u1/b", Some("2"));
        put(&mut s, "u3/a", Some("2"));
        let keys: Vec<&[u8]> = s
            .overlay(Table::Sessions, b"u1/", Some(b"u1/"))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![&b"u1/a"[..], &b"u1/b"[..]]);
    }
}
