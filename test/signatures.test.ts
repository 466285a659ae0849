// Push signatures (signatures.publicKey, contract §2.4): through a running relay with two real
// sinks, an MQTT copy (embedded broker, a real subscriber) and an upstream proxy stand-in.
// A push that verifies reaches both; one that does not gets FAIL naming why and reaches neither.
import { generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, parseConfig } from '../src/config.js';
import { post } from './helpers/http.js';
import { subscribe, type Subscriber } from './helpers/mqtt.js';
import { loadPayloads, PAYLOAD_DIR, payload } from './helpers/payloads.js';
import { freePort } from './helpers/ports.js';
import { startTestRelay } from './helpers/relay.js';
import { startUpstream, type FakeUpstream } from './helpers/upstream.js';
import { sleep } from './helpers/wait.js';

const PUBLIC_KEY = readFileSync(join(PAYLOAD_DIR, 'signing-public-key.txt'), 'utf8').trim();
const SEND = '/api/v1/send_push';

const b64url = (v: unknown) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
/** An ES256 JWT as the server makes it (§2.4), with `key`. */
function jwt(key: KeyObject, claims: Record<string, unknown>, header: Record<string, unknown> = { alg: 'ES256', typ: 'JWT' }): string {
  const input = `${b64url(header)}.${b64url(claims)}`;
  return `${input}.${sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' }).toString('base64url')}`;
}

/** Sample 01 (signed) with fields replaced; the signature stays unless replaced too. */
const signed = payload('01');
const withFields = (fields: Record<string, unknown>) => JSON.stringify({ ...signed.json, ...fields });

type Relay = Awaited<ReturnType<typeof startTestRelay>>;
let relay: Relay;
let upstream: FakeUpstream;
let sub: Subscriber;
let strictRelay: Relay;

beforeAll(async () => {
  upstream = await startUpstream();
  const autoPort = await freePort();
  const sinks = {
    copy: { type: 'mqtt', autoPort, format: 'json', topic: 'mm/{type}' },
    official: { type: 'upstream', url: upstream.url },
  };
  relay = await startTestRelay({ signatures: { publicKey: PUBLIC_KEY }, sinks });
  strictRelay = await startTestRelay({ signatures: { publicKey: PUBLIC_KEY, allowUnsigned: [] }, sinks });
  sub = await subscribe(`mqtt://127.0.0.1:${autoPort}`, 'mm/#');
});
afterAll(async () => {
  await sub?.close();
  await strictRelay?.stop();
  await relay?.stop();
  await upstream?.close();
});

let barriers = 0;
/**
 * Posts `body` and returns the reply with what both sinks received meanwhile. Without an outbox
 * the reply comes after the sinks are done, so the upstream has what it will get; for MQTT a
 * marked test push posted next is the barrier: once the subscriber has it, anything the first
 * push published has arrived too (one client, one broker, in order).
 */
async function postAndObserve(body: string, to: Relay = relay) {
  const mqttBefore = sub.messages.length;
  const upstreamBefore = upstream.requests.length;
  const reply = await post(`${to.url}${SEND}`, body);
  const marker = `barrier-${++barriers}`;
  if (to === relay) {
    const barrier = JSON.stringify({ ...payload('11').json, barrier: marker });
    expect((await post(`${relay.url}${SEND}`, barrier)).json).toEqual({ status: 'OK' });
    await sub.waitFor(mqttBefore + 1);
    for (let i = 0; i < 100 && !sub.messages.slice(mqttBefore).some((m) => m.payload.includes(marker)); i++) await sleep(20);
  } else {
    await sleep(300);
  }
  const isBarrier = (text: string) => text.includes(marker);
  return {
    reply: reply.json as { status: string; error?: string },
    mqtt: sub.messages
      .slice(mqttBefore)
      .map((m) => m.payload.toString('utf8'))
      .filter((t) => !isBarrier(t))
      .map((t) => JSON.parse(t) as { ack_id: string }),
    upstream: upstream.requests
      .slice(upstreamBefore)
      .map((r) => r.body.toString('utf8'))
      .filter((t) => !isBarrier(t)),
  };
}

describe('signatures: pushes that verify', () => {
  const samples = loadPayloads().filter((p) => p.json.signature);

  it('has ten signed samples to check', () => expect(samples).toHaveLength(10));

  for (const p of samples) {
    it(`accepts ${p.name} (signed by the sample key) and delivers it to every sink`, async () => {
      const seen = await postAndObserve(p.text);
      expect(seen.reply).toEqual({ status: 'OK' });
      expect(seen.mqtt.map((m) => m.ack_id)).toEqual([p.json.ack_id]);
      expect(seen.upstream).toEqual([p.text]);
    });
  }

  it('accepts an unsigned test push (Mattermost never signs them, §2.2) by default', async () => {
    const seen = await postAndObserve(payload('11').text);
    expect(seen.reply).toEqual({ status: 'OK' });
    expect(seen.upstream).toEqual([payload('11').text]);
  });

  it('accepts an unsigned session-expired push by default', async () => {
    const seen = await postAndObserve(payload('10').text);
    expect(seen.reply).toEqual({ status: 'OK' });
    expect(seen.upstream).toEqual([payload('10').text]);
  });
});

