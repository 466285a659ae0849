// The Web Push sink against a local push service that checks VAPID and decrypts the push
// itself (test/helpers/push-service.ts): what a browser's service worker would get, what the
// push service's answers do to the device registry, and the guard against endpoints on
// private addresses.
//
// Two ways in: over HTTPS with the relay as a child process that trusts the test certificate
// through NODE_EXTRA_CA_CERTS (as a user trusts an extra CA), and in this process over plain
// HTTP to a loopback push service, which `allowPrivateEndpoints: true` permits.
import fc from 'fast-check';
import pino from 'pino';
import { Writable } from 'node:stream';
import webPush from 'web-push';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createDeviceRegistry, type Device, type DeviceRegistry, type NewDevice } from '../src/devices.js';
import { openStore, type Store } from '../src/store/index.js';
import { retryAfter } from '../sinks/retry-after.js';
import { MAX_ENCRYPTED, MAX_PLAINTEXT, RECORD_OVERHEAD, payloadBuilder } from '../sinks/webpush.js';
import type { PushNotification } from '../src/contract.js';
import { get, post } from './helpers/http.js';
import { freePort } from './helpers/ports.js';
import { loadPayloads, messagePush, type SamplePayload } from './helpers/payloads.js';
import { startPushService, type PushService, type ReceivedPush, type TestSubscription } from './helpers/push-service.js';
import { spawnRelay, startTestRelay, type RelayProcess } from './helpers/relay.js';
import { haveOpenssl, makeTestCertificate } from './helpers/test-ca.js';
import { tempDir } from './helpers/tmp.js';
import { sleep, until } from './helpers/wait.js';

const VAPID = { ...webPush.generateVAPIDKeys(), subject: 'mailto:ops@example.com' };
const MM = 'https://chat.example.com';

async function send(relayUrl: string, push: Record<string, unknown>) {
  const r = await post(`${relayUrl}/api/v1/send_push`, JSON.stringify(push));
  expect(r.status).toBe(200);
  return r.json as { status: string; error?: string };
}

async function registryAt(dataDir: string): Promise<{ store: Store; devices: DeviceRegistry }> {
  const store = (await openStore('sqlite', dataDir, false)) as Store;
  return { store, devices: createDeviceRegistry(store.kv('devices')) };
}

/** What the service worker must get for a push (the format in sinks/webpush.ts), spelled out per field. */
function expectedPayload(f: Record<string, unknown>): Record<string, unknown> {
  const type = f.type as string;
  const e: Record<string, unknown> = { v: 1, type };
  if (f.sub_type) e.sub_type = f.sub_type;
  if (type !== 'clear' && type !== 'update_badge') e.title = f.channel_name || f.sender_name || 'Mattermost';
  if (f.message) e.body = f.message;
  if (f.channel_id) e.tag = `mm:${f.channel_id}`;
  for (const k of ['post_id', 'channel_id', 'team_id', 'root_id', 'sender_name', 'server_id', 'ack_id']) if (f[k]) e[k] = f[k];
  e.url = f.post_id ? `${MM}/_redirect/pl/${f.post_id}` : MM;
  if (typeof f.badge === 'number' && f.badge >= 0) e.badge = f.badge;
  return e;
}

/** RFC 8030 §5.2/§5.3 headers by type: the sink's table, written out as the test expects it. */
const HEADERS_BY_TYPE: Record<string, { ttl: string; urgency: string }> = {
  message: { ttl: '86400', urgency: 'high' },
  session: { ttl: '86400', urgency: 'high' },
  test: { ttl: '300', urgency: 'normal' },
  clear: { ttl: '60', urgency: 'low' },
  update_badge: { ttl: '60', urgency: 'low' },
};

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

