//! Where compaction's scan of each stream goes on from (see [`crate::compaction`]).

use bson::doc;

use super::{get_int, Store, StoreError};

impl Store {
    /// The stream position after which the next compaction run scans (0: from the start).
    pub async fn compaction_position(&self, stream: &str) -> Result<i64, StoreError> {
        let found = self
            .db
            .collection::<bson::Document>("compaction")
            .find_one(doc! { "_id": stream })
            .await?;
        Ok(found.and_then(|d| get_int(&d, "after_seq")).unwrap_or(0))
    }

    /// Stores the position the next compaction run scans after.
    pub async fn save_compaction_position(
        &self,
        stream: &str,
        after_seq: i64,
    ) -> Result<(), StoreError> {
        self.db
            .collection::<bson::Document>("compaction")
            .update_one(
                doc! { "_id": stream },
                doc! { "$set": { "after_seq": after_seq } },
            )
            .upsert(true)
            .await?;
        Ok(())
    }
}
