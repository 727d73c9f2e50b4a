import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { parse, stringify, applyPatch, decode, encode } from "../../dist/index.js";

const file = new URL("../../fixtures/patches.json", import.meta.url);
const { cases, count } = JSON.parse(readFileSync(file, "utf8"));

test("the fixture file has the cases it announces", () => {
  assert.equal(cases.length, count);
  assert.ok(count >= 300);
});

test("applying each Rust patch reproduces `after` byte for byte", () => {
  let failures = [];
  for (const c of cases) {
    const got = stringify(applyPatch(parse(c.before), parse(c.patch)));
    if (got !== c.after) failures.push(`${c.name}:\n  want ${c.after}\n  got  ${got}`);
  }
  assert.deepEqual(failures, []);
});

test("texts round-trip through the exact JSON form", () => {
  for (const c of cases) for (const t of [c.before, c.patch, c.after]) assert.equal(stringify(parse(t)), t, c.name);
});

test("decode to JS values then encode gives the same bytes", () => {
  const failures = [];
  for (const c of cases) {
    for (const t of [c.before, c.after]) {
      const back = stringify(encode(decode(parse(t))));
      if (back !== t) failures.push(`${c.name}:\n  want ${t}\n  got  ${back}`);
    }
  }
  assert.deepEqual(failures, []);
});

test("the comparison is byte-exact: Int32 5 is not Double 5.0, Int64 is not Int32", () => {
  const c = cases.find((x) => x.name === "add double_integral");
  const got = stringify(applyPatch(parse(c.before), parse(c.patch)));
  assert.ok(c.after.includes('"v":5.0'));
  assert.notEqual(got, c.after.replace('"v":5.0', '"v":5'));
  const l = cases.find((x) => x.name === "add int64_small");
  assert.notEqual(stringify(applyPatch(parse(l.before), parse(l.patch))), l.after.replace('{"$numberLong":"5"}', "5"));
});
