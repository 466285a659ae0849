// A local fake of FCM's HTTP v1 API (POST /v1/projects/{project}/messages:send) and of
// Google's OAuth token endpoint (POST /token), over TLS with a certificate for the real host
// names, on 127.0.0.1 and a random port; HTTP/2 as fcm.googleapis.com speaks it (the sink's
// messages), and HTTP/1.1 (firebase-admin's token requests, through its public `httpAgent`).
// Every connection the sink opens goes through `dial` below (sinks/provider-net.ts's seam): no
// monkey-patching (see the FCM notes in the README). Error bodies are FCM's documented shape
// (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode).
import { createSecureServer, type Http2SecureServer, type Http2ServerRequest, type Http2ServerResponse, type IncomingHttpHeaders } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import type { Dial } from '../../sinks/provider-net.js';
import { testCertificate, type TestCertificate } from './tls.js';

export const FCM_HOST = 'fcm.googleapis.com';
export const OAUTH_HOST = 'oauth2.googleapis.com';

export type FcmRequest = { method: string; path: string; host: string; headers: IncomingHttpHeaders; body: unknown; at: number; httpVersion: string };
export type FcmReply = { status: number; body: unknown; headers?: Record<string, string> };
export type FcmResponder = (req: FcmRequest, nth: number) => FcmReply | Promise<FcmReply>;

export type FcmFake = {
  port: number;
  tls: TestCertificate;
  /** Every messages:send request, in arrival order. */
  sends: FcmRequest[];
  /** Token requests (OAuth). */
  tokens: FcmRequest[];
  /** TLS connections accepted so far (reuse shows as few). */
  connections(): number;
  /** How the next messages:send is answered (default: 200 with a message name). */
  respond(fn: FcmResponder | undefined): void;
  /** Opens every provider connection to this fake, TLS verified against its certificate. */
  dial: Dial;
  close(): Promise<void>;
};

export const ok = (req: FcmRequest, nth: number): FcmReply => ({
  status: 200,
  body: { name: `${req.path.replace(/^\/v1\//, '').replace(/:send$/, '')}/0:${nth}` },
});

/** FCM's error body: google.rpc.Status with the FcmError detail when `errorCode` is given. */
export function fcmError(status: number, rpcStatus: string, message: string, errorCode?: string): FcmReply {
  return {
    status,
    body: {
      error: {
        code: status,
        message,
        status: rpcStatus,
        ...(errorCode ? { details: [{ '@type': 'type.googleapis.com/google.firebase.fcm.v1.FcmError', errorCode }] } : {}),
      },
    },
  };
}

export async function startFcmFake(): Promise<FcmFake> {
  const tls = testCertificate([FCM_HOST, OAUTH_HOST, '127.0.0.1']);
  const sends: FcmRequest[] = [];
  const tokens: FcmRequest[] = [];
  let responder: FcmResponder = ok;
  let issued = 0;
  const server: Http2SecureServer = createSecureServer({ cert: tls.cert, key: tls.key, allowHTTP1: true }, (req: Http2ServerRequest, res: Http2ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks).toString('utf8');
      let body: unknown = raw;
      try {
        body = JSON.parse(raw);
      } catch {
        // the token endpoint gets a form body
      }
      const host = req.headers[':authority'] ?? req.headers.host ?? '';
      const r: FcmRequest = { method: req.method ?? '', path: req.url ?? '', host, headers: req.headers, body, at: Date.now(), httpVersion: req.httpVersion };
      const answer = (reply: FcmReply) => {
        const text = JSON.stringify(reply.body);
        res.writeHead(reply.status, { 'content-type': 'application/json; charset=UTF-8', 'content-length': Buffer.byteLength(text), ...reply.headers });
        res.end(text);
      };
      if (req.method === 'POST' && req.url === '/token') {
        tokens.push(r);
        return answer({ status: 200, body: { access_token: `fake-access-token-${++issued}`, expires_in: 3599, token_type: 'Bearer' } });
      }
      if (req.method !== 'POST' || !/^\/v1\/projects\/[^/]+\/messages:send$/.test(req.url ?? '')) {
        return answer(fcmError(404, 'NOT_FOUND', `no such method ${req.method} ${req.url}`));
      }
      if (!/^Bearer \S+$/.test(req.headers.authorization ?? '')) {
        return answer(fcmError(401, 'UNAUTHENTICATED', 'Request had invalid authentication credentials.'));
      }
      sends.push(r);
      Promise.resolve(responder(r, sends.length)).then(answer, (err: Error) => answer({ status: 500, body: { error: { code: 500, message: err.message, status: 'INTERNAL' } } }));
    });
  });
  let connections = 0;
  const sockets = new Set<import('node:net').Socket>();
  server.on('secureConnection', (socket) => {
    connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    port,
    tls,
    sends,
    tokens,
    connections: () => connections,
    respond(fn) {
      responder = fn ?? ok;
    },
    dial: (o) => Promise.resolve(tlsConnect({ ...o, host: '127.0.0.1', port, ca: tls.cert })),
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
