// Push signatures (`signatures.publicKey`): proof that a push comes from the configured
// Mattermost server, checked before routing so a forged push reaches no sink.
//
// What the server signs (contract §2.4): `jwt.NewWithClaims(ES256, {ack_id, device_id})`
// signed with its AsymmetricSigningKey, i.e. header {"alg":"ES256","typ":"JWT"}, claims
// {"ack_id","device_id"} (the device id without its platform prefix, as in the push), and a raw
// 64-byte r‖s signature (RFC 7518 §3.4). The public half is the client config's
// AsymmetricSigningPublicKey: base64 DER SPKI of a P-256 key. Verified with node:crypto alone;
// the only algorithm accepted is ES256, so `alg: none` or an HMAC "signed" with the public key
// (RFC 8725 §2.1, §3.1) never passes.
//
// Unsigned by design (§2.2): `test` pushes (the "Send test notification" button and the app's
// /system/ping check) and session-expired pushes (`session`) carry `signature: ""` in every
// server version read. Refusing them would break both, so by default an unsigned push of those
// types passes (`allowUnsigned`, default [test, session]); a push that carries a signature is
// always checked, whatever its type. `allowUnsigned: []` refuses every unsigned push.
import { createPublicKey, verify, type KeyObject } from 'node:crypto';
import { Counter, type Registry } from 'prom-client';
import { z } from 'zod';
import type { PushNotification } from './contract.js';

/** `publicKey` as people paste it: base64 DER SPKI, possibly wrapped, or the same as PEM. */
function publicKeyOf(text: string): KeyObject {
  const b64 = text.replace(/-----(BEGIN|END) PUBLIC KEY-----/g, '').replace(/\s+/g, '');
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) throw new Error('not base64');
  const key = createPublicKey({ key: Buffer.from(b64, 'base64'), format: 'der', type: 'spki' });
  if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw new Error(`a ${key.asymmetricKeyType} key${key.asymmetricKeyDetails?.namedCurve ? ` on ${key.asymmetricKeyDetails.namedCurve}` : ''}, not an ECDSA P-256 key`);
  }
  return key;
}

export const SignaturesSchema = z.strictObject({
  /** The server's AsymmetricSigningPublicKey (System Console > client config, or GET /api/v4/config/client). */
  publicKey: z.string().superRefine((v, ctx) => {
    try {
      publicKeyOf(v);
    } catch (err) {
      ctx.addIssue({
        code: 'custom',
        message: `must be the server's AsymmetricSigningPublicKey, a base64 DER SPKI ECDSA P-256 public key (${(err as Error).message})`,
      });
    }
  }),
  /** Push types accepted without a signature: Mattermost never signs these (contract §2.2). */
  allowUnsigned: z.array(z.string().min(1)).default(['test', 'session']),
});
export type SignaturesConfig = z.output<typeof SignaturesSchema>;

/** Why a push was refused: a stable code (metric label) and the text Mattermost logs. */
type Refusal = { reason: 'missing' | 'malformed' | 'algorithm' | 'bad_signature' | 'claims_mismatch'; error: string };

/** Resolves with the reason a push's signature is refused, or undefined when it may go on. */
export type SignatureCheck = (n: PushNotification) => Promise<string | undefined>;

const B64URL = /^[A-Za-z0-9_-]+$/;
/** A JWT over two ids is ~400 characters; anything near this is not one. */
const MAX_TOKEN_LENGTH = 8192;
/** 64 bytes of r‖s in unpadded base64url (RFC 7518 §3.4). */
const ES256_SIGNATURE_CHARS = 86;

const malformed = (why: string): Refusal => ({ reason: 'malformed', error: `signature is not an ES256 JWT: ${why}` });

