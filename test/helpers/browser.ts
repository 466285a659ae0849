// The pairing page on a real socket, and Debian's Chromium to drive it (playwright-core, no
// browser download). Under CI=true a missing Chromium fails the test file; elsewhere the browser
// tests skip with a printed reason.
import { generateKeyPairSync } from 'node:crypto';
import { existsSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { getRequestListener } from '@hono/node-server';
import { chromium, type Browser } from 'playwright-core';
import type { Logger } from 'pino';
import { afterAll } from 'vitest';
import { parseConfig } from '../../src/config.js';
import type { PushResponse } from '../../src/contract.js';
import type { DeviceRegistry } from '../../src/devices.js';
import { createLogger } from '../../src/log.js';
import { pairingRoutes, type Pairing } from '../../src/pairing.js';

export const CHROMIUM = '/usr/bin/chromium';

/** Whether the browser tests can run here; throws under CI=true when Chromium is missing. */
export function chromiumAvailable(): boolean {
  if (existsSync(CHROMIUM)) return true;
  if (process.env.CI === 'true') throw new Error(`${CHROMIUM} is missing (apt-get install chromium); the browser tests cannot run`);
  console.warn(`skipping the browser tests: ${CHROMIUM} is missing (apt-get install chromium)`);
  return false;
}

const browsers = new Set<Browser>();

export async function launchChromium(): Promise<Browser> {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
    timeout: 20_000,
  });
  browsers.add(browser);
  return browser;
}

/** A VAPID key pair as the webpush sink holds one: the public key is the raw P-256 point, base64url. */
export function vapidPublicKey(): string {
  const { publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const jwk = publicKey.export({ format: 'jwk' }) as { x: string; y: string };
  return Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x, 'base64url'), Buffer.from(jwk.y, 'base64url')]).toString('base64url');
}

const servers = new Set<{ server: Server; pairing: Pairing }>();

/**
 * pairingRoutes alone on 127.0.0.1 and a kernel-chosen port: for what the relay object does not
 * expose (keep-alive rounds) and for a VAPID key without a Web Push sink in this branch.
 */
export async function servePairing(
  raw: Record<string, unknown>,
  devices: DeviceRegistry,
  opts: { vapidPublicKey?: string; logger?: Logger; deliverTest?: (token: string) => Promise<PushResponse> } = {},
): Promise<{ base: string; pairing: Pairing }> {
  const pairing = pairingRoutes({
    config: parseConfig({ sinks: { log: { type: 'log' } }, ...raw }),
    devices,
    logger: opts.logger ?? createLogger({ level: 'silent', format: 'json' }),
    vapidPublicKey: opts.vapidPublicKey,
    deliverTest: opts.deliverTest ?? (async () => ({ status: 'OK' })),
  });
  const server = createServer(getRequestListener(pairing.fetch));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  servers.add({ server, pairing });
  return { base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, pairing };
}

afterAll(async () => {
  await Promise.all([...browsers].map((b) => b.close().catch(() => {})));
  browsers.clear();
  for (const s of servers) {
    s.pairing.stop();
    s.server.closeAllConnections();
    await new Promise((r) => s.server.close(r));
  }
  servers.clear();
});
