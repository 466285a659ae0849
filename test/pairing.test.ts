// Pairing a browser with Mattermost (src/pairing.ts) against a local Mattermost that speaks the
// real login/logout/me/sessions-device calls (test/helpers/mattermost-fake.ts), through the
// relay's real HTTP server: what the page is told, what Mattermost receives, and what the relay
// keeps (its SQLite files, its trace-level log).
import { randomBytes } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { networkInterfaces } from 'node:os';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { shortToken } from '../src/contract.js';
import { createDeviceRegistry, mattermostDeviceId, type DeviceRegistry } from '../src/devices.js';
import { createLogger } from '../src/log.js';
import { memoryKv, openStore, type Store } from '../src/store/index.js';
import { servePairing } from './helpers/browser.js';
import { get, post, type Reply } from './helpers/http.js';
import { startMattermostFake, type MattermostFake } from './helpers/mattermost-fake.js';
import { freePort } from './helpers/ports.js';
import { startTestRelay } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';
import { sleep, until } from './helpers/wait.js';

const ALICE_PASSWORD = 'correct horse battery staple 7Zq!';
const BOB_PASSWORD = 'bob-s3cret-Passw0rd-xyz';
const CAROL_PAT = 'k9x3pq7r1m5t8w2y4z6a0b1c3d';
const USERS = [
  { username: 'alice', email: 'alice@example.com', password: ALICE_PASSWORD },
  { username: 'bob', email: 'bob@example.com', password: BOB_PASSWORD, mfaCode: '123456' },
  { username: 'carol', email: 'carol@example.com', password: 'carol-has-sso-only-9f8e7d', accessTokens: [CAROL_PAT] },
  { username: 'dave', email: 'dave@example.com', password: 'dave-password-1a2b3c' },
  { username: 'erin', email: 'erin@example.com', password: 'erin-password-4d5e6f' },
];

/** A browser's PushSubscription.toJSON(), with keys of the real sizes (P-256 point, 16-byte secret). */
function subscription() {
  return {
    endpoint: `https://push.example.net/wpush/v2/${randomBytes(16).toString('base64url')}`,
    expirationTime: null,
    keys: { p256dh: randomBytes(65).toString('base64url'), auth: randomBytes(16).toString('base64url') },
  };
}

function logCapture() {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(chunk.toString('utf8'));
      cb();
    },
  });
  return { lines, logger: createLogger({ level: 'trace', format: 'json' }, stream) };
}

/** A JSON call as the page makes it: same origin, Content-Type application/json. */
function pageCall(base: string, path: string, body: unknown, headers: Record<string, string> = {}): Promise<Reply> {
  return post(base + path, JSON.stringify(body), { headers: { 'Content-Type': 'application/json', Origin: base, ...headers } });
}

const answer = (r: Reply) => r.json as { ok: boolean; error?: string; message?: string; device?: string; status?: Record<string, unknown> } & Record<string, unknown>;

