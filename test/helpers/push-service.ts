// A local push service (RFC 8030) for the Web Push sink: it plays the browser's side too.
//
// `subscribe()` makes what a browser makes (an ECDH P-256 key pair and a 16-byte auth secret,
// W3C Push API) and an endpoint on this server. Each push that arrives is checked the way a
// push service and the browser would: the VAPID JWT (RFC 8292: ES256 over the endpoint's
// origin, exp within 24 h, a sub) against the expected public key, the TTL and Urgency headers
// (RFC 8030 §5.2, §5.3), and the body decrypted here with node:crypto (RFC 8291 + RFC 8188
// aes128gcm), not with the web-push library under test. What was wrong lands in `problems`;
// each test asserts it is empty.
//
// Each subscription answers 201 unless a test plans other answers (404, 410, 429 +
// Retry-After, 413, 500 ...), taken in order.
import { createECDH, createDecipheriv, createHmac, createPublicKey, randomBytes, verify, type ECDH } from 'node:crypto';
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { afterAll } from 'vitest';
import type { WebPushSubscription } from '../../src/devices.js';
import { until } from './wait.js';

export type Answer = { status: number; headers?: Record<string, string>; body?: string; delayMs?: number };

export type ReceivedPush = {
  subscription: string;
  headers: IncomingMessage['headers'];
  /** Size of the encrypted body, as the push service counts it. */
  bodyBytes: number;
  /** The decrypted payload (UTF-8), or undefined when it did not decrypt. */
  plaintext?: string;
  jwt?: { header: Record<string, unknown>; claims: Record<string, unknown> };
  answered: number;
  at: number;
};

export type TestSubscription = {
  id: string;
  /** What the browser's `subscription.toJSON()` gives. */
  json: WebPushSubscription;
  /** Answers for the next pushes to this subscription, in order; 201 once they run out. */
  plan(...answers: Answer[]): void;
};

export type PushService = {
  origin: string;
  subscribe(opts?: { path?: string }): TestSubscription;
  received: ReceivedPush[];
  /** Requests that broke a rule (bad JWT, bad encryption, missing header): empty in a passing test. */
  problems: string[];
  waitFor(count: number, filter?: (p: ReceivedPush) => boolean, timeoutMs?: number): Promise<ReceivedPush[]>;
  close(): Promise<void>;
};

const URGENCIES = new Set(['very-low', 'low', 'normal', 'high']);

