// The whole path as a user sees it: Mattermost posts each sample payload the way it does (no
// Content-Type, UA Mattermost-Bot/1.1) to a relay publishing to a real mosquitto, and a
// subscriber reads the bytes on the topics. Plus the operator endpoints.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Relay } from '../src/relay.js';
import { get, post, request } from './helpers/http.js';
import { haveMosquitto, startMosquitto, type Mosquitto } from './helpers/mosquitto.js';
import { subscribe, type Received, type Subscriber } from './helpers/mqtt.js';
import { loadPayloads, messagePush, payload, REPO_ROOT } from './helpers/payloads.js';
import { startTestRelay } from './helpers/relay.js';
import { until } from './helpers/wait.js';

const OK = '{"status":"OK"}';
const payloads = loadPayloads();
const level = (v: string | undefined) => (v === undefined || v === '' ? '_' : v.replace(/[/+#\u0000]/g, '_'));

function sinks(url: string) {
  return {
    notif: { type: 'mqtt', url, topic: 'mm/_notif', format: 'message' },
    json: { type: 'mqtt', url, topic: 'mmjson/{type}', format: 'json' },
    chan: { type: 'mqtt', url, topic: 'mmch/{channel_name}', format: 'message' },
  };
}

let seq = 0;
/** A message push with its own ack_id and text, so its arrival can be told apart. */
function uniquePush(overrides: Record<string, unknown> = {}) {
  const id = `${Date.now().toString(36)}${(++seq).toString(36)}`.padEnd(26, '0').slice(0, 26);
  return messagePush({ ack_id: id, message: `sentinel ${id}`, ...overrides });
}

const texts = (ms: Received[]) => ms.map((m) => m.payload.toString('utf8'));

describe.skipIf(!haveMosquitto())('send_push end to end', () => {
  let broker: Mosquitto;
  let relay: Relay;
  let notif: Subscriber;
  let json: Subscriber;
  let chan: Subscriber;

  beforeAll(async () => {
    broker = await startMosquitto();
    [notif, json, chan] = await Promise.all([subscribe(broker.url, 'mm/#'), subscribe(broker.url, 'mmjson/#'), subscribe(broker.url, 'mmch/#')]);
    relay = await startTestRelay({ delivery: { deadline: '3s' }, sinks: sinks(broker.url) });
  });
  afterAll(async () => {
    await relay?.stop();
    await broker?.stop();
  });

  const send = (body: string | Record<string, unknown>) =>
    post(`${relay.url}/api/v1/send_push`, typeof body === 'string' ? body : JSON.stringify(body));

  describe.each(payloads.filter((p) => typeof p.json.message === 'string').map((p) => [p.name, p] as const))(
    'sample %s',
    (_name, p) => {
      it('answers HTTP 200 {"status":"OK"}, every value a string', async () => {
        const before = { notif: notif.messages.length, json: json.messages.length, chan: chan.messages.length };
        const reply = await send(p.text);
        expect(reply.status).toBe(200);
        expect(reply.text).toBe(OK);
        for (const v of Object.values(reply.json as object)) expect(typeof v).toBe('string');

        // The message-format sink: the text, byte for byte (emoji, newlines, U+200B).
        const [got] = (await notif.waitFor(before.notif + 1)).slice(before.notif);
        expect(got?.topic).toBe('mm/_notif');
        expect(got?.payload.equals(Buffer.from(p.json.message as string, 'utf8'))).toBe(true);

        // The templated-topic sink: channel_name as one sanitised level.
        const [onChannel] = (await chan.waitFor(before.chan + 1)).slice(before.chan);
        expect(onChannel?.topic).toBe(`mmch/${level(p.json.channel_name)}`);
        expect(onChannel?.payload.equals(Buffer.from(p.json.message as string, 'utf8'))).toBe(true);

        // The json sink: the validated notification as one JSON object.
        const [obj] = (await json.waitFor(before.json + 1)).slice(before.json);
        expect(obj?.topic).toBe(`mmjson/${p.json.type}`);
        expect(JSON.parse(obj!.payload.toString('utf8'))).toEqual(p.json);
      });
    },
  );

  describe.each(payloads.filter((p) => typeof p.json.message !== 'string').map((p) => [p.name, p] as const))(
    'sample %s (no text)',
    (name, p) => {
      it('answers {"status":"OK"}, publishes nothing on the message-format sinks and one JSON object on the json sink', async () => {
        const before = { notif: notif.messages.length, json: json.messages.length, chan: chan.messages.length };
        const reply = await send(p.text);
        expect(reply.status).toBe(200);
        expect(reply.text).toBe(OK);

        // A sentinel published after it by the same sinks: if the sample had published
        // anything, it would arrive before the sentinel.
        const sentinel = uniquePush();
        expect((await send(sentinel)).text).toBe(OK);
        const onNotif = (await notif.waitFor(before.notif + 1)).slice(before.notif);
        expect(texts(onNotif)).toEqual([sentinel.message]);
        const onChan = (await chan.waitFor(before.chan + 1)).slice(before.chan);
        expect(texts(onChan)).toEqual([sentinel.message]);

        const onJson = (await json.waitFor(before.json + 2)).slice(before.json);
        expect(onJson.map((m) => m.topic)).toEqual([`mmjson/${p.json.type}`, 'mmjson/message']);
        const obj = JSON.parse(onJson[0]!.payload.toString('utf8')) as Record<string, unknown>;
        expect(obj).toEqual(p.json);
        expect(obj.type, name).toBe(p.json.type);
      });
    },
  );

  it('publishes a channel_name with / + # on one sanitised topic level', async () => {
    const before = chan.messages.length;
    const push = uniquePush({ channel_name: 'ops/alerts+#1' });
    expect((await send(push)).text).toBe(OK);
    const [got] = (await chan.waitFor(before + 1)).slice(before);
    expect(got?.topic).toBe('mmch/ops_alerts__1');
    expect(got?.payload.toString('utf8')).toBe(push.message);
  });

  it('publishes a message of every kind of text byte for byte: emoji, CJK, newlines, tabs, U+200B, quotes', async () => {
    const before = notif.messages.length;
    const message = '\u200b🚀 Déploiement «ok»\n\t第二行 "quoted" \\ back\r\nend 👩‍👩‍👧';
    expect((await send(uniquePush({ message }))).text).toBe(OK);
    const [got] = (await notif.waitFor(before + 1)).slice(before);
    expect(got?.payload.equals(Buffer.from(message, 'utf8'))).toBe(true);
  });

  it('accepts a body sent with Content-Type: application/json too', async () => {
    const before = notif.messages.length;
    const push = uniquePush();
    const reply = await post(`${relay.url}/api/v1/send_push`, JSON.stringify(push), { headers: { 'Content-Type': 'application/json' } });
    expect(reply.text).toBe(OK);
    expect(texts((await notif.waitFor(before + 1)).slice(before))).toEqual([push.message]);
  });

  it('answers GET /version with the package version and a hash', async () => {
    const reply = await get(`${relay.url}/version`);
    expect(reply.status).toBe(200);
    const pkg = JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string };
    expect(reply.json).toEqual({ version: pkg.version, hash: expect.any(String) });
  });

  it('answers GET /healthz with 200', async () => {
    expect((await get(`${relay.url}/healthz`)).status).toBe(200);
  });

  it('answers GET /readyz with 200 and the state of every sink', async () => {
    const reply = await get(`${relay.url}/readyz`);
    expect(reply.status).toBe(200);
    const body = reply.json as { sinks: Record<string, { ready: boolean; state: string }> };
    expect(Object.keys(body.sinks).sort()).toEqual(['chan', 'json', 'notif']);
    for (const s of Object.values(body.sinks)) expect(s.ready).toBe(true);
  });

  it('counts received notifications by type on /metrics', async () => {
    const count = async (type: string) => {
      const reply = await get(`${relay.url}/metrics`);
      expect(reply.status).toBe(200);
      expect(reply.headers['content-type']).toMatch(/^text\/plain/);
      const m = new RegExp(`^push_relay_notifications_received_total\\{type="${type}"\\} (\\d+)$`, 'm').exec(reply.text);
      expect(m, `push_relay_notifications_received_total{type="${type}"} series`).not.toBeNull();
      return Number(m![1]);
    };
    // Other tests in this file post too: count what one message and one clear add.
    const before = { message: await count('message'), clear: await count('clear') };
    expect((await send(uniquePush())).text).toBe(OK);
    expect((await send(payload('08').text)).text).toBe(OK);
    expect({ message: await count('message'), clear: await count('clear') }).toEqual({ message: before.message + 1, clear: before.clear + 1 });
  });

  it('answers a valid ack with {"status":"OK"}', async () => {
    const ack = { id: 'z7jgszh5b1m3yhcce1ayaxe1eh', received_at: 1719400000000, platform: 'android', type: 'message', post_id: 'q7wmodmqo3gct6hm4eszbu68kh', is_id_loaded: false };
    const reply = await post(`${relay.url}/api/v1/ack`, JSON.stringify(ack));
    expect(reply.status).toBe(200);
    expect(reply.text).toBe(OK);
  });

  it('answers a malformed ack with HTTP 200 FAIL naming the problem', async () => {
    const noId = await post(`${relay.url}/api/v1/ack`, JSON.stringify({ platform: 'android', type: 'message' }));
    expect(noId.status).toBe(200);
    expect(noId.json).toEqual({ status: 'FAIL', error: 'id is required' });
    const notJson = await post(`${relay.url}/api/v1/ack`, 'ack?');
    expect(notJson.status).toBe(200);
    expect(notJson.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/^invalid JSON/) });
  });

  it('answers 405 with Allow: POST to other methods on the API', async () => {
    for (const [method, path] of [['GET', '/api/v1/send_push'], ['PUT', '/api/v1/send_push'], ['GET', '/api/v1/ack'], ['DELETE', '/api/v1/ack']] as const) {
      const reply = await request(method, `${relay.url}${path}`);
      expect(reply.status, `${method} ${path}`).toBe(405);
      expect(reply.headers.allow).toBe('POST');
    }
  });

  it('answers 404 to an unknown path', async () => {
    expect((await post(`${relay.url}/api/v2/send_push`, JSON.stringify(uniquePush()))).status).toBe(404);
  });
});