describe.skipIf(!haveOpenssl())('Web Push over HTTPS, relay process -> web-push -> push service', () => {
  let service: PushService;
  let relay: RelayProcess;
  let devices: DeviceRegistry;
  let store: Store;
  let sub: TestSubscription;
  let device: Device;

  beforeAll(async () => {
    const cert = makeTestCertificate();
    service = await startPushService({ vapidPublicKey: VAPID.publicKey, tls: cert });
    const dataDir = tempDir('push-relay-webpush-');
    ({ store, devices } = await registryAt(dataDir));
    sub = service.subscribe();
    device = await devices.add({ label: 'e2e browser', targets: { webpush: [sub.json] } });
    relay = await spawnRelay({
      config: {
        store: 'sqlite',
        mattermost: { url: MM },
        sinks: { browser: { type: 'webpush', vapid: VAPID, allowPrivateEndpoints: true } },
        routes: [{ match: { paired: true }, sinks: ['browser'] }],
      },
      env: { NODE_EXTRA_CA_CERTS: cert.certFile, PUSH_RELAY_DATA_DIR: dataDir },
    });
  });
  afterAll(async () => {
    await relay?.stop();
    await store?.close();
  });

  const fixtures = loadPayloads();
  it.each(fixtures.map((f) => [f.name, f] as [string, SamplePayload]))('%s: the decrypted push is what the service worker expects', async (_name, f) => {
    const push = { ...f.json, device_id: device.token };
    const before = service.received.length;
    expect(await send(relay.url, push)).toEqual({ status: 'OK' });
    const [got] = (await service.waitFor(before + 1)).slice(before);
    expect(service.problems).toEqual([]);
    expect(JSON.parse(got?.plaintext ?? 'null')).toEqual(expectedPayload(push));
    const want = HEADERS_BY_TYPE[f.json.type ?? ''] as { ttl: string; urgency: string };
    expect({ ttl: got?.headers.ttl, urgency: got?.headers.urgency }).toEqual(want);
    expect(got?.jwt?.claims).toMatchObject({ aud: service.origin, sub: VAPID.subject });
  });

  it('a channel post carries what the page needs: channel title, text, per-channel tag, permalink, and a per-channel Topic', async () => {
    const got = service.received.find((p) => JSON.parse(p.plaintext ?? '{}').ack_id === 'z7jgszh5b1m3yhcce1ayaxe1eh') as ReceivedPush;
    expect(JSON.parse(got.plaintext as string)).toMatchObject({
      title: 'Release Planning',
      body: '@alice: Deploy to staging finished, please verify the login flow',
      tag: 'mm:ymhh7n5u6wc8axbye7rfznogpc',
      url: 'https://chat.example.com/_redirect/pl/q7wmodmqo3gct6hm4eszbu68kh',
      badge: 3,
    });
    expect(got.headers.topic).toBe('ymhh7n5u6wc8axbye7rfznogpc');
    // A test push has badge -1 (contract §2.2): no badge, and the generic title.
    const test = service.received.find((p) => JSON.parse(p.plaintext ?? '{}').type === 'test') as ReceivedPush;
    expect(JSON.parse(test.plaintext as string)).toEqual({ v: 1, type: 'test', title: 'Mattermost', server_id: 'mxznon7dy3dfojgzbhhfj3tbyh', url: MM });
  });

  it.each([
    ['mixed text with quotes, newlines, accents, CJK and emoji', () => 'Ünïcödé "quoted"\n中文 😀 '.repeat(500)],
    ['emoji only, so every cut is next to a surrogate pair', () => '😀'.repeat(2600)],
  ])('a 10 kB message (%s) arrives cut on a character boundary within 4096 bytes', async (_what, make) => {
    const message = make();
    expect(Buffer.byteLength(message)).toBeGreaterThan(10_000);
    const before = service.received.length;
    expect(await send(relay.url, messagePush({ device_id: device.token, message, ack_id: `long${Math.random().toString(36).slice(2, 12)}` }))).toEqual({ status: 'OK' });
    const [got] = (await service.waitFor(before + 1)).slice(before);
    expect(service.problems).toEqual([]);
    // The encrypted record fits, and not by a wide margin: at most one 4-byte character short.
    expect(got?.bodyBytes).toBeLessThanOrEqual(MAX_ENCRYPTED);
    expect(got?.bodyBytes).toBeGreaterThan(MAX_ENCRYPTED - 4 - 6);
    const body = (JSON.parse(got?.plaintext as string) as { body: string }).body;
    expect(body.endsWith('…')).toBe(true);
    expect(message.startsWith(body.slice(0, -1))).toBe(true);
    expect(LONE_SURROGATE.test(body)).toBe(false);
  });

  it('saw a VAPID JWT that expires within 24 h on every push', () => {
    expect(service.received.length).toBeGreaterThanOrEqual(14);
    for (const p of service.received) expect(p.jwt?.header).toMatchObject({ alg: 'ES256', typ: 'JWT' });
    // One JWT per push-service origin, reused: not signed again for every push.
    expect(new Set(service.received.map((p) => p.headers.authorization)).size).toBe(1);
    expect(service.problems).toEqual([]);
  });
});

