// `store:` in the config -> the store behind the outbox.
import type { Store } from './types.js';

/** `sqlite` (default, in dataDir), `postgres://…`, or `none` (no outbox: a sink that is down answers FAIL). */
export async function openStore(spec: string, dataDir: string, owner: boolean): Promise<Store | undefined> {
  if (spec === 'none') return undefined;
  // Loaded on demand: each driver costs ~10 MB of memory a relay that does not use it need not carry.
  if (spec === 'sqlite') return (await import('./sqlite.js')).openSqliteStore({ dataDir, owner });
  if (/^postgres(ql)?:\/\//.test(spec)) return (await import('./postgres.js')).openPostgresStore(spec);
  throw new Error(`unknown store "${spec}"`);
}

export type { DeadLetter, NewDelivery, PendingDelivery, Store, StoreStats } from './types.js';
