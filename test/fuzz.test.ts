// A property test of the ingress (fast-check), over real sockets: thousands of payloads
// derived from the sample payloads (fields deleted, replaced by wrong types, huge or unicode
// strings, deep nesting, prototype keys; the text truncated, spliced, given duplicate keys or
// bad bytes) and a few hundred mutated request heads. Whatever comes in: the relay does not
// crash, answers no 5xx, every 200 is a JSON object of strings with a contract status, and
// nothing is published for a request that was not answered OK (an MQTT subscriber watches).
//
// Bounded: FUZZ_RUNS payloads (default 1500) and FUZZ_HEAD_RUNS heads (default 300) stay well
// under 60 s on a loaded 2-core machine. FUZZ_SEED=<n> replays or explores (printed on failure).
import { connect } from 'node:net';
import { Agent } from 'node:http';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { post } from './helpers/http.js';
import { haveMosquitto, startMosquitto, type Mosquitto } from './helpers/mosquitto.js';
import { subscribe, type Subscriber } from './helpers/mqtt.js';
import { loadPayloads } from './helpers/payloads.js';
import { startTestRelay } from './helpers/relay.js';
import { sleep, until } from './helpers/wait.js';

const RUNS = Number(process.env.FUZZ_RUNS ?? 1500);
const HEAD_RUNS = Number(process.env.FUZZ_HEAD_RUNS ?? 300);
const SEED = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined;
const MARK = 'fuzz_case';

const FIXTURES = loadPayloads().map((p) => p.json);
const KNOWN = [...new Set(FIXTURES.flatMap((f) => Object.keys(f)))];
const PROTO_KEYS = ['__proto__', 'constructor', 'prototype', 'toString', 'valueOf', 'hasOwnProperty', '__defineGetter__'];

const deep = (depth: number, leaf: unknown, asArray: boolean): unknown => {
  let v = leaf;
  for (let i = 0; i < depth; i++) v = asArray ? [v] : { x: v };
  return v;
};

/** A value of any shape a field might be given. */
const anyValue: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 3, arbitrary: fc.jsonValue({ maxDepth: 3 }) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 40 }) },
  fc.constantFrom('', ' ', '\u0000', '\ud800', '💥', 'a'.repeat(5000), '/+#', '../..', '{message}', 'null', 'true'),
  fc.tuple(fc.string({ maxLength: 3 }), fc.integer({ min: 1000, max: 200_000 })).map(([s, n]) => (s || 'x').repeat(n).slice(0, n)),
  fc.tuple(fc.integer({ min: 1, max: 3000 }), fc.boolean()).map(([d, a]) => deep(d, 1, a)),
  fc.constantFrom(0, -1, 1.5, 2 ** 53, -(2 ** 63), Number.MAX_VALUE, true, false, null, [], {}),
);

type Edit = { kind: 'set'; key: string; value: unknown } | { kind: 'delete'; key: string };
const edit: fc.Arbitrary<Edit> = fc.oneof(
  fc.record({ kind: fc.constant('set' as const), key: fc.oneof(fc.constantFrom(...KNOWN), fc.constantFrom(...PROTO_KEYS), fc.string({ maxLength: 12 })), value: anyValue }),
  fc.record({ kind: fc.constant('delete' as const), key: fc.constantFrom(...KNOWN) }),
);

type TextEdit =
  | { kind: 'none' }
  | { kind: 'truncate'; at: number }
  | { kind: 'splice'; at: number; bytes: string }
  | { kind: 'duplicate-key'; key: string; value: unknown }
  | { kind: 'prefix'; bytes: string }
  | { kind: 'whole'; body: string };
