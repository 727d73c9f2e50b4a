import { test } from "node:test";
import assert from "node:assert/strict";
import {
  EventSyncClient,
  MemoryStorage,
  AuthError,
  UnknownStreamError,
  UnreachableError,
  Int64,
  backoffDelay,
  SseParser,
} from "../../dist/index.js";
import { FakeDaemon, until } from "./fake-server.mjs";

const S = "app.raid";
const hp = (n) => `[{"op":"replace","path":"/hp","value":{"$numberLong":"${n}"}}]`;
const insert = (id, n) => `[{"op":"add","path":"/_id","value":${id}},{"op":"add","path":"/hp","value":{"$numberLong":"${n}"}}]`;

function mk(fake, extra = {}) {
  return new EventSyncClient({ url: "http://daemon.test", clientId: "c1", fetch: fake.fetch, storage: new MemoryStorage(), ackDebounceMs: 5, backoff: { initialMs: 5, maxMs: 20 }, ...extra });
}

test("catch-up then live, state and change events", async () => {
  const fake = new FakeDaemon();
  fake.append(S, '"boss"', "insert", insert('"boss"', "9007199254740993"));
  fake.append(S, '"boss"', "update", hp("9007199254740992"));
  const c = mk(fake);
  const changes = [];
  const statuses = [];
  c.on("status", (s) => statuses.push(s.status));
  c.subscribe(S, (ch) => changes.push(ch));
  await c.ready(S);
  assert.deepEqual(c.getState("boss").hp, new Int64(9007199254740992n));
  fake.append(S, '"boss"', "update", hp("1"));
  await until(() => c.getVersion("boss") === 3, "live event");
  assert.equal(c.getState("boss").hp.value, 1n);
  assert.deepEqual(changes.map((x) => [x.op, x.version, x.source]), [
    ["insert", 1, "catch-up"],
    ["update", 2, "catch-up"],
    ["update", 3, "live"],
  ]);
  assert.deepEqual(statuses.slice(0, 2), ["catching-up", "live"]);
  await c.close();
});

test("duplicates are dropped, not applied twice", async () => {
  const fake = new FakeDaemon();
  const c = mk(fake);
  let applied = 0;
  c.subscribe(S, () => applied++);
  await c.ready(S);
  const e1 = fake.append(S, '"b"', "insert", insert('"b"', "10"));
  const e2 = fake.append(S, '"b"', "update", hp("9"));
  await until(() => c.getVersion("b") === 2, "two events");
  // the same events again, as a proxy or a resumed stream may send them
  fake.inject(`id: ${e1.seq}\nevent: event\ndata: ${fake.eventText(e1)}\n\n`);
  fake.inject(`id: ${e2.seq}\nevent: event\ndata: ${fake.eventText(e2)}\n\n`);
  fake.append(S, '"b"', "update", hp("8"));
  await until(() => c.getVersion("b") === 3, "third event");
  assert.equal(applied, 3);
  assert.equal(c.stats.duplicates, 2);
  assert.equal(c.getState("b").hp.value, 8n);
  await c.close();
});

test("a gap in a document's chain is re-fetched", async () => {
  const fake = new FakeDaemon();
  const c = mk(fake, { clientId: undefined });
  c.subscribe(S);
  await c.ready(S);
  fake.append(S, '"g"', "insert", insert('"g"', "100"));
  await until(() => c.getVersion("g") === 1, "insert");
  // events 2 and 3 happen but the live connection loses event 2
  const lives = [...fake.lives];
  for (const l of lives) fake.lives.delete(l);
  const e2 = fake.append(S, '"g"', "update", hp("90"));
  const e3 = fake.append(S, '"g"', "update", hp("80"));
  for (const l of lives) fake.lives.add(l);
  assert.equal(e2.to, 2);
  fake.inject(`id: ${e3.seq}\nevent: event\ndata: ${fake.eventText(e3)}\n\n`);
  await until(() => c.getVersion("g") === 3, "repaired chain");
  assert.equal(c.stats.gaps, 1);
  assert.equal(c.stats.repairs, 1);
  assert.equal(c.getState("g").hp.value, 80n);
  await c.close();
});

