// The upstream sink against a local push proxy stand-in (test/helpers/upstream.ts), through a
// running relay: what Mattermost gets back for each answer the upstream gives, what the
// upstream receives (the very bytes Mattermost posted), acks, and pooled connections.
import { describe, expect, it } from 'vitest';
import { retryAfter } from '../sinks/retry-after.js';
import { post } from './helpers/http.js';
import { payload } from './helpers/payloads.js';
import { spawnRelay, startTestRelay } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';
import { startConnectProxy, startUpstream, testCertificate, type FakeUpstream, type UpstreamAnswer } from './helpers/upstream.js';
import { sleep, until } from './helpers/wait.js';

const SEND = '/api/v1/send_push';
const ACK = '/api/v1/ack';

async function relayTo(upstream: FakeUpstream | string, sink: Record<string, unknown> = {}, extra: Record<string, unknown> = {}) {
  const url = typeof upstream === 'string' ? upstream : upstream.url;
  return startTestRelay({ sinks: { official: { type: 'upstream', url, ...sink } }, ...extra });
}

/** A relay with an SQLite outbox that retries quickly. */
const withOutbox = () => ({ store: 'sqlite', dataDir: tempDir(), delivery: { retryMin: '100ms', retryMax: '200ms' } });

const sample = payload('01');
/** Sample 01 with a unique ack_id, so no two tests' pushes look like resends of each other. */
let seq = 0;
const push = () => sample.text.replace(/"ack_id": "[^"]+"/, `"ack_id": "up${(++seq).toString().padStart(24, '0')}"`);

describe('the upstream sink: what the upstream answers becomes the reply Mattermost gets', () => {
  const rows: Array<[string, UpstreamAnswer, unknown]> = [
    ['answers OK when the upstream says OK', { body: '{"status":"OK"}' }, { status: 'OK' }],
    ['answers REMOVE when the upstream says REMOVE', { body: '{"status":"REMOVE"}' }, { status: 'REMOVE' }],
    [
      "answers FAIL with the upstream's error text when it says FAIL",
      { body: '{"status":"FAIL","error":"Failed to send the message: invalid registration token"}' },
      { status: 'FAIL', error: 'official: Failed to send the message: invalid registration token' },
    ],
    ['answers OK for a 200 null, as the server counts it a success', { body: 'null' }, { status: 'OK' }],
    ['answers OK for a 200 without a status, as the server counts it a success', { body: '{}' }, { status: 'OK' }],
    [
      'answers FAIL for a 200 that is not a push proxy reply',
      { body: '<html>hello</html>' },
      { status: 'FAIL', error: expect.stringMatching(/^official: .* answered 200 with a body that is not a push proxy reply: <html>/) },
    ],
    [
      'answers FAIL (no outbox) for a 500, naming the status',
      { status: 500, body: 'internal error' },
      { status: 'FAIL', error: expect.stringMatching(/answered HTTP 500: internal error$/) },
    ],
    ['answers OK for a 200 with a status it does not know, as the server does', { body: '{"status":"QUEUED"}' }, { status: 'OK' }],
    [
      'answers FAIL for a 200 whose values are not all strings (Go cannot decode it)',
      { body: '{"status":"OK","code":1}' },
      { status: 'FAIL', error: expect.stringMatching(/not a push proxy reply/) },
    ],
    [
      'answers FAIL (no outbox) for a 429, naming the status',
      { status: 429, headers: { 'Retry-After': '1' }, body: 'limit exceeded' },
      { status: 'FAIL', error: expect.stringMatching(/answered HTTP 429: limit exceeded$/) },
    ],
    ['answers FAIL (no outbox) for a 404, naming the status', { status: 404, body: '' }, { status: 'FAIL', error: expect.stringMatching(/answered HTTP 404$/) }],
  ];
  for (const [name, answer, reply] of rows) {
    it(name, async () => {
      const upstream = await startUpstream();
      upstream.answer(() => answer);
      const relay = await relayTo(upstream);
      const res = await post(`${relay.url}${SEND}`, push());
      expect(res.status).toBe(200);
      expect(res.json).toEqual(reply);
      expect((await upstream.waitFor(SEND, 1)).length).toBe(1);
      await relay.stop();
      await upstream.close();
    });
  }

  it('answers FAIL (no outbox) when the upstream does not answer within timeout', async () => {
    const upstream = await startUpstream();
    upstream.answer(() => 'hang');
    const relay = await relayTo(upstream, { timeout: '300ms' });
    const started = Date.now();
    const res = await post(`${relay.url}${SEND}`, push());
    expect(res.json).toEqual({ status: 'FAIL', error: `official: ${upstream.url}: no answer within 300 ms` });
    expect(Date.now() - started).toBeLessThan(2000);
    await relay.stop();
    await upstream.close();
  });

  it('stops waiting at the delivery deadline when that comes before timeout', async () => {
    const upstream = await startUpstream();
    upstream.answer(() => 'hang');
    const relay = await relayTo(upstream, { timeout: '30s', deadline: '400ms' });
    const started = Date.now();
    const res = await post(`${relay.url}${SEND}`, push());
    expect(res.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/^official: /) });
    expect(Date.now() - started).toBeLessThan(1500);
    await relay.stop();
    await upstream.close();
  });

  it('answers FAIL (no outbox) when nothing listens at the url, and never REMOVE', async () => {
    const upstream = await startUpstream();
    const url = upstream.url;
    await upstream.close();
    const relay = await relayTo(url);
    const res = await post(`${relay.url}${SEND}`, push());
    expect(res.json).toEqual({ status: 'FAIL', error: expect.stringMatching(/^official: http:\/\/127\.0\.0\.1:\d+: ECONNREFUSED/) });
    await relay.stop();
  });
});

