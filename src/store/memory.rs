//! An ordered in-memory [`Store`], for runs whose state is thrown away at the end: a backtest
//! without `--state`. Never the service's store (its state lives in RocksDB and the changelog).
//! Memory grows with the state a run keeps (live sessions, entry and cap histories): a backtest
//! over more than memory holds is given `--state DIR`, which puts the same state in RocksDB.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use super::{Batch, Result, Store, Table};

#[derive(Default)]
pub struct MemStore {
    tables: RwLock<[BTreeMap<Vec<u8>, Vec<u8>>; Table::ALL.len()]>,
}

fn ix(t: Table) -> usize {
    Table::ALL
        .iter()
        .position(|x| *x == t)
        .expect("every table is in ALL")
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

impl Store for MemStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        Ok(t[ix(table)].get(key).cloned())
    }

    fn scan_prefix(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        for (k, v) in t[ix(table)].range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded)) {
            if !k.starts_with(prefix) || !f(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        for (k, v) in t[ix(table)].range::<[u8], _>((Bound::Included(start), Bound::Unbounded)) {
            if !f(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: &Batch) -> Result<()> {
        let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
        for op in &batch.ops {
            let m = &mut t[ix(op.table)];
            match &op.value {
                Some(v) => {
                    m.insert(op.key.clone(), v.clone());
                }
                None => {
                    m.remove(&op.key);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A run's store: RocksDB in a directory, or memory.
pub enum LocalStore {
    Rocks(super::rocks::RocksStore),
    Memory(MemStore),
}

impl Store for LocalStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self {
            LocalStore::Rocks(s) => s.get(table, key),
            LocalStore::Memory(s) => s.get(table, key),
        }
    }

    fn scan_prefix(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        match self {
            LocalStore::Rocks(s) => s.scan_prefix(table, prefix, f),
            LocalStore::Memory(s) => s.scan_prefix(table, prefix, f),
        }
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        match self {
            LocalStore::Rocks(s) => s.scan_from(table, start, f),
            LocalStore::Memory(s) => s.scan_from(table, start, f),
        }
    }

    fn write(&self, batch: &Batch) -> Result<()> {
        match self {
            LocalStore::Rocks(s) => s.write(batch),
            LocalStore::Memory(s) => s.write(batch),
        }
    }

    fn flush(&self) -> Result<()> {
        match self {
            LocalStore::Rocks(s) => s.flush(),
            LocalStore::Memory(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_are_ordered_and_stop_at_the_prefix() {
        let s = MemStore::new();
        let mut b = Batch::default();
        for k in ["b2", "a1", "b1", "c1"] {
            b.put(
                Table::Sessions,
                k.as_bytes().to_vec(),
                k.as_bytes().to_vec(),
            );
        }
        b.delete(Table::Sessions, b"c1".to_vec());
        s.write(&b).unwrap();
        let mut seen = Vec::new();
        s.scan_prefix(Table::Sessions, b"b", &mut |k, _| {
            seen.push(String::from_utf8(k.to_vec()).unwrap());
            true
        })
        .unwrap();
        assert_eq!(seen, ["b1", "b2"]);
        let mut all = Vec::new();
        s.scan_from(Table::Sessions, b"a2", &mut |k, _| {
            all.push(String::from_utf8(k.to_vec()).unwrap());
            true
        })
        .unwrap();
        assert_eq!(all, ["b1", "b2"]);
        assert_eq!(s.get(Table::Meta, b"b1").unwrap(), None);
        assert_eq!(s.get(Table::Sessions, b"a1").unwrap(), Some(b"a1".to_vec()));
    }
}