describe.skipIf(!haveMosquitto())('serving under server.basePath', () => {
  let broker: Mosquitto;
  let relay: Relay;

  beforeAll(async () => {
    broker = await startMosquitto();
    relay = await startTestRelay({ server: { basePath: '/s3cret' }, sinks: { notif: sinks(broker.url).notif } });
  });
  afterAll(async () => {
    await relay?.stop();
    await broker?.stop();
  });

  it('delivers a POST to {basePath}/api/v1/send_push', async () => {
    const sub = await subscribe(broker.url, 'mm/#');
    const push = uniquePush();
    const reply = await post(`${relay.url}/s3cret/api/v1/send_push`, JSON.stringify(push));
    expect(reply.status).toBe(200);
    expect(reply.text).toBe(OK);
    expect(texts(await sub.waitFor(1))).toEqual([push.message]);
    await sub.close();
  });

  it('answers {basePath}/api/v1/ack', async () => {
    const reply = await post(`${relay.url}/s3cret/api/v1/ack`, JSON.stringify({ id: 'x', platform: 'ios', type: 'message' }));
    expect(reply.text).toBe(OK);
  });

  it('answers 404 to /api/v1/send_push without the basePath', async () => {
    const reply = await post(`${relay.url}/api/v1/send_push`, JSON.stringify(uniquePush()));
    expect(reply.status).toBe(404);
  });
});

