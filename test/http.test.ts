// The HTTP/1.1 layer (src/http.ts), byte for byte on real sockets: the shape Mattermost sends
// is answered without node:http; everything else is node:http's from the first byte of that
// request on, on the same connection, with answers in request order.
import { connect, type AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHttpServer, parseHead, type HttpServer, type Reply, type Route } from '../src/http.js';
import { startTestRelay } from './helpers/relay.js';
import { sleep } from './helpers/wait.js';

const ok = (body: string): Reply => ({ status: 200, type: 'application/json', body: JSON.stringify({ status: 'OK', echo: body }) });

/** One exchange on a fresh connection: what the server wrote back, and whether it closed. */
async function exchange(
  port: number,
  writes: (string | Buffer)[],
  { answers = 1, gapMs = 0, end = false, timeoutMs = 5000 } = {},
): Promise<{ raw: string; replies: ParsedReply[]; closed: boolean }> {
  const socket = connect(port, '127.0.0.1');
  socket.on('error', () => {});
  let raw = '';
  let closed = false;
  socket.on('data', (d) => (raw += d.toString('latin1')));
  socket.on('close', () => (closed = true));
  await new Promise((r) => socket.once('connect', r));
  for (const w of writes) {
    socket.write(w);
    if (gapMs) await sleep(gapMs);
  }
  if (end) socket.end();
  const deadline = Date.now() + timeoutMs;
  while (parseReplies(raw).length < answers && !closed && Date.now() < deadline) await sleep(10);
  await sleep(50);
  const result = { raw, replies: parseReplies(raw), closed };
  socket.destroy();
  return result;
}

type ParsedReply = { status: number; headers: Record<string, string>; body: string };
function parseReplies(raw: string): ParsedReply[] {
  const out: ParsedReply[] = [];
  let rest = raw;
  for (;;) {
    const end = rest.indexOf('\r\n\r\n');
    if (end < 0) return out;
    const [line = '', ...lines] = rest.slice(0, end).split('\r\n');
    const headers = Object.fromEntries(lines.map((l) => [l.slice(0, l.indexOf(':')).toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]));
    const status = Number(line.split(' ')[1]);
    if (status === 100) {
      out.push({ status, headers, body: '' });
      rest = rest.slice(end + 4);
      continue;
    }
    const length = Number(headers['content-length'] ?? 0);
    if (headers['transfer-encoding'] === 'chunked') {
      const term = rest.indexOf('0\r\n\r\n', end + 4);
      if (term < 0) return out;
      out.push({ status, headers, body: rest.slice(end + 4, term) });
      rest = rest.slice(term + 5);
      continue;
    }
    if (rest.length < end + 4 + length) return out;
    // `raw` holds bytes as latin1 characters; the body is UTF-8.
    out.push({ status, headers, body: Buffer.from(rest.slice(end + 4, end + 4 + length), 'latin1').toString('utf8') });
    rest = rest.slice(end + 4 + length);
  }
}

