// The checks every API call goes through before its body is read (src/server.ts `serveApi`),
// and the admin token for the operator's endpoints. Each is written once, here:
//
//   allowlist (403) -> rate limit (429) -> basic auth (401)
//
// The allowlist comes first so that an outsider learns nothing, not even whether credentials
// would work; the rate limit before the credential check slows a password guesser down too.
// A refusal says nothing about why beyond its status (no detail leaked), is counted in
// push_relay_refused_requests_total{reason}, and is logged once per client and minute with
// the count of the ones not logged (`createRefusals`), so a flood cannot flood the log.
import { timingSafeEqual } from 'node:crypto';
import { BlockList, isIP } from 'node:net';
import type { Logger } from 'pino';
import { Counter, type Registry } from 'prom-client';
import type { Config } from './config.js';
import type { PushResponse } from './contract.js';
import { createRateLimiter } from './rate-limit.js';

export type Endpoint = 'send_push' | 'ack';

/** Who is calling: what a guard reads of any request. */
export type Caller = {
  /** The raw Authorization header. */
  authorization: string | undefined;
  /** The peer's address ('' when there is no socket, as under `app.request`). */
  remoteAddress: string;
  /** The raw X-Forwarded-For header (honoured only from trusted proxies). */
  forwardedFor: string | undefined;
  /** The client's address once worked out (after trustProxy), cached for the next guard. */
  client?: string;
};

/** One call to the API, whichever entrance it came through. */
export type ApiRequest = Caller & {
  endpoint: Endpoint;
  userAgent: string | undefined;
};

/** What an API call answers: an HTTP status and a contract body (or a plain-text refusal). */
export type ApiAnswer = { status: number; body: PushResponse | string; headers?: Readonly<Record<string, string>> };

/** A check made on every API call before its body is read; an answer refuses the call. */
export type Guard = (req: ApiRequest) => ApiAnswer | undefined;

// ---- refusals: counted, and logged once per client and minute ----

export const REFUSAL_REASONS = ['not_allowed', 'unauthorized', 'rate_limited', 'admin_token'] as const;
export type RefusalReason = (typeof REFUSAL_REASONS)[number];

export type Refusals = {
  /** Counts a refusal and logs it unless this (reason, client) was logged within the minute. */
  refused(reason: RefusalReason, client: string, fields?: Record<string, unknown>): void;
  /** (reason, client) pairs remembered now. */
  size(): number;
  stop(): void;
};

const WINDOW_MS = 60_000;
/** Distinct (reason, client) pairs remembered; past it the oldest go (and may log again). */
const MAX_CLIENTS = 1024;

const MESSAGES: Record<RefusalReason, string> = {
  not_allowed: 'refused a request from an address outside server.allow (403)',
  unauthorized: 'refused a request without valid credentials (server.auth, 401)',
  rate_limited:
    'rate limit exceeded (server.rateLimit, 429): Mattermost drops a push answered 429, so these notifications are lost; raise the limit if this client is your Mattermost server',
  admin_token: 'refused an admin request without the admin token (admin.token, 401)',
};

