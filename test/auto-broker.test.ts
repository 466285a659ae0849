// Zero-config start (interface.md): with no broker URL the relay uses the broker on the auto
// port if one answers, or starts an embedded one there, so `mosquitto_sub -t 'mm/#'` works.
// Run as the user runs it: the CLI as a child process, no config file.
import { describe, expect, it } from 'vitest';
import { post } from './helpers/http.js';
import { haveMosquitto, startMosquitto } from './helpers/mosquitto.js';
import { subscribe } from './helpers/mqtt.js';
import { payload } from './helpers/payloads.js';
import { freePort } from './helpers/ports.js';
import { spawnRelay } from './helpers/relay.js';

const sample = payload('02');

describe('the auto broker', () => {
  it('starts an embedded broker on the auto port when none answers, and a subscriber there gets the message', async () => {
    const autoPort = await freePort();
    const relay = await spawnRelay({ env: { PUSH_RELAY_MQTT_AUTO_PORT: String(autoPort), PUSH_RELAY_MQTT_URL: undefined } });
    await relay.waitForLine(/started an embedded one/);
    const hint = await relay.waitForLine(/mosquitto_sub/);
    expect(hint).toContain(`mosquitto_sub -h 127.0.0.1 -p ${autoPort} -v -t 'mm/#'`);

    const sub = await subscribe(`mqtt://127.0.0.1:${autoPort}`, 'mm/#');
    const reply = await post(`${relay.url}/api/v1/send_push`, sample.text);
    expect(reply.status).toBe(200);
    expect(reply.text).toBe('{"status":"OK"}');
    const [got] = await sub.waitFor(1);
    expect(got?.topic).toBe('mm/_notif');
    expect(got?.payload.equals(Buffer.from(sample.json.message as string, 'utf8'))).toBe(true);
    await sub.close();

    expect(await relay.stop()).toEqual({ code: 0, signal: null });
  });

  it.skipIf(!haveMosquitto())('publishes to the broker already answering on the auto port', async () => {
    const broker = await startMosquitto();
    const sub = await subscribe(broker.url, 'mm/#');
    const relay = await spawnRelay({ env: { PUSH_RELAY_MQTT_AUTO_PORT: String(broker.port), PUSH_RELAY_MQTT_URL: undefined } });
    await relay.waitForLine(/found an MQTT broker/);
    expect(relay.lines.join('\n')).not.toMatch(/started an embedded one/);

    const reply = await post(`${relay.url}/api/v1/send_push`, sample.text);
    expect(reply.text).toBe('{"status":"OK"}');
    const [got] = await sub.waitFor(1);
    expect(got?.payload.toString('utf8')).toBe(sample.json.message);

    expect(await relay.stop()).toEqual({ code: 0, signal: null });
    await broker.stop();
  });
});
