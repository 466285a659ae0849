// Assembles a running relay from a config: sinks, routes, dispatcher, HTTP(S) server, and an
// orderly stop (stop accepting, answer what is in flight, close the sinks).
//
// What a reload (SIGHUP, a change of the config file) may replace lives in a `Generation`:
// the config, the sinks it names, the router, the dispatcher and the app. The HTTP server,
// the store, the outbox worker, the dedup window, the metrics and the device registry live as
// long as the process. The server hands each request to the current generation's app, and
// the outbox reads the current sinks map, so a swap is one synchronous step between two
// requests: a request already inside the old generation finishes there.
import { createServer as createHttpServer, type Server, type ServerOptions } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { hostname } from 'node:os';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { PushNotificationSchema, type PushNotification } from './contract.js';
import { createDispatcher, type Dispatcher } from './dispatch.js';
import { configSecrets, createLogger } from './log.js';
import { createDeadTokens } from './dead-tokens.js';
import { createDedup } from './dedup.js';
import { createDeviceRegistry } from './devices.js';
import { createRefusals } from './guards.js';
import { createMetrics, createRegistry, sinkMetrics } from './metrics.js';
import { createOutbox, type Outbox } from './outbox.js';
import { pairingRoutes } from './pairing.js';
import { liveProblems, type ReloadResult } from './reload.js';
import { createRouter } from './route.js';
import { memoryKv, openStore, type Store } from './store/index.js';
import { createApp, type App } from './server.js';
import { loadTls, type TlsPair } from './tls.js';
import { createSink } from '../sinks/index.js';
import type { Sink } from '../sinks/types.js';

export type { ReloadResult } from './reload.js';