describe('the payload cut (sinks/webpush.ts payloadBuilder)', () => {
  it('fits the record arithmetic: 4096 - 86 header - 16 tag - 1 delimiter', () => {
    expect(RECORD_OVERHEAD).toBe(103);
    expect(MAX_PLAINTEXT).toBe(3993);
  });

  it('for any text, stays within the budget and cuts on a code point boundary', () => {
    const base = messagePush({ device_id: 'pr1AAAAAAAAAAAAAAAAAAAAAAAA' }) as PushNotification;
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 6000 }), fc.integer({ min: 1000, max: 4000 }), (text, budget) => {
        const out = payloadBuilder({ ...base, message: text }, MM)(budget);
        expect(Buffer.byteLength(out)).toBeLessThanOrEqual(budget);
        const body = (JSON.parse(out) as { body?: string }).body ?? '';
        if (body === text) return;
        expect(body.endsWith('…')).toBe(true);
        expect(text.startsWith(body.slice(0, -1))).toBe(true);
        // A lone surrogate in the cut text that the whole text did not have: a split pair.
        if (LONE_SURROGATE.test(body.slice(0, -1))) expect(LONE_SURROGATE.test(text)).toBe(true);
        // Not cut shorter than needed: one more code point would not have fitted.
        const longer = [...text.slice(body.length - 1)][0] ?? '';
        expect(Buffer.byteLength(JSON.stringify({ ...JSON.parse(out), body: body.slice(0, -1) + longer + '…' }))).toBeGreaterThan(budget);
      }),
      { numRuns: 300 },
    );
  });

  it('reads Retry-After as seconds or as an HTTP date', () => {
    expect(retryAfter('7')).toBe(7000);
    const at = retryAfter(new Date(Date.now() + 30_000).toUTCString()) as number;
    expect(at).toBeGreaterThan(28_000);
    expect(at).toBeLessThanOrEqual(30_000);
    expect(retryAfter('soon')).toBeUndefined();
  });
});

