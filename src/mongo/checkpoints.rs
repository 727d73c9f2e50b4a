//! Checkpoints: per stream, the resume token and log position the log is complete up to.

use bson::{doc, DateTime, Document};

use super::{Store, StoreError};

/// Where a stream resumes.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The resume token (absent before the first change was read).
    pub token: Option<Document>,
    /// The last stream position in the log that this checkpoint covers.
    pub seq: i64,
    /// True while a full re-read of the collection is in progress.
    pub resync_pending: bool,
    /// When it was stored.
    pub updated_at: DateTime,
}

impl Store {
    /// Reads a stream's checkpoint.
    pub async fn load_checkpoint(&self, stream: &str) -> Result<Option<Checkpoint>, StoreError> {
        let found = self.checkpoints().find_one(doc! { "_id": stream }).await?;
        Ok(found.map(|d| Checkpoint {
            token: d.get_document("token").ok().cloned(),
            seq: super::get_int(&d, "seq").unwrap_or(0),
            resync_pending: super::get_flag(&d, "resync_pending").unwrap_or(false),
            updated_at: d
                .get_datetime("updated_at")
                .ok()
                .copied()
                .unwrap_or_else(DateTime::now),
        }))
    }

    /// Stores a checkpoint, fenced by the lease epoch and monotonic in position: a replica
    /// whose lease was taken over (a higher epoch wrote the checkpoint since), or whose view
    /// of the log is behind the stored checkpoint, gets [`StoreError::Fenced`].
    pub async fn save_checkpoint(
        &self,
        stream: &str,
        epoch: i64,
        cp: &Checkpoint,
    ) -> Result<(), StoreError> {
        let mut set = doc! {
            "seq": cp.seq,
            "resync_pending": cp.resync_pending,
            "updated_at": cp.updated_at,
            "epoch": epoch,
        };
        let mut update = doc! {};
        match &cp.token {
            Some(t) => {
                set.insert("token", t.clone());
            }
            None => {
                update.insert("$unset", doc! { "token": "" });
            }
        }
        update.insert("$set", set);
        let result = self
            .checkpoints()
            .update_one(
                doc! { "_id": stream, "epoch": { "$lte": epoch }, "seq": { "$lte": cp.seq } },
                update,
            )
            .upsert(true)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if crate::client::is_duplicate_key(&e) => {
                Err(StoreError::Fenced(stream.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a stream's checkpoint (tests and operators forcing a full re-read).
    pub async fn delete_checkpoint(&self, stream: &str) -> Result<(), StoreError> {
        self.checkpoints()
            .delete_one(doc! { "_id": stream })
            .await?;
        Ok(())
    }
}
