//! The thin client against a real server (the one named by `EVENTSYNC_TEST_MONGODB_URI`):
//! compare-and-swap under contention, typed conflicts, upsert, the origin stamp, operator
//! updates, conditional deletes, edit patches, the read cache and the schema check.
//! Every test uses its own database.

mod common;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bson::{doc, Bson, Document};
use common::*;
use eventsync::client::{
    CacheOptions, ClientError, ClientOptions, StampFields, SyncCollection, Upserted,
};
use eventsync::diff;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Counter {
    _id: String,
    n: i64,
    #[serde(default)]
    label: String,
    version: i64,
}

fn counter(id: &str, n: i64) -> Counter {
    Counter {
        _id: id.to_owned(),
        n,
        label: String::new(),
        version: 0,
    }
}

/// A struct without the version field.
#[derive(Debug, Serialize, Deserialize)]
struct NoVersion {
    _id: String,
    n: i64,
}

/// A struct whose version field is called `rev`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Revised {
    _id: String,
    n: i64,
    rev: i64,
}

/// A struct whose version field is `version` in MongoDB but `v` in Rust.
#[derive(Debug, Serialize, Deserialize)]
struct Renamed {
    _id: String,
    #[serde(rename = "version")]
    v: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Item {
    _id: i32,
    kind: String,
    size: i64,
    version: i64,
}

/// A fresh collection in a database of its own.
async fn fresh(prefix: &str) -> mongodb::Collection<Document> {
    client()
        .await
        .database(&unique_db(prefix))
        .collection::<Document>("docs")
}

fn sync<T>(coll: &mongodb::Collection<Document>, options: ClientOptions) -> SyncCollection<T>
where
    T: Serialize + serde::de::DeserializeOwned + Send + Sync,
{
    match SyncCollection::<T>::new(coll.clone(), options) {
        Ok(c) => c,
        Err(e) => panic!("client: {e}"),
    }
}

/// The document as stored, read past every client.
async fn raw(coll: &mongodb::Collection<Document>, id: impl Into<Bson>) -> Option<Document> {
    coll.find_one(doc! { "_id": id.into() }).await.unwrap()
}

fn version_of(doc: &Document) -> i64 {
    StampFields::default()
        .version_of(doc)
        .unwrap_or_else(|| panic!("no usable version in {doc}"))
}

fn origin_of(doc: &Document) -> Option<String> {
    StampFields::default().origin_of(doc)
}

/// An integer field, whether stored as Int32 or Int64.
fn int_of(doc: &Document, key: &str) -> i64 {
    match doc.get(key) {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        other => panic!("`{key}` is not an integer: {other:?}"),
    }
}

fn without_stamp(doc: &Document) -> Document {
    let mut d = doc.clone();
    d.remove("version");
    d.remove("_origin");
    d
}

/// Bumps the version out of band, as another (unstamped or foreign) writer would.
async fn raw_bump(coll: &mongodb::Collection<Document>, id: impl Into<Bson>, note: &str) {
    let r = coll
        .update_one(
            doc! { "_id": id.into() },
            doc! { "$inc": { "version": 1_i64 }, "$set": { "note": note } },
        )
        .await
        .unwrap();
    assert_eq!(r.matched_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_end_with_exact_total_and_version() {
    const WRITERS: usize = 8;
    const INCREMENTS: usize = 100;
    const INITIAL: i64 = 7;
    let coll = fresh("client_conc").await;
    let setup: SyncCollection<Counter> = sync(&coll, ClientOptions::new("setup"));
    let (created, how) = setup
        .find_one_and_upsert(counter("c", INITIAL))
        .await
        .unwrap();
    assert_eq!(how, Upserted::Created);
    assert_eq!(created.version, 1);

    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let writer: SyncCollection<Counter> = sync(
                &coll,
                ClientOptions::new(format!("writer-{w}")).max_retries(10_000),
            );
            tokio::spawn(async move {
                let mut last = 0;
                for _ in 0..INCREMENTS {
                    let updated = writer
                        .find_one_and_update("c", |c| c.n += 1)
                        .await
                        .unwrap_or_else(|e| panic!("writer {w}: {e}"));
                    assert_eq!(updated.version, updated.doc.version);
                    assert!(updated.version > last, "versions of one writer only grow");
                    assert_eq!(updated.patch.len(), 1, "{:?}", updated.patch);
                    last = updated.version;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }

    let total = (WRITERS * INCREMENTS) as i64;
    let stored = setup.find_one("c").await.unwrap().unwrap();
    assert_eq!(stored.n, INITIAL + total);
    assert_eq!(stored.version, total + 1);
    let doc = raw(&coll, "c").await.unwrap();
    assert_eq!(version_of(&doc), 801);
    let origin = origin_of(&doc).unwrap();
    assert!(origin.starts_with("writer-"), "{origin}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_cas_surfaces_typed_conflict_after_retry_limit() {
    let coll = fresh("client_stale").await;
    let client: SyncCollection<Counter> = sync(&coll, ClientOptions::new("loser").max_retries(3));
    client.find_one_and_upsert(counter("s", 0)).await.unwrap();

    // Each run of the edit lets another writer bump the version first, so every
    // compare-and-swap loses.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handle = tokio::runtime::Handle::current();
    let err = {
        let (calls, seen, raw_coll) = (calls.clone(), seen.clone(), coll.clone());
        client
            .find_one_and_update("s", move |c| {
                calls.fetch_add(1, Ordering::SeqCst);
                seen.lock().unwrap().push(c.version);
                c.n += 1;
                tokio::task::block_in_place(|| handle.block_on(raw_bump(&raw_coll, "s", "racer")));
            })
            .await
            .unwrap_err()
    };
    assert_eq!(calls.load(Ordering::SeqCst), 4, "first attempt + 3 retries");
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3, 4]);
    match &err {
        ClientError::Conflict {
            id,
            expected,
            found,
            attempts,
        } => {
            assert_eq!(*expected, 4);
            assert_eq!(*found, Some(5));
            assert_eq!(*attempts, 4);
            assert!(id.contains('s'), "{id}");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("expected version 4"), "{msg}");
    assert!(msg.contains("found 5"), "{msg}");
    assert!(msg.contains("4 attempts"), "{msg}");

    // None of the losing edits was written.
    let doc = raw(&coll, "s").await.unwrap();
    assert_eq!(version_of(&doc), 5);
    assert_eq!(int_of(&doc, "n"), 0);
    assert_eq!(origin_of(&doc).as_deref(), Some("loser"));
}

#[tokio::test]
async fn upsert_tells_created_from_existed() {
    let coll = fresh("client_upsert").await;
    let first: SyncCollection<Counter> = sync(&coll, ClientOptions::new("first"));
    let second: SyncCollection<Counter> = sync(&coll, ClientOptions::new("second"));

    let mut original = counter("u", 10);
    original.label = "original".into();
    let (stored, how) = first.find_one_and_upsert(original.clone()).await.unwrap();
    assert_eq!(how, Upserted::Created);
    assert_eq!(stored.version, 1);
    assert_eq!(stored.n, 10);
    assert_eq!(stored.label, "original");
    let before = raw(&coll, "u").await.unwrap();
    assert_eq!(version_of(&before), 1);
    assert_eq!(origin_of(&before).as_deref(), Some("first"));

    let mut other = counter("u", 99);
    other.label = "other".into();
    other.version = 42;
    let (existing, how) = second.find_one_and_upsert(other).await.unwrap();
    assert_eq!(how, Upserted::Existed);
    assert_eq!(existing, stored, "the existing document is returned");
    let after = raw(&coll, "u").await.unwrap();
    assert_eq!(after, before, "an existing document is left unchanged");
    assert_eq!(origin_of(&after).as_deref(), Some("first"));

    // Another id is created again, at version 1, whatever version the value carried.
    let mut fresh_one = counter("v", 1);
    fresh_one.version = 42;
    let (stored, how) = second.find_one_and_upsert(fresh_one).await.unwrap();
    assert_eq!(how, Upserted::Created);
    assert_eq!(stored.version, 1);
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
}

#[tokio::test]
async fn every_write_stamps_the_origin() {
    let coll = fresh("client_origin").await;
    let a: SyncCollection<Counter> = sync(&coll, ClientOptions::new("app-a"));
    let b: SyncCollection<Counter> = sync(&coll, ClientOptions::new("app-b"));
    let c: SyncCollection<Counter> = sync(&coll, ClientOptions::new("app-c"));

    a.find_one_and_upsert(counter("o", 0)).await.unwrap();
    let doc = raw(&coll, "o").await.unwrap();
    assert_eq!(doc.get_str("_origin").unwrap(), "app-a");
    assert_eq!(version_of(&doc), 1);

    b.find_one_and_update("o", |c| c.n += 1).await.unwrap();
    let doc = raw(&coll, "o").await.unwrap();
    assert_eq!(doc.get_str("_origin").unwrap(), "app-b");
    assert_eq!(version_of(&doc), 2);

    c.update_one("o", doc! { "$inc": { "n": 1 } })
        .await
        .unwrap();
    let doc = raw(&coll, "o").await.unwrap();
    assert_eq!(doc.get_str("_origin").unwrap(), "app-c");
    assert_eq!(version_of(&doc), 3);
}

#[tokio::test]
async fn custom_stamp_field_names() {
    let coll = fresh("client_fields").await;
    let options = ClientOptions::new("custom")
        .version_field("rev")
        .origin_field("writer");
    let client: SyncCollection<Revised> = sync(&coll, options);
    let fields = &client.options().fields;
    assert_eq!(fields.version_field, "rev");
    assert_eq!(fields.origin_field, "writer");

    let (stored, how) = client
        .find_one_and_upsert(Revised {
            _id: "r".into(),
            n: 1,
            rev: 0,
        })
        .await
        .unwrap();
    assert_eq!(how, Upserted::Created);
    assert_eq!(stored.rev, 1);
    let check = |doc: &Document, rev: i64| {
        assert_eq!(fields.version_of(doc), Some(rev), "{doc}");
        assert_eq!(fields.origin_of(doc).as_deref(), Some("custom"), "{doc}");
        assert!(!doc.contains_key("version"), "{doc}");
        assert!(!doc.contains_key("_origin"), "{doc}");
    };
    check(&raw(&coll, "r").await.unwrap(), 1);

    let updated = client.find_one_and_update("r", |r| r.n += 1).await.unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.doc.rev, 2);
    assert_eq!(updated.doc.n, 2);
    check(&raw(&coll, "r").await.unwrap(), 2);

    assert_eq!(
        client
            .update_one("r", doc! { "$inc": { "n": 5 } })
            .await
            .unwrap(),
        3
    );
    check(&raw(&coll, "r").await.unwrap(), 3);
    // The custom names are the protected ones now.
    for update in [
        doc! { "$set": { "rev": 10_i64 } },
        doc! { "$set": { "writer": "me" } },
    ] {
        let r = client.update_one("r", update.clone()).await;
        assert!(
            matches!(r, Err(ClientError::InvalidUpdate(_))),
            "{update}: {r:?}"
        );
    }
    assert!(matches!(
        client.delete_one("r", Some(2)).await,
        Err(ClientError::Conflict {
            expected: 2,
            found: Some(3),
            ..
        })
    ));
    assert!(client.delete_one("r", Some(3)).await.unwrap());
}

#[tokio::test]
async fn update_one_applies_operators_and_guards_the_stamp() {
    let coll = fresh("client_update").await;
    let client: SyncCollection<Counter> = sync(&coll, ClientOptions::new("ops"));
    client.find_one_and_upsert(counter("x", 5)).await.unwrap();

    let v = client
        .update_one("x", doc! { "$inc": { "n": 3 }, "$set": { "label": "set" } })
        .await
        .unwrap();
    assert_eq!(v, 2);
    let stored = client.find_one("x").await.unwrap().unwrap();
    assert_eq!(
        (stored.n, stored.label.as_str(), stored.version),
        (8, "set", 2)
    );

    let v = client
        .update_one("x", doc! { "$inc": { "n": -1 } })
        .await
        .unwrap();
    assert_eq!(v, 3, "exactly one version per write");
    let v = client
        .update_one("x", doc! { "$set": { "label": "again" } })
        .await
        .unwrap();
    assert_eq!(v, 4);

    let rejected = [
        doc! { "n": 1 },
        doc! { "$set": { "n": 1 }, "label": "plain" },
        doc! { "$set": { "version": 100_i64 } },
        doc! { "$inc": { "version": 1_i64 } },
        doc! { "$set": { "_origin": "forged" } },
        doc! { "$unset": { "_origin": "" } },
        doc! { "$set": { "version.sub": 1 } },
    ];
    for update in rejected {
        let r = client.update_one("x", update.clone()).await;
        match r {
            Err(ClientError::InvalidUpdate(msg)) => assert!(!msg.is_empty()),
            other => panic!("{update} should be rejected, got {other:?}"),
        }
    }
    let doc = raw(&coll, "x").await.unwrap();
    assert_eq!(version_of(&doc), 4, "rejected updates write nothing");
    assert_eq!(doc.get_str("label").unwrap(), "again");
    assert_eq!(doc.get_str("_origin").unwrap(), "ops");

    let missing = client.update_one("nope", doc! { "$inc": { "n": 1 } }).await;
    assert!(
        matches!(missing, Err(ClientError::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn delete_one_with_expected_version() {
    let coll = fresh("client_delete").await;
    let client: SyncCollection<Counter> = sync(&coll, ClientOptions::new("deleter"));
    client.find_one_and_upsert(counter("d", 0)).await.unwrap();
    client.find_one_and_update("d", |c| c.n = 1).await.unwrap();

    let err = client.delete_one("d", Some(1)).await.unwrap_err();
    match &err {
        ClientError::Conflict {
            expected,
            found,
            attempts,
            ..
        } => assert_eq!((*expected, *found, *attempts), (1, Some(2), 1)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(err.to_string().contains("expected version 1"), "{err}");
    let kept = raw(&coll, "d").await.unwrap();
    assert_eq!(version_of(&kept), 2, "a wrong version keeps the document");

    assert!(client.delete_one("d", Some(2)).await.unwrap());
    assert!(raw(&coll, "d").await.is_none());
    assert!(client.find_one("d").await.unwrap().is_none());
    // Gone already: nothing to delete, and no conflict either.
    assert!(!client.delete_one("d", Some(2)).await.unwrap());
    assert!(!client.delete_one("d", None).await.unwrap());

    // Unconditional delete.
    client.find_one_and_upsert(counter("e", 0)).await.unwrap();
    assert!(client.delete_one("e", None).await.unwrap());
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 0);
}

#[tokio::test]
async fn find_one_and_update_returns_the_patch_of_the_edit() {
    let coll = fresh("client_patch").await;
    let client: SyncCollection<Document> = sync(&coll, ClientOptions::new("patcher"));
    let original = doc! {
        "_id": "p",
        "name": "alpha",
        "count": 1_i32,
        "big": 5_000_000_000_i64,
        "ratio": 0.5,
        "tags": ["a", "b", "c"],
        "nested": { "keep": true, "drop": "me", "deep": { "x": 1_i32 } },
        "gone": "soon",
    };
    let (_, how) = client.find_one_and_upsert(original).await.unwrap();
    assert_eq!(how, Upserted::Created);
    let before = raw(&coll, "p").await.unwrap();

    let updated = client
        .find_one_and_update("p", |d| {
            d.insert("name", "beta");
            d.insert("count", 2_i32);
            d.insert("ratio", 0.75);
            d.insert("tags", bson::bson!(["a", "c", "d"]));
            let nested = d.get_document_mut("nested").unwrap();
            nested.remove("drop");
            nested.insert("added", bson::DateTime::from_millis(1_700_000_000_000));
            nested.get_document_mut("deep").unwrap().insert("y", "new");
            d.remove("gone");
            d.insert("fresh", bson::oid::ObjectId::new());
        })
        .await
        .unwrap();
    assert!(!updated.patch.is_empty());
    assert_eq!(updated.version, 2);
    let after = raw(&coll, "p").await.unwrap();
    assert_eq!(version_of(&after), 2);
    assert_eq!(without_stamp(&updated.doc), without_stamp(&after));

    // The patch touches no stamp field...
    let json = serde_json::to_string(&updated.patch).unwrap();
    assert!(!json.contains("/version"), "{json}");
    assert!(!json.contains("/_origin"), "{json}");
    // ...and replays the edit exactly on the unstamped pre-edit document.
    let replayed = diff::apply(&without_stamp(&before), &updated.patch).unwrap();
    assert_eq!(replayed, without_stamp(&after));
    assert_eq!(
        bytes(&replayed),
        bytes(&without_stamp(&after)),
        "types and order too"
    );

    // An edit that changes nothing writes nothing.
    let noop = client
        .find_one_and_update("p", |d| {
            let name = d.get_str("name").unwrap().to_owned();
            d.insert("name", name);
        })
        .await
        .unwrap();
    assert!(noop.patch.is_empty(), "{:?}", noop.patch);
    assert_eq!(noop.version, 2);
    assert_eq!(raw(&coll, "p").await.unwrap(), after);

    // The same on a typed document.
    let typed: SyncCollection<Counter> = sync(&coll, ClientOptions::new("typed"));
    typed.find_one_and_upsert(counter("t", 1)).await.unwrap();
    let before = raw(&coll, "t").await.unwrap();
    let updated = typed
        .find_one_and_update("t", |c| {
            c.n += 41;
            c.label = "answer".into();
        })
        .await
        .unwrap();
    assert_eq!(updated.version, 2);
    let mut replayed = diff::apply(&without_stamp(&before), &updated.patch).unwrap();
    assert!(!replayed.contains_key("version"), "{replayed}");
    replayed.insert("version", 0_i64);
    let replayed: Counter = bson::from_document(replayed).unwrap();
    assert_eq!(
        replayed,
        Counter {
            version: 0,
            ..updated.doc.clone()
        }
    );
    assert_eq!((updated.doc.n, updated.doc.label.as_str()), (42, "answer"));
    let noop = typed
        .find_one_and_update("t", |c| c.label = "answer".into())
        .await
        .unwrap();
    assert_eq!(noop.version, 2);
    assert_eq!(version_of(&raw(&coll, "t").await.unwrap()), 2);

    let missing = typed.find_one_and_update("nope", |c| c.n += 1).await;
    assert!(
        matches!(missing, Err(ClientError::NotFound { .. })),
        "{missing:?}"
    );
}

fn long_cache() -> CacheOptions {
    CacheOptions {
        capacity: NonZeroUsize::new(64).unwrap(),
        ttl: Duration::from_secs(3600),
    }
}

#[tokio::test]
async fn cache_never_goes_back_before_own_writes_and_is_invalidated_on_conflict() {
    let coll = fresh("client_cache").await;
    let cached: SyncCollection<Counter> =
        sync(&coll, ClientOptions::new("cached").cache(long_cache()));
    let other: SyncCollection<Counter> = sync(&coll, ClientOptions::new("other"));

    // Created by someone else, then read (and cached) at version 1.
    other.find_one_and_upsert(counter("k", 0)).await.unwrap();
    let read = cached.find_one("k").await.unwrap().unwrap();
    assert_eq!(read.version, 1);
    assert_eq!(cached.written_version("k"), None);

    // Written through the cached client: version 2.
    let wrote = cached.find_one_and_update("k", |c| c.n += 1).await.unwrap();
    assert_eq!(wrote.version, 2);
    assert_eq!(cached.written_version("k"), Some(2));

    // An out-of-band write makes it version 3.
    raw_bump(&coll, "k", "out of band").await;
    assert_eq!(version_of(&raw(&coll, "k").await.unwrap()), 3);
    for _ in 0..5 {
        let seen = cached.find_one("k").await.unwrap().unwrap();
        assert!(
            seen.version >= 2,
            "went back to {} after writing 2",
            seen.version
        );
        assert!(seen.n >= 1);
    }

    // Another writer's write makes the cached copy stale: the next CAS loses, the cache
    // is dropped, and the retry works on the newest version.
    let theirs = other
        .find_one_and_update("k", |c| c.label = "theirs".into())
        .await
        .unwrap();
    assert_eq!(theirs.version, 4);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mine = {
        let seen = seen.clone();
        cached
            .find_one_and_update("k", move |c| {
                seen.lock().unwrap().push(c.version);
                c.n += 10;
            })
            .await
            .unwrap()
    };
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![2, 4],
        "first the cached copy, then (after the conflict) the newest version"
    );
    assert_eq!(mine.version, 5);
    assert_eq!(
        mine.doc.label, "theirs",
        "the other writer's change is kept"
    );
    assert_eq!(mine.doc.n, 11);
    assert_eq!(cached.written_version("k"), Some(5));
    let now = cached.find_one("k").await.unwrap().unwrap();
    assert_eq!(now, mine.doc);

    // update_one reads past the cache, so an out-of-band write does not make it lose.
    raw_bump(&coll, "k", "again").await;
    assert_eq!(
        cached
            .update_one("k", doc! { "$inc": { "n": 1 } })
            .await
            .unwrap(),
        7
    );
    let now = cached.find_one("k").await.unwrap().unwrap();
    assert_eq!((now.version, now.n), (7, 12));
}

#[tokio::test]
async fn cache_is_invalidated_when_the_retry_limit_is_reached() {
    let coll = fresh("client_cache_conflict").await;
    let cached: SyncCollection<Counter> = sync(
        &coll,
        ClientOptions::new("cached")
            .cache(long_cache())
            .max_retries(0),
    );
    let other: SyncCollection<Counter> = sync(&coll, ClientOptions::new("other"));
    cached.find_one_and_upsert(counter("i", 0)).await.unwrap();
    assert_eq!(cached.find_one("i").await.unwrap().unwrap().version, 1);
    other.find_one_and_update("i", |c| c.n = 5).await.unwrap();
    // The cached copy is still served (long TTL, not older than this process's write)...
    assert_eq!(cached.find_one("i").await.unwrap().unwrap().version, 1);
    // ...until a compare-and-swap based on it loses.
    let err = cached
        .find_one_and_update("i", |c| c.n += 1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Conflict {
                expected: 1,
                found: Some(2),
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let now = cached.find_one("i").await.unwrap().unwrap();
    assert_eq!(
        (now.version, now.n),
        (2, 5),
        "the conflict dropped the cached copy"
    );
    let next = cached.find_one_and_update("i", |c| c.n += 1).await.unwrap();
    assert_eq!((next.version, next.doc.n), (3, 6));
}

#[tokio::test]
async fn cache_entries_expire_after_their_ttl() {
    let coll = fresh("client_ttl").await;
    let cached: SyncCollection<Counter> = sync(
        &coll,
        ClientOptions::new("ttl").cache(CacheOptions {
            capacity: NonZeroUsize::new(4).unwrap(),
            ttl: Duration::from_millis(100),
        }),
    );
    cached.find_one_and_upsert(counter("t", 0)).await.unwrap();
    assert_eq!(cached.find_one("t").await.unwrap().unwrap().version, 1);
    raw_bump(&coll, "t", "later").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let now = cached.find_one("t").await.unwrap().unwrap();
    assert_eq!(now.version, 2, "an expired entry is read again");
}

#[tokio::test]
async fn type_without_version_field_is_rejected_naming_the_field() {
    let coll = fresh("client_schema").await;

    let err = SyncCollection::<NoVersion>::new(coll.clone(), ClientOptions::new("s"))
        .err()
        .expect("a type without `version` is rejected");
    match &err {
        ClientError::MissingVersionField { type_name, field } => {
            assert_eq!(field, "version");
            assert!(type_name.contains("NoVersion"), "{type_name}");
        }
        other => panic!("expected MissingVersionField, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("`version`"), "{msg}");
    assert!(msg.contains("NoVersion"), "{msg}");

    // The configured name is the one checked and named.
    let err = SyncCollection::<NoVersion>::new(
        coll.clone(),
        ClientOptions::new("s").version_field("rev"),
    )
    .err()
    .expect("still no `rev`");
    assert!(
        matches!(&err, ClientError::MissingVersionField { field, .. } if field == "rev"),
        "{err:?}"
    );
    assert!(err.to_string().contains("`rev`"), "{err}");
    let err = SyncCollection::<Revised>::new(coll.clone(), ClientOptions::new("s"))
        .err()
        .expect("`Revised` has `rev`, not `version`");
    assert!(err.to_string().contains("`version`"), "{err}");

    // Accepted: the custom name configured, a serde rename, untyped documents.
    assert!(SyncCollection::<Revised>::new(
        coll.clone(),
        ClientOptions::new("s").version_field("rev")
    )
    .is_ok());
    assert!(SyncCollection::<Renamed>::new(coll.clone(), ClientOptions::new("s")).is_ok());
    assert!(SyncCollection::<Counter>::new(coll.clone(), ClientOptions::new("s")).is_ok());
    assert!(SyncCollection::<Document>::new(coll.clone(), ClientOptions::new("s")).is_ok());
}

#[tokio::test]
async fn find_many_returns_matching_typed_documents() {
    let coll = fresh("client_many").await;
    let client: SyncCollection<Item> = sync(&coll, ClientOptions::new("many"));
    for id in 0..10 {
        let item = Item {
            _id: id,
            kind: if id % 3 == 0 { "fizz" } else { "plain" }.into(),
            size: i64::from(id) * 10,
            version: 0,
        };
        client.find_one_and_upsert(item).await.unwrap();
    }
    client
        .update_one(3, doc! { "$inc": { "size": 1 } })
        .await
        .unwrap();

    let mut fizz = client
        .find_many(doc! { "kind": "fizz" }, None)
        .await
        .unwrap();
    fizz.sort_by_key(|i| i._id);
    assert_eq!(
        fizz.iter().map(|i| i._id).collect::<Vec<_>>(),
        vec![0, 3, 6, 9]
    );
    assert!(fizz.iter().all(|i| i.kind == "fizz"));
    let three = fizz.iter().find(|i| i._id == 3).unwrap();
    assert_eq!((three.size, three.version), (31, 2));
    assert!(fizz.iter().filter(|i| i._id != 3).all(|i| i.version == 1));

    let big = client
        .find_many(
            doc! { "size": { "$gte": 50 } },
            mongodb::options::FindOptions::builder()
                .sort(doc! { "_id": -1 })
                .build(),
        )
        .await
        .unwrap();
    assert_eq!(
        big.iter().map(|i| i._id).collect::<Vec<_>>(),
        vec![9, 8, 7, 6, 5]
    );
    assert!(client
        .find_many(doc! { "kind": "none" }, None)
        .await
        .unwrap()
        .is_empty());
}

/// A partial model of a shared document (another service owns `billing` and
/// `profile.theirs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct PartialPlayer {
    _id: String,
    gold: i64,
    /// Stored as an Int32 by another writer; modelled as an i64.
    level: i64,
    /// Stored as an Int32; modelled as an f64.
    ratio: f64,
    profile: PartialProfile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nickname: Option<String>,
    version: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct PartialProfile {
    name: String,
}

/// The typed `find_one_and_update` writes only what the edit changed: fields the type does
/// not model survive, untouched values keep their stored BSON type, and the CAS still holds.
#[tokio::test]
async fn typed_update_writes_only_what_the_edit_changed() {
    let coll = fresh("client_partial").await;
    coll.insert_one(doc! {
        "_id": "p1",
        "gold": 100_i64,
        "level": 3_i32,
        "ratio": 2_i32,
        "profile": { "name": "Ada", "theirs": { "since": 2019_i32 } },
        "nickname": "ada",
        "billing": { "plan": "gold", "cents": 1999_i32 },
        "version": 1_i64,
    })
    .await
    .unwrap();
    let players: SyncCollection<PartialPlayer> = sync(&coll, ClientOptions::new("game"));
    let updated = players
        .find_one_and_update("p1", |p| {
            p.gold += 50;
            p.profile.name = "Ada L.".into();
            p.nickname = None;
        })
        .await
        .unwrap();
    assert_eq!(updated.version, 2);
    let stored = raw(&coll, "p1").await.unwrap();
    assert_eq!(
        stored.get_document("billing").unwrap(),
        &doc! { "plan": "gold", "cents": 1999_i32 },
        "a field the type does not model was lost: {stored}"
    );
    assert_eq!(
        stored.get_document("profile").unwrap(),
        &doc! { "name": "Ada L.", "theirs": { "since": 2019_i32 } },
        "a nested field the type does not model was lost: {stored}"
    );
    assert_eq!(stored.get("level"), Some(&Bson::Int32(3)), "{stored}");
    assert_eq!(stored.get("ratio"), Some(&Bson::Int32(2)), "{stored}");
    assert!(
        !stored.contains_key("nickname"),
        "removed field kept: {stored}"
    );
    assert_eq!(
        eventsync::mongo::get_int(&stored, "gold"),
        Some(150),
        "{stored}"
    );
    assert_eq!(origin_of(&stored).as_deref(), Some("game"));
    // The patch is the write's effect on the stored document, no-op replaces excluded.
    let json = serde_json::to_string(&updated.patch).unwrap();
    for untouched in [
        "/level", "/ratio", "/billing", "/theirs", "/version", "/_origin",
    ] {
        assert!(!json.contains(untouched), "{untouched} in {json}");
    }
    let before = doc! {
        "_id": "p1", "gold": 100_i64, "level": 3_i32, "ratio": 2_i32,
        "profile": { "name": "Ada", "theirs": { "since": 2019_i32 } },
        "nickname": "ada", "billing": { "plan": "gold", "cents": 1999_i32 },
    };
    let replayed = diff::apply(&before, &updated.patch).unwrap();
    assert_eq!(replayed, without_stamp(&stored));

    // Still a compare-and-swap: a write in between makes the edit run again on the new
    // state, and the other writer's change survives.
    let runs = AtomicUsize::new(0);
    let updated = players
        .find_one_and_update("p1", |p| {
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                futures_executor_bump(&coll);
            }
            p.gold += 1;
        })
        .await
        .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the edit must run again after a conflict"
    );
    assert_eq!(updated.version, 4);
    let stored = raw(&coll, "p1").await.unwrap();
    assert_eq!(stored.get_str("note").unwrap(), "in between");
    assert_eq!(stored.get("level"), Some(&Bson::Int32(3)), "{stored}");
}

/// Bumps the version of `p1` from inside a (synchronous) edit closure, as a concurrent
/// writer would (its own thread, runtime and driver client: the test's runtime is blocked
/// in the closure).
fn futures_executor_bump(coll: &mongodb::Collection<Document>) {
    let ns = coll.namespace();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let other = client().await;
            let coll = other.database(&ns.db).collection::<Document>(&ns.coll);
            raw_bump(&coll, "p1", "in between").await;
        });
    })
    .join()
    .unwrap();
}
