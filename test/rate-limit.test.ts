// server.rateLimit over real sockets: a client gets its burst at once, then 429 with
// Retry-After, then tokens again at perSecond; another client has its own bucket; every 429
// is counted and the first of a minute is logged at error level (a 429 is a lost push).
import { Writable } from 'node:stream';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { messagePush } from './helpers/payloads.js';
import { startTestRelay } from './helpers/relay.js';
import { call } from './helpers/tls-cert.js';
import { sleep } from './helpers/wait.js';

const PUSH = JSON.stringify(messagePush({ ack_id: '' }));

describe('rate limit', () => {
  const lines: Array<Record<string, unknown>> = [];
  const logger = pino(
    { level: 'info' },
    new Writable({
      write(chunk: Buffer, _e, done) {
        for (const l of chunk.toString('utf8').split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
        done();
      },
    }),
  );
  let relay: Awaited<ReturnType<typeof startTestRelay>>;
  afterAll(async () => {
    await relay?.stop();
  });

  it('serves a burst, answers 429 with Retry-After beyond it, and serves again once tokens flow back', async () => {
    relay = await startTestRelay(
      { sinks: { log: { type: 'log' } }, server: { rateLimit: { perSecond: 2, burst: 10 }, trustProxy: ['127.0.0.1/32'] } },
      { logger },
    );
    const send = (client: string) => call(`${relay.url}/api/v1/send_push`, { body: PUSH, headers: { 'X-Forwarded-For': client } });
    // perSecond 2: a token comes back every 500 ms, so what passes beyond the burst is bounded
    // by how long the requests took (a loaded machine makes them slower, not the test wrong).
    const started = Date.now();
    const first: number[] = [];
    for (let i = 0; i < 16; i++) first.push((await send('192.0.2.10')).status);
    const elapsed = (Date.now() - started) / 1000;
    expect(first.slice(0, 10)).toEqual(new Array(10).fill(200));
    const extra = first.slice(10).filter((s) => s === 200).length;
    expect(extra).toBeLessThanOrEqual(Math.ceil(elapsed * 2));
    expect(first.filter((s) => s === 429).length).toBeGreaterThanOrEqual(6 - Math.ceil(elapsed * 2));
    expect(first.at(-1)).toBe(429);

    const over = await send('192.0.2.10');
    expect(over.status).toBe(429);
    expect(over.headers['retry-after']).toBe('1');
    expect(over.text).toBe('too many requests');

    // Another client is not held back by the first one's flood.
    expect((await send('192.0.2.11')).json).toEqual({ status: 'OK' });

    // After 1.6 s about three tokens are back: a few pass again, then 429 once more.
    await sleep(1600);
    const after: number[] = [];
    for (let i = 0; i < 8; i++) after.push((await send('192.0.2.10')).status);
    const passed = after.filter((s) => s === 200).length;
    expect(passed).toBeGreaterThanOrEqual(2);
    expect(passed).toBeLessThanOrEqual(6);
    expect(after.slice(0, passed).every((s) => s === 200)).toBe(true);
    expect(after.at(-1)).toBe(429);
    const refused = first.filter((s) => s === 429).length + 1 + (8 - passed);

    const metrics = (await call(`${relay.url}/metrics`, { method: 'GET' })).text;
    const counted = Number(/push_relay_refused_requests_total\{reason="rate_limited"\} (\d+)/.exec(metrics)?.[1]);
    expect(counted).toBe(refused);

    // Loud: error level, once for this client within the minute, with the limit named.
    const logged = lines.filter((l) => l.reason === 'rate_limited');
    expect(logged).toHaveLength(1);
    expect(logged[0]).toMatchObject({ level: 50, client: '192.0.2.10', perSecond: 2, burst: 10 });
    expect(String(logged[0]?.msg)).toMatch(/Mattermost drops a push answered 429/);
  });
});