describe('what the push service answers, in this process over HTTP (allowPrivateEndpoints: true)', () => {
  let service: PushService;
  let relay: Awaited<ReturnType<typeof startTestRelay>>;
  let devices: DeviceRegistry;
  let store: Store;
  const logged: Array<Record<string, unknown>> = [];

  beforeAll(async () => {
    service = await startPushService({ vapidPublicKey: VAPID.publicKey });
    const dataDir = tempDir('push-relay-webpush-');
    const logger = pino(
      { level: 'info' },
      new Writable({
        write(chunk: Buffer, _enc, cb) {
          for (const line of chunk.toString('utf8').split('\n')) if (line) logged.push(JSON.parse(line) as Record<string, unknown>);
          cb();
        },
      }),
    );
    relay = await startTestRelay(
      {
        store: 'sqlite',
        dataDir,
        delivery: { retryMin: '100ms', retryMax: '2s' },
        mattermost: { url: MM },
        sinks: { browser: { type: 'webpush', vapid: VAPID, allowPrivateEndpoints: true }, others: { type: 'log' } },
        routes: [
          { match: { paired: true }, sinks: ['browser'] },
          { match: { paired: false }, sinks: ['others'] },
        ],
      },
      { logger },
    );
    ({ store, devices } = await registryAt(dataDir));
  });
  afterAll(async () => {
    await relay?.stop();
    await store?.close();
  });

  let seq = 0;
  const ackId = () => `ack${(seq++).toString().padStart(4, '0')}${Math.random().toString(36).slice(2, 10)}`;
  const pushTo = (token: string, extra: Record<string, unknown> = {}) => send(relay.url, messagePush({ device_id: token, ack_id: ackId(), ...extra }));
  async function newDevice(targets: NewDevice['targets'] = {}, count = 1) {
    const subs = Array.from({ length: count }, () => service.subscribe());
    const d = await devices.add({ label: 'test', targets: { webpush: subs.map((s) => s.json), ...targets } });
    return { d, subs };
  }
  const at = (s: TestSubscription) => service.received.filter((p) => p.subscription === s.id);

  // The dead-token table in sinks/webpush.ts, one test per row.
  it.each([404, 410])('answers REMOVE when the push service says %i, and deletes that subscription', async (status) => {
    const { d, subs } = await newDevice();
    subs[0]?.plan({ status });
    expect(await pushTo(d.token)).toEqual({ status: 'REMOVE' });
    expect((await devices.get(d.token))?.targets.webpush).toEqual([]);
    expect(at(subs[0] as TestSubscription)).toHaveLength(1);
    // Mattermost may push once more before it acts on the REMOVE: no request goes out for it.
    expect(await pushTo(d.token)).toEqual({ status: 'REMOVE' });
    expect(at(subs[0] as TestSubscription)).toHaveLength(1);
  });

  it('delivers when one of two subscriptions is gone, deletes only that one, and records the push', async () => {
    const { d, subs } = await newDevice({}, 2);
    subs[0]?.plan({ status: 410 });
    expect(await pushTo(d.token)).toEqual({ status: 'OK' });
    const after = (await devices.get(d.token)) as Device;
    expect(after.targets.webpush?.map((s) => s.endpoint)).toEqual([subs[1]?.json.endpoint]);
    expect(after.lastPushAt).toBeGreaterThan(d.createdAt - 1);
    expect(at(subs[1] as TestSubscription)).toHaveLength(1);
  });

  it('deletes a gone subscription of a device that still has an email target, without REMOVE', async () => {
    const { d, subs } = await newDevice({ email: 'alice@example.com' });
    subs[0]?.plan({ status: 410 });
    expect(await pushTo(d.token)).toEqual({ status: 'OK' });
    const after = (await devices.get(d.token)) as Device;
    expect(after.targets).toEqual({ webpush: [], email: 'alice@example.com' });
  });

  it('429 with Retry-After: answers OK, the outbox tries again after the wait, the subscription stays', async () => {
    const { d, subs } = await newDevice();
    subs[0]?.plan({ status: 429, headers: { 'Retry-After': '1' } });
    expect(await pushTo(d.token)).toEqual({ status: 'OK' });
    const [first, second] = await service.waitFor(2, (p) => p.subscription === subs[0]?.id, 10_000);
    expect([first?.answered, second?.answered]).toEqual([429, 201]);
    expect((second?.at ?? 0) - (first?.at ?? 0)).toBeGreaterThanOrEqual(950);
    expect(JSON.parse(second?.plaintext ?? '{}').body).toBe(messagePush().message);
    expect((await devices.get(d.token))?.targets.webpush).toHaveLength(1);
  });

  it('500: retryable, delivered by the outbox on a later attempt', async () => {
    const { d, subs } = await newDevice();
    subs[0]?.plan({ status: 500 }, { status: 503 });
    expect(await pushTo(d.token)).toEqual({ status: 'OK' });
    const got = await service.waitFor(3, (p) => p.subscription === subs[0]?.id, 10_000);
    expect(got.map((p) => p.answered)).toEqual([500, 503, 201]);
    expect((await devices.get(d.token))?.targets.webpush).toHaveLength(1);
  });

  it('413: tries once more with the body cut to half the budget', async () => {
    const { d, subs } = await newDevice();
    subs[0]?.plan({ status: 413 });
    expect(await pushTo(d.token, { message: 'x'.repeat(3900) })).toEqual({ status: 'OK' });
    const [first, second] = at(subs[0] as TestSubscription);
    expect(first?.bodyBytes).toBeGreaterThan(MAX_ENCRYPTED - 10);
    expect(Buffer.byteLength(second?.plaintext ?? '')).toBeLessThanOrEqual(Math.floor(MAX_PLAINTEXT / 2));
    expect(JSON.parse(second?.plaintext ?? '{}').body).toMatch(/^x+…$/);
  });

  it('413 twice: FAIL, permanent, the subscription stays', async () => {
    const { d, subs } = await newDevice();
    subs[0]?.plan({ status: 413 }, { status: 413 });
    const r = await pushTo(d.token, { message: 'x'.repeat(3900) });
    expect(r.status).toBe('FAIL');
    expect(r.error).toMatch(/^browser: push service 127\.0\.0\.1:\d+ answered 413.*too large/);
    expect(at(subs[0] as TestSubscription)).toHaveLength(2);
    expect((await devices.get(d.token))?.targets.webpush).toHaveLength(1);
  });

  it.each([
    [400, /vapid\.subject/],
    [401, /vapid\.privateKey belongs to vapid\.publicKey/],
    [403, /subscribed with another vapid\.publicKey/],
  ])('%i: FAIL saying what to check in the VAPID config, nothing removed, no retry', async (status, hint) => {
    const { d, subs } = await newDevice();
    subs[0]?.plan({ status, body: 'nope' });
    const r = await pushTo(d.token);
    expect(r.status).toBe('FAIL');
    expect(r.error).toMatch(new RegExp(`answered ${status} \\(nope\\)`));
    expect(r.error).toMatch(hint);
    await sleep(300);
    expect(at(subs[0] as TestSubscription)).toHaveLength(1);
    const after = (await devices.get(d.token)) as Device;
    expect(after.targets.webpush).toHaveLength(1);
    expect(after.lastFailureAt).toBeGreaterThan(0);
  });

  it('a subscription whose keys cannot be encrypted to: FAIL, permanent, never REMOVE', async () => {
    const s = service.subscribe();
    const d = await devices.add({ label: 'broken', targets: { webpush: [{ ...s.json, keys: { p256dh: 'BAAA', auth: s.json.keys.auth } }] } });
    const r = await pushTo(d.token);
    expect(r.status).toBe('FAIL');
    expect(r.error).toMatch(/subscription of 127\.0\.0\.1:\d+ unusable: .*p256dh/);
    expect(at(s)).toEqual([]);
    expect((await devices.get(d.token))?.targets.webpush).toHaveLength(1);
  });

  it('answers REMOVE for a relay token the registry does not know, and sends nothing', async () => {
    const before = service.received.length;
    expect(await pushTo('pr1AAAAAAAAAAAAAAAAAAAAAAAA')).toEqual({ status: 'REMOVE' });
    expect(service.received.length).toBe(before);
  });

  it('a route with paired: true sends relay tokens to the browser sink, and other tokens elsewhere', async () => {
    const { d, subs } = await newDevice();
    const ours = ackId();
    expect(await pushTo(d.token, { ack_id: ours })).toEqual({ status: 'OK' });
    expect(at(subs[0] as TestSubscription)).toHaveLength(1);
    const official = messagePush({ ack_id: ackId() });
    const before = service.received.length;
    expect(await send(relay.url, official)).toEqual({ status: 'OK' });
    await until('the log sink to log the official token', () =>
      logged.find((l) => l.sink === 'others' && l.msg === 'notification' && l.ack_id === official.ack_id),
    );
    expect(service.received.length).toBe(before);
    expect(logged.filter((l) => l.sink === 'others' && l.ack_id === ours)).toEqual([]);
  });

  it('an unreachable push service: retryable, the push waits in the outbox', async () => {
    const closed = `http://127.0.0.1:${await freePort()}`;
    const s = service.subscribe({ path: closed });
    const d = await devices.add({ label: 'offline', targets: { webpush: [s.json] } });
    expect(await pushTo(d.token)).toEqual({ status: 'OK' });
    const pending = await store.list(100);
    const mine = pending.find((r) => (JSON.parse(r.payload) as { device_id: string }).device_id === d.token);
    expect(mine?.lastError).toMatch(/push service 127\.0\.0\.1:\d+ unreachable: ECONNREFUSED/);
    // Removed meanwhile: the next retry learns the device is gone and stops (dead letter).
    await devices.remove(d.token);
  });

  it('counts deleted subscriptions per sink, and offers the pairing page its VAPID public key', async () => {
    const metrics = await get(`${relay.url}/metrics`);
    const m = /push_relay_webpush_subscriptions_removed_total\{sink="browser"\} (\d+)/.exec(metrics.text);
    expect(Number(m?.[1])).toBeGreaterThanOrEqual(4);
    expect(relay.sinks.get('browser')?.vapidPublicKey).toBe(VAPID.publicKey);
    expect(relay.sinks.get('browser')?.perDevice).toBe(true);
  });

  it('logs neither the message text nor whole tokens at info', () => {
    const text = JSON.stringify(logged);
    expect(text).not.toContain(messagePush().message as string);
    for (const l of logged) if (typeof l.device === 'string') expect(l.device.length).toBeLessThan(27);
  });
});

