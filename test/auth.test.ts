// Who may call the relay: each ingress mode alone (basic auth, secret base path, IP allowlist,
// admin token) accepted and refused, on plain HTTP and on HTTPS the relay serves itself;
// X-Forwarded-For believed only from server.trustProxy; refusals counted and logged once per
// client and minute. Real sockets on 127.0.0.1, a certificate made at run time.
import { Writable } from 'node:stream';
import pino from 'pino';
import { Registry } from 'prom-client';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { parseConfig } from '../src/config.js';
import { createRefusals } from '../src/guards.js';
import { messagePush } from './helpers/payloads.js';
import { startTestRelay } from './helpers/relay.js';
import { call, makeCert, type TestCert } from './helpers/tls-cert.js';

type Relay = Awaited<ReturnType<typeof startTestRelay>>;

const PUSH = JSON.stringify(messagePush({ ack_id: '' }));
const SINKS = { sinks: { log: { type: 'log', level: 'debug' } } };
const basic = (user: string, pass: string) => `Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}`;
const ADMIN_TOKEN = 'admin-token-0123456789abcdef';

let cert: TestCert;
beforeAll(() => {
  cert = makeCert();
});

/** A memory log destination: the lines a relay wrote, parsed. */
function memoryLog() {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString('utf8').split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  return { lines, logger: pino({ level: 'info' }, stream) };
}

