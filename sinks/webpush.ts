// Web Push sink: a browser paired with this relay gets the push from its own push service
// (FCM for Chromium, Mozilla autopush, Apple's web push), encrypted end to end (RFC 8291,
// aes128gcm) and signed with the relay's VAPID key (RFC 8292). A per-device sink: the
// notification's device_id is a token of the relay's device registry, whose targets hold the
// browser's PushSubscription(s).
//
// The subscription endpoint comes from a browser, so it is a URL a user chose: it must be
// https and resolve to a public address (src/egress.ts), checked before the post and again
// where the connection is made; redirects are never followed (https.request does not).
import { retryAfter } from './retry-after.js';
import https from 'node:https';
import net from 'node:net';
import type { PushSubscription, Urgency } from 'web-push';
import { z } from 'zod';
import { shortToken, type PushNotification } from '../src/contract.js';
import { isRelayToken, type Device, type WebPushSubscription } from '../src/devices.js';
import { checkEndpoint, guardedLookup } from '../src/egress.js';
import { duration, flag, sinkSchema } from '../src/schema.js';
import { defineSink, type Outcome, type OutcomeKind, type SinkFactory } from './types.js';

const base64url = (bytes: number, what: string) =>
  z.string().refine((v) => /^[A-Za-z0-9_-]+={0,2}$/.test(v) && Buffer.from(v, 'base64url').length === bytes, {
    message: `must be the ${what} (${bytes} bytes, base64url), as \`push-relay vapid generate\` prints it`,
  });

/** Per push type, seconds a push service keeps an undelivered push (RFC 8030 §5.2 TTL). */
const ttlShape = z
  .strictObject({
    message: duration.optional(),
    session: duration.optional(),
    test: duration.optional(),
    clear: duration.optional(),
    update_badge: duration.optional(),
    other: duration.optional(),
  })
  .optional();

const schema = sinkSchema('webpush', {
  vapid: z.strictObject({
    publicKey: base64url(65, 'VAPID public key'),
    privateKey: base64url(32, 'VAPID private key'),
    // RFC 8292 §2.1: a contact URI, mailto: or https:, for the push service's operator.
    subject: z.string().refine((s) => /^(mailto:.+@.+|https:\/\/.+)/.test(s), { message: 'must be a mailto: address or an https: URL' }),
  }),
  allowPrivateEndpoints: flag.default(false),
  /** How long a push service keeps an undelivered push, per type (`pushTtl: { message: 1h }`). */
  pushTtl: ttlShape,
  /** Socket timeout of one request to a push service. */
  requestTimeout: duration.default(10_000),
});
export type WebPushSinkConfig = z.output<typeof schema>;

/**
 * TTL (RFC 8030 §5.2) and Urgency (§5.3) by push type. A clear or a badge update is stale
 * within a minute and need not wake a phone in power saving; a message or "session expired"
 * is what a person waits for.
 */
const BY_TYPE: Record<string, { ttlMs: number; urgency: Urgency }> = {
  message: { ttlMs: 86_400_000, urgency: 'high' },
  session: { ttlMs: 86_400_000, urgency: 'high' },
  test: { ttlMs: 300_000, urgency: 'normal' },
  clear: { ttlMs: 60_000, urgency: 'low' },
  update_badge: { ttlMs: 60_000, urgency: 'low' },
  other: { ttlMs: 3_600_000, urgency: 'normal' },
};

/**
 * The largest plaintext that fits one aes128gcm record of 4096 bytes, the size every push
 * service must accept (RFC 8030 §7.2) and the most some accept (FCM, autopush: 413 above):
 * 4096 - 86 (RFC 8188 §2.1 header: 16 salt + 4 rs + 1 idlen + 65 keyid, the sender's P-256
 * public key per RFC 8291 §4) - 16 (AES-GCM tag) - 1 (padding delimiter, RFC 8188 §2) = 3993.
 * web-push encrypts with no further padding, so body length = plaintext + 103.
 */
export const MAX_ENCRYPTED = 4096;
export const RECORD_OVERHEAD = 86 + 16 + 1;
export const MAX_PLAINTEXT = MAX_ENCRYPTED - RECORD_OVERHEAD;

/**
 * What the push service's answer means (RFC 8030 §8, and the push services' docs: FCM
 * "Web Push protocol" errors, Mozilla autopush "Error codes", Apple "Sending web push
 * notifications"). One test per row in test/webpush.test.ts.
 */
type Verdict =
  | { kind: 'gone'; reason: string }
  | { kind: 'retryable'; reason: string }
  | { kind: 'too-large'; reason: string }
  | { kind: 'permanent'; reason: string; hint: string };
