// What Mattermost (or anything else on the network) may post that is not a valid push: every
// one gets a contract reply whose error names the problem (HTTP 200 FAIL, or 413 over the
// body limit), nothing crashes, and valid pushes keep flowing to the broker.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Relay } from '../src/relay.js';
import { post, type Reply } from './helpers/http.js';
import { haveMosquitto, startMosquitto, type Mosquitto } from './helpers/mosquitto.js';
import { subscribe, type Subscriber } from './helpers/mqtt.js';
import { messagePush } from './helpers/payloads.js';
import { startTestRelay } from './helpers/relay.js';
import { sleep } from './helpers/wait.js';

let seq = 0;
function uniquePush(overrides: Record<string, unknown> = {}) {
  const id = `bad${process.pid.toString(36)}${(++seq).toString(36)}`.padEnd(26, '0').slice(0, 26);
  return messagePush({ ack_id: id, message: `valid ${id}`, ...overrides });
}

/** HTTP 200 with exactly {status: FAIL, error: <string>}, the error matching `names`. */
function expectFail(reply: Reply, names: RegExp) {
  expect(reply.status).toBe(200);
  expect(reply.json).toEqual({ status: 'FAIL', error: expect.any(String) });
  expect((reply.json as { error: string }).error).toMatch(names);
}

