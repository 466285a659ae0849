// The MQTT sink on its own (sinks/mqtt.ts), against real MQTT peers: what lands on the topic
// for each format, and what each broker answer becomes. The PUBACK reason codes come from an
// MQTT 5 server of the test's own (test/helpers/mqtt5-fake.ts) that answers each topic with
// the code the test chose, and, where mosquitto can give the answer for real, from mosquitto.
import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import mqtt from '../sinks/mqtt.js';
import type { Sink } from '../sinks/types.js';
import { PushNotificationSchema, type PushNotification } from '../src/contract.js';
import { createDeviceRegistry } from '../src/devices.js';
import { sinkMetrics } from '../src/metrics.js';
import { memoryKv } from '../src/store/index.js';
import { haveMosquitto, startMosquitto } from './helpers/mosquitto.js';
import { subscribe } from './helpers/mqtt.js';
import { startMqtt5Fake, type Mqtt5Fake } from './helpers/mqtt5-fake.js';
import { messagePush, payload } from './helpers/payloads.js';
import { freePort } from './helpers/ports.js';
import { tempDir } from './helpers/tmp.js';
import { sleep, until } from './helpers/wait.js';

const sinks = new Set<Sink>();

/** The sink as src/relay.ts builds it: the module's schema, then its factory with a context. */
function mqttSink(config: Record<string, unknown>, name = 'm'): Sink {
  const ctx = {
    logger: pino({ level: 'silent' }),
    metrics: sinkMetrics(new Registry()),
    store: memoryKv()('x'),
    devices: createDeviceRegistry(memoryKv()('d')),
  };
  const sink = mqtt.create(name, mqtt.schema.parse({ type: 'mqtt', reconnectMin: '50ms', reconnectMax: '200ms', ...config }), ctx);
  sinks.add(sink);
  return sink;
}

async function started(config: Record<string, unknown>): Promise<Sink> {
  const sink = mqttSink(config);
  await sink.start();
  expect(sink.state()).toEqual({ ready: true, state: 'connected' });
  return sink;
}

/** A notification as the relay hands it to a sink: Mattermost's body through the contract's schema. */
const notification = (body: Record<string, unknown>): PushNotification => PushNotificationSchema.parse(body);
const send = (sink: Sink, n: PushNotification, ms = 3000) => sink.send(n, AbortSignal.timeout(ms));

afterAll(async () => {
  await Promise.all([...sinks].map((s) => s.close().catch(() => {})));
});

describe('the MQTT sink against an MQTT 5 server answering each topic with a chosen PUBACK reason code', () => {
  let fake: Mqtt5Fake;
  let sink: Sink;
  beforeAll(async () => {
    fake = await startMqtt5Fake();
    sink = await started({ url: fake.url, protocolVersion: 5, topic: 'mm/{channel_name}', qos: 1 });
  });

  // sinks/mqtt.ts PERMANENT_PUBACK, row by row (OASIS MQTT 5.0 §3.4.2.1): the broker will never
  // take this publish as it is, so the outbox must not retry it.
  const PERMANENT: Array<[string, string, number, RegExp]> = [
    ['0x83', 'implementation_specific_error', 0x83, /Implementation specific error/],
    ['0x87', 'not_authorized', 0x87, /Not authorized/],
    ['0x90', 'topic_name_invalid', 0x90, /Topic Name invalid/],
    ['0x99', 'payload_format_invalid', 0x99, /Payload format invalid/],
  ];

  it.each(PERMANENT)('reports PUBACK %s as permanent %s, naming the topic and the broker\'s words', async (_hex, reason, code, words) => {
    const channel = `permanent-${code.toString(16)}`;
    fake.answer(`mm/${channel}`, code);
    const before = fake.publishes.length;
    const outcome = await send(sink, notification(messagePush({ channel_name: channel })));
    expect(outcome).toEqual({ kind: 'permanent', reason, detail: expect.stringMatching(new RegExp(`refused the publish to mm/${channel}: `)) });
    expect((outcome as { detail: string }).detail).toMatch(words);
    // The publish did reach the broker, once: the refusal is its answer, not a lost packet.
    expect(fake.publishes.slice(before).map((p) => p.topic)).toEqual([`mm/${channel}`]);
  });

  // 0x80 Unspecified error says nothing about the publish itself; 0x97 Quota exceeded passes
  // with time. Both stay retryable (the comment on PERMANENT_PUBACK).
  it.each([
    ['0x80', 0x80, /Unspecified error/],
    ['0x97', 0x97, /Quota exceeded/],
  ] as const)('reports PUBACK %s as retryable publish_failed', async (_hex, code, words) => {
    const channel = `retryable-${code.toString(16)}`;
    fake.answer(`mm/${channel}`, code);
    const outcome = await send(sink, notification(messagePush({ channel_name: channel })));
    expect(outcome).toEqual({ kind: 'retryable', reason: 'publish_failed', detail: expect.stringMatching(words) });
  });

  // 0x10 No matching subscribers is a success code (< 0x80): the broker took the message.
  it.each([
    ['0x00', 0x00],
    ['0x10', 0x10],
  ] as const)('reports PUBACK %s as delivered', async (_hex, code) => {
    const channel = `success-${code.toString(16)}`;
    fake.answer(`mm/${channel}`, code);
    expect(await send(sink, notification(messagePush({ channel_name: channel })))).toEqual({ kind: 'delivered' });
  });

  it('lists every permanent reason it can report, each one tested above', () => {
    const permanent = sink.reasons.filter(([kind]) => kind === 'permanent').map(([, r]) => r);
    // topic_too_long is the sink's own check, tested below; the rest are PUBACK rows.
    expect(permanent.sort()).toEqual([...PERMANENT.map(([, r]) => r), 'topic_too_long'].sort());
  });

  it('connects with MQTT 5 when protocolVersion is 5', () => {
    expect(fake.connects.at(-1)).toMatchObject({ protocolVersion: 5, clean: true, clientId: expect.stringMatching(/^push-relay-m-/) });
  });
});

