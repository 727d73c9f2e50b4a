/**
 * RFC 6902 JSON Patch over the exact JSON form ({@link Json}): key order is kept (a
 * removed member leaves the others in place, an added member is appended, a replaced one
 * keeps its position), numbers are never rounded. Mirrors the daemon's `diff::apply`.
 */
import { clone, exactEqual, JNum, type JObject, type Json } from "./json.js";

/** One patch operation. */
export interface PatchOp {
  op: "add" | "remove" | "replace" | "move" | "copy" | "test";
  path: string;
  from?: string;
  value?: Json;
}

/** A patch operation does not fit the document. */
export class PatchError extends Error {
  constructor(
    readonly index: number,
    readonly op: string,
    readonly path: string,
    readonly reason: string,
  ) {
    super(`patch operation ${index} (${op}) cannot be applied at ${JSON.stringify(path)}: ${reason}`);
    this.name = "PatchError";
  }
}

/** Splits a JSON Pointer into its decoded tokens. */
export function pointerTokens(path: string): string[] {
  if (path === "") return [];
  if (path[0] !== "/") throw new Error(`JSON Pointer ${JSON.stringify(path)} must start with '/'`);
  return path
    .slice(1)
    .split("/")
    .map((t) => t.replace(/~1/g, "/").replace(/~0/g, "~"));
}

/** Reads a patch (the exact JSON form of an array of operations). */
export function readPatch(p: Json): PatchOp[] {
  if (!Array.isArray(p)) throw new Error("a patch is an array of operations");
  return p.map((o, i) => {
    if (!(o instanceof Map)) throw new Error(`patch operation ${i} is not an object`);
    const op = o.get("op");
    const path = o.get("path");
    if (typeof op !== "string" || typeof path !== "string") {
      throw new Error(`patch operation ${i} lacks op or path`);
    }
    const out: PatchOp = { op: op as PatchOp["op"], path };
    const from = o.get("from");
    if (typeof from === "string") out.from = from;
    if (o.has("value")) out.value = o.get("value") as Json;
    return out;
  });
}

function arrayIndex(token: string, len: number, forInsert: boolean): number {
  if (forInsert && token === "-") return len;
  if (!/^(0|[1-9]\d*)$/.test(token)) throw new Error(`invalid array index ${JSON.stringify(token)}`);
  const index = Number(token);
  const ok = forInsert ? index <= len : index < len;
  if (!ok) throw new Error(`array index ${index} out of bounds (length ${len})`);
  return index;
}

function lookup(doc: Json, tokens: string[]): Json {
  let cur = doc;
  for (const key of tokens) {
    if (cur instanceof Map) {
      if (!cur.has(key)) throw new Error(`no member ${JSON.stringify(key)}`);
      cur = cur.get(key) as Json;
    } else if (Array.isArray(cur)) {
      cur = cur[arrayIndex(key, cur.length, false)];
    } else {
      throw new Error(`cannot descend into a scalar at ${JSON.stringify(key)}`);
    }
  }
  return cur;
}

interface Root {
  v: Json;
}

function parentOf(root: Root, tokens: string[]): [Json, string] {
  if (tokens.length === 0) throw new Error("the document root has no parent");
  return [lookup(root.v, tokens.slice(0, -1)), tokens[tokens.length - 1]];
}

function add(root: Root, tokens: string[], value: Json): void {
  if (tokens.length === 0) {
    root.v = value;
    return;
  }
  const [parent, key] = parentOf(root, tokens);
  if (parent instanceof Map) {
    (parent as JObject).set(key, value); // an existing member keeps its place
  } else if (Array.isArray(parent)) {
    parent.splice(arrayIndex(key, parent.length, true), 0, value);
  } else {
    throw new Error("parent is not a container");
  }
}

function remove(root: Root, tokens: string[]): Json {
  const [parent, key] = parentOf(root, tokens);
  if (parent instanceof Map) {
    if (!parent.has(key)) throw new Error(`no member ${JSON.stringify(key)}`);
    const v = parent.get(key) as Json;
    parent.delete(key);
    return v;
  }
  if (Array.isArray(parent)) return parent.splice(arrayIndex(key, parent.length, false), 1)[0];
  throw new Error("parent is not a container");
}

function replace(root: Root, tokens: string[], value: Json): void {
  if (tokens.length === 0) {
    root.v = value;
    return;
  }
  const [parent, key] = parentOf(root, tokens);
  if (parent instanceof Map) {
    if (!parent.has(key)) throw new Error(`no member ${JSON.stringify(key)}`);
    parent.set(key, value);
  } else if (Array.isArray(parent)) {
    parent[arrayIndex(key, parent.length, false)] = value;
  } else {
    throw new Error("parent is not a container");
  }
}

/**
 * Applies `patch` to `doc` and returns the result; `doc` is not modified. Throws a
 * {@link PatchError} (nothing half-applied) when an operation does not fit.
 */
export function applyPatch(doc: Json, patch: PatchOp[] | Json): Json {
  const ops = Array.isArray(patch) && (patch.length === 0 || !(patch[0] instanceof Map))
    ? (patch as PatchOp[])
    : readPatch(patch as Json);
  const root: Root = { v: clone(doc) };
  ops.forEach((o, index) => {
    try {
      const tokens = pointerTokens(o.path);
      const value = o.value === undefined ? undefined : clone(o.value);
      switch (o.op) {
        case "add":
          add(root, tokens, need(value));
          break;
        case "remove":
          remove(root, tokens);
          break;
        case "replace":
          replace(root, tokens, need(value));
          break;
        case "move": {
          const from = pointerTokens(need(o.from));
          const fromPath = o.from as string;
          if (o.path !== fromPath && o.path.startsWith(fromPath + "/")) {
            throw new Error("cannot move a value into one of its own children");
          }
          add(root, tokens, remove(root, from));
          break;
        }
        case "copy":
          add(root, tokens, clone(lookup(root.v, pointerTokens(need(o.from)))));
          break;
        case "test":
          if (!exactEqual(lookup(root.v, tokens), need(value))) throw new Error("test failed: value differs");
          break;
        default:
          throw new Error(`unknown operation ${JSON.stringify(o.op)}`);
      }
    } catch (e) {
      throw new PatchError(index, String(o.op), o.path, (e as Error).message);
    }
  });
  return root.v;
}

function need<T>(v: T | undefined): T {
  if (v === undefined) throw new Error("missing value/from");
  return v;
}

export { JNum };