export function createRefusals(registry: Registry, logger: Logger): Refusals {
  const counter =
    (registry.getSingleMetric('push_relay_refused_requests_total') as Counter<'reason'> | undefined) ??
    new Counter({
      name: 'push_relay_refused_requests_total',
      help: 'Requests refused before their body was read, by reason (not_allowed, unauthorized, rate_limited, admin_token).',
      labelNames: ['reason'],
      registers: [registry],
    });
  for (const r of REFUSAL_REASONS) counter.labels(r).inc(0);

  const log = logger.child({ component: 'guards' });
  /** `reason client` -> when its minute ends, and how many refusals were not logged in it. */
  const recent = new Map<string, { reason: RefusalReason; client: string; until: number; unlogged: number }>();

  const line = (reason: RefusalReason, fields: Record<string, unknown>, msg: string) => {
    // A rate limit means lost pushes: an error, not a warning.
    if (reason === 'rate_limited') log.error(fields, msg);
    else log.warn(fields, msg);
  };

  function flush(now: number) {
    for (const [key, e] of recent) {
      if (e.until > now) continue;
      recent.delete(key);
      if (e.unlogged > 0) {
        line(e.reason, { reason: e.reason, client: e.client, count: e.unlogged }, `${MESSAGES[e.reason]} (${e.unlogged} more in the last minute)`);
      }
    }
  }
  // Says how many were not logged once their minute is over, even when the flood stops.
  const timer = setInterval(() => flush(Date.now()), 5_000);
  timer.unref();

  return {
    refused(reason, client, fields) {
      counter.labels(reason).inc();
      const key = `${reason} ${client}`;
      const now = Date.now();
      const e = recent.get(key);
      if (e && e.until > now) {
        e.unlogged++;
        return;
      }
      if (e) flush(now);
      if (recent.size >= MAX_CLIENTS) {
        flush(now);
        for (const k of recent.keys()) {
          if (recent.size < MAX_CLIENTS) break;
          recent.delete(k);
        }
      }
      recent.set(key, { reason, client, until: now + WINDOW_MS, unlogged: 0 });
      line(reason, { reason, client: client || undefined, ...fields }, `${MESSAGES[reason]}; the next ones from this client in the next minute are counted, not logged`);
    },
    size: () => recent.size,
    stop() {
      clearInterval(timer);
      flush(Number.POSITIVE_INFINITY);
    },
  };
}

// ---- the client's address ----

type Family = 'ipv4' | 'ipv6';

/** `::ffff:10.0.0.1` is 10.0.0.1; a port (`1.2.3.4:5678`, `[::1]:80`) is dropped. */
export function normalizeAddress(raw: string): string {
  // The usual peer, a plain IPv4 address, needs no regex (this runs on every API call).
  if (raw.indexOf(':') < 0 && raw.indexOf(' ') < 0) return raw;
  let a = raw.trim();
  const bracket = /^\[([^\]]+)\](?::\d+)?$/.exec(a);
  if (bracket) a = bracket[1] as string;
  else if (/^\d+\.\d+\.\d+\.\d+:\d+$/.test(a)) a = a.slice(0, a.lastIndexOf(':'));
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(a);
  return mapped ? (mapped[1] as string) : a;
}

const familyOf = (ip: string): Family | undefined => {
  const f = isIP(ip);
  return f === 4 ? 'ipv4' : f === 6 ? 'ipv6' : undefined;
};

/** A BlockList from CIDRs ('10.0.0.0/8', '::1', ...), validated by the config schema. */
export function addressList(cidrs: readonly string[]): { has(ip: string): boolean } {
  const list = new BlockList();
  for (const c of cidrs) {
    const [raw = '', prefix] = c.trim().split('/');
    const addr = normalizeAddress(raw);
    const family = familyOf(addr) as Family;
    const bits = prefix === undefined ? (family === 'ipv4' ? 32 : 128) : Number(prefix);
    list.addSubnet(addr, bits, family);
  }
  // The callers are few (a handful of Mattermost servers): remember the answers, boundedly,
  // rather than ask the BlockList (a call into C++ with an address object) every time.
  const known = new Map<string, boolean>();
  return {
    has(ip) {
      let yes = known.get(ip);
      if (yes === undefined) {
        const family = familyOf(ip);
        yes = family !== undefined && list.check(ip, family);
        if (known.size >= 4096) known.clear();
        known.set(ip, yes);
      }
      return yes;
    },
  };
}

/** Stands for a client whose forwarded address is not an address: one key for all of them. */
const UNPARSEABLE = 'unparseable-forwarded-address';

/**
 * The client's address. X-Forwarded-For is read only when the peer is a trusted proxy, from
 * the right: each proxy appends the address it saw, so the right-most entry not of a trusted
 * proxy is the first one that no trusted party vouches for; the entries left of it are
 * whatever the client chose to send (RFC 7239 §7.4 on the same problem with Forwarded).
 */
