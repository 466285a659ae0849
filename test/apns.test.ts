// The APNs sink end to end: Mattermost's POST -> the relay -> HTTP/2 -> a local fake of Apple's
// provider API (test/helpers/apns-fake.ts) that verifies the ES256 provider token with a key
// made here, the headers and the body. The seam is the connection only
// (useProviderConnection): host names, TLS verification, HTTP/2 and the token are the sink's own.
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, type Server } from 'node:http';
import { connect as netConnect, type AddressInfo, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { useApnsClock } from '../sinks/apns.js';
import { useProviderConnection } from '../sinks/provider-net.js';
import { startApnsFake, type ApnsFake, type ApnsFakeReply } from './helpers/apns-fake.js';
import { get, post } from './helpers/http.js';
import { loadPayloads, messagePush, payload, REPO_ROOT } from './helpers/payloads.js';
import { spawnRelay, startTestRelay } from './helpers/relay.js';
import { testCertificate } from './helpers/tls.js';
import { tempDir } from './helpers/tmp.js';
import { sleep, until } from './helpers/wait.js';

const GOLDEN = join(REPO_ROOT, 'test', 'fixtures', 'golden', 'apns');
const TOPIC = 'com.example.mattermost';
const KEY_ID = 'ABC123DEFG';
const TEAM_ID = 'TEAM123456';

let publicKey: KeyObject;
let keyFile: string;
let fake: ApnsFake;
/** Added to both clocks (the sink's and the fake's): time passing without waiting for it. */
let offset = 0;
const now = () => Date.now() + offset;

const iosPush = (over: Record<string, unknown> = {}) => messagePush({ ...payload('02').json, ...over });
const sendPush = (url: string, body: Record<string, unknown>) => post(`${url}/api/v1/send_push`, JSON.stringify(body));
const apnsSink = (extra: Record<string, unknown> = {}) => ({
  ios: { type: 'apns', topic: TOPIC, keyFile, keyId: KEY_ID, teamId: TEAM_ID, ...extra },
});

beforeAll(async () => {
  const pair = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  publicKey = pair.publicKey;
  keyFile = join(tempDir('push-relay-apns-'), `AuthKey_${KEY_ID}.p8`);
  writeFileSync(keyFile, pair.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  fake = await startApnsFake({ publicKey, keyId: KEY_ID, teamId: TEAM_ID, now });
  useProviderConnection(fake.dial);
  useApnsClock(now);
});

afterAll(async () => {
  useProviderConnection(undefined);
  useApnsClock(undefined);
  await fake?.close();
});

beforeEach(() => {
  fake.respond(undefined);
  fake.requests.length = 0;
  fake.refused.length = 0;
  offset = 0;
});

describe('APNs sink: the request is the one the official proxy sends', () => {
  let url: string;
  beforeAll(async () => {
    url = (await startTestRelay({ sinks: apnsSink() })).url;
  });

  for (const p of loadPayloads()) {
    it(`${p.name}: Apple receives the reviewed golden path, headers and body, with a valid provider token`, async () => {
      const reply = await post(`${url}/api/v1/send_push`, p.text);
      expect(fake.refused).toEqual([]);
      expect(reply.json).toEqual({ status: 'OK' });
      expect(fake.requests).toHaveLength(1);
      const req = fake.requests[0]!;
      const want = JSON.parse(readFileSync(join(GOLDEN, p.name), 'utf8')) as { path: string; headers: Record<string, string>; body: unknown };
      expect(req.path).toBe(want.path);
      for (const [k, v] of Object.entries(want.headers)) expect(req.headers[k]).toBe(v);
      expect(req.headers['apns-expiration']).toBeUndefined();
      expect(req.headers[':authority']).toBe('api.push.apple.com');
      expect(req.body).toEqual(want.body);
      expect(req.jwt?.claims.iss).toBe(TEAM_ID);
      expect(req.jwt?.header).toEqual({ alg: 'ES256', kid: KEY_ID });
    });
  }

  it('sends a VoIP push to <topic>.voip with apns-push-type voip', async () => {
    const reply = await post(`${url}/api/v1/send_push`, payload('12').text.replace('"cuouirpbpkekw5dj74uf1nxmwa"', '"voiptopic00000000000000000"'));
    expect(reply.json).toEqual({ status: 'OK' });
    expect(fake.requests[0]!.headers['apns-topic']).toBe(`${TOPIC}.voip`);
    expect(fake.requests[0]!.headers['apns-push-type']).toBe('voip');
  });

  it('sends everything over one HTTP/2 connection', async () => {
    const before = fake.sessions();
    for (let i = 0; i < 10; i++) expect((await sendPush(url, iosPush({ ack_id: `onesession${i}`.padEnd(26, '0') }))).json).toEqual({ status: 'OK' });
    expect(fake.sessions()).toBe(before);
  });

  it("counts in the official proxy's series", async () => {
    fake.respond((r) => (r.deviceToken.startsWith('dead') ? { status: 410, reason: 'Unregistered' } : { status: 200 }));
    await post(`${url}/api/v1/send_push`, payload('12').text.replace('"cuouirpbpkekw5dj74uf1nxmwa"', '"metricsvoip000000000000000"'));
    await sendPush(url, iosPush({ ack_id: 'metricsdead000000000000000', device_id: 'deadbeef00' }));
    const text = (await get(`${url}/metrics`)).text;
    const value = (series: string) => Number(new RegExp(`^${series.replace(/[{}"]/g, '\\$&')} (\\S+)$`, 'm').exec(text)?.[1] ?? NaN);
    expect(value('service_success_total{platform="apple",type="message",transport="voip"}')).toBeGreaterThanOrEqual(1);
    expect(value('service_removal_total{platform="apple",transport="",reason="Unregistered"}')).toBe(1);
    expect(text).toMatch(/^service_apns_request_duration_seconds_count \d+/m);
  });
});

describe('APNs sink: the error table, one reply per row', () => {
  let url: string;
  beforeAll(async () => {
    url = (await startTestRelay({ sinks: apnsSink() })).url;
  });

  const rows: Array<[ApnsFakeReply, { status: string; error?: RegExp }]> = [
    [{ status: 400, reason: 'BadDeviceToken' }, { status: 'REMOVE' }],
    [{ status: 410, reason: 'Unregistered' }, { status: 'REMOVE' }],
    [{ status: 400, reason: 'MissingDeviceToken' }, { status: 'REMOVE' }],
    [{ status: 400, reason: 'DeviceTokenNotForTopic' }, { status: 'REMOVE' }],
    [{ status: 410, reason: 'ExpiredToken' }, { status: 'REMOVE' }],
    // Without an outbox (store: none) a retryable answer can only be reported: FAIL naming it.
    [{ status: 429, reason: 'TooManyRequests' }, { status: 'FAIL', error: /ios: APNs answered 429 TooManyRequests/ }],
    [{ status: 500, reason: 'InternalServerError' }, { status: 'FAIL', error: /ios: APNs answered 500 InternalServerError/ }],
    [{ status: 503, reason: 'ServiceUnavailable' }, { status: 'FAIL', error: /ios: APNs answered 503 ServiceUnavailable/ }],
    [{ status: 400, reason: 'BadTopic' }, { status: 'FAIL', error: /ios: APNs answered 400 BadTopic/ }],
    [{ status: 413, reason: 'PayloadTooLarge' }, { status: 'FAIL', error: /ios: APNs answered 413 PayloadTooLarge/ }],
    [{ status: 403, reason: 'InvalidProviderToken' }, { status: 'FAIL', error: /ios: APNs answered 403 InvalidProviderToken/ }],
  ];
  for (const [reply, want] of rows) {
    it(`answers ${want.status} when APNs says ${reply.status} ${reply.reason}`, async () => {
      fake.respond(() => reply);
      const got = await sendPush(url, iosPush({ ack_id: `row${reply.reason}`.toLowerCase().padEnd(26, '0').slice(0, 26) }));
      expect((got.json as { status: string }).status).toBe(want.status);
      if (want.error) expect((got.json as { error: string }).error).toMatch(want.error);
      expect(fake.requests).toHaveLength(1);
    });
  }
});

describe('APNs sink: retryable answers go to the outbox and are delivered once', () => {
  let url: string;
  beforeAll(async () => {
    url = (await startTestRelay({
      store: 'sqlite',
      dataDir: tempDir('push-relay-apns-data-'),
      delivery: { retryMin: '50ms', retryMax: '200ms' },
      sinks: apnsSink(),
    })).url;
  });

  for (const reply of [{ status: 429, reason: 'TooManyRequests' }, { status: 500, reason: 'InternalServerError' }, { status: 503, reason: 'ServiceUnavailable' }]) {
    it(`queues the push when APNs says ${reply.status} ${reply.reason}, answers OK, then delivers it once`, async () => {
      let n = 0;
      fake.respond(() => (++n === 1 ? reply : { status: 200 }));
      const got = await sendPush(url, iosPush({ ack_id: `queued${reply.status}`.padEnd(26, '0') }));
      expect(got.json).toEqual({ status: 'OK' });
      await until('the outbox to deliver it', () => fake.requests.length === 2, { timeoutMs: 5000 });
      await sleep(300);
      expect(fake.requests).toHaveLength(2);
    });
  }
});

describe('APNs sink: the provider token', () => {
  let url: string;
  beforeAll(async () => {
    url = (await startTestRelay({ sinks: apnsSink() })).url;
  });

  it('reuses the token within its lifetime and renews it after 50 minutes, inside Apple\u2019s 60', async () => {
    await sendPush(url, iosPush({ ack_id: 'tokenfirst0000000000000000' }));
    offset = 49 * 60_000;
    await sendPush(url, iosPush({ ack_id: 'tokensecond000000000000000' }));
    offset = 51 * 60_000;
    await sendPush(url, iosPush({ ack_id: 'tokenthird0000000000000000' }));
    expect(fake.refused).toEqual([]);
    const [a, b, c] = fake.requests.map((r) => r.jwt!);
    expect(b!.token).toBe(a!.token);
    expect(c!.token).not.toBe(a!.token);
    expect(c!.claims.iat - a!.claims.iat).toBeGreaterThanOrEqual(51 * 60 - 1);
  });

  it('renews the token at once on ExpiredProviderToken and delivers the push with the new one', async () => {
    let n = 0;
    fake.respond(() => (++n === 1 ? { status: 403, reason: 'ExpiredProviderToken' } : { status: 200 }));
    const got = await sendPush(url, iosPush({ ack_id: 'expiredprovider00000000000' }));
    expect(got.json).toEqual({ status: 'OK' });
    expect(fake.requests).toHaveLength(2);
    expect(fake.requests[1]!.jwt!.token).not.toBe(fake.requests[0]!.jwt!.token);
  });

  it('answers FAIL, not REMOVE, when a renewed token is refused as expired too (a wrong clock)', async () => {
    fake.respond(() => ({ status: 403, reason: 'ExpiredProviderToken' }));
    const got = await sendPush(url, iosPush({ ack_id: 'expiredtwice00000000000000' }));
    expect(got.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/ExpiredProviderToken/) });
    expect(fake.requests).toHaveLength(2);
  });
});