const post = (path: string, body: string, extra = '') =>
  `POST ${path} HTTP/1.1\r\nHost: relay\r\nUser-Agent: Mattermost-Bot/1.1\r\n${extra}Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;

describe('the HTTP/1.1 layer', () => {
  let http: HttpServer;
  let port: number;
  const seen: string[] = [];
  const fallbackSeen: string[] = [];

  beforeAll(async () => {
    const slow: Route = async (body) => {
      await sleep(Number(body) || 0);
      return ok(body);
    };
    const echo: Route = async (body, authorization, userAgent) => {
      seen.push(body);
      return ok(JSON.stringify({ body, authorization, userAgent }));
    };
    http = createHttpServer({
      routes: new Map([
        ['/echo', echo],
        ['/slow', slow],
      ]),
      fallback: (req, res) => {
        let body = '';
        req.setEncoding('utf8');
        req.on('data', (d: string) => (body += d));
        req.on('end', () => {
          fallbackSeen.push(`${req.method} ${req.url} ${body}`);
          const text = `node:http ${req.method} ${req.url} ${body}`;
          res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(text) });
          res.end(text);
        });
      },
      bodyLimit: 1000,
      keepAliveTimeout: 400,
      headersTimeout: 400,
      requestTimeout: 800,
    });
    await new Promise<void>((r) => http.server.listen(0, '127.0.0.1', r));
    port = (http.server.address() as AddressInfo).port;
  });
  afterAll(() => {
    http.closeAllConnections();
    http.server.close();
  });

  it('answers the request Mattermost sends with the route, keeping the connection open', async () => {
    const { replies, closed } = await exchange(port, [post('/echo', '{"a":"é 🎉"}', 'Authorization: Basic dTpw\r\n')]);
    expect(replies).toHaveLength(1);
    const [r] = replies;
    expect(r?.status).toBe(200);
    expect(r?.headers['content-type']).toBe('application/json');
    expect(r?.headers['connection']).toBe('keep-alive');
    expect(r?.headers['date']).toMatch(/GMT$/);
    expect(JSON.parse(JSON.parse(r?.body ?? '').echo)).toEqual({ body: '{"a":"é 🎉"}', authorization: 'Basic dTpw', userAgent: 'Mattermost-Bot/1.1' });
    expect(closed).toBe(false);
  });

  it('reads a request that arrives a few bytes at a time', async () => {
    const bytes = Buffer.from(post('/echo', '{"split":"ü"}'));
    const pieces = [];
    for (let i = 0; i < bytes.length; i += 7) pieces.push(bytes.subarray(i, i + 7));
    const { replies } = await exchange(port, pieces, { gapMs: 2 });
    expect(JSON.parse(JSON.parse(replies[0]?.body ?? '').echo).body).toBe('{"split":"ü"}');
  });

  it('answers pipelined requests in order, the slow first one included, across a hand-over to node:http', async () => {
    const { replies } = await exchange(port, [post('/slow', '150') + post('/echo', 'second') + 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n' + post('/echo', 'fourth')], {
      answers: 4,
    });
    expect(replies.map((r) => r.body)).toEqual([
      JSON.stringify({ status: 'OK', echo: '150' }),
      JSON.stringify({ status: 'OK', echo: JSON.stringify({ body: 'second', userAgent: 'Mattermost-Bot/1.1' }) }),
      'node:http GET /metrics ',
      // Once node:http has the connection it keeps it, and serves the API path too.
      'node:http POST /echo fourth',
    ]);
  });

  it('hands node:http what it does not serve itself, and answers the next request on the connection', async () => {
    const cases: [string, string][] = [
      ['another path', post('/other', 'x')],
      ['another method', 'PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx'],
      ['HTTP/1.0', 'POST /echo HTTP/1.0\r\nContent-Length: 1\r\n\r\nx'],
      ['a chunked body', 'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n'],
      ['a missing Content-Length', 'POST /echo HTTP/1.1\r\nHost: x\r\n\r\n'],
    ];
    for (const [name, request] of cases) {
      const { replies } = await exchange(port, [request], { answers: 1 });
      expect(replies[0]?.body, name).toMatch(/^node:http (POST|PUT) \/(echo|other) x?$/);
    }
  });

  it('answers Expect: 100-continue through node:http', async () => {
    const socket = await exchange(port, ['POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n'], { answers: 1 });
    expect(socket.replies[0]?.status).toBe(100);
  });

  it('leaves malformed and ambiguous requests to node:http, which refuses them', async () => {
    const cases: [string, string, number][] = [
      ['Content-Length and Transfer-Encoding', 'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n', 400],
      ['two Content-Lengths', 'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx', 400],
      ['a signed Content-Length', 'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\nx', 400],
      ['a folded header', 'POST /echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\nContent-Length: 1\r\n\r\nx', 400],
      ['a header without a colon', 'POST /echo HTTP/1.1\r\nHost: x\r\nnonsense\r\nContent-Length: 1\r\n\r\nx', 400],
      ['a NUL in a header', 'POST /echo HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\nContent-Length: 1\r\n\r\nx', 400],
      ['a space before the colon', 'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length : 1\r\n\r\nx', 400],
      ['a head over 16 KiB', `POST /echo HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(17 * 1024)}\r\nContent-Length: 1\r\n\r\nx`, 431],
    ];
    for (const [name, request, status] of cases) {
      const before = seen.length;
      const { replies } = await exchange(port, [request], { answers: 1 });
      expect(replies[0]?.status, name).toBe(status);
      expect(seen.length, `${name} reached the route`).toBe(before);
    }
    // And the server is still there.
    expect((await exchange(port, [post('/echo', 'still')])).replies[0]?.status).toBe(200);
  });

  it('hands a body over the limit to node:http', async () => {
    const { replies } = await exchange(port, [post('/echo', 'x'.repeat(1001))], { answers: 1 });
    expect(replies[0]?.body).toBe(`node:http POST /echo ${'x'.repeat(1001)}`);
  });

  it('closes after the answer when the client says Connection: close, or half-closes', async () => {
    const asked = await exchange(port, [post('/echo', 'bye', 'Connection: close\r\n')]);
    expect(asked.replies[0]?.headers['connection']).toBe('close');
    expect(asked.closed).toBe(true);
    const half = await exchange(port, [post('/slow', '100') + post('/echo', 'last')], { end: true, answers: 2 });
    expect(half.replies.map((r) => r.status)).toEqual([200, 200]);
    expect(half.closed).toBe(true);
  });

  it('closes an idle keep-alive connection after keepAliveTimeout, but not one waiting for its answer', async () => {
    const idle = await exchange(port, [post('/echo', 'idle')], { answers: 2, timeoutMs: 1500 });
    expect(idle.replies).toHaveLength(1);
    expect(idle.closed).toBe(true);
    const waiting = await exchange(port, [post('/slow', '700')], { answers: 1, timeoutMs: 1500 });
    expect(waiting.replies[0]?.body).toBe(JSON.stringify({ status: 'OK', echo: '700' }));
  });

  it('drops a client that trickles its request head for longer than headersTimeout', async () => {
    const head = 'POST /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ';
    const started = Date.now();
    const { closed, replies } = await exchange(port, [head, ...Array.from({ length: 12 }, () => 'a')], { gapMs: 100, answers: 1, timeoutMs: 500 });
    expect(replies).toHaveLength(0);
    expect(closed).toBe(true);
    expect(Date.now() - started).toBeLessThan(2500);
  });

  it('on closeIdleConnections, drops idle connections at once and answers busy ones with Connection: close', async () => {
    const own = createHttpServer({
      routes: new Map<string, Route>([['/slow', async (body) => (await sleep(Number(body)), ok(body))]]),
      fallback: (_req, res) => res.end(),
      bodyLimit: 1000,
      keepAliveTimeout: 60_000,
      headersTimeout: 60_000,
      requestTimeout: 60_000,
    });
    await new Promise<void>((r) => own.server.listen(0, '127.0.0.1', r));
    const ownPort = (own.server.address() as AddressInfo).port;
    const idle = exchange(ownPort, [post('/slow', '0')], { answers: 2, timeoutMs: 3000 });
    await sleep(200);
    const busy = exchange(ownPort, [post('/slow', '400')], { answers: 2, timeoutMs: 3000 });
    await sleep(100);
    const started = Date.now();
    own.server.close();
    own.closeIdleConnections();
    const [i, b] = await Promise.all([idle, busy]);
    expect(i.replies).toHaveLength(1);
    expect(i.closed).toBe(true);
    expect(b.replies.map((r) => [r.status, r.headers['connection']])).toEqual([[200, 'close']]);
    expect(b.closed).toBe(true);
    // Both ended long before the 60 s keep-alive: the idle one at once, the busy one after its answer.
    expect(Date.now() - started).toBeLessThan(2000);
  });

  it('reads only what it understands (parseHead)', () => {
    const routes = new Map<string, Route>([['/echo', async () => ok('')]]);
    const head = (text: string) => parseHead(Buffer.from(text), routes, 100);
    const h = 'Host: relay\r\n';
    expect(head(`POST /echo HTTP/1.1\r\n${h}Content-Length: 3\r\n\r\n`)).toMatchObject({ length: 3, close: false });
    expect(head(`POST /echo HTTP/1.1\r\n${h}connection: keep-alive, Close\r\ncontent-length:  0 \r\n\r\n`)).toMatchObject({ length: 0, close: true });
    expect(head('POST /echo HTTP/1.1\r\nContent-')).toBe('incomplete');
    expect(head('GET /e')).toBe('other');
    expect(head(`POST /echo HTTP/1.1\r\n${h}Content-Length: 101\r\n\r\n`)).toBe('other');
    expect(head(`POST /echo HTTP/1.1\r\n${h}Connection: Upgrade\r\nContent-Length: 1\r\n\r\n`)).toBe('other');
    expect(head(`POST /echo?x=1 HTTP/1.1\r\n${h}Content-Length: 1\r\n\r\n`)).toBe('other');
    expect(head(`POST /echo HTTP/1.1\n${h}Content-Length: 1\n\n`)).toBe('other');
    expect(head(`POST /echo HTTP/1.1\r\n${h}Authorization: a\r\nAuthorization: b\r\nContent-Length: 1\r\n\r\n`)).toBe('other');
    // RFC 9112 §3.2: exactly one Host.
    expect(head('POST /echo HTTP/1.1\r\nContent-Length: 1\r\n\r\n')).toBe('other');
    expect(head(`POST /echo HTTP/1.1\r\n${h}${h}Content-Length: 1\r\n\r\n`)).toBe('other');
  });
});

/** What node:http makes of `bytes` sent on a fresh connection: the request it saw, if any. */
async function nodeReads(port: number, bytes: Buffer): Promise<{ method: string; url: string; headers: Record<string, unknown>; body: Buffer } | undefined> {
  const socket = connect(port, '127.0.0.1');
  socket.on('error', () => {});
  socket.on('data', () => {});
  await new Promise((r) => socket.once('connect', r));
  socket.end(bytes);
  await new Promise((r) => {
    socket.once('close', r);
    setTimeout(r, 300);
  });
  socket.destroy();
  return lastNodeRequest.splice(0).at(-1);
}
const lastNodeRequest: { method: string; url: string; headers: Record<string, unknown>; body: Buffer }[] = [];

describe('parseHead against node:http', () => {
  it('serves itself only requests that node:http reads the same way (1000 mutated requests)', async () => {
    const { createServer } = await import('node:http');
    const server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        lastNodeRequest.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, body: Buffer.concat(chunks) });
        res.end('ok');
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as AddressInfo).port;
    const routes = new Map<string, Route>([['/api/v1/send_push', async () => ok('')]]);
    const base = post('/api/v1/send_push', '{"message":"hi"}', 'Authorization: Basic dTpw\r\nAccept-Encoding: gzip\r\n');
    const inserts = [' ', '\t', '\r', '\n', '\0', ':', 'a', 'A', '\x7f', '\xff', ',', '+', '-', '0', '9', '\r\n', 'Transfer-Encoding: chunked\r\n', 'Content-Length: 3\r\n'];
    let seed = Number(process.env.HTTP_DIFF_SEED ?? 7); // another seed explores other mutations
    const random = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    let ours = 0;
    try {
      for (let i = 0; i < 1000; i++) {
        let text = base;
        const headEnd = text.indexOf('\r\n\r\n') + 4;
        for (let k = 0, edits = 1 + random(2); k < edits; k++) {
          const at = random(headEnd);
          const op = random(3);
          if (op === 0) text = text.slice(0, at) + inserts[random(inserts.length)] + text.slice(at);
          else if (op === 1) text = text.slice(0, at) + text.slice(at + 1);
          else text = text.slice(0, at) + text.charAt(at).toUpperCase() + text.slice(at + 1);
        }
        let bytes = Buffer.from(text, 'latin1');
        const head = parseHead(bytes, routes, 1000);
        if (typeof head === 'string') continue;
        // A longer Content-Length than the body: send the rest, so both parsers have it all.
        const missing = head.bodyStart + head.length - bytes.length;
        if (missing > 0) bytes = Buffer.concat([bytes, Buffer.alloc(missing, 'x')]);
        ours++;
        const seen = await nodeReads(port, bytes);
        const what = JSON.stringify(text);
        expect(seen, `node:http read no request from ${what}`).toBeDefined();
        expect(seen?.method, what).toBe('POST');
        expect(seen?.url, what).toBe('/api/v1/send_push');
        expect(seen?.headers['content-length'], what).toBe(String(head.length));
        expect(seen?.body.toString('latin1'), what).toBe(bytes.subarray(head.bodyStart, head.bodyStart + head.length).toString('latin1'));
        expect(seen?.headers['authorization'], what).toBe(head.authorization);
        expect(seen?.headers['user-agent'], what).toBe(head.userAgent);
      }
    } finally {
      server.close();
    }
    // The mutations must leave some requests ours, or this test would prove nothing.
    expect(ours).toBeGreaterThan(200);
  });
});

describe('the relay on one keep-alive connection', () => {
  it('serves send_push, then the operator endpoints, then send_push again, through node:http', async () => {
    const relay = await startTestRelay({ sinks: { log: { type: 'log' } } });
    try {
      const push = JSON.stringify({ platform: 'android', server_id: 's', device_id: 'd', type: 'message', message: 'hi', ack_id: 'a1' });
      const { replies } = await exchange(relay.port, [post('/api/v1/send_push', push) + 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n' + post('/api/v1/send_push', '[]')], {
        answers: 3,
      });
      expect(replies.map((r) => [r.status, r.body])).toEqual([
        [200, '{"status":"OK"}'],
        [200, '{"status":"ok"}'],
        [200, expect.stringMatching(/^\{"status":"FAIL","error":".+"\}$/)],
      ]);
      // The same headers whichever way the answer went.
      expect(replies[0]?.headers).toMatchObject({ 'content-type': 'application/json', connection: 'keep-alive', 'keep-alive': 'timeout=95' });
      expect(replies[2]?.headers).toMatchObject({ 'content-type': 'application/json', connection: 'keep-alive', 'keep-alive': 'timeout=95' });
    } finally {
      await relay.stop();
    }
  });
});
