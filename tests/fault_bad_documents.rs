//! Hostile documents: every BSON type the server stores, awkward keys, deep nesting,
//! documents close to 16 MB, documents whose shadow outgrows their BSON size, and invalid
//! UTF-8 where the server accepts it. Each change either becomes a correct event (the log
//! replays to exactly what MongoDB holds) or goes to the dead letters with a metric —
//! never a crash, and never a stall: later writes still reach the log.

mod common;

use std::time::{Duration, Instant};

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document, RawDocumentBuf};
use common::*;

/// Writes a marker document and waits until its event is in the log: the stream is alive.
async fn assert_live(
    client: &mongodb::Client,
    event_db: &str,
    coll: &mongodb::Collection<Document>,
    n: i32,
) {
    let id = format!("live-{n}");
    coll.insert_one(doc! { "_id": &id, "version": 1_i64 })
        .await
        .expect("marker write");
    let events = client.database(event_db).collection::<Document>("events");
    let key = eventsync::mongo::doc_key(&Bson::String(id.clone()));
    wait_for(
        &format!("marker {id} in the log (no stall)"),
        Duration::from_secs(20),
        || {
            let (events, key) = (events.clone(), key.clone());
            async move {
                events
                    .find_one(doc! { "doc_key": key })
                    .await
                    .ok()
                    .flatten()
                    .map(|_| ())
            }
        },
    )
    .await;
}

async fn dead_letters(client: &mongodb::Client, event_db: &str) -> Vec<Document> {
    use futures_util::TryStreamExt;
    client
        .database(event_db)
        .collection::<Document>("dead_letters")
        .find(doc! {})
        .await
        .expect("dead letters")
        .try_collect()
        .await
        .expect("dead letters")
}

fn nested(levels: usize) -> Document {
    let mut d = doc! { "leaf": 1_i64, "when": bson::DateTime::from_millis(1) };
    for i in 1..levels {
        d = if i % 7 == 0 {
            doc! { "list": [Bson::Document(d)] }
        } else {
            doc! { "n": d }
        };
    }
    d
}

/// One value of every BSON type (and the awkward doubles), by name.
fn every_type() -> Vec<(&'static str, Bson)> {
    vec![
        ("double", Bson::Double(1.5)),
        ("double_integral", Bson::Double(2.0)),
        ("double_neg_zero", Bson::Double(-0.0)),
        ("double_nan", Bson::Double(f64::NAN)),
        ("double_inf", Bson::Double(f64::INFINITY)),
        ("double_neg_inf", Bson::Double(f64::NEG_INFINITY)),
        ("double_max", Bson::Double(f64::MAX)),
        (
            "string",
            Bson::String("héllo \u{0} \u{1F600} \"quoted\" \\ /".into()),
        ),
        ("string_empty", Bson::String(String::new())),
        (
            "document",
            Bson::Document(doc! { "a": 1, "b": { "c": [] } }),
        ),
        ("document_empty", Bson::Document(Document::new())),
        (
            "array",
            Bson::Array(vec![
                Bson::Int32(1),
                Bson::String("a".into()),
                Bson::Null,
                Bson::Array(vec![]),
            ]),
        ),
        (
            "binary_generic",
            Bson::Binary(Binary {
                subtype: BinarySubtype::Generic,
                bytes: vec![0, 1, 2, 255],
            }),
        ),
        (
            "binary_uuid",
            Bson::Binary(Binary {
                subtype: BinarySubtype::Uuid,
                bytes: vec![7; 16],
            }),
        ),
        (
            "binary_user",
            Bson::Binary(Binary {
                subtype: BinarySubtype::UserDefined(0x80),
                bytes: vec![9],
            }),
        ),
        ("undefined", Bson::Undefined),
        ("object_id", Bson::ObjectId(bson::oid::ObjectId::new())),
        ("boolean", Bson::Boolean(false)),
        (
            "datetime",
            Bson::DateTime(bson::DateTime::from_millis(1_700_000_000_123)),
        ),
        (
            "datetime_pre_epoch",
            Bson::DateTime(bson::DateTime::from_millis(-2_208_988_800_000)),
        ),
        (
            "datetime_far",
            Bson::DateTime(bson::DateTime::from_millis(253_402_300_799_999)),
        ),
        ("null", Bson::Null),
        (
            "regex",
            Bson::RegularExpression(bson::Regex {
                pattern: "a.*b".into(),
                options: "i".into(),
            }),
        ),
        ("javascript", Bson::JavaScriptCode("x = 1".into())),
        ("symbol", Bson::Symbol("sym".into())),
        (
            "javascript_with_scope",
            Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope {
                code: "x".into(),
                scope: doc! { "a": 1 },
            }),
        ),
        ("int32", Bson::Int32(i32::MIN)),
        (
            "timestamp",
            Bson::Timestamp(bson::Timestamp {
                time: 1,
                increment: 2,
            }),
        ),
        ("int64", Bson::Int64(i64::MAX)),
        ("int64_small", Bson::Int64(3)),
        (
            "decimal128",
            Bson::Decimal128("1.50".parse().expect("decimal")),
        ),
        ("min_key", Bson::MinKey),
        ("max_key", Bson::MaxKey),
    ]
}

