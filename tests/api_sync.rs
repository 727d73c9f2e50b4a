//! The sync query port end to end: a real daemon, a real server, HTTP and SSE clients.
//!
//! Run with the test server: `eval "$(scripts/testenv/start.sh)"; cargo test --test api_sync`.

mod common;

use std::collections::BTreeMap;

use std::time::{Duration, Instant};

use bson::{doc, Document};
use common::*;
use eventsync::diff::{self, repr};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const TOKEN: &str = "test-token-0123456789abcdef";

/// An HTTP client of the sync port.
#[derive(Clone)]
struct Api {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Api {
    fn new(d: &Daemon, token: Option<&str>) -> Self {
        Self {
            base: d.sync_url(),
            http: reqwest::Client::new(),
            token: token.map(str::to_owned),
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    /// Waits until the sync port answers.
    async fn ready(&self) {
        let api = self.clone();
        wait_for("sync port", Duration::from_secs(30), || {
            let api = api.clone();
            async move {
                let r = api
                    .req(reqwest::Method::GET, "/v1/streams")
                    .send()
                    .await
                    .ok()?;
                (r.status().as_u16() == 200).then_some(())
            }
        })
        .await;
    }

    async fn head(&self, stream: &str) -> i64 {
        let (s, v) = self.get(&format!("/v1/streams/{stream}")).await;
        assert_eq!(s, 200, "{v}");
        v["head"].as_i64().unwrap()
    }

    /// Opens an SSE subscription; items arrive on the returned channel.
    async fn subscribe(&self, path: &str, last_event_id: Option<i64>) -> Sse {
        let mut r = self
            .req(reqwest::Method::GET, path)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            r = r.header("last-event-id", id.to_string());
        }
        let resp = r.send().await.expect("subscribe");
        assert_eq!(resp.status().as_u16(), 200, "subscribe {path}");
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let (mut id, mut kind, mut data) = (None, String::new(), String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = v.trim().parse::<i64>().ok();
                        } else if let Some(v) = line.strip_prefix("event:") {
                            kind = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        }
                    }
                    if let Some(id) = id {
                        let value: Value = serde_json::from_str(&data).expect("SSE data is JSON");
                        if tx.send((id, kind, value, Instant::now())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Sse { rx, task }
    }
}

struct Sse {
    rx: mpsc::UnboundedReceiver<(i64, String, Value, Instant)>,
    task: tokio::task::JoinHandle<()>,
}

impl Sse {
    async fn next(&mut self, timeout: Duration) -> Option<(i64, String, Value, Instant)> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Sse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A sync client's local copy, built only from API items.
#[derive(Default, Debug)]
struct Replica {
    docs: BTreeMap<String, (i64, Option<Document>)>,
    position: i64,
}

impl Replica {
    fn apply(&mut self, item: &Value) {
        let key = item["key"].as_str().expect("key").to_owned();
        let held = self.docs.get(&key).map_or(0, |d| d.0);
        match item["kind"].as_str() {
            Some("event") => {
                let to = item["to_version"].as_i64().unwrap();
                let from = item["from_version"].as_i64().unwrap();
                if to > held {
                    assert_eq!(from, held, "gap in the chain of {key}: {item}");
                    let state = if item["op"] == "delete" {
                        None
                    } else {
                        let patch: diff::Patch =
                            serde_json::from_value(item["patch"].clone()).expect("patch");
                        let base = self
                            .docs
                            .get(&key)
                            .and_then(|d| d.1.clone())
                            .unwrap_or_default();
                        Some(diff::apply(&base, &patch).expect("patch applies"))
                    };
                    self.docs.insert(key, (to, state));
                }
            }
            Some("snapshot") => {
                let v = item["version"].as_i64().unwrap();
                if v >= held {
                    let d = match &item["document"] {
                        Value::Null => None,
                        other => Some(repr::from_value(other).expect("document repr")),
                    };
                    self.docs.insert(key, (v, d));
                }
            }
            other => panic!("unknown item kind {other:?}"),
        }
        self.position = self.position.max(item["seq"].as_i64().unwrap());
    }

    fn live(&self) -> BTreeMap<String, Document> {
        self.docs
            .iter()
            .filter_map(|(k, (_, d))| d.clone().map(|d| (k.clone(), d)))
            .collect()
    }

    fn matches(&self, actual: &BTreeMap<String, Document>) -> bool {
        let mine = self.live();
        mine.len() == actual.len()
            && actual
                .iter()
                .all(|(k, d)| mine.get(k).is_some_and(|m| bytes(m) == bytes(d)))
    }
}

/// Reads all pages of missing items for `vector` into `replica`; returns the positions.
async fn sync_missing(api: &Api, body: Value, replica: &mut Replica, limit: i64) -> Value {
    let mut cursor: Option<String> = None;
    loop {
        let mut req = body.clone();
        req["limit"] = json!(limit);
        if let Some(c) = &cursor {
            req["cursor"] = json!(c);
        }
        let (s, page) = api.post("/v1/sync/missing", req).await;
        assert_eq!(s, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            replica.apply(item);
        }
        if !page["has_more"].as_bool().unwrap() {
            return page;
        }
        cursor = Some(page["next_cursor"].as_str().unwrap().to_owned());
    }
}

struct Env {
    client: mongodb::Client,
    coll: mongodb::Collection<Document>,
    stream: String,
    event_db: String,
    daemon: Daemon,
    api: Api,
}

async fn env(prefix: &str, tokens: Vec<String>, sync_extra: &str, extra: &str) -> Env {
    let client = client().await;
    let app_db = unique_db(&format!("{prefix}_app"));
    let event_db = unique_db(&format!("{prefix}_log"));
    let coll = client.database(&app_db).collection::<Document>("players");
    let mut spec = DaemonSpec::new(&event_db, &app_db, "players");
    spec.tokens = tokens.clone();
    spec.extra = extra.to_owned();
    spec.sync_extra = sync_extra.to_owned();
    let daemon = Daemon::start(&spec);
    let api = Api::new(&daemon, tokens.first().map(String::as_str));
    api.ready().await;
    Env {
        client,
        coll,
        stream: format!("{app_db}.players"),
        event_db,
        daemon,
        api,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openapi_served_equals_repo_copy_and_lists_every_route() {
    let e = env("api_oas", vec![], "", "").await;
    let resp = reqwest::get(format!("{}/v1/openapi.json", e.api.base))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let served = resp.text().await.unwrap();
    let repo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
        .expect("docs/openapi.json");
    assert_eq!(
        served, repo,
        "the daemon serves a different OpenAPI document than docs/openapi.json: rebuild"
    );
    let doc: Value = serde_json::from_str(&repo).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in eventsync::api::ROUTES {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "route {method} {path} is not documented in docs/openapi.json"
        );
    }
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            assert!(
                eventsync::api::ROUTES.contains(&(method.as_str(), path.as_str())),
                "docs/openapi.json documents {method} {path}, which the daemon does not serve"
            );
        }
    }
    // Unknown routes answer JSON errors.
    let (s, v) = e.api.get("/v1/nope").await;
    assert_eq!(s, 404);
    assert_eq!(v["error"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_client_replays_then_follows_live_and_holds_mongos_state() {
    let e = env("api_replay", vec![], "", "").await;
    // A first load before the client exists.
    let writers: Vec<_> = (0..2)
        .map(|w| tokio::spawn(mixed_load(e.coll.clone(), w, 120, 15)))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    wait_converged(&e.client, &e.event_db, &e.coll, Duration::from_secs(60)).await;

    // Starts empty: replays everything in small pages.
    let mut replica = Replica::default();
    let page = sync_missing(
        &e.api,
        json!({ "vector": { "streams": [ { "stream": e.stream, "position": 0 } ] } }),
        &mut replica,
        17,
    )
    .await;
    let position = page["positions"][&e.stream].as_i64().unwrap();
    assert_eq!(position, replica.position);
    assert!(
        replica.matches(&read_collection(&e.coll).await),
        "replayed state differs"
    );

    // Follows live while a second load runs.
    let mut sse = e
        .api
        .subscribe(
            &format!("/v1/streams/{}/live?after={position}", e.stream),
            None,
        )
        .await;
    let writers: Vec<_> = (2..5)
        .map(|w| tokio::spawn(mixed_load(e.coll.clone(), w, 100, 15)))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let events = wait_converged(&e.client, &e.event_db, &e.coll, Duration::from_secs(60)).await;
    let head = events.last().unwrap().seq;
    let mut expected = position + 1;
    while replica.position < head {
        let (id, _, item, _) = sse.next(Duration::from_secs(20)).await.expect("live item");
        assert_eq!(id, expected, "live items must be dense: gap or duplicate");
        expected += 1;
        replica.apply(&item);
    }
    let actual = read_collection(&e.coll).await;
    assert_replay_matches(&replica.live(), &actual);
    drop(e.daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnect_with_last_event_id_has_no_gap_and_no_duplicate() {
    let e = env("api_resume", vec![], "", "").await;
    let load = tokio::spawn(mixed_load(e.coll.clone(), 7, 200, 10));
    let path = format!("/v1/streams/{}/live", e.stream);
    let mut seen: Vec<i64> = Vec::new();
    let mut last: Option<i64> = None;
    // Several reconnects mid-stream while the load runs.
    for round in 0..4 {
        let mut sse = e.api.subscribe(&path, last).await;
        let take = 20 + round * 7;
        for _ in 0..take {
            let Some((id, _, _, _)) = sse.next(Duration::from_secs(20)).await else {
                break;
            };
            seen.push(id);
            last = Some(id);
        }
        drop(sse);
    }
    load.await.unwrap();
    let events = wait_converged(&e.client, &e.event_db, &e.coll, Duration::from_secs(60)).await;
    let head = events.last().unwrap().seq;
    // The rest via ?after=.
    let mut sse = e
        .api
        .subscribe(&format!("{path}?after={}", last.unwrap_or(0)), None)
        .await;
    while seen.last().copied().unwrap_or(0) < head {
        let (id, _, _, _) = sse.next(Duration::from_secs(20)).await.expect("item");
        seen.push(id);
    }
    let expected: Vec<i64> = (1..=head).collect();
    assert_eq!(
        seen, expected,
        "positions across reconnects must be exactly 1..=head"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledge_is_monotonic_and_used_on_reconnect() {
    let e = env("api_ack", vec![], "", "").await;
    let s = &e.stream;
    let (st, v) = e
        .api
        .put("/v1/clients/c1", json!({ "description": "phone" }))
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, _) = e.api.put("/v1/clients/c1", json!({})).await;
    assert_eq!(st, 200);
    let ack = |pos: i64, ver: i64| json!({ "streams": [ { "stream": s, "position": pos, "documents": [ { "id": "p1", "version": ver } ] } ] });
    let (st, v) = e.api.post("/v1/clients/c1/ack", ack(10, 5)).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = e.api.post("/v1/clients/c1/ack", ack(3, 2)).await;
    let entry = &v["vector"]["streams"][0];
    assert_eq!(
        entry["position"], 10,
        "an older vector moved the position back: {v}"
    );
    assert_eq!(
        entry["documents"][0]["version"], 5,
        "an older vector moved a version back: {v}"
    );
    // Concurrent acknowledgements: the result is the per-entry maximum.
    let mut tasks = Vec::new();
    for i in 0..12i64 {
        let api = e.api.clone();
        let body = ack(20 + (i * 7) % 13, 6 + (i * 5) % 11);
        tasks.push(tokio::spawn(async move {
            api.post("/v1/clients/c1/ack", body).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let (_, v) = e.api.get("/v1/clients/c1").await;
    let entry = &v["vector"]["streams"][0];
    let max_pos = (0..12i64).map(|i| 20 + (i * 7) % 13).max().unwrap();
    let max_ver = (0..12i64).map(|i| 6 + (i * 5) % 11).max().unwrap();
    assert_eq!(entry["position"], max_pos, "{v}");
    assert_eq!(entry["documents"][0]["version"], max_ver, "{v}");
    assert_eq!(entry["documents"][0]["key"], "\"p1\"");

    // The stored vector is used when the client comes back without one.
    let sc = eventsync::client::SyncCollection::<Document>::new(
        e.coll.clone(),
        eventsync::client::ClientOptions::new("w"),
    )
    .unwrap();
    for i in 0..3 {
        sc.find_one_and_upsert(doc! { "_id": format!("d{i}"), "n": i })
            .await
            .unwrap();
    }
    let api = e.api.clone();
    let stream = e.stream.clone();
    wait_for("3 events", Duration::from_secs(30), || {
        let (api, stream) = (api.clone(), stream.clone());
        async move { (api.head(&stream).await >= 3).then_some(()) }
    })
    .await;
    e.api
        .put(
            "/v1/clients/c2",
            json!({ "vector": { "streams": [ { "stream": s, "position": 1 } ] } }),
        )
        .await;
    let (st, page) = e
        .api
        .post("/v1/sync/missing", json!({ "client_id": "c2" }))
        .await;
    assert_eq!(st, 200, "{page}");
    let seqs: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![2, 3]);
    let (st, _) = e
        .api
        .post("/v1/sync/missing", json!({ "client_id": "nobody" }))
        .await;
    assert_eq!(st, 404);

    // List and unregister.
    let (_, v) = e.api.get("/v1/clients").await;
    let ids: Vec<&str> = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["c1", "c2"]);
    let (st, _) = e
        .api
        .call(reqwest::Method::DELETE, "/v1/clients/c1", None)
        .await;
    assert_eq!(st, 204);
    let (st, _) = e
        .api
        .call(reqwest::Method::DELETE, "/v1/clients/c1", None)
        .await;
    assert_eq!(st, 404);
    let (st, v) = e.api.post("/v1/clients/c1/ack", ack(1, 1)).await;
    assert_eq!(st, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn document_events_state_and_write_checkpoint() {
    let e = env("api_doc", vec![], "", "").await;
    let sc = eventsync::client::SyncCollection::<Document>::new(
        e.coll.clone(),
        eventsync::client::ClientOptions::new("game-1"),
    )
    .unwrap();
    let id = bson::oid::ObjectId::new();
    sc.find_one_and_upsert(doc! { "_id": id, "gold": 10_i64, "xp": 0, "level": 1 })
        .await
        .unwrap();
    let mut states = vec![sc.find_one(id).await.unwrap().unwrap()];
    wait_head(&e.api, &e.stream, 1).await;
    sc.find_one_and_update(id, |d| {
        d.insert("gold", 60_i64);
        d.insert("xp", 250);
    })
    .await
    .unwrap();
    states.push(sc.find_one(id).await.unwrap().unwrap());
    wait_head(&e.api, &e.stream, 2).await;
    let up = sc
        .find_one_and_update(id, |d| {
            d.insert("level", 2);
            d.insert("at", bson::DateTime::from_millis(1_700_000_000_000));
        })
        .await
        .unwrap();
    states.push(sc.find_one(id).await.unwrap().unwrap());
    let key = format!("{{\"$oid\":\"{id}\"}}");
    let enc = key
        .replace('"', "%22")
        .replace('{', "%7B")
        .replace('}', "%7D")
        .replace('$', "%24")
        .replace(':', "%3A");
    let base = format!("/v1/streams/{}/documents/{enc}", e.stream);

    let api = e.api.clone();
    let cp = format!(
        "{base}/write-checkpoint?origin=game-1&version={}",
        up.version
    );
    let v = wait_for("write checkpoint", Duration::from_secs(30), || {
        let (api, cp) = (api.clone(), cp.clone());
        async move {
            let (s, v) = api.get(&cp).await;
            assert_eq!(s, 200, "{v}");
            (v["reached"] == true).then_some(v)
        }
    })
    .await;
    assert_eq!(v["status"], "reached");
    assert_eq!(v["origin_matches"], true, "{v}");
    let (_, v) = e
        .api
        .get(&format!(
            "{base}/write-checkpoint?origin=game-1&version={}",
            up.version + 5
        ))
        .await;
    assert_eq!(v["status"], "pending");

    let (s, v) = e.api.get(&format!("{base}/events?after=0")).await;
    assert_eq!(s, 200, "{v}");
    let evs = v["events"].as_array().unwrap();
    assert_eq!(evs.len(), 3);
    assert!(evs[1]["patch"].is_array(), "patches are embedded JSON");
    let (_, v) = e.api.get(&format!("{base}/events?after=1&limit=1")).await;
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    assert_eq!(v["has_more"], true);
    assert_eq!(v["version"], 2);

    for (i, want) in states.iter().enumerate() {
        let (s, v) = e.api.get(&format!("{base}/state?version={}", i + 1)).await;
        assert_eq!(s, 200, "{v}");
        let got = repr::from_value(&v["document"]).unwrap();
        assert_eq!(bytes(&got), bytes(want), "state at version {}", i + 1);
    }
    let (s, v) = e.api.get(&format!("{base}/state")).await;
    assert_eq!(s, 200);
    assert_eq!(v["version"], 3);
    let (s, _) = e.api.get(&format!("{base}/state?version=9")).await;
    assert_eq!(s, 404);

    // Document mode: held at version 1 → two events; not held → a snapshot.
    let mut replica = Replica::default();
    replica
        .docs
        .insert(key.clone(), (1, Some(states[0].clone())));
    sync_missing(
        &e.api,
        json!({ "vector": { "streams": [ { "stream": e.stream, "documents": [ { "id": { "$oid": id.to_hex() }, "version": 1 } ] } ] } }),
        &mut replica,
        1,
    )
    .await;
    assert_eq!(bytes(&replica.live()[&key]), bytes(&states[2]));
    let (_, page) = e
        .api
        .post("/v1/sync/missing", json!({ "vector": { "streams": [ { "stream": e.stream, "documents": [ { "key": key, "version": 0 } ] } ] } }))
        .await;
    assert_eq!(page["items"][0]["kind"], "snapshot", "{page}");
    assert_eq!(page["items"][0]["reason"], "not_held");
    assert_eq!(page["items"][0]["version"], 3);

    // Live, filtered to one document.
    let other = "other";
    let mut sse = e
        .api
        .subscribe(
            &format!("/v1/streams/{}/live?after=3&doc={enc}", e.stream),
            None,
        )
        .await;
    sc.find_one_and_upsert(doc! { "_id": other, "n": 1 })
        .await
        .unwrap();
    sc.find_one_and_update(id, |d| {
        d.insert("gold", 1_i64);
    })
    .await
    .unwrap();
    let (_, kind, item, _) = sse.next(Duration::from_secs(20)).await.expect("live");
    assert_eq!(kind, "event");
    assert_eq!(item["key"], key.as_str());
    assert_eq!(item["to_version"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_respects_acknowledgements_and_the_hard_limit() {
    let e = env(
        "api_compact",
        vec![],
        "",
        "[compaction]\ninterval_ms = 200\nmin_age_secs = 0\nkeep_per_document = 1\nhard_max_per_document = 5\n",
    )
    .await;
    let s = e.stream.clone();
    // A registered client that holds nothing pins every event.
    let (st, v) = e
        .api
        .put(
            "/v1/clients/pinned",
            json!({ "vector": { "streams": [ { "stream": s, "position": 0 } ] } }),
        )
        .await;
    assert_eq!(st, 201);
    assert_eq!(v["vector"]["streams"][0]["position"], 0);
    let sc = eventsync::client::SyncCollection::<Document>::new(
        e.coll.clone(),
        eventsync::client::ClientOptions::new("w"),
    )
    .unwrap();
    // One event per write: each write waits for its event (a lookup may otherwise cover
    // several writes with one event).
    sc.find_one_and_upsert(doc! { "_id": "hero", "gold": 0 })
        .await
        .unwrap();
    wait_head(&e.api, &s, 1).await;
    for i in 1..=3 {
        sc.find_one_and_update("hero", |d| {
            d.insert("gold", i);
        })
        .await
        .unwrap();
        wait_head(&e.api, &s, 1 + i as i64).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        read_log(&e.client, &e.event_db, &s).await.len(),
        4,
        "compaction removed unacknowledged events"
    );

    // Acknowledge the first two: exactly those go (the last one is always kept).
    e.api
        .post(
            "/v1/clients/pinned/ack",
            json!({ "streams": [ { "stream": s, "position": 2 } ] }),
        )
        .await;
    let (client, event_db, st) = (e.client.clone(), e.event_db.clone(), s.clone());
    wait_for(
        "compaction of acknowledged events",
        Duration::from_secs(20),
        || {
            let (client, event_db, st) = (client.clone(), event_db.clone(), st.clone());
            async move {
                let log = read_log(&client, &event_db, &st).await;
                (log.iter().map(|e| e.seq).collect::<Vec<_>>() == vec![3, 4]).then_some(())
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(read_log(&e.client, &e.event_db, &s).await.len(), 2);
    // A new client from position 0 gets the snapshot in place of the compacted events.
    let mut replica = Replica::default();
    let page = sync_missing(
        &e.api,
        json!({ "vector": { "streams": [ { "stream": s, "position": 0 } ] } }),
        &mut replica,
        10,
    )
    .await;
    assert_eq!(page["compacted"], true);
    assert_eq!(page["reset_required"], false);
    assert!(replica.matches(&read_collection(&e.coll).await));
    let key = "%22hero%22";
    let (st, v) = e
        .api
        .get(&format!("/v1/streams/{s}/documents/{key}/state?version=1"))
        .await;
    assert_eq!(st, 410, "{v}");
    let (st, _) = e
        .api
        .get(&format!("/v1/streams/{s}/documents/{key}/state?version=2"))
        .await;
    assert_eq!(st, 200);

    // Past the hard limit the client at position 2 is passed, and told so.
    for i in 4..=10 {
        sc.find_one_and_update("hero", |d| {
            d.insert("gold", i);
        })
        .await
        .unwrap();
        wait_head(&e.api, &s, 1 + i as i64).await;
    }
    let (client, event_db, st) = (e.client.clone(), e.event_db.clone(), s.clone());
    wait_for("hard limit", Duration::from_secs(20), || {
        let (client, event_db, st) = (client.clone(), event_db.clone(), st.clone());
        async move { (read_log(&client, &event_db, &st).await.len() <= 5).then_some(()) }
    })
    .await;
    let (_, c) = e.api.get("/v1/clients/pinned").await;
    assert_eq!(c["reset_required"], true, "{c}");
    let mut replica = Replica::default();
    replica.docs.insert("\"hero\"".into(), (2, None));
    let page = sync_missing(&e.api, json!({ "client_id": "pinned" }), &mut replica, 3).await;
    assert_eq!(page["reset_required"], true);
    assert!(
        replica.matches(&read_collection(&e.coll).await),
        "snapshot + events must rebuild the document"
    );
    let head = e.api.head(&s).await;
    e.api
        .post(
            "/v1/clients/pinned/ack",
            json!({ "streams": [ { "stream": s, "position": head } ] }),
        )
        .await;
    let (_, c) = e.api.get("/v1/clients/pinned").await;
    assert_eq!(c["reset_required"], false, "{c}");
}

/// Waits until the log's head reaches `head` (compaction may have removed earlier events).
async fn wait_head(api: &Api, stream: &str, head: i64) {
    let api = api.clone();
    let s = stream.to_owned();
    wait_for("log head", Duration::from_secs(30), || {
        let (api, s) = (api.clone(), s.clone());
        async move { (api.head(&s).await >= head).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_and_limits() {
    let e = env(
        "api_auth",
        vec![TOKEN.into()],
        "max_request_bytes = 2048\nmax_page_size = 10\nmax_vector_entries = 3\nmax_subscribers = 2",
        "",
    )
    .await;
    let open = Api::new(&e.daemon, None);
    let wrong = Api::new(&e.daemon, Some("wrong-token-0123456789"));
    let (s, v) = open.get("/v1/streams").await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"], "unauthorized");
    let (s, v) = wrong.get("/v1/streams").await;
    assert_eq!(s, 403, "{v}");
    let (s, _) = e.api.get("/v1/streams").await;
    assert_eq!(s, 200);
    let (s, _) = open.get("/v1/openapi.json").await;
    assert_eq!(s, 200, "the OpenAPI document is public");

    let st = e.stream.clone();
    let (s, v) = e
        .api
        .post(
            "/v1/sync/missing",
            json!({ "vector": { "streams": [ { "stream": st } ] }, "limit": 11 }),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["detail"].as_str().unwrap().contains("max_page_size (10)"),
        "{v}"
    );
    let docs: Vec<Value> = (0..3).map(|i| json!({ "id": i, "version": 1 })).collect();
    let (s, v) = e
        .api
        .post(
            "/v1/sync/missing",
            json!({ "vector": { "streams": [ { "stream": st, "documents": docs } ] } }),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["detail"].as_str().unwrap().contains("max_vector_entries"),
        "{v}"
    );
    let big = "x".repeat(4096);
    let (s, v) = e
        .api
        .post("/v1/sync/missing", json!({ "client_id": big }))
        .await;
    assert_eq!(s, 413, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("max_request_bytes"),
        "{v}"
    );
    let (s, v) = e
        .api
        .post(
            "/v1/sync/missing",
            json!({ "vector": { "streams": [ { "stream": "no.such" } ] } }),
        )
        .await;
    assert_eq!(
        s, 404,
        "an unknown stream is not found, as the OpenAPI document says: {v}"
    );
    let (s, _) = e
        .api
        .post(
            "/v1/sync/missing",
            json!({ "cursor": "zz" , "client_id": "x"}),
        )
        .await;
    assert_eq!(s, 400);
    let r = e
        .api
        .req(reqwest::Method::POST, "/v1/sync/missing")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (s, _) = e.api.get(&format!("/v1/streams/{st}/live?after=-1")).await;
    assert_eq!(s, 400);

    // Subscribers.
    let path = format!("/v1/streams/{st}/live");
    let _a = e.api.subscribe(&path, None).await;
    let _b = e.api.subscribe(&path, None).await;
    let r = e.api.req(reqwest::Method::GET, &path).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("max_subscribers (2)"),
        "{v}"
    );
    drop(_a);
    let api = e.api.clone();
    let p = path.clone();
    wait_for("a freed subscriber slot", Duration::from_secs(10), || {
        let (api, p) = (api.clone(), p.clone());
        async move {
            let r = api.req(reqwest::Method::GET, &p).send().await.ok()?;
            (r.status().as_u16() == 200).then_some(())
        }
    })
    .await;

    // CORS is closed by default.
    let r = e
        .api
        .req(reqwest::Method::GET, "/v1/streams")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    // Metrics count requests by route and status.
    let m = reqwest::get(format!("{}/metrics", e.daemon.ops_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(
            "eventsync_http_requests_total{method=\"GET\",route=\"/v1/streams\",status=\"401\"}"
        ),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_to_live_subscriber_latency() {
    let e = env("api_latency", vec![], "", "").await;
    let sc = eventsync::client::SyncCollection::<Document>::new(
        e.coll.clone(),
        eventsync::client::ClientOptions::new("lat"),
    )
    .unwrap();
    sc.find_one_and_upsert(doc! { "_id": "p", "n": 0 })
        .await
        .unwrap();
    let mut sse = e
        .api
        .subscribe(&format!("/v1/streams/{}/live", e.stream), None)
        .await;
    sse.next(Duration::from_secs(20))
        .await
        .expect("insert event");
    let mut lat = Vec::new();
    for i in 1..=200 {
        let t = Instant::now();
        let r = sc
            .find_one_and_update("p", |d| {
                d.insert("n", i);
            })
            .await
            .unwrap();
        loop {
            let (_, _, item, at) = sse.next(Duration::from_secs(20)).await.expect("live event");
            if item["to_version"].as_i64() == Some(r.version) {
                lat.push(at.duration_since(t));
                break;
            }
        }
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "write→SSE latency over {} writes: p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
}

/// A registration's times survive updates: `GET` returns the time of the registration and
/// of the last change, never the time of the `GET`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_times_survive_updates() {
    let e = env("api_times", vec![], "", "").await;
    let (st, created) = e
        .api
        .put("/v1/clients/timed", json!({ "description": "first" }))
        .await;
    assert_eq!(st, 201, "{created}");
    let registered = created["registered_at"]
        .as_str()
        .expect("registered_at")
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ack = json!({ "streams": [ { "stream": e.stream, "position": 1 } ] });
    let (st, acked) = e.api.post("/v1/clients/timed/ack", ack).await;
    assert_eq!(st, 200, "{acked}");
    let (st, updated) = e
        .api
        .put("/v1/clients/timed", json!({ "description": "second" }))
        .await;
    assert_eq!(st, 200, "{updated}");
    let changed = updated["updated_at"]
        .as_str()
        .expect("updated_at")
        .to_owned();
    assert_ne!(
        changed, registered,
        "the update must move updated_at: {updated}"
    );
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (st, got) = e.api.get("/v1/clients/timed").await;
        assert_eq!(st, 200, "{got}");
        assert_eq!(got["registered_at"], registered.as_str(), "{got}");
        assert_eq!(got["updated_at"], changed.as_str(), "{got}");
        let (_, list) = e.api.get("/v1/clients").await;
        let listed = list["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["client_id"] == "timed")
            .cloned()
            .unwrap_or_else(|| panic!("not listed: {list}"));
        assert_eq!(listed["registered_at"], registered.as_str(), "{listed}");
        assert_eq!(listed["updated_at"], changed.as_str(), "{listed}");
    }
}

/// A state vector naming a stream the daemon does not serve is answered with 404, as the
/// OpenAPI document says (`NotFound`: unknown stream, client, document or version).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_stream_in_a_vector_is_404() {
    let e = env("api_unknown", vec![], "", "").await;
    let vector = json!({ "streams": [ { "stream": "no_such_db.no_such_coll", "position": 0 } ] });
    let (st, v) = e
        .api
        .post("/v1/sync/missing", json!({ "vector": vector }))
        .await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"], "not_found", "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no_such_db.no_such_coll"),
        "{v}"
    );
    let (st, _) = e.api.put("/v1/clients/u1", json!({})).await;
    assert_eq!(st, 201);
    let (st, v) = e.api.post("/v1/clients/u1/ack", vector.clone()).await;
    assert_eq!(st, 404, "{v}");
    // A known stream still works.
    let ok = json!({ "vector": { "streams": [ { "stream": e.stream, "position": 0 } ] } });
    let (st, v) = e.api.post("/v1/sync/missing", ok).await;
    assert_eq!(st, 200, "{v}");
}
