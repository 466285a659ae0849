// sinks/h2-client.ts against a local HTTP/2 TLS server: what the FCM and APNs sinks' tests do
// not reach through a relay. A stream the provider never answers is given up and its slot
// freed; the server's stream limit holds with more requests than it allows.
import { createSecureServer, type Http2SecureServer, type ServerHttp2Stream } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createH2Client } from '../sinks/h2-client.js';
import { useProviderConnection } from '../sinks/provider-net.js';
import { testCertificate } from './helpers/tls.js';

const HOST = 'push.example.test';
let server: Http2SecureServer;
let open = 0;
let most = 0;
/** How the next stream is handled: answered at once, after a while, or never. */
let handle: (stream: ServerHttp2Stream) => void = (s) => s.respond({ ':status': 200 }, { endStream: true });

beforeAll(async () => {
  const tls = testCertificate([HOST]);
  server = createSecureServer({ cert: tls.cert, key: tls.key, settings: { maxConcurrentStreams: 2 } });
  server.on('session', (s) => s.on('error', () => {}));
  server.on('stream', (stream) => {
    open++;
    most = Math.max(most, open);
    stream.on('close', () => open--);
    stream.on('error', () => {});
    stream.resume();
    stream.on('end', () => handle(stream));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  useProviderConnection((o) => Promise.resolve(tlsConnect({ ...o, host: '127.0.0.1', port, ca: tls.cert })));
});

afterAll(async () => {
  useProviderConnection(undefined);
  await new Promise<void>((resolve) => server.close(() => resolve()));
});

const post = { ':method': 'POST', ':path': '/send', ':authority': HOST };
const forever = () => AbortSignal.timeout(60_000);

describe('the providers\' HTTP/2 client', () => {
  it('gives up on a stream that is never answered, frees its slot, and the next request goes through', async () => {
    const client = createH2Client({ host: HOST, label: 'test', log: pino({ level: 'silent' }), streamTimeoutMs: 300 });
    try {
      handle = () => {}; // never answered
      const started = Date.now();
      const a = await client.request(post, '{}', forever());
      expect(a).toEqual({ error: "no answer within 300 ms" });
      expect(Date.now() - started).toBeGreaterThanOrEqual(290);
      expect(Date.now() - started).toBeLessThan(2000);
      handle = (s) => s.respond({ ':status': 200 }, { endStream: true });
      // Both of the server's two stream slots are usable again.
      const [b, c] = await Promise.all([client.request(post, '{}', forever()), client.request(post, '{}', forever())]);
      expect(b).toMatchObject({ status: 200 });
      expect(c).toMatchObject({ status: 200 });
    } finally {
      await client.close();
    }
  });

  it("keeps within the server's SETTINGS_MAX_CONCURRENT_STREAMS: ten requests, never more than two open", async () => {
    const client = createH2Client({ host: HOST, label: 'test', log: pino({ level: 'silent' }) });
    try {
      await client.connect();
      most = 0;
      handle = (s) => setTimeout(() => !s.destroyed && s.respond({ ':status': 200 }, { endStream: true }), 30);
      const answers = await Promise.all(Array.from({ length: 10 }, () => client.request(post, '{}', forever())));
      expect(answers.map((a) => ('status' in a ? a.status : a.error))).toEqual(Array(10).fill(200));
      expect(most).toBe(2);
    } finally {
      await client.close();
    }
  });

  it('keeps the body of an answer that is not a success, and only then', async () => {
    const client = createH2Client({ host: HOST, label: 'test', log: pino({ level: 'silent' }) });
    try {
      handle = (s) => {
        s.respond({ ':status': 400, 'content-type': 'application/json' });
        s.end('{"reason":"BadDeviceToken"}');
      };
      expect(await client.request(post, '{}', forever())).toMatchObject({ status: 400, body: '{"reason":"BadDeviceToken"}' });
      handle = (s) => {
        s.respond({ ':status': 200 });
        s.end('{"name":"projects/p/messages/1"}');
      };
      expect(await client.request(post, '{}', forever())).toMatchObject({ status: 200, body: '' });
    } finally {
      await client.close();
    }
  });
});

describe("the providers' HTTP/2 client, toward a peer that accepts and then says nothing", () => {
  it('gives up on the handshake after connectTimeoutMs, and connects once the peer answers', async () => {
    const { createServer } = await import('node:net');
    const silent = createServer(() => {}); // takes the TCP connection, never speaks TLS
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const tls = testCertificate([HOST]);
    let target = (silent.address() as AddressInfo).port;
    useProviderConnection((o) => Promise.resolve(tlsConnect({ ...o, host: '127.0.0.1', port: target, ca: tls.cert })));
    const client = createH2Client({ host: HOST, label: 'test', log: pino({ level: 'silent' }), connectTimeoutMs: 300 });
    try {
      const started = Date.now();
      await expect(client.connect()).rejects.toThrow(/no TLS and HTTP\/2 handshake within 300 ms/);
      expect(Date.now() - started).toBeLessThan(2000);
      // A request now tries a new connection rather than waiting on the dead one.
      const a = await client.request(post, '{}', forever());
      expect(a).toMatchObject({ error: expect.stringMatching(/within 300 ms/) });
      const real = createSecureServer({ cert: tls.cert, key: tls.key });
      real.on('stream', (s) => s.respond({ ':status': 200 }, { endStream: true }));
      await new Promise<void>((resolve) => real.listen(0, '127.0.0.1', resolve));
      target = (real.address() as AddressInfo).port;
      expect(await client.request(post, '{}', forever())).toMatchObject({ status: 200 });
      await client.close();
      await new Promise<void>((resolve) => real.close(() => resolve()));
    } finally {
      await client.close();
      silent.close();
    }
  });
});
