// An in-memory idempotency window for one instance: key -> expiry, oldest first (a Map keeps
// insertion order), capped so a flood of distinct ack ids cannot grow memory without bound.
export type MemoryDedup = {
  acquire(scope: string, key: string, windowMs: number, now: number): boolean;
  release(scope: string, key: string): void;
  size(): number;
  close(): void;
};

/** One map per scope (sink), so the hot path builds no combined key. */
export function createMemoryDedup(maxEntriesPerScope = 500_000): MemoryDedup {
  const scopes = new Map<string, Map<string, number>>();
  const sweep = () => {
    const now = Date.now();
    for (const seen of scopes.values()) {
      for (const [key, expires] of seen) {
        if (expires > now) break;
        seen.delete(key);
      }
    }
  };
  const timer = setInterval(sweep, 10_000);
  timer.unref();
  return {
    acquire(scope, key, windowMs, now) {
      let seen = scopes.get(scope);
      if (!seen) scopes.set(scope, (seen = new Map()));
      const expires = seen.get(key);
      if (expires !== undefined) {
        if (expires > now) return false;
        seen.delete(key); // re-inserted below, at the young end
      }
      seen.set(key, now + windowMs);
      if (seen.size > maxEntriesPerScope) seen.delete(seen.keys().next().value as string);
      return true;
    },
    release(scope, key) {
      scopes.get(scope)?.delete(key);
    },
    size: () => [...scopes.values()].reduce((n, m) => n + m.size, 0),
    close() {
      clearInterval(timer);
      scopes.clear();
    },
  };
}
