#!/usr/bin/env node
// The boss-raid demo: a static page that follows a raid document live through
// @eventsync/client, a daemon with CORS for the page, and attackers writing with the
// stamp protocol. Run it with `examples/web/run.sh` (starts the test server, builds).
import http from "node:http";
import { readFile } from "node:fs/promises";
import { join, dirname, extname, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { Daemon, mongo, unique, freePort } from "../../clients/js/tools/devenv.mjs";
import { seedRaid, startAttackers } from "./raid-writer.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "../../clients/js/dist");
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".json": "application/json", ".png": "image/png" };

/** Starts everything; returns handles for tests. */
export async function startDemo({ pagePort, intervalMs = 150, attackers = 2, token = "" } = {}) {
  const port = pagePort ?? (await freePort());
  const origins = [`http://127.0.0.1:${port}`, `http://localhost:${port}`];
  const client = await mongo();
  const dbName = unique("raid_demo");
  const coll = client.db(dbName).collection("raids");
  const stream = `${dbName}.raids`;
  const daemon = await Daemon.start({ eventDb: unique("raid_demo_events"), streams: [stream], corsOrigins: origins, tokens: token ? [token] : [] });
  const raidId = "raid-1";
  await seedRaid(coll, raidId);
  const config = JSON.stringify({ url: daemon.url, stream, raidId, token, clientId: `raid-page-${port}` });
  const server = http.createServer(async (req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    try {
      if (path === "/config.json") {
        res.writeHead(200, { "content-type": TYPES[".json"], "cache-control": "no-store" });
        return res.end(config);
      }
      const file = path === "/" ? join(here, "index.html") : path.startsWith("/client/") ? join(dist, normalize(path.slice(8))) : null;
      if (!file || (!file.startsWith(dist) && file !== join(here, "index.html"))) throw Object.assign(new Error("not found"), { code: "ENOENT" });
      const body = await readFile(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
      res.end(body);
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  let writer = startAttackers(coll, raidId, { intervalMs, attackers });
  return {
    pageUrl: `http://127.0.0.1:${port}/`,
    daemon,
    coll,
    raidId,
    stream,
    get writer() {
      return writer;
    },
    startWriter: (opts) => (writer = startAttackers(coll, raidId, { intervalMs, attackers, ...opts })),
    async stop() {
      await writer.stop();
      await daemon.stop();
      server.close();
      await client.db(dbName).dropDatabase().catch(() => {});
      await client.close();
    },
  };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const port = Number(process.env.DEMO_PORT || 8090);
  const demo = await startDemo({ pagePort: port });
  console.log(`\n  Boss raid demo: ${demo.pageUrl}\n  daemon: ${demo.daemon.url} (log ${demo.daemon.log})\n  stream: ${demo.stream}\n  Ctrl-C stops everything.\n`);
  const stop = async () => {
    await demo.stop();
    process.exit(0);
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}
