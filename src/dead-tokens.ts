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

export function createDeadTokens(kv: KeyValue): DeadTokens {
  const key = (sink: string, token: string) => `${sink}\u0000${token}`;
  return {
    remember: (sink, token) => kv.set(key(sink, token), String(Date.now())),
    async take(sink, token) {
      const at = await kv.get(key(sink, token));
      if (at === undefined) return false;
      await kv.delete(key(sink, token));
      return Date.now() - Number(at) < KEEP_MS;
    },
  };
}
