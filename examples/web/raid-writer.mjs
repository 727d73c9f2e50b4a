// The boss-raid writer: attackers hit the boss through the stamp protocol (compare-and-swap
// on `version`, +1 per write, `_origin` = the attacker). Each write carries `sent_at`
// (ms) so the page can measure write → browser latency.
import { Long, Int32 } from "../../clients/js/tools/devenv.mjs";
import { stampedWrite } from "../../clients/js/tools/devenv.mjs";

const PLAYERS = [
  ["aria", "mage"],
  ["brom", "warrior"],
  ["cyra", "rogue"],
  ["dax", "paladin"],
];
const MAX_HP = 250000;

export function freshRaid() {
  return {
    boss: { name: "Vorthax the Undying", hp: Long.fromNumber(MAX_HP), max_hp: Long.fromNumber(MAX_HP) },
    phase: new Int32(1),
    players: Object.fromEntries(PLAYERS.map(([n, c]) => [n, { class: c, hits: new Int32(0), damage: Long.fromNumber(0) }])),
    last_hit: null,
    sent_at: Long.fromNumber(Date.now()),
  };
}

/** Creates (or resets) the raid document. */
export async function seedRaid(coll, id) {
  await coll.deleteOne({ _id: id });
  return stampedWrite(coll, id, "raid-setup", () => freshRaid());
}

/** Runs attackers until `stop()`; returns { stop, writes }. */
export function startAttackers(coll, id, { intervalMs = 150, attackers = 2, onWrite } = {}) {
  let running = true;
  const stats = { writes: 0, conflicts: 0 };
  const loops = PLAYERS.slice(0, Math.max(1, Math.min(attackers, PLAYERS.length))).map(async ([player]) => {
    while (running) {
      await hit(coll, id, player, stats).then((v) => v && onWrite?.(v, player)).catch((e) => console.error(`writer: ${e.message}`));
      await new Promise((r) => setTimeout(r, intervalMs * (0.5 + Math.random())));
    }
  });
  return {
    stats,
    stop: async () => {
      running = false;
      await Promise.all(loops);
    },
  };
}

/** One stamped attack: CAS on version with jittered retries. */
export async function hit(coll, id, player, stats = { writes: 0, conflicts: 0 }) {
  for (let attempt = 0; attempt < 50; attempt++) {
    const cur = await coll.findOne({ _id: id }, { promoteLongs: false });
    if (!cur) return null;
    const v = Number(cur.version.toString());
    const dmg = 500 + Math.floor(Math.random() * 4500);
    const doc = { ...cur };
    delete doc._id;
    let hp = BigInt(cur.boss.hp.toString()) - BigInt(dmg);
    let phase = Number(cur.phase);
    if (hp <= 0n) {
      hp = BigInt(cur.boss.max_hp.toString());
      phase += 1;
    }
    const p = cur.players[player];
    doc.boss = { name: cur.boss.name, hp: Long.fromBigInt(hp), max_hp: Long.fromString(cur.boss.max_hp.toString()) };
    doc.phase = new Int32(phase);
    doc.players = Object.fromEntries(
      Object.entries(cur.players).map(([n, q]) => [
        n,
        n === player
          ? { class: p.class, hits: new Int32(Number(p.hits) + 1), damage: Long.fromBigInt(BigInt(p.damage.toString()) + BigInt(dmg)) }
          : { class: q.class, hits: new Int32(Number(q.hits)), damage: Long.fromString(q.damage.toString()) },
      ]),
    );
    doc.last_hit = `${player} hits for ${dmg}`;
    doc.version = Long.fromNumber(v + 1);
    doc._origin = `attacker-${player}`;
    doc.sent_at = Long.fromNumber(Date.now());
    const r = await coll.findOneAndReplace({ _id: id, version: cur.version }, doc, { includeResultMetadata: true });
    if (r.value) {
      stats.writes++;
      return { version: v + 1, sentAt: Number(doc.sent_at), hp };
    }
    stats.conflicts++;
    await new Promise((res) => setTimeout(res, Math.random() * Math.min(100, 2 ** attempt)));
  }
  throw new Error(`attack by ${player}: CAS conflict 50 times`);
}
