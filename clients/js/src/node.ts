/** Node-only helpers: a file-backed {@link SyncStorage}. */
import { mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { SyncStorage } from "./storage.js";

/** One file per key under `dir`, written atomically (temp file + rename). */
export class FileStorage implements SyncStorage {
  constructor(readonly dir: string) {}
  private path(key: string): string {
    return join(this.dir, encodeURIComponent(key) + ".json");
  }
  async get(key: string): Promise<string | undefined> {
    try {
      return await readFile(this.path(key), "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
  }
  async set(key: string, value: string): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    const tmp = this.path(key) + `.${process.pid}.tmp`;
    await writeFile(tmp, value);
    await rename(tmp, this.path(key));
  }
  async delete(key: string): Promise<void> {
    await rm(this.path(key), { force: true });
  }
}
export * from "./index.js";