describe('APNs sink: the connection', () => {
  it('opens a new HTTP/2 session after the server sends GOAWAY', async () => {
    const { url } = await startTestRelay({ sinks: apnsSink() });
    expect((await sendPush(url, iosPush({ ack_id: 'beforegoaway00000000000000' }))).json).toEqual({ status: 'OK' });
    const before = fake.sessions();
    fake.goaway();
    await sleep(100);
    expect((await sendPush(url, iosPush({ ack_id: 'aftergoaway000000000000000' }))).json).toEqual({ status: 'OK' });
    expect(fake.sessions()).toBe(before + 1);
    expect(fake.requests.at(-1)!.session).toBe(before + 1);
  });

  it('sends a push again at once, on a new stream, when Apple refused the stream unprocessed (REFUSED_STREAM)', async () => {
    const { url } = await startTestRelay({ sinks: apnsSink() });
    let n = 0;
    fake.respond(() => (++n === 1 ? { status: 0, rst: 7 /* NGHTTP2_REFUSED_STREAM */ } : { status: 200 }));
    expect((await sendPush(url, iosPush({ ack_id: 'refusedstream0000000000000' }))).json).toEqual({ status: 'OK' });
    expect(fake.requests).toHaveLength(2);
  });

  it("keeps its streams within the server's SETTINGS_MAX_CONCURRENT_STREAMS", async () => {
    const narrow = await startApnsFake({ publicKey, keyId: KEY_ID, teamId: TEAM_ID, maxConcurrentStreams: 3 });
    useProviderConnection(narrow.dial);
    try {
      narrow.respond(() => ({ status: 200, delayMs: 40 }));
      const { url } = await startTestRelay({ sinks: apnsSink() });
      const replies = await Promise.all(Array.from({ length: 24 }, (_, i) => sendPush(url, iosPush({ ack_id: `streams${String(i).padStart(19, "0")}` }))));
      for (const r of replies) expect(r.json).toEqual({ status: 'OK' });
      expect(narrow.requests).toHaveLength(24);
      expect(narrow.maxInFlight()).toBe(3);
      expect(narrow.sessions()).toBe(1);
    } finally {
      useProviderConnection(fake.dial);
      await narrow.close();
    }
  });

  it('reaches the sandbox host when production is false', async () => {
    const { url } = await startTestRelay({ sinks: apnsSink({ production: false }) });
    expect((await sendPush(url, iosPush({ ack_id: 'sandbox0000000000000000000' }))).json).toEqual({ status: 'OK' });
    expect(fake.requests[0]!.headers[':authority']).toBe('api.sandbox.push.apple.com');
  });

  it('sets apns-expiration when the expiration option is given', async () => {
    const { url } = await startTestRelay({ sinks: apnsSink({ expiration: '1h' }) });
    const before = Math.floor(Date.now() / 1000);
    await sendPush(url, iosPush({ ack_id: 'expiration0000000000000000' }));
    const exp = Number(fake.requests[0]!.headers['apns-expiration']);
    expect(exp).toBeGreaterThanOrEqual(before + 3600);
    expect(exp).toBeLessThanOrEqual(before + 3602);
  });

  it('answers FAIL, not REMOVE, when Apple cannot be reached', async () => {
    useProviderConnection(() => Promise.reject(new Error('connect ECONNREFUSED 17.188.0.1:443')));
    try {
      const { url } = await startTestRelay({ sinks: apnsSink() });
      const got = await sendPush(url, iosPush({ ack_id: 'unreachable0000000000000000'.slice(0, 26) }));
      expect(got.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/ECONNREFUSED/) });
    } finally {
      useProviderConnection(fake.dial);
    }
  });
});