describe('the upstream sink with an outbox', () => {
  it('queues a push the upstream answers 500 for, answers OK, and delivers it once the upstream recovers', async () => {
    const upstream = await startUpstream();
    let healthy = false;
    let okAnswers = 0;
    upstream.answer(() => {
      if (!healthy) return { status: 500, body: 'down for maintenance' };
      okAnswers++;
      return { body: '{"status":"OK"}' };
    });
    const relay = await relayTo(upstream, {}, withOutbox());
    const body = push();
    expect((await post(`${relay.url}${SEND}`, body)).json).toEqual({ status: 'OK' });
    await upstream.waitFor(SEND, 2); // the first try and at least one retry, both refused
    healthy = true;
    await until('the outbox to deliver once the upstream answers OK', () => okAnswers === 1, { timeoutMs: 5000 });
    await sleep(600); // several retry intervals: a delivered push is not sent again
    expect(okAnswers).toBe(1);
    const sent = upstream.requests.filter((r) => r.path === SEND);
    // From the outbox too the push goes as Mattermost posted it, byte for byte.
    expect(sent.map((r) => r.body.toString('utf8'))).toEqual(sent.map(() => body));
    await relay.stop();
    await upstream.close();
  });

  it('queues a push that times out and delivers it when the upstream answers again', async () => {
    const upstream = await startUpstream();
    let healthy = false;
    upstream.answer(() => (healthy ? { body: '{"status":"OK"}' } : 'hang'));
    const relay = await relayTo(upstream, { timeout: '200ms' }, withOutbox());
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'OK' });
    await upstream.waitFor(SEND, 1);
    healthy = true;
    await upstream.waitFor(SEND, 2, 5000);
    await relay.stop();
    await upstream.close();
  });

  it('waits as long as Retry-After says before trying again', async () => {
    const upstream = await startUpstream();
    const times: number[] = [];
    upstream.answer(() => {
      times.push(Date.now());
      return times.length === 1 ? { status: 429, headers: { 'Retry-After': '2' }, body: 'limit exceeded' } : { body: '{"status":"OK"}' };
    });
    const relay = await relayTo(upstream, {}, withOutbox());
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'OK' });
    await upstream.waitFor(SEND, 2, 6000);
    // Without Retry-After the retry would come after 100-200 ms (retryMin, retryMax).
    expect(times[1]! - times[0]!).toBeGreaterThanOrEqual(1900);
    await relay.stop();
    await upstream.close();
  });

  it('remembers a token the upstream calls dead during a background retry, and answers REMOVE to the next push to it', async () => {
    // Mattermost learns of a dead token only from a REMOVE reply (contract §3.2.4); the first
    // push's reply (OK, queued) went out before the retry found it dead.
    const upstream = await startUpstream();
    let calls = 0;
    upstream.answer(() => (++calls === 1 ? { status: 500, body: 'busy' } : { body: '{"status":"REMOVE"}' }));
    const relay = await relayTo(upstream, {}, withOutbox());
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'OK' });
    await until('the retry to meet REMOVE', () => calls === 2, { timeoutMs: 5000 });
    await sleep(200); // the outbox writes the dead token down after the answer
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'REMOVE' });
    expect(calls).toBe(2); // answered from memory, without asking the upstream
    // Said once: Mattermost forgets the device on REMOVE, and a token that comes back is tried.
    upstream.answer(() => (++calls, { body: '{"status":"OK"}' }));
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'OK' });
    expect(calls).toBe(3);
    await relay.stop();
    await upstream.close();
  });

  it('answers REMOVE and keeps nothing in the outbox when the upstream says REMOVE', async () => {
    const upstream = await startUpstream();
    upstream.answer(() => ({ body: '{"status":"REMOVE"}' }));
    const relay = await relayTo(upstream, {}, withOutbox());
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'REMOVE' });
    await sleep(400);
    expect(upstream.requests.filter((r) => r.path === SEND)).toHaveLength(1);
    await relay.stop();
    await upstream.close();
  });
});

