// A stand-in for another push proxy (mattermost-push-proxy, HPNS): a node:http server on
// 127.0.0.1 and a kernel-chosen port that records every request as bytes and answers what the
// test tells it to, the way the official proxy does (200 + a JSON map of strings, contract §3.1).
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type RequestListener, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import { tempDir } from './tmp.js';

export type UpstreamRequest = {
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  body: Buffer;
  /** Which TCP connection carried it (1, 2, ... in order of accept). */
  connection: number;
};

/** What to answer: a reply, `hang` to never answer (a timeout), or `reset` to drop the connection with a TCP RST. */
export type UpstreamAnswer = { status?: number; headers?: Record<string, string>; body?: string } | 'hang' | 'reset';

export type FakeUpstream = {
  url: string;
  requests: UpstreamRequest[];
  /** TCP connections accepted so far. */
  connections(): number;
  /** Replaces how requests are answered (default: 200 {"status":"OK"}). */
  answer(fn: (req: UpstreamRequest) => UpstreamAnswer): void;
  /** Resolves once `n` requests to `path` have arrived; throws after `timeoutMs`. */
  waitFor(path: string, n: number, timeoutMs?: number): Promise<UpstreamRequest[]>;
  close(): Promise<void>;
};

const OK: UpstreamAnswer = { body: '{"status":"OK"}' };
const open = new Set<FakeUpstream>();

/** A self-signed certificate for 127.0.0.1 and localhost, made now with openssl (nothing committed). */
export function testCertificate(): { certFile: string; cert: string; key: string } {
  const dir = tempDir('push-relay-cert-');
  const certFile = join(dir, 'cert.pem');
  const keyFile = join(dir, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
    '-subj', '/CN=push-relay test upstream', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-keyout', keyFile, '-out', certFile,
  ], { stdio: 'ignore' });
  return { certFile, cert: readFileSync(certFile, 'utf8'), key: readFileSync(keyFile, 'utf8') };
}

export async function startUpstream(opts: { tls?: { cert: string; key: string } } = {}): Promise<FakeUpstream> {
  const requests: UpstreamRequest[] = [];
  const sockets = new Map<Socket, number>();
  const hanging = new Set<ServerResponse>();
  const waiters = new Set<() => void>();
  let respond: (req: UpstreamRequest) => UpstreamAnswer = () => OK;

  const listener: RequestListener = (req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const r: UpstreamRequest = {
        method: req.method ?? '',
        path: req.url ?? '',
        headers: req.headers,
        body: Buffer.concat(chunks),
        connection: sockets.get(req.socket) ?? 0,
      };
      requests.push(r);
      for (const w of waiters) w();
      const a = r.path === '/version' ? { body: '{"hash":"abc1234","version":"6.5.0"}' } : respond(r);
      if (a === 'hang') return void hanging.add(res);
      if (a === 'reset') return void req.socket.resetAndDestroy();
      // Like the official proxy: no Content-Type on the API answers (contract §3.4).
      res.writeHead(a.status ?? 200, { 'Content-Length': Buffer.byteLength(a.body ?? ''), ...a.headers });
      res.end(a.body ?? '');
    });
  };
  const server: Server = opts.tls ? createHttpsServer(opts.tls, listener) : createServer(listener);
  server.on(opts.tls ? 'secureConnection' : 'connection', (s) => sockets.set(s, sockets.size + 1));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;

  const handle: FakeUpstream = {
    url: `${opts.tls ? 'https' : 'http'}://127.0.0.1:${port}`,
    requests,
    connections: () => sockets.size,
    answer(fn) {
      respond = fn;
    },
    waitFor(path, n, timeoutMs = 5000) {
      const matching = () => requests.filter((r) => r.path === path);
      if (matching().length >= n) return Promise.resolve(matching());
      return new Promise((resolve, reject) => {
        const check = () => {
          if (matching().length < n) return;
          clearTimeout(timer);
          waiters.delete(check);
          resolve(matching());
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`expected ${n} request(s) to ${path} within ${timeoutMs} ms, got ${matching().length}`));
        }, timeoutMs);
        waiters.add(check);
      });
    },
    async close() {
      open.delete(handle);
      for (const res of hanging) res.destroy();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  open.add(handle);
  return handle;
}

afterAll(async () => {
  await Promise.all([...open].map((u) => u.close().catch(() => {})));
});

export type ConnectProxy = { url: string; tunnels: string[]; close(): Promise<void> };

/** An HTTP proxy that only tunnels (CONNECT, RFC 9110 §9.3.6), recording each target. */
export async function startConnectProxy(): Promise<ConnectProxy> {
  const tunnels: string[] = [];
  const sockets = new Set<Socket>();
  const server = createServer((_req, res) => {
    res.writeHead(405);
    res.end('CONNECT only');
  });
  server.on('connect', (req, client: Socket, head: Buffer) => {
    tunnels.push(req.url ?? '');
    const [host, port] = (req.url ?? '').split(':');
    const target = connect(Number(port), host, () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      target.write(head);
      target.pipe(client);
      client.pipe(target);
    });
    for (const s of [client, target]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => sockets.delete(s));
    }
    target.on('error', () => client.destroy());
    client.on('close', () => target.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    tunnels,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
