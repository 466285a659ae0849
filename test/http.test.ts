// One way into the API (src/server.ts): the node:http listener and Hono's routes (what
// `app.request` reaches) build the same request value, pass the same guards and answer the
// same bytes. Real sockets for the listener; requests Mattermost sends and requests it does not.
import { connect } from 'node:net';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestRelay } from './helpers/relay.js';
import { payload } from './helpers/payloads.js';
import { sleep } from './helpers/wait.js';

type Relay = Awaited<ReturnType<typeof startTestRelay>>;

/** One exchange on a fresh connection: what the server wrote back, and whether it closed. */
async function exchange(
  port: number,
  writes: (string | Buffer)[],
  { answers = 1, gapMs = 0, timeoutMs = 5000 } = {},
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
  const deadline = Date.now() + timeoutMs;
  while (parseReplies(raw).length < answers && !closed && Date.now() < deadline) await sleep(10);
  await sleep(30);
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
      rest = rest.slice(end + 4);
      continue;
    }
    if (headers['transfer-encoding'] === 'chunked') {
      const term = rest.indexOf('0\r\n\r\n', end + 4);
      if (term < 0) return out;
      // One chunk is all our answers need: "<hex>\r\n<data>\r\n".
      const chunked = rest.slice(end + 4, term);
      const data = chunked.slice(chunked.indexOf('\r\n') + 2, chunked.lastIndexOf('\r\n'));
      out.push({ status, headers, body: Buffer.from(data, 'latin1').toString('utf8') });
      rest = rest.slice(term + 5);
      continue;
    }
    const length = Number(headers['content-length'] ?? 0);
    if (rest.length < end + 4 + length) return out;
    // `raw` holds bytes as latin1 characters; the body is UTF-8.
    out.push({ status, headers, body: Buffer.from(rest.slice(end + 4, end + 4 + length), 'latin1').toString('utf8') });
    rest = rest.slice(end + 4 + length);
  }
}

