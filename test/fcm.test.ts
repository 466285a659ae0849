// The FCM sink end to end: Mattermost's POST -> the relay -> HTTP/2 -> a local fake of FCM's
// v1 API (test/helpers/fcm-fake.ts), reached through the sinks' public seams only
// (useProviderConnection: where connections go; useFirebaseCredential: firebase-admin's
// credential object). The last describe runs the real firebase-admin credential through a proxy.
// What is asserted is what the provider receives and what Mattermost is answered.
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, type Server } from 'node:http';
import { connect as netConnect, type AddressInfo, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { useFirebaseCredential } from '../sinks/fcm.js';
import { useProviderConnection } from '../sinks/provider-net.js';
import { fcmError, ok, startFcmFake, type FcmFake, type FcmReply, type FcmRequest } from './helpers/fcm-fake.js';
import { get, post } from './helpers/http.js';
import { loadPayloads, messagePush, REPO_ROOT } from './helpers/payloads.js';
import { spawnRelay, startTestRelay } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';
import { sleep, until } from './helpers/wait.js';

const PROJECT = 'demo-proj';
const GOLDEN = join(REPO_ROOT, 'test', 'fixtures', 'golden', 'fcm');
let fake: FcmFake;
let serviceAccount: string;

/** A service-account key file as Google issues it, with a key made now. */
function writeServiceAccount(): string {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const file = join(tempDir('push-relay-fcm-'), 'firebase.json');
  writeFileSync(
    file,
    JSON.stringify({
      type: 'service_account',
      project_id: PROJECT,
      private_key_id: 'test-key',
      private_key: privateKey.export({ type: 'pkcs8', format: 'pem' }),
      client_email: `push@${PROJECT}.iam.gserviceaccount.com`,
      client_id: '1',
      token_uri: 'https://oauth2.googleapis.com/token',
    }),
  );
  return file;
}

const sendPush = (url: string, body: Record<string, unknown>) => post(`${url}/api/v1/send_push`, JSON.stringify(body));
const ackOf = (r: FcmRequest) => ((r.body as { message: { data: { ack_id: string } } }).message.data.ack_id);

beforeAll(async () => {
  fake = await startFcmFake();
  useProviderConnection(fake.dial);
  useFirebaseCredential({ getAccessToken: async () => ({ access_token: 'fake-access-token', expires_in: 3600 }) });
  serviceAccount = writeServiceAccount();
});

afterAll(async () => {
  useProviderConnection(undefined);
  useFirebaseCredential(undefined);
  await fake?.close();
});

beforeEach(() => {
  fake.respond(undefined);
  fake.sends.length = 0;
});

const fcmSink = (extra: Record<string, unknown> = {}) => ({ android: { type: 'fcm', serviceAccount, ...extra } });

describe('FCM sink: the request body is the one the official proxy sends', () => {
  let url: string;
  beforeAll(async () => {
    // No routes: every sample payload, Android or not, goes to the FCM sink.
    url = (await startTestRelay({ sinks: fcmSink() })).url;
  });

  for (const p of loadPayloads()) {
    it(`${p.name}: FCM receives the reviewed golden body`, async () => {
      const reply = await post(`${url}/api/v1/send_push`, p.text);
      expect(reply.json).toEqual({ status: 'OK' });
      expect(fake.sends).toHaveLength(1);
      const req = fake.sends[0]!;
      expect(req.path).toBe(`/v1/projects/${PROJECT}/messages:send`);
      expect(req.host).toBe('fcm.googleapis.com');
      expect(req.headers.authorization).toBe('Bearer fake-access-token');
      expect(req.httpVersion).toBe('2.0');
      expect(req.body).toEqual(JSON.parse(readFileSync(join(GOLDEN, p.name), 'utf8')));
    });
  }

  it('keeps its connections alive: 30 pushes in a row share one TLS connection', async () => {
    const before = fake.connections();
    for (let i = 0; i < 30; i++) {
      const reply = await sendPush(url, messagePush({ ack_id: `keepalive${String(i).padStart(17, '0')}` }));
      expect(reply.json).toEqual({ status: 'OK' });
    }
    expect(fake.sends).toHaveLength(30);
    expect(fake.connections() - before).toBeLessThanOrEqual(1);
  });

  it("counts in the official proxy's series", async () => {
    fake.respond((r, n) => (ackOf(r) === 'metricsdead000000000000000' ? fcmError(404, 'NOT_FOUND', 'Requested entity was not found.', 'UNREGISTERED') : ok(r, n)));
    await sendPush(url, messagePush({ ack_id: 'metricsok00000000000000000' }));
    await sendPush(url, messagePush({ ack_id: 'metricsdead000000000000000' }));
    const text = (await get(`${url}/metrics`)).text;
    const value = (series: string) => Number(new RegExp(`^${series.replace(/[{}"]/g, '\\$&')} (\\S+)$`, 'm').exec(text)?.[1] ?? NaN);
    expect(value('service_success_total{platform="android",type="message",transport=""}')).toBeGreaterThanOrEqual(1);
    expect(value('service_success_with_ack_total{platform="android",type="message",transport=""}')).toBeGreaterThanOrEqual(1);
    expect(value('service_removal_total{platform="android",transport="",reason="UNREGISTERED"}')).toBe(1);
    expect(value('service_failure_with_reason_total{platform="android",type="message",transport="",reason="UNREGISTERED"}')).toBe(1);
    expect(value('service_notifications_total{platform="android",type="clear",transport=""}')).toBeGreaterThanOrEqual(1);
    expect(text).toMatch(/^service_fcm_request_duration_seconds_count \d+/m);
    expect(text).toMatch(/^service_notification_duration_seconds_count\{platform="android"\} \d+/m);
  });
});

describe('FCM sink: the error table (contract §5.3), one reply per row', () => {
  let url: string;
  beforeAll(async () => {
    url = (await startTestRelay({ sinks: fcmSink(), routes: [{ match: { platform: 'android_rn' }, sinks: ['android'] }] })).url;
  });

  const rows: Array<[string, FcmReply, { status: string; error?: RegExp }]> = [
    ['UNREGISTERED', fcmError(404, 'NOT_FOUND', 'Requested entity was not found.', 'UNREGISTERED'), { status: 'REMOVE' }],
    ['SENDER_ID_MISMATCH', fcmError(403, 'PERMISSION_DENIED', 'SenderId mismatch', 'SENDER_ID_MISMATCH'), { status: 'REMOVE' }],
    ['PERMISSION_DENIED without an FCM error code (a service account not allowed to send)',
      fcmError(403, 'PERMISSION_DENIED', "Permission 'cloudmessaging.messages.create' denied on resource '//cloudresourcemanager.googleapis.com/projects/demo-proj'"),
      { status: 'FAIL', error: /android: FCM: Permission 'cloudmessaging\.messages\.create' denied/ }],
    // A wrong project id answers so: no phone is dead (the official proxy's Go SDK agrees; Node's
    // firebase-admin would have called it UNREGISTERED, and every token would have been removed).
    ['NOT_FOUND without an FCM error code (a wrong project)', fcmError(404, 'NOT_FOUND', 'Requested entity was not found.'),
      { status: 'FAIL', error: /android: FCM: Requested entity was not found/ }],
    ['INVALID_ARGUMENT', fcmError(400, 'INVALID_ARGUMENT', 'The registration token is not a valid FCM registration token', 'INVALID_ARGUMENT'),
      { status: 'FAIL', error: /android: FCM: The registration token is not a valid FCM registration token/ }],
    ['THIRD_PARTY_AUTH_ERROR', fcmError(401, 'UNAUTHENTICATED', 'Auth error from APNS or Web Push Service', 'THIRD_PARTY_AUTH_ERROR'),
      { status: 'FAIL', error: /Auth error from APNS/ }],
    ['an unknown error code', fcmError(400, 'FAILED_PRECONDITION', 'Something new', 'SOMETHING_NEW'), { status: 'FAIL', error: /android: FCM: Something new/ }],
    // Without an outbox (store: none) a retryable failure can only be reported: FAIL naming it.
    ['UNAVAILABLE',
      { ...fcmError(503, 'UNAVAILABLE', 'The service is currently unavailable.', 'UNAVAILABLE'), headers: { 'retry-after': '120' } },
      { status: 'FAIL', error: /android: FCM: The service is currently unavailable/ }],
    ['INTERNAL', fcmError(500, 'INTERNAL', 'Internal error encountered.', 'INTERNAL'), { status: 'FAIL', error: /Internal error encountered/ }],
    ['QUOTA_EXCEEDED', fcmError(429, 'RESOURCE_EXHAUSTED', 'Quota exceeded for sending messages.', 'QUOTA_EXCEEDED'), { status: 'FAIL', error: /Quota exceeded/ }],
  ];
  for (const [row, reply, want] of rows) {
    it(`answers ${want.status} when FCM says ${row}`, async () => {
      fake.respond(() => reply);
      const got = await sendPush(url, messagePush({ ack_id: `row${row.replace(/\W/g, '').slice(0, 23).padEnd(23, '0').toLowerCase()}` }));
      expect((got.json as { status: string }).status).toBe(want.status);
      if (want.error) expect((got.json as { error: string }).error).toMatch(want.error);
      expect(fake.sends).toHaveLength(1);
    });
  }

});

describe('FCM sink: no connection at all', () => {
  it('answers FAIL, not REMOVE, when FCM cannot be reached', async () => {
    useProviderConnection(() => Promise.reject(Object.assign(new Error('connect ECONNREFUSED 142.250.0.1:443'), { code: 'ECONNREFUSED' })));
    try {
      const { url } = await startTestRelay({ sinks: fcmSink() });
      const got = await sendPush(url, messagePush({ ack_id: 'unreachable0000000000000000' }));
      expect(got.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/ECONNREFUSED/) });
      expect(fake.sends).toHaveLength(0);
    } finally {
      useProviderConnection(fake.dial);
    }
  });
});