describe('pairing with a Mattermost login', () => {
  let mm: MattermostFake;
  let base: string;
  let dataDir: string;
  let reader: Store;
  let devices: DeviceRegistry;
  const logs = logCapture();

  beforeAll(async () => {
    mm = await startMattermostFake(USERS);
    dataDir = tempDir('push-relay-pairing-');
    const relay = await startTestRelay(
      {
        mattermost: { url: mm.url },
        store: 'sqlite',
        dataDir,
        sinks: { log: { type: 'log' } },
        routes: [{ match: { paired: true }, sinks: ['log'] }],
      },
      { logger: logs.logger },
    );
    base = relay.url;
    // A second handle on the relay's SQLite file (not the owner): what the relay stored.
    reader = (await openStore('sqlite', dataDir, false)) as Store;
    devices = createDeviceRegistry(reader.kv('devices'));
  });
  afterAll(async () => {
    await reader?.close();
  });

  it('pairs: the device exists, Mattermost got device_id android_rn-v2:<token>, the session token stays on the relay', async () => {
    const sub = subscription();
    const r = await pageCall(base, '/pair/login', { loginId: 'alice', password: ALICE_PASSWORD, subscription: sub, label: 'Laptop' });
    expect(r.status).toBe(200);
    const a = answer(r);
    expect(a).toMatchObject({ ok: true, status: { label: 'Laptop', account: { username: 'alice', email: 'alice@example.com' }, sessionExpired: false } });
    const token = a.device as string;
    expect(token).toMatch(/^pr1[A-Za-z0-9_-]{24}$/);

    const login = mm.calls('/api/v4/users/login').at(-1)!;
    expect(login.json).toEqual({ login_id: 'alice', password: ALICE_PASSWORD, device_id: `android_rn-v2:${token}` });
    expect(mattermostDeviceId(token)).toBe(`android_rn-v2:${token}`);
    const session = mm.sessions.find((s) => s.deviceId === `android_rn-v2:${token}`)!;
    expect(session).toBeDefined();

    const stored = await devices.get(token);
    expect(stored?.targets.webpush).toEqual([sub]);
    expect(stored?.account).toMatchObject({ username: 'alice', email: 'alice@example.com' });
    expect(stored?.session?.token).toBe(session.token);
    // Never sent to the browser.
    expect(r.text).not.toContain(session.token);
  });

  it('a wrong password: 401, a message that says so, and no device left behind', async () => {
    const before = (await devices.list()).length;
    const r = await pageCall(base, '/pair/login', { loginId: 'alice', password: 'not-the-password', subscription: subscription() });
    expect(r.status).toBe(401);
    expect(answer(r)).toMatchObject({ ok: false, error: 'invalid_credentials', message: 'The login or the password is wrong.' });
    expect((await devices.list()).length).toBe(before);
    // Mattermost's real answer was what the relay translated.
    expect(mm.calls('/api/v4/users/login').at(-1)!.json).toMatchObject({ login_id: 'alice', password: 'not-the-password' });
  });

  it('MFA: the first answer asks for the code, a wrong code says so, the right code pairs', async () => {
    const sub = subscription();
    const first = await pageCall(base, '/pair/login', { loginId: 'bob', password: BOB_PASSWORD, subscription: sub });
    expect(first.status).toBe(401);
    expect(answer(first)).toMatchObject({ ok: false, error: 'mfa_required', message: 'Enter the code from your authenticator app.' });
    expect(mm.calls('/api/v4/users/login').at(-1)!.json).not.toHaveProperty('token');

    const wrong = await pageCall(base, '/pair/login', { loginId: 'bob', password: BOB_PASSWORD, mfaToken: '654321', subscription: sub });
    expect(wrong.status).toBe(401);
    expect(answer(wrong)).toMatchObject({ error: 'mfa_invalid', message: expect.stringMatching(/code is not right/) });

    const second = await pageCall(base, '/pair/login', { loginId: 'bob', password: BOB_PASSWORD, mfaToken: '123456', subscription: sub });
    expect(second.status).toBe(200);
    const token = answer(second).device as string;
    expect(mm.calls('/api/v4/users/login').at(-1)!.json).toEqual({
      login_id: 'bob',
      password: BOB_PASSWORD,
      token: '123456',
      device_id: `android_rn-v2:${token}`,
    });
    expect((await devices.get(token))?.account?.username).toBe('bob');
  });

  it('unpair: logs the session out with its own token and deletes the device', async () => {
    const paired = answer(await pageCall(base, '/pair/login', { loginId: 'alice', password: ALICE_PASSWORD, subscription: subscription() }));
    const token = paired.device as string;
    const sessionToken = (await devices.get(token))!.session!.token;

    const r = await pageCall(base, '/pair/unpair', { device: token });
    expect(r.status).toBe(200);
    expect(answer(r)).toMatchObject({ ok: true, loggedOut: true, message: expect.stringMatching(/^Unpaired/) });
    const logout = mm.calls('/api/v4/users/logout').at(-1)!;
    expect(logout.headers.authorization).toBe(`Bearer ${sessionToken}`);
    expect(mm.sessions.find((s) => s.token === sessionToken)?.revoked).toBe(true);
    expect(await devices.get(token)).toBeUndefined();

    const after = await pageCall(base, '/pair/status', { device: token });
    expect(after.status).toBe(404);
    expect(answer(after)).toMatchObject({ error: 'not_paired', message: expect.stringMatching(/not paired/) });
  });

  it('a new pairing replaces the one the browser had before, and logs that one out', async () => {
    const old = answer(await pageCall(base, '/pair/login', { loginId: 'alice', password: ALICE_PASSWORD, subscription: subscription() })).device as string;
    const oldSession = (await devices.get(old))!.session!.token;
    const r = await pageCall(base, '/pair/login', { loginId: 'alice', password: ALICE_PASSWORD, subscription: subscription(), previous: old });
    expect(r.status).toBe(200);
    expect(await devices.get(old)).toBeUndefined();
    expect(mm.sessions.find((s) => s.token === oldSession)?.revoked).toBe(true);
  });

  it('"send me a test notification" sends a test push through the routes to the device', async () => {
    const token = answer(await pageCall(base, '/pair/login', { loginId: 'dave', password: USERS[3]!.password, subscription: subscription() })).device as string;
    const r = await pageCall(base, '/pair/test', { device: token });
    expect(r.status).toBe(200);
    expect(answer(r)).toMatchObject({ ok: true, message: expect.stringMatching(/Test notification sent/) });
    // The log sink (route paired: true) got it: a `test` push for this device.
    const seen = logs.lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.sink === 'log' && l.msg === 'notification');
    expect(seen.at(-1)).toMatchObject({ type: 'test', platform: 'android_rn', device: shortToken(token) });
  });

  it('settings: "also email me" uses the account\'s own address; an ntfy topic must be an https URL on a public host', async () => {
    const token = answer(await pageCall(base, '/pair/login', { loginId: 'erin', password: USERS[4]!.password, subscription: subscription() })).device as string;

    const on = await pageCall(base, '/pair/settings', { device: token, email: true });
    expect(answer(on)).toMatchObject({ ok: true, status: { email: true } });
    expect((await devices.get(token))?.targets.email).toBe('erin@example.com');
    const off = await pageCall(base, '/pair/settings', { device: token, email: false });
    expect(answer(off)).toMatchObject({ ok: true, status: { email: false } });
    expect((await devices.get(token))?.targets.email).toBeUndefined();

    const good = await pageCall(base, '/pair/settings', { device: token, ntfy: 'https://9.9.9.9/erin-topic' });
    expect(answer(good)).toMatchObject({ ok: true, status: { ntfy: 'https://9.9.9.9/erin-topic' } });
    for (const [bad, why] of [
      ['http://9.9.9.9/topic', /only https/],
      ['https://127.0.0.1/topic', /private address/],
      ['https://192.168.1.10/topic', /private address/],
      ['https://9.9.9.9/a/b', /one topic/],
      ['not a url', /not a URL/],
    ] as const) {
      const r = await pageCall(base, '/pair/settings', { device: token, ntfy: bad });
      expect(r.status, bad).toBe(400);
      expect(answer(r), bad).toMatchObject({ error: 'invalid_ntfy', message: expect.stringMatching(why) });
    }
    expect((await devices.get(token))?.targets.ntfy).toBe('https://9.9.9.9/erin-topic');
    const removed = await pageCall(base, '/pair/settings', { device: token, ntfy: '' });
    expect(answer(removed)).toMatchObject({ ok: true, status: { ntfy: null } });
  });

  it('the passwords are in no file of the store and in no log line at trace level; neither are session tokens', async () => {
    // Mattermost saw them (so this test can fail) ...
    const sent = mm.calls('/api/v4/users/login').map((c) => c.text).join('\n');
    for (const pw of [ALICE_PASSWORD, BOB_PASSWORD]) expect(sent).toContain(pw);
    expect(logs.lines.length).toBeGreaterThan(10);
    // ... the relay kept none of them: every file of the SQLite store (db, WAL, shm) byte by byte,
    const files = readdirSync(dataDir).map((f) => readFileSync(join(dataDir, f)));
    expect(files.length).toBeGreaterThan(0);
    const tokens = mm.sessions.map((s) => s.token);
    for (const secret of [ALICE_PASSWORD, BOB_PASSWORD, 'not-the-password']) {
      for (const f of files) expect(f.includes(Buffer.from(secret))).toBe(false);
    }
    // (the live session tokens are in the store, by design: unpair and keep-alive need them)
    expect(files.some((f) => tokens.some((t) => f.includes(Buffer.from(t))))).toBe(true);
    // ... and the log, at trace level, has neither passwords nor session tokens.
    const log = logs.lines.join('');
    for (const secret of [ALICE_PASSWORD, BOB_PASSWORD, 'not-the-password', ...tokens]) expect(log).not.toContain(secret);
  });

  it('refuses a cross-origin POST and a form POST (no CSRF), before Mattermost hears of it', async () => {
    const calls = mm.received.length;
    const body = { loginId: 'alice', password: ALICE_PASSWORD, subscription: subscription() };
    const cross = await pageCall(base, '/pair/login', body, { Origin: 'https://evil.example' });
    expect(cross.status).toBe(403);
    expect(answer(cross)).toMatchObject({ error: 'cross_origin', message: expect.stringMatching(/other sites are refused/) });
    const nullOrigin = await pageCall(base, '/pair/login', body, { Origin: 'null' });
    expect(nullOrigin.status).toBe(403);
    const crossSite = await pageCall(base, '/pair/login', body, { 'Sec-Fetch-Site': 'cross-site' });
    expect(crossSite.status).toBe(403);
    // What a cross-site <form> can send without a CORS preflight:
    for (const type of ['application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'text/plain']) {
      const r = await post(`${base}/pair/login`, type === 'text/plain' ? JSON.stringify(body) : 'loginId=alice&password=x', {
        headers: { 'Content-Type': type, Origin: base },
      });
      expect(r.status, type).toBe(415);
      expect(answer(r)).toMatchObject({ error: 'json_only' });
    }
    expect(mm.received.length).toBe(calls);
  });

  it('refuses a body over 16 kB (chunked too) and a subscription that is not https, with what is wrong', async () => {
    const big = JSON.stringify({ loginId: 'alice', password: 'x'.repeat(20_000), subscription: subscription() });
    for (const chunked of [false, true]) {
      const r = await post(`${base}/pair/login`, big, { headers: { 'Content-Type': 'application/json', Origin: base }, chunked });
      expect(r.status, `chunked: ${chunked}`).toBe(413);
      expect(answer(r)).toMatchObject({ error: 'too_large' });
    }
    const http = await pageCall(base, '/pair/login', { loginId: 'alice', password: 'x', subscription: { ...subscription(), endpoint: 'http://push.example.net/x' } });
    expect(http.status).toBe(400);
    expect(answer(http)).toMatchObject({ error: 'invalid_request', message: 'subscription.endpoint must be an https URL' });
    const missing = await pageCall(base, '/pair/login', { loginId: 'alice', subscription: subscription() });
    expect(answer(missing)).toMatchObject({ error: 'invalid_request', message: 'Enter your password.' });
    const noKeys = await pageCall(base, '/pair/login', { loginId: 'alice', password: 'x', subscription: { endpoint: 'https://push.example.net/x' } });
    expect(answer(noKeys)).toMatchObject({ error: 'invalid_request', message: 'subscription.keys: Invalid input: expected object, received undefined' });
  });

  it('serves the page and its files with a strict Content-Security-Policy and no inline script', async () => {
    const page = await get(`${base}/`);
    expect(page.status).toBe(200);
    expect(page.headers['content-type']).toBe('text/html; charset=utf-8');
    const csp = page.headers['content-security-policy'] as string;
    expect(csp).toContain("default-src 'self'");
    expect(csp).toContain("script-src 'self'");
    expect(csp).toContain("frame-ancestors 'none'");
    expect(csp).not.toContain('unsafe');
    expect(page.headers['x-content-type-options']).toBe('nosniff');
    expect(page.headers['referrer-policy']).toBe('no-referrer');
    expect(page.text).toMatch(/<script src="\/app\.js" defer><\/script>/);
    expect(page.text).not.toMatch(/<script(?![^>]*\ssrc=)[^>]*>/); // every script comes from a file
    expect(page.text).not.toMatch(/\son[a-z]+="|\sstyle="/); // no inline handlers or styles
    for (const [path, type] of [
      ['/app.js', 'text/javascript; charset=utf-8'],
      ['/sw.js', 'text/javascript; charset=utf-8'],
      ['/style.css', 'text/css; charset=utf-8'],
      ['/manifest.webmanifest', 'application/manifest+json'],
      ['/icon.svg', 'image/svg+xml'],
      ['/apple-touch-icon.png', 'image/png'],
      ['/icon-192.png', 'image/png'],
      ['/icon-512.png', 'image/png'],
    ] as const) {
      const r = await get(base + path);
      expect(r.status, path).toBe(200);
      expect(r.headers['content-type'], path).toBe(type);
    }
    // The headers are the page's own: the relay's other endpoints do not get them.
    expect((await get(`${base}/healthz`)).headers['content-security-policy']).toBeUndefined();
    const config = (await get(`${base}/pair/config`)).json;
    expect(config).toEqual({ mattermost: { configured: true, host: new URL(mm.url).host, url: mm.url }, vapidPublicKey: null, secure: true });
  });
});

