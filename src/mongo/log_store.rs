//! [`LogStore`] and [`SourceScan`] over MongoDB: the pipeline's storage seam, implemented
//! with the guards listed in [`crate::pipeline::store`].

use std::collections::HashMap;
use std::time::Duration;

use bson::{doc, Bson, Document, RawArrayBuf, RawDocumentBuf};
use futures_util::TryStreamExt;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::ReturnDocument;
use mongodb::Collection;

use super::checkpoints::Checkpoint;
use super::events::EventRecord;
use super::lease::{now_ms, Held};
use super::membership::LeaseView;
use super::shadows::Shadow;
use super::{get_flag, get_int, Store, StoreError};
use crate::client::{is_duplicate_key, StampFields};
use crate::pipeline::store::{DeadLetter, LogStore, ShadowSummary, ShadowWrite, SourceScan};
use crate::pipeline::version::Stamp;

/// Index of the first duplicate-key error of a write, if that is what failed.
fn duplicate_index(e: &mongodb::error::Error) -> Option<usize> {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(im) => im
            .write_errors
            .as_ref()
            .and_then(|errs| errs.iter().find(|w| w.code == 11000).map(|w| w.index)),
        ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000 => Some(0),
        _ => None,
    }
}

fn held(d: &Document) -> Held {
    Held {
        epoch: get_int(d, "epoch").unwrap_or(0),
    }
}

impl LogStore for Store {
    async fn load_checkpoint(&self, stream: &str) -> Result<Option<Checkpoint>, StoreError> {
        Store::load_checkpoint(self, stream).await
    }

    async fn save_checkpoint(
        &self,
        stream: &str,
        epoch: i64,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        Store::save_checkpoint(self, stream, epoch, checkpoint).await
    }

