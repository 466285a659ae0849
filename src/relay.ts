// Assembles a running relay from a config: sinks, routes, dispatcher, HTTP server, and an
// orderly stop (stop accepting, answer what is in flight, close the sinks).
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { PushNotificationSchema, type PushNotification } from './contract.js';
import { createDispatcher } from './dispatch.js';
import { createLogger } from './log.js';
import { createDeadTokens } from './dead-tokens.js';
import { createDedup } from './dedup.js';
import { createDeviceRegistry } from './devices.js';
import { createMetrics, createRegistry, sinkMetrics } from './metrics.js';
import { createOutbox, type Outbox } from './outbox.js';
import { pairingRoutes } from './pairing.js';
import { createRouter } from './route.js';
import { memoryKv, openStore, type Store } from './store/index.js';
import { createApp, type App } from './server.js';
import { createSink } from '../sinks/index.js';
import type { Sink } from '../sinks/types.js';

export type Relay = {
  app: App;
  url: string;
  port: number;
  sinks: ReadonlyMap<string, Sink>;
  stop(): Promise<void>;
};

/** A sink's delivery settings: its own overrides over the `delivery` defaults. */
export function sinkPolicy(config: Config, sink: string) {
  const d = config.delivery;
  const s = config.sinks[sink];
  return {
    deadlineMs: s?.deadline ?? d.deadline,
    ttlMs: s?.ttl ?? d.ttl,
    maxAttempts: s?.maxAttempts ?? d.maxAttempts,
    retryMinMs: d.retryMin,
    retryMaxMs: d.retryMax,
    concurrency: s?.concurrency ?? d.concurrency,
    queue: s?.queue ?? d.queue,
  };
}

export async function startRelay(config: Config, logger: Logger = createLogger(config.log)): Promise<Relay> {
  const store = await openStore(config.store, config.dataDir, true);
  if (store) logger.info({ store: store.kind, ...(store.kind === 'sqlite' ? { dataDir: config.dataDir } : {}) }, 'outbox store open');
  else logger.warn('store: none: a delivery that cannot be made within its deadline answers FAIL and is lost');

  const sinks = new Map<string, Sink>();
  try {
    return await assemble(config, logger, store, sinks);
  } catch (err) {
    // Nothing half-started stays behind: a relay that cannot listen still held the store's lock.
    await Promise.all([...sinks.values()].map((s) => s.close().catch(() => {})));
    await store?.close().catch(() => {});
    throw err;
  }
}

async function assemble(config: Config, logger: Logger, store: Store | undefined, sinks: Map<string, Sink>): Promise<Relay> {
  const kv = store ? (ns: string) => store.kv(ns) : memoryKv();
  const registry = createRegistry();
  const devices = createDeviceRegistry(kv('devices'));
  for (const [name, sinkConfig] of Object.entries(config.sinks)) {
    const ctx = {
      logger: logger.child({ sink: name }),
      metrics: sinkMetrics(registry),
      store: kv(`sink:${name}`),
      devices,
      mattermostUrl: config.mattermost?.url,
    };
    sinks.set(name, createSink(name, sinkConfig, ctx));
  }
  await Promise.all([...sinks.values()].map((s) => s.start()));

  const sinkList = [...sinks.values()];
  const metrics = createMetrics(sinkList, store, registry);
  const deadTokens = createDeadTokens(kv('dead-tokens'));
  const dedup = createDedup(config.delivery.dedupWindow, store?.dedup);
  const policies = new Map([...sinks.keys()].map((name) => [name, sinkPolicy(config, name)]));
  const policy = (name: string) => policies.get(name) ?? sinkPolicy(config, name);
  const outbox: Outbox | undefined = store ? createOutbox({ store, sinks, policy, metrics, logger, deadTokens }) : undefined;
  const dispatcher = createDispatcher({ policy, dedup, deadTokens, metrics, outbox });
  const router = createRouter(config.routes, sinks);
  const pairing = pairingRoutes({
    config,
    devices,
    logger,
    vapidPublicKey: sinkList.find((s) => s.vapidPublicKey)?.vapidPublicKey,
    // Called only once the relay serves, so `app` is there by then.
    deliverTest: (token) => app.push(testPush(token)),
  });
  const app = createApp({ config, sinks: sinkList, router, dispatcher, metrics, logger, pairing });

  const { http, port } = await listen(app, config);
  // Started once listening: a relay that cannot listen then has no worker to stop.
  outbox?.start();
  const shown = config.server.host === '0.0.0.0' || config.server.host === '::' ? '127.0.0.1' : config.server.host;
  const url = `http://${shown.includes(':') ? `[${shown}]` : shown}:${port}`;
  logger.info(
    { url, sinks: [...sinks.keys()] },
    `listening; set Mattermost's Push Notification Server to ${url}${config.server.basePath} (or this host's address)`,
  );

  let stopping: Promise<void> | undefined;
  async function stop() {
    const deadline = Date.now() + config.server.shutdownTimeout;
    pairing.stop();
    http.close();
    http.closeIdleConnections();
    // Answer every request already accepted: their deliveries are bounded by the sink deadline.
    while (app.inFlight() > 0 && Date.now() < deadline) await sleep(20);
    if (app.inFlight() > 0) logger.warn({ inFlight: app.inFlight() }, 'shutdown timeout passed with requests in flight');
    http.closeAllConnections();
    await outbox?.stop();
    // Closing is bounded too: a sink whose peer hangs must not keep the process alive.
    const closing = Promise.all(sinkList.map((s) => s.close().catch((err) => logger.warn({ sink: s.name, err }, 'sink close failed'))));
    const left = Math.max(1000, deadline - Date.now());
    if ((await Promise.race([closing.then(() => true), sleep(left).then(() => false)])) === false) {
      logger.warn('sinks did not close in time; exiting anyway');
    }
    dedup.close();
    await store?.close();
    logger.info('stopped');
  }

  return { app, url, port, sinks, stop: () => (stopping ??= stop()) };
}

function listen(app: App, config: Config): Promise<{ http: Server; port: number }> {
  const { host, port } = config.server;
  return new Promise((resolve, reject) => {
    const http = createServer(
      {
        // Mattermost's client keeps idle connections 90 s (contract §1.1). Closing ours sooner
        // races its next POST on a dying socket, and Go does not retry a POST: a lost push.
        keepAliveTimeout: 95_000,
        headersTimeout: 96_000,
        requestTimeout: 300_000,
        // Each answer is one small write the client waits for: no Nagle delay.
        noDelay: true,
      },
      app.listener,
    );
    http.once('error', (err) => reject(new Error(`cannot listen on ${host}:${port}: ${err.message}`)));
    http.listen(port, host, () => resolve({ http, port: (http.address() as AddressInfo).port }));
  });
}

/**
 * The pairing page's "send me a test notification": a `test` push for the device, as Mattermost
 * sends one (contract §2.2: type test, empty ack_id, so never deduplicated), through the same
 * handler, routes and dispatcher as a send_push.
 */
function testPush(token: string): PushNotification {
  return PushNotificationSchema.parse({
    platform: 'android_rn',
    server_id: 'push-relay',
    device_id: token,
    type: 'test',
    message: 'Test notification from push-relay: this browser is paired.',
    ack_id: '',
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
