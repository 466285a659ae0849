// The in-memory idempotency window (src/dedup.ts), used with SQLite and with no store (issue 3: "the same (ack_id, sink)
// is delivered once within a configurable window").
import { describe, expect, it } from 'vitest';
import { createMemoryDedup } from '../src/dedup.js';

const WINDOW = 60_000;

describe('the in-memory dedup window', () => {
  it('refuses the same (sink, ack_id) again anywhere within the window', () => {
    const d = createMemoryDedup();
    expect(d.acquire('mqtt', 'a1', WINDOW, 0)).toBe(true);
    for (const t of [1, 29_999, 30_000, 45_000, 59_999]) expect(d.acquire('mqtt', 'a1', WINDOW, t)).toBe(false);
  });

  it('keeps sinks apart: the same ack_id is new to another sink', () => {
    const d = createMemoryDedup();
    expect(d.acquire('mqtt', 'a1', WINDOW, 0)).toBe(true);
    expect(d.acquire('webhook', 'a1', WINDOW, 0)).toBe(true);
  });

  it('forgets an id between one and one and a half windows later', () => {
    const d = createMemoryDedup();
    expect(d.acquire('mqtt', 'a1', WINDOW, 0)).toBe(true);
    expect(d.acquire('mqtt', 'a1', WINDOW, 89_999)).toBe(false);
    expect(d.acquire('mqtt', 'a1', WINDOW, 90_000)).toBe(true);
  });

  it('forgets everything after a long idle spell, and counts what it holds', () => {
    const d = createMemoryDedup();
    for (let i = 0; i < 10; i++) d.acquire('mqtt', `a${i}`, WINDOW, 0);
    expect(d.size()).toBe(10);
    expect(d.acquire('mqtt', 'a1', WINDOW, 10 * WINDOW)).toBe(true);
    expect(d.size()).toBe(1);
  });

  it('takes an id back on release, so a resend after a failure is tried again', () => {
    const d = createMemoryDedup();
    d.acquire('mqtt', 'a1', WINDOW, 0);
    d.release('mqtt', 'a1');
    expect(d.acquire('mqtt', 'a1', WINDOW, 1)).toBe(true);
  });

  it('stays within its cap under a flood of distinct ids by dropping the oldest generation', () => {
    const d = createMemoryDedup(1000);
    for (let i = 0; i < 5000; i++) d.acquire('mqtt', `id${i}`, WINDOW, Math.floor(i / 10));
    expect(d.size()).toBeLessThanOrEqual(1000);
    expect(d.acquire('mqtt', 'id4999', WINDOW, 500)).toBe(false);
  });
});
