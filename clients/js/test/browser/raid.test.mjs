// The boss-raid demo in Debian's Chromium (headless, system binary; no browser download):
// loads, shows the raid, reflects writes live, survives a daemon kill -9 + restart, and
// resumes from IndexedDB after a reload. Writes a screenshot and latency figures to
// clients/js/artifacts/.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startDemo } from "../../../../examples/web/demo.mjs";
import { hit } from "../../../../examples/web/raid-writer.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const artifacts = join(here, "../../artifacts");
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];

let demo, context;
after(async () => {
  await context?.close().catch(() => {});
  await demo?.stop().catch(() => {});
});

function pct(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

test("boss raid page: live updates, daemon restart, reload from IndexedDB", async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install -y chromium)`);
  mkdirSync(artifacts, { recursive: true });
  demo = await startDemo({ intervalMs: 120, attackers: 2 });
  const profile = mkdtempSync(join(tmpdir(), "eventsync-chromium-"));
  context = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, headless: true, args: ARGS, viewport: { width: 820, height: 620 } });
  const page = context.pages()[0] ?? (await context.newPage());
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(demo.pageUrl);

  // the raid is shown and moves while the attackers write
  await page.waitForFunction(() => document.getElementById("status").textContent === "live", null, { timeout: 30000 });
  await page.waitForFunction(() => document.getElementById("boss-hp").dataset.hp !== "", null, { timeout: 30000 });
  const v0 = Number(await page.evaluate(() => document.body.dataset.version));
  await page.waitForFunction((v) => Number(document.body.dataset.version) >= v + 5, v0, { timeout: 30000 });
  assert.equal(await page.locator("#players tr").count(), 4);
  await demo.writer.stop();

  // controlled writes: each must show up; the page measures write → browser latency
  const shown = async (version) => page.waitForFunction((v) => Number(document.body.dataset.version) >= v, version, { timeout: 20000, polling: 10 });
  await page.evaluate(() => (window.raid.latencies.length = 0));
  for (let i = 0; i < 150; i++) {
    const w = await hit(demo.coll, demo.raidId, ["aria", "brom", "cyra", "dax"][i % 4]);
    await shown(w.version);
    const hp = await page.evaluate(() => document.getElementById("boss-hp").dataset.hp);
    assert.equal(hp, w.hp.toString(), `write ${i}: the page shows the HP written`);
    await new Promise((r) => setTimeout(r, 40));
  }
  const lat = (await page.evaluate(() => window.raid.latencies)).sort((a, b) => a - b);
  assert.equal(lat.length >= 150, true, "every write reached the page live");

  // daemon kill -9 and restart: the page reconnects and keeps following
  await demo.daemon.kill9();
  await page.waitForFunction(() => document.getElementById("status").textContent === "reconnecting", null, { timeout: 60000 });
  const during = await hit(demo.coll, demo.raidId, "aria"); // written while the daemon is down
  await demo.daemon.restart();
  await shown(during.version);
  await page.waitForFunction(() => document.getElementById("status").textContent === "live", null, { timeout: 60000 });
  let last;
  for (let i = 0; i < 5; i++) {
    last = await hit(demo.coll, demo.raidId, "brom");
    await shown(last.version);
  }
  const mongoHp = (await demo.coll.findOne({ _id: demo.raidId })).boss.hp.toString();
  assert.equal(await page.evaluate(() => document.getElementById("boss-hp").dataset.hp), mongoHp);
  await page.screenshot({ path: join(artifacts, "raid.png") });

  // reload: state comes back from IndexedDB and the client asks only for newer events
  await page.evaluate(() => window.raid.client.close());
  const extra = await hit(demo.coll, demo.raidId, "cyra");
  await page.reload();
  await page.waitForFunction(() => document.getElementById("status").textContent === "live", null, { timeout: 30000 });
  await shown(extra.version);
  const stats = await page.evaluate(() => window.raid.client.stats);
  assert.equal(stats.missingItems, 1, "after a reload only the one newer event is fetched");
  assert.equal(stats.snapshots, 0, "no full snapshot needed after a reload");
  assert.deepEqual(pageErrors, []);

  const figures = {
    writes: lat.length,
    p50_ms: pct(lat, 0.5),
    p99_ms: pct(lat, 0.99),
    max_ms: lat[lat.length - 1],
    under_1s: lat.filter((x) => x < 1000).length / lat.length,
  };
  writeFileSync(join(artifacts, "latency.json"), JSON.stringify(figures, null, 2) + "\n");
  t.diagnostic(`write → browser latency: ${JSON.stringify(figures)}`);
});