describe('what the MQTT sink publishes, as the subscriber sees it', () => {
  let fake: Mqtt5Fake;
  beforeAll(async () => {
    fake = await startMqtt5Fake();
  });

  /** Sends `n` through a sink with `config` and returns what reached the server. */
  async function published(config: Record<string, unknown>, n: PushNotification) {
    const sink = await started({ url: fake.url, protocolVersion: 5, ...config });
    const before = fake.publishes.length;
    const outcome = await send(sink, n);
    // A publish that is not acknowledged (QoS 0) is still on the wire when send() resolves.
    if (outcome.kind === 'delivered') await fake.waitForPublishes(before + 1);
    else await sleep(100);
    await sink.close();
    return { outcome, got: fake.publishes.slice(before) };
  }

  it('format message: the message text, byte for byte, on mm/_notif by default, QoS 1, not retained', async () => {
    const message = 'Alice: héllo 🚀 "quoted" \\ back\nline two';
    const { outcome, got } = await published({}, notification(messagePush({ message })));
    expect(outcome).toEqual({ kind: 'delivered' });
    expect(got).toHaveLength(1);
    expect(got[0]).toEqual({ topic: 'mm/_notif', payload: Buffer.from(message, 'utf8'), qos: 1, retain: false });
  });

  it('format json: the whole notification as JSON, unknown fields included', async () => {
    const body = messagePush({ future_field: { nested: [1, 'two'] } });
    const { outcome, got } = await published({ format: 'json', topic: 'mm/json' }, notification(body));
    expect(outcome).toEqual({ kind: 'delivered' });
    expect(got.map((p) => p.topic)).toEqual(['mm/json']);
    expect(JSON.parse(got[0]!.payload.toString('utf8'))).toEqual(body);
  });

  it('format json: publishes a push without text too (a clear carries the badge)', async () => {
    const clear = payload('08').json;
    const { outcome, got } = await published({ format: 'json', topic: 'mm/{type}' }, notification(clear));
    expect(outcome).toEqual({ kind: 'delivered' });
    expect(got.map((p) => p.topic)).toEqual(['mm/clear']);
    expect(JSON.parse(got[0]!.payload.toString('utf8'))).toEqual(clear);
  });

  it('format template: the rendered template, byte for byte', async () => {
    const n = notification(messagePush({ sender_name: 'alice', channel_name: 'Town Square', message: 'hi ✓' }));
    const { got } = await published({ format: 'template', template: '[{type}] {sender_name} in {channel_name}: {message}' }, n);
    expect(got.map((p) => p.payload.toString('utf8'))).toEqual(['[message] alice in Town Square: hi ✓']);
  });

  it.each([
    ['message', {}],
    ['template', { format: 'template', template: '{message}!' }],
  ])('format %s: skips a push without text (a clear) and publishes nothing', async (_format, config) => {
    const { outcome, got } = await published(config, notification(payload('08').json));
    expect(outcome).toEqual({ kind: 'skipped', reason: 'no_text' });
    expect(got).toEqual([]);
  });

  it('sanitises placeholders in the topic: / + # and control characters become _, an empty field too', async () => {
    const n = notification(messagePush({ channel_name: 'a/b+c#d\u0001e\u007f', sender_name: '' }));
    const { got } = await published({ topic: 'mm/{channel_name}/{sender_name}/x' }, n);
    expect(got.map((p) => p.topic)).toEqual(['mm/a_b_c_d_e_/_/x']);
  });

  it('answers permanent topic_too_long to a topic over 65535 bytes, without publishing', async () => {
    // Each placeholder is capped at 4 KiB; 17 of them pass the whole topic's limit.
    const topic = Array.from({ length: 17 }, () => '{device_id}').join('/');
    const { outcome, got } = await published({ topic }, notification(messagePush({ device_id: 'd'.repeat(5000) })));
    expect(outcome).toMatchObject({ kind: 'permanent', reason: 'topic_too_long' });
    expect(got).toEqual([]);
  });

  it.each([0, 1] as const)('publishes with qos: %i, and retain when asked', async (qos) => {
    const { outcome, got } = await published({ qos, retain: true, topic: `mm/qos${qos}` }, notification(messagePush()));
    expect(outcome).toEqual({ kind: 'delivered' });
    expect(got.map(({ topic, qos: q, retain }) => ({ topic, qos: q, retain }))).toEqual([{ topic: `mm/qos${qos}`, qos, retain: true }]);
  });
});