const STATUS: Record<number, Verdict> = {
  // 404/410: the subscription expired or the browser unsubscribed (RFC 8030 §7.3; autopush,
  // FCM and Apple all say "remove it"). Only that subscription is dead, not the device.
  404: { kind: 'gone', reason: 'subscription_not_found' },
  410: { kind: 'gone', reason: 'subscription_gone' },
  // 413: payload over the service's limit (RFC 8030 §7.2). We fit 4096 bytes; a smaller
  // limit gets one more, shorter try, then is permanent.
  413: { kind: 'too-large', reason: 'payload_too_large' },
  // 429: too many pushes (RFC 8030 §8.4): later, after Retry-After.
  429: { kind: 'retryable', reason: 'rate_limited' },
  // 400/401/403: the request or its VAPID signature was refused. Trying again will not help.
  400: { kind: 'permanent', reason: 'bad_request', hint: 'the push service refused the request; check vapid.subject (mailto: or https:)' },
  401: {
    kind: 'permanent',
    reason: 'vapid_rejected',
    hint: 'the push service refused the VAPID signature; check vapid.privateKey belongs to vapid.publicKey and the clock is right',
  },
  403: {
    kind: 'permanent',
    reason: 'vapid_rejected',
    hint: 'the push service refused the VAPID key; the browser subscribed with another vapid.publicKey (pair it again), or vapid.privateKey does not match',
  },
};
const SERVER_ERROR: Verdict = { kind: 'retryable', reason: 'push_service_error' };
const OTHER_STATUS: Verdict = { kind: 'permanent', reason: 'unexpected_status', hint: 'the push service answered with an unexpected status' };

const REASONS: ReadonlyArray<readonly [OutcomeKind, string]> = [
  ['delivered', ''],
  ['skipped', 'not_paired'],
  ['skipped', 'no_subscription'],
  ['dead-token', 'unknown_device'],
  ['dead-token', 'no_target_left'],
  ['retryable', 'rate_limited'],
  ['retryable', 'push_service_error'],
  ['retryable', 'network_error'],
  ['retryable', 'timeout'],
  ['permanent', 'payload_too_large'],
  ['permanent', 'bad_request'],
  ['permanent', 'vapid_rejected'],
  ['permanent', 'unexpected_status'],
  ['permanent', 'endpoint_refused'],
  ['permanent', 'bad_subscription'],
];

/** One subscription's result. */
type Attempt =
  | { kind: 'delivered'; sub: WebPushSubscription }
  | { kind: 'gone'; sub: WebPushSubscription; reason: string; detail: string }
  | { kind: 'retryable' | 'permanent'; sub: WebPushSubscription; reason: string; detail: string; retryAfterMs?: number };

/**
 * web-push always calls https.request (test-peers §5), so an http: endpoint (allowed only
 * with allowPrivateEndpoints: a push service on the LAN) needs an https.Agent that connects
 * in plain TCP.
 */
class PlainAgent extends https.Agent {
  override createConnection(options: net.NetConnectOpts): net.Socket {
    return net.connect(options);
  }
}

/**
 * web-push (and its JWT and ECE modules) costs ~12 MB of memory and ~80 ms at start-up
 * (measured on Node 20): loaded when a webpush sink starts, not by every relay that lists
 * the module, as the store drivers are.
 */
let library: Promise<typeof import('web-push')> | undefined;
const webPushLibrary = () => (library ??= import('web-push').then((m) => (m as unknown as { default: typeof import('web-push') }).default));

