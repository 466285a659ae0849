// The device registry (src/devices.ts) in the relay's store, and the CLI around it.
// - The same tests on SQLite and PostgreSQL (describe.each).
// - Two relay instances on one PostgreSQL see the same devices: a device added with the CLI
//   reaches its browser through either, and a subscription one instance learns is gone is
//   gone for the other too.
// - `push-relay vapid generate` and `devices list|add|remove` as a user runs them
//   (dist/src/cli.js), down to a push to the printed device id reaching the push service.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import webPush from 'web-push';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createDeviceRegistry, isRelayToken, mattermostDeviceId, type DeviceRegistry } from '../src/devices.js';
import { openStore, type Store } from '../src/store/index.js';
import { post } from './helpers/http.js';
import { messagePush } from './helpers/payloads.js';
import { createDatabase, havePostgres } from './helpers/postgres.js';
import { startPushService, type PushService } from './helpers/push-service.js';
import { runCli, spawnRelay, startTestRelay } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';

const postgres = await havePostgres();
const VAPID = { ...webPush.generateVAPIDKeys(), subject: 'mailto:ops@example.com' };

const subscription = (n: number) => ({
  endpoint: `https://push.example.net/push/sub${n}`,
  expirationTime: null,
  keys: { p256dh: `B${'A'.repeat(86)}`, auth: 'AAAAAAAAAAAAAAAAAAAAAA' },
});

type Backend = { name: string; open(): Promise<{ spec: string; store: Store; reopen(): Promise<Store> }> };
const backends: Backend[] = [
  {
    name: 'SQLite',
    async open() {
      const dir = tempDir('push-relay-devices-');
      return { spec: 'sqlite', store: (await openStore('sqlite', dir, false)) as Store, reopen: async () => (await openStore('sqlite', dir, false)) as Store };
    },
  },
  {
    name: 'PostgreSQL',
    async open() {
      const url = await createDatabase();
      return { spec: url, store: (await openStore(url, '', false)) as Store, reopen: async () => (await openStore(url, '', false)) as Store };
    },
  },
];

