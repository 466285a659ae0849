// APNs sink: the request the official push proxy sends (sinks/proxy-payload.ts) over Apple's
// HTTP/2 provider API, to the notification's own device token. A per-device sink: Apple's
// BadDeviceToken / Unregistered answers become REMOVE for Mattermost.
//
// Apple's documentation this follows: "Sending notification requests to APNs" (hosts, headers,
// HTTP/2, one connection reused), "Establishing a token-based connection to APNs" (the ES256
// JWT: header alg+kid, claims iss+iat; refresh no more than once every 20 minutes and no less
// than once every 60), "Establishing a certificate-based connection to APNs" and "Handling
// notification responses from APNs" (the status codes and reasons in APNS_ERRORS below).
//
// One HTTP/2 connection per sink (sinks/h2-client.ts: HTTPS_PROXY, NODE_EXTRA_CA_CERTS, GOAWAY,
// streams within the server's SETTINGS_MAX_CONCURRENT_STREAMS; Apple starts a token-auth
// connection low and raises it once the first token is accepted).
import { createPrivateKey, sign, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { shortToken, type PushNotification } from '../src/contract.js';
import { duration, flag, sinkSchema } from '../src/schema.js';
import { apnsRequest } from './proxy-payload.js';
import { proxyMetrics, type ProxyResult } from './proxy-metrics.js';
import { createH2Client, type H2Client } from './h2-client.js';
import { defineSink, type Outcome, type OutcomeKind, type SinkFactory, type SinkState } from './types.js';

const schema = sinkSchema('apns', {
  /** The app's bundle id (PP's ApplePushTopic); VoIP pushes go to `<topic>.voip`. */
  topic: z.string().min(1),
  /** Token auth: the .p8 key file, its key id and the team id (PP: AppleAuthKeyFile/ID, AppleTeamID). */
  keyFile: z.string().min(1).optional(),
  keyId: z.string().min(1).optional(),
  teamId: z.string().min(1).optional(),
  /** Certificate auth: PEM certificate (PP's ApplePushCertPrivate, which may hold the key too) and key. */
  cert: z.string().min(1).optional(),
  key: z.string().min(1).optional(),
  passphrase: z.string().optional(),
  /** true: api.push.apple.com; false: api.sandbox.push.apple.com (development builds). */
  production: flag.default(true),
  /**
   * Sets `apns-expiration` to now + this: how long Apple keeps trying an offline phone.
   * Absent (PP's behaviour): no header, Apple stores the notification and tries at least once.
   */
  expiration: duration.optional(),
}).superRefine((c, ctx) => {
  const token = [c.keyFile, c.keyId, c.teamId];
  if (token.some(Boolean) && !token.every(Boolean)) {
    for (const k of ['keyFile', 'keyId', 'teamId'] as const) {
      if (!c[k]) ctx.addIssue({ code: 'custom', path: [k], message: 'token auth needs keyFile, keyId and teamId' });
    }
  }
  if (!token.some(Boolean) && !c.cert) {
    ctx.addIssue({ code: 'custom', path: ['keyFile'], message: 'needs token auth (keyFile, keyId, teamId) or certificate auth (cert, key)' });
  }
});
export type ApnsSinkConfig = z.output<typeof schema>;

export const APNS_PRODUCTION = 'api.push.apple.com';
export const APNS_SANDBOX = 'api.sandbox.push.apple.com';

/**
 * Apple's answers ("Handling notification responses from APNs") and what each means here. PP
 * (contract §5.3) removes on the first four; the rest are Apple's documented status classes.
 * - BadDeviceToken (400), MissingDeviceToken (400), DeviceTokenNotForTopic (400),
 *   Unregistered (410): the token is dead for this app: REMOVE.
 * - ExpiredToken (410): "the device token has expired" (Apple added it after PP's list): REMOVE.
 * - ExpiredProviderToken (403): our JWT is too old: renewed at once and the push tried again.
 * - 429 (TooManyRequests, TooManyProviderTokenUpdates) and 5xx (InternalServerError,
 *   ServiceUnavailable, Shutdown): later: the outbox's job.
 * - anything else (BadTopic, PayloadTooLarge, InvalidProviderToken, BadCertificate, ...):
 *   permanent, with Apple's reason.
 */
const DEAD_TOKEN_REASONS = ['BadDeviceToken', 'Unregistered', 'MissingDeviceToken', 'DeviceTokenNotForTopic', 'ExpiredToken'] as const;

type Classified = { kind: Exclude<OutcomeKind, 'delivered' | 'skipped'>; reason: string };
function classify(status: number, reason: string): Classified {
  if ((DEAD_TOKEN_REASONS as readonly string[]).includes(reason)) return { kind: 'dead-token', reason };
  if (status === 429) return { kind: 'retryable', reason: 'too_many_requests' };
  if (status >= 500) return { kind: 'retryable', reason: 'server_error' };
  return { kind: 'permanent', reason: reason ? 'rejected' : 'unexpected_status' };
}

/** Apple's 60-minute window, renewed well inside it; Apple refuses renewals under 20 minutes apart. */
const TOKEN_LIFETIME_MS = 50 * 60_000;

let clock: () => number = Date.now;
/**
 * Replaces the clock the provider token's age is read from (undefined: Date.now). Tests age a
 * token past its lifetime without waiting 50 minutes.
 */
export function useApnsClock(now: (() => number) | undefined): void {
  clock = now ?? Date.now;
}

/** The ES256 provider token Apple expects ("Establishing a token-based connection to APNs"). */
export function providerToken(key: KeyObject, keyId: string, teamId: string, nowMs: number): string {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const input = `${b64({ alg: 'ES256', kid: keyId })}.${b64({ iss: teamId, iat: Math.floor(nowMs / 1000) })}`;
  // JWS wants r||s (RFC 7518 §3.4), not node's default DER.
  const signature = sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' }).toString('base64url');
  return `${input}.${signature}`;
}

/** Apple's JSON error body: `{"reason": "BadDeviceToken"}`. */
function reasonOf(body: string): string {
  try {
    return String((JSON.parse(body) as { reason?: unknown }).reason ?? '');
  } catch {
    return '';
  }
}

const DELIVERED: Outcome = { kind: 'delivered' };
const SUCCESS: ProxyResult = { kind: 'success' };

const createApnsSink: SinkFactory<ApnsSinkConfig> = (name, config, { logger: log, metrics }) => {
  const official = proxyMetrics(metrics, 'apple');
  const host = config.production ? APNS_PRODUCTION : APNS_SANDBOX;
  const tokenAuth = Boolean(config.keyFile && config.keyId && config.teamId);
  let signingKey: KeyObject | undefined;
  let clientTls: { cert: Buffer; key: Buffer; passphrase?: string } | undefined;
  let jwt: { token: string; issuedAt: number } | undefined;
  let apple: H2Client | undefined;

  function currentToken(): string {
    const now = clock();
    // Also renewed when the clock went back (an NTP step): Apple refuses a token from the future.
    if (!jwt || now - jwt.issuedAt >= TOKEN_LIFETIME_MS || now < jwt.issuedAt) {
      jwt = { token: providerToken(signingKey as KeyObject, config.keyId as string, config.teamId as string, now), issuedAt: now };
      log.debug('APNs provider token renewed');
    }
    return jwt.token;
  }

  function deliver(client: H2Client, n: PushNotification, signal: AbortSignal): Promise<Outcome> {
    const req = apnsRequest(n, config.topic);
    const done = official.start(n, req.voip ? 'voip' : '');
    // Apple's tokens are hex; anything else is sent as is when a path may hold it (RFC 3986 pchar), else encoded.
    const path = `/3/device/${/^[\w.~:@!$&'()*+,;=-]+$/.test(n.device_id) ? n.device_id : encodeURIComponent(n.device_id)}`;
    const post = (renewed: boolean): Promise<Outcome> => {
      const headers: Record<string, string> = {
        ':method': 'POST',
        ':path': path,
        ':authority': host,
        'content-type': 'application/json; charset=utf-8',
        'apns-topic': req.topic,
        'apns-push-type': req.pushType,
        'apns-priority': '10',
      };
      if (config.expiration !== undefined) headers['apns-expiration'] = String(Math.floor((clock() + config.expiration) / 1000));
      const token = tokenAuth ? currentToken() : undefined;
      if (token) headers.authorization = `bearer ${token}`;
      return client.request(headers, req.body, signal).then((a): Outcome | Promise<Outcome> => {
        if ('error' in a) {
          done({ kind: 'failure', reason: 'RequestError' });
          return { kind: 'retryable', reason: a.deadline ? 'deadline' : 'network_error', detail: `APNs: ${a.error}` };
        }
        if (a.status === 200) {
          done(SUCCESS);
          return DELIVERED;
        }
        const reason = reasonOf(a.body);
        if (reason === 'ExpiredProviderToken' && token) {
          if (renewed || signal.aborted) {
            done({ kind: 'failure', reason });
            return { kind: 'retryable', reason: 'provider_token', detail: 'APNs refused a freshly renewed provider token (ExpiredProviderToken): is the clock right?' };
          }
          // Renewed at once (only if nobody did already), and the push tried again with it.
          if (jwt?.token === token) jwt = undefined;
          log.info('APNs says the provider token expired; renewing it');
          return post(true);
        }
        if (reason === 'Shutdown') client.retire();
        const c = classify(a.status, reason);
        const detail = `APNs answered ${a.status}${reason ? ` ${reason}` : ''}`;
        if (c.kind === 'dead-token') {
          done({ kind: 'removal', reason });
          log.info({ device: shortToken(n.device_id), ack_id: n.ack_id, reason }, 'APNs says the token is dead');
          return { kind: 'dead-token', reason: c.reason, detail };
        }
        done({ kind: 'failure', reason: reason || String(a.status) });
        return { kind: c.kind, reason: c.reason, detail };
      });
    };
    return post(false);
  }

  return {
    name,
    type: 'apns',
    perDevice: true,
    reasons: [
      ['delivered', ''],
      ...DEAD_TOKEN_REASONS.map((r) => ['dead-token', r] as const),
      ['retryable', 'too_many_requests'],
      ['retryable', 'server_error'],
      ['retryable', 'network_error'],
      ['retryable', 'deadline'],
      ['retryable', 'provider_token'],
      ['permanent', 'rejected'],
      ['permanent', 'unexpected_status'],
    ],

    async start() {
      const read = (file: string, what: string) => {
        try {
          return readFileSync(file);
        } catch (err) {
          throw new Error(`sink ${name}: cannot read the ${what} ${file}: ${(err as Error).message}`);
        }
      };
      if (tokenAuth) {
        try {
          signingKey = createPrivateKey(read(config.keyFile as string, 'APNs auth key'));
        } catch (err) {
          throw new Error(`sink ${name}: ${config.keyFile} is not a PEM private key (.p8): ${(err as Error).message}`);
        }
        if (signingKey.asymmetricKeyType !== 'ec') throw new Error(`sink ${name}: ${config.keyFile} is not an EC (P-256) key`);
        currentToken();
      } else {
        const cert = read(config.cert as string, 'APNs certificate');
        clientTls = { cert, key: config.key ? read(config.key, 'APNs certificate key') : cert, ...(config.passphrase !== undefined ? { passphrase: config.passphrase } : {}) };
      }
      apple = createH2Client({ host, label: 'APNs', log, tls: clientTls });
      // Connect now so a wrong host, proxy or certificate shows at start; a failure is logged
      // and the first push tries again (Apple being away is not a reason not to start).
      await apple.connect().then(
        () => log.info({ host, auth: tokenAuth ? 'token' : 'certificate' }, 'APNs connected'),
        (err: Error) => log.warn({ host, err: err.message }, 'APNs not reachable yet; pushes will try again'),
      );
    },

    state(): SinkState {
      if (!signingKey && !clientTls) return { ready: false, state: 'not started' };
      if (apple?.connected()) return { ready: true, state: 'connected' };
      // Not "down": the next push reconnects, and the outbox must keep calling send().
      const lastError = apple?.lastError();
      return { ready: true, state: 'idle', ...(lastError ? { detail: lastError } : {}) };
    },

    send(n: PushNotification, signal: AbortSignal): Promise<Outcome> {
      if (!apple) return Promise.resolve({ kind: 'retryable', reason: 'network_error', detail: 'APNs sink not started' });
      return deliver(apple, n, signal);
    },

    async close() {
      await apple?.close();
    },
  };
};

export default defineSink({ type: 'apns', schema, create: createApnsSink });