describe('APNs sink: certificate auth', () => {
  it('presents the client certificate and sends no provider token', async () => {
    const client = testCertificate(['push-relay-client'], TOPIC);
    const certFake = await startApnsFake({ clientCa: client.cert });
    useProviderConnection(certFake.dial);
    try {
      const { url } = await startTestRelay({ sinks: { ios: { type: 'apns', topic: TOPIC, cert: client.certFile, key: client.keyFile } } });
      expect((await sendPush(url, iosPush({ ack_id: 'certauth000000000000000000' }))).json).toEqual({ status: 'OK' });
      expect(certFake.requests[0]!.clientCn).toBe(TOPIC);
      expect(certFake.requests[0]!.headers.authorization).toBeUndefined();
    } finally {
      useProviderConnection(fake.dial);
      await certFake.close();
    }
  });
});

describe('APNs sink: configuration', () => {
  it('names the missing keys of half-configured token auth', async () => {
    await expect(startTestRelay({ sinks: { ios: { type: 'apns', topic: TOPIC, keyFile } } })).rejects.toThrow(/sinks\.ios\.keyId/);
  });

  it('refuses a key file that is not an EC private key, naming it', async () => {
    const bad = join(tempDir('push-relay-apns-bad-'), 'AuthKey.p8');
    writeFileSync(bad, 'not a key');
    await expect(startTestRelay({ sinks: apnsSink({ keyFile: bad }) })).rejects.toThrow(/AuthKey\.p8 is not a PEM private key/);
  });
});