describe.each(backends.filter((b) => b.name === 'SQLite' || postgres))('the device registry on $name', (backend) => {
  let store: Store;
  let reopen: () => Promise<Store>;
  let devices: DeviceRegistry;
  const opened: Store[] = [];
  beforeAll(async () => {
    ({ store, reopen } = await backend.open());
    opened.push(store);
    devices = createDeviceRegistry(store.kv('devices'));
  });
  afterAll(async () => {
    for (const s of opened) await s.close();
  });

  it('issues a random URL-safe token of 144 bits per device and stores what it was given', async () => {
    const a = await devices.add({ label: 'Firefox on the laptop', targets: { webpush: [subscription(1)] } });
    const b = await devices.add({ label: 'phone', targets: { webpush: [subscription(2)] } });
    for (const t of [a.token, b.token]) expect(t).toMatch(/^pr1[A-Za-z0-9_-]{24}$/);
    expect(isRelayToken(a.token)).toBe(true);
    expect(a.token).not.toBe(b.token);
    expect(Buffer.from(a.token.slice(3), 'base64url')).toHaveLength(18);
    expect(await devices.get(a.token)).toEqual({
      token: a.token,
      label: 'Firefox on the laptop',
      createdAt: a.createdAt,
      targets: { webpush: [subscription(1)] },
    });
    expect(mattermostDeviceId(a.token)).toBe(`android_rn-v2:${a.token}`);
  });

  it('keeps the account, the session and the timestamps of a paired device', async () => {
    const d = await devices.add({
      label: 'paired',
      targets: { webpush: [subscription(3)], email: 'alice@example.com' },
      account: { userId: 'u1', username: 'alice', email: 'alice@example.com' },
      session: { token: 'secret-session', createdAt: 1 },
    });
    await devices.update(d.token, (x) => ({ ...x, lastPushAt: 10, lastFailureAt: 20, session: { ...x.session!, lastRefreshAt: 30 } }));
    expect(await devices.get(d.token)).toMatchObject({
      account: { userId: 'u1', username: 'alice' },
      session: { token: 'secret-session', createdAt: 1, lastRefreshAt: 30 },
      lastPushAt: 10,
      lastFailureAt: 20,
      targets: { email: 'alice@example.com' },
    });
  });

  it('update is a read-modify-write: concurrent changes to one device all land', async () => {
    const d = await devices.add({ label: 'many', targets: { webpush: [1, 2, 3, 4, 5, 6].map(subscription) } });
    // Six subscriptions reported gone at once (a device whose pushes all got 410).
    await Promise.all(
      [1, 2, 3, 4, 5, 6].map((n) =>
        devices.update(d.token, (x) => ({ ...x, targets: { webpush: x.targets.webpush?.filter((s) => s.endpoint !== subscription(n).endpoint) } })),
      ),
    );
    expect((await devices.get(d.token))?.targets.webpush).toEqual([]);
  });

  it('update returning undefined deletes; update of an unknown token changes nothing', async () => {
    const d = await devices.add({ label: 'gone', targets: {} });
    expect(await devices.update(d.token, () => undefined)).toBeUndefined();
    expect(await devices.get(d.token)).toBeUndefined();
    expect(await devices.update('pr1AAAAAAAAAAAAAAAAAAAAAAAA', (x) => x)).toBeUndefined();
    expect(await devices.get('pr1AAAAAAAAAAAAAAAAAAAAAAAA')).toBeUndefined();
  });

  it('list has every device; remove deletes one and says whether it existed', async () => {
    const d = await devices.add({ label: 'to remove', targets: {} });
    expect((await devices.list()).map((x) => x.token)).toContain(d.token);
    expect(await devices.remove(d.token)).toBe(true);
    expect(await devices.remove(d.token)).toBe(false);
    expect((await devices.list()).map((x) => x.token)).not.toContain(d.token);
  });

  it('answers undefined for a device id the relay did not issue, whatever the store holds', async () => {
    expect(await devices.get('f69tFnb0tLBqBYszRNBZNQ:APA91bo')).toBeUndefined();
    expect(await devices.get('')).toBeUndefined();
  });

  it('survives closing the store: another connection reads the same devices', async () => {
    const d = await devices.add({ label: 'durable', targets: { ntfy: 'https://ntfy.example.com/mine' } });
    const other = await reopen();
    opened.push(other);
    const again = createDeviceRegistry(other.kv('devices'));
    expect(await again.get(d.token)).toEqual(await devices.get(d.token));
    expect((await again.list()).length).toBe((await devices.list()).length);
  });

  it('two instances on one store: concurrent updates of one device through both all land', async () => {
    // Two registries over two connections, as two relays share a PostgreSQL: each has its own
    // in-process queue, so only the store's compare-and-set keeps one from overwriting the other.
    const other = await reopen();
    opened.push(other);
    const second = createDeviceRegistry(other.kv('devices'));
    const d = await devices.add({ label: 'two instances', targets: { webpush: [] } });
    const adds = Array.from({ length: 20 }, (_, i) =>
      (i % 2 ? second : devices).update(d.token, (x) => ({ ...x, targets: { webpush: [...(x.targets.webpush ?? []), subscription(100 + i)] } })),
    );
    await Promise.all(adds);
    const endpoints = (await second.get(d.token))?.targets.webpush?.map((s) => s.endpoint).sort();
    expect(endpoints).toEqual(Array.from({ length: 20 }, (_, i) => subscription(100 + i).endpoint).sort());
  });

  it("swap sets, replaces and deletes only what is still as expected", async () => {
    const kv = store.kv('swap-test');
    expect(await kv.swap('k', undefined, 'one')).toBe(true);
    expect(await kv.swap('k', undefined, 'two')).toBe(false);
    expect(await kv.swap('k', 'two', 'three')).toBe(false);
    expect(await kv.get('k')).toBe('one');
    expect(await kv.swap('k', 'one', 'two')).toBe(true);
    expect(await kv.swap('k', 'one', undefined)).toBe(false);
    expect(await kv.swap('k', 'two', undefined)).toBe(true);
    expect(await kv.get('k')).toBeUndefined();
    expect(await kv.swap('k', undefined, undefined)).toBe(true);
  });
});

