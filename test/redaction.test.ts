// No secret in the log, at any level: the relay as a user runs it (the CLI, JSON logs at
// trace), with every secret the config can hold on main set (basic auth password from a
// VAR_FILE, admin token from ${VAR}, MQTT passwords as a key and inside a URL), driven
// through what makes log lines (pushes, refusals with wrong credentials, admin calls, a
// reload, a refused reload, shutdown); then every line is searched for every secret, raw,
// base64 as in an Authorization header, and the full device token.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../src/config.js';
import { configSecrets, createLogger } from '../src/log.js';
import { post, request } from './helpers/http.js';
import { haveMosquitto, startMosquitto, type Mosquitto } from './helpers/mosquitto.js';
import { messagePush } from './helpers/payloads.js';
import { spawnRelay, type RelayProcess } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';
import { until } from './helpers/wait.js';

const SECRETS = {
  basicPassword: 'Bas1c-"pass\\word-7f3a',
  adminToken: 'adm1n-token-5c9e1b2d4f6a8e0c',
  mqttPassword: 'mqtt-pa55-key-e41d',
  urlPassword: 'url-pa55-9b0c',
};
const DEVICE = 'f69tFnb0tLBqBYszRNBZNQ:APA91bo-redaction-device-token-that-must-not-appear-in-logs-0123456789';
const b64 = (s: string) => Buffer.from(s).toString('base64');

describe('configSecrets', () => {
  it('finds secret-named keys, URL passwords and header credentials, not file paths', () => {
    const found = configSecrets({
      server: { auth: { username: 'mm', password: 'pw-one-1' } },
      admin: { token: 'tok-two-2' },
      sinks: {
        a: { type: 'mqtt', url: 'mqtt://u:url%40three@h:1883', password: 'pw-four-4', tls: { key: '/etc/tls.key' } },
        b: { type: 'webhook', headers: { Authorization: 'Bearer hook-five-5' } },
      },
    });
    for (const s of ['pw-one-1', 'tok-two-2', 'url%40three', 'url@three', 'pw-four-4', 'hook-five-5', b64('mm:pw-one-1')]) expect(found).toContain(s);
    expect(found).not.toContain('/etc/tls.key');
  });
});

describe('createLogger', () => {
  it('scrubs configured secret values wherever they appear, redacts secret keys and shortens device ids', () => {
    const out: string[] = [];
    const dest = { write: (l: string) => void out.push(l) };
    const log = createLogger({ level: 'trace', format: 'json' }, dest, { values: configSecrets({ sinks: { a: { password: 'sekrit-"quoted"' } } }) });
    log.error({ err: 'connect failed for mqtt://u:sekrit-"quoted"@h' }, 'broker said sekrit-"quoted"');
    log.info({ password: 'other-pw', headers: { authorization: 'Basic abc' }, n: { device_id: DEVICE } }, 'x');
    const text = out.join('');
    expect(text).not.toContain('sekrit');
    expect(text).not.toContain('other-pw');
    expect(text).not.toContain('Basic abc');
    expect(text).not.toContain(DEVICE);
    expect(text).toContain('f69tFn');
  });
});

