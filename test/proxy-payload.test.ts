// What the official push proxy would send to FCM and APNs for each sample payload, checked
// against golden files (test/fixtures/golden/{fcm,apns}: reviewed by hand against contract §5.5
// and PP's builders), and PP's truncation without its split characters (§5.2).
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { PushNotificationSchema, type PushNotification } from '../src/contract.js';
import { apnsRequest, fcmMessage, truncateForProxy, truncateUtf8 } from '../sinks/proxy-payload.js';
import { loadPayloads, REPO_ROOT } from './helpers/payloads.js';

const GOLDEN = join(REPO_ROOT, 'test', 'fixtures', 'golden');
const TOPIC = 'com.example.mattermost';
const notification = (raw: Record<string, unknown>): PushNotification => PushNotificationSchema.parse(raw);
const golden = (kind: 'fcm' | 'apns', name: string) => JSON.parse(readFileSync(join(GOLDEN, kind, name), 'utf8')) as Record<string, unknown>;
const bytes = (s: string) => Buffer.byteLength(s, 'utf8');

describe('truncateUtf8', () => {
  it('keeps a string that fits, whatever its characters', () => {
    expect(truncateUtf8('héllo 👋', 64)).toBe('héllo 👋');
  });

  it('never splits a two-, three- or four-byte character at the limit', () => {
    expect(truncateUtf8('a'.repeat(63) + 'é', 64)).toBe('a'.repeat(63));
    expect(truncateUtf8('a'.repeat(62) + '€', 64)).toBe('a'.repeat(62));
    expect(truncateUtf8('a'.repeat(61) + '👋', 64)).toBe('a'.repeat(61));
    expect(truncateUtf8('a'.repeat(60) + '👋', 64)).toBe('a'.repeat(60) + '👋');
  });

  it('returns the longest whole-character prefix within the limit, for any string', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 300 }), fc.integer({ min: 0, max: 400 }), (s, max) => {
        const t = truncateUtf8(s, max);
        expect(s.startsWith(t)).toBe(true);
        expect(bytes(t)).toBeLessThanOrEqual(max);
        if (t.length < s.length) {
          // one more character (a whole surrogate pair when there is one) would not fit
          const next = s.codePointAt(t.length) as number;
          expect(bytes(t) + bytes(String.fromCodePoint(next >= 0xd800 && next <= 0xdfff ? 0xfffd : next))).toBeGreaterThan(max);
        }
        // no lone high surrogate left at the end when the string had a pair there
        if (t.length > 0 && t.length < s.length) {
          const last = t.charCodeAt(t.length - 1);
          const after = s.charCodeAt(t.length);
          expect(last >= 0xd800 && last <= 0xdbff && after >= 0xdc00 && after <= 0xdfff).toBe(false);
        }
      }),
      { numRuns: 500 },
    );
  });
});

describe('truncateForProxy (contract §5.2)', () => {
  const base = loadPayloads()[0]!.json;
  it('leaves a message of 2047 bytes as it is and cuts one of 2048 to 2046', () => {
    expect(truncateForProxy(notification({ ...base, message: 'x'.repeat(2047) })).message).toHaveLength(2047);
    expect(truncateForProxy(notification({ ...base, message: 'x'.repeat(2048) })).message).toHaveLength(2046);
  });

  it('cuts a long message of multi-byte text at a character boundary', () => {
    const message = 'ü'.repeat(1500); // 3000 bytes
    const cut = truncateForProxy(notification({ ...base, message })).message;
    expect(bytes(cut)).toBe(2046);
    expect(cut).toBe('ü'.repeat(1023));
  });

  it('cuts a channel name over 64 bytes to 64, or less to keep its last character whole', () => {
    expect(truncateForProxy(notification({ ...base, channel_name: 'c'.repeat(65) })).channelName).toBe('c'.repeat(64));
    expect(truncateForProxy(notification({ ...base, channel_name: 'c'.repeat(62) + '日本' })).channelName).toBe('c'.repeat(62));
  });

  it('sends the truncated text to both providers', () => {
    const n = notification({ ...base, message: '😀'.repeat(600), channel_name: 'é'.repeat(40) });
    expect(bytes(fcmMessage(n).data.message as string)).toBe(2044);
    expect(fcmMessage(n).data.channel_name).toBe('é'.repeat(32));
    const aps = (JSON.parse(apnsRequest(n, TOPIC).body) as { aps: { alert: { title: string; body: string } } }).aps;
    expect(aps.alert.title).toBe('é'.repeat(32));
    expect(bytes(aps.alert.body)).toBe(2044);
  });
});

describe('fcmMessage: the data message PP sends (contract §5.5)', () => {
  for (const p of loadPayloads()) {
    it(`${p.name}: matches the reviewed golden request`, () => {
      expect({ message: fcmMessage(notification(p.json)) }).toEqual(golden('fcm', p.name));
    });
  }

  it('gives every value as a string', () => {
    for (const p of loadPayloads()) for (const v of Object.values(fcmMessage(notification(p.json)).data)) expect(typeof v).toBe('string');
  });
});

describe('apnsRequest: the APNs request PP sends (contract §5.5)', () => {
  for (const p of loadPayloads()) {
    it(`${p.name}: matches the reviewed golden topic, push type and body`, () => {
      const want = golden('apns', p.name) as { headers: Record<string, string>; body: unknown };
      const got = apnsRequest(notification(p.json), TOPIC);
      expect(got.topic).toBe(want.headers['apns-topic']);
      expect(got.pushType).toBe(want.headers['apns-push-type']);
      expect(JSON.parse(got.body)).toEqual(want.body);
    });
  }

  it('writes the keys in the order Go does: aps in struct order, the rest sorted', () => {
    const body = apnsRequest(notification(loadPayloads()[4]!.json), TOPIC).body;
    expect(body.startsWith('{"ack_id":"7tm1t4yaokqq6wbup7p5938moe","aps":{"alert":{"body":"@bob: LGTM, merging now","title":"Reply in Release Planning"},"badge":6,"category":"CAN_REPLY","content-available":1,"mutable-content":1,"sound":"default","thread-id":"bdutphekfaxdy3ott5g3z87khe"},"channel_id":')).toBe(true);
  });

  it('gives a clear with badge 0 from app version 2 badge 1, and from version 1 badge 0 (PP quirk)', () => {
    const clear = loadPayloads().find((p) => p.name.startsWith('08'))!.json;
    const badgeOf = (platform: string) => (JSON.parse(apnsRequest(notification({ ...clear, platform, badge: 0 }), TOPIC).body) as { aps: { badge: number } }).aps.badge;
    expect(badgeOf('apple_rn-v2')).toBe(1);
    expect(badgeOf('apple_rn')).toBe(0);
  });

  it('uses the channel id as thread-id unless collapsed threads are on and the push has a root', () => {
    const reply = loadPayloads().find((p) => p.name.startsWith('05'))!.json;
    const threadOf = (crt: boolean) => (JSON.parse(apnsRequest(notification({ ...reply, is_crt_enabled: crt }), TOPIC).body) as { aps: Record<string, string> }).aps['thread-id'];
    expect(threadOf(true)).toBe(reply.root_id);
    expect(threadOf(false)).toBe(reply.channel_id);
  });
});
