// A local fake of Apple's APNs provider API: HTTP/2 over TLS with a certificate for Apple's
// real host names, on 127.0.0.1 and a random port. It checks what Apple checks ("Sending
// notification requests to APNs", "Establishing a token-based connection to APNs"): the path,
// the headers, the ES256 provider token (signature with the test's key, kid, iss, age), the
// client certificate when certificate auth is on, and the body's size and JSON. Every request
// that passes is recorded and answered by the test's responder (default 200).
import { verify, type KeyObject } from 'node:crypto';
import { constants as h2, createSecureServer, type Http2Server, type IncomingHttpHeaders, type ServerHttp2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import type { Dial } from '../../sinks/provider-net.js';
import { testCertificate, type TestCertificate } from './tls.js';

export type ApnsFakeRequest = {
  path: string;
  deviceToken: string;
  headers: IncomingHttpHeaders;
  rawBody: string;
  body: unknown;
  /** The provider token's claims (token auth). */
  jwt?: { header: Record<string, unknown>; claims: { iss: string; iat: number }; token: string };
  /** The client certificate's subject CN (certificate auth). */
  clientCn?: string;
  session: number;
};
/** `rst`: reset the stream with this HTTP/2 error code instead of answering (e.g. REFUSED_STREAM). */
export type ApnsFakeReply = { status: number; reason?: string; delayMs?: number; rst?: number };
export type ApnsResponder = (req: ApnsFakeRequest, nth: number) => ApnsFakeReply;

export type ApnsFakeOptions = {
  /** Token auth: the key the provider token must verify with, and the kid/iss it must carry. */
  publicKey?: KeyObject;
  keyId?: string;
  teamId?: string;
  /** Certificate auth: the CA (here the client's own self-signed certificate) to require. */
  clientCa?: string;
  /** SETTINGS_MAX_CONCURRENT_STREAMS announced to the client. */
  maxConcurrentStreams?: number;
  /** The fake's clock, for the token's age (ms). */
  now?: () => number;
};

export type ApnsFake = {
  port: number;
  tls: TestCertificate;
  requests: ApnsFakeRequest[];
  /** Requests refused by the fake's own checks, with Apple's reason. */
  refused: Array<{ reason: string; headers: IncomingHttpHeaders }>;
  respond(fn: ApnsResponder | undefined): void;
  /** Sends GOAWAY on every open session (as Apple does before closing one). */
  goaway(): void;
  /** HTTP/2 sessions accepted so far. */
  sessions(): number;
  /** The most streams seen open at once. */
  maxInFlight(): number;
  dial: Dial;
  close(): Promise<void>;
};

export const APPLE_HOSTS = ['api.push.apple.com', 'api.sandbox.push.apple.com'];

export async function startApnsFake(opts: ApnsFakeOptions = {}): Promise<ApnsFake> {
  const tls = testCertificate([...APPLE_HOSTS, '127.0.0.1']);
  const now = opts.now ?? Date.now;
  const requests: ApnsFakeRequest[] = [];
  const refused: ApnsFake['refused'] = [];
  let responder: ApnsResponder = () => ({ status: 200 });
  const open = new Set<ServerHttp2Session>();
  let sessionCount = 0;
  let inFlight = 0;
  let maxInFlight = 0;

  const server: Http2Server = createSecureServer({
    cert: tls.cert,
    key: tls.key,
    allowHTTP1: false,
    settings: { maxConcurrentStreams: opts.maxConcurrentStreams ?? 1000 },
    ...(opts.clientCa ? { requestCert: true, rejectUnauthorized: true, ca: opts.clientCa } : {}),
  });
  const ids = new WeakMap<ServerHttp2Session, number>();
  server.on('session', (s) => {
    ids.set(s, ++sessionCount);
    open.add(s);
    s.on('close', () => open.delete(s));
    s.on('error', () => {});
  });
  server.on('stream', (stream, headers) => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    stream.on('close', () => inFlight--);
    stream.on('error', () => {});
    const chunks: Buffer[] = [];
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('end', () => {
      const answer = (r: ApnsFakeReply) => {
        const send = () => {
          if (stream.destroyed) return;
          if (r.rst !== undefined) return stream.close(r.rst);
          const id = `${sessionCount}-${requests.length}-fake`;
          if (r.status === 200) {
            stream.respond({ ':status': 200, 'apns-id': id });
            stream.end();
          } else {
            const body = JSON.stringify(r.status === 410 ? { reason: r.reason, timestamp: now() } : { reason: r.reason });
            stream.respond({ ':status': r.status, 'apns-id': id, 'content-type': 'application/json' });
            stream.end(body);
          }
        };
        if (r.delayMs) setTimeout(send, r.delayMs);
        else send();
      };
      const refuse = (status: number, reason: string) => {
        refused.push({ reason, headers });
        answer({ status, reason });
      };
      const rawBody = Buffer.concat(chunks).toString('utf8');
      const path = String(headers[':path'] ?? '');
      const m = /^\/3\/device\/([^/?#]+)$/.exec(path);
      if (headers[':method'] !== 'POST') return refuse(405, 'MethodNotAllowed');
      if (!m) return refuse(404, 'BadPath');
      if (!headers['apns-topic']) return refuse(400, 'MissingTopic');
      const pushType = String(headers['apns-push-type'] ?? '');
      if (!['alert', 'background', 'voip', 'location', 'complication', 'fileprovider', 'mdm', 'liveactivity', 'pushtotalk'].includes(pushType)) {
        return refuse(400, 'InvalidPushType');
      }
      if (headers['apns-priority'] && !['5', '10', '1'].includes(String(headers['apns-priority']))) return refuse(400, 'BadPriority');
      let jwt: ApnsFakeRequest['jwt'];
      if (opts.publicKey) {
        const auth = String(headers.authorization ?? '');
        const t = /^bearer (\S+)$/.exec(auth)?.[1];
        if (!t) return refuse(403, 'MissingProviderToken');
        const [h, c, sig] = t.split('.');
        let header: Record<string, unknown>;
        let claims: { iss: string; iat: number };
        try {
          header = JSON.parse(Buffer.from(h ?? '', 'base64url').toString()) as Record<string, unknown>;
          claims = JSON.parse(Buffer.from(c ?? '', 'base64url').toString()) as { iss: string; iat: number };
        } catch {
          return refuse(403, 'InvalidProviderToken');
        }
        const signed = verify('sha256', Buffer.from(`${h}.${c}`), { key: opts.publicKey, dsaEncoding: 'ieee-p1363' }, Buffer.from(sig ?? '', 'base64url'));
        if (!signed || header.alg !== 'ES256' || header.kid !== opts.keyId || claims.iss !== opts.teamId || typeof claims.iat !== 'number') {
          return refuse(403, 'InvalidProviderToken');
        }
        const age = now() / 1000 - claims.iat;
        if (age > 3600) return refuse(403, 'ExpiredProviderToken');
        if (age < -60) return refuse(403, 'InvalidProviderToken');
        jwt = { header, claims, token: t };
      }
      const limit = pushType === 'voip' ? 5120 : 4096;
      if (Buffer.byteLength(rawBody) > limit) return refuse(413, 'PayloadTooLarge');
      let body: unknown;
      try {
        body = JSON.parse(rawBody);
      } catch {
        return refuse(400, rawBody === '' ? 'PayloadEmpty' : 'BadPayload');
      }
      const peer = (stream.session?.socket as TLSSocket | undefined)?.getPeerCertificate?.();
      const req: ApnsFakeRequest = {
        path,
        deviceToken: decodeURIComponent(m[1] as string),
        headers,
        rawBody,
        body,
        jwt,
        clientCn: peer && 'subject' in peer && peer.subject ? String(peer.subject.CN) : undefined,
        session: stream.session ? (ids.get(stream.session as ServerHttp2Session) ?? 0) : 0,
      };
      requests.push(req);
      answer(responder(req, requests.length));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    port,
    tls,
    requests,
    refused,
    respond(fn) {
      responder = fn ?? (() => ({ status: 200 }));
    },
    goaway() {
      for (const s of open) {
        s.goaway(h2.NGHTTP2_NO_ERROR);
        s.close();
      }
    },
    sessions: () => sessionCount,
    maxInFlight: () => maxInFlight,
    dial: (o) => Promise.resolve(tlsConnect({ ...o, host: '127.0.0.1', port, ca: tls.cert })),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of open) s.destroy();
        server.close(() => resolve());
      }),
  };
}
