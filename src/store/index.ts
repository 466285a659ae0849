// `store:` in the config -> the store behind the outbox.
import type { KeyValue, Store } from './types.js';

/** `sqlite` (default, in dataDir), `postgres://…`, or `none` (no outbox: a sink that is down answers FAIL). */
export async function openStore(spec: string, dataDir: string, owner: boolean): Promise<Store | undefined> {
  if (spec === 'none') return undefined;
  // Loaded on demand: each driver costs ~10 MB of memory a relay that does not use it need not carry.
  if (spec === 'sqlite') return (await import('./sqlite.js')).openSqliteStore({ dataDir, owner });
  if (/^postgres(ql)?:\/\//.test(spec)) return (await import('./postgres.js')).openPostgresStore(spec);
  throw new Error(`unknown store "${spec}"`);
}

export type { DeadLetter, KeyValue, NewDelivery, PendingDelivery, Store, StoreStats } from './types.js';

/** A KeyValue namespace in this process's memory: the device registry and sink state under `store: none`. */
export function memoryKv(): (namespace: string) => KeyValue {
  const spaces = new Map<string, Map<string, string>>();
  return (ns) => {
    let m = spaces.get(ns);
    if (!m) spaces.set(ns, (m = new Map()));
    const space = m;
    return {
      get: async (key) => space.get(key),
      set: async (key, value) => void space.set(key, value),
      delete: async (key) => space.delete(key),
      list: async (prefix = '') =>
        [...space].filter(([k]) => k.startsWith(prefix)).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)),
      async swap(key, expected, next) {
        if (space.get(key) !== expected) return false;
        if (next === undefined) space.delete(key);
        else space.set(key, next);
        return true;
      },
    };
  };
}
