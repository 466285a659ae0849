// FCM sink: the data message the official push proxy sends (sinks/proxy-payload.ts), to FCM's
// HTTP v1 API (`POST /v1/projects/{project}/messages:send`), to the notification's own device
// token (`device_id`, which keeps its inner `:`, contract §2.1). A per-device sink: FCM's
// UNREGISTERED answer becomes REMOVE for Mattermost.
//
// firebase-admin, from the sink's service-account file, makes the OAuth access token (its
// `cert()` credential: the signed JWT grant to Google's token endpoint, over a keep-alive agent
// whose connections sinks/provider-net.ts opens). The messages go over one HTTP/2 connection
// per sink (sinks/h2-client.ts, as for APNs), one stream per push. Why not firebase-admin's own
// `send()`: on our 2 cores the relay through it did 1 600-2 150 pushes/s at 0.45-0.56 ms of CPU
// each (firebase-admin alone against a local fake: send() 1 600-2 700 msgs/s, sendEach(64)
// 2 250-3 550); over one HTTP/2 connection it does 3 400-4 000 at 0.26-0.30 ms (README, "FCM
// and APNs"). It also lets the outbox own every retry:
// firebase-admin retried a 503 itself for up to ~7 s, past the delivery deadline, with no
// public setting for it.
import { readFileSync } from 'node:fs';
import { Agent, type AgentOptions } from 'node:https';
import type { Duplex } from 'node:stream';
// firebase-admin is loaded when an FCM sink starts, not when the registry loads: a relay
// without one does not pay its start-up time and memory (it loads google-auth-library, gaxios...).
import type { AppOptions } from 'firebase-admin/app';
import { z } from 'zod';
import { shortToken, type PushNotification } from '../src/contract.js';
import { sinkSchema } from '../src/schema.js';
import { createH2Client, type H2Answer, type H2Client } from './h2-client.js';
import { fcmMessage } from './proxy-payload.js';
import { proxyMetrics, type ProxyResult } from './proxy-metrics.js';
import { dialProvider, type DialOptions } from './provider-net.js';
import { retryAfter } from './retry-after.js';
import { defineSink, type Outcome, type OutcomeKind, type SinkFactory, type SinkState } from './types.js';

export const FCM_HOST = 'fcm.googleapis.com';

const schema = sinkSchema('fcm', {
  /** A Firebase service-account key file (JSON), as PP's `ServiceFileLocation`. */
  serviceAccount: z.string().min(1),
  /** Defaults to the service account's `project_id`. */
  projectId: z.string().min(1).optional(),
});
export type FcmSinkConfig = z.output<typeof schema>;

/**
 * How FCM's answers map to outcomes. FCM v1 says what went wrong in its error body: a
 * google.rpc.Status whose FcmError detail carries the `errorCode`
 * (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode); the row is found by
 * that code, else by the status. PP's mapping is contract §5.3; `pp` is PP's metric reason.
 *
 * - UNREGISTERED (404): the app was uninstalled or the token expired: dead, REMOVE.
 * - SENDER_ID_MISMATCH (403): the token belongs to another Firebase project: dead for this
 *   sink, REMOVE. A bare PERMISSION_DENIED (a service account without the right to send) has
 *   no such code, and must never REMOVE: every phone would be dropped for a fixable IAM problem.
 * - INVALID_ARGUMENT (400): this message or token is malformed: FAIL, never REMOVE (a bad
 *   payload says nothing about the phone).
 * - UNAVAILABLE (503), INTERNAL (500), QUOTA_EXCEEDED (429): FCM asks for a later retry (after
 *   its Retry-After, when it gives one): the outbox's job.
 * - UNAUTHENTICATED (401) without THIRD_PARTY_AUTH_ERROR: our access token; a new one is
 *   fetched and the push tried once more; if that fails too, the outbox retries later.
 * - anything else: permanent with FCM's text, except a 5xx, which is retryable.
 */
type Row = { kind: Exclude<OutcomeKind, 'delivered' | 'skipped'>; reason: string; pp: string };
const FCM_ERRORS: Record<string, Row> = {
  UNREGISTERED: { kind: 'dead-token', reason: 'unregistered', pp: 'UNREGISTERED' },
  SENDER_ID_MISMATCH: { kind: 'dead-token', reason: 'sender_id_mismatch', pp: 'UNREGISTERED' },
  INVALID_ARGUMENT: { kind: 'permanent', reason: 'invalid_argument', pp: 'INVALID_ARGUMENT' },
  UNAVAILABLE: { kind: 'retryable', reason: 'unavailable', pp: 'UNAVAILABLE' },
  INTERNAL: { kind: 'retryable', reason: 'internal', pp: 'INTERNAL' },
  QUOTA_EXCEEDED: { kind: 'retryable', reason: 'quota_exceeded', pp: 'QUOTA_EXCEEDED' },
  RESOURCE_EXHAUSTED: { kind: 'retryable', reason: 'quota_exceeded', pp: 'QUOTA_EXCEEDED' },
  THIRD_PARTY_AUTH_ERROR: { kind: 'permanent', reason: 'third_party_auth_error', pp: 'THIRD_PARTY_AUTH_ERROR' },
  PERMISSION_DENIED: { kind: 'permanent', reason: 'permission_denied', pp: 'unknown transport error' },
  UNAUTHENTICATED: { kind: 'retryable', reason: 'credential_unavailable', pp: 'unknown transport error' },
};
const SERVER_ERROR: Row = { kind: 'retryable', reason: 'server_error', pp: 'unknown transport error' };
const OTHER: Row = { kind: 'permanent', reason: 'fcm_error', pp: 'unknown transport error' };
// No answer at all (refused, reset, TLS), or no access token: FCM or Google may be back in a moment.
const NETWORK: Row = { kind: 'retryable', reason: 'network_error', pp: 'unknown transport error' };
const NO_TOKEN: Row = { kind: 'retryable', reason: 'credential_unavailable', pp: 'unknown transport error' };