export async function startPushService(opts: { vapidPublicKey: string; tls?: { key: string; cert: string } }): Promise<PushService> {
  const subs = new Map<string, { ecdh: ECDH; publicKey: Buffer; auth: Buffer; answers: Answer[] }>();
  const received: ReceivedPush[] = [];
  const problems: string[] = [];
  const handler = (req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const id = /^\/push\/([^/?]+)/.exec(req.url ?? '')?.[1] ?? '';
      const sub = subs.get(id);
      const answer = (a: Answer) => {
        const reply = () => {
          res.writeHead(a.status, a.headers ?? {});
          res.end(a.body ?? '');
        };
        if (a.delayMs) setTimeout(reply, a.delayMs).unref();
        else reply();
      };
      if (req.method !== 'POST' || !sub) {
        problems.push(`${req.method} ${req.url}: no such subscription`);
        return answer({ status: 404 });
      }
      const push: ReceivedPush = { subscription: id, headers: req.headers, bodyBytes: body.length, answered: 0, at: Date.now() };
      const complain = (what: string) => problems.push(`push to ${id}: ${what}`);
      push.jwt = checkVapid(req.headers.authorization, origin, opts.vapidPublicKey, complain);
      if (!/^\d+$/.test(String(req.headers.ttl ?? ''))) complain(`TTL header missing or not a number: ${req.headers.ttl}`);
      if (req.headers.urgency !== undefined && !URGENCIES.has(String(req.headers.urgency))) complain(`bad Urgency ${req.headers.urgency}`);
      if (req.headers['content-encoding'] !== 'aes128gcm') complain(`Content-Encoding ${req.headers['content-encoding']}, not aes128gcm`);
      try {
        push.plaintext = decrypt(body, sub.ecdh, sub.publicKey, sub.auth);
      } catch (err) {
        complain(`cannot decrypt: ${(err as Error).message}`);
      }
      const a = sub.answers.shift() ?? { status: 201 };
      push.answered = a.status;
      received.push(push);
      answer(a);
    });
  };
  const server: Server = opts.tls ? createHttpsServer({ key: opts.tls.key, cert: opts.tls.cert }, handler) : createHttpServer(handler);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const origin = `${opts.tls ? 'https' : 'http'}://127.0.0.1:${(server.address() as AddressInfo).port}`;

  const service: PushService = {
    origin,
    received,
    problems,
    subscribe({ path } = {}) {
      const ecdh = createECDH('prime256v1');
      const publicKey = ecdh.generateKeys();
      const auth = randomBytes(16);
      const id = randomBytes(12).toString('base64url');
      const entry = { ecdh, publicKey, auth, answers: [] as Answer[] };
      subs.set(id, entry);
      return {
        id,
        json: {
          endpoint: `${path ?? origin}/push/${id}`,
          expirationTime: null,
          keys: { p256dh: publicKey.toString('base64url'), auth: auth.toString('base64url') },
        },
        plan: (...answers) => entry.answers.push(...answers),
      };
    },
    async waitFor(count, filter = () => true, timeoutMs = 10_000) {
      await until(`${count} push(es) at the push service`, () => received.filter(filter).length >= count, { timeoutMs, intervalMs: 20 });
      return received.filter(filter);
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
  services.add(service);
  return service;
}

const services = new Set<PushService>();
afterAll(async () => {
  await Promise.all([...services].map((s) => s.close()));
  services.clear();
});

/** RFC 8292 §3: `Authorization: vapid t=<JWT>, k=<public key>`; the JWT is ES256 (RFC 7518 §3.4). */
function checkVapid(
  header: string | undefined,
  origin: string,
  expectedKey: string,
  complain: (what: string) => void,
): ReceivedPush['jwt'] {
  const m = /^vapid t=([^,\s]+),\s*k=([A-Za-z0-9_-]+)$/.exec(header ?? '');
  if (!m) {
    complain(`Authorization is not "vapid t=..., k=...": ${header}`);
    return undefined;
  }
  const [, token, k] = m as unknown as [string, string, string];
  if (k !== expectedKey) complain('VAPID k is not the configured public key');
  const parts = token.split('.');
  if (parts.length !== 3) {
    complain('VAPID JWT has not three parts');
    return undefined;
  }
  const [h, c, s] = parts as [string, string, string];
  const point = Buffer.from(k, 'base64url');
  const key = createPublicKey({
    key: { kty: 'EC', crv: 'P-256', x: point.subarray(1, 33).toString('base64url'), y: point.subarray(33, 65).toString('base64url') },
    format: 'jwk',
  });
  if (!verify('sha256', Buffer.from(`${h}.${c}`), { key, dsaEncoding: 'ieee-p1363' }, Buffer.from(s, 'base64url'))) {
    complain('VAPID JWT signature does not verify');
  }
  const jwtHeader = JSON.parse(Buffer.from(h, 'base64url').toString('utf8')) as Record<string, unknown>;
  const claims = JSON.parse(Buffer.from(c, 'base64url').toString('utf8')) as Record<string, unknown>;
  if (jwtHeader.alg !== 'ES256') complain(`VAPID JWT alg ${String(jwtHeader.alg)}`);
  if (claims.aud !== origin) complain(`VAPID aud ${String(claims.aud)}, expected ${origin}`);
  const now = Date.now() / 1000;
  if (typeof claims.exp !== 'number' || claims.exp <= now || claims.exp > now + 24 * 3600) complain(`VAPID exp ${String(claims.exp)} not within 24 h`);
  if (typeof claims.sub !== 'string' || !/^(mailto:|https:)/.test(claims.sub)) complain(`VAPID sub ${String(claims.sub)}`);
  return { header: jwtHeader, claims };
}

const hmac = (key: Buffer, data: Buffer) => createHmac('sha256', key).update(data).digest();

/** RFC 8291 §3.4 key derivation, then RFC 8188 §2 records (the receiver's side). */
function decrypt(body: Buffer, ua: ECDH, uaPublic: Buffer, auth: Buffer): string {
  if (body.length < 21) throw new Error(`body of ${body.length} bytes has no aes128gcm header`);
  const salt = body.subarray(0, 16);
  const rs = body.readUInt32BE(16);
  const idlen = body[20] as number;
  if (idlen !== 65) throw new Error(`keyid of ${idlen} bytes, RFC 8291 §4 wants the 65-byte sender key`);
  const asPublic = body.subarray(21, 21 + idlen);
  const prkKey = hmac(auth, ua.computeSecret(asPublic));
  const ikm = hmac(prkKey, Buffer.concat([Buffer.from('WebPush: info\0'), uaPublic, asPublic, Buffer.from([1])]));
  const prk = hmac(salt, ikm);
  const cek = hmac(prk, Buffer.from('Content-Encoding: aes128gcm\0\x01', 'binary')).subarray(0, 16);
  const nonce0 = hmac(prk, Buffer.from('Content-Encoding: nonce\0\x01', 'binary')).subarray(0, 12);
  const records = body.subarray(21 + idlen);
  const out: Buffer[] = [];
  let seq = 0;
  for (let off = 0; off < records.length; off += rs, seq++) {
    if (seq > 1000) throw new Error('more than 1000 records');
    const record = records.subarray(off, Math.min(off + rs, records.length));
    const nonce = Buffer.from(nonce0);
    nonce.writeUInt32BE((nonce.readUInt32BE(8) ^ seq) >>> 0, 8);
    const decipher = createDecipheriv('aes-128-gcm', cek, nonce);
    decipher.setAuthTag(record.subarray(record.length - 16));
    const plain = Buffer.concat([decipher.update(record.subarray(0, record.length - 16)), decipher.final()]);
    let end = plain.length - 1;
    while (end >= 0 && plain[end] === 0) end--;
    const last = off + rs >= records.length;
    if (plain[end] !== (last ? 2 : 1)) throw new Error(`record ${seq}: padding delimiter ${plain[end]}, expected ${last ? 2 : 1}`);
    out.push(plain.subarray(0, end));
  }
  return new TextDecoder('utf-8', { fatal: true }).decode(Buffer.concat(out));
}