const createWebPushSink: SinkFactory<WebPushSinkConfig> = (name, config, { logger: log, devices, metrics, mattermostUrl }) => {
  const allowPrivate = config.allowPrivateEndpoints;
  const agentOptions: https.AgentOptions = { keepAlive: true, maxSockets: 64, lookup: guardedLookup(allowPrivate) as https.AgentOptions['lookup'] };
  const agent = new https.Agent(agentOptions);
  const plainAgent = allowPrivate ? new PlainAgent(agentOptions) : undefined;
  // RFC 8292 §2: the JWT's `aud` is the push service's origin and `exp` at most 24 h ahead.
  // Signing one per push was a quarter of the sink's CPU (web-push re-encodes the key each
  // time): one JWT per origin, valid 12 h, made again after an hour.
  const jwts = new Map<string, { authorization: string; madeAt: number }>();
  function authorization(webPush: typeof import('web-push'), origin: string): string {
    const now = Date.now();
    const hit = jwts.get(origin);
    if (hit && now - hit.madeAt < VAPID_REUSE_MS) return hit.authorization;
    const { vapid } = config;
    const headers = webPush.getVapidHeaders(origin, vapid.subject, vapid.publicKey, vapid.privateKey, 'aes128gcm', Math.floor(now / 1000) + VAPID_LIFETIME_S);
    if (jwts.size >= 1000) jwts.clear();
    jwts.set(origin, { authorization: headers.Authorization, madeAt: now });
    return headers.Authorization;
  }
  const removed = metrics.counter({
    name: 'push_relay_webpush_subscriptions_removed_total',
    help: 'Browser push subscriptions deleted from the device registry because the push service said 404 or 410.',
    labelNames: ['sink'],
  });
  removed.labels(name).inc(0);

  const policy = (type: string) => {
    const key = type in BY_TYPE ? type : 'other';
    const d = BY_TYPE[key] as (typeof BY_TYPE)[string];
    const ttlMs = (config.pushTtl as Record<string, number | undefined> | undefined)?.[key] ?? d.ttlMs;
    return { ttl: Math.round(ttlMs / 1000), urgency: d.urgency };
  };

  async function sendOne(sub: WebPushSubscription, n: PushNotification, payloadOf: (budget: number) => string): Promise<Attempt> {
    const check = await checkEndpoint(sub.endpoint, allowPrivate);
    if (!check.ok) return { kind: 'permanent', sub, reason: 'endpoint_refused', detail: `push endpoint ${host(sub.endpoint)} refused: ${check.reason}` };
    const { ttl, urgency } = policy(n.type || 'message');
    const webPush = await webPushLibrary();
    const options = {
      headers: { Authorization: authorization(webPush, check.url.origin) },
      TTL: ttl,
      urgency,
      ...topicOf(n),
      agent: check.url.protocol === 'http:' && plainAgent ? plainAgent : agent,
      timeout: config.requestTimeout,
    };
    const { WebPushError } = webPush;
    const post = (budget: number) =>
      webPush.sendNotification(sub as PushSubscription, payloadOf(budget), options).then(
        () => undefined,
        (err: unknown) => err as Error,
      );
    let err = await post(MAX_PLAINTEXT);
    // RFC 8030 §7.2 guarantees 4096 bytes, which we fit; a service that takes less (413)
    // gets one more try at half the size.
    const shortened = err instanceof WebPushError && STATUS[err.statusCode]?.kind === 'too-large';
    if (shortened) err = await post(Math.floor(MAX_PLAINTEXT / 2));
    if (err === undefined) return { kind: 'delivered', sub };
    if (!(err instanceof WebPushError)) return transportFailure(sub, err as NodeJS.ErrnoException);
    const verdict = STATUS[err.statusCode] ?? (err.statusCode >= 500 ? SERVER_ERROR : OTHER_STATUS);
    const said = `push service ${host(sub.endpoint)} answered ${err.statusCode}${bodyHint(err.body)}`;
    switch (verdict.kind) {
      case 'gone':
        return { kind: 'gone', sub, reason: verdict.reason, detail: said };
      case 'retryable': {
        const retryAfterMs = retryAfter(err.headers['retry-after']);
        return { kind: 'retryable', sub, reason: verdict.reason, detail: said, ...(retryAfterMs !== undefined ? { retryAfterMs } : {}) };
      }
      case 'too-large':
        return { kind: 'permanent', sub, reason: verdict.reason, detail: `${said}: payload too large${shortened ? ' even cut to half' : ''}` };
      case 'permanent':
        return { kind: 'permanent', sub, reason: verdict.reason, detail: `${said}: ${verdict.hint}` };
    }
  }

  /** Folds the subscriptions' results into the device's outcome and the registry's record. */
  async function settle(device: Device, attempts: Attempt[]): Promise<Outcome> {
    const now = Date.now();
    const gone = new Set(attempts.filter((a) => a.kind === 'gone').map((a) => a.sub.endpoint));
    const delivered = attempts.some((a) => a.kind === 'delivered');
    // A delivered push with nothing gone rewrites the device at most once a minute: a write per
    // push costs the store, and the registry has no compare-and-set between relay instances,
    // so each rewrite is a chance to undo a concurrent change made by another instance.
    if (delivered && !gone.size && device.lastPushAt !== undefined && now - device.lastPushAt < PUSH_STAMP_MS) return { kind: 'delivered' };
    const after = await devices.update(device.token, (d) => {
      const webpush = (d.targets.webpush ?? []).filter((s) => !gone.has(s.endpoint));
      return { ...d, targets: { ...d.targets, webpush }, ...(delivered ? { lastPushAt: now } : { lastFailureAt: now }) };
    });
    if (gone.size) {
      removed.labels(name).inc(gone.size);
      log.info({ device: shortToken(device.token), removed: gone.size, left: after?.targets.webpush?.length ?? 0 }, 'push service said a subscription is gone; removed it');
    }
    if (delivered) return { kind: 'delivered' };
    if (!after) return { kind: 'dead-token', reason: 'unknown_device', detail: `device ${shortToken(device.token)} was removed meanwhile` };
    if (!hasTarget(after)) {
      return { kind: 'dead-token', reason: 'no_target_left', detail: `every subscription of the device is gone (${attempts.map((a) => (a.kind === 'delivered' ? '' : a.detail)).join('; ')})` };
    }
    const failed = attempts.filter((a): a is Extract<Attempt, { kind: 'retryable' | 'permanent' }> => a.kind === 'retryable' || a.kind === 'permanent');
    const detail = attempts.map((a) => (a.kind === 'delivered' ? '' : a.detail)).join('; ');
    const retryable = failed.filter((a) => a.kind === 'retryable');
    if (retryable.length) {
      const waits = retryable.flatMap((a) => (a.retryAfterMs === undefined ? [] : [a.retryAfterMs]));
      const reason = (retryable[0] as (typeof retryable)[number]).reason;
      return { kind: 'retryable', reason, detail, ...(waits.length ? { retryAfterMs: Math.max(...waits) } : {}) };
    }
    // Every subscription gone, another target left (email, ntfy): nothing more for this sink.
    const first = failed[0];
    if (!first) return { kind: 'skipped', reason: 'no_subscription' };
    return { kind: 'permanent', reason: first.reason, detail };
  }

  return {
    name,
    type: 'webpush',
    perDevice: true,
    reasons: REASONS,
    vapidPublicKey: config.vapid.publicKey,
    async start() {
      await webPushLibrary();
      log.info({ allowPrivateEndpoints: allowPrivate }, 'Web Push sink ready');
    },
    state: () => ({ ready: true, state: 'ready' }),

    async send(n, signal) {
      // A token this relay never issued is not ours to declare dead (a route without
      // `paired: true` sends the official apps' tokens here too): skip, never REMOVE.
      if (!isRelayToken(n.device_id)) return { kind: 'skipped', reason: 'not_paired' };
      const device = await devices.get(n.device_id);
      // Unpaired or removed: REMOVE, so Mattermost stops pushing to this device id (contract §3.2.4).
      if (!device) return { kind: 'dead-token', reason: 'unknown_device', detail: `no paired device ${shortToken(n.device_id)}` };
      const subs = device.targets.webpush ?? [];
      if (!subs.length) {
        return hasTarget(device)
          ? { kind: 'skipped', reason: 'no_subscription' }
          : { kind: 'dead-token', reason: 'no_target_left', detail: `device ${shortToken(n.device_id)} has no target` };
      }
      if (signal.aborted) return TIMED_OUT;
      const payloadOf = payloadBuilder(n, mattermostUrl);
      // No race with `signal` here: src/attempt.ts answers at the deadline and hears this
      // outcome when it comes (a late success takes the outbox copy back). web-push cannot be
      // aborted; requestTimeout bounds each request.
      const attempts = await Promise.all(subs.map((s) => sendOne(s, n, payloadOf)));
      return settle(device, attempts);
    },

    async close() {
      agent.destroy();
      plainAgent?.destroy();
    },
  };
};

