//! Membership of the daemon replicas, in MongoDB: each replica announces itself with a
//! heartbeat document (`replicas` collection of the daemon database) that expires
//! `lease.ttl_ms` after its last renewal, and reads who else is live and which leases
//! each one holds. The decisions made from this view are in [`crate::pipeline::balance`].
//!
//! Expiry is decided by the filter on `expires_at_ms` (Int64 Unix milliseconds, like the
//! leases), so a server without TTL indexes works the same; the TTL index on
//! `expires_at` only removes the documents of replicas that are long gone.

use std::time::Duration;

use bson::{doc, DateTime, Document};
use futures_util::TryStreamExt;
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, IndexModel};

use super::lease::now_ms;
use super::{get_int, Store, StoreError};

/// One stream's lease as the membership view sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// The stream.
    pub stream: String,
    /// Its last holder.
    pub holder: String,
    /// The lease has not expired (nor been released).
    pub live: bool,
}

/// How long an expired heartbeat document stays before the TTL index removes it.
const HEARTBEAT_KEEP: Duration = Duration::from_secs(3600);

impl Store {
    /// The replica heartbeats.
    pub fn replicas(&self) -> Collection<Document> {
        self.db.collection("replicas")
    }

    /// The TTL index that removes heartbeats of replicas gone for an hour (idempotent).
    pub async fn ensure_membership_indexes(&self) -> Result<(), StoreError> {
        let options = IndexOptions::builder().expire_after(HEARTBEAT_KEEP).build();
        self.replicas()
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "expires_at": 1 })
                    .options(options)
                    .build(),
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn heartbeat_impl(
        &self,
        replica: &str,
        instance: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let now = now_ms();
        let expires = now.saturating_add(ttl.as_millis() as i64);
        let before = self
            .replicas()
            .find_one_and_update(
                doc! { "_id": replica },
                doc! { "$set": {
                    "instance": instance,
                    "expires_at_ms": expires,
                    "seen_at_ms": now,
                    "expires_at": DateTime::from_millis(expires),
                } },
            )
            .upsert(true)
            .return_document(ReturnDocument::Before)
            .await?;
        Ok(before
            .filter(|d| get_int(d, "expires_at_ms").is_some_and(|e| e > now))
            .and_then(|d| d.get_str("instance").ok().map(str::to_owned)))
    }

    pub(crate) async fn leave_impl(&self, replica: &str) -> Result<(), StoreError> {
        self.replicas().delete_one(doc! { "_id": replica }).await?;
        Ok(())
    }

    pub(crate) async fn live_replicas_impl(&self) -> Result<Vec<String>, StoreError> {
        let docs: Vec<Document> = self
            .replicas()
            .find(doc! { "expires_at_ms": { "$gt": now_ms() } })
            .await?
            .try_collect()
            .await?;
        let mut ids: Vec<String> = docs
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub(crate) async fn lease_views_impl(&self) -> Result<Vec<LeaseView>, StoreError> {
        let now = now_ms();
        let docs: Vec<Document> = self.leases().find(doc! {}).await?.try_collect().await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(LeaseView {
                    stream: d.get_str("_id").ok()?.to_owned(),
                    holder: d.get_str("holder").ok()?.to_owned(),
                    live: get_int(d, "expires_at_ms").is_some_and(|e| e > now),
                })
            })
            .collect())
    }
}
