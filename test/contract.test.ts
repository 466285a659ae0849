// Mattermost's wire types (contract §2, §3): lenient where Go's decoder is lenient, strict on
// the fields the relay cannot route without, and error texts that name the field, because
// they end up in Mattermost's log.
import { describe, expect, it } from 'vitest';
import {
  FAST_FIELD_NAMES,
  fastNotification,
  hasText,
  parseBody,
  parsePlatform,
  PushAckSchema,
  PushNotificationSchema,
  type PushNotification,
} from '../src/contract.js';
import { compileTemplate, mqttTopicLevel } from '../src/template.js';
import { loadPayloads, messagePush } from './helpers/payloads.js';

// As the relay parses: the hot-path check first, zod for everything it does not plainly accept.
const parse = (body: unknown) => parseBody(PushNotificationSchema, typeof body === 'string' ? body : JSON.stringify(body), fastNotification);

function ok(body: unknown): PushNotification {
  const r = parse(body);
  if (!r.ok) throw new Error(`expected the payload to be accepted, got: ${r.error}`);
  return r.value;
}

function error(body: unknown): string {
  const r = parse(body);
  if (r.ok) throw new Error(`expected the payload to be rejected, it was accepted: ${JSON.stringify(r.value)}`);
  return r.error;
}

describe('parsePlatform', () => {
  it('splits android_rn-v2 into android_rn and app version 2', () => {
    expect(parsePlatform('android_rn-v2')).toEqual({ base: 'android_rn', appVersion: 2 });
  });
  it('reads apple_rn without a -vN suffix as app version 1', () => {
    expect(parsePlatform('apple_rn')).toEqual({ base: 'apple_rn', appVersion: 1 });
  });
  it('splits apple_rnbeta-v2 into apple_rnbeta and 2', () => {
    expect(parsePlatform('apple_rnbeta-v2')).toEqual({ base: 'apple_rnbeta', appVersion: 2 });
  });
  it('keeps legacy platforms such as android unchanged', () => {
    expect(parsePlatform('android')).toEqual({ base: 'android', appVersion: 1 });
  });
  it('reads a multi-digit version marker such as android_rn-v1000', () => {
    expect(parsePlatform('android_rn-v1000')).toEqual({ base: 'android_rn', appVersion: 1000 });
  });
});