export function clientResolver(trustProxy: readonly string[] | undefined): (c: Caller) => string {
  const trusted = trustProxy?.length ? addressList(trustProxy) : undefined;
  return (c) => {
    if (c.client !== undefined) return c.client;
    let addr = normalizeAddress(c.remoteAddress);
    if (trusted && c.forwardedFor && trusted.has(addr)) {
      const hops = c.forwardedFor.split(',');
      for (let i = hops.length - 1, n = 0; i >= 0 && n < 32; i--, n++) {
        const hop = normalizeAddress(hops[i] as string);
        if (familyOf(hop) === undefined) {
          addr = UNPARSEABLE;
          break;
        }
        addr = hop;
        if (!trusted.has(hop)) break;
      }
    }
    c.client = addr;
    return addr;
  };
}

// ---- the guards ----

const FORBIDDEN: ApiAnswer = { status: 403, body: 'forbidden' };
const UNAUTHORIZED: ApiAnswer = {
  status: 401,
  body: "unauthorized: put user:password in Mattermost's push notification server URL",
  headers: { 'WWW-Authenticate': 'Basic realm="push-relay"' },
};

export type GuardDeps = { refusals: Refusals; clientOf: (c: Caller) => string };

/** The API's guards for `server`, in the order they run. */
export function createGuards(server: Config['server'], deps: GuardDeps): Guard[] {
  const guards: Guard[] = [];
  if (server.allow) guards.push(allowlist(server.allow, deps));
  if (server.rateLimit) guards.push(rateLimit(server.rateLimit, deps));
  if (server.auth) guards.push(basicAuth(server.auth, deps));
  return guards;
}

function allowlist(cidrs: readonly string[], { refusals, clientOf }: GuardDeps): Guard {
  const allowed = addressList(cidrs);
  return (req) => {
    const client = clientOf(req);
    if (allowed.has(client)) return undefined;
    refusals.refused('not_allowed', client, { endpoint: req.endpoint });
    return FORBIDDEN;
  };
}

/**
 * Token buckets per client address. A 429 is a lost push (Mattermost does not retry, contract
 * §0.5), so the limit is for a misbehaving or hostile client, well above what the server sends.
 */
function rateLimit(limit: { perSecond: number; burst: number }, { refusals, clientOf }: GuardDeps): Guard {
  const buckets = createRateLimiter(limit);
  return (req) => {
    const client = clientOf(req);
    if (buckets.take(client)) return undefined;
    refusals.refused('rate_limited', client, { endpoint: req.endpoint, perSecond: limit.perSecond, burst: limit.burst });
    // RFC 9110 §10.2.3 / RFC 6585 §4: how long to wait, in whole seconds.
    return { status: 429, body: 'too many requests', headers: { 'Retry-After': String(Math.max(1, buckets.retryAfter(client))) } };
  };
}

/** Compares in constant time for equal lengths (the length of a secret is not the secret). */
function sameBytes(got: string | undefined, expected: Buffer): boolean {
  const g = Buffer.from(got ?? '');
  return g.length === expected.length && timingSafeEqual(g, expected);
}

/**
 * Mattermost sends `Authorization: Basic` when its push server URL carries userinfo
 * (`https://user:pass@relay/`, contract §1.1): that is the one credential it can present.
 */
function basicAuth(auth: { username: string; password: string }, { refusals, clientOf }: GuardDeps): Guard {
  const expected = Buffer.from(`Basic ${Buffer.from(`${auth.username}:${auth.password}`).toString('base64')}`);
  return (req) => {
    if (sameBytes(req.authorization, expected)) return undefined;
    refusals.refused('unauthorized', clientOf(req), { endpoint: req.endpoint, credentials: req.authorization ? 'wrong' : 'none' });
    return UNAUTHORIZED;
  };
}