describe('what the upstream receives', () => {
  it('gets the bytes Mattermost posted, odd spacing and unknown fields included', async () => {
    const upstream = await startUpstream();
    const relay = await relayTo(upstream);
    const body =
      '{ "ack_id":"oddspacing0000000000000001" ,\n\t"platform": "android_rn-v2",  "server_id":"mxznon7dy3dfojgzbhhfj3tbyh",' +
      '"device_id":"tok:en",   "message":"caf\\u00e9 \u{1F600} \\\\o/", "badge":7.0e0,' +
      '"future_field":{"nested":[1, 2 ,3]}, "post_id":null}\n\n';
    expect((await post(`${relay.url}${SEND}`, body)).json).toEqual({ status: 'OK' });
    const [got] = await upstream.waitFor(SEND, 1);
    expect(got!.body.equals(Buffer.from(body, 'utf8'))).toBe(true);
    await relay.stop();
    await upstream.close();
  });

  it('gets every sample payload byte for byte', async () => {
    const upstream = await startUpstream();
    const relay = await relayTo(upstream);
    const texts = (await import('./helpers/payloads.js')).loadPayloads().map((p) => p.text);
    for (const text of texts) expect((await post(`${relay.url}${SEND}`, text)).json).toEqual({ status: 'OK' });
    const got = await upstream.waitFor(SEND, texts.length);
    expect(got.map((r) => r.body.toString('utf8'))).toEqual(texts);
    await relay.stop();
    await upstream.close();
  });

  it('gets a request shaped like Mattermost’s: POST under the url’s path, no Content-Type, Basic auth from the userinfo', async () => {
    const upstream = await startUpstream();
    const relay = await relayTo(`${upstream.url.replace('http://', 'http://mm:s%3Ecret@')}/prefix/`, { headers: { 'X-Extra': 'yes' } });
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'OK' });
    const [got] = (await upstream.waitFor('/prefix/api/v1/send_push', 1)) as [(typeof upstream.requests)[0]];
    expect(got.method).toBe('POST');
    expect(got.headers['content-type']).toBeUndefined();
    expect(got.headers['user-agent']).toBe('Mattermost-Bot/1.1');
    expect(got.headers.authorization).toBe(`Basic ${Buffer.from('mm:s>cret').toString('base64')}`);
    expect(got.headers['x-extra']).toBe('yes');
    expect(got.headers.connection).toBe('keep-alive');
    await relay.stop();
    await upstream.close();
  });

  it('sends again once, on a fresh connection, when a pooled connection turns out reset before any answer', async () => {
    const upstream = await startUpstream();
    // The second request on the first connection meets a reset, as when the server drops an
    // idle keep-alive connection just as the relay reuses it.
    upstream.answer((r) => (r.connection === 1 && upstream.requests.filter((q) => q.connection === 1 && q.path === SEND).length === 2 ? 'reset' : { body: '{"status":"OK"}' }));
    const relay = await relayTo(upstream, { connections: 1 });
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'OK' });
    expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'OK' });
    const sent = upstream.requests.filter((r) => r.path === SEND);
    expect(sent.map((r) => r.connection)).toEqual([1, 1, 2]);
    expect(sent[2]!.body.equals(sent[1]!.body)).toBe(true);
    await relay.stop();
    await upstream.close();
  });

  it('reuses a few pooled connections for many pushes', async () => {
    const upstream = await startUpstream();
    const relay = await relayTo(upstream, { connections: 4 });
    const pushes = 200;
    let next = 0;
    // 8 concurrent senders, as Mattermost's NumCPU x 8 workers would.
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < pushes) {
          next++;
          expect((await post(`${relay.url}${SEND}`, push())).json).toEqual({ status: 'OK' });
        }
      }),
    );
    expect(upstream.requests.filter((r) => r.path === SEND)).toHaveLength(pushes);
    // At most `connections` sockets, whatever the number of pushes (one more for the start-up probe at most).
    expect(upstream.connections()).toBeLessThanOrEqual(5);
    console.log(`upstream: ${pushes} pushes over ${upstream.connections()} connection(s)`);
    await relay.stop();
    await upstream.close();
  });
});