describe('the send_push payload schema', () => {
  it.each(loadPayloads().map((p) => [p.name, p] as const))('accepts sample %s as Mattermost sends it', (_name, p) => {
    const n = ok(p.text);
    expect(n.device_id).toBe(p.json.device_id);
    expect(n.platform).toBe(p.json.platform);
    expect(n.message).toBe(p.json.message);
  });

  it('counts an empty message as no text (nothing for a message-format sink to publish)', () => {
    expect(hasText(ok(messagePush({ message: '' })))).toBe(false);
    expect(hasText(ok(messagePush({ message: ' ' })))).toBe(true);
  });

  it('keeps the FCM token colon inside device_id', () => {
    expect(ok(messagePush()).device_id).toContain(':APA91b');
  });

  it('passes unknown fields through untouched (the server keeps adding them)', () => {
    const n = ok(messagePush({ future_field: { nested: [1, 2] }, another: 'x' }));
    expect((n as Record<string, unknown>).future_field).toEqual({ nested: [1, 2] });
    expect((n as Record<string, unknown>).another).toBe('x');
  });

  it('treats null on an optional field as absent, like Go', () => {
    const n = ok(messagePush({ message: null, badge: null, channel_name: null, type: null }));
    expect(n.message).toBeUndefined();
    expect(n.badge).toBeUndefined();
    expect(n.channel_name).toBeUndefined();
    expect(n.type).toBeUndefined();
    expect(hasText(n)).toBe(false);
  });

  it('decodes missing or null always-sent fields to Go zero values', () => {
    const n = ok({ platform: 'apple_rn-v2', server_id: 's', device_id: 'd', ack_id: null, is_crt_enabled: null });
    expect(n.ack_id).toBe('');
    expect(n.post_id).toBe('');
    expect(n.signature).toBe('');
    expect(n.is_crt_enabled).toBe(false);
    expect(n.is_id_loaded).toBe(false);
  });

  for (const field of ['platform', 'server_id', 'device_id'] as const) {
    it(`answers an error naming ${field} when it is empty`, () => {
      expect(error(messagePush({ [field]: '' }))).toBe(`${field} must not be empty`);
    });
    it(`answers an error naming ${field} when it is missing`, () => {
      expect(error(messagePush({ [field]: undefined }))).toBe(`${field} is required`);
    });
    it(`answers an error naming ${field} when it is null`, () => {
      expect(error(messagePush({ [field]: null }))).toMatch(new RegExp(`^${field} `));
    });
    it(`answers an error naming ${field} when it is not a string`, () => {
      expect(error(messagePush({ [field]: 5 }))).toBe(`${field} must be a string, got number`);
    });
  }

  it('rejects a badge sent as a string, naming badge', () => {
    expect(error(messagePush({ badge: '3' }))).toBe('badge must be a number, got string');
  });

  it('rejects a fractional badge: Go decodes badge into an int', () => {
    expect(error(messagePush({ badge: 2.5 }))).toMatch(/^badge .*integer/);
  });

  it('rejects a badge too large for a number (1e400) with an error that says so', () => {
    const text = JSON.stringify(messagePush()).replace('"badge":3', '"badge":1e400');
    expect(error(text)).toBe('badge must be a number, got a number out of range');
  });

  it('accepts badge -1 (the test push: "do not touch")', () => {
    expect(ok(messagePush({ badge: -1 })).badge).toBe(-1);
  });

  it('rejects is_crt_enabled sent as "yes", naming is_crt_enabled', () => {
    expect(error(messagePush({ is_crt_enabled: 'yes' }))).toBe('is_crt_enabled must be a boolean, got string');
  });

  it('rejects a message that is not a string, naming message', () => {
    expect(error(messagePush({ message: ['a'] }))).toBe('message must be a string, got an array');
  });

  it('names every broken field, not only the first', () => {
    const e = error(messagePush({ device_id: '', badge: '3' }));
    expect(e).toContain('device_id');
    expect(e).toContain('badge');
  });

  it('says "invalid JSON" for a body that is not JSON', () => {
    expect(error('{"platform":')).toMatch(/^invalid JSON: /);
  });

  it('says "empty body" for an empty or blank body', () => {
    expect(error('')).toMatch(/^empty body/);
    expect(error(' \n')).toMatch(/^empty body/);
  });

  it.each([
    ['[]', 'an array'],
    ['null', 'null'],
    ['42', 'number'],
    ['"text"', 'string'],
    ['true', 'boolean'],
  ])('rejects %s at the top level: expected a JSON object, got %s', (body, kind) => {
    expect(error(body)).toBe(`expected a JSON object, got ${kind}`);
  });
});

describe('the ack schema', () => {
  const ack = { id: 'z7jgszh5b1m3yhcce1ayaxe1eh', received_at: 1719400000000, platform: 'android', type: 'message', post_id: 'q7wmodmqo3gct6hm4eszbu68kh', is_id_loaded: false };

  it('accepts an ack as the server re-marshals it', () => {
    const r = parseBody(PushAckSchema, JSON.stringify(ack));
    expect(r).toEqual({ ok: true, value: ack });
  });

  it('rejects an ack without id, naming id', () => {
    const r = parseBody(PushAckSchema, JSON.stringify({ ...ack, id: undefined }));
    expect(r).toEqual({ ok: false, error: 'id is required' });
  });
});

describe('templates', () => {
  const n = ok(messagePush());

  it('renders placeholders from the notification', () => {
    expect(compileTemplate('{sender_name} in {channel_name}: {message}')(n)).toBe(
      '@alice in Release Planning: @alice: Deploy to staging finished, please verify the login flow',
    );
  });

  it('renders numbers as text and missing fields as empty', () => {
    expect(compileTemplate('[{badge}] {root_id}|{sub_type}')(n)).toBe('[3] |');
  });

  it('renders {base_platform} without the -vN suffix', () => {
    expect(compileTemplate('{platform} {base_platform}')(n)).toBe('android_rn-v2 android_rn');
  });

  it('returns literal text unchanged when there is no placeholder', () => {
    expect(compileTemplate('mm/_notif')(n)).toBe('mm/_notif');
  });

  it('refuses an unknown placeholder, naming it', () => {
    expect(() => compileTemplate('mm/{channel}')).toThrow(/unknown placeholder \{channel\}/);
  });

  it('leaves text that only looks like a placeholder alone', () => {
    expect(compileTemplate('{Type} {1} {}')(n)).toBe('{Type} {1} {}');
  });
});

