// The webhook sink against local HTTP servers: fakes of ntfy and gotify that check requests the
// way those services document them, and a generic endpoint whose answers each test chooses.
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import type { PushNotification } from '../src/contract.js';
import { createDeviceRegistry } from '../src/devices.js';
import { createRegistry, sinkMetrics } from '../src/metrics.js';
import { memoryKv } from '../src/store/index.js';
import { openSqliteStore } from '../src/store/sqlite.js';
import webhookSink, { networkOutcome } from '../sinks/webhook.js';
import type { Outcome } from '../sinks/types.js';
import { testCertificate } from './helpers/certs.js';
import { post } from './helpers/http.js';
import { messagePush, payload } from './helpers/payloads.js';
import { freePort } from './helpers/ports.js';
import { startTestRelay } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';
import { sleep, until } from './helpers/wait.js';
import { startGotifyServer, startNtfyServer, startWebhookServer, type Answer } from './helpers/webhook-server.js';

const MM = 'https://chat.example.com';
const POST_ID = 'q7wmodmqo3gct6hm4eszbu68kh';
const PERMALINK = `${MM}/_redirect/pl/${POST_ID}`;

let ack = 0;
const fresh = (overrides: Record<string, unknown> = {}) => messagePush({ ack_id: `w${Date.now()}x${ack++}`, ...overrides });

async function push(relayUrl: string, body: Record<string, unknown>) {
  const reply = await post(`${relayUrl}/api/v1/send_push`, JSON.stringify(body));
  expect(reply.status).toBe(200);
  return reply.json as { status: string; error?: string };
}

function relayWith(sink: Record<string, unknown>, top: Record<string, unknown> = {}, env: Record<string, string> = {}) {
  return startTestRelay({ mattermost: { url: MM }, sinks: { hook: { type: 'webhook', allowPrivateEndpoints: true, ...sink } }, ...top }, { env });
}

/** The sink on its own: the outcome it reports for one push. */
async function outcomeOf(sink: Record<string, unknown>, n: Record<string, unknown> = fresh()): Promise<Outcome> {
  const config = webhookSink.schema.parse({ type: 'webhook', allowPrivateEndpoints: true, ...sink });
  const kv = memoryKv();
  const s = webhookSink.create('hook', config, {
    logger: pino({ level: 'silent' }),
    metrics: sinkMetrics(createRegistry()),
    store: kv('sink:hook'),
    devices: createDeviceRegistry(kv('devices')),
    mattermostUrl: MM,
  });
  try {
    return await s.send(n as unknown as PushNotification, new AbortController().signal);
  } finally {
    await s.close();
  }
}

