// The relay's own config is strict (STYLE.md §4): every mistake stops start-up with the key
// path named, before anything listens. `${VAR}` interpolation and PUSH_RELAY_* overrides.
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, parseConfig } from '../src/config.js';
import { REPO_ROOT } from './helpers/payloads.js';
import { runCli, spawnRelay } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';
import { accepts } from './helpers/wait.js';

const notif = { type: 'mqtt', url: 'mqtt://127.0.0.1:18830', topic: 'mm/_notif' };
/** The CLI's exit status for a config or usage error (src/cli.ts fail()); a crash exits 1. */
const CONFIG_ERROR = 2;
const valid = () => ({ sinks: { notif: { ...notif } } });

/** The problems a config is rejected with (fails when it is accepted). */
function problems(raw: unknown, env: Record<string, string> = {}): string[] {
  try {
    parseConfig(raw, env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).message).toContain((err as ConfigError).problems[0]);
    return (err as ConfigError).problems;
  }
  throw new Error(`expected the config to be rejected: ${JSON.stringify(raw)}`);
}

describe('config errors name the key path', () => {
  it('rejects an unknown key in a sink: sinks.notif.qso', () => {
    expect(problems({ sinks: { notif: { ...notif, qso: 1 } } })).toEqual(['sinks.notif.qso: unknown key']);
  });

  it('rejects an unknown top-level key', () => {
    expect(problems({ ...valid(), serve: { port: 1 } })).toEqual(['serve: unknown key']);
  });

  it('rejects a port that is not a number: server.port', () => {
    expect(problems({ ...valid(), server: { port: 'abc' } })).toEqual([expect.stringMatching(/^server\.port: /)]);
  });

  it('rejects a port out of range: server.port', () => {
    expect(problems({ ...valid(), server: { port: 70000 } })).toEqual([expect.stringMatching(/^server\.port: /)]);
  });

  it('rejects qos 5: sinks.notif.qos', () => {
    expect(problems({ sinks: { notif: { ...notif, qos: 5 } } })).toEqual([expect.stringMatching(/^sinks\.notif\.qos: /)]);
  });

  it('rejects an unknown sink type, naming sinks.x.type and the known types', () => {
    expect(problems({ sinks: { x: { type: 'carrier-pigeon' } } })).toEqual([
      expect.stringMatching(/^sinks\.x\.type: unknown sink type.*mqtt.*log/),
    ]);
  });

  it('rejects a route naming a sink that does not exist: routes.0.sinks.0', () => {
    expect(problems({ ...valid(), routes: [{ match: { type: 'message' }, sinks: ['nope'] }] })).toEqual([
      'routes.0.sinks.0: no sink named "nope"; defined: notif',
    ]);
  });

  it('rejects an http:// URL for an MQTT sink: sinks.notif.url', () => {
    expect(problems({ sinks: { notif: { ...notif, url: 'http://x' } } })).toEqual([expect.stringMatching(/^sinks\.notif\.url: .*mqtt/)]);
  });

  it('rejects a URL that is not a URL: sinks.notif.url', () => {
    expect(problems({ sinks: { notif: { ...notif, url: 'not a url' } } })).toEqual([expect.stringMatching(/^sinks\.notif\.url: /)]);
  });

  it('rejects a topic with a wildcard outside placeholders: sinks.notif.topic', () => {
    expect(problems({ sinks: { notif: { ...notif, topic: 'mm/+/x' } } })).toEqual([expect.stringMatching(/^sinks\.notif\.topic: .*\+, #/)]);
  });

  it('rejects a control character in a topic outside placeholders: sinks.notif.topic', () => {
    expect(problems({ sinks: { notif: { ...notif, topic: 'mm/a\nb' } } })).toEqual([
      expect.stringMatching(/^sinks\.notif\.topic: .*control characters/),
    ]);
  });

  it('rejects an unknown placeholder in a topic, naming it', () => {
    expect(problems({ sinks: { notif: { ...notif, topic: 'mm/{chan}' } } })).toEqual([
      expect.stringMatching(/^sinks\.notif\.topic: unknown placeholder \{chan\}/),
    ]);
  });

  it('rejects format: template without a template: sinks.notif.template', () => {
    expect(problems({ sinks: { notif: { ...notif, format: 'template' } } })).toEqual([
      'sinks.notif.template: required when format is template',
    ]);
  });

  it('rejects a duration it cannot read: delivery.deadline', () => {
    expect(problems({ ...valid(), delivery: { deadline: 'soon' } })).toEqual([expect.stringMatching(/^delivery\.deadline: "soon" is not a duration/)]);
  });

  it('rejects a basePath with a trailing slash: server.basePath', () => {
    expect(problems({ ...valid(), server: { basePath: '/s3cret/' } })).toEqual([expect.stringMatching(/^server\.basePath: /)]);
  });

  it('rejects a config without sinks', () => {
    expect(problems({ sinks: {} })).toEqual(['sinks: at least one sink is needed']);
  });

  it('names every problem at once', () => {
    const p = problems({ server: { port: 'abc' }, sinks: { notif: { ...notif, qso: 1, qos: 7 } } });
    expect(p.join('\n')).toMatch(/server\.port/);
    expect(p.join('\n')).toMatch(/sinks\.notif\.qso/);
    expect(p.join('\n')).toMatch(/sinks\.notif\.qos/);
  });
});

describe('reading values', () => {
  it('reads durations and sizes as people write them', () => {
    const c = parseConfig({ ...valid(), server: { bodyLimit: '2kb', shutdownTimeout: '1.5s' }, delivery: { deadline: '500ms' } }, {});
    expect(c.server.bodyLimit).toBe(2048);
    expect(c.server.shutdownTimeout).toBe(1500);
    expect(c.delivery.deadline).toBe(500);
  });

  it('defaults to 0.0.0.0:8066, no basePath, a 1 MiB body limit', () => {
    const c = parseConfig(valid(), {});
    expect(c.server).toMatchObject({ host: '0.0.0.0', port: 8066, basePath: '', bodyLimit: 1024 * 1024 });
  });

  it('without a file: one mqtt sink publishing the message text to mm/_notif on the auto broker', () => {
    const c = loadConfig(undefined, {});
    expect(Object.keys(c.sinks)).toEqual(['mqtt']);
    expect(c.sinks.mqtt).toMatchObject({ type: 'mqtt', url: 'auto', autoPort: 1883, topic: 'mm/_notif', format: 'message' });
  });

  it('without a file: PUSH_RELAY_MQTT_URL and PUSH_RELAY_MQTT_TOPIC set the default sink', () => {
    const c = loadConfig(undefined, { PUSH_RELAY_MQTT_URL: 'mqtt://broker:1884', PUSH_RELAY_MQTT_TOPIC: 'home/{type}' });
    expect(c.sinks.mqtt).toMatchObject({ url: 'mqtt://broker:1884', topic: 'home/{type}' });
  });
});

describe('${VAR} interpolation', () => {
  it('replaces ${VAR} with the variable', () => {
    const c = parseConfig({ sinks: { notif: { ...notif, url: '${MQTT_URL}', topic: 'mm/${TOPIC}/{type}' } } }, { MQTT_URL: 'mqtt://b:1', TOPIC: 'home' });
    expect(c.sinks.notif).toMatchObject({ url: 'mqtt://b:1', topic: 'mm/home/{type}' });
  });

  it('uses the default of ${VAR:-default} when the variable is unset or empty', () => {
    const raw = { sinks: { notif: { ...notif, url: '${MQTT_URL:-mqtt://fallback:1883}' } } };
    expect(parseConfig(raw, {}).sinks.notif).toMatchObject({ url: 'mqtt://fallback:1883' });
    expect(parseConfig(raw, { MQTT_URL: '' }).sinks.notif).toMatchObject({ url: 'mqtt://fallback:1883' });
    expect(parseConfig(raw, { MQTT_URL: 'mqtt://set:1' }).sinks.notif).toMatchObject({ url: 'mqtt://set:1' });
  });

  it('converts interpolated numbers: port: ${PORT}', () => {
    expect(parseConfig({ ...valid(), server: { port: '${PORT}' } }, { PORT: '9123' }).server.port).toBe(9123);
  });

  it('names the key path and the variable when a variable is missing', () => {
    expect(problems({ sinks: { notif: { ...notif, url: '${MQTT_URL}' } } })).toEqual([
      expect.stringMatching(/^sinks\.notif\.url: environment variable MQTT_URL is not set/),
    ]);
  });

  it('keeps $${VAR} as a literal ${VAR}', () => {
    const c = parseConfig({ sinks: { notif: { ...notif, password: 'p$${X}' } } }, {});
    expect(c.sinks.notif).toMatchObject({ password: 'p${X}' });
  });
});

describe('env overrides', () => {
  it('PUSH_RELAY_PORT overrides server.port from the file', () => {
    expect(parseConfig({ ...valid(), server: { port: 1234 } }, { PUSH_RELAY_PORT: '9999' }).server.port).toBe(9999);
  });

  it('PUSH_RELAY_HOST, PUSH_RELAY_BASE_PATH and PUSH_RELAY_LOG_LEVEL override theirs', () => {
    const c = parseConfig(valid(), { PUSH_RELAY_HOST: '127.0.0.1', PUSH_RELAY_BASE_PATH: '/x', PUSH_RELAY_LOG_LEVEL: 'warn' });
    expect(c.server.host).toBe('127.0.0.1');
    expect(c.server.basePath).toBe('/x');
    expect(c.log.level).toBe('warn');
  });

  it('names server.port when PUSH_RELAY_PORT is not a number', () => {
    expect(problems(valid(), { PUSH_RELAY_PORT: 'abc' })).toEqual([expect.stringMatching(/^server\.port: /)]);
  });
});

describe('the command line', () => {
  function file(name: string, text: string): string {
    const p = join(tempDir(), name);
    writeFileSync(p, text);
    return p;
  }

  it('check-config exits non-zero and prints the key path for a bad file', async () => {
    const bad = file('bad.yaml', 'sinks:\n  notif:\n    type: mqtt\n    qso: 1\n');
    const r = await runCli(['check-config', bad]);
    expect(r).toMatchObject({ code: CONFIG_ERROR, signal: null });
    expect(r.stderr).toContain('sinks.notif.qso: unknown key');
    expect(r.stderr).toContain(bad);
  });

  it('check-config names a missing ${VAR} with its key path', async () => {
    const bad = file('env.yaml', 'sinks:\n  notif:\n    type: mqtt\n    url: ${MQTT_URL}\n');
    const r = await runCli(['check-config', bad], { env: { MQTT_URL: undefined } });
    expect(r).toMatchObject({ code: CONFIG_ERROR, signal: null });
    expect(r.stderr).toMatch(/sinks\.notif\.url: environment variable MQTT_URL is not set/);
  });

  it('check-config says which file is not valid YAML', async () => {
    const bad = file('broken.yaml', 'sinks: [\n');
    const r = await runCli(['check-config', bad]);
    expect(r).toMatchObject({ code: CONFIG_ERROR, signal: null });
    expect(r.stderr).toContain(`${bad}: not valid YAML`);
  });

  it('check-config exits 0 and says OK for a good file', async () => {
    const good = file('good.yaml', 'server:\n  port: ${PORT:-8067}\nsinks:\n  notif:\n    type: mqtt\n    url: mqtt://127.0.0.1:18830\n');
    const r = await runCli(['check-config', good]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/: OK/);
    expect(r.stdout).toContain('notif (mqtt)');
  });

  it('check-config accepts config.example.yaml', async () => {
    // The file ships in the package (package.json "files"): a missing one is a failure, not a skip.
    const example = join(REPO_ROOT, 'config.example.yaml');
    expect(existsSync(example), example).toBe(true);
    const r = await runCli(['check-config', example]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
  });

  /** Whether anything accepted a connection on the relay's port before the process exited. */
  async function everListened(relay: Awaited<ReturnType<typeof spawnRelay>>): Promise<boolean> {
    let exited = false;
    void relay.exited.then(() => (exited = true));
    for (let i = 0; i < 200 && !exited; i++) if (await accepts(relay.port, 50)) return true;
    return false;
  }

  it('serve with a bad config exits non-zero before listening', async () => {
    const relay = await spawnRelay({ config: { sinks: { notif: { ...notif, qso: 1 } } }, waitReady: false });
    expect(await everListened(relay)).toBe(false);
    expect(await relay.exited).toMatchObject({ code: CONFIG_ERROR });
    expect(relay.lines.join('\n')).toContain('sinks.notif.qso: unknown key');
    expect(relay.lines.join('\n')).not.toMatch(/listening/);
  });

  it('serve with an env override that is not valid exits non-zero before listening', async () => {
    const relay = await spawnRelay({ env: { PUSH_RELAY_PORT: 'eighty' }, waitReady: false });
    expect(await relay.exited).toMatchObject({ code: CONFIG_ERROR });
    expect(relay.lines.join('\n')).toContain('server.port');
    expect(relay.lines.join('\n')).not.toMatch(/listening/);
  });
});
