// Device tokens a per-device sink proved dead after the reply had gone out (a background retry
// from the outbox met FCM's UNREGISTERED, say). Mattermost only learns of a dead token from a
// REMOVE reply (contract §3.2.4), so the next push to that token answers REMOVE without
// trying; then the memory is dropped, since Mattermost forgets the device on REMOVE and a token
// that comes back later (re-registered) must be tried again.
import type { KeyValue } from './store/types.js';

export type DeadTokens = {
  remember(sink: string, token: string): Promise<void>;
  /** True once per remembered token: the caller answers REMOVE, and the memory goes. */
  take(sink: string, token: string): Promise<boolean>;
};

/** Remembered for at most this long: long enough for the next push, short of a token reused. */
const KEEP_MS = 7 * 24 * 3_600_000;

/**
 * `shared`: other instances write to the same store (PostgreSQL), so every push asks it.
 * Otherwise this process is the only writer and keeps the keys in memory too: the common case,
 * a token nobody remembered, then costs no store read per push to a per-device sink.
 */
export function createDeadTokens(kv: KeyValue, { shared = false }: { shared?: boolean } = {}): DeadTokens {
  const key = (sink: string, token: string) => `${sink}\u0000${token}`;
  const known = new Set<string>();
  const loaded = shared ? undefined : kv.list().then((rows) => rows.forEach(([k]) => known.add(k)));
  return {
    async remember(sink, token) {
      await loaded;
      known.add(key(sink, token));
      await kv.set(key(sink, token), String(Date.now()));
    },
    async take(sink, token) {
      if (loaded) {
        await loaded;
        if (!known.has(key(sink, token))) return false;
        known.delete(key(sink, token));
      }
      const at = await kv.get(key(sink, token));
      if (at === undefined) return false;
      await kv.delete(key(sink, token));
      return Date.now() - Number(at) < KEEP_MS;
    },
  };
}
