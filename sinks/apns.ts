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
// One HTTP/2 session per sink, opened through sinks/provider-net.ts (HTTPS_PROXY as a CONNECT
// tunnel, NODE_EXTRA_CA_CERTS); a GOAWAY or an error retires it and the next send opens a new
// one. Streams stay within the server's SETTINGS_MAX_CONCURRENT_STREAMS (Apple starts a
// token-auth connection low and raises it once the first token is accepted).
import { createPrivateKey, sign, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { connect as http2Connect, constants as h2, type ClientHttp2Session, type IncomingHttpHeaders } from 'node:http2';
import { z } from 'zod';
import { shortToken, type PushNotification } from '../src/contract.js';
import { duration, flag, sinkSchema } from '../src/schema.js';
import { apnsRequest } from './proxy-payload.js';
import { proxyMetrics, type ProxyResult } from './proxy-metrics.js';
import { dialProvider } from './provider-net.js';
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
/** A stream Apple never answers is given up after this (the relay's deadline has long passed). */
const STREAM_TIMEOUT_MS = 30_000;
const PING_INTERVAL_MS = 60_000;

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

const DELIVERED: Outcome = { kind: 'delivered' };
const SUCCESS: ProxyResult = { kind: 'success' };

type Slot = { session: ClientHttp2Session; release(): void };

const createApnsSink: SinkFactory<ApnsSinkConfig> = (name, config, { logger: log, metrics }) => {
  const official = proxyMetrics(metrics, 'apple');
  const host = config.production ? APNS_PRODUCTION : APNS_SANDBOX;
  const tokenAuth = Boolean(config.keyFile && config.keyId && config.teamId);
  let signingKey: KeyObject | undefined;
  let clientTls: { cert: Buffer; key: Buffer; passphrase?: string } | undefined;
  let jwt: { token: string; issuedAt: number } | undefined;

  let session: ClientHttp2Session | undefined;
  let connecting: Promise<ClientHttp2Session> | undefined;
  /** Streams open per session: a retired session's last streams do not count against the new one's limit. */
  const activeOn = new WeakMap<ClientHttp2Session, number>();
  const active = (s: ClientHttp2Session) => activeOn.get(s) ?? 0;
  const waiting: Array<() => void> = [];
  let lastError: string | undefined;
  let closed = false;
  let ping: NodeJS.Timeout | undefined;

  function currentToken(): string {
    const now = clock();
    // Also renewed when the clock went back (an NTP step): Apple refuses a token from the future.
    if (!jwt || now - jwt.issuedAt >= TOKEN_LIFETIME_MS || now < jwt.issuedAt) {
      jwt = { token: providerToken(signingKey as KeyObject, config.keyId as string, config.teamId as string, now), issuedAt: now };
      log.debug('APNs provider token renewed');
    }
    return jwt.token;
  }

  function open(): Promise<ClientHttp2Session> {
    connecting ??= dialProvider({ host, port: 443, servername: host, ALPNProtocols: ['h2'], ...clientTls })
      .then((socket) => {
        const s = http2Connect(`https://${host}`, { createConnection: () => socket, settings: { enablePush: false } });
        const retire = (why: string) => {
          if (session === s) session = undefined;
          if (why) lastError = why;
          // Senders waiting for a slot on this session get one on the next.
          for (const wake of waiting.splice(0)) wake();
        };
        s.on('goaway', (code) => {
          log.info({ code }, 'APNs sent GOAWAY; the next push opens a new connection');
          retire('');
        });
        s.on('error', (err) => {
          log.warn({ err: err.message }, 'APNs connection error; the next push reconnects');
          retire(err.message);
        });
        s.on('close', () => retire(''));
        // Apple raises the stream limit once it trusts the connection: let waiters in.
        s.on('remoteSettings', () => {
          while (waiting.length && active(s) < streamLimit(s)) waiting.shift()?.();
        });
        return new Promise<ClientHttp2Session>((resolve, reject) => {
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
      })
      .then(
        (s) => {
          connecting = undefined;
          if (closed) {
            s.close();
            throw new Error('APNs sink closed');
          }
          session = s;
          lastError = undefined;
          return s;
        },
        (err: Error) => {
          connecting = undefined;
          lastError = `cannot connect to ${host}: ${err.message}`;
          throw new Error(lastError);
        },
      );
    return connecting;
  }

  const streamLimit = (s: ClientHttp2Session) => s.remoteSettings.maxConcurrentStreams ?? 100;
  const usable = (s: ClientHttp2Session | undefined): s is ClientHttp2Session => !!s && !s.closed && !s.destroyed;

  /** A stream slot on a live session, or undefined once `signal` aborts first. */
  async function acquire(signal: AbortSignal): Promise<Slot | undefined> {
    for (let tries = 0; tries < 1000; tries++) {
      if (signal.aborted) return undefined;
      const s = usable(session) ? session : await open();
      if (usable(s) && active(s) < streamLimit(s)) {
        activeOn.set(s, active(s) + 1);
        let released = false;
        return {
          session: s,
          release() {
            if (released) return;
            released = true;
            activeOn.set(s, active(s) - 1);
            if (usable(session) && active(session) < streamLimit(session)) waiting.shift()?.();
          },
        };
      }
      await new Promise<void>((resolve) => {
        const wake = () => {
          signal.removeEventListener('abort', wake);
          const i = waiting.indexOf(wake);
          if (i >= 0) waiting.splice(i, 1);
          resolve();
        };
        waiting.push(wake);
        signal.addEventListener('abort', wake, { once: true });
      });
    }
    return undefined;
  }

  /** `refused`: the server never processed the stream (RST_STREAM REFUSED_STREAM, or beyond a GOAWAY's last stream): safe to send again. */
  type Answer = { status: number; reason: string; apnsId?: string } | { error: string; refused?: boolean };

  function post(slot: Slot, headers: Record<string, string>, body: string): Promise<Answer> {
    return new Promise((resolve) => {
      let settled = false;
      const done = (a: Answer) => {
        if (settled) return;
        settled = true;
        slot.release();
        resolve(a);
      };
      let stream;
      try {
        stream = slot.session.request(headers);
      } catch (err) {
        return done({ error: (err as Error).message });
      }
      stream.setTimeout(STREAM_TIMEOUT_MS, () => stream.close(h2.NGHTTP2_CANCEL));
      let status = 0;
      let apnsId: string | undefined;
      const chunks: Buffer[] = [];
      stream.on('response', (h: IncomingHttpHeaders) => {
        status = Number(h[':status']);
        apnsId = h['apns-id'] as string | undefined;
      });
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        let reason = '';
        if (status !== 200) {
          try {
            reason = String((JSON.parse(Buffer.concat(chunks).toString('utf8')) as { reason?: unknown }).reason ?? '');
          } catch {
            reason = '';
          }
        }
        done(status ? { status, reason, apnsId } : { error: 'stream ended without a response' });
      });
      stream.on('error', (err) => done({ error: err.message, refused: !status && stream.rstCode === h2.NGHTTP2_REFUSED_STREAM }));
      stream.on('close', () =>
        done(status ? { error: 'stream closed early' } : { error: `stream closed (code ${stream.rstCode})`, refused: stream.rstCode === h2.NGHTTP2_REFUSED_STREAM }),
      );
      stream.end(body);
    });
  }

  async function deliver(n: PushNotification, signal: AbortSignal): Promise<Outcome> {
    const req = apnsRequest(n, config.topic);
    const done = official.start(n, req.voip ? 'voip' : '');
    // Apple's tokens are hex; anything else is sent as is when a path may hold it (RFC 3986 pchar), else encoded.
    const path = `/3/device/${/^[\w.~:@!$&'()*+,;=-]+$/.test(n.device_id) ? n.device_id : encodeURIComponent(n.device_id)}`;
    for (let attempt = 0; attempt < 2; attempt++) {
      let slot: Slot | undefined;
      try {
        slot = await acquire(signal);
      } catch (err) {
        done({ kind: 'failure', reason: 'RequestError' });
        return { kind: 'retryable', reason: 'network_error', detail: `APNs: ${(err as Error).message}` };
      }
      if (!slot) {
        done({ kind: 'failure', reason: 'RequestError' });
        return { kind: 'retryable', reason: 'deadline', detail: 'APNs: no stream free before the deadline' };
      }
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
      const a = await post(slot, headers, req.body);
      if ('error' in a) {
        // Apple never saw it (RFC 9113 §8.7): straight onto a new session, once.
        if (a.refused && attempt === 0 && !signal.aborted) continue;
        done({ kind: 'failure', reason: 'RequestError' });
        lastError = a.error;
        return { kind: 'retryable', reason: 'network_error', detail: `APNs: ${a.error}` };
      }
      if (a.status === 200) {
        done(SUCCESS);
        return DELIVERED;
      }
      if (a.reason === 'ExpiredProviderToken' && token && attempt === 0 && !signal.aborted) {
        // Renewed at once (only if nobody did already), and the push tried again with it.
        if (jwt?.token === token) jwt = undefined;
        log.info('APNs says the provider token expired; renewing it');
        continue;
      }
      if (a.reason === 'Shutdown' && usable(slot.session)) slot.session.close();
      const c = classify(a.status, a.reason);
      const detail = `APNs answered ${a.status}${a.reason ? ` ${a.reason}` : ''}`;
      if (c.kind === 'dead-token') {
        done({ kind: 'removal', reason: a.reason });
        log.info({ device: shortToken(n.device_id), ack_id: n.ack_id, reason: a.reason }, 'APNs says the token is dead');
        return { kind: 'dead-token', reason: c.reason, detail };
      }
      done({ kind: 'failure', reason: a.reason || String(a.status) });
      return { kind: c.kind, reason: c.reason, detail };
    }
    done({ kind: 'failure', reason: 'ExpiredProviderToken' });
    return { kind: 'retryable', reason: 'provider_token', detail: 'APNs refused a freshly renewed provider token (ExpiredProviderToken): is the clock right?' };
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
      ping = setInterval(() => {
        // Apple: keep the connection open; an idle one may be closed. A PING shows whether it lives.
        if (usable(session)) session.ping(() => {});
      }, PING_INTERVAL_MS).unref();
      // Connect now so a wrong host, proxy or certificate shows at start; a failure is logged
      // and the first push tries again (Apple being away is not a reason not to start).
      await open().then(
        () => log.info({ host, auth: tokenAuth ? 'token' : 'certificate' }, 'APNs connected'),
        (err: Error) => log.warn({ host, err: err.message }, 'APNs not reachable yet; pushes will try again'),
      );
    },

    state(): SinkState {
      if (!signingKey && !clientTls) return { ready: false, state: 'not started' };
      if (usable(session)) return { ready: true, state: 'connected' };
      // Not "down": the next push reconnects, and the outbox must keep calling send().
      return { ready: true, state: 'idle', ...(lastError ? { detail: lastError } : {}) };
    },

    send(n: PushNotification, signal: AbortSignal): Promise<Outcome> {
      return deliver(n, signal);
    },

    async close() {
      closed = true;
      if (ping) clearInterval(ping);
      for (const wake of waiting.splice(0)) wake();
      const s = session;
      session = undefined;
      if (s && !s.destroyed) {
        await new Promise<void>((resolve) => {
          const t = setTimeout(() => {
            s.destroy();
            resolve();
          }, 2000);
          s.close(() => {
            clearTimeout(t);
            resolve();
          });
        });
      }
    },
  };
};

export default defineSink({ type: 'apns', schema, create: createApnsSink });
