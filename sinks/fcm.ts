// FCM sink: the data message the official push proxy sends (sinks/proxy-payload.ts), through
// firebase-admin's HTTP v1 client, to the notification's own device token (`device_id`, which
// keeps its inner `:`, contract §2.1). A per-device sink: FCM's UNREGISTERED answer becomes
// REMOVE for Mattermost.
//
// One Firebase app per sink, named after the sink, created at start from the service-account
// file; its requests go over one pooled keep-alive agent whose connections are opened by
// sinks/provider-net.ts (HTTPS_PROXY, NODE_EXTRA_CA_CERTS). `send()` per notification:
// measured against `sendEach()` in bench/providers.mjs (README, "FCM and APNs").
import { readFileSync } from 'node:fs';
import { Agent, type AgentOptions } from 'node:https';
import type { Duplex } from 'node:stream';
// firebase-admin is loaded when an FCM sink starts, not when the registry loads: a relay
// without one does not pay its start-up time and memory (it loads google-auth-library, gaxios...).
import type { App, AppOptions } from 'firebase-admin/app';
import type { Messaging } from 'firebase-admin/messaging';
import { z } from 'zod';
import { shortToken, type PushNotification } from '../src/contract.js';
import { sinkSchema } from '../src/schema.js';
import { fcmMessage } from './proxy-payload.js';
import { proxyMetrics, type ProxyResult } from './proxy-metrics.js';
import { dialProvider, type DialOptions } from './provider-net.js';
import { defineSink, type Outcome, type OutcomeKind, type SinkFactory, type SinkState } from './types.js';

const schema = sinkSchema('fcm', {
  /** A Firebase service-account key file (JSON), as PP's `ServiceFileLocation`. */
  serviceAccount: z.string().min(1),
  /** Defaults to the service account's `project_id`. */
  projectId: z.string().min(1).optional(),
});
export type FcmSinkConfig = z.output<typeof schema>;

/**
 * How firebase-admin's errors map to outcomes (FCM v1 error codes:
 * https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode; PP's mapping, contract
 * §5.3). firebase-admin turns the server's `errorCode` into `messaging/<code>`
 * (lib/utils/error.js, MESSAGING_SERVER_TO_CLIENT_CODE). `pp` is PP's metric reason.
 *
 * - UNREGISTERED (404): the app was uninstalled or the token expired: dead, REMOVE.
 * - SENDER_ID_MISMATCH (403): the token belongs to another Firebase project: dead for this
 *   sink, REMOVE. firebase-admin gives a bare PERMISSION_DENIED (a service account without the
 *   right to send) the same code, and that must never REMOVE: every phone would be dropped
 *   for a fixable IAM problem. So the row also requires FCM's text "SenderId mismatch";
 *   anything else with that code is a permanent failure.
 * - INVALID_ARGUMENT (400): this message or token is malformed: FAIL, never REMOVE (a bad
 *   payload says nothing about the phone).
 * - UNAVAILABLE (503, after firebase-admin's own retries), INTERNAL (500), QUOTA_EXCEEDED
 *   (429): FCM asks for a later retry: the outbox's job.
 * - anything else: permanent, with firebase-admin's text.
 */
const FCM_ERRORS: Record<string, { kind: Exclude<OutcomeKind, 'delivered' | 'skipped'>; reason: string; pp: string }> = {
  'messaging/registration-token-not-registered': { kind: 'dead-token', reason: 'unregistered', pp: 'UNREGISTERED' },
  'messaging/mismatched-credential': { kind: 'dead-token', reason: 'sender_id_mismatch', pp: 'UNREGISTERED' },
  'messaging/invalid-argument': { kind: 'permanent', reason: 'invalid_argument', pp: 'INVALID_ARGUMENT' },
  'messaging/server-unavailable': { kind: 'retryable', reason: 'unavailable', pp: 'UNAVAILABLE' },
  'messaging/internal-error': { kind: 'retryable', reason: 'internal', pp: 'INTERNAL' },
  'messaging/message-rate-exceeded': { kind: 'retryable', reason: 'quota_exceeded', pp: 'QUOTA_EXCEEDED' },
  'messaging/device-message-rate-exceeded': { kind: 'retryable', reason: 'quota_exceeded', pp: 'QUOTA_EXCEEDED' },
  'messaging/third-party-auth-error': { kind: 'permanent', reason: 'third_party_auth_error', pp: 'THIRD_PARTY_AUTH_ERROR' },
  // No answer at all (refused, reset, TLS): FCM may be back in a moment.
  'app/network-error': { kind: 'retryable', reason: 'network_error', pp: 'unknown transport error' },
  // The OAuth token could not be had (Google's token endpoint away, or a revoked key: the
  // log says which); deliveries wait in the outbox until it can.
  'app/invalid-credential': { kind: 'retryable', reason: 'credential_unavailable', pp: 'unknown transport error' },
};
const SENDER_ID_MISMATCH_TEXT = /sender ?id mismatch/i;
const OTHER = { kind: 'permanent', reason: 'fcm_error', pp: 'unknown transport error' } as const;

/** Extra firebase-admin AppOptions for the apps created after this call (the seam: a credential). */
let extraAppOptions: Partial<Pick<AppOptions, 'credential'>> = {};