/** FCM's error body, read: the FcmError code (or the status) and the message. */
function fcmError(a: H2Answer): { code: string; message: string } {
  try {
    const e = (JSON.parse(a.body) as { error?: { message?: unknown; status?: unknown; details?: Array<{ errorCode?: unknown }> } }).error;
    const detail = e?.details?.find((d) => typeof d?.errorCode === 'string')?.errorCode as string | undefined;
    return { code: detail ?? (typeof e?.status === 'string' ? e.status : ''), message: typeof e?.message === 'string' ? e.message : `HTTP ${a.status}` };
  } catch {
    return { code: '', message: `HTTP ${a.status}${a.body ? `: ${a.body.slice(0, 200)}` : ''}` };
  }
}

type Credential = NonNullable<AppOptions['credential']>;
/** The credential the sinks started after this call use instead of one made from `serviceAccount` (the seam). */
let credentialOverride: Credential | undefined;

/**
 * Replaces the credential made from `serviceAccount` (firebase-admin's `Credential`: any object
 * with `getAccessToken()`). For an embedding program with its own token source, and for tests
 * whose fake FCM needs no Google OAuth. Undefined: back to the default.
 */
export function useFirebaseCredential(credential: Credential | undefined): void {
  credentialOverride = credential;
}

/**
 * firebase-admin's token requests take a public `httpAgent`: every connection it opens goes
 * through sinks/provider-net.ts, kept alive and reused.
 */
class ProviderAgent extends Agent {
  override createConnection(options: DialOptions, callback: (err: Error | null, socket?: Duplex) => void): Duplex {
    const servername = options.servername || options.host;
    dialProvider({ ...options, servername, ALPNProtocols: ['http/1.1'] }).then(
      (socket) => callback(null, socket),
      (err: Error) => callback(err),
    );
    // node:http's Agent waits for the callback when createConnection returns nothing.
    return undefined as unknown as Duplex;
  }
}

const AGENT_OPTIONS: AgentOptions = { keepAlive: true, keepAliveMsecs: 30_000, maxFreeSockets: 256, scheduling: 'lifo', timeout: 120_000 };