describe('the MQTT sink without a broker', () => {
  it('answers retryable broker_unavailable before it has started', async () => {
    const sink = mqttSink({ url: 'mqtt://127.0.0.1:1' });
    expect(await send(sink, notification(messagePush()))).toEqual({ kind: 'retryable', reason: 'broker_unavailable', detail: 'MQTT broker not connected' });
  });

  it('answers retryable broker_unavailable when the broker went away and does not return before the deadline', async () => {
    const fake = await startMqtt5Fake();
    const sink = await started({ url: fake.url, protocolVersion: 5 });
    await fake.close();
    await until('the sink to notice the broker is gone', () => !sink.state().ready);
    const t0 = Date.now();
    expect(await send(sink, notification(messagePush()), 300)).toEqual({ kind: 'retryable', reason: 'broker_unavailable', detail: 'MQTT broker not connected' });
    // It waited for the broker until its deadline, not longer.
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(sink.state()).toMatchObject({ ready: false, state: 'disconnected' });
  });

  it('delivers what waited for the broker once it is back within the deadline', async () => {
    const port = await freePort();
    const sink = mqttSink({ url: `mqtt://127.0.0.1:${port}`, protocolVersion: 5 });
    // start() waits up to 3 s for a first connection; a send meanwhile waits for its deadline.
    const starting = sink.start();
    const sending = send(sink, notification(messagePush({ message: 'waited' })), 4000);
    await sleep(200);
    expect(sink.state().ready).toBe(false);
    const fake = await startMqtt5Fake({ port });
    expect(await sending).toEqual({ kind: 'delivered' });
    expect(fake.publishes.map((p) => p.payload.toString('utf8'))).toEqual(['waited']);
    await starting;
  });
});

describe.skipIf(!haveMosquitto())('the MQTT sink against mosquitto (MQTT 5)', () => {
  it('reports permanent not_authorized when the ACL denies the publish (PUBACK 0x87 from mosquitto)', async () => {
    // mosquitto drops root for its own user, which must be able to read the ACL file.
    const aclDir = tempDir();
    chmodSync(aclDir, 0o755);
    const acl = join(aclDir, 'acl');
    writeFileSync(acl, 'topic read mm/#\ntopic readwrite open/#\n', { mode: 0o644 });
    const broker = await startMosquitto({ extra: [`acl_file ${acl}`] });
    const sub = await subscribe(broker.url, ['mm/#', 'open/#']);
    const denied = await started({ url: broker.url, protocolVersion: 5, topic: 'mm/_notif' });
    const outcome = await send(denied, notification(messagePush()));
    expect(outcome).toEqual({ kind: 'permanent', reason: 'not_authorized', detail: expect.stringMatching(/refused the publish to mm\/_notif: .*Not authorized/) });
    // The same broker takes a publish the ACL allows: the refusal was about the topic.
    const allowed = await started({ url: broker.url, protocolVersion: 5, topic: 'open/_notif' });
    expect(await send(allowed, notification(messagePush({ message: 'allowed' })))).toEqual({ kind: 'delivered' });
    const got = await sub.waitFor(1);
    await sleep(200);
    expect(got.map((m) => [m.topic, m.payload.toString('utf8')])).toEqual([['open/_notif', 'allowed']]);
    await broker.stop();
  });

  it('reports delivered when mosquitto has no subscriber for the topic (PUBACK 0x10 is a success)', async () => {
    const broker = await startMosquitto();
    const sink = await started({ url: broker.url, protocolVersion: 5, topic: 'nobody/listens' });
    expect(await send(sink, notification(messagePush()))).toEqual({ kind: 'delivered' });
    await broker.stop();
  });

  it('with MQTT 3.1.1 (the default), a publish the ACL denies is dropped silently and reads as delivered', async () => {
    // MQTT 3.1.1 has no way to refuse a publish (§3.3.5: the server may discard it and still
    // PUBACK): why protocolVersion: 5 exists. This pins that the sink cannot tell.
    const aclDir = tempDir();
    chmodSync(aclDir, 0o755);
    const acl = join(aclDir, 'acl');
    writeFileSync(acl, 'topic read mm/#\n', { mode: 0o644 });
    const broker = await startMosquitto({ extra: [`acl_file ${acl}`] });
    const sub = await subscribe(broker.url, 'mm/#');
    const sink = await started({ url: broker.url, topic: 'mm/_notif' });
    expect(await send(sink, notification(messagePush()))).toEqual({ kind: 'delivered' });
    await sleep(300);
    expect(sub.messages).toEqual([]);
    await broker.stop();
  });
});