describe.skipIf(!haveMosquitto())('readiness and metrics follow the broker', () => {
  let broker: Mosquitto;
  let relay: Relay;

  beforeAll(async () => {
    broker = await startMosquitto();
    relay = await startTestRelay({
      delivery: { deadline: '500ms' },
      sinks: { notif: { type: 'mqtt', url: broker.url, topic: 'mm/_notif', reconnectMin: '100ms', reconnectMax: '200ms' } },
    });
  });
  afterAll(async () => {
    await relay?.stop();
    await broker?.stop();
  });

  it('creates every series at 0 before the first notification', async () => {
    const text = (await get(`${relay.url}/metrics`)).text;
    for (const type of ['message', 'clear', 'update_badge', 'session', 'test', 'other']) {
      expect(text).toContain(`push_relay_notifications_received_total{type="${type}"} 0`);
    }
    expect(text).toContain('push_relay_replies_total{status="REMOVE"} 0');
    expect(text).toContain('push_relay_replies_total{status="FAIL"} 0');
    expect(text).toContain('push_relay_invalid_requests_total{endpoint="send_push",problem="invalid_payload"} 0');
    expect(text).toContain('push_relay_sink_outcomes_total{sink="notif",outcome="retryable",reason="broker_unavailable"} 0');
    expect(text).toContain('push_relay_sink_outcomes_total{sink="notif",outcome="retryable",reason="deadline"} 0');
  });

  it('counts a received message as push_relay_notifications_received_total{type="message"} 1', async () => {
    expect((await post(`${relay.url}/api/v1/send_push`, JSON.stringify(uniquePush()))).text).toBe(OK);
    const text = (await get(`${relay.url}/metrics`)).text;
    expect(text).toContain('push_relay_notifications_received_total{type="message"} 1');
    expect(text).toContain('push_relay_replies_total{status="OK"} 1');
    expect(text).toMatch(/^push_relay_sink_outcomes_total\{sink="notif",outcome="delivered",reason=""\} 1$/m);
  });

  it('answers /readyz 503 naming the sink once the broker is gone', async () => {
    await broker.stop();
    const reply = await until('/readyz to answer 503', async () => {
      const r = await get(`${relay.url}/readyz`);
      return r.status === 503 ? r : undefined;
    });
    expect(reply.json).toMatchObject({ status: 'not ready', sinks: { notif: { ready: false } } });
    expect(reply.text).toContain('notif');
  });

  it('answers FAIL naming the sink when the broker is down and there is no outbox', async () => {
    const reply = await post(`${relay.url}/api/v1/send_push`, JSON.stringify(uniquePush()));
    expect(reply.status).toBe(200);
    expect(reply.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/^notif: /) });
  });

  it('is ready again and delivers once the broker is back', async () => {
    await broker.restart();
    await until('/readyz to answer 200', async () => (await get(`${relay.url}/readyz`)).status === 200, { timeoutMs: 5000 });
    const sub = await subscribe(broker.url, 'mm/#');
    const push = uniquePush();
    expect((await post(`${relay.url}/api/v1/send_push`, JSON.stringify(push))).text).toBe(OK);
    expect(texts(await sub.waitFor(1))).toEqual([push.message]);
    await sub.close();
  });
});