/**
 * Replaces the credential made from `serviceAccount` (firebase-admin's public `credential`
 * option: any object with `getAccessToken()`). For an embedding program with its own token
 * source, and for tests whose fake FCM needs no Google OAuth. Undefined: back to the default.
 */
export function useFirebaseCredential(credential: AppOptions['credential'] | undefined): void {
  extraAppOptions = credential ? { credential } : {};
}

/**
 * firebase-admin's HTTP/1.1 client takes a public `httpAgent`: every connection it opens goes
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

const createFcmSink: SinkFactory<FcmSinkConfig> = (name, config, { logger: log, metrics }) => {
  const official = proxyMetrics(metrics, 'android');
  let app: App | undefined;
  let messaging: Messaging | undefined;
  let agent: ProviderAgent | undefined;
  let lastError: string | undefined;

  function outcomeOf(err: unknown, n: PushNotification, done: (r: ProxyResult) => void): Outcome {
    const e = err as { code?: string; message?: string };
    const text = `FCM: ${e?.message ?? String(err)}`;
    let row = (e?.code && FCM_ERRORS[e.code]) || OTHER;
    if (e?.code === 'messaging/mismatched-credential' && !SENDER_ID_MISMATCH_TEXT.test(e.message ?? '')) {
      row = { kind: 'permanent', reason: 'permission_denied', pp: 'unknown transport error' };
    }
    if (row.kind === 'dead-token') {
      done({ kind: 'removal', reason: row.pp });
      log.info({ device: shortToken(n.device_id), ack_id: n.ack_id, code: e.code }, 'FCM says the token is dead');
      return { kind: 'dead-token', reason: row.reason, detail: text };
    }
    done({ kind: 'failure', reason: row.pp });
    if (row.kind === 'retryable') {
      lastError = text;
      return { kind: 'retryable', reason: row.reason, detail: text };
    }
    return { kind: 'permanent', reason: row.reason, detail: text };
  }

  return {
    name,
    type: 'fcm',
    perDevice: true,
    reasons: [
      ['delivered', ''],
      ['permanent', OTHER.reason],
      ['permanent', 'permission_denied'],
      ...Object.values(FCM_ERRORS).map((r) => [r.kind, r.reason] as const),
    ],

    async start() {
      let account: { project_id?: unknown };
      try {
        account = JSON.parse(readFileSync(config.serviceAccount, 'utf8')) as { project_id?: unknown };
      } catch (err) {
        throw new Error(`sink ${name}: cannot read the service account ${config.serviceAccount}: ${(err as Error).message}`);
      }
      const projectId = config.projectId ?? (typeof account.project_id === 'string' ? account.project_id : undefined);
      const [{ cert, initializeApp }, { getMessaging }] = await Promise.all([import('firebase-admin/app'), import('firebase-admin/messaging')]);
      agent = new ProviderAgent(AGENT_OPTIONS);
      let credential = extraAppOptions.credential;
      if (!credential) {
        try {
          credential = cert(config.serviceAccount, agent);
        } catch (err) {
          throw new Error(`sink ${name}: ${config.serviceAccount} is not a usable service-account key: ${(err as Error).message}`);
        }
      }
      if (!projectId) throw new Error(`sink ${name}: no projectId, and the service account names no project_id`);
      // One app per sink: the name keeps two FCM sinks (two Firebase projects) apart.
      app = initializeApp({ credential, projectId, httpAgent: agent }, `push-relay:${name}:${process.hrtime.bigint()}`);
      messaging = getMessaging(app);
      log.info({ projectId }, 'FCM sink ready');
    },

    state(): SinkState {
      if (!messaging) return { ready: false, state: 'not started' };
      // FCM is reached per request; a failing FCM shows in the outcomes, not as "down".
      return { ready: true, state: 'ready', ...(lastError ? { detail: `last retryable error: ${lastError}` } : {}) };
    },

    // `signal` is not raced here on purpose: firebase-admin cannot cancel a request, and it
    // retries a 503 itself (4 retries over ~7 s, lib/utils/api-request.js defaultRetryConfig,
    // with no public knob). The caller (src/attempt.ts) answers at the deadline already; by
    // keeping the real promise, a send that succeeds after it is reported as late, and the
    // dispatcher takes its outbox copy back instead of delivering the push twice.
    send(n: PushNotification): Promise<Outcome> {
      const m = messaging;
      if (!m) return Promise.resolve({ kind: 'retryable', reason: 'network_error', detail: 'FCM sink not started' });
      const done = official.start(n, '');
      let sent: Promise<string>;
      try {
        sent = m.send(fcmMessage(n));
      } catch (err) {
        // validateMessage throws synchronously for a message FCM would refuse.
        return Promise.resolve(outcomeOf(err, n, done));
      }
      return sent.then(
        () => {
          done(SUCCESS);
          lastError = undefined;
          return DELIVERED;
        },
        (err: unknown) => outcomeOf(err, n, done),
      );
    },

    async close() {
      if (app) {
        const { deleteApp } = await import('firebase-admin/app');
        await deleteApp(app).catch(() => {});
      }
      app = undefined;
      messaging = undefined;
      agent?.destroy();
    },
  };
};

export default defineSink({ type: 'fcm', schema, create: createFcmSink });