function jsonObject(part: string): Record<string, unknown> | undefined {
  try {
    const v = JSON.parse(Buffer.from(part, 'base64url').toString('utf8')) as unknown;
    return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Checks one token against the push it came with; resolves undefined when it verifies. The
 * shape, algorithm and claims are checked at once; the ECDSA verification (~90 µs of CPU) runs
 * on libuv's thread pool (crypto.verify with a callback), so it does not hold up the event loop
 * and uses the machine's other cores.
 */
export function checkToken(key: KeyObject, token: string, n: Pick<PushNotification, 'ack_id' | 'device_id'>): Promise<Refusal | undefined> {
  const refused = checkShape(token, n);
  if (refused) return Promise.resolve(refused);
  const end = token.lastIndexOf('.');
  return new Promise((resolve) =>
    verify('sha256', Buffer.from(token.slice(0, end), 'ascii'), { key, dsaEncoding: 'ieee-p1363' }, Buffer.from(token.slice(end + 1), 'base64url'), (err, ok) =>
      resolve(err || !ok ? BAD_SIGNATURE : undefined),
    ),
  );
}

const BAD_SIGNATURE: Refusal = { reason: 'bad_signature', error: 'signature does not verify with signatures.publicKey: not signed by the configured server' };

function checkShape(token: string, n: Pick<PushNotification, 'ack_id' | 'device_id'>): Refusal | undefined {
  if (token.length > MAX_TOKEN_LENGTH) return malformed(`longer than ${MAX_TOKEN_LENGTH} characters`);
  const parts = token.split('.');
  if (parts.length !== 3) return malformed(`expected 3 dot-separated parts, got ${parts.length}`);
  const [h, p, s] = parts as [string, string, string];
  if (!B64URL.test(h) || !B64URL.test(p)) return malformed('header and claims must be base64url');
  const header = jsonObject(h);
  if (!header) return malformed('the header is not a JSON object');
  if (header.alg !== 'ES256') {
    return { reason: 'algorithm', error: `signature algorithm ${JSON.stringify(header.alg ?? null)} refused: only ES256 is accepted (contract §2.4)` };
  }
  // RFC 7515 §4.1.11: a critical extension we do not implement makes the token invalid.
  if (header.crit !== undefined) return malformed('the header lists critical extensions ("crit")');
  if (s.length !== ES256_SIGNATURE_CHARS || !B64URL.test(s)) return malformed('the signature part is not 64 bytes of base64url');
  const claims = jsonObject(p);
  if (!claims) return malformed('the claims are not a JSON object');
  // The token covers only these two ids (§2.4): a push whose ids differ reuses another push's
  // signature. Compared before the (costly) verification.
  if (claims.ack_id !== n.ack_id) return { reason: 'claims_mismatch', error: "signature was made for another push: its ack_id claim differs from the push's ack_id" };
  if (claims.device_id !== n.device_id) {
    return { reason: 'claims_mismatch', error: "signature was made for another device: its device_id claim differs from the push's device_id" };
  }
  return undefined;
}

/** The check `server.ts` runs on each parsed push; without `signatures` in the config, none. */
export function createSignatureCheck(config: SignaturesConfig | undefined, registry?: Registry): SignatureCheck | undefined {
  if (!config) return undefined;
  const key = publicKeyOf(config.publicKey);
  const unsigned = new Set(config.allowUnsigned);
  const counter = registry
    ? ((registry.getSingleMetric('push_relay_signatures_total') as Counter<'result' | 'reason'> | undefined) ??
      new Counter({
        name: 'push_relay_signatures_total',
        help: 'Push signatures checked (signatures.publicKey), by result (verified, unsigned, refused) and refusal reason.',
        labelNames: ['result', 'reason'],
        registers: [registry],
      }))
    : undefined;
  counter?.labels('verified', '').inc(0);
  counter?.labels('unsigned', '').inc(0);
  for (const r of ['missing', 'malformed', 'algorithm', 'bad_signature', 'claims_mismatch']) counter?.labels('refused', r).inc(0);

  const ACCEPTED = Promise.resolve(undefined);
  return (n) => {
    if (n.signature === '') {
      if (unsigned.has(n.type ?? '')) {
        counter?.labels('unsigned', '').inc();
        return ACCEPTED;
      }
      counter?.labels('refused', 'missing').inc();
      const allowed = config.allowUnsigned.length ? ` (only ${config.allowUnsigned.join(', ')} pushes may be unsigned)` : '';
      return Promise.resolve(`unsigned push refused: signatures.publicKey is set, so a ${n.type || 'push without a type'} push must be signed${allowed}`);
    }
    return checkToken(key, n.signature, n).then((refused) => {
      counter?.labels(refused ? 'refused' : 'verified', refused?.reason ?? '').inc();
      return refused?.error;
    });
  };
}