describe.skipIf(!haveMosquitto())('routes pick the sinks', () => {
  let broker: Mosquitto;
  let relay: Relay;
  let sub: Subscriber;

  beforeAll(async () => {
    broker = await startMosquitto();
    sub = await subscribe(broker.url, ['texts/#', 'apple/#']);
    relay = await startTestRelay({
      sinks: {
        texts: { type: 'mqtt', url: broker.url, topic: 'texts/{type}', format: 'message' },
        apple: { type: 'mqtt', url: broker.url, topic: 'apple/{type}', format: 'json' },
      },
      routes: [
        { match: { type: ['message', 'session'] }, sinks: ['texts'] },
        { match: { platform: 'apple_rn' }, sinks: ['apple'] },
      ],
    });
  });
  afterAll(async () => {
    await relay?.stop();
    await broker?.stop();
  });

  /**
   * Posts `body`, then a sentinel routed to both sinks, and returns the topics of what arrived
   * besides the sentinel. Each sink publishes in order, so once the sentinel is in from both,
   * everything `body` caused is in too.
   */
  async function publishedFor(body: string): Promise<string[]> {
    const before = sub.messages.length;
    expect((await post(`${relay.url}/api/v1/send_push`, body)).text).toBe(OK);
    const sentinel = uniquePush({ platform: 'apple_rn-v2' });
    expect((await post(`${relay.url}/api/v1/send_push`, JSON.stringify(sentinel))).text).toBe(OK);
    const isSentinel = (m: Received) =>
      (m.topic === 'texts/message' && m.payload.toString('utf8') === sentinel.message) ||
      (m.topic === 'apple/message' && (JSON.parse(m.payload.toString('utf8')) as { ack_id: string }).ack_id === sentinel.ack_id);
    await until('the sentinel from both sinks', () => sub.messages.slice(before).filter(isSentinel).length === 2);
    return sub.messages.slice(before).filter((m) => !isSentinel(m)).map((m) => m.topic);
  }

  it('sends an android message only to the sink routed by type', async () => {
    expect(await publishedFor(payload('01').text)).toEqual(['texts/message']);
  });

  it('sends an apple message to both routes, each sink once', async () => {
    expect((await publishedFor(payload('02').text)).sort()).toEqual(['apple/message', 'texts/message']);
  });

  it('sends an apple update_badge only to the platform route', async () => {
    expect(await publishedFor(payload('09').text)).toEqual(['apple/update_badge']);
  });

  it('answers OK and publishes nothing for a push no route matches (android clear)', async () => {
    expect(await publishedFor(payload('08').text)).toEqual([]);
  });
});

