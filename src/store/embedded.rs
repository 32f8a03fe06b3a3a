//! The embedded store: the cluster state in one redb database file, for standalone use and
//! tests.
//!
//! Each kind is a redb table whose key is the object's key and whose value is the pair
//! (version, JSON document). Every put or delete is one write transaction that checks the
//! stored version and commits with `Durability::Immediate` (fsync before the commit returns),
//! so a crash leaves either the old or the new state, never a torn one.
//!
//! Reads never touch the file: at open every table is decoded once into an in-memory map, and
//! a write updates that map only after its commit succeeded, while holding the table's writer
//! lock, so the map and the file cannot diverge. redb locks the file, so only one handle (in
//! one process) can have the store open.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableError,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Store, StoreError, Table, Versioned};
use crate::model::{Node, Replica, Volume};
use crate::settings::Settings;

/// A stored row: the object's version and its JSON document.
type Row = (u64, &'static [u8]);

/// Memory redb may use for its page cache. Reads are served from our own map, so redb only
/// needs enough for the pages a write transaction touches.
const REDB_CACHE_BYTES: usize = 32 << 20;

/// The cluster state in one redb file. See the module documentation.
pub struct EmbeddedStore {
    volumes: EmbeddedTable<Volume>,
    replicas: EmbeddedTable<Replica>,
    nodes: EmbeddedTable<Node>,
    settings: EmbeddedTable<Settings>,
}

impl EmbeddedStore {
    /// Opens the store in the database file at `path`, creating the file if it is missing,
    /// and loads every table into memory. Blocks (file I/O, and crash recovery after an
    /// unclean shutdown): call it from `spawn_blocking` or before the runtime starts.
    ///
    /// Fails if the file is already open, by this or another process.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => StoreError::Backend(format!(
                    "cannot open the state database {}: it is already open (by another \
                     process, or another handle in this one)",
                    path.display()
                )),
                e => StoreError::Backend(format!(
                    "cannot open the state database {}: {e}",
                    path.display()
                )),
            })?;
        let db = Arc::new(db);
        let read = db.begin_read().map_err(|e| {
            StoreError::Backend(format!(
                "cannot read the state database {}: {e}",
                path.display()
            ))
        })?;
        let store = EmbeddedStore {
            volumes: EmbeddedTable::load(&db, &read, "volume", "volumes")?,
            replicas: EmbeddedTable::load(&db, &read, "replica", "replicas")?,
            nodes: EmbeddedTable::load(&db, &read, "node", "nodes")?,
            settings: EmbeddedTable::load(&db, &read, "settings", "settings")?,
        };
        Ok(store)
    }
}

impl Store for EmbeddedStore {
    fn volumes(&self) -> &dyn Table<Volume> {
        &self.volumes
    }

    fn replicas(&self) -> &dyn Table<Replica> {
        &self.replicas
    }

    fn nodes(&self) -> &dyn Table<Node> {
        &self.nodes
    }

    fn settings(&self) -> &dyn Table<Settings> {
        &self.settings
    }
}

/// An object in the read cache.
enum Cached<T> {
    Decoded(Versioned<T>),
    /// A stored document that does not decode. Kept, with its bytes, so that reading it reports
    /// `StoreError::Corrupt` and so that a put or delete naming its version can replace it.
    Corrupt {
        version: u64,
        bytes: Arc<[u8]>,
    },
}

impl<T: DeserializeOwned> Cached<T> {
    fn decode(kind: &'static str, key: &str, version: u64, bytes: &[u8]) -> Cached<T> {
        match serde_json::from_slice(bytes) {
            Ok(value) => Cached::Decoded(Versioned {
                version,
                value: Arc::new(value),
            }),
            Err(e) => {
                tracing::warn!(kind, key, version, error = %e, "stored document does not decode");
                Cached::Corrupt {
                    version,
                    bytes: bytes.into(),
                }
            }
        }
    }

    fn version(&self) -> u64 {
        match self {
            Cached::Decoded(v) => v.version,
            Cached::Corrupt { version, .. } => *version,
        }
    }