describe('acks', () => {
  it('forwards the ack of a push it delivered, byte for byte, and answers without waiting for the upstream', async () => {
    const upstream = await startUpstream();
    upstream.answer((r) => (r.path === ACK ? 'hang' : { body: '{"status":"OK"}' }));
    const relay = await relayTo(upstream);
    const body = push();
    const ackId = (JSON.parse(body) as { ack_id: string }).ack_id;
    expect((await post(`${relay.url}${SEND}`, body)).json).toEqual({ status: 'OK' });
    const ack = `{"id":"${ackId}",  "received_at":1719400000000,"platform":"android","type":"message","post_id":"q7wmodmqo3gct6hm4eszbu68kh","is_id_loaded":false , "new":1}`;
    const started = Date.now();
    expect((await post(`${relay.url}${ACK}`, ack)).json).toEqual({ status: 'OK' });
    expect(Date.now() - started).toBeLessThan(500); // the upstream never answers acks here
    const [got] = await upstream.waitFor(ACK, 1);
    expect(got!.body.toString('utf8')).toBe(ack);
    expect(got!.headers['content-type']).toBeUndefined();
    await relay.stop();
    await upstream.close();
  });

  it('does not forward the ack of a push the upstream never got', async () => {
    const upstream = await startUpstream();
    const relay = await relayTo(upstream);
    const ack = '{"id":"neversent00000000000000001","platform":"ios","type":"message"}';
    expect((await post(`${relay.url}${ACK}`, ack)).json).toEqual({ status: 'OK' });
    await sleep(300);
    expect(upstream.requests.filter((r) => r.path === ACK)).toHaveLength(0);
    const metrics = await relay.app.request('/metrics');
    expect(await metrics.text()).toMatch(/push_relay_upstream_acks_total\{sink="official",result="not_ours"\} 1/);
    await relay.stop();
    await upstream.close();
  });

  it('forwards no ack, and answers OK, for a malformed one', async () => {
    const upstream = await startUpstream();
    const relay = await relayTo(upstream);
    expect((await post(`${relay.url}${ACK}`, '{"id":""}')).json).toMatchObject({ status: 'FAIL' });
    await sleep(200);
    expect(upstream.requests.filter((r) => r.path === ACK)).toHaveLength(0);
    await relay.stop();
    await upstream.close();
  });
});

describe('retryAfter', () => {
  it('reads delay-seconds', () => expect(retryAfter('3')).toBe(3000));
  it('reads an HTTP-date', () => {
    const ms = retryAfter(new Date(Date.now() + 10_000).toUTCString()) ?? 0;
    expect(ms).toBeGreaterThan(8000);
    expect(ms).toBeLessThanOrEqual(10_000);
  });
  it('caps it at an hour', () => expect(retryAfter('999999')).toBe(3_600_000));
  it('ignores nonsense', () => expect(retryAfter('soon')).toBeUndefined());
});

describe('reaching an HTTPS upstream as a user would', () => {
  it('trusts the CA that NODE_EXTRA_CA_CERTS adds, and goes through HTTPS_PROXY when it is set', async () => {
    const cert = testCertificate();
    const upstream = await startUpstream({ tls: cert });
    const proxy = await startConnectProxy();
    const relay = await spawnRelay({
      config: { store: 'none', sinks: { official: { type: 'upstream', url: upstream.url } } },
      env: { NODE_EXTRA_CA_CERTS: cert.certFile, HTTPS_PROXY: proxy.url, NO_PROXY: undefined, no_proxy: undefined, https_proxy: undefined },
    });
    const body = push();
    for (let i = 0; i < 3; i++) expect((await post(`${relay.url}${SEND}`, body.replace(/"ack_id": "up/, `"ack_id": "p${i}`))).json).toEqual({ status: 'OK' });
    const got = await upstream.waitFor(SEND, 3);
    expect(got[0]!.body.toString('utf8')).toBe(body.replace(/"ack_id": "up/, '"ack_id": "p0'));
    // Every connection went through the proxy, and one tunnel carried several pushes.
    expect(proxy.tunnels.length).toBeGreaterThanOrEqual(1);
    expect(proxy.tunnels.every((t) => t === upstream.url.replace('https://', ''))).toBe(true);
    expect(proxy.tunnels.length).toBe(upstream.connections());
    expect(upstream.connections()).toBeLessThan(3 + 1);
    await relay.stop();
    await proxy.close();
    await upstream.close();
  });

  it('refuses an upstream whose certificate nobody vouches for: retryable, never REMOVE', async () => {
    const cert = testCertificate();
    const upstream = await startUpstream({ tls: cert });
    const relay = await relayTo(upstream);
    const res = await post(`${relay.url}${SEND}`, push());
    expect(res.json).toEqual({ status: 'FAIL', error: expect.stringMatching(/^official: https:\/\/127\.0\.0\.1:\d+: .*(self-signed|SELF_SIGNED)/i) });
    expect(upstream.requests.filter((r) => r.path === SEND)).toHaveLength(0);
    await relay.stop();
    await upstream.close();
  });
});
