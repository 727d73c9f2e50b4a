//! Dead letters: changes the daemon could not turn into events, kept for an operator.

use bson::{doc, DateTime};

use super::{Store, StoreError};
use crate::pipeline::store::DeadLetter;

impl Store {
    /// Records a change that could not become an event, once however often the change is
    /// replayed, by this holder or a stale one (a unique `key` of stream and resume token).
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
        // The record's identity: stream and resume token (a string, unique index), so a
        // replay or a stale holder writes it once. Letters without a token (found by a
        // re-read) get a key of their own.
        let key = match &letter.token {
            Some(t) => {
                d.insert("token", t.clone());
                format!(
                    "{stream}\u{1f}{}",
                    bson::Bson::Document(t.clone()).into_relaxed_extjson()
                )
            }
            None => bson::oid::ObjectId::new().to_hex(),
        };
        d.insert("key", key);
        match self.dead_letters().insert_one(d).await {
            Ok(_) => {}
            Err(e) if crate::client::is_duplicate_key(&e) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}