describe.each(['http', 'https'] as const)('ingress auth over %s', (scheme) => {
  const relays: Relay[] = [];
  const start = async (server: Record<string, unknown>, extra: Record<string, unknown> = {}) => {
    const tls = scheme === 'https' ? { tls: { cert: cert.cert, key: cert.key } } : {};
    const relay = await startTestRelay({ ...SINKS, ...extra, server: { ...server, ...tls } });
    relays.push(relay);
    expect(relay.url.startsWith(`${scheme}://`)).toBe(true);
    return relay;
  };
  const send = (relay: Relay, path = '/api/v1/send_push', headers: Record<string, string> = {}) =>
    call(`${relay.url}${path}`, { body: PUSH, headers, ca: cert.pem });
  afterAll(async () => {
    await Promise.all(relays.map((r) => r.stop()));
  });

  it('serves the certificate it was given (https only)', async () => {
    if (scheme !== 'https') return;
    const relay = await start({});
    const reply = await send(relay);
    expect(reply.fingerprint).toBe(cert.fingerprint);
    expect(reply.json).toEqual({ status: 'OK' });
  });

  it('basic auth: accepts the configured user and password, refuses none or wrong with 401 and nothing more', async () => {
    const relay = await start({ auth: { username: 'mattermost', password: 'pa55-word' } });
    expect((await send(relay, undefined, { Authorization: basic('mattermost', 'pa55-word') })).json).toEqual({ status: 'OK' });
    const none = await send(relay);
    const wrong = await send(relay, undefined, { Authorization: basic('mattermost', 'pa55-worD') });
    const otherUser = await send(relay, undefined, { Authorization: basic('root', 'pa55-word') });
    for (const r of [none, wrong, otherUser]) {
      expect(r.status).toBe(401);
      expect(r.headers['www-authenticate']).toBe('Basic realm="push-relay"');
      // The same words whatever was wrong: nothing tells a guesser which half was right.
      expect(r.text).toBe(none.text);
      expect(r.text).not.toMatch(/mattermost|pa55/);
    }
  });

  it('secret base path: serves the API under it only', async () => {
    const relay = await start({ basePath: '/s3cret-path' });
    expect((await send(relay, '/s3cret-path/api/v1/send_push')).json).toEqual({ status: 'OK' });
    expect((await send(relay, '/api/v1/send_push')).status).toBe(404);
    expect((await send(relay, '/s3cret-pat/api/v1/send_push')).status).toBe(404);
  });

  it('allowlist: refuses a peer outside server.allow with 403, serves one inside (IPv4)', async () => {
    const outside = await start({ allow: ['10.0.0.0/8', '2001:db8::/32'] });
    const refused = await send(outside);
    expect(refused.status).toBe(403);
    expect(refused.text).toBe('forbidden');
    const inside = await start({ allow: ['10.0.0.0/8', '127.0.0.1/32'] });
    expect((await send(inside)).json).toEqual({ status: 'OK' });
    const single = await start({ allow: ['127.0.0.1'] });
    expect((await send(single)).json).toEqual({ status: 'OK' });
  });

  it('allowlist with IPv6 networks, the client named by a trusted proxy', async () => {
    const relay = await start({ allow: ['2001:db8::/32', '192.0.2.0/24'], trustProxy: ['127.0.0.1/32'] });
    expect((await send(relay, undefined, { 'X-Forwarded-For': '2001:db8:1::5' })).json).toEqual({ status: 'OK' });
    expect((await send(relay, undefined, { 'X-Forwarded-For': '[2001:db8::7]:4711' })).json).toEqual({ status: 'OK' });
    expect((await send(relay, undefined, { 'X-Forwarded-For': '2001:db9::5' })).status).toBe(403);
    expect((await send(relay, undefined, { 'X-Forwarded-For': '::ffff:192.0.2.9' })).json).toEqual({ status: 'OK' });
    expect((await send(relay, undefined, { 'X-Forwarded-For': 'not-an-address' })).status).toBe(403);
  });

  it('admin token: /admin/status needs the bearer token; /metrics too when metricsAuth', async () => {
    const relay = await start({}, { admin: { token: ADMIN_TOKEN, metricsAuth: true } });
    const get = (path: string, headers: Record<string, string> = {}) => call(`${relay.url}${path}`, { method: 'GET', headers, ca: cert.pem });
    for (const path of ['/admin/status', '/metrics']) {
      const none = await get(path);
      expect(none.status).toBe(401);
      expect(none.text).toBe('unauthorized');
      expect((await get(path, { Authorization: `Bearer ${ADMIN_TOKEN}x` })).status).toBe(401);
      expect((await get(path, { Authorization: `Bearer ${ADMIN_TOKEN}` })).status).toBe(200);
    }
    const status = await get('/admin/status', { Authorization: `Bearer ${ADMIN_TOKEN}` });
    expect(status.json).toMatchObject({ sinks: { log: { type: 'log', ready: true } }, guards: { tls: scheme === 'https' } });
    // Mattermost's calls are not the admin's: no token needed there.
    expect((await send(relay)).json).toEqual({ status: 'OK' });
    const open = await start({}, { admin: { token: ADMIN_TOKEN } });
    expect((await call(`${open.url}/metrics`, { method: 'GET', ca: cert.pem })).status).toBe(200);
    expect((await call(`${open.url}/admin/status`, { method: 'GET', ca: cert.pem })).status).toBe(401);
    const none = await start({});
    expect((await call(`${none.url}/admin/status`, { method: 'GET', ca: cert.pem })).status).toBe(404);
  });

  it('every mode at once: only a request that passes all of them is served', async () => {
    const relay = await start({
      basePath: '/hidden',
      auth: { username: 'mm', password: 'pw-all-modes' },
      allow: ['127.0.0.1/32'],
      rateLimit: { perSecond: 1000, burst: 1000 },
    });
    const good = { Authorization: basic('mm', 'pw-all-modes') };
    expect((await send(relay, '/hidden/api/v1/send_push', good)).json).toEqual({ status: 'OK' });
    expect((await send(relay, '/api/v1/send_push', good)).status).toBe(404);
    expect((await send(relay, '/hidden/api/v1/send_push')).status).toBe(401);
    const blocked = await start({ basePath: '/hidden', auth: { username: 'mm', password: 'pw-all-modes' }, allow: ['10.0.0.0/8'] });
    // Outside the allowlist even good credentials get 403: an outsider learns nothing about them.
    expect((await send(blocked, '/hidden/api/v1/send_push', good)).status).toBe(403);
  });
});

