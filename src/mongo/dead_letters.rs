//! Dead letters: changes the daemon could not turn into events, kept for an operator.

use bson::{doc, DateTime};

use super::{Store, StoreError};
use crate::pipeline::store::DeadLetter;

impl Store {
    /// Records a change that could not become an event: an upsert keyed by stream and
    /// resume token (`$setOnInsert`), so it is written once however often the change is
    /// replayed, by this holder or a stale one. Letters without a token (found by a
    /// re-read) are inserted.
    pub async fn record_dead_letter(
        &self,
        stream: &str,
        epoch: i64,
        letter: &DeadLetter,
    ) -> Result<(), StoreError> {
        let mut d = doc! {
            "stream": stream,
            "reason": &letter.reason,
            "detail": &letter.detail,
            "epoch": epoch,
            "at": DateTime::now(),
        };
        if let Some(id) = &letter.doc_id {
            d.insert("doc_id", id.clone());
        }
        match &letter.token {
            Some(t) => {
                d.insert("token", t.clone());
                // A string key: portable to servers that cannot match a document `_id`.
                let id = format!(
                    "{stream}\u{1f}{}",
                    bson::Bson::Document(t.clone()).into_relaxed_extjson()
                );
                self.dead_letters()
                    .update_one(doc! { "_id": id }, doc! { "$setOnInsert": d })
                    .upsert(true)
                    .await?;
            }
            None => {
                self.dead_letters().insert_one(d).await?;
            }
        }
        Ok(())
    }
}