describe('FCM sink: retryable answers go to the outbox and are delivered once', () => {
  let url: string;
  beforeAll(async () => {
    url = (
      await startTestRelay({
        store: 'sqlite',
        dataDir: tempDir('push-relay-fcm-data-'),
        delivery: { retryMin: '50ms', retryMax: '200ms', deadline: '3s' },
        sinks: fcmSink(),
      })
    ).url;
  });

  /** First `failures` sends of each ack_id get `reply`, later ones 200; counts 200s per ack_id. */
  function failFirst(failures: number, reply: FcmReply) {
    const seen = new Map<string, number>();
    const delivered = new Map<string, number>();
    fake.respond((r, n) => {
      const ack = ackOf(r);
      const k = (seen.get(ack) ?? 0) + 1;
      seen.set(ack, k);
      if (k <= failures) return reply;
      delivered.set(ack, (delivered.get(ack) ?? 0) + 1);
      return ok(r, n);
    });
    return { seen, delivered };
  }

  for (const [row, reply] of [
    ['INTERNAL', fcmError(500, 'INTERNAL', 'Internal error encountered.', 'INTERNAL')],
    ['QUOTA_EXCEEDED', fcmError(429, 'RESOURCE_EXHAUSTED', 'Quota exceeded for sending messages.', 'QUOTA_EXCEEDED')],
    ['UNAVAILABLE', fcmError(503, 'UNAVAILABLE', 'The service is currently unavailable.', 'UNAVAILABLE')],
  ] as const) {
    it(`queues the push when FCM says ${row}, answers OK, and the outbox delivers it once`, async () => {
      const { seen, delivered } = failFirst(1, reply);
      const ack = `retry${row.toLowerCase().replace(/_/g, '')}`.padEnd(26, '0');
      const got = await sendPush(url, messagePush({ ack_id: ack }));
      expect(got.json).toEqual({ status: 'OK' });
      await until(`the outbox to deliver ${ack}`, () => delivered.get(ack) === 1, { timeoutMs: 5000 });
      await sleep(300);
      expect(seen.get(ack)).toBe(2);
      expect(delivered.get(ack)).toBe(1);
    });
  }

  it("waits as long as FCM's Retry-After asks before trying again", async () => {
    const { seen, delivered } = failFirst(1, { ...fcmError(503, 'UNAVAILABLE', 'The service is currently unavailable.', 'UNAVAILABLE'), headers: { 'retry-after': '1' } });
    const ack = 'retryafter1s00000000000000';
    const got = await sendPush(url, messagePush({ ack_id: ack }));
    expect(got.json).toEqual({ status: 'OK' });
    const asked = fake.sends.at(-1)!.at;
    await until(`the outbox to deliver ${ack}`, () => delivered.get(ack) === 1, { timeoutMs: 5000 });
    const retried = fake.sends.at(-1)!;
    expect(ackOf(retried)).toBe(ack);
    // Not the outbox's 50 ms: FCM's second.
    expect(retried.at - asked).toBeGreaterThanOrEqual(950);
    expect(seen.get(ack)).toBe(2);
  });

  it('delivers once a push whose first two tries get 503: OK at once, then the outbox retries', async () => {
    const { seen, delivered } = failFirst(2, fcmError(503, 'UNAVAILABLE', 'The service is currently unavailable.', 'UNAVAILABLE'));
    const ack = 'retry503then200000000000000'.slice(0, 26);
    const started = Date.now();
    const got = await sendPush(url, messagePush({ ack_id: ack }));
    expect(got.json).toEqual({ status: 'OK' });
    // The reply does not wait for the retries (firebase-admin's own took up to ~7 s).
    expect(Date.now() - started).toBeLessThan(1000);
    await until(`the outbox to deliver ${ack}`, () => delivered.get(ack) === 1, { timeoutMs: 5000 });
    await sleep(300);
    expect(seen.get(ack)).toBe(3);
    expect(delivered.get(ack)).toBe(1);
  });
});