describe('pairing with a personal access token (accounts that sign in with SSO)', () => {
  let mm: MattermostFake;
  let base: string;
  let devices: DeviceRegistry;
  let reader: Store;

  beforeAll(async () => {
    mm = await startMattermostFake(USERS);
    const dataDir = tempDir('push-relay-pairing-pat-');
    base = (await startTestRelay({ mattermost: { url: mm.url }, store: 'sqlite', dataDir, sinks: { log: { type: 'log' } } })).url;
    reader = (await openStore('sqlite', dataDir, false)) as Store;
    devices = createDeviceRegistry(reader.kv('devices'));
  });
  afterAll(async () => {
    await reader?.close();
  });

  it('attaches the device id to the token\'s own session with PUT /api/v4/users/sessions/device', async () => {
    const r = await pageCall(base, '/pair/token', { accessToken: CAROL_PAT, subscription: subscription() });
    expect(r.status).toBe(200);
    const a = answer(r);
    expect(a).toMatchObject({ ok: true, status: { account: { username: 'carol' } } });
    const token = a.device as string;
    const put = mm.calls('/api/v4/users/sessions/device').at(-1)!;
    expect(put.method).toBe('PUT');
    expect(put.headers.authorization).toBe(`Bearer ${CAROL_PAT}`);
    expect(put.json).toEqual({ device_id: `android_rn-v2:${token}` });
    expect(mm.sessions.find((s) => s.kind === 'access_token')?.deviceId).toBe(`android_rn-v2:${token}`);

    const unpaired = await pageCall(base, '/pair/unpair', { device: token });
    expect(answer(unpaired)).toMatchObject({ ok: true, loggedOut: true });
    expect(mm.calls('/api/v4/users/logout').at(-1)!.headers.authorization).toBe(`Bearer ${CAROL_PAT}`);
    expect(await devices.get(token)).toBeUndefined();
  });

  it('a token Mattermost does not know: 401 with what to do, and no device', async () => {
    const before = (await devices.list()).length;
    const r = await pageCall(base, '/pair/token', { accessToken: 'wrongtokenwrongtokenwrongt', subscription: subscription() });
    expect(r.status).toBe(401);
    expect(answer(r)).toMatchObject({ error: 'invalid_token', message: expect.stringMatching(/Personal Access Tokens/) });
    expect((await devices.list()).length).toBe(before);
  });
});