    fn to_result(&self, kind: &'static str, key: &str) -> Result<Versioned<T>, StoreError> {
        match self {
            Cached::Decoded(v) => Ok(Versioned {
                version: v.version,
                value: Arc::clone(&v.value),
            }),
            // The bytes failed to decode at load; decoding them again yields the error to
            // return (serde_json::Error cannot be cloned).
            Cached::Corrupt { version, bytes } => match serde_json::from_slice(bytes) {
                Ok(value) => Ok(Versioned {
                    version: *version,
                    value: Arc::new(value),
                }),
                Err(source) => Err(StoreError::Corrupt {
                    kind,
                    key: key.to_string(),
                    source,
                }),
            },
        }
    }
}

type Cache<T> = Arc<RwLock<BTreeMap<String, Cached<T>>>>;

/// One kind: a redb table plus its read cache.
struct EmbeddedTable<T> {
    db: Arc<Database>,
    /// The kind's name in errors ("volume").
    kind: &'static str,
    /// The redb table's name ("volumes").
    table: &'static str,
    cache: Cache<T>,
    /// Serialises this table's writers: held from the version check until the cache is
    /// updated after the commit. An owned guard, moved into the blocking task, so that a
    /// caller that stops waiting cannot let another writer in while a commit is under way.
    writer: Arc<tokio::sync::Mutex<()>>,
}

fn definition(table: &'static str) -> TableDefinition<'static, &'static str, Row> {
    TableDefinition::new(table)
}

fn read_cache<T>(
    cache: &RwLock<BTreeMap<String, Cached<T>>>,
) -> RwLockReadGuard<'_, BTreeMap<String, Cached<T>>> {
    // Nothing panics while holding the lock; if something ever did, the map is still whole
    // (every update is a single insert or remove).
    cache.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_cache<T>(
    cache: &RwLock<BTreeMap<String, Cached<T>>>,
) -> RwLockWriteGuard<'_, BTreeMap<String, Cached<T>>> {
    cache.write().unwrap_or_else(PoisonError::into_inner)
}

impl<T> EmbeddedTable<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Decodes every row of `table` into the read cache.
    fn load(
        db: &Arc<Database>,
        read: &ReadTransaction,
        kind: &'static str,
        table: &'static str,
    ) -> Result<EmbeddedTable<T>, StoreError> {
        let load_error = |e: &dyn std::fmt::Display| {
            StoreError::Backend(format!("cannot load the {table} table: {e}"))
        };
        let mut map = BTreeMap::new();
        match read.open_table(definition(table)) {
            Ok(rows) => {
                for row in rows.iter().map_err(|e| load_error(&e))? {
                    let (key, value) = row.map_err(|e| load_error(&e))?;
                    let key = key.value();
                    let (version, bytes) = value.value();
                    map.insert(key.to_string(), Cached::decode(kind, key, version, bytes));
                }
            }
            // A new file: the table is created by its first write.
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(load_error(&e)),
        }
        Ok(EmbeddedTable {
            db: Arc::clone(db),
            kind,
            table,
            cache: Arc::new(RwLock::new(map)),
            writer: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    fn cached_version(&self, key: &str) -> Option<u64> {
        read_cache(&self.cache).get(key).map(Cached::version)
    }

    fn conflict(&self, key: &str, expected: Option<u64>) -> StoreError {
        StoreError::Conflict {
            kind: self.kind,
            key: key.to_string(),
            expected,
        }
    }
}

/// A redb failure while writing `kind` `key`, as a backend error naming the object.
fn backend(kind: &str, key: &str, action: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("cannot {action} {kind} {key:?}: {e}"))
}

/// Starts a write transaction whose commit returns only once the data is on disk.
fn begin_durable(db: &Database) -> Result<redb::WriteTransaction, String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    // Immediate is redb's default; set it anyway, as this store's guarantee rests on it.
    txn.set_durability(Durability::Immediate)
        .map_err(|e| e.to_string())?;
    Ok(txn)
}

/// The version stored for `key`, read inside a write transaction.
fn stored_version(
    rows: &redb::Table<'_, &'static str, Row>,
    key: &str,
) -> Result<Option<u64>, redb::StorageError> {
    Ok(rows.get(key)?.map(|row| row.value().0))
}

