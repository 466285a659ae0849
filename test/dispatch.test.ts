// The one mapping from what the sinks did to Mattermost's OK / REMOVE / FAIL (contract §3.1,
// §3.2), a test per row, and the deadline/exception guard around a single send. Tiny in-test
// sinks: this is pure policy, no peer involved.
import { describe, expect, it } from 'vitest';
import { attempt } from '../src/attempt.js';
import { replyFor, type Delivery, type Result } from '../src/dispatch.js';
import type { PushNotification } from '../src/contract.js';
import type { Outcome, Sink } from '../sinks/types.js';

function sink(name: string, { perDevice = false, send }: { perDevice?: boolean; send?: Sink['send'] } = {}): Sink {
  return {
    name,
    type: 'test',
    perDevice,
    reasons: [],
    start: async () => {},
    state: () => ({ ready: true, state: 'ready' }),
    send: send ?? (async () => ({ kind: 'delivered' })),
    close: async () => {},
  };
}

const d = (s: Sink, result: Result): Delivery => ({ sink: s, result });
const mqtt = sink('mqtt');
const json = sink('json');
const fcm = sink('fcm', { perDevice: true });

/** Mattermost decodes the reply into map[string]string (§3.1): a non-string value is an error. */
function expectAllStrings(reply: object) {
  for (const v of Object.values(reply)) expect(typeof v).toBe('string');
}

describe('replyFor', () => {
  it('answers OK when every sink delivered', () => {
    const r = replyFor([d(mqtt, { kind: 'delivered' }), d(json, { kind: 'delivered' })]);
    expect(r).toEqual({ status: 'OK' });
  });

  it('answers OK when every sink skipped (a clear push has no text for them)', () => {
    expect(replyFor([d(mqtt, { kind: 'skipped', reason: 'no_text' })])).toEqual({ status: 'OK' });
  });

  it('answers OK when no route picked any sink', () => {
    expect(replyFor([])).toEqual({ status: 'OK' });
  });

  it('answers OK when a sink queued the notification durably', () => {
    expect(replyFor([d(mqtt, { kind: 'queued', reason: 'broker_unavailable' })])).toEqual({ status: 'OK' });
  });

  it('answers REMOVE when a per-device sink proves the token dead', () => {
    expect(replyFor([d(fcm, { kind: 'dead-token', reason: 'UNREGISTERED' })])).toEqual({ status: 'REMOVE' });
  });

  it('answers REMOVE for a dead token even when a broadcast sink delivered', () => {
    expect(replyFor([d(mqtt, { kind: 'delivered' }), d(fcm, { kind: 'dead-token', reason: 'UNREGISTERED' })])).toEqual({
      status: 'REMOVE',
    });
  });

  it('answers FAIL, never REMOVE, when a broadcast sink reports a dead token', () => {
    const r = replyFor([d(mqtt, { kind: 'dead-token', reason: 'bogus', detail: 'sink bug' })]);
    expect(r).toEqual({ status: 'FAIL', error: 'mqtt: sink bug' });
    expectAllStrings(r);
  });

  it('answers FAIL naming the sink and its detail when a sink failed retryably', () => {
    const r = replyFor([d(mqtt, { kind: 'retryable', reason: 'broker_unavailable', detail: 'MQTT broker not connected' })]);
    expect(r).toEqual({ status: 'FAIL', error: 'mqtt: MQTT broker not connected' });
  });

  it('falls back to the reason code when a failure has no detail', () => {
    expect(replyFor([d(mqtt, { kind: 'retryable', reason: 'deadline' })])).toEqual({ status: 'FAIL', error: 'mqtt: deadline' });
  });

  it('answers FAIL naming the sink when a sink failed permanently', () => {
    const r = replyFor([d(json, { kind: 'permanent', reason: 'rejected', detail: 'payload too large' })]);
    expect(r).toEqual({ status: 'FAIL', error: 'json: payload too large' });
  });

  it('answers FAIL naming only the failing sinks when others delivered', () => {
    const r = replyFor([
      d(mqtt, { kind: 'delivered' }),
      d(json, { kind: 'retryable', reason: 'publish_failed', detail: 'timeout' }),
      d(sink('log'), { kind: 'skipped', reason: 'no_text' }),
      d(sink('other'), { kind: 'permanent', reason: 'x', detail: 'boom' }),
    ]);
    expect(r.status).toBe('FAIL');
    expect(r.error).toBe('json: timeout; other: boom');
    expectAllStrings(r);
  });

  it('answers OK when one sink queued and the others delivered', () => {
    expect(replyFor([d(mqtt, { kind: 'queued', reason: 'x' }), d(json, { kind: 'delivered' })])).toEqual({ status: 'OK' });
  });

  it('answers REMOVE when a per-device sink proves the token dead, whichever order the failures came in', () => {
    const failed: Result = { kind: 'retryable', reason: 'broker_unavailable' };
    const dead: Result = { kind: 'dead-token', reason: 'Unregistered' };
    expect(replyFor([d(mqtt, failed), d(fcm, dead)]).status).toBe('REMOVE');
    expect(replyFor([d(fcm, dead), d(mqtt, failed)]).status).toBe('REMOVE');
  });

  it('answers FAIL, not REMOVE, when a per-device sink failed without proving the token dead', () => {
    expect(replyFor([d(fcm, { kind: 'retryable', reason: 'unavailable', detail: '503' })])).toEqual({
      status: 'FAIL',
      error: 'fcm: 503',
    });
  });
});

describe('attempt', () => {
  const n = { platform: 'android_rn-v2', server_id: 's', device_id: 'd' } as PushNotification;

  it('returns what the sink answered within the deadline', async () => {
    const out = await attempt(sink('a', { send: async () => ({ kind: 'skipped', reason: 'no_text' }) }), n, 1000);
    expect(out).toEqual({ kind: 'skipped', reason: 'no_text' });
  });

  it('returns retryable "deadline" when a sink never answers', async () => {
    const started = Date.now();
    const out = await attempt(sink('slow', { send: () => new Promise<Outcome>(() => {}) }), n, 50);
    expect(out).toEqual({ kind: 'retryable', reason: 'deadline', detail: 'no answer within 50 ms' });
    expect(Date.now() - started).toBeLessThan(1000);
  });

  it('aborts the signal it gave the sink when the deadline passes', async () => {
    let seen: AbortSignal | undefined;
    await attempt(
      sink('slow', {
        send: (_n, signal) => {
          seen = signal;
          return new Promise<Outcome>(() => {});
        },
      }),
      n,
      20,
    );
    expect(seen?.aborted).toBe(true);
  });

  it('returns permanent "sink_error" with the message when send rejects', async () => {
    const out = await attempt(sink('buggy', { send: async () => Promise.reject(new Error('kaboom')) }), n, 1000);
    expect(out).toEqual({ kind: 'permanent', reason: 'sink_error', detail: 'sink failed: kaboom' });
  });

  it('returns permanent "sink_error" when an async send throws', async () => {
    const out = await attempt(
      sink('buggy', {
        send: async () => {
          throw new TypeError('x is undefined');
        },
      }),
      n,
      1000,
    );
    expect(out.kind).toBe('permanent');
    expect(out).toMatchObject({ reason: 'sink_error', detail: expect.stringContaining('x is undefined') });
  });

  it('returns permanent "sink_error" when send throws before returning a promise', async () => {
    const out = await attempt(
      sink('buggy', {
        send: () => {
          throw new Error('synchronous bug');
        },
      }),
      n,
      1000,
    );
    expect(out).toMatchObject({ kind: 'permanent', reason: 'sink_error', detail: expect.stringContaining('synchronous bug') });
  });
});