describe('a push service slower than the deadline', () => {
  it('answers OK at the deadline (queued), and the late success is the only push: the outbox copy is taken back', async () => {
    const service = await startPushService({ vapidPublicKey: VAPID.publicKey });
    const dataDir = tempDir('push-relay-webpush-');
    const relay = await startTestRelay({
      store: 'sqlite',
      dataDir,
      delivery: { retryMin: '4s', retryMax: '8s' },
      sinks: { browser: { type: 'webpush', vapid: VAPID, allowPrivateEndpoints: true, deadline: '300ms' } },
    });
    const { store, devices } = await registryAt(dataDir);
    const s = service.subscribe();
    s.plan({ status: 201, delayMs: 1000 });
    const d = await devices.add({ label: 'slow', targets: { webpush: [s.json] } });
    const started = Date.now();
    expect(await send(relay.url, messagePush({ device_id: d.token }))).toEqual({ status: 'OK' });
    expect(Date.now() - started).toBeLessThan(900);
    // The outbox's first retry is 2 s or more away; the late 201 comes after 1 s.
    await sleep(2500);
    expect(service.received.filter((p) => p.subscription === s.id)).toHaveLength(1);
    expect(await store.stats()).toMatchObject({ depth: 0, deadLetters: 0 });
    expect(service.problems).toEqual([]);
    await relay.stop();
    await store.close();
  });
});