function writeConfig(config: Record<string, unknown>): string {
  const file = join(tempDir('push-relay-devices-config-'), 'config.json');
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

function writeSubscription(json: unknown): string {
  const file = join(tempDir('push-relay-sub-'), 'subscription.json');
  writeFileSync(file, typeof json === 'string' ? json : JSON.stringify(json));
  return file;
}

const pushTo = async (url: string, token: string) => {
  const r = await post(`${url}/api/v1/send_push`, JSON.stringify(messagePush({ device_id: token, ack_id: `a${Math.random().toString(36).slice(2, 14)}` })));
  return r.json as { status: string; error?: string };
};

describe.skipIf(!postgres)('two relay instances on one PostgreSQL', () => {
  let service: PushService;
  beforeAll(async () => {
    service = await startPushService({ vapidPublicKey: VAPID.publicKey });
  });

  it('see the same devices: one added with the CLI reaches its browser through either, and a subscription gone for one is gone for both', async () => {
    const url = await createDatabase();
    const config = {
      store: url,
      sinks: { browser: { type: 'webpush', vapid: VAPID, allowPrivateEndpoints: true } },
      routes: [{ match: { paired: true }, sinks: ['browser'] }],
    };
    const a = await startTestRelay(config);
    const b = await startTestRelay(config);
    const sub = service.subscribe();
    const added = await runCli(['devices', 'add', '--webpush', writeSubscription(sub.json), '--label', 'on-both-relays', '--config', writeConfig(config)]);
    expect(added.code).toBe(0);
    const token = (added.stdout.trim().split('\n').at(-1) as string).replace('android_rn-v2:', '');

    expect(await pushTo(a.url, token)).toEqual({ status: 'OK' });
    expect(await pushTo(b.url, token)).toEqual({ status: 'OK' });
    expect(service.received.filter((p) => p.subscription === sub.id)).toHaveLength(2);

    // Instance A learns the subscription is gone; instance B then knows without asking.
    sub.plan({ status: 410 });
    expect(await pushTo(a.url, token)).toEqual({ status: 'REMOVE' });
    expect(await pushTo(b.url, token)).toEqual({ status: 'REMOVE' });
    expect(service.received.filter((p) => p.subscription === sub.id)).toHaveLength(3);
    expect(service.problems).toEqual([]);
    await a.stop();
    await b.stop();
  });
});

describe('push-relay vapid generate, devices list|add|remove', () => {
  let service: PushService;
  let dataDir: string;
  let configFile: string;
  let vapid: { publicKey: string; privateKey: string };

  beforeAll(async () => {
    const r = await runCli(['vapid', 'generate', '--subject', 'mailto:ops@example.com']);
    expect(r.code).toBe(0);
    vapid = {
      publicKey: /^VAPID_PUBLIC_KEY=(\S+)$/m.exec(r.stdout)?.[1] as string,
      privateKey: /^VAPID_PRIVATE_KEY=(\S+)$/m.exec(r.stdout)?.[1] as string,
    };
    service = await startPushService({ vapidPublicKey: vapid.publicKey });
    dataDir = tempDir('push-relay-cli-devices-');
    configFile = writeConfig({
      dataDir,
      sinks: { browser: { type: 'webpush', vapid: { ...vapid, subject: 'mailto:ops@example.com' }, allowPrivateEndpoints: true } },
      routes: [{ match: { paired: true }, sinks: ['browser'] }],
    });
  });

  it('vapid generate prints a P-256 key pair and config lines that check-config accepts', async () => {
    expect(Buffer.from(vapid.publicKey, 'base64url')).toHaveLength(65);
    expect(Buffer.from(vapid.privateKey, 'base64url')).toHaveLength(32);
    const r = await runCli(['vapid', 'generate']);
    const yaml = r.stdout.slice(r.stdout.indexOf('sinks:'));
    const file = join(tempDir('push-relay-vapid-'), 'config.yaml');
    writeFileSync(file, `store: none\n${yaml}`);
    const key = /^VAPID_PRIVATE_KEY=(\S+)$/m.exec(r.stdout)?.[1] as string;
    const checked = await runCli(['check-config', file], { env: { VAPID_PRIVATE_KEY: key } });
    expect(checked.stderr).toBe('');
    expect(checked.stdout).toContain('sinks: browser (webpush)');
    // A second run makes another pair.
    expect(key).not.toBe(vapid.privateKey);
  });

  it.each([
    ['no --webpush', () => [], /devices add needs --webpush FILE/],
    ['a file that is not JSON', () => ['--webpush', writeSubscription('{nope')], /is not JSON/],
    ['a missing file', () => ['--webpush', '/nonexistent/sub.json'], /cannot read \/nonexistent\/sub\.json: ENOENT/],
    ['no keys', () => ['--webpush', writeSubscription({ endpoint: 'https://push.example.net/x' })], /keys \{ p256dh, auth \} missing/],
    ['a short p256dh', () => ['--webpush', writeSubscription({ ...subscription(1), keys: { p256dh: 'BAAA', auth: 'AAAAAAAAAAAAAAAAAAAAAA' } })], /keys\.p256dh must be 65 bytes/],
    ['an auth that is not base64url', () => ['--webpush', writeSubscription({ ...subscription(1), keys: { ...subscription(1).keys, auth: 'a+b/c=' } })], /keys\.auth must be base64url/],
    ['a non-URL endpoint', () => ['--webpush', writeSubscription({ ...subscription(1), endpoint: 'push.example.net' })], /endpoint must be an http\(s\) URL/],
  ])('devices add refuses %s with exit 2 and says why', async (_what, args, message) => {
    const r = await runCli(['devices', 'add', ...args(), '--config', configFile]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stdout).toBe('');
  });

  it('devices add refuses an http endpoint unless a webpush sink allows private endpoints', async () => {
    const strict = writeConfig({ dataDir: tempDir(), sinks: { browser: { type: 'webpush', vapid: { ...vapid, subject: 'mailto:a@b.c' } } } });
    const r = await runCli(['devices', 'add', '--webpush', writeSubscription({ ...subscription(1), endpoint: 'http://push.example.net/x' }), '--config', strict]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('endpoint must be an https URL');
  });

  it('devices add prints the device id last; a running relay delivers a push to it; list shows it; remove makes it REMOVE', async () => {
    const relay = await spawnRelay({ args: ['serve', '--config', configFile], env: { PUSH_RELAY_DATA_DIR: dataDir } });
    const sub = service.subscribe();
    // Added while the relay runs (it owns the SQLite file; the CLI shares it through WAL).
    const added = await runCli(['devices', 'add', '--webpush', writeSubscription(sub.json), '--label', 'Chromium on the desk', '--config', configFile]);
    expect(added.stderr).toBe('');
    expect(added.code).toBe(0);
    const last = added.stdout.trim().split('\n').at(-1) as string;
    expect(last).toMatch(/^android_rn-v2:pr1[A-Za-z0-9_-]{24}$/);
    const token = last.slice('android_rn-v2:'.length);

    expect(await pushTo(relay.url, token)).toEqual({ status: 'OK' });
    const [got] = await service.waitFor(1, (p) => p.subscription === sub.id);
    expect(JSON.parse(got?.plaintext ?? '{}')).toMatchObject({ type: 'message', title: 'Release Planning', body: messagePush().message });
    expect(service.problems).toEqual([]);

    const list = await runCli(['devices', 'list', '--config', configFile]);
    expect(list.stdout).toContain(`${token}  Chromium on the desk`);
    expect(list.stdout).toMatch(/webpush: 1 \(127\.0\.0\.1:\d+\)/);
    expect(list.stdout).toMatch(/last push \d{4}-\d\d-\d\dT/);
    const json = JSON.parse((await runCli(['devices', 'list', '--json', '--config', configFile])).stdout) as Array<Record<string, unknown>>;
    const mine = json.find((d) => d.token === token) as Record<string, unknown>;
    expect(mine).toMatchObject({ deviceId: last, label: 'Chromium on the desk', targets: { webpush: [{ endpoint: sub.json.endpoint }] } });
    // The encryption keys stay in the store.
    expect(JSON.stringify(json)).not.toContain(sub.json.keys.auth);

    const removed = await runCli(['devices', 'remove', last, '--config', configFile]);
    expect(removed.stdout.trim()).toBe(`removed device ${token}`);
    expect(removed.code).toBe(0);
    expect(await pushTo(relay.url, token)).toEqual({ status: 'REMOVE' });
    expect((await runCli(['devices', 'remove', token, '--config', configFile])).code).toBe(1);
    await relay.stop();
  });

  it('devices list never shows a session token, and remove says the Mattermost session stays logged in', async () => {
    const dir = tempDir('push-relay-cli-secret-');
    const cfg = writeConfig({ dataDir: dir, sinks: { l: { type: 'log' } } });
    const store = (await openStore('sqlite', dir, false)) as Store;
    const d = await createDeviceRegistry(store.kv('devices')).add({
      label: 'paired on the page',
      targets: { webpush: [subscription(9)] },
      account: { userId: 'u1', username: 'alice' },
      session: { token: 'mm-session-secret-123', createdAt: Date.now() },
    });
    await store.close();
    const text = (await runCli(['devices', 'list', '--config', cfg])).stdout;
    const json = (await runCli(['devices', 'list', '--json', '--config', cfg])).stdout;
    expect(text).toContain('account @alice');
    expect(JSON.parse(json)[0]).toMatchObject({ token: d.token, account: { username: 'alice' }, session: {} });
    for (const out of [text, json]) expect(out).not.toContain('mm-session-secret-123');
    const removed = await runCli(['devices', 'remove', d.token, '--config', cfg]);
    expect(removed.stdout).toContain('its Mattermost session stays logged in');
    expect(removed.stdout).not.toContain('mm-session-secret-123');
  });

  it('devices remove refuses what is not a relay token', async () => {
    const r = await runCli(['devices', 'remove', 'f69tFnb0tLBqBYszRNBZNQ:APA91bo', '--config', configFile]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('is not a device token of this relay');
  });

  it('devices list says so when there are none', async () => {
    const empty = writeConfig({ dataDir: tempDir(), sinks: { l: { type: 'log' } } });
    const r = await runCli(['devices', 'list', '--config', empty]);
    expect(r.stdout.trim()).toBe('no devices');
    expect(JSON.parse((await runCli(['devices', 'list', '--json', '--config', empty])).stdout)).toEqual([]);
  });

  it('with store: none, says that devices need a store and exits 2', async () => {
    const none = writeConfig({ store: 'none', sinks: { l: { type: 'log' } } });
    const r = await runCli(['devices', 'list', '--config', none]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('devices need a store');
  });
});