    /// Ordered inserts. On a key clash the stored event at that stream position is read:
    /// the same event (a replay after a crash) is skipped; anything else means another
    /// holder wrote there — [`StoreError::Fenced`], and nothing after it is written.
    async fn append_events(&self, events: &[EventRecord]) -> Result<(), StoreError> {
        let mut rest = events
            .iter()
            .map(EventRecord::to_raw)
            .collect::<Result<Vec<_>, _>>()?;
        let raw_events = self.events().clone_with_type::<RawDocumentBuf>();
        let mut offset = 0usize;
        while !rest.is_empty() {
            match raw_events.insert_many(rest.iter()).ordered(true).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let Some(i) = duplicate_index(&e) else {
                        return Err(e.into());
                    };
                    let ev = &events[offset + i];
                    let existing = self
                        .events()
                        .find_one(doc! { "stream": &ev.stream, "seq": ev.seq })
                        .await?;
                    let same = match existing {
                        Some(x) => EventRecord::from_document(&x)?.same_content(ev),
                        None => false,
                    };
                    if !same {
                        return Err(StoreError::Fenced(ev.stream.clone()));
                    }
                    offset += i + 1;
                    rest.drain(..=i);
                }
            }
        }
        Ok(())
    }

    async fn events_after(
        &self,
        stream: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        Store::events_after(self, stream, after_seq, limit).await
    }

    async fn last_seq(&self, stream: &str) -> Result<i64, StoreError> {
        Store::last_seq(self, stream).await
    }

    async fn load_shadows(
        &self,
        stream: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Shadow>, StoreError> {
        Store::load_shadows(self, stream, keys).await
    }

    /// Multi-statement, unordered `update` commands (one round trip per ~8 MB), each an
    /// upsert filtered on `version < new`: over a newer shadow the filter matches nothing,
    /// the upsert's insert clashes on `_id` (11000) and the newer shadow stays.
    async fn save_shadows(
        &self,
        _stream: &str,
        shadows: Vec<ShadowWrite>,
    ) -> Result<(), StoreError> {
        const COMMAND_BYTES: usize = 8 * 1024 * 1024;
        let mut chunk: Vec<ShadowWrite> = Vec::new();
        let mut bytes = 0;
        for s in shadows {
            let len = s.record.as_bytes().len();
            if !chunk.is_empty() && bytes + len > COMMAND_BYTES {
                self.upsert_shadows(std::mem::take(&mut chunk)).await?;
                bytes = 0;
            }
            bytes += len;
            chunk.push(s);
        }
        if !chunk.is_empty() {
            self.upsert_shadows(chunk).await?;
        }
        Ok(())
    }

    async fn shadow_summaries(
        &self,
        stream: &str,
    ) -> Result<HashMap<String, ShadowSummary>, StoreError> {
        let mut cursor = self
            .shadows()
            .find(doc! { "stream": stream })
            .projection(doc! { "doc_key": 1, "stamp": 1, "doc_id": 1, "deleted": 1 })
            .await?;
        let mut out = HashMap::new();
        while let Some(d) = cursor.try_next().await? {
            let Ok(key) = d.get_str("doc_key") else {
                continue;
            };
            out.insert(
                key.to_owned(),
                ShadowSummary {
                    doc_id: d.get("doc_id").cloned().unwrap_or(Bson::Null),
                    stamp: get_int(&d, "stamp").map(Stamp),
                    deleted: get_flag(&d, "deleted").unwrap_or(false),
                },
            );
        }
        Ok(out)
    }

    async fn dead_letter(
        &self,
        stream: &str,
        epoch: i64,
        letter: &DeadLetter,
    ) -> Result<(), StoreError> {
        Store::record_dead_letter(self, stream, epoch, letter).await
    }

    async fn acquire_lease(
        &self,
        stream: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Held>, StoreError> {
        let now = now_ms();
        let expires = now.saturating_add(ttl.as_millis() as i64);
        let leases = self.leases();
        let take = doc! {
            "$set": { "holder": holder, "expires_at_ms": expires, "acquired_at_ms": now },
            "$inc": { "epoch": 1_i64 },
        };
        // Ours from an earlier life, or expired: taken with a new epoch.
        let taken = leases
            .find_one_and_update(
                doc! { "_id": stream, "$or": [ { "holder": holder }, { "expires_at_ms": { "$lte": now } } ] },
                take,
            )
            .return_document(ReturnDocument::After)
            .await?;
        if let Some(d) = taken {
            return Ok(Some(held(&d)));
        }
        // No lease yet: create it; a concurrent creator wins the unique _id.
        match leases
            .insert_one(doc! { "_id": stream, "holder": holder, "expires_at_ms": expires, "acquired_at_ms": now, "epoch": 1_i64 })
            .await
        {
            Ok(_) => Ok(Some(Held { epoch: 1 })),
            Err(e) if is_duplicate_key(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn renew_lease(
        &self,
        stream: &str,
        holder: &str,
        epoch: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let expires = now_ms().saturating_add(ttl.as_millis() as i64);
        let renewed = self
            .leases()
            .update_one(
                doc! { "_id": stream, "holder": holder, "epoch": epoch },
                doc! { "$set": { "expires_at_ms": expires } },
            )
            .await?;
        Ok(renewed.matched_count == 1)
    }

    async fn release_lease(
        &self,
        stream: &str,
        holder: &str,
        epoch: i64,
    ) -> Result<(), StoreError> {
        self.leases()
            .update_one(
                doc! { "_id": stream, "holder": holder, "epoch": epoch },
                doc! { "$set": { "expires_at_ms": now_ms() - 1 } },
            )
            .await?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        replica: &str,
        instance: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        self.heartbeat_impl(replica, instance, ttl).await
    }

    async fn leave(&self, replica: &str) -> Result<(), StoreError> {
        self.leave_impl(replica).await
    }

    async fn live_replicas(&self) -> Result<Vec<String>, StoreError> {
        self.live_replicas_impl().await
    }

    async fn lease_views(&self) -> Result<Vec<LeaseView>, StoreError> {
        self.lease_views_impl().await
    }
}

impl Store {
    async fn upsert_shadows(&self, shadows: Vec<ShadowWrite>) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            what: "shadow",
            id: String::new(),
            reason,
        };
        let mut updates = RawArrayBuf::new();
        for s in shadows {
            let id = s
                .record
                .get_str("_id")
                .map_err(|e| corrupt(e.to_string()))?
                .to_owned();
            let mut older = RawDocumentBuf::new();
            older.append("$lt", s.version.get());
            let mut q = RawDocumentBuf::new();
            q.append("_id", id);
            q.append("version", older);
            let mut statement = RawDocumentBuf::new();
            statement.append("q", q);
            statement.append("u", s.record);
            statement.append("upsert", true);
            updates.push(statement);
        }
        let mut command = RawDocumentBuf::new();
        command.append("update", "shadows");
        command.append("updates", updates);
        command.append("ordered", false);
        let reply = self.db.run_raw_command(command).await?;
        // Write errors come back in an `ok: 1` reply; a duplicate `_id` is the guard at work.
        if let Ok(errors) = reply.get_array("writeErrors") {
            for e in errors {
                let code = match e {
                    Bson::Document(d) => get_int(d, "code").unwrap_or(0),
                    _ => 0,
                };
                if code != 11000 {
                    return Err(corrupt(format!("shadow upsert failed: {e}")));
                }
            }
        }
        Ok(())
    }
}

impl SourceScan for Collection<Document> {
    async fn stamps(&self, fields: &StampFields) -> Result<Vec<(Bson, Option<Stamp>)>, StoreError> {
        ScopedSource {
            coll: self,
            filter: None,
        }
        .stamps(fields)
        .await
    }

    async fn fetch(&self, ids: &[Bson]) -> Result<Vec<Document>, StoreError> {
        ScopedSource {
            coll: self,
            filter: None,
        }
        .fetch(ids)
        .await
    }
}

/// The part of a watched collection a stream covers: all of it, or the documents a
/// filter selects (a partition, [`crate::pipeline::Partition::filter`]).
pub struct ScopedSource<'a> {
    /// The collection.
    pub coll: &'a Collection<Document>,
    /// The documents of the stream (`None`: all).
    pub filter: Option<Document>,
}

impl SourceScan for ScopedSource<'_> {
    async fn stamps(&self, fields: &StampFields) -> Result<Vec<(Bson, Option<Stamp>)>, StoreError> {
        let mut cursor = self
            .coll
            .find(self.filter.clone().unwrap_or_default())
            .projection(doc! { "_id": 1, fields.version_field.as_str(): 1 })
            .await?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            if let Some(id) = d.get("_id").cloned() {
                out.push((id, fields.version_of(&d).map(Stamp)));
            }
        }
        Ok(out)
    }

    async fn fetch(&self, ids: &[Bson]) -> Result<Vec<Document>, StoreError> {
        // The ids came from this scope's scan; the filter is not needed again.
        Ok(self
            .coll
            .find(doc! { "_id": { "$in": ids.to_vec() } })
            .await?
            .try_collect()
            .await?)
    }
}
