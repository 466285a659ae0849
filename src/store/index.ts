// `store:` in the config -> the store behind the outbox.
import { openPostgresStore } from './postgres.js';
import { openSqliteStore } from './sqlite.js';
import type { Store } from './types.js';

/** `sqlite` (default, in dataDir), `postgres://…`, or `none` (no outbox: a sink that is down answers FAIL). */
export async function openStore(spec: string, dataDir: string, owner: boolean): Promise<Store | undefined> {
  if (spec === 'none') return undefined;
  if (spec === 'sqlite') return openSqliteStore({ dataDir, owner });
  if (/^postgres(ql)?:\/\//.test(spec)) return openPostgresStore(spec);
  throw new Error(`unknown store "${spec}"`);
}

export type { DeadLetter, NewDelivery, PendingDelivery, Store, StoreStats } from './types.js';
