/**
 * Where the client keeps its state vector and documents between runs: a small string
 * key-value interface with a memory and an IndexedDB implementation (a file one for Node
 * is in `@eventsync/client/node`).
 */
export interface SyncStorage {
  get(key: string): Promise<string | undefined>;
  set(key: string, value: string): Promise<void>;
  delete(key: string): Promise<void>;
}

/** Keeps nothing across runs (the default in Node). */
export class MemoryStorage implements SyncStorage {
  readonly data = new Map<string, string>();
  async get(key: string): Promise<string | undefined> {
    return this.data.get(key);
  }
  async set(key: string, value: string): Promise<void> {
    this.data.set(key, value);
  }
  async delete(key: string): Promise<void> {
    this.data.delete(key);
  }
}

/** IndexedDB storage (the default in browsers). */
export class IndexedDBStorage implements SyncStorage {
  private db: Promise<IDBDatabase>;
  constructor(readonly name = "eventsync") {
    this.db = new Promise((resolve, reject) => {
      const req = indexedDB.open(name, 1);
      req.onupgradeneeded = () => req.result.createObjectStore("kv");
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }
  private async run<T>(mode: IDBTransactionMode, f: (s: IDBObjectStore) => IDBRequest): Promise<T> {
    const db = await this.db;
    return new Promise<T>((resolve, reject) => {
      const tx = db.transaction("kv", mode);
      const req = f(tx.objectStore("kv"));
      tx.oncomplete = () => resolve(req.result as T);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }
  async get(key: string): Promise<string | undefined> {
    return this.run<string | undefined>("readonly", (s) => s.get(key));
  }
  async set(key: string, value: string): Promise<void> {
    await this.run("readwrite", (s) => s.put(value, key));
  }
  async delete(key: string): Promise<void> {
    await this.run("readwrite", (s) => s.delete(key));
  }
}

/** IndexedDB where it exists, memory otherwise. */
export function defaultStorage(): SyncStorage {
  return typeof indexedDB !== "undefined" ? new IndexedDBStorage() : new MemoryStorage();
}
