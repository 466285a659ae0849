// `push-relay import-proxy-config FILE`, run as a user runs it (node dist/src/cli.js): a
// mattermost-push-proxy config in the sample's shape becomes YAML that `check-config` accepts;
// what cannot be translated exits 2 and is named.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { translateProxyConfig } from '../src/import-proxy-config.js';
import { REPO_ROOT } from './helpers/payloads.js';
import { runCli } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';

const FIXTURES = join(REPO_ROOT, 'test', 'fixtures', 'proxy-config');
const SAMPLE = join(FIXTURES, 'push-proxy.json');

type Imported = {
  server: { host: string; port: number };
  log?: { format: string };
  sinks: Record<string, Record<string, unknown>>;
  routes: Array<{ match: { platform: string }; sinks: string[] }>;
};

async function importFile(file: string) {
  const r = await runCli(['import-proxy-config', file]);
  return { ...r, config: parseYaml(r.stdout) as Imported };
}

async function checkConfig(config: unknown) {
  const file = join(tempDir(), 'push-relay.yaml');
  writeFileSync(file, typeof config === 'string' ? config : stringifyYaml(config));
  return runCli(['check-config', file]);
}


describe('push-relay import-proxy-config', () => {
  it('turns a config in the official proxy’s sample shape into sinks, routes by Type and the listen address', async () => {
    const { code, stderr, config } = await importFile(SAMPLE);
    expect(stderr).not.toMatch(/cannot translate/);
    expect(code).toBe(0);
    // ThrottlePerSec becomes server.rateLimit (the official proxy's throttle is per client, too).
    expect(config.server).toEqual({ host: '127.0.0.1', port: 8066, rateLimit: { perSecond: 500, burst: 500 } });
    expect(config.log).toEqual({ format: 'json' });
    expect(config.sinks).toEqual({
      // .p8 token auth, production
      apple_rn: {
        type: 'apns',
        topic: 'com.example.chat',
        keyFile: '/etc/push-proxy/AuthKey_K3Y1D00001.p8',
        keyId: 'K3Y1D00001',
        teamId: 'TEAM000001',
        production: true,
      },
      // certificate auth (one PEM with cert and key), ApplePushUseDevelopment -> sandbox
      apple_rnbeta: {
        type: 'apns',
        topic: 'com.example.chat.beta',
        cert: '/etc/push-proxy/beta-push.pem',
        key: '/etc/push-proxy/beta-push.pem',
        passphrase: 'not-a-real-passphrase',
        production: false,
      },
      android_rn: { type: 'fcm', serviceAccount: '/etc/push-proxy/firebase-service-account.json' },
    });
    expect(config.routes).toEqual([
      { match: { platform: 'apple_rn' }, sinks: ['apple_rn'] },
      { match: { platform: 'apple_rnbeta' }, sinks: ['apple_rnbeta'] },
      { match: { platform: 'android_rn' }, sinks: ['android_rn'] },
    ]);
    // The entries without credentials are left out, as the proxy skips them, and said so.
    expect(stderr).toMatch(/note: ApplePushSettings\[0\] \(apple\): no credentials .* left out/);
    expect(stderr).toMatch(/note: AndroidPushSettings\[0\] \(android\): no ServiceFileLocation .* left out/);
  });

  it('prints YAML whose server, log and routes check-config accepts (sinks swapped for log sinks)', async () => {
    const { config } = await importFile(SAMPLE);
    const sinks = Object.fromEntries(Object.keys(config.sinks).map((name) => [name, { type: 'log' }]));
    const r = await checkConfig({ ...config, sinks });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/OK\n {2}listen: 127\.0\.0\.1:8066\n {2}sinks: apple_rn \(log\), apple_rnbeta \(log\), android_rn \(log\)\n {2}routes: 3/);
  });

  it('prints YAML that check-config accepts as it is', async () => {
    const { stdout } = await importFile(SAMPLE);
    const r = await checkConfig(stdout);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
  });

  it('exits 2 naming each key it cannot translate, and still prints the rest', async () => {
    const { code, stderr, stdout, config } = await importFile(join(FIXTURES, 'untranslatable.json'));
    expect(code).toBe(2);
    expect(stderr).toMatch(/cannot translate: AndroidPushSettings\[0\] \(android_rn\)\.AndroidApiKey: the legacy FCM server key/);
    expect(stderr).toMatch(/cannot translate: EnableFileLog: /);
    expect(stdout).toMatch(/# NOT TRANSLATED \(fix these by hand\):\n# {3}- EnableFileLog: .*\n# {3}- AndroidPushSettings\[0\] \(android_rn\)\.AndroidApiKey/);
    expect(config.server).toEqual({ host: '0.0.0.0', port: 9066 });
    expect(Object.keys(config.sinks)).toEqual(['apple_rn']);
  });

  it('exits 1 and prints nothing for a file that is not JSON', async () => {
    const file = join(tempDir(), 'broken.json');
    writeFileSync(file, '{"ListenAddress": ');
    const r = await runCli(['import-proxy-config', file]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/broken\.json: not valid JSON/);
  });

  it('exits 2 with the usage when no file is given', async () => {
    const r = await runCli(['import-proxy-config']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/import-proxy-config needs the mattermost-push-proxy config file/);
  });
});