const textEdit: fc.Arbitrary<TextEdit> = fc.oneof(
  { weight: 6, arbitrary: fc.constant({ kind: 'none' as const }) },
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({ kind: fc.constant('splice' as const), at: fc.nat(), bytes: fc.string({ unit: 'binary', maxLength: 8 }) }),
  fc.record({ kind: fc.constant('duplicate-key' as const), key: fc.constantFrom(...KNOWN), value: anyValue }),
  fc.record({ kind: fc.constant('prefix' as const), bytes: fc.constantFrom('\ufeff', ' \n\t', '\u0000', '[', '{"a":1}') }),
  fc.record({ kind: fc.constant('whole' as const), body: fc.oneof(fc.json(), fc.string({ unit: 'binary', maxLength: 60 }), fc.constantFrom('', 'null', '[]', '"x"', '1e400', '{}')) }),
);

let caseNo = 0;

/** The body a case sends, and its marker (the unknown field that shows up in what is published). */
function build(base: number, edits: Edit[], t: TextEdit): { body: Buffer; mark: string } {
  const mark = `c${++caseNo}`;
  const obj: Record<string, unknown> = { ...FIXTURES[base % FIXTURES.length] };
  for (const e of edits) {
    if (e.kind === 'delete') delete obj[e.key];
    // defineProperty, so "__proto__" is a plain key as it is in JSON text.
    else Object.defineProperty(obj, e.key, { value: e.value, enumerable: true, writable: true, configurable: true });
  }
  // A fresh ack_id per case: dedup would rightly skip a resent one, and the count below is exact.
  if (typeof obj.ack_id === 'string' && obj.ack_id !== '' && obj.ack_id.length < 100) obj.ack_id = `${obj.ack_id.slice(0, 12)}-${mark}`;
  let text = JSON.stringify(obj);
  switch (t.kind) {
    case 'truncate':
      text = text.slice(0, t.at % (text.length + 1));
      break;
    case 'splice': {
      const at = t.at % (text.length + 1);
      text = text.slice(0, at) + t.bytes + text.slice(at);
      break;
    }
    case 'duplicate-key':
      // Go's decoder (and JSON.parse) keep the last of two equal keys.
      text = `{${JSON.stringify(t.key)}:${JSON.stringify(t.value) ?? 'null'},${text.slice(1)}`;
      break;
    case 'prefix':
      text = t.bytes + text;
      break;
    case 'whole':
      text = t.body;
      break;
    case 'none':
      break;
  }
  // The marker goes in last, as text, after the edits: JSON keeps the last of equal keys, so
  // any push accepted carries it intact. A text that does not end an object gets none (and
  // cannot be a valid push).
  const end = /\}\s*$/.exec(text);
  if (end) {
    const head = text.slice(0, end.index).trimEnd();
    text = `${head}${head.endsWith('{') ? '' : ','}${JSON.stringify(MARK)}:${JSON.stringify(mark)}}`;
  }
  return { body: Buffer.from(text, 'utf8'), mark };
}

/** A 200's body as Mattermost reads it: a JSON object of strings (contract §3.1). */
function checkContractReply(text: string) {
  const body = JSON.parse(text) as Record<string, unknown>;
  expect(body !== null && typeof body === 'object' && !Array.isArray(body)).toBe(true);
  for (const v of Object.values(body)) expect(typeof v).toBe('string');
  expect(['OK', 'FAIL', 'REMOVE']).toContain(body.status);
  return body.status as string;
}