test("reconnects with Last-Event-ID after the stream drops, and after the server is down", async () => {
  const fake = new FakeDaemon();
  const c = mk(fake);
  const errors = [];
  c.on("error", (e) => errors.push(e));
  c.subscribe(S);
  await c.ready(S);
  fake.append(S, '"r"', "insert", insert('"r"', "5"));
  await until(() => c.getVersion("r") === 1, "first");
  fake.down = true;
  fake.closeLives();
  await until(() => c.status(S) === "reconnecting", "reconnecting status");
  await until(() => errors.length >= 2, "errors while down");
  assert.ok(errors.every((e) => e instanceof UnreachableError), "typed unreachable errors");
  fake.down = false;
  await until(() => c.status(S) === "live", "live again");
  const lastLive = fake.requests.filter((r) => r.path.endsWith("/live")).at(-1);
  assert.equal(lastLive.headers["last-event-id"], "1");
  fake.append(S, '"r"', "update", hp("4"));
  await until(() => c.getVersion("r") === 2, "after reconnect");
  assert.ok(c.stats.reconnects >= 1);
  assert.equal(c.stats.duplicates, 0);
  await c.close();
});

test("auth and unknown stream are typed, fatal errors (no silent retry loop)", async () => {
  const fake = new FakeDaemon({ token: "t".repeat(20) });
  const c = mk(fake);
  c.subscribe(S);
  await assert.rejects(c.ready(S), AuthError);
  assert.equal(c.status(S), "error");
  const c2 = mk(fake, { token: "wrong-token-wrong-token" });
  c2.subscribe(S);
  await assert.rejects(c2.ready(S), (e) => e instanceof AuthError && e.status === 403);
  const fake2 = new FakeDaemon();
  const c3 = mk(fake2);
  c3.subscribe("app.nope");
  await assert.rejects(c3.ready("app.nope"), (e) => e.code === "bad_request" || e instanceof UnknownStreamError);
  await Promise.all([c.close(), c2.close(), c3.close()]);
});

test("persisted state: a restarted client asks only for newer events, acks after saving", async () => {
  const fake = new FakeDaemon();
  const storage = new MemoryStorage();
  for (let i = 0; i < 5; i++) fake.append(S, '"p"', i ? "update" : "insert", i ? hp(String(100 - i)) : insert('"p"', "100"));
  const a = mk(fake, { storage });
  a.subscribe(S);
  await a.ready(S);
  await until(() => fake.acks.length > 0 && fake.acks.at(-1).streams[0].position === 5, "ack of position 5");
  await a.close();
  fake.append(S, '"p"', "update", hp("1"));
  const before = a.stats.missingItems;
  assert.equal(before, 5);
  const b = mk(fake, { storage });
  b.subscribe(S);
  await b.ready(S);
  await until(() => b.getVersion("p") === 6, "newer event");
  const req = JSON.parse(fake.requests.filter((r) => r.path === "/v1/sync/missing").at(-1).body);
  assert.equal(req.vector.streams[0].position, 5);
  assert.equal(b.stats.missingItems, 1, "only the newer event");
  assert.equal(b.getState("p").hp.value, 1n);
  await b.close();
});

test("pagination follows next_cursor", async () => {
  const fake = new FakeDaemon();
  for (let i = 0; i < 25; i++) fake.append(S, `"d${i}"`, "insert", insert(`"d${i}"`, String(i)));
  const c = mk(fake, { pageSize: 10 });
  c.subscribe(S);
  await c.ready(S);
  assert.equal(c.getDocuments(S).size, 25);
  assert.equal(c.stats.missingRequests, 3);
  await c.close();
});