/** `Authorization: Bearer <admin.token>` (RFC 6750 §2.1) for what Mattermost never calls. */
export function adminGuard(token: string, { refusals, clientOf }: GuardDeps): (c: Caller) => ApiAnswer | undefined {
  const expected = Buffer.from(`Bearer ${token}`);
  const refused: ApiAnswer = { status: 401, body: 'unauthorized', headers: { 'WWW-Authenticate': 'Bearer realm="push-relay admin"' } };
  return (c) => {
    if (sameBytes(c.authorization, expected)) return undefined;
    refusals.refused('admin_token', clientOf(c), { credentials: c.authorization ? 'wrong' : 'none' });
    return refused;
  };
}

// ---- limits on the payload, decided before any sink sees it ----

/**
 * How deep an unknown field may nest: 1 000 containers below the payload object. No field
 * Mattermost sends is an object (contract §2), so depth comes only from unknown fields, which
 * the relay passes on to json-format sinks and keeps in the outbox, where JSON.stringify
 * recurses: 5 000 levels overflowed its stack in the MQTT json sink and again in the
 * dead-letter write, and that push was lost (4 000 passed). 1 000 keeps a margin of four for
 * any consumer, and is checked before any sink sees the push. Go's decoder accepts 10 000
 * (encoding/json maxNestingDepth), so the official proxy answers OK from 1 001 to 10 000 where
 * we answer FAIL; Mattermost itself never nests.
 */
export const MAX_DEPTH = 1000;
/**
 * The longest identifier (ack_id, device_id, server_id, ...). Mattermost's ids are 26
 * characters, device tokens a few hundred (FCM ~160, APNs 64 hex, prefixed with the platform);
 * nothing legitimate comes near it, and a longer one would end up in topics, logs and keys.
 */
export const MAX_ID_LENGTH = 4096;
const ID_FIELDS = [
  'ack_id', 'platform', 'server_id', 'device_id', 'post_id', 'team_id', 'channel_id', 'root_id', 'sender_id',
  'type', 'sub_type', 'category', 'sound', 'version',
] as const;

/**
 * The problem with a parsed payload, or undefined when it is within the limits. `text` is the
 * body it was parsed from: a body with no `{` or `[` after its first character cannot nest,
 * and one shorter than MAX_ID_LENGTH cannot hold a longer id, so the usual push costs two
 * indexOf calls (the walk below cost 1.3 µs per notification, ~2% of the relay's CPU).
 */
export function payloadProblem(n: Record<string, unknown>, text: string): string | undefined {
  const short = text.length <= MAX_ID_LENGTH;
  if (short && text.indexOf('{', 1) < 0 && text.indexOf('[') < 0) return undefined;
  if (!short) for (const f of ID_FIELDS) {
    const v = n[f];
    if (typeof v === 'string' && v.length > MAX_ID_LENGTH) return `${f} is longer than ${MAX_ID_LENGTH} characters`;
  }
  // Only unknown fields can nest: the known ones are strings, numbers and booleans.
  for (const key in n) {
    const v = n[key];
    if (v !== null && typeof v === 'object' && depthOver(v as object, 1)) {
      return `field ${JSON.stringify(key.slice(0, 64))} is nested deeper than ${MAX_DEPTH} levels (the relay's limit)`;
    }
  }
  return undefined;
}

/** Whether `v`, itself at `depth`, holds anything deeper than MAX_DEPTH. Recursion stops there. */
function depthOver(v: object, depth: number): boolean {
  if (depth > MAX_DEPTH) return true;
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) {
      const child: unknown = v[i];
      if (child !== null && typeof child === 'object' && depthOver(child, depth + 1)) return true;
    }
    return false;
  }
  for (const key in v) {
    const child = (v as Record<string, unknown>)[key];
    if (child !== null && typeof child === 'object' && depthOver(child as object, depth + 1)) return true;
  }
  return false;
}