export type Relay = {
  /** The current generation's app (a reload replaces it). */
  readonly app: App;
  readonly config: Config;
  url: string;
  port: number;
  /** The current sinks by name (a reload changes its contents, not its identity). */
  sinks: ReadonlyMap<string, Sink>;
  /**
   * Validates `next` against what cannot change live, builds what changed, swaps it in, then
   * closes what it replaced once its requests are answered. Refused: the old config stays.
   */
  reload(next: Config): Promise<ReloadResult>;
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

export type RelayOptions = {
  /** Reads the config again and reloads it: what POST /admin/reload runs (the CLI: the config file). */
  reloadFromSource?: () => Promise<ReloadResult>;
};

export async function startRelay(
  config: Config,
  logger: Logger = createLogger(config.log, undefined, { values: configSecrets(config) }),
  options: RelayOptions = {},
): Promise<Relay> {
  // Before anything opens: a certificate that does not load stops start-up with its path.
  const tls = config.server.tls ? loadTls(config.server.tls) : undefined;
  const store = await openStore(config.store, config.dataDir, true);
  if (store) logger.info({ store: store.kind, ...(store.kind === 'sqlite' ? { dataDir: config.dataDir } : {}) }, 'outbox store open');
  else logger.warn('store: none: a delivery that cannot be made within its deadline answers FAIL and is lost');

  const sinks = new Map<string, Sink>();
  try {
    return await assemble(config, logger, store, sinks, tls, options);
  } catch (err) {
    // Nothing half-started stays behind: a relay that cannot listen still held the store's lock.
    await Promise.all([...sinks.values()].map((s) => s.close().catch(() => {})));
    await store?.close().catch(() => {});
    throw err;
  }
}

type Generation = { config: Config; app: App; dispatcher: Dispatcher; sinks: Map<string, Sink> };

/** What makes two sink instances the same: their config, and what the relay gives every sink. */
const sinkIdentity = (config: Config, name: string) => JSON.stringify([config.sinks[name], config.mattermost?.url ?? null]);

async function assemble(config: Config, logger: Logger, store: Store | undefined, sinks: Map<string, Sink>, tls: TlsPair | undefined, options: RelayOptions): Promise<Relay> {
  const kv = store ? (ns: string) => store.kv(ns) : memoryKv();
  const registry = createRegistry();
  const devices = createDeviceRegistry(kv('devices'));
  const build = (name: string, cfg: Config) =>
    createSink(name, cfg.sinks[name] as Config['sinks'][string], {
      logger: logger.child({ sink: name }),
      metrics: sinkMetrics(registry),
      store: kv(`sink:${name}`),
      devices,
      mattermostUrl: cfg.mattermost?.url,
    });
  for (const name of Object.keys(config.sinks)) sinks.set(name, build(name, config));
  await Promise.all([...sinks.values()].map((s) => s.start()));

  // Live views: the metrics' gauges read `sinkList`, the outbox reads `sinks`; a swap updates both.
  const sinkList = [...sinks.values()];
  const metrics = createMetrics(sinkList, store, registry);
  const refusals = createRefusals(registry, logger);
  const deadTokens = createDeadTokens(kv('dead-tokens'), { shared: store?.kind === 'postgres' });
  const dedup = createDedup(config.delivery.dedupWindow, store?.dedup);
  let policies = new Map<string, ReturnType<typeof sinkPolicy>>();
  let current!: Generation;
  const policy = (name: string) => policies.get(name) ?? sinkPolicy(current.config, name);
  const outbox: Outbox | undefined = store ? createOutbox({ store, sinks, policy, metrics, logger, deadTokens }) : undefined;

  // The pairing page, from the config and the Web Push sink's VAPID key; built again by a
  // reload that changes either (a browser must subscribe with the key the sink signs with).
  // Its test notification goes through whichever app is current.
  const vapidOf = (list: Iterable<Sink>) => [...list].find((s) => s.vapidPublicKey)?.vapidPublicKey;
  const makePairing = (cfg: Config, vapidPublicKey: string | undefined) =>
    pairingRoutes({ config: cfg, devices, logger, vapidPublicKey, deliverTest: (token) => current.app.push(testPush(token)) });
  let pairing = makePairing(config, vapidOf(sinkList));

  function generation(cfg: Config, genSinks: Map<string, Sink>): Generation {
    const list = [...genSinks.values()];
    const dispatcher = createDispatcher({ policy, dedup, deadTokens, metrics, outbox });
    const app = createApp({
      config: cfg,
      sinks: list,
      router: createRouter(cfg.routes, genSinks),
      dispatcher,
      metrics,
      logger,
      refusals,
      pairing,
      reload: options.reloadFromSource,
    });
    return { config: cfg, app, dispatcher, sinks: genSinks };
  }
  policies = new Map([...sinks.keys()].map((name) => [name, sinkPolicy(config, name)]));
  current = generation(config, new Map(sinks));

  const { server, port } = await listen((req, res) => current.app.listener(req, res), config, tls);
  // Started once listening: a relay that cannot listen then has no worker to stop.
  outbox?.start();
  let tlsPair = tls;
  banner(config, port, tlsPair, logger);

  /** Waits (bounded) until a replaced generation has answered what it accepted, then closes its sinks. */
  async function retire(old: Generation, closing: Sink[]) {
    const deadline = Date.now() + old.config.server.shutdownTimeout;
    while (old.app.inFlight() > 0 && Date.now() < deadline) await sleep(20);
    await Promise.all(
      closing.map((s) =>
        Promise.race([s.close(), sleep(5000)]).catch((err: unknown) => logger.warn({ sink: s.name, err: (err as Error).message }, 'replaced sink did not close cleanly')),
      ),
    );
  }

  async function reload(next: Config): Promise<ReloadResult> {
    const old = current;
    const problems = liveProblems(old.config, next);
    let nextTls: TlsPair | undefined;
    if (next.server.tls) {
      try {
        nextTls = loadTls(next.server.tls);
      } catch (err) {
        problems.push((err as Error).message);
      }
    }
    if (problems.length) return { ok: false, problems };

    // Build and start what is new before touching anything that serves.
    const kept: string[] = [];
    const built = new Map<string, Sink>();
    try {
      for (const name of Object.keys(next.sinks)) {
        if (old.sinks.has(name) && sinkIdentity(old.config, name) === sinkIdentity(next, name)) kept.push(name);
        else built.set(name, build(name, next));
      }
      await Promise.all([...built.values()].map((s) => s.start()));
    } catch (err) {
      await Promise.all([...built.values()].map((s) => s.close().catch(() => {})));
      return { ok: false, problems: [`cannot start a sink: ${(err as Error).message}`] };
    }
    const nextSinks = new Map<string, Sink>();
    for (const name of Object.keys(next.sinks)) nextSinks.set(name, (built.get(name) ?? old.sinks.get(name)) as Sink);

    const changes: string[] = [];
    // The page serving now was built from the old generation's sinks and config.
    const nextVapid = vapidOf(nextSinks.values());
    const oldPairing = pairing;
    if (nextVapid !== vapidOf(old.sinks.values()) || JSON.stringify(old.config.mattermost) !== JSON.stringify(next.mattermost)) {
      pairing = makePairing(next, nextVapid);
      changes.push('pairing page');
    }

    // The swap: synchronous, so no request or outbox round sees half of it.
    policies = new Map([...nextSinks.keys()].map((name) => [name, sinkPolicy(next, name)]));
    current = generation(next, nextSinks);
    if (pairing !== oldPairing) oldPairing.stop();
    sinks.clear();
    for (const [name, s] of nextSinks) sinks.set(name, s);
    sinkList.splice(0, sinkList.length, ...nextSinks.values());
    metrics.addSinks([...built.values()]);
    applyServerSettings(server, next);
    if (next.log.level !== old.config.log.level) logger.level = next.log.level;
    if (nextTls && tlsPair && nextTls.fingerprint !== tlsPair.fingerprint) {
      (server as unknown as import('node:tls').Server).setSecureContext({ cert: nextTls.cert, key: nextTls.key });
      changes.push(`tls certificate ${nextTls.fingerprint.slice(0, 23)}… (valid until ${nextTls.notAfter})`);
    }
    tlsPair = nextTls;

    const replaced = [...old.sinks].filter(([name, s]) => nextSinks.get(name) !== s).map(([, s]) => s);
    for (const name of built.keys()) changes.push(old.sinks.has(name) ? `sink ${name} rebuilt` : `sink ${name} added`);
    for (const name of old.sinks.keys()) if (!nextSinks.has(name)) changes.push(`sink ${name} removed (its outbox rows wait until their ttl)`);
    if (JSON.stringify(old.config.routes) !== JSON.stringify(next.routes)) changes.push('routes');
    for (const key of ['server', 'delivery', 'admin', 'log', 'mattermost'] as const) {
      if (JSON.stringify(old.config[key]) !== JSON.stringify(next[key])) changes.push(key);
    }
    void retire(old, replaced);
    return { ok: true, changes };
  }

  // One reload at a time, in order: a second SIGHUP during a reload waits for it.
  let reloading: Promise<unknown> = Promise.resolve();
  const serialReload = (next: Config): Promise<ReloadResult> => {
    const run = reloading.then(() => reload(next));
    reloading = run.catch(() => {});
    return run.catch((err: unknown) => ({ ok: false, problems: [`reload failed: ${(err as Error).message}`] }) as ReloadResult);
  };

  let stopping: Promise<void> | undefined;
  async function stop() {
    await reloading;
    const cfg = current.config;
    const deadline = Date.now() + cfg.server.shutdownTimeout;
    pairing.stop();
    server.close();
    server.closeIdleConnections();
    // Answer every request already accepted: their deliveries are bounded by the sink deadline.
    while (current.app.inFlight() > 0 && Date.now() < deadline) await sleep(20);
    if (current.app.inFlight() > 0) logger.warn({ inFlight: current.app.inFlight() }, 'shutdown timeout passed with requests in flight');
    server.closeAllConnections();
    await outbox?.stop();
    refusals.stop();
    // Closing is bounded too: a sink whose peer hangs must not keep the process alive.
    const closing = Promise.all([...sinks.values()].map((s) => s.close().catch((err) => logger.warn({ sink: s.name, err }, 'sink close failed'))));
    const left = Math.max(1000, deadline - Date.now());
    if ((await Promise.race([closing.then(() => true), sleep(left).then(() => false)])) === false) {
      logger.warn('sinks did not close in time; exiting anyway');
    }
    dedup.close();
    await store?.close();
    logger.info('stopped');
  }

  const scheme = tls ? 'https' : 'http';
  return {
    get app() {
      return current.app;
    },
    get config() {
      return current.config;
    },
    url: `${scheme}://${shownHost(config.server.host)}:${port}`,
    port,
    sinks,
    reload: serialReload,
    stop: () => (stopping ??= stop()),
  };
}

const shownHost = (host: string) => {
  const h = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host;
  return h.includes(':') ? `[${h}]` : h;
};

/**
 * The start-up banner: what listens where, which sinks and routes are live, and the value to
 * enter in Mattermost (System Console > Environment > Push Notification Server), with the
 * base path, https when the relay serves TLS, and `user:****@` when basic auth is on: the
 * password is the admin's to type, never ours to print.
 */
export function banner(config: Config, port: number, tls: TlsPair | undefined, logger: Logger): void {
  const s = config.server;
  const scheme = tls ? 'https' : 'http';
  const wildcard = s.host === '0.0.0.0' || s.host === '::';
  // With TLS the name Mattermost uses must be one the certificate holds.
  const host = tls?.names[0] ?? (wildcard ? hostname() : s.host);
  const auth = s.auth ? `${encodeURIComponent(s.auth.username)}:****@` : '';
  const mattermostUrl = `${scheme}://${auth}${host.includes(':') ? `[${host}]` : host}:${port}${s.basePath}`;
  const sinks = Object.entries(config.sinks).map(([name, c]) => `${name} (${c.type})`);
  const routes = config.routes?.map((r) => `${Object.keys(r.match).length ? JSON.stringify(r.match) : 'everything'} -> ${r.sinks.join(', ')}`);
  const guards = [s.allow && `allow ${s.allow.length} network(s)`, s.trustProxy && `X-Forwarded-For from ${s.trustProxy.join(', ')}`, s.rateLimit && `rate limit ${s.rateLimit.perSecond}/s (burst ${s.rateLimit.burst}) per client`, s.auth && 'basic auth', s.basePath && 'secret base path', config.admin.token && `admin token${config.admin.metricsAuth ? ' (also /metrics)' : ''}`].filter(Boolean);
  const listen = `${scheme}://${s.host.includes(':') ? `[${s.host}]` : s.host}:${port}`;
  logger.info({ listen, tls: tls ? { fingerprint: tls.fingerprint, names: tls.names, validUntil: tls.notAfter } : undefined }, `listening on ${listen}${tls ? ` (TLS, certificate for ${tls.names.join(', ') || 'no DNS name'})` : ''}`);
  logger.info({ sinks: Object.keys(config.sinks), routes: config.routes?.length ?? 0 }, `sinks: ${sinks.join(', ')}; routes: ${routes?.join('; ') ?? 'none (every sink gets every notification)'}`);
  logger.info({ guards }, `guards on the API: ${guards.join(', ') || 'none (anyone who reaches the port may post)'}`);
  logger.info(
    { mattermostUrl },
    `set Mattermost's Push Notification Server to ${mattermostUrl}${auth ? ' (with the real password in place of ****)' : ''}${!tls && wildcard ? ' (or this host\'s address as Mattermost reaches it)' : ''}`,
  );
}

/** The server settings a reload may change on the running server (the rest: reload.ts). */
function applyServerSettings(server: Server, config: Config) {
  const s = config.server;
  server.headersTimeout = s.headersTimeout;
  server.requestTimeout = s.requestTimeout;
  server.keepAliveTimeout = s.keepAliveTimeout;
  server.maxHeadersCount = s.maxHeaders + 1;
}

function listen(listener: Parameters<typeof createHttpServer>[1], config: Config, tls: TlsPair | undefined): Promise<{ server: Server; port: number }> {
  const { host, port } = config.server;
  const options: ServerOptions = {
    // Mattermost's client keeps idle connections 90 s (contract §1.1). Closing ours sooner
    // races its next POST on a dying socket, and Go does not retry a POST: a lost push.
    keepAliveTimeout: config.server.keepAliveTimeout,
    // A head must arrive within seconds (slow-loris clients); an idle keep-alive connection
    // is not in a request, so this does not cut it (test/slow-client.test.ts shows both).
    headersTimeout: config.server.headersTimeout,
    requestTimeout: config.server.requestTimeout,
    // node:http checks those timeouts on this period (default 30 s, which would let a
    // trickling head live 40 s with a 10 s headersTimeout).
    connectionsCheckingInterval: 500,
    maxHeaderSize: config.server.maxHeaderSize,
    // Each answer is one small write the client waits for: no Nagle delay.
    noDelay: true,
  };
  return new Promise((resolve, reject) => {
    const server: Server = tls ? (createHttpsServer({ ...options, cert: tls.cert, key: tls.key }, listener) as unknown as Server) : createHttpServer(options, listener);
    // One above the limit, so that server.ts sees a request over it (and answers 431).
    server.maxHeadersCount = config.server.maxHeaders + 1;
    server.once('error', (err) => reject(new Error(`cannot listen on ${host}:${port}: ${err.message}`)));
    server.listen(port, host, () => resolve({ server, port: (server.address() as AddressInfo).port }));
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