describe('the pairing endpoint as an attack surface', () => {
  it('a burst of wrong passwords for one login: Mattermost sees 5, the rest get 429 with a clear message', async () => {
    const mm = await startMattermostFake(USERS);
    const base = (await startTestRelay({ mattermost: { url: mm.url }, sinks: { log: { type: 'log' } } })).url;
    const replies = await Promise.all(
      Array.from({ length: 20 }, (_, i) => pageCall(base, '/pair/login', { loginId: i % 2 ? 'Dave' : 'dave', password: `guess-${i}`, subscription: subscription() })),
    );
    const statuses = replies.map((r) => r.status);
    expect(statuses.filter((s) => s === 401)).toHaveLength(5);
    expect(statuses.filter((s) => s === 429)).toHaveLength(15);
    const limited = replies.find((r) => r.status === 429)!;
    expect(answer(limited)).toMatchObject({ error: 'rate_limited', message: expect.stringMatching(/^Too many sign-in attempts for this login\. Wait \d+ seconds? and try again\.$/) });
    expect(Number(limited.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    expect(mm.calls('/api/v4/users/login')).toHaveLength(5);
    // The right password now waits too: the bucket is per login id, whoever is asking.
    const right = await pageCall(base, '/pair/login', { loginId: 'dave', password: USERS[3]!.password, subscription: subscription() });
    expect(right.status).toBe(429);
    expect(mm.calls('/api/v4/users/login')).toHaveLength(5);
  });

  it('one address spreading guesses over many logins: Mattermost sees 20', async () => {
    const mm = await startMattermostFake(USERS);
    const base = (await startTestRelay({ mattermost: { url: mm.url }, sinks: { log: { type: 'log' } } })).url;
    const replies = await Promise.all(
      Array.from({ length: 30 }, (_, i) => pageCall(base, '/pair/login', { loginId: `user${i}`, password: 'guess', subscription: subscription() })),
    );
    expect(replies.filter((r) => r.status === 401)).toHaveLength(20);
    const limited = replies.filter((r) => r.status === 429);
    expect(limited).toHaveLength(10);
    expect(answer(limited[0]!).message).toMatch(/^Too many sign-in attempts from your network\./);
    expect(mm.calls('/api/v4/users/login')).toHaveLength(20);
  });

  it('plain HTTP from an address that is not loopback is refused with a message about TLS', async (ctx) => {
    // An honest non-loopback peer without leaving the machine: the relay listens on 127.0.0.1
    // as always, and the client binds its socket to this machine's own interface address
    // (e.g. 192.0.2.2 on eth0), so the relay sees that address as the peer.
    const own = Object.values(networkInterfaces())
      .flat()
      .find((i) => i && i.family === 'IPv4' && !i.internal)?.address;
    if (!own) {
      if (process.env.CI === 'true') throw new Error('no non-loopback IPv4 interface to test from');
      console.warn('skipped: this machine has no non-loopback IPv4 interface to connect from');
      return ctx.skip();
    }
    const mm = await startMattermostFake(USERS);
    const base = (await startTestRelay({ mattermost: { url: mm.url }, sinks: { log: { type: 'log' } } })).url;
    const body = JSON.stringify({ loginId: 'alice', password: ALICE_PASSWORD, subscription: subscription() });
    const reply = await new Promise<{ status: number; json: Record<string, unknown> }>((resolve, reject) => {
      const req = httpRequest(
        `${base}/pair/login`,
        { method: 'POST', localAddress: own, agent: false, headers: { 'Content-Type': 'application/json', Origin: base, 'Content-Length': Buffer.byteLength(body) } },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(chunks).toString()) as Record<string, unknown> }));
        },
      );
      req.on('error', reject);
      req.end(body);
    });
    expect(reply.status).toBe(403);
    expect(reply.json).toMatchObject({ ok: false, error: 'insecure', message: expect.stringMatching(/plain HTTP.*behind a TLS proxy/) });
    expect(mm.received).toHaveLength(0);
    // The same request from loopback goes through.
    const local = await pageCall(base, '/pair/login', JSON.parse(body));
    expect(local.status).toBe(200);
  });

  it('without mattermost.url the page is told the administrator must set it', async () => {
    const base = (await startTestRelay({ sinks: { log: { type: 'log' } } })).url;
    const r = await pageCall(base, '/pair/login', { loginId: 'alice', password: 'x', subscription: subscription() });
    expect(r.status).toBe(503);
    expect(answer(r)).toMatchObject({ error: 'not_configured', message: expect.stringMatching(/mattermost\.url/) });
    expect((await get(`${base}/pair/config`)).json).toMatchObject({ mattermost: { configured: false } });
  });

  it('Mattermost unreachable: 502 with a clear message, and no device left behind', async () => {
    const devices = createDeviceRegistry(memoryKv()('devices'));
    const closed = await freePort(); // nothing listens there
    const served = await servePairing({ mattermost: { url: `http://127.0.0.1:${closed}` } }, devices);
    const r = await pageCall(served.base, '/pair/login', { loginId: 'alice', password: 'x', subscription: subscription() });
    expect(r.status).toBe(502);
    expect(answer(r)).toMatchObject({ error: 'mattermost_unreachable', message: expect.stringMatching(/could not reach Mattermost \(ECONNREFUSED\)/) });
    expect(await devices.list()).toHaveLength(0);
  });
});