const PUSH_STAMP_MS = 60_000;
const VAPID_LIFETIME_S = 12 * 3600;
const VAPID_REUSE_MS = 3_600_000;
const TIMED_OUT: Outcome = { kind: 'retryable', reason: 'timeout', detail: 'push service did not answer within the deadline' };

function hasTarget(d: Device): boolean {
  return (d.targets.webpush?.length ?? 0) > 0 || !!d.targets.email || !!d.targets.ntfy;
}

function transportFailure(sub: WebPushSubscription, err: NodeJS.ErrnoException): Attempt {
  if (err.code === 'EPRIVATEADDRESS') return { kind: 'permanent', sub, reason: 'endpoint_refused', detail: `push endpoint refused: ${err.message}` };
  // web-push throws plain Errors for a subscription it cannot encrypt to (bad p256dh/auth).
  if (!err.code && /p256dh|auth|subscription|payload/i.test(err.message)) {
    return { kind: 'permanent', sub, reason: 'bad_subscription', detail: `subscription of ${host(sub.endpoint)} unusable: ${err.message}` };
  }
  const reason = err.message === 'Socket timeout' ? 'timeout' : 'network_error';
  return { kind: 'retryable', sub, reason, detail: `push service ${host(sub.endpoint)} unreachable: ${err.code ?? err.message}` };
}