describe('X-Forwarded-For', () => {
  const relays: Relay[] = [];
  afterAll(async () => {
    await Promise.all(relays.map((r) => r.stop()));
  });
  const start = async (server: Record<string, unknown>) => {
    const r = await startTestRelay({ ...SINKS, server });
    relays.push(r);
    return r;
  };
  const from = (relay: Relay, xff: string) => call(`${relay.url}/api/v1/send_push`, { body: PUSH, headers: { 'X-Forwarded-For': xff } });

  it('is ignored without server.trustProxy: the peer (127.0.0.1) is the client', async () => {
    const relay = await start({ allow: ['10.0.0.0/8'] });
    expect((await from(relay, '10.1.2.3')).status).toBe(403);
  });

  it('is ignored from a peer that is not in server.trustProxy', async () => {
    const relay = await start({ allow: ['10.0.0.0/8'], trustProxy: ['192.0.2.1/32'] });
    expect((await from(relay, '10.1.2.3')).status).toBe(403);
  });

  it('from a trusted proxy: the right-most address that is not a trusted proxy is the client', async () => {
    const relay = await start({ allow: ['10.0.0.0/8'], trustProxy: ['127.0.0.1/32', '192.168.0.0/16'] });
    expect((await from(relay, '10.1.2.3')).json).toEqual({ status: 'OK' });
    // The client sent "X-Forwarded-For: 10.1.2.3" itself; the proxy appended what it saw.
    expect((await from(relay, '10.1.2.3, 203.0.113.9')).status).toBe(403);
    // Two trusted proxies in a row: the address before them is the client.
    expect((await from(relay, '203.0.113.9, 10.7.7.7, 192.168.1.1')).json).toEqual({ status: 'OK' });
    expect((await from(relay, '10.7.7.7, 203.0.113.9, 192.168.1.1')).status).toBe(403);
  });
});