describe.skipIf(!haveMosquitto())('bad input to send_push', () => {
  let broker: Mosquitto;
  let relay: Relay;
  let small: Relay;
  /** The message-format sinks only: no json sink to overflow on deep nesting. */
  let textOnly: Relay;
  let notif: Subscriber;
  let chan: Subscriber;
  let json: Subscriber;

  beforeAll(async () => {
    broker = await startMosquitto();
    [notif, chan, json] = await Promise.all([subscribe(broker.url, 'mm/#'), subscribe(broker.url, 'mmch/#'), subscribe(broker.url, 'mmjson/#')]);
    const sinks = {
      notif: { type: 'mqtt', url: broker.url, topic: 'mm/_notif', format: 'message' },
      chan: { type: 'mqtt', url: broker.url, topic: 'mmch/{channel_name}', format: 'message' },
      json: { type: 'mqtt', url: broker.url, topic: 'mmjson/{type}', format: 'json' },
    };
    relay = await startTestRelay({ delivery: { deadline: '3s' }, sinks });
    small = await startTestRelay({ server: { bodyLimit: '2kb' }, sinks: { notif: sinks.notif } });
    textOnly = await startTestRelay({ delivery: { deadline: '3s' }, sinks: { notif: sinks.notif, chan: sinks.chan } });
  });
  afterAll(async () => {
    await Promise.all([relay?.stop(), small?.stop(), textOnly?.stop()]);
    await broker?.stop();
  });

  const send = (body: string | Uint8Array, target: Relay = relay, chunked = false) =>
    post(`${target.url}/api/v1/send_push`, body, { chunked });
  const sendJson = (v: unknown, target: Relay = relay) => send(JSON.stringify(v), target);

  it('answers FAIL "invalid JSON" to a body that is not JSON', async () => {
    expectFail(await send('{"platform":"android_rn-v2",'), /^invalid JSON/);
  });

  it('answers FAIL "empty body" to an empty body', async () => {
    expectFail(await send(''), /^empty body/);
  });

  it('answers FAIL naming the array when the body is a JSON array', async () => {
    expectFail(await sendJson([uniquePush()]), /expected a JSON object, got an array/);
  });

  it('answers FAIL naming null when the body is null', async () => {
    expectFail(await send('null'), /expected a JSON object, got null/);
  });

  it('answers FAIL naming the number when the body is a number', async () => {
    expectFail(await send('42'), /expected a JSON object, got number/);
  });

  it('answers FAIL naming device_id when it is missing', async () => {
    expectFail(await sendJson(uniquePush({ device_id: undefined })), /^device_id is required$/);
  });

  it('answers FAIL naming device_id when it is empty', async () => {
    expectFail(await sendJson(uniquePush({ device_id: '' })), /^device_id must not be empty$/);
  });

  it('answers FAIL naming platform when it is missing', async () => {
    expectFail(await sendJson(uniquePush({ platform: undefined })), /^platform is required$/);
  });

  it('answers FAIL naming server_id when it is empty', async () => {
    expectFail(await sendJson(uniquePush({ server_id: '' })), /^server_id must not be empty$/);
  });

  it('answers FAIL naming device_id when it is a number', async () => {
    expectFail(await sendJson(uniquePush({ device_id: 5 })), /^device_id must be a string, got number$/);
  });

  it('answers FAIL naming badge when it is a string', async () => {
    expectFail(await sendJson(uniquePush({ badge: '3' })), /^badge must be a number, got string$/);
  });

  it('answers FAIL naming is_crt_enabled when it is "yes"', async () => {
    expectFail(await sendJson(uniquePush({ is_crt_enabled: 'yes' })), /^is_crt_enabled must be a boolean, got string$/);
  });

  it('answers FAIL "invalid JSON" when the JSON text holds a raw NUL byte', async () => {
    const text = JSON.stringify(uniquePush()).replace('"message":"valid', '"message":"va\u0000lid');
    expect(Buffer.from(text).includes(0)).toBe(true);
    expectFail(await send(text), /^invalid JSON/);
  });

  it('answers FAIL "invalid JSON" to bytes that are not UTF-8 JSON', async () => {
    expectFail(await send(Buffer.from([0xff, 0xfe, 0x7b, 0x00, 0x7d])), /^invalid JSON/);
  });

  it('accepts an escaped \\u0000 in a field and sanitises it out of the topic', async () => {
    const before = { notif: notif.messages.length, chan: chan.messages.length };
    const push = uniquePush({ channel_name: 'nul\u0000here', message: 'text with a \u0000 inside' });
    const text = JSON.stringify(push);
    expect(text).toContain('\\u0000');
    const reply = await send(text);
    expect(reply.status).toBe(200);
    expect(reply.text).toBe('{"status":"OK"}');
    const [got] = (await chan.waitFor(before.chan + 1)).slice(before.chan);
    expect(got?.topic).toBe('mmch/nul_here');
    const [text1] = (await notif.waitFor(before.notif + 1)).slice(before.notif);
    expect(text1?.payload.equals(Buffer.from('text with a \u0000 inside', 'utf8'))).toBe(true);
  });

  it('keeps publishing after a channel_name with control characters: they are sanitised out of the topic', async () => {
    for (const [name, level] of [['line1\nline2', 'line1_line2'], ['tab\there', 'tab_here'], ['del\u007f', 'del_'], ['nonchar\uffff', 'nonchar_']]) {
      const before = chan.messages.length;
      const push = uniquePush({ channel_name: name });
      expect((await sendJson(push)).text, JSON.stringify(name)).toBe('{"status":"OK"}');
      const [got] = (await chan.waitFor(before + 1)).slice(before);
      expect(got?.topic).toBe(`mmch/${level}`);
      expect(got?.payload.toString('utf8')).toBe(push.message);
    }
  });

  it('keeps publishing after a 70 kB channel_name: the topic level is capped', async () => {
    const before = chan.messages.length;
    const push = uniquePush({ channel_name: 'c'.repeat(70_000) });
    expect((await sendJson(push)).text).toBe('{"status":"OK"}');
    const [got] = (await chan.waitFor(before + 1)).slice(before);
    expect(got?.topic).toBe(`mmch/${'c'.repeat(4096)}`);
    const next = uniquePush({ channel_name: 'after' });
    expect((await sendJson(next)).text).toBe('{"status":"OK"}');
    const [after] = (await chan.waitFor(before + 2)).slice(before + 1);
    expect(after?.topic).toBe('mmch/after');
  });

  it('answers a clear FAIL to 100000 unclosed [ and keeps serving', async () => {
    expectFail(await send('['.repeat(100_000)), /^invalid JSON/);
  });

  it('answers FAIL "got an array" to an array nested 100000 deep', async () => {
    expectFail(await send(`${'['.repeat(100_000)}${']'.repeat(100_000)}`), /expected a JSON object, got an array/);
  });

  it('delivers a valid push carrying an unknown field nested 1000 deep to every sink, the field included', async () => {
    const before = { notif: notif.messages.length, json: json.messages.length };
    const push = uniquePush();
    const text = `${JSON.stringify(push).slice(0, -1)},"future":${'{"x":'.repeat(1000)}1${'}'.repeat(1000)}}`;
    const reply = await send(text);
    expect(reply.status).toBe(200);
    expect(reply.text).toBe('{"status":"OK"}');
    const [got] = (await notif.waitFor(before.notif + 1)).slice(before.notif);
    expect(got?.payload.toString('utf8')).toBe(push.message);
    const [obj] = (await json.waitFor(before.json + 1)).slice(before.json);
    expect(JSON.parse(obj!.payload.toString('utf8'))).toEqual(JSON.parse(text));
  });

  // Go's encoding/json takes 10 000 levels (the official proxy would answer OK up to there);
  // the relay takes 1 000 (guards.ts MAX_DEPTH): Mattermost never nests its fields, and past
  // ~5 000 levels V8's JSON.stringify overflows its stack in the json sink and the outbox.
  it('answers OK to a push with an unknown field nested 999 deep, and the json sink publishes it whole', async () => {
    const before = { notif: notif.messages.length, json: json.messages.length };
    const push = uniquePush();
    const text = `${JSON.stringify(push).slice(0, -1)},"future":${'{"x":'.repeat(999)}1${'}'.repeat(999)}}`;
    expect((await send(text)).text).toBe('{"status":"OK"}');
    await notif.waitFor(before.notif + 1);
    const [got] = (await json.waitFor(before.json + 1)).slice(before.json);
    expect(got!.payload.toString('utf8').split('{"x":').length - 1).toBe(999);
  });

  it.each([1001, 10_000, 100_000])(
    'answers FAIL naming the depth limit to a push with an unknown field nested %i deep, and publishes nothing',
    async (depth) => {
      const before = { notif: notif.messages.length, json: json.messages.length };
      const push = uniquePush();
      const text = `${JSON.stringify(push).slice(0, -1)},"future":${'{"x":'.repeat(depth)}1${'}'.repeat(depth)}}`;
      // Refused before any sink sees it (guards.ts MAX_DEPTH): the json sink's JSON.stringify
      // and the dead-letter write overflowed their stacks at 5 000 levels, and the push was lost.
      expectFail(await send(text), /^field "future" is nested deeper than 1000 levels/);
      // A push after it is published: had the deep one been, it would arrive first.
      const next = uniquePush();
      expect((await sendJson(next)).text).toBe('{"status":"OK"}');
      const [got] = (await notif.waitFor(before.notif + 1)).slice(before.notif);
      expect(got?.payload.toString('utf8')).toBe(next.message);
      const [obj] = (await json.waitFor(before.json + 1)).slice(before.json);
      expect((JSON.parse(obj!.payload.toString('utf8')) as { ack_id: string }).ack_id).toBe(next.ack_id);
    },
  );

  describe('body limit', () => {
    it('answers 413 with a FAIL naming the limit to a body over server.bodyLimit (2kb)', async () => {
      const reply = await sendJson(uniquePush({ message: 'x'.repeat(3000) }), small);
      expect(reply.status).toBe(413);
      expect(reply.json).toEqual({ status: 'FAIL', error: expect.stringContaining('2048 bytes') });
    });

    it('answers 413 to an over-limit body sent chunked, without Content-Length', async () => {
      const reply = await send(JSON.stringify(uniquePush({ message: 'x'.repeat(300_000) })), small, true);
      expect(reply.status).toBe(413);
      expect(reply.json).toEqual({ status: 'FAIL', error: expect.stringContaining('2048 bytes') });
    });

    it('accepts a body just under server.bodyLimit (2kb)', async () => {
      const push = uniquePush();
      const pad = 2048 - Buffer.byteLength(JSON.stringify(push)) - 20;
      const body = JSON.stringify({ ...push, message: `${push.message as string}${'y'.repeat(pad)}` });
      expect(Buffer.byteLength(body)).toBeGreaterThan(2000);
      expect(Buffer.byteLength(body)).toBeLessThanOrEqual(2048);
      const reply = await send(body, small);
      expect(reply.text).toBe('{"status":"OK"}');
    });

    it('accepts and delivers a 200 kB message under the default 1 MiB limit, byte for byte', async () => {
      const before = notif.messages.length;
      const message = `long ${'🚀 lorem ipsum dolor sit amet '.repeat(200_000 / 32)}`;
      const reply = await sendJson(uniquePush({ message }));
      expect(reply.status).toBe(200);
      expect(reply.text).toBe('{"status":"OK"}');
      const [got] = (await notif.waitFor(before + 1)).slice(before);
      expect(got?.payload.length).toBeGreaterThan(200_000);
      expect(got?.payload.equals(Buffer.from(message, 'utf8'))).toBe(true);
    });

    it('answers 413 to 1.1 MiB under the default 1 MiB limit', async () => {
      const reply = await sendJson(uniquePush({ message: 'z'.repeat(1.1 * 1024 * 1024) }));
      expect(reply.status).toBe(413);
      expect(reply.json).toEqual({ status: 'FAIL', error: expect.stringContaining('1048576 bytes') });
    });
  });

  it('answers 50 bad and 50 good pushes sent at once, and delivers every good one', async () => {
    const before = notif.messages.length;
    const bad = [
      () => send('{'),
      () => send(''),
      () => sendJson(uniquePush({ device_id: '' })),
      () => sendJson(uniquePush({ badge: 'x' })),
      () => send('['.repeat(10_000)),
    ];
    const good = Array.from({ length: 50 }, () => uniquePush());
    const replies = await Promise.all([
      ...Array.from({ length: 50 }, (_, i) => bad[i % bad.length]!().then((r) => ({ r, good: false }))),
      ...good.map((p) => sendJson(p).then((r) => ({ r, good: true }))),
    ]);
    for (const { r, good: isGood } of replies) {
      expect(r.status).toBe(200);
      expect((r.json as { status: string }).status).toBe(isGood ? 'OK' : 'FAIL');
    }
    const got = (await notif.waitFor(before + 50)).slice(before).map((m) => m.payload.toString('utf8'));
    expect(got.sort()).toEqual(good.map((p) => p.message as string).sort());
  });

  it('still answers OK to a valid push after all of the above, and delivers it', async () => {
    const before = notif.messages.length;
    const push = uniquePush();
    const reply = await sendJson(push);
    expect(reply.status).toBe(200);
    expect(reply.text).toBe('{"status":"OK"}');
    const [got] = (await notif.waitFor(before + 1)).slice(before);
    expect(got?.payload.toString('utf8')).toBe(push.message);
  });
});