describe('FCM sink: a provider that never answers', () => {
  it('answers FAIL at the delivery deadline, naming it', async () => {
    const { url } = await startTestRelay({ sinks: fcmSink({ deadline: '1s' }) });
    fake.respond(() => new Promise<FcmReply>(() => {}));
    const started = Date.now();
    const got = await sendPush(url, messagePush({ ack_id: 'deadlinenever0000000000000' }));
    const took = Date.now() - started;
    expect(got.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/android: no answer within 1000 ms/) });
    expect(took).toBeGreaterThanOrEqual(950);
    expect(took).toBeLessThan(2000);
  });
});

describe('FCM sink: the access token', () => {
  it('renews the token once FCM refuses it (401 UNAUTHENTICATED) and sends the push again with the new one', async () => {
    let issued = 0;
    useFirebaseCredential({ getAccessToken: async () => ({ access_token: `renewed-token-${++issued}`, expires_in: 3600 }) });
    try {
      const { url } = await startTestRelay({ sinks: fcmSink() });
      expect(issued).toBe(1);
      fake.respond((r, n) => (r.headers.authorization === 'Bearer renewed-token-1' ? fcmError(401, 'UNAUTHENTICATED', 'Request had invalid authentication credentials.') : ok(r, n)));
      const got = await sendPush(url, messagePush({ ack_id: 'tokenrenewal00000000000000' }));
      expect(got.json).toEqual({ status: 'OK' });
      expect(fake.sends.map((r) => r.headers.authorization)).toEqual(['Bearer renewed-token-1', 'Bearer renewed-token-2']);
      // Kept for the next push: no request to Google per push.
      await sendPush(url, messagePush({ ack_id: 'tokenkept00000000000000000' }));
      expect(issued).toBe(2);
      expect(fake.sends.at(-1)!.headers.authorization).toBe('Bearer renewed-token-2');
    } finally {
      useFirebaseCredential({ getAccessToken: async () => ({ access_token: 'fake-access-token', expires_in: 3600 }) });
    }
  });

  it('does not wait for good on a token request that never ends: the relay starts, and the next request gets the token', { timeout: 30_000 }, async () => {
    let calls = 0;
    useFirebaseCredential({
      getAccessToken: () => (++calls === 1 ? new Promise(() => {}) : Promise.resolve({ access_token: 'after-the-hang', expires_in: 3600 })),
    });
    try {
      const started = Date.now();
      const { url } = await startTestRelay({ sinks: fcmSink() });
      // Start gave up on the first request after 10 s (it logs that FCM is not reachable yet).
      expect(Date.now() - started).toBeGreaterThanOrEqual(9_500);
      expect(Date.now() - started).toBeLessThan(20_000);
      const got = await sendPush(url, messagePush({ ack_id: 'tokenafterhang000000000000' }));
      expect(got.json).toEqual({ status: 'OK' });
      expect(fake.sends.at(-1)!.headers.authorization).toBe('Bearer after-the-hang');
      expect(calls).toBe(2);
    } finally {
      useFirebaseCredential({ getAccessToken: async () => ({ access_token: 'fake-access-token', expires_in: 3600 }) });
    }
  });

  it('answers FAIL naming the credential when no token can be had (store: none)', async () => {
    useFirebaseCredential({ getAccessToken: () => Promise.reject(new Error('invalid_grant: account not found')) });
    try {
      const { url } = await startTestRelay({ sinks: fcmSink() });
      const got = await sendPush(url, messagePush({ ack_id: 'tokenmissing00000000000000' }));
      expect(got.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/android: FCM: cannot get an access token: invalid_grant: account not found/) });
      expect(fake.sends).toHaveLength(0);
    } finally {
      useFirebaseCredential({ getAccessToken: async () => ({ access_token: 'fake-access-token', expires_in: 3600 }) });
    }
  });
});