describe('refusals', () => {
  const relays: Relay[] = [];
  afterAll(async () => {
    await Promise.all(relays.map((r) => r.stop()));
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('are counted by reason in push_relay_refused_requests_total, every series there from the start', async () => {
    const relay = await startTestRelay({ ...SINKS, server: { auth: { username: 'u', password: 'pw-metric' }, allow: ['127.0.0.1/32', '10.0.0.0/8'], trustProxy: ['127.0.0.1/32'] } });
    relays.push(relay);
    const scrape = async () => (await call(`${relay.url}/metrics`, { method: 'GET' })).text;
    const count = (text: string, reason: string) => Number(/ (\d+)$/.exec(text.split('\n').find((l) => l.startsWith(`push_relay_refused_requests_total{reason="${reason}"}`)) ?? '')?.[1]);
    const before = await scrape();
    for (const r of ['not_allowed', 'unauthorized', 'rate_limited', 'admin_token']) expect(count(before, r)).toBe(0);
    for (let i = 0; i < 3; i++) await call(`${relay.url}/api/v1/send_push`, { body: PUSH });
    for (let i = 0; i < 2; i++) await call(`${relay.url}/api/v1/send_push`, { body: PUSH, headers: { 'X-Forwarded-For': '203.0.113.1' } });
    const after = await scrape();
    expect(count(after, 'unauthorized')).toBe(3);
    expect(count(after, 'not_allowed')).toBe(2);
  });

  it('are logged once per client and minute over real sockets, not once per request', async () => {
    const log = memoryLog();
    const relay = await startTestRelay(
      { ...SINKS, server: { auth: { username: 'u', password: 'pw-logging' }, trustProxy: ['127.0.0.1/32'] } },
      { logger: log.logger },
    );
    relays.push(relay);
    const refusedLines = () => log.lines.filter((l) => l.reason === 'unauthorized');
    for (let i = 0; i < 20; i++) expect((await call(`${relay.url}/api/v1/send_push`, { body: PUSH, headers: { 'X-Forwarded-For': '198.51.100.1' } })).status).toBe(401);
    expect(refusedLines()).toHaveLength(1);
    expect(refusedLines()[0]).toMatchObject({ client: '198.51.100.1', level: 40 });
    for (let i = 0; i < 5; i++) await call(`${relay.url}/api/v1/send_push`, { body: PUSH, headers: { 'X-Forwarded-For': '198.51.100.2' } });
    expect(refusedLines()).toHaveLength(2);
    expect(refusedLines()[1]).toMatchObject({ client: '198.51.100.2' });
    // No credential in any of them, not even the wrong one.
    expect(JSON.stringify(log.lines)).not.toContain('pw-logging');
  });

  it('say how many were not logged once the minute is over, and log the client again after it', () => {
    vi.useFakeTimers({ now: 1_000_000 });
    const log = memoryLog();
    const refusals = createRefusals(new Registry(), log.logger);
    for (let i = 0; i < 10; i++) refusals.refused('rate_limited', '192.0.2.7');
    expect(log.lines).toHaveLength(1);
    expect(log.lines[0]).toMatchObject({ level: 50, client: '192.0.2.7', reason: 'rate_limited' });
    vi.advanceTimersByTime(61_000);
    expect(log.lines).toHaveLength(2);
    expect(log.lines[1]).toMatchObject({ client: '192.0.2.7', count: 9 });
    expect(String(log.lines[1]?.msg)).toContain('9 more in the last minute');
    refusals.refused('rate_limited', '192.0.2.7');
    expect(log.lines).toHaveLength(3);
    refusals.stop();
  });

  it('remember a bounded number of clients: a flood of addresses does not grow memory', () => {
    const refusals = createRefusals(new Registry(), pino({ level: 'silent' }));
    for (let i = 0; i < 5000; i++) refusals.refused('not_allowed', `10.0.${i >> 8}.${i & 255}`);
    expect(refusals.size()).toBeGreaterThan(1000);
    expect(refusals.size()).toBeLessThanOrEqual(1024);
    refusals.stop();
  });
});

describe('config of the guards', () => {
  const parse = (server: Record<string, unknown>, admin?: Record<string, unknown>) =>
    parseConfig({ server, ...(admin ? { admin } : {}), sinks: { log: { type: 'log' } } }, {});
  it('accepts CIDRs and single addresses, IPv4 and IPv6', () => {
    expect(parse({ allow: ['10.0.0.0/8', '127.0.0.1', '::1', '2001:db8::/32'], trustProxy: ['0.0.0.0/0'] }).server.allow).toHaveLength(4);
  });
  it.each([['10.0.0.0/33'], ['10.0.0/8'], ['example.com'], ['::1/129'], ['10.0.0.0/8/1']])('refuses %s in server.allow, naming the key', (bad) => {
    expect(() => parse({ allow: [bad] })).toThrow(new RegExp(`server\\.allow\\.0: "${bad.replace(/[./]/g, '\\$&')}" is not an address or CIDR`));
  });
  it('needs admin.token for metricsAuth, and a token of 16 characters or more', () => {
    expect(() => parse({}, { metricsAuth: true })).toThrow(/admin\.metricsAuth: needs admin\.token/);
    expect(() => parse({}, { token: 'short' })).toThrow(/admin\.token: use at least 16 characters/);
  });
  it('fills burst from perSecond when it is left out, and refuses a headers timeout longer than the request timeout', () => {
    expect(parse({ rateLimit: { perSecond: 100 } }).server.rateLimit).toEqual({ perSecond: 100, burst: 200 });
    expect(() => parse({ headersTimeout: '40s', requestTimeout: '30s' })).toThrow(/server\.headersTimeout: must not be longer than server\.requestTimeout/);
  });
});
