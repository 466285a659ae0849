// Reloading a running relay (the CLI as a user runs it, real signals, a real mosquitto and
// subscriber): a valid config swapped in by SIGHUP under a stream of pushes loses and
// duplicates nothing; an invalid one is refused with the key named and the old one keeps
// serving; a change of the file is picked up without a signal; a new TLS certificate is
// what the next connection sees.
import { copyFileSync, writeFileSync } from 'node:fs';
import webPush from 'web-push';
import { Agent } from 'node:http';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { post } from './helpers/http.js';
import { haveMosquitto, startMosquitto, type Mosquitto } from './helpers/mosquitto.js';
import { subscribe, type Subscriber } from './helpers/mqtt.js';
import { messagePush } from './helpers/payloads.js';
import { spawnRelay, startTestRelay, type RelayProcess } from './helpers/relay.js';
import { freePort } from './helpers/ports.js';
import { parseConfig } from '../src/config.js';
import { openStore } from '../src/store/index.js';
import { call, makeCert } from './helpers/tls-cert.js';
import { tempDir } from './helpers/tmp.js';
import { sleep, until } from './helpers/wait.js';

let seq = 0;
const ackId = (tag: string) => `${tag}${process.pid.toString(36)}x`.padEnd(14, '0').slice(0, 14) + (++seq).toString(36).padStart(12, '0');

describe.skipIf(!haveMosquitto())('reload', () => {
  let broker: Mosquitto;
  let sub: Subscriber;
  let relay: RelayProcess;
  let file: string;
  const config = (topic: string, extra: Record<string, unknown> = {}) => ({
    delivery: { deadline: '3s' },
    sinks: { notif: { type: 'mqtt', url: broker.url, topic, format: 'json', qos: 1 } },
    ...extra,
  });
  const write = (c: unknown) => writeFileSync(file, JSON.stringify(c, null, 2));
  const push = (id: string) => post(`${relay.url}/api/v1/send_push`, JSON.stringify(messagePush({ ack_id: id })));
  const received = (topic?: string) =>
    sub.messages.filter((m) => topic === undefined || m.topic === topic).map((m) => (JSON.parse(m.payload.toString('utf8')) as { ack_id: string }).ack_id);
  const reloadedLines = () => relay.logs().filter((l) => /^config reloaded/.test(String(l.msg)));

  beforeAll(async () => {
    broker = await startMosquitto();
    sub = await subscribe(broker.url, 'reload/#');
    file = join(tempDir('push-relay-reload-'), 'config.json');
    write(config('reload/a'));
    relay = await spawnRelay({ args: ['serve', '--config', file] });
  });
  afterAll(async () => {
    await relay?.stop();
    await sub?.close();
    await broker?.stop();
  });

  it('survives SIGHUP: the relay keeps running (Node would exit)', async () => {
    relay.proc.kill('SIGHUP');
    await until('a reload line', () => reloadedLines().length >= 1);
    expect(String(reloadedLines()[0]?.msg)).toBe('config reloaded: nothing changed');
    expect(relay.proc.exitCode).toBeNull();
    expect((await push(ackId('hup'))).json).toEqual({ status: 'OK' });
  });

  it('swaps a sink under a stream of pushes: every push answered OK, each delivered exactly once, the later ones on the new topic', async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 8 });
    const ids: string[] = [];
    const replies: unknown[] = [];
    const TOTAL = 600;
    let next = 0;
    let swappedAt = -1;
    const before = reloadedLines().length;
    const worker = async () => {
      while (next < TOTAL) {
        const i = next++;
        const id = ackId('load');
        ids[i] = id;
        if (i === 200) {
          // Mid-stream: a new topic (a changed sink: a new instance, a new connection).
          write(config('reload/b'));
          relay.proc.kill('SIGHUP');
          swappedAt = i;
        }
        replies[i] = (await post(`${relay.url}/api/v1/send_push`, JSON.stringify(messagePush({ ack_id: id })), { agent })).json;
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    agent.destroy();
    expect(swappedAt).toBe(200);
    expect(replies.filter((r) => JSON.stringify(r) !== '{"status":"OK"}')).toEqual([]);
    await until('the reload line', () => reloadedLines().length > before);
    expect(String(reloadedLines().at(-1)?.msg)).toMatch(/sink notif rebuilt/);

    await until('every push at the subscriber', () => ids.every((id) => received().includes(id)), { timeoutMs: 15_000 });
    await sleep(300); // anything duplicated would arrive by now
    const got = received().filter((id) => id.startsWith('load'));
    const counts = new Map<string, number>();
    for (const id of got) counts.set(id, (counts.get(id) ?? 0) + 1);
    expect([...counts.values()].filter((n) => n > 1)).toEqual([]);
    expect(counts.size).toBe(TOTAL);
    const onA = received('reload/a').filter((id) => ids.includes(id)).length;
    const onB = received('reload/b').filter((id) => ids.includes(id)).length;
    console.log(`reload under load: ${TOTAL} pushes, ${onA} on the old topic, ${onB} on the new one, 0 lost, 0 duplicated`);
    expect(onA).toBeGreaterThan(100);
    expect(onB).toBeGreaterThan(100);
    // The last pushes all went to the new sink.
    for (const id of ids.slice(-50)) expect(received('reload/b')).toContain(id);
  });

  it('refuses an invalid config with the key named, and keeps serving with the old one', async () => {
    const errorsBefore = relay.logs().filter((l) => /reload refused/.test(String(l.msg))).length;
    const bad = config('reload/c') as { sinks: { notif: Record<string, unknown> } };
    bad.sinks.notif.qos = 7;
    write(bad);
    relay.proc.kill('SIGHUP');
    await until('a refusal', () => relay.logs().filter((l) => /reload refused/.test(String(l.msg))).length > errorsBefore);
    const line = relay.logs().filter((l) => /reload refused/.test(String(l.msg))).at(-1)!;
    expect(line.level).toBe(50);
    expect(String(line.msg)).toMatch(/sinks\.notif\.qos/);

    const id = ackId('kept');
    expect((await push(id)).json).toEqual({ status: 'OK' });
    await until('the push on the old topic', () => received('reload/b').includes(id));

    // A key that cannot change live is refused too, named with what to do.
    const n = relay.logs().filter((l) => /reload refused/.test(String(l.msg))).length;
    write(config('reload/b', { store: 'none' }));
    relay.proc.kill('SIGHUP');
    await until('a refusal', () => relay.logs().filter((l) => /reload refused/.test(String(l.msg))).length > n);
    expect(String(relay.logs().filter((l) => /reload refused/.test(String(l.msg))).at(-1)?.msg)).toMatch(/store: cannot change while running .* restart/);
    write(config('reload/b'));
    relay.proc.kill('SIGHUP');
    await sleep(500);
  });

  it('picks up a change of the config file without a signal', async () => {
    const before = reloadedLines().length;
    write(config('reload/d'));
    await until('a reload from the file watcher', () => reloadedLines().length > before, { timeoutMs: 5000 });
    expect(reloadedLines().at(-1)).toMatchObject({ trigger: 'file changed' });
    const id = ackId('file');
    expect((await push(id)).json).toEqual({ status: 'OK' });
    await until('the push on the new topic', () => received('reload/d').includes(id));
  });
});

