// The guard against server-side request forgery (src/egress.ts) and the token bucket
// (src/rate-limit.ts) that the sinks and the ingress build on.
import { createServer } from 'node:http';
import { get } from 'node:https';
import { describe, expect, it } from 'vitest';
import { checkEndpoint, guardedLookup, isPublicAddress } from '../src/egress.js';
import { createRateLimiter } from '../src/rate-limit.js';

describe('isPublicAddress', () => {
  it.each([
    ['127.0.0.1', false],
    ['10.1.2.3', false],
    ['172.16.0.1', false],
    ['192.168.1.1', false],
    ['169.254.169.254', false],
    ['100.64.0.1', false],
    ['0.0.0.0', false],
    ['::1', false],
    ['fd00::1', false],
    ['fe80::1', false],
    ['::ffff:10.0.0.1', false],
    ['::ffff:127.0.0.1', false],
    ['not-an-ip', false],
    ['8.8.8.8', true],
    ['1.1.1.1', true],
    ['2606:4700:4700::1111', true],
    ['::ffff:8.8.8.8', true],
  ])('%s -> %s', (ip, expected) => {
    expect(isPublicAddress(ip)).toBe(expected);
  });
});

describe('checkEndpoint', () => {
  it('refuses http, loopback, private addresses and credentials unless allowed', async () => {
    expect(await checkEndpoint('http://push.example.com/x', false)).toMatchObject({ ok: false, reason: expect.stringMatching(/only https/) });
    expect(await checkEndpoint('https://127.0.0.1:8443/x', false)).toMatchObject({ ok: false, reason: expect.stringMatching(/private address \(127\.0\.0\.1\)/) });
    expect(await checkEndpoint('https://[::1]/x', false)).toMatchObject({ ok: false, reason: expect.stringMatching(/private/) });
    expect(await checkEndpoint('https://localhost/x', false)).toMatchObject({ ok: false, reason: expect.stringMatching(/private/) });
    expect(await checkEndpoint('https://10.0.0.5/x', false)).toMatchObject({ ok: false });
    expect(await checkEndpoint('https://u:p@8.8.8.8/x', false)).toMatchObject({ ok: false, reason: expect.stringMatching(/credentials/) });
    expect(await checkEndpoint('ftp://8.8.8.8/x', true)).toMatchObject({ ok: false });
    expect(await checkEndpoint('not a url', true)).toMatchObject({ ok: false, reason: 'not a URL' });
    expect(await checkEndpoint('https://8.8.8.8/x', false)).toMatchObject({ ok: true });
    expect(await checkEndpoint('http://127.0.0.1:1/x', true)).toMatchObject({ ok: true });
  });

  it('refuses a private address at connect time too (no DNS rebinding gap)', async () => {
    const server = createServer((_req, res) => res.end('reached')).listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    const port = (server.address() as { port: number }).port;
    const err = await new Promise<NodeJS.ErrnoException>((resolve) => {
      const req = get({ host: 'localhost', port, path: '/', lookup: guardedLookup(false) as never, timeout: 2000 }, () => resolve(new Error('connected') as NodeJS.ErrnoException));
      req.on('error', resolve);
    });
    expect(err.code).toBe('EPRIVATEADDRESS');
    server.close();
  });
});

describe('createRateLimiter', () => {
  it('lets a burst through, refuses the next, and recovers at the rate', () => {
    const rl = createRateLimiter({ perSecond: 10, burst: 5 });
    const t = 1_000_000;
    for (let i = 0; i < 5; i++) expect(rl.take('a', t)).toBe(true);
    expect(rl.take('a', t)).toBe(false);
    expect(rl.retryAfter('a', t)).toBe(1);
    expect(rl.take('b', t)).toBe(true); // another key has its own bucket
    expect(rl.take('a', t + 100)).toBe(true); // 100 ms at 10/s: one token
    expect(rl.take('a', t + 100)).toBe(false);
  });

  it('keeps memory bounded under many distinct keys', () => {
    const rl = createRateLimiter({ perSecond: 1, burst: 2, maxKeys: 100 });
    for (let i = 0; i < 1000; i++) rl.take(`k${i}`, 5_000);
    expect(rl.size()).toBeLessThanOrEqual(101);
  });
});
