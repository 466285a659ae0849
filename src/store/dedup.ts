// An in-memory idempotency window for one instance: key -> expiry, oldest first (a Map keeps
// insertion order), capped so a flood of distinct ack ids cannot grow memory without bound.
export type MemoryDedup = {
  acquire(key: string, windowMs: number, now: number): boolean;
  release(key: string): void;
  size(): number;
  close(): void;
};

export function createMemoryDedup(maxEntries = 500_000): MemoryDedup {
  const seen = new Map<string, number>();
  const sweep = () => {
    const now = Date.now();
    for (const [key, expires] of seen) {
      if (expires > now) break;
      seen.delete(key);
    }
  };
  const timer = setInterval(sweep, 10_000);
  timer.unref();
  return {
    acquire(key, windowMs, now) {
      const expires = seen.get(key);
      if (expires !== undefined && expires > now) return false;
      seen.delete(key);
      seen.set(key, now + windowMs);
      if (seen.size > maxEntries) seen.delete(seen.keys().next().value as string);
      return true;
    },
    release(key) {
      seen.delete(key);
    },
    size: () => seen.size,
    close() {
      clearInterval(timer);
      seen.clear();
    },
  };
}