describe('reload of TLS files', () => {
  let relay: RelayProcess;
  afterAll(async () => {
    await relay?.stop();
  });

  it('serves a new certificate and key to the next connection after SIGHUP, with no restart', async () => {
    const dir = tempDir('push-relay-tls-live-');
    const first = makeCert('localhost', dir);
    const second = makeCert('localhost', dir);
    const cert = join(dir, 'live-cert.pem');
    const key = join(dir, 'live-key.pem');
    copyFileSync(first.cert, cert);
    copyFileSync(first.key, key);
    const file = join(tempDir('push-relay-tls-conf-'), 'config.json');
    writeFileSync(file, JSON.stringify({ server: { tls: { cert, key } }, store: 'none', sinks: { log: { type: 'log' } } }));
    relay = await spawnRelay({ args: ['serve', '--config', file], waitReady: false });
    const banner = await relay.waitForLine(/set Mattermost's Push Notification Server/, 10_000);
    // The banner names https and the certificate's host: what Mattermost must be given.
    expect(banner).toContain(`https://localhost:${relay.port}`);
    expect(await relay.waitForLine(/listening on https:\/\//)).toContain('TLS, certificate for localhost, 127.0.0.1');
    const url = `https://127.0.0.1:${relay.port}/api/v1/send_push`;
    const body = JSON.stringify(messagePush({ ack_id: '' }));
    const r1 = await call(url, { body, ca: Buffer.concat([first.pem, second.pem]) });
    expect(r1.json).toEqual({ status: 'OK' });
    expect(r1.fingerprint).toBe(first.fingerprint);

    // What certbot's deploy hook does: replace the files, then SIGHUP.
    copyFileSync(second.cert, cert);
    copyFileSync(second.key, key);
    relay.proc.kill('SIGHUP');
    await until('the reload line', () => relay.logs().some((l) => /^config reloaded: tls certificate/.test(String(l.msg))));
    const r2 = await call(url, { body, ca: Buffer.concat([first.pem, second.pem]) });
    expect(r2.json).toEqual({ status: 'OK' });
    expect(r2.fingerprint).toBe(second.fingerprint);
    expect(r2.fingerprint).not.toBe(first.fingerprint);

    // A broken pair is refused: the running certificate stays.
    writeFileSync(key, 'not a key');
    relay.proc.kill('SIGHUP');
    await until('a refusal', () => relay.logs().some((l) => /reload refused.*server\.tls\.key/.test(String(l.msg))));
    expect((await call(url, { body, ca: Buffer.concat([first.pem, second.pem]) })).fingerprint).toBe(second.fingerprint);
  });
});

describe('Relay.reload, in process', () => {
  const relays: Array<Awaited<ReturnType<typeof startTestRelay>>> = [];
  afterAll(async () => {
    await Promise.all(relays.map((r) => r.stop()));
  });
  const parse = (raw: Record<string, unknown>) => parseConfig({ ...raw, server: { host: '127.0.0.1', port: 0, ...(raw.server as object) }, store: raw.store ?? 'none' }, {});

  it('keeps the instance of an unchanged sink, rebuilds a changed one, adds and removes, and applies new guards', async () => {
    const first = { sinks: { a: { type: 'log' }, b: { type: 'log', level: 'debug' } } };
    const relay = await startTestRelay(first);
    relays.push(relay);
    const a = relay.sinks.get('a');
    const b = relay.sinks.get('b');
    const result = await relay.reload(parse({ sinks: { a: { type: 'log' }, b: { type: 'log', level: 'warn' }, c: { type: 'log' } }, server: { auth: { username: 'u', password: 'pw-reloaded' } } }));
    expect(result).toEqual({ ok: true, changes: expect.arrayContaining(['sink b rebuilt', 'sink c added', 'server']) });
    expect(relay.sinks.get('a')).toBe(a);
    expect(relay.sinks.get('b')).not.toBe(b);
    expect([...relay.sinks.keys()]).toEqual(['a', 'b', 'c']);
    const body = JSON.stringify(messagePush({ ack_id: '' }));
    expect((await post(`${relay.url}/api/v1/send_push`, body)).status).toBe(401);
    const auth = { Authorization: `Basic ${Buffer.from('u:pw-reloaded').toString('base64')}` };
    expect((await post(`${relay.url}/api/v1/send_push`, body, { headers: auth })).json).toEqual({ status: 'OK' });

    const removed = await relay.reload(parse({ sinks: { a: { type: 'log' } } }));
    expect(removed).toMatchObject({ ok: true, changes: expect.arrayContaining(['sink b removed (its outbox rows wait until their ttl)', 'sink c removed (its outbox rows wait until their ttl)']) });
    expect(relay.sinks.get('a')).toBe(a);
    expect((await post(`${relay.url}/api/v1/send_push`, body)).json).toEqual({ status: 'OK' });
  });

  it('POST /admin/reload does what SIGHUP does, behind admin.token: 200 with the changes, 422 naming the key', async () => {
    const dir = tempDir('push-relay-admin-reload-');
    const file = join(dir, 'config.json');
    const TOKEN = 'admin-reload-token-0123456789';
    const base = { admin: { token: TOKEN }, store: 'none', sinks: { a: { type: 'log' } } };
    writeFileSync(file, JSON.stringify(base));
    const proc = await spawnRelay({ args: ['serve', '--config', file] });
    try {
      const reloadNow = (token?: string) => post(`${proc.url}/admin/reload`, '', { headers: token ? { Authorization: `Bearer ${token}` } : {} });
      expect((await reloadNow()).status).toBe(401);
      writeFileSync(file, JSON.stringify({ ...base, sinks: { a: { type: 'log' }, b: { type: 'log', level: 'warn' } } }));
      const ok = await reloadNow(TOKEN);
      expect(ok.status).toBe(200);
      expect(ok.json).toMatchObject({ ok: true });
      const status = await fetch(`${proc.url}/admin/status`, { headers: { Authorization: `Bearer ${TOKEN}` } });
      expect(Object.keys(((await status.json()) as { sinks: Record<string, unknown> }).sinks)).toEqual(['a', 'b']);
      writeFileSync(file, JSON.stringify({ ...base, sinks: { a: { type: 'log', level: 'loud' } } }));
      const refused = await reloadNow(TOKEN);
      expect(refused.status).toBe(422);
      expect((refused.json as { ok: boolean; problems: string[] }).problems.join('\n')).toMatch(/sinks\.a\.level/);
      // The running config stays.
      const after = await fetch(`${proc.url}/admin/status`, { headers: { Authorization: `Bearer ${TOKEN}` } });
      expect(Object.keys(((await after.json()) as { sinks: Record<string, unknown> }).sinks)).toEqual(['a', 'b']);
    } finally {
      await proc.stop();
    }
  });

  it('serves the pairing page of the new config: a new VAPID key and Mattermost URL reach the page at once', async () => {
    const webpush = (keys: { publicKey: string; privateKey: string }) => ({ type: 'webpush', vapid: { ...keys, subject: 'mailto:ops@example.com' } });
    const [k1, k2] = [webPush.generateVAPIDKeys(), webPush.generateVAPIDKeys()];
    const relay = await startTestRelay({ mattermost: { url: 'https://chat.example.com' }, sinks: { browsers: webpush(k1) } });
    relays.push(relay);
    const pageConfig = async () => (await (await fetch(`${relay.url}/pair/config`)).json()) as { vapidPublicKey: string; mattermost: { url: string } };
    expect(await pageConfig()).toMatchObject({ vapidPublicKey: k1.publicKey, mattermost: { url: 'https://chat.example.com' } });
    const result = await relay.reload(parse({ mattermost: { url: 'https://mm.example.org' }, sinks: { browsers: webpush(k2) } }));
    expect(result).toEqual({ ok: true, changes: expect.arrayContaining(['sink browsers rebuilt', 'pairing page', 'mattermost']) });
    // A browser that pairs now subscribes with the key the sink signs with.
    expect(await pageConfig()).toMatchObject({ vapidPublicKey: k2.publicKey, mattermost: { url: 'https://mm.example.org' } });
    // Unchanged: the page (and its keep-alive timer) stays as it is.
    const same = await relay.reload(parse({ mattermost: { url: 'https://mm.example.org' }, sinks: { browsers: webpush(k2) }, log: { level: 'debug' } }));
    expect(same).toMatchObject({ ok: true });
    expect((same as { changes: string[] }).changes).not.toContain('pairing page');
  });

  it('refuses a config that changes what cannot change live, naming each key, and keeps the old one', async () => {
    const relay = await startTestRelay({ sinks: { a: { type: 'log' } } });
    relays.push(relay);
    const before = relay.config;
    const result = await relay.reload(parse({ sinks: { a: { type: 'log' } }, server: { host: '127.0.0.2', maxHeaderSize: '32kb' }, delivery: { dedupWindow: '1m' } }));
    expect(result.ok).toBe(false);
    const problems = (result as { problems: string[] }).problems.join('\n');
    for (const key of ['server.host', 'server.maxHeaderSize', 'delivery.dedupWindow']) expect(problems).toContain(`${key}: cannot change while running`);
    expect(relay.config).toBe(before);
  });

  it("keeps a removed sink's outbox rows (they wait for their ttl) and serves on", async () => {
    const dead = `mqtt://127.0.0.1:${await freePort()}`;
    const raw = { store: 'sqlite', dataDir: tempDir('push-relay-reload-store-'), delivery: { deadline: '200ms' }, sinks: { gone: { type: 'mqtt', url: dead, reconnectMin: '5s' }, log: { type: 'log' } } };
    const relay = await startTestRelay(raw);
    relays.push(relay);
    expect((await post(`${relay.url}/api/v1/send_push`, JSON.stringify(messagePush({ ack_id: ackId('row') })))).json).toEqual({ status: 'OK' });
    const result = await relay.reload(parse({ ...raw, sinks: { log: { type: 'log' } } }));
    expect(result.ok).toBe(true);
    await sleep(1000); // several outbox rounds
    const store = await openStore('sqlite', raw.dataDir, false);
    try {
      const st = await store!.stats();
      expect(st.bySink).toEqual({ gone: 1 });
      expect(st.deadLetters).toBe(0);
    } finally {
      await store!.close();
    }
    expect((await post(`${relay.url}/api/v1/send_push`, JSON.stringify(messagePush({ ack_id: ackId('row') })))).json).toEqual({ status: 'OK' });
  });
});