describe('ntfy preset', () => {
  it("publishes as ntfy documents: JSON to the root with topic, title, message, priority, tags, the post's click URL and the Bearer token", async () => {
    const ntfy = await startNtfyServer({ token: 'tk_abc123' });
    const relay = await relayWith(
      { preset: 'ntfy', url: `${ntfy.url}/mattermost`, headers: { Authorization: 'Bearer ${NTFY_TOKEN}' } },
      {},
      { NTFY_TOKEN: 'tk_abc123' },
    );
    expect(await push(relay.url, fresh({ post_id: POST_ID }))).toEqual({ status: 'OK' });
    expect(ntfy.requests[0]).toMatchObject({ method: 'POST', url: '/', headers: { 'content-type': 'application/json' } });
    expect(ntfy.messages).toEqual([
      {
        topic: 'mattermost',
        title: 'Release Planning',
        message: '@alice: Deploy to staging finished, please verify the login flow',
        priority: 4,
        tags: ['speech_balloon'],
        click: PERMALINK,
        auth: 'Bearer tk_abc123',
      },
    ]);
  });

  it('sends the token setting as Bearer, renders the URL template URL-encoded, and gives a ringing call top priority', async () => {
    const ntfy = await startNtfyServer({ token: 'tk_t' });
    const relay = await relayWith({ preset: 'ntfy', url: `${ntfy.url}/mm-{channel_id}?cache=no`, token: 'tk_t' });
    await push(relay.url, { ...payload('12').json, ack_id: 'call-1' });
    const call = payload('12').json as Record<string, string>;
    // The JSON goes to the root; the topic URL's query (ntfy's ?auth=, ?cache=) goes along.
    expect(ntfy.requests[0]!.url).toBe('/?cache=no');
    expect(ntfy.messages[0]).toMatchObject({ topic: `mm-${call.channel_id}`, priority: 5, tags: ['telephone_receiver'], auth: 'Bearer tk_t' });
  });

  it("answers FAIL with ntfy's answer when the token is refused (401 is permanent)", async () => {
    const ntfy = await startNtfyServer({ token: 'tk_right' });
    const relay = await relayWith({ preset: 'ntfy', url: `${ntfy.url}/mattermost`, token: 'tk_wrong' });
    const reply = await push(relay.url, fresh());
    expect(reply.status).toBe('FAIL');
    expect(reply.error).toContain('HTTP 401');
    expect(reply.error).toContain('unauthorized');
  });

  it('shows a test push without text as a test notification, and sends nothing for clear and update_badge', async () => {
    const ntfy = await startNtfyServer();
    const relay = await relayWith({ preset: 'ntfy', url: `${ntfy.url}/mattermost` });
    for (const p of ['08', '09']) expect(await push(relay.url, payload(p).json)).toEqual({ status: 'OK' });
    await push(relay.url, payload('11').json);
    await ntfy.waitForRequests(1);
    await sleep(100);
    expect(ntfy.messages).toEqual([{ topic: 'mattermost', title: 'Mattermost', message: 'Test notification from Mattermost', priority: 3, tags: ['white_check_mark'], click: MM }]);
  });

  it("also publishes to a paired device's own ntfy topic, without the sink's credentials when it is on another server", async () => {
    const dataDir = tempDir();
    const ours = await startNtfyServer({ token: 'tk_ops' });
    const theirs = await startNtfyServer();
    const store = openSqliteStore({ dataDir, owner: true });
    const device = await createDeviceRegistry(store.kv('devices')).add({ label: 'Alice phone', targets: { ntfy: `${theirs.url}/alice-s3cret-topic` } });
    await store.close();
    const relay = await relayWith({ preset: 'ntfy', url: `${ours.url}/mattermost`, token: 'tk_ops' }, { store: 'sqlite', dataDir });
    expect(await push(relay.url, fresh({ device_id: device.token }))).toEqual({ status: 'OK' });
    expect(ours.messages).toMatchObject([{ topic: 'mattermost', auth: 'Bearer tk_ops' }]);
    expect(theirs.messages).toMatchObject([{ topic: 'alice-s3cret-topic', message: '@alice: Deploy to staging finished, please verify the login flow', auth: undefined }]);
  });

  it('retries only the target that failed', async () => {
    const dataDir = tempDir();
    const ours = await startNtfyServer();
    let calls = 0;
    const theirs = await startWebhookServer(() => (++calls === 1 ? { status: 503, body: 'busy' } : { status: 200, body: '{}' }));
    const store = openSqliteStore({ dataDir, owner: true });
    const device = await createDeviceRegistry(store.kv('devices')).add({ label: 'p', targets: { ntfy: `${theirs.url}/alice-s3cret-topic` } });
    await store.close();
    const relay = await relayWith({ preset: 'ntfy', url: `${ours.url}/mattermost` }, { store: 'sqlite', dataDir, delivery: { retryMin: '100ms', retryMax: '200ms' } });
    expect(await push(relay.url, fresh({ device_id: device.token }))).toEqual({ status: 'OK' });
    await theirs.waitForRequests(2);
    await sleep(400);
    expect(ours.requests).toHaveLength(1);
    expect(theirs.requests).toHaveLength(2);
  });
});