describe.skipIf(!haveMosquitto())('with server.auth (Mattermost URL https://user:pass@relay/)', () => {
  let broker: Mosquitto;
  let relay: Relay;
  const basic = (user: string, pass: string) => ({ Authorization: `Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}` });

  beforeAll(async () => {
    broker = await startMosquitto();
    relay = await startTestRelay({ server: { auth: { username: 'mm', password: 's3cret' } }, sinks: { notif: sinks(broker.url).notif } });
  });
  afterAll(async () => {
    await relay?.stop();
    await broker?.stop();
  });

  it('answers 401 to send_push without credentials, and publishes nothing', async () => {
    const sub = await subscribe(broker.url, 'mm/#');
    const reply = await post(`${relay.url}/api/v1/send_push`, JSON.stringify(uniquePush()));
    expect(reply.status).toBe(401);
    expect(reply.headers['www-authenticate']).toMatch(/^Basic /);
    const ok = uniquePush();
    expect((await post(`${relay.url}/api/v1/send_push`, JSON.stringify(ok), { headers: basic('mm', 's3cret') })).text).toBe(OK);
    expect(texts(await sub.waitFor(1))).toEqual([ok.message]);
    await sub.close();
  });

  it('answers 401 to a wrong password', async () => {
    expect((await post(`${relay.url}/api/v1/send_push`, JSON.stringify(uniquePush()), { headers: basic('mm', 'guess') })).status).toBe(401);
  });

  it('answers ack with the right credentials', async () => {
    const reply = await post(`${relay.url}/api/v1/ack`, JSON.stringify({ id: 'a', platform: 'ios', type: 'message' }), { headers: basic('mm', 's3cret') });
    expect(reply.text).toBe(OK);
  });

  it('keeps /healthz open for probes', async () => {
    expect((await get(`${relay.url}/healthz`)).status).toBe(200);
  });
});
