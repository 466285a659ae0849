// Retry-After (RFC 9110 §10.2.3) as the sinks that speak HTTP read it: delay-seconds or an
// HTTP-date, in milliseconds from now, capped at an hour (a peer asking for more is treated
// as asking for an hour; the outbox's time to live decides the rest). Undefined when absent
// or unreadable.
const MAX_MS = 3_600_000;

export function retryAfter(header: string | string[] | undefined): number | undefined {
  const h = Array.isArray(header) ? header[0] : header;
  if (!h) return undefined;
  const ms = /^\s*\d+\s*$/.test(h) ? Number(h) * 1000 : Date.parse(h) - Date.now();
  if (!Number.isFinite(ms)) return undefined;
  return Math.min(MAX_MS, Math.max(0, ms));
}