describe('gotify preset', () => {
  it('posts /message with the app token as X-Gotify-Key, title, message, priority and the markdown and click extras', async () => {
    const gotify = await startGotifyServer({ appToken: 'AbCdEf.123' });
    const relay = await relayWith({ preset: 'gotify', url: gotify.url, token: '${GOTIFY_TOKEN}' }, {}, { GOTIFY_TOKEN: 'AbCdEf.123' });
    expect(await push(relay.url, fresh({ post_id: POST_ID }))).toEqual({ status: 'OK' });
    expect(gotify.requests[0]).toMatchObject({ method: 'POST', url: '/message', headers: { 'x-gotify-key': 'AbCdEf.123' } });
    expect(gotify.messages).toEqual([
      {
        title: 'Release Planning',
        message: '@alice: Deploy to staging finished, please verify the login flow',
        priority: 8,
        extras: { 'client::display': { contentType: 'text/markdown' }, 'client::notification': { click: { url: PERMALINK } } },
      },
    ]);
  });

  it('answers FAIL when gotify refuses the token', async () => {
    const gotify = await startGotifyServer({ appToken: 'right' });
    const relay = await relayWith({ preset: 'gotify', url: `${gotify.url}/`, token: 'wrong' });
    const reply = await push(relay.url, fresh());
    expect(reply).toMatchObject({ status: 'FAIL', error: expect.stringContaining('HTTP 401') });
  });
});

describe('generic preset', () => {
  it('posts the notification as JSON by default', async () => {
    const hook = await startWebhookServer();
    const relay = await relayWith({ url: `${hook.url}/hooks/mm`, headers: { 'X-Api-Key': 'k1' } });
    const sent = fresh({ message: 'as json' });
    await push(relay.url, sent);
    const [r] = hook.requests;
    expect(r).toMatchObject({ method: 'POST', url: '/hooks/mm', headers: { 'content-type': 'application/json', 'x-api-key': 'k1' } });
    expect(JSON.parse(r!.body)).toMatchObject({ ack_id: sent.ack_id, message: 'as json', channel_name: 'Release Planning', type: 'message' });
  });

  it('PUTs a form', async () => {
    const hook = await startWebhookServer();
    const relay = await relayWith({ url: `${hook.url}/form`, method: 'PUT', body: 'form' });
    await push(relay.url, fresh({ message: 'a & b = c' }));
    const [r] = hook.requests;
    expect(r).toMatchObject({ method: 'PUT', headers: { 'content-type': 'application/x-www-form-urlencoded' } });
    expect(new URLSearchParams(r!.body).get('message')).toBe('a & b = c');
  });

  it('renders a template, JSON-escaping values when asked, so quotes in a message cannot break it', async () => {
    const hook = await startWebhookServer();
    const relay = await relayWith({ url: `${hook.url}/t`, body: 'template', escape: 'json', template: '{"text":"{sender_name}: {message}"}' });
    const message = 'say "hi" \\ {channel_name}\nnext line';
    await push(relay.url, fresh({ message }));
    const [r] = hook.requests;
    expect(r!.headers['content-type']).toBe('application/json');
    expect(JSON.parse(r!.body)).toEqual({ text: `@alice: ${message}` });
  });
});

