// Against the real eventsyncd and the test server (EVENTSYNC_TEST_MONGODB_URI).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EventSyncClient, MemoryStorage, AuthError, UnreachableError } from "../../dist/index.js";
import { FileStorage } from "../../dist/node.js";
import { Daemon, mongo, unique, readExact, mixedLoad, stampedWrite, richBody, until, sleep, freePort } from "../../tools/devenv.mjs";

let client, db, coll, daemon, stream;
const opened = [];
/** A client closed after the tests whatever happens (a failed assertion must not leave one retrying). */
const open = (opts) => {
  const c = new EventSyncClient(opts);
  opened.push(c);
  return c;
};
const stateDir = mkdtempSync(join(tmpdir(), "eventsync-js-state-"));

before(async () => {
  client = await mongo();
  const dbName = unique("jsit");
  db = client.db(dbName);
  coll = db.collection("raid");
  stream = `${dbName}.raid`;
  daemon = await Daemon.start({ eventDb: unique("jsit_events"), streams: [stream] });
});

after(async () => {
  await Promise.all(opened.map((c) => c.close().catch(() => {})));
  await daemon?.stop();
  await db?.dropDatabase().catch(() => {});
  await client?.close();
});

/** Waits until the client holds exactly MongoDB's documents, then asserts it (the assertion can fail with a diff). */
async function assertConverged(c, what) {
  let want, got;
  const same = async () => {
    want = await readExact(coll);
    got = new Map();
    for (const idText of c.getDocuments(stream).keys()) got.set(idText, c.getStateText(JSON.parse(idText), stream));
    return want.size === got.size && [...want].every(([k, v]) => got.get(k) === v);
  };
  await until(same, `${what}: client state equal to MongoDB`, 60000, 200).catch(() => {});
  const sort = (m) => Object.fromEntries([...m].sort());
  assert.deepEqual(sort(got), sort(want), `${what}: client state (type-exact text) differs from MongoDB`);
}

async function head() {
  const r = await fetch(`${daemon.url}/v1/streams/${encodeURIComponent(stream)}`);
  return (await r.json()).head;
}

test("mixed stamped/unstamped load, daemon kill -9 and restart mid-load: client equals MongoDB, nothing applied twice", async (t) => {
  const storage = new FileStorage(join(stateDir, "a"));
  const c = open({ url: daemon.url, clientId: "it-whole", storage, ackDebounceMs: 50, backoff: { initialMs: 100, maxMs: 1000 } });
  const sub = open({ url: daemon.url, clientId: "it-docs", storage: new MemoryStorage(), backoff: { initialMs: 100, maxMs: 1000 } });
  const versions = new Map();
  let nonMonotonic = 0;
  c.subscribe(stream, (ch) => {
    const prev = versions.get(ch.key) ?? 0;
    if (ch.version <= prev) nonMonotonic++;
    versions.set(ch.key, ch.version);
  });
  sub.subscribe({ stream, documents: ["p0", "p1", "p2"] });
  await c.ready(stream);
  await sub.ready(stream);

  let ops = 0;
  let killed = false;
  const load = mixedLoad(coll, {
    writers: 3,
    ops: 80,
    docs: 8,
    pauseMs: 30,
    onOp: () => {
      ops++;
    },
  });
  await until(() => ops >= 60, "some load before the kill");
  await daemon.kill9();
  killed = true;
  await until(() => c.status(stream) === "reconnecting", "client notices the dead daemon", 60000);
  await sleep(300);
  await daemon.restart();
  const opsAtRestart = ops;
  await load;
  assert.ok(killed);
  assert.ok(opsAtRestart < ops, `the daemon restarted while the load was still running (${opsAtRestart} of ${ops} ops)`);

  await assertConverged(c, "whole-stream client");
  const h = await head();
  await until(() => c.stats.applied + c.stats.snapshots >= h, "client reaches the head");
  assert.equal(nonMonotonic, 0, "a change applied twice or out of order");
  assert.equal(c.stats.applied, h, "every event of the log applied exactly once");
  assert.ok(c.stats.reconnects >= 1, "the client reconnected");
  t.diagnostic(`restarted after ${opsAtRestart} of ${ops} ops; log head ${h}, documents ${(await readExact(coll)).size}, client stats ${JSON.stringify(c.stats)}`);

  // the per-document follower holds exactly those documents, type-exact
  const want = await readExact(coll);
  await until(() => ["p0", "p1", "p2"].every((id) => sub.getStateText(id, stream) === want.get(JSON.stringify(id))), "followed documents equal").catch(() => {});
  for (const id of ["p0", "p1", "p2"]) assert.equal(sub.getStateText(id, stream), want.get(JSON.stringify(id)), `document ${id}`);
  assert.equal(sub.getDocuments(stream).size, ["p0", "p1", "p2"].filter((id) => want.has(JSON.stringify(id))).length);
  await sub.close();

  // ---- reload with persisted state asks only for newer events
  await c.close();
  const heldPosition = h;
  for (let i = 0; i < 5; i++) assert.ok(await stampedWrite(coll, "reload", "it-reload", (v) => richBody(v, i, "it-reload")));
  await until(async () => (await head()) >= heldPosition + 5, "new events in the log");
  const newHead = await head();
  const bodies = [];
  const spy = (url, init) => {
    if (String(url).endsWith("/v1/sync/missing")) bodies.push(JSON.parse(init.body));
    return fetch(url, init);
  };
  const again = open({ url: daemon.url, clientId: "it-whole", storage: new FileStorage(join(stateDir, "a")), fetch: spy });
  again.subscribe(stream);
  await again.ready(stream);
  assert.equal(bodies[0].vector.streams[0].position, heldPosition, "the reload sends the persisted position");
  assert.equal(again.stats.missingItems, newHead - heldPosition, "only the newer events are fetched");
  await assertConverged(again, "reloaded client");
  await again.close();
});

