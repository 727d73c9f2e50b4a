import { test } from "node:test";
import assert from "node:assert/strict";
import {
  decodeText, encodeText, formatDouble, Int64, Double, Decimal128, ObjectId, DateTime, Binary, Timestamp,
  BSONRegExp, MinKey, MaxKey, keyOrder, parse, stringify, applyPatch, PatchError, ReprError, toPlain,
} from "../../dist/index.js";

test("Int64 and Decimal128 never pass through Number", () => {
  const d = decodeText('{"big":{"$numberLong":"9007199254740993"},"dec":{"$numberDecimal":"0.1000000000000000000000000000000001"}}');
  assert.ok(d.big instanceof Int64);
  assert.equal(d.big.value, 9007199254740993n);
  assert.ok(d.dec instanceof Decimal128);
  assert.equal(d.dec.value, "0.1000000000000000000000000000000001");
  assert.equal(encodeText(d), '{"big":{"$numberLong":"9007199254740993"},"dec":{"$numberDecimal":"0.1000000000000000000000000000000001"}}');
});

test("Int32 and Double stay distinct", () => {
  const d = decodeText('{"i":5,"f":5.0,"z":{"$numberDouble":"-0.0"},"n":{"$numberDouble":"NaN"}}');
  assert.equal(d.i, 5);
  assert.ok(d.f instanceof Double);
  assert.equal(d.f * 2, 10);
  assert.ok(Object.is(d.z.value, -0));
  assert.ok(Number.isNaN(d.n.value));
  assert.equal(encodeText(d), '{"i":5,"f":5.0,"z":{"$numberDouble":"-0.0"},"n":{"$numberDouble":"NaN"}}');
});

test("doubles print as the daemon prints them", () => {
  const cases = [[5, "5.0"], [0.1, "0.1"], [1e300, "1e+300"], [1e16, "1e+16"], [1e15, "1000000000000000.0"], [1e-7, "1e-7"],
    [0.0001, "0.0001"], [1.5e-5, "0.000015"], [123.456, "123.456"], [-2.5e-10, "-2.5e-10"], [5e-324, "5e-324"],
    [1.7976931348623157e308, "1.7976931348623157e+308"], [1.2345678901234568e21, "1.2345678901234568e+21"]];
  for (const [x, want] of cases) assert.equal(formatDouble(x), want, String(x));
});

test("typed classes for the other BSON types", () => {
  const d = decodeText('{"o":{"$oid":"64b7f0c2a1b2c3d4e5f60718"},"t":{"$date":{"$numberLong":"1700000000123"}},"b":{"$binary":{"base64":"AAH+","subType":"80"}},"ts":{"$timestamp":{"t":4294967295,"i":7}},"r":{"$regularExpression":{"pattern":"^a","options":"i"}},"lo":{"$minKey":1},"hi":{"$maxKey":1}}');
  assert.ok(d.o instanceof ObjectId);
  assert.ok(d.t instanceof DateTime);
  assert.equal(d.t.toDate().toISOString(), "2023-11-14T22:13:20.123Z");
  assert.ok(d.b instanceof Binary);
  assert.deepEqual([...d.b.bytes], [0, 1, 254]);
  assert.equal(d.b.subType, 0x80);
  assert.ok(d.ts instanceof Timestamp && d.ts.t === 4294967295);
  assert.ok(d.r instanceof BSONRegExp);
  assert.ok(d.lo instanceof MinKey && d.hi instanceof MaxKey);
  assert.equal(encodeText(d), '{"o":{"$oid":"64b7f0c2a1b2c3d4e5f60718"},"t":{"$date":{"$numberLong":"1700000000123"}},"b":{"$binary":{"base64":"AAH+","subType":"80"}},"ts":{"$timestamp":{"t":4294967295,"i":7}},"r":{"$regularExpression":{"pattern":"^a","options":"i"}},"lo":{"$minKey":1},"hi":{"$maxKey":1}}');
});

test("key order, $ keys and __proto__ survive decode/encode", () => {
  const t = '{"b":1,"10":2,"2":3,"$$set":4,"__proto__":{"x":1}}';
  const d = decodeText(t);
  assert.deepEqual(Object.keys(d), ["2", "10", "b", "$set", "__proto__"]);
  assert.deepEqual(d[keyOrder], ["b", "10", "2", "$set", "__proto__"]);
  assert.equal(Object.getPrototypeOf(d), Object.prototype);
  assert.equal(encodeText(d), t);
});

test("invalid representations are rejected", () => {
  assert.throws(() => decodeText('{"$set":1}'), ReprError);
  assert.throws(() => decodeText('{"n":4294967296}'), ReprError);
});

test("patches apply atomically and keep order", () => {
  const doc = parse('{"a":1,"b":{"c":[1,2]},"d":2.0}');
  const out = applyPatch(doc, parse('[{"op":"remove","path":"/a"},{"op":"add","path":"/a","value":1},{"op":"add","path":"/b/c/1","value":1.5}]'));
  assert.equal(stringify(out), '{"b":{"c":[1,1.5,2]},"d":2.0,"a":1}');
  assert.throws(() => applyPatch(doc, parse('[{"op":"replace","path":"/a","value":2},{"op":"remove","path":"/zz"}]')), PatchError);
  assert.equal(stringify(doc), '{"a":1,"b":{"c":[1,2]},"d":2.0}', "input untouched");
  assert.throws(() => applyPatch(doc, parse('[{"op":"test","path":"/d","value":2}]')), PatchError, "Int32 2 is not Double 2.0");
});

test("toPlain gives a lossy but convenient view", () => {
  const d = decodeText('{"hp":{"$numberLong":"10"},"x":1.5,"big":{"$numberLong":"9007199254740993"}}');
  assert.deepEqual(toPlain(d), { hp: 10, x: 1.5, big: "9007199254740993" });
});