/** Host of an endpoint for logs and errors: the path is the subscription's secret-ish id. */
function host(endpoint: string): string {
  try {
    return new URL(endpoint).host;
  } catch {
    return '(bad URL)';
  }
}

function bodyHint(body: string | undefined): string {
  const text = (body ?? '').replace(/\s+/g, ' ').trim().slice(0, 200);
  return text ? ` (${text})` : '';
}


/**
 * Topic (RFC 8030 §5.4): a push still waiting at the push service is replaced by a newer one
 * with the same topic. Per channel, since the service worker collapses a channel's
 * notifications by tag anyway; badge updates replace each other. At most 32 base64url chars.
 */
function topicOf(n: PushNotification): { topic?: string } {
  if (n.type === 'update_badge') return { topic: 'badge' };
  if ((n.type === 'message' || n.type === 'clear') && n.channel_id && /^[A-Za-z0-9_-]{1,32}$/.test(n.channel_id)) return { topic: n.channel_id };
  return {};
}

/** What the service worker of the pairing page (src/page/) reads: one JSON object, fields only when the push has them. */
export type WebPushPayload = {
  v: 1;
  type: string;
  sub_type?: string;
  title?: string;
  body?: string;
  tag?: string;
  post_id?: string;
  channel_id?: string;
  team_id?: string;
  root_id?: string;
  sender_name?: string;
  server_id?: string;
  ack_id?: string;
  url?: string;
  badge?: number;
};

const ELLIPSIS = '…';

/**
 * Returns a function that renders the payload JSON within `budget` UTF-8 bytes: the body cut
 * on a code point boundary (never inside a UTF-8 sequence or a surrogate pair), with an
 * ellipsis, as long as fits, found by bisection on the real serialisation (JSON escapes make
 * the byte count of a character depend on the character).
 */
export function payloadBuilder(n: PushNotification, mattermostUrl: string | undefined): (budget: number) => string {
  const type = n.type || 'message';
  const p: WebPushPayload = { v: 1, type };
  if (n.sub_type) p.sub_type = n.sub_type;
  if (type !== 'clear' && type !== 'update_badge') p.title = capped(n.channel_name || n.sender_name || 'Mattermost');
  const text = n.message ?? '';
  if (n.channel_id) p.tag = `mm:${n.channel_id}`;
  for (const k of ['post_id', 'channel_id', 'team_id', 'root_id', 'sender_name', 'server_id', 'ack_id'] as const) {
    const v = n[k];
    if (typeof v === 'string' && v !== '') p[k] = capped(v);
  }
  if (mattermostUrl) p.url = n.post_id ? `${mattermostUrl}/_redirect/pl/${encodeURIComponent(n.post_id)}` : mattermostUrl;
  if (typeof n.badge === 'number' && n.badge >= 0) p.badge = n.badge;

  const render = (body: string | undefined) => JSON.stringify(body === undefined ? p : { ...p, body });
  return (budget) => {
    if (!text) return render(undefined);
    const whole = render(text);
    if (Buffer.byteLength(whole) <= budget) return whole;
    // Code unit offsets that are code point boundaries: never between a high and a low surrogate.
    const cut = (i: number) => (i > 0 && i < text.length && isLowSurrogate(text.charCodeAt(i)) && isHighSurrogate(text.charCodeAt(i - 1)) ? i - 1 : i);
    const fits = (i: number) => Buffer.byteLength(render(text.slice(0, cut(i)) + ELLIPSIS)) <= budget;
    if (!fits(0)) return render(undefined);
    let lo = 0;
    let hi = text.length;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (fits(mid)) lo = mid;
      else hi = mid - 1;
    }
    return render(text.slice(0, cut(lo)) + ELLIPSIS);
  };
}

/**
 * Names and ids are short in Mattermost (a channel's display name at most 64 characters, ids
 * 26); capping them keeps the message text the part that gives way to the size limit.
 */
function capped(s: string, max = 200): string {
  if (s.length <= max) return s;
  const end = isHighSurrogate(s.charCodeAt(max - 1)) ? max - 1 : max;
  return s.slice(0, end) + ELLIPSIS;
}

const isHighSurrogate = (c: number) => c >= 0xd800 && c <= 0xdbff;
const isLowSurrogate = (c: number) => c >= 0xdc00 && c <= 0xdfff;

export default defineSink({ type: 'webpush', schema, create: createWebPushSink });
