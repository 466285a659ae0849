// Slow clients over real sockets: a client trickling its request head is cut off at
// server.headersTimeout (seconds, not the 96 s it used to hold a connection), while the other
// clients' pushes keep their latency; an idle keep-alive connection is not a request in
// progress, so it outlives the headers timeout and serves its next request (Mattermost keeps
// idle connections 90 s, contract §1.1).
import { connect, type Socket } from 'node:net';
import { Agent } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../src/config.js';
import { post } from './helpers/http.js';
import { messagePush } from './helpers/payloads.js';
import { startTestRelay } from './helpers/relay.js';
import { sleep } from './helpers/wait.js';

const HEADERS_TIMEOUT_MS = 2000;
const PUSH = JSON.stringify(messagePush({ ack_id: '' }));

/** Opens a socket and sends a request head one byte at a time, `everyMs` apart; resolves when the server closes it. */
function trickle(port: number, everyMs: number): { closed: Promise<{ afterMs: number; reply: string }>; socket: Socket } {
  const head = `POST /api/v1/send_push HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ${'s'.repeat(500)}\r\n\r\n`;
  const socket = connect({ port, host: '127.0.0.1' });
  const started = Date.now();
  let reply = '';
  let i = 0;
  const timer = setInterval(() => {
    if (i < head.length && !socket.destroyed) socket.write(head[i++] as string);
  }, everyMs);
  socket.setEncoding('utf8').on('data', (d: string) => (reply += d));
  const closed = new Promise<{ afterMs: number; reply: string }>((resolve) => {
    const done = () => {
      clearInterval(timer);
      resolve({ afterMs: Date.now() - started, reply });
    };
    socket.once('close', done);
    socket.once('error', () => {});
  });
  return { closed, socket };
}

describe('slow clients', () => {
  let relay: Awaited<ReturnType<typeof startTestRelay>>;
  beforeAll(async () => {
    relay = await startTestRelay({ sinks: { log: { type: 'log' } }, server: { headersTimeout: HEADERS_TIMEOUT_MS, requestTimeout: '5s' } });
  });
  afterAll(async () => {
    await relay.stop();
  });

  it('defaults to a 10 s headers timeout and a 95 s keep-alive', () => {
    const c = parseConfig({ sinks: { log: { type: 'log' } } }, {});
    expect(c.server.headersTimeout).toBe(10_000);
    expect(c.server.keepAliveTimeout).toBe(95_000);
    expect(c.server.requestTimeout).toBe(30_000);
  });

  it('cuts off clients trickling their heads at the headers timeout without slowing the others', async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 4 });
    const timed = async () => {
      const t = performance.now();
      const r = await post(`${relay.url}/api/v1/send_push`, PUSH, { agent });
      expect(r.json).toEqual({ status: 'OK' });
      return performance.now() - t;
    };
    // Baseline: the same stream of pushes with nobody trickling.
    const baseline: number[] = [];
    for (let i = 0; i < 40; i++) baseline.push(await timed());

    const slow = Array.from({ length: 50 }, () => trickle(relay.port, 100));
    const during: number[] = [];
    const until = Date.now() + HEADERS_TIMEOUT_MS - 300;
    while (Date.now() < until && during.length < 2000) {
      during.push(await timed());
      await sleep(10);
    }
    const results = await Promise.all(slow.map((s) => s.closed));
    agent.destroy();

    for (const r of results) {
      // Cut at the timeout: node:http checks every 500 ms (relay.ts connectionsCheckingInterval).
      expect(r.afterMs).toBeGreaterThanOrEqual(HEADERS_TIMEOUT_MS - 100);
      expect(r.afterMs).toBeLessThan(HEADERS_TIMEOUT_MS + 1500);
      expect(r.reply === '' || r.reply.startsWith('HTTP/1.1 408')).toBe(true);
    }
    const p = (xs: number[], q: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * q))] as number;
    const figures = { baselineP50: p(baseline, 0.5), baselineP99: p(baseline, 0.99), duringP50: p(during, 0.5), duringP99: p(during, 0.99), requestsDuring: during.length };
    console.log(`slow-client: 50 trickling heads; other clients' latency ms ${JSON.stringify(figures, (_k, v: unknown) => (typeof v === 'number' ? Math.round(v * 100) / 100 : v))}`);
    expect(during.length).toBeGreaterThan(10);
    // Fifty sockets sending one byte every 100 ms cost the event loop next to nothing.
    expect(figures.duringP50).toBeLessThan(Math.max(20, figures.baselineP50 * 4));
  });

  it('keeps an idle keep-alive connection open past the headers timeout and serves its next request', async () => {
    const socket = connect({ port: relay.port, host: '127.0.0.1' });
    await new Promise<void>((r) => socket.once('connect', () => r()));
    let received = '';
    socket.setEncoding('utf8').on('data', (d: string) => (received += d));
    let closedAt: number | undefined;
    socket.once('close', () => (closedAt = Date.now()));
    const request = `POST /api/v1/send_push HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ${Buffer.byteLength(PUSH)}\r\n\r\n${PUSH}`;
    const replies = () => received.split('HTTP/1.1 200 OK').length - 1;
    socket.write(request);
    for (let i = 0; i < 100 && replies() < 1; i++) await sleep(20);
    expect(replies()).toBe(1);

    await sleep(HEADERS_TIMEOUT_MS + 1500);
    expect(closedAt).toBeUndefined();
    socket.write(request);
    for (let i = 0; i < 100 && replies() < 2; i++) await sleep(20);
    expect(replies()).toBe(2);
    expect(received).toContain('Keep-Alive: timeout=95');
    socket.destroy();
  });
});