test("waitFor resolves once the write is in the log and applied locally", async () => {
  const c = open({ url: daemon.url, clientId: "it-rw", storage: new MemoryStorage() });
  c.subscribe({ stream, documents: ["rw"] });
  await c.ready(stream);
  const v = await stampedWrite(coll, "rw", "it-rw-writer", (v) => ({ hp: v + 100 }));
  const r = await c.waitFor("it-rw-writer", v, { id: "rw", stream });
  assert.equal(r.originMatches, true);
  assert.ok(c.getVersion("rw", stream) >= r.logVersion);
  assert.equal(Number(c.getState("rw", stream).version.valueOf()), v);
  await c.close();
});

test("typed errors: wrong token, unreachable server", async () => {
  const guarded = await Daemon.start({ eventDb: unique("jsit_events_tok"), streams: [stream], tokens: ["a-very-long-token-0001"] });
  try {
    const bad = open({ url: guarded.url, token: "not-the-right-token", storage: new MemoryStorage() });
    bad.subscribe(stream);
    await assert.rejects(bad.ready(stream), (e) => e instanceof AuthError && e.status === 403);
    await bad.close();
    const good = open({ url: guarded.url, token: "a-very-long-token-0001", storage: new MemoryStorage() });
    good.subscribe(stream);
    await good.ready(stream);
    await good.close();
  } finally {
    await guarded.stop();
  }
  const port = await freePort();
  const gone = open({ url: `http://127.0.0.1:${port}`, storage: new MemoryStorage(), backoff: { initialMs: 20, maxMs: 50 } });
  const errors = [];
  gone.on("error", (e) => errors.push(e));
  gone.subscribe(stream);
  await until(() => errors.length >= 2, "unreachable errors reported");
  assert.ok(errors.every((e) => e instanceof UnreachableError), "every failure is a typed UnreachableError");
  const seen = new Set();
  gone.on("status", (s) => seen.add(s.status));
  await sleep(300);
  assert.equal(gone.status(stream), "reconnecting");
  assert.deepEqual([...seen].filter((s) => s !== "reconnecting"), [], "stays reconnecting while the server is unreachable");
  await gone.close();
});