test("reset_required starts the stream over and acknowledges", async () => {
  const fake = new FakeDaemon();
  fake.append(S, '"x"', "insert", insert('"x"', "1"));
  const storage = new MemoryStorage();
  await storage.set("stream:app.raid", JSON.stringify({ v: 1, position: 1, lastSeq: 1, docs: [['"stale"', '"stale"', '"stale"', 3, 1, '{"_id":"stale"}']] }));
  fake.resetRequired = true;
  const c = mk(fake, { storage });
  c.subscribe(S);
  await c.ready(S);
  assert.equal(c.stats.resets, 1);
  assert.equal(c.getState("stale"), undefined, "stale local state dropped");
  assert.equal(c.getState("x").hp.value, 1n);
  assert.ok(fake.acks.length >= 1);
  await c.close();
});

test("following chosen documents uses per-document versions and a live filter", async () => {
  const fake = new FakeDaemon();
  fake.append(S, '"a"', "insert", insert('"a"', "1"), { docAfter: '{"_id":"a","hp":{"$numberLong":"1"}}' });
  fake.append(S, '"b"', "insert", insert('"b"', "2"), { docAfter: '{"_id":"b","hp":{"$numberLong":"2"}}' });
  const c = mk(fake);
  c.subscribe({ stream: S, documents: ["a"] });
  await c.ready(S);
  assert.equal(c.getDocuments(S).size, 1);
  const live = fake.requests.filter((r) => r.path.endsWith("/live")).at(-1);
  assert.equal(new URLSearchParams(live.search).get("doc"), '"a"');
  fake.append(S, '"a"', "update", hp("7"));
  await until(() => c.getVersion("a") === 2, "a live");
  assert.equal(c.getState("a").hp.value, 7n);
  await c.close();
});

test("backoff is jittered and bounded", () => {
  for (let a = 0; a < 20; a++) {
    const d = backoffDelay(a, 100, 5000);
    const cap = Math.min(5000, 100 * 2 ** a);
    assert.ok(d >= cap / 2 && d <= cap, `${a}: ${d}`);
  }
  assert.equal(backoffDelay(3, 100, 5000, () => 0), 400);
  assert.equal(backoffDelay(3, 100, 5000, () => 1), 800);
});

test("SSE parser: split chunks, CRLF, comments, multi-line data", () => {
  const got = [];
  const comments = [];
  const p = new SseParser((m) => got.push(m), (c) => comments.push(c));
  p.push(": subscribed after 0\r\n\r\nid: 7\r\nevent: ev");
  p.push("ent\r\ndata: {\"a\":\r");
  p.push("\ndata: 1}\r\n\r\n");
  assert.deepEqual(comments, ["subscribed after 0"]);
  assert.deepEqual(got, [{ id: "7", event: "event", data: '{"a":\n1}' }]);
});

test("an event that does not apply is a ProtocolError: reported, then re-synced (no silent stall)", async () => {
  const { ProtocolError } = await import("../../dist/index.js");
  const fake = new FakeDaemon();
  fake.append(S, '"q"', "insert", insert('"q"', "3"));
  const c = mk(fake);
  const errors = [];
  c.on("error", (e) => errors.push(e));
  c.subscribe(S);
  await c.ready(S);
  const broken = { stream: S, seq: 2, id: '"q"', key: '"q"', from: 1, to: 2, op: "update", patch: '[{"op":"remove","path":"/nope"}]', origin: null };
  fake.inject(`id: 2\nevent: event\ndata: ${fake.eventText(broken)}\n\n`);
  await until(() => errors.some((e) => e instanceof ProtocolError), "protocol error reported");
  assert.equal(c.getVersion("q"), 1, "nothing half-applied");
  fake.append(S, '"q"', "update", hp("2"));
  await until(() => c.getVersion("q") === 2 && c.status(S) === "live", "re-synced and live");
  assert.equal(c.getState("q").hp.value, 2n);
  await c.close();
});

test("unsubscribe closes the live connection", async () => {
  const fake = new FakeDaemon();
  const c = mk(fake);
  const off = c.subscribe(S);
  await c.ready(S);
  assert.equal(fake.lives.size, 1);
  off();
  await until(() => fake.lives.size === 0, "live connection closed");
  await c.close();
});