#[async_trait]
impl<T> Table<T> for EmbeddedTable<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    async fn get(&self, key: &str) -> Result<Option<Versioned<T>>, StoreError> {
        read_cache(&self.cache)
            .get(key)
            .map(|c| c.to_result(self.kind, key))
            .transpose()
    }

    async fn list(&self) -> Result<Vec<Versioned<T>>, StoreError> {
        read_cache(&self.cache)
            .iter()
            .map(|(key, c)| c.to_result(self.kind, key))
            .collect()
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<Versioned<T>>, StoreError> {
        read_cache(&self.cache)
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, c)| c.to_result(self.kind, key))
            .collect()
    }

    async fn put(&self, key: &str, value: T, expected: Option<u64>) -> Result<u64, StoreError> {
        let (kind, table) = (self.kind, self.table);
        let bytes = serde_json::to_vec(&value)
            .map_err(|e| StoreError::Backend(format!("cannot encode {kind} {key:?}: {e}")))?;
        let guard = Arc::clone(&self.writer).lock_owned().await;
        if self.cached_version(key) != expected {
            return Err(self.conflict(key, expected));
        }
        let version = expected.map_or(1, |v| v + 1);
        let (db, cache, key) = (
            Arc::clone(&self.db),
            Arc::clone(&self.cache),
            key.to_string(),
        );
        let task_key = key.clone();
        let task = tokio::task::spawn_blocking(move || {
            // Locals drop in reverse: the database handle goes before the writer lock, so
            // once a writer is done no handle of a dropped store lingers in this task.
            let _writer = guard;
            let db = db;
            let key = task_key;
            let txn = begin_durable(&db).map_err(|e| backend(kind, &key, "store", e))?;
            {
                let mut rows = txn
                    .open_table(definition(table))
                    .map_err(|e| backend(kind, &key, "store", e))?;
                let stored =
                    stored_version(&rows, &key).map_err(|e| backend(kind, &key, "store", e))?;
                if stored != expected {
                    return Err(StoreError::Conflict {
                        kind,
                        key,
                        expected,
                    });
                }
                rows.insert(key.as_str(), (version, bytes.as_slice()))
                    .map_err(|e| backend(kind, &key, "store", e))?;
            }
            txn.commit().map_err(|e| backend(kind, &key, "commit", e))?;
            let cached = Cached::Decoded(Versioned {
                version,
                value: Arc::new(value),
            });
            write_cache(&cache).insert(key, cached);
            Ok(version)
        });
        task.await
            .map_err(|e| StoreError::Backend(format!("writing {kind} {key:?} failed: {e}")))?
    }

    async fn delete(&self, key: &str, expected: u64) -> Result<(), StoreError> {
        let (kind, table) = (self.kind, self.table);
        let guard = Arc::clone(&self.writer).lock_owned().await;
        match self.cached_version(key) {
            None => return Ok(()),
            Some(v) if v != expected => return Err(self.conflict(key, Some(expected))),
            Some(_) => {}
        }
        let (db, cache, key) = (
            Arc::clone(&self.db),
            Arc::clone(&self.cache),
            key.to_string(),
        );
        let task_key = key.clone();
        let task = tokio::task::spawn_blocking(move || {
            // Locals drop in reverse: the database handle goes before the writer lock, so
            // once a writer is done no handle of a dropped store lingers in this task.
            let _writer = guard;
            let db = db;
            let key = task_key;
            let txn = begin_durable(&db).map_err(|e| backend(kind, &key, "delete", e))?;
            {
                let mut rows = txn
                    .open_table(definition(table))
                    .map_err(|e| backend(kind, &key, "delete", e))?;
                let stored =
                    stored_version(&rows, &key).map_err(|e| backend(kind, &key, "delete", e))?;
                if stored.is_some_and(|v| v != expected) {
                    return Err(StoreError::Conflict {
                        kind,
                        key,
                        expected: Some(expected),
                    });
                }
                rows.remove(key.as_str())
                    .map_err(|e| backend(kind, &key, "delete", e))?;
            }
            txn.commit()
                .map_err(|e| backend(kind, &key, "commit the delete of", e))?;
            write_cache(&cache).remove(&key);
            Ok(())
        });
        task.await
            .map_err(|e| StoreError::Backend(format!("deleting {kind} {key:?} failed: {e}")))?
    }
}

#[cfg(test)]
mod tests;