describe('signatures: pushes that do not verify get FAIL and reach no sink', () => {
  const other = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  const claims = { ack_id: signed.json.ack_id, device_id: signed.json.device_id };
  const [h, c] = (signed.json.signature as string).split('.') as [string, string];

  const cases: Array<[string, string, RegExp]> = [
    ['a tampered ack_id (the signature of another push)', withFields({ ack_id: 'tamperedack000000000000000' }), /ack_id claim differs/],
    ['a tampered device_id (the signature made for another phone)', withFields({ device_id: 'attacker-token:APA91b' }), /device_id claim differs/],
    ['a signature by another key', withFields({ signature: jwt(other, claims) }), /does not verify with signatures\.publicKey/],
    ['alg: none', withFields({ signature: `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url(claims)}.` }), /algorithm "none" refused: only ES256/],
    [
      'HS256 "signed" with the public key as the secret',
      withFields({ signature: `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}.${b64url('x'.repeat(32))}` }),
      /algorithm "HS256" refused/,
    ],
    ['a token that is not a JWT', withFields({ signature: 'not-a-jwt' }), /not an ES256 JWT: expected 3 dot-separated parts, got 1/],
    ['a token with a header that is not JSON', withFields({ signature: `${b64url('{oops')}.${c}.${'A'.repeat(86)}` }), /header is not a JSON object/],
    ['a signature part of the wrong length', withFields({ signature: `${h}.${c}.${'A'.repeat(40)}` }), /not 64 bytes of base64url/],
    ['a signature with one bit flipped', withFields({ signature: flipLastChar(signed.json.signature as string) }), /does not verify/],
    ['an unsigned message push', withFields({ signature: '' }), /unsigned push refused: .* a message push must be signed \(only test, session pushes may be unsigned\)/],
    ['an unsigned push without a signature field at all', withFields({ signature: undefined }), /unsigned push refused/],
    [
      'a test push with a bad signature (carrying one, it is checked)',
      JSON.stringify({ ...payload('11').json, signature: jwt(other, { ack_id: '', device_id: payload('11').json.device_id }) }),
      /does not verify/,
    ],
  ];
  for (const [name, body, error] of cases) {
    it(`refuses ${name}`, async () => {
      const seen = await postAndObserve(body);
      expect(seen.reply.status).toBe('FAIL');
      expect(seen.reply.error).toMatch(error);
      expect(seen.mqtt).toEqual([]);
      expect(seen.upstream).toEqual([]);
    });
  }

  it('refuses an unsigned test push when allowUnsigned is empty', async () => {
    const seen = await postAndObserve(payload('11').text, strictRelay);
    expect(seen.reply).toEqual({ status: 'FAIL', error: expect.stringMatching(/unsigned push refused: .* a test push must be signed$/) });
    expect(seen.upstream).toEqual([]);
  });

  it('counts what it checked, by result and reason', async () => {
    const text = await (await relay.app.request('/metrics')).text();
    expect(text).toMatch(/push_relay_signatures_total\{result="refused",reason="claims_mismatch"\} [1-9]/);
    expect(text).toMatch(/push_relay_signatures_total\{result="refused",reason="algorithm"\} [1-9]/);
    expect(text).toMatch(/push_relay_signatures_total\{result="verified",reason=""\} [1-9]/);
  });
});

describe('signatures.publicKey in the config', () => {
  const problems = (publicKey: string) => {
    try {
      parseConfig({ signatures: { publicKey }, sinks: { l: { type: 'log' } } }, {});
    } catch (err) {
      if (err instanceof ConfigError) return err.problems.join('\n');
      throw err;
    }
    return '';
  };
  const spki = (key: KeyObject) => key.export({ format: 'der', type: 'spki' }).toString('base64');

  it('accepts the server’s key, also wrapped over lines or as PEM', () => {
    expect(problems(PUBLIC_KEY)).toBe('');
    expect(problems(PUBLIC_KEY.replace(/(.{40})/g, '$1\n'))).toBe('');
    expect(problems(`-----BEGIN PUBLIC KEY-----\n${PUBLIC_KEY}\n-----END PUBLIC KEY-----\n`)).toBe('');
  });
  it('stops start-up naming the key when it is not base64 DER', () => {
    expect(problems('hello world!')).toMatch(/^signatures\.publicKey: must be the server's AsymmetricSigningPublicKey/);
    expect(problems('aGVsbG8=')).toMatch(/^signatures\.publicKey: /);
  });
  it('stops start-up for a P-384 key', () => {
    expect(problems(spki(generateKeyPairSync('ec', { namedCurve: 'P-384' }).publicKey))).toMatch(/signatures\.publicKey: .*secp384r1, not an ECDSA P-256 key/);
  });
  it('stops start-up for an RSA key', () => {
    expect(problems(spki(generateKeyPairSync('rsa', { modulusLength: 1024 }).publicKey))).toMatch(/signatures\.publicKey: .*rsa key, not an ECDSA P-256 key/);
  });
  it('names an unknown key under signatures', () => {
    expect(() => parseConfig({ signatures: { publicKey: PUBLIC_KEY, algorithm: 'ES256' }, sinks: { l: { type: 'log' } } }, {})).toThrow(
      /signatures\.algorithm: unknown key/,
    );
  });
});

function flipLastChar(token: string): string {
  const last = token.at(-2) === 'A' ? 'B' : 'A'; // the second-to-last char carries full bits
  return `${token.slice(0, -2)}${last}${token.at(-1)}`;
}