const DELIVERED: Outcome = { kind: 'delivered' };
const SUCCESS: ProxyResult = { kind: 'success' };
/** An access token is renewed this long before Google says it expires (they last an hour). */
const TOKEN_MARGIN_MS = 5 * 60_000;
/** A token request that hangs must not hold every push behind it for good. */
const TOKEN_TIMEOUT_MS = 10_000;

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} within ${ms / 1000} s`)), ms);
    timer.unref();
  });
  return Promise.race([p, expired]).finally(() => clearTimeout(timer));
}

const createFcmSink: SinkFactory<FcmSinkConfig> = (name, config, { logger: log, metrics }) => {
  const official = proxyMetrics(metrics, 'android');
  let fcm: H2Client | undefined;
  let credential: Credential | undefined;
  let agent: ProviderAgent | undefined;
  let path = '';
  let token: { value: string; renewAt: number } | undefined;
  let renewing: Promise<string> | undefined;
  let lastError: string | undefined;

  /** The cached access token, or the promise of a new one (one request at a time to Google, bounded in time). */
  function accessToken(): string | Promise<string> {
    if (token && Date.now() < token.renewAt) return token.value;
    renewing ??= withTimeout((credential as Credential).getAccessToken(), TOKEN_TIMEOUT_MS, 'no access token from Google').then(
      (t) => {
        const lifetime = Math.max(0, Number(t.expires_in) * 1000);
        token = { value: t.access_token, renewAt: Date.now() + Math.max(lifetime - TOKEN_MARGIN_MS, lifetime / 2) };
        renewing = undefined;
        log.debug('FCM access token renewed');
        return t.access_token;
      },
      (err: Error) => {
        renewing = undefined;
        throw err;
      },
    );
    return renewing;
  }

  function failure(row: Row, text: string, n: PushNotification, done: (r: ProxyResult) => void, retryAfterMs?: number): Outcome {
    if (row.kind === 'dead-token') {
      done({ kind: 'removal', reason: row.pp });
      log.info({ device: shortToken(n.device_id), ack_id: n.ack_id, reason: row.reason }, 'FCM says the token is dead');
      return { kind: 'dead-token', reason: row.reason, detail: text };
    }
    done({ kind: 'failure', reason: row.pp });
    if (row.kind === 'retryable') {
      lastError = text;
      return { kind: 'retryable', reason: row.reason, detail: text, ...(retryAfterMs !== undefined ? { retryAfterMs } : {}) };
    }
    return { kind: 'permanent', reason: row.reason, detail: text };
  }

  function post(client: H2Client, bearer: string, body: string, n: PushNotification, signal: AbortSignal, done: (r: ProxyResult) => void, renewed: boolean): Promise<Outcome> {
    const headers = { ':method': 'POST', ':path': path, ':authority': FCM_HOST, 'content-type': 'application/json; charset=UTF-8', authorization: `Bearer ${bearer}` };
    return client.request(headers, body, signal).then((a): Outcome | Promise<Outcome> => {
      if ('error' in a) return failure(a.deadline ? { ...NETWORK, reason: 'deadline' } : NETWORK, `FCM: ${a.error}`, n, done);
      if (a.status === 200) {
        done(SUCCESS);
        lastError = undefined;
        return DELIVERED;
      }
      const e = fcmError(a);
      if (e.code === 'UNAUTHENTICATED' && !renewed && !signal.aborted) {
        // Google no longer takes our token (revoked, or a clock step): a new one, and once more.
        if (token?.value === bearer) token = undefined;
        log.info('FCM refused the access token; renewing it');
        return withToken(client, body, n, signal, done, true);
      }
      const row = FCM_ERRORS[e.code] ?? (a.status >= 500 ? SERVER_ERROR : OTHER);
      return failure(row, `FCM: ${e.message}`, n, done, row.kind === 'retryable' ? retryAfter(a.headers['retry-after']) : undefined);
    });
  }

  function withToken(client: H2Client, body: string, n: PushNotification, signal: AbortSignal, done: (r: ProxyResult) => void, renewed: boolean): Promise<Outcome> {
    const t = accessToken();
    if (typeof t === 'string') return post(client, t, body, n, signal, done, renewed);
    return t.then(
      (bearer) => post(client, bearer, body, n, signal, done, renewed),
      (err: Error) => failure(NO_TOKEN, `FCM: cannot get an access token: ${err.message}`, n, done),
    );
  }

  return {
    name,
    type: 'fcm',
    perDevice: true,
    reasons: [
      ['delivered', ''],
      ...[...Object.values(FCM_ERRORS), SERVER_ERROR, OTHER, NETWORK, NO_TOKEN].map((r) => [r.kind, r.reason] as const),
      ['retryable', 'deadline'],
    ],

    async start() {
      let account: { project_id?: unknown };
      try {
        account = JSON.parse(readFileSync(config.serviceAccount, 'utf8')) as { project_id?: unknown };
      } catch (err) {
        throw new Error(`sink ${name}: cannot read the service account ${config.serviceAccount}: ${(err as Error).message}`);
      }
      const projectId = config.projectId ?? (typeof account.project_id === 'string' ? account.project_id : undefined);
      if (!projectId) throw new Error(`sink ${name}: no projectId, and the service account names no project_id`);
      agent = new ProviderAgent(AGENT_OPTIONS);
      credential = credentialOverride;
      if (!credential) {
        const { cert } = await import('firebase-admin/app');
        try {
          credential = cert(config.serviceAccount, agent);
        } catch (err) {
          throw new Error(`sink ${name}: ${config.serviceAccount} is not a usable service-account key: ${(err as Error).message}`);
        }
      }
      path = `/v1/projects/${encodeURIComponent(projectId)}/messages:send`;
      fcm = createH2Client({ host: FCM_HOST, label: 'FCM', log });
      // A token and a connection now, so a wrong key, host or proxy shows at start; a failure
      // is logged and the first push tries again (Google being away is not a reason not to start).
      await Promise.all([accessToken(), fcm.connect()]).then(
        () => log.info({ projectId }, 'FCM sink ready'),
        (err: Error) => log.warn({ projectId, err: err.message }, 'FCM not reachable yet; pushes will try again'),
      );
    },

    state(): SinkState {
      if (!fcm) return { ready: false, state: 'not started' };
      // FCM is reached per request; a failing FCM shows in the outcomes, not as "down".
      const detail = lastError ?? fcm.lastError();
      return { ready: true, state: fcm.connected() ? 'connected' : 'idle', ...(detail ? { detail: `last retryable error: ${detail}` } : {}) };
    },

    send(n: PushNotification, signal: AbortSignal): Promise<Outcome> {
      const done = official.start(n, '');
      if (!fcm) return Promise.resolve(failure(NETWORK, 'FCM sink not started', n, done));
      return withToken(fcm, JSON.stringify({ message: fcmMessage(n) }), n, signal, done, false);
    },

    async close() {
      await fcm?.close();
      fcm = undefined;
      agent?.destroy();
    },
  };
};

export default defineSink({ type: 'fcm', schema, create: createFcmSink });
