// `push-relay send`: a test notification the way Mattermost posts it, for checking a setup
// without curl. It must reach the broker and report the relay's reply.
import { describe, expect, it } from 'vitest';
import { haveMosquitto, startMosquitto } from './helpers/mosquitto.js';
import { subscribe } from './helpers/mqtt.js';
import { runCli, startTestRelay } from './helpers/relay.js';

describe.skipIf(!haveMosquitto())('push-relay send', () => {
  it('posts a notification that arrives on the topic, and prints the OK reply', async () => {
    const broker = await startMosquitto();
    const sub = await subscribe(broker.url, 'mm/#');
    const relay = await startTestRelay({ sinks: { mqtt: { type: 'mqtt', url: broker.url } } });
    const r = await runCli(['send', '--url', relay.url, '--message', 'hi from the CLI ✓']);
    expect(r.stdout.trim()).toBe('200 {"status":"OK"}');
    expect(r.code).toBe(0);
    const [m] = await sub.waitFor(1);
    expect(m?.topic).toBe('mm/_notif');
    expect(m?.payload.toString('utf8')).toBe('hi from the CLI ✓');
    await relay.stop();
  });

  it('exits non-zero and prints the FAIL when the relay cannot deliver', async () => {
    const broker = await startMosquitto();
    const relay = await startTestRelay({ store: 'none', delivery: { deadline: '300ms' }, sinks: { mqtt: { type: 'mqtt', url: broker.url } } });
    await broker.stop();
    const r = await runCli(['send', '--url', relay.url]);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^200 \{"status":"FAIL","error":"mqtt: /);
    await relay.stop();
  });

  it('says so when nothing listens at the URL', async () => {
    const r = await runCli(['send', '--url', 'http://127.0.0.1:1']);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('cannot reach http://127.0.0.1:1');
  });
});
