// Token buckets per key (a client address, an auth identity, a login id): `perSecond` tokens
// flow in up to `burst`; a request takes one. Memory stays bounded: full buckets are dropped
// on a sweep (a full bucket is the same as no bucket), and past `maxKeys` the oldest go.

export type RateLimiter = {
  /** True when `key` may go now (a token was taken); false when it is over its rate. */
  take(key: string, now?: number): boolean;
  /** Seconds until `key` has a token again (for Retry-After), 0 when it has one. */
  retryAfter(key: string, now?: number): number;
  size(): number;
};

type Bucket = { tokens: number; at: number };

export function createRateLimiter(opts: { perSecond: number; burst: number; maxKeys?: number }): RateLimiter {
  const { perSecond, burst } = opts;
  const maxKeys = opts.maxKeys ?? 100_000;
  const buckets = new Map<string, Bucket>();
  let lastSweep = 0;

  function refill(b: Bucket, now: number) {
    b.tokens = Math.min(burst, b.tokens + ((now - b.at) / 1000) * perSecond);
    b.at = now;
  }

  function sweep(now: number) {
    lastSweep = now;
    for (const [k, b] of buckets) {
      refill(b, now);
      if (b.tokens >= burst) buckets.delete(k);
    }
    // Still too many (a flood of distinct keys): drop the oldest-inserted.
    for (const k of buckets.keys()) {
      if (buckets.size <= maxKeys) break;
      buckets.delete(k);
    }
  }

  return {
    take(key, now = Date.now()) {
      let b = buckets.get(key);
      if (!b) {
        if (buckets.size >= maxKeys || now - lastSweep > 60_000) sweep(now);
        b = { tokens: burst, at: now };
        buckets.set(key, b);
      } else refill(b, now);
      if (b.tokens < 1) return false;
      b.tokens -= 1;
      return true;
    },
    retryAfter(key, now = Date.now()) {
      const b = buckets.get(key);
      if (!b) return 0;
      refill(b, now);
      return b.tokens >= 1 ? 0 : Math.ceil((1 - b.tokens) / perSecond);
    },
    size: () => buckets.size,
  };
}