/// Keys that are legal in MongoDB but hostile to paths and JSON Pointers.
fn awkward_keys() -> Document {
    doc! {
        "a.b": 1,
        "$dollar": 2,
        "ü日本語": 3,
        "": 4,
        "with/slash": 5,
        "tilde~0~1": 6,
        "0": 7,
        "$$double": 8,
        "sp ace": 9,
        "nested": { "$inner": 1, "c.d": [ { "$x": 1 } ], "/": { "~": true } },
    }
}

/// A raw document `{_id: id, <key>: <string>}` with arbitrary (maybe invalid UTF-8) bytes.
fn raw_doc(id: &str, key: &[u8], value: &[u8]) -> RawDocumentBuf {
    let mut body = Vec::new();
    body.push(0x02);
    body.extend_from_slice(b"_id\0");
    body.extend_from_slice(&((id.len() + 1) as i32).to_le_bytes());
    body.extend_from_slice(id.as_bytes());
    body.push(0);
    body.push(0x02);
    body.extend_from_slice(key);
    body.push(0);
    body.extend_from_slice(&((value.len() + 1) as i32).to_le_bytes());
    body.extend_from_slice(value);
    body.push(0);
    let mut bytes = ((body.len() + 5) as i32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&body);
    bytes.push(0);
    RawDocumentBuf::from_bytes(bytes).expect("well-formed BSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_documents_become_events_or_dead_letters_never_a_stall() {
    let started = Instant::now();
    let client = client().await;
    let (app_db, event_db) = (unique_db("bad_app"), unique_db("bad_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let spec = DaemonSpec::new(&event_db, &app_db, "items");
    let mut daemon = Daemon::start(&spec);
    wait_streaming(&client, &event_db, &stream).await;

    // Every BSON type, one document each; the server may refuse some (nx-27017 cannot
    // store Decimal128, Regex, Timestamp, MinKey/MaxKey, NaN/Infinity).
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (name, value) in every_type() {
        let id = format!("type-{name}");
        match coll
            .insert_one(doc! { "_id": &id, "v": value.clone(), "list": [value], "version": 1_i64 })
            .await
        {
            Ok(_) => accepted.push(id),
            Err(_) => refused.push(name),
        }
    }
    assert!(
        accepted.len() >= 15,
        "the server stores the common types: {accepted:?}"
    );

    let mut keys = awkward_keys();
    keys.insert("_id", "keys");
    keys.insert("version", 1_i64);
    coll.insert_one(keys).await.expect("awkward keys");

    let deep = [90usize, 100];
    for levels in deep {
        coll.insert_one(
            doc! { "_id": format!("deep-{levels}"), "d": nested(levels), "version": 1_i64 },
        )
        .await
        .unwrap_or_else(|e| panic!("{levels} levels: {e}"));
    }

    // Large: 1 MB becomes an event; 5 MB and 15 MB exceed max_event_bytes (4 MB).
    let mb = 1024 * 1024;
    for (name, size) in [
        ("large-1mb", mb),
        ("large-5mb", 5 * mb),
        ("large-15mb", 15 * mb),
    ] {
        coll.insert_one(doc! { "_id": name, "s": "x".repeat(size), "version": 1_i64 })
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // A field whose JSON form is six times its BSON size (control characters).
    coll.insert_one(doc! { "_id": "escapes", "s": "\u{1}".repeat(mb), "version": 1_i64 })
        .await
        .expect("escapes");

    // Invalid UTF-8 in a key and in a value, on a connection of its own (a server may
    // drop it). Whatever the server does, the daemon must go on.
    let raw_client = client_for(&mongo_uri()).await;
    let raw = raw_client
        .database(&app_db)
        .collection::<RawDocumentBuf>("items");
    let mut utf8_accepted = Vec::new();
    for (id, key, value) in [
        ("utf8-key", &b"k\xff\xfe"[..], &b"v"[..]),
        ("utf8-value", &b"k"[..], &b"v\xc3\x28"[..]),
    ] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            raw.insert_one(raw_doc(id, key, value)),
        )
        .await;
        if matches!(r, Ok(Ok(_))) {
            utf8_accepted.push(id);
        }
    }
    drop(raw_client);

    assert_live(&client, &event_db, &coll, 1).await;

    // The dead letters: the two large documents and the escaped one, with a metric.
    let dead = dead_letters(&client, &event_db).await;
    let dead_ids: Vec<String> = dead
        .iter()
        .filter_map(|d| d.get_str("doc_id").ok().map(str::to_owned))
        .collect();
    for id in ["large-5mb", "large-15mb", "escapes"] {
        assert!(
            dead_ids.iter().any(|d| d == id),
            "{id} must be a dead letter: {dead:?}"
        );
    }
    assert!(
        !dead_ids.iter().any(|d| d == "large-1mb"),
        "1 MB fits in an event"
    );
    let counted = metric_sum(&daemon, "eventsync_dead_letters_total").await;
    assert!(counted >= 3.0, "eventsync_dead_letters_total = {counted}");
    for id in &utf8_accepted {
        assert!(
            dead_ids.iter().any(|d| d == id)
                || dead
                    .iter()
                    .any(|d| d.get_str("reason") == Ok("undecodable_event")),
            "invalid UTF-8 document {id} must be a dead letter or an event: {dead:?}"
        );
    }
    // Documents with invalid UTF-8 cannot be read back as documents: overwrite them.
    for id in &utf8_accepted {
        coll.replace_one(doc! { "_id": id }, doc! { "fixed": true })
            .await
            .expect("fix");
    }

    // The next change of each dead-lettered document carries its state once it fits.
    for id in ["large-5mb", "large-15mb", "escapes"] {
        coll.update_one(
            doc! { "_id": id },
            doc! { "$set": { "s": "small now" }, "$inc": { "version": 1_i64 } },
        )
        .await
        .expect("shrink");
    }
    // Change every stored document once more: patches inside all types, keys and depths.
    coll.update_many(doc! {}, doc! { "$set": { "touched": 1 } })
        .await
        .expect("touch");
    coll.update_one(doc! { "_id": "keys" }, doc! { "$set": { "a.b": 10 } })
        .await
        .ok();
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    assert!(daemon.running(), "daemon crashed\n{}", daemon.log_text());

    // Restart: every shadow is read back from storage and the next diffs still work.
    daemon.kill9();
    let daemon = Daemon::start(&spec);
    coll.update_many(doc! {}, doc! { "$set": { "touched": 2 } })
        .await
        .expect("touch");
    for levels in deep {
        coll.update_one(
            doc! { "_id": format!("deep-{levels}") },
            doc! { "$set": { "d": nested(levels - 1) } },
        )
        .await
        .expect("deep update");
    }
    let after = wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    assert!(after.len() > events.len());
    assert_live(&client, &event_db, &coll, 2).await;
    println!(
        "hostile documents: {} types stored, refused by the server: {refused:?}; invalid UTF-8 \
         accepted: {utf8_accepted:?}; {} dead letters; {} events; {:?}",
        accepted.len(),
        dead.len(),
        after.len(),
        started.elapsed()
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_event_limit_dead_letters_and_the_next_change_converges() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("limit_app"), unique_db("limit_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.pipeline = "max_event_bytes = 4096".into();
    let daemon = Daemon::start(&spec);
    wait_streaming(&client, &event_db, &stream).await;
    let writer = eventsync::client::SyncCollection::<Document>::new(
        coll.clone(),
        eventsync::client::ClientOptions::new("limit-writer"),
    )
    .expect("client");

    // Too large from the start, then small: the first event is an insert of the state.
    writer
        .find_one_and_upsert(doc! { "_id": "a", "s": "x".repeat(10_000) })
        .await
        .expect("a");
    // Small, then too large, then small again: one event covers the skipped version.
    writer
        .find_one_and_upsert(doc! { "_id": "b", "s": "x" })
        .await
        .expect("b");
    assert_live(&client, &event_db, &coll, 1).await;
    writer
        .find_one_and_update("b", |d| {
            d.insert("s", "y".repeat(10_000));
        })
        .await
        .expect("b grows");
    assert_live(&client, &event_db, &coll, 2).await;
    let dead = dead_letters(&client, &event_db).await;
    // One dead letter per change event: a server may report a write twice (nx-27017 does
    // for findAndModify), and each report of the oversized state is recorded.
    let mut dead_ids: Vec<&str> = dead
        .iter()
        .filter(|d| d.get_str("reason") == Ok("too_large"))
        .filter_map(|d| d.get_str("doc_id").ok())
        .collect();
    dead_ids.dedup();
    assert_eq!(dead_ids, vec!["a", "b"], "{dead:?}");
    let counted = metric_sum(&daemon, "eventsync_dead_letters_total").await;
    assert!(counted >= 2.0, "metric counts the dead letters: {counted}");

    writer
        .find_one_and_update("a", |d| {
            d.insert("s", "small");
        })
        .await
        .expect("a shrinks");
    writer
        .find_one_and_update("b", |d| {
            d.insert("s", "small");
        })
        .await
        .expect("b shrinks");
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(30)).await;
    let of = |id: &str| {
        let key = eventsync::mongo::doc_key(&Bson::String(id.into()));
        events
            .iter()
            .filter(|e| e.doc_key == key)
            .map(|e| (e.from_version, e.to_version))
            .collect::<Vec<_>>()
    };
    assert_eq!(of("a"), vec![(0, 2)], "a's first event carries its state");
    assert_eq!(
        of("b"),
        vec![(0, 1), (1, 3)],
        "b's chain steps over the dead-lettered version"
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_document_whose_shadow_outgrows_16_mb_does_not_stall_the_stream() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("grow_app"), unique_db("grow_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let daemon = Daemon::start(&DaemonSpec::new(&event_db, &app_db, "items"));
    wait_streaming(&client, &event_db, &stream).await;
    // 13 chunks of 1 MB binary: 13 MB of BSON; each change adds 1 MB (an event of 1.4 MB
    // of base64), but the whole document as JSON would be more than 17 MB.
    coll.insert_one(doc! { "_id": "grow", "chunks": [], "version": 1_i64 })
        .await
        .expect("insert");
    for i in 0..13 {
        let chunk = Binary {
            subtype: BinarySubtype::Generic,
            bytes: vec![i as u8; 1024 * 1024],
        };
        coll.update_one(
            doc! { "_id": "grow" },
            doc! { "$push": { "chunks": chunk }, "$inc": { "version": 1_i64 } },
        )
        .await
        .expect("grow");
    }
    assert_live(&client, &event_db, &coll, 1).await;
    coll.update_one(
        doc! { "_id": "grow" },
        doc! { "$set": { "chunks": [1, 2] }, "$inc": { "version": 1_i64 } },
    )
    .await
    .expect("shrink");
    wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    assert_live(&client, &event_db, &coll, 2).await;
    drop(daemon);
}
