//! The RocksDB implementation of [`Store`]: one column family per table, prefix bloom filters on
//! sessions so "this user has no session" is answered without reading a data block.

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions,
    SliceTransform, WriteBatch, WriteOptions, DB,
};

use super::{Batch, Result, Store, StoreError, Table};

/// The block cache every store of the process shares (data, index and filter blocks): one
/// bound on that memory however many partitions a member holds.
pub const BLOCK_CACHE_BYTES: usize = 128 << 20;

fn block_cache() -> &'static rocksdb::Cache {
    static CACHE: std::sync::OnceLock<rocksdb::Cache> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES))
}

/// The table options of sessions and profiles: bloom filters (whole keys, and prefixes where the
/// column family has a prefix extractor) and the shared block cache.
///
/// Filters and indexes live in the block cache, partitioned so that a lookup reads one small
/// filter partition rather than a whole file's filter (with a million users a file's filter is
/// megabytes, and reading and checksumming it on every miss cost more than the engine). The top
/// level of each, and level 0's, stay pinned.
fn table_options() -> BlockBasedOptions {
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    table.set_cache_index_and_filter_blocks(true);
    table.set_partition_filters(true);
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_pin_top_level_index_and_filter(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_block_cache(block_cache());
    table
}

/// A RocksDB database holding one partition's (or one replay's) journey state.
pub struct RocksStore {
    db: DB,
    sync: bool,
}

fn err(e: rocksdb::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RocksStore {
    /// Opens (creating if needed) the store in `dir`. With `sync`, every batch is fsynced.
    pub fn open(dir: &Path, sync: bool) -> Result<RocksStore> {
        Self::open_mode(dir, sync, false)
    }

    /// Opens an existing store for reading only; works while the service holds it.
    pub fn open_read_only(dir: &Path) -> Result<RocksStore> {
        Self::open_mode(dir, false, true)
    }

    fn open_mode(dir: &Path, sync: bool, read_only: bool) -> Result<RocksStore> {
        if !read_only {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(3);
        opts.set_max_log_file_size(8 << 20);

        let mut sessions = Options::default();
        sessions.set_block_based_table_factory(&table_options());
        sessions.set_prefix_extractor(SliceTransform::create_fixed_prefix(8));
        sessions.set_memtable_prefix_bloom_ratio(0.1);
        // Small memtables: inserts into a 4 MiB skip list are cheaper, and flushes run on another core.
        sessions.set_write_buffer_size(4 << 20);
        // Profiles: point reads by user prefix; the whole-key filter answers "no profile".
        let mut profiles = Options::default();
        profiles.set_block_based_table_factory(&table_options());

        let mut cfs = vec![
            ColumnFamilyDescriptor::new(Table::Sessions.name(), sessions),
            ColumnFamilyDescriptor::new(Table::Meta.name(), Options::default()),
            ColumnFamilyDescriptor::new(Table::Profiles.name(), profiles),
        ];
        // Column families this version no longer uses (an older layout) must still be opened.
        // Read-only, a table an older version did not have cannot be created: it reads as empty.
        if let Ok(existing) = DB::list_cf(&opts, dir) {
            if read_only {
                cfs.retain(|cf| existing.iter().any(|n| n == cf.name()));
            }
            for name in existing {
                if name != "default" && Table::from_name(&name).is_none() {
                    cfs.push(ColumnFamilyDescriptor::new(name, Options::default()));
                }
            }
        }
        let opened = if read_only {
            DB::open_cf_descriptors_read_only(&opts, dir, cfs, false)
        } else {
            DB::open_cf_descriptors(&opts, dir, cfs)
        };
        let db = opened.map_err(|e| {
            StoreError::Backend(format!("cannot open state in {}: {e}", dir.display()))
        })?;
        Ok(RocksStore { db, sync })
    }

    fn cf(&self, t: Table) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(t.name())
            .expect("column families are created on open")
    }

    /// The table's column family; `None` only read-only, for a table this state never had.
    fn read_cf(&self, t: Table) -> Option<&rocksdb::ColumnFamily> {
        self.db.cf_handle(t.name())
    }
}

impl Store for RocksStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(cf) = self.read_cf(table) else {
            return Ok(None);
        };
        self.db.get_cf(cf, key).map_err(err)
    }

    fn scan_prefix(
        &self,
        table: Table,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let Some(cf) = self.read_cf(table) else {
            return Ok(());
        };
        let mut ro = ReadOptions::default();
        if table == Table::Sessions && prefix.len() >= 8 {
            ro.set_prefix_same_as_start(true);
        } else {
            ro.set_total_order_seek(true);
        }
        let iter = self
            .db
            .iterator_cf_opt(cf, ro, IteratorMode::From(prefix, Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(err)?;
            if !k.starts_with(prefix) || !f(&k, &v) {
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
        let Some(cf) = self.read_cf(table) else {
            return Ok(());
        };
        let mut ro = ReadOptions::default();
        ro.set_total_order_seek(true);
        let iter = self
            .db
            .iterator_cf_opt(cf, ro, IteratorMode::From(start, Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(err)?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut wb = WriteBatch::default();
        for op in &batch.ops {
            match &op.value {
                Some(v) => wb.put_cf(self.cf(op.table), &op.key, v),
                None => wb.delete_cf(self.cf(op.table), &op.key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync);
        self.db.write_opt(wb, &wo).map_err(err)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(err)?;
        for t in Table::ALL {
            self.db.flush_cf(self.cf(t)).map_err(err)?;
        }
        Ok(())
    }
}