const post = (path: string, body: string, extra = '', version = '1.1') =>
  `POST ${path} HTTP/${version}\r\nHost: relay\r\nUser-Agent: Mattermost-Bot/1.1\r\n${extra}Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;

const chunked = (path: string, parts: string[], extra = '') =>
  `POST ${path} HTTP/1.1\r\nHost: relay\r\n${extra}Transfer-Encoding: chunked\r\n\r\n` +
  parts.map((p) => `${Buffer.byteLength(p).toString(16)}\r\n${p}\r\n`).join('') +
  '0\r\n\r\n';

const PUSH = payload('01').text;
const AUTH = `Basic ${Buffer.from('mattermost:s3cret').toString('base64')}`;

describe('the two entrances to the API', () => {
  let relay: Relay;
  const logLines: Array<{ level: number; msg: string }> = [];
  beforeAll(async () => {
    const logger = pino({ level: 'debug' }, { write: (line: string) => void logLines.push(JSON.parse(line)) });
    relay = await startTestRelay(
      {
        server: { auth: { username: 'mattermost', password: 's3cret' }, bodyLimit: 2048, basePath: '/hook' },
        sinks: { log: { type: 'log', level: 'debug' } },
      },
      { logger },
    );
  });
  afterAll(() => relay.stop());

  /** The same request through app.request: status, the headers a client reads, and the body. */
  async function viaHono(path: string, body: string | undefined, headers: Record<string, string>, method = 'POST') {
    const res = await relay.app.request(path, { method, body, headers });
    return {
      status: res.status,
      type: res.headers.get('content-type'),
      auth: res.headers.get('www-authenticate'),
      body: await res.text(),
    };
  }
  const viaSocket = (r: ParsedReply) => ({
    status: r.status,
    type: r.headers['content-type'] ?? null,
    auth: r.headers['www-authenticate'] ?? null,
    body: r.body,
  });

  const cases: Array<{ name: string; path: string; body?: string; headers: Record<string, string>; method?: string; expect: RegExp }> = [
    { name: 'a valid push', path: '/hook/api/v1/send_push', body: PUSH, headers: { authorization: AUTH }, expect: /^\{"status":"OK"\}$/ },
    { name: 'a valid ack', path: '/hook/api/v1/ack', body: '{"id":"a1","platform":"android","type":"message"}', headers: { authorization: AUTH }, expect: /OK/ },
    { name: 'a query string', path: '/hook/api/v1/send_push?x=1', body: PUSH, headers: { authorization: AUTH }, expect: /^\{"status":"OK"\}$/ },
    { name: 'bad JSON', path: '/hook/api/v1/send_push', body: '{"platform":', headers: { authorization: AUTH }, expect: /"FAIL","error":"invalid JSON/ },
    { name: 'a missing device_id', path: '/hook/api/v1/send_push', body: '{"platform":"android","server_id":"s"}', headers: { authorization: AUTH }, expect: /device_id is required/ },
    { name: 'an empty body', path: '/hook/api/v1/send_push', body: '', headers: { authorization: AUTH }, expect: /empty body/ },
    { name: 'no credentials', path: '/hook/api/v1/send_push', body: PUSH, headers: {}, expect: /^unauthorized/ },
    { name: 'wrong credentials', path: '/hook/api/v1/ack', body: '{}', headers: { authorization: 'Basic eDp5' }, expect: /^unauthorized/ },
    { name: 'a body over the limit', path: '/hook/api/v1/send_push', body: `{"message":"${'x'.repeat(3000)}"}`, headers: { authorization: AUTH }, expect: /larger than 2048 bytes/ },
    { name: 'a GET of an API path', path: '/hook/api/v1/send_push', headers: {}, method: 'GET', expect: /method not allowed/ },
    { name: 'the API without its basePath', path: '/api/v1/send_push', body: PUSH, headers: { authorization: AUTH }, expect: /^not found/ },
    { name: 'an operator endpoint', path: '/healthz', headers: {}, method: 'GET', expect: /"ok"/ },
  ];

  it.each(cases)('answers $name the same bytes through the listener and app.request', async (c) => {
    const method = c.method ?? 'POST';
    const headerLines = Object.entries(c.headers).map(([k, v]) => `${k}: ${v}\r\n`).join('');
    const raw =
      method === 'POST'
        ? post(c.path, c.body ?? '', headerLines)
        : `${method} ${c.path} HTTP/1.1\r\nHost: relay\r\n${headerLines}\r\n`;
    const { replies } = await exchange(relay.port, [raw]);
    expect(replies).toHaveLength(1);
    const socket = viaSocket(replies[0] as ParsedReply);
    const hono = await viaHono(c.path, method === 'POST' ? (c.body ?? '') : undefined, c.headers, method);
    expect(socket.body).toMatch(c.expect);
    expect(socket).toEqual(hono);
  });

  it('serves a chunked body, one sent a few bytes at a time, and HTTP/1.0', async () => {
    const half = Math.floor(PUSH.length / 2);
    const viaChunks = await exchange(relay.port, [chunked('/hook/api/v1/send_push', [PUSH.slice(0, half), PUSH.slice(half)], `Authorization: ${AUTH}\r\n`)]);
    expect(viaChunks.replies.map((r) => [r.status, r.body])).toEqual([[200, '{"status":"OK"}']]);

    const bytes = Buffer.from(post('/hook/api/v1/send_push', PUSH, `Authorization: ${AUTH}\r\n`));
    const pieces = Array.from({ length: Math.ceil(bytes.length / 7) }, (_, i) => bytes.subarray(i * 7, i * 7 + 7));
    const trickled = await exchange(relay.port, pieces, { gapMs: 1 });
    expect(trickled.replies.map((r) => [r.status, r.body])).toEqual([[200, '{"status":"OK"}']]);

    const old = await exchange(relay.port, [post('/hook/api/v1/send_push', PUSH, `Authorization: ${AUTH}\r\n`, '1.0')]);
    expect(old.replies.map((r) => [r.status, r.body])).toEqual([[200, '{"status":"OK"}']]);
    expect(old.closed).toBe(true); // HTTP/1.0 without keep-alive: node:http closes after the answer
  });

  it('answers a chunked body over the limit with 413', async () => {
    const big = 'x'.repeat(1500);
    const { replies } = await exchange(relay.port, [chunked('/hook/api/v1/send_push', [big, big], `Authorization: ${AUTH}\r\n`)]);
    expect(replies.map((r) => r.status)).toEqual([413]);
    expect(replies[0]?.body).toMatch(/larger than 2048 bytes/);
  });

  it('refuses malformed requests with 400 before any handler sees them (two Host headers, bad framing)', async () => {
    for (const raw of [
      `POST /hook/api/v1/send_push HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}`,
      `POST /hook/api/v1/send_push HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n`,
      `POST /hook/api/v1/send_push HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}`,
      `POST /hook/api/v1/send_push HTTP/1.1\r\nHost a\r\n\r\n`,
    ]) {
      const { raw: answer } = await exchange(relay.port, [raw]);
      expect(answer, JSON.stringify(raw)).toMatch(/^HTTP\/1\.1 400 /);
    }
  });

  it('answers pipelined API calls and operator requests in order on one keep-alive connection', async () => {
    const { replies, closed } = await exchange(
      relay.port,
      [post('/hook/api/v1/send_push', PUSH, `Authorization: ${AUTH}\r\n`) + 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n' + post('/hook/api/v1/send_push', '[]', `Authorization: ${AUTH}\r\n`)],
      { answers: 3 },
    );
    expect(replies.map((r) => [r.status, r.body])).toEqual([
      [200, '{"status":"OK"}'],
      [200, '{"status":"ok"}'],
      [200, '{"status":"FAIL","error":"expected a JSON object, got an array"}'],
    ]);
    expect(closed).toBe(false);
    expect(replies[0]?.headers).toMatchObject({ 'content-type': 'application/json', connection: 'keep-alive', 'keep-alive': 'timeout=95' });
  });

  it('keeps serving after a client abandons a chunked body mid-way, and does not log it as a bug', async () => {
    const socket = connect(relay.port, '127.0.0.1');
    socket.on('error', () => {});
    await new Promise((r) => socket.once('connect', r));
    const before = logLines.length;
    socket.write(`POST /hook/api/v1/send_push HTTP/1.1\r\nHost: a\r\nAuthorization: ${AUTH}\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{"platform":"and`);
    await sleep(50);
    socket.destroy();
    await sleep(50);
    expect(relay.app.inFlight()).toBe(0);
    const lines = logLines.slice(before);
    expect(lines.map((l) => l.msg)).toContain('client went away before its request was complete');
    expect(lines.filter((l) => l.level >= 50)).toEqual([]);
    const { replies } = await exchange(relay.port, [post('/hook/api/v1/send_push', PUSH, `Authorization: ${AUTH}\r\n`)]);
    expect(replies.map((r) => r.body)).toEqual(['{"status":"OK"}']);
  });
});