// One test per row of httpOutcome / networkOutcome in sinks/webhook.ts.
describe('HTTP outcomes', () => {
  const rows: Array<[string, Answer, Partial<Outcome> & Record<string, unknown>]> = [
    ['2xx is delivered', { status: 204 }, { kind: 'delivered' }],
    ['3xx is permanent, with the Location, not followed', { status: 302, headers: { Location: '/elsewhere' } }, { kind: 'permanent', reason: 'redirect', detail: expect.stringContaining('/elsewhere') }],
    ['4xx is permanent', { status: 404, body: 'no such hook' }, { kind: 'permanent', reason: 'client_error', detail: 'HTTP 404: no such hook' }],
    ['408 is retryable', { status: 408 }, { kind: 'retryable', reason: 'request_timeout' }],
    ['429 is retryable after Retry-After', { status: 429, headers: { 'Retry-After': '7' } }, { kind: 'retryable', reason: 'rate_limited', retryAfterMs: 7000 }],
    ['5xx is retryable', { status: 500, body: 'oops' }, { kind: 'retryable', reason: 'server_error' }],
    ['503 with an HTTP-date Retry-After', { status: 503, headers: { 'Retry-After': new Date(Date.now() + 30_000).toUTCString() } }, { kind: 'retryable', reason: 'server_error', retryAfterMs: expect.any(Number) }],
  ];
  for (const [name, answer, expected] of rows) {
    it(name, async () => {
      const hook = await startWebhookServer(() => answer);
      const o = await outcomeOf({ url: `${hook.url}/x` });
      expect(o).toMatchObject(expected);
      if ('retryAfterMs' in o && name.startsWith('503')) expect(o.retryAfterMs).toBeGreaterThan(20_000);
      expect(hook.requests.map((r) => r.url)).toEqual(['/x']);
    });
  }

  it('a status outside the classes is retryable: unexpected_status', async () => {
    const hook = await startWebhookServer(() => ({ status: 600 }));
    expect(await outcomeOf({ url: hook.url })).toMatchObject({ kind: 'retryable', reason: 'unexpected_status' });
  });

  it('a certificate the sink does not trust is a retryable TLS failure; tls.ca makes it trusted', async (ctx) => {
    const cert = testCertificate();
    if (!cert) return ctx.skip();
    const hook = await startWebhookServer(undefined, cert);
    expect(await outcomeOf({ url: `${hook.url}/x` })).toMatchObject({ kind: 'retryable', reason: 'tls_failed' });
    expect(hook.requests).toHaveLength(0);
    expect(await outcomeOf({ url: `${hook.url}/x`, tls: { ca: cert.certFile } })).toEqual({ kind: 'delivered' });
    expect(hook.requests).toHaveLength(1);
  });

  it('a private address found when connecting (DNS rebinding, refused by guardedLookup) is permanent', () => {
    // checkEndpoint has passed by then, so no local peer can produce it: the row is checked on
    // the error guardedLookup raises (test/egress.test.ts shows it raising it).
    const err = Object.assign(new Error('evil.example resolves to a private address (127.0.0.1); refused'), { code: 'EPRIVATEADDRESS' });
    expect(networkOutcome(err)).toMatchObject({ kind: 'permanent', reason: 'private_address' });
  });

  it('no answer within the timeout is retryable', async () => {
    const hook = await startWebhookServer(() => ({ status: 200, delayMs: 2000 }));
    expect(await outcomeOf({ url: hook.url, timeout: '200ms' })).toMatchObject({ kind: 'retryable', reason: 'timeout' });
  });

  it('connection refused is retryable', async () => {
    expect(await outcomeOf({ url: `http://127.0.0.1:${await freePort()}/x` })).toMatchObject({ kind: 'retryable', reason: 'connection_failed' });
  });
});

describe('what Mattermost sees, and the outbox', () => {
  const delivery = { retryMin: '100ms', retryMax: '200ms' };

  it('answers OK for a 5xx and delivers it on a retry', async () => {
    const hook = await startWebhookServer((_r, i) => (i === 1 ? { status: 502, body: 'bad gateway' } : { status: 200 }));
    const relay = await relayWith({ url: hook.url }, { store: 'sqlite', dataDir: tempDir(), delivery });
    expect(await push(relay.url, fresh())).toEqual({ status: 'OK' });
    await hook.waitForRequests(2);
    await sleep(300);
    expect(hook.requests).toHaveLength(2);
  });

  it('honours Retry-After on a 429 before trying again', async () => {
    const hook = await startWebhookServer((_r, i) => (i === 1 ? { status: 429, headers: { 'Retry-After': '1' } } : { status: 200 }));
    const relay = await relayWith({ url: hook.url }, { store: 'sqlite', dataDir: tempDir(), delivery });
    expect(await push(relay.url, fresh())).toEqual({ status: 'OK' });
    const [first, second] = await hook.waitForRequests(2, 5000);
    expect(second!.at - first!.at).toBeGreaterThanOrEqual(950);
  });

  it('answers FAIL for a 4xx, keeps a dead letter and never retries', async () => {
    const hook = await startWebhookServer(() => ({ status: 422, body: '{"error":"bad payload"}' }));
    const dataDir = tempDir();
    const relay = await relayWith({ url: hook.url }, { store: 'sqlite', dataDir, delivery });
    const reply = await push(relay.url, fresh());
    expect(reply).toEqual({ status: 'FAIL', error: 'hook: HTTP 422: {"error":"bad payload"}' });
    await sleep(500);
    expect(hook.requests).toHaveLength(1);
    const reader = openSqliteStore({ dataDir, owner: false });
    expect(await reader.deadLetters(10)).toHaveLength(1);
    await reader.close();
  });

  it('does not follow a redirect', async () => {
    const hook = await startWebhookServer((r) => (r.url === '/old' ? { status: 301, headers: { Location: '/new' } } : { status: 200 }));
    const relay = await relayWith({ url: `${hook.url}/old` });
    const reply = await push(relay.url, fresh());
    expect(reply.status).toBe('FAIL');
    expect(reply.error).toContain('HTTP 301 redirect to /new');
    await sleep(200);
    expect(hook.requests.map((r) => r.url)).toEqual(['/old']);
  });

  it("never holds Mattermost's reply beyond the delivery deadline: a slow endpoint's delivery is queued", async () => {
    const hook = await startWebhookServer(() => ({ status: 200, delayMs: 1500 }));
    const dataDir = tempDir();
    const relay = await relayWith({ url: hook.url, deadline: '300ms' }, { store: 'sqlite', dataDir, delivery: { retryMin: '5s', retryMax: '5s' } });
    const started = performance.now();
    expect(await push(relay.url, fresh())).toEqual({ status: 'OK' });
    const took = performance.now() - started;
    expect(took).toBeGreaterThanOrEqual(290);
    expect(took).toBeLessThan(300 + 250);
    const reader = openSqliteStore({ dataDir, owner: false });
    expect((await reader.stats()).depth).toBe(1);
    // The slow request then succeeds: its outbox copy is taken back, nothing is sent twice.
    await until('the late success to take the outbox copy back', async () => (await reader.stats()).depth === 0, { timeoutMs: 4000 });
    await reader.close();
    expect(hook.requests).toHaveLength(1);
  });
});