describe('the egress guard: endpoints on loopback and private addresses', () => {
  let service: PushService;
  let devices: DeviceRegistry;
  let store: Store;
  let relay: Awaited<ReturnType<typeof startTestRelay>>;

  beforeAll(async () => {
    service = await startPushService({ vapidPublicKey: VAPID.publicKey });
    const dataDir = tempDir('push-relay-webpush-');
    relay = await startTestRelay({
      store: 'sqlite',
      dataDir,
      sinks: { browser: { type: 'webpush', vapid: VAPID } },
    });
    ({ store, devices } = await registryAt(dataDir));
  });
  afterAll(async () => {
    await relay?.stop();
    await store?.close();
  });

  it.each([
    ['https on 127.0.0.1', (port: string) => `https://127.0.0.1:${port}`, /resolves to a private address \(127\.0\.0\.1\)/],
    ['https on a name that resolves to loopback', (port: string) => `https://localhost:${port}`, /localhost resolves to a private address/],
    ['https on an RFC 1918 address', () => 'https://10.1.2.3', /private address \(10\.1\.2\.3\)/],
    ['https on the cloud metadata address', () => 'https://169.254.169.254', /private address \(169\.254\.169\.254\)/],
    ['plain http', (port: string) => `http://127.0.0.1:${port}`, /only https endpoints are allowed/],
  ])('refuses %s: FAIL with the reason, never REMOVE, nothing sent, the subscription kept', async (_what, origin, reason) => {
    const port = new URL(service.origin).port;
    const s = service.subscribe({ path: origin(port) });
    const d = await devices.add({ label: 'guarded', targets: { webpush: [s.json] } });
    const r = await send(relay.url, messagePush({ device_id: d.token, ack_id: `guard${Math.random().toString(36).slice(2, 12)}` }));
    expect(r.status).toBe('FAIL');
    expect(r.error).toMatch(reason);
    expect(service.received.filter((p) => p.subscription === s.id)).toEqual([]);
    expect((await devices.get(d.token))?.targets.webpush).toHaveLength(1);
  });
});