describe('keep-alive', () => {
  it('touches each paired session with GET /users/me, and a 401 there marks the pairing expired; the device keeps its targets', async () => {
    const mm = await startMattermostFake(USERS);
    const devices = createDeviceRegistry(memoryKv()('devices'));
    const { base, pairing } = await servePairing({ mattermost: { url: mm.url, keepAlive: '300ms' } }, devices);
    const token = answer(await pageCall(base, '/pair/login', { loginId: 'alice', password: ALICE_PASSWORD, subscription: subscription() })).device as string;
    const sessionToken = (await devices.get(token))!.session!.token;

    // The timer's rounds call /users/me with the session's own token.
    await until('a keep-alive call', () => mm.calls('/api/v4/users/me').some((c) => c.headers.authorization === `Bearer ${sessionToken}`), { timeoutMs: 5000 });
    const refreshed = (await devices.get(token))!.session!.lastRefreshAt!;
    expect(refreshed).toBeGreaterThan((await devices.get(token))!.session!.createdAt);

    mm.expire(sessionToken);
    await sleep(200); // past half the interval: not fresh any more
    const round = await pairing.keepAliveNow();
    const after = await devices.get(token);
    if (after?.session) throw new Error(`session still there after the round ${JSON.stringify(round)}`);
    expect(after?.targets.webpush).toHaveLength(1);
    const status = answer(await pageCall(base, '/pair/status', { device: token }));
    expect(status).toMatchObject({ ok: true, status: { sessionExpired: true, account: { username: 'alice' } } });
    // Unpair now only deletes: there is no session to log out.
    const logouts = mm.calls('/api/v4/users/logout').length;
    expect(answer(await pageCall(base, '/pair/unpair', { device: token }))).toMatchObject({ ok: true, loggedOut: false });
    expect(mm.calls('/api/v4/users/logout')).toHaveLength(logouts);
  });
});
