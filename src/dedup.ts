// The dedup window: the same (ack_id, sink) is delivered once within `delivery.dedupWindow`,
// whatever the store. Mattermost never resends a push itself (contract §0.5), but a server
// restarted mid-send, a reverse proxy that retries, or two servers of a cluster can post the
// same one twice. In this process's memory, or in PostgreSQL when several instances share it.
import type { Logger } from 'pino';
import type { Store } from './store/index.js';

export type Dedup = {
  /** True: this (key, scope) is fresh and now claimed; false: seen within the window. */
  acquire(key: string, scope: string, log: () => Logger): Promise<boolean>;
  /** Forgets a claim, so that a resend of a notification that was not accepted is tried again. */
  release(key: string, scope: string): Promise<void>;
  close(): void;
};

const FRESH = Promise.resolve(true);
const SEEN = Promise.resolve(false);
const DONE = Promise.resolve();

/** The window of this process, or the store's shared one (`store.dedup`, PostgreSQL). */
export function createDedup(windowMs: number, shared?: Store['dedup']): Dedup {
  if (!shared) {
    const memory = createMemoryDedup();
    return {
      acquire: (key, scope) => (memory.acquire(scope, key, windowMs, Date.now()) ? FRESH : SEEN),
      release(key, scope) {
        memory.release(scope, key);
        return DONE;
      },
      close: () => memory.close(),
    };
  }
  return {
    acquire: (key, scope, log) =>
      shared.acquire(key, scope, windowMs, Date.now()).catch((err: unknown) => {
        // At-least-once beats at-most-once: without the window, deliver.
        log().warn({ err: (err as Error).message }, 'dedup window unavailable; delivering anyway');
        return true;
      }),
    release: (key, scope) => shared.release(key, scope).catch(() => {}),
    close() {},
  };
}

// ---- the in-memory window, per scope (sink) ----
//
// Keys live in generations of half a window each; three generations are kept, so a key is
// remembered for at least the window and at most one and a half. Whole generations expire at
// once: no per-key expiry to store or sweep, which keeps the memory per notification to the
// ack id itself (a Map of key -> expiry cost ~2x as much at 2 000 notifications/s).
export type MemoryDedup = {
  acquire(scope: string, key: string, windowMs: number, now: number): boolean;
  release(scope: string, key: string): void;
  size(): number;
  close(): void;
};

type Scope = { generations: Array<Set<string>>; startedAt: number };

const GENERATIONS = 3;

/**
 * `maxEntriesPerScope` bounds memory (~70 bytes an id) under a high rate: generations then turn
 * early, so at 14 000 notifications/s the window is ~20 s rather than its configured length.
 */
export function createMemoryDedup(maxEntriesPerScope = 300_000): MemoryDedup {
  const scopes = new Map<string, Scope>();

  function rotate(s: Scope, windowMs: number, now: number) {
    const span = windowMs / 2;
    let turns = 0;
    while (now - s.startedAt >= span && turns++ < GENERATIONS) {
      s.generations.pop();
      s.generations.unshift(new Set());
      s.startedAt += span;
    }
    if (now - s.startedAt >= span) s.startedAt = now; // idle for longer than the whole window
  }

  return {
    acquire(scope, key, windowMs, now) {
      let s = scopes.get(scope);
      if (!s) {
        s = { generations: Array.from({ length: GENERATIONS }, () => new Set<string>()), startedAt: now };
        scopes.set(scope, s);
      }
      rotate(s, windowMs, now);
      const [current, previous, oldest] = s.generations as [Set<string>, Set<string>, Set<string>];
      if (current.has(key) || previous.has(key) || oldest.has(key)) return false;
      current.add(key);
      // Over the cap: start a generation early, dropping the oldest (the window shrinks, memory does not grow).
      if (current.size + previous.size + oldest.size > maxEntriesPerScope) {
        for (let i = 0; i < GENERATIONS && s.generations.reduce((n, g) => n + g.size, 0) > maxEntriesPerScope; i++) {
          s.generations.pop();
          s.generations.unshift(new Set());
          s.startedAt = now;
        }
      }
      return true;
    },
    release(scope, key) {
      for (const g of scopes.get(scope)?.generations ?? []) g.delete(key);
    },
    size: () => [...scopes.values()].reduce((n, s) => n + s.generations.reduce((m, g) => m + g.size, 0), 0),
    close() {
      scopes.clear();
    },
  };
}