describe('egress', () => {
  it('refuses loopback endpoints unless allowPrivateEndpoints, and then delivers', async () => {
    const hook = await startWebhookServer();
    const plain = await outcomeOf({ url: `${hook.url}/x`, allowPrivateEndpoints: false });
    expect(plain).toMatchObject({ kind: 'permanent', reason: 'endpoint_refused', detail: expect.stringContaining('only https') });
    const named = await outcomeOf({ url: `https://localhost:${hook.port}/x`, allowPrivateEndpoints: false });
    expect(named).toMatchObject({ kind: 'permanent', reason: 'endpoint_refused', detail: expect.stringContaining('private address') });
    expect(hook.requests).toHaveLength(0);
    expect(await outcomeOf({ url: `${hook.url}/x`, allowPrivateEndpoints: true })).toEqual({ kind: 'delivered' });
    expect(hook.requests).toHaveLength(1);
  });

  it("refuses a paired device's ntfy topic on a private address, while the sink's own server gets the push", async () => {
    const dataDir = tempDir();
    const store = openSqliteStore({ dataDir, owner: true });
    const device = await createDeviceRegistry(store.kv('devices')).add({ label: 'p', targets: { ntfy: 'https://127.0.0.1:9/internal' } });
    await store.close();
    // The sink's own server is public in production; here allowPrivateEndpoints is off, so
    // the sink's https URL must be public too: use a documentation address that is refused
    // as well, and look at the reason given for the device's target.
    const relay = await startTestRelay({ sinks: { hook: { type: 'webhook', preset: 'ntfy', url: 'https://192.0.2.1/mattermost' } }, store: 'sqlite', dataDir });
    const reply = await push(relay.url, fresh({ device_id: device.token }));
    expect(reply.status).toBe('FAIL');
    expect(reply.error).toContain("the paired device's ntfy topic: https://127.0.0.1:9/: 127.0.0.1 resolves to a private address");
    expect(reply.error).not.toContain('internal');
  });
});

describe('config', () => {
  it('refuses body with a preset, and a template body without a template', async () => {
    await expect(startTestRelay({ sinks: { hook: { type: 'webhook', preset: 'ntfy', url: 'https://ntfy.sh/x', body: 'json' } } })).rejects.toThrow(/sinks\.hook\.body: preset ntfy has its own body/);
    await expect(startTestRelay({ sinks: { hook: { type: 'webhook', url: 'https://x.example/', body: 'template' } } })).rejects.toThrow(/sinks\.hook\.template: required/);
    await expect(startTestRelay({ sinks: { hook: { type: 'webhook', url: 'ftp://x.example/' } } })).rejects.toThrow(/sinks\.hook\.url: must be an http/);
    await expect(startTestRelay({ sinks: { hook: { type: 'webhook', url: 'https://x.example/', headers: { 'X-A': 'a\r\nInjected: 1' } } } })).rejects.toThrow(/line breaks/);
  });
});
