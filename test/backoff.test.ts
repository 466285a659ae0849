// Outbox retry spacing (issue 3: "exponential backoff with jitter, honouring Retry-After").
import { describe, expect, it } from 'vitest';
import { backoff } from '../src/outbox.js';

const P = { retryMinMs: 1000, retryMaxMs: 60_000 };

describe('outbox backoff', () => {
  it('doubles from retryMin with each attempt, jittered into the upper half', () => {
    for (const [attempts, full] of [
      [1, 1000],
      [2, 2000],
      [3, 4000],
      [6, 32_000],
    ] as const) {
      for (let i = 0; i < 200; i++) {
        const d = backoff(attempts, P);
        expect(d).toBeGreaterThanOrEqual(full / 2);
        expect(d).toBeLessThanOrEqual(full);
      }
    }
  });

  it('never waits longer than retryMax, however many attempts', () => {
    for (const attempts of [7, 20, 1000]) for (let i = 0; i < 100; i++) expect(backoff(attempts, P)).toBeLessThanOrEqual(60_000);
  });

  it('spreads retries out rather than sending them in lockstep', () => {
    const seen = new Set(Array.from({ length: 50 }, () => backoff(5, P)));
    expect(seen.size).toBeGreaterThan(10);
  });

  it('waits at least what the sink asked for with Retry-After', () => {
    expect(backoff(1, P, 120_000)).toBe(120_000);
    expect(backoff(1, P, 10)).toBeGreaterThanOrEqual(500);
  });
});