describe('MQTT topic sanitising', () => {
  const topic = compileTemplate('mmch/{channel_name}/{type}', mqttTopicLevel);
  const n = (fields: Record<string, unknown>) => ok(messagePush(fields));

  it('turns / + # in a placeholder value into _', () => {
    expect(topic(n({ channel_name: 'ops/alerts+#1' }))).toBe('mmch/ops_alerts__1/message');
  });

  it('turns NUL in a placeholder value into _', () => {
    expect(topic(n({ channel_name: 'a\u0000b' }))).toBe('mmch/a_b/message');
  });

  it('turns an empty or missing value into _ so no level is empty', () => {
    expect(topic(n({ channel_name: '' }))).toBe('mmch/_/message');
    expect(topic(n({ channel_name: undefined, type: undefined }))).toBe('mmch/_/_');
  });

  it('leaves the literal levels of the template alone', () => {
    expect(compileTemplate('a/b/{type}', mqttTopicLevel)(n({}))).toBe('a/b/message');
  });

  it('keeps spaces, unicode and emoji in a level', () => {
    expect(mqttTopicLevel('Release Planning 🚀 Ü')).toBe('Release Planning 🚀 Ü');
  });

  it.each([
    ['a newline', 'line1\nline2', 'line1_line2'],
    ['a tab', 'a\tb', 'a_b'],
    ['DEL', 'a\u007f', 'a_'],
    ['a C1 control (U+0085)', 'a\u0085', 'a_'],
    ['noncharacters U+FFFE U+FFFF U+FDD0', '\ufffe\uffff\ufdd0', '___'],
    ['an astral noncharacter (U+1FFFE)', 'x\u{1fffe}', 'x_'],
    ['a lone surrogate', 'x\ud800y', 'x_y'],
  ])('turns %s into _: brokers drop the connection for it', (_what, input, output) => {
    expect(mqttTopicLevel(input)).toBe(output);
  });

  it('caps one level at 4096 bytes (a whole topic may not pass 65535), never splitting a character', () => {
    expect(mqttTopicLevel('x'.repeat(70_000))).toBe('x'.repeat(4096));
    expect(mqttTopicLevel('é'.repeat(5000))).toBe('é'.repeat(2048));
    expect(mqttTopicLevel('🚀'.repeat(2000))).toBe('🚀'.repeat(1024));
  });

  it.each([
    ['/', '_'],
    ['+', '_'],
    ['#', '_'],
    ['\u0000', '_'],
    ['', '_'],
    ['a//b', 'a__b'],
  ])('sanitises %j to %j', (input, output) => {
    expect(mqttTopicLevel(input)).toBe(output);
  });
});

describe('the hot-path check agrees with the zod schema', () => {
  it('covers exactly the schema fields, in order', () => {
    expect(FAST_FIELD_NAMES).toEqual(Object.keys(PushNotificationSchema.shape));
  });

  const VALUES: unknown[] = [undefined, '', 'x', 0, -1, 3, 1.5, 2 ** 60, Infinity, true, false, [], {}];

  it.each(loadPayloads().map((p) => [p.name, p] as const))(
    'accepts only what zod accepts, with the same result, for every field of %s set to every kind of value',
    (_name, p) => {
      let fastAccepted = 0;
      for (const field of FAST_FIELD_NAMES) {
        for (const value of VALUES) {
          const input: Record<string, unknown> = { ...p.json, extra: { nested: [1] } };
          if (value === undefined) delete input[field];
          else input[field] = value;
          const viaZod = PushNotificationSchema.safeParse(structuredClone(input));
          const viaFast = fastNotification(structuredClone(input));
          if (viaFast === undefined) continue;
          fastAccepted++;
          expect(viaZod.success, `${field} = ${JSON.stringify(value)}: fast path accepted what zod rejects`).toBe(true);
          expect(viaFast, `${field} = ${JSON.stringify(value)}`).toEqual(viaZod.data);
        }
      }
      expect(fastNotification(structuredClone(p.json))).toEqual(PushNotificationSchema.parse(structuredClone(p.json)));
      expect(fastAccepted).toBeGreaterThan(FAST_FIELD_NAMES.length);
    },
  );
});