describe.skipIf(!haveMosquitto())('ingress fuzz', () => {
  let broker: Mosquitto;
  let sub: Subscriber;
  let relay: Awaited<ReturnType<typeof startTestRelay>>;
  /** Markers of the requests answered 200 OK. */
  const ok = new Set<string>();
  let okCount = 0;

  beforeAll(async () => {
    broker = await startMosquitto();
    sub = await subscribe(broker.url, 'fuzz/#');
    relay = await startTestRelay({
      server: { bodyLimit: '256kb', rateLimit: { perSecond: 1_000_000, burst: 1_000_000 } },
      sinks: { notif: { type: 'mqtt', url: broker.url, topic: 'fuzz/all', format: 'json', qos: 1 } },
    });
  });
  afterAll(async () => {
    await relay?.stop();
    await sub?.close();
    await broker?.stop();
  });

  const published = () => sub.messages.map((m) => (JSON.parse(m.payload.toString('utf8')) as Record<string, unknown>)[MARK]);

  it(`answers ${RUNS} mutated payloads with a contract reply or 413, never 5xx`, async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    const statuses = new Map<string, number>();
    await fc.assert(
      fc.asyncProperty(fc.nat(), fc.array(edit, { maxLength: 4 }), textEdit, async (base, edits, t) => {
        const { body, mark } = build(base, edits, t);
        const reply = await post(`${relay.url}/api/v1/send_push`, body, { agent });
        expect(reply.status === 200 || reply.status === 413).toBe(true);
        const status = checkContractReply(reply.text);
        statuses.set(status, (statuses.get(status) ?? 0) + 1);
        if (reply.status === 200 && status === 'OK') {
          okCount++;
          ok.add(mark);
        }
      }),
      { numRuns: RUNS, seed: SEED, interruptAfterTimeLimit: 40_000, markInterruptAsFailure: false },
    );
    agent.destroy();
    console.log(`fuzz payloads: ${JSON.stringify(Object.fromEntries(statuses))}`);
    // The generator reached both sides: the property is about something.
    expect(statuses.get('OK') ?? 0).toBeGreaterThan(50);
    expect(statuses.get('FAIL') ?? 0).toBeGreaterThan(50);
  }, 60_000);

  it(`answers ${HEAD_RUNS} mutated request heads without a 5xx, and keeps serving`, async () => {
    const methods = fc.constantFrom('POST', 'POST', 'POST', 'POST', 'POST', 'GET', 'PUT', 'P0ST', 'post', 'OPTIONS', 'HEAD');
    const paths = fc.constantFrom('/api/v1/send_push', '/api/v1/send_push', '/api/v1/send_push', '/api/v1/send_push?x=1', '/api/v1/ack', '//api/v1/send_push', '/api/v1/send_push/', '/API/V1/SEND_PUSH', '/%2e%2e/api/v1/send_push', '*', '/metrics', '/admin/status');
    const versions = fc.constantFrom('HTTP/1.1', 'HTTP/1.1', 'HTTP/1.1', 'HTTP/1.1', 'HTTP/1.0', 'HTTP/2.0', 'HTTP/1.1 ', 'HTTP/9');
    const benign = fc.constantFrom('Content-Type: text/html', 'Connection: keep-alive', 'Accept: */*', 'X-Forwarded-For: ::1, junk', 'Authorization: Basic Og==', 'User-Agent: Mattermost-Bot/1.1', 'Accept-Encoding: gzip', 'X: \u00ff');
    const hostile = fc.oneof(
      fc.constantFrom('Host: 127.0.0.1', 'Content-Length: 5', 'Content-Length: -1', 'Content-Length: 99999999999', 'Transfer-Encoding: chunked', 'Transfer-Encoding: gzip', 'Expect: 100-continue', 'Bad Header: x', ': empty'),
      fc.tuple(fc.stringMatching(/^[A-Za-z-]{1,10}$/), fc.string({ unit: 'binary-ascii', maxLength: 30 })).map(([k, v]) => `${k}: ${v.replace(/[\r\n]/g, '')}`),
      fc.integer({ min: 1, max: 120 }).map((n) => Array.from({ length: n }, (_, i) => `X-Many-${i}: ${i}`).join('\r\n')),
      fc.integer({ min: 1000, max: 40_000 }).map((n) => `X-Long: ${'l'.repeat(n)}`),
    );
    const extra = fc.oneof(
      { weight: 2, arbitrary: fc.array(benign, { maxLength: 3 }) },
      { weight: 2, arbitrary: fc.tuple(fc.array(benign, { maxLength: 2 }), hostile).map(([b, h]) => [...b, h]) },
    );
    const bodyKind = fc.constantFrom('valid', 'chunked', 'none', 'short');
    const answered = new Map<number, number>();
    await fc.assert(
      fc.asyncProperty(methods, paths, versions, extra, bodyKind, fc.oneof({ weight: 6, arbitrary: fc.constant(true) }, fc.constant(false)), async (method, path, version, headers, kind, host) => {
        const { body, mark } = build(0, [], { kind: 'none' });
        let payload = body.toString('latin1');
        const lines = [`${method} ${path} ${version}`, ...(host ? ['Host: 127.0.0.1'] : []), ...headers];
        if (kind === 'valid') lines.push(`Content-Length: ${body.length}`);
        if (kind === 'short') lines.push(`Content-Length: ${body.length + 10}`);
        if (kind === 'chunked') {
          lines.push('Transfer-Encoding: chunked');
          payload = `${body.length.toString(16)}\r\n${payload}\r\n0\r\n\r\n`;
        }
        if (kind === 'none') payload = '';
        lines.push('Connection: close');
        const raw = await exchange(relay.port, `${lines.join('\r\n')}\r\n\r\n${payload}`);
        // Skip interim answers (100 Continue to an Expect): the final status is what counts.
        const final = raw.replace(/^(HTTP\/1\.[01] 1\d\d[^\r]*\r\n(?:[^\r]+\r\n)*\r\n)+/, '');
        const m = /^HTTP\/1\.[01] (\d{3})/.exec(final);
        const code = m ? Number(m[1]) : 0;
        answered.set(code, (answered.get(code) ?? 0) + 1);
        expect(code === 0 || code < 500).toBe(true);
        const split = final.indexOf('\r\n\r\n');
        if (code === 200 && /send_push|ack/i.test(path) && method === 'POST') {
          const head = final.slice(0, split);
          let text = final.slice(split + 4);
          if (/transfer-encoding: chunked/i.test(head)) text = text.replace(/^[0-9a-f]+\r\n/i, '').replace(/\r\n0\r\n\r\n$/, '');
          if (checkContractReply(Buffer.from(text, 'latin1').toString('utf8')) === 'OK') {
            okCount++;
            ok.add(mark);
          }
        }
      }),
      { numRuns: HEAD_RUNS, seed: SEED, interruptAfterTimeLimit: 25_000, markInterruptAsFailure: false },
    );
    console.log(`fuzz heads, by status (0 = closed without an answer): ${JSON.stringify(Object.fromEntries(answered))}`);
    expect(answered.get(200) ?? 0).toBeGreaterThan(10);
    expect([...answered.keys()].some((c) => c >= 400)).toBe(true);
  }, 60_000);

  it('published exactly the requests answered OK, each once, and nothing answered otherwise', async () => {
    const good = (await post(`${relay.url}/api/v1/send_push`, JSON.stringify({ ...FIXTURES[0], ack_id: 'fuzz-final-check', [MARK]: 'final' }))).json;
    expect(good).toEqual({ status: 'OK' });
    await until('every OK at the subscriber', () => published().includes('final') && published().length >= okCount + 1, { timeoutMs: 20_000 });
    await sleep(300);
    const marks = published();
    const notOk = marks.filter((m) => m !== 'final' && !ok.has(m as string));
    expect(notOk).toEqual([]);
    expect(marks.length).toBe(okCount + 1);
    expect(new Set(marks).size).toBe(marks.length);
  }, 30_000);
});

/** Writes `raw` on a fresh socket and resolves with everything read until the server closes (bounded). */
function exchange(port: number, raw: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect({ port, host: '127.0.0.1' });
    const chunks: Buffer[] = [];
    const done = () => {
      clearTimeout(timer);
      socket.destroy();
      resolve(Buffer.concat(chunks).toString('latin1'));
    };
    // A head that promises more body than it sends gets no answer: waiting longer proves nothing.
    const timer = setTimeout(done, 500);
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('close', done);
    socket.on('error', done);
    // write, not end: a client that half-closes its side gets no answer from node:http (the
    // server ends the socket on FIN), and Mattermost's client never does that.
    socket.write(Buffer.from(raw, 'latin1'));
  });
}
