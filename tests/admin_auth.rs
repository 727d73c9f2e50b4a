//! Authorization, admission control and operator controls end to end: a real daemon on
//! the real test server.
//!
//! `eval "$(scripts/testenv/start.sh)"; cargo test --test admin_auth`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bson::{doc, Document};
use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const LEGACY: &str = "legacy-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";
const CLIENT_A: &str = "client-a-token-0123456789abcdef";
const SECRET: &str = "jwt-secret-0123456789abcdef0123456789abcdef";

fn auth_toml(listed: &str) -> String {
    format!(
        "[auth]\nadmin_tokens = [{ADMIN:?}]\n\n[[auth.clients]]\ntoken = {CLIENT_A:?}\nclient_id = \"a\"\nstreams = [{listed:?}]\n\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret = {SECRET:?}\nleeway_secs = 0\n"
    )
}

fn jwt(secret: &str, sub: &str, streams: &[&str], exp_offset: i64, admin: bool) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = json!({ "sub": sub, "streams": streams, "admin": admin, "exp": now + exp_offset });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

#[derive(Clone)]
struct Http {
    base: String,
    http: reqwest::Client,
}

impl Http {
    fn new(d: &Daemon) -> Self {
        Self {
            base: d.sync_url(),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let Ok(resp) = r.send().await else {
            // Not answering (yet): status 0.
            return (0, Value::Null, reqwest::header::HeaderMap::new());
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    async fn status(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> u16 {
        self.call(method, path, token, body).await.0
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::GET, path, Some(token), None)
            .await;
        (s, v)
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::POST, path, Some(token), Some(body))
            .await;
        (s, v)
    }

    async fn ready(&self) {
        let me = self.clone();
        wait_for("sync port", Duration::from_secs(30), || {
            let me = me.clone();
            async move {
                let (s, _) = me.get("/v1/streams", LEGACY).await;
                (s == 200).then_some(())
            }
        })
        .await;
    }
}

struct Setup {
    daemon: Daemon,
    http: Http,
    client: mongodb::Client,
    event_db: String,
    coll: mongodb::Collection<Document>,
    stream: String,
    other: String,
}

/// The sum of a metric's samples whose labels include all of `labels`.
async fn metric(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Ok(resp) = reqwest::get(format!("{}/metrics", d.ops_url())).await else {
        return f64::NAN;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn setup(prefix: &str, pipeline: &str, sync_extra: &str) -> Setup {
    let client = client().await;
    let db = unique_db(prefix);
    let event_db = format!("{db}_log");
    let coll = client.database(&db).collection::<Document>("players");
    coll.insert_one(doc! { "_id": "seed", "version": 1_i64 })
        .await
        .expect("seed");
    let mut spec = DaemonSpec::new(&event_db, &db, "players");
    spec.streams.push((db.clone(), "other".into()));
    spec.tokens = vec![LEGACY.into()];
    let stream = format!("{db}.players");
    let other = format!("{db}.other");
    spec.extra = auth_toml(&stream);
    spec.pipeline = pipeline.into();
    spec.sync_extra = sync_extra.into();
    let daemon = Daemon::start(&spec);
    let http = Http::new(&daemon);
    http.ready().await;
    wait_streaming(&client, &event_db, &stream).await;
    Setup {
        daemon,
        http,
        client,
        event_db,
        coll,
        stream,
        other,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authorization_rule_holds() {
    let s = setup("authz", "", "").await;
    let h = &s.http;
    use reqwest::Method as M;
    let events = |stream: &str| format!("/v1/streams/{stream}/documents/%22seed%22/events");

    // No token: 401; unknown static token: 403.
    assert_eq!(h.status(M::GET, "/v1/streams", None, None).await, 401);
    assert_eq!(
        h.status(
            M::GET,
            "/v1/streams",
            Some("unknown-token-0123456789"),
            None
        )
        .await,
        403
    );

    // A client token acts only as its own client id.
    assert_eq!(
        h.status(M::PUT, "/v1/clients/a", Some(CLIENT_A), Some(json!({})))
            .await,
        201
    );
    for (m, path, body) in [
        (M::PUT, "/v1/clients/b", Some(json!({}))),
        (M::GET, "/v1/clients/b", None),
        (M::DELETE, "/v1/clients/b", None),
        (
            M::POST,
            "/v1/clients/b/ack",
            Some(json!({ "streams": [{ "stream": s.stream.clone(), "position": 0 }] })),
        ),
        (
            M::POST,
            "/v1/sync/missing",
            Some(
                json!({ "client_id": "b", "vector": { "streams": [{ "stream": s.stream.clone(), "position": 0 }] } }),
            ),
        ),
    ] {
        assert_eq!(
            h.status(m.clone(), path, Some(CLIENT_A), body).await,
            403,
            "{m} {path} as client a"
        );
    }
    // ... and reads only its listed streams.
    assert_eq!(
        h.status(M::GET, &events(&s.stream), Some(CLIENT_A), None)
            .await,
        200
    );
    assert_eq!(
        h.status(M::GET, &events(&s.other), Some(CLIENT_A), None)
            .await,
        403
    );
    assert_eq!(
        h.status(
            M::GET,
            &format!("/v1/streams/{}/live", s.other),
            Some(CLIENT_A),
            None
        )
        .await,
        403
    );
    assert_eq!(
        h.status(
            M::POST,
            "/v1/sync/missing",
            Some(CLIENT_A),
            Some(json!({ "client_id": "a", "vector": { "streams": [{ "stream": s.other.clone(), "position": 0 }] } }))
        )
        .await,
        403
    );
    let (st, body) = h.get("/v1/streams", CLIENT_A).await;
    assert_eq!(st, 200);
    let listed: Vec<&str> = body["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .filter_map(|x| x["stream"].as_str())
        .collect();
    assert_eq!(
        listed,
        vec![s.stream.as_str()],
        "only listed streams are shown"
    );

    // Signed tokens: valid → acts as `sub`; expired or badly signed → 401.
    let b = jwt(SECRET, "b", &[&s.stream], 600, false);
    assert_eq!(
        h.status(M::PUT, "/v1/clients/b", Some(&b), Some(json!({})))
            .await,
        201
    );
    assert_eq!(h.status(M::GET, "/v1/clients/a", Some(&b), None).await, 403);
    assert_eq!(
        h.status(M::GET, &events(&s.other), Some(&b), None).await,
        403
    );
    let expired = jwt(SECRET, "b", &[&s.stream], -600, false);
    assert_eq!(
        h.status(M::GET, "/v1/clients/b", Some(&expired), None)
            .await,
        401
    );
    let forged = jwt(
        "not-the-secret-0123456789abcdef0123456789",
        "b",
        &[&s.stream],
        600,
        false,
    );
    assert_eq!(
        h.status(M::GET, "/v1/clients/b", Some(&forged), None).await,
        401
    );

    // Admin routes: client tokens (static or JWT) → 403; admin, legacy and admin JWT → 200.
    assert_eq!(
        h.status(M::GET, "/v1/admin/streams", Some(CLIENT_A), None)
            .await,
        403
    );
    assert_eq!(
        h.status(M::GET, "/v1/admin/streams", Some(&b), None).await,
        403
    );
    assert_eq!(
        h.status(
            M::POST,
            &format!("/v1/admin/streams/{}/pause", s.stream),
            Some(&b),
            None
        )
        .await,
        403
    );
    assert_eq!(
        h.status(M::GET, "/v1/admin/streams", Some(ADMIN), None)
            .await,
        200
    );
    assert_eq!(
        h.status(M::GET, "/v1/admin/streams", Some(LEGACY), None)
            .await,
        200
    );
    let admin_jwt = jwt(SECRET, "ops", &[], 600, true);
    assert_eq!(
        h.status(M::GET, "/v1/admin/streams", Some(&admin_jwt), None)
            .await,
        200
    );

    // Client-caused 4xx are counted by status, never as daemon errors.
    let text = reqwest::get(format!("{}/metrics", s.daemon.ops_url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        !text.contains("eventsync_errors_total{component=\"api\""),
        "4xx counted as daemon errors:\n{text}"
    );
    let d = &s.daemon;
    let forbidden = [("status", "403"), ("code", "forbidden")];
    assert!(metric(d, "eventsync_http_client_errors_total", &forbidden).await >= 10.0);
    let unauthorized = [("status", "401"), ("code", "unauthorized")];
    assert!(metric(d, "eventsync_http_client_errors_total", &unauthorized).await >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_control_sheds_a_burst_and_recovers() {
    let s = setup("admit", "", "max_concurrent_catchups = 1").await;
    let docs: Vec<Document> = (0..300)
        .map(|i| doc! { "_id": i, "version": 1_i64, "pad": "x".repeat(200) })
        .collect();
    s.coll.insert_many(docs).await.expect("insert");
    wait_converged(&s.client, &s.event_db, &s.coll, Duration::from_secs(60)).await;

    let body = json!({ "vector": { "streams": [{ "stream": s.stream.clone(), "position": 0 }] }, "limit": 1000 });
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let h = s.http.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            h.call(
                reqwest::Method::POST,
                "/v1/sync/missing",
                Some(LEGACY),
                Some(body),
            )
            .await
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let (status, v, headers) = t.await.expect("task");
        match status {
            200 => ok += 1,
            503 => {
                busy += 1;
                assert_eq!(v["error"], "busy", "{v}");
                let retry = headers
                    .get("retry-after")
                    .and_then(|r| r.to_str().ok())
                    .and_then(|r| r.parse::<u64>().ok());
                assert!(
                    retry.is_some_and(|r| r >= 1),
                    "503 without Retry-After: {headers:?}"
                );
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    println!("admission burst: {ok} served, {busy} shed with 503");
    assert!(ok >= 1 && busy >= 1, "ok {ok}, busy {busy}");
    // Healthy afterwards: a catch-up is served, the replica is ready, nothing is stuck.
    let (status, v) = s.http.post("/v1/sync/missing", LEGACY, body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(301));
    let ready = reqwest::get(format!("{}/readyz", s.daemon.ops_url()))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);
    assert!(metric_sum(&s.daemon, "eventsync_catchups_rejected_total").await >= busy as f64);
    assert_eq!(
        metric_sum(&s.daemon, "eventsync_catchups_in_flight").await,
        0.0
    );
}

/// Posts a control and waits until the holder carried it out.
async fn control(s: &Setup, path: &str, body: Value) -> Value {
    let (status, v) = s.http.post(path, ADMIN, body).await;
    assert_eq!(status, 202, "{path}: {v}");
    let id = v["id"].as_str().expect("control id").to_owned();
    let h = s.http.clone();
    wait_for(
        "the control to be carried out",
        Duration::from_secs(30),
        || {
            let h = h.clone();
            let id = id.clone();
            async move {
                let (_, c) = h.get(&format!("/v1/admin/controls/{id}"), ADMIN).await;
                (c["state"] != "pending").then_some(c)
            }
        },
    )
    .await
}

async fn log_len(s: &Setup) -> usize {
    read_log(&s.client, &s.event_db, &s.stream).await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_reread_keep_the_log_exact() {
    let s = setup("ctl", "", "").await;
    for i in 0..20 {
        s.coll
            .insert_one(doc! { "_id": i, "version": 1_i64, "n": i })
            .await
            .expect("insert");
    }
    wait_converged(&s.client, &s.event_db, &s.coll, Duration::from_secs(60)).await;
    let before = log_len(&s).await;

    // Pause: writes keep coming, the log does not move.
    let c = control(
        &s,
        &format!("/v1/admin/streams/{}/pause", s.stream),
        json!({}),
    )
    .await;
    assert_eq!(c["state"], "done", "{c}");
    for i in 0..20 {
        s.coll
            .update_one(
                doc! { "_id": i },
                doc! { "$set": { "n": i + 100, "version": 2_i64 } },
            )
            .await
            .expect("update");
    }
    // The status says paused once the holder reports it; by then it has taken nothing.
    let h = s.http.clone();
    let stream = s.stream.clone();
    wait_for("status paused", Duration::from_secs(30), || {
        let h = h.clone();
        let stream = stream.clone();
        async move {
            let (_, st) = h.get(&format!("/v1/admin/streams/{stream}"), ADMIN).await;
            (st["paused"] == true).then_some(())
        }
    })
    .await;
    assert_eq!(log_len(&s).await, before, "events appended while paused");
    assert_eq!(metric(&s.daemon, "eventsync_stream_paused", &[]).await, 1.0);

    // Resume: every paused change arrives, no gap (replay checks density and chains).
    let c = control(
        &s,
        &format!("/v1/admin/streams/{}/resume", s.stream),
        json!({}),
    )
    .await;
    assert_eq!(c["state"], "done", "{c}");
    let events = wait_converged(&s.client, &s.event_db, &s.coll, Duration::from_secs(60)).await;
    assert_eq!(events.len(), before + 20);

    // Re-read with nothing different: converges and emits nothing.
    let c = control(
        &s,
        &format!("/v1/admin/streams/{}/resync", s.stream),
        json!({}),
    )
    .await;
    assert_eq!(c["state"], "done", "{c}");
    wait_streaming(&s.client, &s.event_db, &s.stream).await;
    let resyncs = metric(
        &s.daemon,
        "eventsync_resyncs_total",
        &[("reason", "operator")],
    )
    .await;
    assert_eq!(resyncs, 1.0);
    // A write after the re-read is the next event: the re-read added none of its own.
    s.coll
        .update_one(
            doc! { "_id": 0 },
            doc! { "$set": { "n": -1, "version": 3_i64 } },
        )
        .await
        .expect("update");
    let events = wait_converged(&s.client, &s.event_db, &s.coll, Duration::from_secs(60)).await;
    assert_eq!(
        events.len(),
        before + 21,
        "the re-read emitted events without differences"
    );

    // Notices: clients see the operator actions on the stream.
    let (_, st) = s
        .http
        .get(&format!("/v1/streams/{}", s.stream), LEGACY)
        .await;
    let actions: Vec<&str> = st["notices"]
        .as_array()
        .expect("notices")
        .iter()
        .filter_map(|n| n["action"].as_str())
        .collect();
    assert_eq!(actions, vec!["resync", "resume", "pause"], "{st}");
    // Status: holder, epoch, checkpoint position.
    let (_, st) = s
        .http
        .get(&format!("/v1/admin/streams/{}", s.stream), ADMIN)
        .await;
    assert_eq!(st["holder"], "test-daemon", "{st}");
    assert!(st["epoch"].as_i64().is_some_and(|e| e >= 1), "{st}");
    assert_eq!(
        st["checkpoint"]["seq"].as_i64(),
        Some((before + 21) as i64),
        "{st}"
    );
    assert_eq!(st["paused"], false, "{st}");
    let pause_done = [("action", "pause"), ("outcome", "done")];
    assert!(metric(&s.daemon, "eventsync_admin_actions_total", &pause_done).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_at_a_time_begins_where_asked() {
    let s = setup("startat", "", "").await;
    wait_converged(&s.client, &s.event_db, &s.coll, Duration::from_secs(60)).await;
    let c = control(
        &s,
        &format!("/v1/admin/streams/{}/pause", s.stream),
        json!({}),
    )
    .await;
    assert_eq!(c["state"], "done");
    // Before the point: skipped. Wait for the next second so the point separates them.
    s.coll
        .insert_one(doc! { "_id": "before", "version": 1_i64 })
        .await
        .expect("insert");
    let first = bson::DateTime::now().timestamp_millis() / 1000;
    wait_for("the next second", Duration::from_secs(5), || async move {
        (bson::DateTime::now().timestamp_millis() / 1000 > first).then_some(())
    })
    .await;
    let at = bson::DateTime::now().timestamp_millis() / 1000 * 1000;
    s.coll
        .insert_one(doc! { "_id": "after", "version": 1_i64 })
        .await
        .expect("insert");
    let c = control(
        &s,
        &format!("/v1/admin/streams/{}/start-at", s.stream),
        json!({ "at_ms": at }),
    )
    .await;
    assert_eq!(c["state"], "done", "{c}");
    let c = control(
        &s,
        &format!("/v1/admin/streams/{}/resume", s.stream),
        json!({}),
    )
    .await;
    assert_eq!(c["state"], "done");
    let (client, db, stream) = (s.client.clone(), s.event_db.clone(), s.stream.clone());
    let events = wait_for("the event after the point", Duration::from_secs(30), || {
        let (client, db, stream) = (client.clone(), db.clone(), stream.clone());
        async move {
            let log = read_log(&client, &db, &stream).await;
            log.iter().any(|e| e.doc_key == "\"after\"").then_some(log)
        }
    })
    .await;
    replay(&events);
    assert!(
        !events.iter().any(|e| e.doc_key == "\"before\""),
        "a change before the start point was read"
    );

    // The operator's skip is the one difference between the log and MongoDB: a re-read
    // emits exactly that document, and nothing for the others.
    let c = control(
        &s,
        &format!("/v1/admin/streams/{}/resync", s.stream),
        json!({}),
    )
    .await;
    assert_eq!(c["state"], "done", "{c}");
    let after = wait_converged(&s.client, &s.event_db, &s.coll, Duration::from_secs(60)).await;
    let new: Vec<&str> = after[events.len()..]
        .iter()
        .map(|e| e.doc_key.as_str())
        .collect();
    assert_eq!(
        new,
        vec!["\"before\""],
        "the re-read emitted more than the difference"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_inspected_and_redriven() {
    let s = setup("dlq", "max_event_bytes = 1024", "").await;
    s.coll
        .insert_one(doc! { "_id": "big", "version": 1_i64, "pad": "x".repeat(4000) })
        .await
        .expect("insert");
    let h = s.http.clone();
    let list = wait_for("a dead letter", Duration::from_secs(30), || {
        let h = h.clone();
        async move {
            let (_, v) = h.get("/v1/admin/dead-letters", ADMIN).await;
            v["dead_letters"]
                .as_array()
                .filter(|a| !a.is_empty())
                .cloned()
        }
    })
    .await;
    let id = list[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(list[0]["stream"], s.stream.as_str());
    let (status, one) = s
        .http
        .get(&format!("/v1/admin/dead-letters/{id}"), ADMIN)
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["doc_id"], "big", "{one}");
    // The document is made small enough; a re-drive re-reads the stream and the
    // document's state reaches the log.
    s.coll
        .update_one(doc! { "_id": "big" }, doc! { "$set": { "pad": "small" } })
        .await
        .expect("shrink");
    let (status, c) = s
        .http
        .post(
            &format!("/v1/admin/dead-letters/{id}/redrive"),
            ADMIN,
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{c}");
    assert_eq!(c["action"], "resync");
    wait_converged(&s.client, &s.event_db, &s.coll, Duration::from_secs(60)).await;
    let (_, one) = s
        .http
        .get(&format!("/v1/admin/dead-letters/{id}"), ADMIN)
        .await;
    assert_eq!(one["redrive_control"], c["id"], "{one}");
    assert_eq!(s.http.get("/v1/admin/dead-letters/zz", ADMIN).await.0, 400);
}

/// A private server, so that no other test's history holds the oplog back.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oplog_headroom_falls_as_history_moves_on() {
    let port = free_port();
    let dir = std::env::temp_dir().join(unique_db("oplog"));
    std::fs::create_dir_all(&dir).expect("dir");
    let _server = Server(
        Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/testenv/launch_server.sh"
            ))
            .arg(port.to_string())
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("launch_server.sh"),
    );
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let client = client_for(&uri).await;
    wait_for("the private server", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            client
                .database("admin")
                .run_command(doc! { "ping": 1 })
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    let coll = client.database("app").collection::<Document>("players");
    let mut spec = DaemonSpec::new("oplog_log", "app", "players");
    spec.uri = uri.clone();
    spec.tokens = vec![LEGACY.into()];
    // A paused stream holds no change stream open, so its resume point stays put while
    // nx prunes the history behind the streams that do read.
    spec.extra = format!("[auth]\nadmin_tokens = [{ADMIN:?}]\n");
    let daemon = Daemon::start(&spec);
    let http = Http::new(&daemon);
    http.ready().await;
    wait_streaming(&client, "oplog_log", "app.players").await;
    // Some history, then pause: the resume point stays where it is.
    for i in 0..10 {
        coll.insert_one(doc! { "_id": i, "version": 1_i64 })
            .await
            .expect("insert");
    }
    let s = Setup {
        daemon,
        http,
        client: client.clone(),
        event_db: "oplog_log".into(),
        coll: coll.clone(),
        stream: "app.players".into(),
        other: String::new(),
    };
    wait_converged(&client, "oplog_log", &coll, Duration::from_secs(60)).await;
    // A second boundary between that history and the pause.
    let first = bson::DateTime::now().timestamp_millis() / 1000;
    wait_for("the next second", Duration::from_secs(5), || async move {
        (bson::DateTime::now().timestamp_millis() / 1000 > first).then_some(())
    })
    .await;
    let c = control(&s, "/v1/admin/streams/app.players/pause", json!({})).await;
    assert_eq!(c["state"], "done");
    let headroom = |d: &Daemon| {
        let url = format!("{}/metrics", d.ops_url());
        async move {
            let text = reqwest::get(url).await.ok()?.text().await.ok()?;
            text.lines()
                .find(|l| l.starts_with("eventsync_oplog_headroom_seconds{"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        }
    };
    let d = &s.daemon;
    let h0 = wait_for("the headroom metric", Duration::from_secs(60), || {
        headroom(d)
    })
    .await;
    assert!(metric(d, "eventsync_oplog_window_seconds", &[]).await >= 0.0);
    let token_age = metric(
        d,
        "eventsync_resume_token_age_seconds",
        &[("stream", "app.players")],
    )
    .await;
    assert!(token_age >= 0.0, "resume token age {token_age}");
    // Writes that the open streams read push the oldest retained change forward, while
    // the paused stream's resume point stays put.
    let mut watcher = coll.watch().await.expect("watch");
    let mut fell = None;
    for round in 0..200 {
        let start = 1000 + round * 300;
        let docs: Vec<Document> = (start..start + 300)
            .map(|i| doc! { "_id": i, "version": 1_i64 })
            .collect();
        coll.insert_many(docs).await.expect("insert");
        while let Ok(Some(_)) = watcher.next_if_any().await {}
        if let Some(h) = headroom(d).await.filter(|h| *h < h0) {
            fell = Some(h);
            break;
        }
    }
    let window = metric(d, "eventsync_oplog_window_seconds", &[]).await;
    assert!(
        fell.is_some(),
        "headroom stayed at {h0} s while the history moved on (window {window} s)"
    );
}

fn cli(d: &Daemon, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_eventsyncd"))
        .arg("--config")
        .arg(&d.config)
        .arg("admin")
        .arg("--url")
        .arg(d.sync_url())
        .arg("--token")
        .arg(token)
        .args(args)
        .env_remove("EVENTSYNC_ADMIN_URL")
        .env_remove("EVENTSYNC_ADMIN_TOKEN")
        .output()
        .expect("run eventsyncd admin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subcommand_calls_the_routes() {
    let s = setup("cli", "", "").await;
    let (ok, out, err) = cli(&s.daemon, ADMIN, &["status", &s.stream]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(v["stream"], s.stream.as_str());
    let (ok, out, err) = cli(&s.daemon, ADMIN, &["resync", &s.stream]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).expect("control JSON");
    assert_eq!(v["action"], "resync");
    assert_eq!(v["state"], "pending");
    let (ok, out, _) = cli(&s.daemon, ADMIN, &["dead-letters"]);
    assert!(ok);
    assert!(out.contains("dead_letters"), "{out}");
    // A client token is refused, and the command says so.
    let (ok, _, err) = cli(&s.daemon, CLIENT_A, &["pause", &s.stream]);
    assert!(!ok);
    assert!(err.contains("HTTP 403"), "{err}");
    // Without --token the configuration's admin token is used.
    let out = Command::new(env!("CARGO_BIN_EXE_eventsyncd"))
        .arg("--config")
        .arg(&s.daemon.config)
        .args(["admin", "--url", &s.daemon.sync_url(), "controls"])
        .env_remove("EVENTSYNC_ADMIN_TOKEN")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_carry_a_request_id_and_no_driver_text() {
    let port = free_port();
    let mut server = Server(
        Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/testenv/launch_server.sh"
            ))
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("launch_server.sh"),
    );
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let client = client_for(&uri).await;
    wait_for("the private server", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            client
                .database("admin")
                .run_command(doc! { "ping": 1 })
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    let mut spec = DaemonSpec::new("rid_log", "app", "players");
    spec.uri = uri;
    spec.tokens = vec![LEGACY.into()];
    let daemon = Daemon::start(&spec);
    let http = Http::new(&daemon);
    http.ready().await;
    // MongoDB goes away: the API answers 503 with a request id, and only the log has the cause.
    let _ = server.0.kill();
    let _ = server.0.wait();
    let (status, body, headers) = http
        .call(reqwest::Method::GET, "/v1/streams", Some(LEGACY), None)
        .await;
    assert_eq!(status, 503, "{body}");
    let id = body["request_id"].as_str().expect("request_id").to_owned();
    assert_eq!(
        headers.get("x-request-id").and_then(|h| h.to_str().ok()),
        Some(id.as_str())
    );
    let text = body.to_string().to_lowercase();
    for driver_words in ["mongodb", "server selection", "connection refused", "kind:"] {
        assert!(
            !text.contains(driver_words),
            "driver text reached the caller: {body}"
        );
    }
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("request id {id} not in the log:\n{log}"));
    assert!(line.contains("storage unavailable: "), "{line}");
    assert!(metric(&daemon, "eventsync_errors_total", &[("component", "api")]).await >= 1.0);
}
