//! Dead letters: changes the daemon could not turn into events, kept for an operator.

use bson::{doc, Bson, DateTime, Document};

use super::{Store, StoreError};

impl Store {
    /// Records a change that could not become an event.
    pub async fn dead_letter(
        &self,
        stream: &str,
        doc_id: Option<&Bson>,
        token: Option<&Document>,
        reason: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let mut d = doc! {
            "stream": stream,
            "reason": reason,
            "detail": detail,
            "at": DateTime::now(),
        };
        if let Some(id) = doc_id {
            d.insert("doc_id", id.clone());
        }
        if let Some(t) = token {
            d.insert("token", t.clone());
        }
        self.dead_letters().insert_one(d).await?;
        Ok(())
    }
}