describe('FCM sink: configuration', () => {
  it('refuses to start with a service-account file it cannot read, naming the file', async () => {
    await expect(startTestRelay({ sinks: fcmSink({ serviceAccount: '/nonexistent/firebase.json' }) })).rejects.toThrow(/\/nonexistent\/firebase\.json/);
  });
});

describe('FCM sink as a user runs it: a real service account, through HTTPS_PROXY, trusting NODE_EXTRA_CA_CERTS', () => {
  let proxy: Server;
  const tunnels: string[] = [];
  beforeAll(async () => {
    // A CONNECT proxy that sends every tunnel to the fake (it serves Google's token endpoint too).
    proxy = createHttpServer((_req, res) => res.writeHead(405).end());
    proxy.on('connect', (req, client: Socket, head: Buffer) => {
      tunnels.push(req.url ?? '');
      const upstream = netConnect(fake.port, '127.0.0.1', () => {
        client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
        upstream.write(head);
        upstream.pipe(client).pipe(upstream);
      });
      for (const s of [client, upstream]) s.on('error', () => {});
    });
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  });
  afterAll(() => {
    proxy.closeAllConnections();
    proxy.close();
  });

  it('gets an OAuth token from Google and posts to fcm.googleapis.com, both through the tunnel', async () => {
    const relay = await spawnRelay({
      config: { store: 'none', sinks: fcmSink(), routes: [{ match: { platform: 'android_rn' }, sinks: ['android'] }] },
      env: { HTTPS_PROXY: `http://127.0.0.1:${(proxy.address() as AddressInfo).port}`, NO_PROXY: '', NODE_EXTRA_CA_CERTS: fake.tls.certFile },
    });
    try {
      const got = await sendPush(relay.url, messagePush({ ack_id: 'throughproxy00000000000000' }));
      expect(got.json).toEqual({ status: 'OK' });
      expect(tunnels).toContain('oauth2.googleapis.com:443');
      expect(tunnels).toContain('fcm.googleapis.com:443');
      expect(fake.tokens.length).toBeGreaterThanOrEqual(1);
      expect(String(fake.tokens[0]!.body)).toMatch(/grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer/);
      expect(fake.sends.at(-1)!.headers.authorization).toMatch(/^Bearer fake-access-token-\d+$/);
    } finally {
      await relay.stop();
    }
  });
});