describe('APNs sink as a user runs it: through HTTPS_PROXY, trusting NODE_EXTRA_CA_CERTS', () => {
  let proxy: Server;
  const tunnels: string[] = [];
  beforeAll(async () => {
    // A CONNECT proxy that sends every tunnel to the fake, whatever host was asked for.
    proxy = createHttpServer((_req, res) => res.writeHead(405).end());
    const sockets = new Set<Socket>();
    proxy.on('connect', (req, client: Socket, head: Buffer) => {
      tunnels.push(req.url ?? '');
      const upstream = netConnect(fake.port, '127.0.0.1', () => {
        client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
        upstream.write(head);
        upstream.pipe(client).pipe(upstream);
      });
      for (const s of [client, upstream]) {
        sockets.add(s);
        s.on('error', () => {});
        s.on('close', () => sockets.delete(s));
      }
    });
    proxy.on('close', () => sockets.forEach((s) => s.destroy()));
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  });
  afterAll(() => {
    proxy.closeAllConnections();
    proxy.close();
  });

  it('reaches api.push.apple.com through a CONNECT tunnel and verifies the certificate with the extra CA', async () => {
    const relay = await spawnRelay({
      config: { store: 'none', sinks: apnsSink() },
      env: {
        HTTPS_PROXY: `http://127.0.0.1:${(proxy.address() as AddressInfo).port}`,
        NO_PROXY: '',
        NODE_EXTRA_CA_CERTS: fake.tls.certFile,
      },
    });
    try {
      const got = await sendPush(relay.url, iosPush({ ack_id: 'throughproxy00000000000000' }));
      expect(got.json).toEqual({ status: 'OK' });
      expect(tunnels).toContain('api.push.apple.com:443');
      expect(fake.requests).toHaveLength(1);
      expect(fake.requests[0]!.jwt?.claims.iss).toBe(TEAM_ID);
    } finally {
      await relay.stop();
    }
  });
});
