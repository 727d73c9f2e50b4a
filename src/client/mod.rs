//! The thin client: typed MongoDB access that follows the stamp protocol.
//!
//! Every write is a compare-and-swap on the version field, retried with jittered
//! exponential backoff, and stamps the writer's client id as the origin. See [`stamp`] for
//! the protocol, which other languages can follow in a few lines.
//!
//! ```no_run
//! use eventsync::client::{ClientOptions, SyncCollection, Upserted};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! struct Player { _id: String, gold: i64, version: i64 }
//!
//! # async fn run() -> Result<(), eventsync::client::ClientError> {
//! let mongo = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017").await?;
//! let players = SyncCollection::<Player>::new(
//!     mongo.database("game").collection::<Player>("players"),
//!     ClientOptions::new("game-server-1"),
//! )?;
//! let (player, how) = players
//!     .find_one_and_upsert(Player { _id: "p1".into(), gold: 100, version: 0 })
//!     .await?;
//! assert!(matches!(how, Upserted::Created | Upserted::Existed));
//! let updated = players.find_one_and_update("p1", |p| p.gold += 50).await?;
//! println!("version {} patch {}", updated.version, serde_json::to_string(&updated.patch).unwrap());
//! # Ok(()) }
//! ```

mod cache;
mod changes;
mod error;
mod schema;
pub mod stamp;

use std::time::Duration;

use bson::{doc, Bson, Document};
use mongodb::options::{FindOneAndReplaceOptions, ReturnDocument};
use mongodb::Collection;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use cache::CacheOptions;
use cache::ReadCache;
pub use error::ClientError;
pub use stamp::StampFields;

use crate::diff::{self, Patch};

/// How a thin client behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// This writer's id, stamped as the origin of every write.
    pub client_id: String,
    /// Field names of the stamp.
    pub fields: StampFields,
    /// Attempts after the first one before a [`ClientError::Conflict`].
    pub max_retries: u32,
    /// First backoff; doubles per attempt, with full jitter.
    pub base_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// The read cache; `None` disables it.
    pub cache: Option<CacheOptions>,
}

impl ClientOptions {
    /// Defaults for a writer with the given client id: fields `version` and `_origin`,
    /// 10 retries with 2 ms–250 ms jittered backoff, no cache.
    pub fn new(client_id: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            fields: StampFields::default(),
            max_retries: 10,
            base_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(250),
            cache: None,
        }
    }

    /// Uses another version field name.
    pub fn version_field(mut self, name: impl Into<String>) -> Self {
        self.fields.version_field = name.into();
        self
    }

    /// Uses another origin field name.
    pub fn origin_field(mut self, name: impl Into<String>) -> Self {
        self.fields.origin_field = name.into();
        self
    }

    /// Sets the retry limit for compare-and-swap conflicts.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Enables the read cache.
    pub fn cache(mut self, cache: CacheOptions) -> Self {
        self.cache = Some(cache);
        self
    }
}

/// Whether [`SyncCollection::find_one_and_upsert`] created the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// The document did not exist and was created at version 1.
    Created,
    /// A document with that id existed; it was returned unchanged.
    Existed,
}

/// The result of a successful [`SyncCollection::find_one_and_update`].
#[derive(Debug, Clone)]
pub struct Updated<T> {
    /// The document as stored after the write.
    pub doc: T,
    /// The version after the write (unchanged when the patch is empty).
    pub version: i64,
    /// The RFC 6902 patch from the stored document before the write to the one after,
    /// stamp fields left out (type-preserving representation, see [`crate::diff::repr`]);
    /// empty when the edit changed nothing and nothing was written. The daemon's event for
    /// the same write has these operations plus the stamp's (`version`, `_origin`).
    pub patch: Patch,
}

/// A typed collection whose writes follow the stamp protocol.
pub struct SyncCollection<T> {
    coll: Collection<Document>,
    options: ClientOptions,
    cache: Option<ReadCache>,
    _type: std::marker::PhantomData<fn() -> T>,
}

fn id_key(id: &Bson) -> String {
    id.clone().into_canonical_extjson().to_string()
}