describe.skipIf(!haveMosquitto())('redaction', () => {
  let broker: Mosquitto;
  let relay: RelayProcess;
  let file: string;
  const config = (extra: Record<string, unknown> = {}) => ({
    server: { auth: { username: 'mattermost', password: '${RELAY_PASSWORD}' } },
    admin: { token: '${ADMIN_TOKEN}', metricsAuth: true },
    store: 'none',
    sinks: {
      keyed: { type: 'mqtt', url: broker.url, topic: 'red/{type}', username: 'relay', password: '${MQTT_PASSWORD}' },
      inurl: { type: 'mqtt', url: broker.url.replace('mqtt://', `mqtt://relay:${encodeURIComponent(SECRETS.urlPassword)}@`), topic: 'red2/{type}' },
      log: { type: 'log', level: 'debug' },
    },
    ...extra,
  });

  beforeAll(async () => {
    broker = await startMosquitto();
    const dir = tempDir('push-relay-redaction-');
    const passwordFile = join(dir, 'relay_password');
    writeFileSync(passwordFile, `${SECRETS.basicPassword}\n`);
    file = join(dir, 'config.json');
    writeFileSync(file, JSON.stringify(config()));
    relay = await spawnRelay({
      args: ['serve', '--config', file],
      env: {
        PUSH_RELAY_LOG_LEVEL: 'trace',
        PUSH_RELAY_LOG_FORMAT: 'json',
        RELAY_PASSWORD_FILE: passwordFile,
        ADMIN_TOKEN: SECRETS.adminToken,
        MQTT_PASSWORD: SECRETS.mqttPassword,
      },
    });
  });
  afterAll(async () => {
    await relay?.kill();
    await broker?.stop();
  });

  it('writes none of the configured secrets, nor the device token, at any level', async () => {
    const auth = { Authorization: `Basic ${b64(`mattermost:${SECRETS.basicPassword}`)}` };
    const push = (headers: Record<string, string>, n = messagePush({ ack_id: '', device_id: DEVICE })) => post(`${relay.url}/api/v1/send_push`, JSON.stringify(n), { headers });

    // The password came from RELAY_PASSWORD_FILE (its trailing newline cut): it works.
    expect((await push(auth)).json).toEqual({ status: 'OK' });
    expect((await push(auth, messagePush({ ack_id: '', device_id: DEVICE, platform: '' }))).json).toMatchObject({ status: 'FAIL' });
    expect((await push({ Authorization: `Basic ${b64(`mattermost:${SECRETS.basicPassword}x`)}` })).status).toBe(401);
    expect((await push({ Authorization: `Bearer ${SECRETS.adminToken}` })).status).toBe(401);
    expect((await request('GET', `${relay.url}/metrics`, undefined, { headers: { Authorization: `Bearer ${SECRETS.adminToken}` } })).status).toBe(200);
    expect((await request('GET', `${relay.url}/admin/status`, undefined, { headers: { Authorization: `Bearer ${SECRETS.adminToken}x` } })).status).toBe(401);
    expect((await request('GET', `${relay.url}/admin/status`, undefined, { headers: { Authorization: `Basic ${b64(`mattermost:${SECRETS.basicPassword}`)}` } })).status).toBe(401);

    // A reload that changes a sink, then one refused.
    writeFileSync(file, JSON.stringify(config({ routes: [{ match: {}, sinks: ['keyed', 'log'] }] })));
    relay.proc.kill('SIGHUP');
    await until('a reload', () => relay.logs().some((l) => /^config reloaded/.test(String(l.msg))));
    const bad = config() as { server: { auth: Record<string, unknown> } };
    bad.server.auth.pasword = SECRETS.basicPassword;
    writeFileSync(file, JSON.stringify(bad));
    relay.proc.kill('SIGHUP');
    await until('a refused reload', () => relay.logs().some((l) => /reload refused/.test(String(l.msg))));
    expect((await push(auth)).json).toEqual({ status: 'OK' });
    await relay.stop();

    const text = relay.lines.join('\n');
    // The log is there and at trace: the test would prove nothing on an empty one.
    expect(relay.logs().some((l) => l.level === 10 || l.level === 20)).toBe(true);
    expect(relay.logs().some((l) => l.reason === 'unauthorized')).toBe(true);
    expect(text).toMatch(/set Mattermost's Push Notification Server to http:\/\/mattermost:\*\*\*\*@/);
    const forbidden = [
      ...Object.values(SECRETS),
      JSON.stringify(SECRETS.basicPassword).slice(1, -1),
      encodeURIComponent(SECRETS.urlPassword),
      b64(`mattermost:${SECRETS.basicPassword}`),
      b64(`mattermost:${SECRETS.basicPassword}x`),
      DEVICE,
      DEVICE.slice(0, 40),
    ];
    for (const secret of forbidden) expect({ secret, found: text.includes(secret) }).toEqual({ secret, found: false });
  });
});

describe('secrets from VAR_FILE', () => {
  const dir = tempDir('push-relay-varfile-');
  const cfg = (password: string) => ({ server: { auth: { username: 'u', password } }, sinks: { log: { type: 'log' } } });
  it('reads VAR_FILE when VAR is unset, cutting one trailing newline; VAR wins when set', () => {
    const f = join(dir, 'pw');
    writeFileSync(f, 'from-file\n');
    expect(parseConfig(cfg('${PW}'), { PW_FILE: f }).server.auth?.password).toBe('from-file');
    expect(parseConfig(cfg('${PW}'), { PW: 'from-env', PW_FILE: f }).server.auth?.password).toBe('from-env');
    writeFileSync(f, 'crlf\r\n\n');
    expect(parseConfig(cfg('${PW}'), { PW_FILE: f }).server.auth?.password).toBe('crlf\r\n');
  });
  it('names the key and the file when VAR_FILE cannot be read', () => {
    expect(() => parseConfig(cfg('${PW}'), { PW_FILE: join(dir, 'missing') })).toThrow(/server\.auth\.password: PW_FILE=.*missing: cannot read: ENOENT/);
    expect(() => parseConfig(cfg('${PW}'), {})).toThrow(/environment variable PW is not set \(nor PW_FILE/);
  });
});