describe('translateProxyConfig', () => {
  const translate = (c: unknown) => {
    const t = translateProxyConfig(c);
    return { ...t, config: parseYaml(t.yaml) as Imported };
  };
  const fcm = (Type: string, more: Record<string, unknown> = {}) => ({ AndroidPushSettings: [{ Type, ServiceFileLocation: '/sa.json', ...more }] });

  it('reads field names case-insensitively, as Go’s encoding/json does', () => {
    const { config, problems } = translate({ listenaddress: ':1234', androidpushsettings: [{ type: 'android_rn', servicefilelocation: '/sa.json' }] });
    expect(problems).toEqual([]);
    expect(config.server.port).toBe(1234);
    expect(config.sinks.android_rn).toEqual({ type: 'fcm', serviceAccount: '/sa.json' });
  });

  it('reads ListenAddress forms: :port, host:port, [v6]:port', () => {
    expect(translate({ ListenAddress: ':8066', ...fcm('a') }).config.server).toEqual({ host: '0.0.0.0', port: 8066 });
    expect(translate({ ListenAddress: '10.0.0.5:80', ...fcm('a') }).config.server).toEqual({ host: '10.0.0.5', port: 80 });
    expect(translate({ ListenAddress: '[::1]:8066', ...fcm('a') }).config.server).toEqual({ host: '::1', port: 8066 });
    expect(translate({ ListenAddress: '8066', ...fcm('a') }).problems).toEqual(['ListenAddress: "8066" is not host:port']);
  });

  it('prefers the .p8 key over the certificate when all three token fields are set, as the proxy does', () => {
    const { config, notes } = translate({
      ApplePushSettings: [{ Type: 'apple_rn', ApplePushTopic: 't', AppleAuthKeyFile: '/k.p8', AppleAuthKeyID: 'K', AppleTeamID: 'T', ApplePushCertPrivate: '/c.pem' }],
    });
    expect(config.sinks.apple_rn).toEqual({ type: 'apns', topic: 't', keyFile: '/k.p8', keyId: 'K', teamId: 'T', production: true });
    expect(notes).toContain('ApplePushSettings[0] (apple_rn).ApplePushCertPrivate: ignored, as by the proxy: the .p8 key wins');
  });

  it('names the missing token fields when the .p8 setup is incomplete and there is no certificate', () => {
    const { problems } = translate({ ApplePushSettings: [{ Type: 'apple_rn', ApplePushTopic: 't', AppleAuthKeyFile: '/k.p8' }] });
    expect(problems[0]).toMatch(/^ApplePushSettings\[0\] \(apple_rn\)\.AppleAuthKeyID, AppleTeamID: missing/);
  });

  it('refuses an Apple entry without a topic', () => {
    const { problems } = translate({ ApplePushSettings: [{ Type: 'apple_rn', ApplePushCertPrivate: '/c.pem' }] });
    expect(problems[0]).toMatch(/ApplePushTopic: empty/);
  });

  it('lets a later entry of the same Type replace an earlier one, as the proxy’s map does', () => {
    const { config, notes } = translate({ AndroidPushSettings: [{ Type: 'x', ServiceFileLocation: '/1.json' }, { Type: 'x', ServiceFileLocation: '/2.json' }] });
    expect(config.sinks).toEqual({ x: { type: 'fcm', serviceAccount: '/2.json' } });
    expect(notes).toContain('AndroidPushSettings[1] (x): Type "x" again: it replaces AndroidPushSettings[0] (x), as in the proxy');
  });

  it('names a value of the wrong type', () => {
    expect(translate({ ThrottlePerSec: '300', ...fcm('a') }).problems).toEqual(['ThrottlePerSec: expected an integer, got "300"']);
  });

  it('notes keys the proxy does not know, and ignores them as it does', () => {
    const { problems, notes } = translate({ Bogus: 1, ...fcm('a') });
    expect(problems).toEqual([]);
    expect(notes).toContain('Bogus: not a mattermost-push-proxy setting; ignored (the proxy ignores it too)');
  });

  it('exits 2 (a problem) when no entry is usable', () => {
    const { problems, config } = translate({ AndroidPushSettings: [{ Type: 'android', ServiceFileLocation: '' }] });
    expect(problems).toEqual([expect.stringMatching(/^ApplePushSettings, AndroidPushSettings: no usable entry/)]);
    expect(config.sinks).toEqual({ log: { type: 'log' } });
  });

  it('refuses what is not a JSON object', () => {
    expect(translateProxyConfig([1, 2]).problems).toEqual(['the config: expected a JSON object (a mattermost-push-proxy config)']);
  });
});