impl<T> SyncCollection<T>
where
    T: Serialize + DeserializeOwned + Send + Sync,
{
    /// Wraps a collection. Fails with [`ClientError::MissingVersionField`] when `T` is a
    /// struct without the version field.
    pub fn new<C: Send + Sync>(
        coll: Collection<C>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        if let Some(fields) = schema::struct_fields::<T>() {
            if !fields.contains(&options.fields.version_field.as_str()) {
                return Err(ClientError::MissingVersionField {
                    type_name: std::any::type_name::<T>(),
                    field: options.fields.version_field.clone(),
                });
            }
        }
        let cache = options.cache.as_ref().map(ReadCache::new);
        Ok(Self {
            coll: coll.clone_with_type(),
            options,
            cache,
            _type: std::marker::PhantomData,
        })
    }

    /// The underlying collection.
    pub fn collection(&self) -> &Collection<Document> {
        &self.coll
    }

    /// The options in force.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn fields(&self) -> &StampFields {
        &self.options.fields
    }

    fn version(&self, id: &Bson, doc: &Document) -> Result<i64, ClientError> {
        self.fields()
            .version_of(doc)
            .ok_or_else(|| ClientError::Unversioned {
                id: id_key(id),
                field: self.fields().version_field.clone(),
            })
    }

    /// Reads one document by id (through the cache when enabled).
    pub async fn find_one(&self, id: impl Into<Bson>) -> Result<Option<T>, ClientError> {
        let id = id.into();
        match self.read_raw(&id, true).await? {
            Some(doc) => Ok(Some(bson::from_document(doc)?)),
            None => Ok(None),
        }
    }

    /// Reads the documents that match a filter, straight from MongoDB.
    pub async fn find_many(
        &self,
        filter: Document,
        options: impl Into<Option<mongodb::options::FindOptions>>,
    ) -> Result<Vec<T>, ClientError> {
        use futures_util::TryStreamExt;
        let cursor = self.coll.find(filter).with_options(options).await?;
        let docs: Vec<Document> = cursor.try_collect().await?;
        docs.into_iter()
            .map(|d| bson::from_document(d).map_err(ClientError::from))
            .collect()
    }

    async fn read_raw(&self, id: &Bson, use_cache: bool) -> Result<Option<Document>, ClientError> {
        let key = id_key(id);
        if use_cache {
            if let Some(doc) = self.cache.as_ref().and_then(|c| c.get(&key)) {
                return Ok(Some(doc));
            }
        }
        let found = self.coll.find_one(doc! { "_id": id.clone() }).await?;
        if let (Some(cache), Some(doc)) = (&self.cache, &found) {
            if let Some(v) = self.fields().version_of(doc) {
                cache.observe(&key, doc, v);
            }
        }
        Ok(found)
    }

    fn serialize(&self, value: &T) -> Result<Document, ClientError> {
        Ok(bson::to_document(value)?)
    }

    /// Inserts `value` at version 1 unless a document with its `_id` exists; returns the
    /// stored document and whether it was created.
    pub async fn find_one_and_upsert(&self, value: T) -> Result<(T, Upserted), ClientError> {
        let mut doc = self.serialize(&value)?;
        let id = doc
            .get("_id")
            .cloned()
            .ok_or_else(|| ClientError::InvalidUpdate("the document has no `_id`".into()))?;
        self.fields().stamp(&mut doc, 1, &self.options.client_id);
        match self.coll.insert_one(doc.clone()).await {
            Ok(_) => {
                if let Some(cache) = &self.cache {
                    cache.wrote(&id_key(&id), &doc, 1);
                }
                Ok((bson::from_document(doc)?, Upserted::Created))
            }
            Err(e) if is_duplicate_key(&e) => match self.read_raw(&id, false).await? {
                Some(existing) => Ok((bson::from_document(existing)?, Upserted::Existed)),
                // Deleted between the two calls: try again from the start.
                None => Box::pin(self.find_one_and_upsert(value)).await,
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the document, applies `edit` to a copy and writes what the edit changed with
    /// a compare-and-swap on the version; on conflict re-reads and re-applies `edit` (so
    /// `edit` may run several times). An edit that changes nothing writes nothing.
    ///
    /// Only the edit's own difference is written: `$set` of each field (or nested field)
    /// it changed or added and `$unset` of each it removed, derived from `T`'s
    /// serialisation before and after the edit. Fields `T` does not model, and the stored
    /// BSON types of fields the edit did not touch, are left as they are. (Where a changed
    /// top-level key cannot be named in an update — it starts with `$` or contains `.` —
    /// the stored document is replaced by itself with the same changes applied, under the
    /// same compare-and-swap.) The returned patch goes from the stored document before
    /// the write to the one after, stamp fields left out.
    pub async fn find_one_and_update<F>(
        &self,
        id: impl Into<Bson>,
        mut edit: F,
    ) -> Result<Updated<T>, ClientError>
    where
        F: FnMut(&mut T),
    {
        let id = id.into();
        let key = id_key(&id);
        let mut attempt = 0u32;
        let mut use_cache = true;
        loop {
            let current = self
                .read_raw(&id, use_cache)
                .await?
                .ok_or_else(|| ClientError::NotFound { id: key.clone() })?;
            let version = self.version(&id, &current)?;
            let mut value: T = bson::from_document(current.clone())?;
            // Compared after the edit: the stored document may differ from `T`'s
            // serialisation (Int32 read into an i64, fields `T` lacks) without any edit.
            let unedited = self.serialize(&value)?;
            edit(&mut value);
            let edited = self.serialize(&value)?;
            let fields = self.fields();
            let skip = [
                "_id",
                fields.version_field.as_str(),
                fields.origin_field.as_str(),
            ];
            let changed = changes::changes(&unedited, &edited, &skip);
            if changed.is_empty() {
                return Ok(Updated {
                    doc: bson::from_document(current)?,
                    version,
                    patch: Patch(Vec::new()),
                });
            }
            let filter = doc! { "_id": id.clone(), fields.version_field.as_str(): version };
            let written = match changes::to_update(&changed) {
                Some((mut set, unset)) => {
                    fields.stamp(&mut set, version + 1, &self.options.client_id);
                    let mut update = doc! { "$set": set };
                    if !unset.is_empty() {
                        update.insert("$unset", unset);
                    }
                    self.coll
                        .find_one_and_update(filter, update)
                        .with_options(
                            mongodb::options::FindOneAndUpdateOptions::builder()
                                .return_document(ReturnDocument::After)
                                .build(),
                        )
                        .await?
                }
                None => {
                    let mut next = changes::apply(&current, &changed);
                    fields.stamp(&mut next, version + 1, &self.options.client_id);
                    self.coll
                        .find_one_and_replace(filter, next)
                        .with_options(
                            FindOneAndReplaceOptions::builder()
                                .return_document(ReturnDocument::After)
                                .build(),
                        )
                        .await?
                }
            };
            match written {
                Some(stored) => {
                    let new_version = self.version(&id, &stored)?;
                    if let Some(cache) = &self.cache {
                        cache.wrote(&key, &stored, new_version);
                    }
                    // What the write did to the stored document, without the stamp.
                    let patch = diff::diff(&self.unstamped(&current), &self.unstamped(&stored));
                    return Ok(Updated {
                        doc: bson::from_document(stored)?,
                        version: new_version,
                        patch,
                    });
                }
                None => {
                    use_cache = false;
                    self.conflict(&id, version, &mut attempt).await?;
                }
            }
        }
    }

    fn unstamped(&self, doc: &Document) -> Document {
        let mut d = doc.clone();
        d.remove(&self.fields().version_field);
        d.remove(&self.fields().origin_field);
        d
    }

    /// Applies MongoDB update operators (`$set`, `$inc`, …) with a compare-and-swap on the
    /// version; returns the new version. The update must not touch the stamp fields.
    pub async fn update_one(
        &self,
        id: impl Into<Bson>,
        update: Document,
    ) -> Result<i64, ClientError> {
        let id = id.into();
        let key = id_key(&id);
        for (op, fields) in &update {
            if !op.starts_with('$') {
                return Err(ClientError::InvalidUpdate(format!(
                    "`{op}` is not an update operator; use find_one_and_update to replace a document"
                )));
            }
            if let Bson::Document(fields) = fields {
                for name in [&self.fields().version_field, &self.fields().origin_field] {
                    let touches = |k: &str| k == name || k.starts_with(&format!("{name}."));
                    // `$rename` names its targets in the values.
                    let renames_onto =
                        op == "$rename" && fields.values().any(|v| v.as_str().is_some_and(touches));
                    if renames_onto || fields.keys().any(|k| touches(k)) {
                        return Err(ClientError::InvalidUpdate(format!(
                            "the update must not change the stamp field `{name}`"
                        )));
                    }
                }
            }
        }
        let mut attempt = 0u32;
        loop {
            let current = self
                .read_raw(&id, false)
                .await?
                .ok_or_else(|| ClientError::NotFound { id: key.clone() })?;
            let version = self.version(&id, &current)?;
            let mut full = update.clone();
            let mut set = match full.remove("$set") {
                Some(Bson::Document(d)) => d,
                Some(_) => {
                    return Err(ClientError::InvalidUpdate(
                        "`$set` must be a document".into(),
                    ))
                }
                None => Document::new(),
            };
            self.fields()
                .stamp(&mut set, version + 1, &self.options.client_id);
            full.insert("$set", set);
            let result = self
                .coll
                .find_one_and_update(
                    doc! { "_id": id.clone(), self.fields().version_field.as_str(): version },
                    full,
                )
                .with_options(
                    mongodb::options::FindOneAndUpdateOptions::builder()
                        .return_document(ReturnDocument::After)
                        .build(),
                )
                .await?;
            match result {
                Some(stored) => {
                    let v = self.version(&id, &stored)?;
                    if let Some(cache) = &self.cache {
                        cache.wrote(&key, &stored, v);
                    }
                    return Ok(v);
                }
                None => self.conflict(&id, version, &mut attempt).await?,
            }
        }
    }

    /// Deletes the document; with `expected_version`, only if it still has that version
    /// (otherwise a [`ClientError::Conflict`]). Returns whether a document was deleted.
    pub async fn delete_one(
        &self,
        id: impl Into<Bson>,
        expected_version: Option<i64>,
    ) -> Result<bool, ClientError> {
        let id = id.into();
        let key = id_key(&id);
        let mut filter = doc! { "_id": id.clone() };
        if let Some(v) = expected_version {
            filter.insert(self.fields().version_field.clone(), v);
        }
        let result = self.coll.delete_one(filter).await?;
        if let Some(cache) = &self.cache {
            cache.invalidate(&key);
        }
        match (result.deleted_count, expected_version) {
            (0, Some(expected)) => {
                let found = self
                    .read_raw(&id, false)
                    .await?
                    .and_then(|d| self.fields().version_of(&d));
                match found {
                    None => Ok(false),
                    Some(found) => Err(ClientError::Conflict {
                        id: key,
                        expected,
                        found: Some(found),
                        attempts: 1,
                    }),
                }
            }
            (n, _) => Ok(n > 0),
        }
    }

    /// After a lost compare-and-swap: invalidate, back off, or give up with the versions.
    async fn conflict(
        &self,
        id: &Bson,
        expected: i64,
        attempt: &mut u32,
    ) -> Result<(), ClientError> {
        let key = id_key(id);
        if let Some(cache) = &self.cache {
            cache.invalidate(&key);
        }
        *attempt += 1;
        if *attempt > self.options.max_retries {
            let found = self
                .coll
                .find_one(doc! { "_id": id.clone() })
                .await?
                .and_then(|d| self.fields().version_of(&d));
            return Err(ClientError::Conflict {
                id: key,
                expected,
                found,
                attempts: *attempt,
            });
        }
        let exp = (*attempt - 1).min(16);
        let cap = self
            .options
            .base_backoff
            .saturating_mul(1u32 << exp)
            .min(self.options.max_backoff);
        let jitter = rand::thread_rng().gen_range(0..=cap.as_micros().max(1) as u64);
        tokio::time::sleep(Duration::from_micros(jitter)).await;
        Ok(())
    }

    /// The highest version of a document this process wrote, when the cache remembers it.
    pub fn written_version(&self, id: impl Into<Bson>) -> Option<i64> {
        let key = id_key(&id.into());
        self.cache.as_ref().and_then(|c| c.written_floor(&key))
    }
}

/// True for MongoDB's duplicate key error (code 11000).
pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::InsertMany(im) => im
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().any(|w| w.code == 11000)),
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}
